"""The CPU-side plumbing of per-block CUDA graphs (`megatron_qwenimage.model.cuda_graphs`).

The capture itself needs a GPU (benchmarks/gpu/run.py's ``*_graphs`` variants); here a stand-in
``make_graphed_callables`` returns the modules it is given (recording what it was passed), so
everything around the capture runs for real on the tiny model: flattening the block calls,
installing the stand-ins, validating calls, restoring the eager blocks.
"""

from __future__ import annotations

import pytest
import torch

from megatron_qwenimage import QwenImageMMDiT, load_config
from megatron_qwenimage.model.backends import JointKeys
from megatron_qwenimage.model.cuda_graphs import (
    CallOrder,
    GraphedBlock,
    TensorBlock,
    disable_fp8_weight_cache,
    flatten_block_call,
    graph_blocks,
    record_block_calls,
    te_graph_kwargs,
    unflatten_block_call,
)
from tests.helpers.mmdit import make_inputs, model_kwargs


class IdentityGrapher:
    """``make_graphed_callables`` stand-in: returns the modules, records its arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, modules, sample_args, **kwargs):
        self.calls.append((modules, sample_args, kwargs))
        return modules


def _model():
    torch.manual_seed(0)
    model = QwenImageMMDiT(load_config("tiny"), init_seed=3)
    # adaLN-Zero starts every block as the identity; random modulation makes the blocks matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_mod." in name or "norm_out" in name or name.startswith("proj_out"):
                p.normal_(0.0, 0.05)
    return model


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**model_kwargs(inputs))
    loss = (out * inputs["loss_weights"]).sum()
    loss.backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _case(model, case):
    cfg = model.config
    return make_inputs(case, cfg.in_channels, cfg.joint_attention_dim)


def test_flatten_round_trip_with_and_without_key_tensors():
    img, txt, temb = torch.randn(6, 2, 8), torch.randn(3, 2, 8), torch.randn(2, 8)
    rope = (torch.randn(3, 1, 1, 2, dtype=torch.complex64), torch.randn(6, 1, 1, 2, dtype=torch.complex64))
    flat, sig = flatten_block_call(img, txt, temb, rope, JointKeys(6))
    assert sig.names == ("img", "txt", "temb", "txt_rot", "img_rot") and len(flat) == 5
    back = unflatten_block_call(flat, sig)
    assert back[0] is img and back[1] is txt and back[2] is temb and back[3][0] is rope[0] and back[3][1] is rope[1]
    assert back[4].image_tokens == 6 and back[4].key_mask is None and back[4].kv_lengths is None

    mask, lengths = torch.ones(2, 9, dtype=torch.bool), torch.tensor([9, 7], dtype=torch.int32)
    flat, sig_masked = flatten_block_call(img, txt, temb, rope, JointKeys(6, mask, lengths))
    assert sig_masked.names[-2:] == ("key_mask", "kv_lengths") and flat[-2] is mask and flat[-1] is lengths
    keys = unflatten_block_call(flat, sig_masked)[4]
    assert keys.key_mask is mask and keys.kv_lengths is lengths
    assert "tensors" in sig.mismatch(sig_masked)
    _, sig_other = flatten_block_call(torch.randn(6, 3, 8), txt, temb, rope, JointKeys(6))
    assert "img has shape (6, 3, 8)" in sig.mismatch(sig_other)
    _, sig_tokens = flatten_block_call(img, txt, temb, rope, JointKeys(5))
    assert "image_tokens=5" in sig.mismatch(sig_tokens)
    assert sig.mismatch(flatten_block_call(img.clone(), txt, temb, rope, JointKeys(6))[1]) is None
    with pytest.raises(TypeError):
        flatten_block_call(img, txt, temb, rope, None)
    with pytest.raises(ValueError):
        unflatten_block_call(flat[:-1], sig_masked)


@pytest.mark.parametrize("case", ["square", "padded_text"])
def test_graphed_blocks_match_eager_outputs_and_grads(case):
    model = _model()
    inputs = _case(model, case)
    out_ref, grads_ref = _loss_and_grads(model, inputs)
    originals = dict(model.blocks.items())
    params_before = list(model.parameters())

    calls = record_block_calls(model, lambda: _loss_and_grads(model, inputs))
    assert [k for k, _ in calls] == list(model.blocks.keys())
    grapher = IdentityGrapher()
    graphs = graph_blocks(model, calls, grapher, num_warmup_iters=2)
    ((modules, sample_args, kwargs),) = grapher.calls
    assert kwargs == {"num_warmup_iters": 2}
    assert all(isinstance(m, TensorBlock) for m in modules)
    assert modules[-1].block.context_only and not modules[0].block.context_only
    for flat, sig in zip(sample_args, (m.signature for m in modules)):
        assert all(isinstance(t, torch.Tensor) for t in flat) and len(flat) == len(sig.names)
        # activations are fresh leaves needing a gradient; the layout constants are not
        assert [t.requires_grad for t in flat[:3]] == [True, True, True]
        assert not any(t.requires_grad for t in flat[3:])
        assert flat[3].is_complex() and flat[4].is_complex()
    if case == "padded_text":
        assert sample_args[0][-1].dtype == torch.int32  # kv_lengths of the right-padded mask
    # every sample tensor (a static buffer replays write into) has storage of its own, apart from
    # the recorded call's tensors and the model's cached RoPE tables
    for (_, call), flat in zip(calls, sample_args):
        recorded = [*call[:3], *call[3], *(t for t in (call[4].key_mask, call[4].kv_lengths) if t is not None)]
        assert len(recorded) == len(flat)
        for mine, theirs in zip(flat, recorded):
            assert mine.data_ptr() != theirs.data_ptr()
            torch.testing.assert_close(mine.detach(), theirs, rtol=0, atol=0)
    assert all(isinstance(b, GraphedBlock) for b in model.blocks.values())
    assert list(model.parameters()) == params_before  # same parameter objects: the optimizer sees them

    out, grads = _loss_and_grads(model, inputs)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    # names change under the stand-ins (blocks.0.graphed.block....); compare by parameter order
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads.values(), grads_ref.values()):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)

    graphs.restore()
    assert all(model.blocks[k] is originals[k] for k in originals)
    torch.testing.assert_close(_loss_and_grads(model, inputs)[0], out_ref, rtol=0, atol=0)


def test_graphed_block_refuses_another_layout_and_out_of_order_calls():
    model = _model()
    inputs = _case(model, "square")
    graph_blocks(model, record_block_calls(model, lambda: model(**model_kwargs(inputs))), IdentityGrapher())
    with pytest.raises(ValueError, match="captured"):
        model(**model_kwargs(_case(model, "odd_nonsquare")))  # other shapes and a text mask
    model(**model_kwargs(inputs))  # a fresh pass from block 0 is fine after the refusal
    blocks = list(model.blocks.values())
    cfg = model.config
    n, t, b = 16, 6, 2
    img, txt, temb = (
        torch.randn(n, b, cfg.hidden_size),
        torch.randn(t, b, cfg.hidden_size),
        torch.randn(b, cfg.hidden_size),
    )
    rope = model.rope.tables([[(1, 4, 4)]] * b, t, img.device)
    # the full pass above ended with the last block: the next call must be block 0
    with pytest.raises(RuntimeError, match="out of the captured order"):
        blocks[1](img, txt, temb, rope, JointKeys(n))
    blocks[0](img, txt, temb, rope, JointKeys(n))
    out, none = blocks[1](img, txt, temb, rope, JointKeys(n))
    assert none is None and out.shape == img.shape  # the context-only block's stand-in


def test_call_order():
    order = CallOrder(3)
    for p in (0, 1, 2, 0, 1):
        order.check(p)
    with pytest.raises(RuntimeError, match="expected position 2"):
        order.check(1)
    with pytest.raises(RuntimeError):
        order.check(1)  # the broken pass must restart at 0
    order.check(0)


def test_graph_blocks_rejects_what_it_cannot_capture():
    model = _model()
    inputs = _case(model, "square")
    calls = record_block_calls(model, lambda: model(**model_kwargs(inputs)))
    model.configure_recompute("selective")
    with pytest.raises(ValueError, match="selective"):
        graph_blocks(model, calls, IdentityGrapher())
    model.configure_recompute("full")
    with pytest.raises(ValueError, match="full-block"):
        graph_blocks(model, calls, IdentityGrapher())
    model.configure_recompute("none")
    model.eval()
    with pytest.raises(ValueError, match="training"):
        graph_blocks(model, calls, IdentityGrapher())
    model.train()
    graph_blocks(model, calls, IdentityGrapher())
    with pytest.raises(ValueError, match="already graphed"):
        graph_blocks(model, calls, IdentityGrapher())


def test_failed_capture_leaves_the_model_and_the_class_as_they_were():
    model = _model()
    inputs = _case(model, "square")
    calls = record_block_calls(model, lambda: model(**model_kwargs(inputs)))
    originals = dict(model.blocks.items())

    def failing(modules, sample_args, **kwargs):
        type(modules[0]).__call__ = lambda self, *a, **k: None  # as TE's FP8 wrapper does
        raise RuntimeError("capture failed")

    with pytest.raises(RuntimeError, match="capture failed"):
        graph_blocks(model, calls, failing)
    assert "__call__" not in TensorBlock.__dict__
    assert all(model.blocks[k] is originals[k] for k in originals)
    graphs = graph_blocks(model, calls, IdentityGrapher())  # a later capture works
    assert model(**model_kwargs(inputs)).shape == inputs["loss_weights"].shape
    graphs.restore()


def test_record_block_calls_needs_every_block_once():
    model = _model()
    with pytest.raises(RuntimeError, match="one call of each block"):
        record_block_calls(model, lambda: None)
    assert not any(b._forward_pre_hooks for b in model.blocks.values())  # hooks removed either way


def test_disable_fp8_weight_cache_flags_megatron_te_linears_only():
    class FakeTELinear(torch.nn.Module):  # the two attributes megatron-core's TE linears carry
        def __init__(self):
            super().__init__()
            self.is_first_microbatch = True
            self.disable_parameter_transpose_cache = False

    model = torch.nn.Sequential(FakeTELinear(), torch.nn.Linear(2, 2), torch.nn.Sequential(FakeTELinear()))
    assert disable_fp8_weight_cache(model) == 2
    assert model[0].disable_parameter_transpose_cache and model[2][0].disable_parameter_transpose_cache
    assert disable_fp8_weight_cache(_model()) == 0  # the local backend has none


def test_te_graph_kwargs_follow_the_installed_signature():
    def new_api(
        modules,
        sample_args,
        num_warmup_iters=3,
        enabled=None,
        recipe=None,
        cache_quantized_params=None,
        fp8_enabled=None,
        fp8_recipe=None,
        fp8_weight_caching=None,
    ):
        pass

    def old_api(modules, sample_args, num_warmup_iters=3, fp8_enabled=False, fp8_recipe=None, fp8_weight_caching=False):
        pass

    recipe = object()
    assert te_graph_kwargs(new_api, fp8=True, recipe=recipe, num_warmup_iters=2) == {
        "num_warmup_iters": 2,
        "enabled": True,
        "recipe": recipe,
        "cache_quantized_params": False,
    }
    assert te_graph_kwargs(old_api, fp8=True, recipe=recipe) == {
        "num_warmup_iters": 3,
        "fp8_enabled": True,
        "fp8_recipe": recipe,
        "fp8_weight_caching": False,
    }
    assert te_graph_kwargs(new_api, fp8=False)["enabled"] is False
    with pytest.raises(ValueError, match="recipe"):
        te_graph_kwargs(new_api, fp8=True)
