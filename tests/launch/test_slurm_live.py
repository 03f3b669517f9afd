"""`qwenimage launch slurm` on a real Slurm: a one-node cluster on localhost (`tests.launch.slurm_cluster`).

Needs Debian's slurm-wlm and munge (skipped, naming them, when their binaries are missing; .ci/run
installs them). A tiny CPU job spec: the producers encode ``synthetic:text?n=48`` with the tiny
encoders on a Ray cluster the producer job starts inside its allocation (head on 127.0.0.1); the
consumers train ``tiny-16ch`` with TP=2 on 2 CPU processes (gloo), tailing the cache.

1. ``qwenimage launch slurm`` submits both jobs; they run to the end: the cache verifies, the
   consumer logged every step and committed its final checkpoint, Ray is gone, ``launch status``
   reports both jobs and the step.
2. On that finished cache, two consumer jobs rendered by the same code: one runs through, the
   other gets ``scancel --signal=TERM --batch`` mid-run (the path of Slurm's ``--signal=B:TERM``
   before the time limit): it checkpoints, requeues itself, resumes from the checkpoint and ends
   with the same per-step losses as the one that ran through.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.launch.slurm_cluster import SlurmCluster, missing_reason

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
TIMINGS: dict[str, float] = {}


def _free_port_block(n: int) -> int:
    """A port P with P .. P+n-1 all free on 127.0.0.1 (the producer's Ray pins them)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no block of free ports")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _consumer_config() -> dict:
    return {
        "model": {"name": "tiny-16ch", "num_layers": 2},
        "parallel": {"tp": 2},
        "optimizer": {"lr": 1.0e-3, "warmup_steps": 2, "clip_grad": 1.0},
        "flow_matching": {"kind": "uniform"},
        "data": {
            "seed": 3,
            "tail_poll_s": 0.5,
            "tail_timeout_s": 300,
            "stages": [{"name": "s64", "buckets": ["64x64", "80x48", "48x80"], "micro_batch": 1, "global_batch": 2}],
        },
        "schedule": {"train_steps": STEPS, "seed": 11},
        "checkpoint": {"interval": 4, "keep_last": 10},
        "logging": {"interval": 1, "tensorboard": False},
    }


def _job_spec(tmp: Path, name: str, *, cache: Path, create_cache: bool) -> Path:
    spec = {
        "name": name,
        "cache": str(cache),
        "create_cache": create_cache,
        "run_dir": str(tmp / name),
        "producer": {
            "nodes": 1,
            "gpus_per_node": 0,
            "time": "00:10:00",
            "ray_port": _free_port_block(8),
            # a private loopback head: no token auth (Ray 2.60's default for a new cluster)
            "env": {"vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}},
            "options": {
                "input": "synthetic:text?n=48&seed=0",
                "encoders": "tiny",
                "buckets": "64",
                "partition_size": 8,
                "snapshot_interval_s": 2,
            },
            # the lead-time controller as a step of the producer job (pools fixed at 1 actor here)
            "autoscale": {"interval_s": 1, "low_s": 5, "high_s": 600},
        },
        "consumer": {
            "nodes": 1,
            "gpus_per_node": 0,
            "procs_per_node": 2,
            "cpus_per_task": 1,
            "master_port": _free_port(),
            "time": "00:10:00",
            "signal_before_s": 60,
            "max_restarts": 2,
            "env": {"vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}},
            "config": _consumer_config(),
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}  # a rerun step overwrites


def _committed(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMMITTED").is_file())


def _logs(run_dir: Path, tail: int = 60) -> str:
    out = []
    for p in sorted((run_dir / "logs").glob("*.out")):
        out.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-tail:]))
    return "\n".join(out)


@pytest.fixture(scope="module")
def cluster():
    t0 = time.monotonic()
    with SlurmCluster() as c:
        TIMINGS["cluster up"] = time.monotonic() - t0
        try:
            with pytest.MonkeyPatch.context() as mp:  # sbatch / scontrol of this process find the test cluster
                for key in ("SLURM_CONF", "PATH"):
                    mp.setenv(key, c.env[key])
                yield c
        finally:  # the producer jobs' Ray session directories (named by this cluster's unique name)
            for d in Path("/tmp").glob(f"ray-qwenimage-{c.name}-*"):
                shutil.rmtree(d, ignore_errors=True)
    print("\nlive Slurm timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def launched(cluster, tmp_path_factory) -> dict:
    """`qwenimage launch slurm` of both sides, run to the end."""
    tmp = tmp_path_factory.mktemp("launch")
    spec = _job_spec(tmp, "full", cache=tmp / "cache", create_cache=True)
    env = {**cluster.env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "megatron_qwenimage.cli", "launch", "slurm", str(spec)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp / "full"
    record = json.loads((run_dir / "launch.json").read_text())
    ids = {side: record[side]["job_id"] for side in ("producer", "consumer")}
    states = {side: cluster.wait_for(job, FINAL, timeout_s=240)["JobState"] for side, job in ids.items()}
    TIMINGS["launch: both jobs"] = time.monotonic() - t0
    return {
        "tmp": tmp,
        "spec": spec,
        "run_dir": run_dir,
        "ids": ids,
        "states": states,
        "stdout": out.stdout,
        "env": env,
    }


def test_launch_runs_producers_and_consumers_to_the_end(cluster, launched):
    from megatron_qwenimage.cache import open_cache, verify_cache

    run_dir = launched["run_dir"]
    assert launched["states"] == {"producer": "COMPLETED", "consumer": "COMPLETED"}, _logs(run_dir)
    assert f"producer job {launched['ids']['producer']}" in launched["stdout"]
    cache = open_cache(str(launched["tmp"] / "cache"))
    assert verify_cache(cache).ok
    assert cache.snapshot().num_samples == 48
    producer_log = (run_dir / "logs" / f"slurm-producer-{launched['ids']['producer']}.out").read_text()
    assert "Ray cluster up at 127.0.0.1:" in producer_log, producer_log[-3000:]
    head = (run_dir / "slurm" / "ray-address").read_text().strip()  # where autoscaled workers join
    assert f"Ray cluster up at {head} " in producer_log and head.startswith("127.0.0.1:"), head
    # the controller ran beside the producers, on the job's resolved spec, and ended with the job
    assert "autoscale full: producer-pools between 1 and 1, lead time band [5, 600] s, every 1 s" in producer_log
    assert "stopping Ray" in producer_log, producer_log[-3000:]
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1)), _logs(run_dir)
    assert _committed(run_dir)[-1] == STEPS
    assert (run_dir / "slurm" / "producer.sbatch").is_file() and (run_dir / "slurm" / "train.yaml").is_file()
    # Nothing of either job is left: Ray's daemons stopped with the producer job.
    deadline = time.monotonic() + 20
    while cluster.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [p.name() for p in cluster.leftovers()] == []

    status = subprocess.run(
        [sys.executable, "-m", "megatron_qwenimage.cli", "launch", "status", str(launched["spec"]), "--json"],
        cwd=launched["tmp"],
        env=launched["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["producer"]["state"] == info["consumer"]["state"] == "COMPLETED"
    assert info["consumer"]["restarts"] == 0
    assert info["training"]["step"] == STEPS and info["training"]["checkpoint_step"] == STEPS


def _submit_consumer(tmp: Path, name: str, cache: Path) -> tuple[str, Path]:
    """A consumer job alone, rendered and submitted by `launch.slurm`'s own functions."""
    from launch import slurm

    spec = slurm.prepare_spec(_job_spec(tmp, name, cache=cache, create_cache=False), cwd=tmp)
    scripts = slurm.script_dir(spec)
    for d in (scripts, Path(spec.run.logs_dir)):
        d.mkdir(parents=True, exist_ok=True)
    slurm.train_config_path(spec).write_text(slurm.train_config_text(spec))
    script = scripts / "consumer.sbatch"
    script.write_text(slurm.render_consumer_script(spec, cwd=str(tmp)))
    return slurm.submit(slurm.sbatch_argv(script), what="submit"), Path(spec.run.run_dir)


def test_preempted_consumer_checkpoints_requeues_and_matches_an_uninterrupted_run(cluster, launched):
    tmp, cache = launched["tmp"], launched["tmp"] / "cache"
    t0 = time.monotonic()
    straight_id, straight_dir = _submit_consumer(tmp, "straight", cache)
    job, run_dir = _submit_consumer(tmp, "preempted", cache)

    deadline = time.monotonic() + 180
    while not any(step >= 2 for step in _losses(run_dir)):
        assert cluster.state(job) in ("PENDING", "RUNNING"), _logs(run_dir)
        assert time.monotonic() < deadline, _logs(run_dir)
        time.sleep(0.1)
    # What Slurm does signal_before_s before the time limit (--signal=B:TERM@...): SIGTERM to the batch script.
    cluster.run("scancel", "--signal=TERM", "--batch", job)
    signalled_at = max(_losses(run_dir))
    record = cluster.wait_for(job, ("PENDING",), timeout_s=60, poll_s=0.2)
    assert record["Restarts"] == "1", record
    final = cluster.wait_for(job, FINAL, timeout_s=180)
    straight = cluster.wait_for(straight_id, FINAL, timeout_s=120)
    TIMINGS["preempt + requeue + resume (with a straight run alongside)"] = time.monotonic() - t0
    assert straight["JobState"] == "COMPLETED", _logs(straight_dir)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", _logs(run_dir)

    log = (run_dir / "logs" / f"slurm-consumer-{job}.out").read_text()
    assert "SIGTERM: the training processes checkpoint and stop" in log, log[-4000:]
    assert f"requeueing job {job} (restart 1 of at most 2)" in log, log[-4000:]
    stopped = [ln for ln in log.splitlines() if "SIGTERM: stopping after step" in ln]
    assert stopped, log[-4000:]
    stop_step = int(stopped[0].rsplit(" ", 1)[-1])
    assert signalled_at <= stop_step < STEPS, (signalled_at, stop_step)
    assert stop_step in _committed(run_dir)
    assert f"resumed from {run_dir / 'checkpoints'}/step_{stop_step:08d}" in log, log[-4000:]
    assert "restart 1, at most 2" in log
    reference = _losses(straight_dir)
    assert sorted(reference) == list(range(1, STEPS + 1)), _logs(straight_dir)
    assert _losses(run_dir) == reference


def test_autoscaled_worker_jobs_are_submitted_and_cancelled_through_slurm(cluster, tmp_path, monkeypatch):
    """The slurm-workers actuator's half that Slurm does, for real: sbatch accepts its script, the
    job starts and runs `ray start --address=HEAD --block` (in a log directory the actuator made:
    Slurm does not make it, and the job fails to launch without it), and shrinking cancels it.

    The Ray half, a worker node joining the producers' head, is not tested here: Ray 2.60 rewrites a
    loopback head address to the machine's outward address for any joining node, and the tests keep
    every service on 127.0.0.1. So the worker only tries to reach its head until it is cancelled."""
    from launch.autoscale import SlurmWorkerActuator, SlurmWorkerConfig

    for key in ("SLURM_CONF", "PATH"):  # sbatch / scancel of this cluster, as a login node has them
        monkeypatch.setenv(key, cluster.env[key])
    t0 = time.monotonic()
    cfg = SlurmWorkerConfig(
        head_address=f"127.0.0.1:{_free_port()}",
        job_name="qwenimage-live-encoder",
        cpus_per_task=1,
        log_dir=str(tmp_path / "run" / "logs"),  # does not exist yet
        env={"vars": {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    workers = SlurmWorkerActuator(cfg, tmp_path / "run" / "autoscale")
    assert workers.resize(1, reason="lead time under the band") == 1
    [job] = workers.job_ids
    log = tmp_path / "run" / "logs" / f"qwenimage-live-encoder-{job}.out"
    deadline = time.monotonic() + 60
    while not (log.exists() and "Local node IP" in log.read_text()):  # `ray start` is up, looking for its head
        state = cluster.state(job)
        assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, (cluster.job(job), cluster.logs())
        time.sleep(0.5)
    assert cluster.state(job) == "RUNNING", cluster.job(job)
    assert workers.resize(0) == 0 and workers.job_ids == []
    assert cluster.wait_for(job, FINAL, timeout_s=60)["JobState"] == "CANCELLED"
    TIMINGS["autoscaled Slurm worker: submit, run, cancel"] = time.monotonic() - t0
    deadline = time.monotonic() + 20
    while cluster.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [p.name() for p in cluster.leftovers()] == []
