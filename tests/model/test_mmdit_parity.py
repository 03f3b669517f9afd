"""Numerical parity of QwenImageMMDiT with diffusers' QwenImageTransformer2DModel (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from megatron_qwenimage.convert import load_diffusers
from tests.helpers.mmdit import CASES, diffusers_layout_grads, make_inputs, model_kwargs


@pytest.fixture(scope="module")
def models(tiny_diffusers_dir):
    from diffusers import QwenImageTransformer2DModel

    reference = QwenImageTransformer2DModel.from_pretrained(tiny_diffusers_dir)
    ours = load_diffusers(tiny_diffusers_dir)
    return reference, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_gradients_match_diffusers(models, case):
    reference, ours = models
    reference.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    cfg = ours.config
    inputs = make_inputs(case, cfg.in_channels, cfg.joint_attention_dim)
    weights = inputs["loss_weights"]
    n_target = weights.shape[1]

    expected = reference(**model_kwargs(inputs), return_dict=False)[0][:, :n_target]
    got = ours(**model_kwargs(inputs))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5

    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    ours_grads = diffusers_layout_grads(ours)
    checked = 0
    for name, param in reference.named_parameters():
        ref_grad = param.grad if param.grad is not None else torch.zeros_like(param)
        scale = ref_grad.abs().max().item()
        err = (ours_grads[name] - ref_grad).abs().max().item()
        if scale == 0.0:
            # Weights the output cannot depend on: the last block's text MLP/output, unused rows.
            assert err == 0.0, name
            continue
        assert err / scale <= 1e-4, f"{name}: relative gradient error {err / scale:.2e}"
        checked += 1
    assert checked > 0.8 * len(list(reference.parameters()))


def test_last_block_unused_text_weights_are_buffers(models):
    """The last block holds what cannot reach the loss as buffers, so no parameter lacks a grad."""
    reference, ours = models
    ours.zero_grad(set_to_none=True)
    inputs = make_inputs("padded_text", ours.config.in_channels, ours.config.joint_attention_dim)
    (ours(**model_kwargs(inputs)) * inputs["loss_weights"]).sum().backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None]
    assert missing == []
    last = ours.blocks[str(ours.config.num_layers - 1)]
    assert set(dict(last.carried.named_buffers())) == {
        "q_weight",
        "q_bias",
        "q_norm_weight",
        "out_weight",
        "out_bias",
        "fc1_weight",
        "fc1_bias",
        "fc2_weight",
        "fc2_bias",
        "mod_tail_weight",
        "mod_tail_bias",
    }
    counts = ours.num_parameters()
    assert counts["total"] == sum(p.numel() for p in reference.parameters())


def test_per_sample_layouts_in_one_batch(models):
    """Samples with different grids but equal token counts (4x6 and 6x4) each match a batch of one."""
    _, ours = models
    cfg = ours.config
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, cfg.in_channels, generator=gen)
    txt = torch.randn(2, 4, cfg.joint_attention_dim, generator=gen)
    sigma = torch.tensor([0.2, 0.7])
    shapes = [[(1, 4, 6)], [(1, 6, 4)]]
    with torch.no_grad():
        both = ours(hidden_states=x, encoder_hidden_states=txt, timestep=sigma, img_shapes=shapes)
        for b in range(2):
            one = ours(
                hidden_states=x[b : b + 1],
                encoder_hidden_states=txt[b : b + 1],
                timestep=sigma[b : b + 1],
                img_shapes=[shapes[b]],
            )
            assert (both[b] - one[0]).abs().max().item() <= 1e-5


def test_return_dict_forms(models):
    _, ours = models
    inputs = model_kwargs(make_inputs("square", ours.config.in_channels, ours.config.joint_attention_dim))
    with torch.no_grad():
        plain = ours(**inputs)
        (as_tuple,) = ours(**inputs, return_dict=False)
        as_output = ours(**inputs, return_dict=True).sample
    assert torch.equal(plain, as_tuple) and torch.equal(plain, as_output)
