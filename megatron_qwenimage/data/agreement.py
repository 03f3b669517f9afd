"""Rank agreement for the reader: every rank of a training job must read the same samples per step.

The global sample order is a pure function of the seed, the config and the snapshots pinned, so
ranks agree as long as they pin the same snapshots at the same steps. A snapshot published while
ranks start (or while they cross an epoch boundary of a ``grow`` cache) would otherwise be seen
by some ranks and not others: TP/PP peers then run different samples (a hang, or silently wrong
gradients) and DP replicas train on a mixture of two orders. So the reader decides pins once and
shares them (`RankAgreement.broadcast`), and compares a hash of each step's samples across the
world (`RankAgreement.gather`), stopping with an error naming the step on any mismatch.

`SingleProcess` is the default; `TorchDistributedAgreement` is what a torchrun job passes. Both
methods are collectives: every rank calls them at the same point of its main thread.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

import torch

from megatron_qwenimage.model.mappings import all_gather_single


class RankAgreement(Protocol):
    """Collectives over the ranks that must read the same data (the whole training world)."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` (JSON-able), returned on every rank."""

    def gather_int(self, value: int) -> list[int]:
        """Every rank's `value` (a signed 64-bit int), in rank order, on every rank."""

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (small, picklable; used on failure paths only), in rank order."""


class SingleProcess:
    """The agreement of a job with one rank: nothing to agree on."""

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather_int(self, value: int) -> list[int]:
        return [int(value)]

    def gather_object(self, obj: Any) -> list[Any]:
        return [obj]


class TorchDistributedAgreement:
    """`RankAgreement` over a torch.distributed process group (default: the whole world).

    Args:
        group: the process group (None: the default group).
        device: where the small tensors of `gather_int` live (``cuda`` for NCCL, ``cpu`` for gloo).
    """

    def __init__(self, group: torch.distributed.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        self.group = group
        self.device = torch.device(device)

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(
            box,
            src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
            group=self.group,
            device=self.device if self.device.type != "cpu" else None,
        )
        return box[0]

    def gather_int(self, value: int) -> list[int]:
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        mine = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        out = torch.empty(world, dtype=torch.int64, device=self.device)
        all_gather_single(out, mine, group=self.group)
        return [int(v) for v in out.tolist()]

    def gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out


def plan_digest(plan) -> int:
    """A signed 64-bit hash of a `StepPlan`'s identity: step, stage, task, cache, pin, bucket, samples."""
    key = json.dumps(
        [
            plan.step,
            plan.stage,
            plan.task,
            plan.cache,
            plan.snapshot_version,
            plan.bucket,
            [[r.shard_id, r.row] for r in plan.refs],
        ],
        separators=(",", ":"),
    )
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)
