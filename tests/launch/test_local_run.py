"""`qwenimage run` end to end on the embedded default: both sides at once, outputs, stop, resume.

A smaller copy of examples/local.yaml (fewer renders, 8 steps) runs for real: the producer's
embedded Ray on 127.0.0.1 and a torchrun consumer (2 CPU processes, TP=2 + SP) tailing the cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from megatron_qwenimage.cache import open_cache, verify_cache
from megatron_qwenimage.cache.commit import list_commits

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def _config(tmp: Path, *, text_renders: int = 24, producer: dict | None = None) -> Path:
    d = yaml.safe_load((REPO / "examples" / "local.yaml").read_text())
    d["run_dir"] = str(tmp / "run")
    d["cache"] = str(tmp / "cache")
    d["producer"]["bundled"] = {"text_renders": text_renders, "edit_pairs": 2, "seed": 0}
    d["producer"]["snapshot_interval_s"] = 2
    d["producer"].update(producer or {})
    consumer = d["consumer"]["config"]
    consumer["schedule"]["train_steps"] = STEPS
    consumer["checkpoint"]["interval"] = 2
    consumer["logging"]["interval"] = 1
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def _run_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_qwenimage.cli", "run", str(config), *extra]


def _own_processes(since: float, tmp: Path) -> list[str]:
    """Live processes started after `since` that belong to a run under `tmp`: they name it on
    their command line (our sides) or run in it (Ray's daemons and workers inherit the run's
    working directory); other Ray clusters on the machine are not ours."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            if p.info["create_time"] < since or p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if str(tmp) in cmd or p.cwd().startswith(str(tmp)):
                found.append(f"{p.pid}: {cmd[:160]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _leftovers(since: float, tmp: Path) -> list[str]:
    deadline = time.monotonic() + 20  # processes that got SIGKILL may take a moment to be reaped
    while True:
        left = _own_processes(since, tmp)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local-run")
    # Enough input, encoded one sample per batch, that the producer outlasts the consumer's start
    # (torchrun, imports, model build: ~15-25 s) on an idle machine too: the run is concurrent.
    config = _config(tmp, text_renders=160, producer={"batch_size": 1, "partition_size": 4})
    since = time.time()
    proc = subprocess.run(_run_cmd(config, "--json"), cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return tmp, json.loads(proc.stdout.strip().splitlines()[-1]), since, proc


def test_run_writes_checkpoint_export_metrics_and_report(finished_run):
    tmp, summary, _, _ = finished_run
    run = tmp / "run"
    assert summary["final_step"] == STEPS
    assert (
        Path(summary["checkpoint"]).name == f"step_{STEPS:08d}" and (Path(summary["checkpoint"]) / "COMMITTED").exists()
    )
    export = Path(summary["diffusers_export"])
    assert (export / "config.json").exists() and list(export.glob("*.safetensors"))
    records = _records(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    report = Path(summary["report"])
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.stat().st_size > 20_000
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "finished" and Path(info["cache"]).is_absolute()
    cache = open_cache(str(tmp / "cache"))
    assert verify_cache(cache).ok
    assert summary["cache"]["samples"] == cache.snapshot().num_samples > STEPS * 4


def test_consumer_trained_while_the_producer_was_still_committing(finished_run):
    """Concurrency from the run's own records: the first training step was logged before the
    producer's last commit, and the consumer read more than one snapshot (it tailed the cache)."""
    tmp, _, _, _ = finished_run
    storage = open_cache(str(tmp / "cache")).storage
    commit_times = sorted(record.created_unix for record in list_commits(storage))
    first_step = min(r["time"] for r in _records(tmp / "run") if "loss" in r)
    assert first_step < commit_times[-1], (first_step, commit_times[-1])
    consumer_log = (tmp / "run" / "logs" / "consumer.log").read_text()
    assert "epoch 2 over snapshot" in consumer_log  # a second snapshot entered while training


def test_run_leaves_no_process_behind(finished_run):
    tmp, _, since, _ = finished_run
    assert _leftovers(since, tmp) == []


def test_console_is_status_lines_and_a_summary_without_library_noise(finished_run):
    _, _, _, proc = finished_run
    console = proc.stderr + proc.stdout
    for noise in ("core_worker.cc", "Megatron-FSDP", "UserWarning", "FutureWarning", "…"):
        assert noise not in console, noise
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("run local: ") for ln in lines), lines[:5]


def test_ctrl_c_stops_both_sides_cleanly_and_the_same_command_resumes(tmp_path):
    config = _config(tmp_path, text_renders=48)
    run = tmp_path / "run"
    since = time.time()
    proc = subprocess.Popen(
        _run_cmd(config, "--no-live"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if list((run / "checkpoints").glob("step_*/COMMITTED")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "qwenimage run: stopped by SIGINT; committed work is kept, rerun to resume"
    assert _leftovers(since, tmp_path) == []
    assert json.loads((run / "run.json").read_text())["state"] == "stopped"
    assert verify_cache(open_cache(str(tmp_path / "cache"))).ok  # nothing half-published
    committed_before = len(list_commits(open_cache(str(tmp_path / "cache")).storage))
    assert committed_before > 0

    again = subprocess.run(
        _run_cmd(config, "--json"), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    producer_log = (run / "logs" / "producer.log").read_text().split("\n==== ")[-1]
    skipped = int(producer_log.split(" already committed")[0].rsplit(", ", 1)[-1])
    assert skipped == committed_before  # every partition committed before the stop is skipped
    consumer_log = (run / "logs" / "consumer.log").read_text().split("\n==== ")[-1]
    assert "resumed from" in consumer_log and "checkpoints/step_" in consumer_log
    assert json.loads(again.stdout.strip().splitlines()[-1])["final_step"] == STEPS
    assert _leftovers(since, tmp_path) == []
