"""Distributed optimizer: ZeRO-1 over the data-parallel group, fp32 master weights, AdamW,
with its reduce-scatter and all-gather overlapped with the backward and the next forward.

Why not FSDP2 (docs/training.md, "The DP engine", has the spike): FSDP2 frees and re-allocates
the unsharded parameters every step and hands the model DTensors, while our per-block CUDA graphs
bake parameter addresses in and our TP layers are megatron-core modules holding plain local
shards. This optimizer keeps the parameters whole and in place on each DP rank and shards only
the optimizer state (the report's *distributed optimizer*), so the same model runs under every
layout, on gloo and NCCL alike (reduce-scatter + all-gather).

Layout of the shards. Every parameter (this rank's TP shard, viewed as ``[rows, cols]`` with
``rows = shape[0]``) is cut into ``dp`` row chunks with ``torch.chunk`` semantics (chunk size
``ceil(rows / dp)``, trailing chunks shorter or empty). DP rank ``r`` owns chunk ``r`` of every
parameter: its fp32 master copy, AdamW moments and (optionally) EMA. In full-tensor coordinates a
chunk is the DTensor placement ``[Shard(tp_dim) | Replicate over tp, Shard(0) over dp]``, which is
what the checkpoint writes, so a checkpoint reshards to any TP/DP layout.

Flat buffers. Each parameter has a padded slot of ``chunk_rows * cols`` elements at ``offset`` in
the per-rank flat shard of length ``S`` (their order: Units, below). The fp32 master weights, ``exp_avg``, ``exp_avg_sq`` and EMA are one flat
``[S]`` tensor each; ``master[name]`` (and the per-name chunks of `state_tensors`) are views of
a parameter's owned rows, so checkpoint loads write straight into the flat state.

Units (buckets). The parameters are grouped into *units* (`consumers.data_parallel.dp_units`:
one per MMDiT block, the embedders, the head), given in forward order. Slots are laid out unit by
unit (forward order), and inside a unit ordered by (param dtype, TP-replicated, no-weight-decay),
so each unit's slots are one contiguous range ``[start, end)`` of the flat shard and each dtype,
the grad-norm part and the two weight-decay groups are a few contiguous ranges per unit.

Gradients live in one buffer of ``dp * S`` elements in the reduction dtype
(`DataParallelConfig.grad_reduce_dtype`, fp32 by default), one rank-major ``[dp, end - start]``
region per unit: row ``r`` holds rank ``r``'s chunk of each of the unit's parameters, which is
the unit's reduce-scatter input as it stands (no packing). With ``dp == 1`` a parameter's slot is
its whole gradient, so ``main_grads[name]`` is a contiguous param-shaped view of the buffer and the
reduce-scatter is a no-op. With ``dp > 1`` a parameter's rows are spread over the ``dp`` rows of
its unit's region, which no single param-shaped strided view can express; the post-accumulate
hooks add each micro-batch's gradient *directly* into the strided ``[q, chunk_rows, cols]`` view
of its slot (q full chunks, plus one add for a partial last chunk): one or two kernels per hook,
and no per-parameter main-grad buffer or packing copy at any ``dp``. At ``dp > 1``
``main_grads[name]`` therefore returns an assembled param-shaped copy (a snapshot). fp32 params
use the same hook (their ``.grad`` is moved into the buffer and cleared); a ``.grad`` set by hand
(no autograd hook) is folded in once at `step`.

Overlap (megatron-core's ``overlap_grad_reduce`` / ``overlap_param_gather``, rebuilt on these
buffers, which are allocated once so CUDA graphs keep their addresses):

* `begin_accumulation(n)` tells the optimizer that the step has ``n`` micro-batches. The hooks count
  each parameter's gradients; when every parameter of a unit has its ``n``-th (the backward of
  the last micro-batch has left the unit), the unit's reduce-scatter is launched asynchronously
  into its range of the ``[S]`` reduced shard. Units finish in reverse forward order, so the
  first reduce-scatter is in flight while the blocks before it still run their backward. Earlier
  micro-batches only accumulate (deferred sync). Units not complete by `step` (no
  `begin_accumulation`, a parameter without a gradient) are reduced there.
* after the update, the units' parameters are all-gathered asynchronously in forward order, at
  most ``param_gather_depth`` at once, through that many rotating send/receive buffers (one unit
  each: no second full copy of the parameters); `wait_before_forward` hooks the units' modules so
  that each unit's gather is waited (and copied into the parameters) right before its forward in
  the next step, which launches the next unit's gather. `finish_param_sync` completes them all
  (before anything reads the parameters outside a forward: checkpoints, CUDA-graph capture).

ZeRO-2 and ZeRO-3 (`DataParallelConfig.sharding`): the gradients live in a few rotating one-unit
slots (`consumers.grad_slots`) instead of the ``[dp, S]`` buffer; under ZeRO-3 the parameters are
also freed between uses and gathered per unit before each forward and backward
(`consumers.param_resharding`), through the same per-unit all-gather plan.

One step (no host sync except ``float(grad_norm)``, read before the update to skip a step
whose grad norm is not finite: see `DistributedOptimizer.step`):
1. every unit's reduce-scatter (launched by the hooks, or now) is waited: the ``[S]`` shard holds
   this DP rank's chunk of the DP-summed gradient (summed: the loss is already normalised by the
   global batch), cast to fp32 when reduced in bf16 (``dp == 1``, fp32: the buffer itself);
2. the global grad norm is one ``vector_norm`` (or one ``_foreach_norm`` over a few ranges) of the
   flat shard, TP-replicated parameters counted on TP rank 0 only, all-reduced over the world;
3. clip (``max_norm / (norm + 1e-6)``, as ``torch.nn.utils.clip_grad_norm_``): AdamW runs as
   torch's fused multi-tensor kernel over the decay / no-decay ranges, which divides each
   gradient by ``grad_scale = max(1, (norm + 1e-6) / max_norm)`` as it reads it (no pass of its
   own over the gradients); where fused is unsupported, the flat grad is scaled once and AdamW
   runs as the foreach implementation; EMA is one ``lerp_`` over the flat tensors;
4. updated chunks are **all-gathered in the parameter dtype** per unit (above): each unit's flat
   master range cast once into a send buffer, all-gathered into a ``[dp, n]`` receive buffer, then
   one strided copy per parameter back into the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.optim.adam import adam as _adam_functional
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from consumers.data_parallel import DataParallelConfig
from consumers.grad_slots import GradientSlots
from consumers.param_resharding import ParameterResharding, owns_whole_storage
from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.model.mappings import all_gather_single, reduce_scatter_single


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
        max_skipped_steps: a step whose loss or global grad norm is not finite (NaN/inf) is
            skipped (no AdamW, EMA or parameter update; grads dropped); training stops with
            `consumers.engine.NonFiniteTrainingError` when more than this many steps in a row
            are skipped (0: at the first one).
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    ema_decay: float = 0.0
    max_skipped_steps: int = 10

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
        if (
            not isinstance(self.max_skipped_steps, int)
            or isinstance(self.max_skipped_steps, bool)
            or self.max_skipped_steps < 0
        ):
            raise ConfigError(f"optimizer.max_skipped_steps={self.max_skipped_steps!r}: expected an integer >= 0")


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
        return {
            "kind": "warmup_cosine",
            **{k: getattr(self.config, k) for k in ("lr", "min_lr", "warmup_steps", "decay_steps")},
        }


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
    tp_dim: int | None
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

    @property
    def full_chunks(self) -> int:
        """DP ranks whose chunk is ``chunk_rows`` rows long (the rest: one partial, then empty)."""
        return self.rows // self.chunk_rows

    @property
    def tail_rows(self) -> int:
        """Rows of the partial chunk after the full ones (0: none)."""
        return self.rows - self.full_chunks * self.chunk_rows


def _row_pieces(s: ParamShard, buf2d: torch.Tensor, col0: int) -> list[tuple[torch.Tensor, int, int]]:
    """Views of parameter `s`'s rows inside a rank-major ``[dp, W]`` buffer whose column `col0` is
    the start of its slot: ``[(view, row_lo, row_hi)]`` with ``view`` shaped like rows
    ``[row_lo, row_hi)`` of the ``[rows, cols]`` parameter regrouped per chunk (``[q, chunk_rows,
    cols]`` for the full chunks, ``[tail, cols]`` for a partial one)."""
    q, tail, cr, c = s.full_chunks, s.tail_rows, s.chunk_rows, s.cols
    pieces = [(buf2d[:q, col0 : col0 + cr * c].view(q, cr, c), 0, q * cr)]
    if tail:
        pieces.append((buf2d[q, col0 : col0 + tail * c].view(tail, c), q * cr, s.rows))
    return pieces


def _ranges(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge adjacent ``[a, b)`` spans (given in increasing order)."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out


_PIECE = 1 << 28  # max elements per tensor handed to the multi-tensor AdamW kernel


class _MainGrads(Mapping):
    """``name -> fp32 gradient`` in the parameter's shape (read-only mapping).

    ``dp == 1``: live views of the flat gradient buffer (what the hooks accumulate into).
    ``dp > 1``: assembled copies (a parameter's rows are strided over the rank-major buffer).
    """

    def __init__(self, opt: DistributedOptimizer):
        self._opt = opt

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._opt.main_grad(name)

    def __iter__(self):
        return iter(self._opt._by_name)

    def __len__(self) -> int:
        return len(self._opt._by_name)


@dataclass
class _Unit:
    """One unit's (bucket's) place in the flat buffers and its communication this step.

    Attributes:
        name: the unit's name (`consumers.data_parallel.DPUnit.name`). shards: its parameters.
        start, end: its range of the per-rank flat shard. grads: its ``[dp, end - start]``
            region of the gradient buffer (reduction dtype). reduced: its range of the reduced
            ``[S]`` shard. groups: ``(dtype, start, end, shards)`` per parameter dtype.
        complete: parameters of the unit whose gradients of every micro-batch have arrived.
        arrivals: per parameter name, gradients arrived this step (counted while overlapping).
        reduce_work: the in-flight reduce-scatter (None: not launched this step).
    """

    name: str
    shards: list[ParamShard]
    start: int
    end: int
    grads: torch.Tensor | None = None
    reduced: torch.Tensor | None = None
    groups: list = field(default_factory=list)
    complete: int = 0
    arrivals: dict = field(default_factory=dict)
    reduce_work: object | None = None


class DistributedOptimizer:
    """ZeRO-1 AdamW over `params` (canonical name -> this rank's TP shard).

    Args:
        named_params: ``(canonical name, parameter, tp partition dim)`` of every trainable
            parameter on this rank (all its pipeline chunks).
        config: `OptimizerConfig`.
        dp_group: data-parallel group (optimizer state is sharded over it; under HSDP the shard
            group); None: no data parallelism (dp = 1), not the whole world.
        tp_rank: this rank's TP rank (TP-replicated params count in the grad norm on rank 0 only).
        norm_group: group over which the grad norm is summed: the whole world (TP x PP x DP).
        fused: run AdamW with torch's fused kernel (None: when the device supports it, else the
            multi-tensor foreach implementation).
        units: ``(unit name, parameter names)`` in forward order, covering every parameter once
            (`consumers.data_parallel.dp_units`); None: one unit of all parameters.
        replica_group: HSDP: the ranks holding the same shard as this one (`dp_group` is then
            the shard group): the reduced shard is summed over it, and the grad norm counts one
            copy. None: no replication.
        data_parallel: `DataParallelConfig` (overlap, reduction dtype, gather depth).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter, int | None]],
        config: OptimizerConfig,
        *,
        dp_group: dist.ProcessGroup | None,
        tp_rank: int,
        norm_group: dist.ProcessGroup | None = None,
        fused: bool | None = None,
        units: Sequence[tuple[str, Sequence[str]]] | None = None,
        data_parallel: DataParallelConfig = DataParallelConfig(),
        replica_group: dist.ProcessGroup | None = None,
    ):
        self.config = config
        self.dp_config = data_parallel
        self.schedule = LRSchedule(config)
        self.dp_group = dp_group
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.tp_rank = tp_rank
        self.norm_group = norm_group
        self.replica_group = replica_group
        self.replicas = dist.get_world_size(replica_group) if replica_group is not None else 1
        self._hooks_paused = False
        self.shards: list[ParamShard] = []
        for name, p, tp_dim in named_params:
            if p.ndim == 0:
                raise ConfigError(f"parameter {name} is a scalar; the distributed optimizer needs >= 1-D params")
            rows = p.shape[0]
            cols = p.numel() // rows
            chunk = -(-rows // self.dp)
            start = min(self.dp_rank * chunk, rows)
            end = min(start + chunk, rows)
            self.shards.append(ParamShard(name, p, tp_dim, rows, cols, chunk, start, end, -1))
        if not self.shards:
            raise ConfigError("DistributedOptimizer: no parameters on this rank")
        self.device = self.shards[0].param.device
        self._by_name = {s.name: s for s in self.shards}
        self.units = self._make_units(units)
        self._unit_of = {s.name: u for u in self.units for s in u.shards}

        # Slots: unit by unit (forward order); inside a unit by (dtype, TP-replicated, no weight decay).
        dtypes = list(dict.fromkeys(s.param.dtype for s in self.shards))
        key = lambda s: (dtypes.index(s.param.dtype), s.tp_dim is None, s.param.ndim < 2)  # noqa: E731
        offset = 0
        for u in self.units:
            u.shards = sorted(u.shards, key=key)
            u.start = offset
            for s in u.shards:
                s.offset = offset
                offset += s.chunk_numel
            u.end = offset
        self.shard_numel = S = offset
        layout = [s for u in self.units for s in u.shards]
        span = lambda s: (s.offset, s.offset + s.chunk_numel)  # noqa: E731
        self._decay_ranges = _ranges([span(s) for s in layout if s.param.ndim >= 2])
        self._no_decay_ranges = _ranges([span(s) for s in layout if s.param.ndim < 2])
        # Slots counted in the grad norm: TP-replicated parameters on TP rank 0 only.
        self._norm_slots = [span(s) for s in layout if s.tp_dim is not None or tp_rank == 0]
        for u in self.units:
            for dt in dtypes:
                group = [s for s in u.shards if s.param.dtype == dt]
                if group:
                    u.groups.append((dt, group[0].offset, group[-1].offset + group[-1].chunk_numel, group))

        f32 = dict(dtype=torch.float32, device=self.device)
        # fp32 master weights and AdamW moments: one flat [S] tensor each, per-name views of owned rows.
        self._master_flat = torch.zeros(S, **f32)
        self._exp_avg_flat = torch.zeros(S, **f32)
        self._exp_avg_sq_flat = torch.zeros(S, **f32)
        self.master: dict[str, torch.Tensor] = {}
        self._exp_avg: dict[str, torch.Tensor] = {}
        self._exp_avg_sq: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for s in self.shards:
                self.master[s.name] = self._owned(self._master_flat, s)
                self._exp_avg[s.name] = self._owned(self._exp_avg_flat, s)
                self._exp_avg_sq[s.name] = self._owned(self._exp_avg_sq_flat, s)
                rows_view = s.param.detach().view(s.rows, s.cols)[s.row_start : s.row_end]
                self.master[s.name].view(-1, s.cols).copy_(rows_view)
        self._ema_flat: torch.Tensor | None = None
        self.ema: dict[str, torch.Tensor] | None = None
        if config.ema_decay > 0:
            self._ema_flat = self._master_flat.clone()
            self.ema = {s.name: self._owned(self._ema_flat, s) for s in self.shards}
        self.num_steps = 0  #: updates applied (AdamW's bias-correction count; skipped steps excluded)
        self.skipped_steps = 0  #: steps skipped for a non-finite loss or grad norm (this process's lifetime)

        # AdamW: fused kernel where available, else foreach; tensors of at most _PIECE elements.
        if fused is None:
            fused = self.device.type in _get_fused_kernels_supported_devices()
        self.fused = bool(fused)
        step_device = self.device if self.fused else torch.device("cpu")  # as torch.optim.AdamW keeps them
        self._adam_groups = []  # (weight_decay, params, exp_avgs, exp_avg_sqs, steps, (start, end) pieces)
        for wd, ranges in ((config.weight_decay, self._decay_ranges), (0.0, self._no_decay_ranges)):
            pieces = [(a, min(a + _PIECE, hi)) for lo, hi in ranges for a in range(lo, hi, _PIECE)]
            if not pieces:
                continue
            self._adam_groups.append(
                (
                    wd,
                    [self._master_flat[a:b] for a, b in pieces],
                    [self._exp_avg_flat[a:b] for a, b in pieces],
                    [self._exp_avg_sq_flat[a:b] for a, b in pieces],
                    [torch.zeros((), dtype=torch.float32, device=step_device) for _ in pieces],
                    pieces,
                )
            )

        # Gradients: [dp, end - start] per unit in the reduction dtype; the hooks add into per-parameter views.
        grad_dtype = data_parallel.grad_dtype
        #: ZeRO-2 and ZeRO-3 (dp > 1): no whole-model gradient buffer; `consumers.grad_slots` rotates one-unit ones.
        self.sharded_grads = data_parallel.sharding in ("zero2", "zero3") and self.dp > 1
        #: ZeRO-3 (dp > 1): ZeRO-2's gradients, and each unit's parameters freed between uses
        #: (`consumers.param_resharding`): the fp32 master shard is the only persistent copy.
        self.zero3 = data_parallel.sharding == "zero3" and self.dp > 1
        self._grad_storage = (
            None if self.sharded_grads else torch.zeros(self.dp * S, dtype=grad_dtype, device=self.device)
        )
        if self.dp == 1:  # the buffer is the reduced shard
            self._reduced = self._grad_storage
        else:  # [S]: what each unit's reduce-scatter writes (ZeRO-2: adds up over micro-batches)
            self._reduced = torch.zeros(S, dtype=grad_dtype, device=self.device)
        self._grad_shard = self._reduced if grad_dtype == torch.float32 else torch.empty(S, **f32)  # [S] fp32
        self._grad_pieces = {}
        for u in self.units:
            u.reduced = self._reduced[u.start : u.end]
            if self._grad_storage is not None:
                u.grads = self._grad_storage[self.dp * u.start : self.dp * u.end].view(self.dp, u.end - u.start)
                for s in u.shards:
                    self._grad_pieces[s.name] = _row_pieces(s, u.grads, s.offset - u.start)
        self._slots: GradientSlots | None = None
        if self.sharded_grads:
            self._slots = GradientSlots(
                self.units,
                dp=self.dp,
                dtype=grad_dtype,
                device=self.device,
                depth=data_parallel.grad_slots,
                group=dp_group,
                reduce_scatter=lambda *a, **k: reduce_scatter_single(*a, **k),  # looked up at call time
                row_pieces=_row_pieces,
            )
        self.main_grads = _MainGrads(self)
        self._microbatches: int | None = None  # set by begin_accumulation: overlap the reduce-scatter
        self._next_reduce = len(self.units) - 1
        self._hooks = []
        for s in self.shards:
            if s.param.requires_grad:
                self._hooks.append(s.param.register_post_accumulate_grad_hook(self._accumulate_hook(s)))

        # All-gather (dp > 1): `param_gather_depth` rotating slots; unit i gathers through slot i % depth.
        self._gather_plan: list[list[tuple]] = []  # per unit: (master range, send or None, recv, copies) per dtype
        self._gather_work: list[list | None] = [None] * len(self.units)
        self._next_to_wait: int | None = None  # first unit whose gather is not yet in its parameters
        self.forward_waits: list[int] = []  # units waited by forward hooks since the last update (tests read it)
        if self.zero3:  # each parameter owns its storage, so a unit can free it (resize to 0) and re-allocate it
            with torch.no_grad():
                for s in self.shards:
                    if not owns_whole_storage(s.param):
                        s.param.data = s.param.detach().clone(memory_format=torch.contiguous_format)
        if self.dp > 1:
            depth = data_parallel.param_gather_depth
            slots = {}  # (slot, dtype) -> (send, recv) flat buffers of the largest unit of that slot
            for i, u in enumerate(self.units):
                for dt, a, b, _ in u.groups:
                    k = (i % depth, dt)
                    slots[k] = max(slots.get(k, 0), b - a)
            buffers = {
                k: (
                    None if k[1] == torch.float32 else torch.empty(n, dtype=k[1], device=self.device),
                    torch.empty(self.dp * n, dtype=k[1], device=self.device),
                )
                for k, n in slots.items()
            }
            for i, u in enumerate(self.units):
                plan = []
                for dt, a, b, group in u.groups:
                    send, recv = buffers[(i % depth, dt)]
                    n = b - a
                    recv2d = recv[: self.dp * n].view(self.dp, n)
                    copies = []
                    for s in group:
                        # ZeRO-3 writes into parameters that autograd saved for the backward: through
                        # `.data`, an alias with its own version counter (FSDP's way), the write is
                        # not an in-place change autograd must refuse.
                        p_rows = (s.param.data if self.zero3 else s.param.detach()).view(s.rows, s.cols)
                        for view, lo, hi in _row_pieces(s, recv2d, s.offset - a):
                            copies.append((p_rows[lo:hi].view(view.shape), view))
                    plan.append((self._master_flat[a:b], None if send is None else send[:n], recv2d, copies))
                self._gather_plan.append(plan)
        #: ZeRO-3: which units' parameters are gathered; None unless `zero3`.
        self.resharding: ParameterResharding | None = None
        if self.zero3:
            self.resharding = ParameterResharding(
                [[s.param for s in u.shards] for u in self.units],
                launch_gather=self._launch_gather,
                land_gather=self._land_gather,
                depth=data_parallel.param_gather_depth,
                prefetch=data_parallel.overlap_param_gather,
                names=[u.name for u in self.units],
            )
            self.resharding.free_all()

    def _make_units(self, units: Sequence[tuple[str, Sequence[str]]] | None) -> list[_Unit]:
        if units is None:
            return [_Unit("all", list(self.shards), 0, 0)]
        out, seen = [], set()
        for name, names in units:
            missing = [n for n in names if n not in self._by_name]
            if missing:
                raise ConfigError(f"DistributedOptimizer: unit {name} names unknown parameters {missing[:3]}")
            dup = [n for n in names if n in seen]
            if dup:
                raise ConfigError(f"DistributedOptimizer: parameters {dup[:3]} are in more than one unit")
            seen.update(names)
            if names:
                out.append(_Unit(name, [self._by_name[n] for n in names], 0, 0))
        left = [s.name for s in self.shards if s.name not in seen]
        if left:
            raise ConfigError(f"DistributedOptimizer: parameters {left[:3]} belong to no unit")
        return out

    # ------------------------------------------------------------------ gradients
    def _accumulate(self, s: ParamShard, grad: torch.Tensor) -> None:
        """Add `grad` (any float dtype, the parameter's shape) into `s`'s slot of the grad buffer
        (ZeRO-2: of its unit's gradient slot)."""
        if self._slots is not None:
            self._slots.add(s, grad)
            return
        if self.dp == 1:
            self._grad_pieces[s.name][0][0].view(s.param.shape).add_(grad)
            return
        g = grad.reshape(s.rows, s.cols)
        for view, lo, hi in self._grad_pieces[s.name]:
            view.add_(g[lo:hi].view(view.shape))

    def _accumulate_hook(self, s: ParamShard):
        def hook(p: torch.Tensor) -> None:
            if self._hooks_paused:
                return
            self._accumulate(s, p.grad)
            p.grad = None
            if self._microbatches is not None and self._slots is None:
                self._count_arrival(s)

        return hook

    def _count_arrival(self, s: ParamShard) -> None:
        """One more gradient of `s` this step; the unit's reduce-scatter starts with its last one."""
        u = self._unit_of[s.name]
        n = u.arrivals.get(s.name, 0) + 1
        if n > self._microbatches:
            raise RuntimeError(
                f"gradient of {s.name} arrived {n} times in a step announced with {self._microbatches} "
                "micro-batches (begin_accumulation)"
            )
        u.arrivals[s.name] = n
        if n == self._microbatches:
            u.complete += 1
            if u.complete == len(u.shards):
                self._launch_ready_reduces()

    def _launch_ready_reduces(self) -> None:
        """Launch the complete units' reduce-scatters strictly in reverse forward order: a unit
        waits for every unit after it, so every DP rank issues the same sequence of collectives
        whatever order its gradients arrive in (a unit with a parameter that got no gradient is
        reduced in `step`, and the units before it with it)."""
        while self._next_reduce >= 0:
            u = self.units[self._next_reduce]
            if u.complete < len(u.shards):
                return
            self._launch_reduce(u)
            self._next_reduce -= 1

    def begin_accumulation(self, microbatches: int) -> None:
        """This step's backward passes will bring `microbatches` gradients of each parameter: each
        unit's reduce-scatter is launched (``overlap_grad_reduce``) once all its parameters have
        their last one. Call after `zero_grad`, before the first backward."""
        if microbatches < 1:
            raise ValueError(f"begin_accumulation: microbatches={microbatches}, expected >= 1")
        self._microbatches = microbatches if self.dp_config.overlap_grad_reduce and self.dp > 1 else None
        self._next_reduce = len(self.units) - 1  # the next unit to reduce (they go in reverse order)

    def _launch_reduce(self, u: _Unit) -> None:
        """Start `u`'s reduce-scatter into its range of the reduced shard (``dp == 1``: nothing to do)."""
        if self.dp == 1 or u.reduce_work is not None or self._slots is not None:
            return
        u.reduce_work = reduce_scatter_single(
            u.reduced, u.grads.view(-1), op=dist.ReduceOp.SUM, group=self.dp_group, async_op=True
        )

    def _wait_reduces(self) -> None:
        for u in self.units:
            if u.reduce_work is not None:
                u.reduce_work.wait()
                u.reduce_work = None

    @contextlib.contextmanager
    def grad_hooks_paused(self):
        """Within: autograd leaves gradients in ``param.grad`` instead of moving them into the
        flat buffer. A CUDA-graph capture needs this: it reads ``param.grad`` after its backward
        to learn what its graphed backward returns, and a hook run during capture would be
        recorded into the graph and add every replayed gradient into the buffer a second time."""
        self._hooks_paused = True
        try:
            yield
        finally:
            self._hooks_paused = False

    def main_grad(self, name: str) -> torch.Tensor:
        """Accumulated gradient of `name` in its shape (reduction dtype): a live view of the flat
        buffer when ``dp == 1``, else an assembled copy (see the module docstring)."""
        s = self._by_name[name]
        if self._grad_storage is None:
            raise RuntimeError(f"main_grad({name}): ZeRO-2 keeps no whole gradient (only the reduced shard)")
        if self.dp == 1:
            return self._grad_pieces[name][0][0].view(s.param.shape)
        out = torch.empty(s.rows, s.cols, dtype=self._grad_storage.dtype, device=self.device)
        for view, lo, hi in self._grad_pieces[name]:
            out[lo:hi].view(view.shape).copy_(view)
        return out.view(s.param.shape)

    def zero_grad(self) -> None:
        """Clear the gradients for a new step (an unfinished step's reduce-scatters are waited first)."""
        self._wait_reduces()
        for s in self.shards:
            s.param.grad = None
        if self._slots is not None:
            self._slots.discard()
            self._reduced.zero_()
        else:
            self._grad_storage.zero_()
        self._microbatches = None
        for u in self.units:
            u.complete = 0
            u.arrivals.clear()

    def _fold_param_grads(self) -> None:
        """Move gradients assigned to ``param.grad`` by hand (autograd's hook moves its own) into the buffer."""
        for s in self.shards:
            g = s.param.grad
            if g is not None:
                if self._unit_of[s.name].reduce_work is not None:
                    raise RuntimeError(f"{s.name}.grad was set after its unit's reduce-scatter started")
                self._accumulate(s, g)
                s.param.grad = None

    def _reduce_scatter_grads(self) -> torch.Tensor:
        """``[S]`` fp32: this DP rank's chunk of the DP-summed gradient of every parameter: the
        units' reduce-scatters launched by the hooks are waited, the others run now.

        ``dp == 1`` and fp32: the gradient buffer itself (no copy).
        """
        self._fold_param_grads()
        if self._slots is not None:
            self._slots.finish()  # the last micro-batch's units, then every slot into the shard
        else:
            for u in reversed(self.units):  # the order the backward completes them
                self._launch_reduce(u)
            self._wait_reduces()
        if self.replicas > 1:  # HSDP: the shards of the other replicas hold other samples' sums
            dist.all_reduce(self._reduced, op=dist.ReduceOp.SUM, group=self.replica_group)
        if self._grad_shard is not self._reduced:
            self._grad_shard.copy_(self._reduced)
        return self._grad_shard

    def _owned(self, flat: torch.Tensor, s: ParamShard) -> torch.Tensor:
        n = (s.row_end - s.row_start) * s.cols
        return flat[s.offset : s.offset + n].view(s.owned_shape)

    def grad_norm(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Global L2 norm of per-name grad chunks; TP-replicated params count once (TP rank 0),
        DP chunks and PP stages sum. (`step` uses the same rule on the flat shard.)"""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for s in self.shards:
            if s.tp_dim is None and self.tp_rank != 0:
                continue
            sq += grads[s.name].float().square().sum()
        return self._finish_norm(sq)

    def _flat_grad_norm(self, flat: torch.Tensor) -> torch.Tensor:
        """Global L2 norm of the reduced ``[S]`` shard: one multi-tensor ``_foreach_norm`` over the
        counted parameters' slots (TP-replicated ones on TP rank 0 only), as
        ``torch.nn.utils.clip_grad_norm_`` and Megatron's ``multi_tensor_l2norm`` take it per
        tensor: a single fp32 reduction over a whole unit loses ~1e-5 on CPU."""
        if not self._norm_slots:
            return self._finish_norm(torch.zeros((), dtype=torch.float32, device=self.device))
        norms = torch._foreach_norm([flat[a:b] for a, b in self._norm_slots])
        return self._finish_norm(torch.stack(norms).square().sum())

    def _finish_norm(self, sq: torch.Tensor) -> torch.Tensor:
        """sqrt of `sq` summed over `norm_group` (the world); under HSDP every shard is held by
        ``replicas`` ranks, so each rank contributes ``sq / replicas``."""
        if self.replicas > 1:
            sq = sq / self.replicas
        if dist.is_initialized():
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.norm_group)
        return sq.sqrt()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, step_index: int, *, skip: bool = False) -> dict:
        """Reduce grads, clip, AdamW at ``lr = schedule(step_index)``, EMA, gather params.

        Returns ``{"grad_norm", "lr", "skipped"}`` (norm before clipping). The grad buffer is
        left for `zero_grad` to clear (clipped in place only on the foreach path). With
        ``overlap_param_gather`` the parameters are gathered unit by unit as the next forward
        reaches them (`wait_before_forward`), or by `finish_param_sync`.

        Non-finite gradients (Megatron's ``found_inf``): when the global grad norm is NaN or inf
        (it is all-reduced over the world, so every rank sees the same value and decides alike),
        or `skip` is set (the caller saw a non-finite loss; it must be set on every rank alike),
        the update is skipped: no AdamW (moments and the step counter stay), no EMA, no
        parameter gather (parameters and fp32 masters stay), and the accumulated gradients are
        dropped. The reduce-scatters and norm all-reduce still run, so every rank issues the same
        collectives. The one host sync is ``float(norm)``, now before the update.
        """
        self.finish_param_sync()  # the previous update's gathers read the master this update writes
        flat = self._reduce_scatter_grads()
        norm = self._flat_grad_norm(flat)
        norm_value = float(norm)
        lr = self.schedule(step_index)
        if skip or not math.isfinite(norm_value):
            self.zero_grad()
            self.skipped_steps += 1
            return {"grad_norm": norm_value, "lr": lr, "skipped": True}
        grad_scale = None
        if self.config.clip_grad > 0:
            if self.fused:  # the fused kernel divides each gradient as it reads it: no extra pass
                grad_scale = torch.clamp((norm + 1e-6) / self.config.clip_grad, min=1.0).to(torch.float32)
            else:
                flat.mul_(torch.clamp(self.config.clip_grad / (norm + 1e-6), max=1.0))
        self._adamw(flat, lr, grad_scale)
        if self._ema_flat is not None:
            self._ema_flat.lerp_(self._master_flat, 1.0 - self.config.ema_decay)
        self._start_param_sync()
        if not self.dp_config.overlap_param_gather:
            self.finish_param_sync()
        self.num_steps += 1
        return {"grad_norm": norm_value, "lr": lr, "skipped": False}

    def _adamw(self, flat_grad: torch.Tensor, lr: float, grad_scale: torch.Tensor | None = None) -> None:
        """AdamW over the flat master ranges; `grad_scale` (fused only, a 0-d fp32 tensor):
        each gradient is divided by it inside the kernel (the clipping, `step`)."""
        c = self.config
        for wd, params, exp_avgs, exp_avg_sqs, steps, pieces in self._adam_groups:
            _adam_functional(
                params,
                [flat_grad[a:b] for a, b in pieces],
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                foreach=not self.fused,
                fused=self.fused,
                capturable=False,
                differentiable=False,
                grad_scale=grad_scale,
                found_inf=None,
                has_complex=False,
                decoupled_weight_decay=True,
                amsgrad=False,
                beta1=c.betas[0],
                beta2=c.betas[1],
                lr=lr,
                weight_decay=wd,
                eps=c.eps,
                maximize=False,
            )

    # ------------------------------------------------------------------ parameter gather
    @torch.no_grad()
    def _start_param_sync(self) -> None:
        """Put the updated master weights on their way into the model parameters: ``dp == 1``
        copies them (casting) at once; ``dp > 1`` launches the first `param_gather_depth` units'
        all-gathers (the rest follow as earlier ones are waited)."""
        if self.dp == 1:  # the chunk is the whole parameter: one casting copy each
            for s in self.shards:
                s.param.detach().copy_(self.master[s.name])
            return
        if self.resharding is not None:  # ZeRO-3: stale gathered units are freed; forwards gather them
            self.resharding.free_all()
            return
        self.finish_param_sync()
        self.forward_waits = []
        self._next_to_wait = 0
        for i in range(min(self.dp_config.param_gather_depth, len(self.units))):
            self._launch_gather(i)

    def _launch_gather(self, i: int) -> None:
        works = []
        for master, send, recv2d, _ in self._gather_plan[i]:
            if send is None:  # fp32 params: the master range is the send buffer
                send = master
            else:
                send.copy_(master)  # one cast of the unit's range
            works.append(all_gather_single(recv2d.view(-1), send, group=self.dp_group, async_op=True))
        self._gather_work[i] = works

    @torch.no_grad()
    def _land_gather(self, i: int) -> None:
        """Wait for unit `i`'s all-gather and copy its receive buffer into the parameters."""
        for work in self._gather_work[i]:
            work.wait()
        self._gather_work[i] = None
        for _, _, _, copies in self._gather_plan[i]:
            for dst, src in copies:
                dst.copy_(src)

    @torch.no_grad()
    def _sync_params_through(self, unit_index: int) -> None:
        """Wait for the all-gathers of units ``<= unit_index`` (forward order), copy them into the
        parameters, and launch the gathers that free their slots allow."""
        depth = self.dp_config.param_gather_depth
        while self._next_to_wait is not None and self._next_to_wait <= unit_index:
            i = self._next_to_wait
            if self._gather_work[i] is None:
                self._launch_gather(i)
            self._land_gather(i)
            if i + depth < len(self.units):
                self._launch_gather(i + depth)
            self._next_to_wait = i + 1 if i + 1 < len(self.units) else None

    def finish_param_sync(self) -> None:
        """Complete every pending parameter all-gather: the model parameters equal the master
        weights on return. Call before reading the parameters outside a forward."""
        if self._next_to_wait is not None:
            self._sync_params_through(len(self.units) - 1)

    def reshard_hooks(self, unit_name: str, modules: Sequence[torch.nn.Module], *, reshard: bool) -> list:
        """ZeRO-3: hooks on `modules` that gather unit `unit_name` before their forward and
        backward and (`reshard`: a block) free it after each (`ParameterResharding.register`).
        Returns the hook handles."""
        if self.resharding is None:
            raise RuntimeError("reshard_hooks: data_parallel.sharding is not zero3 (or dp == 1)")
        index = next((i for i, u in enumerate(self.units) if u.name == unit_name), None)
        if index is None:
            raise KeyError(f"no unit named {unit_name!r}")
        return self.resharding.register(index, modules, reshard=reshard)

    def release_params(self) -> None:
        """ZeRO-3: free every gathered unit (after a forward without backward: validation). No-op otherwise."""
        if self.resharding is not None:
            self.resharding.free_all()

    @contextlib.contextmanager
    def gathered_params(self):
        """Within: every model parameter equals its master weights (ZeRO-3: every unit gathered,
        and freed again on exit; otherwise the pending all-gathers are completed)."""
        if self.resharding is None:
            self.finish_param_sync()
            yield
            return
        self.resharding.gather_all()
        try:
            yield
        finally:
            self.resharding.free_all()

    def wait_before_forward(self, unit_name: str, modules: Iterable[torch.nn.Module]) -> list:
        """Forward pre-hooks on `modules`: before each runs, the all-gathers of unit `unit_name`
        and of every unit before it are complete. Returns the hook handles."""
        index = next((i for i, u in enumerate(self.units) if u.name == unit_name), None)
        if index is None:
            raise KeyError(f"no unit named {unit_name!r}")

        def hook(module, args):
            if self._next_to_wait is not None and self._next_to_wait <= index:
                self.forward_waits.append(index)
                self._sync_params_through(index)

        return [m.register_forward_pre_hook(hook) for m in modules]

    @torch.no_grad()
    def load_master_into_params(self) -> None:
        """After loading optimizer state: make the model parameters equal the master weights."""
        self._start_param_sync()
        self.finish_param_sync()

    def start_ema_from_master(self) -> None:
        """Set the EMA weights to the current fp32 master weights (EMA switched on at a resume from
        a checkpoint saved without it). No-op when EMA is off."""
        if self._ema_flat is not None:
            self._ema_flat.copy_(self._master_flat)

    # ------------------------------------------------------------------ state for checkpoints
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per canonical name, this rank's chunks: ``master``, ``exp_avg``, ``exp_avg_sq`` (+ ``ema``).

        Chunk tensors are the live state (views of the flat state: loading into them restores
        the optimizer in place).
        """
        out: dict[str, dict[str, torch.Tensor]] = {}
        for s in self.shards:
            entry = {
                "master": self.master[s.name],
                "exp_avg": self._exp_avg[s.name],
                "exp_avg_sq": self._exp_avg_sq[s.name],
            }
            if self.ema is not None:
                entry["ema"] = self.ema[s.name]
            out[s.name] = entry
        return out

    def set_num_steps(self, n: int) -> None:
        """Restore the AdamW step counter (bias correction) after a load."""
        self.num_steps = n
        for group in self._adam_groups:
            for t in group[4]:
                t.fill_(float(n))

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
                all_gather_single(recv, send, group=self.dp_group)
            out[s.name] = recv[: s.rows].view(s.param.shape)
        return out
