"""``qwenimage run`` on the embedded default: producers and a consumer job at once, on this machine.

`LocalRun.run` starts the producer (``qwenimage produce``: its embedded Ray, bound to 127.0.0.1)
and, as soon as the producer has created the cache, the consumer (``torchrun`` of
``qwenimage train``) which tails the cache from its first committed snapshot. While both run it
shows one live view of both sides (`megatron_qwenimage.monitor`), from the files they write. At
the end it renders the report (``run_dir/report.png``) and prints where every output is.

Processes: each side runs in its own session (process group), with its output in
``run_dir/logs/{producer,consumer}.log``. The consumer is ``qwenimage torchrun`` (`launch.torchrun.run_torchrun`:
torchrun whose own log and failure report go to ``run_dir/logs/torchrun.log``), so that its log
ends with the training processes' own last line, which the run's error quotes. A stop (Ctrl-C,
SIGTERM) or a failure of either side sends SIGTERM to every process of both trees (torchrun's
workers and Ray's daemons included, found with psutil before the signal), waits `STOP_GRACE_S`,
then SIGKILLs what is left, so no process outlives the run. Nothing is half-written by a stop: the producer publishes partitions
with atomic commits and the consumer's checkpoints are committed only once complete, so the
same command resumes: committed partitions are skipped and training continues from its latest
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from launch.run_config import RunSpec
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.processes import terminate

log = logging.getLogger(__name__)

#: Seconds a stopped side gets to exit on SIGTERM before it is SIGKILLed.
STOP_GRACE_S = 30.0
#: Seconds between looks at the processes and redraws of the view.
POLL_S = 1.0


class RunFailed(UserError):
    """A side of the run exited with an error; the message quotes its last error line and log."""

    exit_code = 1


def stop_exception(signum: int) -> KeyboardInterrupt:
    """What a stop signal raises: `Terminated` (exit 143) for SIGTERM, KeyboardInterrupt (130) for SIGINT."""
    from megatron_qwenimage.cli import Terminated

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def last_error_line(log_path: str | os.PathLike) -> str:
    """The last ``qwenimage ...: error: ...`` line of a log (else its last non-empty line)."""
    try:
        lines = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ": error: " in ln]
    return (errors or lines or [""])[-1]


@dataclass
class Side:
    """One side's process: its command, log file and `subprocess.Popen`."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    started_unix: float | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.started_unix = time.time()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The process and every descendant (torchrun workers, Ray's daemons), while alive."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def stop_sides(sides: list[Side], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process of every side's tree, SIGKILL what is alive after `grace_s`.

    The trees are collected before any signal (a dying parent's children are re-parented and
    would no longer be found); processes a side spawns in its own new session (Ray's daemons)
    are in the tree too.
    """
    terminate([p for side in sides for p in side.tree()], grace_s=grace_s)
    for side in sides:
        if side.proc is not None:
            try:
                side.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class LocalRun:
    """Runs a `RunSpec` on this machine (see the module docstring).

    Args:
        spec: the validated run config.
        view: draws the live view (`launch.view.RunView`); None: no view (tests).
    """

    def __init__(self, spec: RunSpec, view=None) -> None:
        self.spec = spec
        self.view = view
        self.run_dir = Path(spec.run_dir)
        self.producer: Side | None = None
        self.consumer: Side | None = None
        self._signal: int | None = None

    # ----------------------------------------------------------------------------- records
    def _write_run_json(self, state: str, **extra) -> None:
        path = self.run_dir / "run.json"
        record = {}
        if path.exists():
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                record = {}
        record.update(
            {
                "run_label": self.spec.name,
                # Absolute, so that a monitor started elsewhere finds it (URLs stay as they are).
                "cache": self.spec.cache if "://" in self.spec.cache else os.path.abspath(self.spec.cache),
                "run_dir": os.path.abspath(self.run_dir),
                "state": state,
                "updated_unix": time.time(),
                **extra,
            }
        )
        record.setdefault("started_unix", time.time())
        tmp = path.with_name(f".run.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _env(self, omp_threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["OMP_NUM_THREADS"] = str(omp_threads)
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # The sides run in their own sessions: the repository on the path as for this process.
        here = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        return env

    # ----------------------------------------------------------------------------- sides
    def _producer_side(self) -> Side:
        spec = self.spec
        input_spec = spec.producer.options.get("input", "bundled")
        if spec.producer.uses_bundled_input:
            from producers.bundled import write_bundled_inputs

            input_spec = write_bundled_inputs(spec.inputs_dir, **spec.producer.bundled)
        argv = spec.producer.argv(input_spec=input_spec, cache=spec.cache, run_label=spec.name, sd_dir=spec.sd_dir)
        return Side(
            "producer",
            [sys.executable, "-m", "megatron_qwenimage.cli", *argv],
            Path(spec.logs_dir) / "producer.log",
            self._env(1),
        )

    def _consumer_side(self) -> Side:
        spec = self.spec
        config_path = self.run_dir / "train.yaml"
        config_path.write_text(
            "# Written by `qwenimage run` from the consumer section of "
            f"{spec.source}; what the consumer job runs.\n" + yaml.safe_dump(spec.consumer.config, sort_keys=False)
        )
        argv = [
            sys.executable,
            "-m",
            "megatron_qwenimage.cli",
            "torchrun",
            f"--torchrun-log={Path(spec.logs_dir) / 'torchrun.log'}",
            f"--nproc-per-node={spec.consumer.nproc_per_node}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "megatron_qwenimage.cli",
            "train",
            "--config",
            str(config_path),
        ]
        return Side("consumer", argv, Path(spec.logs_dir) / "consumer.log", self._env(spec.consumer.omp_num_threads))

    def _cache_created(self) -> bool:
        from megatron_qwenimage.cache import open_cache

        try:
            open_cache(self.spec.cache)
        except UserError:
            return False
        return True

    # ----------------------------------------------------------------------------- loop
    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def run(self) -> dict:
        """Run both sides to the end; returns the summary (`summary`). Raises `RunFailed` when a
        side fails, KeyboardInterrupt on SIGINT and `Terminated` on SIGTERM (both after stopping every process)."""
        for d in (self.run_dir, Path(self.spec.logs_dir), Path(self.spec.sd_dir)):
            d.mkdir(parents=True, exist_ok=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._write_run_json("running", started_unix=time.time())
        sides: list[Side] = []
        try:
            self.producer = self._producer_side()
            self.producer.start()
            sides.append(self.producer)
            self._write_run_json("running", producer={"argv": self.producer.argv, "log": str(self.producer.log_path)})
            self._loop(sides)
        except BaseException as exc:
            stop_sides(sides)
            state = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            self._write_run_json(state, ended_unix=time.time())
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.view is not None:
                self.view.close()
        self._write_run_json("finished", ended_unix=time.time())
        return self.summary()

    def _loop(self, sides: list[Side]) -> None:
        producer = self.producer
        while True:
            if self._signal is not None:
                raise stop_exception(self._signal)
            if self.consumer is None and (self._cache_created() or producer.returncode == 0):
                self.consumer = self._consumer_side()
                self.consumer.start()
                sides.append(self.consumer)
                self._write_run_json(
                    "running", consumer={"argv": self.consumer.argv, "log": str(self.consumer.log_path)}
                )
            for side in sides:
                code = side.returncode
                if code not in (None, 0):
                    raise RunFailed(
                        f"the {side.name} exited with status {code}: {last_error_line(side.log_path)} "
                        f"(log: {side.log_path})"
                    )
            if self.view is not None:
                self.view.update(
                    producer_alive=producer.running, consumer_alive=bool(self.consumer and self.consumer.running)
                )
            if self.consumer is not None and all(s.returncode == 0 for s in sides):
                return
            time.sleep(POLL_S)

    # ----------------------------------------------------------------------------- outputs
    def summary(self) -> dict:
        """Where the outputs are and what they hold (also written to ``run_dir/summary.json``)."""
        from megatron_qwenimage.cache import open_cache

        records = []
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            records = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        train = [r for r in records if "loss" in r]
        snap = open_cache(self.spec.cache).snapshot()
        ckpts = sorted(p.name for p in Path(self.spec.checkpoint_dir).glob("step_*") if (p / "COMMITTED").exists())
        summary = {
            "run": self.spec.name,
            "run_dir": str(self.run_dir),
            "cache": {
                "path": self.spec.cache,
                "snapshot": snap.version,
                "samples": snap.num_samples,
                "per_bucket": snap.samples_per_bucket(),
            },
            "checkpoint": str(Path(self.spec.checkpoint_dir) / ckpts[-1]) if ckpts else None,
            "diffusers_export": self.spec.export_dir if Path(self.spec.export_dir).exists() else None,
            "metrics": str(metrics) if metrics.exists() else None,
            "final_step": train[-1]["step"] if train else None,
            "final_loss": train[-1]["loss"] if train else None,
            "logs": self.spec.logs_dir,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
        return summary
