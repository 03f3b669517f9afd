"""Optimizer-step benchmark: the flat-buffer `DistributedOptimizer` against the per-parameter one.

Builds transformer-shaped parameters (per block: qkv ``[3d, d]``, out ``[d, d]``, fc1 ``[4d, d]``,
fc2 ``[d, 4d]``, their biases and two norm weights; ``d`` is chosen so the total is about
``--params``) in ``--dtype``, and times ``step()`` (reduce grads, norm, clip, AdamW, EMA, gather into
the params) of

* ``new``: `consumers.optimizer.DistributedOptimizer` (one rank-major fp32 grad buffer, flat fp32
  master / moments / EMA, fused AdamW, one-lerp EMA, flat gather);
* ``naive``: the previous implementation (kept below as `NaiveOptimizer`): per-parameter fp32
  masters, packing every gradient through a zero-padded temporary into a fresh ``[dp, S]`` buffer,
  ``torch.optim.AdamW(foreach=False)``, a python EMA loop, per-parameter packing for the gather.

Both run in this process with dp = 1 (no process group) with the same weights, gradients, clipping
(active), weight decay and EMA; gradients are refilled before every timed step (untimed). Prints
the medians and ``ratio = naive / new`` (> 1: the new one is faster) as one JSON line::

    python benchmarks/optimizer_step.py                      # CPU, ~50M params
    python benchmarks/optimizer_step.py --device cuda --params 1360000000
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from collections.abc import Callable

import torch

from consumers.optimizer import DistributedOptimizer, LRSchedule, OptimizerConfig
from megatron_qwenimage.model.mappings import reduce_scatter_single

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CONFIG = OptimizerConfig(lr=1e-4, warmup_steps=10, decay_steps=1000, weight_decay=0.1, clip_grad=1e-3, ema_decay=0.999)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", type=int, default=50_000_000, help="total parameter elements (default: %(default)s)")
    p.add_argument("--layers", type=int, default=16, help="transformer blocks (10 tensors each; default: %(default)s)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="parameter dtype (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: %(default)s)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per optimizer (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per optimizer first (default: %(default)s)")
    p.add_argument("--skip-naive", action="store_true", help="time only the new optimizer (no ratio)")
    return p


def make_params(
    total: int, layers: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[str, torch.nn.Parameter, int | None]]:
    """``(name, param, tp_dim)`` of `layers` blocks of hidden size d, about `total` elements in all."""
    d = max(8, int(math.sqrt(total / (12 * layers))) // 8 * 8)
    shapes = {
        "qkv.weight": (3 * d, d),
        "qkv.bias": (3 * d,),
        "out.weight": (d, d),
        "out.bias": (d,),
        "fc1.weight": (4 * d, d),
        "fc1.bias": (4 * d,),
        "fc2.weight": (d, 4 * d),
        "fc2.bias": (d,),
        "norm1.weight": (d,),
        "norm2.weight": (d,),
    }
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for i in range(layers):
        for name, shape in shapes.items():
            w = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype)
            tp_dim = 0 if name.startswith(("qkv", "fc1")) else (1 if name in ("out.weight", "fc2.weight") else None)
            out.append((f"blocks.{i}.{name}", torch.nn.Parameter(w), tp_dim))
    return out


def grads_for(named) -> dict[str, torch.Tensor]:
    """Fixed fp32 gradients of every parameter."""
    g = torch.Generator(device=named[0][1].device).manual_seed(1)
    return {n: torch.randn(p.shape, generator=g, device=p.device) for n, p, _ in named}


class NaiveOptimizer:
    """The per-parameter ZeRO-1 AdamW this benchmark compares against (the code before the flat
    buffers; dp = 1 here, its reduce-scatter path is kept for completeness)."""

    def __init__(self, named_params, config: OptimizerConfig, *, dp_group=None, tp_rank: int = 0):
        import torch.distributed as dist

        self.dist = dist
        self.config = config
        self.schedule = LRSchedule(config)
        self.dp_group = dp_group
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.tp_rank = tp_rank
        self.shards = []
        offset = 0
        for name, p, tp_dim in named_params:
            rows = p.shape[0]
            cols = p.numel() // rows
            chunk = -(-rows // self.dp)
            start = min(self.dp_rank * chunk, rows)
            end = min(start + chunk, rows)
            self.shards.append(
                dict(
                    name=name,
                    param=p,
                    tp_dim=tp_dim,
                    rows=rows,
                    cols=cols,
                    chunk_rows=chunk,
                    row_start=start,
                    row_end=end,
                    offset=offset,
                )
            )
            offset += chunk * cols
        self.shard_numel = offset
        self.device = self.shards[0]["param"].device
        self.master = {}
        for s in self.shards:
            rows_view = s["param"].detach().view(s["rows"], s["cols"])[s["row_start"] : s["row_end"]]
            self.master[s["name"]] = rows_view.to(torch.float32).clone().view(self._owned_shape(s))
        decay = [self.master[s["name"]] for s in self.shards if s["param"].ndim >= 2]
        no_decay = [self.master[s["name"]] for s in self.shards if s["param"].ndim < 2]
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            foreach=False,
        )
        self.ema = {k: v.clone() for k, v in self.master.items()} if config.ema_decay > 0 else None
        self.main_grads = {
            s["name"]: torch.zeros(s["param"].shape, dtype=torch.float32, device=self.device)
            for s in self.shards
            if s["param"].dtype != torch.float32
        }

    @staticmethod
    def _owned_shape(s):
        return (s["row_end"] - s["row_start"], *s["param"].shape[1:])

    def _grad_fp32(self, s):
        if s["name"] in self.main_grads:
            return self.main_grads[s["name"]]
        g = s["param"].grad
        return torch.zeros_like(s["param"], dtype=torch.float32) if g is None else g.float()

    def _reduce_scatter_grads(self):
        packed = torch.zeros(self.dp, self.shard_numel, dtype=torch.float32, device=self.device)
        for s in self.shards:
            g = self._grad_fp32(s).reshape(s["rows"], s["cols"])
            padded = torch.zeros(self.dp * s["chunk_rows"], s["cols"], dtype=torch.float32, device=self.device)
            padded[: s["rows"]] = g
            packed[:, s["offset"] : s["offset"] + s["chunk_rows"] * s["cols"]] = padded.view(self.dp, -1)
        if self.dp == 1:
            return packed[0]
        out = torch.empty(self.shard_numel, dtype=torch.float32, device=self.device)
        reduce_scatter_single(out, packed.view(-1), group=self.dp_group)
        return out

    def _owned(self, flat, s):
        n = (s["row_end"] - s["row_start"]) * s["cols"]
        return flat[s["offset"] : s["offset"] + n].view(self._owned_shape(s))

    @torch.no_grad()
    def step(self, step_index: int) -> dict:
        flat = self._reduce_scatter_grads()
        grads = {s["name"]: self._owned(flat, s) for s in self.shards}
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for s in self.shards:
            if s["tp_dim"] is None and self.tp_rank != 0:
                continue
            sq += grads[s["name"]].square().sum()
        norm = sq.sqrt()
        if self.config.clip_grad > 0:
            flat.mul_(torch.clamp(self.config.clip_grad / (norm + 1e-6), max=1.0))
        lr = self.schedule(step_index)
        for group in self.adam.param_groups:
            group["lr"] = lr
        for s in self.shards:
            self.master[s["name"]].grad = grads[s["name"]]
        self.adam.step()
        for m in self.master.values():
            m.grad = None
        if self.ema is not None:
            d = self.config.ema_decay
            for k, e in self.ema.items():
                e.mul_(d).add_(self.master[k], alpha=1 - d)
        for dtype in {s["param"].dtype for s in self.shards}:
            group = [s for s in self.shards if s["param"].dtype == dtype]
            send = torch.zeros(self.shard_numel, dtype=dtype, device=self.device)
            for s in group:
                n = (s["row_end"] - s["row_start"]) * s["cols"]
                send[s["offset"] : s["offset"] + n] = self.master[s["name"]].reshape(-1).to(dtype)
            recv = send.view(1, -1)
            for s in group:
                rows = recv[:, s["offset"] : s["offset"] + s["chunk_rows"] * s["cols"]].reshape(-1, s["cols"])
                s["param"].copy_(rows[: s["rows"]].view_as(s["param"]))
        return {"grad_norm": float(norm), "lr": lr}


def set_grads(opt, grads: dict[str, torch.Tensor]) -> None:
    """What a backward leaves behind: the fp32 main grads (bf16 params) or ``param.grad`` (fp32)."""
    if isinstance(opt, DistributedOptimizer):
        opt.zero_grad()
        for s in opt.shards:
            opt._accumulate(s, grads[s.name])
        return
    for s in opt.shards:
        if s["name"] in opt.main_grads:
            opt.main_grads[s["name"]].copy_(grads[s["name"]])
        else:
            s["param"].grad = grads[s["name"]].clone()


def time_steps(opt, grads, iters: int, warmup: int, sync: Callable[[], None]) -> list[float]:
    times = []
    for i in range(warmup + iters):
        set_grads(opt, grads)
        sync()
        t0 = time.perf_counter()
        opt.step(i)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    named = make_params(args.params, args.layers, DTYPES[args.dtype], device)
    grads = grads_for(named)
    result = {
        "device": args.device,
        "dtype": args.dtype,
        "params": sum(p.numel() for _, p, _ in named),
        "tensors": len(named),
        "iters": args.iters,
    }
    initial = [p.detach().clone() for _, p, _ in named]
    runs = {"new": lambda: DistributedOptimizer(named, CONFIG, dp_group=None, tp_rank=0)}
    if not args.skip_naive:
        runs["naive"] = lambda: NaiveOptimizer(named, CONFIG, dp_group=None, tp_rank=0)
    finals = {}
    for key, build in runs.items():  # one optimizer alive at a time (memory)
        with torch.no_grad():
            for (_, p, _), w in zip(named, initial):
                p.copy_(w)
        opt = build()
        times = time_steps(opt, grads, args.iters, args.warmup, sync)
        result[f"{key}_median_s"] = statistics.median(times)
        result[f"{key}_min_s"] = min(times)
        finals[key] = [p.detach().float() for _, p, _ in named[:4]]
        if hasattr(opt, "_hooks"):
            for h in opt._hooks:
                h.remove()
        del opt
        gc.collect()
        if device.type == "cuda":
            result[f"{key}_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if "naive" in finals:
        result["ratio"] = result["naive_median_s"] / result["new_median_s"]
        result["max_abs_diff_params"] = max(float((a - b).abs().max()) for a, b in zip(finals["new"], finals["naive"]))
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
