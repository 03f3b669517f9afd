"""``qwenimage plan``: choose TP, PP, DP, recompute and micro-batches for N GPUs (`megatron_qwenimage.planner`).

Nothing is allocated; the answer comes from the memory accounting and the measured rates of our
training step, VAE and text encoder (docs/launch.md, "Capacity planner")::

    qwenimage plan --gpus 64 --gpu h200 --resolution-mix 256:0.2,640:0.3,1328:0.5 --images 1e9
    qwenimage plan --gpus 64 --gpu h100 --resolution-mix 1328:1 --micro-batch 1 --json

A bad flag, or a GPU count that no layout fits, is one line naming the flag or the reason (exit 2).
"""

from __future__ import annotations

import argparse
import json

NAME = "plan"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to the ``qwenimage`` parser."""
    p = subparsers.add_parser(
        NAME,
        help="Choose the parallel layout, recompute and micro-batches for a GPU count; size producers and storage.",
        description=(
            "Predict memory per GPU and images/s of every TP x PP x DP layout and recompute mode of the 20B "
            "model on --gpus GPUs, choose the fastest one that fits (with a stated memory reserve), and size the "
            "producer pool and the cache from measured encoder rates and the cache format. docs/launch.md explains "
            "every number."
        ),
    )
    p.add_argument("--gpus", required=True, metavar="N", help="consumer GPUs (training world size)")
    p.add_argument("--gpu", default="h200", metavar="MODEL", help="GPU model: h100, h200 or b200 (default: h200)")
    p.add_argument(
        "--resolution-mix",
        required=True,
        metavar="RES:FRAC,...",
        help="square resolutions in px (multiples of 16) and the fraction of trained images at each, summing to 1, "
        "e.g. 256:0.2,640:0.3,1328:0.5",
    )
    p.add_argument(
        "--micro-batch",
        default=None,
        metavar="N|RES:N,...",
        help="fix the micro-batch (one number, or one per resolution) instead of choosing it",
    )
    p.add_argument(
        "--global-batch",
        default=None,
        metavar="N|RES:N,...",
        help="samples per optimizer step (one number, or one per resolution; default 1024), rounded up to a "
        "multiple of dp x micro-batch",
    )
    p.add_argument("--images", default=None, metavar="N", help="images to train on (e.g. 1e9): cache size, duration")
    p.add_argument("--precision", default="bf16", metavar="P", help="bf16 or fp8 (default: bf16)")
    p.add_argument(
        "--reserve",
        default="0.10",
        metavar="FRAC",
        help="fraction of HBM kept free for allocator fragmentation, NCCL buffers and the CUDA context (default: 0.10)",
    )
    p.add_argument("--hbm-gib", default=None, metavar="GIB", help="override the GPU's usable memory in GiB")
    p.add_argument(
        "--text-tokens",
        default="256",
        metavar="N",
        help="text tokens per sample as the model runs (captions padded to the step's longest; default: 256)",
    )
    p.add_argument(
        "--caption-tokens",
        default=None,
        metavar="N",
        help="mean unpadded caption tokens: cached text bytes and text-encoder work (default: --text-tokens)",
    )
    p.add_argument("--gpus-per-node", default="8", metavar="N", help="GPUs per node (default: 8)")
    p.add_argument(
        "--no-sequence-parallel",
        dest="sequence_parallel",
        action="store_false",
        help="do not use sequence parallelism with TP > 1 (default: use it)",
    )
    p.add_argument(
        "--recompute",
        default="none,selective,full",
        metavar="MODES",
        help="recompute modes to consider, comma-separated (default: none,selective,full)",
    )
    p.add_argument(
        "--partition-size",
        default="64",
        metavar="N",
        help="producer inputs per partition: amortises per-shard bytes (default: 64, the producers' default)",
    )
    p.add_argument(
        "--metadata-bytes",
        default="1024",
        metavar="B",
        help="samples.parquet bytes per sample (caption, URIs, id; default: 1024)",
    )
    p.add_argument(
        "--grad-reduce-dtype",
        default="float32",
        metavar="DTYPE",
        help="dtype of the DP gradient reduce-scatter, as the run config's data_parallel.grad_reduce_dtype: "
        "float32 (4 bytes per gradient) or bfloat16 (2: half the bytes on the wire and half the gradient "
        "buffer); changes the modelled DP communication and the predicted memory (default: float32)",
    )
    p.add_argument("--intra-node-gbs", default=None, metavar="GB/S", help="NVLink bus bandwidth per GPU (assumed)")
    p.add_argument(
        "--inter-node-gbs", default=None, metavar="GB/S", help="network bus bandwidth per GPU between nodes (assumed)"
    )
    p.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="benchmark records to take the measured rates from (default: megatron_qwenimage/gpu_results)",
    )
    p.add_argument("--runners-up", default="8", metavar="N", help="runner-up layouts to list (default: 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)
    return p


def inputs_from_args(args: argparse.Namespace):
    """`megatron_qwenimage.planner.PlanInputs` from the parsed flags; `PlanError` names a bad flag."""
    from megatron_qwenimage import planner as P

    def integer(flag: str, text) -> int | None:
        if text is None:
            return None
        value = P._number(flag, text, int)
        if value < 1:
            raise P.PlanError(f"{flag} {text}: expected a positive integer")
        return value

    def positive(flag: str, text) -> float | None:
        if text is None:
            return None
        value = P._number(flag, text)
        if not value > 0:
            raise P.PlanError(f"{flag} {text}: expected a positive number")
        return value

    gpus = integer("--gpus", args.gpus)
    if args.gpu not in P.GPUS:
        raise P.PlanError(f"--gpu {args.gpu!r}: unknown GPU; expected one of {', '.join(sorted(P.GPUS))}")
    mix = P.parse_mix(args.resolution_mix)
    resolutions = [r for r, _ in mix]
    images = None
    if args.images is not None:
        value = P._number("--images", args.images)
        if value < 1 or value != int(value):
            raise P.PlanError(f"--images {args.images}: expected a positive whole number of images")
        images = int(value)
    reserve = P._number("--reserve", args.reserve)
    if not 0 <= reserve < 1:
        raise P.PlanError(f"--reserve {args.reserve}: expected a fraction of HBM in [0, 1)")
    caption = integer("--caption-tokens", args.caption_tokens)
    return P.PlanInputs(
        gpus=gpus,
        gpu=args.gpu,
        mix=mix,
        micro_batch=P.parse_per_resolution(args.micro_batch, "--micro-batch", resolutions),
        global_batch=P.parse_per_resolution(args.global_batch, "--global-batch", resolutions) or {},
        images=images,
        precision=args.precision,
        reserve=reserve,
        hbm_gib=positive("--hbm-gib", args.hbm_gib),
        text_tokens=integer("--text-tokens", args.text_tokens),
        caption_tokens=caption,
        gpus_per_node=integer("--gpus-per-node", args.gpus_per_node),
        sequence_parallel=args.sequence_parallel,
        partition_size=integer("--partition-size", args.partition_size),
        metadata_bytes=positive("--metadata-bytes", args.metadata_bytes),
        recompute=tuple(m.strip() for m in str(args.recompute).split(",") if m.strip()),
        intra_node_gb_s=positive("--intra-node-gbs", args.intra_node_gbs),
        inter_node_gb_s=positive("--inter-node-gbs", args.inter_node_gbs),
        results_dir=args.results if args.results is not None else str(P.DEFAULT_RESULTS_DIR),
        grad_reduce_dtype=args.grad_reduce_dtype,
    )


def _si(n: float, unit: str = "B") -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def _mb(plan_summary: dict) -> str:
    return " ".join(f"{r}:{b}" for r, b in plan_summary["micro_batch"].items())


def render(d: dict) -> str:
    """The plan as text (the ``--json`` object's content)."""
    lines = []
    mix = ", ".join(f"{r} px {f:.0%}" for r, f in d["resolution_mix"].items())
    lines.append(f"qwenimage plan: {d['gpus']} x {d['gpu_label']}, {d['precision']}, resolution mix {mix}")
    sp = " +SP" if d["sequence_parallel"] else ""
    lines.append(
        f"chosen: tp={d['tp']}{sp} pp={d['pp']} dp={d['dp']} recompute={d['recompute']}, micro-batch {_mb(d)} "
        f"(by resolution)"
    )
    lines.append(
        f"  predicted peak memory {d['memory_gib']:.1f} GiB per GPU <= budget {d['budget_gib']:.1f} GiB "
        f"({d['hbm_gib']:g} GiB HBM less --reserve {d['reserve']:g})"
    )
    per_gpu = d["images_per_s"] / d["gpus"]
    lines.append(f"  predicted {d['images_per_s']:.1f} images/s ({per_gpu:.3f} per GPU), mean step {d['step_s']:.2f} s")
    lines.append(
        f"  {d['model_tflops_per_gpu']:.0f} model TFLOP/s per GPU ({d['mfu']:.1%} MFU of the {d['precision']} data-sheet "
        f"peak {d['peak_tflops']:.0f}); DP communication {d['dp_comm_s']:.3f} s per step, {d['dp_exposed_s']:.3f} s of "
        "it exposed"
    )
    if "train_days" in d:
        lines.append(f"  {d['images']:.3g} images take {d['train_days']:.1f} days")
    lines.append("  per resolution:")
    lines.append(
        "    res px  mb  mb/step  global  memory GiB  step s  img/s   compute  bubble  tp comm  pp comm  dp comm  "
        "dp exposed  optim"
    )
    for b in d["buckets"]:
        t = b["step_parts_s"]
        lines.append(
            f"    {b['resolution']:>6}  {b['micro_batch']:>2}  {b['microbatches']:>7}  {b['global_batch']:>6}  "
            f"{b['memory_gib']:>10.1f}  {b['step_s']:>6.2f}  {b['images_per_s']:>6.1f}  {t['compute']:>7.2f}  "
            f"{t['bubble_share']:>6.1%}  {t['tp_comm']:>7.3f}  {t['pp_comm']:>7.3f}  {t['dp_comm']:>7.3f}  "
            f"{t['dp_exposed']:>10.3f}  {t['optimizer']:>5.3f}"
        )
    worst = max(d["buckets"], key=lambda b: b["memory_gib"])
    parts = ", ".join(f"{k} {v:.1f}" for k, v in worst["memory_parts_gib"].items() if k not in ("total", "stage") and v)
    lines.append(
        f"  memory at {worst['resolution']} px (pipeline stage {worst['memory_parts_gib']['stage']}), GiB: {parts}"
    )
    lines.append(f"why this layout: {d['criterion']}; {d['layouts_fitting']} of {d['layouts_considered']} fit")
    lines.append("runners-up:")
    for r in d["runners_up"]:
        sp = " +SP" if r["sequence_parallel"] else ""
        lines.append(
            f"  tp={r['tp']}{sp} pp={r['pp']} dp={r['dp']} recompute={r['recompute']} mb {_mb(r)}: "
            f"{r['memory_gib']:.1f} GiB, {r['images_per_s']:.1f} img/s -- {r['why']}"
        )
    rates = d["rates"]
    lines.append(f"step rates ({rates['precision']}): {rates['source']}")
    for pt in rates["points"]:
        shard = f" (one rank of a TP{pt['tp']} block)" if pt.get("tp", 1) > 1 else ""
        lines.append(
            f"  {pt['resolution']} px micro-batch {pt['micro_batch']}{shard}: {pt['tflops'] * rates['scale']:.0f} model "
            f"TFLOP/s fwd+bwd per GPU ({pt['source']})"
        )
    lines.append(f"  ZeRO-1 optimizer: {rates['optimizer_params_per_s'] / 1e9:.1f} G parameters/s per GPU")
    pr = d["producers"]
    lines.append(
        f"producers: {pr['gpus']} GPUs keep {d['images_per_s']:.1f} img/s fed (VAE {pr['vae_gpus']:.2f} + text encoder "
        f"{pr['text_gpus']:.2f} GPU-equivalents; {pr['images_per_s_per_gpu']:.1f} img/s per producer GPU)"
    )
    vae = ", ".join(f"{r} px {v['vae_images_per_s_per_gpu']:.0f} img/s" for r, v in pr["per_resolution"].items())
    lines.append(
        f"  VAE per GPU: {vae}; text encoder {pr['text_prompts_per_s_per_gpu']:.0f} prompts/s at "
        f"{pr['caption_tokens']} tokens; from {pr['source']}"
    )
    st = d["storage"]
    per = []
    for r, v in st["bytes_per_sample"].items():
        per.append(
            f"{r} px {_si(v['total'])} (latents {_si(v['latents'])}, text {_si(v['text_embeddings'])}, "
            f"metadata {_si(v['metadata'] + v['text_offsets'])}, share of per-shard bytes {_si(v['per_sample_fixed'])})"
        )
    lines.append(
        f"storage per sample ({st['caption_tokens']} caption tokens x {st['text_dim']} bf16): " + "; ".join(per)
    )
    lines.append(f"  mean {_si(st['mean_bytes_per_sample'])} per sample; {st['compression']}")
    if "cache_bytes" in st:
        lines.append(f"  cache for {st['images']:.3g} images: {_si(st['cache_bytes'])} ({st['cache_tib']:.1f} TiB)")
    lines.append(
        f"  consumers read {st['read_gb_s']:.2f} GB/s ({st['read_gb_s_per_node']:.3f} GB/s per node); producers write "
        f"{st['write_gb_s']:.2f} GB/s to keep up ({st['write_gb_s_producers_at_full_rate']:.2f} GB/s at full rate)"
    )
    lines.append("notes:")
    for note in d["notes"]:
        lines.append(f"  - {note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qwenimage plan``; a bad flag or an impossible GPU count raises
    `megatron_qwenimage.planner.PlanError` (a `UserError`: one line, exit 2)."""
    from megatron_qwenimage import planner as P

    inputs = inputs_from_args(args)
    runners = P._number("--runners-up", args.runners_up, int)
    if runners < 0:
        raise P.PlanError(f"--runners-up {args.runners_up}: expected an integer >= 0")
    result = P.make_plan(inputs, runners_up=runners)
    d = result.to_dict()
    if args.json:
        print(json.dumps(d))
    else:
        print(render(d))
    return 0
