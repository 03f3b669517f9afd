"""Producer throughput vs. a bare encoder loop over the same decoded inputs (not a timed test).

    python benchmarks/produce.py                      # CPU: widened tiny encoders, 384^2 bucket
    python benchmarks/produce.py --full --side 1024   # GPU: full-size random-weight encoders

Prints one JSON object:
* start-up s: from `produce()`'s call to its first partition commit (Ray, actors, model loads,
  the first partition's whole path), and steady img/s: the images committed after the first
  partition over the time from its commit to the last one (the commit records' own timestamps),
  the rate a long run settles at;
* pipeline img/s: `produce()` end to end (local Ray, read -> decode -> VAE -> text -> commit),
  start-up included;
* bare img/s: one process running the same encoders over the same already-decoded, already
  cropped images in batches (the upper bound the pipeline's encoders could reach);
* steady ratio = steady / bare (target >= 0.9) and ratio = pipeline / bare;
* shard write MB/s: `publish_partition` (zarr + parquet + read-back check + checksums + commit);
* on GPU with --full, also the bare VAE img/s to compare with the anchor (23 img/s at 1024^2, H200).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_qwenimage.cache import Bucket, SampleMeta, ShardTensors, init_cache, open_cache
from megatron_qwenimage.cache.commit import commit_record_names, read_commit
from megatron_qwenimage.cache.shard_format import offsets_from_lengths
from megatron_qwenimage.cache.writer import ShardPayload, publish_partition
from producers.config import PoolConfig, ProducerConfig
from producers.encoders import TextEncoder, VaeEncoder, build_tiny_encoders
from producers.images import decode_image, resize_center_crop
from producers.pipeline import ProduceRequest, produce


def make_inputs(root: Path, n: int, side: int, seed: int = 0) -> list[tuple[Path, str]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        low = rng.integers(0, 255, (side // 32, side // 32, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((side, side), Image.Resampling.BICUBIC)
        path = root / f"img{i:05d}.png"
        img.save(path)
        caption = f"benchmark image {i} with a smooth random colour field, sample number {i * 7 % 13}"
        (root / f"img{i:05d}.txt").write_text(caption)
        out.append((path, caption))
    return out


def bare_loop(enc_dir: str, inputs, bucket: Bucket, batch: int, device: str | None) -> float:
    vae, text = VaeEncoder(enc_dir, device=device), TextEncoder(enc_dir, device=device)
    decoded = [
        resize_center_crop(
            decode_image(p.read_bytes(), uri=str(p), min_side_px=8, max_pixels=10**9).pixels, bucket
        ).pixels
        for p, _ in inputs
    ]
    captions = [c for _, c in inputs]
    vae.encode(np.stack(decoded[:1]))
    text.encode_t2i(captions[:1])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(decoded), batch):
        vae.encode(np.stack(decoded[i : i + batch]))
        text.encode_t2i(captions[i : i + batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(decoded) / (time.perf_counter() - t0)


def bare_vae_rate(enc_dir: str, side: int, batch: int, device: str | None, steps: int = 5) -> float:
    vae = VaeEncoder(enc_dir, device=device)
    x = np.random.default_rng(0).integers(0, 255, (batch, side, side, 3), dtype=np.uint8)
    vae.encode(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        vae.encode(x)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def shard_write_mb_s(tmp: Path, bucket: Bucket, n: int, text_dim: int) -> float:
    cache = init_cache(str(tmp / "write-bench"))
    lengths = [200] * n
    tensors = ShardTensors(
        torch.randn(n, 16, bucket.latent_height, bucket.latent_width).to(torch.bfloat16),
        torch.randn(sum(lengths), text_dim).to(torch.bfloat16),
        offsets_from_lengths(lengths),
    )
    samples = [SampleMeta(f"s{i}", "t2i", "c", f"u{i}", None, 200, False, 1, 1) for i in range(n)]
    t0 = time.perf_counter()
    result = publish_partition(cache.storage, "bench", inputs=n, shards=[ShardPayload(bucket, tensors, samples)])
    return result.bytes_written / (time.perf_counter() - t0) / 1e6


def commit_times(cache_dir: str) -> list[tuple[float, int]]:
    """(commit time, images committed) per partition of a cache, in commit order."""
    storage = open_cache(cache_dir).storage
    records = [read_commit(storage, name) for name in commit_record_names(storage)]
    return sorted((r.created_unix, r.committed) for r in records if r is not None)


def steady_state(start_unix: float, commits: list[tuple[float, int]]) -> tuple[float, float | None]:
    """(start-up seconds, steady images/s): the first commit's delay, and the images of the later
    partitions over the span from the first commit to the last (None with fewer than 2 commits)."""
    first = commits[0][0]
    later = sum(n for _, n in commits[1:])
    span = commits[-1][0] - first
    return first - start_unix, (later / span if len(commits) > 1 and span > 0 else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--n", type=int, default=256, help="input images (enough that the steady state dominates; default 256)"
    )
    ap.add_argument("--partition-size", type=int, default=16, help="inputs per partition (default 16)")
    ap.add_argument(
        "--vae-actors",
        type=int,
        default=2,
        help="VAE actors (default 2: one per core of a 2-core machine; each actor runs torch on one thread, "
        "as Ray sets OMP_NUM_THREADS from its CPU reservation, while the bare loop uses every core)",
    )
    ap.add_argument("--text-actors", type=int, default=1, help="text-encoder actors (default 1)")
    ap.add_argument(
        "--cpus-per-actor", type=float, default=0.5, help="Ray CPUs reserved per encoder actor (default 0.5)"
    )
    ap.add_argument("--side", type=int, default=384, help="image side = bucket side in px (multiple of 16)")
    ap.add_argument("--batch", type=int, default=8, help="encoder batch size (pipeline and bare loop)")
    ap.add_argument("--vae-base-dim", type=int, default=48, help="tiny VAE width: wide enough that encoding dominates")
    ap.add_argument("--full", action="store_true", help="full-size random-weight encoders (GPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="qwenimage-bench-"))
    enc_dir = str(
        build_tiny_encoders(
            tmp / ("enc-full" if args.full else f"enc-vae{args.vae_base_dim}"),
            vae_base_dim=args.vae_base_dim,
            full_size=args.full,
        )
    )
    bucket = Bucket(args.side, args.side)
    inputs = make_inputs(tmp / "inputs", args.n, args.side)
    bare = bare_loop(enc_dir, inputs, bucket, args.batch, args.device)
    gpus = 1.0 if torch.cuda.is_available() else 0.0
    actors = args.vae_actors + args.text_actors

    def pool(n: int) -> PoolConfig:
        return PoolConfig(
            min_actors=n,
            max_actors=n,
            num_gpus=gpus / actors if gpus else 0.0,
            num_cpus=args.cpus_per_actor,
            batch_size=args.batch,
        )

    cfg = ProducerConfig(
        buckets={"custom": [bucket]},
        partition_size=args.partition_size,
        vae_pool=pool(args.vae_actors),
        text_pool=pool(args.text_actors),
        min_side_px=8,
    )
    import ray

    ray.init(  # address="local": a private instance, never a cluster another run left in /tmp/ray
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    start_unix, t0 = time.time(), time.perf_counter()
    counts = produce(
        ProduceRequest(str(tmp / "inputs"), str(tmp / "cache"), encoders=enc_dir, config=cfg, device=args.device)
    )
    pipeline = counts.committed / (time.perf_counter() - t0)
    ray.shutdown()
    startup_s, steady = steady_state(start_unix, commit_times(str(tmp / "cache")))
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "images": args.n,
        "side": args.side,
        "actors": {"vae": args.vae_actors, "text": args.text_actors, "cpus_each": args.cpus_per_actor},
        "startup_s": round(startup_s, 1),
        "steady_img_s": None if steady is None else round(steady, 2),
        "pipeline_img_s": round(pipeline, 2),
        "bare_img_s": round(bare, 2),
        "steady_ratio": None if steady is None else round(steady / bare, 3),
        "ratio": round(pipeline / bare, 3),
        "shard_write_MB_s": round(shard_write_mb_s(tmp, bucket, 32, 3584 if args.full else 32), 1),
    }
    if args.full:
        result["bare_vae_img_s"] = round(bare_vae_rate(enc_dir, args.side, args.batch, args.device), 2)
        result["anchor_vae_img_s_1024_h200"] = 23.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
