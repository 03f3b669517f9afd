"""Training-step benchmark: our `QwenImageMMDiT` against diffusers' `QwenImageTransformer2DModel`.

Both models are built from the same config in the same process with the same weights (ours is
loaded from the diffusers instance), and each timed step is forward + flow-matching loss +
backward + AdamW step on the same batch. Steps of the two models are interleaved so that machine
noise hits both alike; the median step time gives

* image tokens/s for each model and the ratio ours / diffusers (the target is >= 1.0);
* model TFLOP/s from `megatron_qwenimage.accounting.model_flops_per_sample` (the useful work of
  one training sample; the same count for both, so the TFLOP/s ratio equals the tokens/s ratio);
* on CUDA, MFU against the GPU's dense peak (`accounting.PEAK_TFLOPS`, or ``--peak-tflops``).

CPU default: ``bench-cpu`` (hidden 512, 4 blocks), 32x32 patches (512x512 px), 64 text tokens::

    python benchmarks/mmdit_step.py
    python benchmarks/mmdit_step.py --device cuda --dtype bf16 --config qwen-image-20b \\
        --layers 4 --height 1024 --width 1024 --text-tokens 256 --batch 2 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_qwenimage import accounting
from megatron_qwenimage.config import PIXELS_PER_TOKEN_SIDE, MMDiTConfig, load_config, validate_image_size
from megatron_qwenimage.flow_matching import flow_matching_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARAMS_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="bench-cpu", help="model config name or YAML path (default: %(default)s)")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="override num_layers, e.g. 4 for a slice of the 20B model (default: the config's)",
    )
    p.add_argument("--height", type=int, default=None, help="image height in px, a multiple of 16")
    p.add_argument("--width", type=int, default=None, help="image width in px, a multiple of 16")
    p.add_argument(
        "--patches",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="image size as a patch grid (1 patch = 16 px); default 32 32 unless --height/--width",
    )
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="samples per step (default: %(default)s)")
    p.add_argument(
        "--padded-text-tokens",
        type=int,
        default=0,
        metavar="N",
        help="pad the last N text tokens of every other sample (a text mask, as batches of "
        "captions of different lengths have; default: %(default)s, no mask)",
    )
    p.add_argument("--iters", type=int, default=10, help="timed steps per model (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="parameter and activation dtype of both models (default: %(default)s)",
    )
    p.add_argument(
        "--backend",
        choices=("local", "transformer_engine"),
        default="local",
        help="kernel backend of our model (default: %(default)s)",
    )
    p.add_argument(
        "--fp8",
        choices=("delayed", "current"),
        default=None,
        help="run our model's TE linears in FP8 with this Transformer Engine recipe "
        "(needs --backend transformer_engine on a CUDA GPU; default: no FP8)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense TFLOP/s of one GPU for MFU (default: from the detected GPU and --dtype)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


@dataclass(frozen=True)
class Workload:
    """One benchmark batch's sizes."""

    batch: int
    patches_h: int
    patches_w: int
    text_tokens: int

    @property
    def image_tokens(self) -> int:
        return self.patches_h * self.patches_w


def resolve_workload(args: argparse.Namespace) -> Workload:
    """Patch grid from ``--patches`` or ``--height/--width`` (px, multiples of 16)."""
    if args.patches is not None and (args.height is not None or args.width is not None):
        raise SystemExit("error: give either --patches or --height/--width, not both")
    if args.height is not None or args.width is not None:
        if args.height is None or args.width is None:
            raise SystemExit("error: --height and --width go together")
        validate_image_size(args.height, args.width)
        h, w = args.height // PIXELS_PER_TOKEN_SIDE, args.width // PIXELS_PER_TOKEN_SIDE
    else:
        h, w = args.patches or (32, 32)
    for name, value in (
        ("patch rows", h),
        ("patch cols", w),
        ("--batch", args.batch),
        ("--iters", args.iters),
        ("--text-tokens", args.text_tokens),
    ):
        if value <= 0:
            raise SystemExit(f"error: {name}={value} must be positive")
    if args.warmup < 0:
        raise SystemExit(f"error: --warmup={args.warmup} must be >= 0")
    return Workload(args.batch, h, w, args.text_tokens)


def make_inputs(config: MMDiTConfig, work: Workload, device, dtype, seed: int, padded_text_tokens: int = 0) -> dict:
    """Diffusers-signature inputs plus a velocity target; unpadded text (no mask) unless
    `padded_text_tokens` > 0, which pads that many trailing text tokens of every other sample."""
    g = torch.Generator().manual_seed(seed + 1)
    b, n, t = work.batch, work.image_tokens, work.text_tokens
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    mask = None
    if padded_text_tokens:
        if not 0 < padded_text_tokens < t:
            raise SystemExit(f"error: --padded-text-tokens {padded_text_tokens} must be in 1..{t - 1}")
        mask = torch.ones(b, t, dtype=torch.long, device=device)
        mask[::2, t - padded_text_tokens :] = 0
    return {
        "hidden_states": rand(b, n, config.in_channels),
        "encoder_hidden_states": rand(b, t, config.joint_attention_dim),
        # Without padding diffusers' pipeline passes no mask, so neither model pays for one.
        "encoder_hidden_states_mask": mask,
        "timestep": torch.rand(b, generator=g).to(device=device, dtype=dtype),
        "img_shapes": [[(1, work.patches_h, work.patches_w)]] * b,
        "target": rand(b, n, config.patch_size**2 * config.out_channels),
    }


def build_models(config: MMDiTConfig, args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, diffusers) with identical weights on the benchmark device and dtype."""
    from diffusers import QwenImageTransformer2DModel

    from megatron_qwenimage.convert import load_diffusers

    torch.manual_seed(args.seed)
    kwargs = {k: v for k, v in config.to_diffusers_config().items() if not k.startswith("_")}
    ref = QwenImageTransformer2DModel(**kwargs).to(args.device)
    if DTYPES[args.dtype] != torch.float32:
        ref = ref.to(DTYPES[args.dtype])
    ours = load_diffusers(ref, device=args.device, params_dtype=PARAMS_DTYPE_NAMES[args.dtype], backend=args.backend)
    return ours, ref


def make_step(
    model: torch.nn.Module,
    inputs: dict,
    *,
    returns_sample: bool,
    compile: bool,
    forward_context: Callable = contextlib.nullcontext,
) -> Callable[[], torch.Tensor]:
    """A closure running one fwd + loss + bwd + AdamW step; returns the (detached) loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    fwd = torch.compile(model) if compile else model
    args = {k: v for k, v in inputs.items() if k != "target"}

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with forward_context():
            out = fwd(**args)
        pred = out.sample if returns_sample else out
        loss = flow_matching_loss(pred, inputs["target"]).loss
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(steps: dict[str, Callable], warmup: int, iters: int, device: str) -> dict[str, list[float]]:
    """Run each step `warmup` times, then alternate them `iters` times; seconds per step."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    _sync(device)
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> dict:
    """Build, check and time both models; returns the result dict."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    overrides = {"params_dtype": PARAMS_DTYPE_NAMES[args.dtype], "backend": args.backend}
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    config = load_config(args.config, **overrides)
    work = resolve_workload(args)
    dtype = DTYPES[args.dtype]

    ours, ref = build_models(config, args)
    inputs = make_inputs(config, work, args.device, dtype, args.seed, args.padded_text_tokens)
    fwd_inputs = {k: v for k, v in inputs.items() if k != "target"}
    with torch.no_grad():
        diff = (ours(**fwd_inputs).float() - ref(**fwd_inputs, return_dict=False)[0].float()).abs().max().item()

    forward_context = contextlib.nullcontext
    if args.fp8 is not None:
        from consumers.precision import Precision, PrecisionConfig

        # Every block in FP8 (the training default keeps the first and last block in bf16).
        precision = Precision(PrecisionConfig(fp8=args.fp8, fp8_exclude=()), config, torch.device(args.device))
        precision.prepare_model(ours)
        forward_context = precision.forward_context
    steps = {
        "ours": make_step(ours, inputs, returns_sample=False, compile=args.compile, forward_context=forward_context),
        "diffusers": make_step(ref, inputs, returns_sample=True, compile=args.compile),
    }
    times = time_interleaved(steps, args.warmup, args.iters, args.device)

    flops_per_sample = accounting.model_flops_per_sample(config, work.image_tokens, work.text_tokens)
    result: dict = {
        "config": config.name,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": args.dtype,
        "backend": args.backend,
        "compile": args.compile,
        "fp8": args.fp8,
        "batch": work.batch,
        "padded_text_tokens": args.padded_text_tokens,
        "image_tokens": work.image_tokens,
        "text_tokens": work.text_tokens,
        "iters": args.iters,
        "warmup": args.warmup,
        "max_abs_diff_forward": diff,
        "model_flops_per_sample": flops_per_sample,
    }
    peak = None  # FLOP/s; the table has dense bf16/fp8 peaks only, so fp32 needs --peak-tflops
    if args.peak_tflops is not None:
        peak = accounting.peak_flops("", override_tflops=args.peak_tflops)
    elif args.device == "cuda" and args.dtype == "bf16":
        key = accounting.gpu_key_from_device_name(result["device"])
        peak = accounting.peak_flops(key, "bf16") if key else None
    for name, ts in times.items():
        med = statistics.median(ts)
        flops_s = flops_per_sample * work.batch / med
        result[name] = {
            "median_step_s": med,
            "min_step_s": min(ts),
            "image_tokens_per_s": work.batch * work.image_tokens / med,
            "model_tflops_per_s": flops_s / 1e12,
            "mfu": accounting.mfu(flops_s, peak) if peak else None,
        }
    result["ratio"] = result["ours"]["image_tokens_per_s"] / result["diffusers"]["image_tokens_per_s"]
    result["peak_tflops"] = peak / 1e12 if peak else None
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['config']} ({result['num_layers']} blocks, hidden {result['hidden_size']}) on {result['device']}, "
        f"{result['dtype']}, backend={result['backend']}{', fp8 ' + result['fp8'] if result['fp8'] else ''}"
        f"{', compiled' if result['compile'] else ''}: "
        f"batch {result['batch']} x ({result['image_tokens']} image + {result['text_tokens']} text tokens), "
        f"median of {result['iters']} steps"
    )
    print(f"forward max |ours - diffusers| = {result['max_abs_diff_forward']:.3g}")
    for name in ("ours", "diffusers"):
        r = result[name]
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        print(
            f"  {name:9s} {r['median_step_s'] * 1e3:9.1f} ms/step  {r['image_tokens_per_s']:12.0f} image tokens/s  "
            f"{r['model_tflops_per_s']:8.3f} TFLOP/s{mfu}"
        )
    print(f"ratio ours/diffusers (tokens/s): {result['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
