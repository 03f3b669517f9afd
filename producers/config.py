"""Producer configuration: bucket table, validation limits, actor pools, partitioning, faults.

Validated at construction (like `MMDiTConfig`): a bad value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_qwenimage.cache.shard_format import Bucket
from megatron_qwenimage.config import MAX_TEXT_TOKENS, PIXELS_PER_TOKEN_SIDE, ConfigError

#: Aspect ratios (height:width) of every target area's buckets.
ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))
#: The Qwen-Image curriculum's target areas: 256^2 -> 640^2 -> 1328^2 (spec 6.4).
CURRICULUM_AREAS = (256, 640, 1328)


def buckets_for_area(side_px: int) -> list[Bucket]:
    """Buckets of about side_px^2 pixels, one per `ASPECT_RATIOS` entry, sides multiples of 16."""
    out = []
    for rh, rw in ASPECT_RATIOS:
        h = max(1, round(side_px * math.sqrt(rh / rw) / PIXELS_PER_TOKEN_SIDE)) * PIXELS_PER_TOKEN_SIDE
        w = max(1, round(side_px * math.sqrt(rw / rh) / PIXELS_PER_TOKEN_SIDE)) * PIXELS_PER_TOKEN_SIDE
        if Bucket(h, w) not in out:
            out.append(Bucket(h, w))
    return out


def parse_buckets(spec: str) -> dict[str, list[Bucket]]:
    """``"256,640"`` -> curriculum areas; ``"256x256,192x320"`` -> one group of explicit buckets."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"--buckets {spec!r}: expected areas like '256,640' or buckets like '256x256,192x320'")
    if all("x" in p for p in parts):
        return {"custom": [Bucket.parse(p) for p in parts]}
    if any("x" in p for p in parts):
        raise ConfigError(f"--buckets {spec!r}: mix of areas and explicit HxW buckets; use one kind")
    table = {}
    for p in parts:
        try:
            side = int(p)
        except ValueError as exc:
            raise ConfigError(f"--buckets {spec!r}: {p!r} is neither an area side in px nor HxW") from exc
        if side < PIXELS_PER_TOKEN_SIDE:
            raise ConfigError(f"--buckets: area side {side} px is smaller than one 16 px token")
        table[str(side)] = buckets_for_area(side)
    return table


#: The ``qwenimage produce`` flag of each field that has one (named in validation errors).
FIELD_FLAGS = {
    "buckets": "--buckets",
    "partition_size": "--partition-size",
    "min_side_px": "--min-side",
    "max_pixels": "--max-pixels",
    "max_text_tokens": "--max-text-tokens",
    "overlong_caption": "--overlong-caption",
    "sweep_grace_s": "--sweep-grace",
    "snapshot_interval_s": "--snapshot-interval-s",
    "window_partitions": "--window-partitions",
    "max_inflight_partitions": "--max-inflight-partitions",
    "vae_channels_last": "--vae-channels-last",
    "vae_compile": "--vae-compile",
    "vae_conv2d": "--vae-conv2d",
}

#: ``--vae-compile`` values: ``off``, or the ``torch.compile`` mode of the VAE encoder's forward
#: (``default`` is torch's default mode; ``reduce-overhead`` adds CUDA graphs; the ``max-autotune``
#: modes benchmark kernels while compiling, minutes at full size).
VAE_COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_vae_knobs(channels_last: object, compile_mode: object, conv2d: object = False) -> None:
    """`ConfigError` naming the flag unless channels_last and conv2d are bools and compile_mode is
    one of `VAE_COMPILE_MODES`."""
    for flag, field_name, value in (
        ("--vae-channels-last", "vae_channels_last", channels_last),
        ("--vae-conv2d", "vae_conv2d", conv2d),
    ):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} ({field_name}) {value!r}: expected True or False")
    if compile_mode not in VAE_COMPILE_MODES:
        raise ConfigError(
            f"--vae-compile (vae_compile) {compile_mode!r}: expected one of {', '.join(VAE_COMPILE_MODES)}"
        )


def _flag(name: str) -> str:
    return f" ({FIELD_FLAGS[name]})" if name in FIELD_FLAGS else ""


@dataclass(frozen=True)
class PoolConfig:
    """An encoder actor pool, autoscaled by Ray Data between min_actors and max_actors.

    `num_cpus` is fractional on purpose: on a 2-core machine whole-CPU reservations starve the
    read tasks of the same pipeline.
    """

    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.min_actors < 1 or self.max_actors < self.min_actors:
            raise ConfigError(
                f"PoolConfig: need 1 <= min_actors ({self.min_actors}) <= max_actors ({self.max_actors}) "
                "(--vae-actors / --text-actors MIN:MAX)"
            )
        for name, value, flag in (
            ("num_gpus", self.num_gpus, "--gpus-per-actor"),
            ("num_cpus", self.num_cpus, "--cpus-per-actor"),
        ):
            if not value >= 0 or math.isinf(value):
                raise ConfigError(f"PoolConfig.{name}={value!r} ({flag}): expected a finite number >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"PoolConfig.batch_size={self.batch_size!r} (--batch-size): expected an integer >= 1")


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection for tests: kill the process at a point of the write path, once.

    `kill_writer_at`: "shard_written" (mid-partition, some shards written) or "before_commit".
    `kill_scope`: "worker" kills the Ray worker writing the partition (Ray retries the task);
    "driver" kills the whole producer after `after_partitions` commits (rerun to resume).
    `once_marker`: a file path; the fault fires only if it can create it (so a retry succeeds).
    """

    kill_writer_at: str = ""
    kill_scope: str = "worker"
    after_partitions: int = 0
    once_marker: str = ""

    def __post_init__(self) -> None:
        if self.kill_writer_at not in ("", "shard_written", "before_commit"):
            raise ConfigError(
                f"FaultConfig.kill_writer_at={self.kill_writer_at!r}: expected shard_written or before_commit"
            )
        if self.kill_scope not in ("worker", "driver"):
            raise ConfigError(f"FaultConfig.kill_scope={self.kill_scope!r}: expected worker or driver")
        if self.kill_writer_at and self.kill_scope == "worker" and not self.once_marker:
            raise ConfigError("FaultConfig: a worker fault needs once_marker, or every retry would die too")


@dataclass(frozen=True)
class ProducerConfig:
    """Everything `produce` needs besides input, output and encoders.

    Attributes:
        buckets: area name -> buckets; every valid image is encoded once per area.
        partition_size: inputs per partition, the unit of exactly-once commitment.
        min_side_px: shorter sides below this are quarantined as too_small.
        max_pixels: images with more pixels are quarantined as decompression_bomb.
        max_text_tokens: text-conditioning tokens kept after the template prefix (<= 1024).
        overlong_caption: "truncate" (keep the first max_text_tokens, flag it) or "reject".
        edit_vl_area_px: side of the area the edit source image is resized to for Qwen2.5-VL.
        cpu_task_cpus: Ray CPU reservation of one decode/resize task (fractional).
        writer_cpus: Ray CPU reservation of one shard-writer task.
        max_inflight_partitions: bounded queue: partitions read but not yet committed.
        sweep_grace_s: orphan attempts younger than this are left alone by the sweep.
        snapshot_interval_s: while running, publish a manifest snapshot this often (seconds) when
            new partitions were committed since the last one, so tail-mode consumers can start
            early; 0: only the final snapshot. Does not shape samples (not in `fingerprint`).
        window_partitions: partitions per Ray Data execution. Each window starts its encoder pools
            afresh (at the sizes `producers.pool_control` names, if a controller wrote any), so a
            smaller window follows the autoscaler sooner and pays the encoders' start-up more
            often; it also bounds the driver's memory. Does not shape samples.
        vae_channels_last: run the VAE encoder in channels_last_3d memory format (weights and input).
        vae_compile: ``torch.compile`` mode of the VAE encoder's forward, or "off" (`VAE_COMPILE_MODES`).
        vae_conv2d: run the VAE encoder's causal 3-D convolutions as 2-D convolutions over the one
            frame an image is (`producers.encoders.SingleFrameConv`).
            The VAE knobs pick kernels, not settings: latents differ from the default path by
            float rounding only (as between batch sizes or GPU models), so none is in
            `fingerprint` nor in the cache's recorded producer settings.
    """

    buckets: dict[str, list[Bucket]] = field(default_factory=lambda: {"256": buckets_for_area(256)})
    partition_size: int = 64
    min_side_px: int = 32
    max_pixels: int = 64_000_000
    max_text_tokens: int = MAX_TEXT_TOKENS
    overlong_caption: str = "truncate"
    edit_vl_area_px: int = 384
    vae_pool: PoolConfig = PoolConfig()
    text_pool: PoolConfig = PoolConfig()
    cpu_task_cpus: float = 0.25
    writer_cpus: float = 0.25
    max_inflight_partitions: int = 8
    writer_max_retries: int = 3
    sweep_grace_s: float = 3600.0
    snapshot_interval_s: float = 30.0
    window_partitions: int = 256
    vae_channels_last: bool = False
    vae_compile: str = "off"
    vae_conv2d: bool = False
    fault: FaultConfig = FaultConfig()

    def __post_init__(self) -> None:
        if not self.buckets or any(not b for b in self.buckets.values()):
            raise ConfigError("ProducerConfig.buckets (--buckets): need at least one area with at least one bucket")
        for name, value in (
            ("partition_size", self.partition_size),
            ("min_side_px", self.min_side_px),
            ("max_pixels", self.max_pixels),
            ("max_inflight_partitions", self.max_inflight_partitions),
            ("edit_vl_area_px", self.edit_vl_area_px),
            ("window_partitions", self.window_partitions),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ProducerConfig.{name}={value!r}{_flag(name)}: expected a positive integer")
        if not 1 <= self.max_text_tokens <= MAX_TEXT_TOKENS:
            raise ConfigError(
                f"ProducerConfig.max_text_tokens={self.max_text_tokens} (--max-text-tokens): "
                f"expected 1..{MAX_TEXT_TOKENS}"
            )
        if not self.sweep_grace_s >= 0:  # also refuses NaN
            raise ConfigError(
                f"ProducerConfig.sweep_grace_s={self.sweep_grace_s!r} (--sweep-grace): expected seconds >= 0 "
                "(an uncommitted attempt younger than this is left alone by the sweep)"
            )
        if not (0 <= self.snapshot_interval_s < math.inf):  # also refuses NaN
            raise ConfigError(
                f"ProducerConfig.snapshot_interval_s={self.snapshot_interval_s!r} (--snapshot-interval-s): expected "
                "seconds >= 0 (0: only the final snapshot)"
            )
        if self.overlong_caption not in ("truncate", "reject"):
            raise ConfigError(
                f"ProducerConfig.overlong_caption={self.overlong_caption!r} (--overlong-caption): "
                "expected truncate or reject"
            )
        if self.cpu_task_cpus <= 0 or self.writer_cpus <= 0:
            raise ConfigError("ProducerConfig: cpu_task_cpus and writer_cpus must be > 0 (fractional is fine)")
        check_vae_knobs(self.vae_channels_last, self.vae_compile, self.vae_conv2d)

    def fingerprint(self) -> str:
        """What changes the produced samples (buckets, limits); part of partition ids."""
        buckets = ";".join(f"{a}:{','.join(b.name for b in bs)}" for a, bs in sorted(self.buckets.items()))
        return f"b={buckets}|min={self.min_side_px}|max={self.max_pixels}|tok={self.max_text_tokens}|{self.overlong_caption}|vl={self.edit_vl_area_px}"
