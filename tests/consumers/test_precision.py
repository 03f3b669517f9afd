"""FP8 precision settings that run without Transformer Engine: exclusion patterns, the hook scope, the amax group.

* ``fp8_exclude`` defaults to the first and last block (Megatron's ``--first-last-layers-bf16``),
  resolved from the model config to names the model really has; an explicit pattern that
  matches no module of the *full* model is a `ConfigError` naming it;
* `exclude_from_fp8` runs the outermost matching modules' forward inside the given context via
  forward hooks (no rebound ``forward``), also leaving the context when the forward raises;
* the engine reduces amax over megatron-core's amax group (TP x DP of the stage), checked on
  four gloo ranks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from consumers.precision import (
    DEFAULT_FP8_EXCLUDE,
    Precision,
    PrecisionConfig,
    exclude_from_fp8,
    fp8_recipe,
    full_model_module_names,
    resolve_fp8_exclude,
    validate_fp8_exclude,
)
from megatron_qwenimage.config import ConfigError, load_config
from megatron_qwenimage.model.backends import transformer_engine_available
from megatron_qwenimage.model.mmdit import QwenImageMMDiT
from tests.helpers.consumers import spawn
from tests.helpers.mmdit import make_inputs, model_kwargs


def test_default_exclusion_is_first_and_last_block_of_the_model():
    assert DEFAULT_FP8_EXCLUDE == "first_last" == PrecisionConfig().fp8_exclude
    cfg = load_config("tiny-16ch", num_layers=4)
    assert resolve_fp8_exclude(PrecisionConfig(), cfg) == ("blocks.0", "blocks.3")
    assert resolve_fp8_exclude(PrecisionConfig(), load_config("qwen-image-20b")) == ("blocks.0", "blocks.59")
    model = QwenImageMMDiT(cfg, init_seed=0)
    names = dict(model.named_modules())
    for pattern in resolve_fp8_exclude(PrecisionConfig(), cfg):
        assert pattern in names
    # the full model's names computed from the config are exactly the built model's
    assert set(full_model_module_names(cfg)) == set(names) - {""}
    # the TE modules of the excluded blocks (column/row linears, MLP) sit inside them
    assert {"blocks.0.img_qkv", "blocks.0.txt_out", "blocks.3.txt_kv", "blocks.3.img_mlp.fc2"} <= set(names)
    validate_fp8_exclude(resolve_fp8_exclude(PrecisionConfig(), cfg), cfg)


def test_explicit_and_empty_patterns():
    cfg = load_config("tiny-16ch")
    assert PrecisionConfig(fp8_exclude=[]).fp8_exclude == ()
    assert resolve_fp8_exclude(PrecisionConfig(fp8_exclude=["blocks.*.img_mlp.fc2"]), cfg) == ("blocks.*.img_mlp.fc2",)
    Precision(PrecisionConfig(fp8_exclude=["blocks.*.img_mlp.fc2", "blocks.2.txt_kv"]), cfg, torch.device("cpu"))
    Precision(PrecisionConfig(fp8_exclude=[]), cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="expected 'first_last' or a list"):
        PrecisionConfig(fp8_exclude="blocks.0")
    with pytest.raises(ConfigError, match="non-empty strings"):
        PrecisionConfig(fp8_exclude=["blocks.0", ""])


def test_unknown_pattern_is_a_config_error_naming_it():
    cfg = load_config("tiny-16ch")  # 3 blocks
    with pytest.raises(ConfigError) as err:
        Precision(PrecisionConfig(fp8_exclude=["blocks.0", "blocks.7", "blocks.*.mlp.fc1"]), cfg, torch.device("cpu"))
    msg = str(err.value)
    assert "'blocks.7'" in msg and "'blocks.*.mlp.fc1'" in msg and "'blocks.0'" not in msg.split("match no")[0]
    assert "blocks.0 .. blocks.2" in msg and "img_qkv" in msg and "txt_kv" in msg
    # the full model, not a stage: a pattern for another pipeline stage's blocks is valid
    validate_fp8_exclude(["blocks.2.img_qkv"], cfg.replace(tensor_model_parallel_size=1))


def test_exclusion_hooks_scope_the_forward_without_rebinding_it():
    cfg = load_config("tiny-16ch")
    model = QwenImageMMDiT(cfg, init_seed=0)
    depth = [0]
    entered = []

    @contextlib.contextmanager
    def fp8_off():
        depth[0] += 1
        entered.append(1)
        try:
            yield
        finally:
            depth[0] -= 1

    # blocks.0.img_mlp is inside blocks.0: only the outermost match gets the scope
    names = exclude_from_fp8(model, ("blocks.0", "blocks.0.img_mlp", "blocks.2.img_mlp.fc2"), fp8_off)
    assert names == ["blocks.0", "blocks.2.img_mlp.fc2"]
    assert not any("forward" in vars(m) for m in model.modules())
    seen = {}
    watch = [
        "img_in",
        "blocks.0.img_qkv",
        "blocks.0.img_mlp.fc1",
        "blocks.1.img_qkv",
        "blocks.2.img_mlp.fc1",
        "blocks.2.img_mlp.fc2",
        "proj_out",
    ]
    modules = dict(model.named_modules())
    for name in watch:
        modules[name].register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(depth[0]))
    x = torch.randn(1, 16, cfg.in_channels)
    text = torch.randn(1, 5, cfg.joint_attention_dim)
    out = model(x, text, timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]])
    out.square().sum().backward()
    assert seen == {
        "img_in": [0],
        "blocks.0.img_qkv": [1],
        "blocks.0.img_mlp.fc1": [1],
        "blocks.1.img_qkv": [0],
        "blocks.2.img_mlp.fc1": [0],
        "blocks.2.img_mlp.fc2": [1],
        "proj_out": [0],
    }
    assert depth[0] == 0 and len(entered) == 2
    # idempotent: scoping again replaces the hooks rather than nesting them
    exclude_from_fp8(model, ("blocks.0",), fp8_off)
    entered.clear()
    model(x, text, timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]])
    assert len(entered) == 2  # blocks.0 once, blocks.2.img_mlp.fc2 (scoped before) once


def test_exclusion_scope_is_left_when_the_forward_raises():
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    model = torch.nn.Sequential(Boom())
    depth = [0]

    @contextlib.contextmanager
    def fp8_off():
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    assert exclude_from_fp8(model, ("0",), fp8_off) == ["0"]
    with pytest.raises(ValueError, match="boom"):
        model(torch.zeros(1))
    assert depth[0] == 0


def test_engine_reduces_amax_over_the_tp_dp_group(tmp_path):
    results = spawn(_amax_worker, 4, tmp_path)
    assert results[0]["tp2_dp2"] == [0, 1, 2, 3]
    assert results[3]["tp2_dp2"] == [0, 1, 2, 3]
    # tp=2, pp=2: the amax group is the stage's TP x DP ranks (rank order tp-dp-pp), never across stages
    assert results[0]["tp2_pp2"] == [0, 1] and results[3]["tp2_pp2"] == [2, 3]
    assert results[0]["tp_only"] == [0, 1]
    assert results[2]["engine"] == [2, 3]


def _amax_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from consumers.engine import TrainEngine, amax_reduction_group
    from consumers.optimizer import OptimizerConfig
    from consumers.parallel import ParallelLayout, init_parallel

    ranks = lambda g: sorted(dist.get_process_group_ranks(g))  # noqa: E731
    out = {}
    init_parallel(ParallelLayout(tp=2, dp=2))
    out["tp2_dp2"] = ranks(amax_reduction_group())
    pstate = init_parallel(ParallelLayout(tp=2, pp=2))
    out["tp2_pp2"] = ranks(amax_reduction_group())
    out["tp_only"] = ranks(amax_reduction_group(tp_only=True))
    engine = TrainEngine(
        load_config("tiny-16ch", num_layers=2),
        pstate,
        optimizer=OptimizerConfig(),
        precision=PrecisionConfig(fp8_exclude=["blocks.1.img_qkv"]),
        global_batch_size=2,
    )
    out["engine"] = ranks(engine.precision.amax_group)
    return out


def test_fp8_attention_needs_fp8_and_a_bool():
    assert PrecisionConfig(fp8="delayed", fp8_attention=True).fp8_attention
    with pytest.raises(ConfigError, match=r"precision.fp8_attention=true needs FP8 GEMMs: set precision.fp8"):
        PrecisionConfig(fp8_attention=True)
    with pytest.raises(ConfigError, match=r"precision.fp8_attention='yes': expected true or false"):
        PrecisionConfig(fp8="delayed", fp8_attention="yes")


def test_fp8_recipe_carries_fp8_attention_to_transformer_engine():
    """`fp8_recipe` against a stand-in of ``transformer_engine.common.recipe`` (TE needs a GPU):
    the recipe class follows ``fp8``, HYBRID format, ``fp8_dpa`` follows ``fp8_attention``."""

    class _Recipe:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class te_recipe:  # stands in for the module
        class Format:
            HYBRID = "HYBRID"

        class DelayedScaling(_Recipe):
            pass

        class Float8CurrentScaling(_Recipe):
            pass

    for fp8, cls in (("delayed", te_recipe.DelayedScaling), ("current", te_recipe.Float8CurrentScaling)):
        for attention in (False, True):
            recipe = fp8_recipe(te_recipe, PrecisionConfig(fp8=fp8, fp8_attention=attention))
            assert type(recipe) is cls and recipe.kwargs == {"fp8_format": "HYBRID", "fp8_dpa": attention}


@pytest.mark.skipif(
    not (torch.cuda.is_available() and transformer_engine_available()),
    reason="needs an NVIDIA GPU (CUDA) with Transformer Engine installed",
)
@pytest.mark.parametrize("case", ["square", "padded_text"])
def test_fp8_attention_runs_the_attention_in_fp8_on_gpu(case):
    """With ``fp8_attention`` every block's TE attention runs under an ``fp8_dpa`` recipe (its FP8
    metadata says so and its amax history moved), the output moves off the FP8-GEMM-only output
    by FP8 rounding and stays near the bf16 forward; the backward runs."""
    config = load_config(
        "tiny-16ch",
        attention_head_dim=64,
        axes_dims_rope=[16, 24, 24],
        backend="transformer_engine",
        params_dtype="bfloat16",
    )
    model = QwenImageMMDiT(config, init_seed=0).cuda()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "_mod." in name or "norm_out" in name or name.startswith("proj_out"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    inputs = make_inputs(case, config.in_channels, config.joint_attention_dim)
    kwargs = {
        k: (v.to("cuda", torch.bfloat16 if k != "encoder_hidden_states_mask" else v.dtype) if torch.is_tensor(v) else v)
        for k, v in model_kwargs(inputs).items()
    }
    device = torch.device("cuda")
    outs = {}
    for name, cfg in (
        ("bf16", PrecisionConfig()),
        ("fp8", PrecisionConfig(fp8="delayed", fp8_exclude=())),
        ("fp8_attention", PrecisionConfig(fp8="delayed", fp8_exclude=(), fp8_attention=True)),
    ):
        precision = Precision(cfg, config, device)
        precision.prepare_model(model)
        with precision.forward_context():
            outs[name] = model(**kwargs).float()
        if name == "fp8_attention":
            (outs[name] * inputs["loss_weights"].cuda()).sum().backward()
            cores = [m.core for m in model.modules() if type(m).__name__ == "TEAttention"]
            assert len(cores) == config.num_layers
            for core in cores:
                assert core.fp8 and core.fp8_meta["recipe"].fp8_dpa
                assert float(core.fp8_meta["scaling_fwd"].amax_history.abs().max()) > 0
            assert all(
                p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
            )
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(outs["fp8_attention"], outs["fp8"]) > 1e-4  # the attention itself changed precision
    assert rel(outs["fp8_attention"], outs["bf16"]) < 0.15
