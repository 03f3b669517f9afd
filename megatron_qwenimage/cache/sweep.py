"""The orphan sweep: delete attempt directories that can never become visible.

An attempt that lost its partition's commit, or died before committing, leaves its directory under
``attempts/`` (`megatron_qwenimage.cache.commit`). `sweep_orphans` removes those that no commit
record and no snapshot (`megatron_qwenimage.cache.manifest`) can ever name, leaving anything a live
producer may still write. It sits above both modules: it reads commit records and snapshots.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import time
from dataclasses import dataclass, field

from megatron_qwenimage.cache.commit import (
    ATTEMPT_INFO_FILE,
    ATTEMPTS_DIR,
    COMMITS_DIR,
    QUARANTINED_COMMITS_DIR,
    CommitRecordError,
    attempt_dirs_in_text,
    commit_path,
    commit_record_names,
    quarantined_commit_partitions,
    read_commit,
    referenced_attempt_dirs,
    warn_unreadable_commit,
)
from megatron_qwenimage.cache.manifest import snapshot_references
from megatron_qwenimage.cache.storage import CacheError, CachePathError, CacheStorage

log = logging.getLogger(__name__)

#: Orphans active (written to) within this many seconds are left alone by default: they may belong to
#: a live producer.
DEFAULT_SWEEP_GRACE_S = 3600.0


class SweepError(CacheError):
    """`sweep_orphans` cannot decide what is safe to delete (a bad argument, an unreadable snapshot)."""


@dataclass
class SweepReport:
    """What `sweep_orphans` removed and kept (cache-relative attempt directories).

    `kept_in_flight`: uncommitted attempts active within the grace period; `kept_referenced`: idle or
    losing attempts that a snapshot or quarantined record still names (or that belong to a partition
    with an unreadable commit record), so they are kept; `warnings`: why some were kept.
    """

    removed_attempts: list[str]
    kept_in_flight: list[str]
    kept_referenced: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_grace(grace_s: object, what: str = "sweep grace_s") -> float:
    """`grace_s` as a float; `SweepError` naming `what` unless it is a finite number >= 0."""
    try:
        value = float(grace_s)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(grace_s, bool) or not math.isfinite(value) or value < 0:
        raise SweepError(
            f"{what} = {grace_s!r}: expected a finite number of seconds >= 0 (an uncommitted "
            "attempt written to more recently than this may belong to a live producer and is kept)"
        )
    return value


def _is_referenced(refs: set[tuple[str, ...]], partition_id: str, attempt_id: str) -> bool:
    return any(ref == (partition_id, attempt_id)[: len(ref)] for ref in refs)


def sweep_orphans(
    storage: CacheStorage, grace_s: float = DEFAULT_SWEEP_GRACE_S, now: float | None = None, *, strict: bool = False
) -> SweepReport:
    """Delete attempt directories that can never become visible.

    * attempts of a committed partition other than the winner: removed at once (they can
      no longer commit);
    * attempts of an uncommitted partition: removed once idle for `grace_s` seconds, judged by
      the newest modification time of anything inside the attempt (a dead attempt); one written
      to more recently may belong to a live producer, however long ago it started, and is kept.
    * stray temporary files of the exclusive create in ``commits/`` older than `grace_s`.

    Never removed, whatever their age: an attempt that any commit record or any snapshot
    (``manifest/snapshots/v*.json``) names, and every attempt of a partition whose commit record
    is unreadable or that has a record in ``quarantine/commits/`` (what such a record names is not
    known for sure). A snapshot that cannot be read might name any attempt: with `strict` that
    raises `SweepError` before anything is deleted; otherwise no attempt is removed (a warning).

    Raises:
        SweepError: `grace_s` is negative or not finite (before anything is deleted).
    """
    grace_s = check_grace(grace_s)

    now = time.time() if now is None else now
    removed, kept, kept_referenced, warnings = [], [], [], []
    refs, unreadable_snapshots = snapshot_references(storage)
    keep_all = bool(unreadable_snapshots)
    if unreadable_snapshots:
        message = (
            f"cannot tell which attempts snapshot {unreadable_snapshots[0]} names, so no attempt was "
            "removed; `qwenimage cache verify` says what is wrong with it, `qwenimage cache repair` "
            "moves an unreadable snapshot to quarantine/snapshots/"
        )
        if strict:
            raise SweepError(f"sweep of cache {storage.url}: {message}")
        warnings.append(message)
        log.warning("%s", message)
    guarded: set[str] = set(quarantined_commit_partitions(storage))
    for partition_id in commit_record_names(storage):
        try:
            refs |= referenced_attempt_dirs([read_commit(storage, partition_id, strict=True)])
        except FileNotFoundError:
            continue
        except (CommitRecordError, CachePathError) as exc:
            guarded.add(partition_id)
            warn_unreadable_commit(storage, commit_path(partition_id), exc)
            try:
                refs |= attempt_dirs_in_text(storage.read_bytes(commit_path(partition_id)))
            except FileNotFoundError:
                pass
    for partition_id in sorted(guarded):
        for name in storage.listdir(f"{QUARANTINED_COMMITS_DIR}/{partition_id}"):
            refs |= attempt_dirs_in_text(storage.read_bytes(f"{QUARANTINED_COMMITS_DIR}/{partition_id}/{name}"))
    for partition_id in storage.listdir(ATTEMPTS_DIR):
        record = read_commit(storage, partition_id)  # fresh: a producer may have committed meanwhile
        for attempt_id in storage.listdir(f"{ATTEMPTS_DIR}/{partition_id}"):
            rel = f"{ATTEMPTS_DIR}/{partition_id}/{attempt_id}"
            if record is not None and attempt_id == record.attempt_id:
                continue
            if keep_all or partition_id in guarded or _is_referenced(refs, partition_id, attempt_id):
                kept_referenced.append(rel)
                continue
            if (record is not None or now - _attempt_last_active(storage, rel) >= grace_s) and _remove_unless_written(
                storage, rel
            ):
                removed.append(rel)
            else:
                kept.append(rel)
        if not storage.listdir(f"{ATTEMPTS_DIR}/{partition_id}"):
            _remove_unless_written(storage, f"{ATTEMPTS_DIR}/{partition_id}")
    if guarded:
        warnings.append(
            f"kept every attempt of partitions {sorted(guarded)}: their commit record is unreadable "
            f"or quarantined ({QUARANTINED_COMMITS_DIR}/)"
        )
    for name in storage.listdir(COMMITS_DIR):
        if ".tmp-" in name:
            rel = f"{COMMITS_DIR}/{name}"
            if now - storage.fs.modified(storage.path(rel)).timestamp() >= grace_s:
                storage.remove(rel)
                removed.append(rel)
    return SweepReport(removed, kept, kept_referenced, warnings)


def _remove_unless_written(storage: CacheStorage, rel: str) -> bool:
    """Remove the directory `rel`; False, leaving the rest of it, when something was written into
    it while it was being removed (``ENOTEMPTY`` / ``EEXIST`` from the final ``rmdir``).

    A losing attempt of a committed partition is removed at once, but its producer may still be
    writing into it (it learns that it lost only when it tries to commit): the sweep must not fail
    its own producer for that. What is left is swept by a later sweep.
    """
    try:
        storage.remove(rel)
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        log.info("sweep: %s changed while being removed (still being written); a later sweep removes it", rel)
        return False


def _attempt_last_active(storage: CacheStorage, attempt_dir: str) -> float:
    """When an attempt was last active (seconds since the epoch): the newest modification time of
    its directory or of anything inside it, so a slow attempt that still writes is live however
    long ago it started. Where the filesystem reports no times, its ``attempt.json`` start time;
    0.0 (long dead) when neither is known."""
    newest = storage.newest_modified(attempt_dir)
    if newest is not None:
        return newest
    try:
        return float(json.loads(storage.read_bytes(f"{attempt_dir}/{ATTEMPT_INFO_FILE}"))["started_unix"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0.0
