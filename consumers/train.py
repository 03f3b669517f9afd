"""``qwenimage train --config run.yaml`` / ``python -m consumers.train --config run.yaml``.

Run under torchrun (``torchrun --nproc-per-node N -m consumers.train --config run.yaml``) or srun
(one task per GPU, MASTER_ADDR/MASTER_PORT exported). The YAML has one section per concern::

    model: tiny-16ch                 # a named config, or {name: qwen-image-20b, <MMDiTConfig overrides>}
    parallel: {tp: 2, pp: 2, vpp: 1, sequence_parallel: true}   # dp = world / (tp * pp)
    optimizer: {lr: 1.0e-4, warmup_steps: 1000, decay_steps: 100000, clip_grad: 1.0, ema_decay: 0.9999}
    precision: {autocast: bf16, fp8: null}
    recompute: {mode: none}
    flow_matching: {kind: logit_normal, mean: 0.0, std: 1.0}
    data: {...}                      # megatron_qwenimage.data.reader_config.ReaderConfig
    schedule: {train_steps: 1000, seed: 0, eval_interval: 100, eval_sigmas: [0.25, 0.5, 0.75]}
    checkpoint: {dir: ckpt/, interval: 100, keep_last: 3, resume: auto}   # auto | required | never
    logging: {dir: runs/x, interval: 10, prometheus_port: 9400}

Every section is a dataclass validated at construction; an unknown key or a bad value is a
`ConfigError` naming ``section.key``. Numeric strings (PyYAML reads ``1e-3`` as one) become
numbers where the field is numeric. Before step 0 (before torch.distributed starts) `preflight`
checks what the config names on disk: the caches exist, their latents and text embeddings fit the
model, and the checkpoint / logging / export paths are not regular files.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from megatron_qwenimage.config import ConfigError, MMDiTConfig, coerce_fields, load_config, read_yaml
from megatron_qwenimage.errors import UserError

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
    missing = [f.name for f in fields(cls) if f.init and f.default is MISSING and f.default_factory is MISSING
               and f.name not in data and f.name not in extra]
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


_PARALLEL_TYPES = {"tp": int, "pp": int, "dp": int | None, "vpp": int, "sequence_parallel": bool}


def _flow_matching(data: Any) -> dict:
    """The ``flow_matching`` mapping with numeric strings made numbers (keys named on error)."""
    from megatron_qwenimage.config import coerce_value
    from megatron_qwenimage.flow_matching import LogitNormalSigmaSampler, ResolutionShift, UniformSigmaSampler

    fm = _mapping(data, "flow_matching") or {"kind": "logit_normal", "mean": 0.0, "std": 1.0}
    sampler = {"uniform": UniformSigmaSampler, "logit_normal": LogitNormalSigmaSampler}.get(fm.get("kind"))
    if sampler is not None:
        fm.update(coerce_fields(sampler, {k: v for k, v in fm.items() if k not in ("kind", "resolution_shift")},
                                "flow_matching"))
    shift = fm.get("resolution_shift")
    if isinstance(shift, Mapping):
        fm["resolution_shift"] = coerce_fields(ResolutionShift, shift, "flow_matching.resolution_shift")
    elif shift is not None:
        coerce_value("flow_matching.resolution_shift", shift, bool)
    return fm


@dataclass
class RunConfig:
    """A whole training run (see the module docstring for the YAML)."""

    model: MMDiTConfig
    parallel: Any
    optimizer: Any
    precision: Any
    recompute: Any
    flow_matching: dict
    data: Any
    schedule: ScheduleConfig
    checkpoint: Any
    logging: Any
    source: str = field(default="<dict>")

    SECTIONS = ("model", "parallel", "optimizer", "precision", "recompute", "flow_matching", "data", "schedule",
                "checkpoint", "logging")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
        from consumers.checkpoint import CheckpointConfig
        from consumers.metrics import LoggingConfig
        from consumers.optimizer import OptimizerConfig
        from consumers.step import PrecisionConfig, RecomputeConfig
        from megatron_qwenimage.data.reader_config import ReaderConfig
        from megatron_qwenimage.flow_matching import build_sigma_sampler

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
        from megatron_qwenimage.config import coerce_value

        parallel = _mapping(d.get("parallel"), "parallel")
        allowed = set(_PARALLEL_TYPES)
        if set(parallel) - allowed:
            raise ConfigError(f"parallel: unknown key(s) {sorted(set(parallel) - allowed, key=str)}; "
                              f"expected some of {sorted(allowed)}")
        parallel = {k: coerce_value(f"parallel.{k}", v, _PARALLEL_TYPES[k]) for k, v in parallel.items()}
        fm = _flow_matching(d.get("flow_matching"))
        try:
            build_sigma_sampler(fm)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"flow_matching: {exc}") from None
        if not isinstance(d["data"], Mapping):
            raise ConfigError(f"data: expected a mapping of keys, got {d['data']!r}")
        try:
            data = ReaderConfig.from_dict(d["data"])
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:  # a type the data section's checks did not expect
            raise ConfigError(f"data: {exc}") from None
        ckpt = d.get("checkpoint")
        return cls(
            model=_model_config(d["model"]),
            parallel=parallel,
            optimizer=_section(OptimizerConfig, d.get("optimizer"), "optimizer"),
            precision=_section(PrecisionConfig, d.get("precision"), "precision"),
            recompute=_section(RecomputeConfig, d.get("recompute"), "recompute"),
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
        from consumers.parallel import ParallelLayout

        p = self.parallel
        layout = ParallelLayout.for_world(world_size, tp=p.get("tp", 1), pp=p.get("pp", 1), vpp=p.get("vpp", 1),
                                          sequence_parallel=p.get("sequence_parallel", False), dp=p.get("dp"))
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
    from megatron_qwenimage.data import open_cache

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
                    f"{model.out_channels}-channel VAE")
            if text_dim != model.joint_attention_dim:
                raise ConfigError(
                    f"model.joint_attention_dim={model.joint_attention_dim}, but {where} holds {text_dim}-dim "
                    f"text embeddings (shard {shard.shard_id}); set model.joint_attention_dim={text_dim} or use a "
                    f"cache of a {model.joint_attention_dim}-dim text encoder")


def preflight(cfg: RunConfig) -> None:
    """Checks of what the config names on disk, before torch.distributed starts (every rank
    makes them alike): the caches exist and fit the model (`_check_caches_fit_model`), and the
    checkpoint, logging and export directories are not regular files."""
    if cfg.checkpoint is not None:
        _check_directory_path("checkpoint.dir", cfg.checkpoint.dir)
    _check_directory_path("logging.dir", cfg.logging.dir)
    _check_directory_path("schedule.export_diffusers", cfg.schedule.export_diffusers)
    if cfg.logging.gpu is not None or cfg.logging.peak_tflops is not None:
        _peak_flops(cfg)  # an unknown GPU key or a bad override (touches no device when either is set)
    _check_caches_fit_model(cfg.model, cfg.data)


@contextlib.contextmanager
def _collective():
    """A `UserError` raised in the block is raised alike on every rank (it depends only on the
    config, shared files or world-wide agreed values): mark it so that only rank 0 reports it."""
    from megatron_qwenimage.cli import mark_collective

    try:
        yield
    except UserError as exc:
        mark_collective(exc)
        raise


def _any_rank_failed(failed: bool, device) -> bool:
    """One all-reduce over the world: whether `failed` is true on some rank."""
    import torch.distributed as dist

    flag = torch.tensor([1 if failed else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _peak_flops(cfg) -> float | None:
    from megatron_qwenimage.accounting import gpu_key_from_device_name, peak_flops

    if cfg.logging.peak_tflops is not None:
        try:
            return peak_flops("", override_tflops=cfg.logging.peak_tflops)
        except ValueError as exc:
            raise ConfigError(f"logging.peak_tflops={cfg.logging.peak_tflops!r}: {exc}") from None
    gpu = cfg.logging.gpu
    if gpu is None and torch.cuda.is_available():
        gpu = gpu_key_from_device_name(torch.cuda.get_device_name())
    if gpu is None:
        return None
    try:
        return peak_flops(gpu, "fp8" if cfg.precision.fp8 else "bf16")
    except ValueError as exc:
        raise ConfigError(f"logging.gpu={gpu!r}: {exc}") from None


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns a summary (final step, last logged record)."""
    import torch.distributed as dist

    from consumers.checkpoint import CheckpointManager, ResumeRefused
    from consumers.data import broadcast_micro_batches, step_batches
    from consumers.engine import NonFiniteTrainingError, TrainEngine
    from consumers.metrics import MetricsLogger
    from consumers.parallel import init_distributed, init_parallel
    from megatron_qwenimage.accounting import model_flops_per_sample
    from megatron_qwenimage.cli import mark_collective
    from megatron_qwenimage.data.agreement import TorchDistributedAgreement
    from megatron_qwenimage.data.reader import CacheReader, EndOfData, ValidationReader
    from megatron_qwenimage.flow_matching import build_sigma_sampler

    with _collective():  # config and files only: every rank fails alike, before any collective
        preflight(cfg)
    init_distributed()
    with _collective():
        layout = cfg.layout(dist.get_world_size())
        cfg.data.check_dp(layout.dp)
    pstate = init_parallel(layout)
    torch.manual_seed(cfg.schedule.seed)
    with _collective():  # the model, precision and recompute settings are checked alike everywhere
        engine = TrainEngine(cfg.model, pstate, optimizer=cfg.optimizer, precision=cfg.precision,
                             recompute=cfg.recompute, sigma_sampler=build_sigma_sampler(cfg.flow_matching),
                             seed=cfg.schedule.seed, global_batch_size=cfg.data.stages[0].global_batch,
                             init_seed=cfg.schedule.init_seed)
    # Every rank (TP/PP peers, DP replicas) must read the same global steps: pins are decided on
    # rank 0 and each step's samples are compared across the world (data/agreement.py).
    # On a gloo group: the per-step agreement then never waits for the GPU to drain its queue
    # (the previous step's optimizer kernels), which an NCCL collective read back on the host does.
    agreement = TorchDistributedAgreement(group=dist.new_group(backend="gloo"), device="cpu")
    # One rank per data-parallel replica reads (and verifies) the cache; its TP/PP peers receive.
    reader = CacheReader(cfg.data, dp_rank=pstate.dp_rank, dp_size=layout.dp, agreement=agreement,
                         read_samples=pstate.reads_data)
    ckpt = CheckpointManager(cfg.checkpoint, pstate) if cfg.checkpoint else None
    start = 0
    if ckpt is not None:
        try:  # checkpoint.resume decides; ResumeRefused (every rank alike) stops the run here
            meta = ckpt.load_latest(engine)
        except BaseException as exc:
            reader.close()
            if isinstance(exc, ResumeRefused):
                mark_collective(exc)
            raise
        if meta is not None:
            start = int(meta["step"])
            reader.load_state_dict(meta["reader"])
            if pstate.rank == 0:
                log.info("resumed from %s/step_%08d (saved at layout %s)", cfg.checkpoint.dir, start, meta["layout"])
    val = None
    if cfg.data.validation is not None and cfg.schedule.eval_interval:
        val = ValidationReader(cfg.data.validation, dp_rank=pstate.dp_rank, dp_size=layout.dp, agreement=agreement,
                               verify_checksums=cfg.data.verify_checksums, text_length=cfg.data.text_length)
    # Rank 0 opens the metrics files and the Prometheus port; if it cannot (port in use...), the
    # others must not wait for it in the first step's collectives: all learn it and stop alike.
    metrics_error = None
    try:
        metrics = MetricsLogger(cfg.logging, enabled=pstate.rank == 0, world_size=pstate.world_size,
                                peak_flops=_peak_flops(cfg))
    except UserError as exc:
        metrics_error = exc
    if _any_rank_failed(metrics_error is not None, pstate.device):
        reader.close()
        if metrics_error is not None:
            raise metrics_error
        raise mark_collective(ConfigError("logging: rank 0 could not start the metrics logger (its error says why)"))
    if pstate.rank == 0:
        log.info("training %s on tp=%d pp=%d vpp=%d dp=%d (sp=%s), steps %d..%d", cfg.model.name, layout.tp,
                 layout.pp, layout.vpp, layout.dp, layout.sequence_parallel, start, cfg.schedule.train_steps)
    if val is not None and start == 0:
        metrics.emit(validate(engine, val, cfg.schedule.eval_sigmas, 0))
    last_record, completed = None, start
    try:
        for step in range(start, cfg.schedule.train_steps):
            t0 = time.perf_counter()
            try:
                micro = reader.next_global_step()
            except EndOfData:
                if pstate.rank == 0:
                    log.info("data: the curriculum is complete after %d steps", step)
                break
            micro = broadcast_micro_batches(micro, group=pstate.model_parallel_group, src=pstate.data_source_rank,
                                            device=pstate.device)
            plan = reader.last_step
            if plan.step != step:
                raise RuntimeError(f"reader is at step {plan.step} but training at step {step} (reader state mismatch)")
            batches = step_batches(micro, plan, dp_rank=pstate.dp_rank, dp_size=layout.dp,
                                   pad_multiple=cfg.schedule.text_pad_multiple)
            t_data = time.perf_counter() - t0
            result = engine.train_step(step, batches, global_batch_size=len(plan.refs))
            step_time = time.perf_counter() - t0
            b0 = batches[0]
            cond_tokens = sum(c.shape[-2] * c.shape[-1] // cfg.model.patch_size**2 for c in b0.condition_latents)
            text_tokens = int(b0.text_mask.sum()) // max(b0.size, 1)
            flops = len(plan.refs) * model_flops_per_sample(
                cfg.model, b0.latents.shape[-2] * b0.latents.shape[-1] // cfg.model.patch_size**2,
                max(text_tokens, 1), cond_tokens)
            record = metrics.record_step(step=step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                                         samples=len(plan.refs), image_tokens=result.image_tokens * layout.dp,
                                         flops=flops, step_time_s=step_time, data_wait_s=t_data,
                                         skipped=result.skipped, skipped_steps=result.skipped_steps)
            last_record = record or last_record
            done = completed = step + 1
            if ckpt is not None and cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0:
                ckpt.save(done, engine, {"reader": reader.state_dict()})
            if ckpt is not None:
                ckpt.poll()  # commits an async save as soon as every rank's write has finished
            if val is not None and done % cfg.schedule.eval_interval == 0:
                metrics.emit(validate(engine, val, cfg.schedule.eval_sigmas, done))
        final = completed
        if ckpt is not None:
            # Nothing trained after resuming at `final`: its checkpoint is the one just loaded.
            resumed_done = final == start and start > 0
            if (final % max(cfg.checkpoint.interval, 1) or not cfg.checkpoint.interval) and not resumed_done:
                ckpt.save(final, engine, {"reader": reader.state_dict()})
            ckpt.finalize()
            if cfg.schedule.export_diffusers and pstate.rank == 0:
                from consumers.checkpoint import export_checkpoint_to_diffusers, step_dir_name

                export_checkpoint_to_diffusers(Path(cfg.checkpoint.dir) / step_dir_name(final),
                                               cfg.schedule.export_diffusers)
            dist.barrier()
    except NonFiniteTrainingError as exc:  # raised on every rank alike (world-reduced loss and grad norm)
        mark_collective(exc)
        raise
    finally:
        reader.close()
        metrics.close()
    return {"final_step": final, "last_record": last_record}


def validate(engine, val, sigmas, step: int) -> dict:
    """Mean validation loss at each σ of the fixed grid.

    The held-out micro-batches are fixed (`ValidationReader`); noise is seeded by the σ's index
    and the sample's global index, so the numbers are comparable across steps and layouts.
    Works under every layout: each σ evaluates all of this rank's micro-batches in one
    `TrainEngine.eval_local_loss` call, which under PP runs each group of equal shapes (task,
    bucket, batch size, text length) through one forward-only pipeline schedule, whatever its
    micro-batch count; the ranks of a pipeline hold the same micro-batches, so they run the same
    calls. DP replicas evaluate their own micro-batches and meet only in the final `dp_sum`.
    """
    from consumers.step import Batch

    offsets, acc = [], 0
    for _, _, refs in val.micro_batches:
        offsets.append(acc)
        acc += len(refs)
    n_global = acc
    my_ids = range(val.dp_rank, len(val.micro_batches), val.dp_size)
    mine = [
        Batch(latents=mb.latents, text=mb.text, text_mask=mb.text_mask,
              sample_index=torch.arange(offsets[gi], offsets[gi] + mb.batch_size),
              condition_latents=list(mb.condition_latents), task=mb.task)
        for mb, gi in zip(val.batches(), my_ids)
    ]
    local = torch.tensor([engine.eval_local_loss(-(i + 1), mine, s, n_global) for i, s in enumerate(sigmas)],
                         dtype=torch.float64)
    totals = engine.dp_sum(local)
    by_sigma = {s: float(v) for s, v in zip(sigmas, totals)}
    return {"step": step, "val_loss": sum(by_sigma.values()) / len(by_sigma), "val_loss_by_sigma": by_sigma}


def main(argv: list[str] | None = None) -> int:
    """``python -m consumers.train ARGS`` is ``qwenimage train ARGS`` (``--debug`` anywhere): the
    same one-line error report (`megatron_qwenimage.cli.main`) and exit status."""
    from megatron_qwenimage.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = ["--debug"] if "--debug" in argv else []
    return cli_main([*debug, "train", *(a for a in argv if a != "--debug")])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run YAML (sections: model, parallel, optimizer, "
                        "precision, recompute, flow_matching, data, schedule, checkpoint, logging)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="python logging level of rank 0 (others log warnings; default: %(default)s)")


def run_from_args(args) -> int:
    """``qwenimage train``. A bad config, cache, layout or checkpoint raises a `UserError`, which
    `megatron_qwenimage.cli.main` reports as one line (rank 0 only when it is raised alike on
    every rank) with its exit status."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()) if rank == 0 else logging.WARNING,
                        format="[%(asctime)s] %(message)s", stream=sys.stdout)
    with _collective():  # every rank reads the same file
        cfg = RunConfig.from_yaml(args.config)
    from consumers.parallel import shutdown

    try:
        train(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
