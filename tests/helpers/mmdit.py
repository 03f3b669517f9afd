"""Inputs and gradient plumbing shared by the MMDiT parity and tensor-parallel tests."""

from __future__ import annotations

import os
import socket
from math import prod

import torch

from megatron_qwenimage.model.state_dict_names import to_diffusers_state

# name -> (batch, per-sample image shapes (target first), text length, valid text lengths or None);
# a negative length -k marks the *last* k tokens valid (left padding: the valid keys of the joint
# sequence are then not a prefix, which takes the kernels' general-mask path).
CASES = {
    "square": (2, [(1, 4, 4)], 6, None),
    "odd_nonsquare": (2, [(1, 3, 5)], 5, [5, 5]),
    "padded_text": (3, [(1, 5, 3)], 7, [7, 4, 2]),
    "edit_one_condition": (2, [(1, 3, 4), (1, 4, 3)], 6, [6, 3]),
    "edit_two_conditions": (2, [(1, 3, 3), (1, 4, 2), (1, 2, 5)], 5, [2, 5]),
    "left_padded_text": (2, [(1, 4, 3)], 6, [6, -3]),
}


def make_inputs(case: str, in_channels: int, text_dim: int, seed: int = 1) -> dict:
    """diffusers-layout forward kwargs for `case`, plus the loss weights under ``"loss_weights"``."""
    batch, shapes, text_len, valid = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    n_img = sum(prod(s) for s in shapes)
    mask = None
    if valid is not None:
        mask = torch.zeros(batch, text_len)
        for b, n in enumerate(valid):
            if n >= 0:
                mask[b, :n] = 1
            else:
                mask[b, n:] = 1
    return {
        "hidden_states": torch.randn(batch, n_img, in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_len, text_dim, generator=gen),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.rand(batch, generator=gen),
        "img_shapes": [list(shapes)] * batch,
        "loss_weights": torch.randn(batch, prod(shapes[0]), in_channels, generator=gen),
    }


def model_kwargs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "loss_weights"}


def full_grads(model) -> dict[str, torch.Tensor]:
    """Gradients of our model, TP-gathered, by canonical name (carried buffers: zeros)."""
    grads = {}
    for name, tensor in model.named_model_tensors():
        g = tensor.grad if isinstance(tensor, torch.nn.Parameter) else None
        g = torch.zeros_like(tensor) if g is None else g.detach()
        dim = model.partition_dims[name]
        if dim is not None and model.tp.size > 1:
            parts = [torch.empty_like(g) for _ in range(model.tp.size)]
            torch.distributed.all_gather(parts, g.contiguous(), group=model.tp.group)
            g = torch.cat(parts, dim=dim)
        grads[name] = g
    return grads


def diffusers_layout_grads(model) -> dict[str, torch.Tensor]:
    """Our gradients mapped onto diffusers' tensor names (fused QKV split back, etc.)."""
    return to_diffusers_state(full_grads(model), model.config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


TINY_DIFFUSERS_KWARGS = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=24,
    axes_dims_rope=(8, 4, 4),
)


def make_diffusers_transformer(seed: int = 0, **overrides):
    """A diffusers QwenImageTransformer2DModel with every tensor random (fp32).

    diffusers zero-initialises nothing here, but its default init leaves norms at exactly 1 and
    biases near 0; drawing everything makes each weight matter, so a mis-mapped tensor shows.
    """
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**TINY_DIFFUSERS_KWARGS, **overrides})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.5)
    return model
