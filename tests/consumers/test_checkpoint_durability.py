"""Everything a checkpoint's COMMITTED record vouches for is on stable storage before the record is.

A crash right after COMMITTED is written must not leave a committed checkpoint whose meta.json or
RNG files exist only in the page cache (lost on a power cut, while COMMITTED survives). A DP2
world (two gloo ranks) saves while each rank records every ``os.fsync`` with a system-wide
monotonic time: each rank's RNG file, meta.json, the RNG directory and the checkpoint directory are
synced before rank 0 syncs the COMMITTED record, and the rename into ``step_N`` is synced last.
"""

from __future__ import annotations

import os
import time

from tests.helpers.consumers import spawn


def _synced_paths_worker(rank: int, world: int, root: str) -> dict:
    from consumers.checkpoint import CheckpointConfig, CheckpointManager
    from consumers.parallel import ParallelLayout
    from tests.consumers.ckpt_workers import _engine

    pstate, engine = _engine(ParallelLayout(dp=world))
    synced: list[tuple[int, str]] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        real_fsync(fd)
        synced.append((time.monotonic_ns(), os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), root)))

    os.fsync = recording_fsync
    try:
        CheckpointManager(CheckpointConfig(dir=root), pstate).save(3, engine, {"reader": {}})
    finally:
        os.fsync = real_fsync
    return {"synced": synced}


def test_meta_and_every_ranks_rng_file_are_synced_before_committed(tmp_path):
    root = tmp_path / "ckpt"
    runs = spawn(_synced_paths_worker, 2, tmp_path / "w", str(root))
    tmp = ".tmp-step_00000003"
    when = {(rank, path): t for rank, r in runs.items() for t, path in r["synced"]}
    committed = when[(0, f"{tmp}/COMMITTED.tmp")]
    for rank, path in (
        (0, f"{tmp}/rng/rank_00000.safetensors"),
        (1, f"{tmp}/rng/rank_00001.safetensors"),
        (0, f"{tmp}/meta.json"),
        (0, f"{tmp}/rng"),
        (0, tmp),
    ):
        assert (rank, path) in when and when[(rank, path)] < committed, (rank, path, runs)
    assert runs[0]["synced"][-1][1] == "."  # the rename into step_00000003 is synced too
