"""Lead-time autoscaling of the producers' encoder capacity.

The consumers must never wait for data, and the producers should not run far ahead of them
either (GPUs spent encoding what nobody trains on yet). The measure is the **lead time**: how long
the consumers could keep training from what is committed but not yet consumed,

    lead time = backlog / consumer rate = (committed samples - consumed samples) / consumer samples/s

read from the run's own files (`megatron_qwenimage.monitor.snapshot.Monitor`, `MonitorObserver`)
or passed in by a caller (`Observation`). `LeadTimeController` keeps it inside a target band
``[low_s, high_s]``:

* lead time **under** ``low_s``: the consumers are catching up; add encoder capacity (``+step``);
* lead time **over** ``high_s``: the producers are far ahead; remove capacity (``-step``);
* inside the band: nothing changes.

Hysteresis: a change is made only after its condition held for ``hold_observations`` consecutive
observations **and** for ``hold_s`` seconds (either may be set to its neutral value, 1 or 0), and
never within ``cooldown_s`` of the previous change (new capacity needs time to show in the rates).
The size never leaves ``[min_size, max_size]`` (a size found outside, e.g. after actors died, is
put back at once). Each change is one INFO line on the ``launch.autoscale`` logger: time, lead
time, backlog, rate, old -> new size and why (`Decision.line`).

Capacity goes up and down through an actuator (`Actuator`):

* `RayAutoscalerActuator`: ``ray.autoscaler.sdk.request_resources`` for clusters with a Ray
  autoscaler (KubeRay with ``enableInTreeAutoscaling``, cloud clusters). ``request_resources`` sets
  the cluster's whole resource request: **there must be exactly one writer**. The controller is the
  only caller it knows of, but Ray Data (2.60) also calls it, every 20 s, from its detached
  ``AutoscalingCoordinator`` actor once any Dataset ran on the cluster; a direct call would be
  overwritten by it. So by default (``via="auto"``) the actuator registers its bundles *with that
  coordinator* as one more requester (merged with Ray Data's own requests, re-sent every
  observation because coordinator requests expire), and falls back to the SDK only where the
  coordinator does not exist.
* `SlurmWorkerActuator`: one extra Slurm job per unit, each a Ray worker node that joins the
  producers' cluster (``ray start --address=HEAD:PORT --block``); ``scancel`` removes the newest.
  ``sbatch``/``scancel`` go through an injectable runner (testable without Slurm).
* `ProducerPoolActuator`: the actors per pool of a running ``qwenimage produce``, through a control
  file in the cache that the producer reads before each window of partitions
  (`producers.pool_control`); the producer's own ``--vae-actors``/``--text-actors`` bound it.
"""

from __future__ import annotations

import logging
import math
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.errors import UserError

log = logging.getLogger(__name__)


class ActuatorError(UserError):
    """Capacity could not be changed (sbatch refused, actors did not start); says what and why."""

    exit_code = 1


# --- observations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    """One reading of the pipeline: backlog (samples) and consumer rate (samples/s) at `time_s`.

    `time_s` is on the controller's clock (monotonic by default); None: the controller reads its
    clock when the observation arrives. `producer_state` (``running``, ``finished``, ``failed``)
    lets `LeadTimeController.run` stop when there is nothing left to produce.
    """

    backlog_samples: float | None
    consumer_samples_per_s: float | None
    time_s: float | None = None
    producer_state: str | None = None

    @property
    def lead_time_s(self) -> float | None:
        """backlog / rate; ``inf`` when a backlog waits for a consumer that reads nothing (rate
        0); None when either is unknown (the consumer has not started, nothing committed yet)."""
        backlog, rate = self.backlog_samples, self.consumer_samples_per_s
        if backlog is None or rate is None or rate < 0:
            return None
        if rate > 0:
            return max(0.0, backlog) / rate
        return math.inf if backlog > 0 else None


def observation_from_snapshot(snapshot, time_s: float | None = None) -> Observation:
    """An `Observation` from a `MonitorSnapshot` (its backlog, consumer samples/s, producer state)."""
    return Observation(
        backlog_samples=snapshot.backlog_samples,
        consumer_samples_per_s=snapshot.consumer.samples_per_s,
        time_s=time_s,
        producer_state=snapshot.producer.state,
    )


class MonitorObserver:
    """Observations from the run's files: ``Monitor(cache, run).poll()`` (incremental reads).

    `cache`: the latent cache; `run`: the training run directory (holding ``metrics.jsonl``).
    Raises `MonitorError` (one line naming the path) when either cannot be opened.
    """

    def __init__(self, cache: str | None, run: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        from megatron_qwenimage.monitor.snapshot import Monitor

        self.monitor = Monitor(cache=cache, run=run)
        self.clock = clock

    def __call__(self) -> Observation:
        return observation_from_snapshot(self.monitor.poll(), time_s=self.clock())


# --- policy and decisions -------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingPolicy:
    """The target band and how eagerly to move (see the module docstring).

    Attributes:
        low_s, high_s: the lead-time band in seconds; grow under `low_s`, shrink over `high_s`.
        min_size, max_size: bounds of the capacity (actuator units: actors, bundles, nodes).
        step: units added or removed per change.
        hold_observations: consecutive observations the condition must hold before a change.
        hold_s: seconds the condition must hold (from its first observation) before a change.
        cooldown_s: no change within this many seconds of the previous one.
    """

    low_s: float
    high_s: float
    min_size: int = 1
    max_size: int = 1
    step: int = 1
    hold_observations: int = 3
    hold_s: float = 0.0
    cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        def finite(name: str, minimum: float = 0.0) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"ScalingPolicy.{name}={value!r}: expected a finite number of seconds")
            if value < minimum:
                raise ConfigError(f"ScalingPolicy.{name}={value!r}: expected seconds >= {minimum:g}")

        def whole(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"ScalingPolicy.{name}={value!r}: expected a whole number >= {minimum}")

        for name in ("low_s", "high_s", "hold_s", "cooldown_s"):
            finite(name)
        if not self.low_s < self.high_s:
            raise ConfigError(
                f"ScalingPolicy: the band needs low_s < high_s, got [{self.low_s:g}, {self.high_s:g}] s "
                "(an empty band would grow and shrink in turn)"
            )
        whole("min_size", 0)
        whole("max_size", max(1, self.min_size))
        whole("step", 1)
        whole("hold_observations", 1)


@dataclass(frozen=True)
class Decision:
    """One change of capacity, and why."""

    wall_time: float
    lead_time_s: float | None
    backlog_samples: float | None
    consumer_samples_per_s: float | None
    old_size: int
    new_size: int
    reason: str

    def line(self) -> str:
        """The one log line: time, lead time, backlog, rate, old -> new size, why."""
        stamp = datetime.fromtimestamp(self.wall_time, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"autoscale {stamp} lead_time={_fmt(self.lead_time_s, 's')} backlog={_fmt(self.backlog_samples)} "
            f"rate={_fmt(self.consumer_samples_per_s, '/s')} size {self.old_size} -> {self.new_size}: {self.reason}"
        )


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.1f}{unit}" if value != int(value) or unit else f"{int(value)}{unit}"


# --- actuators ------------------------------------------------------------------------------------
class Actuator(Protocol):
    """Adds and removes encoder capacity, in whole units."""

    name: str

    def current(self) -> int:
        """Units in effect now (alive actors, requested bundles, submitted worker jobs)."""

    def resize(self, target: int, reason: str = "") -> int:
        """Move to `target` units (`reason`: the controller's why, for the actuator's own records);
        returns the units in effect afterwards. `ActuatorError` when nothing could be changed."""

    def refresh(self) -> None:
        """Called on every observation (re-send a request that expires); may do nothing."""


# --- the controller -------------------------------------------------------------------------------
class LeadTimeController:
    """Keeps the lead time in ``[policy.low_s, policy.high_s]`` by resizing `actuator`.

    Feed it observations (`observe`) or let it poll (`run`). `clock` orders observations (monotonic
    seconds; tests pass a fake one), `wall_clock` stamps the log lines; `on_decision` is called with
    each change after it is logged (e.g. to keep a record of them).
    """

    def __init__(
        self,
        policy: ScalingPolicy,
        actuator: Actuator,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        logger: logging.Logger = log,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        self.policy = policy
        self.on_decision = on_decision
        self.actuator = actuator
        self.clock = clock
        self.wall_clock = wall_clock
        self.logger = logger
        self.size = actuator.current()
        self.decisions: list[Decision] = []
        self._want: str | None = None  # "grow" | "shrink" while a condition holds
        self._since: float | None = None
        self._count = 0
        self._last_change: float | None = None
        self._pinned: str | None = None  # the bound a wanted change ran into (logged once)

    # The hysteresis state, for tests and the log.
    @property
    def pending(self) -> tuple[str | None, int]:
        return self._want, self._count

    def observe(self, obs: Observation) -> Decision | None:
        """Take one observation; returns the change it caused (None: no change)."""
        p = self.policy
        now = self.clock() if obs.time_s is None else obs.time_s
        refresh = getattr(self.actuator, "refresh", None)
        if refresh is not None:
            refresh()
        self.size = self.actuator.current()
        lead = obs.lead_time_s
        if self.size < p.min_size or self.size > p.max_size:  # actors died, or started outside
            bound = p.min_size if self.size < p.min_size else p.max_size
            side = "below the minimum" if self.size < p.min_size else "above the maximum"
            return self._change(obs, lead, now, bound, f"{self.size} is {side} {bound}; back to the bound")
        if lead is None:
            self._reset()
            self.logger.debug(
                "autoscale: no lead time yet (backlog %s, rate %s)", obs.backlog_samples, obs.consumer_samples_per_s
            )
            return None
        want = "grow" if lead < p.low_s else "shrink" if lead > p.high_s else None
        if want is None:
            self._reset()
            self._pinned = None
            return None
        if want != self._want:
            self._want, self._since, self._count = want, now, 0
        self._count += 1
        held_s = now - (self._since if self._since is not None else now)
        if self._count < p.hold_observations or held_s < p.hold_s:
            return None
        if self._last_change is not None and now - self._last_change < p.cooldown_s:
            return None
        target = min(p.max_size, self.size + p.step) if want == "grow" else max(p.min_size, self.size - p.step)
        if target == self.size:
            if self._pinned != want:
                self._pinned = want
                bound = "maximum" if want == "grow" else "minimum"
                self.logger.info(
                    "autoscale: lead time %s is %s the band [%g, %g] s but the size is at its %s %d; holding",
                    _fmt(lead, " s"),
                    "under" if want == "grow" else "over",
                    p.low_s,
                    p.high_s,
                    bound,
                    self.size,
                )
            return None
        if want == "grow":
            why = f"lead time {_fmt(lead, ' s')} < low {p.low_s:g} s"
        else:
            why = f"lead time {_fmt(lead, ' s')} > high {p.high_s:g} s"
        why += f" for {self._count} observations over {held_s:g} s: {want}"
        return self._change(obs, lead, now, target, why)

    def _change(self, obs: Observation, lead: float | None, now: float, target: int, why: str) -> Decision | None:
        old = self.size
        try:
            new = self.actuator.resize(target, reason=why)
        except ActuatorError as exc:
            self.logger.warning("autoscale: %s could not resize %d -> %d: %s", self.actuator.name, old, target, exc)
            self._last_change = now  # back off for a cooldown before trying again
            self._reset()
            return None
        if new != target:
            why += f" ({self.actuator.name} reached {new} of {target})"
        self.size = new
        self._last_change = now
        self._reset()
        decision = Decision(
            wall_time=self.wall_clock(),
            lead_time_s=lead,
            backlog_samples=obs.backlog_samples,
            consumer_samples_per_s=obs.consumer_samples_per_s,
            old_size=old,
            new_size=new,
            reason=why,
        )
        self.decisions.append(decision)
        self.logger.info("%s", decision.line())
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision

    def _reset(self) -> None:
        self._want, self._since, self._count = None, None, 0

    def run(
        self,
        observe: Callable[[], Observation],
        *,
        interval_s: float = 30.0,
        stop: threading.Event | None = None,
        max_observations: int | None = None,
    ) -> list[Decision]:
        """Observe every `interval_s` until `stop` is set, the producer finished or failed, or
        `max_observations`; returns the decisions made. A failed observation (a file being
        rewritten, a network hiccup) is logged and skipped."""
        from megatron_qwenimage.monitor.snapshot import MonitorError

        stop = stop or threading.Event()
        n = 0
        while not stop.is_set() and (max_observations is None or n < max_observations):
            n += 1
            try:
                obs = observe()
            except (MonitorError, OSError) as exc:
                self.logger.warning("autoscale: observation failed (%s); next in %g s", exc, interval_s)
            else:
                self.observe(obs)
                if obs.producer_state in ("finished", "failed"):
                    self.logger.info("autoscale: the producer %s; the controller stops", obs.producer_state)
                    break
            stop.wait(interval_s)
        return list(self.decisions)


# --- actuator (a): the Ray autoscaler ---------------------------------------------------------------
class RayAutoscalerActuator:
    """Encoder capacity as ``size`` resource bundles requested from the Ray autoscaler.

    `bundle`: one unit, e.g. ``{"GPU": 1, "CPU": 8}`` (one encoder actor's reservation) or a whole
    node's. The request is absolute (the cluster is sized to fit ``size`` bundles), so one writer
    only: see the module docstring for why `via` defaults to Ray Data's coordinator when it exists
    (``"ray-data"``), else ``ray.autoscaler.sdk.request_resources`` (``"sdk"``). `send` replaces
    both (tests): ``send(bundles)``.
    """

    name = "ray-autoscaler"
    REQUESTER_ID = "qwenimage-lead-time-autoscaler"

    def __init__(
        self,
        bundle: Mapping[str, float],
        *,
        size: int = 0,
        via: str = "auto",
        expire_after_s: float = 600.0,
        send: Callable[[list[dict[str, float]]], None] | None = None,
    ) -> None:
        if not bundle or not all(isinstance(v, (int, float)) and v >= 0 for v in bundle.values()):
            raise ConfigError(f"RayAutoscalerActuator: bundle={dict(bundle)!r}: expected resources like {{'GPU': 1}}")
        if via not in ("auto", "ray-data", "sdk"):
            raise ConfigError(f"RayAutoscalerActuator: via={via!r}: expected auto, ray-data or sdk")
        self.bundle = {str(k): float(v) for k, v in bundle.items()}
        self.expire_after_s = expire_after_s
        self._size = size
        self._coordinator = None
        if send is not None:
            self._send, self.via = send, "custom"
        else:
            self.via = self._resolve(via)
            self._send = self._send_coordinator if self.via == "ray-data" else self._send_sdk

    def _resolve(self, via: str) -> str:
        if via in ("auto", "ray-data"):
            try:
                from ray.data._internal.cluster_autoscaler import DefaultAutoscalingCoordinator
            except ImportError:
                if via == "ray-data":
                    raise ConfigError(
                        "RayAutoscalerActuator: via='ray-data': this Ray Data has no AutoscalingCoordinator; use via='sdk'"
                    ) from None
                return "sdk"
            self._coordinator = DefaultAutoscalingCoordinator(self.REQUESTER_ID)
            return "ray-data"
        return "sdk"

    def _send_sdk(self, bundles: list[dict[str, float]]) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)

    def _send_coordinator(self, bundles: list[dict[str, float]]) -> None:
        self._coordinator.request_resources(resources=bundles, expire_after_s=self.expire_after_s)

    def current(self) -> int:
        return self._size

    def resize(self, target: int, reason: str = "") -> int:
        try:
            self._send([dict(self.bundle) for _ in range(target)])
        except Exception as exc:  # the GCS or the coordinator is unreachable
            raise ActuatorError(f"request_resources({target} x {self.bundle}) failed: {exc}") from exc
        self._size = target
        return target

    def refresh(self) -> None:
        if self.via == "ray-data" and self._size:
            try:
                self._send([dict(self.bundle) for _ in range(self._size)])
            except Exception as exc:
                log.warning("autoscale: refreshing the resource request failed: %s", exc)


# --- actuator (b): extra Ray workers as Slurm jobs ---------------------------------------------------
Runner = Callable[[Sequence[str]], str]


def run_command(argv: Sequence[str]) -> str:
    """Run `argv`; its stdout, or `ActuatorError` with its exit status and last stderr line."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ActuatorError(f"{argv[0]}: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise ActuatorError(f"{shlex.join(argv)} exited {proc.returncode}: {last[-1] if last else 'no output'}")
    return proc.stdout


@dataclass(frozen=True)
class SlurmWorkerConfig:
    """One extra Ray worker node as a Slurm job (the producer side's resources, one node)."""

    head_address: str  # HEAD:PORT of the producers' Ray cluster (its GCS)
    job_name: str = "qwenimage-encoder"
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    container: Mapping[str, Any] | None = None  # {image, mounts, workdir} (pyxis/enroot)
    env: Mapping[str, Any] = field(default_factory=dict)  # {activate, vars}
    log_dir: str | None = None
    ray_start_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        host, _, port = self.head_address.rpartition(":")
        if not host or not port.isdigit() or "://" in self.head_address:
            raise ConfigError(
                f"SlurmWorkerConfig.head_address={self.head_address!r}: expected HEAD:PORT of the producers' Ray "
                "head (its GCS, e.g. node001:6379)"
            )


def render_worker_script(cfg: SlurmWorkerConfig) -> str:
    """The sbatch script of one extra Ray worker node joining ``cfg.head_address``."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={cfg.job_name}", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"]
    if cfg.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={cfg.gpus_per_node}")
    if cfg.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cfg.cpus_per_task}")
    for key in ("partition", "account", "qos", "time"):
        value = getattr(cfg, key)
        if value:
            lines.append(f"#SBATCH --{key}={value}")
    if cfg.log_dir:
        lines.append(f"#SBATCH --output={cfg.log_dir}/%x-%j.out")
    lines += [
        "# An extra Ray worker node for the producers' cluster, submitted by the lead-time autoscaler",
        "# (launch/autoscale.py, SlurmWorkerActuator). It joins the head and runs whatever the producers",
        "# schedule on it until scancel; Ray Data restarts the actors and retries the tasks it loses then.",
        "set -euo pipefail",
    ]
    variables = dict((cfg.env or {}).get("vars") or {})
    for key, value in variables.items():
        lines.append(f"export {key}={shlex.quote(str(value))}")
    activate = (cfg.env or {}).get("activate")
    if activate:
        lines.append(str(activate))
    ray = ["ray", "start", f"--address={cfg.head_address}", "--block"]
    if cfg.gpus_per_node:
        ray.append(f"--num-gpus={cfg.gpus_per_node}")
    if cfg.cpus_per_task:
        ray.append(f"--num-cpus={cfg.cpus_per_task}")
    ray += list(cfg.ray_start_args)
    srun = ["srun", "--ntasks=1", "--kill-on-bad-exit=1"]
    if cfg.container:
        srun.append(f"--container-image={cfg.container['image']}")
        mounts = cfg.container.get("mounts") or []
        if mounts:
            srun.append(f"--container-mounts={','.join(mounts)}")
        if cfg.container.get("workdir"):
            srun.append(f"--container-workdir={cfg.container['workdir']}")
    lines.append(shlex.join([*srun, *ray]))
    return "\n".join(lines) + "\n"


class SlurmWorkerActuator:
    """Encoder capacity as extra Ray worker nodes, one Slurm job each (`render_worker_script`).

    `resize` submits (``sbatch --parsable``) or cancels (``scancel``, newest first) worker jobs;
    `current` is the number of jobs it submitted and has not cancelled. The base producer nodes are
    not counted: size 0 is the producer job as submitted. `runner` runs the commands (default:
    `run_command`; tests pass a fake).
    """

    name = "slurm-workers"

    def __init__(self, cfg: SlurmWorkerConfig, script_dir: str | Path, *, runner: Runner | None = None) -> None:
        self.cfg = cfg
        self.script_dir = Path(script_dir)
        self.runner = runner or run_command
        self.job_ids: list[str] = []
        self._script: Path | None = None

    @classmethod
    def from_job_spec(cls, spec, head_address: str, *, runner: Runner | None = None) -> SlurmWorkerActuator:
        """Workers with the producer side's resources of a `launch.job_spec.JobSpec` (scripts and
        logs under ``run_dir``)."""
        res = spec.producer.resources
        run_dir = Path(spec.run.run_dir)
        cfg = SlurmWorkerConfig(
            head_address=head_address,
            job_name=f"qwenimage-{spec.name}-encoder",
            gpus_per_node=res.gpus_per_node,
            cpus_per_task=res.cpus_per_task,
            partition=res.partition,
            account=res.account,
            qos=res.qos,
            time=res.time,
            container=res.container,
            env=res.env,
            log_dir=str(run_dir / "logs"),
        )
        return cls(cfg, run_dir / "autoscale", runner=runner)

    def script(self) -> Path:
        """Write (once) and return the worker's sbatch script (and create its log directory)."""
        if self._script is None:
            self.script_dir.mkdir(parents=True, exist_ok=True)
            if self.cfg.log_dir:  # Slurm does not create the directory of --output (the job would fail to launch)
                Path(self.cfg.log_dir).mkdir(parents=True, exist_ok=True)
            path = self.script_dir / "encoder-worker.sbatch"
            path.write_text(render_worker_script(self.cfg))
            self._script = path
        return self._script

    def current(self) -> int:
        return len(self.job_ids)

    def resize(self, target: int, reason: str = "") -> int:
        target = max(0, target)
        start = len(self.job_ids)
        try:
            while len(self.job_ids) < target:
                out = self.runner(["sbatch", "--parsable", str(self.script())]).strip()
                job_id = out.split(";", 1)[0].strip()  # --parsable: "ID" or "ID;CLUSTER"
                if not job_id:
                    raise ActuatorError(f"sbatch --parsable {self.script()} printed no job id")
                self.job_ids.append(job_id)
            while len(self.job_ids) > target:
                self.runner(["scancel", self.job_ids[-1]])
                self.job_ids.pop()
        except ActuatorError as exc:
            if len(self.job_ids) == start:  # nothing changed
                raise
            log.warning("autoscale: stopped at %d worker jobs of %d: %s", len(self.job_ids), target, exc)
        return len(self.job_ids)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        """Cancel every worker job this actuator submitted."""
        self.resize(0)


# --- actuator (c): a running producer's own encoder pools -------------------------------------------
class ProducerPoolActuator:
    """Encoder capacity as the actors per pool of a running ``qwenimage produce``.

    `resize` writes the cache's pool-control file (`producers.pool_control`: the same size for each
    pool in `pools`, with the controller's reason, leased for `lease_s` seconds); the producer runs
    its next window of partitions with exactly that many actors per pool, clamped to the pool's own
    ``--vae-actors`` / ``--text-actors`` bounds (``--window-partitions`` sets how soon that is). On a
    cluster with a Ray autoscaler the actors the producer cannot place are the resource demand that
    adds nodes. `refresh` (every observation) renews the lease, so the file expires, and the
    producer falls back to its own bounds, only once this controller stops.

    `current` is the size the producer really runs: its ``status.json`` publishes each pool's size
    after clamping (``pool_bounds``) with the control file version it applied
    (``pool_control_version``); once that is the file's version, the largest controlled pool's size
    there; until then the size the file asks for (a restarted controller continues from it); with
    no live file (none, unreadable, another format, expired) `initial`. Nothing is written before
    the producer created the cache (`ActuatorError`: the controller backs off and tries again). One
    controller per cache: the file has one writer.
    """

    name = "producer-pools"

    def __init__(
        self,
        cache: str,
        pools: Sequence[str] = ("vae", "text"),
        *,
        initial: int = 1,
        lease_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from megatron_qwenimage.cache.storage import CacheStorage
        from producers.pool_control import DEFAULT_LEASE_S, POOL_NAMES

        unknown = sorted(set(pools) - set(POOL_NAMES))
        if not pools or unknown:
            raise ConfigError(f"ProducerPoolActuator: pools={list(pools)!r}: expected some of {list(POOL_NAMES)}")
        lease_s = DEFAULT_LEASE_S if lease_s is None else lease_s
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not 0 < lease_s < math.inf:
            raise ConfigError(f"ProducerPoolActuator: lease_s={lease_s!r}: expected a finite number of seconds > 0")
        self.storage = CacheStorage(cache)
        self.pools = tuple(pools)
        self.initial = initial
        self.lease_s = float(lease_s)
        self.clock = clock

    def current(self) -> int:
        from producers.pool_control import read_pool_target

        try:
            target = read_pool_target(self.storage)
        except (ConfigError, OSError) as exc:
            log.warning("autoscale: cannot read the pool target (%s); assuming %d", exc, self.initial)
            return self.initial
        if target is None or target.expired(self.clock()):
            return self.initial
        applied = self.applied_sizes(target.version)
        sizes = applied if applied is not None else target.sizes
        named = [sizes[p] for p in self.pools if p in sizes]
        return max(named) if named else self.initial

    def applied_sizes(self, version: int) -> dict[str, int] | None:
        """Pool -> actors the producer runs under control file `version`, from its ``status.json``
        (the pools it runs at one fixed size); None while it runs another version (not applied
        yet) or has no readable status."""
        from megatron_qwenimage.monitor.snapshot import (
            STATUS_FILE,
            MonitorError,
            check_status,
            count,
            read_json_object,
        )

        try:
            raw = read_json_object(self.storage, STATUS_FILE, "the producer status")
        except (MonitorError, OSError) as exc:
            log.debug("autoscale: cannot read the producer status (%s)", exc)
            return None
        if raw is None:
            return None
        status, _ = check_status(raw)
        bounds = status.get("pool_bounds")
        if status.get("pool_control_version") != version or not isinstance(bounds, dict):
            return None
        return {pool: count(lo) for pool, (lo, hi) in bounds.items() if lo == hi}

    def resize(self, target: int, reason: str = "") -> int:
        from megatron_qwenimage.cache.manifest import CACHE_INFO_FILE
        from producers.pool_control import write_pool_target

        target = max(1, target)  # a producer's pool cannot run with no actor
        try:
            if not self.storage.exists(CACHE_INFO_FILE):  # never write into a folder that is not a cache
                raise ActuatorError(
                    f"{self.storage.url} is not a cache yet (no {CACHE_INFO_FILE}): the producer creates it"
                )
            write_pool_target(self.storage, dict.fromkeys(self.pools, target), reason=reason, lease_s=self.lease_s)
        except OSError as exc:
            raise ActuatorError(f"writing the pool target to {self.storage.url} failed: {exc}") from exc
        return target

    def refresh(self) -> None:
        """Renew the lease of the live target (nothing when there is none or it expired)."""
        from producers.pool_control import renew_pool_target

        try:
            renew_pool_target(self.storage, now=self.clock())
        except OSError as exc:
            log.warning("autoscale: renewing the pool target in %s failed: %s", self.storage.url, exc)
