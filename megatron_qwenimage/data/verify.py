"""`qwenimage cache verify`: check every committed shard against its checksums, count per bucket."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_qwenimage.data.commit import CommitError
from megatron_qwenimage.data.manifest import Cache, CacheError, Snapshot


@dataclass
class VerifyReport:
    """Outcome of verifying a cache (or one pinned snapshot of it).

    The counts come from the commit records: ``inputs == committed + duplicates +
    sum(quarantined.values())``; `buckets` counts committed samples per bucket name.
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


def verify_snapshot(snapshot: Snapshot) -> VerifyReport:
    """Verify every shard of `snapshot` (all files re-hashed); never stops at the first bad one."""
    report = VerifyReport(snapshot_version=snapshot.version)
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
    """Verify a pinned snapshot (`pin`), or with `live` everything committed right now."""
    snapshot = cache.live() if (live and pin is None) else cache.snapshot(pin)
    return verify_snapshot(snapshot)
