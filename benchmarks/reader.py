"""Reader throughput against the training rate it has to feed (CPU, one process).

Writes a small latent cache into a temporary directory with the producers' writer API (no Ray),
then measures, on the same machine and batch shapes:

* the reader: samples/s of `CacheReader.next_global_step` with ``prefetch_steps=0`` (loading
  inline, so the number is the reader's own cost per sample, shard checksum verification
  included on first open);
* the model: samples/s of forward + flow-matching loss + backward + AdamW of
  ``QwenImageMMDiT(load_config('tiny-16ch'))`` on micro-batches produced by that reader, through
  the model's diffusers-style ``forward``;

and prints both and their ratio. The reader should be >= 20x faster than even this tiny model, so
that with the background thread it never stalls training. Defaults: 256x256 px (32x32 latents,
256 image tokens), 64-token texts, micro-batch 8::

    python benchmarks/reader.py
    python benchmarks/reader.py --bucket 512x512 --task edit --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from megatron_qwenimage.cache import Bucket, SampleMeta, ShardTensors, init_cache
from megatron_qwenimage.cache.shard_format import offsets_from_lengths
from megatron_qwenimage.cache.writer import ShardPayload, publish_partition
from megatron_qwenimage.config import load_config
from megatron_qwenimage.data.reader import CacheReader, MicroBatch, ReaderConfig
from megatron_qwenimage.data.reader_config import TASKS
from megatron_qwenimage.flow_matching import flow_matching_inputs, flow_matching_loss, pack_latents


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bucket", default="256x256", help="pixel bucket of every sample (default: %(default)s)")
    p.add_argument("--task", choices=TASKS, default="t2i", help="task (default: %(default)s)")
    p.add_argument("--text-tokens", type=int, default=64, help="max text tokens per sample (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch (default: %(default)s)")
    p.add_argument("--partitions", type=int, default=8, help="cache partitions (default: %(default)s)")
    p.add_argument("--samples", type=int, default=64, help="samples per partition (default: %(default)s)")
    p.add_argument("--reader-steps", type=int, default=40, help="timed reader steps (default: %(default)s)")
    p.add_argument("--model-steps", type=int, default=6, help="timed model steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def write_cache(
    path: str, bucket: Bucket, *, partitions: int, samples: int, text_tokens: int, text_dim: int, edit: bool
) -> None:
    """`partitions` committed partitions of random bf16 latents/texts, then one snapshot."""
    cache = init_cache(path)
    g = torch.Generator().manual_seed(0)
    for p in range(partitions):
        lengths = torch.randint(text_tokens // 2, text_tokens + 1, (samples,), generator=g).tolist()
        shape = (samples, 16, bucket.latent_height, bucket.latent_width)
        tensors = ShardTensors(
            torch.randn(shape, generator=g).to(torch.bfloat16),
            torch.randn(sum(lengths), text_dim, generator=g).to(torch.bfloat16),
            offsets_from_lengths(lengths),
            torch.randn(shape, generator=g).to(torch.bfloat16) if edit else None,
        )
        task = "edit" if edit else "t2i"
        metas = [
            SampleMeta(
                f"p{p}-{i}",
                task,
                "caption",
                f"file://{p}/{i}",
                f"file://{p}/c{i}" if edit else None,
                n,
                False,
                bucket.height_px,
                bucket.width_px,
            )
            for i, n in enumerate(lengths)
        ]
        publish_partition(cache.storage, f"p{p}", inputs=samples, shards=[ShardPayload(bucket, tensors, metas)])
    cache.create_snapshot()


def model_step(model, opt, mb: MicroBatch, generator: torch.Generator) -> None:
    """One fwd + flow-matching loss + bwd + AdamW step on `mb` (target and condition frames)."""
    b, _, h, w = mb.latents.shape
    x0 = pack_latents(mb.latents)
    noise = torch.randn(x0.shape, generator=generator)
    inputs = flow_matching_inputs(x0, noise, torch.rand(b, generator=generator))
    frames = [inputs.noisy] + [pack_latents(c) for c in mb.condition_latents]
    shapes = [[(1, h // 2, w // 2)] + [(1, c.shape[2] // 2, c.shape[3] // 2) for c in mb.condition_latents]] * b
    pred = model(torch.cat(frames, 1), mb.text, mb.text_mask, inputs.sigma, shapes)
    flow_matching_loss(pred, inputs.target).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(args: argparse.Namespace) -> dict:
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

    if args.threads:
        torch.set_num_threads(args.threads)
    bucket = Bucket.parse(args.bucket)
    model_cfg = load_config("tiny-16ch")
    if args.partitions * args.samples < args.micro_batch * 2:
        raise SystemExit(f"--partitions * --samples must hold at least two micro-batches of {args.micro_batch}")
    with tempfile.TemporaryDirectory(prefix="reader-bench-") as tmp:
        write_cache(
            f"{tmp}/cache",
            bucket,
            partitions=args.partitions,
            samples=args.samples,
            text_tokens=args.text_tokens,
            text_dim=model_cfg.joint_attention_dim,
            edit=args.task == "edit",
        )
        config = ReaderConfig.from_dict(
            {
                "caches": [{"path": f"{tmp}/cache", "tasks": [args.task]}],
                "tasks": {args.task: 1.0},
                "stages": [
                    {
                        "name": "bench",
                        "buckets": [bucket.name],
                        "micro_batch": args.micro_batch,
                        "global_batch": args.micro_batch,
                    }
                ],
                "prefetch_steps": 0,
            }
        )
        with CacheReader(config, dp_rank=0, dp_size=1) as reader:
            reader.next_global_step()  # warm-up: opens the first shards
            t0 = time.perf_counter()
            for _ in range(args.reader_steps):
                reader.next_global_step()
            reader_s = time.perf_counter() - t0
            batches = [reader.next_global_step()[0] for _ in range(args.model_steps + 1)]

    model = QwenImageMMDiT(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    model_step(model, opt, batches[0], gen)  # warm-up
    t0 = time.perf_counter()
    for mb in batches[1:]:
        model_step(model, opt, mb, gen)
    model_s = time.perf_counter() - t0

    reader_rate = args.reader_steps * args.micro_batch / reader_s
    model_rate = args.model_steps * args.micro_batch / model_s
    return {
        "bucket": bucket.name,
        "task": args.task,
        "micro_batch": args.micro_batch,
        "image_tokens": bucket.num_image_tokens,
        "text_tokens_max": args.text_tokens,
        "torch_threads": torch.get_num_threads(),
        "reader_samples_per_s": reader_rate,
        "model_samples_per_s": model_rate,
        "ratio": reader_rate / model_rate,
        "target_ratio": 20.0,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    r = run(args)
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"bucket {r['bucket']} ({r['image_tokens']} image tokens), task {r['task']}, "
            f"micro-batch {r['micro_batch']}, {r['torch_threads']} torch threads"
        )
        print(f"reader (inline, 1 process):          {r['reader_samples_per_s']:10.1f} samples/s")
        print(f"tiny-16ch fwd+bwd+AdamW (same batch): {r['model_samples_per_s']:10.1f} samples/s")
        print(f"ratio reader / training:              {r['ratio']:10.1f}x  (target >= {r['target_ratio']:.0f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
