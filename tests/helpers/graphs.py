"""A CPU stand-in for Transformer Engine's ``make_graphed_callables`` that keeps its contract.

`StaticBufferGrapher` does what TE's function does around the capture, minus the CUDA graph:

* warm-up: ``num_warmup_iters`` forward + ``torch.autograd.backward`` passes of each callable on
  its sample arguments, with the inputs' and parameters' ``.grad`` set aside and restored around
  each (TE's ``_none_grad_context_wrapper``); after each backward it reads ``param.grad`` of
  every parameter, as TE does to learn what its graphed backward returns. A parameter whose grad
  is missing there (a post-accumulate hook consumed it) makes the stand-in raise, where TE would
  silently record the hook into the graph;
* replay: each call copies its arguments into the sample arguments (the static input buffers),
  runs the callable on them and, in backward, returns the gradients of the inputs and of every
  parameter through one autograd function whose inputs include the parameters, so autograd
  accumulates parameter gradients (and fires their hooks) as it does for TE's graphed callables.

* capture: after the warm-up, one more forward + backward of each callable, recorded: what a
  CUDA graph holds is the work this pass did, and a replay repeats exactly that work. Python
  that runs per call and chooses what to do (megatron-core's ``is_first_microbatch``) is frozen
  at its capture-time choice (`GRAPH_PHASE` tells stand-in modules whether they are being
  warmed up, captured or replayed, and for which graph).

`FP8LinearStandIn` models megatron-core's TE linear over Transformer Engine's FP8 weight cache on
top of that: TE quantizes the weight (`fp8_cast`) into its cached FP8 copy when
``is_first_microbatch`` is True, quantizes a fresh uncached copy when it is None (megatron-core
passes None when ``disable_parameter_transpose_cache`` is set), and reuses the cached copy when it
is False; megatron-core sets the flag to False after every forward. Under a replay the choice made
at capture is repeated: a capture that reused the cached copy replays on that (stale) copy, one
that quantized re-quantizes the current weight on every replay. `install_fp8_linear_standins`
puts them in a model's blocks. (Some Transformer Engine versions set every
``is_first_microbatch`` back to True after the warm-up, so their capture quantizes; the stand-in
keeps the flag as the warm-up left it, as the others do, and the engine must not depend on it.)

So a caller that passes a stale buffer, lets a hook eat a capture's gradients, relies on anything
but the returned gradients or captures without the weight cast fails here as it would on a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_qwenimage.model.backends import ColumnLinear, RowLinear


@dataclass
class GraphPhase:
    """What `StaticBufferGrapher` is doing: ``mode`` "eager" (no graph involved), "warmup",
    "capture" or "replay", and ``graph``, the callable being warmed up, captured or replayed."""

    mode: str = "eager"
    graph: Any = None

    @contextlib.contextmanager
    def running(self, mode: str, graph: Any):
        saved = (self.mode, self.graph)
        self.mode, self.graph = mode, graph
        try:
            yield
        finally:
            self.mode, self.graph = saved


#: The phase stand-in modules consult (one grapher runs at a time, on the calling thread).
GRAPH_PHASE = GraphPhase()

#: Largest finite magnitude of FP8 E4M3, the forward format of TE's HYBRID recipes.
E4M3_MAX = 448.0


def fp8_cast(weight: torch.Tensor) -> torch.Tensor:
    """`weight` quantized to FP8 E4M3 with a per-tensor current scale (amax -> 448) and back to
    its dtype: the stand-in for TE's weight quantization, a pure function of the weight."""
    w = weight.detach().float()
    scale = E4M3_MAX / w.abs().amax().clamp_min(1e-12)
    return ((w * scale).to(torch.float8_e4m3fn).float() / scale).to(weight.dtype)


class FP8LinearStandIn(torch.nn.Module):
    """A megatron-core TE linear under FP8, on CPU: the model's single-rank `ColumnLinear` /
    `RowLinear` computing with the FP8 copy of its weight that TE's weight cache would hand it.

    Holds the replaced layer's own ``weight`` and ``bias`` parameters (same objects, same names:
    optimizers and hooks keep working). Carries megatron-core's ``is_first_microbatch`` and
    ``disable_parameter_transpose_cache``. The forward multiplies with the FP8 copy (gradients
    reach the weight straight through, as TE's weight gradient does). Attributes: ``workspace``,
    TE's cached FP8 copy (refreshed in place, as TE's ``_fp8_workspaces`` are); ``last_fp8_weight``,
    the FP8 copy the last forward, replays included, multiplied with.
    """

    def __init__(self, linear: ColumnLinear | RowLinear):
        super().__init__()
        if linear.group.size() != 1:
            raise ValueError("FP8LinearStandIn models one tensor-parallel rank")
        self.weight = linear.weight
        self.bias = linear.bias
        # ColumnLinear hands the bias back when it skips adding it; RowLinear always adds it.
        self.returns_bias = isinstance(linear, ColumnLinear) and linear.skip_bias_add
        self.is_first_microbatch = True
        self.disable_parameter_transpose_cache = False
        self.workspace: torch.Tensor | None = None
        self.last_fp8_weight: torch.Tensor | None = None
        self._captured: dict[int, tuple[bool, bool]] = {}  # per graph: (cached, quantize)

    def _fp8_weight(self, is_first_microbatch: bool | None) -> torch.Tensor:
        """TE's weight-cache contract, the choice frozen at capture under a replay."""
        cached, quantize = is_first_microbatch is not None, is_first_microbatch is None or is_first_microbatch
        phase = GRAPH_PHASE
        if phase.mode == "capture":
            self._captured[id(phase.graph)] = (cached, quantize)
        elif phase.mode == "replay":
            cached, quantize = self._captured[id(phase.graph)]
        if not cached:
            return fp8_cast(self.weight)
        if self.workspace is None:
            self.workspace = fp8_cast(self.weight)
        elif quantize:
            self.workspace.copy_(fp8_cast(self.weight))
        return self.workspace

    def forward(self, input_: torch.Tensor):
        # megatron-core's TELinear.forward: None when the cache is disabled, then the flag drops.
        first = None if self.disable_parameter_transpose_cache else self.is_first_microbatch
        fp8 = self._fp8_weight(first)
        if GRAPH_PHASE.mode != "replay":  # a replay runs no Python of the captured module
            self.is_first_microbatch = False
        self.last_fp8_weight = fp8.detach().clone()
        weight = self.weight + (fp8 - self.weight).detach()
        if self.returns_bias:
            return F.linear(input_, weight), self.bias
        return F.linear(input_, weight, self.bias), None


def install_fp8_linear_standins(model: torch.nn.Module) -> dict[str, FP8LinearStandIn]:
    """Replace the linears of `model`'s blocks that Transformer Engine runs in FP8 (every
    `ColumnLinear` / `RowLinear` but the AdaLN modulation ones, which gather their output and stay
    local under the TE backend) with `FP8LinearStandIn`s; returns them by qualified name."""
    installed = {}
    for name, module in list(model.named_modules()):
        if not name.startswith("blocks.") or not isinstance(module, (ColumnLinear, RowLinear)):
            continue
        if getattr(module, "gather_output", False):
            continue
        parent_name, _, attr = name.rpartition(".")
        standin = FP8LinearStandIn(module)
        setattr(model.get_submodule(parent_name), attr, standin)
        installed[name] = standin
    return installed


@contextlib.contextmanager
def _grads_set_aside(tensors):
    saved = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    try:
        yield
    finally:
        for t, g in zip(tensors, saved):
            t.grad = g


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, static, n_args, *args_and_params):
        args, params = args_and_params[:n_args], args_and_params[n_args:]
        with torch.no_grad():
            for buf, arg in zip(static, args):
                buf.copy_(arg)
        leaves = [b.detach().requires_grad_(b.requires_grad) for b in static]
        with torch.enable_grad(), GRAPH_PHASE.running("replay", module):
            out = module.__class__.forward(module, *leaves)
        outputs = out if isinstance(out, tuple) else (out,)
        ctx.leaves, ctx.params, ctx.outputs, ctx.n_args = leaves, params, outputs, n_args
        ctx.single = not isinstance(out, tuple)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        wrt = [t for t in (*ctx.leaves, *ctx.params) if t.requires_grad]
        grads = torch.autograd.grad(ctx.outputs, wrt, grad_outputs, allow_unused=True)
        it = iter(grads)
        grad_args = [next(it) if t.requires_grad else None for t in ctx.leaves]
        grad_params = [next(it) if p.requires_grad else None for p in ctx.params]
        return (None, None, None, *grad_args, *grad_params)


class StaticBufferGrapher:
    """``make_graphed_callables(modules, sample_args, num_warmup_iters=3, **fp8_kwargs)``.

    Attributes: calls (one ``(modules, sample_args, kwargs)`` per call), replays (forward calls
    of the returned callables).
    """

    def __init__(self):
        self.calls = []
        self.replays = 0

    def __call__(self, modules, sample_args, num_warmup_iters: int = 3, **kwargs):
        self.calls.append((modules, sample_args, kwargs))
        for module, args in zip(modules, sample_args):
            params = [p for p in module.parameters() if p.requires_grad]
            inputs = [a for a in args if a.requires_grad]
            for mode in ["warmup"] * num_warmup_iters + ["capture"]:
                with _grads_set_aside(inputs + params), GRAPH_PHASE.running(mode, module):
                    out = module(*args)
                    outputs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
                    torch.autograd.backward(outputs, grad_tensors=[torch.ones_like(o) for o in outputs])
                    missing = [i for i, p in enumerate(params) if p.grad is None]
                    if missing:
                        raise RuntimeError(
                            f"capture saw no gradient for {len(missing)} of {len(params)} parameters after its "
                            "backward (a gradient hook consumed them)"
                        )
        grapher = self

        for module, static in zip(modules, sample_args):

            def replay(*args, _module=module, _static=static):
                grapher.replays += 1
                params = list(_module.parameters())
                out = _Replay.apply(_module, _static, len(args), *args, *params)
                return out[0] if len(out) == 1 else out

            module.forward = replay
        return modules
