"""Tiny latent caches for the reader tests, written with the producers' writer API."""

from __future__ import annotations

import torch

from megatron_qwenimage.cache import Bucket, SampleMeta, ShardTensors, init_cache, open_cache
from megatron_qwenimage.cache.shard_format import offsets_from_lengths
from megatron_qwenimage.cache.writer import ShardPayload, publish_partition

CHANNELS = 16
TEXT_DIM = 32
#: Pixel buckets whose latents are 2x2, 2x4 and 4x4 (pixels / 8).
B16, B16x32, B32 = Bucket(16, 16), Bucket(16, 32), Bucket(32, 32)


def payload(bucket: Bucket, n: int, *, prefix: str, seed: int, edit: int = 0) -> ShardPayload:
    """`n` samples of `bucket`; the last `edit` of them are edit samples with condition latents.

    Sample ids are ``f"{prefix}-{i}"``; every latent's first element holds i, so tests can check
    which sample a tensor came from.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 9, (n,), generator=g)]
    latents = torch.randn(n, CHANNELS, bucket.latent_height, bucket.latent_width, generator=g)
    latents[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    text = torch.randn(sum(lengths), TEXT_DIM, generator=g).to(torch.bfloat16)
    cond = torch.zeros_like(latents)
    samples = []
    for i in range(n):
        is_edit = i >= n - edit
        if is_edit:
            cond[i] = torch.randn(latents.shape[1:], generator=g) - 100.0
        samples.append(
            SampleMeta(
                f"{prefix}-{i}",
                "edit" if is_edit else "t2i",
                f"caption {i}",
                f"file://{prefix}/{i}.png",
                f"file://{prefix}/src{i}.png" if is_edit else None,
                lengths[i],
                False,
                64,
                64,
            )
        )
    tensors = ShardTensors(
        latents.to(torch.bfloat16), text, offsets_from_lengths(lengths), cond.to(torch.bfloat16) if edit else None
    )
    return ShardPayload(bucket, tensors, samples)


def publish(cache_path, partition: str, payloads: list[ShardPayload], *, snapshot: bool = True) -> int | None:
    """Commit one partition (creating the cache if needed); returns the new snapshot version."""
    cache = init_cache(str(cache_path))
    n = len({s.sample_id for p in payloads for s in p.samples})
    assert publish_partition(cache.storage, partition, inputs=n, shards=payloads).won
    return cache.create_snapshot().version if snapshot else None


def make_cache(
    cache_path, *, partitions: int = 3, per_bucket: dict[Bucket, int] | None = None, edit: int = 0, tag: str = ""
) -> str:
    """A cache of `partitions` partitions, each with `per_bucket[b]` samples per bucket (one snapshot)."""
    per_bucket = per_bucket or {B16: 8, B32: 8}
    for p in range(partitions):
        payloads = [
            payload(b, n, prefix=f"{tag}p{p}-{b.name}", seed=100 * p + i, edit=edit)
            for i, (b, n) in enumerate(sorted(per_bucket.items()))
        ]
        publish(cache_path, f"{tag}p{p}", payloads, snapshot=False)
    open_cache(str(cache_path)).create_snapshot()
    return str(cache_path)
