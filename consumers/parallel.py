"""Process groups for training: torch.distributed + megatron-core ``parallel_state`` + a DeviceMesh.

One `ParallelLayout` (TP x PP x DP, plus virtual pipeline stages; a pure value in
`megatron_qwenimage.layout`, re-exported here) describes how the world is cut.
`init_parallel` starts torch.distributed (gloo on CPU, nccl on GPU), asks megatron-core's
``parallel_state`` for the TP / PP / DP groups (rank order ``tp-cp-ep-dp-pp``: TP fastest) and
builds a DeviceMesh ``(pp, tp, dp)`` over the same ranks; the mesh only carries placement metadata
for distributed checkpoints (DTensor), and `ParallelState` checks that its groups equal megatron's.

The mesh's dimensions are ordered ``(pp, tp, dp)`` although the ranks are numbered TP fastest: a
checkpoint tensor is sharded over TP first and then, inside each TP shard, over DP (ZeRO-1 owns a
slice of the TP-local parameter), and DTensor applies placements in mesh-dimension order, which
DeviceMesh only lets a sub-mesh keep when the dimensions ascend (``mesh["tp", "dp"]``).

Nothing here is global besides megatron-core's own ``parallel_state``: the returned `ParallelState`
is passed down explicitly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.layout import ParallelConfig as ParallelConfig
from megatron_qwenimage.layout import ParallelLayout as ParallelLayout


@dataclass
class ParallelState:
    """This rank's place in the layout and its process groups (passed down explicitly)."""

    layout: ParallelLayout
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mesh: torch.distributed.device_mesh.DeviceMesh
    device: torch.device
    #: The TP x PP ranks of this rank's data-parallel replica (megatron-core's model-parallel
    #: group): the ranks that train on the same samples, so one of them reads and the rest receive.
    model_parallel_group: dist.ProcessGroup | None = None
    #: The DP ranks the optimizer state is sharded over (the DP group without HSDP) and, under
    #: HSDP, the ranks holding the same shard (None without HSDP).
    dp_shard_group: dist.ProcessGroup | None = None
    dp_replica_group: dist.ProcessGroup | None = None

    @property
    def data_source_rank(self) -> int:
        """Global rank that reads this replica's samples from the cache: its lowest (TP 0, PP 0)."""
        if self.model_parallel_group is None:
            return self.rank
        return min(dist.get_process_group_ranks(self.model_parallel_group))

    @property
    def reads_data(self) -> bool:
        """Whether this rank reads samples (and verifies shards) itself rather than receiving them."""
        return self.rank == self.data_source_rank

    @property
    def is_first_pp(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline group, by stage order."""
        return dist.get_process_group_ranks(self.pp_group)

    def model_mesh(self):
        """The ``(tp, dp)`` sub-mesh of this pipeline rank (checkpoint placements); under HSDP
        ``(tp, dp_replicate, dp_shard)``."""
        if self.layout.dp_shard is not None:
            return self.mesh["tp", "dp_replicate", "dp_shard"]
        return self.mesh["tp", "dp"]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> None:
    """Start torch.distributed from the torchrun/srun environment (no-op if already started).

    Reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (torchrun) or the Slurm
    variables ``SLURM_PROCID``/``SLURM_NTASKS`` (srun; MASTER_ADDR/PORT must be exported).
    Without any of them it starts a single-rank world on a free 127.0.0.1 port.
    """
    if dist.is_initialized():
        return
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in env:
            raise RuntimeError(
                f"init_distributed: environment variable {key} is not set (launch with torchrun or export it for srun)"
            )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def init_parallel(layout: ParallelLayout, backend: str | None = None) -> ParallelState:
    """Initialise (or re-initialise) megatron-core's model-parallel groups for `layout`.

    torch.distributed is started first if needed. Calling it again with another layout in the same
    world destroys the previous megatron-core groups first (tests run several layouts in one launch).
    """
    from megatron.core import parallel_state as ps

    init_distributed(backend)
    world = dist.get_world_size()
    if layout.world_size != world:
        raise ConfigError(
            f"parallel layout tp={layout.tp} x pp={layout.pp} x dp={layout.dp} = {layout.world_size} ranks, "
            f"but the world has {world}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        create_gloo_process_groups=False,
    )
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mesh = checkpoint_mesh(device.type, layout)
    state = ParallelState(
        layout=layout,
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        mesh=mesh,
        device=device,
        model_parallel_group=ps.get_model_parallel_group(),
        dp_shard_group=mesh["dp_shard"].get_group() if layout.dp_shard is not None else ps.get_data_parallel_group(),
        dp_replica_group=mesh["dp_replicate"].get_group() if layout.dp_shard is not None else None,
    )
    _check_mesh_matches(state)
    return state


def checkpoint_mesh(device_type: str, layout: ParallelLayout) -> torch.distributed.device_mesh.DeviceMesh:
    """The DeviceMesh ``(pp, tp, dp)`` over the world's ranks numbered megatron's way (TP fastest).

    Rank ``r`` sits at ``(pp, dp, tp)`` with ``r = (pp * dp_size + dp) * tp_size + tp``; the mesh
    holds the same ranks with its last two dimensions swapped, so ``mesh["tp", "dp"]`` is a valid
    (ascending) sub-mesh whose placements shard by TP first, then DP. Under HSDP the DP dimension
    is split into ``(dp_replicate, dp_shard)`` (shard groups of consecutive DP ranks), with ``dp``
    kept as their flattened dimension.
    """
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.arange(layout.world_size).reshape(layout.pp, layout.dp, layout.tp).permute(0, 2, 1)
    if layout.dp_shard is None:
        return DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "tp", "dp"))
    ranks = ranks.reshape(layout.pp, layout.tp, layout.replicas, layout.shard_size)
    mesh = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "tp", "dp_replicate", "dp_shard"))
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh


def _check_mesh_matches(state: ParallelState) -> None:
    """The DeviceMesh (checkpoint metadata) must name the same ranks as megatron-core's groups."""
    for dim, group in (("tp", state.tp_group), ("pp", state.pp_group), ("dp", state.dp_group)):
        mesh_ranks = sorted(dist.get_process_group_ranks(state.mesh[dim].get_group()))
        ps_ranks = sorted(dist.get_process_group_ranks(group))
        if mesh_ranks != ps_ranks:
            raise RuntimeError(
                f"device mesh {dim} ranks {mesh_ranks} differ from megatron-core's {dim} group {ps_ranks}; "
                "the rank order must be tp-cp-ep-dp-pp"
            )


def shutdown() -> None:
    """Destroy megatron-core's groups and torch.distributed (end of a run)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
