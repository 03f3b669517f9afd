"""Per-block CUDA graphs for `QwenImageMMDiT`: each block's forward and backward replayed as
one graph (Transformer Engine's ``make_graphed_callables``), the embedders and head eager.

At batch 2 the step is host-bound (the GPU waits for Python to launch short kernels one by one),
and a graph replays a block's hundreds of kernels with one launch. Graphs need tensors only,
with fixed shapes and addresses, so this module splits the job in two:

* `flatten_block_call` / `unflatten_block_call` turn a block call ``(img, txt, temb, rope, keys)``
  (rope a tuple of two complex tables, keys a `JointKeys`) into a flat tuple of tensors plus a
  `BlockCallSignature` (shapes, dtypes, which optional key tensors are present, the image
  token count), and back. `TensorBlock` is the block behind that tensors-only forward: what
  gets captured.
* `GraphedBlock` stands in for the block in ``model.blocks``: `QwenImageMMDiT.run_blocks` calls
  it exactly as it calls a block; it flattens the call, refuses one whose signature differs from
  the captured one (another bucket, a text mask that appeared, ...) and blocks called out of the
  captured order, and replays the graph. Every tensor of the call, the RoPE tables and key
  tensors included, is an input of the graph: the graphed callable copies each input into its
  static buffer (storage of its own, never the model's cached RoPE tables), so a call with
  different values is replayed on those values, never on stale ones.

`graph_blocks` records one eager call of each block (`record_block_calls`), captures them all
in call order with the given ``make_graphed_callables`` (TE's in practice; any function with its
``(modules, sample_args, **kwargs) -> modules`` contract works, which is how the CPU tests run
the plumbing) and installs the `GraphedBlock`s; `GraphedBlocks.restore` puts the eager blocks
back and frees the graphs.

Limits: one tensor-parallel rank, no activation recompute, the model in training mode (a graph
holds the forward *and* the backward of its block). Under FP8 the graphed model must run inside
the same recipe's ``fp8_autocast`` as the capture.

FP8 weights: a replay runs the kernels its capture recorded, never the Python around them, so the
per-micro-batch choice megatron-core's TE linears make (``is_first_microbatch``: quantize the
weight, or reuse the FP8 copy cached by an earlier call) is frozen at capture. A capture that ran
with the flag False (the state a training pass leaves it in) records no quantization, and every
replay would read the FP8 copy of the weights of some step before the capture. `capture_blocks`
therefore switches the captured blocks' linears to quantize on every forward
(`disable_fp8_weight_cache`) before capturing: each replay re-quantizes the weights its step
reads, whatever the installed Transformer Engine does with the flag around its warm-up.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_qwenimage.model.backends import JointKeys

#: Positions of the flattened tensors of a block call (the key tensors follow when present).
BLOCK_TENSOR_NAMES = ("img", "txt", "temb", "txt_rot", "img_rot")


@dataclass(frozen=True)
class BlockCallSignature:
    """What a captured block call fixed: everything but the tensors' values.

    Attributes:
        names: names of the flattened tensors, in order (`BLOCK_TENSOR_NAMES`, then
            ``key_mask`` and/or ``kv_lengths`` when the call's `JointKeys` has them).
        shapes, dtypes, devices: of each flattened tensor.
        image_tokens: `JointKeys.image_tokens` of the call.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[str, ...]
    image_tokens: int

    def mismatch(self, other: BlockCallSignature) -> str | None:
        """None when `other` equals this signature, else what differs (for error messages)."""
        if self == other:
            return None
        if self.names != other.names:
            return f"tensors {other.names} where the graph was captured with {self.names}"
        if self.image_tokens != other.image_tokens:
            return f"image_tokens={other.image_tokens} where the graph was captured with {self.image_tokens}"
        for i, name in enumerate(self.names):
            for what, want, got in (
                ("shape", self.shapes[i], other.shapes[i]),
                ("dtype", self.dtypes[i], other.dtypes[i]),
                ("device", self.devices[i], other.devices[i]),
            ):
                if want != got:
                    return f"{name} has {what} {got} where the graph was captured with {want}"
        return "signatures differ"


def flatten_block_call(
    img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: Sequence[torch.Tensor], keys: JointKeys
) -> tuple[tuple[torch.Tensor, ...], BlockCallSignature]:
    """A block call's arguments as a flat tuple of tensors and its `BlockCallSignature`."""
    if not isinstance(keys, JointKeys):
        raise TypeError(f"keys must be a JointKeys, got {type(keys).__name__}")
    if len(rope) != 2:
        raise ValueError(f"rope must be (txt_rotations, img_rotations), got {len(rope)} tables")
    tensors = [img, txt, temb, rope[0], rope[1]]
    names = list(BLOCK_TENSOR_NAMES)
    for name in ("key_mask", "kv_lengths"):
        value = getattr(keys, name)
        if value is not None:
            tensors.append(value)
            names.append(name)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    signature = BlockCallSignature(
        names=tuple(names),
        shapes=tuple(tuple(t.shape) for t in tensors),
        dtypes=tuple(t.dtype for t in tensors),
        devices=tuple(str(t.device) for t in tensors),
        image_tokens=int(keys.image_tokens),
    )
    return tuple(tensors), signature


def unflatten_block_call(tensors: Sequence[torch.Tensor], signature: BlockCallSignature):
    """Inverse of `flatten_block_call`: ``(img, txt, temb, (txt_rot, img_rot), keys)``."""
    if len(tensors) != len(signature.names):
        raise ValueError(f"{len(tensors)} tensors for a signature of {len(signature.names)} ({signature.names})")
    named = dict(zip(signature.names, tensors))
    keys = JointKeys(signature.image_tokens, named.get("key_mask"), named.get("kv_lengths"))
    return named["img"], named["txt"], named["temb"], (named["txt_rot"], named["img_rot"]), keys


class TensorBlock(torch.nn.Module):
    """A block behind a tensors-only forward: ``forward(*flat)`` with `flatten_block_call`'s
    tuple; returns ``(img, txt)``, or ``img`` alone after a context-only block (no None output)."""

    def __init__(self, block: torch.nn.Module, signature: BlockCallSignature):
        super().__init__()
        self.block = block
        self.signature = signature

    def forward(self, *tensors: torch.Tensor):
        img, txt, temb, rope, keys = unflatten_block_call(tensors, self.signature)
        img, txt = self.block(img, txt, temb, rope, keys)
        return img if txt is None else (img, txt)


class CallOrder:
    """Checks that graphed blocks run their forwards in the captured order, block 0 first.

    Graphs captured together share one memory pool and are only safe replayed in capture order
    (TE captures forward 1..N, then backward N..1; autograd runs the backward in reverse anyway).
    Position 0 may always start a new pass; any other position must follow its predecessor.
    """

    def __init__(self, count: int):
        self.count = count
        self.last: int | None = None

    def check(self, position: int) -> None:
        if position != 0 and self.last != position - 1:
            expected = 0 if self.last is None or self.last == self.count - 1 else self.last + 1
            self.last = None  # the pass is broken: only a fresh pass from block 0 may follow
            raise RuntimeError(
                f"graphed block at position {position} called out of the captured order (expected position {expected})"
            )
        self.last = position


class GraphedBlock(torch.nn.Module):
    """Stands in for one block of ``model.blocks``; same call, replays the captured graph.

    Args:
        graphed: the `TensorBlock` returned by ``make_graphed_callables`` (its forward replays).
        signature: the captured call's signature; a call with another one raises ValueError.
        position: the block's place in the capture order; `order` the blocks' shared `CallOrder`.
    """

    def __init__(self, graphed: TensorBlock, signature: BlockCallSignature, position: int, order: CallOrder):
        super().__init__()
        self.graphed = graphed
        self.signature = signature
        self.position = position
        self.order = order
        self.context_only = bool(getattr(graphed.block, "context_only", False))

    def forward(self, img, txt, temb, rope, keys):
        tensors, signature = flatten_block_call(img, txt, temb, rope, keys)
        why = self.signature.mismatch(signature)
        if why is not None:
            raise ValueError(f"graphed block {self.position}: {why}; capture again for this input layout")
        self.order.check(self.position)
        out = self.graphed(*tensors)
        if self.context_only:
            return out, None
        return tuple(out)


def record_block_calls(model: torch.nn.Module, run: Callable[[], Any]) -> list[tuple[str, tuple]]:
    """Run ``run()`` (an eager pass of `model`) and return each block's call, in call order.

    Returns ``[(key in model.blocks, (img, txt, temb, rope, keys))]``: the stream tensors and
    ``temb`` detached copies, the RoPE tables and `JointKeys` as passed. Each block must be
    called exactly once.
    """
    calls: list[tuple[str, tuple]] = []
    handles = []

    def hook_for(key: str):
        def hook(module, args):
            img, txt, temb, rope, keys = args
            calls.append((key, (img.detach().clone(), txt.detach().clone(), temb.detach().clone(), rope, keys)))

        return hook

    for key, block in model.blocks.items():
        handles.append(block.register_forward_pre_hook(hook_for(key)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    seen = [k for k, _ in calls]
    if sorted(seen) != sorted(model.blocks.keys()) or len(set(seen)) != len(seen):
        raise RuntimeError(f"expected one call of each block {list(model.blocks.keys())}, recorded {seen}")
    return calls


def check_graphable(model: torch.nn.Module) -> None:
    """ValueError when `model` cannot have its blocks graphed by `graph_blocks`."""
    if getattr(model, "tp", None) is not None and model.tp.size != 1:
        raise ValueError(f"per-block CUDA graphs support one tensor-parallel rank, the model has {model.tp.size}")
    if getattr(model, "recomputed_blocks", None):
        raise ValueError("per-block CUDA graphs do not support full-block activation recompute")
    if any(getattr(b, "recompute_core_attention", False) for b in model.blocks.values()):
        raise ValueError("per-block CUDA graphs do not support selective activation recompute")
    if not model.training:
        raise ValueError("per-block CUDA graphs are captured for training: call model.train() first")
    if any(isinstance(b, GraphedBlock) for b in model.blocks.values()):
        raise ValueError("the model's blocks are already graphed")


class GraphedBlocks:
    """The installed graphs of one model: `restore` puts the eager blocks back."""

    def __init__(self, model: torch.nn.Module, originals: dict[str, torch.nn.Module], graphed: dict[str, GraphedBlock]):
        self.model = model
        self.originals = originals
        self.graphed = graphed

    def restore(self) -> None:
        """Reinstall the eager blocks and release the graphs (`release_graphs`)."""
        for key, block in self.originals.items():
            self.model.blocks[key] = block
        release_graphs(self.graphed)
        self.graphed = {}
        self.originals = {}


def capture_blocks(
    model: torch.nn.Module, calls: list[tuple[str, tuple]], make_graphed_callables: Callable, **graph_kwargs: Any
) -> dict[str, GraphedBlock]:
    """Capture each block of `model` on its recorded call; returns the `GraphedBlock`s by key,
    not installed (`graph_blocks` installs them; `BlockGraphCache` swaps them in per pass).

    Args:
        model: a `QwenImageMMDiT` (or stage) in training mode, blocks eager.
        calls: `record_block_calls`'s list (the capture order is its order); the stream tensors
            may sit on another device than the model (they are copied to the RoPE tables' device).
        make_graphed_callables: ``(modules, sample_args, **graph_kwargs) -> modules``, e.g.
            ``transformer_engine.pytorch.make_graphed_callables``.
        graph_kwargs: passed on (warm-up iterations, FP8 recipe, ...).

    The captured blocks' TE linears are switched to quantize their weights to FP8 on every
    forward first (`disable_fp8_weight_cache`), so the graphs record the cast and every replay
    runs on the current weights. Raises whatever the capture raises; `TensorBlock`'s class is
    left as it was either way.
    """
    check_graphable(model)
    tensor_blocks, sample_args, signatures = [], [], []
    # A graph replays the FP8 weight quantization only if its capture ran it: make every captured
    # linear quantize on every forward, so the capture records the cast (see the module docstring).
    for key, _ in calls:
        disable_fp8_weight_cache(model.blocks[key])
    for key, (img, txt, temb, rope, keys) in calls:
        device = rope[0].device
        # The sample tensors become the graph's static input buffers, which every replay
        # overwrites with its inputs: each gets storage of its own (the RoPE tables passed are
        # the model's cached ones, which must never be written). Activations need a gradient.
        leaves = [t.detach().to(device, copy=True).requires_grad_(True) for t in (img, txt, temb)]
        own = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        own_keys = JointKeys(keys.image_tokens, own(keys.key_mask), own(keys.kv_lengths))
        flat, signature = flatten_block_call(*leaves, (own(rope[0]), own(rope[1])), own_keys)
        tensor_blocks.append(TensorBlock(model.blocks[key], signature))
        sample_args.append(flat)
        signatures.append(signature)
    saved_call = TensorBlock.__dict__.get("__call__")
    try:
        graphed = make_graphed_callables(tuple(tensor_blocks), tuple(sample_args), **graph_kwargs)
    finally:
        # TE wraps the class's __call__ in its FP8 autocast while capturing and puts it back only
        # when the capture succeeds; a stale wrapper would run later captures with its settings.
        if saved_call is not None:
            TensorBlock.__call__ = saved_call
        elif "__call__" in TensorBlock.__dict__:
            del TensorBlock.__call__
    if len(graphed) != len(tensor_blocks):
        raise RuntimeError(f"make_graphed_callables returned {len(graphed)} callables for {len(tensor_blocks)}")
    order = CallOrder(len(calls))
    return {
        key: GraphedBlock(module, signature, position, order)
        for position, ((key, _), module, signature) in enumerate(zip(calls, graphed, signatures))
    }


def release_graphs(graphed: dict[str, GraphedBlock]) -> None:
    """Free captured graphs (``reset()`` where the graphed callables have one, as TE's do) and
    make their `TensorBlock`s eager again."""
    for g in graphed.values():
        reset = getattr(g.graphed, "reset", None)
        if callable(reset):
            reset()
        # The captured forward is an instance attribute; drop it so the module is eager again.
        g.graphed.__dict__.pop("forward", None)


def graph_blocks(
    model: torch.nn.Module, calls: list[tuple[str, tuple]], make_graphed_callables: Callable, **graph_kwargs: Any
) -> GraphedBlocks:
    """Capture each block of `model` on its recorded call and install the graphs
    (`capture_blocks`, then ``model.blocks[key]`` are the `GraphedBlock`s until
    `GraphedBlocks.restore`). When the capture raises, the model's blocks are left as they were."""
    installed = capture_blocks(model, calls, make_graphed_callables, **graph_kwargs)
    originals = {key: model.blocks[key] for key in installed}
    for key, g in installed.items():
        model.blocks[key] = g
    return GraphedBlocks(model, originals, installed)


def disable_fp8_weight_cache(model: torch.nn.Module) -> int:
    """Make every megatron-core Transformer Engine linear of `model` quantize its weight to FP8
    on every forward; returns how many there are.

    megatron-core's TE linears pass ``is_first_microbatch=False`` to TE after their first call
    (its pipeline schedules set it back to True at each step; the eager loop does so with
    `consumers.precision.begin_weight_update_window`), and TE then reuses the FP8 copy of the
    weight made by that first call. Setting their ``disable_parameter_transpose_cache`` makes
    them pass None: no cached copy, a fresh cast each forward, so each step runs on the weights
    its optimizer step produced. `capture_blocks` calls it on every block it captures: a graph
    replays the cast only if its capture ran one. The flag stays set when the graphs are
    released (the blocks then quantize on every eager forward: correct, slightly slower).
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "disable_parameter_transpose_cache") and hasattr(module, "is_first_microbatch"):
            module.disable_parameter_transpose_cache = True
            count += 1
    return count


def te_graph_kwargs(
    make_graphed_callables: Callable,
    *,
    fp8: bool,
    recipe: Any = None,
    amax_group: Any = None,
    num_warmup_iters: int = 3,
) -> dict:
    """Keyword arguments of TE's ``make_graphed_callables`` for a capture with FP8 on or off.

    TE 2.1x names them ``enabled`` / ``recipe`` / ``amax_reduction_group`` /
    ``cache_quantized_params`` and keeps the older ``fp8_enabled`` / ``fp8_recipe`` /
    ``fp8_group`` / ``fp8_weight_caching`` as deprecated aliases; whichever names the installed
    function takes are used. `amax_group`: the group FP8 amax statistics are reduced over (the
    ``fp8_group`` of the training step's ``fp8_autocast``; None: no reduction). FP8 weight caching
    stays off: every graphed forward quantizes the weights it reads, so each step runs on the
    weights its optimizer step produced.
    """
    params = inspect.signature(make_graphed_callables).parameters
    kwargs: dict[str, Any] = {"num_warmup_iters": num_warmup_iters}
    if fp8 and recipe is None:
        raise ValueError("an FP8 capture needs the recipe its fp8_autocast will use")
    if "enabled" in params and "recipe" in params:
        kwargs.update(enabled=fp8, recipe=recipe if fp8 else None)
        if "cache_quantized_params" in params:
            kwargs["cache_quantized_params"] = False
        group_name = "amax_reduction_group" if "amax_reduction_group" in params else "fp8_group"
    elif "fp8_enabled" in params:
        kwargs.update(fp8_enabled=fp8, fp8_recipe=recipe if fp8 else None)
        if "fp8_weight_caching" in params:
            kwargs["fp8_weight_caching"] = False
        group_name = "fp8_group"
    elif fp8:
        raise TypeError("this make_graphed_callables takes no FP8 arguments")
    else:
        group_name = None
    if fp8 and amax_group is not None:
        if group_name not in params:
            raise TypeError("this make_graphed_callables takes no FP8 amax reduction group")
        kwargs[group_name] = amax_group
    return kwargs
