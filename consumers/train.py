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
`ConfigError` naming ``section.key``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import yaml

from megatron_qwenimage.config import ConfigError, MMDiTConfig, load_config

log = logging.getLogger("consumers.train")


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
    export_diffusers: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_sigmas", tuple(float(s) for s in self.eval_sigmas))
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


def _section(cls, data: Any, where: str, **extra):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**{**data, **extra})
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _model_config(data: Any) -> MMDiTConfig:
    if isinstance(data, str):
        return load_config(data)
    if isinstance(data, Mapping):
        d = dict(data)
        name = d.pop("name", None)
        if name is None:
            raise ConfigError("model: a mapping needs `name` (a named config or YAML path) plus overrides")
        return load_config(name, **d)
    raise ConfigError(f"model={data!r}: expected a config name or a mapping with `name`")


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
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "RunConfig":
        from consumers.checkpoint import CheckpointConfig
        from consumers.metrics import LoggingConfig
        from consumers.optimizer import OptimizerConfig
        from consumers.step import PrecisionConfig, RecomputeConfig
        from megatron_qwenimage.data.reader_config import ReaderConfig
        from megatron_qwenimage.flow_matching import build_sigma_sampler

        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections {cls.SECTIONS}")
        unknown = sorted(set(d) - set(cls.SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; expected some of {list(cls.SECTIONS)}")
        for required in ("model", "data", "schedule"):
            if required not in d:
                raise ConfigError(f"{source}: missing section `{required}`")
        parallel = dict(d.get("parallel") or {})
        allowed = {"tp", "pp", "dp", "vpp", "sequence_parallel"}
        if set(parallel) - allowed:
            raise ConfigError(f"parallel: unknown key(s) {sorted(set(parallel) - allowed)}; expected some of {sorted(allowed)}")
        fm = dict(d.get("flow_matching") or {"kind": "logit_normal", "mean": 0.0, "std": 1.0})
        try:
            build_sigma_sampler(fm)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"flow_matching: {exc}") from None
        ckpt = d.get("checkpoint")
        return cls(
            model=_model_config(d["model"]),
            parallel=parallel,
            optimizer=_section(OptimizerConfig, d.get("optimizer"), "optimizer"),
            precision=_section(PrecisionConfig, d.get("precision"), "precision"),
            recompute=_section(RecomputeConfig, d.get("recompute"), "recompute"),
            flow_matching=fm,
            data=ReaderConfig.from_dict(d["data"]),
            schedule=_section(ScheduleConfig, d["schedule"], "schedule"),
            checkpoint=_section(CheckpointConfig, ckpt, "checkpoint") if ckpt else None,
            logging=_section(LoggingConfig, d.get("logging"), "logging"),
            source=source,
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"run config {str(p)!r} does not exist")
        with open(p) as f:
            data = yaml.safe_load(f)
        return cls.from_dict(data, source=str(p))

    def layout(self, world_size: int):
        from consumers.parallel import ParallelLayout

        p = self.parallel
        layout = ParallelLayout.for_world(world_size, tp=p.get("tp", 1), pp=p.get("pp", 1), vpp=p.get("vpp", 1),
                                          sequence_parallel=p.get("sequence_parallel", False), dp=p.get("dp"))
        layout.validate_for(layout.model_config(self.model), world_size)
        return layout


def _peak_flops(cfg) -> Optional[float]:
    from megatron_qwenimage.accounting import gpu_key_from_device_name, peak_flops

    if cfg.logging.peak_tflops is not None:
        return peak_flops("", override_tflops=cfg.logging.peak_tflops)
    gpu = cfg.logging.gpu
    if gpu is None and torch.cuda.is_available():
        gpu = gpu_key_from_device_name(torch.cuda.get_device_name())
    if gpu is None:
        return None
    return peak_flops(gpu, "fp8" if cfg.precision.fp8 else "bf16")


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns a summary (final step, last logged record)."""
    import torch.distributed as dist

    from consumers.checkpoint import CheckpointManager
    from consumers.data import step_batches
    from consumers.engine import TrainEngine
    from consumers.metrics import MetricsLogger
    from consumers.parallel import init_distributed, init_parallel
    from megatron_qwenimage.accounting import model_flops_per_sample
    from megatron_qwenimage.data.agreement import TorchDistributedAgreement
    from megatron_qwenimage.data.reader import CacheReader, EndOfData, ValidationReader
    from megatron_qwenimage.flow_matching import build_sigma_sampler

    init_distributed()
    layout = cfg.layout(dist.get_world_size())
    pstate = init_parallel(layout)
    torch.manual_seed(cfg.schedule.seed)
    engine = TrainEngine(cfg.model, pstate, optimizer=cfg.optimizer, precision=cfg.precision,
                         recompute=cfg.recompute, sigma_sampler=build_sigma_sampler(cfg.flow_matching),
                         seed=cfg.schedule.seed, global_batch_size=cfg.data.stages[0].global_batch,
                         init_seed=cfg.schedule.init_seed)
    # Every rank (TP/PP peers, DP replicas) must read the same global steps: pins are decided on
    # rank 0 and each step's samples are compared across the world (data/agreement.py).
    agreement = TorchDistributedAgreement(device=pstate.device)
    reader = CacheReader(cfg.data, dp_rank=pstate.dp_rank, dp_size=layout.dp, agreement=agreement)
    ckpt = CheckpointManager(cfg.checkpoint, pstate) if cfg.checkpoint else None
    start = 0
    if ckpt is not None:
        try:  # checkpoint.resume decides; ResumeRefused (every rank alike) stops the run here
            meta = ckpt.load_latest(engine)
        except BaseException:
            reader.close()
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
    metrics = MetricsLogger(cfg.logging, enabled=pstate.rank == 0, world_size=pstate.world_size,
                            peak_flops=_peak_flops(cfg))
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumers.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run YAML (sections: model, parallel, optimizer, "
                        "precision, recompute, flow_matching, data, schedule, checkpoint, logging)")
    parser.add_argument("--log-level", default="INFO", help="python logging level of rank 0 (others log warnings)")


def run_from_args(args) -> int:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()) if rank == 0 else logging.WARNING,
                        format="[%(asctime)s] %(message)s", stream=sys.stdout)
    try:
        cfg = RunConfig.from_yaml(args.config)
    except ConfigError as exc:
        print(f"qwenimage train: {exc}", file=sys.stderr)
        return 2
    from consumers.checkpoint import ResumeRefused
    from consumers.parallel import shutdown

    try:
        train(cfg)
    except ResumeRefused as exc:  # raised on every rank alike; rank 0 says why, all exit 2
        if rank == 0:
            print(f"qwenimage train: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
