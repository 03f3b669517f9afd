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

So a caller that passes a stale buffer, lets a hook eat a capture's gradients or relies on
anything but the returned gradients fails here as it would on a GPU.
"""

from __future__ import annotations

import contextlib

import torch


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
        with torch.enable_grad():
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
            for _ in range(num_warmup_iters):
                with _grads_set_aside(inputs + params):
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
