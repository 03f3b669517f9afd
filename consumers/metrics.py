"""Training metrics: a Megatron-style log line, JSONL, TensorBoard (if installed), Prometheus.

Only global rank 0 writes (every metric it reports is already global: the loss and grad norm are
reduced over the world, throughput counts the whole DP world).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_qwenimage.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go.

    Attributes:
        dir: directory of ``metrics.jsonl`` and TensorBoard events.
        interval: steps per log line (metrics are averaged over the interval).
        tensorboard: write TensorBoard events when ``tensorboard`` is installed (else a notice).
        prometheus_port: serve metrics on ``prometheus_host:port`` (None: off; 0: any free port).
        prometheus_host: bind address (127.0.0.1 by default: not exposed off the machine).
        gpu: peak-table key for MFU (e.g. "h100-sxm"); None: detect from the CUDA device name.
        peak_tflops: override the peak TFLOP/s per GPU for MFU.
        run_label: the run's label: the ``run`` label of every Prometheus series and each
            metrics record's ``run_label`` (None: the basename of `dir`).
        prometheus_sd_dir: directory where rank 0 publishes its exporter as a Prometheus file-SD
            target (``consumer-<id>.json``, removed at the end; `megatron_qwenimage.monitor.file_sd`);
            None: none. Used only with `prometheus_port`.
    """

    dir: str = "runs/train"
    interval: int = 10
    tensorboard: bool = True
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    gpu: str | None = None
    peak_tflops: float | None = None
    run_label: str | None = None
    prometheus_sd_dir: str | None = None

    def __post_init__(self) -> None:
        from megatron_qwenimage.monitor.file_sd import check_run_label, check_sd_dir, default_run_label

        if not isinstance(self.dir, (str, os.PathLike)) or not os.fspath(self.dir):
            raise ConfigError(f"logging.dir={self.dir!r}: expected a directory path")
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ConfigError(f"logging.interval={self.interval!r}: expected a positive integer")
        if self.prometheus_port is not None and not (
            isinstance(self.prometheus_port, int)
            and not isinstance(self.prometheus_port, bool)
            and 0 <= self.prometheus_port < 65536
        ):
            raise ConfigError(f"logging.prometheus_port={self.prometheus_port!r}: expected null or a port 0..65535")
        if self.run_label is None:
            object.__setattr__(self, "run_label", default_run_label(self.dir, "logging.run_label"))
        else:
            check_run_label(self.run_label, "logging.run_label")
        object.__setattr__(self, "prometheus_sd_dir", check_sd_dir(self.prometheus_sd_dir, "logging.prometheus_sd_dir"))

    def peak_flops(self, *, fp8: bool) -> float | None:
        """Peak FLOP/s per GPU for MFU: `peak_tflops` when set, else the peak table's entry for
        `gpu` (or the CUDA device's name) at the training precision; None on CPU with neither set.
        A bad key or override raises a ConfigError naming it (touches no device when either is set).
        """
        from megatron_qwenimage.accounting import gpu_key_from_device_name, peak_flops

        if self.peak_tflops is not None:
            try:
                return peak_flops("", override_tflops=self.peak_tflops)
            except ValueError as exc:
                raise ConfigError(f"logging.peak_tflops={self.peak_tflops!r}: {exc}") from None
        gpu = self.gpu
        if gpu is None and torch.cuda.is_available():
            gpu = gpu_key_from_device_name(torch.cuda.get_device_name())
        if gpu is None:
            return None
        try:
            return peak_flops(gpu, "fp8" if fp8 else "bf16")
        except ValueError as exc:
            raise ConfigError(f"logging.gpu={gpu!r}: {exc}") from None


def memory_bytes() -> int:
    """Peak device memory (CUDA) or peak resident set size (CPU) of this process."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


#: Record key -> ``qwenimage_consumer_<name>`` gauge (every series labelled ``run``).
GAUGES = {
    "step": "step",
    "loss": "loss",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "samples_per_s": "samples_per_second",
    "image_tokens_per_s": "image_tokens_per_second",
    "tflops_per_gpu": "tflops_per_gpu",
    "mfu": "mfu",
    "data_wait_fraction": "data_wait_fraction",
    "memory_bytes": "memory_bytes",
    "val_loss": "val_loss",
    "skipped_steps": "skipped_steps",
    "consumed_samples": "consumed_samples",
    "train_steps": "train_steps",
    "global_batch": "global_batch",
    "backlog_samples": "backlog_samples",
    "lead_time_s": "lead_time_seconds",
}
#: Buckets of ``qwenimage_consumer_step_time_seconds`` (tiny CPU runs to 20B-model steps).
STEP_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)


class _Prometheus:
    """The consumer's exporter: a gauge per record field (`GAUGES`), a step-time histogram
    observed every step, and ``qwenimage_consumer_info`` (always 1); all labelled ``run``.
    With `sd_dir`, publishes a file-SD target once listening and removes it on `close`."""

    NAMES = tuple(GAUGES)  # the record keys exported as gauges

    def __init__(self, host: str, port: int, *, run_label: str, sd_dir: str | None = None):
        from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

        self.registry = r = CollectorRegistry()
        self.run_label = run_label
        self.gauges = {
            k: Gauge(f"qwenimage_consumer_{name}", f"training {name.replace('_', ' ')}", ["run"], registry=r)
            for k, name in GAUGES.items()
        }
        self.step_time = Histogram(
            "qwenimage_consumer_step_time_seconds",
            "Wall seconds of one training step (data included)",
            ["run"],
            buckets=STEP_TIME_BUCKETS,
            registry=r,
        ).labels(run_label)
        Gauge("qwenimage_consumer_info", "Always 1: the consumer run", ["run"], registry=r).labels(run_label).set(1)
        self.sd = None
        try:
            server = start_http_server(port, addr=host, registry=r)
        except OSError as exc:  # EADDRINUSE, a host that does not resolve or is not local...
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"logging.prometheus_port={port}: cannot serve metrics on {host}:{port} ({reason}; "
                f"logging.prometheus_host={host!r}); choose another port, 0 for any free port, or null to turn "
                "Prometheus off"
            ) from None
        self.server = server[0] if isinstance(server, tuple) else server
        self.port = self.server.server_port if self.server is not None else port
        if sd_dir is not None:
            from megatron_qwenimage.monitor.file_sd import FileSDTarget

            try:
                self.sd = FileSDTarget(
                    sd_dir, side="consumer", ident=uuid.uuid4().hex[:12], host=host, port=self.port, run_label=run_label
                )
            except OSError as exc:
                self.close()
                raise ConfigError(
                    f"logging.prometheus_sd_dir={sd_dir!r}: cannot write the file-SD target there "
                    f"({exc.strerror or exc})"
                ) from None

    def set(self, values: dict) -> None:
        for k, v in values.items():
            if k in self.gauges and v is not None:
                self.gauges[k].labels(self.run_label).set(float(v))

    def close(self) -> None:
        if self.sd is not None:
            self.sd.remove()
            self.sd = None
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()  # shutdown() only stops serving: this closes the listening socket
            self.server = None


def consumed_before(stages, step: int) -> int:
    """Global samples the steps before `step` consumed: each step takes its curriculum stage's
    ``global_batch`` (`stages`: objects with ``steps`` (None: to the end) and ``global_batch``)."""
    total, start = 0, 0
    for stage in stages:
        n = step - start if stage.steps is None else min(stage.steps, max(0, step - start))
        total += max(0, n) * stage.global_batch
        if stage.steps is None:
            break
        start += stage.steps
        if step <= start:
            break
    return total


class TailBacklog:
    """Committed samples of the caches a run reads in ``tail`` mode, summed over their commit records.

    Commit records are immutable, so each is read once: `committed` lists ``commits/`` and reads
    only the records it has not seen (a record that disappears, e.g. moved by ``cache repair``,
    drops out). An unreadable record counts as nothing, as for the reader.
    """

    def __init__(self, paths) -> None:
        from megatron_qwenimage.cache.storage import CacheStorage

        self.storages = [CacheStorage(p) for p in paths]
        self._seen: list[dict[str, int]] = [{} for _ in self.storages]

    def committed(self) -> int:
        from megatron_qwenimage.cache.commit import commit_record_names, read_commit

        total = 0
        for storage, seen in zip(self.storages, self._seen):
            names = set(commit_record_names(storage))
            for gone in set(seen) - names:
                del seen[gone]
            for pid in sorted(names - set(seen)):
                record = read_commit(storage, pid)
                seen[pid] = sum(e.num_samples for e in record.shards) if record is not None else 0
            total += sum(seen.values())
        return total


class MetricsLogger:
    """Accumulates per-step measurements and emits one record per `interval` steps (rank 0).

    Args:
        config: `LoggingConfig`. enabled: False on ranks other than 0 (no files, no server).
        world_size: GPUs/processes (TFLOP/s are per GPU). peak_flops: per-GPU peak for MFU, or None.
        train_steps: the schedule's total steps (the records' ``train_steps``).
        stages: the curriculum stages (``steps``, ``global_batch``): ``consumed_samples`` of a
            resumed run counts the steps before it by their stage's global batch.
        tail_caches: paths of the caches read in ``tail`` mode: ``backlog_samples`` is their
            committed samples minus ``consumed_samples`` (rank 0, at log intervals), else null.
    """

    def __init__(
        self,
        config: LoggingConfig,
        *,
        enabled: bool,
        world_size: int,
        peak_flops: float | None,
        train_steps: int | None = None,
        stages=(),
        tail_caches=(),
    ):
        self.config = config
        self.enabled = enabled
        self.world_size = world_size
        self.peak_flops = peak_flops
        self.train_steps = train_steps
        self.stages = tuple(stages)
        self.backlog = TailBacklog(tail_caches) if tail_caches and enabled else None
        self.consumed_samples: int | None = None  # through the last recorded step
        self._global_batch: int | None = None
        self._acc: dict[str, float] = {}
        self._n = 0
        self._jsonl = None
        self._tb = None
        self.prometheus: _Prometheus | None = None
        if not enabled:
            return
        try:
            Path(config.dir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(config.dir) / "metrics.jsonl", "a")
        except OSError as exc:  # the directory is a file, or not writable
            raise ConfigError(
                f"logging.dir={str(config.dir)!r}: cannot write metrics there "
                f"({exc.strerror or exc}: {exc.filename or config.dir})"
            ) from None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(config.dir) / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s/metrics.jsonl only", config.dir)
        if config.prometheus_port is not None:
            try:
                self.prometheus = _Prometheus(
                    config.prometheus_host,
                    config.prometheus_port,
                    run_label=config.run_label,
                    sd_dir=config.prometheus_sd_dir,
                )
            except BaseException:
                self.close()  # the files opened above
                raise
            log.info("prometheus metrics on http://%s:%d/metrics", config.prometheus_host, self.prometheus.port)

    def record_step(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        samples: int,
        image_tokens: int,
        flops: float,
        step_time_s: float,
        data_wait_s: float,
        skipped: bool = False,
        skipped_steps: int = 0,
    ) -> dict | None:
        """Add one step (global `samples`, `image_tokens`, model `flops`); returns the record at interval ends.

        `skipped` and `skipped_steps` are the engine's (`StepResult.skipped`, the run's total
        `StepResult.skipped_steps`): as Megatron, a skipped update is left out of the interval's
        loss and grad-norm means (NaN when every step of the interval was skipped), and the
        record carries the total.
        """
        if skipped:
            self._acc["skipped"] = self._acc.get("skipped", 0) + 1
        else:
            for k, v in (("loss", loss), ("grad_norm", grad_norm)):
                self._acc[k] = self._acc.get(k, 0.0) + v
        for k, v in (
            ("samples", samples),
            ("image_tokens", image_tokens),
            ("flops", flops),
            ("time", step_time_s),
            ("data_wait", data_wait_s),
        ):
            self._acc[k] = self._acc.get(k, 0.0) + v
        self._n += 1
        if self.consumed_samples is None:  # the steps before this run (a resume) by the schedule
            self.consumed_samples = consumed_before(self.stages, step)
        self.consumed_samples += int(samples)
        self._global_batch = int(samples)
        if self.prometheus is not None:
            self.prometheus.step_time.observe(step_time_s)
        if (step + 1) % self.config.interval:
            return None
        a, n = self._acc, self._n
        self._acc, self._n = {}, 0
        updated = n - a.get("skipped", 0)
        t = max(a["time"], 1e-9)
        tflops = a["flops"] / t / self.world_size / 1e12
        record = {
            "step": step + 1,
            "loss": a["loss"] / updated if updated else math.nan,
            "lr": lr,
            "grad_norm": a["grad_norm"] / updated if updated else math.nan,
            "samples_per_s": a["samples"] / t,
            "image_tokens_per_s": a["image_tokens"] / t,
            "tflops_per_gpu": tflops,
            "mfu": (tflops * 1e12 / self.peak_flops) if self.peak_flops else None,
            "data_wait_fraction": a["data_wait"] / t,
            "memory_bytes": memory_bytes(),
            "step_time_s": t / n,
            "skipped_steps": int(skipped_steps),
            "consumed_samples": self.consumed_samples,
            "train_steps": self.train_steps,
            "global_batch": self._global_batch,
            "run_label": self.config.run_label,
            "backlog_samples": None,
            "lead_time_s": None,
            "time": time.time(),
        }
        if self.backlog is not None:
            try:
                backlog = max(0, self.backlog.committed() - self.consumed_samples)
            except Exception as exc:  # a cache that cannot be listed right now: no number this interval
                log.warning("backlog: cannot count the tail caches' committed samples (%s)", exc)
            else:
                record["backlog_samples"] = backlog
                rate = record["samples_per_s"]
                record["lead_time_s"] = backlog / rate if rate > 0 else None
        self.emit(record)
        return record

    def emit(self, record: dict) -> None:
        """Write `record` (a training or validation record; ``run_label`` is added) everywhere."""
        if not self.enabled:
            return
        record.setdefault("run_label", self.config.run_label)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])
        if self.prometheus is not None:
            self.prometheus.set(record)
        log.info(format_line(record))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self.prometheus is not None:
            self.prometheus.close()


def format_line(r: dict) -> str:
    """One Megatron-style line."""
    if "val_loss" in r:
        sig = " | ".join(f"σ={s:g}: {v:.5f}" for s, v in r.get("val_loss_by_sigma", {}).items())
        return f" validation at step {r['step']:8d} | val loss: {r['val_loss']:.6E} | {sig}"
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    return (
        f" step {r['step']:8d} | loss: {r['loss']:.6E} | lr: {r['lr']:.3E} | grad norm: {r['grad_norm']:.3f} | "
        f"samples/s: {r['samples_per_s']:.2f} | image tokens/s: {r['image_tokens_per_s']:.0f} | "
        f"TFLOP/s/GPU: {r['tflops_per_gpu']:.2f} | MFU: {mfu} | data wait: {100 * r['data_wait_fraction']:.1f}% | "
        f"mem: {r['memory_bytes'] / 2**30:.2f} GiB | step time: {r['step_time_s'] * 1000:.0f} ms"
        + (f" | skipped steps: {r['skipped_steps']}" if r.get("skipped_steps") is not None else "")
    )
