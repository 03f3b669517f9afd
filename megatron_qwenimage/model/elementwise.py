"""The blocks' elementwise chains, eager or fused by ``torch.compile``.

Between its GEMMs and its attention an MMDiT block runs a dozen memory-bound chains: LayerNorm
then AdaLN modulation, the gated residual ``x + gate * (out + bias)``, and per head RMSNorm then
rotary embedding on queries and keys. In eager mode each is several kernels, each a full pass
over ``[s, b, D]`` activations (forward and backward); on an H200 they cost about as much as the
attention itself. `ElementwiseOps` holds one implementation of each chain as a pure function of
tensors; with ``MMDiTConfig.fused_elementwise`` the functions are wrapped in ``torch.compile``
(regional compilation, as Megatron-Bridge's AdaLN ``jit_fuser`` does), so Inductor emits one
fused kernel per chain and its backward, while GEMMs and attention stay in the backend's kernels
(Transformer Engine's are not traceable anyway). The math is the same in both modes; the fused
RoPE uses the real form of the complex product the eager path computes.

Shapes: sequence tensors ``[s, b, h]``; per-sample vectors ``[1, b, h]``; heads ``[s, b, n, d]``;
rotations ``[s, b|1, 1, d/2]`` complex64.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron_qwenimage.model.rope import apply_rope


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm without affine parameters)."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)


def gated_residual(x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate * (out + bias)``; bias ``[h]`` or None, gate ``[1, b, h]``."""
    if bias is not None:
        out = out + bias
    return torch.addcmul(x, gate, out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, variance in fp32; the result in the weight's dtype when that is
    half precision (as the reference)."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def rope_real(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in real arithmetic (Inductor has no complex kernels); ``cos_sin [s, b|1, 1, d/2, 2]``."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    xr, xi = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos_sin: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm then RoPE of queries or keys ``[s, b, n, d]``."""
    return rope_real(rms_norm(x, weight, eps), cos_sin)


class ElementwiseOps:
    """The block's elementwise chains, eager (``fused=False``) or compiled into fused kernels.

    Args:
        fused: wrap each chain in ``torch.compile`` (one compilation per chain and input shape;
            Inductor turns a second shape into a dynamic kernel).
    """

    def __init__(self, fused: bool):
        self.fused = fused
        if fused:
            compile = torch.compile
            self.ln_modulate = compile(ln_modulate, fullgraph=True)
            self.gated_residual = compile(gated_residual, fullgraph=True)
            self._qk_norm_rope = compile(qk_norm_rope, fullgraph=True)
        else:
            self.ln_modulate = ln_modulate
            self.gated_residual = gated_residual

    def qk_norm_rope(self, x: torch.Tensor, weight: torch.Tensor, eps: float, rotations: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm then RoPE; `rotations` complex ``[s, b|1, 1, d/2]``."""
        if self.fused:
            return self._qk_norm_rope(x, weight, eps, torch.view_as_real(rotations))
        return apply_rope(rms_norm(x, weight, eps), rotations)


@functools.lru_cache(maxsize=None)
def elementwise_ops(fused: bool) -> ElementwiseOps:
    """The process's one `ElementwiseOps` per mode (compiled functions are shared by all blocks)."""
    return ElementwiseOps(fused)
