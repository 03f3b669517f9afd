"""ZeRO-3 parameters: each unit's whole parameters exist only while its forward or backward runs.

Under ``data_parallel.sharding: zero3`` the distributed optimizer keeps no whole copy of the
parameters between uses (FSDP's ``reshard_after_forward``; DeepSpeed's stage 3). The fp32 master
shard (``[S]`` per rank) is the only persistent copy; a unit (one MMDiT block, the embedders, the
head: `consumers.data_parallel.dp_units`) is all-gathered into its parameters' storage right
before its forward, freed right after it, all-gathered again when the backward reaches it, and
freed again when its backward has left it. Gradients are ZeRO-2's (`consumers.grad_slots`).

How the parameters are freed without breaking autograd: each parameter owns its storage, and the
storage is resized to 0 bytes (freed) and back (FSDP1's and FSDP2's mechanism): the parameter
object, its shape and every view of it (the tensors autograd saved for the backward) stay valid,
and reading a freed parameter raises (``data is not allocated``) instead of reading stale values.
The storage is re-allocated at every gather, so parameter addresses change within a step:
per-block CUDA graphs cannot run with zero3 (refused in `DataParallelConfig.check_layout`).

Events per unit ``i`` (hooks on its modules, `ParameterResharding.register`):

* forward pre-hook: gather ``i`` (waiting for its prefetched all-gather, or running it now) and
  prefetch the next ``depth - 1`` units in forward order; under autograd, the block's tensor
  inputs pass through `_PostBackward`, whose backward runs once the block's backward has
  produced every input gradient, i.e. has finished with the parameters;
* forward post-hook: free ``i`` (blocks; the embedders and the head, several modules each and
  ~0.2 % of the parameters, stay gathered until the end of the backward) and hook the outputs;
* first output gradient (the backward reaches the unit): gather ``i`` again, prefetch the units
  before it in backward order;
* `_PostBackward.backward`: free ``i``; at the end of every backward pass (an autograd engine
  callback) every unit still gathered is freed.

Inside a backward (activation recompute re-running a block's forward), the forward hooks only
make sure the unit is gathered: nothing is freed, wrapped or prefetched there.

Order of collectives: every DP rank runs the same modules in the same order (the same model and
schedule), so the gathers, launched only from these hooks, are issued in the same order on every
rank. At most `depth` gathers are in flight, through the optimizer's rotating receive buffers
(unit ``i`` uses buffer ``i % depth``; a prefetch that would reuse a busy buffer waits for a later
hook).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class _PostBackward(torch.autograd.Function):
    """Identity on a block's tensor inputs; its backward frees the block's parameters (it runs
    once every gradient the block's backward produces for its inputs has been computed)."""

    @staticmethod
    def forward(ctx, owner: ParameterResharding, index: int, *tensors: torch.Tensor):
        ctx.owner, ctx.index = owner, index
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        ctx.owner.free(ctx.index)  # the block's backward is done with its parameters
        return (None, None, *grads)


def owns_whole_storage(p: torch.Tensor) -> bool:
    """`p` is its storage's only, whole, contiguous tenant: resizing the storage frees exactly `p`."""
    return (
        p.storage_offset() == 0 and p.is_contiguous() and p.untyped_storage().nbytes() == p.numel() * p.element_size()
    )


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (recompute re-runs
    forwards there)."""
    return torch._C._current_graph_task_id() != -1


class ParameterResharding:
    """The gathered / freed state of every unit's parameters on one rank (module docstring).

    Args:
        unit_params: per unit (forward order) its parameters; each must own its whole storage
            (the optimizer re-homes them before building its all-gather plan).
        launch_gather: ``i -> None``: start unit ``i``'s all-gather into its receive buffer.
        land_gather: ``i -> None``: wait for unit ``i``'s all-gather and copy it into the
            parameters (their storage is allocated first).
        depth: receive buffers, i.e. all-gathers in flight at once (>= 1).
        prefetch: launch the next units' all-gathers ahead of their use
            (``overlap_param_gather``); False: every gather runs when its unit is reached.
        names: the units' names (for errors and `events`).
    """

    def __init__(
        self,
        unit_params: Sequence[Sequence[torch.nn.Parameter]],
        *,
        launch_gather: Callable[[int], None],
        land_gather: Callable[[int], None],
        depth: int,
        prefetch: bool,
        names: Sequence[str],
    ):
        if depth < 1:
            raise ValueError(f"ParameterResharding: depth={depth}, expected >= 1")
        self._params = [list(ps) for ps in unit_params]
        self._launch_gather, self._land_gather = launch_gather, land_gather
        self.depth, self.prefetch, self.names = depth, prefetch, list(names)
        seen = set()
        for name, params in zip(self.names, self._params):
            for p in params:
                ptr = p.untyped_storage().data_ptr()
                if not owns_whole_storage(p) or ptr in seen:
                    raise ValueError(f"ParameterResharding: a parameter of unit {name} does not own its whole storage")
                seen.add(ptr)
        self._nbytes = [[p.numel() * p.element_size() for p in params] for params in self._params]
        self.gathered = [True] * len(self._params)  # the parameters start allocated
        self._in_flight: set[int] = set()
        self._callback_queued = False
        #: ``(event, unit index)`` in order: ``gather`` (launched), ``land``, ``free`` (tests read it).
        self.events: list[tuple[str, int]] = []

    # ------------------------------------------------------------------ gather / free
    def _launch(self, i: int) -> None:
        self._launch_gather(i)
        self._in_flight.add(i)
        self.events.append(("gather", i))

    def _busy_buffer(self, i: int) -> bool:
        return any(k % self.depth == i % self.depth for k in self._in_flight)

    def ensure(self, i: int, direction: int, *, prefetch: bool = True) -> None:
        """Unit `i`'s parameters are gathered on return; then (``prefetch``) the all-gathers of
        the next units in `direction` (+1 forward, -1 backward) are launched, up to ``depth - 1``
        ahead, where their receive buffer is free."""
        if not self.gathered[i]:
            if i not in self._in_flight:
                if self._busy_buffer(i):  # an unused prefetch holds its buffer: land it first
                    for k in sorted(self._in_flight):
                        if k % self.depth == i % self.depth:
                            self._land(k)
                self._launch(i)
            self._land(i)
        if not (prefetch and self.prefetch):
            return
        j = i + direction
        while 0 <= j < len(self._params) and abs(j - i) < self.depth:
            if not self.gathered[j] and j not in self._in_flight:
                if self._busy_buffer(j):
                    break
                self._launch(j)
            j += direction

    def _land(self, i: int) -> None:
        for p, n in zip(self._params[i], self._nbytes[i]):
            p.untyped_storage().resize_(n)
        self._land_gather(i)
        self._in_flight.discard(i)
        self.gathered[i] = True
        self.events.append(("land", i))

    def free(self, i: int) -> None:
        """Free unit `i`'s parameter storage (no-op when it is not gathered)."""
        if not self.gathered[i]:
            return
        for p in self._params[i]:
            p.untyped_storage().resize_(0)
        self.gathered[i] = False
        self.events.append(("free", i))

    def free_all(self) -> None:
        """Free every unit (gathers in flight are landed first: every rank issued them)."""
        for i in sorted(self._in_flight):
            self._land(i)
        for i in range(len(self._params)):
            self.free(i)

    def gather_all(self) -> None:
        """Gather every unit (in forward order, no prefetch): the whole parameters, e.g. to read
        them outside a forward. `free_all` frees them again."""
        for i in range(len(self._params)):
            self.ensure(i, +1, prefetch=False)

    # ------------------------------------------------------------------ hooks
    def _before_backward(self, i: int) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        self.ensure(i, -1)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self.free_all()

    def register(self, i: int, modules: Sequence[torch.nn.Module], *, reshard: bool) -> list:
        """Hooks on `modules` for unit `i`: gather before their forward and backward; with
        `reshard` (a unit of one module, a block), free after its forward and after its backward.
        Returns the hook handles."""
        if reshard and len(modules) != 1:
            raise ValueError(f"unit {self.names[i]}: resharding after forward needs one module, got {len(modules)}")

        def pre_hook(module, args):
            if _in_backward():  # recompute: the unit was gathered by its output gradients
                self.ensure(i, +1, prefetch=False)
                return None
            self.ensure(i, +1)
            if not (reshard and torch.is_grad_enabled()):
                return None
            slots = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
            if not slots:
                return None
            wrapped = _PostBackward.apply(self, i, *(args[k] for k in slots))
            out = list(args)
            for k, t in zip(slots, wrapped):
                out[k] = t
            return tuple(out)

        def post_hook(module, args, output):
            if _in_backward():
                return None
            if torch.is_grad_enabled():
                outputs = output if isinstance(output, (tuple, list)) else (output,)
                for t in outputs:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda grad: self._before_backward(i))
            if reshard:
                self.free(i)
            return None

        handles = []
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
        return handles
