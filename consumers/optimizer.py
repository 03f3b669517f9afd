"""Distributed optimizer: ZeRO-1 over the data-parallel group, fp32 master weights, AdamW.

Why not FSDP2: our TP layers are megatron-core modules whose parameters are plain local shards
(not DTensors), and the report's recipe is a *distributed optimizer* (params whole on each DP
rank, optimizer state sharded). ZeRO-1 keeps the forward/backward untouched, so the exact same
model runs under every layout, and it runs on gloo and NCCL alike (reduce-scatter + all-gather).

Layout of the shards. Every parameter (this rank's TP shard, viewed as ``[rows, cols]`` with
``rows = shape[0]``) is cut into ``dp`` row chunks with ``torch.chunk`` semantics (chunk size
``ceil(rows / dp)``, trailing chunks shorter or empty). DP rank ``r`` owns chunk ``r`` of every
parameter: its fp32 master copy, AdamW moments and (optionally) EMA. In full-tensor coordinates a
chunk is the DTensor placement ``[Shard(tp_dim) | Replicate over tp, Shard(0) over dp]``, which is
what the checkpoint writes, so a checkpoint reshards to any TP/DP layout.

One step:
1. grads (fp32: bf16 params accumulate into fp32 ``main_grad`` buffers via post-accumulate hooks)
   are packed rank-major into ``[dp, S]`` and **reduce-scattered in fp32** (summed: the loss is
   already normalised by the global batch);
2. the global grad norm is the sum of squares over the DP chunks, TP shards and PP stages with
   TP-replicated parameters counted on TP rank 0 only, all-reduced over the world;
3. clip (``max_norm / (norm + 1e-6)``, as ``torch.nn.utils.clip_grad_norm_``), AdamW on the fp32
   chunk, EMA update;
4. updated chunks are **all-gathered in the parameter dtype** (bf16 when params are bf16) back
   into the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_qwenimage.config import ConfigError


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + schedule + clipping + EMA.

    Attributes:
        lr: peak learning rate. min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warmup from lr/warmup_steps to lr over this many steps.
        decay_steps: steps of the cosine decay after warmup (None: constant after warmup).
        weight_decay: AdamW decoupled weight decay on >= 2-D params (biases and norms get none).
        betas, eps: AdamW moments.
        clip_grad: global L2 norm clip (0 disables).
        ema_decay: EMA of the fp32 master weights (0 disables), updated after each step.
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: Optional[int] = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr={self.lr!r}: expected > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr!r}: expected 0 <= min_lr <= lr={self.lr}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps!r}: expected an integer >= 0")
        if self.decay_steps is not None and (not isinstance(self.decay_steps, int) or self.decay_steps < 1):
            raise ConfigError(f"optimizer.decay_steps={self.decay_steps!r}: expected a positive integer or null")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay!r}: expected >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas={self.betas!r}: expected two values in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"optimizer.eps={self.eps!r}: expected > 0")
        if self.clip_grad < 0:
            raise ConfigError(f"optimizer.clip_grad={self.clip_grad!r}: expected >= 0 (0 disables)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optimizer.ema_decay={self.ema_decay!r}: expected 0 (off) or in (0, 1)")


class LRSchedule:
    """Linear warmup then cosine decay to ``min_lr``; a pure function of the step index.

    ``lr(step)`` is the rate of the update made *at* 0-based step `step`:
    ``lr * (step + 1) / warmup`` during warmup, then ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``
    with ``p = (step - warmup) / decay_steps`` clamped to 1.
    """

    def __init__(self, config: OptimizerConfig):
        self.config = config

    def __call__(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.decay_steps is None:
            return c.lr
        progress = min(1.0, (step - c.warmup_steps) / c.decay_steps)
        return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return {"kind": "warmup_cosine", **{k: getattr(self.config, k) for k in ("lr", "min_lr", "warmup_steps", "decay_steps")}}


@dataclass
class ParamShard:
    """One parameter's place in the ZeRO-1 layout.

    Attributes:
        name: canonical name (``blocks.3.img_qkv.weight``). param: the model parameter (TP shard).
        tp_dim: TP split dim of the parameter (None: replicated over TP).
        rows, cols: the parameter viewed as ``[rows, cols]``. chunk_rows: ``ceil(rows / dp)``.
        row_start, row_end: rows owned by this DP rank. offset: start in the per-rank flat shard.
    """

    name: str
    param: torch.nn.Parameter
    tp_dim: Optional[int]
    rows: int
    cols: int
    chunk_rows: int
    row_start: int
    row_end: int
    offset: int

    @property
    def chunk_numel(self) -> int:
        """Padded elements per DP rank in the flat shard."""
        return self.chunk_rows * self.cols

    @property
    def owned_shape(self) -> tuple[int, ...]:
        """Shape of this rank's chunk in the parameter's own shape (``[row_end-row_start, ...]``)."""
        return (self.row_end - self.row_start, *self.param.shape[1:])


class DistributedOptimizer:
    """ZeRO-1 AdamW over `params` (canonical name -> this rank's TP shard).

    Args:
        named_params: ``(canonical name, parameter, tp partition dim)`` of every trainable
            parameter on this rank (all its pipeline chunks).
        config: `OptimizerConfig`.
        dp_group: data-parallel group (optimizer state is sharded over it).
        tp_rank: this rank's TP rank (TP-replicated params count in the grad norm on rank 0 only).
        norm_group: group over which the grad norm is summed: the whole world (TP x PP x DP).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter, Optional[int]]],
        config: OptimizerConfig,
        *,
        dp_group: Optional[dist.ProcessGroup],
        tp_rank: int,
        norm_group: Optional[dist.ProcessGroup] = None,
    ):
        self.config = config
        self.schedule = LRSchedule(config)
        self.dp_group = dp_group
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.tp_rank = tp_rank
        self.norm_group = norm_group
        self.shards: list[ParamShard] = []
        offset = 0
        for name, p, tp_dim in named_params:
            if p.ndim == 0:
                raise ConfigError(f"parameter {name} is a scalar; the distributed optimizer needs >= 1-D params")
            rows = p.shape[0]
            cols = p.numel() // rows
            chunk = -(-rows // self.dp)
            start = min(self.dp_rank * chunk, rows)
            end = min(start + chunk, rows)
            self.shards.append(ParamShard(name, p, tp_dim, rows, cols, chunk, start, end, offset))
            offset += chunk * cols
        self.shard_numel = offset
        if not self.shards:
            raise ConfigError("DistributedOptimizer: no parameters on this rank")
        self.device = self.shards[0].param.device

        # fp32 master chunks (leaf tensors updated by torch's AdamW).
        self.master: dict[str, torch.Tensor] = {}
        for s in self.shards:
            rows_view = s.param.detach().view(s.rows, s.cols)[s.row_start : s.row_end]
            self.master[s.name] = rows_view.to(torch.float32).clone().view(s.owned_shape)
        decay = [self.master[s.name] for s in self.shards if s.param.ndim >= 2]
        no_decay = [self.master[s.name] for s in self.shards if s.param.ndim < 2]
        self.adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            foreach=False,
        )
        self.ema: Optional[dict[str, torch.Tensor]] = None
        if config.ema_decay > 0:
            self.ema = {k: v.clone() for k, v in self.master.items()}
        self.num_steps = 0

        # bf16/fp16 params accumulate their gradients in fp32 (Megatron's main_grad).
        self.main_grads: dict[str, torch.Tensor] = {}
        self._hooks = []
        for s in self.shards:
            if s.param.dtype != torch.float32:
                self.main_grads[s.name] = torch.zeros(s.param.shape, dtype=torch.float32, device=self.device)
                self._hooks.append(s.param.register_post_accumulate_grad_hook(self._accumulate_hook(s.name)))

    def _accumulate_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self.main_grads[name].add_(p.grad.float())
            p.grad = None

        return hook

    # ------------------------------------------------------------------ step
    def zero_grad(self) -> None:
        for s in self.shards:
            s.param.grad = None
        for g in self.main_grads.values():
            g.zero_()

    def _grad_fp32(self, s: ParamShard) -> torch.Tensor:
        if s.name in self.main_grads:
            return self.main_grads[s.name]
        g = s.param.grad
        return torch.zeros_like(s.param, dtype=torch.float32) if g is None else g.float()

    def _reduce_scatter_grads(self) -> torch.Tensor:
        """``[S]`` fp32: this DP rank's chunk of the DP-summed gradient of every parameter."""
        packed = torch.zeros(self.dp, self.shard_numel, dtype=torch.float32, device=self.device)
        for s in self.shards:
            g = self._grad_fp32(s).reshape(s.rows, s.cols)
            padded = torch.zeros(self.dp * s.chunk_rows, s.cols, dtype=torch.float32, device=self.device)
            padded[: s.rows] = g
            packed[:, s.offset : s.offset + s.chunk_numel] = padded.view(self.dp, s.chunk_numel)
        if self.dp == 1:
            return packed[0]
        out = torch.empty(self.shard_numel, dtype=torch.float32, device=self.device)
        dist.reduce_scatter_tensor(out, packed.view(-1), op=dist.ReduceOp.SUM, group=self.dp_group)
        return out

    def _owned(self, flat: torch.Tensor, s: ParamShard) -> torch.Tensor:
        n = (s.row_end - s.row_start) * s.cols
        return flat[s.offset : s.offset + n].view(s.owned_shape)

    def grad_norm(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Global L2 norm; TP-replicated params count once (TP rank 0), DP chunks and PP stages sum."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for s in self.shards:
            if s.tp_dim is None and self.tp_rank != 0:
                continue
            sq += grads[s.name].square().sum()
        if dist.is_initialized():
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.norm_group)
        return sq.sqrt()

    @torch.no_grad()
    def step(self, step_index: int) -> dict[str, float]:
        """Reduce grads, clip, AdamW at ``lr = schedule(step_index)``, EMA, gather params.

        Returns ``{"grad_norm", "lr"}`` (norm before clipping).
        """
        flat = self._reduce_scatter_grads()
        grads = {s.name: self._owned(flat, s) for s in self.shards}
        norm = self.grad_norm(grads)
        if self.config.clip_grad > 0:
            coef = torch.clamp(self.config.clip_grad / (norm + 1e-6), max=1.0)
            flat.mul_(coef)
        lr = self.schedule(step_index)
        for group in self.adam.param_groups:
            group["lr"] = lr
        for s in self.shards:
            self.master[s.name].grad = grads[s.name]
        self.adam.step()
        for m in self.master.values():
            m.grad = None
        if self.ema is not None:
            d = self.config.ema_decay
            for k, e in self.ema.items():
                e.mul_(d).add_(self.master[k], alpha=1 - d)
        self._gather_params()
        self.num_steps += 1
        return {"grad_norm": float(norm), "lr": lr}

    @torch.no_grad()
    def _gather_params(self) -> None:
        """All-gather the updated chunks, in the parameter dtype, into the model parameters."""
        dtypes = {s.param.dtype for s in self.shards}
        for dtype in dtypes:
            group = [s for s in self.shards if s.param.dtype == dtype]
            send = torch.zeros(self.shard_numel, dtype=dtype, device=self.device)
            for s in group:
                n = (s.row_end - s.row_start) * s.cols
                send[s.offset : s.offset + n] = self.master[s.name].reshape(-1).to(dtype)
            if self.dp == 1:
                recv = send.view(1, -1)
            else:
                recv = torch.empty(self.dp, self.shard_numel, dtype=dtype, device=self.device)
                dist.all_gather_into_tensor(recv.view(-1), send, group=self.dp_group)
            for s in group:
                rows = recv[:, s.offset : s.offset + s.chunk_numel].reshape(self.dp * s.chunk_rows, s.cols)
                s.param.copy_(rows[: s.rows].view_as(s.param))

    @torch.no_grad()
    def load_master_into_params(self) -> None:
        """After loading optimizer state: make the model parameters equal the master weights."""
        self._gather_params()

    # ------------------------------------------------------------------ state for checkpoints
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per canonical name, this rank's chunks: ``master``, ``exp_avg``, ``exp_avg_sq`` (+ ``ema``).

        Chunk tensors are the live state (loading into them restores the optimizer in place).
        """
        out: dict[str, dict[str, torch.Tensor]] = {}
        for s in self.shards:
            m = self.master[s.name]
            st = self.adam.state[m]
            if not st:  # before the first step: materialise zero moments so they can be loaded into
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(m)
                st["exp_avg_sq"] = torch.zeros_like(m)
            entry = {"master": m, "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
            if self.ema is not None:
                entry["ema"] = self.ema[s.name]
            out[s.name] = entry
        return out

    def set_num_steps(self, n: int) -> None:
        """Restore the AdamW step counter (bias correction) after a load."""
        self.num_steps = n
        for m in self.master.values():
            st = self.adam.state[m]
            if st:
                st["step"] = torch.tensor(float(n))

    def ema_full_params(self) -> dict[str, torch.Tensor]:
        """EMA weights of this rank's TP shards, all-gathered over DP (for export); needs EMA on."""
        if self.ema is None:
            raise RuntimeError("EMA is off (optimizer.ema_decay = 0)")
        out = {}
        for s in self.shards:
            send = torch.zeros(s.chunk_rows, s.cols, dtype=torch.float32, device=self.device)
            send[: s.row_end - s.row_start] = self.ema[s.name].reshape(-1, s.cols)
            if self.dp == 1:
                recv = send
            else:
                recv = torch.empty(self.dp * s.chunk_rows, s.cols, dtype=torch.float32, device=self.device)
                dist.all_gather_into_tensor(recv, send, group=self.dp_group)
            out[s.name] = recv[: s.rows].view(s.param.shape)
        return out
