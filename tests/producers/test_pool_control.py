"""The lead-time autoscaler drives a running producer's encoder pools (`producers.pool_control`).

The end-to-end test runs a real ``produce`` on the session's local Ray with one partition per
window; a simulated consumer, fast and then slow, drives a `LeadTimeController` whose
`ProducerPoolActuator` writes the cache's control file. The producer must run each window's Ray
Data pools at the sizes decided before that window (clamped into each pool's own bounds), and Ray
must have started exactly those actors.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time

import pytest

from launch.autoscale import ActuatorError, LeadTimeController, Observation, ProducerPoolActuator, ScalingPolicy
from megatron_qwenimage.cache.manifest import init_cache
from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.config import ConfigError
from producers.config import PoolConfig, ProducerConfig, buckets_for_area
from producers.metrics import POOLS, STATUS_FILE, ProducerCounts, StatusFile
from producers.pipeline import ProduceRequest, produce
from producers.pool_control import (
    POOL_CONTROL_FILE,
    PoolControl,
    PoolTarget,
    read_pool_target,
    renew_pool_target,
    write_pool_target,
)
from tests.helpers.producers import SKIMAGE_DATA, assert_complete_once

PHOTOS = ("astronaut.png", "camera.png", "coffee.png", "chelsea.png", "horse.png")


# --- the control file and the producer's reading of it -------------------------------------------
def test_targets_are_versioned_and_validated(tmp_path):
    storage = CacheStorage(tmp_path / "cache")
    assert read_pool_target(storage) is None
    first = write_pool_target(storage, {"vae": 2}, reason="grow")
    second = write_pool_target(storage, {"vae": 3, "text": 1})
    assert (first.version, second.version) == (1, 2)
    back = read_pool_target(storage)
    assert (back.version, dict(back.sizes), back.reason) == (2, {"vae": 3, "text": 1}, "")
    for sizes, expected in (({"clip": 2}, "unknown pool"), ({"vae": 0}, "sizes['vae']=0"), ({"vae": 1.5}, "1.5")):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            PoolTarget(sizes=sizes)
    storage.write_atomic(POOL_CONTROL_FILE, b"{not json")
    with pytest.raises(ConfigError, match="control/pools.json: not JSON"):
        read_pool_target(storage)
    assert write_pool_target(storage, {"vae": 1}).version == 1  # the writer owns the file: replaced


def test_windows_take_the_target_clamped_and_keep_the_last_good_one(tmp_path, caplog):
    storage = CacheStorage(tmp_path / "cache")
    control = PoolControl(storage, {"vae": (1, 4), "text": (2, 3)})
    caplog.set_level(logging.INFO, logger="producers.pool_control")
    assert control.for_window(0).bounds == {"vae": (1, 4), "text": (2, 3)}  # no file: Ray Data's autoscaling
    write_pool_target(storage, {"vae": 6, "text": 1}, reason="lead time 3 s < low 30 s")
    pools = control.for_window(1)
    assert pools.bounds == {"vae": (4, 4), "text": (2, 2)} and pools.version == 1
    assert "pool control v1 from window 1: vae 1:4, text 2:3 -> vae 4, text 2 (lead time 3 s < low 30 s)" in caplog.text
    assert "clamped vae 6 -> 4 (its bounds 1:4), text 1 -> 2 (its bounds 2:3)" in caplog.text
    write_pool_target(storage, {"vae": 2})  # a pool not named keeps its configured bounds
    assert control.for_window(2).bounds == {"vae": (2, 2), "text": (2, 3)}
    bad = {"schema_version": 1, "version": 3, "sizes": {"vae": -1}, "written_unix": time.time(), "lease_s": 60}
    storage.write_atomic(POOL_CONTROL_FILE, json.dumps(bad).encode())
    caplog.clear()
    for window in (3, 4):
        assert control.for_window(window).bounds == {"vae": (2, 2), "text": (2, 3)}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sizes['vae']=-1" in warnings[0] and "window 3 keeps vae 2, text 2:3" in warnings[0]


def test_the_actuator_writes_every_pool_and_resumes_from_the_file(tmp_path):
    cache = str(tmp_path / "cache")
    act = ProducerPoolActuator(cache, initial=2)
    assert act.current() == 2  # nothing written yet
    with pytest.raises(ActuatorError, match="is not a cache yet"):
        act.resize(3)  # before the producer made the cache: nothing is written into the folder
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    init_cache(cache)
    assert act.resize(3, reason="grow") == 3
    target = read_pool_target(CacheStorage(cache))
    assert dict(target.sizes) == {"vae": 3, "text": 3} and target.reason == "grow"
    assert ProducerPoolActuator(cache, pools=("vae",)).current() == 3  # a restarted controller continues
    assert act.resize(0) == 1  # a pool cannot run without an actor
    with pytest.raises(ConfigError, match="expected some of"):
        ProducerPoolActuator(cache, pools=("unet",))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_fresh_target_is_followed_and_an_expired_one_ignored_once(tmp_path, caplog):
    """A controller that stopped renewing its file (it died) pins no later window: once the lease
    ran out, the windows run the configured bounds, with one line saying so."""
    storage = CacheStorage(tmp_path / "cache")
    now = [1.8e9]
    control = PoolControl(storage, {"vae": (1, 4), "text": (1, 2)}, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="producers.pool_control")
    storage.write_atomic(
        POOL_CONTROL_FILE, PoolTarget({"vae": 3, "text": 3}, written_unix=now[0], lease_s=60).to_json()
    )
    now[0] += 59
    assert control.for_window(0).bounds == {"vae": (3, 3), "text": (2, 2)}  # fresh: followed, clamped
    now[0] += 2
    for window in (1, 2):
        pools = control.for_window(window)
        assert pools.bounds == {"vae": (1, 4), "text": (1, 2)} and pools.version == 0
    (line,) = _warnings(caplog)
    assert line.startswith("pool control: control/pools.json v1 expired: written 61 s ago, lease 60 s"), line
    assert line.endswith("window 1 runs the configured bounds vae 1:4, text 1:2 (Ray Data autoscaling)"), line


def test_a_renewed_target_stands_and_a_lapsed_one_is_not_brought_back(tmp_path):
    storage = CacheStorage(tmp_path / "cache")
    first = write_pool_target(storage, {"vae": 2}, reason="grow", lease_s=60)
    renewed = renew_pool_target(storage, now=first.written_unix + 50)
    assert renewed == PoolTarget({"vae": 2}, version=1, reason="grow", written_unix=first.written_unix + 50, lease_s=60)
    assert read_pool_target(storage) == renewed
    assert not renewed.expired(first.written_unix + 100)
    before = storage.read_bytes(POOL_CONTROL_FILE)
    assert renew_pool_target(storage, now=first.written_unix + 200) is None  # lapsed: stays lapsed
    assert storage.read_bytes(POOL_CONTROL_FILE) == before


@pytest.mark.parametrize(
    "written, named",
    [
        ({"schema_version": 2, "version": 4, "sizes": {"vae": 3}, "written_unix": 0, "lease_s": 60}, "2"),
        ({"version": 4, "sizes": {"vae": 3}, "written_unix": 0}, "None"),  # an older controller: no lease
    ],
)
def test_a_file_of_another_format_is_reported_once_and_ignored(written, named, tmp_path, caplog):
    storage = CacheStorage(tmp_path / "cache")
    control = PoolControl(storage, {"vae": (1, 4), "text": (1, 2)})
    write_pool_target(storage, {"vae": 2})
    assert control.for_window(0).bounds["vae"] == (2, 2)
    written["written_unix"] = time.time()
    storage.write_atomic(POOL_CONTROL_FILE, json.dumps(written).encode())
    caplog.set_level(logging.INFO, logger="producers.pool_control")
    for window in (1, 2):
        assert control.for_window(window).bounds == {"vae": (1, 4), "text": (1, 2)}
    (line,) = _warnings(caplog)
    assert f"control/pools.json: schema_version {named}, expected 1" in line
    assert line.endswith("ignored: window 1 runs the configured bounds vae 1:4, text 1:2"), line


def test_the_controller_reads_back_the_clamped_size_the_producer_runs(tmp_path):
    """The controller asks for 5 actors per pool; the producer's bounds (vae 1:3, text 1:2) clamp
    that to vae 3, text 2, which it publishes in status.json: the controller's next decision
    starts from 3, not from the 5 it asked for."""
    cache = str(tmp_path / "cache")
    storage = init_cache(cache).storage
    actuator = ProducerPoolActuator(cache)
    assert actuator.resize(5, reason="grow") == 5
    producer = PoolControl(storage, {"vae": (1, 3), "text": (1, 2)})
    status = StatusFile(storage, "run1")
    status.update(ProducerCounts(), "running", force=True)  # still running the window before
    assert actuator.current() == 5  # not applied yet: the size the file asks for
    status.set_pools(producer.for_window(0))
    status.update(ProducerCounts(), "running", force=True)
    published = json.loads(storage.read_bytes(STATUS_FILE))
    assert published["pool_bounds"] == {"vae": [3, 3], "text": [2, 2]} and published["pool_control_version"] == 1
    assert actuator.current() == 3
    status.close()

    policy = ScalingPolicy(low_s=5, high_s=50, min_size=1, max_size=8, hold_observations=1, cooldown_s=0)
    controller = LeadTimeController(policy, actuator)
    decision = controller.observe(Observation(backlog_samples=1000.0, consumer_samples_per_s=1.0))  # 1000 s: shrink
    assert (decision.old_size, decision.new_size) == (3, 2)


def test_the_controller_renews_its_lease_on_every_observation_and_a_lapsed_one_counts_as_none(tmp_path):
    cache = str(tmp_path / "cache")
    storage = init_cache(cache).storage
    now = [time.time()]
    actuator = ProducerPoolActuator(cache, initial=1, lease_s=60, clock=lambda: now[0])
    actuator.resize(3)
    policy = ScalingPolicy(low_s=5, high_s=50, min_size=1, max_size=4, hold_observations=3, cooldown_s=0)
    controller = LeadTimeController(policy, actuator)
    for _ in range(3):  # 3 minutes of observations inside the band: no change, but the lease is renewed
        now[0] += 59
        assert controller.observe(Observation(backlog_samples=20.0, consumer_samples_per_s=1.0)) is None
        target = read_pool_target(storage)
        assert (target.written_unix, target.version, controller.size) == (now[0], 1, 3)
    now[0] += 61  # the controller stopped: its target lapses, for the producer and for a new controller
    assert actuator.current() == 1


# --- a real producer follows the controller ------------------------------------------------------
def _pool_actors(ray, pool: str) -> int:
    """Actors of `pool` this driver's job started, alive or dead."""
    from ray._private import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    return sum(POOLS[pool] in (a.get("ActorClassName") or "") for a in state.actors(job_id=job).values())


def test_a_fast_then_slow_consumer_resizes_the_running_producers_pools(ray_cluster, tmp_path, caplog):
    import ray

    src = tmp_path / "in"
    src.mkdir()
    for name in PHOTOS:  # one partition, and so one window, per photo
        shutil.copy(SKIMAGE_DATA / name, src / name)
        (src / f"{name.rsplit('.', 1)[0]}.txt").write_text(f"photo {name}")
    cache = tmp_path / "cache"
    init_cache(str(cache))  # a cache made beforehand, so window 0 has a target too
    cfg = ProducerConfig(
        buckets={"64": buckets_for_area(64)},
        partition_size=1,
        window_partitions=1,
        min_side_px=8,
        vae_pool=PoolConfig(min_actors=1, max_actors=3, num_cpus=0.25),
        text_pool=PoolConfig(min_actors=1, max_actors=2, num_cpus=0.25),
        snapshot_interval_s=0,
    )
    policy = ScalingPolicy(low_s=5, high_s=50, min_size=1, max_size=3, hold_observations=1, cooldown_s=0)
    actuator = ProducerPoolActuator(str(cache))
    actuator.resize(1, reason="start at the minimum")  # window 0 too runs a known size (not Ray Data's choice)
    controller = LeadTimeController(policy, actuator, wall_clock=lambda: 1.8e9)
    before = {pool: _pool_actors(ray, pool) for pool in POOLS}
    seen = []

    def consumer_reading(counts) -> None:
        # Called by the driver after each row; with one input per window, `read` goes up by one
        # when a window's rows are in, before the next window reads the control file.
        if counts.read == len(seen) or counts.read > len(PHOTOS) - 1:
            return
        seen.append(counts.read)
        fast = counts.read <= 2  # consumer at 10 samples/s: 1 s of backlog; then 0.1/s: 100 s
        controller.observe(Observation(backlog_samples=10.0, consumer_samples_per_s=10.0 if fast else 0.1))

    for name in ("launch.autoscale", "producers.pool_control"):  # whatever an earlier in-process CLI set
        caplog.set_level(logging.INFO, logger=name)
    counts = produce(
        ProduceRequest(str(src), str(cache), config=cfg, ray_address=ray_cluster),
        on_progress=consumer_reading,
    )
    assert counts.committed == len(PHOTOS)
    assert_complete_once(cache, len(PHOTOS))

    decisions = [(d.old_size, d.new_size) for d in controller.decisions]
    assert decisions == [(1, 2), (2, 3), (3, 2), (2, 1)]  # grew to the maximum, then shrank to the minimum
    lines = [r.getMessage() for r in caplog.records if r.name == "launch.autoscale"]
    assert [line for line in lines if line.startswith("autoscale ")] == [d.line() for d in controller.decisions]
    # What each window ran (the producer's log): the decision made while the window before it read.
    applied = [
        (int(m.group(1)), m.group(2))
        for r in caplog.records
        if r.name == "producers.pool_control"
        and (m := re.search(r"from window (\d+): .* -> (vae \S+, text \S+)", r.getMessage()))
    ]
    assert applied == [
        (0, "vae 1, text 1"),
        (1, "vae 2, text 2"),
        (2, "vae 3, text 2"),  # the text pool's own bound is 2
        (3, "vae 2, text 2"),
        (4, "vae 1, text 1"),
    ], applied
    # Ray started exactly those pools, window by window.
    vae, text = [1, 2, 3, 2, 1], [1, 2, 2, 2, 1]
    assert {pool: _pool_actors(ray, pool) - before[pool] for pool in POOLS} == {"vae": sum(vae), "text": sum(text)}
    status = json.loads((cache / STATUS_FILE).read_text())
    assert status["pool_bounds"] == {"vae": [1, 1], "text": [1, 1]} and status["pool_control_version"] == 5
