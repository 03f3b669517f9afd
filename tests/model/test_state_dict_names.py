"""The rules table of `megatron_qwenimage.model.state_dict_names` agrees with the model it names."""

from __future__ import annotations

import pytest
import torch

from megatron_qwenimage import QwenImageMMDiT, load_config
from megatron_qwenimage.model.state_dict_names import (
    DIFFUSERS,
    NATIVE,
    checkpoint_rules,
    diffusers_rules,
    diffusers_shapes,
    fuse_heads,
    native_shapes,
    split_heads,
)


@pytest.mark.parametrize("name", ["tiny", "qwen-image-20b"])
def test_rules_name_every_model_tensor_with_its_tp_dim_shape_and_role(name):
    config = load_config(name)
    with torch.device("meta"):
        model = QwenImageMMDiT(config)
    tensors = dict(model.named_model_tensors())
    params = dict(model.named_parameters())
    rules = diffusers_rules(config)
    shapes = native_shapes(config)
    assert [r.ours for r in rules] == list(dict.fromkeys(r.ours for r in rules))  # no name twice
    assert {r.ours for r in rules} == set(tensors) == set(shapes)
    for rule in rules:
        assert rule.dim == model.partition_dims[rule.ours], rule
        assert rule.carried == (rule.ours not in params), rule
        assert tuple(tensors[rule.ours].shape) == shapes[rule.ours], rule
    # Every diffusers tensor feeds some tensor of ours.
    assert {s for r in rules for s in r.sources} == set(diffusers_shapes(config))


def test_stage_rules_are_the_stage_tensors_in_both_schemes():
    config = load_config("tiny")
    pieces = dict(pre_process=False, post_process=True, layer_range=(1, config.num_layers))
    with torch.device("meta"):
        stage = QwenImageMMDiT(config, **pieces)
    for scheme in (DIFFUSERS, NATIVE):
        assert {r.ours for r in checkpoint_rules(scheme, config, **pieces)} == set(dict(stage.named_model_tensors()))
    assert all(r.sources == (r.ours,) and not r.rows and not r.fuse_heads for r in checkpoint_rules(NATIVE, config))


def test_split_heads_inverts_fuse_heads():
    q, k, v = (torch.randn(4 * 8, 5) for _ in range(3))
    fused = fuse_heads([q, k, v], head_dim=8)
    assert torch.equal(fused.reshape(4, 3, 8, 5)[2, 1], k[16:24])
    assert all(torch.equal(a, b) for a, b in zip(split_heads(fused, 3, 8), (q, k, v)))
