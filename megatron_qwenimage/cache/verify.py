"""`qwenimage cache verify`: check every committed shard against its checksums, count per bucket;
check every snapshot against the commit records. `repair_cache`: move unreadable records aside."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from megatron_qwenimage.cache.commit import (
    QUARANTINED_COMMITS_DIR,
    CommitError,
    CommitRecord,
    CommitRecordError,
    commit_path,
    commit_record_names,
    quarantine_commit,
    quarantined_commit_partitions,
    read_commit,
)
from megatron_qwenimage.cache.manifest import (
    QUARANTINED_SNAPSHOTS_DIR,
    Cache,
    CacheError,
    CachePathError,
    Shard,
    Snapshot,
    quarantine_snapshot,
    read_snapshot,
    snapshot_file_versions,
    snapshot_path,
)


@dataclass
class VerifyReport:
    """Outcome of verifying a cache (or one pinned snapshot of it).

    The counts come from the commit records (or, pinned, the snapshot's records): ``inputs ==
    committed + duplicates + sum(quarantined.values())``; `buckets` counts committed samples per
    bucket name. `bad_shards` maps what is bad to its error: a shard id; the cache-relative path of
    a commit record or snapshot that was refused as a whole (not JSON, not the schema, a path
    outside the cache: `CommitRecordError`, `SnapshotError`, `CachePathError`); or
    ``<snapshot path>:<shard id>`` for a shard that a snapshot lists but the commit records do not
    (no record of its partition, or a different one). `snapshots_checked`: versions compared
    against the commit records; `commit_records`: readable records.
    """

    shards_checked: int = 0
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard_id / record / snapshot -> error
    inputs: int = 0
    committed: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)
    snapshot_version: int = -1
    snapshots_checked: list[int] = field(default_factory=list)
    commit_records: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad_shards

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "snapshot": self.snapshot_version,
            "snapshots_checked": list(self.snapshots_checked),
            "commit_records": self.commit_records,
            "shards": self.shards_checked,
            "bad_shards": self.bad_shards,
            "inputs": self.inputs,
            "committed": self.committed,
            "duplicates": self.duplicates,
            "quarantined": dict(sorted(self.quarantined.items())),
            "buckets": dict(sorted(self.buckets.items())),
        }

    def count_records(self, records: list[CommitRecord]) -> None:
        for rec in records:
            self.inputs += rec.inputs
            self.committed += rec.committed
            self.duplicates += rec.duplicates
            for reason, n in rec.quarantined.items():
                self.quarantined[reason] = self.quarantined.get(reason, 0) + n


class _ShardChecker:
    """Re-hashes each distinct shard (path + checksums) once, however many records list it."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        self.results: dict[tuple, str | None] = {}

    def check(self, shard: Shard, *, count: bool) -> str | None:
        """The shard's error (None if it verifies); `count`: add its samples to the bucket counts."""
        entry = shard.entry
        key = (entry.path, tuple(sorted((k, v.sha256, v.bytes) for k, v in entry.files.items())))
        if key not in self.results:
            self.report.shards_checked += 1
            try:
                shard.verify()
                self.results[key] = None
            except (CacheError, CommitError, OSError, ValueError) as exc:
                self.results[key] = str(exc)
        if count and self.results[key] is None:
            name = shard.bucket.name
            self.report.buckets[name] = self.report.buckets.get(name, 0) + shard.num_samples
        return self.results[key]


def verify_snapshot(snapshot: Snapshot, report: VerifyReport | None = None) -> VerifyReport:
    """Verify every shard of `snapshot` (all files re-hashed); never stops at the first bad one."""
    report = report if report is not None else VerifyReport()
    report.snapshot_version = snapshot.version
    report.count_records(snapshot.records)
    checker = _ShardChecker(report)
    for shard in snapshot.shards:
        err = checker.check(shard, count=True)
        if err is not None:
            report.bad_shards[shard.shard_id] = err
    return report


def verify_cache(cache: Cache, pin: int | None = None, live: bool = True) -> VerifyReport:
    """Verify everything committed right now and every snapshot (`live`), or one snapshot (`pin`;
    the newest without `live`).

    Every commit record is read strictly: one that is not JSON, not the schema, or holds a path
    outside the cache is reported bad as a whole (keyed by its own path) and none of its files is
    opened; the other records are still verified. Every snapshot checked is compared with the
    commit records: a partition it lists without a commit record, or with a different one, is
    bad (keyed ``<snapshot path>:<shard id>``), and its shards are re-hashed too, so nothing a
    snapshot names goes unchecked. A snapshot that cannot be read is bad (keyed by its path).

    Raises:
        CacheError: `pin` names no snapshot (or there is none to verify without `live`).
    """
    storage = cache.storage
    report = VerifyReport()
    checker = _ShardChecker(report)
    commits: dict[str, CommitRecord] = {}
    unreadable: set[str] = set()
    for partition_id in commit_record_names(storage):
        try:
            record = read_commit(storage, partition_id, strict=True)
        except (CommitRecordError, CachePathError) as exc:
            report.bad_shards[commit_path(partition_id)] = str(exc)
            unreadable.add(partition_id)
            continue
        if record is not None:
            commits[partition_id] = record
    report.commit_records = len(commits)
    quarantined = set(quarantined_commit_partitions(storage))

    if live and pin is None:
        current = Snapshot(storage, -1, [commits[p] for p in sorted(commits)], time.time())
        report.count_records(current.records)
        for shard in current.shards:
            err = checker.check(shard, count=True)
            if err is not None:
                report.bad_shards[shard.shard_id] = err
        versions = snapshot_file_versions(storage)
    else:
        available = snapshot_file_versions(storage)
        if (pin is None and not available) or (pin is not None and pin not in available):
            cache.snapshot(pin)  # raises CacheError: no snapshot at all / no such version (naming it)
        pin = pin if pin is not None else available[-1]
        report.snapshot_version = pin
        versions = [pin]

    for version in versions:
        rel = snapshot_path(version)
        try:
            snapshot = read_snapshot(storage, version)
        except FileNotFoundError:
            continue  # moved away meanwhile
        except CacheError as exc:  # SnapshotError, CachePathError
            report.bad_shards[rel] = str(exc)
            continue
        report.snapshots_checked.append(version)
        pinned = not (live and pin is None)
        if pinned:
            report.count_records(snapshot.records)
        where = f"snapshot v{version} ({storage.path(rel)})"
        for record in snapshot.records:
            # A partition whose record is unreadable (reported under its own path) or was moved to
            # quarantine (then re-produced, or not yet): the snapshot's copy stands on its own.
            excused = record.partition_id in unreadable or record.partition_id in quarantined
            problem = None if excused else _snapshot_record_problem(storage, record, commits.get(record.partition_id))
            shards = [Shard(storage, entry, snapshot.record_name(record)) for entry in record.shards]
            if problem is not None and not shards:
                report.bad_shards[f"{rel}:{record.partition_id}"] = f"{where}: {problem}"
            for shard in shards:
                err = checker.check(shard, count=pinned)
                if problem is not None:
                    also = f"; the shard itself: {err}" if err else ""
                    report.bad_shards[f"{rel}:{shard.shard_id}"] = f"{where}: shard {shard.shard_id}: {problem}{also}"
                elif err is not None:
                    report.bad_shards.setdefault(shard.shard_id, err)
    return report


def _snapshot_record_problem(storage, record: CommitRecord, committed: CommitRecord | None) -> str | None:
    """Why a snapshot's copy of `record` does not match the commit records, or None."""
    path = storage.path(commit_path(record.partition_id))
    if committed is None:
        return (
            f"partition {record.partition_id} (attempt {record.attempt_id}) has no commit record: {path} does "
            "not exist (are commits/ incomplete, e.g. a partial copy of the cache?)"
        )
    if committed.attempt_id != record.attempt_id:
        return (
            f"lists partition {record.partition_id} as attempt {record.attempt_id}, but its commit record {path} "
            f"names attempt {committed.attempt_id}"
        )
    if committed.to_json() != record.to_json():
        return f"its copy of the commit record of partition {record.partition_id} differs from {path}"
    return None


@dataclass
class RepairReport:
    """What `repair_cache` did (or, dry run, would do).

    `moved`: cache-relative source -> quarantine destination of each unreadable file (`reasons`
    says why); `restored`: commit records written back from a snapshot's copy -> that snapshot.
    """

    moved: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    restored: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False


def repair_cache(cache: Cache, *, dry_run: bool = False) -> RepairReport:
    """Move every commit record and snapshot that cannot be read into ``quarantine/``, then restore
    missing commit records from snapshots. Nothing is ever deleted or overwritten.

    Unreadable commit records go to ``quarantine/commits/<partition>/<stamp>.json``, unreadable
    snapshots to ``quarantine/snapshots/`` (their version number is never reused); each moved file
    gets a ``.why.json`` beside it. Then every partition without a commit record that a readable
    snapshot lists (newest first) gets that snapshot's copy of its record back, by exclusive create,
    if every shard of it verifies; other such partitions are re-produced by the next producer run.
    The sweep keeps every attempt that a quarantined file may name until the file is deleted.
    """
    storage = cache.storage
    report = RepairReport(dry_run=dry_run)
    missing: set[str] = set()
    for partition_id in commit_record_names(storage):
        rel = commit_path(partition_id)
        try:
            data = storage.read_bytes(rel)
            read_commit(storage, partition_id, strict=True)
            continue
        except FileNotFoundError:
            continue
        except (CommitRecordError, CachePathError) as exc:
            report.reasons[rel] = str(exc)
            missing.add(partition_id)
            if dry_run:
                report.moved[rel] = f"{QUARANTINED_COMMITS_DIR}/{partition_id}/"
                continue
            moved = quarantine_commit(storage, partition_id, expected=data, reason=str(exc))
            if moved is not None:
                report.moved[rel] = moved
    snapshots: list[Snapshot] = []
    for version in snapshot_file_versions(storage):
        rel = snapshot_path(version)
        try:
            snapshots.append(read_snapshot(storage, version))
            continue
        except FileNotFoundError:
            continue
        except CacheError as exc:
            report.reasons[rel] = str(exc)
            report.moved[rel] = (
                f"{QUARANTINED_SNAPSHOTS_DIR}/" if dry_run else quarantine_snapshot(storage, version, reason=str(exc))
            )
    present = set(commit_record_names(storage)) - (missing if dry_run else set())
    for snapshot in reversed(snapshots):
        for record in snapshot.records:
            rel = commit_path(record.partition_id)
            if record.partition_id in present or rel in report.restored:
                continue
            try:
                for entry in record.shards:
                    Shard(storage, entry, snapshot.record_name(record)).verify()
            except (CacheError, CommitError, OSError, ValueError):
                continue  # verify reports it; the partition is re-produced
            if dry_run or storage.write_exclusive(rel, record.to_json()):
                report.restored[rel] = f"snapshot v{snapshot.version}"
    return report
