"""Kernel backends: which linear and attention implementations the model is built from.

Two backends share one model code path and differ only in the modules their *provider* builds
(megatron-core's ``LocalSpecProvider`` / ``TESpecProvider`` shape). `kernel_provider` reads
``MMDiTConfig.backend`` once, when the model is built, and returns one of:

* `LocalProvider` (``local``): megatron-core's ``tensor_parallel.ColumnParallelLinear`` /
  ``RowParallelLinear`` (`ColumnLinear` / `RowLinear`: plain torch GEMMs, run everywhere
  including CPU + gloo) and torch SDPA attention (`SDPAttention`).
* `TransformerEngineProvider` (``transformer_engine``): megatron-core's TE wrappers
  (``TEColumnParallelLinear`` / ``TERowParallelLinear``, FP8-capable under ``te.fp8_autocast``)
  and TE's fused ``DotProductAttention`` (`TEAttention`). Transformer Engine is imported only
  when this provider is built.

Each provider has ``column_parallel_linear``, ``row_parallel_linear``, ``modulation_linear`` and
``core_attention``; the model and its blocks only call these, never look at the backend. Every
linear built here declares its init role (`InitRole`, used by `QwenImageMMDiT.init_weights`).

Every linear returns ``(output, bias_or_None)`` as megatron-core's do. Local row-parallel layers
add their bias themselves (returning None); TE's return it apart (``skip_bias_add``) and the block
adds it, with the gradient all-reduce that sequence parallelism needs.
AdaLN modulation linears run on one vector per sample (a GEMM with M = batch): they always use the
local column-parallel layer with its small output gathered, whatever the backend.
"""

from __future__ import annotations

import abc
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megatron_qwenimage.config import ConfigError, MMDiTConfig
from megatron_qwenimage.model.layers import InitRole, SingleRankGroup, declare_linear
from megatron_qwenimage.model.mappings import (
    copy_to_tp,
    gather_from_seq,
    gather_last_dim,
    reduce_from_tp,
    reduce_scatter_to_seq,
)


def transformer_engine_available() -> bool:
    """True when ``transformer_engine.pytorch`` can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def _no_init(_: torch.Tensor) -> None:
    """Weights are initialised by `QwenImageMMDiT.init_weights` (TP-invariant), not per layer."""


class ColumnLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear with device-agnostic communication.

    megatron-core holds the sharded weight and its TP metadata (``partition_dim``,
    ``sharded_state_dict``); the forward does its communication with `mappings` (megatron-core
    0.16.1's own allocate on ``torch.cuda.current_device()`` and resolve the group to None when
    torch.distributed is not initialised, so they run neither on CPU + gloo nor in a plain single
    process). Semantics are megatron's:

    * input ``[s, b, in]`` replicated (gradient all-reduced), or ``[s/tp, b, in]`` all-gathered
      along the sequence when `sequence_parallel` (gradient reduce-scattered);
    * output ``[s, b, out/tp]``, or ``[s, b, out]`` gathered when `gather_output`.
    """

    def __init__(self, input_size, output_size, *, sequence_parallel: bool, gather_output: bool, **kwargs):
        super().__init__(input_size, output_size, gather_output=False, **kwargs)
        # megatron-core marks the weight's split only when it initialises it; we initialise later.
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        self.group = kwargs["tp_group"]
        self.sequence_parallel = sequence_parallel and self.group.size() > 1
        self.gather_output = gather_output

    def forward(self, input_: torch.Tensor):
        if self.sequence_parallel:
            input_ = gather_from_seq(input_, self.group)
        else:
            input_ = copy_to_tp(input_, self.group)
        output = F.linear(input_, self.weight, None if self.skip_bias_add else self.bias)
        if self.gather_output:
            output = gather_last_dim(output, self.group)
        return output, (self.bias if self.skip_bias_add else None)


class RowLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear with device-agnostic communication (see `ColumnLinear`).

    Input ``[s, b, in/tp]``; output ``[s, b, out]`` all-reduced, or ``[s/tp, b, out]``
    reduce-scattered along the sequence when `sequence_parallel`. The bias is added here, once,
    after the reduction (inside the GEMM on a single rank); under sequence parallelism its
    gradient is all-reduced over TP in autograd since each rank adds it to its own tokens only.
    Returns ``(output, None)``.
    """

    def __init__(self, input_size, output_size, *, sequence_parallel: bool, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=1, stride=1)
        self.group = kwargs["tp_group"]
        self.sequence_parallel = sequence_parallel and self.group.size() > 1

    def forward(self, input_: torch.Tensor):
        if self.group.size() == 1:
            return F.linear(input_, self.weight, self.bias), None
        output = F.linear(input_, self.weight)
        if self.sequence_parallel:
            output = reduce_scatter_to_seq(output, self.group)
            bias = copy_to_tp(self.bias, self.group) if self.bias is not None else None
        else:
            output = reduce_from_tp(output, self.group)
            bias = self.bias
        return (output if bias is None else output + bias), None


@dataclass
class JointKeys:
    """Which keys of the joint attention each sample may attend to.

    The blocks build their joint keys/values in the order ``[image (n); text (t); sequence-parallel
    pad rows]`` (attention is invariant to key order once RoPE and QK-norm are applied per
    token). Text padding sits at the tail of the text (captions are right-padded), so the valid
    keys of sample ``i`` are the *prefix* of length ``n + len_i``: Transformer Engine takes that
    as its ``padding`` mask type with per-sample lengths (``cu_seqlens``) and stays on its fused
    kernels, where a mask in the middle of the sequence forces its unfused ``arbitrary`` path.
    Queries are never masked (padded text rows get ordinary outputs, as in diffusers).

    Built once per forward by `QwenImageMMDiT.run_blocks` and shared by every block.

    Attributes:
        image_tokens: ``n``, the valid image rows at the head of the image stream (the rest of
            a gathered image stream, if any, is sequence-parallel padding).
        key_mask: ``[b, s_kv]`` bool (True = attend) in the joint key order, or None when every
            key is valid.
        kv_lengths: ``[b]`` int32 valid-prefix length per sample, or None when the valid keys
            are not a prefix (a text mask with holes or left padding; TE then takes its
            ``arbitrary`` mask) or when there is no mask.
    """

    image_tokens: int
    key_mask: torch.Tensor | None = None
    kv_lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._cu_seqlens: dict[tuple[str, int], torch.Tensor] = {}

    def order(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Joint key/value tensor ``[s_kv, b, h, d]`` from ``img [n(+pad), ...]``, ``txt [t(+pad), ...]``."""
        n = self.image_tokens
        if img.shape[0] == n:
            return torch.cat([img, txt])
        return torch.cat([img[:n], txt, img[n:]])

    def cu_seqlens_q(self, s_q: int, batch: int, device: torch.device) -> torch.Tensor:
        """``[b + 1]`` int32 cumulative query lengths: every query row is valid."""
        key = ("q", s_q)
        if key not in self._cu_seqlens:
            self._cu_seqlens[key] = torch.arange(0, (batch + 1) * s_q, s_q, dtype=torch.int32, device=device)
        return self._cu_seqlens[key]

    def cu_seqlens_kv(self) -> torch.Tensor:
        """``[b + 1]`` int32 cumulative valid-key lengths (needs `kv_lengths`)."""
        key = ("kv", 0)
        if key not in self._cu_seqlens:
            lengths = self.kv_lengths
            self._cu_seqlens[key] = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=torch.int32)]).to(
                torch.int32
            )
        return self._cu_seqlens[key]


class SDPAttention(torch.nn.Module):
    """Joint attention with torch SDPA on Megatron-layout tensors.

    Shapes: ``q [s_q, b, h, d]``, ``k, v [s_kv, b, h, d]`` (keys in `JointKeys` order); returns
    ``[s_q, b, h*d]``. Softmax scale ``1/sqrt(d)``, non-causal; masked keys from ``keys.key_mask``.
    """

    def forward(self, q, k, v, keys: JointKeys) -> torch.Tensor:
        s_q, b, h, d = q.shape
        mask = None if keys.key_mask is None else keys.key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask
        )
        return out.permute(2, 0, 1, 3).reshape(s_q, b, h * d)


class TEAttention(torch.nn.Module):
    """Joint attention with Transformer Engine's ``DotProductAttention`` (``sbhd`` layout).

    * no padded keys: ``no_mask`` (fused kernels);
    * padded keys that form a suffix (`JointKeys.kv_lengths`): the ``padding`` mask type with
      ``cu_seqlens_q`` (all queries valid) and ``cu_seqlens_kv`` (valid keys per sample), which
      TE's fused (cuDNN) and flash kernels take. ``attention_type="cross"`` keeps the query and
      key lengths apart (TE's "self" type would reuse the key lengths for the queries);
    * any other mask: ``arbitrary`` ``[b, 1, s_q, s_kv]`` (True = not allowed, TE's convention),
      which only TE's unfused kernel runs.
    """

    def __init__(self, num_local_heads: int, head_dim: int):
        super().__init__()
        import transformer_engine.pytorch as te

        self.core = te.DotProductAttention(
            num_attention_heads=num_local_heads,
            kv_channels=head_dim,
            attention_dropout=0.0,
            qkv_format="sbhd",
            attn_mask_type="no_mask",
            attention_type="cross",
            softmax_scale=1.0 / math.sqrt(head_dim),
        )

    def forward(self, q, k, v, keys: JointKeys) -> torch.Tensor:
        s_q, b, h, d = q.shape
        if keys.key_mask is None:
            out = self.core(q, k, v, attn_mask_type="no_mask")
        elif keys.kv_lengths is not None:
            out = self.core(
                q,
                k,
                v,
                attn_mask_type="padding",
                cu_seqlens_q=keys.cu_seqlens_q(s_q, b, q.device),
                cu_seqlens_kv=keys.cu_seqlens_kv(),
                max_seqlen_q=s_q,
                max_seqlen_kv=k.shape[0],
            )
        else:
            masked = (~keys.key_mask)[:, None, None, :].expand(b, 1, s_q, keys.key_mask.shape[1])
            out = self.core(q, k, v, attention_mask=masked, attn_mask_type="arbitrary")
        return out.reshape(s_q, b, h * d)


class KernelProvider(abc.ABC):
    """What one backend builds the model's layers from (megatron-core's ``BackendSpecProvider``
    shape); chosen once per model by `kernel_provider`.

    Every linear declares its init role (`InitRole`) as it is built: the weight's is given by
    the caller, the bias is ``ZERO``.

    Args:
        config: the model config (dtype, TP size, sequence parallelism).
        tp_group: the tensor-parallel process group (a `SingleRankGroup` on one rank).
    """

    #: The `MMDiTConfig.backend` value this provider implements.
    name: str = ""

    def __init__(self, config: MMDiTConfig, tp_group: Any):
        self.config = config
        self.tp_group = tp_group
        # The local layers do their own (sequence-parallel aware) communication; megatron-core
        # only builds their sharded parameters.
        self.local_config = ModelParallelConfig(
            sequence_parallel=False,
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            params_dtype=config.torch_dtype,
            use_cpu_initialization=True,
            perform_initialization=False,
        )

    @abc.abstractmethod
    def column_parallel_linear(
        self, input_size: int, output_size: int, *, weight_init: InitRole, bias: bool = True
    ) -> torch.nn.Module:
        """Column-parallel linear on sequence data ``[s(/tp under SP), b, in] -> [s, b, out/tp]``."""
        raise NotImplementedError

    @abc.abstractmethod
    def row_parallel_linear(
        self, input_size: int, output_size: int, *, weight_init: InitRole, bias: bool = True
    ) -> torch.nn.Module:
        """Row-parallel linear ``[s, b, in/tp] -> [s(/tp under SP), b, out]``; bias returned apart."""
        raise NotImplementedError

    @abc.abstractmethod
    def core_attention(self, num_local_heads: int, head_dim: int) -> torch.nn.Module:
        """Joint attention ``(q, k, v, keys: JointKeys) -> [s_q, b, heads·head_dim]``."""
        raise NotImplementedError

    def modulation_linear(self, input_size: int, output_size: int) -> ColumnLinear:
        """AdaLN modulation: a column-parallel linear on per-sample vectors whose small output is
        gathered over TP; the local layer whatever the backend (a GEMM with M = batch). Weight
        and bias are declared ``ZERO`` (adaLN-Zero)."""
        layer = ColumnLinear(
            input_size,
            output_size,
            sequence_parallel=False,
            gather_output=True,
            config=self.local_config,
            init_method=_no_init,
            bias=True,
            tp_group=self.tp_group,
        )
        return declare_linear(layer, InitRole.ZERO)


class LocalProvider(KernelProvider):
    """megatron-core's local parallel linears (`ColumnLinear` / `RowLinear`) and torch SDPA."""

    name = "local"

    def column_parallel_linear(
        self, input_size: int, output_size: int, *, weight_init: InitRole, bias: bool = True
    ) -> ColumnLinear:
        layer = ColumnLinear(
            input_size,
            output_size,
            sequence_parallel=self.config.sequence_parallel,
            gather_output=False,
            config=self.local_config,
            init_method=_no_init,
            bias=bias,
            tp_group=self.tp_group,
        )
        return declare_linear(layer, weight_init)

    def row_parallel_linear(
        self, input_size: int, output_size: int, *, weight_init: InitRole, bias: bool = True
    ) -> RowLinear:
        layer = RowLinear(
            input_size,
            output_size,
            sequence_parallel=self.config.sequence_parallel,
            config=self.local_config,
            init_method=_no_init,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.tp_group,
        )
        return declare_linear(layer, weight_init)

    def core_attention(self, num_local_heads: int, head_dim: int) -> SDPAttention:
        return SDPAttention()


class TransformerEngineProvider(KernelProvider):
    """megatron-core's TE linears (``TEColumnParallelLinear`` / ``TERowParallelLinear``) and TE's
    ``DotProductAttention`` (`TEAttention`). Transformer Engine is imported when this is built."""

    name = "transformer_engine"

    def __init__(self, config: MMDiTConfig, tp_group: Any):
        super().__init__(config, tp_group)
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )
        from megatron.core.transformer.transformer_config import TransformerConfig

        self._column_cls, self._row_cls = TEColumnParallelLinear, TERowParallelLinear
        self.te_config = TransformerConfig(
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            sequence_parallel=config.sequence_parallel,
            use_cpu_initialization=False,
            perform_initialization=False,
            tensor_model_parallel_size=config.tensor_model_parallel_size,
            params_dtype=config.torch_dtype,
        )
        # Transformer Engine hands the group to torch.distributed; one rank is "no group" there.
        self.te_group = None if isinstance(tp_group, SingleRankGroup) else tp_group

    def _te_linear(
        self, cls: type, input_size: int, output_size: int, weight_init: InitRole, bias: bool, **kwargs: Any
    ) -> torch.nn.Module:
        """A dense (not expert) TE linear `cls` on this provider's config and TP group, left
        uninitialised, its init role `weight_init` declared; `kwargs` are `cls`'s own options."""
        layer = cls(
            input_size,
            output_size,
            config=self.te_config,
            init_method=_no_init,
            bias=bias,
            is_expert=False,
            tp_group=self.te_group,
            **kwargs,
        )
        return declare_linear(layer, weight_init)

    def column_parallel_linear(
        self, input_size: int, output_size: int, *, weight_init: InitRole, bias: bool = True
    ) -> torch.nn.Module:
        return self._te_linear(
            self._column_cls, input_size, output_size, weight_init, bias, gather_output=False, skip_bias_add=False
        )

    def row_parallel_linear(
        self, input_size: int, output_size: int, *, weight_init: InitRole, bias: bool = True
    ) -> torch.nn.Module:
        return self._te_linear(
            self._row_cls, input_size, output_size, weight_init, bias, input_is_parallel=True, skip_bias_add=True
        )

    def core_attention(self, num_local_heads: int, head_dim: int) -> TEAttention:
        return TEAttention(num_local_heads, head_dim)


PROVIDERS: dict[str, type[KernelProvider]] = {
    LocalProvider.name: LocalProvider,
    TransformerEngineProvider.name: TransformerEngineProvider,
}


def kernel_provider(config: MMDiTConfig, tp_group: Any) -> KernelProvider:
    """The provider of `config.backend` (the one place the backend is read).

    Raises:
        ConfigError: ``transformer_engine`` is chosen but Transformer Engine is not installed.
    """
    backend = config.backend
    if backend not in PROVIDERS:
        raise ConfigError(f"MMDiTConfig.backend={backend!r}: expected one of {tuple(PROVIDERS)}")
    if backend == TransformerEngineProvider.name and not transformer_engine_available():
        raise ConfigError(
            "MMDiTConfig.backend='transformer_engine' but Transformer Engine is not installed "
            "(pip install 'megatron-qwenimage[gpu]' on a CUDA machine), use backend='local'"
        )
    return PROVIDERS[backend](config, tp_group)
