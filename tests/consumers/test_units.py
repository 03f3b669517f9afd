"""Single-process unit tests of the consumers' building blocks (no process group needed)."""

from __future__ import annotations

import math

import pytest
import torch

from consumers.batch import Batch, loss_sum_over_global, make_inputs
from consumers.optimizer import LRSchedule, OptimizerConfig
from consumers.parallel import ParallelLayout
from consumers.precision import FP8Unavailable, Precision, PrecisionConfig, check_fp8_available
from consumers.recompute import RecomputeConfig, apply_recompute
from consumers.stage import MMDiTStage
from megatron_qwenimage.config import ConfigError, load_config
from megatron_qwenimage.flow_matching import UniformSigmaSampler
from megatron_qwenimage.model.mmdit import QwenImageMMDiT
from tests.helpers.consumers import synthetic_global_batch, to_microbatches


def test_layout_validation_names_the_problem():
    cfg = load_config("tiny-16ch", num_layers=4)
    assert ParallelLayout.for_world(8, tp=2, pp=2).dp == 2
    with pytest.raises(ConfigError, match="not divisible by tp\\*pp"):
        ParallelLayout.for_world(6, tp=4)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ParallelLayout(tp=3).validate_for(cfg)
    with pytest.raises(ConfigError, match="pp\\*vpp"):
        ParallelLayout(pp=2, vpp=3).validate_for(cfg)
    with pytest.raises(ConfigError, match="vpp=2 needs pp > 1"):
        ParallelLayout(vpp=2)
    layout = ParallelLayout(pp=2, vpp=2)
    assert [layout.stage_layer_range(s, 4) for s in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert layout.stages_of_rank(1) == [1, 3]


def test_lr_schedule_warmup_then_cosine():
    s = LRSchedule(OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=10))
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="optimizer.min_lr"):
        OptimizerConfig(lr=1e-4, min_lr=1e-3)


def test_fp8_refused_with_reasons_on_this_machine():
    cfg = load_config("tiny-16ch")
    check_fp8_available(PrecisionConfig(fp8=None), cfg)  # nothing requested: nothing refused
    with pytest.raises(FP8Unavailable) as err:
        check_fp8_available(PrecisionConfig(fp8="delayed"), cfg)
    msg = str(err.value)
    assert "backend is 'local'" in msg
    if not torch.cuda.is_available():
        assert "no CUDA device" in msg
    with pytest.raises(ConfigError, match="precision.fp8"):
        PrecisionConfig(fp8="mxfp4")


def test_batch_validation():
    lat = torch.zeros(2, 16, 4, 4)
    with pytest.raises(ValueError, match="needs condition_latents"):
        Batch(lat, torch.zeros(2, 3, 32), torch.ones(2, 3, dtype=torch.bool), torch.arange(2), task="edit")
    with pytest.raises(ValueError, match="text_mask must be bool"):
        Batch(lat, torch.zeros(2, 3, 32), torch.ones(2, 3), torch.arange(2))


def _grads(recompute: RecomputeConfig, autocast: str = "none"):
    cfg = load_config("tiny-16ch")
    model = QwenImageMMDiT(cfg, init_seed=0)
    with torch.no_grad():  # leave adaLN-zero so every parameter gets a gradient
        for name, p in model.named_parameters():
            if "_mod." in name or "norm_out" in name or name.startswith("proj_out"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    wrapped = apply_recompute(model, recompute)
    stage = MMDiTStage(model, Precision(PrecisionConfig(autocast=autocast), cfg, torch.device("cpu")))
    (mb,) = to_microbatches(synthetic_global_batch(0, 2), dp_rank=0, dp=1, micro_batch=2)
    inp = make_inputs(
        mb,
        step=0,
        seed=0,
        sigma_sampler=UniformSigmaSampler(),
        patch_size=2,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    stage.set_shapes(inp.img_shapes, inp.num_target_tokens)
    loss = loss_sum_over_global(stage(inp.hidden_states, inp.text, inp.sigma, text_mask=inp.text_mask), inp.target, 2)
    loss.backward()
    return wrapped, float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_gives_identical_gradients():
    _, ref_loss, ref = _grads(RecomputeConfig("none"))
    for rc, expect in (
        (RecomputeConfig("selective"), ["blocks.0.attention", "blocks.1.attention", "blocks.2.attention"]),
        (RecomputeConfig("full", every_n=2), ["blocks.0", "blocks.2"]),
    ):
        wrapped, loss, grads = _grads(rc)
        assert wrapped == expect
        assert loss == ref_loss
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)
    _, bf16_loss, _ = _grads(RecomputeConfig("none"), autocast="bf16")
    assert bf16_loss == pytest.approx(ref_loss, rel=5e-2)


def test_bf16_params_accumulate_fp32_grads_and_update_from_fp32_master():
    from consumers.optimizer import DistributedOptimizer

    cfg = load_config("tiny-16ch", params_dtype="bfloat16")
    model = QwenImageMMDiT(cfg, init_seed=0)
    named = [(n, p, model.partition_dims[n]) for n, p in model.named_parameters()]
    opt = DistributedOptimizer(named, OptimizerConfig(lr=1e-2, clip_grad=0.0), dp_group=None, tp_rank=0)
    p = model.img_in.weight
    g1 = torch.randn(p.shape).bfloat16()
    g2 = torch.randn(p.shape).bfloat16()
    for g in (g1, g2):  # two micro-batches' worth of gradient, through autograd
        (p * g).sum().backward()
    assert p.grad is None  # moved into the fp32 main grad by the hook
    torch.testing.assert_close(opt.main_grads["img_in.weight"], g1.float() + g2.float())
    master_before = opt.master["img_in.weight"].clone()
    opt.step(0)
    assert opt.master["img_in.weight"].dtype == torch.float32
    assert not torch.equal(opt.master["img_in.weight"], master_before)
    assert torch.equal(p.detach(), opt.master["img_in.weight"].bfloat16())


@pytest.mark.parametrize("name,world", [("train-tiny.yaml", 4), ("train-qwen-image-20b.yaml", 64)])
def test_example_run_configs_validate(name, world):
    from pathlib import Path

    from consumers.train import RunConfig

    cfg = RunConfig.from_yaml(Path(__file__).resolve().parents[2] / "examples" / name)
    assert cfg.layout(world).world_size == world
