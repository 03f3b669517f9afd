"""Every measurement of the GPU performance work in one process; JSON lines out.

One call on one GPU measures, in this order (most important first, so that a time budget cuts
the tail, never the head):

1. the card's measured ceilings: bf16 GEMM 8192³ (the MFU denominator) and FP8 ``_scaled_mm``;
2. at the main shape (a 4-block full-width slice of the 20B model, 1024² = 4096 image tokens +
   256 text tokens, batch 2), each variant's fwd + bwd + optimizer step and fwd + bwd alone:
   diffusers eager (the anchor), ours TE bf16, ours TE FP8 (delayed), each again with padded
   text (half the samples with 64 of their 256 text tokens padded), ours TE FP8 with its FP8
   weights re-quantized every step (``_nocache``: megatron-core's TE linears otherwise reuse the
   FP8 copy of each weight made by their first forward, see
   `megatron_qwenimage.model.cuda_graphs.disable_fp8_weight_cache`), that one with FP8 attention
   too (``_dpa``: ``precision.fp8_attention``, TE's ``fp8_dpa``), the same with the blocks'
   elementwise chains compiled (``_fused``), diffusers + torch.compile, diffusers + torchao
   float8 + compile, ours local bf16. Every side of every ratio uses the same optimizer:
   ``torch.optim.AdamW(fused=True)`` on the bf16 parameters;
3. ours with the training loop's own optimizer (`consumers.optimizer.DistributedOptimizer`: fp32
   main grads, fp32 master + moments): step time, the optimizer's share, and peak memory against
   the planner's `megatron_qwenimage.accounting.peak_memory_per_gpu` for the same layout;
4. a profile of one FP8 step: GPU time by kernel class (GEMM, FP8 cast/transpose, attention,
   optimizer, other elementwise) and the top kernels;
5. last at the main shape, per-block CUDA graphs (``ours_te_fp8_delayed_graphs``,
   ``ours_te_bf16_graphs``): each block's forward + backward captured with Transformer Engine's
   ``make_graphed_callables`` (`megatron_qwenimage.model.cuda_graphs`; FP8 with the same
   delayed recipe, weights re-quantized every step), embedders and head eager; a ``parity``
   record compares the graphed model's output, loss and gradients with the same model's eager
   pass (and two eager passes with each other, the noise floor), then the step is timed and the
   FP8 one profiled; last, the FP8 one again around compiled elementwise chains
   (``ours_te_fp8_delayed_graphs_fused``: ``fused_elementwise`` inside the captured blocks);
6. with ``--tp-shard K,...``, one tensor-parallel rank's shard of every block of the slice for
   each TP size K (`build_tp_shard`: 1/K of the heads, of the q/k/v and output projections and
   of the MLP width; no communication, embedders and head whole) at the main shape's resolution
   and ``--tp-shard-batches`` micro-batches: ours TE bf16 and FP8 (re-quantized), records
   ``*_tpK`` with ``"tp": K`` and 1/K of the slice's model FLOPs, from which ``qwenimage plan``
   takes the rate of a TP-K layout;
7. the other buckets (256², 640², 1328² at micro-batches 32, 8, 2; ``--buckets``): diffusers
   eager and diffusers + compile (the anchors), ours TE FP8 (eager, ``_nocache``, ``_fused``),
   TE bf16 ``_fused`` and, last, ours TE FP8 with graphs.

Each record has ``what``, the variant, ``step_ms`` (median of `--iters` after `--warmup`),
``img_tokens_per_s``, ``model_tflops`` (the project's FLOP accounting), ``mfu`` (against the
measured bf16 GEMM peak) and ``peak_mem_gib``; ratios are computed by `summarize` from records of
the same run. A failing variant writes ``error`` and the run goes on; when a failure leaves CUDA
unusable, what follows is recorded as skipped with that reason.

``--skip PART,...`` leaves out parts of the run a previous run already measured (``--skip help``
lists them): ``te_bf16``, ``te_fp8``, ``te_fp8_nocache``, ``te_fp8_dpa``, ``te_bf16_fused``, ``te_fp8_fused``,
``te_bf16_graphs``, ``te_fp8_graphs``, ``te_fp8_graphs_fused``, ``padded``, ``local``, ``dist_opt``, ``profile``,
``buckets``. The anchors (diffusers eager, + compile, + torchao FP8 + compile) are not parts:
every ratio the summary reports has its anchor measured in the same run (only
``--skip-compile`` drops the compiled anchors, and with them their ratios).

On the GPU machine (see benchmarks/gpu/README.md)::

    python3 benchmarks/gpu/run.py --out $OUT/gpu.jsonl --budget-s 420

Per-block CUDA graphs and the 640² / 1328² buckets, nothing a previous run already has::

    python3 benchmarks/gpu/run.py --out $OUT/gpu.jsonl --budget-s 300 --buckets 640,1328 \
        --skip te_bf16_fused,te_fp8_fused,padded,local,dist_opt

TP2/4/8 shards of the 20B block at 1024 px, micro-batches 2 and 4, next to the whole block's bf16
``_fused`` record of the same run::

    SKIP=te_bf16,te_fp8,te_fp8_nocache,te_fp8_dpa,te_fp8_fused,te_bf16_graphs,te_fp8_graphs
    python3 benchmarks/gpu/run.py --out $OUT/gpu.jsonl --budget-s 420 --skip-buckets --tp-shard 2,4,8 \
        --tp-shard-batches 2,4 --skip $SKIP,te_fp8_graphs_fused,padded,local,dist_opt,profile

On CPU, ``--tiny`` runs every code path at toy shapes (TE, torchao and CUDA-graph variants record
why they were skipped), which is what the test suite does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from megatron_qwenimage import accounting  # noqa: E402
from megatron_qwenimage.config import MMDiTConfig, load_config  # noqa: E402
from megatron_qwenimage.flow_matching import flow_matching_loss  # noqa: E402

GIB = 2**30


# ------------------------------------------------------------------------------------ plumbing
class Recorder:
    """Appends one JSON object per line to `path` (flushed at once) and echoes a short line."""

    def __init__(self, path: str | None):
        self.path = path
        self.records: list[dict] = []
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **record) -> dict:
        record = {k: v for k, v in record.items() if v is not None}
        self.records.append(record)
        line = json.dumps(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        short = {
            k: (float(f"{v:.4g}") if isinstance(v, float) else v)
            for k, v in record.items()
            if k not in ("top_kernels", "traceback")
        }
        print(json.dumps(short), flush=True)
        return record


class Budget:
    """Wall-clock budget of the run: a measurement starts only if its estimate fits."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call: CUDA events around each call on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


# ------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    """One benchmark batch: ``batch`` samples of ``res``² pixels and ``text`` text tokens."""

    res: int
    batch: int
    text: int
    padded_text: int = 0  # trailing text tokens padded in every other sample
    tp: int = 1  # > 1: the blocks are one rank's shard of TP-tp blocks (`build_tp_shard`)

    @property
    def grid(self) -> int:
        return self.res // 16

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    def label(self) -> str:
        pad = f"+pad{self.padded_text}" if self.padded_text else ""
        shard = f"_tp{self.tp}" if self.tp > 1 else ""
        return f"{self.res}px_b{self.batch}_t{self.text}{pad}{shard}"


def make_batch(config: MMDiTConfig, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """diffusers-signature inputs plus a velocity target (`benchmarks/mmdit_step.py`'s), with a
    right-padded text mask in every other sample when ``shape.padded_text``."""
    from mmdit_step import Workload, make_inputs

    work = Workload(shape.batch, shape.grid, shape.grid, shape.text)
    return make_inputs(config, work, device, dtype, seed, shape.padded_text)


#: What ``--skip`` can leave out (anchors are never parts: see the module docstring).
PARTS = {
    "te_bf16": "ours TE bf16, eager (main shape)",
    "te_fp8": "ours TE FP8 delayed, eager, megatron-core's FP8 weight cache (main shape, buckets)",
    "te_fp8_nocache": "ours TE FP8 delayed, eager, FP8 weights re-quantized every step (main shape, buckets)",
    "te_fp8_dpa": "ours TE FP8 delayed with FP8 attention (fp8_dpa), weights re-quantized every step (main shape)",
    "te_bf16_fused": "ours TE bf16 with fused_elementwise (main shape, buckets)",
    "te_fp8_fused": "ours TE FP8 with fused_elementwise (main shape, buckets)",
    "te_bf16_graphs": "ours TE bf16 with per-block CUDA graphs (main shape)",
    "te_fp8_graphs": "ours TE FP8 with per-block CUDA graphs (main shape, buckets)",
    "te_fp8_graphs_fused": "ours TE FP8 with per-block CUDA graphs around fused_elementwise chains (main shape)",
    "padded": "the padded-text repeats at the main shape",
    "local": "ours on the local backend (and its training-loop optimizer)",
    "dist_opt": "ours TE FP8 with the training loop's optimizer",
    "profile": "the profiles of one FP8 step (eager and graphed)",
    "buckets": "the other buckets (as --skip-buckets)",
}

#: Micro-batch of each curriculum bucket (``--buckets RES`` without ``:BATCH``).
BUCKET_BATCH = {64: 2, 96: 2, 256: 32, 512: 16, 640: 8, 1024: 2, 1328: 2}


def parse_skip(text: str | None) -> frozenset[str]:
    """``--skip`` value -> the set of parts; SystemExit naming the unknown ones."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or "help" in names:
        listing = "\n".join(f"  {k:16s} {v}" for k, v in PARTS.items())
        head = f"error: --skip: unknown part(s) {unknown}; " if unknown and unknown != ["help"] else ""
        raise SystemExit(f"{head}parts of the run --skip can leave out:\n{listing}")
    return frozenset(names)


def parse_positive_ints(text: str, flag: str, minimum: int = 1) -> list[int]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (empty for ""); SystemExit naming `flag` for anything else."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise SystemExit(f"error: {flag} {item!r}: expected integers >= {minimum}, comma-separated")
        out.append(value)
    return out


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """``--buckets`` value ``RES[:BATCH],...`` -> ``[(res, batch)]`` (batch from `BUCKET_BATCH`)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        res_text, _, batch_text = item.partition(":")
        try:
            res = int(res_text)
            batch = int(batch_text) if batch_text else BUCKET_BATCH[res]
        except (ValueError, KeyError):
            raise SystemExit(
                f"error: --buckets {item!r}: expected RES or RES:BATCH (known RES: {sorted(BUCKET_BATCH)})"
            ) from None
        if res <= 0 or res % 16 or batch <= 0:
            raise SystemExit(f"error: --buckets {item!r}: RES must be a positive multiple of 16, BATCH positive")
        out.append((res, batch))
    return out


# ------------------------------------------------------------------------------------ models
def build_reference(config: MMDiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """diffusers' QwenImageTransformer2DModel of `config`'s sizes, on `device` in `dtype`."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device(device):
        ref = QwenImageTransformer2DModel(**kwargs)
    return ref.to(dtype)


def build_ours(ref, backend: str, device: torch.device, dtype_name: str, **overrides):
    from megatron_qwenimage.convert import load_diffusers

    return load_diffusers(ref, device=str(device), params_dtype=dtype_name, backend=backend, **overrides)


class ShardKernels:
    """A kernel provider (`megatron_qwenimage.model.backends.KernelProvider`) building one TP rank's
    layers of a TP-`tp` block as plain single-rank layers of the local shapes, so one GPU runs a
    rank's GEMMs with no communication: column-parallel linears ``D -> N/tp``, row-parallel ones
    ``K/tp -> D``, attention over the rank's heads. The AdaLN modulation linears (GEMMs with M =
    batch, no time to speak of) stay whole: a rank gathers their full output anyway."""

    def __init__(self, base, tp: int):
        self.base = base
        self.tp = tp

    def column_parallel_linear(self, input_size: int, output_size: int, **kwargs):
        return self.base.column_parallel_linear(input_size, output_size // self.tp, **kwargs)

    def row_parallel_linear(self, input_size: int, output_size: int, **kwargs):
        return self.base.row_parallel_linear(input_size // self.tp, output_size, **kwargs)

    def modulation_linear(self, input_size: int, output_size: int):
        return self.base.modulation_linear(input_size, output_size)

    def core_attention(self, num_local_heads: int, head_dim: int):
        return self.base.core_attention(num_local_heads, head_dim)


def build_tp_shard(
    config: MMDiTConfig, tp: int, backend: str, device: torch.device, dtype_name: str, *, fused: bool, seed: int = 0
):
    """Our model of `config`'s slice in which every block is one rank's shard of a TP-`tp` block
    (`ShardKernels`: 1/tp of the heads, of the q/k/v and output projections and of the MLP width)
    and nothing communicates; the embedders and the head are whole, as on every TP rank. The
    streams keep their full sequence through the blocks (TP without sequence parallelism: with SP
    a rank runs the LayerNorm/modulation/residual elementwise work on 1/tp of the tokens, so this
    is slightly slow for it). `fused`: the blocks' elementwise chains compiled (``fused_elementwise``).
    Random weights (`QwenImageMMDiT.init_weights`)."""
    from megatron_qwenimage.model.backends import kernel_provider
    from megatron_qwenimage.model.block import MMDiTBlock
    from megatron_qwenimage.model.layers import TPContext, module_tensor_init_roles
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

    if config.num_attention_heads % tp:
        raise ValueError(f"--tp-shard {tp} does not divide the {config.num_attention_heads} heads")
    cfg = config.replace(
        backend=backend,
        params_dtype=dtype_name,
        fused_elementwise=fused,
        tensor_model_parallel_size=1,
        sequence_parallel=False,
    )
    shard_tp = TPContext(None, sequence_parallel=False)
    shard_tp.size = tp  # the blocks' local heads; its group stays a single rank (no communication)
    with torch.device("meta"):
        model = QwenImageMMDiT(cfg, tp_group=None)
        kernels = ShardKernels(kernel_provider(cfg, model.tp.group), tp)
        last = cfg.num_layers - 1
        for key in list(model.blocks):
            model.blocks[key] = MMDiTBlock(cfg, kernels, shard_tp, context_only=int(key) == last)
        # Read from the tensors' attributes before `to_empty` replaces them (as the constructor does).
        model.partition_dims = model._collect_partition_dims()
        model.init_roles = module_tensor_init_roles(model)
    model = model.to_empty(device=device)
    model.init_weights(seed)
    return model


class StepRunner:
    """fwd + flow-matching loss + bwd (+ optimizer) of one model on one batch.

    Args:
        model: ours or diffusers' (``returns_sample`` for the latter's output object).
        optimizer: "fused_adamw" (``torch.optim.AdamW(fused=True)`` on CUDA, foreach on CPU),
            or a prebuilt object with ``zero_grad()``/``step()``; None: no optimizer.
        forward_context: context factory around the forward (FP8 autocast).
    """

    def __init__(
        self,
        model,
        batch: dict,
        *,
        returns_sample: bool,
        optimizer="fused_adamw",
        forward_context: Callable = contextlib.nullcontext,
        compiled=None,
    ):
        self.model = model
        self.fwd = compiled if compiled is not None else model
        self.batch = batch
        self.args = {k: v for k, v in batch.items() if k != "target"}
        self.returns_sample = returns_sample
        self.forward_context = forward_context
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "fused_adamw":
            fused = params[0].is_cuda
            self.opt = torch.optim.AdamW(params, lr=1e-6, fused=fused, foreach=not fused)
        else:
            self.opt = optimizer

    def forward_backward(self) -> torch.Tensor:
        with self.forward_context():
            out = self.fwd(**self.args)
        pred = out.sample if self.returns_sample else (out[0] if isinstance(out, tuple) else out)
        loss = flow_matching_loss(pred, self.batch["target"]).loss
        loss.backward()
        return loss.detach()

    def zero_grad(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)

    def fwd_bwd_only(self) -> torch.Tensor:
        self.zero_grad()
        return self.forward_backward()

    def step(self) -> torch.Tensor:
        self.zero_grad()
        loss = self.forward_backward()
        self.opt.step()
        return loss

    def optimizer_step(self):
        self.opt.step()


class _StepAt0:
    """`DistributedOptimizer` behind the ``zero_grad()`` / ``step()`` interface (lr of step 0)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad()  # clears the flat main-grad buffer (param grads are already None)

    def step(self) -> None:
        self.optimizer.step(0)


def eager_grapher(modules, sample_args, num_warmup_iters: int = 3):
    """``make_graphed_callables`` stand-in of ``--graphs-standin``: the modules, not graphed."""
    return modules


def pass_difference(a: tuple, b: tuple) -> dict:
    """How far one fwd + bwd pass is from another of the same model on the same batch.

    `a`, `b`: ``(output fp32, loss fp32, [param grad or None])``. Returns ``out_max_abs``,
    ``out_rel_l2``, ``loss``, ``loss_ref`` (b's), ``loss_abs_diff``, ``grad_max_rel`` (over the
    parameters, the largest ``max|ga - gb| / max|gb|``), ``grad_norm_rel`` (of the global
    gradient norms) and ``grads_missing`` (parameters with a gradient on one side only).
    """
    out_a, loss_a, grads_a = a
    out_b, loss_b, grads_b = b
    if len(grads_a) != len(grads_b):
        raise ValueError(f"{len(grads_a)} gradients against {len(grads_b)}")
    worst, sq_a, sq_b, missing = [], [], [], 0
    for ga, gb in zip(grads_a, grads_b):
        if ga is None or gb is None:
            missing += (ga is None) != (gb is None)
            continue
        ga, gb = ga.float(), gb.float()
        worst.append((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-30))
        sq_a.append(ga.pow(2).sum())
        sq_b.append(gb.pow(2).sum())
    zero = out_a.new_zeros(())
    stats = torch.stack(
        [
            (out_a - out_b).abs().max(),
            (out_a - out_b).norm() / out_b.norm().clamp_min(1e-30),
            loss_a.reshape(()),
            loss_b.reshape(()),
            torch.stack(worst).max() if worst else zero,
            torch.stack(sq_a).sum().sqrt() if sq_a else zero,
            torch.stack(sq_b).sum().sqrt() if sq_b else zero,
            torch.isfinite(out_a).all().float(),
        ]
    ).tolist()
    out_max_abs, out_rel, loss, loss_ref, grad_worst, norm_a, norm_b, finite = stats
    return {
        "out_max_abs": out_max_abs,
        "out_rel_l2": out_rel,
        "loss": loss,
        "loss_ref": loss_ref,
        "loss_abs_diff": abs(loss - loss_ref),
        "grad_max_rel": grad_worst,
        "grad_norm_rel": abs(norm_a - norm_b) / norm_b if norm_b else abs(norm_a),
        "grads_missing": missing,
        "finite": bool(finite) and math.isfinite(loss),
    }


def flops_per_step(config: MMDiTConfig, shape: Shape) -> float:
    """Model FLOPs of one fwd + bwd on one GPU: a TP shard's 1/tp of the whole slice's."""
    return float(accounting.model_flops_per_sample(config, shape.image_tokens, shape.text)) * shape.batch / shape.tp


def perf_fields(config: MMDiTConfig, shape: Shape, seconds: list[float], peak: float | None) -> dict:
    med = statistics.median(seconds)
    flops = flops_per_step(config, shape) / med
    return {
        "step_ms": med * 1e3,
        "min_ms": min(seconds) * 1e3,
        "img_tokens_per_s": shape.batch * shape.image_tokens / med,
        "model_tflops": flops / 1e12,
        "mfu": flops / peak if peak else None,
    }


# ------------------------------------------------------------------------------------ the run
class GPURun:
    """Holds the run's settings, the recorder and the budget; one method per measurement."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        self.dtype_name = "bfloat16" if args.dtype == "bf16" else "float32"
        self.record = Recorder(args.out)
        self.budget = Budget(args.budget_s)
        self.peak_bf16: float | None = None
        overrides = {"params_dtype": self.dtype_name, "num_layers": args.layers}
        self.config = load_config(args.config, **overrides)
        self.te = self._te_status()
        self.skipped_parts: frozenset[str] = args.skip
        #: Set when a failure left CUDA unusable: every later measurement is skipped with it.
        self.cuda_broken: str | None = None

    def wants(self, part: str) -> bool:
        """Whether `part` (a `PARTS` key) is measured in this run."""
        return part not in self.skipped_parts

    # -- environment -------------------------------------------------------------------------
    def _te_status(self) -> str | None:
        """None when Transformer Engine can run here, else why not."""
        if self.device.type != "cuda":
            return "needs a CUDA GPU"
        try:
            import transformer_engine.pytorch  # noqa: F401
        except Exception as exc:  # ImportError or a CUDA library that fails to load
            return f"transformer_engine not importable: {type(exc).__name__}: {exc}"[:300]
        return None

    def environment(self) -> None:
        info = {"torch": torch.__version__, "device": "cpu"}
        if self.device.type == "cuda":
            info["device"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
            try:
                info["cudnn"] = torch.backends.cudnn.version()
            except RuntimeError as exc:  # a second cuDNN (e.g. one a kernel library loaded) may mismatch
                info["cudnn"] = f"unavailable ({exc})"[:200]
        for mod in ("transformer_engine", "diffusers", "torchao", "megatron.core"):
            try:
                m = __import__(mod, fromlist=["__version__"])
                info[mod] = getattr(m, "__version__", "?")
            except Exception as exc:
                info[mod] = f"unavailable ({type(exc).__name__})"
        self.record(
            what="environment",
            config=self.config.name,
            layers=self.config.num_layers,
            hidden=self.config.hidden_size,
            budget_s=self.args.budget_s,
            skip=sorted(self.skipped_parts),
            buckets=[f"{r}:{b}" for r, b in self.args.buckets],
            tp_shard=self.args.tp_shard or None,
            **info,
        )

    def peaks(self) -> None:
        n = 256 if self.args.tiny else 8192
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype)
        s = statistics.median(time_fn(lambda: a @ b, self.device, 3, 10))
        # The MFU denominator: only a GPU's GEMM rate is a meaningful ceiling.
        self.peak_bf16 = 2 * n**3 / s if self.device.type == "cuda" else None
        self.record(what="peak", kind=f"{self.args.dtype}_gemm", n=n, tflops=2 * n**3 / s / 1e12)
        if self.device.type == "cuda":
            a8 = a.to(torch.float8_e4m3fn)
            b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=self.device)
            s = statistics.median(
                time_fn(
                    lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                    self.device,
                    3,
                    10,
                )
            )
            self.record(what="peak", kind="fp8_scaled_mm", n=n, tflops=2 * n**3 / s / 1e12)
        a = b = None

    # -- one variant -------------------------------------------------------------------------
    def measure(
        self,
        name: str,
        shape: Shape,
        runner_factory: Callable[[], StepRunner],
        estimate_s: float,
        fwd_bwd: bool = True,
        extra: dict | None = None,
    ) -> dict | None:
        """Time ``runner.step`` (and ``fwd_bwd_only``) of one variant; records a line either way
        (`extra` fields added to it)."""
        base = {
            "what": "step",
            "variant": name,
            "shape": shape.label(),
            "res": shape.res,
            "batch": shape.batch,
            "text_tokens": shape.text,
            "padded_text": shape.padded_text,
            "tp": shape.tp if shape.tp > 1 else None,
            **(extra or {}),
        }
        if self.cuda_broken:
            return self.record(**base, skipped=self.cuda_broken)
        if not self.budget.allows(estimate_s):
            return self.record(
                **base, skipped=f"time budget ({self.budget.left():.0f} s left, needs ~{estimate_s:.0f})"
            )
        t0 = time.monotonic()
        reset_memory(self.device)
        runner = None
        try:
            runner = runner_factory()
            warm, iters = self.args.warmup, self.args.iters
            step = time_fn(runner.step, self.device, warm, iters)
            peak_mem = peak_memory_gib(self.device)
            out = dict(base, **perf_fields(self.config, shape, step, self.peak_bf16), peak_mem_gib=peak_mem)
            if fwd_bwd:
                fb = time_fn(runner.fwd_bwd_only, self.device, 1, iters)
                out["fwd_bwd_ms"] = statistics.median(fb) * 1e3
                out["fwd_bwd_tflops"] = flops_per_step(self.config, shape) / statistics.median(fb) / 1e12
                out["optimizer_share"] = max(0.0, 1 - out["fwd_bwd_ms"] / out["step_ms"])
            out["loss"] = float(runner.forward_backward())
            out["wall_s"] = time.monotonic() - t0
            return self.record(**out)
        except Exception as exc:
            return self.record(
                **base,
                error=f"{type(exc).__name__}: {exc}"[:500],
                traceback=traceback.format_exc()[-2000:],
                wall_s=time.monotonic() - t0,
            )
        finally:
            del runner
            reset_memory(self.device)

    def skip(self, name: str, shape: Shape, why: str) -> None:
        self.record(what="step", variant=name, shape=shape.label(), skipped=why)

    def check_cuda(self, after: str) -> None:
        """After a risky measurement: if CUDA no longer works, remember why (`cuda_broken`)."""
        if self.device.type != "cuda" or self.cuda_broken:
            return
        try:
            torch.cuda.synchronize()
            x = torch.ones(8, device=self.device)
            float((x @ x).item())
        except Exception as exc:
            self.cuda_broken = f"CUDA unusable after {after}: {type(exc).__name__}: {exc}"[:400]
            self.record(what="cuda_health", after=after, error=self.cuda_broken)

    # -- variants ----------------------------------------------------------------------------
    def fp8_precision(self, model, recipe: str = "delayed", attention: bool = False):
        """`consumers.precision.Precision` of the FP8 variants (`attention`: FP8 attention too),
        `model` prepared for it."""
        from consumers.precision import Precision, PrecisionConfig

        # Every block of the slice in FP8, as 58 of the 60 blocks are under the training default
        # (`fp8_exclude: first_last` would keep half of a 4-block slice in bf16).
        config = PrecisionConfig(fp8=recipe, fp8_exclude=(), fp8_attention=attention)
        precision = Precision(config, model.config, self.device)
        precision.prepare_model(model)
        return precision

    def fp8_context(self, model, recipe: str = "delayed", attention: bool = False):
        return self.fp8_precision(model, recipe, attention).forward_context

    def ours_te(self, ref, fused: bool):
        """Ours on Transformer Engine and its FP8 context; with ``--te-standin-local`` where TE
        cannot run, the local backend and no FP8 (the same code path, meaningless numbers)."""
        if self.te is None:
            ours = build_ours(ref, "transformer_engine", self.device, self.dtype_name, fused_elementwise=fused)
            return ours, self.fp8_context(ours)
        ours = build_ours(ref, "local", self.device, self.dtype_name, fused_elementwise=fused)
        return ours, contextlib.nullcontext

    def runs_te(self) -> bool:
        """Whether the TE variants' code path runs here (TE, or its local stand-in)."""
        return self.te is None or self.args.te_standin_local

    def main_shape_variants(self, shape: Shape, padded: Shape) -> None:
        cfg, dev = self.config, self.device
        ref = build_reference(cfg, dev, self.dtype)
        batch = make_batch(cfg, shape, dev, self.dtype)
        pbatch = make_batch(cfg, padded, dev, self.dtype)
        est = 20 if not self.args.tiny else 1

        self.measure("diffusers_eager", shape, lambda: StepRunner(ref, batch, returns_sample=True), est)
        if self.wants("padded"):
            self.measure("diffusers_eager", padded, lambda: StepRunner(ref, pbatch, returns_sample=True), est)
        if self.runs_te():
            modes = [
                fused
                for fused in (False, True)
                if any(self.wants(f"te_{kind}{'_fused' if fused else ''}") for kind in ("bf16", "fp8"))
                or (not fused and self.wants("te_fp8_nocache"))
            ]
            if self.args.skip_compile and True in modes:  # fused_elementwise compiles its chains
                modes.remove(True)
                for v in ("ours_te_bf16_fused", "ours_te_fp8_delayed_fused"):
                    self.skip(v, shape, "--skip-compile")
            # The training loop's optimizer and the profile on the last FP8 model measured.
            extras_on = next((f for f in reversed(modes) if self.wants("te_fp8_fused" if f else "te_fp8")), None)
            for fused in modes:
                self.te_variants(ref, batch, pbatch, shape, padded, fused=fused, loop_extras=fused == extras_on)
        else:
            for v in ("ours_te_bf16", "ours_te_fp8_delayed"):
                self.skip(v, shape, self.te)
        if (self.args.with_local or self.te is not None) and self.wants("local"):
            ours_local = build_ours(ref, "local", dev, self.dtype_name)
            self.parity(ours_local, ref, pbatch, "ours_local")
            self.measure("ours_local", shape, lambda: StepRunner(ours_local, batch, returns_sample=False), est)
            if self.te is not None and self.wants("dist_opt"):
                self.distributed_optimizer(ours_local, batch, shape, contextlib.nullcontext, "ours_local_dist_opt")
            ours_local = None
            reset_memory(dev)
        self.compiled_reference(ref, batch, shape)
        self.torchao_reference(shape, batch)
        # Last: a failed capture can cost nothing measured before it.
        if self.wants("te_fp8_graphs"):
            self.graph_variant(ref, batch, shape, fp8=True)
        if self.wants("te_bf16_graphs"):
            self.graph_variant(ref, batch, shape, fp8=False)
        if self.wants("te_fp8_graphs_fused"):
            if self.args.skip_compile:  # fused_elementwise compiles its chains
                self.skip(f"{GRAPH_VARIANTS[1]}_fused", shape, "--skip-compile")
            else:
                self.graph_variant(ref, batch, shape, fp8=True, fused=True)
        ref = None
        reset_memory(dev)

    def te_variants(
        self, ref, batch: dict, pbatch: dict, shape: Shape, padded: Shape, *, fused: bool, loop_extras: bool
    ) -> None:
        """Ours on Transformer Engine, bf16 and FP8, unpadded and padded; with ``fused`` the
        blocks' elementwise chains are compiled (``MMDiTConfig.fused_elementwise``). Unfused,
        also FP8 with the weights re-quantized every step (``_nocache``). With `loop_extras`,
        the training loop's optimizer and a profile are measured on this model."""
        suffix = "_fused" if fused else ""
        est = (60 if fused else 15) if not self.args.tiny else 1
        ours, fp8 = self.ours_te(ref, fused)
        bf16_name, fp8_name = f"ours_te_bf16{suffix}", f"ours_te_fp8_delayed{suffix}"
        want_bf16, want_fp8 = self.wants(f"te_bf16{suffix}"), self.wants(f"te_fp8{suffix}")
        self.parity(ours, ref, pbatch, bf16_name)  # before any step changes the weights
        if want_fp8:
            self.measure(
                fp8_name,
                shape,
                lambda: StepRunner(ours, batch, returns_sample=False, forward_context=fp8),
                est,
                extra={"fp8_weights": "cached after the first forward"},
            )
        if want_bf16:
            self.measure(bf16_name, shape, lambda: StepRunner(ours, batch, returns_sample=False), est)
        if self.wants("padded"):
            if want_fp8:
                self.measure(
                    fp8_name,
                    padded,
                    lambda: StepRunner(ours, pbatch, returns_sample=False, forward_context=fp8),
                    est,
                    extra={"fp8_weights": "cached after the first forward"},
                )
            if want_bf16:
                self.measure(bf16_name, padded, lambda: StepRunner(ours, pbatch, returns_sample=False), est)
        if loop_extras:
            if self.wants("dist_opt"):
                self.distributed_optimizer(ours, batch, shape, fp8, f"{fp8_name}_dist_opt")
            if self.wants("profile"):
                self.profile(ours, batch, shape, fp8, fp8_name)
        if not fused and self.wants("te_fp8_nocache"):
            self.fp8_nocache(ours, batch, shape, fp8, est)
        if not fused and self.wants("te_fp8_dpa"):
            if self.te is None:
                self.fp8_attention(ours, batch, shape, est)
            else:  # the local stand-in has no FP8 attention to run
                self.skip("ours_te_fp8_delayed_dpa", shape, self.te)
        ours = None
        reset_memory(self.device)

    def fp8_nocache(self, ours, batch: dict, shape: Shape, fp8, est: float, fwd_bwd: bool = True) -> None:
        """Ours TE FP8, eager, each step quantizing the weights it just updated (what the graphed
        FP8 variant does): `ours` is switched over for good."""
        from megatron_qwenimage.model.cuda_graphs import disable_fp8_weight_cache

        count = disable_fp8_weight_cache(ours)
        self.measure(
            "ours_te_fp8_delayed_nocache",
            shape,
            lambda: StepRunner(ours, batch, returns_sample=False, forward_context=fp8),
            est,
            fwd_bwd=fwd_bwd,
            extra={"fp8_weights": "re-quantized every step", "te_linears": count},
        )

    def fp8_attention(self, ours, batch: dict, shape: Shape, est: float) -> None:
        """Ours TE FP8 with FP8 attention as well (``precision.fp8_attention``, TE's ``fp8_dpa``),
        the weights re-quantized every step: against ``ours_te_fp8_delayed_nocache``."""
        from megatron_qwenimage.model.cuda_graphs import disable_fp8_weight_cache

        disable_fp8_weight_cache(ours)
        context = self.fp8_context(ours, attention=True)
        self.measure(
            "ours_te_fp8_delayed_dpa",
            shape,
            lambda: StepRunner(ours, batch, returns_sample=False, forward_context=context),
            est,
            extra={"fp8_weights": "re-quantized every step", "fp8_attention": True},
        )

    # -- per-block CUDA graphs --------------------------------------------------------------
    def graphs_unavailable(self) -> str | None:
        """None when the CUDA-graph variants can run here, else why not."""
        if self.device.type != "cuda":
            return "needs a CUDA GPU (CUDA graphs, Transformer Engine's make_graphed_callables)"
        if self.te is not None:
            return self.te
        return None

    def graph_variant(self, ref, batch: dict, shape: Shape, *, fp8: bool, fused: bool = False) -> None:
        """Ours TE with each block's fwd + bwd replayed as a CUDA graph; `fused`: the blocks'
        elementwise chains compiled (``fused_elementwise``) inside the captured blocks, their
        compilation done by the eager passes before the capture.

        Eager passes first (TE's lazy setup, FP8 scales, the block calls to capture), two more as
        the reference and its noise floor; capture; one graphed pass against the eager ones (the
        ``parity`` record); then the timed steps and, for FP8, a profile. Anything failing is
        this variant's ``error``; the graphs are released and CUDA checked in every case.

        With ``--graphs-standin`` where graphs cannot run (and ``--te-standin-local``), the same
        code path runs on the local backend with the blocks' stand-ins calling them eagerly
        (`eager_grapher`): the harness is tested, the numbers mean nothing.
        """
        name = ("ours_te_fp8_delayed_graphs" if fp8 else "ours_te_bf16_graphs") + ("_fused" if fused else "")
        why = self.graphs_unavailable()
        standin = why is not None and self.args.graphs_standin and self.args.te_standin_local
        if why is not None and not standin:
            return self.skip(name, shape, why)
        if self.cuda_broken:
            return self.skip(name, shape, self.cuda_broken)
        # build, 4 eager passes (the first compiles fused chains), capture, parity, 24 timed passes
        est = (60 if fused else 20) if not self.args.tiny else 1
        if not self.budget.allows(est):
            return self.skip(name, shape, f"time budget ({self.budget.left():.0f} s left, needs ~{est})")
        from megatron_qwenimage.model.cuda_graphs import (
            disable_fp8_weight_cache,
            graph_blocks,
            record_block_calls,
            te_graph_kwargs,
        )

        if standin:
            backend, grapher, fp8 = "local", eager_grapher, False
        else:
            import transformer_engine.pytorch as te

            backend, grapher = "transformer_engine", te.make_graphed_callables

        t0 = time.monotonic()
        ours = graphs = None
        gc_enabled = gc.isenabled()
        reset_memory(self.device)
        try:
            ours = build_ours(ref, backend, self.device, self.dtype_name, fused_elementwise=fused)
            context, recipe = contextlib.nullcontext, None
            if fp8:
                precision = self.fp8_precision(ours)
                context, recipe = precision.forward_context, precision._recipe
            disable_fp8_weight_cache(ours)
            args = {k: v for k, v in batch.items() if k != "target"}
            params = [p for p in ours.parameters() if p.requires_grad]

            def fwd_bwd():
                ours.zero_grad(set_to_none=True)
                with context():
                    out = ours(**args)
                loss = flow_matching_loss(out, batch["target"]).loss
                loss.backward()
                return (
                    out.detach().float(),
                    loss.detach().float(),
                    [None if p.grad is None else p.grad.detach().clone() for p in params],
                )

            fwd_bwd()  # TE's lazy setup and the FP8 scales, outside the recorded pass
            calls = record_block_calls(ours, fwd_bwd)
            eager_a = fwd_bwd()
            eager_b = fwd_bwd()
            floor = pass_difference(eager_a, eager_b)
            del eager_a
            sync(self.device)
            t_capture = time.monotonic()
            graphs = graph_blocks(ours, calls, grapher, **te_graph_kwargs(grapher, fp8=fp8, recipe=recipe))
            sync(self.device)
            capture_s = time.monotonic() - t_capture
            del calls
            graphed = fwd_bwd()
            diff = pass_difference(graphed, eager_b)
            del graphed, eager_b
            ours.zero_grad(set_to_none=True)
            self.record(
                what="parity",
                variant=name,
                shape=shape.label(),
                against="eager pass of the same model",
                standin=standin or None,
                capture_s=capture_s,
                **diff,
                **{f"{k}_eager_repeat": v for k, v in floor.items()},
            )
            extra = {
                "graphs": len(graphs.graphed),
                "capture_s": capture_s,
                "fused_elementwise": fused,
                "standin": standin or None,
            }
            if fp8:
                extra["fp8_weights"] = "re-quantized every step"
            self.measure(
                name,
                shape,
                lambda: StepRunner(ours, batch, returns_sample=False, forward_context=context),
                10,
                extra=extra,
            )
            if fp8 and self.wants("profile"):
                self.profile(ours, batch, shape, context, name)
        except Exception as exc:
            self.record(
                what="step",
                variant=name,
                shape=shape.label(),
                res=shape.res,
                batch=shape.batch,
                error=f"{type(exc).__name__}: {exc}"[:500],
                traceback=traceback.format_exc()[-2000:],
                wall_s=time.monotonic() - t0,
            )
        finally:
            try:
                if graphs is not None:
                    graphs.restore()
            except Exception as exc:
                self.record(
                    what="step",
                    variant=name,
                    shape=shape.label(),
                    error=f"releasing the graphs: {type(exc).__name__}: {exc}"[:500],
                )
            ours = graphs = None
            # TE's capture turns the garbage collector off, and marks itself capturing, and undoes
            # both only when it succeeds.
            if gc_enabled:
                gc.enable()
            if not standin:
                from transformer_engine.pytorch import graph as te_graph

                if getattr(te_graph, "is_graph_capturing", lambda: False)():
                    te_graph.set_capture_end()
            reset_memory(self.device)
            self.check_cuda(name)

    def parity(self, ours, ref, batch: dict, name: str) -> None:
        """Forward agreement of ours and diffusers on the (padded) batch: valid image tokens."""
        try:
            args = {k: v for k, v in batch.items() if k != "target"}
            with torch.no_grad():
                a = ours(**args).float()
                b = ref(**args, return_dict=False)[0].float()
            rel = ((a - b).norm() / b.norm()).item()
            self.record(
                what="parity",
                variant=name,
                shape=f"{batch['hidden_states'].shape}",
                rel_l2=rel,
                max_abs=(a - b).abs().max().item(),
                finite=bool(torch.isfinite(a).all()),
            )
        except Exception as exc:
            self.record(what="parity", variant=name, error=f"{type(exc).__name__}: {exc}"[:500])

    def compiled_reference(self, ref, batch: dict, shape: Shape, fwd_bwd: bool = True) -> None:
        est = 45 if not self.args.tiny else 60  # 33 s of wall time at the main shape on an H200
        if self.args.skip_compile:
            return self.skip("diffusers_compile", shape, "--skip-compile")
        compiled = torch.compile(ref)
        self.measure(
            "diffusers_compile",
            shape,
            lambda: StepRunner(ref, batch, returns_sample=True, compiled=compiled),
            est,
            fwd_bwd=fwd_bwd,
        )
        torch._dynamo.reset()

    def torchao_reference(self, shape: Shape, batch: dict) -> None:
        name = "diffusers_torchao_fp8_compile"
        if self.device.type != "cuda":
            return self.skip(name, shape, "needs a CUDA GPU (float8 GEMMs)")
        if self.args.skip_compile:
            return self.skip(name, shape, "--skip-compile")
        try:
            from torchao.float8 import convert_to_float8_training
        except Exception as exc:
            return self.skip(name, shape, f"torchao not importable: {type(exc).__name__}: {exc}"[:300])

        def factory():
            ref = build_reference(self.config, self.device, self.dtype)
            # The linears of the blocks with 16-divisible sizes, modulation excluded (as ours).
            convert_to_float8_training(
                ref,
                module_filter_fn=lambda mod, fqn: (
                    isinstance(mod, torch.nn.Linear)
                    and mod.in_features % 16 == 0
                    and mod.out_features % 16 == 0
                    and "transformer_blocks" in fqn
                    and "_mod" not in fqn
                ),
            )
            return StepRunner(ref, batch, returns_sample=True, compiled=torch.compile(ref))

        self.measure(name, shape, factory, 90)
        torch._dynamo.reset()

    def distributed_optimizer(self, model, batch: dict, shape: Shape, fp8_context, name: str) -> None:
        """Ours with the training loop's ZeRO-1 optimizer (fp32 main grads, master, moments)."""
        from consumers.optimizer import DistributedOptimizer, OptimizerConfig

        def factory():
            named = [(n, p, model.partition_dims.get(n)) for n, p in model.named_parameters() if p.requires_grad]
            opt = DistributedOptimizer(named, OptimizerConfig(lr=1e-6, clip_grad=1.0), dp_group=None, tp_rank=0)
            self._dist_opt = opt
            return StepRunner(model, batch, returns_sample=False, optimizer=_StepAt0(opt), forward_context=fp8_context)

        rec = self.measure(name, shape, factory, 30)
        opt = getattr(self, "_dist_opt", None)
        if rec is None or "error" in rec or opt is None:
            return
        try:
            # The optimizer alone, after one fwd + bwd left gradients in the main-grad buffers.
            runner = StepRunner(
                model, batch, returns_sample=False, optimizer=_StepAt0(opt), forward_context=fp8_context
            )
            runner.fwd_bwd_only()
            opt_s = statistics.median(time_fn(lambda: opt.step(0), self.device, 1, 5))
            cfg = self.config
            # The planner's prediction (qwenimage plan / model-info): ZeRO-1 state, activations, the
            # backward's working set and, under FP8, the FP8 weight copies.
            peak = accounting.peak_memory_per_gpu(
                cfg, 1, 1, 1, shape.batch, shape.image_tokens, shape.text, fp8="fp8" in name
            )
            predicted = peak["total"] / 2**30
            self.record(
                what="optimizer",
                variant=name,
                shape=shape.label(),
                optimizer_ms=opt_s * 1e3,
                step_ms=rec["step_ms"],
                optimizer_share=opt_s * 1e3 / rec["step_ms"],
                peak_mem_gib=rec.get("peak_mem_gib"),
                predicted_mem_gib=predicted,
                mem_ratio=(rec["peak_mem_gib"] / predicted) if rec.get("peak_mem_gib") else None,
            )
        except Exception as exc:
            self.record(
                what="optimizer",
                variant=name,
                error=f"{type(exc).__name__}: {exc}"[:500],
                traceback=traceback.format_exc()[-1500:],
            )
        finally:
            for h in getattr(opt, "_hooks", []):
                h.remove()
            self._dist_opt = None
            model.zero_grad(set_to_none=True)
            reset_memory(self.device)

    def profile(self, model, batch: dict, shape: Shape, fp8_context, name: str) -> None:
        """GPU time of one FP8 step by kernel class, and the step's idle fraction."""
        if self.device.type != "cuda":
            return self.record(what="profile", variant=name, skipped="needs a CUDA GPU")
        if not self.budget.allows(20):
            return self.record(what="profile", variant=name, skipped="time budget")
        from torch.profiler import ProfilerActivity, profile

        try:
            runner = StepRunner(model, batch, returns_sample=False, forward_context=fp8_context)
            for _ in range(2):
                runner.step()
            sync(self.device)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(3):
                    runner.step()
                sync(self.device)
                wall = (time.perf_counter() - t0) / 3
            classes: dict[str, float] = {}
            kernels: dict[str, float] = {}
            for evt in prof.key_averages():
                dev_us = getattr(evt, "self_device_time_total", None)
                if dev_us is None:
                    dev_us = getattr(evt, "self_cuda_time_total", 0)
                if not dev_us or evt.device_type is None or "cuda" not in str(evt.device_type).lower():
                    continue
                kernels[evt.key] = kernels.get(evt.key, 0.0) + dev_us / 3 / 1e3
                cls = kernel_class(evt.key)
                classes[cls] = classes.get(cls, 0.0) + dev_us / 3 / 1e3
            busy = sum(classes.values())
            top = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
            self.record(
                what="profile",
                variant=name,
                shape=shape.label(),
                wall_ms=wall * 1e3,
                gpu_busy_ms=busy,
                idle_share=max(0.0, 1 - busy / (wall * 1e3)),
                ms_by_class={k: round(v, 3) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
                top_kernels=[[k[:120], round(v, 3)] for k, v in top],
            )
            del runner
        except Exception as exc:
            self.record(
                what="profile", error=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()[-1500:]
            )
        finally:
            model.zero_grad(set_to_none=True)
            reset_memory(self.device)

    def tp_shards(self) -> None:
        """One TP rank's shard of every block (``--tp-shard``, `build_tp_shard`) at the main shape's
        resolution and each ``--tp-shard-batches`` micro-batch: ours TE bf16 and TE FP8 (weights
        re-quantized every step, as training), fwd + bwd and step, with the elementwise chains
        compiled (``_fused``, as the whole-block records the planner uses) unless ``--skip-compile``.
        Records are named ``<variant>_tp<K>`` and carry ``"tp": K``; their model FLOPs are 1/K of the
        slice's. The capacity planner takes a shard's rate from them (`megatron_qwenimage.planner.measured_rates`)."""
        fused = not self.args.skip_compile
        suffix = "_fused" if fused else ""
        for tp in self.args.tp_shard:
            names = (f"ours_te_bf16{suffix}_tp{tp}", f"ours_te_fp8_delayed_nocache{suffix}_tp{tp}")
            shapes = [Shape(self.args.res, b, self.args.text_tokens, tp=tp) for b in self.args.tp_shard_batches]
            if not self.runs_te():
                for name in names:
                    for shape in shapes:
                        self.skip(name, shape, self.te)
                continue
            est = (60 if fused else 15) if not self.args.tiny else 1
            backend = "transformer_engine" if self.te is None else "local"
            ours = None
            try:
                ours = build_tp_shard(self.config, tp, backend, self.device, self.dtype_name, fused=fused)
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"[:500]
                for shape in shapes:
                    self.record(what="step", variant=names[0], shape=shape.label(), tp=tp, error=why)
                continue
            extra = {
                "tp_shard": "1/tp of every block's heads and MLP width, no communication; model FLOPs 1/tp",
                "fused_elementwise": fused,
            }
            batches = {shape.batch: make_batch(self.config, shape, self.device, self.dtype) for shape in shapes}
            for shape in shapes:
                batch = batches[shape.batch]
                self.measure(names[0], shape, lambda: StepRunner(ours, batch, returns_sample=False), est, extra=extra)
            if self.te is None:  # FP8 needs Transformer Engine itself
                from megatron_qwenimage.model.cuda_graphs import disable_fp8_weight_cache

                fp8 = self.fp8_context(ours)
                count = disable_fp8_weight_cache(ours)
                fp8_extra = dict(extra, fp8_weights="re-quantized every step", te_linears=count)
                for shape in shapes:
                    batch = batches[shape.batch]
                    self.measure(
                        names[1],
                        shape,
                        lambda: StepRunner(ours, batch, returns_sample=False, forward_context=fp8),
                        est,
                        extra=fp8_extra,
                    )
            else:
                for shape in shapes:
                    self.skip(names[1], shape, self.te)
            ours = batches = None
            reset_memory(self.device)
            self.check_cuda(f"the TP{tp} shard")

    def buckets(self) -> None:
        """The curriculum's other buckets at their micro-batches (text 256, ``--buckets``): the
        anchors (diffusers eager and + compile), ours TE FP8 (eager, ``_nocache``, ``_fused``),
        TE bf16 ``_fused`` and, last in each bucket, TE FP8 with per-block CUDA graphs."""
        for res, batch_size in self.args.buckets:
            shape = Shape(res, batch_size, self.args.text_tokens)
            if self.cuda_broken:
                self.skip("bucket", shape, self.cuda_broken)
                continue
            if not self.budget.allows(40):
                self.skip("bucket", shape, f"time budget ({self.budget.left():.0f} s left)")
                continue
            ref = build_reference(self.config, self.device, self.dtype)
            batch = make_batch(self.config, shape, self.device, self.dtype)
            self.measure(
                "diffusers_eager", shape, lambda: StepRunner(ref, batch, returns_sample=True), 15, fwd_bwd=False
            )
            if self.runs_te():
                est = 30 if not self.args.tiny else 1
                if self.wants("te_fp8") or self.wants("te_fp8_nocache"):
                    ours, fp8 = self.ours_te(ref, fused=False)
                    if self.wants("te_fp8"):
                        self.measure(
                            "ours_te_fp8_delayed",
                            shape,
                            lambda: StepRunner(ours, batch, returns_sample=False, forward_context=fp8),
                            est,
                            fwd_bwd=False,
                            extra={"fp8_weights": "cached after the first forward"},
                        )
                    if self.wants("te_fp8_nocache"):
                        self.fp8_nocache(ours, batch, shape, fp8, est, fwd_bwd=False)
                    ours = None
                    reset_memory(self.device)
                fused = [v for v in ("te_fp8_fused", "te_bf16_fused") if self.wants(v)]
                names = {"te_fp8_fused": "ours_te_fp8_delayed_fused", "te_bf16_fused": "ours_te_bf16_fused"}
                if fused and self.args.skip_compile:
                    for v in fused:
                        self.skip(names[v], shape, "--skip-compile")
                elif fused:
                    ours, fp8 = self.ours_te(ref, fused=True)
                    if "te_fp8_fused" in fused:
                        self.measure(
                            names["te_fp8_fused"],
                            shape,
                            lambda: StepRunner(ours, batch, returns_sample=False, forward_context=fp8),
                            est,
                            fwd_bwd=False,
                            extra={"fp8_weights": "cached after the first forward"},
                        )
                    if "te_bf16_fused" in fused:
                        self.measure(
                            names["te_bf16_fused"],
                            shape,
                            lambda: StepRunner(ours, batch, returns_sample=False),
                            est,
                            fwd_bwd=False,
                        )
                    ours = None
                    reset_memory(self.device)
            self.compiled_reference(ref, batch, shape, fwd_bwd=False)
            if self.wants("te_fp8_graphs"):
                self.graph_variant(ref, batch, shape, fp8=True)
            ref = batch = None
            reset_memory(self.device)

    def run(self) -> list[dict]:
        t0 = time.monotonic()
        self.environment()
        self.peaks()
        t = self.args.text_tokens
        shape = Shape(self.args.res, self.args.batch, t)
        padded = Shape(self.args.res, self.args.batch, t, padded_text=self.args.padded_text)
        self.main_shape_variants(shape, padded)
        self.tp_shards()
        if not self.args.skip_buckets and self.wants("buckets"):
            self.buckets()
        summary = summarize(self.record.records)
        self.record(what="summary", wall_s=time.monotonic() - t0, **summary)
        return self.record.records


def kernel_class(name: str) -> str:
    """Coarse class of a CUDA kernel by its name."""
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "attn", "attention", "cudnn_generated", "sdpa", "softmax")):
        return "attention"
    if any(k in n for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if any(k in n for k in ("cast", "transpose", "quantize", "amax", "scale", "fp8")):
        return "fp8_cast_transpose"
    if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "sm90", "matmul", "cublas")):
        return "gemm"
    if any(k in n for k in ("nccl", "memcpy", "memset")):
        return "memory_comm"
    return "elementwise_norm_other"


GRAPH_VARIANTS = ("ours_te_bf16_graphs", "ours_te_fp8_delayed_graphs")


def summarize(records: list[dict]) -> dict:
    """Ratios of the targets, from the records of this run (None where a side is missing).

    ``targets`` / ``targets_fused`` / ``targets_graphs``: the main shape's targets per family;
    ``graphs_vs_eager``: what the per-block CUDA graphs gain over the same model eager;
    ``vs_diffusers_eager`` / ``padded_vs_diffusers_eager_padded``: the main shape against the
    eager anchor; ``buckets``: per other bucket, each of ours against that bucket's anchors.
    """

    def ms(variant: str, shape_pred, key="step_ms"):
        for r in records:
            if r.get("what") == "step" and r.get("variant") == variant and shape_pred(r) and key in r:
                return r[key]
        return None

    first_res = next((r["res"] for r in records if r.get("what") == "step" and "res" in r), None)
    unpadded = lambda r: r.get("res") == first_res and not r.get("padded_text")  # noqa: E731
    padded = lambda r: r.get("res") == first_res and bool(r.get("padded_text"))  # noqa: E731

    def ratio(anchor, ours, pred=unpadded, key="step_ms", pred2=None):
        a, o = ms(anchor, pred, key), ms(ours, pred2 or pred, key)
        return a / o if a and o else None

    out = {}
    for suffix in ("", "_fused"):
        bf16, fp8 = f"ours_te_bf16{suffix}", f"ours_te_fp8_delayed{suffix}"
        out[f"targets{suffix}"] = {
            f"{bf16}_vs_diffusers_compile (>=1.15)": ratio("diffusers_compile", bf16),
            f"{fp8}_vs_diffusers_compile (>=1.5)": ratio("diffusers_compile", fp8),
            f"{fp8}_vs_torchao_fp8_compile (>=1.25)": ratio("diffusers_torchao_fp8_compile", fp8),
            f"{bf16}_padded_vs_unpadded (>=0.9)": ratio(bf16, bf16, unpadded, pred2=padded),
            f"{fp8}_padded_vs_unpadded (>=0.9)": ratio(fp8, fp8, unpadded, pred2=padded),
            f"{fp8}_fwd_bwd_vs_diffusers_compile": ratio("diffusers_compile", fp8, key="fwd_bwd_ms"),
        }
    bf16_g, fp8_g = GRAPH_VARIANTS
    out["targets_graphs"] = {
        f"{bf16_g}_vs_diffusers_compile (>=1.15)": ratio("diffusers_compile", bf16_g),
        f"{fp8_g}_vs_diffusers_compile (>=1.5)": ratio("diffusers_compile", fp8_g),
        f"{fp8_g}_vs_torchao_fp8_compile (>=1.25)": ratio("diffusers_torchao_fp8_compile", fp8_g),
        f"{fp8_g}_fwd_bwd_vs_diffusers_compile": ratio("diffusers_compile", fp8_g, key="fwd_bwd_ms"),
        f"{fp8_g}_fused_vs_diffusers_compile (>=1.5)": ratio("diffusers_compile", f"{fp8_g}_fused"),
        f"{fp8_g}_fused_vs_torchao_fp8_compile (>=1.25)": ratio("diffusers_torchao_fp8_compile", f"{fp8_g}_fused"),
        "ours_te_fp8_delayed_nocache_vs_diffusers_compile": ratio("diffusers_compile", "ours_te_fp8_delayed_nocache"),
        "ours_te_fp8_delayed_nocache_vs_torchao_fp8_compile": ratio(
            "diffusers_torchao_fp8_compile", "ours_te_fp8_delayed_nocache"
        ),
    }
    out["graphs_vs_eager"] = {
        f"{bf16_g}_vs_ours_te_bf16": ratio("ours_te_bf16", bf16_g),
        # the same FP8 weight handling on both sides: re-quantized every step
        f"{fp8_g}_vs_ours_te_fp8_delayed_nocache": ratio("ours_te_fp8_delayed_nocache", fp8_g),
        f"{fp8_g}_vs_ours_te_fp8_delayed (eager reuses its first FP8 weights)": ratio("ours_te_fp8_delayed", fp8_g),
        f"{fp8_g}_fwd_bwd_vs_ours_te_fp8_delayed_nocache": ratio(
            "ours_te_fp8_delayed_nocache", fp8_g, key="fwd_bwd_ms"
        ),
        f"{fp8_g}_fused_vs_{fp8_g}": ratio(fp8_g, f"{fp8_g}_fused"),
    }
    out["fp8_attention"] = {
        "ours_te_fp8_delayed_dpa_vs_nocache": ratio("ours_te_fp8_delayed_nocache", "ours_te_fp8_delayed_dpa"),
        "ours_te_fp8_delayed_dpa_fwd_bwd_vs_nocache": ratio(
            "ours_te_fp8_delayed_nocache", "ours_te_fp8_delayed_dpa", key="fwd_bwd_ms"
        ),
        "ours_te_fp8_delayed_dpa_vs_diffusers_compile (>=1.5)": ratio("diffusers_compile", "ours_te_fp8_delayed_dpa"),
        "ours_te_fp8_delayed_dpa_vs_torchao_fp8_compile (>=1.25)": ratio(
            "diffusers_torchao_fp8_compile", "ours_te_fp8_delayed_dpa"
        ),
    }
    ours = (
        "ours_te_bf16",
        "ours_te_fp8_delayed",
        "ours_te_bf16_fused",
        "ours_te_fp8_delayed_fused",
        "ours_te_fp8_delayed_nocache",
        "ours_te_fp8_delayed_dpa",
        *GRAPH_VARIANTS,
        f"{GRAPH_VARIANTS[1]}_fused",
        "ours_te_fp8_delayed_dist_opt",
        "ours_te_fp8_delayed_fused_dist_opt",
        "ours_local",
        "diffusers_compile",
        "diffusers_torchao_fp8_compile",
    )
    out["vs_diffusers_eager"] = {v: ratio("diffusers_eager", v) for v in ours}
    out["padded_vs_diffusers_eager_padded"] = {v: ratio("diffusers_eager", v, padded) for v in ours[:4]}
    bucket_labels = list(
        dict.fromkeys(
            r["shape"]
            for r in records
            if r.get("what") == "step" and "res" in r and r.get("res") != first_res and "shape" in r
        )
    )
    bucket_ours = (
        "ours_te_fp8_delayed",
        "ours_te_fp8_delayed_nocache",
        "ours_te_fp8_delayed_fused",
        "ours_te_bf16_fused",
        "ours_te_fp8_delayed_graphs",
    )
    out["buckets"] = {}
    for label in bucket_labels:
        at = lambda r, label=label: r.get("shape") == label  # noqa: E731
        out["buckets"][label] = {
            "vs_diffusers_compile": {v: ratio("diffusers_compile", v, at) for v in bucket_ours},
            "vs_diffusers_eager": {v: ratio("diffusers_eager", v, at) for v in (*bucket_ours, "diffusers_compile")},
            "graphs_vs_nocache": ratio("ours_te_fp8_delayed_nocache", "ours_te_fp8_delayed_graphs", at),
        }
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=None, help="append JSON lines to this file (default: stdout only)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="wall-clock budget; measurements that would not fit are recorded as skipped (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=("cpu", "cuda"),
        help="device (default: cuda when available)",
    )
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="parameter/activation dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--config", default=None, help="model config (default: qwen-image-20b; tiny with --tiny)")
    p.add_argument("--layers", type=int, default=None, help="blocks in the slice (default: 4; 2 with --tiny)")
    p.add_argument(
        "--res", type=int, default=None, help="main shape's image side in px (default: 1024; 64 with --tiny)"
    )
    p.add_argument("--batch", type=int, default=2, help="main shape's batch (default: %(default)s)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens (default: 256; 16 with --tiny)")
    p.add_argument(
        "--padded-text",
        type=int,
        default=None,
        help="padded trailing text tokens in every other sample of the padded variant (default: 64; 4 with --tiny)",
    )
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 10; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 3; 1 with --tiny)")
    p.add_argument("--skip-compile", action="store_true", help="skip the torch.compile anchors")
    p.add_argument("--skip-buckets", action="store_true", help="skip the other buckets")
    p.add_argument(
        "--skip",
        default="",
        metavar="PART,...",
        help="leave out these parts of the run (the anchors are never left out): "
        + ", ".join(PARTS)
        + "; 'help' lists them",
    )
    p.add_argument(
        "--buckets",
        default=None,
        metavar="RES[:BATCH],...",
        help="the other buckets, image side in px and micro-batch (default: 256:32,640:8,1328:2; "
        "64,96 with --tiny); micro-batches of known sides: " + ", ".join(f"{k}:{v}" for k, v in BUCKET_BATCH.items()),
    )
    p.add_argument(
        "--tp-shard",
        default="",
        metavar="K,...",
        help="also measure one tensor-parallel rank's shard of every block for each TP size K (1/K of the heads, "
        "the q/k/v and output projections and the MLP width; no communication), records named <variant>_tpK "
        'with "tp": K, which qwenimage plan reads (default: none)',
    )
    p.add_argument(
        "--tp-shard-batches",
        default=None,
        metavar="B,...",
        help="micro-batches of the --tp-shard measurements, at the main shape's --res (default: --batch)",
    )
    p.add_argument(
        "--with-local",
        action="store_true",
        help="also time our local (torch) backend (always done where TE cannot run)",
    )
    p.add_argument("--tiny", action="store_true", help="toy shapes: every code path in seconds (CPU tests)")
    p.add_argument(
        "--graphs-standin",
        action="store_true",
        help="with --te-standin-local where CUDA graphs cannot run, take the graph variants' code "
        "path with the blocks called eagerly through the same wrappers (tests the harness on CPU)",
    )
    p.add_argument(
        "--te-standin-local",
        action="store_true",
        help="where Transformer Engine cannot run, take the TE variants' code path with the local "
        "backend and no FP8 (tests the harness on CPU; the numbers mean nothing)",
    )
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    tiny = args.tiny
    defaults = {
        "dtype": "bf16" if args.device == "cuda" else "fp32",
        "config": "tiny" if tiny else "qwen-image-20b",
        "layers": 2 if tiny else 4,
        "res": 64 if tiny else 1024,
        "text_tokens": 16 if tiny else 256,
        "padded_text": 4 if tiny else 64,
        "iters": 2 if tiny else 10,
        "warmup": 1 if tiny else 3,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.res % 16:
        raise SystemExit(f"error: --res {args.res} must be a multiple of 16")
    if not 0 < args.padded_text < args.text_tokens:
        raise SystemExit(f"error: --padded-text {args.padded_text} must be in 1..{args.text_tokens - 1}")
    args.skip = parse_skip(args.skip) if isinstance(args.skip, str) else frozenset(args.skip)
    if args.buckets is None:
        args.buckets = "64,96" if tiny else "256,640,1328"
    if isinstance(args.buckets, str):
        args.buckets = parse_buckets(args.buckets)
    heads = load_config(args.config).num_attention_heads
    if isinstance(args.tp_shard, str):
        args.tp_shard = parse_positive_ints(args.tp_shard, "--tp-shard", minimum=2)
    bad = [k for k in args.tp_shard if heads % k]
    if bad:
        raise SystemExit(f"error: --tp-shard {bad}: a TP size must divide the {heads} heads of {args.config}")
    if args.tp_shard_batches is None:
        args.tp_shard_batches = [args.batch]
    elif isinstance(args.tp_shard_batches, str):
        args.tp_shard_batches = parse_positive_ints(args.tp_shard_batches, "--tp-shard-batches")
    return args


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    GPURun(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
