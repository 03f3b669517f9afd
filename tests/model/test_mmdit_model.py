"""Model construction: the 20B count on meta, stage composition, configs and input errors."""

from __future__ import annotations

import pytest
import torch

from megatron_qwenimage import ConfigError, MMDiTConfig, QwenImageMMDiT, load_config
from megatron_qwenimage.convert import load_diffusers
from megatron_qwenimage.model.backends import transformer_engine_available
from tests.helpers.mmdit import make_inputs, model_kwargs


def test_qwen_image_20b_parameter_count_on_meta():
    with torch.device("meta"):
        model = QwenImageMMDiT(load_config("qwen-image-20b"))
    assert all(t.device.type == "meta" for _, t in model.named_model_tensors())
    counts = model.num_parameters()
    assert counts["total"] == 20_430_401_088
    # The last block's text query/QK-norm, output projection, MLP and 4D rows of txt_mod.
    d, f = 3072, 4 * 3072
    unused = 2 * (d * d + d) + 128 + (2 * d * f + f + d) + (4 * d * d + 4 * d)
    assert counts["carried"] == unused == 132_154_496
    assert counts["trainable"] == 20_430_401_088 - unused


def test_meta_20b_at_tp4_holds_a_quarter_of_the_sharded_weights():
    # A TP group of one rank cannot hold TP=4 shards: the size must match the group.
    with pytest.raises(ConfigError, match="tensor-parallel group has 1 ranks"):
        QwenImageMMDiT(load_config("qwen-image-20b", tensor_model_parallel_size=4))


def test_pipeline_stages_compose_to_the_full_model(tiny_diffusers_dir):
    full = load_diffusers(tiny_diffusers_dir)
    first = load_diffusers(tiny_diffusers_dir, post_process=False, layer_range=(0, 2))
    last = load_diffusers(tiny_diffusers_dir, pre_process=False, layer_range=(2, 3))
    assert set(dict(first.named_parameters())) | set(dict(last.named_parameters())) == set(
        dict(full.named_parameters())
    )
    inputs = make_inputs("edit_one_condition", 16, 24)
    shapes, mask, n_target = full.check_inputs(
        inputs["hidden_states"],
        inputs["encoder_hidden_states"],
        inputs["encoder_hidden_states_mask"],
        inputs["timestep"],
        inputs["img_shapes"],
    )
    with torch.no_grad():
        img, txt, temb = first.embed(
            inputs["hidden_states"].transpose(0, 1), inputs["encoder_hidden_states"].transpose(0, 1), inputs["timestep"]
        )
        img, txt = first.run_blocks(img, txt, temb, shapes, mask)
        assert txt is not None
        img, txt = last.run_blocks(img, txt, temb, shapes, mask)
        assert txt is None  # the last block consumes the text stream
        staged = last.head(img, temb, n_target).transpose(0, 1)
        whole = full(**model_kwargs(inputs))
    assert torch.equal(staged, whole)
    with pytest.raises(RuntimeError, match="pipeline stage"):
        first(**model_kwargs(inputs))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_attention_heads": 6, "attention_head_dim": 16, "tensor_model_parallel_size": 4}, "not divisible"),
        ({"axes_dims_rope": (8, 4, 2)}, "sums to 14"),
        ({"in_channels": 12}, "in_channels=12"),
        ({"backend": "cuda"}, "backend='cuda'"),
        ({"params_dtype": "int8"}, "params_dtype='int8'"),
        ({"num_layers": 0}, "num_layers=0"),
        ({"max_text_tokens": 4096}, "at most 1024"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", **overrides)


def test_config_loading_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model config 'qwen-image-7b'"):
        load_config("qwen-image-7b")
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nhidden: 64\n")
    with pytest.raises(ConfigError, match=r"unknown MMDiTConfig field\(s\) \['hidden'\]"):
        load_config(bad)
    nested = tmp_path / "run.yaml"
    nested.write_text(
        "model:\n  num_layers: 2\n  num_attention_heads: 2\n  attention_head_dim: 16\n"
        "  joint_attention_dim: 8\n  in_channels: 16\n  out_channels: 4\n  axes_dims_rope: [8, 4, 4]\n"
    )
    cfg = load_config(nested)
    assert isinstance(cfg, MMDiTConfig) and cfg.hidden_size == 32 and cfg.axes_dims_rope == (8, 4, 4)


def test_transformer_engine_backend_needs_transformer_engine():
    cfg = load_config("tiny", backend="transformer_engine")
    if transformer_engine_available():
        pytest.skip("Transformer Engine is installed here; the refusal applies to machines without it")
    with pytest.raises(ConfigError, match="Transformer Engine is not installed"):
        QwenImageMMDiT(cfg)


@pytest.fixture(scope="module")
def tiny_model():
    return QwenImageMMDiT(load_config("tiny"))


def _good():
    return make_inputs("padded_text", 16, 16)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda k: k.update(hidden_states=torch.zeros(3, 15, 12)), r"hidden_states has shape \(3, 15, 12\)"),
        (lambda k: k.update(encoder_hidden_states=torch.zeros(2, 7, 16)), r"expected \[3, T, 16\]"),
        (lambda k: k.update(encoder_hidden_states_mask=torch.ones(3, 6)), r"mask has shape \(3, 6\)"),
        (lambda k: k.update(timestep=torch.zeros(3, 1)), r"timestep has shape \(3, 1\)"),
        (lambda k: k.update(img_shapes=[[(1, 4, 4)]] * 3), r"describes 16 image tokens but hidden_states has 15"),
        (lambda k: k.update(img_shapes=[[(1, 5, 3)]] * 2), "2 entries but the batch has 3"),
        (lambda k: k.update(img_shapes=[[(1, 0, 3)]] * 3), "positive patch counts"),
        (
            lambda k: k.update(encoder_hidden_states=torch.zeros(3, 1025, 16), encoder_hidden_states_mask=None),
            "1025 tokens is longer than the 1024-token",
        ),
        (lambda k: k.update(guidance=torch.ones(3)), "no guidance embedding"),
    ],
)
def test_bad_inputs_are_named(tiny_model, edit, message):
    kwargs = model_kwargs(_good())
    edit(kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_local_backend_never_imports_transformer_engine():
    import subprocess
    import sys

    code = (
        "import sys; from megatron_qwenimage import QwenImageMMDiT, load_config; "
        "QwenImageMMDiT(load_config('tiny')); "
        "print('transformer_engine' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("mode, every_n", [("none", 1), ("selective", 1), ("full", 2)])
def test_recompute_reruns_what_it_says_and_keeps_gradients(tiny_diffusers_dir, mode, every_n):
    model = load_diffusers(tiny_diffusers_dir)
    reference = load_diffusers(tiny_diffusers_dir)
    names = model.configure_recompute(mode, every_n)
    calls = {}
    for index, block in model.blocks.items():
        for part, module in ((f"blocks.{index}", block), (f"blocks.{index}.attention", block.attention)):
            # A pre-hook: non-reentrant checkpointing stops recomputing once it has what backward
            # needs, so a post-forward hook would not see the rerun.
            module.register_forward_pre_hook(lambda *_, key=part: calls.__setitem__(key, calls.get(key, 0) + 1))
    inputs = make_inputs("padded_text", 16, 24)
    for m in (model, reference):
        (m(**model_kwargs(inputs)) * inputs["loss_weights"]).sum().backward()
    rerun = sorted(k for k, v in calls.items() if v == 2)
    # A recomputed block also reruns its attention.
    assert rerun == sorted(set(names) | {f"{n}.attention" for n in names if not n.endswith("attention")})
    expected = {
        "none": [],
        "selective": ["blocks.0.attention", "blocks.1.attention", "blocks.2.attention"],
        "full": ["blocks.0", "blocks.2"],
    }[mode]
    assert names == expected
    if mode == "full":
        assert calls["blocks.0.attention"] == 2 and calls["blocks.1.attention"] == 1
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, ref[name].grad), name
    with pytest.raises(ConfigError, match="recompute mode 'some'"):
        model.configure_recompute("some")


def test_joint_keys_put_valid_keys_first():
    from megatron_qwenimage.model.mmdit import joint_keys

    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    keys = joint_keys(right, batch=2, text_tokens=4, image_tokens=3)
    # [image (3); text (4)]: the valid keys are a prefix of n + len_i, so TE takes cu_seqlens.
    assert keys.kv_lengths.tolist() == [7, 5]
    assert keys.cu_seqlens_kv().tolist() == [0, 7, 12]
    assert keys.cu_seqlens_q(7, 2, torch.device("cpu")).tolist() == [0, 7, 14]
    assert keys.key_mask.tolist() == [[True] * 7, [True] * 5 + [False] * 2]

    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    keys = joint_keys(left, batch=2, text_tokens=4, image_tokens=3)
    assert keys.kv_lengths is None  # not a prefix: the general mask path
    assert keys.key_mask[1].tolist() == [True] * 3 + [False, False, True, True]

    assert joint_keys(torch.ones(2, 4, dtype=torch.bool), batch=2, text_tokens=4, image_tokens=3).key_mask is None
    assert joint_keys(None, batch=2, text_tokens=4, image_tokens=3).key_mask is None

    # Sequence-parallel pad rows (2 image, 1 text) trail every valid key.
    keys = joint_keys(right, batch=2, text_tokens=4, image_tokens=3, pad_image=2, pad_text=1)
    assert keys.kv_lengths.tolist() == [7, 5]
    assert keys.key_mask.shape == (2, 10) and not keys.key_mask[:, 7:].any()
    keys = joint_keys(None, batch=2, text_tokens=4, image_tokens=3, pad_image=1, pad_text=0)
    assert keys.kv_lengths.tolist() == [7, 7] and keys.key_mask[:, :7].all() and not keys.key_mask[:, 7:].any()

    # The key order the blocks use: valid image rows, the text, then the image stream's SP pad.
    img = torch.arange(5).view(5, 1, 1, 1).float()
    txt = 10 + torch.arange(5).view(5, 1, 1, 1).float()
    order = keys.order(img[:4], txt).flatten().tolist()
    assert order == [0, 1, 2, 10, 11, 12, 13, 14, 3]


def test_token_alignment_pads_inside_the_blocks_without_changing_outputs(tiny_diffusers_dir):
    # FP8 GEMMs need row counts divisible by 16: odd grids (1328 px = 83² patches) are padded
    # inside the blocks with masked rows; outputs and gradients must not change.
    model = load_diffusers(tiny_diffusers_dir)
    inputs = make_inputs("odd_nonsquare", 16, 24)  # 15 image tokens, 5 text tokens
    outs, grads = [], []
    for alignment in (1, 16):
        model.configure_token_alignment(alignment)
        model.zero_grad(set_to_none=True)
        out = model(**model_kwargs(inputs))
        (out * inputs["loss_weights"]).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert outs[0].shape == outs[1].shape
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    with pytest.raises(ConfigError, match="token alignment"):
        model.configure_token_alignment(0)


def test_fused_elementwise_matches_eager(tiny_diffusers_dir):
    # The same chains compiled by torch.compile (Inductor's C++ kernels on CPU, Triton on GPU):
    # outputs and every gradient equal the eager model's to fp32 rounding.
    eager = load_diffusers(tiny_diffusers_dir)
    fused = load_diffusers(tiny_diffusers_dir, fused_elementwise=True)
    assert fused.blocks["0"].ops.fused and not eager.blocks["0"].ops.fused
    inputs = make_inputs("padded_text", 16, 24)
    outs, grads = [], []
    for model in (eager, fused):
        out = model(**model_kwargs(inputs))
        (out * inputs["loss_weights"]).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for name, g in grads[0].items():
        assert grads[1][name] is not None, f"{name}: no gradient through the fused chains"
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
