"""Bad input to ``qwenimage cache {verify,snapshot,sweep,repair}``: one clear line, non-zero exit, nothing lost.

Every case runs the real command line (`megatron_qwenimage.cli.main`, in-process; two cases also in
a subprocess) on a small cache written with the producers' writer, and checks: the exit status;
stderr is ONE line, either ``qwenimage cache <action>: error: ...`` (bad input: exit 2) or, for
what ``verify`` finds wrong inside a cache, its report line ``BAD <what>: ...`` (exit 1); the line
names the input; the cache's files are byte for byte unchanged; and once the damage is undone the
cache verifies clean, so nothing was lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from megatron_qwenimage.cache import open_cache, verify_cache
from megatron_qwenimage.cache.commit import PartitionAttempt, read_commit
from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.cache.sweep import sweep_orphans
from megatron_qwenimage.cache.writer import publish_partition
from megatron_qwenimage.cli import main
from tests.helpers.producers import run_cli
from tests.helpers.reader import B16, make_cache, payload

SNAP1 = "manifest/snapshots/v00000001.json"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Partitions p0 and p1 (one 16x16 shard of 2 samples each) and snapshot v1."""
    return Path(make_cache(tmp_path_factory.mktemp("template") / "cache", partitions=2, per_bucket={B16: 2}))


@pytest.fixture
def cache(template, tmp_path) -> Path:
    path = tmp_path / "cache"
    shutil.copytree(template, path, symlinks=True)
    return path


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir', or the link target) of everything under `root`."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, err.strip().splitlines(), out


def replace(path: Path, data: bytes):
    """Overwrite `path` with `data`; returns the undo."""
    old = path.read_bytes()
    path.write_bytes(data)
    return lambda: path.write_bytes(old)


def edit_json(path: Path, change):
    d = json.loads(path.read_text())
    change(d)
    return replace(path, json.dumps(d).encode())


def remove(path: Path):
    """Move `path` aside (outside the cache); returns the undo."""
    aside = path.parent.parent / f".aside-{path.name}"
    shutil.move(path, aside)
    return lambda: shutil.move(aside, path)


def fresh_attempt(cache: Path):
    """An uncommitted attempt started a second ago (a live producer's): no sweep may delete it."""
    attempt = PartitionAttempt.start(CacheStorage(str(cache)), "p-live")
    return lambda: shutil.rmtree(cache / attempt.dir)


def old_attempt_of_p1(cache: Path):
    """Delete p1's commit record (a partial copy of the cache: snapshot v1 still lists p1) and age
    p1's attempt past any grace period (nothing in it written for ten days)."""
    record = read_commit(CacheStorage(str(cache)), "p1")
    attempt = cache / "attempts" / "p1" / record.attempt_id
    undo_info = edit_json(attempt / "attempt.json", lambda d: d.update(started_unix=time.time() - 10 * 86400))
    then = time.time() - 10 * 86400
    for path in [*attempt.rglob("*"), attempt]:
        os.utime(path, (then, then))
    undo_record = remove(cache / "commits" / "p1.json")
    return lambda: (undo_record(), undo_info())


def nothing(cache: Path):
    return lambda: None


# (id, setup(cache) -> undo, argv (CACHE / TARGET placeholders), exit status, line prefix, names)
CASES = [
    ("verify-missing-path", nothing, ["verify", "{cache}/nope"], 2, "error", ["{cache}/nope", "does not exist"]),
    ("verify-regular-file", nothing, ["verify", "{cache}/cache.json"], 2, "error", ["{cache}/cache.json", "is a file"]),
    (
        "snapshot-not-a-cache",
        nothing,
        ["snapshot", "{cache}/attempts"],
        2,
        "error",
        ["{cache}/attempts", "no cache.json"],
    ),
    ("sweep-missing-path", nothing, ["sweep", "{cache}/nope"], 2, "error", ["{cache}/nope"]),
    ("repair-regular-file", nothing, ["repair", "{cache}/cache.json"], 2, "error", ["{cache}/cache.json"]),
    (
        "verify-cache-json-not-json",
        lambda c: replace(c / "cache.json", b"{schema_version: 1"),
        ["verify", "{cache}"],
        2,
        "error",
        ["{cache}/cache.json", "not valid JSON"],
    ),
    (
        "sweep-cache-json-not-json",
        lambda c: replace(c / "cache.json", b"\xff\xfe"),
        ["sweep", "{cache}"],
        2,
        "error",
        ["{cache}/cache.json", "not valid JSON"],
    ),
    (
        "snapshot-cache-json-a-list",
        lambda c: replace(c / "cache.json", b"[1]"),
        ["snapshot", "{cache}"],
        2,
        "error",
        ["{cache}/cache.json", "a JSON list"],
    ),
    (
        "verify-cache-json-future-version",
        lambda c: edit_json(c / "cache.json", lambda d: d.update(schema_version=9)),
        ["verify", "{cache}"],
        2,
        "error",
        ["{cache}", "schema_version 9"],
    ),
    (
        "snapshot-cache-json-other-format",
        lambda c: edit_json(c / "cache.json", lambda d: d.update(format="tfrecord")),
        ["snapshot", "{cache}"],
        2,
        "error",
        ["{cache}/cache.json", "'tfrecord'"],
    ),
    (
        "verify-snapshot-99",
        nothing,
        ["verify", "{cache}", "--snapshot", "99"],
        2,
        "error",
        ["snapshot v99 does not exist", "{cache}/manifest/snapshots/v00000099.json"],
    ),
    (
        "verify-snapshot-not-a-number",
        nothing,
        ["verify", "{cache}", "--snapshot", "latest"],
        2,
        "error",
        ["--snapshot 'latest'"],
    ),
    ("verify-snapshot-zero", nothing, ["verify", "{cache}", "--snapshot", "0"], 2, "error", ["--snapshot '0'"]),
    ("sweep-negative-grace", fresh_attempt, ["sweep", "{cache}", "--grace", "-5"], 2, "error", ["--grace '-5'"]),
    ("sweep-nan-grace", fresh_attempt, ["sweep", "{cache}", "--grace", "nan"], 2, "error", ["--grace 'nan'"]),
    ("sweep-infinite-grace", fresh_attempt, ["sweep", "{cache}", "--grace", "inf"], 2, "error", ["--grace 'inf'"]),
    ("sweep-grace-not-a-number", fresh_attempt, ["sweep", "{cache}", "--grace", "1h"], 2, "error", ["--grace '1h'"]),
    (
        "sweep-snapshot-not-json",
        lambda c: replace(c / SNAP1, b'{"commits": [{"attempts/p0'),
        ["sweep", "{cache}", "--grace", "0"],
        2,
        "error",
        ["snapshot v1", f"{{cache}}/{SNAP1}", "no attempt was removed"],
    ),
    (
        "verify-record-not-json",
        lambda c: replace(c / "commits" / "p0.json", b'{"partition_id": "p0",'),
        ["verify", "{cache}"],
        1,
        "BAD commits/p0.json",
        ["{cache}/commits/p0.json", "not valid JSON"],
    ),
    (
        "verify-record-wrong-schema",
        lambda c: edit_json(c / "commits" / "p0.json", lambda d: d.update(shards="all")),
        ["verify", "{cache}"],
        1,
        "BAD commits/p0.json",
        ["{cache}/commits/p0.json", "shards is str"],
    ),
    (
        "verify-record-of-another-partition",
        lambda c: edit_json(c / "commits" / "p0.json", lambda d: d.update(partition_id="p7")),
        ["verify", "{cache}"],
        1,
        "BAD commits/p0.json",
        ["{cache}/commits/p0.json", "names partition 'p7'"],
    ),
    (
        "verify-record-negative-bool-count",
        lambda c: edit_json(c / "commits" / "p0.json", lambda d: d["shards"][0].update(num_samples=True)),
        ["verify", "{cache}"],
        1,
        "BAD commits/p0.json",
        ["{cache}/commits/p0.json", "num_samples is bool"],
    ),
    (
        "verify-snapshot-not-json",
        lambda c: replace(c / SNAP1, b"not json"),
        ["verify", "{cache}"],
        1,
        f"BAD {SNAP1}",
        ["snapshot v1", f"{{cache}}/{SNAP1}", "not valid JSON"],
    ),
    (
        "verify-pinned-snapshot-not-json",
        lambda c: replace(c / SNAP1, b"[]"),
        ["verify", "{cache}", "--snapshot", "1"],
        1,
        f"BAD {SNAP1}",
        ["snapshot v1", "a JSON list"],
    ),
    (
        "verify-snapshot-wrong-version",
        lambda c: edit_json(c / SNAP1, lambda d: d.update(version=3)),
        ["verify", "{cache}"],
        1,
        f"BAD {SNAP1}",
        ["snapshot v1", "says version 3"],
    ),
    (
        "verify-commits-incomplete",
        lambda c: remove(c / "commits" / "p1.json"),
        ["verify", "{cache}"],
        1,
        f"BAD {SNAP1}:p1-16x16",
        ["snapshot v1", "p1-16x16", "{cache}/commits/p1.json", "does not exist"],
    ),
    (
        "snapshot-unreadable-record",  # v1 holds p0's good shards: a v2 without them must not appear
        lambda c: replace(c / "commits" / "p0.json", b'{"partition_id": "p0", "truncated'),
        ["snapshot", "{cache}"],
        2,
        "error",
        ["1 commit record(s) cannot be read", "{cache}/commits/p0.json", "qwenimage cache repair {cache}"],
    ),
    (
        "verify-pinned-commits-incomplete",
        lambda c: remove(c / "commits" / "p0.json"),
        ["verify", "{cache}", "--snapshot", "1"],
        1,
        f"BAD {SNAP1}:p0-16x16",
        ["snapshot v1", "p0-16x16"],
    ),
]


@pytest.mark.parametrize("setup, argv, status, prefix, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(setup, argv, status, prefix, names, cache, capsys):
    undo = setup(cache)
    before = tree(cache)
    argv = ["cache"] + [a.format(cache=cache) for a in argv]

    rc, err, _ = cli(argv, capsys)

    assert rc == status, err
    assert len(err) == 1, err
    expected_prefix = f"qwenimage cache {argv[1]}: error: " if prefix == "error" else f"{prefix}: "
    assert err[0].startswith(expected_prefix), err
    for name in names:
        assert name.format(cache=cache) in err[0], (name, err[0])
    assert tree(cache) == before  # nothing written, moved or deleted
    undo()
    rc, err, _ = cli(["cache", "verify", str(cache)], capsys)
    assert rc == 0 and err == [], err
    assert verify_cache(open_cache(str(cache))).shards_checked == 2


@pytest.mark.parametrize(
    "argv, status", [(["verify", "{cache}/nope", "--json"], 2), (["verify", "{cache}", "--json"], 1)]
)
def test_verify_json_reports_failures_as_one_object(argv, status, cache, capsys):
    remove(cache / "commits" / "p1.json")
    rc, err, out = cli(["cache"] + [a.format(cache=cache) for a in argv], capsys)
    assert rc == status and len(err) == 1
    (line,) = out.strip().splitlines()
    obj = json.loads(line)
    if status == 2:
        assert obj["command"] == "cache verify" and f"{cache}/nope" in obj["error"]
    else:
        assert obj["ok"] is False and list(obj["bad_shards"]) == [f"{SNAP1}:p1-16x16"]
        assert obj["snapshots_checked"] == [1] and obj["commit_records"] == 1


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["cache", "verify", "{cache}", "--snapshot", "99"],
            "qwenimage cache verify: error: cache {cache}: snapshot v99",
        ),
        (["cache", "sweep", "{cache}", "--grace", "-1"], "qwenimage cache sweep: error: --grace '-1'"),
    ],
)
def test_real_command_line_prints_one_line(argv, line, cache):
    before = tree(cache)
    proc = run_cli([a.format(cache=cache) for a in argv], dict(os.environ), timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(line.format(cache=cache)), proc.stderr
    assert tree(cache) == before


def test_sweep_keeps_what_a_snapshot_names_when_commits_are_incomplete(cache, capsys):
    """p1's record is gone (partial copy) and its attempt is days old: snapshot v1 still names it."""
    old_attempt_of_p1(cache)
    (cache / "attempts" / "p-dead" / "a0").mkdir(parents=True)  # a real orphan, named by nothing
    before = tree(cache)
    rc, err, out = cli(["cache", "sweep", str(cache), "--grace", "0"], capsys)
    assert rc == 0 and err == [], err
    assert "removed 1 orphaned attempts" in out and "kept 1 named by a snapshot" in out
    assert tree(cache) == {k: v for k, v in before.items() if not k.startswith("attempts/p-dead")}
    # verify does not call that cache good, and names the snapshot and the shard
    rc, err, out = cli(["cache", "verify", str(cache)], capsys)
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"BAD {SNAP1}:p1-16x16: snapshot v1"), err
    assert "2 shards checked, 1 bad" in out
    # repair restores the record from the snapshot's copy (the shard verifies): clean again
    rc, err, out = cli(["cache", "repair", str(cache)], capsys)
    assert rc == 0 and "restored commits/p1.json from snapshot v1" in out
    assert verify_cache(open_cache(str(cache))).ok


def test_sweep_keeps_losing_attempts_a_snapshot_names(cache):
    """A snapshot naming another attempt of a committed partition than its record: never swept."""
    storage = CacheStorage(str(cache))
    winner = read_commit(storage, "p0").attempt_id
    snap = json.loads((cache / SNAP1).read_text())
    other = "0123456789abcdef"
    shutil.copytree(cache / "attempts" / "p0" / winner, cache / "attempts" / "p0" / other)
    snap["commits"][0]["attempt_id"] = other
    for shard in snap["commits"][0]["shards"]:
        shard["path"] = shard["path"].replace(winner, other)
    (cache / SNAP1).write_text(json.dumps(snap))
    report = sweep_orphans(storage, grace_s=0)
    assert report.removed_attempts == [] and report.kept_referenced == [f"attempts/p0/{other}"]
    bad = verify_cache(open_cache(str(cache))).bad_shards
    assert list(bad) == [f"{SNAP1}:p0-16x16"] and f"as attempt {other}" in bad[f"{SNAP1}:p0-16x16"]


def test_sweep_orphans_refuses_a_bad_grace_before_deleting(cache):
    attempt = PartitionAttempt.start(CacheStorage(str(cache)), "p-live")
    for grace in (-1.0, float("nan"), float("inf"), "soon", True):
        with pytest.raises(Exception, match=r"grace_s = .*expected a finite number of seconds >= 0"):
            sweep_orphans(CacheStorage(str(cache)), grace_s=grace)
    assert (cache / attempt.dir / "attempt.json").exists()


def test_unreadable_record_is_skipped_kept_repaired_and_reproduced(cache, capsys):
    """A record with invalid JSON: snapshot skips it with a warning, sweep keeps its attempt,
    verify reports it, repair --dry-run moves nothing, repair quarantines it and restores the
    record from snapshot v1, and a partition without a snapshot copy is re-produced by a producer."""
    storage = CacheStorage(str(cache))
    p0_attempt = read_commit(storage, "p0").attempt_id
    bad_bytes = b'{"partition_id": "p0", "truncated'
    (cache / "commits" / "p0.json").write_bytes(bad_bytes)
    # p2: committed after the last snapshot, then its record is damaged too (no snapshot copy)
    assert publish_partition(storage, "p2", inputs=2, shards=[payload(B16, 2, prefix="p2", seed=5)]).won
    p2_attempt = read_commit(storage, "p2").attempt_id
    (cache / "commits" / "p2.json").write_bytes(b"[]")

    rc, err, out = cli(["cache", "snapshot", str(cache)], capsys)  # v2 would lose p0 (v1 holds it) and p2
    assert rc == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("qwenimage cache snapshot: error: ") and f"qwenimage cache repair {cache}" in err[0]
    assert f"{cache}/commits/p0.json, {cache}/commits/p2.json" in err[0]
    assert open_cache(str(cache)).snapshot_versions() == [1]

    rc, err, out = cli(["cache", "sweep", str(cache), "--grace", "0"], capsys)
    assert (
        rc == 0
        and (cache / "attempts" / "p0" / p0_attempt).is_dir()
        and (cache / "attempts" / "p2" / p2_attempt).is_dir()
    )

    rc, err, _ = cli(["cache", "verify", str(cache)], capsys)
    assert rc == 1 and sorted(e.split(":")[0] for e in err) == ["BAD commits/p0.json", "BAD commits/p2.json"], err

    before = tree(cache)
    rc, err, out = cli(["cache", "repair", str(cache), "--dry-run"], capsys)
    assert rc == 0 and "would move commits/p0.json -> quarantine/commits/p0/" in out
    assert "would restore commits/p0.json from snapshot v1" in out and tree(cache) == before

    rc, err, out = cli(["cache", "repair", str(cache)], capsys)
    assert rc == 0 and "restored commits/p0.json from snapshot v1" in out, out
    (moved_p0,) = (cache / "quarantine" / "commits" / "p0").glob("*[0-9a-f].json")
    assert moved_p0.read_bytes() == bad_bytes  # kept byte for byte, with a note why
    assert json.loads(moved_p0.with_suffix(".why.json").read_text())["from"] == "commits/p0.json"
    assert not (cache / "commits" / "p2.json").exists() and (cache / "attempts" / "p2" / p2_attempt).is_dir()
    assert read_commit(storage, "p0", strict=True).attempt_id == p0_attempt

    # the sweep keeps the attempt a quarantined record may name; a producer re-produces p2
    sweep_orphans(storage, grace_s=0)
    assert (cache / "attempts" / "p2" / p2_attempt).is_dir()
    assert publish_partition(storage, "p2", inputs=2, shards=[payload(B16, 2, prefix="p2", seed=5)]).won
    report = verify_cache(open_cache(str(cache)))
    assert report.ok, report.bad_shards
    assert cli(["cache", "repair", str(cache)], capsys)[2].startswith("nothing to repair")
    rc, err, out = cli(["cache", "snapshot", str(cache)], capsys)  # every record readable again
    assert rc == 0 and err == [] and out.startswith("snapshot v2: 3 shards"), (err, out)


def test_producer_commit_moves_an_unreadable_record_aside(cache):
    """Re-producing a partition whose record is unreadable: the bad record goes to quarantine, the
    new attempt commits, the old attempt stays."""
    storage = CacheStorage(str(cache))
    old = read_commit(storage, "p1").attempt_id
    (cache / "commits" / "p1.json").write_text('{"schema_version": 1}')
    assert read_commit(storage, "p1") is None  # not committed, with a warning
    result = publish_partition(storage, "p1", inputs=2, shards=[payload(B16, 2, prefix="p1x", seed=9)])
    assert result.won and read_commit(storage, "p1", strict=True).attempt_id == result.record.attempt_id
    (moved,) = (cache / "quarantine" / "commits" / "p1").glob("*[0-9a-f].json")
    assert moved.read_text() == '{"schema_version": 1}'
    sweep_orphans(storage, grace_s=0)
    assert (cache / "attempts" / "p1" / old).is_dir()
    assert verify_cache(open_cache(str(cache))).ok  # snapshot v1's copy of p1 is excused and verifies


def test_snapshot_command_writes_past_an_unreadable_newest_snapshot(cache, capsys):
    (cache / SNAP1).write_bytes(b"{")
    rc, err, out = cli(["cache", "snapshot", str(cache)], capsys)
    assert rc == 0 and out.startswith("snapshot v2: 2 shards")
    assert len(err) == 1 and err[0].startswith("qwenimage cache snapshot: warning: ") and "snapshot v1" in err[0]
    assert (cache / SNAP1).read_bytes() == b"{"
    rc, err, out = cli(["cache", "repair", str(cache)], capsys)
    assert rc == 0 and f"moved {SNAP1} -> quarantine/snapshots/v00000001." in out
    rc, err, _ = cli(["cache", "verify", str(cache), "--snapshot", "1"], capsys)
    assert rc == 2 and "moved it to" in err[0] and "quarantine/snapshots/v00000001." in err[0]
    assert open_cache(str(cache)).create_snapshot().version == 2  # v1's number is not reused
