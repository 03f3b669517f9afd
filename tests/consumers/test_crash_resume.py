"""A training job SIGKILLed from outside at an arbitrary point resumes to the uninterrupted result.

Each case launches ``torchrun --nproc-per-node 2`` (TP=2: one rank reads, its peer receives) in a
new process group, watches the run's files from the test, and SIGKILLs the whole group the moment
a condition holds: mid-training (a step logged), mid-async-save (the checkpoint's data partly
written), and between the write and the commit (DCP's ``.metadata`` written, ``COMMITTED`` not
yet). Rerunning the same command resumes from the newest committed checkpoint and must give the
uninterrupted run's loss at every step and, bit for bit, its final parameters and optimizer state
(fp32 master, Adam moments). Nothing in the training loop knows about these kills.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers.consumers import (
    QWENIMAGE_TRAIN,
    launch_train,
    read_jsonl,
    signal_job,
    wait_success,
    write_cache,
    write_tp2_checkpointing_config,
)

STEPS, INTERVAL = 6, 2


def _launch(config: Path) -> subprocess.Popen:
    return launch_train(config, entry=QWENIMAGE_TRAIN, nproc=2)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker at once, as a scheduler ending the job's cgroup would,
    and reap them."""
    psutil.wait_procs(signal_job(proc, signal.SIGKILL), timeout=60)
    proc.communicate(timeout=60)


def _kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout_s: float = 240) -> bool:
    """SIGKILL the job as soon as `condition()` holds; False if the run ended first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            _kill_tree(proc)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    _kill_tree(proc)
    raise AssertionError("the kill condition never held")


def _steps_logged(out: Path) -> list[int]:
    path = out / "logs" / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path)] if path.exists() else []


def _tmp(out: Path, step: int) -> Path:
    return out / "ckpt" / f".tmp-step_{step:08d}"


def mid_step(out: Path) -> Callable[[], bool]:
    return lambda: 3 in _steps_logged(out)  # step 4 is running (or its checkpoint is being written)


def mid_async_save(out: Path) -> Callable[[], bool]:
    """Some of step 4's checkpoint data is on disk, its DCP metadata is not."""
    tmp = _tmp(out, 4)
    return lambda: tmp.is_dir() and any(tmp.glob("*.distcp")) and not (tmp / ".metadata").exists()


def written_not_committed(out: Path) -> Callable[[], bool]:
    tmp = _tmp(out, 4)
    return lambda: (tmp / ".metadata").exists() and not (tmp / "COMMITTED").exists()


def _config(cache: str, out: Path, *, async_save: bool) -> Path:
    return write_tp2_checkpointing_config(cache, out, steps=STEPS, interval=INTERVAL, async_save=async_save)


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = out / "final.pt"
    dcp_to_torch_save(out / "ckpt" / f"step_{STEPS:08d}", target)
    state = torch.load(target, weights_only=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return write_cache(tmp_path_factory.mktemp("crash") / "cache", samples_per_bucket=12, buckets=((32, 32),))


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "run"
    wait_success(_launch(_config(cache, out, async_save=False)))
    return {
        "losses": {r["step"]: r["loss"] for r in read_jsonl(out / "logs" / "metrics.jsonl")},
        "state": _final_state(out),
    }


@pytest.mark.parametrize(
    "where,async_save",
    [
        (mid_step, False),
        (mid_async_save, True),
        (written_not_committed, False),
    ],
)
def test_sigkill_from_outside_then_resume_matches_uninterrupted(cache, straight, tmp_path, where, async_save):
    for attempt in range(3):  # a window of a few ms can be missed by the poll on a loaded machine
        out = tmp_path / f"run{attempt}"
        config = _config(cache, out, async_save=async_save)
        if _kill_when(_launch(config), where(out)):
            break
    else:
        pytest.fail(f"three runs finished before the kill point {where.__name__}")
    ckpt = out / "ckpt"
    committed = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_"))
    assert all((ckpt / name / "COMMITTED").is_file() for name in committed), committed
    assert f"step_{STEPS:08d}" not in committed
    if where is not mid_step:  # killed inside step 4's save: it never became a checkpoint
        assert committed == ["step_00000002"], committed
        assert _tmp(out, 4).is_dir()

    log = wait_success(_launch(config))
    assert "resumed from" in log, log[-2000:]
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "logs" / "metrics.jsonl")}  # a rerun step overwrites
    assert losses == straight["losses"] and len(set(losses.values())) == STEPS
    state = _final_state(out)
    assert set(state) == set(straight["state"]) and any("exp_avg" in k for k in state), sorted(state)[:10]
    for name, tensor in straight["state"].items():
        assert torch.equal(state[name], tensor), name
