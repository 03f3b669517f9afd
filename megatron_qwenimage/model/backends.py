"""Kernel backends: which linear and attention implementations the model is built from.

Two backends share one model code path and differ only in the modules created here:

* ``local``: megatron-core's ``tensor_parallel.ColumnParallelLinear`` / ``RowParallelLinear``
  (plain torch GEMMs, run everywhere including CPU + gloo) and torch SDPA attention.
* ``transformer_engine``: megatron-core's TE wrappers (``TEColumnParallelLinear`` /
  ``TERowParallelLinear``, FP8-capable under ``te.fp8_autocast``) and TE's fused
  ``DotProductAttention``. Transformer Engine is imported only when this backend is chosen.

Every linear returns ``(output, bias_or_None)`` as megatron-core's do; row-parallel layers are
always built with ``skip_bias_add=True`` so the block can fuse the bias into its gated residual.
AdaLN modulation linears run on one vector per sample (a GEMM with M = batch): they always use the
local column-parallel layer with its small output gathered, whatever the backend.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_qwenimage.config import ConfigError, MMDiTConfig


def transformer_engine_available() -> bool:
    """True when ``transformer_engine.pytorch`` can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def _no_init(_: torch.Tensor) -> None:
    """Weights are initialised by `QwenImageMMDiT.init_weights` (TP-invariant), not per layer."""


class ColumnLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear, plus a plain-GEMM path on a single TP rank.

    megatron-core 0.16.1 resolves the TP group of its mappings through
    ``get_tensor_model_parallel_group_if_none``, which yields None whenever torch.distributed is
    not initialised, so its layers cannot run in a plain single process (a notebook, an eval
    script). With one TP rank there is nothing to communicate: this computes ``x W^T + b`` directly.
    """

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.output_size_per_partition != self.output_size:
            return super().forward(input_, weight, runtime_gather_output)
        weight = self.weight if weight is None else weight
        bias = None if self.skip_bias_add else self.bias
        return F.linear(input_, weight, bias), (self.bias if self.skip_bias_add else None)


class RowLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear, plus a plain-GEMM path on a single TP rank (see
    `ColumnLinear`)."""

    def forward(self, input_):
        if self.input_size_per_partition != self.input_size:
            return super().forward(input_)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None


@dataclass
class ParallelLinearFactory:
    """Creates the tensor-parallel linears of one model.

    Args:
        config: the model config (backend, dtype, sequence parallelism).
        tp_group: the tensor-parallel process group (a `SingleRankGroup` on one rank).
    """

    config: MMDiTConfig
    tp_group: Any

    def __post_init__(self) -> None:
        common = dict(
            tensor_model_parallel_size=self.config.tensor_model_parallel_size,
            params_dtype=self.config.torch_dtype,
            use_cpu_initialization=True,
            perform_initialization=False,
        )
        if self.config.backend == "transformer_engine":
            if not transformer_engine_available():
                raise ConfigError(
                    "MMDiTConfig.backend='transformer_engine' but Transformer Engine is not installed "
                    "(pip install 'megatron-qwenimage[gpu]' on a CUDA machine), use backend='local'"
                )
            from megatron.core.transformer.transformer_config import TransformerConfig

            self.seq_config = TransformerConfig(
                num_layers=self.config.num_layers,
                hidden_size=self.config.hidden_size,
                num_attention_heads=self.config.num_attention_heads,
                sequence_parallel=self.config.sequence_parallel,
                use_cpu_initialization=False,
                perform_initialization=False,
                tensor_model_parallel_size=self.config.tensor_model_parallel_size,
                params_dtype=self.config.torch_dtype,
            )
        else:
            self.seq_config = ModelParallelConfig(sequence_parallel=self.config.sequence_parallel, **common)
        # Modulation inputs are per-sample vectors, never sequence-sharded.
        self.vector_config = ModelParallelConfig(sequence_parallel=False, **common)

    def column(self, input_size: int, output_size: int, *, bias: bool = True) -> torch.nn.Module:
        """Column-parallel linear on sequence data ``[s(/tp under SP), b, in] -> [s, b, out/tp]``."""
        if self.config.backend == "transformer_engine":
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

            return TEColumnParallelLinear(
                input_size,
                output_size,
                config=self.seq_config,
                init_method=_no_init,
                gather_output=False,
                bias=bias,
                skip_bias_add=False,
                is_expert=False,
                tp_group=self.tp_group,
            )
        return (
            ColumnLinear(
                input_size,
                output_size,
                config=self.seq_config,
                init_method=_no_init,
                bias=bias,
                gather_output=False,
                tp_group=self.tp_group,
            )
        )

    def row(self, input_size: int, output_size: int, *, bias: bool = True) -> torch.nn.Module:
        """Row-parallel linear ``[s, b, in/tp] -> [s(/tp under SP), b, out]``; bias returned apart."""
        if self.config.backend == "transformer_engine":
            from megatron.core.extensions.transformer_engine import TERowParallelLinear

            return TERowParallelLinear(
                input_size,
                output_size,
                config=self.seq_config,
                init_method=_no_init,
                bias=bias,
                input_is_parallel=True,
                skip_bias_add=True,
                is_expert=False,
                tp_group=self.tp_group,
            )
        return (
            RowLinear(
                input_size,
                output_size,
                config=self.seq_config,
                init_method=_no_init,
                bias=bias,
                input_is_parallel=True,
                skip_bias_add=True,
                tp_group=self.tp_group,
            )
        )

    def modulation(self, input_size: int, output_size: int) -> ColumnParallelLinear:
        """Column-parallel linear on per-sample vectors whose small output is gathered over TP."""
        return (
            ColumnLinear(
                input_size,
                output_size,
                config=self.vector_config,
                init_method=_no_init,
                bias=True,
                gather_output=self.tp_group.size() > 1,
                tp_group=self.tp_group,
            )
        )




class SDPAttention(torch.nn.Module):
    """Joint attention with torch SDPA on Megatron-layout tensors.

    Shapes: ``q [s_q, b, h, d]``, ``k, v [s_kv, b, h, d]``, ``key_mask [b, s_kv]`` bool (True = attend)
    or None; returns ``[s_q, b, h*d]``. Softmax scale ``1/sqrt(d)``, non-causal.
    """

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        s_q, b, h, d = q.shape
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask
        )
        return out.permute(2, 0, 1, 3).reshape(s_q, b, h * d)


class TEAttention(torch.nn.Module):
    """Joint attention with Transformer Engine's fused ``DotProductAttention`` (``sbhd`` layout)."""

    def __init__(self, num_local_heads: int, head_dim: int):
        super().__init__()
        import transformer_engine.pytorch as te

        self.core = te.DotProductAttention(
            num_attention_heads=num_local_heads,
            kv_channels=head_dim,
            attention_dropout=0.0,
            qkv_format="sbhd",
            attn_mask_type="padding",
            softmax_scale=1.0 / math.sqrt(head_dim),
        )

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        s_q, b, h, d = q.shape
        if key_mask is None:
            out = self.core(q, k, v, attn_mask_type="no_mask")
        else:
            # TE masks are True where attention is *not* allowed; queries are never masked here.
            q_masked = torch.zeros(b, 1, 1, s_q, dtype=torch.bool, device=q.device)
            kv_masked = ~key_mask[:, None, None, :]
            out = self.core(q, k, v, attention_mask=(q_masked, kv_masked), attn_mask_type="padding")
        return out.reshape(s_q, b, h * d)


def make_attention(config: MMDiTConfig, num_local_heads: int) -> torch.nn.Module:
    if config.backend == "transformer_engine":
        return TEAttention(num_local_heads, config.attention_head_dim)
    return SDPAttention()


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
