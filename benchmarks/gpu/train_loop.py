"""The real training loop on one GPU: ``qwenimage train``, FP8 (delayed) against bf16, same data.

Writes a latent cache of synthetic full-size samples (1024² latents ``[16, 128, 128]`` and 3584-dim
text embeddings, through the producers' commit protocol), then runs ``python -m consumers.train``
on it twice with the same seeds, once per precision, and reads both runs' ``metrics.jsonl``:

* the loss curves (interval means) and their largest relative difference (target: FP8 within
  2 % of bf16);
* the loop's model TFLOP/s and data-wait share per interval after the first (target: within 10 %
  of `benchmarks/gpu/run.py`'s ``ours_te_fp8_delayed_dist_opt`` step, data wait under 2 %);
* the run's peak device memory (the training log's ``memory_bytes``) against the planner's
  prediction for the same layout (`megatron_qwenimage.accounting.peak_memory_per_gpu`; target:
  within 15 %).

A run is ``bf16`` or ``fp8`` with options after colons: ``nofused`` (``fused_elementwise`` off) and
``graphs`` (``cuda_graphs.scope: blocks``, per-block CUDA graphs in the loop, with the text padded
to its full length so that the one bucket is one layout) and, with fp8, ``dpa``
(``precision.fp8_attention``), e.g. ``fp8:nofused:graphs``.

One JSON line per run and one summary line go to ``--out``::

    python3 benchmarks/gpu/train_loop.py --work /tmp/loop --out $OUT/train_loop.jsonl

``--tiny`` runs the same path on CPU at toy sizes (bf16 only; FP8 and graphs are recorded as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_qwenimage.cache import Bucket, SampleMeta, ShardTensors, init_cache, open_cache  # noqa: E402
from megatron_qwenimage.cache.shard_format import offsets_from_lengths  # noqa: E402
from megatron_qwenimage.cache.writer import ShardPayload, publish_partition  # noqa: E402


def write_cache(
    path: Path,
    *,
    res: int,
    samples: int,
    per_partition: int,
    text_tokens: int,
    text_dim: int,
    channels: int = 16,
    seed: int = 0,
) -> str:
    """A committed cache of `samples` synthetic t2i samples of one `res`² bucket (one snapshot)."""
    if path.exists():
        shutil.rmtree(path)
    cache = init_cache(str(path))
    bucket = Bucket(res, res)
    g = torch.Generator().manual_seed(seed)
    for p, start in enumerate(range(0, samples, per_partition)):
        n = min(per_partition, samples - start)
        latents = torch.randn(n, channels, bucket.latent_height, bucket.latent_width, generator=g)
        lengths = [text_tokens] * n
        text = torch.randn(sum(lengths), text_dim, generator=g).to(torch.bfloat16)
        metas = [
            SampleMeta(
                f"p{p}-{i}",
                "t2i",
                f"synthetic {start + i}",
                f"synthetic://{start + i}",
                None,
                text_tokens,
                False,
                res,
                res,
            )
            for i in range(n)
        ]
        payload = ShardPayload(
            bucket, ShardTensors(latents.to(torch.bfloat16), text, offsets_from_lengths(lengths)), metas
        )
        result = publish_partition(cache.storage, f"p{p}", inputs=n, shards=[payload])
        if not result.won:
            raise RuntimeError(f"partition p{p} was not committed")
    open_cache(str(path)).create_snapshot()
    return str(path)


#: Options a run of ``--runs`` may carry after its precision (``dpa``: FP8 runs only).
RUN_OPTIONS = ("nofused", "graphs", "dpa")


def parse_run(run: str) -> tuple[str, frozenset[str]]:
    """``"fp8:nofused:graphs"`` -> ``("fp8", {"nofused", "graphs"})``; ValueError naming the run."""
    precision, *options = run.split(":")
    if (
        precision not in ("bf16", "fp8")
        or any(o not in RUN_OPTIONS for o in options)
        or ("dpa" in options and precision != "fp8")
    ):
        raise ValueError(
            f"--runs: {run!r} is not bf16 or fp8, optionally with {', '.join(':' + o for o in RUN_OPTIONS)} "
            "(':dpa', FP8 attention, with fp8 only)"
        )
    return precision, frozenset(options)


def run_config(args, cache: str, run: str, run_dir: Path) -> dict:
    """The run YAML of one `run` of ``--runs`` (`parse_run`)."""
    precision, options = parse_run(run)
    model = {
        "name": args.config,
        "num_layers": args.layers,
        "params_dtype": "bfloat16" if not args.tiny else "float32",
        "backend": "transformer_engine" if precision == "fp8" or args.backend == "transformer_engine" else "local",
        "fused_elementwise": bool(args.fused) and "nofused" not in options,
    }
    graphs = "graphs" in options
    return {
        "model": model,
        "parallel": {"tp": 1, "pp": 1},
        "optimizer": {"lr": 1.0e-4, "warmup_steps": 5, "clip_grad": 1.0},
        # Every block of the 4-block slice in FP8 (the default keeps the first and last in bf16).
        "precision": {
            "autocast": "none",
            "fp8": "delayed" if precision == "fp8" else None,
            "fp8_exclude": [],
            "fp8_attention": "dpa" in options,
        },
        "recompute": {"mode": "none"},
        "cuda_graphs": {"scope": "blocks" if graphs else "none"},
        "flow_matching": {"kind": "logit_normal", "mean": 0.0, "std": 1.0},
        "data": {
            "seed": 0,
            "tasks": {"t2i": 1.0},
            "text_length": args.text_tokens,
            "caches": [{"path": cache, "mode": "fixed"}],
            "stages": [
                {
                    "name": "loop",
                    "buckets": [f"{args.res}x{args.res}"],
                    "micro_batch": args.batch,
                    "global_batch": args.batch,
                }
            ],
        },
        # With graphs every step's text is padded to the full length: one layout to capture.
        "schedule": {
            "train_steps": args.steps,
            "seed": 0,
            **({"text_pad_multiple": args.text_tokens} if graphs else {}),
        },
        "logging": {"dir": str(run_dir), "interval": args.log_interval, "tensorboard": False},
    }


def predicted_peak_bytes(args, precision: str) -> float:
    """`accounting.peak_memory_per_gpu` of the loop's layout: one GPU, micro-batch `args.batch`
    at ``args.res``² (``(res / 16)²`` image tokens: VAE /8, patch 2) with ``args.text_tokens``."""
    from megatron_qwenimage.accounting import peak_memory_per_gpu
    from megatron_qwenimage.config import load_config

    config = load_config(args.config, num_layers=args.layers)
    return peak_memory_per_gpu(
        config,
        1,
        1,
        1,
        args.batch,
        (args.res // 16) ** 2,
        args.text_tokens,
        fp8=precision == "fp8",
    )["total"]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_once(args, cache: str, precision: str) -> dict:
    run_dir = Path(args.work) / f"run-{precision.replace(':', '-')}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(args, cache, precision, run_dir)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "consumers.train", "--config", str(cfg_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        proc = subprocess.CompletedProcess(exc.cmd, -9, "", f"timed out after {args.timeout_s} s\n{stderr[-2000:]}")
    wall = time.monotonic() - t0
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    out = {
        "what": "train_loop",
        "precision": precision,
        "rc": proc.returncode,
        "wall_s": wall,
        "steps": args.steps,
        "res": args.res,
        "batch": args.batch,
        "layers": args.layers,
    }
    if proc.returncode != 0 or not records:
        out["error"] = (proc.stderr or proc.stdout)[-2500:]
        if not records:
            return out
    steady = records[1:] or records
    keys = {k for r in records for k in r}
    tflops_key = next((k for k in ("tflops_per_gpu", "model_tflops_per_gpu", "tflops") if k in keys), None)
    wait_key = next((k for k in ("data_wait_frac", "data_wait_fraction", "data_wait") if k in keys), None)
    out["loss_by_interval"] = [r["loss"] for r in records]
    out["step_of_interval"] = [r.get("step") for r in records]
    out["metric_keys"] = sorted(keys)
    if tflops_key:
        out["tflops_steady"] = sum(r[tflops_key] for r in steady) / len(steady)
    if wait_key:
        out["data_wait_steady"] = sum(r[wait_key] for r in steady) / len(steady)
    for k in ("step_time_s", "step_time", "ms_per_step"):
        if k in keys:
            out[f"{k}_steady"] = sum(r[k] for r in steady) / len(steady)
    out["predicted_peak_gib"] = predicted_peak_bytes(args, parse_run(precision)[0]) / 2**30
    if "memory_bytes" in keys:
        # CUDA: torch.cuda.max_memory_allocated; on CPU the process's peak RSS (not comparable).
        out["peak_gib"] = max(r["memory_bytes"] for r in records) / 2**30
        if torch.cuda.is_available():
            out["peak_vs_predicted"] = out["peak_gib"] / out["predicted_peak_gib"]
    return out


def emit(path: str | None, record: dict) -> None:
    line = json.dumps(record)
    print(line[:3000], flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/qwenimage-train-loop", help="cache and run directories (recreated)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU (bf16 run only)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 50; 4 with --tiny)")
    p.add_argument("--samples", type=int, default=None, help="samples in the cache (default: 32; 8 with --tiny)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="per training run (default: %(default)s)")
    p.add_argument("--backend", default=None, help="backend of the bf16 run (default: transformer_engine on CUDA)")
    p.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="MMDiTConfig.fused_elementwise (default: on with CUDA)",
    )
    p.add_argument(
        "--runs",
        default="bf16,fp8,fp8:graphs",
        metavar="RUN,...",
        help="runs in order: bf16 | fp8, each optionally with ':nofused' (fused_elementwise off), "
        "':graphs' (per-block CUDA graphs in the loop) and, fp8 only, ':dpa' (FP8 attention); the summary "
        "compares the first bf16 and the first fp8 run (default: %(default)s)",
    )
    args = p.parse_args(argv)
    args.config = "tiny-16ch" if args.tiny else "qwen-image-20b"
    args.layers = 2 if args.tiny else 4
    args.res = 64 if args.tiny else 1024
    args.batch = 2
    args.text_tokens = 16 if args.tiny else 256
    args.steps = args.steps or (4 if args.tiny else 50)
    args.samples = args.samples or (8 if args.tiny else 32)
    args.log_interval = 2 if args.tiny else 5
    if args.fused is None:
        args.fused = torch.cuda.is_available() and not args.tiny
    if args.backend is None:
        args.backend = "transformer_engine" if torch.cuda.is_available() and not args.tiny else "local"
    from megatron_qwenimage.config import load_config

    text_dim = load_config(args.config).joint_attention_dim
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    cache = write_cache(
        work / "cache",
        res=args.res,
        samples=args.samples,
        per_partition=max(1, args.samples // 4),
        text_tokens=args.text_tokens,
        text_dim=text_dim,
    )
    emit(
        args.out,
        {"what": "train_loop_cache", "samples": args.samples, "res": args.res, "write_s": time.monotonic() - t0},
    )
    try:
        parsed = {run: parse_run(run) for run in args.runs.split(",")}
    except ValueError as exc:
        p.error(str(exc))
    runs = {}
    for run, (precision, options) in parsed.items():
        if (precision == "fp8" or "graphs" in options) and not torch.cuda.is_available():
            emit(
                args.out,
                {"what": "train_loop", "precision": run, "skipped": "needs a CUDA GPU with Transformer Engine"},
            )
            continue
        runs[run] = train_once(args, cache, run)
        emit(args.out, runs[run])
    summary = {"what": "train_loop_summary"}
    a = next((r for k, r in runs.items() if k.startswith("bf16")), {})
    b = next((r for k, r in runs.items() if k.startswith("fp8")), {})
    for name, r in runs.items():  # graphs against the same run without them
        precision, options = parsed[name]
        if "graphs" in options:
            twin = next((n for n, (pr, op) in parsed.items() if pr == precision and op == options - {"graphs"}), None)
            if twin in runs and runs[twin].get("tflops_steady") and r.get("tflops_steady"):
                summary[f"{name}_vs_{twin}_tflops"] = r["tflops_steady"] / runs[twin]["tflops_steady"]
    if a.get("loss_by_interval") and b.get("loss_by_interval"):
        rel = [abs(x - y) / abs(x) for x, y in zip(a["loss_by_interval"], b["loss_by_interval"])]
        summary["fp8_vs_bf16_loss_max_rel"] = max(rel)
        summary["fp8_vs_bf16_loss_final_rel"] = rel[-1]
    for name, r in runs.items():
        for k in ("tflops_steady", "data_wait_steady", "peak_vs_predicted"):
            if k in r:
                summary[f"{name}_{k}"] = r[k]
    emit(args.out, summary)
    return 0 if all(r.get("rc") == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
