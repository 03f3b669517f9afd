"""Flow-matching objective, σ samplers, latent packing and the inference schedule."""

import math

import pytest
import torch

from megatron_qwenimage.flow_matching import (
    LogitNormalSigmaSampler,
    ResolutionShift,
    ShiftedSigmaSampler,
    UniformSigmaSampler,
    build_sigma_sampler,
    exponential_time_shift,
    flow_matching_inputs,
    flow_matching_loss,
    inference_sigmas,
    pack_latents,
    unpack_latents,
)

# ---------------------------------------------------------------- packing vs diffusers


@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (1, 4, 2, 2), (3, 16, 166, 6)])
def test_pack_unpack_bit_exact_against_diffusers(shape):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(shape, generator=g)
    b, c, h, w = shape
    ours = pack_latents(latents)
    ref = QwenImagePipeline._pack_latents(latents, b, c, h, w)
    assert ours.shape == (b, (h // 2) * (w // 2), 4 * c)
    assert torch.equal(ours, ref)

    # diffusers' unpack takes pixel sizes and a VAE factor (8) and returns [B, C, 1, H', W'].
    ref_unpacked = QwenImagePipeline._unpack_latents(ref, h * 8, w * 8, 8)
    back = unpack_latents(ours, h, w)
    assert torch.equal(back, ref_unpacked[:, :, 0])
    assert torch.equal(back, latents)


def test_pack_channel_order_is_c4_dy2_dx():
    b, c, h, w = 1, 3, 4, 6
    latents = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    tokens = pack_latents(latents)
    for r in range(h // 2):
        for col in range(w // 2):
            tok = r * (w // 2) + col
            for ch in range(c):
                for dy in range(2):
                    for dx in range(2):
                        assert tokens[0, tok, ch * 4 + dy * 2 + dx] == latents[0, ch, 2 * r + dy, 2 * col + dx]


def test_pack_unpack_reject_bad_shapes():
    with pytest.raises(ValueError, match="height=3"):
        pack_latents(torch.zeros(1, 16, 3, 4))
    with pytest.raises(ValueError, match="latents must be"):
        pack_latents(torch.zeros(16, 4, 4))
    with pytest.raises(ValueError, match="latent_width"):
        unpack_latents(torch.zeros(1, 4, 64), 4, 3)
    with pytest.raises(ValueError, match="N=4"):
        unpack_latents(torch.zeros(1, 4, 64), 4, 6)


# ---------------------------------------------------------------- loss and inputs


def test_inputs_follow_diffusers_convention():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 5, 64, generator=g)
    eps = torch.randn(3, 5, 64, generator=g)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    noisy, target, s = flow_matching_inputs(x0, eps, sigma)
    torch.testing.assert_close(noisy[0], x0[0])  # σ = 0 is clean
    torch.testing.assert_close(noisy[2], eps[2])  # σ = 1 is pure noise
    torch.testing.assert_close(noisy[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(target, eps - x0)
    assert s is sigma
    # One Euler step from σ to 0 with the true velocity recovers x0.
    torch.testing.assert_close(noisy + (0.0 - sigma.view(-1, 1, 1)) * target, x0)


def test_inputs_reject_bad_arguments():
    x0 = torch.zeros(2, 4, 64)
    with pytest.raises(ValueError, match="noise shape"):
        flow_matching_inputs(x0, torch.zeros(2, 4, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="sigma must be"):
        flow_matching_inputs(x0, torch.zeros_like(x0), torch.zeros(3))
    with pytest.raises(ValueError, match="x0 must be"):
        flow_matching_inputs(torch.zeros(4, 64), torch.zeros(4, 64), torch.zeros(4))


def test_loss_is_zero_when_prediction_equals_target():
    t = torch.randn(2, 7, 64)
    out = flow_matching_loss(t.clone(), t)
    assert out.loss.item() == 0.0
    assert torch.equal(out.per_sample, torch.zeros(2))


def test_loss_values_unmasked_and_masked():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 6, 64, generator=g)
    target = torch.randn(2, 6, 64, generator=g)
    out = flow_matching_loss(pred, target)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(pred, target))
    torch.testing.assert_close(out.per_sample, ((pred - target) ** 2).mean(dim=(1, 2)))

    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    out = flow_matching_loss(pred, target, mask)
    sq = (pred - target) ** 2
    torch.testing.assert_close(out.per_sample[0], sq[0].mean())
    torch.testing.assert_close(out.per_sample[1], sq[1, :2].mean())
    # Batch loss weights every valid token equally: 8 valid tokens in total.
    torch.testing.assert_close(out.loss, (sq[0].sum() + sq[1, :2].sum()) / (8 * 64))
    assert out.num_valid_elements.item() == 8 * 64


def test_mask_excludes_padded_tokens():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 10, 64, generator=g)
    target = torch.randn(2, 10, 64, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, 4:] = False
    ref = flow_matching_loss(pred, target, mask)
    changed = pred.clone()
    changed[0, 7:] = 1e6
    changed[1, 4:] = float("nan")
    out = flow_matching_loss(changed, target, mask)
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(out.per_sample, ref.per_sample)
    # ...while changing a valid token does change it.
    changed[0, 0] += 1.0
    assert flow_matching_loss(changed, target, mask).loss != ref.loss


def test_loss_gradient_only_reaches_valid_tokens():
    values = torch.randn(1, 4, 64)
    values[0, 3] = float("nan")  # garbage in a padded token must not poison the gradient
    pred = values.requires_grad_()
    mask = torch.tensor([[True, True, False, False]])
    flow_matching_loss(pred, torch.zeros(1, 4, 64), mask).loss.backward()
    assert torch.equal(pred.grad[0, 2:], torch.zeros(2, 64))
    torch.testing.assert_close(pred.grad[0, :2], 2 * values[0, :2] / (2 * 64))


def test_loss_rejects_bad_arguments():
    p = torch.zeros(2, 4, 64)
    with pytest.raises(ValueError, match="target shape"):
        flow_matching_loss(p, torch.zeros(2, 4, 16))
    with pytest.raises(ValueError, match="mask must be \\[B, N\\]"):
        flow_matching_loss(p, p, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        flow_matching_loss(p, p, torch.ones(2, 4))
    with pytest.raises(ValueError, match="prediction must be"):
        flow_matching_loss(torch.zeros(4, 64), torch.zeros(4, 64))


# ---------------------------------------------------------------- samplers


def test_samplers_are_deterministic_given_a_generator():
    for sampler in (
        UniformSigmaSampler(),
        LogitNormalSigmaSampler(0.0, 1.0),
        ShiftedSigmaSampler(LogitNormalSigmaSampler()),
    ):
        a = sampler.sample(16, generator=torch.Generator().manual_seed(5), image_tokens=4096)
        b = sampler.sample(16, generator=torch.Generator().manual_seed(5), image_tokens=4096)
        c = sampler.sample(16, generator=torch.Generator().manual_seed(6), image_tokens=4096)
        assert a.shape == (16,) and a.dtype == torch.float32
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert ((a >= 0) & (a <= 1)).all()


def test_uniform_sampler_range_and_moments():
    s = UniformSigmaSampler(0.2, 0.6).sample(20000, generator=torch.Generator().manual_seed(0))
    assert s.min() >= 0.2 and s.max() < 0.6
    assert abs(s.mean().item() - 0.4) < 0.005


@pytest.mark.parametrize("m,std", [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_statistics(m, std):
    n = 40000
    s = LogitNormalSigmaSampler(m, std).sample(n, generator=torch.Generator().manual_seed(1))
    logit = torch.log(s / (1 - s)).double()
    # Standard errors: std/sqrt(n) ≈ 0.0075 for the mean; 5 SE tolerances.
    assert abs(logit.mean().item() - m) < 5 * std / math.sqrt(n)
    assert abs(logit.std().item() - std) < 5 * std / math.sqrt(2 * n)
    # Mean of σ itself against a quadrature of E[sigmoid(m + s z)].
    z = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    w = torch.exp(-0.5 * z**2)
    expected = (torch.sigmoid(m + std * z) * w).sum() / w.sum()
    assert abs(s.double().mean().item() - expected.item()) < 0.01


@pytest.mark.parametrize(
    "height,width,tokens,mu",
    [(256, 256, 256, 0.500), (512, 512, 1024, 0.539), (1024, 1024, 4096, 0.6935), (1328, 1328, 6889, 0.8343)],
)
def test_resolution_shift_mu_table(height, width, tokens, mu):
    L = (height // 16) * (width // 16)
    assert L == tokens
    assert ResolutionShift().mu(L) == pytest.approx(mu, abs=5e-4)


def test_resolution_shift_matches_diffusers_calculate_shift():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    for L in (256, 1000, 4096, 6889, 8192):
        assert ResolutionShift().mu(L) == pytest.approx(calculate_shift(L, 256, 8192, 0.5, 0.9), rel=1e-12)


def test_shifted_sampler_applies_exponential_shift():
    base = UniformSigmaSampler()
    shifted = ShiftedSigmaSampler(base)
    raw = base.sample(64, generator=torch.Generator().manual_seed(9))
    out = shifted.sample(64, generator=torch.Generator().manual_seed(9), image_tokens=6889)
    mu = ResolutionShift().mu(6889)
    expected = math.exp(mu) / (math.exp(mu) + (1 / raw.double() - 1))
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)
    assert (out >= raw).all()  # μ > 0 pushes toward noise
    # Per-sample token counts as a tensor.
    per = shifted.sample(2, generator=torch.Generator().manual_seed(9), image_tokens=torch.tensor([256, 6889]))
    raw2 = base.sample(2, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(per[0], exponential_time_shift(0.5, raw2[:1])[0])


def test_exponential_time_shift_endpoints():
    s = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.equal(exponential_time_shift(0.8, s), s)
    assert torch.allclose(exponential_time_shift(0.0, torch.tensor([0.3])), torch.tensor([0.3]))


def test_sampler_arguments_are_validated():
    with pytest.raises(ValueError, match="std"):
        LogitNormalSigmaSampler(0.0, 0.0)
    with pytest.raises(ValueError, match="mean"):
        LogitNormalSigmaSampler(float("nan"), 1.0)
    with pytest.raises(ValueError, match="low"):
        UniformSigmaSampler(0.7, 0.3)
    with pytest.raises(ValueError, match="batch_size"):
        UniformSigmaSampler().sample(0)
    with pytest.raises(ValueError, match="image_tokens is required"):
        ShiftedSigmaSampler(UniformSigmaSampler()).sample(2)
    with pytest.raises(ValueError, match="image_tokens"):
        ShiftedSigmaSampler(UniformSigmaSampler()).sample(2, image_tokens=0)
    with pytest.raises(ValueError, match="image_tokens tensor"):
        ShiftedSigmaSampler(UniformSigmaSampler()).sample(2, image_tokens=torch.tensor([256]))
    with pytest.raises(ValueError, match="max_seq_len"):
        ResolutionShift(max_seq_len=100)
    with pytest.raises(ValueError, match="base"):
        ShiftedSigmaSampler(ShiftedSigmaSampler(UniformSigmaSampler()))


def test_build_sigma_sampler_from_config():
    assert build_sigma_sampler({"kind": "uniform"}) == UniformSigmaSampler()
    assert build_sigma_sampler({"kind": "logit_normal", "mean": 0.5, "std": 0.8}) == LogitNormalSigmaSampler(0.5, 0.8)
    s = build_sigma_sampler({"kind": "logit_normal", "resolution_shift": {"max_shift": 1.15, "max_seq_len": 4096}})
    assert isinstance(s, ShiftedSigmaSampler) and s.shift.max_shift == 1.15
    assert build_sigma_sampler({"kind": "uniform", "resolution_shift": True}) == ShiftedSigmaSampler(
        UniformSigmaSampler()
    )
    with pytest.raises(ValueError, match="kind='beta'"):
        build_sigma_sampler({"kind": "beta"})
    with pytest.raises(ValueError, match="unknown key.*'mean'"):
        build_sigma_sampler({"kind": "uniform", "mean": 0.0})
    with pytest.raises(ValueError, match="resolution_shift"):
        build_sigma_sampler({"kind": "uniform", "resolution_shift": 3})


# ---------------------------------------------------------------- inference schedule vs diffusers


def _diffusers_qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
        invert_sigmas=False,
        stochastic_sampling=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
    )


@pytest.mark.parametrize("pixels", [1328, 512])
@pytest.mark.parametrize("steps", [50, 8])
def test_inference_sigmas_match_diffusers_scheduler(pixels, steps):
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    tokens = (pixels // 16) ** 2
    sched = _diffusers_qwen_scheduler()
    # What QwenImagePipeline.__call__ does.
    mu = calculate_shift(
        tokens,
        sched.config.base_image_seq_len,
        sched.config.max_image_seq_len,
        sched.config.base_shift,
        sched.config.max_shift,
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = inference_sigmas(steps, tokens)
    assert ours.shape == sched.sigmas.shape == (steps + 1,)
    assert (ours - sched.sigmas).abs().max().item() <= 1e-6
    assert ours[-2].item() == pytest.approx(0.02, abs=1e-6) and ours[-1].item() == 0.0


def test_inference_sigmas_1328_endpoints_from_spec():
    s = inference_sigmas(50, 6889)
    assert [round(v, 3) for v in s[:3].tolist()] == [1.0, 0.991, 0.982]
    assert [round(v, 3) for v in s[-3:].tolist()] == [0.064, 0.02, 0.0]


def test_inference_sigmas_validation():
    with pytest.raises(ValueError, match="num_steps"):
        inference_sigmas(0, 256)
    with pytest.raises(ValueError, match="shift_terminal"):
        inference_sigmas(10, 256, shift_terminal=1.5)
    with pytest.raises(ValueError, match="num_steps=1"):
        inference_sigmas(1, 256)
    assert inference_sigmas(1, 256, shift_terminal=None).tolist() == [1.0, 0.0]
