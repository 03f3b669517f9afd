"""Checkpoint RNG states are stored and read without pickle (safetensors + JSON).

Must show: the draws after a restore equal the draws right after the save (python, numpy incl.
its cached gaussian, torch); the file on disk is safetensors, not a pickle or a torch zip; an RNG
file in the old pickle format makes the checkpoint refused with an error naming it, and it is
never unpickled (its payload would create a marker directory).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from consumers.checkpoint import (
    CheckpointConfig,
    CheckpointCorrupt,
    CheckpointManager,
    ResumeRefused,
    load_rng_state,
    refuse_pickled_rng_files,
    rng_file,
    save_rng_state,
)
from tests.helpers.consumers import spawn, vouch_for


class _Payload:
    """Unpickling this creates directory `marker`: proof that a file was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _save_old_format_rng(path: Path, marker: Path) -> None:
    """Write an RNG file in the old format, ``torch.save`` (a zip holding a pickle) of the current
    states, carrying a `_Payload` that creates `marker` if the file is ever unpickled."""
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": None,
            "payload": _Payload(str(marker)),
        },
        path,
    )


def _draws() -> list:
    return [
        random.random(),
        random.gauss(0, 1),
        *np.random.rand(2).tolist(),
        *np.random.randn(3).tolist(),
        *torch.rand(3).tolist(),
        *torch.randn(2).tolist(),
    ]


def _is_safetensors(path: Path) -> bool:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n <= len(data) and data[8:9] == b"{" and json.loads(data[8 : 8 + n])["__metadata__"]["format"]


def _no_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_rng_state_round_trip_without_pickle(tmp_path, monkeypatch):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn(1)  # odd normal counts: both keep a cached gaussian
    path = tmp_path / "rank_00000.safetensors"
    save_rng_state(path)
    after_save = _draws()
    _draws()  # move every generator on
    _no_unpickling(monkeypatch)
    load_rng_state(path)
    assert _draws() == after_save
    head = path.read_bytes()[:8]
    assert head[:2] != b"PK" and head[:1] != b"\x80" and _is_safetensors(path)


def test_old_pickle_rng_file_is_refused_naming_it(tmp_path, monkeypatch):
    ckpt = tmp_path / "step_00000002"
    (ckpt / "rng").mkdir(parents=True)
    old = ckpt / "rng" / "rank_00000.pt"
    marker = tmp_path / "unpickled"
    _save_old_format_rng(old, marker)
    assert old.read_bytes()[:2] == b"PK"  # the old torch.save format: a zip holding a pickle
    _no_unpickling(monkeypatch)
    with pytest.raises(CheckpointCorrupt, match=re.escape(str(old)) + ".*old pickle format.*not loaded"):
        refuse_pickled_rng_files(ckpt)
    # load() refuses before reading anything else (no meta.json, no engine needed to get there)
    with pytest.raises(CheckpointCorrupt, match=re.escape(str(old))):
        CheckpointManager(CheckpointConfig(dir=str(tmp_path)), pstate=None).load(ckpt, engine=None)
    # A pickle under the new name is not a safetensors file: refused, not unpickled.
    disguised = rng_file(ckpt, 1)
    disguised.write_bytes(old.read_bytes())
    with pytest.raises(CheckpointCorrupt, match=re.escape(f"{disguised}: not an RNG state file")):
        load_rng_state(disguised)
    assert not marker.exists()


def _world1_worker(rank: int, world: int, root: str) -> dict:
    """Save at step 2, draw; restore, draw again; then plant an old-format pickle RNG file."""

    import torch.distributed as dist

    from consumers.parallel import ParallelLayout
    from tests.consumers.ckpt_workers import _engine

    pstate, engine = _engine(ParallelLayout(tp=1, pp=1, dp=1))
    mgr = CheckpointManager(CheckpointConfig(dir=root, keep_last=3), pstate)
    random.gauss(0, 1), np.random.randn(1)
    step_dir = mgr.save(2, engine, {})
    after_save = _draws()
    _draws()
    assert mgr.load_latest(engine)["step"] == 2
    after_load = _draws()
    rng_files = sorted(p.name for p in (step_dir / "rng").iterdir())
    header = (step_dir / "rng" / rng_files[0]).read_bytes()[:9]
    # An old-format (torch.save pickle) RNG file, listed in COMMITTED so only its format is wrong.
    marker = Path(root).parent / "unpickled"
    old = step_dir / "rng" / "rank_00000.pt"
    _save_old_format_rng(old, marker)
    vouch_for(step_dir, "rng/rank_00000.pt")
    dist.barrier()
    # The only checkpoint is refused: checkpoint.resume=auto stops (ResumeRefused) instead of
    # starting over.
    try:
        mgr.load_latest(engine)
        stopped = ""
    except ResumeRefused as exc:
        stopped = str(exc)
    return {
        "after_save": after_save,
        "after_load": after_load,
        "rng_files": rng_files,
        "header": header.hex(),
        "stopped": stopped,
        "refused": getattr(mgr, "refused", []),
        "unpickled": marker.exists(),
    }


def test_checkpoint_restores_rng_and_refuses_old_pickles(tmp_path):
    r = spawn(_world1_worker, 1, tmp_path / "out", str(tmp_path / "ckpt"))[0]
    assert r["after_load"] == r["after_save"]
    assert r["rng_files"] == ["rank_00000.safetensors"], r["rng_files"]
    header = bytes.fromhex(r["header"])
    assert header[8:9] == b"{" and header[:2] != b"PK", header
    assert "rng/rank_00000.pt is an RNG state in the old pickle format" in r["stopped"] and not r["unpickled"]
    assert len(r["refused"]) == 1 and "rng/rank_00000.pt is an RNG state in the old pickle format" in r["refused"][0]
