"""Everything a checkpoint's COMMITTED record vouches for is on stable storage before the record is.

A crash right after COMMITTED is written must not leave a committed checkpoint whose meta.json or
RNG files exist only in the page cache (lost on a power cut, while COMMITTED survives). The save
of a one-rank world records every ``os.fsync`` in order: the RNG file, meta.json, the RNG
directory and the checkpoint directory are synced before the COMMITTED record is.
"""

from __future__ import annotations

import os

from tests.helpers.consumers import spawn


def _synced_paths_worker(rank: int, world: int, root: str) -> dict:
    from consumers.checkpoint import CheckpointConfig, CheckpointManager
    from consumers.parallel import ParallelLayout
    from tests.consumers.ckpt_workers import _engine

    pstate, engine = _engine(ParallelLayout())
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), root))
        real_fsync(fd)

    os.fsync = recording_fsync
    try:
        CheckpointManager(CheckpointConfig(dir=root), pstate).save(3, engine, {"reader": {}})
    finally:
        os.fsync = real_fsync
    return {"synced": synced}


def test_meta_and_rng_files_are_synced_before_committed(tmp_path):
    root = tmp_path / "ckpt"
    synced = spawn(_synced_paths_worker, 1, tmp_path / "w", str(root))[0]["synced"]
    tmp = ".tmp-step_00000003"
    committed = synced.index(f"{tmp}/COMMITTED.tmp")
    for path in (f"{tmp}/rng/rank_00000.safetensors", f"{tmp}/meta.json", f"{tmp}/rng", tmp):
        assert path in synced[:committed], (path, synced)
    assert synced[-1] == "."  # the rename into step_00000003 is synced too
