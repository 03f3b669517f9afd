"""benchmarks/produce.py's arithmetic: start-up and steady state from the commit records' times."""

from __future__ import annotations

import pytest

from benchmarks.produce import commit_times, steady_state
from megatron_qwenimage.cache import init_cache
from megatron_qwenimage.cache.commit import CommitRecord
from megatron_qwenimage.cache.storage import CacheStorage


def test_steady_state_excludes_the_first_partition_and_the_start_up():
    commits = [(110.0, 16), (118.0, 16), (126.0, 16), (134.0, 8)]  # (commit time, images)
    startup, steady = steady_state(100.0, commits)
    assert startup == pytest.approx(10.0)
    assert steady == pytest.approx((16 + 16 + 8) / (134.0 - 110.0))
    assert steady_state(100.0, [(105.0, 16)]) == (pytest.approx(5.0), None)  # one commit: no steady state


def test_commit_times_come_from_the_records_in_commit_order(tmp_path):
    url = str(tmp_path / "cache")
    init_cache(url)
    storage = CacheStorage(url)
    for pid, t, n in (("p-b", 20.0, 3), ("p-a", 30.0, 5), ("p-c", 10.0, 2)):
        record = CommitRecord(
            pid, "a1", inputs=n, committed=n, duplicates=0, quarantined={}, shards=[], tables={}, created_unix=t
        )
        storage.write_atomic(f"commits/{pid}.json", record.to_json())
    assert commit_times(url) == [(10.0, 2), (20.0, 3), (30.0, 5)]
