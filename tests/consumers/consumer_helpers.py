"""Helpers for the consumers' multi-rank tests: spawn gloo worlds, synthetic global batches."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from consumers.step import Batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        if result is not None:
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        Path(out_dir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        from consumers.parallel import shutdown

        shutdown()


def spawn(fn, world: int, out_dir: Path, *args) -> dict[int, dict]:
    """Run ``fn(rank, world, *args)`` on `world` gloo ranks; returns rank -> returned JSON value."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, str(out_dir), args), nprocs=world,
                           start_method="spawn")
    except Exception as exc:
        errors = sorted(out_dir.glob("*.error"))
        detail = "\n".join(p.read_text() for p in errors)
        raise AssertionError(f"worker failed: {exc}\n{detail}") from None
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}


def synthetic_global_batch(step: int, global_batch: int, *, channels: int = 16, text_dim: int = 32,
                           task: str = "t2i", seed: int = 1234) -> list[dict]:
    """`global_batch` samples of one bucket for `step` (bucket and text lengths vary by step)."""
    g = torch.Generator().manual_seed(seed + step)
    h, w = [(8, 8), (8, 12), (12, 8)][step % 3]
    samples = []
    for _ in range(global_batch):
        n_text = int(torch.randint(3, 9, (1,), generator=g))
        sample = {
            "latents": torch.randn(channels, h, w, generator=g),
            "text": torch.randn(n_text, text_dim, generator=g),
        }
        if task == "edit":
            sample["condition"] = torch.randn(channels, h, w, generator=g)
        samples.append(sample)
    return samples


def to_microbatches(samples: list[dict], *, dp_rank: int, dp: int, micro_batch: int, task: str = "t2i") -> list[Batch]:
    """This DP rank's contiguous slice of the global batch, split into micro-batches; text padded
    to the global batch's longest text."""
    g = len(samples)
    t_max = max(s["text"].shape[0] for s in samples)
    per_rank = g // dp
    out = []
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch):
        idx = list(range(start, start + micro_batch))
        text = torch.zeros(len(idx), t_max, samples[0]["text"].shape[1])
        mask = torch.zeros(len(idx), t_max, dtype=torch.bool)
        for j, i in enumerate(idx):
            n = samples[i]["text"].shape[0]
            text[j, :n] = samples[i]["text"]
            mask[j, :n] = True
        cond = [torch.stack([samples[i]["condition"] for i in idx])] if task == "edit" else []
        out.append(Batch(latents=torch.stack([samples[i]["latents"] for i in idx]), text=text, text_mask=mask,
                         sample_index=torch.tensor(idx), condition_latents=cond, task=task))
    return out


def write_cache(path, *, samples_per_bucket: int = 8, buckets=((32, 32),), edit: int = 0, seed: int = 0,
                partition: str = "p0", distinct: int | None = None) -> str:
    """A small latent cache written with the producers' writer (`publish_partition`) + one snapshot.

    Latents are 16-channel (tiny VAE), text 32-dim (tiny text encoder), i.e. model `tiny-16ch`.
    `distinct`: only this many different (latent, text) contents, repeated (ids stay unique).
    """
    from megatron_qwenimage.data import Bucket, SampleMeta, ShardTensors, init_cache
    from megatron_qwenimage.data.shard_format import offsets_from_lengths
    from megatron_qwenimage.data.writer import ShardPayload, publish_partition

    cache = init_cache(str(path))
    g = torch.Generator().manual_seed(seed)
    payloads = []
    for bh, bw in buckets:
        bucket = Bucket(bh, bw)
        n = samples_per_bucket
        lengths = [int(x) for x in torch.randint(3, 9, (n,), generator=g)]
        latents = torch.randn(n, 16, bucket.latent_height, bucket.latent_width, generator=g)
        cond = torch.randn(n, 16, bucket.latent_height, bucket.latent_width, generator=g) if edit else None
        if distinct:
            lengths = [lengths[i % distinct] for i in range(n)]
            latents = latents[[i % distinct for i in range(n)]]
        text = torch.randn(sum(lengths), 32, generator=g)
        if distinct:
            offs = offsets_from_lengths(lengths)
            for i in range(distinct, n):
                j = i % distinct
                text[offs[i]:offs[i + 1]] = text[offs[j]:offs[j + 1]]
        text = text.to(torch.bfloat16)
        metas = [SampleMeta(f"{partition}-{bucket.name}-{i}", "edit" if i >= n - edit else "t2i", f"caption {i}",
                            f"file://x/{i}.png", f"file://x/src{i}.png" if i >= n - edit else None, lengths[i],
                            False, bh, bw) for i in range(n)]
        if cond is not None:
            cond[: n - edit] = 0
        payloads.append(ShardPayload(bucket, ShardTensors(latents.to(torch.bfloat16), text,
                                                          offsets_from_lengths(lengths),
                                                          None if cond is None else cond.to(torch.bfloat16)), metas))
    assert publish_partition(cache.storage, partition, inputs=len(buckets) * samples_per_bucket, shards=payloads).won
    cache.create_snapshot()
    return str(path)


def run_config(cache: str, out: Path, *, steps: int, global_batch: int = 4, micro_batch: int = 1,
               parallel: dict | None = None, ckpt_interval: int = 0, lr: float = 1e-3, **extra) -> dict:
    """A run YAML mapping for `tiny-16ch` on `cache`, metrics every step."""
    cfg = {
        "model": {"name": "tiny-16ch", "num_layers": 2},
        "parallel": parallel or {},
        "optimizer": {"lr": lr, "warmup_steps": 2, "clip_grad": 1.0},
        "flow_matching": {"kind": "uniform"},
        "data": {"caches": [{"path": cache}], "seed": 3, "prefetch_steps": 2,
                 "stages": [{"name": "s0", "buckets": ["32x32"], "micro_batch": micro_batch,
                             "global_batch": global_batch}]},
        "schedule": {"train_steps": steps, "seed": 11},
        "logging": {"dir": str(out / "logs"), "interval": 1, "tensorboard": False},
    }
    if ckpt_interval:
        cfg["checkpoint"] = {"dir": str(out / "ckpt"), "interval": ckpt_interval, "keep_last": 2}
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
