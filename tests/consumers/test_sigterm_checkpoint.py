"""SIGTERM mid-run (what Slurm sends before the time limit, or on preemption) saves the step, then exits.

``torchrun --nproc-per-node 2`` (TP=2, gloo) trains; once a step is logged, SIGTERM goes to every
process of the job at once, torchrun and its workers, as a Slurm step signal does (so each worker
gets it twice: from the test and forwarded by torchrun). Every rank finishes the step it is in,
they agree on the stop, and a committed checkpoint of the step they stopped at exists afterwards
(an async save in flight is committed too); rank 0 says ``stopped by SIGTERM``. Rerunning the
same command resumes from that checkpoint and the per-step losses equal an uninterrupted run's.

A signal that reaches one rank only (a node-local preemption, a worker signalled by hand) stops
every rank: the agreement takes the stop if *any* rank has one, and both ranks save the step.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers.consumers import (
    QWENIMAGE_TRAIN,
    committed_steps,
    launch_train,
    read_jsonl,
    signal_job,
    torchrun_worker,
    wait_for_logged_step,
    wait_success,
    write_cache,
    write_tp2_checkpointing_config,
)

STEPS = 8


def _launch(config: Path) -> subprocess.Popen:
    return launch_train(config, entry=QWENIMAGE_TRAIN, nproc=2)


def _config(cache: str, out: Path, *, interval: int, async_save: bool) -> Path:
    return write_tp2_checkpointing_config(cache, out, steps=STEPS, interval=interval, async_save=async_save)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "logs" / "metrics.jsonl") if "loss" in r}


def _committed(out: Path) -> list[int]:
    return committed_steps(out / "ckpt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return write_cache(tmp_path_factory.mktemp("sigterm") / "cache", samples_per_bucket=12, buckets=((32, 32),))


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("straight") / "run"
    wait_success(_launch(_config(cache, out, interval=100, async_save=False)))
    return _losses(out)


# A synchronous save on SIGTERM mid-step, resumed into another layout, is a cell of the layout x
# feature matrix (test_layout_matrix.py); here the async save in flight when the signal lands.
@pytest.mark.parametrize("interval,async_save", [(2, True)], ids=["async-every-2"])
def test_sigterm_saves_the_current_step_and_the_rerun_matches(cache, straight, tmp_path, interval, async_save):
    out = tmp_path / "run"
    config = _config(cache, out, interval=interval, async_save=async_save)
    proc = _launch(config)
    wait_for_logged_step(proc, out / "logs" / "metrics.jsonl", 2)
    signal_job(proc, signal.SIGTERM)  # torchrun and both workers at once, as Slurm signals a job step
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, log[-3000:]
    assert "qwenimage train: stopped by SIGTERM; committed work is kept, rerun to resume" in log, log[-3000:]
    assert "SIGTERM: stopping after step" in log, log[-3000:]

    stopped_at = max(_losses(out))  # steps completed when the ranks agreed to stop (metrics count from 1)
    assert 2 <= stopped_at < STEPS, (stopped_at, log[-3000:])
    committed = _committed(out)
    assert committed[-1] == stopped_at, (committed, stopped_at)
    assert not list((out / "ckpt").glob(".tmp-step_*")), "a save was left half-written"

    log2 = wait_success(_launch(config))
    assert f"resumed from {out / 'ckpt'}/step_{stopped_at:08d}" in log2, log2[-3000:]
    assert _losses(out) == straight and len(straight) == STEPS


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(cache, tmp_path):
    """Only rank 1 (not torchrun, not rank 0) gets SIGTERM: rank 0 stops with it, after the same
    step, and the checkpoint of that step (a collective save by both ranks) is committed."""
    out = tmp_path / "run"
    proc = _launch(_config(cache, out, interval=100, async_save=False))
    wait_for_logged_step(proc, out / "logs" / "metrics.jsonl", 2)
    rank0, rank1 = torchrun_worker(proc, 0), torchrun_worker(proc, 1)
    rank1.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=240)
    assert not rank0.is_running() and not rank1.is_running()
    assert proc.returncode != 0, log[-3000:]  # a stop, not a run to its end
    # rank 0, never signalled, logs the agreed stop and reports it as its own SIGTERM
    assert "SIGTERM: stopping after step" in log, log[-3000:]
    assert "qwenimage train: stopped by SIGTERM; committed work is kept, rerun to resume" in log, log[-3000:]
    stopped_at = max(_losses(out))
    assert 2 <= stopped_at < STEPS, (stopped_at, log[-3000:])
    assert _committed(out) == [stopped_at], (_committed(out), stopped_at)
    saved = {p.name for p in (out / "ckpt" / f"step_{stopped_at:08d}").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp"} <= saved, saved  # both ranks wrote their shards of that step
    assert not list((out / "ckpt").glob(".tmp-step_*")), "a save was left half-written"
