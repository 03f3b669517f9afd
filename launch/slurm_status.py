"""``qwenimage launch status job.yaml`` and ``qwenimage launch cancel job.yaml``.

Both read the job ids that ``qwenimage launch slurm`` recorded in ``run_dir/launch.json``.
``status`` shows each job's state from slurmctld (``scontrol show job``: state, reason, restarts,
run time, nodes; a job that ended more than ``MinJobAge`` ago is no longer known there, and
``sacct`` needs slurmdbd, so it says so), and the run's progress from its own files: the latest
step and loss of ``run_dir/metrics.jsonl`` and the latest committed checkpoint. ``cancel`` runs
``scancel`` on both jobs (those still queued or running).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from launch.slurm import (
    ACTIVE_STATES,
    job_state,
    latest_checkpoint,
    read_launch_record,
    run_command,
    write_launch_record,
)


def _spec(path: str):
    """The job spec as `launch.slurm` read it (relative paths from the working directory, as there),
    without the cache and Ray checks (the run may be over, the cluster elsewhere)."""
    from launch.slurm import prepare_spec

    return prepare_spec(path, check_paths=False, check_ray=False)


def _latest_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The last training record (one with a loss) of ``run_dir/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(record, dict) and "loss" in record and "step" in record:
            return record
    return None


def job_summary(job_id: str) -> dict[str, Any]:
    info = job_state(job_id)
    if not info:
        return {"job_id": job_id, "state": "UNKNOWN", "note": "no longer known to slurmctld (ended before MinJobAge)"}
    out = {
        "job_id": job_id,
        "state": info.get("JobState", "?"),
        "reason": info.get("Reason"),
        "restarts": int(info["Restarts"]) if info.get("Restarts", "").isdigit() else None,
        "run_time": info.get("RunTime"),
        "time_limit": info.get("TimeLimit"),
        "nodes": info.get("NodeList"),
        "exit_code": info.get("ExitCode"),
    }
    return out


def status(spec) -> dict[str, Any]:
    record = read_launch_record(spec)
    out: dict[str, Any] = {"name": spec.name, "run_dir": spec.run.run_dir}
    for side in ("producer", "consumer"):
        entry = record.get(side)
        if entry and entry.get("job_id"):
            out[side] = job_summary(str(entry["job_id"]))
    if "consumer" in out:
        out["consumer"]["max_restarts"] = spec.consumer.max_restarts
    metrics = _latest_metrics(Path(spec.run.run_dir))
    out["training"] = {
        "step": metrics.get("step") if metrics else None,
        "loss": metrics.get("loss") if metrics else None,
        "train_steps": spec.run.consumer.config.get("schedule", {}).get("train_steps"),
        "checkpoint_step": latest_checkpoint(spec),
    }
    if record.get("cancelled_unix"):
        out["cancelled_unix"] = record["cancelled_unix"]
    return out


def _job_line(side: str, job: dict[str, Any]) -> str:
    parts = [f"{side:<9} job {job['job_id']}  {job['state']}"]
    if job.get("reason") and job["reason"] != "None":
        parts.append(f"({job['reason']})")
    if job.get("nodes") and job["nodes"] != "(null)":
        parts.append(f"on {job['nodes']}")
    if job.get("run_time"):
        parts.append(f"run {job['run_time']} of {job.get('time_limit') or '?'}")
    if side == "consumer" and job.get("restarts") is not None:
        parts.append(f"restarts {job['restarts']} of at most {job.get('max_restarts')}")
    if job.get("note"):
        parts.append(job["note"])
    return "  ".join(parts)


def add_status_arguments(parser) -> None:
    parser.add_argument("job_spec", metavar="JOB_YAML", help="the job spec `qwenimage launch slurm` submitted")
    parser.add_argument("--json", action="store_true", help="print the status as one JSON object")


def run_status(args) -> int:
    spec = _spec(args.job_spec)
    info = status(spec)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    print(f"run {info['name']} ({info['run_dir']})")
    for side in ("producer", "consumer"):
        if side in info:
            print("  " + _job_line(side, info[side]))
    t = info["training"]
    step = (
        "no step logged yet" if t["step"] is None else f"step {t['step']} of {t['train_steps']}, loss {t['loss']:.6g}"
    )
    ckpt = "none" if t["checkpoint_step"] is None else f"step {t['checkpoint_step']}"
    print(f"  training  {step}; latest checkpoint: {ckpt}")
    return 0


def add_cancel_arguments(parser) -> None:
    parser.add_argument("job_spec", metavar="JOB_YAML", help="the job spec whose jobs to cancel")


def run_cancel(args) -> int:
    spec = _spec(args.job_spec)
    record = read_launch_record(spec)
    ids = []
    for side in ("producer", "consumer"):
        job_id = (record.get(side) or {}).get("job_id")
        if not job_id:
            continue
        state = job_state(str(job_id)).get("JobState", "UNKNOWN")
        if state in ACTIVE_STATES:
            ids.append(str(job_id))
            print(f"{side} job {job_id}: {state}, cancelling")
        else:
            print(f"{side} job {job_id}: {state}, nothing to cancel")
    if ids:
        run_command(["scancel", *ids], what="cancel the jobs")
        record["cancelled_unix"] = time.time()
        write_launch_record(spec, record)
    return 0
