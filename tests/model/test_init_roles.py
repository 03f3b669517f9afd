"""Init roles: every tensor declares how it is initialised where its layer is built; names don't matter."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from megatron_qwenimage import QwenImageMMDiT, load_config
from megatron_qwenimage.model.block import MMDiTBlock
from megatron_qwenimage.model.layers import InitRole, declare_linear, init_role_of, set_init_role
from megatron_qwenimage.model.mmdit import INIT_STD


def _layouts():
    """A full model and pipeline pieces (the last holds the context-only block)."""
    cfg = load_config("tiny", num_layers=3)
    yield QwenImageMMDiT(cfg, init_seed=4)
    yield QwenImageMMDiT(cfg, post_process=False, layer_range=(0, 2), init_seed=4)
    yield QwenImageMMDiT(cfg, pre_process=False, layer_range=(2, 3), init_seed=4)


def _legacy_role(name: str, ndim: int) -> InitRole:
    """The name-matching rules `init_weights` used before roles were declared (the oracle that
    keeps today's models initialised bit-identically)."""
    if ndim == 1:
        return InitRole.ONE if ("norm" in name and "norm_out" not in name) else InitRole.ZERO
    leaf = name.rsplit(".", 1)[-1]
    if "_mod." in name or "norm_out." in name or "mod_tail" in leaf or name.startswith("proj_out."):
        return InitRole.ZERO
    if any(k in name for k in ("_out.", "fc2.", "out_weight", "fc2_weight")):
        return InitRole.OUTPUT
    return InitRole.NORMAL


def _normal_draw(model: QwenImageMMDiT, name: str, seed: int, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    tensor = dict(model.named_model_tensors())[name]
    full = torch.empty(model.full_shape(name, tensor), dtype=torch.float32).normal_(0.0, std, generator=gen)
    return model.shard_of(name, full).to(tensor.dtype)


def test_every_tensor_declares_the_role_it_always_had():
    for model in _layouts():
        tensors = dict(model.named_model_tensors())
        assert set(model.init_roles) == set(tensors)
        for name, tensor in tensors.items():
            role = model.init_roles[name]
            assert isinstance(role, InitRole), name
            assert role is _legacy_role(name, tensor.ndim), name
    roles = next(_layouts()).init_roles
    # A few by hand, the carried buffers included.
    assert roles["blocks.0.img_out.weight"] is InitRole.OUTPUT
    assert roles["blocks.0.img_mlp.fc2.weight"] is InitRole.OUTPUT
    assert roles["blocks.2.carried.fc2_weight"] is InitRole.OUTPUT
    assert roles["blocks.2.carried.mod_tail_weight"] is InitRole.ZERO
    assert roles["blocks.2.carried.q_norm_weight"] is InitRole.ONE
    assert roles["blocks.0.txt_mod.weight"] is InitRole.ZERO
    assert roles["norm_out.bias"] is InitRole.ZERO
    assert roles["proj_out.weight"] is InitRole.ZERO
    assert roles["txt_norm.weight"] is InitRole.ONE
    assert roles["blocks.1.img_qkv.weight"] is InitRole.NORMAL


def test_roles_map_to_their_values():
    seed, num_layers = 9, 3
    model = QwenImageMMDiT(load_config("tiny", num_layers=num_layers), init_seed=seed)
    out_std = INIT_STD / math.sqrt(2 * num_layers)
    seen = set()
    for name, tensor in model.named_model_tensors():
        role = model.init_roles[name]
        seen.add(role)
        if role is InitRole.ZERO:
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        elif role is InitRole.ONE:
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            std = INIT_STD if role is InitRole.NORMAL else out_std
            # Bit-exact: a generator per (seed, name), the full tensor drawn, then sharded.
            assert torch.equal(tensor, _normal_draw(model, name, seed, std)), name
    assert seen == set(InitRole)
    # Statistically, on tensors of 16k values (the std of a sample std is ~0.6 % here).
    fc1 = model.blocks["0"].img_mlp.fc1.weight
    fc2 = model.blocks["0"].img_mlp.fc2.weight
    assert fc1.numel() >= 16_000 and fc2.numel() >= 16_000
    assert fc1.std().item() == pytest.approx(INIT_STD, rel=0.05) and abs(fc1.mean().item()) < 1e-3
    assert fc2.std().item() == pytest.approx(out_std, rel=0.05) and abs(fc2.mean().item()) < 1e-3


def _renaming_block_init(renames: dict[str, str]):
    original = MMDiTBlock.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for old, new in renames.items():
            setattr(self, new, self._modules.pop(old))

    return init


def test_renaming_a_layer_keeps_its_role(monkeypatch):
    # New names chosen so that the old name matching would have got each of them wrong.
    renames = {
        "img_mod": "img_adaln",  # zero (adaLN), no "_mod." left in the name
        "img_qkv": "img_qkv_out",  # normal, though "_out." is now in the name
        "img_out": "img_attn_proj",  # output-scaled, no "_out." left
        "img_q_norm": "img_q_scale",  # ones, no "norm" left
    }
    monkeypatch.setattr(MMDiTBlock, "__init__", _renaming_block_init(renames))
    seed, num_layers = 5, 2
    model = QwenImageMMDiT(load_config("tiny", num_layers=num_layers), init_seed=seed)
    tensors = dict(model.named_model_tensors())
    expected = {
        "blocks.0.img_adaln.weight": InitRole.ZERO,
        "blocks.0.img_qkv_out.weight": InitRole.NORMAL,
        "blocks.0.img_attn_proj.weight": InitRole.OUTPUT,
        "blocks.0.img_q_scale.weight": InitRole.ONE,
    }
    for name, role in expected.items():
        assert model.init_roles[name] is role, name
        assert _legacy_role(name, tensors[name].ndim) is not role, name  # names would have misled
    assert torch.equal(tensors["blocks.0.img_adaln.weight"], torch.zeros_like(tensors["blocks.0.img_adaln.weight"]))
    assert torch.equal(tensors["blocks.0.img_q_scale.weight"], torch.ones_like(tensors["blocks.0.img_q_scale.weight"]))
    out_std = INIT_STD / math.sqrt(2 * num_layers)
    for name, std in (("blocks.0.img_qkv_out.weight", INIT_STD), ("blocks.0.img_attn_proj.weight", out_std)):
        assert torch.equal(tensors[name], _normal_draw(model, name, seed, std)), name


def test_a_tensor_without_role_makes_init_weights_raise(monkeypatch):
    original = MMDiTBlock.__init__

    def init_with_undeclared_layer(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.extra = torch.nn.Linear(4, 4)  # built without declare_linear

    monkeypatch.setattr(MMDiTBlock, "__init__", init_with_undeclared_layer)
    with pytest.raises(ValueError, match=r"blocks\.0\.extra\.weight.*blocks\.0\.extra\.bias"):
        QwenImageMMDiT(load_config("tiny"))
    # Built on meta (no init), the tensors are there with no role: init_weights refuses.
    with torch.device("meta"):
        model = QwenImageMMDiT(load_config("tiny"))
    assert model.init_roles["blocks.1.extra.weight"] is None
    model.to_empty(device="cpu")
    with pytest.raises(ValueError, match=r"blocks\.1\.extra\.weight"):
        model.init_weights(0)


def test_init_weights_checks_roles_before_changing_anything():
    model = QwenImageMMDiT(load_config("tiny"), init_seed=1)
    before = {n: t.clone() for n, t in model.named_model_tensors()}
    del model.init_roles["blocks.1.carried.fc1_weight"]
    with pytest.raises(ValueError, match=r"blocks\.1\.carried\.fc1_weight"):
        model.init_weights(2)
    assert all(torch.equal(t, before[n]) for n, t in model.named_model_tensors())


def test_roles_survive_meta_construction_and_to_empty():
    cfg = load_config("tiny")
    with torch.device("meta"):
        model = QwenImageMMDiT(cfg)
    model.to_empty(device="cpu")
    model.init_weights(6)
    want = QwenImageMMDiT(cfg, init_seed=6)
    got = dict(model.named_model_tensors())
    for name, tensor in want.named_model_tensors():
        assert torch.equal(got[name], tensor), name


def test_role_helpers():
    weight = torch.nn.Parameter(torch.empty(3, 3))
    assert init_role_of(weight) is None
    assert set_init_role(weight, InitRole.OUTPUT) is weight and init_role_of(weight) is InitRole.OUTPUT
    with pytest.raises(TypeError, match="InitRole"):
        set_init_role(weight, "zero")
    linear = declare_linear(torch.nn.Linear(3, 3), InitRole.NORMAL)
    assert init_role_of(linear.weight) is InitRole.NORMAL and init_role_of(linear.bias) is InitRole.ZERO
    no_bias = declare_linear(torch.nn.Linear(3, 3, bias=False), InitRole.ONE)
    assert init_role_of(no_bias.weight) is InitRole.ONE
