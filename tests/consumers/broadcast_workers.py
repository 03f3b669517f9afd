"""Worker of tests/consumers/test_data_broadcast.py: a TP=2 replica where one rank reads the cache
and its peer receives the step's micro-batches (Megatron's ``broadcast_data``)."""

from __future__ import annotations

import hashlib

import torch

from consumers.data import broadcast_micro_batches
from consumers.parallel import ParallelLayout, init_distributed, init_parallel
from megatron_qwenimage.cache import manifest
from megatron_qwenimage.data.agreement import TorchDistributedAgreement
from megatron_qwenimage.data.reader import CacheReader, ReaderConfig, _OpenShard
from megatron_qwenimage.errors import UserError

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
