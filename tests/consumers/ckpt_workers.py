"""Worker bodies of the checkpoint tests (spawned gloo ranks)."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from consumer_helpers import synthetic_global_batch, to_microbatches
from consumers.checkpoint import CheckpointConfig, CheckpointManager
from consumers.engine import TrainEngine
from consumers.parallel import ParallelLayout, init_parallel
from layout_workers import GLOBAL_BATCH, MODEL, OPT, SEED, step_task
from megatron_qwenimage.config import load_config


def _engine(layout: ParallelLayout):
    pstate = init_parallel(layout)
    engine = TrainEngine(load_config("tiny-16ch", **MODEL), pstate, optimizer=OPT, seed=SEED,
                         global_batch_size=GLOBAL_BATCH, init_seed=0)
    return pstate, engine


def _run(engine, pstate, steps) -> list[float]:
    out = []
    for step in steps:
        task = step_task(step)
        mbs = to_microbatches(synthetic_global_batch(step, GLOBAL_BATCH, task=task), dp_rank=pstate.dp_rank,
                              dp=pstate.layout.dp, micro_batch=1, task=task)
        out.append(engine.train_step(step, mbs).loss)
    return out


def reshard_worker(rank: int, world: int, root: str) -> dict:
    a = ParallelLayout(tp=2, pp=2, dp=1, sequence_parallel=True)
    b = ParallelLayout(tp=1, pp=1, dp=4)
    # Uninterrupted run at TP2·PP2, checkpoint after 2 steps.
    pstate, engine = _engine(a)
    ckpt = CheckpointManager(CheckpointConfig(dir=f"{root}/a", keep_last=2), pstate)
    uninterrupted = _run(engine, pstate, [0, 1])
    ckpt.save(2, engine, {"reader": {"step": 2}})
    uninterrupted += _run(engine, pstate, [2, 3])
    # Resume at TP1·DP4 from the TP2·PP2 checkpoint; checkpoint again after step 2.
    pstate, engine = _engine(b)
    meta = CheckpointManager(CheckpointConfig(dir=f"{root}/a"), pstate).load_latest(engine)
    assert meta is not None and meta["step"] == 2 and meta["reader"] == {"step": 2}
    resumed_b = _run(engine, pstate, [2])
    saver = CheckpointManager(CheckpointConfig(dir=f"{root}/b", async_save=True), pstate)
    saver.save(3, engine, {})
    saver.finalize()
    # Back to TP2·PP2 (other direction) from the TP1·DP4 checkpoint.
    pstate, engine = _engine(a)
    mgr = CheckpointManager(CheckpointConfig(dir=f"{root}/b"), pstate)
    assert mgr.load_latest(engine)["step"] == 3
    resumed_a = _run(engine, pstate, [3])
    # A corrupted newest checkpoint and a partial one are refused; the previous one is used.
    _engine_again = None
    if rank == 0:
        os.makedirs(f"{root}/a/step_00000009")  # partial: no COMMITTED marker
    ckpt_a = CheckpointManager(CheckpointConfig(dir=f"{root}/a", keep_last=3), pstate)
    ckpt_a.save(4, engine, {"tag": "newest"})
    if rank == 0:
        victim = sorted(Path(root, "a", "step_00000004").glob("*.distcp"))[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different content: only sha256 catches it
        victim.write_bytes(bytes(data))
    dist.barrier()
    meta = ckpt_a.load_latest(engine)
    return {"uninterrupted": uninterrupted, "resumed_b": resumed_b, "resumed_a": resumed_a,
            "fallback_step": meta["step"], "refused": ckpt_a.refused}
