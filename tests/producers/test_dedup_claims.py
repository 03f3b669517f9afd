"""Content-hash dedup: an input is a duplicate only of a COMMITTED sample (no Ray, no encoders).

Partitions go through the producer's own code path (`prepare_partition` -> encoded rows ->
`write_partition`); the encoders are replaced by zero latents/embeddings of the right shapes,
which dedup does not look at. A partition that "dies" is prepared (its claims written) and
never written.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_qwenimage.cache.commit import list_commits, read_commit
from megatron_qwenimage.cache.shard_format import read_samples
from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.cache.writer import read_duplicates, read_quarantine
from producers.config import FaultConfig, ProducerConfig, buckets_for_area
from producers.items import InputItem
from producers.partition_writer import write_partition
from producers.stages import prepare_partition

ENC = "test-encoders"
CFG = ProducerConfig(buckets={"64": buckets_for_area(64)}, min_side_px=8)
COLORS = {"A": (200, 30, 30), "B": (30, 200, 30), "C": (30, 30, 200), "D": (120, 120, 0)}


@pytest.fixture
def world(tmp_path):
    """Image files (one per content letter, plus byte-identical copies) and an empty cache."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for letter, color in COLORS.items():
        Image.new("RGB", (80, 64), color).save(img_dir / f"{letter}.png")
    return img_dir, str(tmp_path / "cache")


def item(img_dir: Path, input_id: str, letter: str) -> InputItem:
    """Input `input_id` with content `letter` (image bytes and caption): same letter, same content hash."""
    copy = img_dir / f"{input_id}.png"
    copy.write_bytes((img_dir / f"{letter}.png").read_bytes())
    return InputItem(input_id, str(copy), caption=f"a picture of {letter}")


def prepare(cache: str, pid: str, items: list[InputItem]) -> list[dict]:
    row = {"partition_id": pid, "items_json": json.dumps([it.to_dict() for it in items])}
    return prepare_partition(row, cache_url=cache, config=CFG, encoder_version=ENC)


def fake_encode(rows: list[dict], reject_caption: tuple[str, ...] = ()) -> list[dict]:
    """What VaeStage + TextStage do to the rows, with zero tensors (TextStage's rejection of
    an overlong caption for the inputs in `reject_caption`)."""
    for r in rows:
        if r["kind"] != "encode":
            continue
        if r["input_id"] in reject_caption:
            r.update(kind="quarantine", reason="caption_too_long", detail=f"{r['source_uri']}: caption too long")
            continue
        h, w = int(r["bucket_h"]) // 8, int(r["bucket_w"]) // 8
        r.update(
            latents=np.zeros((16, h, w), np.uint16).tobytes(),
            latent_c=16,
            pixels=b"",
            text=np.zeros((3, 8), np.uint16).tobytes(),
            text_len=3,
            text_dim=8,
            text_truncated=False,
        )
    return rows


def write(cache: str, pid: str, rows: list[dict]):
    return write_partition(cache, pid, rows, encoder_version=ENC, run_id="test", fault=FaultConfig())


def produce_partition(cache: str, pid: str, items: list[InputItem], **kw):
    return write(cache, pid, fake_encode(prepare(cache, pid, items), **kw))


def audit(cache: str, inputs: dict[str, str]) -> dict[str, tuple]:
    """Check the invariant over every commit record; returns input id -> how it ended.

    `inputs`: input id -> content letter, for every input that belongs to a committed partition.
    Every input ends exactly once as ("committed", partition), ("quarantined", reason) or
    ("duplicate", partition) where that partition is committed and its shards hold the content;
    each record adds up; every committed content hash is in exactly one committed sample.
    """
    storage = CacheStorage(cache)
    held: dict[str, set[str]] = {}
    ended: dict[str, tuple] = {}
    sample_hashes: Counter = Counter()
    dup_rows = []
    for rec in list_commits(storage):
        assert rec.committed + rec.duplicates + sum(rec.quarantined.values()) == rec.inputs
        held[rec.partition_id] = set()
        for shard in rec.shards:
            table = read_samples(storage, shard.path)
            for sid, uri in zip(table.column("sample_id").to_pylist(), table.column("source_uri").to_pylist()):
                input_id = Path(uri).stem
                assert input_id not in ended, f"{input_id} ended twice"
                ended[input_id] = ("committed", rec.partition_id)
                held[rec.partition_id].add(sid)
                sample_hashes[sid] += 1
        for row in read_quarantine(storage, rec).to_pylist():
            assert row["input_id"] not in ended, f"{row['input_id']} ended twice"
            ended[row["input_id"]] = ("quarantined", row["reason"])
        for row in read_duplicates(storage, rec).to_pylist():
            assert row["input_id"] not in ended, f"{row['input_id']} ended twice"
            ended[row["input_id"]] = ("duplicate", row["duplicate_of"])
            dup_rows.append(row)
    for row in dup_rows:
        owner = row["duplicate_of"]
        assert owner in held, f"{row['input_id']} is a duplicate of {owner}, which is not committed"
        assert row["content_hash"] in held[owner], (
            f"{row['input_id']} is a duplicate of {owner}, whose committed samples do not hold its content"
        )
    assert set(ended) == set(inputs), f"inputs not accounted for: {set(inputs) - set(ended)}"
    twice = [h for h, n in sample_hashes.items() if n > 1]
    assert not twice, f"content committed more than once: {twice}"
    committed_letters = Counter(inputs[i] for i, e in ended.items() if e[0] == "committed")
    assert all(n == 1 for n in committed_letters.values()), committed_letters
    return ended


def test_claimer_dies_then_another_partitioning_commits_the_content_once(world):
    img, cache = world
    # Run 1 (partitioning X): pA claims A and B, then its producer dies before committing.
    dead = [item(img, "a1", "A"), item(img, "a2", "B")]
    prepare(cache, "pA", dead)
    assert read_commit(CacheStorage(cache), "pA") is None
    # Run 2 (another partitioning): b1 has A's content. It must be committed, not a
    # "duplicate" of pA, which holds nothing.
    out_b = produce_partition(cache, "pB", [item(img, "b1", "A"), item(img, "b3", "C")])
    assert (out_b.won, out_b.committed, out_b.duplicates) == (True, 2, 0)
    ended = audit(cache, {"b1": "A", "b3": "C"})
    assert ended["b1"] == ("committed", "pB")
    # A later partition with A's content is a duplicate of pB, which committed it.
    out_c = produce_partition(cache, "pC", [item(img, "c1", "A"), item(img, "c4", "D")])
    assert (out_c.committed, out_c.duplicates) == (1, 1)
    # The dead partition is rerun after all: its A is now pB's, its B is still its own.
    out_a = produce_partition(cache, "pA", dead)
    assert (out_a.committed, out_a.duplicates) == (1, 1)
    ended = audit(cache, {"a1": "A", "a2": "B", "b1": "A", "b3": "C", "c1": "A", "c4": "D"})
    assert ended["c1"] == ("duplicate", "pB") and ended["a1"] == ("duplicate", "pB")
    assert ended["a2"] == ("committed", "pA")


def test_copy_of_content_claimed_by_a_partition_in_flight_is_never_a_duplicate_of_nothing(world):
    img, cache = world
    rows_a = fake_encode(prepare(cache, "pA", [item(img, "a1", "A"), item(img, "a2", "B")]))  # claims A, B
    rows_b = fake_encode(prepare(cache, "pB", [item(img, "b1", "A")]))  # pA not committed: encoded
    assert [r["kind"] for r in rows_b] == ["encode"]
    write(cache, "pB", rows_b)
    audit(cache, {"b1": "A"})  # pB alone is consistent: b1 is committed, not a duplicate of pA
    # pA commits after pB: its copy of A is decided at write time against pB's commit record.
    out_a = write(cache, "pA", rows_a)
    assert (out_a.committed, out_a.duplicates) == (1, 1)
    ended = audit(cache, {"a1": "A", "a2": "B", "b1": "A"})
    assert ended["a1"] == ("duplicate", "pB")


def test_two_partitions_racing_for_a_dead_claim_commit_the_content_once(world):
    """Two partitions both find A claimed by a dead partition ("two takers"); written one after
    the other, exactly one commits A and the other records a duplicate of it."""
    img, cache = world
    prepare(cache, "pDead", [item(img, "d1", "A")])
    rows_b = fake_encode(prepare(cache, "pB", [item(img, "b1", "A")]))
    rows_c = fake_encode(prepare(cache, "pC", [item(img, "c1", "A")]))
    write(cache, "pB", rows_b)
    write(cache, "pC", rows_c)
    ended = audit(cache, {"b1": "A", "c1": "A"})
    assert sorted(e[0] for e in ended.values()) == ["committed", "duplicate"]


def test_concurrent_writers_never_lose_content(world):
    """Written at the same moment, two partitions holding the same unclaimed-by-a-committer
    content may both commit it (documented), but neither input is lost."""
    img, cache = world
    prepare(cache, "pDead", [item(img, "d1", "A")])
    rows = {
        pid: fake_encode(prepare(cache, pid, [item(img, f"{pid}-1", "A"), item(img, f"{pid}-2", "B")]))
        for pid in ("pB", "pC")
    }
    errors = []

    def run(pid):
        try:
            write(cache, pid, rows[pid])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(pid,)) for pid in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    storage = CacheStorage(cache)
    ended = {}
    for rec in list_commits(storage):
        assert rec.committed + rec.duplicates + sum(rec.quarantined.values()) == rec.inputs
        for shard in rec.shards:
            for uri in read_samples(storage, shard.path).column("source_uri").to_pylist():
                ended[Path(uri).stem] = "committed"
        for row in read_duplicates(storage, rec).to_pylist():
            assert read_commit(storage, row["duplicate_of"]) is not None
            ended[row["input_id"]] = "duplicate"
    assert set(ended) == {"pB-1", "pB-2", "pC-1", "pC-2"}
    assert "committed" in {ended["pB-1"], ended["pC-1"]} and "committed" in {ended["pB-2"], ended["pC-2"]}


def test_copy_of_a_quarantined_input_is_quarantined_not_a_duplicate(world):
    img, cache = world
    items = [item(img, "x1", "A"), item(img, "x2", "A"), item(img, "x3", "B"), item(img, "x4", "B")]
    rows = prepare(cache, "pX", items)
    assert [r["kind"] for r in rows] == ["encode", "duplicate", "encode", "duplicate"]
    out = write(cache, "pX", fake_encode(rows, reject_caption=("x1",)))
    assert (out.committed, out.duplicates, out.quarantined) == (1, 1, {"caption_too_long": 2})
    ended = audit(cache, {"x1": "A", "x2": "A", "x3": "B", "x4": "B"})
    assert ended["x2"] == ("quarantined", "caption_too_long")
    assert ended["x4"] == ("duplicate", "pX")
    detail = read_quarantine(CacheStorage(cache), read_commit(CacheStorage(cache), "pX")).to_pylist()
    assert any("same content as input x1" in r["detail"] for r in detail if r["input_id"] == "x2")


def test_copy_inside_a_partition_follows_its_original_to_a_committed_partition(world):
    """pA (uncommitted) claims A; pB commits A; pA's two copies of A both become duplicates of pB."""
    img, cache = world
    rows_a = fake_encode(prepare(cache, "pA", [item(img, "a1", "A"), item(img, "a2", "A")]))
    produce_partition(cache, "pB", [item(img, "b1", "A")])
    write(cache, "pA", rows_a)
    ended = audit(cache, {"a1": "A", "a2": "A", "b1": "A"})
    assert ended["a1"] == ended["a2"] == ("duplicate", "pB")
