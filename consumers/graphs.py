"""CUDA graphs in the training loop: the ``cuda_graphs`` section of the run config.

`CudaGraphConfig` says whether each block's forward and backward are replayed as CUDA graphs
(`megatron_qwenimage.model.graph_cache.BlockGraphCache`: one set of graphs per input layout,
captured after a few eager passes of it); `build_block_graphs` checks that the run can use them
and builds the cache for the engine. At small micro-batches a step is bound by the host
launching short kernels one by one; a graph replays a block's kernels with one launch
(docs/benchmarks.md: the FP8 step of the 4-block slice at 1024², batch 2, went from 77.1 to
67.1 ms on an H200).

Limits, each refused at start-up with the config key to change: one tensor-parallel rank and one
pipeline stage (``parallel.tp: 1``, ``parallel.pp: 1``), no activation recompute
(``recompute.mode: none``), a CUDA device and Transformer Engine (whose ``make_graphed_callables``
captures FP8 modules correctly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.model.cuda_graphs import te_graph_kwargs
from megatron_qwenimage.model.graph_cache import BlockGraphCache

CUDA_GRAPH_SCOPES = ("none", "blocks")


@dataclass(frozen=True)
class CudaGraphConfig:
    """The ``cuda_graphs`` section.

    Attributes:
        scope: "none" (eager) or "blocks": every double-stream block's forward and backward
            replayed as a CUDA graph (the embedders, head, loss and optimizer stay eager).
        warmup_passes: eager training passes of an input layout before its graphs are captured
            (Megatron's ``cuda_graph_warmup_steps``; the last one is the capture's sample input).
        max_layouts: input layouts captured at most. A layout is a bucket, micro-batch size and
            text length, with or without padded text; each holds its graphs' static input
            buffers and memory pool. Passes of other layouts run eagerly (one warning each):
            set ``schedule.text_pad_multiple`` to ``data.text_length`` for one text length.
    """

    scope: str = "none"
    warmup_passes: int = 2
    max_layouts: int = 8

    def __post_init__(self) -> None:
        if self.scope not in CUDA_GRAPH_SCOPES:
            raise ConfigError(f"cuda_graphs.scope={self.scope!r}: expected one of {CUDA_GRAPH_SCOPES}")
        for name in ("warmup_passes", "max_layouts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"cuda_graphs.{name}={v!r}: expected a positive integer")

    @property
    def enabled(self) -> bool:
        return self.scope != "none"


class CudaGraphsUnavailable(UserError, RuntimeError):
    """CUDA graphs were requested where they cannot run; the message names what is missing."""


def check_cuda_graph_layout(config: CudaGraphConfig, *, tp: int, pp: int, recompute_mode: str) -> None:
    """`ConfigError` naming the config keys that rule out ``cuda_graphs.scope: blocks``."""
    if not config.enabled:
        return
    problems = []
    if tp != 1:
        problems.append(f"parallel.tp={tp} (graphs capture one tensor-parallel rank: set parallel.tp: 1)")
    if pp != 1:
        problems.append(f"parallel.pp={pp} (graphs capture the whole model: set parallel.pp: 1)")
    if recompute_mode != "none":
        problems.append(f"recompute.mode={recompute_mode!r} (graphs hold every activation: set recompute.mode: none)")
    if problems:
        raise ConfigError(f"cuda_graphs.scope={config.scope!r} refused: " + "; ".join(problems))


def te_make_graphed_callables() -> Callable:
    """Transformer Engine's ``make_graphed_callables``, or `CudaGraphsUnavailable` naming what is
    missing (CUDA, Transformer Engine)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA device (torch.cuda.is_available() is False)")
    try:
        import transformer_engine.pytorch as te
    except Exception as exc:  # ImportError, or TE failing to load its CUDA libraries
        missing.append(f"transformer_engine cannot be imported ({type(exc).__name__}: {exc})")
    if missing:
        raise CudaGraphsUnavailable("cuda_graphs.scope='blocks' refused: " + "; ".join(missing))
    return te.make_graphed_callables


def build_block_graphs(
    config: CudaGraphConfig,
    model: torch.nn.Module,
    *,
    fp8_recipe=None,
    amax_group: dist.ProcessGroup | None = None,
    make_graphed_callables: Callable | None = None,
) -> BlockGraphCache | None:
    """The engine's `BlockGraphCache` for `model` (None when graphs are off).

    `fp8_recipe`: the recipe of the step's ``fp8_autocast`` (None: bf16); the capture runs under
    the same recipe and reduces amax statistics over `amax_group`, as the eager step does.
    `make_graphed_callables`: None for Transformer Engine's (`te_make_graphed_callables`).
    """
    if not config.enabled:
        return None
    grapher = make_graphed_callables or te_make_graphed_callables()
    kwargs = te_graph_kwargs(grapher, fp8=fp8_recipe is not None, recipe=fp8_recipe, amax_group=amax_group)
    return BlockGraphCache(
        model, grapher, warmup_passes=config.warmup_passes, max_layouts=config.max_layouts, graph_kwargs=kwargs
    )


def all_ranks_agree(group: dist.ProcessGroup | None) -> Callable[[bool], bool] | None:
    """``agree(ready) -> bool``: True when every rank of `group` passes True (an int all-reduce
    MIN on the host: give a gloo group). None on a single rank (nothing to agree on)."""
    if group is None or dist.get_world_size(group) == 1:
        return None

    def agree(ready: bool) -> bool:
        flag = torch.tensor([int(ready)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    return agree
