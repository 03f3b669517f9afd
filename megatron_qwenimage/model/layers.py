"""Small building blocks of the MMDiT: norms, timestep embedding, TP helpers, init roles.

Layouts: sequence tensors are Megatron ``[s, b, h]``; per-sample vectors are ``[b, h]``.

Every tensor of the model declares its initialisation (`InitRole`) where its layer is built
(`set_init_role`, `declare_linear`); `QwenImageMMDiT.init_weights` only reads the roles, so the
init of a tensor does not depend on its name.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F

from megatron_qwenimage.model.elementwise import rms_norm
from megatron_qwenimage.model.mappings import copy_to_tp


class InitRole(enum.Enum):
    """How `QwenImageMMDiT.init_weights` initialises a tensor.

    * ``NORMAL``: normal(0, 0.02) (input and hidden linears);
    * ``OUTPUT``: normal(0, 0.02 / sqrt(2 · num_layers)) (linears that write into the residual
      stream: attention output projections, MLP down projections);
    * ``ZERO``: zeros (biases; adaLN-Zero: modulation linears, ``norm_out``, ``proj_out``);
    * ``ONE``: ones (RMSNorm weights).
    """

    NORMAL = "normal"
    OUTPUT = "output"
    ZERO = "zero"
    ONE = "one"


#: Attribute under which `set_init_role` records a parameter's role.
INIT_ROLE_ATTR = "init_role"


def set_init_role(tensor: torch.Tensor, role: InitRole) -> torch.Tensor:
    """Declare how `tensor` (a parameter) is initialised; returns it.

    Buffers are replaced by ``Module.to()``; declare their roles in a table on their module
    instead, ``buffer_init_roles`` (see `module_tensor_init_roles`).
    """
    if not isinstance(role, InitRole):
        raise TypeError(f"init role {role!r}: expected an InitRole")
    setattr(tensor, INIT_ROLE_ATTR, role)
    return tensor


def init_role_of(tensor: torch.Tensor) -> InitRole | None:
    """The role declared on `tensor` with `set_init_role`, or None."""
    return getattr(tensor, INIT_ROLE_ATTR, None)


def declare_linear(layer: torch.nn.Module, weight: InitRole) -> torch.nn.Module:
    """Declare a linear layer's init: its weight gets `weight`, its bias (if any) ``ZERO``; returns it."""
    set_init_role(layer.weight, weight)
    if isinstance(getattr(layer, "bias", None), torch.nn.Parameter):
        set_init_role(layer.bias, InitRole.ZERO)
    return layer


def module_tensor_init_roles(module: torch.nn.Module) -> dict[str, InitRole | None]:
    """Name -> declared role of every parameter of `module` (None where none is declared), and of
    the buffers that its submodules declare in a ``buffer_init_roles`` table (buffer name -> role)."""
    roles: dict[str, InitRole | None] = {name: init_role_of(p) for name, p in module.named_parameters()}
    for module_name, sub in module.named_modules():
        for buffer_name, role in getattr(sub, "buffer_init_roles", {}).items():
            roles[f"{module_name}.{buffer_name}" if module_name else buffer_name] = role
    return roles


class SingleRankGroup:
    """The tensor-parallel "group" of a model that runs on one rank without torch.distributed.

    megatron-core's TP layers and mappings need a group object, but only ask it for ``size()``
    and ``rank()`` (and skip all communication when the size is 1); this answers 1 and 0.
    """

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


class TPContext:
    """The tensor-parallel facts a layer needs: group, size, rank, sequence parallelism.

    Args:
        group: the TP process group, or None for a single rank (a `SingleRankGroup` is used).
        sequence_parallel: Megatron sequence parallelism requested (effective only when size > 1).
    """

    def __init__(self, group: torch.distributed.ProcessGroup | None, sequence_parallel: bool):
        self.group = SingleRankGroup() if group is None else group
        self.size = self.group.size()
        self.rank = self.group.rank()
        self.sequence_parallel = sequence_parallel and self.size > 1

    def grad_allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Identity forward, all-reduce of the gradient over TP in backward.

        Wraps a *replicated* tensor (a parameter or a per-sample vector) that is consumed by
        rank-local data (head-sharded or sequence-sharded), so that each rank's partial gradient
        is summed into the full gradient right in autograd: no separate gradient-sync pass.
        """
        if self.size == 1:
            return tensor
        return copy_to_tp(tensor, self.group)

    def sp_replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        """`grad_allreduce` when the consumer is sequence-sharded (SP on), identity otherwise."""
        return self.grad_allreduce(tensor) if self.sequence_parallel else tensor


def tp_partition_dim(tensor: torch.Tensor) -> int | None:
    """The dim along which `tensor` is split over TP ranks, or None if it is replicated."""
    if getattr(tensor, "tensor_model_parallel", False):
        return int(tensor.partition_dim)
    return None


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim with a learnable weight; variance in fp32 (as the reference).

    Args:
        dim: normalised size. eps: added to the mean square.
        tp: when the norm runs on head-sharded data (QK-norm), its replicated weight gets a
            TP all-reduce of its gradient.
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, tp: TPContext | None = None):
        super().__init__()
        self.eps = eps
        self.weight = set_init_role(torch.nn.Parameter(torch.empty(dim, dtype=dtype)), InitRole.ONE)
        self.tp = tp

    def compute_weight(self) -> torch.Tensor:
        """The weight as the computation uses it (with its TP gradient all-reduce when head-sharded)."""
        return self.weight if self.tp is None else self.tp.grad_allreduce(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.compute_weight(), self.eps)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class TimestepEmbedder(torch.nn.Module):
    """σ in [0, 1] -> conditioning vector ``temb [b, hidden]``.

    A 256-d sinusoid of ``1000·σ`` (order [cos | sin], frequencies ``exp(-ln(1e4)·i/128)``), then
    Linear(256 -> hidden) -> SiLU -> Linear(hidden -> hidden), exactly as the reference.
    """

    FREQ_DIM = 256

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.linear_1 = declare_linear(torch.nn.Linear(self.FREQ_DIM, hidden_size, dtype=dtype), InitRole.NORMAL)
        self.linear_2 = declare_linear(torch.nn.Linear(hidden_size, hidden_size, dtype=dtype), InitRole.NORMAL)

    def sinusoid(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.FREQ_DIM // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
        freqs = torch.exp(exponent).to(sigma.dtype)
        angles = 1000.0 * (sigma[:, None].float() * freqs[None, :])
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        dtype = self.linear_1.weight.dtype
        proj = self.sinusoid(sigma.to(dtype)).to(dtype)
        return self.linear_2(F.silu(self.linear_1(proj)))
