"""How the data-parallel communication of a step is issued: config and the per-unit buckets.

The distributed optimizer (`consumers.optimizer.DistributedOptimizer`) reduce-scatters gradients
and all-gathers parameters over the DP group. It does so per *unit* (megatron-core's bucket,
FSDP2's ``fully_shard`` unit): one per MMDiT block, one for the embedders of the first pipeline
stage and one for the head of the last. `dp_units` lists this rank's units in forward order, with
the modules whose forward needs the unit's parameters (so the optimizer can wait for that unit's
all-gather right before it) and the canonical names of its parameters (so the optimizer can
lay out its gradient buffer one contiguous ``[dp, n]`` region per unit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_qwenimage.config import ConfigError

GRAD_REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHARDINGS = ("zero1", "zero2", "zero3")


@dataclass(frozen=True)
class DataParallelConfig:
    """The DP engine's communication (megatron-core's ``DistributedDataParallelConfig``).

    Attributes:
        overlap_grad_reduce: launch each unit's gradient reduce-scatter asynchronously during the
            backward of a step's last micro-batch, as soon as that unit's gradients are
            accumulated (reverse block order). False: every unit is reduced after the backward.
        overlap_param_gather: after the update, all-gather the units' parameters asynchronously in
            forward order, each waited right before its unit's forward in the next step (at most
            `param_gather_depth` in flight). False: every unit is gathered right after the update.
            Under ``zero3`` (gathers before every forward and backward): prefetch the next
            ``param_gather_depth - 1`` units' gathers in the direction of the pass; False: each
            unit is gathered when it is reached.
        grad_reduce_dtype: dtype of the gradient buffer and of its reduce-scatter: ``float32``
            (the default; accumulation and reduction in fp32) or ``bfloat16`` (half the buffer
            and the bytes on the wire; the reduced shard is cast to fp32 for AdamW).
        param_gather_depth: units whose all-gather may be in flight at once (>= 1); each holds a
            send buffer of one unit's DP shard and a receive buffer of one whole unit.
        sharding: ``zero1`` (default): a whole-model gradient buffer, reduced once per step
            after the last micro-batch; ``zero2``: gradients live in ``grad_slots`` rotating
            one-unit buffers, reduce-scattered per unit and micro-batch into the sharded reduced
            gradient (`consumers.grad_slots`): the gradient memory of a few units instead of the
            model's, at one reduce-scatter per micro-batch instead of per step; ``zero3``: zero2's
            gradients, and each unit's parameters are freed after its forward and after its
            backward and all-gathered again before each (`consumers.param_resharding`): the
            parameter memory of a few units instead of the model's, at two all-gathers per unit
            and micro-batch instead of one per step. Not with per-block CUDA graphs.
        grad_slots: ZeRO-2's rotating gradient buffers (>= 2).
    """

    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    grad_reduce_dtype: str = "float32"
    param_gather_depth: int = 2
    sharding: str = "zero1"
    grad_slots: int = 2

    def __post_init__(self) -> None:
        for name in ("overlap_grad_reduce", "overlap_param_gather"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"data_parallel.{name}={getattr(self, name)!r}: expected true or false")
        if self.grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise ConfigError(
                f"data_parallel.grad_reduce_dtype={self.grad_reduce_dtype!r}: expected one of {sorted(GRAD_REDUCE_DTYPES)}"
            )
        depth = self.param_gather_depth
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ConfigError(f"data_parallel.param_gather_depth={depth!r}: expected an integer >= 1")
        if self.sharding not in SHARDINGS:
            raise ConfigError(f"data_parallel.sharding={self.sharding!r}: expected one of {list(SHARDINGS)}")
        slots = self.grad_slots
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 2:
            raise ConfigError(f"data_parallel.grad_slots={slots!r}: expected an integer >= 2")
        if self.sharding in ("zero2", "zero3") and not self.overlap_grad_reduce:
            raise ConfigError(
                f"data_parallel.sharding={self.sharding} needs overlap_grad_reduce: true (its gradients live in "
                "one-unit slots that are reduce-scattered during the backward, so they cannot wait for its end)"
            )

    def check_layout(self, *, vpp: int, cuda_graphs: bool = False) -> None:
        """`ConfigError` for a layout this config cannot train: ZeRO-2/3 under the interleaved
        schedule (its micro-batches' backward passes interleave across model chunks, and a unit's
        gradient slot must be reduced before the next micro-batch's gradients of that unit); ZeRO-3
        with per-block CUDA graphs (`cuda_graphs`: a graph replays fixed parameter addresses, and
        ZeRO-3 re-allocates the parameters at every gather)."""
        if self.sharding in ("zero2", "zero3") and vpp > 1:
            raise ConfigError(
                f"data_parallel.sharding={self.sharding} with parallel.vpp={vpp}: the interleaved schedule runs "
                "micro-batches' backward passes across model chunks out of order; use sharding: zero1 or vpp: 1"
            )
        if self.sharding == "zero3" and cuda_graphs:
            raise ConfigError(
                "data_parallel.sharding=zero3 with cuda_graphs.scope=blocks: graphed blocks replay fixed parameter "
                "addresses, and zero3 re-allocates each unit's parameters at every gather; use sharding: zero2 "
                "or cuda_graphs.scope: none"
            )

    @property
    def grad_dtype(self) -> torch.dtype:
        return GRAD_REDUCE_DTYPES[self.grad_reduce_dtype]


@dataclass(frozen=True)
class DPUnit:
    """One bucket of DP communication.

    Attributes:
        name: ``embed``, ``blocks.<i>`` (global block index) or ``head``.
        modules: the modules whose forward reads the unit's parameters (a forward pre-hook on
            each waits for the unit's all-gather).
        param_names: canonical names of the unit's parameters.
    """

    name: str
    modules: tuple[torch.nn.Module, ...]
    param_names: tuple[str, ...]


def dp_units(chunks: Sequence[torch.nn.Module]) -> list[DPUnit]:
    """This rank's units over its model chunks (`consumers.pipeline.build_model_chunks`), in the
    order a micro-batch's forward runs them: per chunk the embedders (first stage), its blocks in
    order, the head (last stage). Every parameter belongs to exactly one unit: parameters outside
    the blocks and the head (the embedders, and any other) form the chunk's ``embed`` unit, whose
    wait hooks sit on their modules."""
    units: list[DPUnit] = []
    for chunk in chunks:
        block_keys = list(chunk.blocks.keys())
        head_modules = [
            m for m in (getattr(chunk, "norm_out", None), getattr(chunk, "proj_out", None)) if m is not None
        ]
        head_ids = {id(p) for m in head_modules for p in m.parameters()}
        block_ids = {id(p) for b in chunk.blocks.values() for p in b.parameters()}
        embed_names, embed_modules = [], []
        for mod_name, module in chunk.named_children():
            if mod_name == "blocks" or module in head_modules:
                continue
            if any(True for _ in module.parameters()):
                embed_modules.append(module)
        head_names = []
        for name, p in chunk.named_parameters():
            if id(p) in head_ids:
                head_names.append(name)
            elif id(p) not in block_ids:
                embed_names.append(name)
        if embed_names:
            units.append(DPUnit("embed", tuple(embed_modules), tuple(embed_names)))
        for key in block_keys:
            block = chunk.blocks[key]
            names = tuple(f"blocks.{key}.{n}" for n, _ in block.named_parameters())
            units.append(DPUnit(f"blocks.{key}", (block,), names))
        if head_names:
            units.append(DPUnit("head", tuple(head_modules), tuple(head_names)))
    return units
