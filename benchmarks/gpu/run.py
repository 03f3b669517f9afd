"""Every measurement of the GPU performance work in one process; JSON lines out.

One call on one GPU measures, in this order (most important first, so that a time budget cuts
the tail, never the head):

1. the card's measured ceilings: bf16 GEMM 8192³ (the MFU denominator) and FP8 ``_scaled_mm``;
2. at the main shape (a 4-block full-width slice of the 20B model, 1024² = 4096 image tokens +
   256 text tokens, batch 2), each variant's fwd + bwd + optimizer step and fwd + bwd alone:
   diffusers eager (the anchor), ours TE bf16, ours TE FP8 (delayed), each again with padded
   text (half the samples with 64 of their 256 text tokens padded), diffusers + torch.compile,
   diffusers + torchao float8 + compile, ours local bf16. Every side of every ratio uses the same
   optimizer: ``torch.optim.AdamW(fused=True)`` on the bf16 parameters;
3. ours with the training loop's own optimizer (`consumers.optimizer.DistributedOptimizer`: fp32
   main grads, fp32 master + moments): step time, the optimizer's share, and peak memory against
   `megatron_qwenimage.accounting.memory_per_gpu` for the same layout;
4. a profile of one FP8 step: GPU time by kernel class (GEMM, FP8 cast/transpose, attention,
   optimizer, other elementwise) and the top kernels;
5. the other buckets (256², 640², 1328² at micro-batches 32, 8, 2): diffusers eager, ours TE bf16
   and FP8.

Each record has ``what``, the variant, ``step_ms`` (median of `--iters` after `--warmup`),
``img_tokens_per_s``, ``model_tflops`` (the project's FLOP accounting), ``mfu`` (against the
measured bf16 GEMM peak) and ``peak_mem_gib``; ratios are computed by `summarize` from records of
the same run. A failing variant writes ``error`` and the run goes on.

On the GPU machine (see benchmarks/gpu/README.md)::

    python3 benchmarks/gpu/run.py --out $OUT/gpu.jsonl --budget-s 420

On CPU, ``--tiny`` runs every code path at toy shapes (TE and torchao variants record why they
were skipped), which is what the test suite does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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

    def __init__(self, path: Optional[str]):
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
        short = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in record.items()
                 if k not in ("top_kernels", "traceback")}
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


def peak_memory_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


# ------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shape:
    """One benchmark batch: ``batch`` samples of ``res``² pixels and ``text`` text tokens."""

    res: int
    batch: int
    text: int
    padded_text: int = 0  # trailing text tokens padded in every other sample

    @property
    def grid(self) -> int:
        return self.res // 16

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    def label(self) -> str:
        pad = f"+pad{self.padded_text}" if self.padded_text else ""
        return f"{self.res}px_b{self.batch}_t{self.text}{pad}"


def make_batch(config: MMDiTConfig, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """diffusers-signature inputs plus a velocity target (`benchmarks/mmdit_step.py`'s), with a
    right-padded text mask in every other sample when ``shape.padded_text``."""
    from mmdit_step import Workload, make_inputs

    work = Workload(shape.batch, shape.grid, shape.grid, shape.text)
    return make_inputs(config, work, device, dtype, seed, shape.padded_text)


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
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

    return QwenImageMMDiT.from_diffusers(ref, device=str(device), params_dtype=dtype_name, backend=backend,
                                         **overrides)


class StepRunner:
    """fwd + flow-matching loss + bwd (+ optimizer) of one model on one batch.

    Args:
        model: ours or diffusers' (``returns_sample`` for the latter's output object).
        optimizer: "fused_adamw" (``torch.optim.AdamW(fused=True)`` on CUDA, foreach on CPU),
            or a prebuilt object with ``zero_grad()``/``step()``; None: no optimizer.
        forward_context: context factory around the forward (FP8 autocast).
    """

    def __init__(self, model, batch: dict, *, returns_sample: bool, optimizer="fused_adamw",
                 forward_context: Callable = contextlib.nullcontext, compiled=None):
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


def flops_per_step(config: MMDiTConfig, shape: Shape) -> float:
    return float(accounting.model_flops_per_sample(config, shape.image_tokens, shape.text)) * shape.batch


def perf_fields(config: MMDiTConfig, shape: Shape, seconds: list[float], peak: Optional[float]) -> dict:
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
        self.peak_bf16: Optional[float] = None
        overrides = {"params_dtype": self.dtype_name, "num_layers": args.layers}
        self.config = load_config(args.config, **overrides)
        self.te = self._te_status()

    # -- environment -------------------------------------------------------------------------
    def _te_status(self) -> Optional[str]:
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
        self.record(what="environment", config=self.config.name, layers=self.config.num_layers,
                    hidden=self.config.hidden_size, budget_s=self.args.budget_s, **info)

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
            s = statistics.median(time_fn(
                lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                self.device, 3, 10))
            self.record(what="peak", kind="fp8_scaled_mm", n=n, tflops=2 * n**3 / s / 1e12)
        del a, b

    # -- one variant -------------------------------------------------------------------------
    def measure(self, name: str, shape: Shape, runner_factory: Callable[[], StepRunner],
                estimate_s: float, fwd_bwd: bool = True) -> Optional[dict]:
        """Time ``runner.step`` (and ``fwd_bwd_only``) of one variant; records a line either way."""
        base = {"what": "step", "variant": name, "shape": shape.label(), "res": shape.res,
                "batch": shape.batch, "text_tokens": shape.text, "padded_text": shape.padded_text}
        if not self.budget.allows(estimate_s):
            return self.record(**base, skipped=f"time budget ({self.budget.left():.0f} s left, needs ~{estimate_s:.0f})")
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
            return self.record(**base, error=f"{type(exc).__name__}: {exc}"[:500],
                               traceback=traceback.format_exc()[-2000:], wall_s=time.monotonic() - t0)
        finally:
            del runner
            reset_memory(self.device)

    def skip(self, name: str, shape: Shape, why: str) -> None:
        self.record(what="step", variant=name, shape=shape.label(), skipped=why)

    # -- variants ----------------------------------------------------------------------------
    def fp8_context(self, model, recipe: str = "delayed"):
        from consumers.step import Precision, PrecisionConfig

        # Every block of the slice in FP8, as 58 of the 60 blocks are under the training default
        # (`fp8_exclude: first_last` would keep half of a 4-block slice in bf16).
        precision = Precision(PrecisionConfig(fp8=recipe, fp8_exclude=()), model.config, self.device)
        precision.prepare_model(model)
        return precision.forward_context

    def main_shape_variants(self, shape: Shape, padded: Shape) -> None:
        cfg, dev = self.config, self.device
        ref = build_reference(cfg, dev, self.dtype)
        batch = make_batch(cfg, shape, dev, self.dtype)
        pbatch = make_batch(cfg, padded, dev, self.dtype)
        est = 20 if not self.args.tiny else 1

        self.measure("diffusers_eager", shape, lambda: StepRunner(ref, batch, returns_sample=True), est)
        self.measure("diffusers_eager", padded, lambda: StepRunner(ref, pbatch, returns_sample=True), est)
        if self.te is None or self.args.te_standin_local:
            modes = (False, True) if not self.args.skip_compile else (False,)
            for fused in modes:
                self.te_variants(ref, batch, pbatch, shape, padded, fused=fused, loop_extras=fused == modes[-1])
        else:
            for v in ("ours_te_bf16", "ours_te_fp8_delayed"):
                self.skip(v, shape, self.te)
        if self.args.with_local or self.te is not None:
            ours_local = build_ours(ref, "local", dev, self.dtype_name)
            self.parity(ours_local, ref, pbatch, "ours_local")
            self.measure("ours_local", shape, lambda: StepRunner(ours_local, batch, returns_sample=False), est)
            if self.te is not None:
                self.distributed_optimizer(ours_local, batch, shape, contextlib.nullcontext, "ours_local_dist_opt")
            del ours_local
            reset_memory(dev)
        self.compiled_reference(ref, batch, shape)
        del ref
        reset_memory(dev)
        self.torchao_reference(shape, batch)

    def te_variants(self, ref, batch: dict, pbatch: dict, shape: Shape, padded: Shape, *, fused: bool,
                    loop_extras: bool) -> None:
        """Ours on Transformer Engine, bf16 and FP8, unpadded and padded; with ``fused`` the
        blocks' elementwise chains are compiled (``MMDiTConfig.fused_elementwise``). With
        `loop_extras`, the training loop's optimizer and a profile are measured on this model."""
        suffix = "_fused" if fused else ""
        est = (60 if fused else 15) if not self.args.tiny else 1
        if self.te is None:
            ours = build_ours(ref, "transformer_engine", self.device, self.dtype_name, fused_elementwise=fused)
            fp8 = self.fp8_context(ours)
        else:  # --te-standin-local: the same code path on CPU, local kernels, no FP8
            ours = build_ours(ref, "local", self.device, self.dtype_name, fused_elementwise=fused)
            fp8 = contextlib.nullcontext
        bf16_name, fp8_name = f"ours_te_bf16{suffix}", f"ours_te_fp8_delayed{suffix}"
        self.parity(ours, ref, pbatch, bf16_name)  # before any step changes the weights
        self.measure(fp8_name, shape, lambda: StepRunner(ours, batch, returns_sample=False, forward_context=fp8), est)
        self.measure(bf16_name, shape, lambda: StepRunner(ours, batch, returns_sample=False), est)
        self.measure(fp8_name, padded, lambda: StepRunner(ours, pbatch, returns_sample=False, forward_context=fp8), est)
        self.measure(bf16_name, padded, lambda: StepRunner(ours, pbatch, returns_sample=False), est)
        if loop_extras:
            self.distributed_optimizer(ours, batch, shape, fp8, f"{fp8_name}_dist_opt")
            self.profile(ours, batch, shape, fp8, fp8_name)
        del ours
        reset_memory(self.device)

    def parity(self, ours, ref, batch: dict, name: str) -> None:
        """Forward agreement of ours and diffusers on the (padded) batch: valid image tokens."""
        try:
            args = {k: v for k, v in batch.items() if k != "target"}
            with torch.no_grad():
                a = ours(**args).float()
                b = ref(**args, return_dict=False)[0].float()
            rel = ((a - b).norm() / b.norm()).item()
            self.record(what="parity", variant=name, shape=f"{batch['hidden_states'].shape}",
                        rel_l2=rel, max_abs=(a - b).abs().max().item(), finite=bool(torch.isfinite(a).all()))
        except Exception as exc:
            self.record(what="parity", variant=name, error=f"{type(exc).__name__}: {exc}"[:500])

    def compiled_reference(self, ref, batch: dict, shape: Shape) -> None:
        est = 100 if not self.args.tiny else 60
        if self.args.skip_compile:
            return self.skip("diffusers_compile", shape, "--skip-compile")
        compiled = torch.compile(ref)
        self.measure("diffusers_compile", shape,
                     lambda: StepRunner(ref, batch, returns_sample=True, compiled=compiled), est)
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
                ref, module_filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear)
                and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
                and "transformer_blocks" in fqn and "_mod" not in fqn)
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
            return StepRunner(model, batch, returns_sample=False, optimizer=_StepAt0(opt),
                              forward_context=fp8_context)

        rec = self.measure(name, shape, factory, 30)
        opt = getattr(self, "_dist_opt", None)
        if rec is None or "error" in rec or opt is None:
            return
        try:
            # The optimizer alone, after one fwd + bwd left gradients in the main-grad buffers.
            runner = StepRunner(model, batch, returns_sample=False, optimizer=_StepAt0(opt),
                                forward_context=fp8_context)
            runner.fwd_bwd_only()
            opt_s = statistics.median(time_fn(lambda: opt.step(0), self.device, 1, 5))
            cfg = self.config
            report = accounting.memory_per_gpu(cfg, 1, 1, 1, shape.batch, shape.image_tokens, shape.text,
                                               params_dtype=self.dtype_name)
            predicted = report.total_gib
            self.record(what="optimizer", variant=name, shape=shape.label(),
                        optimizer_ms=opt_s * 1e3, step_ms=rec["step_ms"],
                        optimizer_share=opt_s * 1e3 / rec["step_ms"],
                        peak_mem_gib=rec.get("peak_mem_gib"), predicted_mem_gib=predicted,
                        mem_ratio=(rec["peak_mem_gib"] / predicted) if rec.get("peak_mem_gib") else None)
        except Exception as exc:
            self.record(what="optimizer", variant=name, error=f"{type(exc).__name__}: {exc}"[:500],
                        traceback=traceback.format_exc()[-1500:])
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
            self.record(what="profile", variant=name, shape=shape.label(),
                        wall_ms=wall * 1e3, gpu_busy_ms=busy, idle_share=max(0.0, 1 - busy / (wall * 1e3)),
                        ms_by_class={k: round(v, 3) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
                        top_kernels=[[k[:120], round(v, 3)] for k, v in top])
            del runner
        except Exception as exc:
            self.record(what="profile", error=f"{type(exc).__name__}: {exc}"[:500],
                        traceback=traceback.format_exc()[-1500:])
        finally:
            model.zero_grad(set_to_none=True)
            reset_memory(self.device)

    def buckets(self) -> None:
        """The curriculum's other buckets at their micro-batches (text 256)."""
        sizes = [(64, 2), (96, 2)] if self.args.tiny else [(256, 32), (640, 8), (1328, 2)]
        for res, batch_size in sizes:
            shape = Shape(res, batch_size, self.args.text_tokens)
            if not self.budget.allows(40):
                self.skip("bucket", shape, f"time budget ({self.budget.left():.0f} s left)")
                continue
            ref = build_reference(self.config, self.device, self.dtype)
            batch = make_batch(self.config, shape, self.device, self.dtype)
            self.measure("diffusers_eager", shape, lambda: StepRunner(ref, batch, returns_sample=True), 15,
                         fwd_bwd=False)
            if self.te is None:
                ours = build_ours(ref, "transformer_engine", self.device, self.dtype_name, fused_elementwise=True)
                fp8 = self.fp8_context(ours)
                self.measure("ours_te_fp8_delayed_fused", shape,
                             lambda: StepRunner(ours, batch, returns_sample=False, forward_context=fp8), 30,
                             fwd_bwd=False)
                self.measure("ours_te_bf16_fused", shape, lambda: StepRunner(ours, batch, returns_sample=False), 30,
                             fwd_bwd=False)
                del ours
            del ref, batch
            reset_memory(self.device)

    def run(self) -> list[dict]:
        t0 = time.monotonic()
        self.environment()
        self.peaks()
        t = self.args.text_tokens
        shape = Shape(self.args.res, self.args.batch, t)
        padded = Shape(self.args.res, self.args.batch, t, padded_text=self.args.padded_text)
        self.main_shape_variants(shape, padded)
        if not self.args.skip_buckets:
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


def summarize(records: list[dict]) -> dict:
    """Ratios of the targets, from the records of this run (None where a side is missing)."""
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
    ours = ("ours_te_bf16", "ours_te_fp8_delayed", "ours_te_bf16_fused", "ours_te_fp8_delayed_fused",
            "ours_te_fp8_delayed_dist_opt", "ours_te_fp8_delayed_fused_dist_opt", "ours_local", "diffusers_compile", "diffusers_torchao_fp8_compile")
    out["vs_diffusers_eager"] = {v: ratio("diffusers_eager", v) for v in ours}
    out["padded_vs_diffusers_eager_padded"] = {
        v: ratio("diffusers_eager", v, padded) for v in ours[:4]
    }
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="append JSON lines to this file (default: stdout only)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget; measurements that would not fit are recorded as skipped "
                   "(default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cpu", "cuda"), help="device (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="parameter/activation dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--config", default=None, help="model config (default: qwen-image-20b; tiny with --tiny)")
    p.add_argument("--layers", type=int, default=None, help="blocks in the slice (default: 4; 2 with --tiny)")
    p.add_argument("--res", type=int, default=None, help="main shape's image side in px (default: 1024; 64 with --tiny)")
    p.add_argument("--batch", type=int, default=2, help="main shape's batch (default: %(default)s)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens (default: 256; 16 with --tiny)")
    p.add_argument("--padded-text", type=int, default=None,
                   help="padded trailing text tokens in every other sample of the padded variant "
                   "(default: 64; 4 with --tiny)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 10; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 3; 1 with --tiny)")
    p.add_argument("--skip-compile", action="store_true", help="skip the torch.compile anchors")
    p.add_argument("--skip-buckets", action="store_true", help="skip the other buckets")
    p.add_argument("--with-local", action="store_true",
                   help="also time our local (torch) backend (always done where TE cannot run)")
    p.add_argument("--tiny", action="store_true", help="toy shapes: every code path in seconds (CPU tests)")
    p.add_argument("--te-standin-local", action="store_true",
                   help="where Transformer Engine cannot run, take the TE variants' code path with the local "
                   "backend and no FP8 (tests the harness on CPU; the numbers mean nothing)")
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
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    GPURun(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
