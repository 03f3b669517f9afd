"""``qwenimage cache {verify,snapshot,sweep}``: operations on a latent cache (see docs/cache_format.md)."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    c = subparsers.add_parser("cache", help="inspect a latent cache (verify, snapshot, sweep)",
                              description="Operations on a latent cache written by `qwenimage produce`.")
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    v = csub.add_parser("verify", help="re-hash every committed shard and print counts per bucket",
                        description="Check every committed shard against the checksums in its commit record.")
    v.add_argument("cache", metavar="CACHE", help="cache directory or fsspec URL")
    v.add_argument("--snapshot", type=int, default=None, help="verify this pinned snapshot version instead of everything committed")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=run_verify)
    s = csub.add_parser("snapshot", help="store a new manifest snapshot of everything committed",
                        description="Write manifest/snapshots/vN.json listing all committed shards (no-op if unchanged).")
    s.add_argument("cache", metavar="CACHE", help="cache directory or fsspec URL")
    s.set_defaults(func=run_snapshot)
    w = csub.add_parser("sweep", help="delete orphaned attempt files", description="Remove attempt directories that can never be committed.")
    w.add_argument("cache", metavar="CACHE", help="cache directory or fsspec URL")
    w.add_argument("--grace", type=float, default=3600.0, help="only uncommitted attempts older than this many seconds (default 3600)")
    w.set_defaults(func=run_sweep)



def run_verify(args) -> int:
    from megatron_qwenimage.data import open_cache, verify_cache

    report = verify_cache(open_cache(args.cache), pin=args.snapshot)
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        for bucket, n in sorted(report.buckets.items()):
            print(f"{bucket:>12}  {n} samples")
        print(f"{report.shards_checked} shards checked, {len(report.bad_shards)} bad; {report.inputs} inputs: "
              f"{report.committed} committed, {report.duplicates} duplicates, {sum(report.quarantined.values())} quarantined")
        for shard_id, err in report.bad_shards.items():
            print(f"BAD {shard_id}: {err}", file=sys.stderr)
    return 0 if report.ok else 1


def run_snapshot(args) -> int:
    from megatron_qwenimage.data import open_cache

    snap = open_cache(args.cache).create_snapshot()
    print(f"snapshot v{snap.version}: {len(snap.shards)} shards, {snap.num_samples} samples")
    return 0


def run_sweep(args) -> int:
    from megatron_qwenimage.data import open_cache
    from megatron_qwenimage.data.commit import sweep_orphans

    report = sweep_orphans(open_cache(args.cache).storage, grace_s=args.grace)
    print(f"removed {len(report.removed_attempts)} orphaned attempts, kept {len(report.kept_in_flight)} in flight")
    return 0
