"""``qwenimage cache {verify,snapshot,sweep,repair}``: operations on a latent cache (see docs/cache_format.md).

Bad input (a path that is no cache, a bad flag, a snapshot that does not exist) raises a
`UserError` naming it: the command line prints one line and exits 2. What ``verify`` finds wrong
*inside* a cache is its report: ``BAD <what>: <why>`` lines on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys

from megatron_qwenimage.errors import UserError

#: The logger of the cache code (warnings about skipped records, unreadable snapshots).
_CACHE_LOGGER = "megatron_qwenimage.cache"


class CacheFlagError(UserError):
    """A flag of a ``qwenimage cache`` command has a bad value; the message names the flag."""


def register(subparsers) -> None:
    c = subparsers.add_parser(
        "cache",
        help="inspect a latent cache (verify, snapshot, sweep, repair)",
        description="Operations on a latent cache written by `qwenimage produce`.",
    )
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    v = csub.add_parser(
        "verify",
        help="re-hash every committed shard, check snapshots, print counts per bucket",
        description="Check every committed shard against the checksums in its commit record and "
        "every snapshot against the commit records; exit 1 if anything is bad.",
    )
    v.add_argument("cache", metavar="CACHE", help="cache directory or fsspec URL")
    v.add_argument(
        "--snapshot",
        metavar="N",
        default=None,
        help="verify this pinned snapshot version (an integer >= 1) instead of everything committed",
    )
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=run_verify)
    s = csub.add_parser(
        "snapshot",
        help="store a new manifest snapshot of everything committed",
        description="Write manifest/snapshots/vN.json listing all committed shards (no-op if "
        "unchanged). A commit record that cannot be read is refused, naming it, and nothing is written: "
        "run `qwenimage cache repair` first.",
    )
    s.add_argument("cache", metavar="CACHE", help="cache directory or fsspec URL")
    s.set_defaults(func=run_snapshot)
    w = csub.add_parser(
        "sweep",
        help="delete orphaned attempt files",
        description="Remove attempt directories that can never be committed; never one that a "
        "commit record or snapshot names.",
    )
    w.add_argument("cache", metavar="CACHE", help="cache directory or fsspec URL")
    w.add_argument(
        "--grace",
        metavar="SECONDS",
        default="3600",
        help="only uncommitted attempts idle this many seconds (nothing inside written since), a number >= 0 "
        "(default 3600)",
    )
    w.set_defaults(func=run_sweep)
    r = csub.add_parser(
        "repair",
        help="move unreadable commit records and snapshots to quarantine/",
        description="Move every commit record and snapshot that cannot be read into the cache's "
        "quarantine/ folder (nothing is deleted), so that later runs are clean; the "
        "partitions of quarantined records are re-produced by the next producer run.",
    )
    r.add_argument("cache", metavar="CACHE", help="cache directory or fsspec URL")
    r.add_argument("--dry-run", action="store_true", help="only list what would be moved")
    r.set_defaults(func=run_repair)


@contextlib.contextmanager
def _warnings_as_lines(action: str):
    """Warnings of the cache code as ``qwenimage cache <action>: warning: ...`` lines on stderr."""
    logger = logging.getLogger(_CACHE_LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"qwenimage cache {action}: warning: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _snapshot_flag(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        version = int(value)
    except ValueError:
        version = 0
    if version < 1:
        raise CacheFlagError(f"--snapshot {value!r}: expected a snapshot version, an integer >= 1")
    return version


def _grace_flag(value: str) -> float:
    try:
        grace = float(value)
    except ValueError:
        grace = math.nan
    if not math.isfinite(grace) or grace < 0:
        raise CacheFlagError(
            f"--grace {value!r}: expected a finite number of seconds >= 0 (uncommitted attempts "
            "written to more recently than this may belong to a live producer and are kept)"
        )
    return grace


def run_verify(args) -> int:
    from megatron_qwenimage.cache import open_cache, verify_cache

    pin = _snapshot_flag(args.snapshot)
    with _warnings_as_lines("verify"):
        report = verify_cache(open_cache(args.cache), pin=pin)
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        for bucket, n in sorted(report.buckets.items()):
            print(f"{bucket:>12}  {n} samples")
        print(
            f"{report.shards_checked} shards checked, {len(report.bad_shards)} bad; {report.inputs} inputs: "
            f"{report.committed} committed, {report.duplicates} duplicates, {sum(report.quarantined.values())} quarantined"
        )
        versions = report.snapshots_checked
        checked = (
            "no snapshot"
            if not versions
            else f"snapshot v{versions[0]}"
            if len(versions) == 1
            else f"{len(versions)} snapshots (v{versions[0]}..v{versions[-1]})"
        )
        print(f"{checked} checked against {report.commit_records} commit records")
    for what, err in report.bad_shards.items():
        print(f"BAD {what}: {' '.join(err.split())}", file=sys.stderr)
    return 0 if report.ok else 1


def run_snapshot(args) -> int:
    from megatron_qwenimage.cache import open_cache

    with _warnings_as_lines("snapshot"):
        snap = open_cache(args.cache).create_snapshot()
    print(f"snapshot v{snap.version}: {len(snap.shards)} shards, {snap.num_samples} samples")
    return 0


def run_sweep(args) -> int:
    from megatron_qwenimage.cache import open_cache
    from megatron_qwenimage.cache.sweep import sweep_orphans

    grace = _grace_flag(args.grace)
    with _warnings_as_lines("sweep"):
        cache = open_cache(args.cache)
        report = sweep_orphans(cache.storage, grace_s=grace, strict=True)
        for warning in report.warnings:
            logging.getLogger(_CACHE_LOGGER).warning("%s", warning)
    print(
        f"removed {len(report.removed_attempts)} orphaned attempts, kept {len(report.kept_in_flight)} in flight, "
        f"kept {len(report.kept_referenced)} named by a snapshot or an unreadable/quarantined record"
    )
    return 0


def run_repair(args) -> int:
    from megatron_qwenimage.cache import open_cache
    from megatron_qwenimage.cache.verify import repair_cache

    with _warnings_as_lines("repair"):
        report = repair_cache(open_cache(args.cache), dry_run=args.dry_run)
    verb, restore = ("would move", "would restore") if report.dry_run else ("moved", "restored")
    for src, dst in report.moved.items():
        print(f"{verb} {src} -> {dst}: {' '.join(report.reasons[src].split())}")
    for rel, source in report.restored.items():
        print(f"{restore} {rel} from {source}")
    if report.moved or report.restored:
        print(
            f"{verb} {len(report.moved)} unreadable files to quarantine/, {restore} {len(report.restored)} commit "
            "records from snapshots (nothing deleted)"
            + ("; run without --dry-run to do it" if report.dry_run else "; the next producer run re-produces the rest")
        )
    else:
        print("nothing to repair: every commit record and snapshot is readable and complete")
    return 0
