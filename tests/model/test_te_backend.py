"""The transformer_engine backend against the local one (needs a CUDA GPU with Transformer Engine).

On CPU machines (CI) these tests skip: Transformer Engine's kernels exist only for NVIDIA GPUs.
They run on the GPU device with ``pytest tests/test_te_backend.py``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_qwenimage.convert import load_diffusers
from megatron_qwenimage.model.backends import transformer_engine_available
from tests.helpers.mmdit import make_inputs, model_kwargs

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and transformer_engine_available()),
    reason="needs an NVIDIA GPU (CUDA) with Transformer Engine installed",
)


def _pair(tiny_diffusers_dir, dtype="bfloat16"):
    kw = dict(device="cuda", params_dtype=dtype)
    return (
        load_diffusers(tiny_diffusers_dir, backend="local", **kw),
        load_diffusers(tiny_diffusers_dir, backend="transformer_engine", **kw),
    )


def _cuda(inputs, dtype):
    return {
        k: (
            v.to("cuda", dtype if v.is_floating_point() and k != "encoder_hidden_states_mask" else v.dtype)
            if torch.is_tensor(v)
            else v
        )
        for k, v in inputs.items()
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32 (robust to a few rounding outliers, unlike a max-abs bound)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-2), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("case", ["padded_text", "left_padded_text", "edit_two_conditions", "square"])
def test_te_matches_local(tiny_diffusers_dir, case, dtype, tol):
    local, te = _pair(tiny_diffusers_dir, dtype)
    inputs = _cuda(make_inputs(case, 16, 24), getattr(torch, dtype))
    outs, grads = [], []
    for model in (local, te):
        out = model(**model_kwargs(inputs))
        (out.float() * inputs["loss_weights"].float()).sum().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert _rel(outs[1], outs[0]) <= tol
    assert set(grads[0]) == set(grads[1])
    missing = sorted(n for n, g in grads[1].items() if g is None)
    assert not missing, f"TE parameters without gradient: {missing}"
    errors = {n: _rel(grads[1][n], g) for n, g in grads[0].items() if g.abs().max() > 0}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative gradient error {errors[worst]:.3g}"


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_te_fp8_forward_backward(tiny_diffusers_dir, recipe):
    from consumers.precision import Precision, PrecisionConfig

    local, te = _pair(tiny_diffusers_dir)
    # Every block in FP8 (the default keeps the first and last block in bf16, which on this tiny
    # model leaves few or no FP8 GEMMs for the checks below).
    precision = Precision(PrecisionConfig(fp8=recipe, fp8_exclude=()), te.config, torch.device("cuda"))
    precision.prepare_model(te)
    # 15 image + 5 text tokens per sample: FP8 GEMMs need rows divisible by 16, which the model's
    # token alignment (set by prepare_model) provides by padding inside the blocks.
    inputs = _cuda(make_inputs("odd_nonsquare", 16, 24), torch.bfloat16)
    with torch.no_grad():
        want = local(**model_kwargs(inputs)).float()
        te_bf16 = te(**model_kwargs(inputs)).float()  # the same TE model outside fp8_autocast
        bf16_rerun_noise = _rel(te(**model_kwargs(inputs)).float(), te_bf16)  # 0 with deterministic kernels
    for _ in range(3):  # delayed scaling needs a few steps of amax history
        with precision.forward_context():
            out = te(**model_kwargs(inputs))
        out.float().square().mean().backward()
    assert out.shape == want.shape
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in te.parameters())
    rel = _rel(out, want)
    assert rel <= 0.15, f"FP8 output relative error {rel:.3f}"
    # FP8 actually ran: its quantisation error shows against the same model's bf16 output, which
    # a bf16 rerun reproduces exactly (H200, TE 2.20: FP8 differs by ~2e-3 on this tiny model,
    # where the blocks' updates are small against the residual stream), and delayed scaling
    # recorded amax history.
    assert _rel(te_bf16, want) <= 3e-2
    fp8_vs_bf16 = _rel(out, te_bf16)
    assert fp8_vs_bf16 > max(2e-4, 10 * bf16_rerun_noise), (
        f"FP8 output matches the bf16 output ({fp8_vs_bf16:.2e}, bf16 rerun {bf16_rerun_noise:.2e}): no FP8 GEMM ran"
    )
    if recipe == "delayed":
        histories = [
            getattr(m.fp8_meta["scaling_fwd"], "amax_history", None)
            for m in te.modules()
            if isinstance(getattr(m, "fp8_meta", None), dict) and "scaling_fwd" in m.fp8_meta
        ]
        histories = [h for h in histories if h is not None]
        assert histories, "no TE module holds a delayed-scaling state"
        assert any(float(h.abs().sum()) > 0 for h in histories), "amax history never moved: FP8 did not run"


def test_te_fp8_default_keeps_first_and_last_block_in_bf16(tiny_diffusers_dir):
    """The default `fp8_exclude` ("first_last") scopes blocks 0 and L-1 out of FP8 with forward hooks."""
    from consumers.precision import Precision, PrecisionConfig

    _, te = _pair(tiny_diffusers_dir)
    last = te.config.num_layers - 1
    precision = Precision(PrecisionConfig(fp8="delayed"), te.config, torch.device("cuda"))
    assert precision.prepare_model(te) == ["blocks.0", f"blocks.{last}"]
    assert not any("forward" in vars(m) for m in te.modules())  # hooks, no rebound forward
    inputs = _cuda(make_inputs("odd_nonsquare", 16, 24), torch.bfloat16)
    for _ in range(2):
        with precision.forward_context():
            out = te(**model_kwargs(inputs))
        out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in te.parameters())

    def amax_moved(prefix: str) -> bool:
        histories = [
            getattr(m.fp8_meta["scaling_fwd"], "amax_history", None)
            for n, m in te.named_modules()
            if n.startswith(prefix) and isinstance(getattr(m, "fp8_meta", None), dict) and "scaling_fwd" in m.fp8_meta
        ]
        return any(h is not None and float(h.abs().sum()) > 0 for h in histories)

    assert amax_moved("blocks.1."), "the middle block did not run in FP8"
    assert not amax_moved("blocks.0.") and not amax_moved(f"blocks.{last}."), "an excluded block ran in FP8"


def test_fp8_weights_are_recast_after_an_update_only_when_a_step_begins(tiny_diffusers_dir):
    """megatron-core's TE linears reuse their cached FP8 weight until ``is_first_microbatch`` is
    set again (`consumers.precision.begin_weight_update_window`, called by the engine at every step).
    One block linear, current scaling (deterministic): after its weight is halved in place, a
    call without a new window still returns the old output (the cache is real); after
    the window it returns half of it (the weight was re-cast)."""
    from consumers.precision import Precision, PrecisionConfig, begin_weight_update_window

    _, te = _pair(tiny_diffusers_dir)
    precision = Precision(PrecisionConfig(fp8="current", fp8_exclude=()), te.config, torch.device("cuda"))
    assert begin_weight_update_window([te]) > 0, "no megatron-core TE linear found"
    linear = next(
        m
        for m in te.modules()
        if hasattr(m, "is_first_microbatch") and hasattr(m, "bias") and hasattr(m, "disable_parameter_transpose_cache")
    )
    x = torch.randn(32, linear.weight.shape[1], device="cuda", dtype=torch.bfloat16)

    def forward() -> torch.Tensor:
        with torch.no_grad(), precision.forward_context():
            out = linear(x)
        out = out[0] if isinstance(out, tuple) else out  # megatron-core returns (output, bias)
        bias = linear.bias if linear.bias is not None and linear.bias.numel() else 0
        return (out - bias).float()  # the GEMM's part, which scales with the weight

    before = forward()
    with torch.no_grad():
        linear.weight.mul_(0.5)  # what an optimizer step does to the weight, exaggerated
    stale = forward()  # no new window: the first call's FP8 weight
    begin_weight_update_window([te])
    fresh = forward()
    assert _rel(stale, before) <= 1e-6, f"the FP8 weight cache was not used ({_rel(stale, before):.2e})"
    assert _rel(fresh, 0.5 * before) <= 5e-2, f"not re-cast after the update ({_rel(fresh, 0.5 * before):.2e})"
