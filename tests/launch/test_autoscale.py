"""The lead-time controller: hysteresis, cooldown and bounds on a fake clock, the actuators, and a
real pool of Ray actors that follows a simulated consumer (fast, then slow)."""

from __future__ import annotations

import logging
import math
import os
import re
from types import SimpleNamespace

import pytest

from launch.autoscale import (
    ActorPoolActuator,
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
from megatron_qwenimage.config import ConfigError

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
        self.refreshed = 0

    def current(self) -> int:
        return self.size

    def resize(self, target: int) -> int:
        self.calls.append(target)
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
class Encoder:
    """A simulated encoder actor: `per_s` samples per second of (simulated) time."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s

    def produce(self, dt: float) -> float:
        return self.per_s * dt


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray (4 logical CPUs, 127.0.0.1 only, no dashboard, no auth token) for this module."""
    import ray
    from ray._private import ray_constants

    env = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: keep the node IP at 127.0.0.1
    started = not ray.is_initialized()
    try:
        if started:
            ray.init(
                address="local",
                num_cpus=4,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
            )
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield ray
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = flag
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _alive_encoders() -> int:
    from ray._private import state

    return sum(
        a.get("State") == "ALIVE" and "Encoder" in (a.get("ActorClassName") or "") for a in state.actors().values()
    )


def test_actor_pool_follows_a_fast_then_slow_consumer(local_ray, caplog):
    ray = local_ray
    policy = ScalingPolicy(low_s=20, high_s=60, min_size=1, max_size=4, hold_observations=2, cooldown_s=6)
    pool = ActorPoolActuator(Encoder, args=(10.0,), options={"num_cpus": 0.25}, ready_timeout_s=60)
    clock = Clock(0.0)
    caplog.set_level(logging.INFO, logger="launch.autoscale")
    try:
        assert pool.resize(policy.min_size) == 1
        ctl = LeadTimeController(policy, pool, clock=clock, wall_clock=lambda: 1.8e9 + clock())
        backlog, dt = 100.0, 2.0
        trace = []
        # The simulated consumer wants 30 samples/s, then 4; each live actor makes 10 samples/s.
        for phase, demand, steps in (("fast", 30.0, 60), ("slow", 4.0, 40)):
            for _ in range(steps):
                clock.t += dt
                produced = sum(ray.get([a.produce.remote(dt) for a in pool.handles]))
                consumed = min(demand * dt, backlog + produced)
                backlog += produced - consumed
                ctl.observe(Observation(backlog, consumed / dt, time_s=clock()))
                size = pool.current()
                assert policy.min_size <= size <= policy.max_size
                assert size == len(pool.handles) == _alive_encoders()  # real, live actors
                trace.append((phase, size))
        fast = [s for p, s in trace if p == "fast"]
        slow = [s for p, s in trace if p == "slow"]
        assert fast == sorted(fast) and max(fast) == policy.max_size  # grew while the consumer was fast
        assert slow == sorted(slow, reverse=True) and slow[-1] == policy.min_size  # shrank when it slowed
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("autoscale ")]
        changes = [tuple(map(int, LINE.match(line).group(1, 2))) for line in lines]
        assert changes == [(1, 2), (2, 3), (3, 4), (4, 3), (3, 2), (2, 1)], lines
        assert all(": grow" in line and "< low 20 s" in line for line in lines[:3]), lines
        assert all(": shrink" in line and "> high 60 s" in line for line in lines[3:]), lines
    finally:
        pool.close()
    assert _alive_encoders() == 0
