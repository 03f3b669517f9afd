"""``qwenimage model-info``: parameters, FLOPs per sample and per-GPU memory of a model config.

Everything is analytic (`megatron_qwenimage.accounting`); no weights are built, so the 20B
config answers instantly on a laptop::

    qwenimage model-info --config qwen-image-20b --tp 4 --dp 8 --height 1328 --width 1328
    qwenimage model-info --config qwen-image-20b --tp 4 --json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from megatron_qwenimage import accounting
from megatron_qwenimage.config import (
    PIXELS_PER_TOKEN_SIDE,
    ConfigError,
    MMDiTConfig,
    load_config,
    validate_image_size,
    validate_text_length,
)

NAME = "model-info"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``model-info`` subcommand to the ``qwenimage`` parser."""
    p = subparsers.add_parser(
        NAME,
        help="Print parameter counts, FLOPs per sample and per-GPU memory of a model config.",
        description=(
            "Analytic parameter counts, model FLOPs per training sample at a resolution, and a "
            "per-GPU memory estimate for a TP/PP/DP layout. Nothing is allocated."
        ),
    )
    p.add_argument(
        "--config",
        default="qwen-image-20b",
        metavar="NAME_OR_YAML",
        help="named model config (qwen-image-20b, tiny, tiny-16ch, bench-cpu) or a path to a YAML file "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor-parallel size (default: the config's tensor_model_parallel_size)",
    )
    p.add_argument("--pp", type=int, default=1, metavar="N", help="pipeline-parallel size (default: %(default)s)")
    p.add_argument(
        "--dp",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel size; shards optimizer state with ZeRO-1 (default: %(default)s)",
    )
    p.add_argument(
        "--micro-batch", type=int, default=1, metavar="N", help="samples per micro-batch per GPU (default: %(default)s)"
    )
    p.add_argument(
        "--height",
        type=int,
        default=1024,
        metavar="PX",
        help="image height in pixels, a multiple of 16 (default: %(default)s)",
    )
    p.add_argument(
        "--width",
        type=int,
        default=1024,
        metavar="PX",
        help="image width in pixels, a multiple of 16 (default: %(default)s)",
    )
    p.add_argument(
        "--text-tokens",
        type=int,
        default=256,
        metavar="N",
        help="text conditioning tokens per sample after padding (default: %(default)s)",
    )
    p.add_argument(
        "--recompute",
        choices=accounting.RECOMPUTE,
        default="none",
        help="activation recompute policy for the memory estimate (default: %(default)s)",
    )
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="assume Megatron sequence parallelism (activations sharded over TP)",
    )
    p.add_argument(
        "--no-zero1",
        dest="zero1",
        action="store_false",
        help="replicate optimizer state on every data-parallel rank instead of sharding it",
    )
    p.add_argument(
        "--dp-shard",
        type=int,
        default=None,
        metavar="K",
        help="HSDP: shard the optimizer state over groups of K data-parallel ranks and replicate it "
        "across the groups, as the run config's parallel.dp_shard (default: over all --dp ranks)",
    )
    p.add_argument(
        "--sharding",
        choices=accounting.SHARDINGS,
        default="zero1",
        help="zero1: a whole-model gradient buffer; zero2: two one-unit gradient slots reduced per "
        "micro-batch; zero3: zero2, and each block's parameters freed between its forward and "
        "backward (one block whole at a time), as the run config's data_parallel.sharding "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--grad-reduce-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the gradient buffer and its DP reduce-scatter, as the run config's "
        "data_parallel.grad_reduce_dtype (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)
    return p


def model_info(
    config: MMDiTConfig,
    *,
    tp: int,
    pp: int,
    dp: int,
    micro_batch: int,
    height: int,
    width: int,
    text_tokens: int,
    recompute: str = "none",
    sequence_parallel: bool = False,
    zero1: bool = True,
    grad_reduce_dtype: str = "float32",
    dp_shard: int | None = None,
    sharding: str = "zero1",
) -> dict[str, Any]:
    """Everything ``model-info`` reports, as a JSON-serialisable dict (bytes and FLOPs as numbers).

    Raises `ConfigError` for a layout that training refuses, with training's own message
    (`megatron_qwenimage.layout.ParallelLayout.validate_for`), and for a bad size or count.
    """
    check_layout(config, tp=tp, pp=pp, dp=dp, sequence_parallel=sequence_parallel, dp_shard=dp_shard)
    validate_image_size(height, width)
    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise ConfigError(f"--micro-batch={micro_batch!r}: expected a positive integer")
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise ConfigError(f"--text-tokens={text_tokens!r}: expected a non-negative integer")
    validate_text_length(text_tokens, limit=config.max_text_tokens)
    image_tokens = (height // PIXELS_PER_TOKEN_SIDE) * (width // PIXELS_PER_TOKEN_SIDE)
    counts = accounting.parameter_counts(config)
    flops = accounting.model_flops_breakdown(config, image_tokens, text_tokens, training=True)
    mem = accounting.memory_per_gpu(
        config,
        tp,
        pp,
        dp,
        micro_batch,
        image_tokens,
        text_tokens,
        params_dtype="bfloat16",
        grad_dtype=grad_reduce_dtype,
        optimizer="adamw",
        zero1=zero1,
        dp_shard=dp_shard,
        sharding=sharding,
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        implementation="ours",
    )
    peak = accounting.peak_of(mem, config)  # the planner's prediction (qwenimage plan)
    memory_bytes = {k: v for k, v in peak.items() if k not in ("stage", "fp8_weights")}
    return {
        "config": config.name,
        "params": counts.total,
        "trainable_params": counts.trainable,
        "unused_last_block_params": counts.unused,
        "params_per_block": counts.block,
        "params_non_block": counts.non_block,
        "height": height,
        "width": width,
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "flops_per_sample": flops.total,
        "flops_breakdown_forward": {
            k: v for k, v in flops.to_dict().items() if k not in ("training", "forward", "total")
        },
        "layout": mem.layout,
        "memory_max_stage": peak["stage"],
        "memory_per_gpu_bytes": memory_bytes,
        "memory_per_gpu_gib": {k: v / accounting.GIB for k, v in memory_bytes.items()},
        "memory_stages": [s.to_dict() for s in mem.stages],
    }


def check_layout(
    config: MMDiTConfig, *, tp: int, pp: int, dp: int, sequence_parallel: bool = False, dp_shard: int | None = None
) -> None:
    """`ConfigError` for a TP/PP/DP layout that ``qwenimage train`` refuses for `config`: the same
    check (`ParallelLayout` and its `validate_for`) and message, prefixed by the flags."""
    from megatron_qwenimage.layout import ParallelLayout

    flags = f"--tp {tp} --pp {pp} --dp {dp}" + (f" --dp-shard {dp_shard}" if dp_shard is not None else "")
    try:
        ParallelLayout(tp=tp, pp=pp, dp=dp, sequence_parallel=sequence_parallel, dp_shard=dp_shard).validate_for(config)
    except ConfigError as exc:
        raise ConfigError(f"{flags}: {exc} (qwenimage train refuses this layout)") from None


def _fmt_flops(n: float) -> str:
    """SI-prefixed FLOPs, e.g. ``404.070 TFLOP``."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def render(info: dict[str, Any], console) -> None:
    """Print `info` as rich tables."""
    from rich.table import Table

    params = Table(title=f"Parameters ({info['config']})")
    params.add_column("component")
    params.add_column("count", justify="right")
    for name, n in info["params_per_block"].items():
        params.add_row(f"block.{name} (x1)", f"{n:,}")
    for name, n in info["params_non_block"].items():
        params.add_row(name, f"{n:,}")
    params.add_row("[bold]total[/bold]", f"[bold]{info['params']:,}[/bold]")
    params.add_row("last-block buffers (not trained)", f"{info['unused_last_block_params']:,}")
    params.add_row("trainable", f"{info['trainable_params']:,}")
    console.print(params)

    flops = Table(
        title=(
            f"Model FLOPs per sample: {info['height']}x{info['width']} px = {info['image_tokens']} image tokens, "
            f"{info['text_tokens']} text tokens"
        )
    )
    flops.add_column("term (forward)")
    flops.add_column("FLOPs", justify="right")
    for name, n in info["flops_breakdown_forward"].items():
        flops.add_row(name, _fmt_flops(n))
    flops.add_row("[bold]fwd+bwd (3x forward)[/bold]", f"[bold]{_fmt_flops(info['flops_per_sample'])}[/bold]")
    console.print(flops)

    lay = info["layout"]
    mem = Table(
        title=f"Memory per GPU (worst pipeline stage: {info['memory_max_stage']})",
        caption=(
            f"tp={lay['tp']} pp={lay['pp']} dp={lay['dp']}"
            f"{'' if lay['dp_shard'] is None else ' (HSDP: shards of ' + str(lay['dp_shard']) + ')'} micro-batch={lay['micro_batch']} "
            f"recompute={lay['recompute']}{' +SP' if lay['sequence_parallel'] else ''}; bf16 params, "
            f"{'fp32' if lay['grad_dtype'] == 'float32' else 'bf16'} grads, AdamW{(' ZeRO-' + lay['sharding'][-1]) if lay['zero1'] else ''}"
        ),
    )
    mem.add_column("what")
    mem.add_column("GiB", justify="right")
    for name, gib in info["memory_per_gpu_gib"].items():
        mem.add_row(name, f"{gib:.2f}")
    console.print(mem)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qwenimage model-info``; returns the exit status. A bad flag or config
    raises `ConfigError`, which the command line reports as one line (exit 2)."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        if args.config in str(exc):
            raise
        raise ConfigError(f"--config {args.config}: {exc}") from None
    tp = config.tensor_model_parallel_size if args.tp is None else args.tp
    info = model_info(
        config,
        tp=tp,
        pp=args.pp,
        dp=args.dp,
        micro_batch=args.micro_batch,
        height=args.height,
        width=args.width,
        text_tokens=args.text_tokens,
        recompute=args.recompute,
        sequence_parallel=args.sequence_parallel,
        zero1=args.zero1,
        grad_reduce_dtype=args.grad_reduce_dtype,
        dp_shard=args.dp_shard,
        sharding=args.sharding,
    )
    if args.json:
        print(json.dumps(info))
    else:
        from rich.console import Console

        render(info, Console())
    return 0
