"""Producer throughput vs. a bare encoder loop over the same decoded inputs (not a timed test).

    python benchmarks/produce.py                      # CPU: widened tiny encoders, 384^2 bucket
    python benchmarks/produce.py --full --side 1024   # GPU: full-size random-weight encoders

Parts (`--parts`; default `pipeline` on CPU, every part with --full, run in the order
vae, text, pipeline, then the VAE variants that compile, so a time limit cuts the slowest last):

* pipeline: start-up s, from `produce()`'s call to its first partition commit (Ray, actors, model
  loads, the first partition's whole path), and steady img/s: the images committed after the
  first partition over the time from its commit to the last one (the commit records' own
  timestamps), the rate a long run settles at; pipeline img/s: `produce()` end to end (local Ray,
  read -> decode -> VAE -> text -> commit), start-up included; bare img/s: one process running the
  same encoders over the same already-decoded, already cropped images in batches (the upper bound
  the pipeline's encoders could reach); steady ratio = steady / bare (target >= 0.9) and ratio =
  pipeline / bare; shard write MB/s: `publish_partition` (zarr + parquet + read-back check +
  checksums + commit). Both sides use the VAE knobs --vae-channels-last / --vae-conv2d /
  --vae-compile.
* vae: the bare diffusers encode (`AutoencoderKLQwenImage.encode(x).latent_dist.mode()` on an
  already normalised contiguous [B, 3, 1, H, W] tensor on the device, bf16 on a GPU) against the
  producer code (`VaeEncoder.encode`: uint8 pixels in, normalised bf16 latents back on the CPU)
  with each knob set of --vae-variants (channels_last, conv2d, compile): img/s, ratio to bare
  (target >= 1.3), first-call s (compilation), TorchDynamo graphs, and the largest latent
  difference from the bare encode of the same batch.
* text: Qwen2.5-VL prompts/s: bare (tokenizer + full forward with all hidden states, as diffusers'
  QwenImagePipeline encodes prompts), bare without the LM head (`model.model`, whose last hidden
  state is the same tensor), and the producer's `TextEncoder.encode_t2i` (template, truncation,
  prefix drop, copies to the CPU; it skips the LM head too).

Prints one JSON line after each part, each holding everything measured so far (the last line is
the whole result); --out PATH keeps the latest of them in a file, so a run stopped by a time limit
leaves what it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
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
from producers.config import VAE_COMPILE_MODES, PoolConfig, ProducerConfig
from producers.encoders import T2I_TEMPLATE, TextEncoder, VaeEncoder, build_tiny_encoders
from producers.images import decode_image, resize_center_crop
from producers.pipeline import ProduceRequest, produce

PARTS = ("vae", "text", "pipeline")
#: The VAE knobs a variant name joins with "+" ("default": none of them).
KNOBS = ("channels_last", "conv2d", "compile")
#: The VAE variants timed by default, the compiled ones last (compiling takes longest).
DEFAULT_VARIANTS = (
    "default,channels_last,conv2d,conv2d+channels_last,conv2d+channels_last+compile,compile,channels_last+compile"
)
#: The H200 anchor the issue names (bare diffusers bf16 encode at 1024^2), and the target ratios.
ANCHOR_VAE_IMG_S_1024_H200 = 23.0
TARGET_VAE_RATIO = 1.3
TARGET_STEADY_RATIO = 0.9


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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Drop what the last part left (its models are unreferenced by now) before the next loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_sizes(n: int, batch: int) -> list[int]:
    """The distinct batch sizes a loop over n items in batches of `batch` meets (full, then the rest)."""
    return sorted({min(batch, n)} | ({n % batch} if n % batch else set()), reverse=True)


def pipeline_knobs(args) -> dict:
    """The pipeline part's VAE knobs (`VaeEncoder` keyword arguments) from the flags."""
    return {"channels_last": args.vae_channels_last, "compile_mode": args.vae_compile, "conv2d": args.vae_conv2d}


def bare_loop(enc_dir: str, inputs, bucket: Bucket, batch: int, device: str | None, knobs: dict) -> float:
    """img/s of VAE + text encoding in one process over decoded, cropped images (`knobs`: the VAE's)."""
    torch._dynamo.reset()  # no graphs of an earlier part count against dynamo's recompile limit
    vae = VaeEncoder(enc_dir, device=device, **knobs)
    text = TextEncoder(enc_dir, device=device)
    decoded = [
        resize_center_crop(
            decode_image(p.read_bytes(), uri=str(p), min_side_px=8, max_pixels=10**9).pixels, bucket
        ).pixels
        for p, _ in inputs
    ]
    captions = [c for _, c in inputs]
    for b in batch_sizes(len(decoded), batch):  # warm-up, and compilation of every shape the loop meets
        vae.encode(np.stack(decoded[:b]))
        text.encode_t2i(captions[:b])
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(decoded), batch):
        vae.encode(np.stack(decoded[i : i + batch]))
        text.encode_t2i(captions[i : i + batch])
    sync()
    return len(decoded) / (time.perf_counter() - t0)


def timed(fn, steps: int) -> float:
    """Seconds per call of fn() over `steps` calls, the device synchronised at both ends."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def random_images(batch: int, side: int, seed: int = 0) -> np.ndarray:
    """uint8 [batch, side, side, 3]: smooth random colour fields, like `make_inputs`' images."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (batch, max(1, side // 32), max(1, side // 32), 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(a).resize((side, side), Image.Resampling.BICUBIC)) for a in low])


def diffusers_vae(vae: VaeEncoder, images: np.ndarray, steps: int) -> tuple[float, torch.Tensor]:
    """(img/s, normalised bf16 latents [B, z, H/8, W/8] on the CPU) of the bare diffusers encode of
    `images` (uint8 [B, H, W, 3]) with `vae`'s model, pixels already normalised on the device in a
    contiguous [B, 3, 1, H, W] tensor (converted as `VaeEncoder.encode` does, so only the encode differs)."""
    x = torch.from_numpy(images).to(vae.device).permute(0, 3, 1, 2).to(vae.dtype).div_(127.5).sub_(1.0)
    x = x.unsqueeze(2).contiguous()

    @torch.no_grad()
    def run() -> torch.Tensor:
        return vae.model.encode(x).latent_dist.mode()

    z = run()[:, :, 0].float()
    latents = ((z - vae.mean) / vae.std).to(torch.bfloat16).cpu()
    return images.shape[0] / timed(run, steps), latents


def parse_variant(name: str) -> dict[str, bool] | None:
    """``"conv2d+compile"`` -> {"channels_last": False, "conv2d": True, "compile": True}; None if
    `name` is neither "default" nor a "+"-join of distinct `KNOBS`."""
    parts = [] if name == "default" else name.split("+")
    if len(set(parts)) != len(parts) or any(k not in KNOBS for k in parts):
        return None
    return {k: k in parts for k in KNOBS}


def producer_vae(
    enc_dir: str, device: str | None, knobs: dict, images: np.ndarray, steps: int
) -> tuple[float, float, torch.Tensor, int]:
    """(img/s, first-call s, latents, graphs TorchDynamo captured) of `VaeEncoder.encode` with the
    knobs (its keyword arguments) over `images`. Dynamo's caches are reset first, so that earlier variants' graphs neither
    count nor use up its recompile limit (past which it would run the encoder eagerly)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    vae = VaeEncoder(enc_dir, device=device, **knobs)
    t0 = time.perf_counter()
    latents = vae.encode(images)
    first_s = time.perf_counter() - t0
    vae.encode(images)  # a second warm-up: compiled graphs may specialise at their second call
    rate = images.shape[0] / timed(lambda: vae.encode(images), steps)
    return rate, first_s, latents, int(counters["stats"]["unique_graphs"])


def compare_vae(args, enc_dir: str, variants: dict[str, dict[str, bool]], result: dict) -> None:
    """Adds the bare diffusers anchor (once) and each variant's producer-code VAE figures to result["vae"]."""
    images = random_images(args.batch, args.side)
    out = result.setdefault("vae", {"side": args.side, "batch": args.batch, "steps": args.vae_steps})
    if "bare_diffusers_img_s" not in out:
        anchor = VaeEncoder(enc_dir, device=args.device)
        rate, ref = diffusers_vae(anchor, images, args.vae_steps)
        out["bare_diffusers_img_s"], out["dtype"] = round(rate, 2), str(anchor.dtype).removeprefix("torch.")
        out["producer"], out["target_ratio"] = {}, TARGET_VAE_RATIO
        out["_ref"] = ref
        del anchor
        free_memory()
    ref = out["_ref"]
    for name, v in variants.items():
        knobs = {"channels_last": v["channels_last"], "conv2d": v["conv2d"]}
        knobs["compile_mode"] = args.vae_compare_mode if v["compile"] else "off"
        try:
            rate, first_s, latents, graphs = producer_vae(enc_dir, args.device, knobs, images, args.vae_steps)
        except Exception as exc:  # one failing variant (a compile error, say) must not stop the others
            out["producer"][name] = {**knobs, "error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        finally:
            free_memory()
        diff = (latents.float() - ref.float()).abs().max().item()
        out["producer"][name] = {
            **knobs,
            "img_s": round(rate, 2),
            "ratio": round(rate / out["bare_diffusers_img_s"], 3),
            "first_call_s": round(first_s, 2),
            "graphs": graphs,  # TorchDynamo graphs captured (compiled variants: 1 = no graph break)
            "max_abs_diff": diff,
            "max_abs_ref": ref.float().abs().max().item(),
        }
    if args.full:
        out["anchor_img_s_1024_h200"] = ANCHOR_VAE_IMG_S_1024_H200


def compare_text(args, enc_dir: str, captions: list[str], result: dict) -> None:
    """result["text"]: Qwen2.5-VL prompts/s, bare (with and without the LM head) vs the producer's."""
    text = TextEncoder(enc_dir, device=args.device)
    batch = captions[: args.batch]
    texts = [T2I_TEMPLATE.format(c) for c in batch]

    @torch.no_grad()
    def bare(with_head: bool) -> torch.Tensor:
        enc = text.tokenizer(texts, padding=True, return_tensors="pt").to(text.device)
        if with_head:
            return text.model(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True
            ).hidden_states[-1]
        return text.model.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state

    rates = {}
    for name, fn in (
        ("bare_prompts_s", lambda: bare(True)),
        ("bare_no_lm_head_prompts_s", lambda: bare(False)),
        ("producer_prompts_s", lambda: text.encode_t2i(batch)),
    ):
        fn()  # warm-up
        rates[name] = len(batch) / timed(fn, args.text_steps)
    result["text"] = {
        "batch": len(batch),
        "tokens_per_prompt": round(float(np.mean([len(ids) for ids in text.tokenizer(texts).input_ids])), 1),
        **{k: round(v, 2) for k, v in rates.items()},
        "ratio": round(rates["producer_prompts_s"] / rates["bare_prompts_s"], 3),
    }


def shard_write_mb_s(tmp: Path, bucket: Bucket, n: int, text_dim: int) -> float:
    shutil.rmtree(tmp / "write-bench", ignore_errors=True)  # a reused --workdir starts afresh
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


def run_pipeline(args, tmp: Path, enc_dir: str, inputs, bucket: Bucket, result: dict) -> None:
    """The pipeline part: bare loop, then `produce()` on a private local Ray, then shard writes."""
    bare = bare_loop(enc_dir, inputs, bucket, args.batch, args.device, pipeline_knobs(args))
    free_memory()
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
        vae_channels_last=args.vae_channels_last,
        vae_compile=args.vae_compile,
        vae_conv2d=args.vae_conv2d,
    )
    import ray

    ray.init(  # address="local": a private instance, never a cluster another run left in /tmp/ray
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    shutil.rmtree(tmp / "cache", ignore_errors=True)  # a reused --workdir must not resume an earlier run
    start_unix, t0 = time.time(), time.perf_counter()
    counts = produce(
        ProduceRequest(str(tmp / "inputs"), str(tmp / "cache"), encoders=enc_dir, config=cfg, device=args.device)
    )
    pipeline = counts.committed / (time.perf_counter() - t0)
    ray.shutdown()
    startup_s, steady = steady_state(start_unix, commit_times(str(tmp / "cache")))
    result.update(
        {
            "actors": {"vae": args.vae_actors, "text": args.text_actors, "cpus_each": args.cpus_per_actor},
            "vae_knobs": pipeline_knobs(args),
            "startup_s": round(startup_s, 1),
            "steady_img_s": None if steady is None else round(steady, 2),
            "pipeline_img_s": round(pipeline, 2),
            "bare_img_s": round(bare, 2),
            "steady_ratio": None if steady is None else round(steady / bare, 3),
            "target_steady_ratio": TARGET_STEADY_RATIO,
            "ratio": round(pipeline / bare, 3),
            "shard_write_MB_s": round(shard_write_mb_s(tmp, bucket, 32, 3584 if args.full else 32), 1),
        }
    )


def public(obj):
    """`obj` without the private ("_"-prefixed) keys of its dicts, at any depth."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [public(v) for v in obj]
    return obj


def emit(result: dict, out: str | None) -> None:
    """One JSON line on stdout, and the same object into `out` (replaced atomically) when given."""
    line = json.dumps(public(result))
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + ".tmp").write_text(line + "\n")
        os.replace(out + ".tmp", out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    ap.add_argument("--batch", type=int, default=8, help="encoder batch size (every part)")
    ap.add_argument("--vae-base-dim", type=int, default=48, help="tiny VAE width: wide enough that encoding dominates")
    ap.add_argument("--full", action="store_true", help="full-size random-weight encoders (GPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--workdir",
        default=None,
        help="where encoders, inputs and caches go (default: a new temporary folder); a reused one keeps its "
        "built encoders (the --full ones take a minute and 17 GB) and starts its caches afresh",
    )
    ap.add_argument(
        "--parts",
        default=None,
        metavar="P,...",
        help=f"what to measure, a subset of {','.join(PARTS)} (default: pipeline; with --full every part)",
    )
    ap.add_argument(
        "--vae-channels-last", action="store_true", help="pipeline part, both sides: the VAE in channels_last_3d"
    )
    ap.add_argument(
        "--vae-conv2d", action="store_true", help="pipeline part, both sides: the VAE's causal convs as 2-D convs"
    )
    ap.add_argument(
        "--vae-compile",
        default="off",
        choices=VAE_COMPILE_MODES,
        help="pipeline part, both sides: torch.compile mode of the VAE encoder (default off)",
    )
    ap.add_argument(
        "--vae-variants",
        default=DEFAULT_VARIANTS,
        metavar="V,...",
        help=f"vae part: the producer-code variants to time, each 'default' or a '+'-join of {', '.join(KNOBS)} "
        f"(default {DEFAULT_VARIANTS})",
    )
    ap.add_argument(
        "--vae-compare-mode",
        default="default",
        choices=[m for m in VAE_COMPILE_MODES if m != "off"],
        help="vae part: the torch.compile mode of the variants that compile (default: default)",
    )
    ap.add_argument("--vae-steps", type=int, default=5, help="vae part: timed batches per variant (default 5)")
    ap.add_argument("--text-steps", type=int, default=5, help="text part: timed batches per figure (default 5)")
    ap.add_argument("--out", default=None, metavar="PATH", help="also keep the latest JSON line in this file")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in (args.parts or (",".join(PARTS) if args.full else "pipeline")).split(",")]
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--parts {args.parts!r}: expected a comma-separated subset of {','.join(PARTS)}")
    names = [v.strip() for v in args.vae_variants.split(",") if v.strip()]
    variants = {v: parse_variant(v) for v in names}
    if not names or None in variants.values():
        ap.error(
            f"--vae-variants {args.vae_variants!r}: expected comma-separated variants, each 'default' or a "
            f"'+'-join of {', '.join(KNOBS)}"
        )
    args.parts, args.variants = parts, variants
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
    result: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "images": args.n,
        "side": args.side,
        "parts_done": [],
    }
    eager = {k: v for k, v in args.variants.items() if not v["compile"]}
    compiled = {k: v for k, v in args.variants.items() if v["compile"]}
    steps = [
        ("vae", lambda: compare_vae(args, enc_dir, eager, result), "vae" in args.parts and eager),
        ("text", lambda: compare_text(args, enc_dir, [c for _, c in inputs], result), "text" in args.parts),
        ("pipeline", lambda: run_pipeline(args, tmp, enc_dir, inputs, bucket, result), "pipeline" in args.parts),
        ("vae_compile", lambda: compare_vae(args, enc_dir, compiled, result), "vae" in args.parts and compiled),
    ]
    for name, step, wanted in steps:
        if wanted:
            step()
            free_memory()  # the part's models are unreferenced once it returns
            result["parts_done"].append(name)
            emit(result, args.out)


if __name__ == "__main__":
    main()
