"""Parameter, FLOP and memory accounting."""

import math

import pytest
import torch

from megatron_qwenimage.accounting import (
    PEAK_TFLOPS,
    block_activation_bytes,
    block_tensors,
    design_formula_flops,
    gpu_key_from_device_name,
    memory_per_gpu,
    mfu,
    model_flops_breakdown,
    model_flops_per_sample,
    parameter_counts,
    peak_flops,
    split_layers,
)
from megatron_qwenimage.config import MMDiTConfig, load_config

# A hand-checkable config: D = 16, F = 64, head_dim 8, D_txt = 8, C_in = C_out = 16.
SMALL = MMDiTConfig(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
    joint_attention_dim=8,
    in_channels=16,
    out_channels=4,
    axes_dims_rope=(2, 2, 4),
)


def _diffusers_model(config):
    from diffusers import QwenImageTransformer2DModel

    kwargs = {k: v for k, v in config.to_diffusers_config().items() if not k.startswith("_")}
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**kwargs).eval()


# ---------------------------------------------------------------- parameters


def test_20b_parameter_counts_match_spec():
    p = parameter_counts(load_config("qwen-image-20b"))
    assert p.block == {
        "img_mod": 56_641_536,
        "txt_mod": 56_641_536,
        "attention": 75_522_560,
        "img_mlp": 75_512_832,
        "txt_mlp": 75_512_832,
    }
    assert p.block_total == 339_831_296
    assert p.blocks_total == 20_389_877_760
    assert p.non_block == {
        "img_in": 199_680,
        "txt_norm": 3_584,
        "txt_in": 11_013_120,
        "time_embed": 10_229_760,
        "norm_out": 18_880_512,
        "proj_out": 196_672,
    }
    assert p.non_block_total == 40_523_328
    assert p.total == 20_430_401_088
    assert p.unused == 132_154_496
    assert p.trainable == 20_430_401_088 - 132_154_496


def test_unused_last_block_terms_by_formula():
    c = load_config("qwen-image-20b")
    d, hd = c.hidden_size, c.attention_head_dim
    expected = (d * d + d) + hd + (d * d + d) + (2 * d * 4 * d + 4 * d + d) + (4 * d * d + 4 * d)
    assert parameter_counts(c).unused == expected


@pytest.mark.parametrize("name", ["tiny", "tiny-16ch", "bench-cpu"])
def test_counts_equal_diffusers_numel(name):
    config = load_config(name)
    model = _diffusers_model(config)
    p = parameter_counts(config)
    assert p.total == sum(t.numel() for t in model.parameters())
    block = dict(model.transformer_blocks[0].named_parameters())
    prefixes = {
        "img_mod": "img_mod.",
        "txt_mod": "txt_mod.",
        "attention": "attn.",
        "img_mlp": "img_mlp.",
        "txt_mlp": "txt_mlp.",
    }
    for comp, prefix in prefixes.items():
        assert p.block[comp] == sum(v.numel() for k, v in block.items() if k.startswith(prefix)), comp
    # Every block tensor we list exists in diffusers with the same shape.
    for spec in block_tensors(config):
        assert tuple(block[spec.name].shape) == spec.shape, spec.name
    assert len(block) == len(block_tensors(config))


# ---------------------------------------------------------------- FLOPs


def test_forward_flops_match_counted_diffusers_matmuls():
    """Count diffusers' matmuls (addmm + attention bmm via the math SDPA path). Diffusers runs the
    full last block, so it does exactly our count plus the last block's text q/out/MLP, text
    modulation rows 2D..6D and text-query attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = load_config("tiny-16ch")
    model = _diffusers_model(config)
    b, h, w, t = 2, 4, 6, 5
    x = torch.randn(b, h * w, config.in_channels)
    e = torch.randn(b, t, config.joint_attention_dim)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(
            hidden_states=x,
            encoder_hidden_states=e,
            encoder_hidden_states_mask=None,
            timestep=torch.full((b,), 0.5),
            img_shapes=[[(1, h, w)]] * b,
        )
    d, f, s = config.hidden_size, config.ffn_hidden_size, h * w + t
    trimmed = 2 * t * (2 * d * d + 2 * d * f) + 2 * d * 4 * d + 4 * t * s * d
    ours = model_flops_per_sample(config, h * w, t, training=False)
    assert counter.get_total_flops() == b * (ours + trimmed)


def test_flops_small_case_by_hand():
    # SMALL: D=16, F=64, L=2, C_in=C_out=16, D_txt=8; N=4 image + 2 condition tokens, T=3.
    br = model_flops_breakdown(SMALL, image_tokens=4, text_tokens=3, condition_image_tokens=2, training=False)
    n, t, s = 6, 3, 9
    assert br.img_in == 2 * n * 16 * 16
    assert br.txt_in == 2 * t * 8 * 16
    assert br.time_embed == 2 * (256 * 16 + 16 * 16)
    assert br.modulation == 2 * (2 * 16 * 96) + 2 * 16 * 96 + 2 * 16 * 32
    assert br.image_linears == 2 * n * 2 * (4 * 256 + 2 * 16 * 64)
    assert br.text_linears == 2 * t * (4 * 256 + 2 * 16 * 64) + 2 * t * 2 * 256
    assert br.attention == 4 * s * s * 16 + 4 * n * s * 16
    assert br.norm_out == 2 * 16 * 32
    assert br.proj_out == 2 * 4 * 16 * 16  # head on the 4 target tokens only
    train = model_flops_breakdown(SMALL, 4, 3, 2, training=True)
    assert train.total == 3 * br.forward == 3 * br.total


def test_design_formula_cross_check_4_block_slice():
    """The anchor formula of docs/spec.md §7.3 vs ours on the 4-block full-width slice at 1024² + 256 text.

    They differ because ours adds the AdaLN modulation linears (2·D·6D per stream per block per
    sample), the embedders and head, and drops the last block's text query/output/MLP and text
    queries (256 of 4352 tokens in 1 of 4 blocks): net about −1 %."""
    config = load_config("qwen-image-20b").replace(num_layers=4)
    ours = model_flops_per_sample(config, image_tokens=4096, text_tokens=256)
    design = design_formula_flops(config, seq_len=4352)
    assert abs(ours / design - 1) < 0.03
    assert ours != design
    # With the last-block trimming and extras removed, the two agree exactly.
    br = model_flops_breakdown(config, 4096, 256)
    d, f, t, s = config.hidden_size, config.ffn_hidden_size, 256, 4352
    trimmed = 2 * t * (2 * d * d + 2 * d * f) + 4 * t * s * d
    core = br.image_linears + br.text_linears + br.attention + trimmed
    assert 3 * core == design
    assert design_formula_flops(config, 4352, batch_size=2) == 2 * design


def test_flops_argument_validation():
    c = load_config("tiny")
    with pytest.raises(ValueError, match="image_tokens"):
        model_flops_per_sample(c, 0, 4)
    with pytest.raises(ValueError, match="text_tokens"):
        model_flops_per_sample(c, 4, -1)
    with pytest.raises(ValueError, match="condition_image_tokens"):
        model_flops_per_sample(c, 4, 4, condition_image_tokens=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        design_formula_flops(c, 0)


# ---------------------------------------------------------------- MFU


def test_peak_table_and_mfu():
    assert PEAK_TFLOPS["h100-sxm"] == {"bf16": 989.0, "fp8": 1979.0}
    assert PEAK_TFLOPS["h200"] == {"bf16": 989.0, "fp8": 1979.0}
    assert peak_flops("h200", "fp8") == 1979e12
    assert peak_flops("h100-sxm", "bf16", override_tflops=500) == 500e12
    assert mfu(494.5e12, peak_flops("h100-sxm")) == pytest.approx(0.5)
    assert gpu_key_from_device_name("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gpu_key_from_device_name("NVIDIA H200") == "h200"
    assert gpu_key_from_device_name("NVIDIA H100 PCIe") is None
    with pytest.raises(ValueError, match="gpu='a100'"):
        peak_flops("a100")
    with pytest.raises(ValueError, match="dtype='fp4'"):
        peak_flops("h200", "fp4")
    with pytest.raises(ValueError, match="peak="):
        mfu(1.0, 0.0)
    with pytest.raises(ValueError, match="override_tflops"):
        peak_flops("h200", override_tflops=-1)


# ---------------------------------------------------------------- memory


def test_memory_small_case_by_hand():
    # SMALL, fp32 params and grads, AdamW, tp=pp=dp=1, micro-batch 1, N=4 image + T=2 text tokens.
    r = memory_per_gpu(SMALL, 1, 1, 1, 1, image_tokens=4, text_tokens=2, params_dtype="float32")
    p = parameter_counts(SMALL)
    (st,) = r.stages
    assert st.params_bytes == 4 * p.total
    assert st.grads_bytes == 4 * p.trainable
    assert st.optimizer_bytes == 8 * p.trainable  # fp32 params: no master copy, two moments
    # Activations (4 bytes each), D=16, F=64, 2 heads:
    full_block = (14 * 16 + 2 * 64) * 6 * 4 + 4 * 6 * 2  # 6 tokens + log-sum-exp
    last_block = (14 * 16 + 2 * 64) * 4 * 4 + 6 * 16 * 2 * 4 + 4 * 4 * 2  # image full, text LN+mod+k+v
    embed = (4 * 16 + 2 * 2 * 8) * 4  # img_in input, txt_norm and txt_in inputs
    head = 3 * 4 * 16 * 4 + 4 * 16 * 4  # norm_out LN in/out, proj_out in; fp32 prediction
    assert full_block == 8496 and last_block == 6432
    assert st.activation_bytes == full_block + last_block + embed + head
    assert (
        r.total_bytes == st.total_bytes == st.params_bytes + st.grads_bytes + st.optimizer_bytes + st.activation_bytes
    )
    assert st.gib()["total_bytes"] == pytest.approx(st.total_bytes / 2**30)


def test_memory_bf16_adamw_zero1_20b():
    c = load_config("qwen-image-20b")
    p = parameter_counts(c)
    r = memory_per_gpu(c, 1, 1, 8, 1, 4096, 256)
    st = r.max_stage
    assert st.params_bytes == 2 * p.total
    assert st.grads_bytes == 4 * p.trainable
    assert st.optimizer_bytes == math.ceil(12 * p.trainable / 8)
    no_zero = memory_per_gpu(c, 1, 1, 8, 1, 4096, 256, zero1=False).max_stage
    assert no_zero.optimizer_bytes == 12 * p.trainable
    sgd = memory_per_gpu(c, 1, 1, 1, 1, 4096, 256, optimizer="sgd").max_stage
    assert sgd.optimizer_bytes == 8 * p.trainable


def test_memory_tensor_parallel_split():
    r1 = memory_per_gpu(SMALL, 1, 1, 1, 1, 4, 2, params_dtype="float32")
    r2 = memory_per_gpu(SMALL, 2, 1, 1, 1, 4, 2, params_dtype="float32")
    p = parameter_counts(SMALL)
    d, hd, L = 16, 8, 2
    replicated_per_block = 4 * d + 4 * hd  # row-parallel biases (to_out, to_add_out, 2x fc2) + QK-norms
    replicated = L * replicated_per_block + p.non_block_total - p.non_block["norm_out"]  # norm_out is split
    assert r2.max_stage.params_bytes == 4 * ((p.total - replicated) / 2 + replicated)
    # Activations: the sharded terms halve (6D + 2F of 14D + 2F per token), replicated ones do not.
    a1 = block_activation_bytes(SMALL, 4, 2, tp=1, act_bytes=2)
    a2 = block_activation_bytes(SMALL, 4, 2, tp=2, act_bytes=2)
    assert a1 - a2 == (6 * 16 + 2 * 64) * 6 * 2 / 2 + 4 * 6 * 1
    sp = block_activation_bytes(SMALL, 4, 2, tp=2, sequence_parallel=True, act_bytes=2)
    assert sp == (14 * 16 + 2 * 64) * 6 * 2 / 2 + 4 * 6 * 1
    assert r2.max_stage.activation_bytes < r1.max_stage.activation_bytes


def test_memory_pipeline_stages():
    c = load_config("qwen-image-20b")
    r = memory_per_gpu(c, 4, 4, 2, 1, 4096, 256)
    assert [s.num_blocks for s in r.stages] == [15, 15, 15, 15]
    first, mid, last = r.stages[0], r.stages[1], r.stages[3]
    # 1F1B: stage 0 keeps 4 micro-batches in flight, stage 1 three.
    per_block = block_activation_bytes(c, 4096, 256, tp=4)
    assert mid.activation_bytes == pytest.approx(3 * 15 * per_block)
    assert first.activation_bytes > 4 * 15 * per_block
    assert first.params_bytes > mid.params_bytes  # embedders
    assert last.params_bytes > mid.params_bytes  # head (+ last-block buffers)
    # Last-block buffers get no grads: replicated pieces (to_add_out and txt fc2 biases, the
    # text-query QK-norm) stay whole, the rest is split over tp=4.
    replicated_unused = 3072 + 3072 + 128
    unused_per_rank = (132_154_496 - replicated_unused) // 4 + replicated_unused
    head = 18_880_512 // 4 + 196_672  # norm_out column-parallel, proj_out replicated
    assert last.grads_bytes - mid.grads_bytes == 4 * (head - unused_per_rank)
    assert last.params_bytes - mid.params_bytes == 2 * head
    assert r.max_stage is first
    few = memory_per_gpu(c, 4, 4, 2, 1, 4096, 256, num_microbatches=1)
    assert few.stages[1].activation_bytes == pytest.approx(15 * per_block)
    # Uneven split: 60 blocks over 7 stages.
    assert split_layers(60, 7) == [9, 9, 9, 9, 8, 8, 8]
    r7 = memory_per_gpu(c, 1, 7, 1, 1, 1024, 64)
    assert [s.num_blocks for s in r7.stages] == [9, 9, 9, 9, 8, 8, 8]


def test_memory_recompute_and_micro_batch():
    c = load_config("qwen-image-20b")
    kw = dict(tp=4, pp=1, dp=8, image_tokens=4096, text_tokens=256)
    none = memory_per_gpu(c, micro_batch=1, **kw).max_stage.activation_bytes
    sel = memory_per_gpu(c, micro_batch=1, recompute="selective", **kw).max_stage.activation_bytes
    full = memory_per_gpu(c, micro_batch=1, recompute="full", **kw).max_stage.activation_bytes
    assert full < sel < none
    two = memory_per_gpu(c, micro_batch=2, **kw).max_stage.activation_bytes
    assert two == pytest.approx(2 * none)
    # Full recompute: 60 block inputs (both streams) + one block's activations live.
    d = c.hidden_size
    expected_full = 60 * 4352 * d * 2 + block_activation_bytes(c, 4096, 256, tp=4)
    embed_head = (4096 * 64 + 2 * 256 * 3584) * 2 + 3 * 4096 * d * 2 + 4096 * 64 * 4
    assert full == pytest.approx(expected_full + embed_head)


def test_memory_argument_validation():
    c = load_config("qwen-image-20b")
    with pytest.raises(ValueError, match="tp=5"):
        memory_per_gpu(c, 5, 1, 1, 1, 4096, 256)
    with pytest.raises(ValueError, match="pp=61"):
        memory_per_gpu(c, 1, 61, 1, 1, 4096, 256)
    with pytest.raises(ValueError, match="dp=0"):
        memory_per_gpu(c, 1, 1, 0, 1, 4096, 256)
    with pytest.raises(ValueError, match="micro_batch"):
        memory_per_gpu(c, 1, 1, 1, 1.5, 4096, 256)
    with pytest.raises(ValueError, match="params_dtype='fp8'"):
        memory_per_gpu(c, 1, 1, 1, 1, 4096, 256, params_dtype="fp8")
    with pytest.raises(ValueError, match="optimizer='lion'"):
        memory_per_gpu(c, 1, 1, 1, 1, 4096, 256, optimizer="lion")
    with pytest.raises(ValueError, match="recompute='all'"):
        memory_per_gpu(c, 1, 1, 1, 1, 4096, 256, recompute="all")
    with pytest.raises(ValueError, match="image_tokens"):
        memory_per_gpu(c, 1, 1, 1, 1, 0, 256)


# ---------------------------------------------------------------- against our model


@pytest.mark.parametrize("name", ["tiny", "qwen-image-20b"])
def test_counts_and_tp_layout_match_our_model(name):
    """Trainable / carried counts and the split-vs-replicated layout that `memory_per_gpu` assumes
    equal what `QwenImageMMDiT` builds (20B on the meta device: no memory)."""
    from megatron_qwenimage.accounting import first_stage_tensors, last_stage_tensors, time_embed_tensors
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

    config = load_config(name)
    with torch.device("meta"):
        model = QwenImageMMDiT(config)
    counts = parameter_counts(config)
    assert model.num_parameters() == {"trainable": counts.trainable, "carried": counts.unused, "total": counts.total}
    # Split tensors: megatron-core column-parallel weights and biases, row-parallel weights, and
    # the carried buffers the model marks as split. (At TP=1 megatron-core leaves the weights'
    # partition attributes unset, so the layer types are the ground truth here.)
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    split = 0
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear):
            split += sum(p.numel() for p in module.parameters(recurse=False))
        elif isinstance(module, RowParallelLinear):
            split += module.weight.numel()
        for buf_name, dim in getattr(module, "partition_dims", {}).items():
            if dim is not None and isinstance(getattr(module, buf_name, None), torch.Tensor):
                split += getattr(module, buf_name).numel()
    model_replicated = counts.total - split
    specs = first_stage_tensors(config) + time_embed_tensors(config) + last_stage_tensors(config)
    ours_replicated = config.num_layers * sum(t.numel for t in block_tensors(config) if t.split == "replicated")
    ours_replicated += sum(t.numel for t in specs if t.split == "replicated")
    assert model_replicated == ours_replicated


def test_step_model_flops_from_batch_shapes():
    """A step's model FLOPs: samples x per-sample FLOPs at the micro-batch's token counts."""
    from megatron_qwenimage.accounting import step_model_flops

    c = load_config("tiny")
    p2 = c.patch_size**2
    # 2 samples of 8x12 latents (+ one 4x4 condition image), 10 valid text tokens in total
    got = step_model_flops(
        c,
        samples=6,
        latent_shape=(2, c.out_channels, 8, 12),
        text_tokens=10,
        micro_batch_size=2,
        condition_shapes=[(2, c.out_channels, 4, 4)],
    )
    assert got == 6 * model_flops_per_sample(c, 8 * 12 // p2, 5, 4 * 4 // p2)
    # an all-padding text mask still counts one text token per sample
    assert step_model_flops(c, 1, (1, 16, 8, 8), 0, 1) == model_flops_per_sample(c, 8 * 8 // p2, 1)
