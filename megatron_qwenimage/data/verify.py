"""`qwenimage cache verify`: check every committed shard against its checksums, count per bucket."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from megatron_qwenimage.data.commit import CommitError, commit_path, committed_partitions, read_commit
from megatron_qwenimage.data.manifest import Cache, CacheError, CachePathError, Snapshot, snapshot_path


@dataclass
class VerifyReport:
    """Outcome of verifying a cache (or one pinned snapshot of it).

    The counts come from the commit records: ``inputs == committed + duplicates +
    sum(quarantined.values())``; `buckets` counts committed samples per bucket name.
    `bad_shards` maps a shard id to its error, or the cache-relative path of a commit record or
    snapshot that was refused as a whole (a path in it points outside the cache: `CachePathError`).
    """

    shards_checked: int = 0
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard_id -> error
    inputs: int = 0
    committed: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)
    snapshot_version: int = -1

    @property
    def ok(self) -> bool:
        return not self.bad_shards

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "snapshot": self.snapshot_version,
            "shards": self.shards_checked,
            "bad_shards": self.bad_shards,
            "inputs": self.inputs,
            "committed": self.committed,
            "duplicates": self.duplicates,
            "quarantined": dict(sorted(self.quarantined.items())),
            "buckets": dict(sorted(self.buckets.items())),
        }


def verify_snapshot(snapshot: Snapshot, report: VerifyReport | None = None) -> VerifyReport:
    """Verify every shard of `snapshot` (all files re-hashed); never stops at the first bad one."""
    report = report if report is not None else VerifyReport()
    report.snapshot_version = snapshot.version
    for rec in snapshot.records:
        report.inputs += rec.inputs
        report.committed += rec.committed
        report.duplicates += rec.duplicates
        for reason, n in rec.quarantined.items():
            report.quarantined[reason] = report.quarantined.get(reason, 0) + n
    for shard in snapshot.shards:
        report.shards_checked += 1
        try:
            shard.verify()
        except (CacheError, CommitError, OSError, ValueError) as exc:
            report.bad_shards[shard.shard_id] = str(exc)
            continue
        name = shard.bucket.name
        report.buckets[name] = report.buckets.get(name, 0) + shard.num_samples
    return report


def verify_cache(cache: Cache, pin: int | None = None, live: bool = True) -> VerifyReport:
    """Verify a pinned snapshot (`pin`), or with `live` everything committed right now.

    A commit record or snapshot holding a path outside the cache is reported bad as a whole (keyed
    by its own path) and none of its files is opened; the other records are still verified.
    """
    report = VerifyReport()
    if live and pin is None:
        records = []
        for partition_id in sorted(committed_partitions(cache.storage)):
            try:
                record = read_commit(cache.storage, partition_id)
            except CachePathError as exc:
                report.bad_shards[commit_path(partition_id)] = str(exc)
                continue
            if record is not None:
                records.append(record)
        snapshot = Snapshot(cache.storage, -1, records, time.time())
    else:
        if pin is None:
            versions = cache.snapshot_versions()
            pin = versions[-1] if versions else None
        try:
            snapshot = cache.snapshot(pin)
        except CachePathError as exc:
            report.snapshot_version = pin
            report.bad_shards[snapshot_path(pin)] = str(exc)
            return report
    return verify_snapshot(snapshot, report)
