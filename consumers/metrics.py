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
    """

    dir: str = "runs/train"
    interval: int = 10
    tensorboard: bool = True
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    gpu: str | None = None
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
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


def memory_bytes() -> int:
    """Peak device memory (CUDA) or peak resident set size (CPU) of this process."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _Prometheus:
    NAMES = (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "image_tokens_per_s",
        "tflops_per_gpu",
        "mfu",
        "data_wait_fraction",
        "memory_bytes",
        "val_loss",
        "skipped_steps",
    )

    def __init__(self, host: str, port: int):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.gauges = {
            n: Gauge(f"qwenimage_train_{n}", f"training {n.replace('_', ' ')}", registry=self.registry)
            for n in self.NAMES
        }
        try:
            server = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # EADDRINUSE, a host that does not resolve or is not local...
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"logging.prometheus_port={port}: cannot serve metrics on {host}:{port} ({reason}; "
                f"logging.prometheus_host={host!r}); choose another port, 0 for any free port, or null to turn "
                "Prometheus off"
            ) from None
        self.server = server[0] if isinstance(server, tuple) else server
        self.port = self.server.server_port if self.server is not None else port

    def set(self, values: dict) -> None:
        for k, v in values.items():
            if k in self.gauges and v is not None:
                self.gauges[k].set(float(v))

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()  # shutdown() only stops serving: this closes the listening socket
            self.server = None


class MetricsLogger:
    """Accumulates per-step measurements and emits one record per `interval` steps (rank 0).

    Args:
        config: `LoggingConfig`. enabled: False on ranks other than 0 (no files, no server).
        world_size: GPUs/processes (TFLOP/s are per GPU). peak_flops: per-GPU peak for MFU, or None.
    """

    def __init__(self, config: LoggingConfig, *, enabled: bool, world_size: int, peak_flops: float | None):
        self.config = config
        self.enabled = enabled
        self.world_size = world_size
        self.peak_flops = peak_flops
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
                self.prometheus = _Prometheus(config.prometheus_host, config.prometheus_port)
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
            "time": time.time(),
        }
        self.emit(record)
        return record

    def emit(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and v is not None:
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
