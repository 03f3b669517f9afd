"""Per-block CUDA graphs in the training loop: one set of graphs per input layout, captured on
demand (`BlockGraphCache`).

`megatron_qwenimage.model.cuda_graphs` captures a model's blocks for one block-call layout (the
shapes of ``img [n, b, D]``, ``txt [t, b, D]``, ``temb [b, D]``, the RoPE tables and which key-mask
tensors the call carries). A training run meets several: one per bucket and micro-batch size,
per text length, and per kind of text mask (all valid, right-padded). The cache keeps a set of
graphs per layout, the way Megatron's ``cuda_graph_warmup_steps`` does per layer:

* while `BlockGraphCache.dispatching` is open (one training step's forwards and backwards), the
  model's blocks are `_DispatchBlock`s. The first block of each forward reads the layout
  (`flatten_block_call`, no copy) and picks that layout's graphs for the whole pass, or runs the
  pass eagerly;
* a layout's ``warmup_passes``-th eager training pass is recorded (each block's real input; the
  streams are copied to the host, so a pending capture holds no device memory), and
  `BlockGraphCache.capture_pending`, called between steps, captures it from that record: warm-up
  and capture run on real activations, so FP8 amax histories see real values;
* at most ``max_layouts`` layouts are captured (each holds static input buffers and a memory
  pool); passes of any other layout, evaluation (no grad) and ``model.eval()`` passes stay eager.

Outside `dispatching` the model's blocks are its own eager blocks, so parameter names,
checkpoints and evaluation never see a graph. Parameters must keep their storage (optimizers and
checkpoint loads write in place): the graphs read them at fixed addresses.

Under data parallelism every rank must capture at the same steps (an FP8 capture reduces amax
statistics over the data-parallel group): `capture_pending` takes an ``agree`` function that
returns whether every rank has a layout pending (an all-reduce MIN in `consumers.graphs`); a rank
captures only when all do, so all ranks hold the same number of captured layouts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_qwenimage.model.cuda_graphs import (
    BlockCallSignature,
    GraphedBlock,
    capture_blocks,
    check_graphable,
    flatten_block_call,
    release_graphs,
)

log = logging.getLogger(__name__)


def describe_layout(signature: BlockCallSignature) -> str:
    """One-line description of a block-call layout for logs: stream shapes and key tensors."""
    shapes = dict(zip(signature.names, signature.shapes))
    keys = [n for n in signature.names if n in ("key_mask", "kv_lengths")]
    return (
        f"img {list(shapes['img'])} txt {list(shapes['txt'])} "
        f"({signature.image_tokens} image tokens, keys: {'+'.join(keys) if keys else 'all valid'})"
    )


@dataclass
class CapturedLayout:
    """The graphs of one layout. Attributes: signature; blocks (key in ``model.blocks`` ->
    `GraphedBlock`); capture_s (seconds the capture took); replays (forward passes replayed)."""

    signature: BlockCallSignature
    blocks: dict[str, GraphedBlock]
    capture_s: float
    replays: int = 0


@dataclass
class GraphCacheStats:
    """Counters of a `BlockGraphCache` (training passes only; evaluation is not counted; the
    captured layouts are `BlockGraphCache.layouts`)."""

    replayed_passes: int = 0  #: forward passes run on captured graphs
    eager_passes: int = 0  #: forward passes run eagerly (warm-up, or a layout not captured)
    capture_s: float = 0.0  #: seconds spent capturing, in all
    uncaptured_layouts: list[str] = field(default_factory=list)  #: layouts seen past the limit


class _DispatchBlock(torch.nn.Module):
    """Stands in for one block while `BlockGraphCache.dispatching` is open; same call as a block."""

    def __init__(self, cache: BlockGraphCache, key: str, position: int, block: torch.nn.Module):
        super().__init__()
        self.cache = cache
        self.key = key
        self.position = position
        self.block = block

    def forward(self, img, txt, temb, rope, keys):
        cache = self.cache
        if self.position == 0:
            cache._begin_pass(img, txt, temb, rope, keys)
        if cache._current is not None:
            return cache._current.blocks[self.key](img, txt, temb, rope, keys)
        if cache._recording is not None:
            cache._record(self.key, self.position, (img, txt, temb, rope, keys))
        return self.block(img, txt, temb, rope, keys)


class BlockGraphCache:
    """Per-block CUDA graphs of one model for each input layout its training passes meet.

    Args:
        model: a whole `QwenImageMMDiT` (blocks eager; `check_graphable`'s limits apply: one TP
            rank, no activation recompute).
        make_graphed_callables: ``(modules, sample_args, **graph_kwargs) -> modules``:
            ``transformer_engine.pytorch.make_graphed_callables`` (any function with its contract
            runs the plumbing, which is how the CPU tests run it).
        warmup_passes: eager training passes of a layout before it is captured (>= 1; the last
            one is recorded as the capture's sample input).
        max_layouts: layouts captured at most (>= 1).
        graph_kwargs: passed to ``make_graphed_callables`` (`te_graph_kwargs`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        make_graphed_callables: Callable,
        *,
        warmup_passes: int = 2,
        max_layouts: int = 8,
        graph_kwargs: dict[str, Any] | None = None,
    ):
        if warmup_passes < 1 or max_layouts < 1:
            raise ValueError(f"warmup_passes={warmup_passes} and max_layouts={max_layouts} must be >= 1")
        self.model = model
        self.make_graphed_callables = make_graphed_callables
        self.warmup_passes = warmup_passes
        self.max_layouts = max_layouts
        self.graph_kwargs = dict(graph_kwargs or {})
        self.layouts: dict[BlockCallSignature, CapturedLayout] = {}
        self.stats = GraphCacheStats()
        self._seen: Counter[BlockCallSignature] = Counter()
        self._num_blocks = len(model.blocks)
        self._current: CapturedLayout | None = None  # the layout of the pass in flight (replayed)
        self._recording: list | None = None  # the block calls of the pass in flight (recorded)
        self._recording_signature: BlockCallSignature | None = None
        self._pending: tuple[BlockCallSignature, list] | None = None  # a recorded pass to capture

    # -- a training step ---------------------------------------------------------------------
    @contextlib.contextmanager
    def dispatching(self) -> Iterator[None]:
        """Within: every training forward replays its layout's graphs or runs eagerly (recording
        the pass that completes a layout's warm-up). The eager blocks are back on exit."""
        originals = dict(self.model.blocks.items())
        if any(isinstance(b, (GraphedBlock, _DispatchBlock)) for b in originals.values()):
            raise RuntimeError("BlockGraphCache.dispatching: the model's blocks are already replaced")
        for position, (key, block) in enumerate(originals.items()):
            self.model.blocks[key] = _DispatchBlock(self, key, position, block)
        try:
            yield
        finally:
            for key, block in originals.items():
                self.model.blocks[key] = block
            self._current = None
            self._recording = None  # an unfinished recording (the step raised) is dropped

    @property
    def pending(self) -> BlockCallSignature | None:
        """The layout recorded for capture, if any."""
        return None if self._pending is None else self._pending[0]

    def capture_pending(self, agree: Callable[[bool], bool] | None = None) -> CapturedLayout | None:
        """Capture the pending layout; call between steps, with the blocks eager (outside
        `dispatching`) and before the step's gradients are zeroed (a capture's warm-up runs
        backward passes). Returns the new `CapturedLayout` or None.

        `agree(ready) -> bool`: whether every rank is ready (each passes whether it has a layout
        pending); called on every rank while fewer than ``max_layouts`` layouts are captured, so
        ranks that capture together stay in step. None: this rank alone decides.
        """
        if len(self.layouts) >= self.max_layouts:
            return None
        ready = self._pending is not None
        if agree is not None:
            ready = bool(agree(ready))
        if not ready or self._pending is None:
            return None
        signature, calls = self._pending
        self._pending = None
        start = time.perf_counter()
        blocks = capture_blocks(self.model, calls, self.make_graphed_callables, **self.graph_kwargs)
        layout = CapturedLayout(signature, blocks, capture_s=time.perf_counter() - start)
        self.layouts[signature] = layout
        self.stats.capture_s += layout.capture_s
        log.info(
            "captured per-block CUDA graphs for %s in %.1f s (layout %d of at most %d)",
            describe_layout(signature),
            layout.capture_s,
            len(self.layouts),
            self.max_layouts,
        )
        return layout

    def release(self) -> None:
        """Free every captured graph (the cache starts empty again)."""
        for layout in self.layouts.values():
            release_graphs(layout.blocks)
        self.layouts.clear()
        self._seen.clear()
        self._pending = None

    # -- called by the first / every `_DispatchBlock` of a pass ------------------------------
    def _begin_pass(self, img, txt, temb, rope, keys) -> None:
        self._current = None
        self._recording = None
        if not (torch.is_grad_enabled() and self.model.training):
            return  # evaluation: eager, uncounted
        _, signature = flatten_block_call(img, txt, temb, rope, keys)
        layout = self.layouts.get(signature)
        if layout is not None:
            self._current = layout
            layout.replays += 1
            self.stats.replayed_passes += 1
            return
        self.stats.eager_passes += 1
        self._seen[signature] += 1
        if len(self.layouts) >= self.max_layouts:
            name = describe_layout(signature)
            if name not in self.stats.uncaptured_layouts:
                self.stats.uncaptured_layouts.append(name)
                log.warning(
                    "per-block CUDA graphs: %s runs eagerly, %d layouts are captured already "
                    "(cuda_graphs.max_layouts); fewer distinct text lengths "
                    "(schedule.text_pad_multiple) or a larger limit would graph it",
                    name,
                    self.max_layouts,
                )
            return
        if self._pending is None and self._seen[signature] >= self.warmup_passes:
            check_graphable(self.model)
            self._recording = []
            self._recording_signature = signature

    def _record(self, key: str, position: int, call: tuple) -> None:
        img, txt, temb, rope, keys = call
        host = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        self._recording.append((key, (host(img), host(txt), host(temb), rope, keys)))
        if position == self._num_blocks - 1:
            self._pending = (self._recording_signature, self._recording)
            self._recording = None
