"""Paths in commit records and snapshots never send a reader outside the cache root.

A record or snapshot is JSON written by producers; a shard path (or a file of a shard, or a table)
that is absolute, climbs out with ``..`` or is a URL is refused with `CachePathError` naming the
record and the entry, when the record is parsed, before any file it names is opened. A shard
directory that is a symbolic link to somewhere outside the cache is refused when it is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from megatron_qwenimage.cache import CachePathError, open_cache, verify_cache
from megatron_qwenimage.cache.commit import read_commit
from megatron_qwenimage.cache.storage import CacheStorage, resolve_record_path
from megatron_qwenimage.cache.writer import read_quarantine
from megatron_qwenimage.data.reader import CacheReader, ReaderConfig
from tests.helpers.producers import run_cli
from tests.helpers.reader import B16, make_cache

RECORD = "commits/p0.json"
SNAPSHOT = "manifest/snapshots/v00000001.json"
STAGE = {"name": "s", "buckets": ["16x16"], "micro_batch": 2, "global_batch": 2}


@pytest.fixture
def cache(tmp_path) -> Path:
    """One partition ``p0`` with one 16x16 shard of 4 samples, and snapshot v1."""
    return Path(make_cache(tmp_path / "cache", partitions=1, per_bucket={B16: 4}))


@pytest.fixture
def outside(cache, tmp_path) -> Path:
    """A bit-exact copy of the cache's shard outside the cache root (checksums match)."""
    shard = cache / read_commit(CacheStorage(str(cache)), "p0").shards[0].path
    copy = tmp_path / "outside" / "16x16"
    shutil.copytree(shard, copy)
    return copy


@pytest.fixture
def opened(monkeypatch):
    """Every location any cache code joins (all reads go through `CacheStorage.path`)."""
    seen: list[str] = []
    join = CacheStorage.path

    def spy(self, relpath):
        full = join(self, relpath)
        seen.append(full)
        return full

    monkeypatch.setattr(CacheStorage, "path", spy)
    return seen


def _bad_path(kind: str, cache: Path, outside: Path) -> str:
    return {"absolute": str(outside), "dotdot": os.path.relpath(outside, cache), "url": f"file://{outside}"}[kind]


def _edit(path: Path, change) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _never_outside(seen: list[str], outside: Path) -> None:
    touched = [p for p in seen if os.path.normpath(p).startswith(str(outside.parent)) or "://" in p]
    assert not touched, touched


def _cli_verify(cache: Path, *args: str):
    proc = run_cli(["cache", "verify", str(cache), *args], dict(os.environ), timeout=120)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "url"])
def test_commit_record_with_outside_shard_path_is_refused(kind, cache, outside, opened):
    bad = _bad_path(kind, cache, outside)
    _edit(cache / RECORD, lambda d: d["shards"][0].update(path=bad))
    where = f"commit record {cache / RECORD}: shards[0].path = {bad!r}"

    with pytest.raises(CachePathError) as exc:
        open_cache(str(cache)).live(strict=True)
    assert where in str(exc.value) and "expected a relative POSIX path inside the cache root" in str(exc.value)
    assert open_cache(str(cache)).live().records == []  # not strict: skipped (a warning), never opened

    report = verify_cache(open_cache(str(cache)))
    assert not report.ok and list(report.bad_shards) == [RECORD] and where in report.bad_shards[RECORD]
    assert report.shards_checked == 1  # only snapshot v1's own copy of the shard, inside the cache
    _never_outside(opened, outside)

    rc, err = _cli_verify(cache)
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"BAD {RECORD}: ") and where in err[0], err


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "url"])
def test_snapshot_with_outside_shard_path_is_refused(kind, cache, outside, opened):
    bad = _bad_path(kind, cache, outside)
    _edit(cache / SNAPSHOT, lambda d: d["commits"][0]["shards"][0].update(path=bad))
    where = f"snapshot v1 ({cache / SNAPSHOT}) commits[0]: shards[0].path = {bad!r}"

    with pytest.raises(CachePathError) as exc:
        open_cache(str(cache)).snapshot()
    assert where in str(exc.value)

    with pytest.raises(CachePathError) as exc:
        CacheReader(ReaderConfig.from_dict({"caches": [{"path": str(cache)}], "stages": [STAGE]}), dp_rank=0, dp_size=1)
    assert where in str(exc.value)

    report = verify_cache(open_cache(str(cache)), pin=1)
    assert not report.ok and list(report.bad_shards) == [SNAPSHOT] and where in report.bad_shards[SNAPSHOT]
    _never_outside(opened, outside)

    rc, err = _cli_verify(cache, "--snapshot", "1")
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"BAD {SNAPSHOT}: ") and where in err[0], err


@pytest.mark.parametrize(
    "entry, change",
    [
        (
            "shards[0].files['../../../../../outside/16x16/samples.parquet']",
            lambda d: d["shards"][0]["files"].update(
                {"../../../../../outside/16x16/samples.parquet": d["shards"][0]["files"]["samples.parquet"]}
            ),
        ),
        ("tables.quarantine.path", lambda d: d["tables"]["quarantine"].update(path="/etc/passwd")),
    ],
)
def test_file_and_table_entries_are_checked_too(entry, change, cache, outside, opened):
    _edit(cache / RECORD, change)
    with pytest.raises(CachePathError, match=re.escape(f"commit record {cache / RECORD}: {entry} = ")):
        open_cache(str(cache)).live(strict=True)
    assert open_cache(str(cache)).live().records == []
    _never_outside(opened, outside)


def test_table_path_is_checked_at_the_join(cache, outside, opened):
    storage = open_cache(str(cache)).storage
    record = read_commit(storage, "p0")
    assert read_quarantine(storage, record).num_rows == 0  # the real table reads
    record.tables["quarantine"]["path"] = str(outside / "samples.parquet")  # changed after parsing
    with pytest.raises(CachePathError, match=r"commit record .*/commits/p0.json: tables.quarantine.path = '/"):
        read_quarantine(storage, record)
    _never_outside(opened, outside)


def _move_shard_behind_a_link(cache, target):
    """Move the first shard's directory to `target` and leave a symlink to it in its place (the
    records are unchanged: only the link decides where reads go)."""
    shard_dir = cache / open_cache(str(cache)).snapshot().shards[0].entry.path
    target.parent.mkdir()
    shutil.move(shard_dir, target)
    os.symlink(target, shard_dir)


def test_shard_directory_symlinked_outside_is_refused(cache, tmp_path):
    moved = tmp_path / "elsewhere" / "16x16"
    _move_shard_behind_a_link(cache, moved)

    shard = open_cache(str(cache)).snapshot().shards[0]
    for use in (shard.read_all, lambda: shard.read_sample(0), shard.verify):
        with pytest.raises(
            CachePathError,
            match=re.escape(f"shard {shard.shard_id} path = ")
            + ".* "
            + re.escape(f"resolves to {os.path.realpath(moved)} (a symbolic link), outside the cache root"),
        ):
            use()
    report = verify_cache(open_cache(str(cache)))
    assert list(report.bad_shards) == [shard.shard_id] and "symbolic link" in report.bad_shards[shard.shard_id]

    reader = CacheReader(
        ReaderConfig.from_dict({"caches": [{"path": str(cache)}], "stages": [STAGE], "prefetch_steps": 0}),
        dp_rank=0,
        dp_size=1,
    )
    with pytest.raises(CachePathError, match="symbolic link"):
        reader.next_global_step()
    reader.close()

    rc, err = _cli_verify(cache)
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"BAD {shard.shard_id}: ") and "symbolic link" in err[0]


def test_symlinks_inside_the_cache_are_fine_but_a_file_linked_outside_is_not(cache, tmp_path):
    inside = cache / "moved" / "16x16"
    _move_shard_behind_a_link(cache, inside)
    assert verify_cache(open_cache(str(cache))).ok

    samples = inside / "samples.parquet"
    copy = tmp_path / "samples.parquet"
    shutil.copy(samples, copy)
    samples.unlink()
    os.symlink(copy, samples)  # same bytes, so only the location is wrong
    report = verify_cache(open_cache(str(cache)))
    shard_id = open_cache(str(cache)).snapshot().shards[0].shard_id
    assert "file 'samples.parquet' = " in report.bad_shards[shard_id]
    assert "symbolic link" in report.bad_shards[shard_id]


@pytest.mark.parametrize(
    "relpath",
    [
        "/abs",
        "../x",
        "a/../../x",
        "file:///x",
        "s3://b/x",
        "file:/x",
        "s3:b",
        "a\\b",
        "C:/x",
        "c:x",
        "",
        "a//b",
        "./a",
        "a/.",
        "a/",
        "a\x00b",
        None,
    ],
)
def test_resolve_record_path_refuses(relpath, tmp_path):
    for root in (None, CacheStorage(str(tmp_path)), CacheStorage("memory://paths-test")):
        with pytest.raises(CachePathError, match=r"^R: E = .*; expected a relative POSIX path inside the cache root"):
            resolve_record_path(root, relpath, record="R", entry="E")
    for root in (None, CacheStorage(str(tmp_path)), CacheStorage("memory://paths-test")):
        assert resolve_record_path(root, "attempts/p/a/16x16", record="R", entry="E") == "attempts/p/a/16x16"
