"""Workers of tests/consumers/test_data_broadcast.py and test_device_placement.py: a TP=2 replica
where one rank reads (the cache, or synthetic micro-batches) and its peer receives the step's
micro-batches (Megatron's ``broadcast_data``)."""

from __future__ import annotations

import dataclasses
import hashlib

import torch

import consumers.batch
from consumers.batch import make_inputs
from consumers.data import broadcast_micro_batches, step_batches
from consumers.parallel import ParallelLayout, init_distributed, init_parallel
from megatron_qwenimage.cache import manifest
from megatron_qwenimage.data.agreement import TorchDistributedAgreement
from megatron_qwenimage.data.mixing import SampleRef, StepPlan
from megatron_qwenimage.data.reader import CacheReader, MicroBatch, ReaderConfig, _OpenShard
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.flow_matching import UniformSigmaSampler

STAGE = {"name": "s", "buckets": ["16x16", "32x32"], "micro_batch": 2, "global_batch": 4}


def reader_config(cache: str) -> ReaderConfig:
    return ReaderConfig.from_dict(
        {
            "caches": [{"path": cache, "tasks": ["t2i", "edit"]}],
            "stages": [STAGE],
            "prefetch_steps": 1,
            "verify_checksums": True,
            "tasks": {"t2i": 1.0, "edit": 1.0},
        }
    )


def digest(batches) -> list[dict]:
    """Exact content of micro-batches: dtype, shape and a hash of the bytes of every tensor."""

    def h(t: torch.Tensor) -> str:
        return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()

    return [
        {
            "latents": h(mb.latents),
            "text": h(mb.text),
            "mask": h(mb.text_mask),
            "conditions": [h(c) for c in mb.condition_latents],
            "task": mb.task,
            "bucket": mb.bucket,
            "ids": mb.sample_ids,
        }
        for mb in batches
    ]


def broadcast_worker(rank: int, world: int, cache: str, steps: int) -> dict:
    init_distributed()
    pstate = init_parallel(ParallelLayout.for_world(world, tp=world))
    counts = {"verify": 0, "open": 0}
    verify, open_init = manifest.Shard.verify, _OpenShard.__init__

    def counting_verify(self, *a, **k):
        counts["verify"] += 1
        return verify(self, *a, **k)

    def counting_open(self, *a, **k):
        counts["open"] += 1
        return open_init(self, *a, **k)

    manifest.Shard.verify, _OpenShard.__init__ = counting_verify, counting_open
    received, error = [], None
    try:
        with CacheReader(
            reader_config(cache),
            dp_rank=0,
            dp_size=1,
            read_samples=pstate.reads_data,
            agreement=TorchDistributedAgreement(),
        ) as reader:
            for _ in range(steps):
                micro = reader.next_global_step()
                micro = broadcast_micro_batches(
                    micro, group=pstate.model_parallel_group, src=pstate.data_source_rank, device=pstate.device
                )
                received.append(digest(micro))
    except UserError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        manifest.Shard.verify, _OpenShard.__init__ = verify, open_init
    # What this rank would have read itself: the broadcast must deliver exactly those tensors.
    own = []
    if error is None:
        with CacheReader(reader_config(cache), dp_rank=0, dp_size=1) as reader:
            own = [digest(reader.next_global_step()) for _ in range(steps)]
    return {"reads": pstate.reads_data, "counts": counts, "received": received, "own": own, "error": error}


# ------------------------------------------------------------------------------------------------
# Synthetic micro-batches: what a reading rank holds, with values chosen to expose a lossy wire.

#: Channels and text width of the synthetic micro-batches.
CHANNELS, TEXT_DIM = 4, 8


def bf16_exact_wide_range(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """float32 ``shape`` values that bfloat16 holds exactly but float16 does not.

    Random bf16 significands times powers of two spread over bf16's whole exponent range
    (2^-126 .. 2^120, subnormals of float16 and beyond its 65504 maximum, both signs): a float16
    wire overflows the large ones to inf and flushes or rounds the small ones.
    """
    significand = torch.randn(shape, generator=generator).bfloat16().float()
    exponent = torch.randint(-126, 121, shape, generator=generator).float()
    return (significand * torch.exp2(exponent)).bfloat16().float()


def synthetic_micro_batches(step: int) -> list[MicroBatch]:
    """A reading rank's micro-batches of `step` (t2i on even steps, edit with one 8x16 condition
    image on odd ones): two micro-batches of 2 samples, 16x16 latents, 5 and 3 text tokens (the
    second sample of each one token shorter); float32 values from `bf16_exact_wide_range` (what
    the reader gives: the cache's bf16 widened bit by bit)."""
    g = torch.Generator().manual_seed(1000 + step)
    task = ("t2i", "edit")[step % 2]
    out = []
    for k, tokens in enumerate((5, 3)):
        mask = torch.arange(tokens)[None, :] < torch.tensor([[tokens], [tokens - 1]])  # [2, T]
        out.append(
            MicroBatch(
                latents=bf16_exact_wide_range((2, CHANNELS, 16, 16), g),
                condition_latents=[bf16_exact_wide_range((2, CHANNELS, 8, 16), g)] if task == "edit" else [],
                text=bf16_exact_wide_range((2, tokens, TEXT_DIM), g) * mask[..., None],
                text_mask=mask,
                task=task,
                bucket="128x128",
                sample_ids=[f"s{step}-{k}-{j}" for j in range(2)],
            )
        )
    return out


def synthetic_plan(step: int, micro_batches: list[MicroBatch]) -> StepPlan:
    """The `StepPlan` of one replica's `synthetic_micro_batches` (DP=1: they are the global batch)."""
    refs = tuple(SampleRef("synthetic", row) for row in range(sum(mb.batch_size for mb in micro_batches)))
    return StepPlan(step, 0, "s", micro_batches[0].task, "synthetic", 1, micro_batches[0].bucket, 2, refs)


def synthetic_exact_worker(rank: int, world: int, steps: int) -> dict:
    """TP=`world`: rank 0 broadcasts `synthetic_micro_batches`; every rank returns the `digest` of
    what it received (on the CPU training device) and of the source's originals."""
    init_distributed()
    pstate = init_parallel(ParallelLayout.for_world(world, tp=world))
    received, sent = [], []
    for step in range(steps):
        originals = synthetic_micro_batches(step)
        micro = broadcast_micro_batches(
            originals if pstate.reads_data else [],
            group=pstate.model_parallel_group,
            src=pstate.data_source_rank,
            device=pstate.device,
        )
        received.append(digest(micro))
        sent.append(digest(originals))
    return {"reads": pstate.reads_data, "received": received, "sent": sent}


def _devices(tensors) -> list[str]:
    return [str(t.device) for t in tensors]


def placement_worker(rank: int, world: int, device: str) -> dict:
    """TP=`world` with `device` as the training device (``pstate.device``) while the collective runs
    on gloo (CPU): the trainer's data path (`broadcast_micro_batches`, `step_batches`) and the
    engine's input construction (`make_inputs`, as `TrainEngine` calls it). Returns the device of
    every tensor a micro-batch, a `Batch` and a `StepInputs` hold, and the devices of ``x0``,
    ``noise`` and ``sigma`` where `flow_matching_inputs` mixes them."""
    init_distributed()
    pstate = dataclasses.replace(init_parallel(ParallelLayout.for_world(world, tp=world)), device=torch.device(device))
    mixed = []
    flow_matching_inputs = consumers.batch.flow_matching_inputs

    def recording_flow_matching_inputs(x0, noise, sigma):
        mixed.append({"x0": str(x0.device), "noise": str(noise.device), "sigma": str(sigma.device)})
        return flow_matching_inputs(x0, noise, sigma)

    consumers.batch.flow_matching_inputs = recording_flow_matching_inputs
    micro_batches, batches, inputs = [], [], []
    try:
        for step in range(2):  # t2i, then edit (condition latents)
            micro = broadcast_micro_batches(
                synthetic_micro_batches(step) if pstate.reads_data else [],
                group=pstate.model_parallel_group,
                src=pstate.data_source_rank,
                device=pstate.device,
            )
            step_batch = step_batches(
                micro, synthetic_plan(step, micro), dp_rank=pstate.dp_rank, dp_size=pstate.layout.dp, pad_multiple=4
            )
            micro_batches += micro
            batches += step_batch
            inputs += [
                make_inputs(
                    b,
                    step=step,
                    seed=0,
                    sigma_sampler=UniformSigmaSampler(),
                    patch_size=2,
                    dtype=torch.bfloat16,
                    device=pstate.device,
                )
                for b in step_batch
            ]
    finally:
        consumers.batch.flow_matching_inputs = flow_matching_inputs
    return {
        "reads": pstate.reads_data,
        "micro_batches": [_devices([mb.latents, mb.text, mb.text_mask, *mb.condition_latents]) for mb in micro_batches],
        "batches": [_devices([b.latents, b.text, b.text_mask, *b.condition_latents]) for b in batches],
        "inputs": [_devices([i.hidden_states, i.text, i.text_mask, i.sigma, i.target]) for i in inputs],
        "mixed": mixed,
    }
