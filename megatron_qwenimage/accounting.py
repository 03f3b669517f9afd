"""Parameter, FLOP and memory accounting for the Qwen-Image MMDiT.

All numbers are analytic functions of an `MMDiTConfig` (no model is built), so they can be
evaluated for the 20B model on a laptop and checked against a real model's ``numel()`` in tests.

Conventions
-----------
* D = hidden size (``heads · head_dim``, 3072), F = MLP hidden size (``mlp_ratio · D``, 12288),
  D_txt = ``joint_attention_dim`` (3584), C_in = ``in_channels`` (64), C_out = ``patch_size² ·
  out_channels`` (64), d_h = head dim (128), T_emb = 256 (sinusoidal timestep width).
* A FLOP is one floating-point add or multiply; a matmul of ``[n, i] @ [i, o]`` is ``2·n·i·o``.
* **Our model differs from diffusers in the last block** (see `TensorSpec.last_block_unused`):
  the text stream's output of block L−1 never reaches the loss, so that block computes only
  the text K and V. The text query projection + its QK-norm, ``to_add_out``, the text MLP and
  rows 2D..6D of ``txt_mod`` are carried as buffers (the released checkpoint round-trips) but are
  not parameters, get no gradients and no optimizer state.

Tensor-parallel layout assumed by `memory_per_gpu` (megatron-core style): q/k/v, MLP fc1 and the
AdaLN modulation linears (``img_mod``, ``txt_mod``, ``norm_out``) are column-parallel (weight and
bias split over TP; they are 1/3 of all weights), the attention output projections and MLP fc2
are row-parallel (weight split, bias replicated), QK-norm weights, the embedders, the timestep
MLP and ``proj_out`` are replicated. This is the layout of `megatron_qwenimage.model`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from megatron_qwenimage.config import MMDiTConfig

#: Width of the sinusoidal timestep projection (diffusers ``Timesteps(256, ...)``).
TIMESTEP_PROJ_DIM = 256

GIB = 1024**3

# --------------------------------------------------------------------------------------
# Parameter inventory
# --------------------------------------------------------------------------------------

Split = Literal["column", "row", "replicated"]


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor of the model.

    Attributes:
        name: diffusers state-dict name (relative to the block for block tensors).
        shape: tensor shape.
        split: tensor-parallel layout: ``column`` (split over TP, dim 0), ``row`` (split over TP,
            dim 1; only weights) or ``replicated``.
        component: accounting group (``img_mod``, ``attention``, ``txt_in``, ...).
        last_block_unused: how many of its elements the last block never uses (held as a buffer
            there, not a parameter). Always 0 outside the blocks.
    """

    name: str
    shape: tuple[int, ...]
    split: Split
    component: str
    last_block_unused: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def numel_per_rank(self, tp: int) -> int:
        """Elements one tensor-parallel rank holds."""
        if self.split == "replicated":
            return self.numel
        dim = self.shape[0] if self.split == "column" else self.shape[1]
        if dim % tp:
            raise ValueError(f"{self.name}: dimension {dim} of shape {self.shape} is not divisible by tp={tp}")
        return self.numel // tp

    def unused_per_rank(self, tp: int) -> int:
        """Last-block-unused elements one tensor-parallel rank holds (same split as the tensor)."""
        if self.split == "replicated" or not self.last_block_unused:
            return self.last_block_unused
        return self.last_block_unused // tp


def _linear(name: str, in_f: int, out_f: int, split: Split, component: str, unused_rows: int | None = None):
    """Weight [out, in] and bias [out] of a Linear. `unused_rows`: output rows unused in the last block
    (``None``: none; a number: that many rows; the whole layer is unused when it equals `out_f`)."""
    bias_split: Split = "replicated" if split == "row" else split
    rows = unused_rows or 0
    return [
        TensorSpec(f"{name}.weight", (out_f, in_f), split, component, rows * in_f),
        TensorSpec(f"{name}.bias", (out_f,), bias_split, component, rows),
    ]


def block_tensors(config: MMDiTConfig) -> list[TensorSpec]:
    """The weights of one ``QwenImageTransformerBlock`` (diffusers names), with last-block usage."""
    d, f, hd = config.hidden_size, config.ffn_hidden_size, config.attention_head_dim
    t: list[TensorSpec] = []
    t += _linear("img_mod.1", d, 6 * d, "column", "img_mod")
    # The last block needs only shift1/scale1 of the text stream: rows 0..2D of 6D.
    t += _linear("txt_mod.1", d, 6 * d, "column", "txt_mod", unused_rows=4 * d)
    for proj in ("to_q", "to_k", "to_v"):
        t += _linear(f"attn.{proj}", d, d, "column", "attention")
    t += _linear("attn.add_q_proj", d, d, "column", "attention", unused_rows=d)
    t += _linear("attn.add_k_proj", d, d, "column", "attention")
    t += _linear("attn.add_v_proj", d, d, "column", "attention")
    t += _linear("attn.to_out.0", d, d, "row", "attention")
    t += _linear("attn.to_add_out", d, d, "row", "attention", unused_rows=d)
    for norm in ("norm_q", "norm_k", "norm_added_k"):
        t.append(TensorSpec(f"attn.{norm}.weight", (hd,), "replicated", "attention"))
    t.append(TensorSpec("attn.norm_added_q.weight", (hd,), "replicated", "attention", hd))
    t += _linear("img_mlp.net.0.proj", d, f, "column", "img_mlp")
    t += _linear("img_mlp.net.2", f, d, "row", "img_mlp")
    t += _linear("txt_mlp.net.0.proj", d, f, "column", "txt_mlp", unused_rows=f)
    t += _linear("txt_mlp.net.2", f, d, "row", "txt_mlp", unused_rows=d)
    return t


def first_stage_tensors(config: MMDiTConfig) -> list[TensorSpec]:
    """Input embedders, held by the first pipeline stage."""
    d = config.hidden_size
    t = _linear("img_in", config.in_channels, d, "replicated", "img_in")
    t.append(TensorSpec("txt_norm.weight", (config.joint_attention_dim,), "replicated", "txt_norm"))
    t += _linear("txt_in", config.joint_attention_dim, d, "replicated", "txt_in")
    return t


def time_embed_tensors(config: MMDiTConfig) -> list[TensorSpec]:
    """The timestep MLP (256 → D → D). Only the first pipeline stage holds it (``pre_process`` in
    `megatron_qwenimage.model.mmdit.QwenImageMMDiT`); later stages receive ``temb`` from the
    previous stage with the image and text streams."""
    d = config.hidden_size
    return _linear(
        "time_text_embed.timestep_embedder.linear_1", TIMESTEP_PROJ_DIM, d, "replicated", "time_embed"
    ) + _linear("time_text_embed.timestep_embedder.linear_2", d, d, "replicated", "time_embed")


def last_stage_tensors(config: MMDiTConfig) -> list[TensorSpec]:
    """Output head (``norm_out`` modulation and ``proj_out``), held by the last pipeline stage."""
    d = config.hidden_size
    c_out = config.patch_size**2 * config.out_channels
    return _linear("norm_out.linear", d, 2 * d, "column", "norm_out") + _linear(
        "proj_out", d, c_out, "replicated", "proj_out"
    )


@dataclass(frozen=True)
class ParameterCounts:
    """Analytic parameter counts (elements).

    ``block`` maps a block component to its count for one full block; ``non_block`` maps each
    embedder/head component to its count; ``last_block_unused`` maps a block tensor name to the
    elements the last block holds as buffers. ``total`` is the released checkpoint's size.
    """

    num_layers: int
    block: dict[str, int]
    non_block: dict[str, int]
    last_block_unused: dict[str, int]

    @property
    def block_total(self) -> int:
        return sum(self.block.values())

    @property
    def blocks_total(self) -> int:
        return self.num_layers * self.block_total

    @property
    def non_block_total(self) -> int:
        return sum(self.non_block.values())

    @property
    def total(self) -> int:
        return self.blocks_total + self.non_block_total

    @property
    def unused(self) -> int:
        return sum(self.last_block_unused.values())

    @property
    def trainable(self) -> int:
        return self.total - self.unused

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            block_total=self.block_total,
            blocks_total=self.blocks_total,
            non_block_total=self.non_block_total,
            total=self.total,
            unused=self.unused,
            trainable=self.trainable,
        )
        return d


def parameter_counts(config: MMDiTConfig) -> ParameterCounts:
    """Count parameters per block component, per embedder/head, in total and trainable.

    For ``qwen-image-20b``: block 339,831,296, total 20,430,401,088, last-block unused
    132,154,496 (docs/spec.md §1.4).
    """
    block: dict[str, int] = {}
    unused: dict[str, int] = {}
    for t in block_tensors(config):
        block[t.component] = block.get(t.component, 0) + t.numel
        if t.last_block_unused:
            unused[t.name] = t.last_block_unused
    non_block: dict[str, int] = {}
    for t in first_stage_tensors(config) + time_embed_tensors(config) + last_stage_tensors(config):
        non_block[t.component] = non_block.get(t.component, 0) + t.numel
    return ParameterCounts(config.num_layers, block, non_block, unused)


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopBreakdown:
    """Model FLOPs of one sample's forward pass, by term (see `model_flops_breakdown`)."""

    img_in: int
    txt_in: int
    time_embed: int
    modulation: int
    image_linears: int
    text_linears: int
    attention: int
    norm_out: int
    proj_out: int
    training: bool

    @property
    def forward(self) -> int:
        return (
            self.img_in
            + self.txt_in
            + self.time_embed
            + self.modulation
            + self.image_linears
            + self.text_linears
            + self.attention
            + self.norm_out
            + self.proj_out
        )

    @property
    def total(self) -> int:
        """Forward ×3 when training (backward = 2× forward: grads w.r.t. inputs and weights)."""
        return 3 * self.forward if self.training else self.forward

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(forward=self.forward, total=self.total)
        return d


def _check_tokens(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")


def model_flops_breakdown(
    config: MMDiTConfig,
    image_tokens: int,
    text_tokens: int,
    condition_image_tokens: int = 0,
    training: bool = True,
) -> FlopBreakdown:
    """Model FLOPs of one sample, term by term.

    Let N = ``image_tokens + condition_image_tokens`` (the image stream), T = ``text_tokens``
    (the padded text length the model runs on), S = N + T, L = ``num_layers``. Every term is in
    FLOPs per sample per forward pass:

    * ``img_in``      = 2·N·C_in·D                          packed latents → D
    * ``txt_in``      = 2·T·D_txt·D                         text states → D (RMSNorm not counted)
    * ``time_embed``  = 2·(T_emb·D + D·D)                   one σ per sample
    * ``modulation``  = L·2·D·6D (image) + (L−1)·2·D·6D + 2·D·2D (text)
                        AdaLN linears run on one ``temb`` vector per sample; the last block needs
                        only the text shift1/scale1 rows
    * ``image_linears`` = L·2·N·(4·D² + 2·D·F)              q, k, v, out + MLP fc1, fc2
    * ``text_linears``  = (L−1)·2·T·(4·D² + 2·D·F) + 2·T·2·D²
                        the last block projects only text k, v
    * ``attention``   = (L−1)·4·S·S·D + 4·N·S·D             QKᵀ and A·V, 2·S_q·S_kv·D each; the
                        last block's queries are image-only
    * ``norm_out``    = 2·D·2D                              one vector per sample
    * ``proj_out``    = 2·N_target·D·C_out                  the head runs on the target image's
                        tokens only (``image_tokens``), not on condition images

    Not counted (element-wise, < 1 % at these widths): biases, LayerNorm/RMSNorm, RoPE,
    modulation arithmetic, softmax, GELU, residual/gate multiplies.
    """
    _check_tokens("image_tokens", image_tokens, 1)
    _check_tokens("text_tokens", text_tokens, 0)
    _check_tokens("condition_image_tokens", condition_image_tokens, 0)
    d, f, L = config.hidden_size, config.ffn_hidden_size, config.num_layers
    n = image_tokens + condition_image_tokens
    t = text_tokens
    s = n + t
    c_out = config.patch_size**2 * config.out_channels
    per_token_block_linears = 2 * (4 * d * d + 2 * d * f)
    return FlopBreakdown(
        img_in=2 * n * config.in_channels * d,
        txt_in=2 * t * config.joint_attention_dim * d,
        time_embed=2 * (TIMESTEP_PROJ_DIM * d + d * d),
        modulation=L * 2 * d * 6 * d + (L - 1) * 2 * d * 6 * d + 2 * d * 2 * d,
        image_linears=L * n * per_token_block_linears,
        text_linears=(L - 1) * t * per_token_block_linears + 2 * t * 2 * d * d,
        attention=(L - 1) * 4 * s * s * d + 4 * n * s * d,
        norm_out=2 * d * 2 * d,
        proj_out=2 * image_tokens * d * c_out,
        training=bool(training),
    )


def model_flops_per_sample(
    config: MMDiTConfig,
    image_tokens: int,
    text_tokens: int,
    condition_image_tokens: int = 0,
    training: bool = True,
) -> int:
    """Model FLOPs for one sample (fwd, or fwd+bwd = 3× fwd when `training`). See
    `model_flops_breakdown` for every term."""
    return model_flops_breakdown(config, image_tokens, text_tokens, condition_image_tokens, training).total


def step_model_flops(
    config: MMDiTConfig,
    samples: int,
    latent_shape: Sequence[int],
    text_tokens: int,
    micro_batch_size: int,
    condition_shapes: Sequence[Sequence[int]] = (),
    training: bool = True,
) -> int:
    """Model FLOPs of one optimizer step of `samples` samples, from one micro-batch's shapes.

    Args:
        latent_shape: shape of the micro-batch's target latents, ``(..., H, W)`` in latent
            pixels; ``H·W / patch_size²`` image tokens per sample.
        text_tokens: valid (unpadded) text tokens in the whole micro-batch (its mask's sum);
            each sample counts the micro-batch mean, at least 1.
        micro_batch_size: samples in that micro-batch.
        condition_shapes: shapes ``(..., H, W)`` of its condition latents (edit tasks), each
            adding ``H·W / patch_size²`` image tokens per sample.

    Every sample of the step is counted with this micro-batch's token counts (a step's
    micro-batches share a resolution bucket), via `model_flops_per_sample`.
    """
    patch_area = config.patch_size**2
    condition_tokens = sum(s[-2] * s[-1] // patch_area for s in condition_shapes)
    per_sample_text = text_tokens // max(micro_batch_size, 1)
    image_tokens = latent_shape[-2] * latent_shape[-1] // patch_area
    return samples * model_flops_per_sample(config, image_tokens, max(per_sample_text, 1), condition_tokens, training)


def design_formula_flops(config: MMDiTConfig, seq_len: int, batch_size: int = 1, num_layers: int | None = None) -> int:
    """The simplified training FLOPs of docs/spec.md §7.3: ``3·B·L·(2·S·D·D·4 + 2·S·D·4D·2 + 4·S·S·D)``.

    It treats every block as a full joint block over S = image + text tokens (each token passes
    one stream's q/k/v/out and MLP). `model_flops_per_sample` differs by adding the modulation
    linears, embedders and head, and by removing the last block's text query/output/MLP work
    and text queries; for 4 blocks at S = 4352 the net difference is a few percent.
    """
    _check_tokens("seq_len", seq_len, 1)
    _check_tokens("batch_size", batch_size, 1)
    d = config.hidden_size
    layers = config.num_layers if num_layers is None else num_layers
    s = seq_len
    return 3 * batch_size * layers * (2 * s * d * d * 4 + 2 * s * d * 4 * d * 2 + 4 * s * s * d)


# --------------------------------------------------------------------------------------
# Peak throughput and MFU
# --------------------------------------------------------------------------------------

#: Dense (no sparsity) peak tensor-core TFLOP/s from NVIDIA's data sheets.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "h100-sxm": {"bf16": 989.0, "fp8": 1979.0},
    "h200": {"bf16": 989.0, "fp8": 1979.0},
    "b200": {"bf16": 2250.0, "fp8": 4500.0},
}


def peak_flops(gpu: str, dtype: str = "bf16", override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one GPU: `override_tflops` ·1e12 when given, else `PEAK_TFLOPS[gpu][dtype]`."""
    if override_tflops is not None:
        if not override_tflops > 0:
            raise ValueError(f"peak override_tflops={override_tflops!r}: expected a positive number")
        return float(override_tflops) * 1e12
    if gpu not in PEAK_TFLOPS:
        raise ValueError(f"gpu={gpu!r}: no peak table entry; known {sorted(PEAK_TFLOPS)} (or pass a TFLOP/s override)")
    if dtype not in PEAK_TFLOPS[gpu]:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(PEAK_TFLOPS[gpu])}")
    return PEAK_TFLOPS[gpu][dtype] * 1e12


def gpu_key_from_device_name(device_name: str) -> str | None:
    """Map ``torch.cuda.get_device_name()`` to a `PEAK_TFLOPS` key (``None`` if unknown)."""
    name = device_name.lower()
    if "h200" in name:
        return "h200"
    if "b200" in name:
        return "b200"
    if "h100" in name and "pcie" not in name:
        return "h100-sxm"
    return None


def mfu(flops_per_second_per_gpu: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s per GPU over peak FLOP/s (both FLOP/s)."""
    if not flops_per_second_per_gpu >= 0:
        raise ValueError(f"flops_per_second_per_gpu={flops_per_second_per_gpu!r}: expected >= 0")
    if not peak > 0:
        raise ValueError(f"peak={peak!r}: expected a positive FLOP/s value")
    return flops_per_second_per_gpu / peak


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = ("adamw", "sgd")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ActivationTerm:
    """Saved activation of one block stream: `per_token` elements per token in units of D
    (or of D_h·heads/D for per-head terms), `sharded` over TP without sequence parallelism."""

    name: str
    per_token: float
    sharded: bool
    dropped_by_selective: bool = False


def _stream_terms(ffn_ratio: float) -> list[ActivationTerm]:
    """Tensors one stream of one block keeps for backward, per token, in units of D elements.

    Attention sub-layer: LN1 input (residual), LN1 output (scale grad), modulated input (q/k/v
    weight grad), q and k before QK-RMSNorm (norm backward), rotated q, k and v (attention
    backward), attention output (out-proj weight grad), out-proj output (gate grad). MLP
    sub-layer: LN2 input, LN2 output, modulated input, fc1 output (GELU backward), GELU output
    (fc2 weight grad), fc2 output (gate grad). Attention is assumed flash/fused (no S² scores
    kept; its fp32 log-sum-exp is counted separately); there is no dropout.
    """
    return [
        ActivationTerm("ln1_input", 1, False),
        ActivationTerm("ln1_output", 1, False, True),
        ActivationTerm("modulated1", 1, False, True),
        ActivationTerm("qk_pre_norm", 2, True),
        ActivationTerm("qkv_attention_input", 3, True),
        ActivationTerm("attention_output", 1, True),
        ActivationTerm("out_proj_output", 1, False),
        ActivationTerm("ln2_input", 1, False),
        ActivationTerm("ln2_output", 1, False, True),
        ActivationTerm("modulated2", 1, False, True),
        ActivationTerm("fc1_output", ffn_ratio, True),
        ActivationTerm("gelu_output", ffn_ratio, True, True),
        ActivationTerm("fc2_output", 1, False),
    ]


#: The last block's text stream: LN1 + modulation and text k, v only.
_LAST_BLOCK_TEXT_TERMS = [
    ActivationTerm("ln1_input", 1, False),
    ActivationTerm("ln1_output", 1, False, True),
    ActivationTerm("modulated1", 1, False, True),
    ActivationTerm("k_pre_norm", 1, True),
    ActivationTerm("kv_attention_input", 2, True),
]


def _terms_bytes(terms, tokens: int, d: int, tp: int, sp: bool, act_bytes: int, recompute: str) -> float:
    total = 0.0
    for term in terms:
        if recompute == "selective" and term.dropped_by_selective:
            continue
        div = tp if (term.sharded or sp) else 1
        total += term.per_token * tokens * d * act_bytes / div
    return total


def block_activation_bytes(
    config: MMDiTConfig,
    image_tokens: int,
    text_tokens: int,
    *,
    tp: int = 1,
    sequence_parallel: bool = False,
    act_bytes: int = 2,
    recompute: str = "none",
    last_block: bool = False,
) -> float:
    """Bytes one block keeps for backward, for one sample (multiply by micro-batch size).

    In the style of Korthikanti et al. (Megatron's ``s·b·h·(34 + 5·a·s/h)``): a sum of saved
    tensors, sharded terms divided by TP, all divided by TP with sequence parallelism. Per
    token, a full block keeps ``14·D + 2·F`` elements (`_stream_terms`: 8·D replicated over TP
    without SP, 6·D + 2·F sharded; 22·D = 44·D bytes in bf16 for F = 4D) plus the fp32 attention
    log-sum-exp (4 bytes per query per head). The last block keeps that for image tokens and
    6·D per text token (LN1, modulation, k, v). ``selective`` recompute re-runs LayerNorm +
    modulation and GELU in backward, dropping ``4·D + F`` elements per token; ``full`` is
    handled by `memory_per_gpu` (only block inputs kept).
    """
    d = config.hidden_size
    ratio = config.ffn_hidden_size / d
    full_terms = _stream_terms(ratio)
    heads_per_rank = config.num_attention_heads / tp
    if last_block:
        b = _terms_bytes(full_terms, image_tokens, d, tp, sequence_parallel, act_bytes, recompute)
        b += _terms_bytes(_LAST_BLOCK_TEXT_TERMS, text_tokens, d, tp, sequence_parallel, act_bytes, recompute)
        queries = image_tokens
    else:
        b = _terms_bytes(full_terms, image_tokens + text_tokens, d, tp, sequence_parallel, act_bytes, recompute)
        queries = image_tokens + text_tokens
    return b + 4 * queries * heads_per_rank  # log-sum-exp, fp32


#: fp32 bytes of one LayerNorm's saved mean + rstd, per token (fp32 on GPU; bf16 on CPU).
_LN_STATS_BYTES = 8


def eager_block_activation_bytes(
    config: MMDiTConfig,
    image_tokens: int,
    text_tokens: int,
    *,
    tp: int = 1,
    sequence_parallel: bool = False,
    act_bytes: int = 2,
    recompute: str = "none",
    last_block: bool = False,
) -> float:
    """Bytes one block of *this repository's model* keeps for backward, for one sample.

    Unlike `block_activation_bytes` (Megatron's analytic count, fused kernels assumed), this is
    the set of tensors autograd actually saves in `megatron_qwenimage.model.block.MMDiTBlock` with
    the local backend and eager elementwise ops, tensor by tensor (tests/launch/
    test_memory_prediction.py sums the unique saved tensors of a real forward and compares).
    Per token of a stream of a full block, with ``a`` = `act_bytes`, D, F, H heads:

    * replicated over TP (divided by TP only under sequence parallelism): LN1 input and output,
      the out-projection output (gate backward), LN2 input and output, the fc2 output: ``6·a·D``,
      plus the fp32 mean and rstd of both LayerNorms;
    * the modulated inputs of QKV and fc1, saved by the linears *after* the sequence-parallel
      all-gather, so never divided: ``2·a·D``;
    * head/column-sharded (divided by TP): the QKV output ``3·a·D`` (whole: q and k are views of
      it), per q and k the RMSNorm's normalised value ``a·D`` (and its fp32 input copy ``4·D``
      when ``a`` is not 4) and fp32 rsqrt per head, fc1 and GELU outputs ``2·a·F``;
    * joint attention (divided by TP): q and output per query, k and v per key (``a·D`` each:
      the concatenated copies), fp32 log-sum-exp per query and head. ``selective`` recompute
      (our model re-runs the core attention) drops only the log-sum-exp: the output is kept by
      the out-projection anyway.

    The last block keeps the full set for image tokens; its text tokens keep LN1 + modulation,
    the K/V projection output ``2·a·D`` and the K RMSNorm, and are keys only. Per sample (not
    per token) each stream's modulation keeps ``SiLU(temb)``, its gathered ``[6D]`` output and
    ``1 + scale`` twice (``9·a·D``; the last block's text ``2·a·D``). RoPE tables are counted
    once per forward by `memory_per_gpu`.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: expected one of {RECOMPUTE}")
    d, f, heads = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads
    a = act_bytes
    rep = tp if sequence_parallel else 1
    fp32_copy = 0 if a == 4 else 4 * d  # rms_norm's x.to(float32), saved by pow when a != 4
    qk_norm = (a * d + fp32_copy) / tp + 4 * heads / tp  # per q or k, per token
    replicated = (6 * a * d + 2 * _LN_STATS_BYTES) / rep
    gathered = 2 * a * d
    sharded_full = (3 * a * d + 2 * a * f) / tp + 2 * qk_norm
    per_token_stream = replicated + gathered + sharded_full
    lse = 0 if recompute == "selective" else 4 * heads / tp  # fp32 per query and head
    n, t = image_tokens, text_tokens
    if last_block:
        img = n * per_token_stream
        txt = t * ((2 * a * d + _LN_STATS_BYTES) / rep + a * d + 2 * a * d / tp + qk_norm)
        attention = n * (2 * a * d / tp + lse) + (n + t) * 2 * a * d / tp
        per_sample = (9 + 2) * a * d
    else:
        img = n * per_token_stream
        txt = t * per_token_stream
        attention = (n + t) * (4 * a * d / tp + lse)
        per_sample = 2 * 9 * a * d
    return img + txt + attention + per_sample


def zero1_shard_numel(tensors: Sequence[TensorSpec], tp: int, dp: int) -> int:
    """Elements of the ZeRO-1 flat shard `consumers.optimizer.DistributedOptimizer` allocates for
    `tensors` on one rank: each tensor (this TP rank's shard, viewed ``[rows, cols]``) gets
    ``ceil(rows / dp) · cols`` elements, padding included."""
    total = 0
    for x in tensors:
        if x.split == "column":
            shape = (x.shape[0] // tp, *x.shape[1:])
        elif x.split == "row":
            shape = (x.shape[0], x.shape[1] // tp, *x.shape[2:])
        else:
            shape = x.shape
        rows = shape[0]
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        total += -(-rows // dp) * cols
    return total


@dataclass(frozen=True)
class StageMemory:
    """Memory of one GPU of one pipeline stage, in bytes."""

    stage: int
    num_blocks: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    #: Communication and pipeline buffers (``implementation="ours"`` only, see `memory_per_gpu`).
    buffers_bytes: float = 0.0

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes + self.buffers_bytes

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in self.to_dict().items() if k.endswith("_bytes")}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


@dataclass(frozen=True)
class MemoryReport:
    """Per-stage memory and the worst stage (what must fit on every GPU)."""

    stages: tuple[StageMemory, ...]
    layout: dict = field(default_factory=dict)

    @property
    def max_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def total_bytes(self) -> float:
        return self.max_stage.total_bytes

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def to_dict(self) -> dict:
        return {
            "layout": dict(self.layout),
            "max_stage": self.max_stage.stage,
            "max": self.max_stage.to_dict(),
            "max_gib": self.max_stage.gib(),
            "stages": [s.to_dict() for s in self.stages],
        }


def split_layers(num_layers: int, pp: int) -> list[int]:
    """Blocks per pipeline stage: even split, the first ``num_layers % pp`` stages get one more."""
    base, extra = divmod(num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")


IMPLEMENTATIONS = ("generic", "ours")


#: DP engine modes (`consumers.data_parallel.DataParallelConfig.sharding`).
SHARDINGS = ("zero1", "zero2", "zero3")
#: ZeRO-3: blocks whose whole parameters are allocated at once on a rank at the peak: the block
#: that runs (a block is freed after its forward, and after its backward before the gradients
#: reach the block before it; tests/consumers/test_zero3.py and test_memory_prediction.py show it).
ZERO3_LIVE_BLOCKS = 1


def memory_per_gpu(
    config: MMDiTConfig,
    tp: int,
    pp: int,
    dp: int,
    micro_batch: int,
    image_tokens: int,
    text_tokens: int,
    params_dtype: str = "bfloat16",
    grad_dtype: str = "float32",
    optimizer: str = "adamw",
    zero1: bool = True,
    recompute: str = "none",
    *,
    sequence_parallel: bool = False,
    condition_image_tokens: int = 0,
    num_microbatches: int | None = None,
    implementation: str = "generic",
    recompute_every: int = 1,
    ema: bool = False,
    gather_depth: int = 2,
    dp_shard: int | None = None,
    sharding: str = "zero1",
    grad_slots: int = 2,
) -> MemoryReport:
    """Estimate training memory of one GPU for every pipeline stage.

    * parameters: the stage's parameters and last-block buffers at `params_dtype`, split over TP
      as described in the module docstring; the first stage holds the embedders and the timestep
      MLP, the last stage the head;
    * gradients: trainable parameters at `grad_dtype` (Megatron's fp32 main-grad buffer; not
      sharded by ZeRO-1);
    * optimizer: ``adamw`` = fp32 master copy (only when `params_dtype` is not float32) + two fp32
      moments; ``sgd`` = master + one fp32 momentum; divided over DP when `zero1` (over
      `dp_shard` under HSDP: sharded over groups of that many DP ranks, replicated across them);
    * activations: `block_activation_bytes` × blocks × micro-batch × micro-batches in flight (1F1B:
      stage i holds ``min(pp − i, num_microbatches)``; `num_microbatches` None means ≥ pp), plus
      the embedder inputs on the first stage and head inputs on the last. With
      ``recompute="full"`` each block keeps only its two input streams and one block's full
      activations are live during its recompute. Activations are in `params_dtype`.

    ``implementation="ours"`` counts instead the tensors this repository's training engine
    allocates (what `megatron_qwenimage.planner` uses; tests/launch/test_memory_prediction.py measures them):

    * activations: `eager_block_activation_bytes` (the model's real saved set), the RoPE tables
      once per forward; ``full`` recompute applies to blocks whose global index is a multiple of
      `recompute_every` (`consumers.recompute.RecomputeConfig.every_n`);
    * `consumers.optimizer.DistributedOptimizer`: fp32 master (always), moments (and EMA when
      `ema`) over the padded flat shard `zero1_shard_numel`; gradients are its ``[dp, S]`` buffer in
      `grad_dtype` (the reduction dtype); ``buffers_bytes`` holds the fp32 copy of the reduced
      shard when `grad_dtype` is not fp32 and, with ``dp > 1``, the reduce-scatter output ``[S]``
      in `grad_dtype` and `gather_depth` rotating all-gather slots, each a send buffer (not for
      fp32 parameters) of the largest DP unit's shard (one block, the embedders, the head) and a
      ``[dp, ·]`` receive buffer, in `params_dtype` (no second full copy of the parameters);
      with ``sharding="zero2"`` the gradients are `grad_slots` one-unit ``[dp, ·]`` slots of the
      largest unit instead of the ``[dp, S]`` buffer, plus their reduce-scatter outputs;
      ``sharding="zero3"`` has zero2's gradients, and its parameters are the peak of what is
      gathered at once: the embedders, the head and `ZERO3_LIVE_BLOCKS` block(s);
    * ``torch.distributed.pipelining``'s receive buffers (``buffers_bytes``): every non-first
      stage one per micro-batch of the step for its inputs (``img``, ``txt``, ``temb``), every
      non-last stage one per micro-batch for its outputs' gradients (`num_microbatches`; pp
      when None).

    Not included: CUDA context, allocator fragmentation, NCCL buffers, transient workspaces
    (attention, GEMM, autograd's activation gradients) and the data batch. Stage counts use
    `split_layers` when `pp` does not divide ``num_layers``.
    """
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("micro_batch", micro_batch)):
        _positive_int(name, value)
    _positive_int("image_tokens", image_tokens)
    _positive_int("recompute_every", recompute_every)
    _positive_int("gather_depth", gather_depth)
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r}: expected one of {SHARDINGS}")
    _positive_int("grad_slots", grad_slots)
    if dp_shard is not None:
        _positive_int("dp_shard", dp_shard)
        if dp % dp_shard:
            raise ValueError(f"dp_shard={dp_shard} does not divide dp={dp}")
    _check_tokens("text_tokens", text_tokens, 0)
    _check_tokens("condition_image_tokens", condition_image_tokens, 0)
    if num_microbatches is not None:
        _positive_int("num_microbatches", num_microbatches)
    if config.num_attention_heads % tp:
        raise ValueError(
            f"tp={tp} must divide num_attention_heads={config.num_attention_heads} "
            "(attention is sharded by whole heads)"
        )
    if pp > config.num_layers:
        raise ValueError(f"pp={pp} is larger than num_layers={config.num_layers}: a stage would hold no block")
    if params_dtype not in DTYPE_BYTES:
        raise ValueError(f"params_dtype={params_dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    if grad_dtype not in DTYPE_BYTES:
        raise ValueError(f"grad_dtype={grad_dtype!r}: expected one of {sorted(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: expected one of {RECOMPUTE}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
    ours = implementation == "ours"

    p_bytes, g_bytes = DTYPE_BYTES[params_dtype], DTYPE_BYTES[grad_dtype]
    opt_per_param = (0 if params_dtype == "float32" else 4) + (8 if optimizer == "adamw" else 4)
    if ours:  # DistributedOptimizer: fp32 master always, AdamW moments, EMA
        opt_per_param = 4 + (8 if optimizer == "adamw" else 4) + (4 if ema else 0)
    d = config.hidden_size
    n = image_tokens + condition_image_tokens
    t = text_tokens

    blocks = block_tensors(config)
    block_params = sum(x.numel_per_rank(tp) for x in blocks)
    last_unused = sum(x.unused_per_rank(tp) for x in blocks)
    first = sum(x.numel_per_rank(tp) for x in first_stage_tensors(config))
    temb = sum(x.numel_per_rank(tp) for x in time_embed_tensors(config))
    head = sum(x.numel_per_rank(tp) for x in last_stage_tensors(config))
    shard_dp = (dp_shard or dp) if zero1 else 1  # HSDP: sharded over dp_shard, replicated across
    block_shard = zero1_shard_numel(blocks, tp, shard_dp)
    first_shard = zero1_shard_numel(first_stage_tensors(config) + time_embed_tensors(config), tp, shard_dp)
    head_shard = zero1_shard_numel(last_stage_tensors(config), tp, shard_dp)

    act_kw = dict(tp=tp, sequence_parallel=sequence_parallel, act_bytes=p_bytes)
    block_bytes = eager_block_activation_bytes if ours else block_activation_bytes
    sp_div = tp if sequence_parallel else 1
    m = pp if num_microbatches is None else num_microbatches
    stages = []
    start = 0
    for i, nb in enumerate(split_layers(config.num_layers, pp)):
        is_first, is_last = i == 0, i == pp - 1
        held = nb * block_params + (first + temb if is_first else 0) + (head if is_last else 0)
        unused = last_unused if is_last else 0
        trainable = held - unused
        buffers = 0.0
        if ours:
            shard = nb * block_shard + (first_shard if is_first else 0) + (head_shard if is_last else 0)
            shard -= -(-unused // shard_dp) if is_last else 0
            optim = shard * opt_per_param
            grads = shard * shard_dp * g_bytes  # the [dp, S] buffer in the reduction dtype
            if g_bytes != 4:  # the reduced shard cast to fp32 for AdamW
                buffers += shard * 4
            if shard_dp > 1:  # reduce-scatter output [S]; per gather slot a send (not fp32) and a receive
                buffers += shard * g_bytes
                units = ([first_shard] if is_first else []) + [block_shard] * nb + ([head_shard] if is_last else [])
                if is_last and unused:
                    units[-2] -= -(-unused // shard_dp)  # the last block's unused text-side tensors
                slots = [max(units[k::gather_depth]) for k in range(min(gather_depth, len(units)))]
                buffers += sum(slots) * ((0 if p_bytes == 4 else p_bytes) + shard_dp * p_bytes)
                if sharding in ("zero2", "zero3"):  # `grad_slots` one-unit [dp, n] slots and their [n] outputs
                    grads = grad_slots * max(units) * shard_dp * g_bytes
                    buffers += grad_slots * max(units) * g_bytes
            stream = (n + t) * d * p_bytes + d * p_bytes  # img, txt, temb of one sample
            buffers += micro_batch * m * stream * ((0 if is_first else 1) + (0 if is_last else 1))
        else:
            grads = trainable * g_bytes
            optim = trainable * opt_per_param
            if zero1:
                optim = math.ceil(optim / shard_dp)

        in_flight = pp - i if num_microbatches is None else min(pp - i, num_microbatches)
        n_full = nb - 1 if is_last else nb  # blocks that are not the trimmed last block
        live = 0.0
        if recompute == "full" and ours:
            recomputed = sum(1 for b in range(start, start + nb) if b % recompute_every == 0)
            kept = nb - recomputed
            full_kept = kept - (1 if is_last and (config.num_layers - 1) % recompute_every else 0)
            per_mb = recomputed * (n + t) * d * p_bytes / sp_div  # saved block inputs, both streams
            per_mb += full_kept * block_bytes(config, n, t, **act_kw)
            if is_last and (config.num_layers - 1) % recompute_every:
                per_mb += block_bytes(config, n, t, last_block=True, **act_kw)
            if recomputed:
                live = block_bytes(config, n, t, **act_kw) * micro_batch  # one block recomputed
        elif recompute == "full":
            per_mb = nb * (n + t) * d * p_bytes / sp_div  # saved block inputs, both streams
            live = block_activation_bytes(config, n, t, **act_kw) * micro_batch  # one block recomputed
        else:
            per_mb = n_full * block_bytes(config, n, t, recompute=recompute, **act_kw)
            if is_last:
                per_mb += block_bytes(config, n, t, recompute=recompute, last_block=True, **act_kw)
        if ours:  # RoPE tables (complex64, [s, 1, 1, head_dim/2]), once per forward
            per_mb += (n + t) * config.attention_head_dim // 2 * 8 / micro_batch
        if is_first:  # img_in input, txt_norm and txt_in inputs (replicated over TP)
            per_mb += (n * config.in_channels + 2 * t * config.joint_attention_dim) * p_bytes
            if ours:  # the timestep MLP's inputs: sinusoid [256], linear_1 output, SiLU output
                per_mb += (TIMESTEP_PROJ_DIM + 2 * d) * p_bytes
        if is_last:  # target tokens, gathered after the blocks: norm_out LN in/out, proj_out input,
            # and the fp32 prediction for the loss
            nt = image_tokens
            per_mb += 3 * nt * d * p_bytes + nt * config.patch_size**2 * config.out_channels * 4
            if ours:  # the LayerNorm's fp32 statistics; SiLU(temb) and 1 + scale per sample
                per_mb += nt * _LN_STATS_BYTES + 2 * d * p_bytes
        activations = per_mb * micro_batch * in_flight + live

        if ours and sharding == "zero3" and shard_dp > 1:
            # Whole parameters only where they are used: the embedders and the head (gathered for
            # a micro-batch's forward and backward) and ZERO3_LIVE_BLOCKS block(s) at once.
            held = min(nb, ZERO3_LIVE_BLOCKS) * block_params + (first + temb if is_first else 0)
            held += head if is_last else 0
            held += unused if nb > ZERO3_LIVE_BLOCKS else 0  # the last block's carried buffers stay
        stages.append(
            StageMemory(
                stage=i,
                num_blocks=nb,
                params_bytes=float(held * p_bytes),
                grads_bytes=float(grads),
                optimizer_bytes=float(optim),
                activation_bytes=float(activations),
                buffers_bytes=float(buffers),
            )
        )
        start += nb
    layout = dict(
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch=micro_batch,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        condition_image_tokens=condition_image_tokens,
        params_dtype=params_dtype,
        grad_dtype=grad_dtype,
        optimizer=optimizer,
        zero1=zero1,
        dp_shard=dp_shard,
        sharding=sharding,
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        num_microbatches=num_microbatches,
    )
    if ours or recompute_every != 1 or ema:
        layout.update(implementation=implementation, recompute_every=recompute_every, ema=ema)
    return MemoryReport(tuple(stages), layout)


def fp8_weight_bytes(config: MMDiTConfig, tp: int, blocks: int) -> float:
    """Transformer Engine's FP8 copies of a stage's block weights (weight and its transpose,
    1 byte each), refreshed every step."""
    return 2.0 * blocks * sum(t.numel_per_rank(tp) for t in block_tensors(config))


def peak_memory_per_gpu(
    config: MMDiTConfig,
    tp: int,
    pp: int,
    dp: int,
    micro_batch: int,
    image_tokens: int,
    text_tokens: int,
    *,
    recompute: str = "none",
    sequence_parallel: bool = False,
    num_microbatches: int | None = None,
    zero1: bool = True,
    fp8: bool = False,
    grad_dtype: str = "float32",
) -> dict[str, float]:
    """Predicted peak bytes per GPU of our training step, by part, for the worst pipeline stage
    (``qwenimage plan`` and ``qwenimage model-info``; within a few % of measured tensors,
    tests/launch/test_memory_prediction.py).

    `memory_per_gpu` with ``implementation="ours"`` (parameters, the ZeRO-1 optimizer's flat
    buffers, activations of the micro-batches in flight, pipeline receive buffers) plus the
    backward working set: autograd's activation gradients of the block being differentiated,
    bounded by one block's saved activations (`eager_block_activation_bytes`) per micro-batch;
    plus FP8 weight copies (`fp8_weight_bytes`) under `fp8`. Keys: params, grads, optimizer,
    activations, buffers, backward_working_set, fp8_weights, total (bytes) and stage.
    """
    report = memory_per_gpu(
        config,
        tp,
        pp,
        dp,
        micro_batch,
        image_tokens,
        text_tokens,
        params_dtype="bfloat16",
        grad_dtype=grad_dtype,
        zero1=zero1,
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        num_microbatches=num_microbatches,
        implementation="ours",
    )
    return peak_of(report, config, fp8=fp8)


def peak_of(report: MemoryReport, config: MMDiTConfig, *, fp8: bool = False) -> dict[str, float]:
    """`peak_memory_per_gpu` from a `memory_per_gpu` report of `config` (``implementation="ours"``):
    its worst stage plus the backward working set and FP8 weight copies, by part."""
    lay = report.layout
    tp, micro_batch = lay["tp"], lay["micro_batch"]
    image_tokens, text_tokens, sequence_parallel = lay["image_tokens"], lay["text_tokens"], lay["sequence_parallel"]
    working = micro_batch * eager_block_activation_bytes(
        config, image_tokens, text_tokens, tp=tp, sequence_parallel=sequence_parallel, act_bytes=2
    )
    best: dict[str, float] | None = None
    for st in report.stages:
        parts = {
            "params": st.params_bytes,
            "grads": st.grads_bytes,
            "optimizer": st.optimizer_bytes,
            "activations": st.activation_bytes,
            "buffers": st.buffers_bytes,
            "backward_working_set": working,
            "fp8_weights": fp8_weight_bytes(config, tp, st.num_blocks) if fp8 else 0.0,
        }
        parts["total"] = sum(parts.values())
        parts["stage"] = st.stage
        if best is None or parts["total"] > best["total"]:
            best = parts
    assert best is not None  # every report has a stage
    return best
