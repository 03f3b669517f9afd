"""One double-stream MMDiT block (docs/spec.md §1.3, §1.5 and §3), tensor-parallel.

Each stream (image, text) has its own AdaLN modulation, fused QKV projection, per-head QK RMSNorm,
attention output projection and MLP; the two streams meet in one joint attention over the
concatenated sequence, keys ordered ``[image; text]`` (see `JointKeys`).

Tensor parallelism (megatron-core layers):

* ``*_qkv``: column-parallel ``D -> 3D``, head-sharded. The fused weight is laid out per head,
  ``[heads, (q, k, v), head_dim]`` along its output dim, so a contiguous TP split hands each rank
  whole heads with their q, k and v, for any TP size.
* ``*_out``, ``*_fc2``: row-parallel (bias added after the reduction, fused into the residual).
* ``*_fc1``: column-parallel ``D -> 4D``.
* ``*_mod``: column-parallel ``D -> 6D`` on the per-sample ``temb`` with its ``[b, 6D]`` output
  gathered: the big modulation weights (a third of the model) are sharded, only the small
  per-sample result travels.

The last block (``context_only=True``) is the one whose text outputs never reach the loss: it
computes only the text keys and values (the image queries still attend to them). Its text query
projection and QK-norm, text output projection, text MLP and the 4·D unused rows of ``txt_mod``
are held as *buffers* (in the state dict, so a released checkpoint round-trips bit-exactly, but
not parameters: they get no gradient, need no reduction, and no ``find_unused_parameters``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_qwenimage.config import MMDiTConfig
from megatron_qwenimage.model.backends import JointKeys, KernelProvider
from megatron_qwenimage.model.elementwise import elementwise_ops
from megatron_qwenimage.model.layers import InitRole, RMSNorm, TPContext

RopeTables = tuple[torch.Tensor, torch.Tensor]


class StreamMLP(torch.nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``: column- then row-parallel; returns (output, fc2 bias)."""

    def __init__(self, config: MMDiTConfig, kernels: KernelProvider):
        super().__init__()
        d, f = config.hidden_size, config.ffn_hidden_size
        self.fc1 = kernels.column_parallel_linear(d, f, weight_init=InitRole.NORMAL)
        self.fc2 = kernels.row_parallel_linear(f, d, weight_init=InitRole.OUTPUT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.fc1(x)
        return self.fc2(F.gelu(h, approximate="tanh"))


class CarriedTextWeights(torch.nn.Module):
    """The last block's text-stream weights that cannot influence the output, held as buffers.

    Shapes are this TP rank's shards, split along the same dims as the layers they come from.
    """

    def __init__(self, config: MMDiTConfig, tp: TPContext):
        super().__init__()
        d, f, dt = config.hidden_size, config.ffn_hidden_size, config.torch_dtype
        t = tp.size
        normal, output, zero, one = InitRole.NORMAL, InitRole.OUTPUT, InitRole.ZERO, InitRole.ONE
        shapes = {
            # name: (local shape, TP partition dim, init role as in the layer it comes from)
            "q_weight": ((d // t, d), 0, normal),
            "q_bias": ((d // t,), 0, zero),
            "q_norm_weight": ((config.attention_head_dim,), None, one),
            "out_weight": ((d, d // t), 1, output),
            "out_bias": ((d,), None, zero),
            "fc1_weight": ((f // t, d), 0, normal),
            "fc1_bias": ((f // t,), 0, zero),
            "fc2_weight": ((d, f // t), 1, output),
            "fc2_bias": ((d,), None, zero),
            "mod_tail_weight": ((4 * d // t, d), 0, zero),
            "mod_tail_bias": ((4 * d // t,), 0, zero),
        }
        #: TP partition dim (None: replicated) and init role of each buffer; kept here rather than
        #: as tensor attributes because ``Module.to_empty`` / ``.to()`` replace buffer objects.
        self.partition_dims = {name: dim for name, (_, dim, _) in shapes.items()}
        self.buffer_init_roles = {name: role for name, (_, _, role) in shapes.items()}
        for name, (shape, _, _) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dt))


class MMDiTBlock(torch.nn.Module):
    """A double-stream block.

    Args:
        config: model config. kernels: the backend's layer provider (`kernel_provider`).
        tp: tensor-parallel context.
        context_only: True for the last block, whose text stream only feeds keys/values.
    """

    def __init__(
        self,
        config: MMDiTConfig,
        kernels: KernelProvider,
        tp: TPContext,
        *,
        context_only: bool = False,
    ):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.tp = tp
        self.context_only = context_only
        self.num_local_heads = config.num_attention_heads // tp.size
        self.head_dim = config.attention_head_dim
        self.eps = config.norm_eps
        dtype = config.torch_dtype

        self.img_mod = kernels.modulation_linear(d, 6 * d)
        self.img_qkv = kernels.column_parallel_linear(d, 3 * d, weight_init=InitRole.NORMAL)
        self.img_q_norm = RMSNorm(self.head_dim, self.eps, dtype, tp)
        self.img_k_norm = RMSNorm(self.head_dim, self.eps, dtype, tp)
        self.img_out = kernels.row_parallel_linear(d, d, weight_init=InitRole.OUTPUT)
        self.img_mlp = StreamMLP(config, kernels)

        if context_only:
            self.txt_mod = kernels.modulation_linear(d, 2 * d)  # shift1, scale1 only
            self.txt_kv = kernels.column_parallel_linear(d, 2 * d, weight_init=InitRole.NORMAL)
            self.txt_k_norm = RMSNorm(self.head_dim, self.eps, dtype, tp)
            self.carried = CarriedTextWeights(config, tp)
        else:
            self.txt_mod = kernels.modulation_linear(d, 6 * d)
            self.txt_qkv = kernels.column_parallel_linear(d, 3 * d, weight_init=InitRole.NORMAL)
            self.txt_q_norm = RMSNorm(self.head_dim, self.eps, dtype, tp)
            self.txt_k_norm = RMSNorm(self.head_dim, self.eps, dtype, tp)
            self.txt_out = kernels.row_parallel_linear(d, d, weight_init=InitRole.OUTPUT)
            self.txt_mlp = StreamMLP(config, kernels)
        self.attention = kernels.core_attention(self.num_local_heads, self.head_dim)
        #: LayerNorm+modulation, gated residuals, QK-norm+RoPE: eager or fused (config).
        self.ops = elementwise_ops(config.fused_elementwise)
        #: Selective activation recompute: keep only the inputs of the core attention and run it
        #: again in backward (set by `QwenImageMMDiT.configure_recompute`).
        self.recompute_core_attention = False

    def _attend(self, q, k, v, keys: JointKeys):
        if self.recompute_core_attention and torch.is_grad_enabled():
            return checkpoint(self.attention, q, k, v, keys, use_reentrant=False)
        return self.attention(q, k, v, keys)

    def _modulation(self, layer: torch.nn.Module, temb: torch.Tensor) -> list[torch.Tensor]:
        """``[b, h]`` temb -> list of ``[1, b, h]`` (shift, scale, gate, ...) vectors."""
        mod, _ = layer(F.silu(temb)[None])  # [1, b, k*h], gathered over TP
        return list(self.tp.sp_replicated(mod).chunk(mod.shape[-1] // self.config.hidden_size, dim=-1))

    def _heads(self, projected: torch.Tensor, parts: int) -> list[torch.Tensor]:
        """``[s, b, heads*parts*d]`` -> `parts` tensors ``[s, b, heads, d]``."""
        s, b, _ = projected.shape
        return list(projected.view(s, b, self.num_local_heads, parts, self.head_dim).unbind(dim=3))

    def _residual(self, x, out_and_bias, gate):
        """Gated residual ``x + gate * (out + bias)``; gate ``[1, b, h]``."""
        out, bias = out_and_bias
        return self.ops.gated_residual(x, out, None if bias is None else self.tp.sp_replicated(bias), gate)

    def _norm_modulate(self, x, shift, scale):
        """``LayerNorm(x) * (1 + scale) + shift``: the input of a stream's QKV or MLP."""
        return self.ops.ln_modulate(x, shift, scale, self.eps)

    def _qk(self, x, norm: RMSNorm, rotations):
        """Per-head RMSNorm then RoPE of ``[s, b, heads, d]`` queries or keys."""
        return self.ops.qk_norm_rope(x, norm.compute_weight(), norm.eps, rotations)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        rope: RopeTables,
        keys: JointKeys,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block.

        Args:
            img: image stream ``[n(/tp under SP), b, D]``. txt: text stream ``[t(/tp), b, D]``.
            temb: conditioning ``[b, D]``. rope: ``(txt_rotations, img_rotations)`` (complex) for
                the full (gathered) sequences. keys: the joint key order and mask (`JointKeys`).
        Returns:
            ``(img, txt)`` in the input layouts; ``txt`` is None after a context-only block.
        """
        txt_rot, img_rot = rope
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self._modulation(self.img_mod, temb)

        img_qkv, _ = self.img_qkv(self._norm_modulate(img, i_shift1, i_scale1))
        img_q, img_k, img_v = self._heads(img_qkv, 3)
        img_q = self._qk(img_q, self.img_q_norm, img_rot)
        img_k = self._qk(img_k, self.img_k_norm, img_rot)

        if self.context_only:
            t_shift1, t_scale1 = self._modulation(self.txt_mod, temb)
            txt_kv, _ = self.txt_kv(self._norm_modulate(txt, t_shift1, t_scale1))
            txt_k, txt_v = self._heads(txt_kv, 2)
            txt_k = self._qk(txt_k, self.txt_k_norm, txt_rot)
            attn = self._attend(img_q, keys.order(img_k, txt_k), keys.order(img_v, txt_v), keys)  # [n, b, D/tp]
            img = self._residual(img, self.img_out(attn), i_gate1)
            img = self._residual(img, self.img_mlp(self._norm_modulate(img, i_shift2, i_scale2)), i_gate2)
            return self._clip(img), None

        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self._modulation(self.txt_mod, temb)
        txt_qkv, _ = self.txt_qkv(self._norm_modulate(txt, t_shift1, t_scale1))
        txt_q, txt_k, txt_v = self._heads(txt_qkv, 3)
        txt_q = self._qk(txt_q, self.txt_q_norm, txt_rot)
        txt_k = self._qk(txt_k, self.txt_k_norm, txt_rot)

        n_img = img_q.shape[0]
        attn = self._attend(
            torch.cat([img_q, txt_q]), keys.order(img_k, txt_k), keys.order(img_v, txt_v), keys
        )  # [n + t, b, D/tp], queries in [image; text] order
        img_attn, txt_attn = attn[:n_img], attn[n_img:]

        img = self._residual(img, self.img_out(img_attn), i_gate1)
        txt = self._residual(txt, self.txt_out(txt_attn), t_gate1)
        img = self._residual(img, self.img_mlp(self._norm_modulate(img, i_shift2, i_scale2)), i_gate2)
        txt = self._residual(txt, self.txt_mlp(self._norm_modulate(txt, t_shift2, t_scale2)), t_gate2)
        return self._clip(img), self._clip(txt)

    @staticmethod
    def _clip(x: torch.Tensor) -> torch.Tensor:
        # The reference clamps fp16 activations after each block to stay finite.
        return x.clip(-65504, 65504) if x.dtype == torch.float16 else x
