"""The training run's configuration: `RunConfig` (one typed section per concern) and `preflight`.

``qwenimage train --config run.yaml`` (`consumers.train`) reads it; the YAML has one section per
concern::

    model: tiny-16ch                 # a named config, or {name: qwen-image-20b, <MMDiTConfig overrides>}
    parallel: {tp: 2, pp: 2, vpp: 1, sequence_parallel: true}   # dp = world / (tp * pp); dp_shard: K for HSDP
    optimizer: {lr: 1.0e-4, warmup_steps: 1000, decay_steps: 100000, clip_grad: 1.0, ema_decay: 0.9999}
    data_parallel: {overlap_grad_reduce: true, overlap_param_gather: true, grad_reduce_dtype: float32, sharding: zero1}
    precision: {autocast: bf16, fp8: null}
    recompute: {mode: none}
    cuda_graphs: {scope: none}       # blocks: per-block CUDA graphs (GPU, TP 1, PP 1)
    flow_matching: {kind: logit_normal, mean: 0.0, std: 1.0}
    data: {...}                      # megatron_qwenimage.data.reader_config.ReaderConfig
    schedule: {train_steps: 1000, seed: 0, eval_interval: 100, eval_sigmas: [0.25, 0.5, 0.75]}
    checkpoint: {dir: ckpt/, interval: 100, keep_last: 3, resume: auto}   # auto | required | never
    logging: {dir: runs/x, interval: 10, prometheus_port: 9400}

Every section is a typed dataclass validated at construction (`RunConfig` lists them); an
unknown key or a bad value is a `ConfigError` naming ``section.key``. Numeric strings (PyYAML reads ``1e-3`` as one) become
numbers where the field is numeric. Before step 0 (before torch.distributed starts) `preflight`
checks what the config names on disk: the caches exist, their latents and text embeddings fit the
model, and the checkpoint / logging / export paths are not regular files.

The CLI glue and the loop live above this module: `consumers.train` (``qwenimage train``) and
`consumers.trainer.Trainer`; both import it, it imports neither.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumers.data_parallel import DataParallelConfig
from consumers.graphs import CudaGraphConfig, check_cuda_graph_layout
from megatron_qwenimage.config import ConfigError, MMDiTConfig, coerce_fields, load_config, read_yaml
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.flow_matching import ResolutionShift
from megatron_qwenimage.layout import ParallelConfig

if TYPE_CHECKING:
    from consumers.checkpoint import CheckpointConfig
    from consumers.metrics import LoggingConfig
    from consumers.optimizer import OptimizerConfig
    from consumers.precision import PrecisionConfig
    from consumers.recompute import RecomputeConfig
    from megatron_qwenimage.data.reader_config import ReaderConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    """Loop settings.

    Attributes:
        train_steps: optimizer steps in total (a resume continues up to it).
        seed: seed of σ/noise draws (per step and global sample index).
        init_seed: model initialisation seed.
        eval_interval: validation every N steps (0: never); needs ``data.validation``.
        eval_sigmas: the fixed σ grid of validation.
        text_pad_multiple: pad each step's text to a multiple of this (fewer distinct shapes).
        export_diffusers: write the final model as a diffusers directory here (None: skip).
    """

    train_steps: int
    seed: int = 0
    init_seed: int = 0
    eval_interval: int = 0
    eval_sigmas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    text_pad_multiple: int = 8
    export_diffusers: str | None = None

    def __post_init__(self) -> None:
        values = coerce_fields(ScheduleConfig, {f.name: getattr(self, f.name) for f in fields(self)}, "schedule")
        for name, value in values.items():
            object.__setattr__(self, name, value)
        for name in ("train_steps", "text_pad_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"schedule.{name}={v!r}: expected a positive integer")
        for name in ("seed", "init_seed", "eval_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"schedule.{name}={v!r}: expected an integer >= 0")
        if not self.eval_sigmas or any(not 0 <= s <= 1 for s in self.eval_sigmas):
            raise ConfigError(f"schedule.eval_sigmas={self.eval_sigmas!r}: expected σ values in [0, 1]")


def _mapping(data: Any, where: str) -> dict:
    """A section's mapping (an absent or empty section is ``{}``); `ConfigError` if it is not one."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    return dict(data)


def _section(cls, data: Any, where: str, **extra):
    data = _mapping(data, where)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    missing = [
        f.name
        for f in fields(cls)
        if f.init
        and f.default is MISSING
        and f.default_factory is MISSING
        and f.name not in data
        and f.name not in extra
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key missing")
    try:
        return cls(**coerce_fields(cls, data, where), **extra)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a check of the section's class that a bad type tripped
        raise ConfigError(f"{where}: {exc}") from None


def _model_config(data: Any) -> MMDiTConfig:
    if isinstance(data, str):
        name, overrides = data, {}
    elif isinstance(data, Mapping):
        overrides = dict(data)
        name = overrides.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError("model.name: a mapping needs `name` (a named config or YAML path) plus overrides")
        known = {f.name for f in fields(MMDiTConfig)}
        unknown = sorted(set(overrides) - known, key=str)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {unknown}; expected `name` and some of {sorted(known)}")
        overrides = coerce_fields(MMDiTConfig, overrides, "model")
    else:
        raise ConfigError(f"model={data!r}: expected a config name or a mapping with `name`")
    try:
        return load_config(name, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"model ({name}): {exc}") from None


def _flow_matching(data: Any) -> dict:
    """The ``flow_matching`` mapping with numeric strings made numbers (keys named on error)."""
    from megatron_qwenimage.config import coerce_value
    from megatron_qwenimage.flow_matching import LogitNormalSigmaSampler, ResolutionShift, UniformSigmaSampler

    fm = _mapping(data, "flow_matching") or {"kind": "logit_normal", "mean": 0.0, "std": 1.0}
    sampler = {"uniform": UniformSigmaSampler, "logit_normal": LogitNormalSigmaSampler}.get(fm.get("kind"))
    if sampler is not None:
        fm.update(
            coerce_fields(
                sampler, {k: v for k, v in fm.items() if k not in ("kind", "resolution_shift")}, "flow_matching"
            )
        )
    shift = fm.get("resolution_shift")
    if isinstance(shift, Mapping):
        fm["resolution_shift"] = coerce_fields(ResolutionShift, shift, "flow_matching.resolution_shift")
    elif shift is not None:
        coerce_value("flow_matching.resolution_shift", shift, bool)
    return fm


@dataclass(frozen=True)
class FlowMatchingConfig:
    """The ``flow_matching`` section: the σ sampler of training (`build_sigma_sampler`'s keys).

    A field left None was not given (the sampler's default applies); giving a field of the other
    kind (``mean`` with ``kind: uniform``) is an error. An absent or empty section is
    ``{kind: logit_normal, mean: 0.0, std: 1.0}``.
    """

    kind: str = "logit_normal"
    """``uniform`` (σ ~ U(low, high)) or ``logit_normal`` (σ = sigmoid(mean + std·z), z ~ N(0, 1))."""

    low: float | None = None
    """``uniform``: lower bound of σ (default 0.0)."""

    high: float | None = None
    """``uniform``: upper bound of σ (default 1.0)."""

    mean: float | None = None
    """``logit_normal``: mean of the normal before the sigmoid (default 0.0)."""

    std: float | None = None
    """``logit_normal``: standard deviation of the normal before the sigmoid (default 1.0)."""

    resolution_shift: bool | ResolutionShift | None = None
    """Shift σ by the image's token count (spec 6.3): ``true`` for the released scheduler's
    defaults, or a mapping of `ResolutionShift` fields; None or false: no shift."""

    def __post_init__(self) -> None:
        _check_flow_matching(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> FlowMatchingConfig:
        """The section from its YAML mapping (numeric strings made numbers; errors name the key)."""
        fm = _flow_matching(data)
        _check_flow_matching(fm)
        shift = fm.get("resolution_shift")
        if isinstance(shift, Mapping):
            fm["resolution_shift"] = ResolutionShift(**shift)
        return cls(**fm)

    def to_dict(self) -> dict[str, Any]:
        """The `build_sigma_sampler` mapping: the given keys only."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if isinstance(self.resolution_shift, ResolutionShift):
            out["resolution_shift"] = {
                f.name: getattr(self.resolution_shift, f.name) for f in fields(self.resolution_shift)
            }
        return out

    def build_sampler(self):
        """The `SigmaSampler` of this section."""
        from megatron_qwenimage.flow_matching import build_sigma_sampler

        return build_sigma_sampler(self.to_dict())


def _check_flow_matching(fm: Mapping[str, Any]) -> None:
    """`ConfigError` (``flow_matching: ...``) unless `build_sigma_sampler` takes `fm`."""
    from megatron_qwenimage.flow_matching import build_sigma_sampler

    try:
        build_sigma_sampler(fm)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"flow_matching: {exc}") from None


@dataclass
class RunConfig:
    """A whole training run (see the module docstring for the YAML): one typed section per field."""

    model: MMDiTConfig
    """The model: a named config (``tiny-16ch``) or ``{name: ..., <MMDiTConfig overrides>}``."""

    parallel: ParallelConfig
    """TP / PP / VPP / DP sizes and sequence parallelism (DP fills the rest of the world)."""

    optimizer: OptimizerConfig
    """AdamW with ZeRO-1 master weights, LR schedule, clipping, EMA (`consumers.optimizer`)."""

    data_parallel: DataParallelConfig
    """The DP engine's communication: overlap of the gradient reduce-scatter and the parameter
    all-gather with compute, the gradient reduction dtype (`consumers.data_parallel`)."""

    precision: PrecisionConfig
    """Autocast dtype and FP8 settings."""

    recompute: RecomputeConfig
    """Activation recomputation."""

    cuda_graphs: CudaGraphConfig
    """Per-block CUDA graphs of training passes (`consumers.graphs`)."""

    flow_matching: FlowMatchingConfig
    """The σ sampler of training."""

    data: ReaderConfig
    """Caches, curriculum stages, batch sizes and the validation set (`ReaderConfig`)."""

    schedule: ScheduleConfig
    """Steps, seeds, validation interval and σ grid, text padding, diffusers export."""

    checkpoint: CheckpointConfig | None
    """Checkpoint directory, interval, retention and resume policy; None: no checkpoints."""

    logging: LoggingConfig
    """Metrics files, TensorBoard, Prometheus and MFU settings."""

    source: str = field(default="<dict>")
    """Where the config came from (the YAML path), for error messages."""

    SECTIONS = (
        "model",
        "parallel",
        "optimizer",
        "data_parallel",
        "precision",
        "recompute",
        "cuda_graphs",
        "flow_matching",
        "data",
        "schedule",
        "checkpoint",
        "logging",
    )

    def __post_init__(self) -> None:
        # A RunConfig built directly may pass these two sections as their mappings.
        if isinstance(self.parallel, Mapping):
            self.parallel = _section(ParallelConfig, self.parallel, "parallel")
        if isinstance(self.flow_matching, Mapping):
            self.flow_matching = FlowMatchingConfig.from_dict(self.flow_matching)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
        from consumers.checkpoint import CheckpointConfig
        from consumers.metrics import LoggingConfig
        from consumers.optimizer import OptimizerConfig
        from consumers.precision import PrecisionConfig
        from consumers.recompute import RecomputeConfig
        from megatron_qwenimage.data.reader_config import ReaderConfig

        if d is None:
            raise ConfigError(f"{source}: the run config is empty; expected a mapping of sections {list(cls.SECTIONS)}")
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections {list(cls.SECTIONS)}, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.SECTIONS), key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; expected some of {list(cls.SECTIONS)}")
        for required in ("model", "data", "schedule"):
            if required not in d:
                raise ConfigError(f"{source}: missing section `{required}`")
        parallel = _section(ParallelConfig, d.get("parallel"), "parallel")
        fm = FlowMatchingConfig.from_dict(d.get("flow_matching"))
        if not isinstance(d["data"], Mapping):
            raise ConfigError(f"data: expected a mapping of keys, got {d['data']!r}")
        try:
            data = ReaderConfig.from_dict(d["data"])
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # a type the data section's checks did not expect
            raise ConfigError(f"data: {exc}") from None
        ckpt = d.get("checkpoint")
        recompute = _section(RecomputeConfig, d.get("recompute"), "recompute")
        cuda_graphs = _section(CudaGraphConfig, d.get("cuda_graphs"), "cuda_graphs")
        check_cuda_graph_layout(cuda_graphs, tp=parallel.tp, pp=parallel.pp, recompute_mode=recompute.mode)
        data_parallel = _section(DataParallelConfig, d.get("data_parallel"), "data_parallel")
        data_parallel.check_layout(vpp=parallel.vpp, cuda_graphs=cuda_graphs.enabled)
        return cls(
            model=_model_config(d["model"]),
            parallel=parallel,
            optimizer=_section(OptimizerConfig, d.get("optimizer"), "optimizer"),
            data_parallel=data_parallel,
            precision=_section(PrecisionConfig, d.get("precision"), "precision"),
            recompute=recompute,
            cuda_graphs=cuda_graphs,
            flow_matching=fm,
            data=data,
            schedule=_section(ScheduleConfig, d["schedule"], "schedule"),
            checkpoint=None if ckpt is None or ckpt == {} else _section(CheckpointConfig, ckpt, "checkpoint"),
            logging=_section(LoggingConfig, d.get("logging"), "logging"),
            source=source,
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> RunConfig:
        return cls.from_dict(read_yaml(path, what="--config"), source=str(path))

    def layout(self, world_size: int):
        """The `ParallelLayout` of this run on `world_size` ranks, checked against the model."""
        layout = self.parallel.layout(world_size)
        layout.validate_for(self.model, world_size)
        return layout


def _check_directory_path(key: str, path: Any) -> None:
    """`ConfigError` naming `key` when `path` (to be a directory) or one of its parents is a file."""
    if path is None or "://" in str(path):
        return
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                what = "is" if q == p else f"lies under {str(q)!r}, which is"
                raise ConfigError(f"{key}={str(path)!r} {what} an existing file, not a directory")
            return


def _check_caches_fit_model(model: MMDiTConfig, data) -> None:
    """`ConfigError` unless every cache of `data` (and its validation set) exists and its latents
    and text embeddings fit `model`: latent channels ``model.out_channels`` (``model.in_channels``
    = patch_size² x latent channels, one packed token per patch), text width
    ``model.joint_attention_dim``. Reads only the snapshot the reader will start from (metadata)."""
    from megatron_qwenimage.cache import open_cache

    sources = [(f"data.caches[{i}]", c.name, c.path, c.pin) for i, c in enumerate(data.caches)]
    if data.validation is not None:
        sources.append(("data.validation", "validation", data.validation.path, data.validation.pin))
    p = model.patch_size
    for key, name, path, pin in sources:
        try:
            cache = open_cache(path)
            versions = cache.snapshot_versions()
            if pin is None and not versions:
                continue  # no snapshot yet: the reader waits for one (tail) or says so
            snap = cache.snapshot(pin)
        except UserError as exc:
            raise ConfigError(f"{key}.path={str(path)!r}: {exc}") from None
        where = f"cache {name!r} ({path}) snapshot v{snap.version}"
        for shard in snap.shards:
            channels, text_dim = shard.entry.latent_channels, shard.entry.text_dim
            if channels != model.out_channels:
                raise ConfigError(
                    f"model.in_channels={model.in_channels} takes {p}x{p} patches (model.patch_size={p}) of "
                    f"{model.out_channels}-channel latents (model.out_channels={model.out_channels}), but {where} "
                    f"holds {channels}-channel latents (shard {shard.shard_id}); use a model config with "
                    f"out_channels={channels} and in_channels={p * p * channels}, or a cache of a "
                    f"{model.out_channels}-channel VAE"
                )
            if text_dim != model.joint_attention_dim:
                raise ConfigError(
                    f"model.joint_attention_dim={model.joint_attention_dim}, but {where} holds {text_dim}-dim "
                    f"text embeddings (shard {shard.shard_id}); set model.joint_attention_dim={text_dim} or use a "
                    f"cache of a {model.joint_attention_dim}-dim text encoder"
                )


def preflight(cfg: RunConfig) -> None:
    """Checks of what the config names on disk, before torch.distributed starts (every rank
    makes them alike): the caches exist and fit the model (`_check_caches_fit_model`), and the
    checkpoint, logging and export directories are not regular files."""
    if cfg.checkpoint is not None:
        _check_directory_path("checkpoint.dir", cfg.checkpoint.dir)
    _check_directory_path("logging.dir", cfg.logging.dir)
    _check_directory_path("schedule.export_diffusers", cfg.schedule.export_diffusers)
    if cfg.logging.gpu is not None or cfg.logging.peak_tflops is not None:
        cfg.logging.peak_flops(fp8=cfg.precision.fp8 is not None)  # an unknown GPU key or a bad override
    _check_caches_fit_model(cfg.model, cfg.data)
