"""The cache contract in megatron_qwenimage.cache: shard format, exclusive commit, snapshots, verify."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from megatron_qwenimage.cache import Bucket, SampleMeta, ShardChecksumError, ShardTensors, init_cache, open_cache
from megatron_qwenimage.cache.commit import CommitError, CommitRecord, PartitionAttempt, list_commits
from megatron_qwenimage.cache.manifest import CacheError
from megatron_qwenimage.cache.shard_format import offsets_from_lengths
from megatron_qwenimage.cache.sweep import sweep_orphans
from megatron_qwenimage.cache.verify import verify_cache
from megatron_qwenimage.cache.writer import QuarantineRow, ShardPayload, publish_partition, read_quarantine
from megatron_qwenimage.config import ConfigError


def make_payload(
    bucket: Bucket, n: int, *, seed: int, text_dim: int = 32, edit_every: int = 0, prefix: str = "s"
) -> ShardPayload:
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 20, (n,), generator=g)]
    latents = torch.randn(n, 16, bucket.latent_height, bucket.latent_width, generator=g).to(torch.bfloat16)
    text = torch.randn(sum(lengths), text_dim, generator=g).to(torch.bfloat16)
    samples, cond = [], torch.zeros_like(latents)
    for i in range(n):
        edit = edit_every and i % edit_every == 0
        if edit:
            cond[i] = torch.randn(latents.shape[1:], generator=g).to(torch.bfloat16)
        samples.append(
            SampleMeta(
                f"{prefix}{seed}-{i}",
                "edit" if edit else "t2i",
                f"caption {i}",
                f"file://img{i}.png",
                f"file://src{i}.png" if edit else None,
                lengths[i],
                False,
                100 + i,
                200 + i,
            )
        )
    return ShardPayload(
        bucket, ShardTensors(latents, text, offsets_from_lengths(lengths), cond if edit_every else None), samples
    )


def test_bucket_sizes_are_validated():
    b = Bucket(640, 480)
    assert (b.latent_height, b.latent_width, b.num_image_tokens, b.name) == (80, 60, 1200, "640x480")
    assert Bucket.parse("640x480") == b
    with pytest.raises(ConfigError, match="multiple of 16"):
        Bucket(648, 480)


def test_published_shard_reads_back_bit_exactly_with_api_and_plain_zarr(tmp_path):
    cache = init_cache(str(tmp_path / "c"))
    payload = make_payload(Bucket(64, 96), 5, seed=1, edit_every=2)
    result = publish_partition(
        cache.storage,
        "p0",
        inputs=6,
        shards=[payload],
        quarantine=[QuarantineRow("x", "file://x", "zero_bytes", "file is empty")],
    )
    assert result.won and result.record.committed == 5
    snap = cache.create_snapshot()
    (shard,) = snap.shards
    assert shard.bucket == Bucket(64, 96) and shard.num_samples == 5 and shard.latent_shape == (16, 8, 12)
    batch = shard.read_all()
    assert batch.latents.dtype == torch.bfloat16
    assert torch.equal(batch.latents.view(torch.int16), payload.tensors.latents.view(torch.int16))
    assert torch.equal(batch.text_embeddings.view(torch.int16), payload.tensors.text_embeddings.view(torch.int16))
    assert batch.text_lengths.tolist() == [s.text_len for s in payload.samples]
    assert torch.equal(batch.condition_latents.view(torch.int16), payload.tensors.condition_latents.view(torch.int16))
    s3 = shard.read_sample(3)
    assert s3.task == "t2i" and s3.condition_latents is None and s3.metadata["caption"] == "caption 3"
    assert torch.equal(s3.text_embedding.view(torch.int16), payload.tensors.text_embedding(3).view(torch.int16))
    s2 = shard.read_sample(2)
    assert s2.task == "edit" and torch.equal(
        s2.condition_latents.view(torch.int16), payload.tensors.condition_latents[2].view(torch.int16)
    )

    # Plain zarr + pyarrow, as docs/cache_format.md describes.
    root = tmp_path / "c" / shard.path
    group = zarr.open_group(str(root / "tensors.zarr"), mode="r")
    assert group.attrs["schema_version"] == 1 and group["latents"].attrs["dtype"] == "bfloat16"
    raw = np.asarray(group["latents"][:])
    assert raw.dtype == np.uint16
    assert torch.equal(torch.from_numpy(raw.view(np.int16)), payload.tensors.latents.view(torch.int16))
    table = pq.read_table(root / "samples.parquet")
    assert table.column("sample_id").to_pylist() == [s.sample_id for s in payload.samples]
    offsets = np.asarray(group["text_offsets"][:])
    assert offsets.tolist() == table.column("text_offset").to_pylist() + [payload.tensors.text_embeddings.shape[0]]
    q = read_quarantine(cache.storage, snap.records[0])
    assert q.column("reason").to_pylist() == ["zero_bytes"]


def test_second_attempt_loses_and_leaves_nothing(tmp_path):
    cache = init_cache(str(tmp_path / "c"))
    first = publish_partition(cache.storage, "p0", inputs=3, shards=[make_payload(Bucket(32, 32), 3, seed=1)])
    second = publish_partition(cache.storage, "p0", inputs=3, shards=[make_payload(Bucket(32, 32), 3, seed=2)])
    assert first.won and not second.won
    assert cache.storage.listdir("attempts/p0") == [first.record.attempt_id]
    (rec,) = list_commits(cache.storage)
    assert rec.attempt_id == first.record.attempt_id


def test_shard_files_are_fsynced_before_the_commit_record_is_published(tmp_path, monkeypatch):
    import os

    from megatron_qwenimage.cache import storage as storage_mod

    cache = init_cache(str(tmp_path / "c"))
    events: list[tuple[str, str]] = []
    real_fsync, real_exclusive = os.fsync, storage_mod.CacheStorage.write_exclusive

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def write_exclusive(self, relpath, data):
        events.append(("publish", relpath))
        return real_exclusive(self, relpath, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(storage_mod.CacheStorage, "write_exclusive", write_exclusive)
    result = publish_partition(cache.storage, "p0", inputs=4, shards=[make_payload(Bucket(32, 32), 4, seed=1)])
    assert result.won
    commit_at = events.index(("publish", "commits/p0.json"))
    synced_before = {path for kind, path in events[:commit_at] if kind == "fsync"}
    shard_dir = os.path.realpath(cache.storage.path(result.record.shards[0].path))
    data_files = {os.path.realpath(os.path.join(shard_dir, rel)) for rel in result.record.shards[0].files}
    assert data_files and data_files <= synced_before, sorted(data_files - synced_before)[:5]
    assert shard_dir in synced_before  # its directory entries too


def test_racing_attempts_publish_exactly_once(tmp_path):
    cache = init_cache(str(tmp_path / "c"))
    results, barrier = [], threading.Barrier(4)

    def race(seed):
        payload = make_payload(Bucket(32, 32), 2, seed=seed)
        barrier.wait()
        results.append(publish_partition(cache.storage, "p-race", inputs=2, shards=[payload]))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sum(r.won for r in results) == 1
    assert len(cache.storage.listdir("attempts/p-race")) == 1
    assert verify_cache(cache).ok


def test_attempt_swept_by_the_winner_mid_write_reports_the_loss(tmp_path):
    """Another producer commits the partition and sweeps this attempt's files while it writes, so
    this attempt's next read fails: the partition stays published once, and this attempt reports
    the winner's commit instead of failing the run."""
    cache = init_cache(str(tmp_path / "c"))
    winner = {}

    def rival_wins_and_sweeps(event):
        if event == "shard_written":
            winner["result"] = publish_partition(
                cache.storage, "p0", inputs=4, shards=[make_payload(Bucket(32, 32), 4, seed=9)]
            )
            sweep_orphans(cache.storage)  # removes this in-progress attempt at once
            raise FileNotFoundError("latents")  # what reading the swept shard back then raises

    loser = publish_partition(
        cache.storage,
        "p0",
        inputs=4,
        fault_hook=rival_wins_and_sweeps,
        shards=[make_payload(Bucket(32, 32), 4, seed=1)],
    )
    assert winner["result"].won and not loser.won
    assert loser.record.attempt_id == winner["result"].record.attempt_id
    assert cache.storage.listdir("attempts/p0") == [loser.record.attempt_id]
    assert verify_cache(cache).ok
    # A failure that is not a lost race still propagates.
    with pytest.raises(RuntimeError, match="disk on fire"):
        publish_partition(
            cache.storage,
            "p1",
            inputs=4,
            shards=[make_payload(Bucket(32, 32), 4, seed=3)],
            fault_hook=lambda event: (_ for _ in ()).throw(RuntimeError("disk on fire")),
        )
    assert cache.storage.listdir("attempts/p1") == []


def test_commit_record_counts_must_add_up():
    with pytest.raises(CommitError, match="partition p: committed 2"):
        CommitRecord("p", "a", inputs=5, committed=2, duplicates=1, quarantined={"zero_bytes": 1}, shards=[], tables={})


def test_verify_names_the_corrupted_shard(tmp_path):
    cache = init_cache(str(tmp_path / "c"))
    publish_partition(cache.storage, "good", inputs=2, shards=[make_payload(Bucket(32, 32), 2, seed=1)])
    publish_partition(cache.storage, "bad", inputs=2, shards=[make_payload(Bucket(32, 48), 2, seed=2)])
    snap = cache.create_snapshot()
    bad = next(s for s in snap.shards if s.shard_id.startswith("bad"))
    latents_file = next(
        p
        for p in (tmp_path / "c" / bad.path / "tensors.zarr" / "latents").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(latents_file.read_bytes())
    data[10] ^= 0xFF
    latents_file.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match="shard bad-32x48"):
        bad.verify()
    report = verify_cache(cache)
    assert not report.ok and list(report.bad_shards) == ["bad-32x48"]
    assert report.buckets == {"32x32": 2}


def test_sweep_removes_dead_and_losing_attempts_but_not_live_ones(tmp_path):
    cache = init_cache(str(tmp_path / "c"))
    storage = cache.storage
    dead = PartitionAttempt.start(storage, "p-dead")
    live = PartitionAttempt.start(storage, "p-live")
    won = publish_partition(storage, "p-done", inputs=1, shards=[make_payload(Bucket(32, 32), 1, seed=1)])
    loser = PartitionAttempt.start(storage, "p-done")  # e.g. a duplicate task still running
    report = sweep_orphans(storage, grace_s=60, now=time.time() + 30)
    assert loser.dir in report.removed_attempts
    assert dead.dir in report.kept_in_flight and live.dir in report.kept_in_flight
    report = sweep_orphans(storage, grace_s=60, now=time.time() + 120)
    assert set(report.removed_attempts) == {dead.dir, live.dir}
    assert storage.listdir("attempts") == ["p-done"]
    assert storage.listdir("attempts/p-done") == [won.record.attempt_id]


def test_sweep_keeps_a_losing_attempt_still_being_written_and_removes_it_later(tmp_path, monkeypatch):
    """Two producers: one commits a partition and sweeps while the other still writes its losing
    attempt of it. The removal then meets files created after it listed the directory (the
    final rmdir fails with ENOTEMPTY, as CI saw); the sweep keeps that attempt instead of failing
    its producer, and the next sweep removes it."""
    import errno

    cache = init_cache(str(tmp_path / "c"))
    storage = cache.storage
    publish_partition(storage, "p-done", inputs=1, shards=[make_payload(Bucket(32, 32), 1, seed=1)])
    loser = PartitionAttempt.start(storage, "p-done")
    remove = type(storage).remove

    def remove_while_written(self, rel):
        if rel == loser.dir:
            raise OSError(errno.ENOTEMPTY, "Directory not empty", self.path(rel))
        remove(self, rel)

    monkeypatch.setattr(type(storage), "remove", remove_while_written)
    report = sweep_orphans(storage, grace_s=60)
    assert loser.dir in report.kept_in_flight and loser.dir not in report.removed_attempts
    assert storage.exists(loser.dir)
    monkeypatch.setattr(type(storage), "remove", remove)
    assert loser.dir in sweep_orphans(storage, grace_s=60).removed_attempts


def test_sweep_still_raises_other_removal_errors(tmp_path, monkeypatch):
    cache = init_cache(str(tmp_path / "c"))
    storage = cache.storage
    publish_partition(storage, "p-done", inputs=1, shards=[make_payload(Bucket(32, 32), 1, seed=1)])
    PartitionAttempt.start(storage, "p-done")

    def denied(self, rel):
        raise PermissionError(13, "Permission denied", rel)

    monkeypatch.setattr(type(storage), "remove", denied)
    with pytest.raises(PermissionError):
        sweep_orphans(storage, grace_s=60)


def test_snapshots_are_pinned_and_immutable(tmp_path):
    cache = init_cache(str(tmp_path / "c"))
    with pytest.raises(CacheError, match="no manifest snapshot"):
        cache.snapshot()
    publish_partition(cache.storage, "p0", inputs=2, shards=[make_payload(Bucket(32, 32), 2, seed=1)])
    v1 = cache.create_snapshot()
    assert cache.create_snapshot().version == v1.version  # nothing new: no new version
    publish_partition(cache.storage, "p1", inputs=3, shards=[make_payload(Bucket(32, 32), 3, seed=2)])
    v2 = cache.create_snapshot()
    assert (v1.version, v2.version) == (1, 2)
    assert open_cache(str(tmp_path / "c")).snapshot(pin=1).partitions == ["p0"]
    assert cache.snapshot().partitions == ["p0", "p1"] and cache.snapshot().num_samples == 5
    with pytest.raises(CacheError, match="snapshot v7 does not exist"):
        cache.snapshot(pin=7)
    with pytest.raises(CacheError, match="not a latent cache"):
        open_cache(str(tmp_path / "nothing"))


def test_fsspec_memory_cache_round_trips(tmp_path):
    cache = init_cache("memory://qwenimage-test-cache")
    payload = make_payload(Bucket(32, 32), 2, seed=5)
    assert publish_partition(cache.storage, "p0", inputs=2, shards=[payload]).won
    assert not publish_partition(cache.storage, "p0", inputs=2, shards=[payload]).won
    (shard,) = cache.create_snapshot().shards
    shard.verify()
    assert torch.equal(shard.read_all().latents.view(torch.int16), payload.tensors.latents.view(torch.int16))
