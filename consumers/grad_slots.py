"""ZeRO-2 gradients: a few rotating one-unit buffers instead of a whole-model gradient buffer.

Under ``data_parallel.sharding: zero2`` the distributed optimizer keeps no ``[dp, S]`` gradient
buffer. A unit's gradients of one micro-batch are accumulated into one of `depth` rotating slots
(each ``[dp, n_max]``, the rank-major layout of the largest unit), reduce-scattered asynchronously
as soon as the unit has them all, and the reduced ``[n]`` chunk is added into the persistent
``[S]`` reduced shard when the slot is needed again (or at `finish`). Memory: ``depth`` units of
gradients instead of the model's; communication: one reduce-scatter per unit *per micro-batch*
(with one micro-batch per step, the same as ZeRO-1).

Collectives must be issued in the same order on every DP rank: units are launched strictly in
reverse forward order within each micro-batch (a unit waits for every unit after it), and a slot
is only reused once its unit has been launched. A unit still open when its slot is needed, or a
gradient arriving twice for one micro-batch, is an error that names the parameter: ZeRO-2 needs
each parameter's gradient exactly once per micro-batch and micro-batches whose backward passes do
not interleave (no interleaved pipeline schedule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


class GradientSlots:
    """Rotating per-unit gradient buffers of one rank (see the module docstring).

    Args:
        units: the optimizer's units in forward order (`consumers.optimizer._Unit`: ``name``,
            ``shards``, ``start``, ``end`` and ``reduced``, its range of the reduced shard).
        dp: the DP (shard) group size. dtype: the reduction dtype. device: where buffers live.
        depth: slots (units whose gradients may be in flight at once; >= 2).
        group: the DP (shard) group. reduce_scatter: the collective (``reduce_scatter_tensor``).
        row_pieces: ``(shard, [dp, n] view, column) -> [(view, row_lo, row_hi)]``, the
            optimizer's mapping of a parameter's rows into a rank-major buffer.
    """

    def __init__(
        self,
        units: Sequence,
        *,
        dp: int,
        dtype: torch.dtype,
        device: torch.device,
        depth: int,
        group: dist.ProcessGroup,
        reduce_scatter: Callable,
        row_pieces: Callable,
    ):
        if depth < 2:
            raise ValueError(
                f"GradientSlots: depth={depth}, expected >= 2 (a unit fills one slot while another reduces)"
            )
        self.units = list(units)
        self.dp, self.group, self.depth = dp, group, depth
        self._reduce_scatter = reduce_scatter
        n_max = max(u.end - u.start for u in self.units)
        #: ``depth`` send buffers ``[dp * n_max]`` and receive buffers ``[n_max]`` (the slots).
        self.buffers = [torch.zeros(dp * n_max, dtype=dtype, device=device) for _ in range(depth)]
        self.outputs = [torch.zeros(n_max, dtype=dtype, device=device) for _ in range(depth)]
        self._index = {id(u): i for i, u in enumerate(self.units)}
        self._unit_of = {s.name: i for i, u in enumerate(self.units) for s in u.shards}
        # Per unit and slot: each parameter's row views in that slot's buffer.
        self._pieces: list[list[dict]] = []
        for u in self.units:
            n = u.end - u.start
            per_slot = []
            for buf in self.buffers:
                grid = buf[: dp * n].view(dp, n)
                per_slot.append({s.name: row_pieces(s, grid, s.offset - u.start) for s in u.shards})
            self._pieces.append(per_slot)
        self.reset()

    def discard(self) -> None:
        """Drop this step's gradients (a new step, or a skipped one): wait for the reduce-scatters
        in flight (every rank issued them) and forget the rest."""
        for work in self._work:
            if work is not None:
                work.wait()
        self.reset()

    def reset(self) -> None:
        """Forget the step (after `finish`, or to drop its gradients)."""
        self._slot_of: dict[int, int] = {}  # unit index -> slot it accumulates into
        self._arrived: dict[int, set[str]] = {}  # unit index -> parameters arrived this micro-batch
        self._owner: list[int | None] = [None] * self.depth  # slot -> unit index (open or in flight)
        self._work: list[object | None] = [None] * self.depth
        self._next_slot = 0
        self._next_launch = len(self.units) - 1  # strict reverse order within each micro-batch
        self._ready: set[int] = set()

    # ------------------------------------------------------------------ one gradient
    def add(self, s, grad: torch.Tensor) -> None:
        """Accumulate parameter `s`'s gradient of this micro-batch into its unit's slot."""
        ui = self._unit_of[s.name]
        arrived = self._arrived.setdefault(ui, set())
        if s.name in arrived:
            raise RuntimeError(
                f"ZeRO-2: a second gradient of {s.name} arrived before its unit {self.units[ui].name} had all of "
                "this micro-batch's (data_parallel.sharding: zero2 needs every parameter's gradient once per "
                "micro-batch; use sharding: zero1)"
            )
        slot = self._open(ui)
        g = grad.reshape(s.rows, s.cols)
        for view, lo, hi in self._pieces[ui][slot][s.name]:
            view.add_(g[lo:hi].view(view.shape))
        arrived.add(s.name)
        if len(arrived) == len(self.units[ui].shards):
            self._ready.add(ui)
            self._launch_ready()

    def _open(self, ui: int) -> int:
        """The slot unit `ui` accumulates into this micro-batch (taking the next one, zeroed)."""
        slot = self._slot_of.get(ui)
        if slot is not None:
            return slot
        slot = self._next_slot
        owner = self._owner[slot]
        if owner is not None:
            if self._work[slot] is None:
                raise RuntimeError(
                    f"ZeRO-2: unit {self.units[ui].name} needs a gradient slot while unit {self.units[owner].name} "
                    f"still misses gradients ({sorted({s.name for s in self.units[owner].shards} - self._arrived.get(owner, set()))[:3]}); "
                    "data_parallel.sharding: zero2 needs each unit's gradients to complete in reverse forward "
                    "order (use sharding: zero1)"
                )
            self._drain(slot)
        n = self.units[ui].end - self.units[ui].start
        self.buffers[slot][: self.dp * n].zero_()
        self._owner[slot] = ui
        self._slot_of[ui] = slot
        self._next_slot = (slot + 1) % self.depth
        return slot

    def _launch_ready(self) -> None:
        while self._next_launch in self._ready:
            ui = self._next_launch
            self._launch(ui)
            self._next_launch = ui - 1 if ui > 0 else len(self.units) - 1  # next micro-batch starts over

    def _launch(self, ui: int) -> None:
        slot = self._slot_of.pop(ui)
        self._ready.discard(ui)
        self._arrived.pop(ui, None)
        n = self.units[ui].end - self.units[ui].start
        self._work[slot] = self._reduce_scatter(
            self.outputs[slot][:n],
            self.buffers[slot][: self.dp * n],
            op=dist.ReduceOp.SUM,
            group=self.group,
            async_op=True,
        )

    def _drain(self, slot: int) -> None:
        """Wait for the slot's reduce-scatter and add its chunk into the unit's reduced range."""
        ui, work = self._owner[slot], self._work[slot]
        if work is not None:
            work.wait()
            u = self.units[ui]
            u.reduced.add_(self.outputs[slot][: u.end - u.start])
        self._owner[slot] = None
        self._work[slot] = None

    # ------------------------------------------------------------------ the step
    def finish(self) -> None:
        """End of the backward: every unit of the current micro-batch is reduced, in the same
        order on every rank (units that got no gradient at all on this rank reduce zeros), and
        every slot is drained into the reduced shard."""
        if self._next_launch != len(self.units) - 1 or self._slot_of:
            # A micro-batch is under way: launch its remaining units in order (zeros where none arrived).
            while True:
                ui = self._next_launch
                missing = {s.name for s in self.units[ui].shards} - self._arrived.get(ui, set())
                if ui in self._slot_of and missing:
                    raise RuntimeError(
                        f"ZeRO-2: parameters {sorted(missing)[:3]} of unit {self.units[ui].name} got no gradient in "
                        "the last micro-batch while others did (data_parallel.sharding: zero2 needs all of them; "
                        "use sharding: zero1)"
                    )
                self._open(ui)
                self._ready.add(ui)
                self._launch_ready()
                if self._next_launch == len(self.units) - 1:
                    break
        for slot in range(self.depth):
            if self._owner[slot] is not None:
                self._drain(slot)
        self.reset()
