"""Worker of tests/consumers/test_reader_agreement.py: two ranks whose views of a growing cache
differ (a snapshot published between their starts, and another mid-run)."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from megatron_qwenimage.data.agreement import TorchDistributedAgreement
from megatron_qwenimage.data.reader import CacheReader, ReaderConfig
from tests.helpers.reader import B16, payload, publish

STAGE = {"name": "s", "buckets": ["16x16"], "micro_batch": 2, "global_batch": 4}


def agreement_worker(rank: int, world: int, cache: str, steps: int, agree: bool) -> dict:
    dist.init_process_group("gloo")
    if rank == 0:
        publish(Path(cache), "p0", [payload(B16, 8, prefix="p0", seed=0)])  # v1: 2 steps per epoch
    dist.barrier()
    if rank == 1:
        time.sleep(2.0)  # rank 0 has pinned what it sees (v1) and waits in the reader's broadcast
        publish(Path(cache), "p1", [payload(B16, 8, prefix="p1", seed=1)])  # v2, seen by rank 1 only at start
    cfg = ReaderConfig.from_dict({"caches": [{"path": cache, "mode": "grow"}], "stages": [STAGE], "prefetch_steps": 1})
    agreement = TorchDistributedAgreement() if agree else None
    seen = []
    with CacheReader(cfg, dp_rank=0, dp_size=1, agreement=agreement) as reader:
        for step in range(steps):
            if rank == 1 and step == 3:
                publish(Path(cache), "p2", [payload(B16, 8, prefix="p2", seed=2)])  # v3, mid-run, no barrier
            batches = reader.next_global_step()
            seen.append([reader.last_step.snapshot_version, [s for mb in batches for s in mb.sample_ids]])
    dist.barrier()
    return {"steps": seen}
