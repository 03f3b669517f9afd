"""Shared fixtures: offline hub, tiny random diffusers transformers saved to disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory):
    """A tiny random diffusers transformer written with save_pretrained (what a user has on disk)."""
    path = tmp_path_factory.mktemp("tiny_diffusers")
    make_diffusers_transformer().save_pretrained(path)
    return path
