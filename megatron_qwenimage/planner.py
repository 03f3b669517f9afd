"""Capacity planner: the TP x PP x DP layout, recompute and micro-batches for a GPU count.

Pure functions and dataclasses; ``qwenimage plan`` (`megatron_qwenimage.commands.plan`) is the
command line. docs/launch.md ("Capacity planner") explains every number and where it comes from.

* Memory per GPU: `megatron_qwenimage.accounting.memory_per_gpu` with
  ``implementation="ours"`` (the tensors this repository's engine allocates, checked against a
  real engine in tests/launch/test_memory_prediction.py), plus FP8 weight copies and the
  backward pass's working set (`predicted_memory`). A layout fits when that is at most the HBM
  minus a stated reserve (fragmentation, NCCL buffers, CUDA context).
* Step time: measured fwd+bwd model TFLOP/s of our training step (the benchmark records in
  ``megatron_qwenimage/gpu_results``; for a GPU without records the H200 ones scaled by the peak-FLOPs
  ratio; a TP shard's from its own records, else the whole block's times `tp_shard_efficiency`)
  and the measured ZeRO-1 optimizer rate, plus TP / PP communication at stated bandwidths, the DP
  communication that the engine's per-block overlap leaves exposed (`dp_overlap`), the 1F1B
  pipeline bubble and the recompute's extra forward (`step_time`).
* Producers: measured VAE and text-encoder rates per GPU (`ProducerRates`).
* Storage: bytes per cached sample from the shard format (`sample_bytes`).
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from megatron_qwenimage import accounting
from megatron_qwenimage.config import PIXELS_PER_TOKEN_SIDE, MMDiTConfig, load_config
from megatron_qwenimage.errors import UserError

GIB = accounting.GIB

#: The JSON lines records of ``benchmarks/gpu/run.py`` and ``train_loop.py`` the planner reads:
#: package data, so an installed wheel plans with the measured rates, not only a checkout.
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "gpu_results"


class PlanError(UserError, ValueError):
    """A bad planner flag, or a GPU count that no layout fits (the message says why)."""


# --------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model.

    Attributes:
        name: planner name (``h100``, ``h200``, ``b200``). label: what NVIDIA calls it.
        hbm_gib: memory a process can allocate (``torch.cuda.get_device_properties().total_memory``;
            the H200's matches the ~139 GiB of our benchmark card, H100 and B200 are the data-sheet
            80 / 180 GB less what the driver keeps, not measured here: ``--hbm-gib`` overrides).
        peak_key: its `accounting.PEAK_TFLOPS` entry (dense bf16 / FP8 from NVIDIA's data sheets).
        hbm_tb_s: HBM bandwidth (data sheet), scales the memory-bound optimizer step.
        intra_node_gb_s: assumed NCCL bus bandwidth inside a node (NVLink), per GPU.
        inter_node_gb_s: assumed NCCL bus bandwidth between nodes, per GPU (one 400 Gb/s NIC each).
    """

    name: str
    label: str
    hbm_gib: float
    peak_key: str
    hbm_tb_s: float
    intra_node_gb_s: float
    inter_node_gb_s: float

    def peak_tflops(self, precision: str) -> float:
        return accounting.PEAK_TFLOPS[self.peak_key][precision]


GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", "NVIDIA H100 SXM 80GB", 79.2, "h100-sxm", 3.35, 360.0, 45.0),
    "h200": GpuSpec("h200", "NVIDIA H200 141GB", 139.8, "h200", 4.8, 360.0, 45.0),
    "b200": GpuSpec("b200", "NVIDIA B200 180GB", 178.4, "b200", 8.0, 720.0, 45.0),
}

#: The card every measured rate of this repository comes from.
MEASURED_GPU = "h200"
#: The most GPUs the planner plans for (2**20): more than any cluster holds, and far beyond what its
#: network model (one intra-node and one inter-node bandwidth) and one global batch describe; a
#: larger ``--gpus`` is a typo, not a plan.
MAX_GPUS = 1 << 20


# --------------------------------------------------------------------------------------------
# Measured rates
# --------------------------------------------------------------------------------------------

#: Fallback when no benchmark record is readable: our training step on one H200, fwd+bwd only,
#: 4-block full-width slice, 256 text tokens (megatron_qwenimage/gpu_results/2026-11-29-h200-run.jsonl and
#: 2026-11-30-h200-run.jsonl; docs/launch.md copies them): (precision, resolution px, micro-batch,
#: fwd+bwd ms of the 4-block slice, the record).
H200_STEP_ANCHORS: tuple[tuple[str, int, int, float, str], ...] = (
    ("bf16", 1024, 2, 70.24, "2026-11-29 ours_te_bf16_fused"),
    ("bf16", 256, 32, 96.94, "2026-11-29 ours_te_bf16_fused (step 101.80 ms less its 4.86 ms optimizer)"),
    ("fp8", 1024, 2, 61.07, "2026-11-30 ours_te_fp8_delayed_graphs"),
    ("fp8", 640, 8, 82.98, "2026-11-30 ours_te_fp8_delayed_nocache (step 95.49 ms less its 12.51 ms optimizer)"),
)
#: The training loop's ZeRO-1 optimizer on one H200: 19.545 ms for the 4-block slice's
#: 1,267,694,016 trainable parameters (2026-11-29-h200-run.jsonl, "what": "optimizer").
H200_OPTIMIZER_PARAMS_PER_S = 1_267_694_016 / 19.545e-3
#: Qwen-Image VAE encode, random weights, bf16, one H200 (2026-11-26): (pixels per side, img/s).
H200_VAE_ANCHORS: tuple[tuple[int, float], ...] = ((512, 97.0), (1024, 23.0))
#: Qwen2.5-VL-7B text tower, random weights, bf16, one H200 (2026-11-26): prompts/s at tokens.
H200_TEXT_ANCHOR: tuple[float, int] = (135.0, 290)
#: Layers of the slice the step anchors were measured on.
ANCHOR_LAYERS = 4


@dataclass(frozen=True)
class RatePoint:
    """One measured fwd+bwd rate: `block_flops` model FLOPs per block per micro-batch on one GPU
    (fwd+bwd; for a TP shard its 1/`tp` share of the whole block's) ran at `tflops` model TFLOP/s;
    `tp`: 1 for the whole block, k for one rank's shard of a TP-k block (``benchmarks/gpu/run.py
    --tp-shard``); `source` names the record."""

    resolution: int
    micro_batch: int
    block_flops: float
    tflops: float
    source: str
    tp: int = 1


def _interpolated_tflops(points: Sequence[RatePoint], block_flops: float) -> float:
    """Model TFLOP/s at `block_flops` per block and micro-batch from `points` (sorted by
    `block_flops`): linear in log(FLOPs) between points, the largest point's rate above them, and
    below the smallest the time per micro-batch of that point (launch-bound: a smaller micro-batch
    is no faster)."""
    lo_pt, hi_pt = points[0], points[-1]
    if block_flops <= lo_pt.block_flops:
        return lo_pt.tflops * block_flops / lo_pt.block_flops
    if block_flops >= hi_pt.block_flops:
        return hi_pt.tflops
    for lo, hi in zip(points, points[1:]):
        if lo.block_flops <= block_flops <= hi.block_flops:
            x = (math.log(block_flops) - math.log(lo.block_flops)) / (
                math.log(hi.block_flops) - math.log(lo.block_flops)
            )
            return lo.tflops + x * (hi.tflops - lo.tflops)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class StepRates:
    """Per-GPU compute rates of our training step for one precision on one GPU model.

    `points` are sorted by (`tp`, `block_flops`); at least one is a whole block's (``tp == 1``).
    `rate` interpolates them (`_interpolated_tflops`); `scale` multiplies every rate (the
    peak-FLOPs ratio for a GPU without records).
    """

    precision: str
    points: tuple[RatePoint, ...]
    optimizer_params_per_s: float
    source: str
    scale: float = 1.0
    notes: tuple[str, ...] = ()

    def measured_tps(self) -> tuple[int, ...]:
        """The TP sizes with a measured shard record (besides the whole block, 1)."""
        return tuple(sorted({p.tp for p in self.points if p.tp > 1}))

    def rate(self, block_flops: float, tp: int = 1, shard_efficiency: float = 1.0) -> float:
        """Model FLOP/s (not TFLOP/s) of one GPU on micro-batches of `block_flops` per block per GPU.

        `tp` = 1: the whole block's measured rates. `tp` = k > 1 (`block_flops` is then one rank's
        1/k share): the records measured on a TP-k shard when there are any (a measurement beats
        the model); else the whole block's rate at the same tokens x micro-batch (``block_flops x
        k`` per block) times `shard_efficiency`, the shard's relative efficiency
        (`tp_shard_efficiency`: 1 for k = 1, below 1 as its GEMMs narrow).
        """
        shard = [p for p in self.points if p.tp == tp and tp > 1]
        if shard:
            return _interpolated_tflops(shard, block_flops) * 1e12 * self.scale
        whole = [p for p in self.points if p.tp == 1]
        return _interpolated_tflops(whole, block_flops * tp) * 1e12 * self.scale * shard_efficiency

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "source": self.source,
            "scale": self.scale,
            "notes": list(self.notes),
            "optimizer_params_per_s": self.optimizer_params_per_s,
            "points": [asdict(p) for p in self.points],
        }


@functools.lru_cache(maxsize=16)
def _slice_config(layers: int) -> MMDiTConfig:
    """The 20B model's width with `layers` blocks (the benchmarks' slices)."""
    return load_config("qwen-image-20b").replace(num_layers=layers)


def _block_flops(config: MMDiTConfig, resolution: int, micro_batch: int, text_tokens: int) -> float:
    tokens = (resolution // PIXELS_PER_TOKEN_SIDE) ** 2
    return accounting.model_flops_per_sample(config, tokens, text_tokens) * micro_batch / config.num_layers


def _precision_of(record: dict) -> str | None:
    """``bf16`` / ``fp8`` for a record of our training step that training can reproduce, else None.

    FP8 records count only when their weights were re-quantized every step (what training does;
    earlier FP8 records reused the first step's FP8 weights, docs/benchmarks.md)."""
    variant = str(record.get("variant", ""))
    if record.get("padded_text") or record.get("skipped") or record.get("error"):
        return None
    if variant.startswith("ours_te_bf16"):
        return "bf16"
    if variant.startswith("ours_te_fp8") and record.get("fp8_weights") == "re-quantized every step":
        return "fp8"
    return None


def read_records(results_dir: str | Path) -> list[tuple[str, dict, dict]]:
    """``(file name, environment record, record)`` for every JSON line of every ``*.jsonl`` in
    `results_dir` (a missing directory or an unreadable line is skipped)."""
    out = []
    path = Path(results_dir)
    if not path.is_dir():
        return out
    for file in sorted(path.glob("*.jsonl")):
        env: dict = {}
        try:
            lines = file.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("what") == "environment":
                env = rec
            out.append((file.name, env, rec))
    return out


def _gpu_of(env: dict) -> str | None:
    key = accounting.gpu_key_from_device_name(str(env.get("device", "")))
    return {"h100-sxm": "h100", "h200": "h200", "b200": "b200"}.get(key or "")


def measured_rates(results_dir: str | Path, gpu: str, precision: str) -> StepRates | None:
    """Our step's fwd+bwd rates on `gpu` from the benchmark records in `results_dir`, or None.

    fwd+bwd time is a record's ``fwd_bwd_ms``; for a record without it, its ``step_ms`` less the
    median ``step_ms - fwd_bwd_ms`` (the benchmark's optimizer) of the same variant in the same
    file (else of the same precision; else nothing is subtracted, which is conservative). Model
    FLOPs are recounted with `accounting.model_flops_per_sample` for the record's slice; a record
    of one rank's TP-k shard (``"tp": k``, ``benchmarks/gpu/run.py --tp-shard``) counts 1/k of
    them. Per (resolution, micro-batch, tp), the fastest qualifying record is kept. None also when
    there is no whole-block (tp 1) record: the shards' rates alone do not make a rate table.
    """
    records = [(f, env, r) for f, env, r in read_records(results_dir) if _gpu_of(env) == gpu]
    steps = [(f, env, r) for f, env, r in records if r.get("what") == "step" and _precision_of(r) == precision]
    if not steps:
        return None
    overhead: dict[tuple, list[float]] = {}
    for f, _, r in records:
        if r.get("what") == "step" and r.get("fwd_bwd_ms") and r.get("step_ms") and _precision_of(r):
            d = r["step_ms"] - r["fwd_bwd_ms"]
            overhead.setdefault((f, r["variant"]), []).append(d)
            overhead.setdefault((f, _precision_of(r)), []).append(d)
    best: dict[tuple[int, int], RatePoint] = {}
    for f, env, r in steps:
        layers = int(env.get("layers", ANCHOR_LAYERS))
        cfg = _slice_config(layers)
        if r.get("fwd_bwd_ms"):
            ms, how = float(r["fwd_bwd_ms"]), "fwd_bwd_ms"
        else:
            extra = overhead.get((f, r["variant"])) or overhead.get((f, precision))
            sub = statistics.median(extra) if extra else 0.0
            ms, how = float(r["step_ms"]) - sub, f"step_ms - {sub:.1f} ms optimizer"
        tp = int(r.get("tp", 1))
        flops = _block_flops(cfg, int(r["res"]), int(r["batch"]), int(r.get("text_tokens", 256))) / tp
        tflops = flops * layers / (ms * 1e-3) / 1e12
        point = RatePoint(int(r["res"]), int(r["batch"]), flops, tflops, f"{f} {r['variant']} ({how})", tp)
        key = (point.resolution, point.micro_batch, point.tp)
        if key not in best or point.tflops > best[key].tflops:
            best[key] = point
    if not any(p.tp == 1 for p in best.values()):
        return None
    opt_rates = [
        accounting.parameter_counts(_slice_config(int(env.get("layers", ANCHOR_LAYERS)))).trainable
        / (r["optimizer_ms"] * 1e-3)
        for f, env, r in records
        if r.get("what") == "optimizer" and r.get("optimizer_ms")
    ]
    files = sorted({f for f, _, _ in steps})
    return StepRates(
        precision=precision,
        points=tuple(sorted(best.values(), key=lambda p: (p.tp, p.block_flops))),
        optimizer_params_per_s=statistics.median(opt_rates) if opt_rates else H200_OPTIMIZER_PARAMS_PER_S,
        source=f"measured on {GPUS[gpu].label}: {Path(results_dir).name}/{{{', '.join(files)}}}",
    )


def anchor_rates(precision: str) -> StepRates:
    """The H200 rates built into this module (docs/launch.md), for when no record is readable."""
    cfg = _slice_config(ANCHOR_LAYERS)
    points = []
    for prec, res, mb, ms, what in H200_STEP_ANCHORS:
        if prec != precision:
            continue
        flops = _block_flops(cfg, res, mb, 256)
        points.append(RatePoint(res, mb, flops, flops * ANCHOR_LAYERS / (ms * 1e-3) / 1e12, f"anchor {what}"))
    return StepRates(
        precision=precision,
        points=tuple(sorted(points, key=lambda p: p.block_flops)),
        optimizer_params_per_s=H200_OPTIMIZER_PARAMS_PER_S,
        source="H200 anchors of docs/launch.md (no benchmark records readable)",
    )


def step_rates(gpu: str, precision: str, results_dir: str | Path | None = DEFAULT_RESULTS_DIR) -> StepRates:
    """Rates for `gpu`: its own records; else the H200's records (or built-in anchors) scaled by
    the ratio of dense peak TFLOP/s at `precision`, the optimizer by the HBM bandwidth ratio."""
    own = measured_rates(results_dir, gpu, precision) if results_dir is not None else None
    if own is not None:
        return own
    base = measured_rates(results_dir, MEASURED_GPU, precision) if results_dir is not None else None
    base = base or anchor_rates(precision)
    if gpu == MEASURED_GPU:
        return base
    spec, ref = GPUS[gpu], GPUS[MEASURED_GPU]
    scale = spec.peak_tflops(precision) / ref.peak_tflops(precision)
    note = (
        f"no {spec.label} records: H200 rates scaled by the peak {precision} TFLOP/s ratio "
        f"{spec.peak_tflops(precision):.0f}/{ref.peak_tflops(precision):.0f} = {scale:.2f}; the optimizer by the "
        f"HBM bandwidth ratio {spec.hbm_tb_s}/{ref.hbm_tb_s} TB/s"
    )
    return replace(
        base,
        scale=scale,
        optimizer_params_per_s=base.optimizer_params_per_s * spec.hbm_tb_s / ref.hbm_tb_s,
        source=f"{base.source}, scaled to {spec.label}",
        notes=(*base.notes, note),
    )


@dataclass(frozen=True)
class ProducerRates:
    """Encoder throughput per producer GPU: VAE img/s interpolated in log-log between the
    measured resolutions (extrapolated with the same slope outside), text prompts/s inversely
    proportional to caption tokens. `scale`: the peak-FLOPs ratio to the measured H200."""

    vae: tuple[tuple[int, float], ...] = H200_VAE_ANCHORS
    text: tuple[float, int] = H200_TEXT_ANCHOR
    scale: float = 1.0

    def vae_images_per_s(self, resolution: int) -> float:
        (r0, v0), (r1, v1) = self.vae[0], self.vae[-1]
        slope = math.log(v1 / v0) / math.log(r1 / r0)
        return v0 * (resolution / r0) ** slope * self.scale

    def text_prompts_per_s(self, tokens: int) -> float:
        rate, at = self.text
        return rate * at / max(tokens, 1) * self.scale


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------

#: bytes of zarr's shard index per inner chunk (offset + length, uint64) and per array (crc32c).
ZARR_INDEX_BYTES_PER_CHUNK = 16
ZARR_INDEX_CRC_BYTES = 4
#: Text-embedding rows per zarr inner chunk (`megatron_qwenimage.cache.shard_format`).
TEXT_CHUNK_ROWS = 256
#: Measured once per shard (tests/launch/test_plan.py checks them): the zarr.json of the group
#: and of its three arrays (~3.3 KB), samples.parquet's schema, footer and attributes (~5.2 KB).
SHARD_FIXED_BYTES = 3_400 + 5_300
#: Once per partition: its commit record (~2.1 KB) and quarantine/duplicates tables (~1.7 KB).
PARTITION_FIXED_BYTES = 2_100 + 1_700
#: A samples.parquet row (zstd): id (64 hex), caption, two URIs, eight numbers. An upper bound
#: for captions of ~1 KB of text; the tiny test captions take far less.
DEFAULT_METADATA_BYTES = 1_024


def metadata_bytes(caption_chars: int, uri_chars: int = 100, id_chars: int = 64) -> int:
    """Upper bound of one samples.parquet row's bytes: its strings uncompressed plus 36 bytes of
    numbers (text_len, offset, flags, sizes, crop) and 8 of parquet's per-value framing."""
    return caption_chars + uri_chars + id_chars + 36 + 8


def sample_bytes(
    resolution: int | tuple[int, int],
    text_tokens: float,
    *,
    latent_channels: int = 16,
    text_dim: int = 3584,
    metadata: float = DEFAULT_METADATA_BYTES,
    condition: bool = False,
) -> dict[str, float]:
    """Bytes one cached sample takes, by part (`megatron_qwenimage.cache.shard_format`).

    Tensors are stored **uncompressed** (zarr ``compressors=None``; bf16 bit patterns), one file
    per array with zarr's sharding codec: latents ``C·(h/8)·(w/8)·2`` plus a 16-byte index entry
    (one inner chunk per sample), text ``tokens·D_txt·2`` plus 16 bytes per 256 rows, the int64
    offset, and (edit samples) condition latents. The parquet row is zstd-compressed; `metadata`
    is its allowance (see `metadata_bytes`). Per shard come `SHARD_FIXED_BYTES` and the padding
    of the text array's last chunk (`text_padding_bytes`), see `shard_bytes`.
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    lat = latent_channels * (h // 8) * (w // 8) * 2 + ZARR_INDEX_BYTES_PER_CHUNK
    parts = {
        "latents": float(lat),
        "condition_latents": float(lat if condition else 0),
        "text_embeddings": text_tokens * text_dim * 2 + ZARR_INDEX_BYTES_PER_CHUNK * text_tokens / TEXT_CHUNK_ROWS,
        "text_offsets": 8.0,
        "metadata": float(metadata),
    }
    parts["total"] = sum(parts.values())
    return parts


def text_padding_bytes(text_dim: int = 3584) -> float:
    """Mean bytes of a shard's padded last text chunk: half of 256 rows."""
    return TEXT_CHUNK_ROWS / 2 * text_dim * 2


def shard_bytes(
    samples: int,
    resolution: int | tuple[int, int],
    text_rows: int,
    *,
    latent_channels: int = 16,
    text_dim: int = 3584,
    metadata: float = DEFAULT_METADATA_BYTES,
) -> float:
    """Bytes of one committed shard of `samples` samples with `text_rows` text rows in all.

    zarr stores the text array's last inner chunk whole: ``ceil(rows / 256)`` chunks of 256 rows
    (`text_padding_bytes` on average per shard)."""
    per = sample_bytes(
        resolution, 0, latent_channels=latent_channels, text_dim=text_dim, metadata=metadata
    )  # without text: the text array is counted whole below
    chunks = max(1, math.ceil(text_rows / TEXT_CHUNK_ROWS))  # the last one is stored whole (padded)
    text = chunks * (TEXT_CHUNK_ROWS * text_dim * 2 + ZARR_INDEX_BYTES_PER_CHUNK)
    # Each array's crc32c; the offsets array's one index entry and its (N + 1)-th offset.
    fixed = SHARD_FIXED_BYTES + 3 * ZARR_INDEX_CRC_BYTES + ZARR_INDEX_BYTES_PER_CHUNK + 8
    return samples * per["total"] + text + fixed


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

RECOMPUTE_MODES = ("none", "selective", "full")
MICRO_BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class PlanInputs:
    """What ``qwenimage plan`` is asked (flags, already parsed and checked by `parse_*`)."""

    gpus: int
    gpu: str
    mix: tuple[tuple[int, float], ...]  # (resolution px, fraction of images), fractions sum to 1
    micro_batch: Mapping[int, int] | None = None  # fixed per resolution, or None to choose
    global_batch: Mapping[int, int] = field(default_factory=dict)  # per resolution; default 1024
    images: int | None = None
    precision: str = "bf16"
    reserve: float = 0.10
    hbm_gib: float | None = None
    text_tokens: int = 256  # per sample, as the model runs (padded)
    caption_tokens: int | None = None  # mean unpadded caption length (storage, text encoder)
    gpus_per_node: int = 8
    sequence_parallel: bool = True
    partition_size: int = 64
    metadata_bytes: float = DEFAULT_METADATA_BYTES
    recompute: tuple[str, ...] = RECOMPUTE_MODES
    intra_node_gb_s: float | None = None
    inter_node_gb_s: float | None = None
    results_dir: str | None = str(DEFAULT_RESULTS_DIR)
    grad_reduce_dtype: str = "float32"  # the engine's data_parallel.grad_reduce_dtype

    @property
    def grad_reduce_bytes(self) -> int:
        """Bytes per gradient element of the DP reduce-scatter (4 fp32, 2 bf16)."""
        return GRAD_REDUCE_BYTES[self.grad_reduce_dtype]

    @property
    def spec(self) -> GpuSpec:
        s = GPUS[self.gpu]
        return replace(
            s,
            hbm_gib=self.hbm_gib or s.hbm_gib,
            intra_node_gb_s=self.intra_node_gb_s or s.intra_node_gb_s,
            inter_node_gb_s=self.inter_node_gb_s or s.inter_node_gb_s,
        )

    @property
    def budget_gib(self) -> float:
        return self.spec.hbm_gib * (1.0 - self.reserve)

    @property
    def captions(self) -> int:
        return self.text_tokens if self.caption_tokens is None else self.caption_tokens

    def global_batch_for(self, resolution: int) -> int:
        return int(self.global_batch.get(resolution, DEFAULT_GLOBAL_BATCH))


DEFAULT_GLOBAL_BATCH = 1024


def _number(flag: str, text: str, kind=float):
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PlanError(f"{flag} {text!r}: expected a number") from None
    if not math.isfinite(value):
        raise PlanError(f"{flag} {text!r}: expected a finite number")
    if kind is int:
        if value != int(value):
            raise PlanError(f"{flag} {text!r}: expected a whole number")
        return int(value)
    return value


def check_resolution(flag: str, value: int) -> int:
    if value <= 0 or value % PIXELS_PER_TOKEN_SIDE:
        raise PlanError(
            f"{flag} {value}: resolution {value} px is not a positive multiple of {PIXELS_PER_TOKEN_SIDE} "
            "(VAE factor 8 x patch 2)"
        )
    return value


def parse_mix(text: str, flag: str = "--resolution-mix") -> tuple[tuple[int, float], ...]:
    """``"256:0.2,640:0.3,1328:0.5"`` -> ((256, 0.2), (640, 0.3), (1328, 0.5)); the fractions of
    images must be positive and sum to 1 (within 1e-6), resolutions distinct multiples of 16 px."""
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    if not items:
        raise PlanError(f"{flag} {text!r}: expected RES:FRACTION[,RES:FRACTION...], e.g. 256:0.2,1328:0.8")
    out: dict[int, float] = {}
    for item in items:
        res_text, sep, frac_text = item.partition(":")
        if not sep:
            raise PlanError(f"{flag} {text!r}: {item!r} is not RES:FRACTION")
        res = check_resolution(flag, _number(flag, res_text, int))
        frac = _number(flag, frac_text)
        if frac <= 0:
            raise PlanError(f"{flag} {text!r}: fraction {frac_text} of {res} px must be positive")
        if res in out:
            raise PlanError(f"{flag} {text!r}: resolution {res} appears twice")
        out[res] = frac
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise PlanError(f"{flag} {text!r}: fractions sum to {total:g}, expected 1")
    return tuple(sorted(out.items()))


def parse_per_resolution(
    text: str, flag: str, resolutions: Sequence[int], *, minimum: int = 1
) -> dict[int, int] | None:
    """``"4"`` (every resolution) or ``"256:32,1328:2"`` -> {resolution: int}; None for empty."""
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip()
    if ":" not in text:
        value = _number(flag, text, int)
        if value < minimum:
            raise PlanError(f"{flag} {text}: expected an integer >= {minimum}")
        return {r: value for r in resolutions}
    out: dict[int, int] = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        res_text, _, value_text = item.partition(":")
        res = check_resolution(flag, _number(flag, res_text, int))
        value = _number(flag, value_text, int)
        if value < minimum:
            raise PlanError(f"{flag} {text}: {item!r}: expected an integer >= {minimum}")
        if res not in resolutions:
            raise PlanError(f"{flag} {text}: resolution {res} is not in --resolution-mix {sorted(resolutions)}")
        out[res] = value
    missing = sorted(set(resolutions) - set(out))
    if missing:
        raise PlanError(f"{flag} {text}: no value for resolution(s) {missing} of --resolution-mix")
    return out


def check_inputs(inputs: PlanInputs) -> None:
    """`PlanError` naming the flag of the first bad value."""
    if inputs.gpu not in GPUS:
        raise PlanError(f"--gpu {inputs.gpu!r}: unknown GPU; expected one of {sorted(GPUS)}")
    for flag, value in (
        ("--gpus", inputs.gpus),
        ("--text-tokens", inputs.text_tokens),
        ("--gpus-per-node", inputs.gpus_per_node),
        ("--partition-size", inputs.partition_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(f"{flag} {value!r}: expected a positive integer")
    if inputs.gpus > MAX_GPUS:
        raise PlanError(
            f"--gpus {inputs.gpus}: expected at most {MAX_GPUS:,} GPUs (2**20, more than any cluster; the planner's "
            "network and batch model mean nothing beyond)"
        )
    if inputs.caption_tokens is not None and inputs.caption_tokens < 1:
        raise PlanError(f"--caption-tokens {inputs.caption_tokens!r}: expected a positive integer")
    if inputs.images is not None and inputs.images < 1:
        raise PlanError(f"--images {inputs.images!r}: expected a positive number of images")
    if not 0 <= inputs.reserve < 1:
        raise PlanError(f"--reserve {inputs.reserve!r}: expected a fraction of HBM in [0, 1)")
    for flag, value in (
        ("--hbm-gib", inputs.hbm_gib),
        ("--intra-node-gbs", inputs.intra_node_gb_s),
        ("--inter-node-gbs", inputs.inter_node_gb_s),
    ):
        if value is not None and not value > 0:
            raise PlanError(f"{flag} {value!r}: expected a positive number")
    if inputs.grad_reduce_dtype not in GRAD_REDUCE_BYTES:
        raise PlanError(
            f"--grad-reduce-dtype {inputs.grad_reduce_dtype!r}: expected one of {', '.join(GRAD_REDUCE_BYTES)}"
        )
    if inputs.precision not in ("bf16", "fp8"):
        raise PlanError(f"--precision {inputs.precision!r}: expected bf16 or fp8")
    for mode in inputs.recompute:
        if mode not in RECOMPUTE_MODES:
            raise PlanError(f"--recompute {mode!r}: expected one of {RECOMPUTE_MODES}")
    if not inputs.mix:
        raise PlanError("--resolution-mix: no resolution")
    if inputs.text_tokens > 1024:
        raise PlanError(f"--text-tokens {inputs.text_tokens}: at most 1024 (Qwen-Image's text limit)")


# --------------------------------------------------------------------------------------------
# Predictions for one layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    recompute: str
    sequence_parallel: bool

    @property
    def name(self) -> str:
        sp = "+SP" if self.sequence_parallel and self.tp > 1 else ""
        return f"tp={self.tp}{sp} pp={self.pp} dp={self.dp} recompute={self.recompute}"


@dataclass(frozen=True)
class BucketPlan:
    """One resolution under one layout and micro-batch: memory and time per optimizer step."""

    resolution: int
    micro_batch: int
    microbatches: int  # per DP rank per step
    global_batch: int  # effective: microbatches * dp * micro_batch
    memory_gib: float
    memory_parts_gib: dict
    fits: bool
    step_s: float
    step_parts_s: dict
    images_per_s: float  # the whole cluster, at this resolution

    def to_dict(self) -> dict:
        return asdict(self)


def predicted_memory(
    config: MMDiTConfig,
    layout: Layout,
    resolution: int,
    micro_batch: int,
    microbatches: int,
    text_tokens: int,
    precision: str = "bf16",
    grad_reduce_dtype: str = "float32",
) -> dict[str, float]:
    """Predicted peak bytes per GPU (worst pipeline stage), by part, of a ``resolution``² bucket:
    `accounting.peak_memory_per_gpu` (parameters, the ZeRO-1 optimizer's flat buffers,
    activations of the micro-batches in flight, pipeline receive buffers, the backward working
    set, FP8 weight copies under ``fp8``)."""
    return accounting.peak_memory_per_gpu(
        config,
        layout.tp,
        layout.pp,
        layout.dp,
        micro_batch,
        (resolution // PIXELS_PER_TOKEN_SIDE) ** 2,
        text_tokens,
        recompute=layout.recompute,
        sequence_parallel=layout.sequence_parallel and layout.tp > 1,
        num_microbatches=microbatches,
        fp8=precision == "fp8",
        grad_dtype=grad_reduce_dtype,
    )


@functools.lru_cache(maxsize=256)
def largest_stage_params(config: MMDiTConfig, tp: int, pp: int) -> int:
    """Trainable parameters one GPU of the largest pipeline stage holds (its TP shard): what the
    optimizer updates and DP reduces and gathers."""
    report = accounting.memory_per_gpu(config, tp, pp, 1, 1, 1, 0, grad_dtype="float32")
    return int(max(s.grads_bytes for s in report.stages)) // 4


def _ring(size: int) -> float:
    """Bytes a ring all-reduce moves per GPU, per byte of the tensor."""
    return 2.0 * (size - 1) / size if size > 1 else 0.0


# --------------------------------------------------------------------------------------------
# Compute rate of a TP shard
# --------------------------------------------------------------------------------------------

#: Bytes of a GEMM's output element (bf16 under both precisions: TE's FP8 GEMMs write bf16).
GEMM_OUTPUT_BYTES = 2


def gemm_time_units(m: int, k: int, n: int, ridge_flop_per_byte: float, operand_bytes: int) -> float:
    """Time of an ``[m, k] @ [k, n]`` GEMM in units of 1 / peak FLOP/s: its FLOPs (``2·m·k·n``) plus
    the bytes it must move at least (both operands read, the output written once) times the GPU's
    ridge point (peak FLOP/s / HBM bytes/s). That is the roofline with no overlap of memory traffic
    and math, a pessimistic bound: the ``max`` of the two, the optimistic one, finds even a TP8
    shard's image-stream GEMMs at 1024 px compute-bound on an H100 (``docs/launch.md``, "TP
    shards"). The backward's two GEMMs of the same weight have the same three matrices, so the
    same cost (bf16)."""
    moved = operand_bytes * (m * k + k * n) + GEMM_OUTPUT_BYTES * m * n
    return 2.0 * m * k * n + ridge_flop_per_byte * moved


def _stream_gemms(config: MMDiTConfig) -> tuple[tuple[int, int, str], ...]:
    """(K, N, TP split) of a block stream's four GEMMs: fused q/k/v and fc1 column-parallel (N
    split), the attention output projection and fc2 row-parallel (K split)."""
    d, f = config.hidden_size, config.ffn_hidden_size
    return ((d, 3 * d, "column"), (d, d, "row"), (d, f, "column"), (f, d, "row"))


def tp_shard_efficiency(
    config: MMDiTConfig,
    tp: int,
    image_tokens: int,
    text_tokens: int,
    micro_batch: int,
    ridge_flop_per_byte: float,
    operand_bytes: int = 2,
) -> float:
    """Model FLOP/s of one rank's TP-`tp` block shard relative to the whole block at the same
    tokens x micro-batch (1 for ``tp == 1``).

    A shard keeps every GEMM's token dimension M (image ``image_tokens x micro_batch``, text
    ``text_tokens x micro_batch``) and divides N (column-parallel) or K (row-parallel) by `tp`; its
    GEMMs' efficiency relative to the whole block's is ``sum(t_whole) / (tp · sum(t_shard))`` with
    `gemm_time_units` (the narrowest, the output projection's K = D/tp, moves the most bytes per
    FLOP). Attention (heads split whole, each head unchanged) and the elementwise work (split by
    heads, MLP width, or by sequence parallelism) are taken to scale as 1/tp. With ``g`` the
    linears' share of the block's model FLOPs standing in for their share of its time (an upper
    bound, so the loss is if anything overstated), the block's efficiency is
    ``1 / (g / gemm_efficiency + 1 - g)``. `operand_bytes`: 2 for bf16, 1 for FP8 inputs.
    """
    if tp == 1:
        return 1.0
    whole = shard = 0.0
    for m in (image_tokens * micro_batch, text_tokens * micro_batch):
        if m == 0:
            continue
        for k, n, split in _stream_gemms(config):
            whole += gemm_time_units(m, k, n, ridge_flop_per_byte, operand_bytes)
            k_local, n_local = (k, n // tp) if split == "column" else (k // tp, n)
            shard += gemm_time_units(m, k_local, n_local, ridge_flop_per_byte, operand_bytes)
    gemm_efficiency = whole / (tp * shard)
    fb = accounting.model_flops_breakdown(config, image_tokens, text_tokens, training=False)
    linears = fb.image_linears + fb.text_linears
    g = linears / (linears + fb.attention)
    return 1.0 / (g / gemm_efficiency + 1.0 - g)


def ridge_point(spec: GpuSpec, precision: str) -> float:
    """The GPU's ops:byte ratio: dense peak FLOP/s at `precision` over HBM bytes/s (FLOP/byte)."""
    return spec.peak_tflops(precision) / spec.hbm_tb_s


# --------------------------------------------------------------------------------------------
# Data-parallel communication and its overlap
# --------------------------------------------------------------------------------------------

#: Bytes per gradient element of the DP reduce-scatter, by ``data_parallel.grad_reduce_dtype``.
GRAD_REDUCE_BYTES = {"float32": 4, "bfloat16": 2}
#: Bytes per parameter element of the DP all-gather after the update (bf16 parameters).
PARAM_GATHER_BYTES = 2
#: Units whose all-gather may be in flight at once (``data_parallel.param_gather_depth``'s default).
PARAM_GATHER_DEPTH = 2


@functools.lru_cache(maxsize=256)
def dp_bucket_params(config: MMDiTConfig, tp: int, pp: int) -> tuple[int, ...]:
    """Trainable parameters one GPU holds per DP bucket of the pipeline stage with the most, in
    forward order: one bucket per block (`consumers.data_parallel.dp_units`). The embedders (first
    stage) are folded into the first block's bucket and the head (last stage) into the last one's:
    the engine's own ``embed`` bucket is reduced right after block 0's (the embedders' backward
    comes last and takes no time to speak of) and gathered right before it, the ``head`` bucket
    the other way round, so on a serial channel folding them changes no finishing time. Sums to
    `largest_stage_params`."""
    blocks = accounting.block_tensors(config)
    per_block = sum(t.numel_per_rank(tp) for t in blocks)
    last_block_unused = sum(t.unused_per_rank(tp) for t in blocks if t.last_block_unused)
    embed = sum(
        t.numel_per_rank(tp) for t in accounting.first_stage_tensors(config) + accounting.time_embed_tensors(config)
    )
    head = sum(t.numel_per_rank(tp) for t in accounting.last_stage_tensors(config))
    stages, first = [], 0
    for index, count in enumerate(accounting.split_layers(config.num_layers, pp)):
        buckets = [per_block] * count
        if first + count == config.num_layers:
            buckets[-1] -= last_block_unused
        if index == 0:
            buckets[0] += embed
        if index == pp - 1:
            buckets[-1] += head
        stages.append(tuple(buckets))
        first += count
    return max(stages, key=sum)


@dataclass(frozen=True)
class DPOverlap:
    """One step's DP communication on one rank's channel (seconds): `reduce_s` / `gather_s` the
    reduce-scatters' and all-gathers' time on the wire, `*_exposed_s` what compute did not hide."""

    reduce_s: float
    gather_s: float
    reduce_exposed_s: float
    gather_exposed_s: float

    @property
    def comm_s(self) -> float:
        return self.reduce_s + self.gather_s

    @property
    def exposed_s(self) -> float:
        return self.reduce_exposed_s + self.gather_exposed_s


def reduce_scatter_exposed(reduce_s: Sequence[float], backward_s: float) -> float:
    """Seconds the gradient reduce-scatters run past the end of the step's backward.

    Buckets in forward order, `reduce_s[k]` seconds each on one serial channel; `backward_s`: one
    block's backward of the last micro-batch. Blocks run their backward last to first, so bucket
    k is ready at ``(n - k) · backward_s``; it starts when it is ready and the channel is free.
    Exposed: ``max(0, channel end - n · backward_s)``; earlier micro-batches only accumulate."""
    n = len(reduce_s)
    channel = 0.0
    for k in reversed(range(n)):
        channel = max(channel, (n - k) * backward_s) + reduce_s[k]
    return max(0.0, channel - n * backward_s)


def all_gather_exposed(gather_s: Sequence[float], forward_s: float, depth: int = PARAM_GATHER_DEPTH) -> float:
    """Seconds the first micro-batch's forward waits for the parameter all-gathers.

    Buckets in forward order, `gather_s[k]` seconds each on one serial channel; `forward_s`: one
    block's forward. At the step's start (right after the update) the first `depth` gathers are
    launched; block k's forward waits for its bucket's gather, and that wait launches bucket
    k + depth's. Exposed: the forward's end less ``n · forward_s`` (the stalls added up)."""
    n = len(gather_s)
    done = [0.0] * n
    channel = 0.0

    def launch(k: int, at: float) -> None:
        nonlocal channel
        channel = max(channel, at) + gather_s[k]
        done[k] = channel

    for k in range(min(depth, n)):
        launch(k, 0.0)
    clock = 0.0
    for k in range(n):
        start = max(clock, done[k])
        if k + depth < n:
            launch(k + depth, start)
        clock = start + forward_s
    return clock - n * forward_s


def dp_overlap(
    bucket_params: Sequence[int],
    dp: int,
    bandwidth_gb_s: float,
    forward_s: float,
    backward_s: float,
    *,
    grad_reduce_bytes: int = GRAD_REDUCE_BYTES["float32"],
    depth: int = PARAM_GATHER_DEPTH,
) -> DPOverlap:
    """DP communication of one step and the part of it compute does not hide (`DPOverlap`).

    Per bucket (`dp_bucket_params`, per GPU), a ring reduce-scatter of its gradients
    (`grad_reduce_bytes` each) and a ring all-gather of its bf16 parameters, each moving
    ``(dp - 1) / dp`` of the bucket's bytes at `bandwidth_gb_s`; `reduce_scatter_exposed` during
    the last micro-batch's backward (`backward_s` per block), `all_gather_exposed` during the first
    one's forward (`forward_s` per block). Nothing at ``dp == 1``."""
    if dp <= 1:
        return DPOverlap(0.0, 0.0, 0.0, 0.0)
    per_byte = (dp - 1) / dp / (bandwidth_gb_s * 1e9)
    reduce_s = [p * grad_reduce_bytes * per_byte for p in bucket_params]
    gather_s = [p * PARAM_GATHER_BYTES * per_byte for p in bucket_params]
    return DPOverlap(
        reduce_s=sum(reduce_s),
        gather_s=sum(gather_s),
        reduce_exposed_s=reduce_scatter_exposed(reduce_s, backward_s),
        gather_exposed_s=all_gather_exposed(gather_s, forward_s, depth),
    )


def step_time(
    config: MMDiTConfig,
    layout: Layout,
    resolution: int,
    micro_batch: int,
    microbatches: int,
    text_tokens: int,
    rates: StepRates,
    spec: GpuSpec,
    gpus_per_node: int = 8,
    *,
    grad_reduce_bytes: int = GRAD_REDUCE_BYTES["float32"],
    param_gather_depth: int = PARAM_GATHER_DEPTH,
) -> dict[str, float]:
    """Seconds of one optimizer step, by part.

    * ``compute``: (m + pp - 1) micro-batch slots of the slowest stage (1F1B: m micro-batches
      plus the bubble), each ``fwd+bwd FLOPs / (tp · pp) / rate``, the rate measured for that
      per-GPU work (`StepRates.rate`; a TP shard's from records of that shard, else the whole
      block's times `tp_shard_efficiency`); full recompute adds one forward (1/3 of fwd+bwd),
      selective the attention's forward;
    * ``tp_comm``: per block and micro-batch four all-reduces (or all-gather + reduce-scatter
      pairs with SP) of both streams' ``tokens · D`` bf16 activations (attention output and MLP,
      forward and backward) at the intra-node bandwidth, not overlapped;
    * ``pp_comm``: per micro-batch slot the stage boundary's img + txt activations forward and
      their gradients backward (inter-node when a pipeline group leaves the node);
    * ``dp_comm``: the DP channel's busy time: per bucket (`dp_bucket_params`) the gradient
      reduce-scatter (`grad_reduce_bytes` per element: 4 fp32, 2 bf16) and the bf16 parameter
      all-gather of the stage's parameters over DP (inter-node when the DP group leaves the node);
    * ``dp_exposed``: the part of ``dp_comm`` that compute does not hide (`dp_overlap`): the
      reduce-scatters overlap the last micro-batch's backward of the stage's blocks (1/3 of a
      block's fwd+bwd is forward, the rest and any recompute backward; half its TP communication
      in each), the all-gathers the first micro-batch's forward, `param_gather_depth` ahead;
    * ``optimizer``: the ZeRO-1 shard's update at the measured parameters/s.

    ``total`` = compute + tp_comm + pp_comm + dp_exposed + optimizer.
    """
    n_img = (resolution // PIXELS_PER_TOKEN_SIDE) ** 2
    tokens = n_img + text_tokens
    fb = accounting.model_flops_breakdown(config, n_img, text_tokens, training=True)
    per_gpu_mb = fb.total * micro_batch / (layout.tp * layout.pp)
    block_flops = per_gpu_mb * layout.pp / config.num_layers
    operand_bytes = 1 if rates.precision == "fp8" else 2
    efficiency = tp_shard_efficiency(
        config, layout.tp, n_img, text_tokens, micro_batch, ridge_point(spec, rates.precision), operand_bytes
    )
    plain_mb = per_gpu_mb / rates.rate(block_flops, layout.tp, efficiency)
    compute_mb = plain_mb
    if layout.recompute == "full":
        compute_mb *= 4.0 / 3.0
    elif layout.recompute == "selective":
        compute_mb *= 1.0 + fb.attention / fb.total
    stage_blocks = math.ceil(config.num_layers / layout.pp)
    act = tokens * micro_batch * config.hidden_size * 2
    tp_comm = stage_blocks * 4 * act * _ring(layout.tp) / (spec.intra_node_gb_s * 1e9)
    pp_bw = spec.inter_node_gb_s if layout.tp * layout.dp >= gpus_per_node else spec.intra_node_gb_s
    pp_comm = (2 * act / (pp_bw * 1e9)) if layout.pp > 1 else 0.0
    slots = microbatches + layout.pp - 1
    stage_params = largest_stage_params(config, layout.tp, layout.pp)
    dp_bw = spec.inter_node_gb_s if layout.tp * layout.dp > gpus_per_node else spec.intra_node_gb_s
    forward_block = (plain_mb / 3 + tp_comm / 2) / stage_blocks
    backward_block = (compute_mb - plain_mb / 3 + tp_comm / 2) / stage_blocks
    dp = dp_overlap(
        dp_bucket_params(config, layout.tp, layout.pp),
        layout.dp,
        dp_bw,
        forward_block,
        backward_block,
        grad_reduce_bytes=grad_reduce_bytes,
        depth=param_gather_depth,
    )
    optimizer = stage_params / layout.dp / rates.optimizer_params_per_s
    parts = {
        "compute": slots * compute_mb,
        "tp_comm": slots * tp_comm,
        "pp_comm": slots * pp_comm,
        "bubble_share": (layout.pp - 1) / slots,
        "dp_comm": dp.comm_s,
        "dp_exposed": dp.exposed_s,
        "dp_reduce_exposed": dp.reduce_exposed_s,
        "dp_gather_exposed": dp.gather_exposed_s,
        "optimizer": optimizer,
    }
    parts["total"] = parts["compute"] + parts["tp_comm"] + parts["pp_comm"] + dp.exposed_s + optimizer
    return parts


def plan_bucket(
    config: MMDiTConfig,
    layout: Layout,
    resolution: int,
    micro_batch: int,
    inputs: PlanInputs,
    rates: StepRates,
) -> BucketPlan:
    g = inputs.global_batch_for(resolution)
    # 1F1B needs at least pp micro-batches per step (consumers.pipeline.PipelineRunner).
    m = max(layout.pp, math.ceil(g / (layout.dp * micro_batch)))
    mem = predicted_memory(
        config, layout, resolution, micro_batch, m, inputs.text_tokens, inputs.precision, inputs.grad_reduce_dtype
    )
    t = step_time(
        config,
        layout,
        resolution,
        micro_batch,
        m,
        inputs.text_tokens,
        rates,
        inputs.spec,
        inputs.gpus_per_node,
        grad_reduce_bytes=inputs.grad_reduce_bytes,
    )
    eff = m * layout.dp * micro_batch
    return BucketPlan(
        resolution=resolution,
        micro_batch=micro_batch,
        microbatches=m,
        global_batch=eff,
        memory_gib=mem["total"] / GIB,
        memory_parts_gib={k: (v / GIB if k != "stage" else v) for k, v in mem.items()},
        fits=mem["total"] <= inputs.budget_gib * GIB,
        step_s=t["total"],
        step_parts_s=t,
        images_per_s=eff / t["total"],
    )


@dataclass(frozen=True)
class LayoutPlan:
    """A layout with its best micro-batch per resolution (or the smallest when none fits)."""

    layout: Layout
    buckets: tuple[BucketPlan, ...]
    mix: tuple[tuple[int, float], ...]

    @property
    def fits(self) -> bool:
        return all(b.fits for b in self.buckets)

    @property
    def memory_gib(self) -> float:
        return max(b.memory_gib for b in self.buckets)

    @property
    def worst_bucket(self) -> BucketPlan:
        return max(self.buckets, key=lambda b: b.memory_gib)

    @property
    def images_per_s(self) -> float:
        """Images/s of the whole mix: the harmonic mean of the buckets' rates by image fraction."""
        seconds_per_image = sum(frac / b.images_per_s for (_, frac), b in zip(self.mix, self.buckets))
        return 1.0 / seconds_per_image

    @property
    def step_s(self) -> float:
        """Mean seconds per optimizer step over the run (steps weighted by their image share)."""
        return self.mean_step_part("total")

    def mean_step_part(self, key: str) -> float:
        """Mean over the run's optimizer steps of one `step_time` part (seconds), steps weighted as
        in `step_s`."""
        steps = [frac / b.global_batch for (_, frac), b in zip(self.mix, self.buckets)]
        return sum(s * b.step_parts_s[key] for s, b in zip(steps, self.buckets)) / sum(steps)

    def model_tflops_per_gpu(self, config: MMDiTConfig, text_tokens: int, gpus: int) -> float:
        """Model TFLOP/s (fwd+bwd, `accounting.model_flops_per_sample`) per GPU at the predicted
        images/s: the mix's mean FLOPs per image times images/s, over the GPUs."""
        per_image = sum(
            frac * accounting.model_flops_per_sample(config, (res // PIXELS_PER_TOKEN_SIDE) ** 2, text_tokens)
            for res, frac in self.mix
        )
        return per_image * self.images_per_s / gpus / 1e12

    def summary(self) -> dict:
        lay = self.layout
        return {
            "tp": lay.tp,
            "pp": lay.pp,
            "dp": lay.dp,
            "sequence_parallel": lay.sequence_parallel and lay.tp > 1,
            "recompute": lay.recompute,
            "micro_batch": {str(b.resolution): b.micro_batch for b in self.buckets},
            "memory_gib": self.memory_gib,
            "images_per_s": self.images_per_s,
            "fits": self.fits,
        }


def best_layout_plan(config: MMDiTConfig, layout: Layout, inputs: PlanInputs, rates: StepRates) -> LayoutPlan:
    """Per resolution, the micro-batch with the most images/s among those that fit (ties: the
    smaller memory); when none fits, the one with the least memory (to say by how much)."""
    buckets = []
    for res, _ in inputs.mix:
        g = inputs.global_batch_for(res)
        if inputs.micro_batch is not None:
            choices = [inputs.micro_batch[res]]
        else:
            # Micro-batches that split the global batch into at least pp micro-batches per rank.
            choices = [b for b in MICRO_BATCH_CHOICES if b * layout.dp * layout.pp <= g] or [1]
        options = [plan_bucket(config, layout, res, b, inputs, rates) for b in choices]
        fitting = [o for o in options if o.fits]
        if fitting:
            buckets.append(max(fitting, key=lambda o: (o.images_per_s, -o.memory_gib)))
        else:
            buckets.append(min(options, key=lambda o: o.memory_gib))
    return LayoutPlan(layout, tuple(buckets), inputs.mix)


def candidate_layouts(config: MMDiTConfig, inputs: PlanInputs) -> list[Layout]:
    """Every layout ``qwenimage train`` accepts on `inputs.gpus` GPUs: TP divides the heads and
    stays inside a node, PP divides the blocks (`consumers.parallel.ParallelLayout.validate_for`),
    DP fills the rest; each with every recompute mode asked for."""
    out = []
    for tp in range(1, min(inputs.gpus, inputs.gpus_per_node) + 1):
        if config.num_attention_heads % tp or inputs.gpus % tp:
            continue
        for pp in range(1, config.num_layers + 1):
            if config.num_layers % pp or inputs.gpus % (tp * pp):
                continue
            for mode in inputs.recompute:
                out.append(Layout(tp, pp, inputs.gpus // (tp * pp), mode, inputs.sequence_parallel))
    return out


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerUp:
    plan: LayoutPlan
    why: str

    def to_dict(self) -> dict:
        return {**self.plan.summary(), "why": self.why}


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    chosen: LayoutPlan
    runners_up: tuple[RunnerUp, ...]
    considered: int
    fitting: int
    rates: StepRates
    producers: dict
    storage: dict
    notes: tuple[str, ...]
    model_tflops_per_gpu: float = 0.0  # fwd+bwd model TFLOP/s per GPU at the predicted images/s

    def to_dict(self) -> dict:
        c = self.chosen
        spec = self.inputs.spec
        peak = spec.peak_tflops(self.inputs.precision)
        out = {
            **c.summary(),
            "gpus": self.inputs.gpus,
            "gpu": self.inputs.gpu,
            "resolution_mix": {str(r): f for r, f in self.inputs.mix},
            "gpu_label": spec.label,
            "precision": self.inputs.precision,
            "hbm_gib": spec.hbm_gib,
            "reserve": self.inputs.reserve,
            "budget_gib": self.inputs.budget_gib,
            "step_s": c.step_s,
            "dp_comm_s": c.mean_step_part("dp_comm"),
            "dp_exposed_s": c.mean_step_part("dp_exposed"),
            "grad_reduce_dtype": self.inputs.grad_reduce_dtype,
            "model_tflops_per_gpu": self.model_tflops_per_gpu,
            "peak_tflops": peak,
            "mfu": self.model_tflops_per_gpu / peak,
            "producer_gpus": self.producers["gpus"],
            "buckets": [b.to_dict() for b in c.buckets],
            "runners_up": [r.to_dict() for r in self.runners_up],
            "layouts_considered": self.considered,
            "layouts_fitting": self.fitting,
            "criterion": "most predicted images/s over the resolution mix among layouts whose predicted peak "
            "memory per GPU fits the budget; ties: less memory",
            "rates": self.rates.to_dict(),
            "producers": self.producers,
            "storage": self.storage,
            "notes": list(self.notes),
        }
        if self.inputs.images:
            out["images"] = self.inputs.images
            out["train_days"] = self.inputs.images / c.images_per_s / 86400
        return out


def producer_plan(inputs: PlanInputs, images_per_s: float) -> dict:
    """Producer GPUs that keep `images_per_s` fed: per image one VAE encode at its resolution
    and one text-encoder pass over its caption (measured rates, `ProducerRates`)."""
    scale = 1.0
    if inputs.gpu != MEASURED_GPU:
        scale = inputs.spec.peak_tflops("bf16") / GPUS[MEASURED_GPU].peak_tflops("bf16")
    rates = ProducerRates(scale=scale)
    text_rate = rates.text_prompts_per_s(inputs.captions)
    per_res = {}
    vae_s = 0.0
    for res, frac in inputs.mix:
        v = rates.vae_images_per_s(res)
        per_res[str(res)] = {"vae_images_per_s_per_gpu": v, "fraction": frac}
        vae_s += frac / v
    text_s = 1.0 / text_rate
    gpu_s = vae_s + text_s
    need = images_per_s * gpu_s
    return {
        "gpus": max(1, math.ceil(need)),
        "gpus_exact": need,
        "vae_gpus": images_per_s * vae_s,
        "text_gpus": images_per_s * text_s,
        "text_prompts_per_s_per_gpu": text_rate,
        "caption_tokens": inputs.captions,
        "per_resolution": per_res,
        "images_per_s_per_gpu": 1.0 / gpu_s,
        "scale": scale,
        "source": "H200, 2026-11-26: VAE 97 img/s at 512 px and 23 img/s at 1024 px; Qwen2.5-VL-7B text tower "
        "135 prompts/s at 290 tokens (random weights, bf16)"
        + ("" if scale == 1.0 else f"; scaled by the peak bf16 TFLOP/s ratio {scale:.2f}"),
    }


def storage_plan(inputs: PlanInputs, images_per_s: float, producer_gpus: int, producer_rate: float) -> dict:
    """Cache bytes per sample and in total, and the read / write bandwidths at the planned rates."""
    per_res = {}
    mean = 0.0
    for res, frac in inputs.mix:
        parts = sample_bytes(res, inputs.captions, metadata=inputs.metadata_bytes)
        shard_samples = max(1.0, inputs.partition_size * frac)
        fixed = (SHARD_FIXED_BYTES + text_padding_bytes()) / shard_samples
        fixed += PARTITION_FIXED_BYTES / inputs.partition_size
        total = parts["total"] + fixed
        per_res[str(res)] = {**parts, "per_sample_fixed": fixed, "total": total, "fraction": frac}
        mean += frac * total
    out = {
        "bytes_per_sample": per_res,
        "mean_bytes_per_sample": mean,
        "read_gb_s": images_per_s * mean / 1e9,
        "read_gb_s_per_node": images_per_s * mean / 1e9 / max(1, inputs.gpus // inputs.gpus_per_node),
        "write_gb_s": images_per_s * mean / 1e9,
        "write_gb_s_producers_at_full_rate": producer_gpus * producer_rate * mean / 1e9,
        "compression": "none for tensors (zarr compressors=None, bf16 bit patterns); zstd for samples.parquet",
        "caption_tokens": inputs.captions,
        "text_dim": 3584,
        "latent_channels": 16,
    }
    if inputs.images:
        out["images"] = inputs.images
        out["cache_bytes"] = inputs.images * mean
        out["cache_tib"] = inputs.images * mean / 1024**4
    return out


def make_plan(inputs: PlanInputs, config: MMDiTConfig | None = None, *, runners_up: int = 8) -> Plan:
    """Choose the layout for `inputs` (see the module docstring); `PlanError` when none fits."""
    check_inputs(inputs)
    config = config or load_config("qwen-image-20b")
    rates = step_rates(inputs.gpu, inputs.precision, inputs.results_dir)
    if not rates.points:
        raise PlanError(f"--precision {inputs.precision}: no measured rate for it (benchmark records or anchors)")
    layouts = candidate_layouts(config, inputs)
    if not layouts:
        raise PlanError(
            f"--gpus {inputs.gpus}: no TP x PP x DP layout of {config.num_attention_heads} heads and "
            f"{config.num_layers} blocks uses exactly {inputs.gpus} GPUs"
        )
    plans = [best_layout_plan(config, lay, inputs, rates) for lay in layouts]
    fitting = sorted((p for p in plans if p.fits), key=lambda p: (-p.images_per_s, p.memory_gib))
    budget = inputs.budget_gib
    if not fitting:
        smallest = min(plans, key=lambda p: p.memory_gib)
        b = smallest.worst_bucket
        raise PlanError(
            f"--gpus {inputs.gpus} --gpu {inputs.gpu}: no layout fits: the smallest predicted peak is "
            f"{smallest.memory_gib:.1f} GiB per GPU ({smallest.layout.name}, micro-batch {b.micro_batch} at "
            f"{b.resolution} px) > budget {budget:.1f} GiB ({inputs.spec.hbm_gib:g} GiB HBM less "
            f"--reserve {inputs.reserve:g}); add GPUs or lower --text-tokens"
        )
    chosen = fitting[0]
    ups: list[RunnerUp] = []
    for p in fitting[1 : 1 + runners_up]:
        loss = 1 - p.images_per_s / chosen.images_per_s
        ups.append(RunnerUp(p, f"slower: {p.images_per_s:.1f} img/s vs {chosen.images_per_s:.1f} ({loss:.1%} less)"))
    not_fitting = sorted((p for p in plans if not p.fits), key=lambda p: p.memory_gib)
    for p in not_fitting[: max(3, runners_up // 2)]:
        b = max((b for b in p.buckets if not b.fits), key=lambda b: b.memory_gib)
        ups.append(
            RunnerUp(
                p,
                f"doesn't fit: predicted {b.memory_gib:.1f} GiB > budget {budget:.1f} GiB "
                f"({b.resolution} px, micro-batch {b.micro_batch})",
            )
        )
    producers = producer_plan(inputs, chosen.images_per_s)
    storage = storage_plan(inputs, chosen.images_per_s, producers["gpus"], producers["images_per_s_per_gpu"])
    notes = list(rates.notes)
    if inputs.gpu != MEASURED_GPU:
        notes.append(
            f"producer rates: H200 measurements scaled by the peak bf16 TFLOP/s ratio {producers['scale']:.2f}"
        )
    notes.append(
        f"budget {budget:.1f} GiB = {inputs.spec.hbm_gib:g} GiB HBM less {inputs.reserve:.0%} reserved for allocator "
        "fragmentation, NCCL buffers and the CUDA context (--reserve)"
    )
    notes.append(
        f"communication is not measured: TP at {inputs.spec.intra_node_gb_s:g} GB/s inside a node (not overlapped), "
        f"DP/PP across nodes at {inputs.spec.inter_node_gb_s:g} GB/s per GPU (--intra-node-gbs, --inter-node-gbs)"
    )
    notes.append(dp_overlap_note(chosen, inputs))
    if chosen.layout.tp > 1:
        notes.append(tp_rate_note(config, chosen, inputs, rates))
    return Plan(
        inputs=inputs,
        chosen=chosen,
        runners_up=tuple(ups),
        considered=len(plans),
        fitting=len(fitting),
        rates=rates,
        producers=producers,
        storage=storage,
        notes=tuple(notes),
        model_tflops_per_gpu=chosen.model_tflops_per_gpu(config, inputs.text_tokens, inputs.gpus),
    )


def dp_overlap_note(chosen: LayoutPlan, inputs: PlanInputs) -> str:
    """The notes' line on the chosen layout's DP communication: busy and exposed seconds per step
    (means over the run's steps) and how the overlap is modelled."""
    comm, exposed = chosen.mean_step_part("dp_comm"), chosen.mean_step_part("dp_exposed")
    if chosen.layout.dp == 1:
        return "no DP communication (dp=1)"
    reduce, gather = chosen.mean_step_part("dp_reduce_exposed"), chosen.mean_step_part("dp_gather_exposed")
    hidden = 1 - exposed / comm if comm else 1.0
    return (
        f"DP communication {comm:.3f} s per step, {exposed:.3f} s exposed ({hidden:.0%} hidden; modelled overlap: "
        f"a {inputs.grad_reduce_dtype} gradient reduce-scatter per block during the last micro-batch's backward, "
        f"{reduce:.3f} s past its end; bf16 parameter all-gathers {PARAM_GATHER_DEPTH} blocks ahead of the first "
        f"micro-batch's forward, {gather:.3f} s of stalls; --grad-reduce-dtype)"
    )


def tp_rate_note(config: MMDiTConfig, chosen: LayoutPlan, inputs: PlanInputs, rates: StepRates) -> str:
    """The notes' line on where the chosen TP shard's compute rate comes from."""
    tp = chosen.layout.tp
    if tp in rates.measured_tps():
        return f'compute at tp={tp}: the rates measured on a TP{tp} shard (records with "tp": {tp})'
    ridge = ridge_point(inputs.spec, inputs.precision)
    operand_bytes = 1 if inputs.precision == "fp8" else 2
    efficiencies = []
    for b in chosen.buckets:
        n_img = (b.resolution // PIXELS_PER_TOKEN_SIDE) ** 2
        eff = tp_shard_efficiency(config, tp, n_img, inputs.text_tokens, b.micro_batch, ridge, operand_bytes)
        efficiencies.append(f"{b.resolution} px x {eff:.2f}")
    per_res = ", ".join(efficiencies)
    return (
        f"compute at tp={tp}: no TP{tp}-shard record, so the whole block's rate at the same tokens x micro-batch times "
        f"its shard's modelled efficiency ({per_res}: its GEMMs at 1/{tp} width on a no-overlap roofline, ridge "
        f"{ridge:.0f} FLOP/byte); benchmarks/gpu/run.py --tp-shard {tp} measures it"
    )


def iter_layout_plans(inputs: PlanInputs, config: MMDiTConfig | None = None) -> Iterable[LayoutPlan]:
    """Every candidate layout's plan (for tests and exploration)."""
    check_inputs(inputs)
    config = config or load_config("qwen-image-20b")
    rates = step_rates(inputs.gpu, inputs.precision, inputs.results_dir)
    for lay in candidate_layouts(config, inputs):
        yield best_layout_plan(config, lay, inputs, rates)
