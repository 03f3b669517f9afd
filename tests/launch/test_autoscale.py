"""The lead-time controller: hysteresis, cooldown and bounds on a fake clock, the actuators, and
``qwenimage launch autoscale`` on a run's files. A real producer whose pools follow the controller
on a local Ray: tests/producers/test_pool_control.py."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from types import SimpleNamespace

import pytest
import yaml

from launch.autoscale import (
    ActuatorError,
    LeadTimeController,
    Observation,
    RayAutoscalerActuator,
    ScalingPolicy,
    SlurmWorkerActuator,
    SlurmWorkerConfig,
    observation_from_snapshot,
    render_worker_script,
)
from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.config import ConfigError
from producers.pool_control import read_pool_target
from tests.monitor.fixtures import build_run, cli_main

LINE = re.compile(
    r"^autoscale \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ lead_time=\S+ backlog=\S+ rate=\S+ size (\d+) -> (\d+): (.+)$"
)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeActuator:
    name = "fake"

    def __init__(self, size: int = 1, fail: bool = False) -> None:
        self.size = size
        self.fail = fail
        self.calls: list[int] = []
        self.reasons: list[str] = []
        self.refreshed = 0

    def current(self) -> int:
        return self.size

    def resize(self, target: int, reason: str = "") -> int:
        self.calls.append(target)
        self.reasons.append(reason)
        if self.fail:
            raise ActuatorError("no capacity left")
        self.size = target
        return target

    def refresh(self) -> None:
        self.refreshed += 1


def _obs(lead_s: float, clock: Clock, rate: float = 10.0) -> Observation:
    return Observation(backlog_samples=lead_s * rate, consumer_samples_per_s=rate, time_s=clock())


def _controller(actuator, clock, **policy):
    defaults = dict(low_s=30, high_s=120, min_size=1, max_size=4, hold_observations=3, cooldown_s=60)
    return LeadTimeController(ScalingPolicy(**{**defaults, **policy}), actuator, clock=clock, wall_clock=clock)


# --- the decision logic, on a fake clock -------------------------------------------------------------
def test_grows_only_after_n_observations_then_waits_out_the_cooldown(caplog):
    clock, act = Clock(), FakeActuator(size=1)
    ctl = _controller(act, clock)
    caplog.set_level(logging.INFO, logger="launch.autoscale")
    decisions = []
    for _ in range(2):  # under the band twice: not yet
        decisions.append(ctl.observe(_obs(10, clock)))
        clock.t += 10
    assert decisions == [None, None] and act.calls == [] and ctl.pending == ("grow", 2)
    d = ctl.observe(_obs(10, clock))  # the third: grow
    assert (d.old_size, d.new_size) == (1, 2) and act.size == 2
    assert "lead time 10.0 s < low 30 s for 3 observations over 20 s: grow" in d.reason
    assert act.reasons == [d.reason]  # the actuator gets the why (the pools actuator writes it down)
    [record] = [r for r in caplog.records if r.getMessage().startswith("autoscale ")]
    m = LINE.match(record.getMessage())
    assert m and m.group(1, 2) == ("1", "2"), record.getMessage()
    assert "lead_time=10.0s backlog=100 rate=10.0/s" in record.getMessage()
    # Still under the band, three observations in a row again, but within the 60 s cooldown.
    for _ in range(5):
        clock.t += 10
        assert ctl.observe(_obs(10, clock)) is None
    clock.t += 10  # 60 s after the change
    d = ctl.observe(_obs(10, clock))
    assert (d.old_size, d.new_size) == (2, 3)
    assert act.refreshed == 9  # refreshed on every observation


def test_shrinks_when_far_over_and_never_leaves_the_bounds(caplog):
    clock, act = Clock(), FakeActuator(size=3)
    ctl = _controller(act, clock, hold_observations=1, cooldown_s=0)
    caplog.set_level(logging.INFO, logger="launch.autoscale")
    sizes = []
    for _ in range(6):
        ctl.observe(_obs(500, clock))
        sizes.append(act.size)
        clock.t += 1
    assert sizes == [2, 1, 1, 1, 1, 1]
    holding = [r.getMessage() for r in caplog.records if "holding" in r.getMessage()]
    assert len(holding) == 1 and "at its minimum 1" in holding[0]  # said once, not per observation
    for _ in range(6):
        ctl.observe(_obs(1, clock))
        clock.t += 1
    assert act.size == 4 and max(act.calls) == 4  # grew to the maximum, never past it
    assert [(d.old_size, d.new_size) for d in ctl.decisions] == [(3, 2), (2, 1), (1, 2), (2, 3), (3, 4)]


def test_inside_the_band_or_without_a_rate_resets_the_streak():
    clock, act = Clock(), FakeActuator(size=2)
    ctl = _controller(act, clock, cooldown_s=0)
    for lead in (10, 10, 60, 10, 10):  # the in-band reading breaks the streak
        assert ctl.observe(_obs(lead, clock)) is None
        clock.t += 5
    assert ctl.pending == ("grow", 2)
    assert ctl.observe(Observation(backlog_samples=5, consumer_samples_per_s=None, time_s=clock())) is None
    assert ctl.pending == (None, 0)  # a consumer that has not reported a rate says nothing
    for _ in range(3):
        ctl.observe(_obs(10, clock))
    assert act.size == 3


def test_hold_seconds_and_a_stalled_consumer():
    clock, act = Clock(), FakeActuator(size=3)
    ctl = _controller(act, clock, hold_observations=1, hold_s=30, cooldown_s=0)
    stalled = Observation(backlog_samples=50, consumer_samples_per_s=0.0)  # time from the clock
    assert stalled.lead_time_s == math.inf
    for _ in range(3):  # 0, 10, 20 s: the condition has not held 30 s yet
        assert ctl.observe(stalled) is None
        clock.t += 10
    d = ctl.observe(stalled)
    assert (d.old_size, d.new_size) == (3, 2) and d.line().split()[2] == "lead_time=inf"
    assert Observation(backlog_samples=0, consumer_samples_per_s=0.0).lead_time_s is None


def test_a_size_outside_the_bounds_is_put_back_and_a_failing_actuator_backs_off(caplog):
    clock = Clock()
    act = FakeActuator(size=0)  # e.g. the actors died
    ctl = _controller(act, clock)
    d = ctl.observe(_obs(60, clock))  # in the band, yet below the minimum: back to 1 at once
    assert (d.old_size, d.new_size) == (0, 1) and "below the minimum" in d.reason
    failing = FakeActuator(size=1, fail=True)
    ctl = _controller(failing, clock, hold_observations=1, cooldown_s=30)
    caplog.set_level(logging.WARNING, logger="launch.autoscale")
    assert ctl.observe(_obs(1, clock)) is None and failing.calls == [2]
    assert "could not resize 1 -> 2: no capacity left" in caplog.text
    clock.t += 10
    assert ctl.observe(_obs(1, clock)) is None and failing.calls == [2]  # backing off for the cooldown


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(low_s=60, high_s=30), "low_s < high_s"),
        (dict(low_s=10, high_s=20, min_size=3, max_size=2), "max_size=2"),
        (dict(low_s=10, high_s=20, hold_observations=0), "hold_observations=0"),
        (dict(low_s=10, high_s=math.inf), "high_s=inf"),
        (dict(low_s=10, high_s=20, cooldown_s=-1), "cooldown_s=-1"),
    ],
)
def test_policy_faults_are_one_line_naming_the_field(kwargs, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        ScalingPolicy(**kwargs)


def test_observation_from_a_monitor_snapshot():
    snap = SimpleNamespace(
        backlog_samples=120, consumer=SimpleNamespace(samples_per_s=4.0), producer=SimpleNamespace(state="running")
    )
    obs = observation_from_snapshot(snap, time_s=5.0)
    assert obs.lead_time_s == 30.0 and obs.producer_state == "running" and obs.time_s == 5.0


def test_run_polls_until_the_producer_finished():
    clock, act = Clock(), FakeActuator(size=1)
    ctl = _controller(act, clock, hold_observations=1, cooldown_s=0)
    readings = iter([_obs(1, clock), _obs(1, clock), Observation(10, 1.0, clock(), producer_state="finished")])
    decisions = ctl.run(lambda: next(readings), interval_s=0)
    assert [d.new_size for d in decisions] == [2, 3, 4]


# --- the actuators without a cluster -----------------------------------------------------------------
def test_ray_autoscaler_actuator_requests_size_bundles():
    sent = []
    act = RayAutoscalerActuator({"GPU": 1, "CPU": 8}, send=sent.append)
    assert act.current() == 0 and act.resize(3) == 3 and act.current() == 3
    assert sent == [[{"GPU": 1.0, "CPU": 8.0}] * 3]
    with pytest.raises(ConfigError, match="via='both'"):
        RayAutoscalerActuator({"GPU": 1}, via="both")


def test_slurm_worker_script_joins_the_head_and_sbatch_scancel_follow_the_size(tmp_path):
    cfg = SlurmWorkerConfig(
        head_address="node001:6379",
        job_name="qwenimage-exp1-encoder",
        gpus_per_node=8,
        cpus_per_task=64,
        partition="gpu",
        time="04:00:00",
        container={"image": "nvcr.io/acme/qwenimage:1", "mounts": ["/lustre:/lustre"]},
        env={"vars": {"HF_HOME": "/lustre/hf"}},
        log_dir="/lustre/runs/exp1/logs",
    )
    script = render_worker_script(cfg)
    assert script.startswith("#!/bin/bash\n")
    for line in (
        "#SBATCH --nodes=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --output=/lustre/runs/exp1/logs/%x-%j.out",
        "export HF_HOME=/lustre/hf",
    ):
        assert line in script.splitlines(), line
    last = script.strip().splitlines()[-1]
    assert last.startswith("srun --ntasks=1") and "--container-image=nvcr.io/acme/qwenimage:1" in last
    assert "ray start --address=node001:6379 --block --num-gpus=8 --num-cpus=64" in last

    calls = []
    ids = iter(["101", "102;cluster", "103"])

    def runner(argv):
        calls.append(list(argv))
        return next(ids) + "\n" if argv[0] == "sbatch" else ""

    act = SlurmWorkerActuator(cfg, tmp_path / "scripts", runner=runner)
    assert act.resize(2) == 2 and act.job_ids == ["101", "102"]
    assert calls[0] == ["sbatch", "--parsable", str(tmp_path / "scripts" / "encoder-worker.sbatch")]
    assert (tmp_path / "scripts" / "encoder-worker.sbatch").read_text() == script
    assert act.resize(1) == 1 and calls[-1] == ["scancel", "102"]  # the newest goes first
    act.close()
    assert calls[-1] == ["scancel", "101"] and act.current() == 0

    def refusing(argv):
        raise ActuatorError("sbatch: error: Batch job submission failed: Invalid partition name specified")

    with pytest.raises(ActuatorError, match="Invalid partition"):
        SlurmWorkerActuator(cfg, tmp_path / "s2", runner=refusing).resize(1)
    with pytest.raises(ConfigError, match="head_address='http://node001:8265'"):
        SlurmWorkerConfig(head_address="http://node001:8265")


# --- a real pool of Ray actors follows a simulated consumer ------------------------------------------
# --- qwenimage launch autoscale, on a run's files ----------------------------------------------------
def _job_yaml(tmp_path, cache: str, run: str, autoscale: dict | None = None, **producer_options) -> str:
    spec = {
        "name": "exp1",
        "cache": cache,
        "run_dir": run,
        "producer": {"nodes": 2, "gpus_per_node": 0, "options": {"input": "bundled", **producer_options}},
        "consumer": {
            "nodes": 1,
            "gpus_per_node": 0,
            "procs_per_node": 1,
            "config": {
                "model": {"name": "tiny-16ch", "num_layers": 2},
                "data": {"stages": [{"name": "s", "buckets": ["256x256"], "micro_batch": 1, "global_batch": 1}]},
                "schedule": {"train_steps": 4},
            },
        },
    }
    if autoscale is not None:
        spec["producer"]["autoscale"] = autoscale
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_the_command_resizes_a_producers_pools_from_the_runs_files(tmp_path, capsys):
    cache, run = build_run(str(tmp_path))  # 32 committed, 24 consumed at 2 samples/s: lead time 4 s
    job = _job_yaml(tmp_path, cache, run, vae_actors="1:3")
    argv = ["launch", "autoscale", job, "--low-s", "10", "--high-s", "100", "--hold-observations", "1"]
    argv += ["--cooldown-s", "0", "--interval-s", "0.01", "--max-observations", "3"]
    rc, out, err = cli_main(argv, capsys)
    assert rc == 0, err
    assert "producer-pools between 1 and 3, lead time band [10, 100] s" in err
    changes = [line for line in err.splitlines() if line.startswith("autoscale 20")]
    assert [line.split(" size ")[1].split(":")[0] for line in changes] == ["1 -> 2", "2 -> 3"], err
    assert "lead_time=4.0s backlog=8 rate=2.0/s" in changes[0]
    assert "at its maximum 3; holding" in err  # the third observation: pinned at the bound, said once
    target = read_pool_target(CacheStorage(cache))
    assert (dict(target.sizes), target.version) == ({"vae": 3, "text": 3}, 2) and "< low 10 s" in target.reason
    assert target.lease_s == 600.0 and not target.expired(time.time())  # renewed by each observation
    records = [
        json.loads(line) for line in (tmp_path / "run" / "autoscale" / "decisions.jsonl").read_text().splitlines()
    ]
    assert [(r["old_size"], r["new_size"], r["actuator"], r["run"]) for r in records] == [
        (1, 2, "producer-pools", "exp1"),
        (2, 3, "producer-pools", "exp1"),
    ]
    # a producer far ahead (lead time 400 s > 100): back down, one step per observation
    rc, out, err = cli_main([*argv[:-1], "2", "--high-s", "3", "--low-s", "1"], capsys)
    assert rc == 0 and "size 3 -> 2" in err and "size 2 -> 1" in err and "> high 3 s" in err, err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--low-s", "60", "--high-s", "30"], "--low-s/--high-s: the band needs low_s < high_s"),
        (["--cooldown-s", "-1"], "--cooldown-s -1"),
        (["--min-size", "0"], "--min-size 0: a producer's pool needs at least 1 actor"),
        (["--pools", "vae,unet"], "--pools 'vae,unet'"),
        (["--actuator", "slurm-workers"], "--head-address: the slurm-workers actuator needs"),
        (["--interval-s", "0"], "--interval-s 0: expected seconds > 0"),
    ],
)
def test_command_faults_are_one_line_naming_the_flag(flags, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QWENIMAGE_RAY_ADDRESS", raising=False)
    cache, run = build_run(str(tmp_path))
    rc, out, err = cli_main(["launch", "autoscale", _job_yaml(tmp_path, cache, run), *flags], capsys)
    assert rc == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run" / "autoscale").exists()


def test_each_actuator_takes_its_defaults_from_the_job_spec(tmp_path, monkeypatch):
    import argparse

    from launch.autoscale_cli import add_autoscale_arguments, build_controller
    from launch.job_spec import load_job_spec

    monkeypatch.delenv("QWENIMAGE_RAY_ADDRESS", raising=False)
    cache, run = build_run(str(tmp_path))
    job = _job_yaml(tmp_path, cache, run, vae_actors="2:6", gpus_per_actor=1, cpus_per_actor=8)
    spec = load_job_spec(job, check_paths=False, check_ray=False)
    parser = argparse.ArgumentParser()
    add_autoscale_arguments(parser)

    def controller(*flags):
        return build_controller(parser.parse_args([job, *flags]), spec)[0]

    pools = controller()
    assert (pools.policy.min_size, pools.policy.max_size, pools.size) == (2, 6, 2)  # vae_actors MIN:MAX
    (tmp_path / "run" / "slurm").mkdir(parents=True)
    (tmp_path / "run" / "slurm" / "ray-address").write_text("10.1.2.3:6379\n")  # the producer job's head
    workers = controller("--actuator", "slurm-workers")
    assert workers.actuator.cfg.head_address == "10.1.2.3:6379"
    assert (workers.policy.min_size, workers.policy.max_size) == (0, 2)  # up to producer.nodes extra nodes
    assert controller("--actuator", "slurm-workers", "--head-address", "h:1").actuator.cfg.head_address == "h:1"
    ray = controller("--actuator", "ray-autoscaler", "--max-size", "12", "--min-size", "4")
    assert ray.actuator.bundle == {"CPU": 8.0, "GPU": 1.0} and (ray.policy.min_size, ray.policy.max_size) == (4, 12)


def test_the_job_specs_autoscale_section_sets_what_no_flag_overrides(tmp_path, capsys):
    cache, run = build_run(str(tmp_path))  # lead time 4 s
    section = {"low_s": 10, "high_s": 100, "hold_observations": 1, "cooldown_s": 0, "interval_s": 0.01}
    job = _job_yaml(tmp_path, cache, run, autoscale=section, vae_actors="1:3")
    rc, out, err = cli_main(["launch", "autoscale", job, "--max-observations", "1"], capsys)
    assert rc == 0 and "lead time band [10, 100] s, every 0.01 s" in err and "size 1 -> 2" in err, err
    rc, out, err = cli_main(["launch", "autoscale", job, "--max-observations", "1", "--low-s", "1"], capsys)
    assert rc == 0 and "lead time band [1, 100] s" in err and "size 2 ->" not in err, err  # 4 s is in [1, 100]


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"low": 10}, "producer.autoscale: unknown key(s) ['low']"),
        ({"actuator": "k8s"}, "producer.autoscale.actuator='k8s': expected one of"),
        ({"cooldown_s": "5m"}, "producer.autoscale.cooldown_s='5m': expected float"),
        ({"low_s": 600, "high_s": 60}, "producer.autoscale.low_s/producer.autoscale.high_s: the band needs"),
        ({"min_size": 0}, "producer.autoscale.min_size=0: a producer's pool needs at least 1 actor"),
        ({"pools": "clip"}, "producer.autoscale.pools='clip': expected some of ['vae', 'text']"),
        ({"max_size": 1, "min_size": 2}, "producer.autoscale.max_size=1"),
    ],
)
def test_a_bad_autoscale_section_is_refused_when_the_spec_loads(section, expected, tmp_path):
    from launch.job_spec import load_job_spec

    cache, run = build_run(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_job_spec(_job_yaml(tmp_path, cache, run, autoscale=section), check_paths=False, check_ray=False)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_controller_waits_for_the_cache_the_producers_create(tmp_path, caplog):
    from launch.autoscale_cli import wait_for_observer
    from launch.job_spec import load_job_spec

    run = tmp_path / "run"
    run.mkdir()
    spec = load_job_spec(_job_yaml(tmp_path, str(tmp_path / "cache"), str(run)), check_paths=False, check_ray=False)
    sleeps = []

    def sleep(seconds):  # the producers create the cache while the controller waits
        sleeps.append(seconds)
        if len(sleeps) == 3:
            build_run(str(tmp_path))

    caplog.set_level(logging.INFO, logger="launch.autoscale")
    observer = wait_for_observer(spec, 7.0, sleep=sleep)
    assert sleeps == [7.0, 7.0, 7.0] and observer().backlog_samples == 8
    waits = [r.getMessage() for r in caplog.records if "waiting for the run's files" in r.getMessage()]
    assert len(waits) == 1 and str(tmp_path / "cache") in waits[0], waits  # said once, naming what is missing
