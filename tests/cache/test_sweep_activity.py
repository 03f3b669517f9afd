"""The orphan sweep judges an uncommitted attempt by its activity, not by its start time."""

from __future__ import annotations

import json
import os
import time

from megatron_qwenimage.cache.commit import PartitionAttempt
from megatron_qwenimage.cache.manifest import init_cache
from megatron_qwenimage.cache.sweep import sweep_orphans

DAY_S = 86400.0


def started_long_ago(storage, partition_id: str, days: float = 10.0) -> PartitionAttempt:
    """An attempt with a shard directory whose start time and every modification time lie `days` back."""
    attempt = PartitionAttempt.start(storage, partition_id)
    root = storage.path(attempt.dir)
    info = os.path.join(root, "attempt.json")
    d = json.loads(open(info).read())
    d["started_unix"] -= days * DAY_S
    with open(info, "w") as f:
        json.dump(d, f)
    os.makedirs(os.path.join(root, "16x16", "tensors.zarr", "latents", "c"))
    with open(os.path.join(root, "16x16", "tensors.zarr", "zarr.json"), "w") as f:
        f.write("{}")
    age_tree(root, days * DAY_S)
    return attempt


def age_tree(root: str, seconds: float) -> None:
    """Set the modification time of `root` and of everything under it `seconds` into the past."""
    then = time.time() - seconds
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (then, then))
        os.utime(dirpath, (then, then))


def test_an_attempt_started_long_ago_but_written_to_recently_is_kept(tmp_path):
    storage = init_cache(str(tmp_path / "c")).storage
    slow = started_long_ago(storage, "p-slow")
    idle = started_long_ago(storage, "p-idle")
    root = storage.path(slow.dir)
    chunk = os.path.join(root, "16x16", "tensors.zarr", "latents", "c", "0")
    with open(chunk, "wb") as f:  # the slow producer writes one more chunk, deep inside, just now
        f.write(b"\0" * 64)
    for parent in (os.path.dirname(chunk), root):  # only the chunk itself is new
        os.utime(parent, (time.time() - 10 * DAY_S,) * 2)

    report = sweep_orphans(storage, grace_s=3600)
    assert report.removed_attempts == [idle.dir]
    assert report.kept_in_flight == [slow.dir]
    assert os.path.isfile(chunk) and not os.path.exists(storage.path(idle.dir))


def test_an_attempt_idle_for_the_grace_period_is_swept_whatever_its_start_time(tmp_path):
    storage = init_cache(str(tmp_path / "c")).storage
    attempt = PartitionAttempt.start(storage, "p-stalled")  # started just now, per its attempt.json ...
    age_tree(storage.path(attempt.dir), 2 * 3600)  # ... but nothing written in it for two hours
    assert sweep_orphans(storage, grace_s=3600).removed_attempts == [attempt.dir]
