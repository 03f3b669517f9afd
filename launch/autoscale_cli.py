"""``qwenimage launch autoscale job.yaml``: keep the producers' lead time in a band (`launch.autoscale`).

Reads the run's own files (the cache's commits and ``status.json``, the consumer's
``run_dir/metrics.jsonl``: `MonitorObserver`) every ``--interval-s`` and resizes the producers'
encoder capacity through one actuator:

* ``pools`` (default): the actors per pool of the running ``qwenimage produce`` (the cache's
  ``control/pools.json``, applied at its next window, leased for `pool_lease_s` and renewed every
  observation); bounds default to the producer's own ``vae_actors`` MIN:MAX;
* ``slurm-workers``: extra Slurm jobs, each a Ray worker node joining the producers' Ray head
  (``--head-address``, default ``$QWENIMAGE_RAY_ADDRESS``, else ``producer.ray_address``, else
  ``run_dir/slurm/ray-address``, which the producer job writes once its cluster is up); bounds
  default to 0..``producer.nodes`` extra nodes;
* ``ray-autoscaler``: resource bundles requested from the cluster's Ray autoscaler (KubeRay,
  cloud), one bundle per encoder actor (``producer.options.gpus_per_actor`` / ``cpus_per_actor``).

The settings (`SETTINGS`) are flags, or keys of the job spec's ``producer.autoscale`` section
(a flag wins); with that section, ``qwenimage launch slurm`` runs this command inside the producer
job, beside the producers. Each change is one line on stderr and one JSON record in
``run_dir/autoscale/decisions.jsonl``.
It stops when the producer finished or failed, after ``--max-observations``, or on Ctrl-C /
SIGTERM (``slurm-workers`` then cancels the worker jobs it submitted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from launch.autoscale import (
    LeadTimeController,
    MonitorObserver,
    ProducerPoolActuator,
    RayAutoscalerActuator,
    SlurmWorkerActuator,
)
from launch.autoscale_settings import ACTUATORS, SETTINGS, Setting, resolve
from launch.slurm import RAY_ADDRESS_FILE, SCRIPT_DIR
from megatron_qwenimage.config import ConfigError

log = logging.getLogger("launch.autoscale")


def add_autoscale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "job_spec",
        metavar="JOB_YAML",
        help="the job spec (docs/launch.md): its cache, run_dir, producer resources and producer.autoscale settings",
    )
    for name, setting in SETTINGS.items():
        kwargs = {"choices": ACTUATORS} if name == "actuator" else {"type": setting.kind, "metavar": setting.metavar}
        parser.add_argument(Setting.flag(name), default=None, help=setting.help, **kwargs)
    parser.add_argument(
        "--max-observations",
        type=int,
        default=None,
        metavar="N",
        help="stop after N observations (default: until the producer finished or failed)",
    )
    parser.add_argument(
        "--head-address",
        default=None,
        metavar="HOST:PORT",
        help="slurm-workers actuator: the producers' Ray head (default $QWENIMAGE_RAY_ADDRESS, else "
        "producer.ray_address, else RUN_DIR/slurm/ray-address, which the producer job writes once its Ray is up)",
    )


#: Observations a pools target outlives unrenewed before the producer drops it (a few failed
#: observations never let it lapse; a stopped controller's does within this many intervals).
LEASE_OBSERVATIONS = 10


def pool_lease_s(interval_s: float) -> float:
    """Seconds the pools actuator's control file stands unrenewed: `producers.pool_control.
    DEFAULT_LEASE_S`, or `LEASE_OBSERVATIONS` observation intervals (`interval_s`) if that is longer."""
    from producers.pool_control import DEFAULT_LEASE_S

    return max(DEFAULT_LEASE_S, LEASE_OBSERVATIONS * interval_s)


def build_controller(args, spec, on_decision=None) -> tuple[LeadTimeController, dict[str, Any]]:
    """The controller with the policy and actuator of `resolve`, and the settings it used;
    `on_decision` is called with each change."""
    values, policy = resolve(args, spec)
    opts = spec.run.producer.options
    if values["actuator"] == "pools":
        pools = tuple(p.strip() for p in values["pools"].split(",") if p.strip())
        actuator = ProducerPoolActuator(
            spec.run.cache, pools, initial=policy.min_size, lease_s=pool_lease_s(values["interval_s"])
        )
    elif values["actuator"] == "slurm-workers":
        head = args.head_address or os.environ.get("QWENIMAGE_RAY_ADDRESS") or spec.producer.ray_address
        written = Path(spec.run.run_dir) / SCRIPT_DIR / RAY_ADDRESS_FILE
        if not head and written.is_file():
            head = written.read_text().strip()
        if not head:
            raise ConfigError(
                f"--head-address: the slurm-workers actuator needs the producers' Ray head HOST:PORT; {written} "
                "does not exist yet (the producer job writes it once its Ray cluster is up): wait for it, or pass "
                "--head-address"
            )
        actuator = SlurmWorkerActuator.from_job_spec(spec, head)
    else:
        bundle = {"CPU": float(opts.get("cpus_per_actor", 0.5))}
        if float(opts.get("gpus_per_actor", 0) or 0) > 0:
            bundle["GPU"] = float(opts["gpus_per_actor"])
        actuator = RayAutoscalerActuator(bundle)
    return LeadTimeController(policy, actuator, on_decision=on_decision), values


def wait_for_observer(spec, interval_s: float, sleep=time.sleep) -> MonitorObserver:
    """A `MonitorObserver` of the run's cache and run directory, once both can be opened: started
    beside the producers, the controller may come before the cache does (one line says it waits)."""
    from megatron_qwenimage.monitor.snapshot import MonitorError

    said = False
    while True:
        try:
            return MonitorObserver(spec.run.cache, spec.run.run_dir)
        except MonitorError as exc:
            if not said:
                log.info("autoscale %s: waiting for the run's files (%s)", spec.name, exc)
                said = True
        sleep(interval_s)


def run_autoscale(args) -> int:
    from launch.job_spec import load_job_spec
    from megatron_qwenimage.cli import configure_logging

    configure_logging(logging.INFO, fmt="%(message)s")
    if args.max_observations is not None and args.max_observations < 1:
        raise ConfigError(f"--max-observations {args.max_observations}: expected a whole number >= 1")
    spec = load_job_spec(args.job_spec, check_paths=False, check_ray=False)
    record = Path(spec.run.run_dir) / "autoscale" / "decisions.jsonl"

    def append(decision) -> None:
        record.parent.mkdir(parents=True, exist_ok=True)
        with open(record, "a") as f:
            f.write(
                json.dumps({"run": spec.name, "actuator": actuator.name, **asdict(decision)}, sort_keys=True) + "\n"
            )

    controller, values = build_controller(args, spec, on_decision=append)
    actuator = controller.actuator
    observer = wait_for_observer(spec, values["interval_s"])
    p = controller.policy
    log.info(
        "autoscale %s: %s between %d and %d, lead time band [%g, %g] s, every %g s; decisions in %s",
        spec.name,
        actuator.name,
        p.min_size,
        p.max_size,
        p.low_s,
        p.high_s,
        values["interval_s"],
        record,
    )
    try:
        controller.run(observer, interval_s=values["interval_s"], max_observations=args.max_observations)
    finally:
        if isinstance(actuator, SlurmWorkerActuator):
            actuator.close()  # the extra worker jobs end with the controller
    log.info("autoscale %s: stopped after %d change(s), size %d", spec.name, len(controller.decisions), controller.size)
    return 0
