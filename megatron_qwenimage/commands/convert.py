"""``qwenimage convert``: diffusers <-> native checkpoints, streamed tensor by tensor.

    qwenimage convert /models/Qwen-Image/transformer ./qwen-image-native          # diffusers -> native
    qwenimage convert ./run/export-native ./qwen-image-diffusers --dtype bf16     # native -> diffusers

A native checkpoint holds every full tensor under our canonical names, so training loads it at
any TP/PP layout; a diffusers directory loads with ``QwenImageTransformer2DModel.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json

import torch

NAME = "convert"
DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            try:
                size = int(float(t[: -len(unit)]) * factor)
            except (ValueError, OverflowError):
                break
            if size > 0:
                return size
            break
    raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1048576B")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to the ``qwenimage`` parser."""
    p = subparsers.add_parser(
        NAME,
        help="Convert a transformer checkpoint between the diffusers and native formats.",
        description=(
            "Convert a Qwen-Image transformer checkpoint directory between diffusers' format "
            "(config.json + diffusion_pytorch_model*.safetensors) and this project's native format "
            "(mmdit_config.json + model*.safetensors, full tensors under canonical names, loadable "
            "at any TP/PP layout). Streams one tensor at a time; the model is never built."
        ),
    )
    p.add_argument("src", help="source checkpoint directory (its format is detected from its files)")
    p.add_argument("dst", help="destination directory (created; must be empty if it exists)")
    p.add_argument(
        "--to",
        choices=("native", "diffusers"),
        default=None,
        help="target format (default: the other format than the source's)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="keep",
        help="cast tensors on the way (default: keep the stored dtype)",
    )
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default="5GB",
        metavar="SIZE",
        help="split the output into safetensors shards with an index past this size (default: 5GB)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object describing the result at the end")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from megatron_qwenimage.convert import checkpoint_format, convert_checkpoint

    # A bad source or destination raises `CheckpointError` naming the path or tensor, before
    # anything is written; the command line reports it as one line (exit 2).
    source_format = checkpoint_format(args.src)
    with Progress(transient=True, disable=args.json) as bar:
        task = bar.add_task(f"{source_format} -> {args.to or 'other'}", total=None)
        to = convert_checkpoint(
            args.src,
            args.dst,
            to=args.to,
            dtype=DTYPES[args.dtype],
            max_shard_bytes=args.max_shard_size,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    result = {"source": str(args.src), "source_format": source_format, "destination": str(args.dst), "format": to}
    print(json.dumps(result) if args.json else f"wrote {to} checkpoint to {args.dst} (from {source_format})")
    return 0
