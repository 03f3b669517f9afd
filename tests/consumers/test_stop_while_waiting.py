"""A run that waits for its producers still stops when asked, and a data failure keeps the trained steps.

``qwenimage train`` under ``torchrun --nproc-per-node 2`` (DP2, gloo) trains the two steps a
``tail`` cache holds, then waits for more (prefetching two steps ahead, the default).
- SIGTERM to *one* worker while both wait: both stop within seconds (not after
  ``data.tail_timeout_s``), the signalled rank's request reaching the other through the job's
  store; the checkpoint of step 2 is committed; the job exits non-zero with the SIGTERM line.
- No signal and a short ``tail_timeout_s``: the timeout ends the run with one line naming the
  cache, after the checkpoint of step 2 was committed (and the log says so); rerun after the cache
  grew, it resumes from there.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.consumers import (
    QWENIMAGE_TRAIN,
    JobOutput,
    committed_steps,
    grow_cache,
    launch_train,
    read_jsonl,
    run_config,
    signal_job,
    torchrun_worker,
    write_cache,
    write_run_config,
)

TAIL_TIMEOUT_S = 300  # far longer than the test waits: a stop must not need it


def _config(cache: str, out: Path, *, tail_timeout_s: float) -> Path:
    out.mkdir(parents=True)
    cfg = run_config(cache, out, steps=6, global_batch=4, micro_batch=1, ckpt_interval=100)
    cfg["data"]["caches"] = [{"path": cache, "mode": "tail"}]
    cfg["data"].update(tail_poll_s=0.2, tail_timeout_s=tail_timeout_s)
    return write_run_config(cfg, out / "run.yaml")


@pytest.fixture
def cache(tmp_path) -> str:
    return write_cache(tmp_path / "cache", samples_per_bucket=8)  # two global batches


def _wait_until_both_wait(job: JobOutput) -> None:
    """Step 2 (the cache's last) is logged; a moment later both training loops block on the data."""
    job.wait_for(" step        2 | loss")
    time.sleep(2.0)


def test_sigterm_to_one_rank_stops_every_rank_waiting_for_data(cache, tmp_path):
    out = tmp_path / "run"
    job = JobOutput(launch_train(_config(cache, out, tail_timeout_s=TAIL_TIMEOUT_S), entry=QWENIMAGE_TRAIN, nproc=2))
    try:
        _wait_until_both_wait(job)
        torchrun_worker(job.proc, 1).send_signal(signal.SIGTERM)  # rank 0 is not signalled: it must learn it
        try:
            code = job.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run kept waiting for data after a SIGTERM:\n{job.text[-3000:]}")
    finally:
        if job.proc.poll() is None:
            signal_job(job.proc, signal.SIGKILL)
    assert code != 0
    assert "SIGTERM while waiting for data before step 2" in job.text, job.text[-3000:]
    assert "qwenimage train: stopped by SIGTERM; committed work is kept, rerun to resume" in job.text
    assert committed_steps(out / "ckpt") == [2]


def test_tail_timeout_saves_the_trained_steps_then_fails_in_one_line(cache, tmp_path):
    out = tmp_path / "run"
    config = _config(cache, out, tail_timeout_s=3)
    job = JobOutput(launch_train(config, entry=QWENIMAGE_TRAIN, nproc=2))
    assert job.wait(timeout=240) != 0
    log = job.text
    assert f"checkpoint of step 2 committed in {out / 'ckpt'}" in log, log[-3000:]
    assert "the data failed before step 2 (TailTimeoutError)" in log, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("qwenimage train: ")]
    assert len(errors) == 1 and "within tail_timeout_s=3" in errors[0] and "'cache'" in errors[0], errors
    assert committed_steps(out / "ckpt") == [2]

    grow_cache(cache, "p1", samples_per_bucket=16)
    rerun = JobOutput(launch_train(config, entry=QWENIMAGE_TRAIN, nproc=2))
    assert rerun.wait(timeout=240) == 0, rerun.text[-3000:]
    assert f"resumed from {out / 'ckpt'}/step_00000002" in rerun.text
    steps = [r["step"] for r in read_jsonl(out / "logs" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
