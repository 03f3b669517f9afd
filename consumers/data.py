"""Bridge from the cache reader (`megatron_qwenimage.data.reader`) to the training step.

The reader (another module's job) decides the global sample order, buckets, tasks, curriculum,
cache mixing, tailing and prefetch, and hands this DP rank its micro-batches of a step. Here they
become `consumers.step.Batch` es: each sample gets its index in the step's *global* batch (the
seed of its σ and noise, so draws do not depend on the layout), and the text of all micro-batches
of the step is padded to one length (static shapes per step, as pipeline schedules need), rounded
up to `pad_multiple` tokens so that few distinct shapes (and cached schedules) occur.
"""

from __future__ import annotations

from typing import Sequence

import torch

from consumers.step import Batch
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


def step_batches(
    micro_batches: Sequence[MicroBatch], plan: StepPlan, *, dp_rank: int, dp_size: int, pad_multiple: int = 1
) -> list[Batch]:
    """This rank's `Batch` es of one step, text padded to one length, global sample indices set."""
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
        out.append(Batch(latents=mb.latents, text=text, text_mask=mask, sample_index=idx,
                         condition_latents=list(mb.condition_latents), task=mb.task))
    return out
