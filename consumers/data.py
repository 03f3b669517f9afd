"""Bridge from the cache reader (`megatron_qwenimage.data.reader`) to the training step.

The reader (another module's job) decides the global sample order, buckets, tasks, curriculum,
cache mixing, tailing and prefetch, and hands this DP rank its micro-batches of a step. Here they
become `consumers.batch.Batch` es: each sample gets its index in the step's *global* batch (the
seed of its σ and noise, so draws do not depend on the layout), and the text of all micro-batches
of the step is padded to one length (static shapes per step, as pipeline schedules need), rounded
up to `pad_multiple` tokens so that few distinct shapes (and cached schedules) occur.

The ranks of one data-parallel replica (its TP x PP peers) train on the same samples, so only one
of them reads the cache (opening and verifying each shard the first time it needs it) and
`broadcast_micro_batches` sends the step's micro-batches to the others, as Megatron's
``broadcast_data`` does for its TP group. Every rank still plans every step itself (pins, order,
state) and the readers' agreement check compares those plans across the world. Whoever read
them, the step's micro-batches come out of `broadcast_micro_batches` on the training device
(``pstate.device``), on every rank alike, whatever device the collective used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

from consumers.batch import Batch
from megatron_qwenimage.data.reader import MicroBatch, StepPlan


def pad_text(text: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``text [b, T, D]`` and ``mask [b, T]`` to `length` tokens."""
    b, t, d = text.shape
    if length < t:
        raise ValueError(f"pad_text: cannot pad {t} tokens down to {length}")
    if length == t:
        return text, mask
    out = text.new_zeros(b, length, d)
    out[:, :t] = text
    out_mask = mask.new_zeros(b, length)
    out_mask[:, :t] = mask
    return out, out_mask


def micro_batch_to(micro_batch: MicroBatch, device: torch.device) -> MicroBatch:
    """`micro_batch` with every tensor on `device` (values, dtypes and metadata unchanged)."""
    return dataclasses.replace(
        micro_batch,
        latents=micro_batch.latents.to(device),
        condition_latents=[c.to(device) for c in micro_batch.condition_latents],
        text=micro_batch.text.to(device),
        text_mask=micro_batch.text_mask.to(device),
    )


def collective_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where `group`'s collectives take their tensors: the CPU under gloo, else `device` (NCCL: this rank's GPU)."""
    return torch.device("cpu") if dist.get_backend(group) == dist.Backend.GLOO else device


def broadcast_micro_batches(
    micro_batches: list[MicroBatch], *, group: dist.ProcessGroup | None, src: int, device: torch.device
) -> list[MicroBatch]:
    """The source rank's micro-batches of one step, on every rank of `group`, on `device` (a collective).

    Args:
        micro_batches: the step's micro-batches on global rank `src` (ignored on the others,
            which pass ``[]``); float32 ``latents [b, C, h, w]``, ``text [b, T, D_txt]``, bool
            ``text_mask [b, T]``, one ``[b, C, hc, wc]`` per condition image, as the reader gives them.
        group: the ranks that train on these samples (a replica's model-parallel group); None or
            a one-rank group sends nothing.
        src: the global rank that read them.
        device: the training device (``pstate.device``). Every rank returns its micro-batches
            there, the reading rank included, so the model and the σ / noise draws of
            `consumers.batch.make_inputs` find them where they run. The collective itself runs
            on `collective_device` (the CPU under gloo, `device` under NCCL).

    The header (shapes, task, bucket, sample ids) goes as one object; latents, text and
    condition latents travel as bfloat16, which is exact: the cache stores them in bf16 and the
    reader widens them to float32 bit by bit. The reading rank returns its own tensors' values.
    """
    if group is None or dist.get_world_size(group) == 1:
        return [micro_batch_to(mb, device) for mb in micro_batches]
    wire = collective_device(group, device)
    is_src = dist.get_rank() == src
    header = [
        [
            {
                "latents": tuple(mb.latents.shape),
                "text": tuple(mb.text.shape),
                "conditions": [tuple(c.shape) for c in mb.condition_latents],
                "task": mb.task,
                "bucket": mb.bucket,
                "sample_ids": list(mb.sample_ids),
            }
            for mb in micro_batches
        ]
        if is_src
        else None
    ]
    dist.broadcast_object_list(header, src=src, group=group, device=wire if wire.type != "cpu" else None)
    out = []
    for i, h in enumerate(header[0]):

        def payload(shape, dtype, local=None):
            if is_src:
                tensor = local.to(device=wire, dtype=dtype).contiguous()
            else:
                tensor = torch.empty(shape, dtype=dtype, device=wire)
            dist.broadcast(tensor, src=src, group=group)
            return tensor

        mine = micro_batches[i] if is_src else None
        latents = payload(h["latents"], torch.bfloat16, mine.latents if is_src else None)
        text = payload(h["text"], torch.bfloat16, mine.text if is_src else None)
        mask = payload(h["text"][:2], torch.uint8, mine.text_mask if is_src else None)
        conditions = [
            payload(shape, torch.bfloat16, mine.condition_latents[k] if is_src else None)
            for k, shape in enumerate(h["conditions"])
        ]
        if is_src:  # the reader's own values
            out.append(micro_batch_to(mine, device))
            continue
        out.append(
            MicroBatch(
                latents=latents.to(device=device, dtype=torch.float32),
                condition_latents=[c.to(device=device, dtype=torch.float32) for c in conditions],
                text=text.to(device=device, dtype=torch.float32),
                text_mask=mask.to(device=device, dtype=torch.bool),
                task=h["task"],
                bucket=h["bucket"],
                sample_ids=list(h["sample_ids"]),
            )
        )
    return out


def step_batches(
    micro_batches: Sequence[MicroBatch], plan: StepPlan, *, dp_rank: int, dp_size: int, pad_multiple: int = 1
) -> list[Batch]:
    """This rank's `Batch` es of one step, text padded to one length, global sample indices set.

    Args:
        micro_batches: this DP rank's micro-batches of the step, in order (from
            `broadcast_micro_batches`: on the training device; the batches stay there).
        plan: the step's plan; ``len(plan.refs)`` is the global batch, split evenly over DP.
        dp_rank, dp_size: this rank's replica and the number of replicas. DP rank r holds the
            samples ``[r * per_rank, (r + 1) * per_rank)`` of the global batch, so
            ``Batch.sample_index`` (``[b]`` int64 on the CPU, host-side seeds of σ and noise)
            numbers each sample by its place in the *global* batch, the same under every layout.
        pad_multiple: the text length is the step's longest, rounded up to a multiple of it.
    """
    if not micro_batches:
        raise ValueError(f"step {plan.step}: the reader returned no micro-batches")
    per_rank = len(plan.refs) // dp_size
    t_max = max(mb.text.shape[1] for mb in micro_batches)
    length = -(-t_max // pad_multiple) * pad_multiple
    out, start = [], dp_rank * per_rank
    for mb in micro_batches:
        text, mask = pad_text(mb.text, mb.text_mask, length)
        idx = torch.arange(start, start + mb.batch_size, dtype=torch.int64)
        start += mb.batch_size
        out.append(
            Batch(
                latents=mb.latents,
                text=text,
                text_mask=mask,
                sample_index=idx,
                condition_latents=list(mb.condition_latents),
                task=mb.task,
            )
        )
    return out
