"""The cluster job spec (``job.yaml``): both sides, their resources, the cache and the run config.

    name: exp1                            # the run label (Prometheus `run`, monitor, job names)
    cache: /lustre/qwenimage/cache        # path or fsspec URL; must exist (written by an earlier
                                          # `qwenimage produce`, or an empty directory) unless `create_cache: true`
    run_dir: /lustre/qwenimage/runs/exp1  # metrics, checkpoints, export, logs, rendered scripts
    producer:
      nodes: 2
      gpus_per_node: 8
      cpus_per_task: 32                   # optional (Slurm --cpus-per-task of the one task per node)
      partition: gpu                      # optional: partition, account, qos
      time: "04:00:00"                    # Slurm time limit [D-]HH:MM:SS or minutes
      container: {image: nvcr.io/acme/qwenimage:1, mounts: ["/lustre:/lustre"]}   # or:
      env: {activate: "source /opt/venv/bin/activate", vars: {HF_HOME: /lustre/hf}}
      ray_address: null                   # an existing Ray cluster instead of one inside the job
      options: {input: /lustre/raw/laion, encoders: /lustre/models/qwen-image, buckets: "256,640,1328"}
      autoscale: {low_s: 600, high_s: 3600}   # optional: the lead-time controller beside the producers
                                          # (`qwenimage launch autoscale` settings; docs/launch.md)
    consumer:
      nodes: 4
      gpus_per_node: 8
      procs_per_node: 8                   # optional: torchrun processes per node (default gpus_per_node;
                                          # with gpus_per_node: 0, CPU processes: gloo, tests)
      master_port: 29500                  # optional: torchrun's rendezvous port on the first node
      partition: gpu
      time: "04:00:00"
      signal_before_s: 120                # SIGTERM this long before the hard kill (Slurm: the time limit;
                                          # Kubernetes: the pods' termination grace): checkpoint, requeue
      max_restarts: 5                     # requeues before the job gives up
      gpu: h200                           # optional: the GPU model (`megatron_qwenimage.planner.GPUS`) the capacity
                                          # planner predicts the step time for (default h200)
      step_time_s: null                   # optional: your measured seconds per step (overrides the prediction)
      config: {...}                       # or a path: the run config `qwenimage train` takes

The producer `options` are `qwenimage produce` flags as keys (`launch.run_config.PRODUCER_FLAGS`),
the consumer `config` is `qwenimage train`'s run config; the run owns its output paths exactly as
``qwenimage run`` does (`launch.run_config`: the consumer config's logging dir, checkpoint dir and export are placed under
``run_dir``, replacing what an existing training config says). `load_job_spec` validates everything before anything
is submitted, each fault one `ConfigError` naming the key and the fix: unknown keys, TP x PP x DP
not equal to the consumer GPUs, heads not divisible by TP, more stages than blocks, a cache that
does not exist, an unreachable Ray address, a time limit shorter than one checkpoint interval.

The time limit check takes ``consumer.step_time_s`` when given, else (on GPUs) the capacity planner's
prediction for ``consumer.gpu`` (`predict_step_time`: `megatron_qwenimage.planner.step_time` for the run config's
model, layout, recompute, precision and the slowest bucket of its stages); CPU jobs
(``gpus_per_node: 0``) without a step time are not checked.
"""

from __future__ import annotations

import copy
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from launch.run_config import ConsumerSpec, ProducerSpec, RunSpec, run_spec_from_dict
from megatron_qwenimage.config import ConfigError, read_yaml

TOP_KEYS = ("name", "cache", "run_dir", "create_cache", "producer", "consumer")
RESOURCE_KEYS = ("nodes", "gpus_per_node", "cpus_per_task", "partition", "account", "qos", "time", "container", "env")
PRODUCER_KEYS = (*RESOURCE_KEYS, "ray_address", "ray_port", "options", "autoscale")
CONSUMER_KEYS = (
    *RESOURCE_KEYS,
    "procs_per_node",
    "master_port",
    "signal_before_s",
    "max_restarts",
    "gpu",
    "step_time_s",
    "config",
)
#: Ray's daemons of a producer job listen on ``ray_port`` and the next `RAY_PORTS` - 1 ports (`launch.slurm`).
RAY_PORTS = 8
#: Seconds of ``consumer.signal_before_s`` kept for what follows the training processes' exit
#: before the hard kill: torchrun reaping them and exiting, the step ending, the Slurm batch
#: script's requeue (``squeue``, ``scontrol requeue``) or the pod's end. The training processes
#: get the rest, `ConsumerJob.shutdown_timeout_s`, to finish their step and save.
EXIT_MARGIN_S = 20
CONTAINER_KEYS = ("image", "mounts", "workdir")
ENV_KEYS = ("activate", "vars")


def parse_time_limit(value: Any, key: str) -> int:
    """Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in seconds."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if m is None or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a Slurm time limit such as 90 (minutes), 04:00:00 or 1-00:00:00")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif b is None:  # MM
        seconds = a * 60
    elif c is None:  # MM:SS
        seconds = a * 60 + b
    else:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    if seconds <= 0:
        raise ConfigError(f"{key}={value!r}: expected a positive time limit")
    return seconds


def _positive_int(d: Mapping, key: str, where: str, default: int | None = None) -> int | None:
    value = d.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "gpus_per_node" else 1):
        raise ConfigError(
            f"{where}.{key}: expected a whole number >= {0 if key == 'gpus_per_node' else 1}, got {value!r}"
        )
    return value


def _unknown(d: Mapping, allowed, where: str) -> None:
    unknown = sorted(set(d) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")


@dataclass(frozen=True)
class Resources:
    """Where and how long one side runs (Slurm terms; the Kubernetes renderer maps them)."""

    nodes: int
    gpus_per_node: int
    time_s: int | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    container: dict[str, Any] | None = None
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def _resources(d: Mapping, where: str) -> Resources:
    nodes = _positive_int(d, "nodes", where, 1)
    gpus = _positive_int(d, "gpus_per_node", where, 0)
    cpus = _positive_int(d, "cpus_per_task", where)
    for key in ("partition", "account", "qos"):
        value = d.get(key)
        if value is not None and (not isinstance(value, str) or not value or any(c.isspace() for c in value)):
            raise ConfigError(f"{where}.{key}: expected a Slurm name without spaces, got {value!r}")
    time_s = parse_time_limit(d["time"], f"{where}.time") if d.get("time") is not None else None
    container = d.get("container")
    env = d.get("env") or {}
    if container is not None:
        if not isinstance(container, Mapping):
            raise ConfigError(f"{where}.container: expected a mapping {{image, mounts, workdir}}, got {container!r}")
        _unknown(container, CONTAINER_KEYS, f"{where}.container")
        if not isinstance(container.get("image"), str) or not container["image"]:
            raise ConfigError(f"{where}.container.image: expected an image name (e.g. nvcr.io/acme/qwenimage:1)")
        mounts = container.get("mounts", [])
        if not isinstance(mounts, list) or not all(isinstance(m, str) and ":" in m for m in mounts):
            raise ConfigError(f"{where}.container.mounts: expected a list of 'SRC:DST' strings, got {mounts!r}")
        container = dict(container)
    if not isinstance(env, Mapping):
        raise ConfigError(f"{where}.env: expected a mapping {{activate, vars}}, got {env!r}")
    _unknown(env, ENV_KEYS, f"{where}.env")
    if container is not None and env.get("activate"):
        raise ConfigError(f"{where}: give either container or env.activate (the container has the environment)")
    variables = env.get("vars", {})
    if not isinstance(variables, Mapping) or not all(
        isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) for k in variables
    ):
        raise ConfigError(f"{where}.env.vars: expected a mapping of environment variable names to values")
    return Resources(
        nodes=nodes,
        gpus_per_node=gpus,
        time_s=time_s,
        time=None if d.get("time") is None else str(d["time"]),
        cpus_per_task=cpus,
        partition=d.get("partition"),
        account=d.get("account"),
        qos=d.get("qos"),
        container=container,
        env={"activate": env.get("activate"), "vars": {k: str(v) for k, v in variables.items()}},
    )


@dataclass(frozen=True)
class ProducerJob:
    resources: Resources
    spec: ProducerSpec
    ray_address: str | None = None
    ray_port: int = 6379
    autoscale: dict[str, Any] | None = None
    """``producer.autoscale``: the lead-time controller's settings (`launch.autoscale_cli.SETTINGS`);
    the Slurm producer job runs the controller beside the producers; None: no controller."""


@dataclass(frozen=True)
class ConsumerJob:
    resources: Resources
    spec: ConsumerSpec
    signal_before_s: int = 120
    max_restarts: int = 5
    step_time_s: float | None = None
    procs_per_node: int = 1
    """torchrun processes per node: ``procs_per_node``, else ``gpus_per_node`` (one per GPU), else 1."""
    master_port: int = 29500
    gpu: str | None = None
    """The GPU model (a `megatron_qwenimage.planner.GPUS` name) of the step time prediction; None: the planner's
    measured GPU (`megatron_qwenimage.planner.MEASURED_GPU`)."""

    @property
    def shutdown_timeout_s(self) -> int:
        """torchrun's ``--shutdown-timeout``: how long the training processes get from SIGTERM to
        finish their step and commit a checkpoint before torchrun SIGKILLs them. The stop signal
        comes `signal_before_s` before the hard kill (Slurm's time limit, Kubernetes' termination
        grace), and `EXIT_MARGIN_S` of that is left for torchrun and the job to end in time, so
        ``0 < shutdown_timeout_s < signal_before_s``."""
        return self.signal_before_s - EXIT_MARGIN_S


@dataclass(frozen=True)
class JobSpec:
    """A validated ``job.yaml`` (`load_job_spec`); `run` is the same two sides as ``qwenimage run``'s."""

    run: RunSpec
    producer: ProducerJob
    consumer: ConsumerJob
    create_cache: bool = False
    source: str = "<dict>"
    document: dict[str, Any] = field(default_factory=dict)
    """The mapping it was validated from (a copy): what a job that re-reads the spec is given."""

    @property
    def name(self) -> str:
        return self.run.name


def load_job_spec(path: str | os.PathLike, *, check_paths: bool = True, check_ray: bool = True) -> JobSpec:
    """Read and validate ``job.yaml`` (nothing is submitted or written)."""
    return job_spec_from_dict(
        read_yaml(path, what="job spec"), source=str(path), check_paths=check_paths, check_ray=check_ray
    )


def job_spec_from_dict(d: Any, source: str = "<dict>", *, check_paths: bool = True, check_ray: bool = True) -> JobSpec:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping with keys {list(TOP_KEYS)}, got {d!r}")
    _unknown(d, TOP_KEYS, source)
    for key in ("name", "cache", "run_dir", "producer", "consumer"):
        if key not in d:
            raise ConfigError(f"{source}: missing key `{key}`")
    create_cache = d.get("create_cache", False)
    if not isinstance(create_cache, bool):
        raise ConfigError(f"create_cache: expected true or false, got {create_cache!r}")
    p, c = d["producer"], d["consumer"]
    for where, side, allowed in (("producer", p, PRODUCER_KEYS), ("consumer", c, CONSUMER_KEYS)):
        if not isinstance(side, Mapping):
            raise ConfigError(f"{where}: expected a mapping of keys, got {side!r}")
        _unknown(side, allowed, where)
    p_res, c_res = _resources(p, "producer"), _resources(c, "consumer")
    procs = _positive_int(c, "procs_per_node", "consumer", max(c_res.gpus_per_node, 1))
    if c_res.gpus_per_node and procs != c_res.gpus_per_node:
        raise ConfigError(
            f"consumer.procs_per_node={procs}: one training process per GPU, so it must equal "
            f"consumer.gpus_per_node={c_res.gpus_per_node} (leave it out); it sets CPU processes when "
            "gpus_per_node is 0"
        )
    world = c_res.nodes * procs
    per_node = "procs_per_node" if "procs_per_node" in c else "gpus_per_node"
    world_keys = f"consumer.nodes={c_res.nodes} x consumer.{per_node}={procs} = {world} ranks"
    options = p.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"producer.options: expected a mapping of qwenimage produce flags, got {options!r}")
    if "input" not in options:
        raise ConfigError("producer.options.input: missing (the raw data the producers read: folder, manifest, .tar)")
    try:
        run = run_spec_from_dict(
            {
                "name": d["name"],
                "run_dir": d["run_dir"],
                "cache": d["cache"],
                "report": False,
                "producer": dict(options),
                "consumer": {"nproc_per_node": world, "config": c.get("config")},
            },
            source=source,
            replace_owned_paths=True,
            world=world_keys,
            local_producer=False,  # the job's producer runs on its cluster's Ray
        )
    except ConfigError as exc:
        raise ConfigError(_job_key(str(exc))) from None
    signal_before = _positive_int(c, "signal_before_s", "consumer", 120)
    if signal_before <= EXIT_MARGIN_S:
        raise ConfigError(
            f"consumer.signal_before_s={signal_before}: expected more than {EXIT_MARGIN_S} s, the part of it kept "
            "for torchrun to stop and the job to requeue or end; the rest is the training's time to finish its "
            "step and save"
        )
    restarts = c.get("max_restarts", 5)
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
        raise ConfigError(f"consumer.max_restarts: expected a whole number >= 0, got {restarts!r}")
    step_time = c.get("step_time_s")
    if step_time is not None and (
        isinstance(step_time, bool) or not isinstance(step_time, (int, float)) or step_time <= 0
    ):
        raise ConfigError(
            f"consumer.step_time_s: expected seconds > 0 (your measured or planned step time), got {step_time!r}"
        )
    gpu = c.get("gpu")
    if gpu is not None:
        _check_gpu(gpu)
    ray_port = p.get("ray_port", 6379)
    if not isinstance(ray_port, int) or isinstance(ray_port, bool) or not 1 <= ray_port <= 65536 - RAY_PORTS:
        raise ConfigError(
            f"producer.ray_port: expected a TCP port 1..{65536 - RAY_PORTS} (Ray's GCS; its other daemons take "
            f"the next {RAY_PORTS - 1}), got {ray_port!r}"
        )
    master_port = c.get("master_port", 29500)
    if not isinstance(master_port, int) or isinstance(master_port, bool) or not 1 <= master_port <= 65535:
        raise ConfigError(f"consumer.master_port: expected a TCP port 1..65535, got {master_port!r}")
    if "ray_address" in options:
        raise ConfigError(
            "producer.options.ray_address: the job decides where the producers' Ray is; set producer.ray_address "
            "(an existing cluster) instead, or leave both out for a Ray cluster inside the producer job"
        )
    autoscale = None
    if p.get("autoscale") is not None:
        from launch.autoscale_settings import check_section

        autoscale = check_section(p["autoscale"])
    spec = JobSpec(
        run=run,
        producer=ProducerJob(
            p_res, run.producer, ray_address=p.get("ray_address"), ray_port=ray_port, autoscale=autoscale
        ),
        consumer=ConsumerJob(c_res, run.consumer, signal_before, restarts, step_time, procs, master_port, gpu),
        create_cache=create_cache,
        source=source,
        document=copy.deepcopy(dict(d)),
    )
    _check_time_limit(spec)
    if autoscale is not None:
        from launch.autoscale_settings import resolve

        resolve(None, spec)  # the band, the bounds, the pools: checked before anything is submitted
    _check_data_parallel(spec)
    if check_paths and not create_cache:
        _check_cache_exists(run.cache)
    if check_ray and spec.producer.ray_address:
        check_ray_reachable(spec.producer.ray_address, "producer.ray_address")
    return spec


def _job_key(message: str) -> str:
    """`run_spec_from_dict` names the producer flags ``producer.<key>`` and the consumer's world
    ``consumer.nproc_per_node``: in a job spec they are ``producer.options.<key>`` and the GPUs."""
    message = re.sub(r"\bproducer(\.|:)(?!options)", r"producer.options\1", message)
    return message.replace("consumer.nproc_per_node", "consumer.nodes x consumer.gpus_per_node (or procs_per_node)")


@dataclass(frozen=True)
class StepTimePrediction:
    """The capacity planner's step time of a job's consumer (`predict_step_time`): its slowest bucket."""

    seconds: float
    gpu: str
    gpu_assumed: bool
    """True when ``consumer.gpu`` is absent and the planner's measured GPU was taken."""
    stage: str
    bucket: str
    resolution: int
    """The square side (px) the planner models `bucket` as: the smallest multiple of 16 px with at
    least the bucket's image tokens (the bucket's own side when it is square)."""
    micro_batch: int
    microbatches: int
    text_tokens: int
    precision: str
    layout: Any
    """The `megatron_qwenimage.planner.Layout` of the consumer world."""
    parts: dict[str, float] = field(default_factory=dict)
    """`megatron_qwenimage.planner.step_time`'s parts of the slowest bucket."""

    def describe(self) -> str:
        gpu = f"{self.gpu}, the planner's measured GPU (set consumer.gpu)" if self.gpu_assumed else self.gpu
        square = f"{self.resolution}x{self.resolution}"
        bucket = self.bucket if self.bucket == square else f"{self.bucket} (as {square})"
        return (
            f"qwenimage plan's model for {gpu}, bucket {bucket} of stage {self.stage}: micro-batch "
            f"{self.micro_batch} x {self.microbatches} micro-batches, {self.layout.name}, {self.precision}, "
            f"{self.text_tokens} text tokens"
        )


def predict_step_time(spec: JobSpec, gpu: str | None = None) -> StepTimePrediction:
    """Seconds per optimizer step of the consumer by the capacity planner's model (`megatron_qwenimage.planner`).

    The run config's model, its layout on the consumer world (`RunConfig.layout`; the planner
    ignores vpp), recompute mode, precision (``fp8`` when ``precision.fp8`` is set, else ``bf16``),
    ``data.text_length`` (else the planner's default text tokens), the DP reduction dtype and gather
    depth (``data_parallel``) and, per stage and bucket, the
    micro-batch and the micro-batches per step ``max(pp, ceil(global_batch / (dp x micro_batch)))``
    (as `megatron_qwenimage.planner.plan_bucket` counts them), on `gpu` (default ``consumer.gpu``, else
    `megatron_qwenimage.planner.MEASURED_GPU`, the card the planner's rates were measured on). The slowest bucket
    of all stages is returned (the conservative choice for a time limit).
    """
    import math

    from consumers.train import RunConfig
    from megatron_qwenimage import planner as plan
    from megatron_qwenimage.cache.shard_format import Bucket
    from megatron_qwenimage.config import PIXELS_PER_TOKEN_SIDE

    chosen = gpu or spec.consumer.gpu
    name = chosen or plan.MEASURED_GPU
    _check_gpu(name)
    cfg = RunConfig.from_dict(spec.run.consumer.config, source="consumer.config")
    par = cfg.layout(spec.run.consumer.nproc_per_node)
    layout = plan.Layout(par.tp, par.pp, par.dp, cfg.recompute.mode, par.sequence_parallel)
    precision = "fp8" if cfg.precision.fp8 is not None else "bf16"
    rates = plan.step_rates(name, precision)
    gpus_per_node = spec.consumer.resources.gpus_per_node or plan.PlanInputs.gpus_per_node
    inputs = plan.PlanInputs(
        gpus=par.world_size,
        gpu=name,
        mix=((PIXELS_PER_TOKEN_SIDE, 1.0),),
        precision=precision,
        gpus_per_node=gpus_per_node,
        text_tokens=cfg.data.text_length or plan.PlanInputs.text_tokens,
    )
    best: StepTimePrediction | None = None
    for stage in cfg.data.stages:
        m = max(layout.pp, math.ceil(stage.global_batch / (layout.dp * stage.micro_batch)))
        for bucket_name in stage.buckets:
            tokens = Bucket.parse(bucket_name).num_image_tokens
            side = math.isqrt(tokens)
            side += side * side < tokens  # the planner's buckets are squares: at least as many tokens
            resolution = PIXELS_PER_TOKEN_SIDE * side
            parts = plan.step_time(
                cfg.model,
                layout,
                resolution,
                stage.micro_batch,
                m,
                inputs.text_tokens,
                rates,
                inputs.spec,
                inputs.gpus_per_node,
                grad_reduce_bytes=plan.GRAD_REDUCE_BYTES[cfg.data_parallel.grad_reduce_dtype],
                param_gather_depth=cfg.data_parallel.param_gather_depth,
            )
            if best is None or parts["total"] > best.seconds:
                best = StepTimePrediction(
                    seconds=parts["total"],
                    gpu=name,
                    gpu_assumed=chosen is None,
                    stage=stage.name,
                    bucket=bucket_name,
                    resolution=resolution,
                    micro_batch=stage.micro_batch,
                    microbatches=m,
                    text_tokens=inputs.text_tokens,
                    precision=precision,
                    layout=layout,
                    parts=dict(parts),
                )
    assert best is not None  # data.stages and their buckets are never empty (ReaderConfig)
    return best


def _check_gpu(gpu: Any) -> None:
    from megatron_qwenimage.planner import GPUS

    if not isinstance(gpu, str) or gpu not in GPUS:
        raise ConfigError(f"consumer.gpu={gpu!r}: not a GPU the capacity planner knows; expected one of {sorted(GPUS)}")


def _step_time(spec: JobSpec) -> tuple[float, str] | None:
    """(seconds per step, how it is known): ``consumer.step_time_s`` when given; else, on GPUs,
    `predict_step_time`'s; None for a CPU job without one."""
    step_time = spec.consumer.step_time_s
    if step_time is not None:
        return step_time, f"consumer.step_time_s={step_time:g} s"
    if spec.consumer.resources.gpus_per_node > 0:
        predicted = predict_step_time(spec)
        return predicted.seconds, (
            f"predicted step time {predicted.seconds:.1f} s ({predicted.describe()}; set consumer.step_time_s to "
            "your measured one)"
        )
    return None


def _check_time_limit(spec: JobSpec) -> None:
    """A consumer time limit must leave room for one checkpoint interval (else no progress survives),
    and the stop signal's lead must leave the training time to finish the step it is in.

    The step time is `_step_time`'s; a CPU job (``gpus_per_node: 0``) without one is not checked."""
    limit = spec.consumer.resources.time_s
    ckpt = spec.run.consumer.config.get("checkpoint") or {}
    interval = ckpt.get("interval")
    known = _step_time(spec)
    if known is None:
        return
    step_time, what = known
    signal_before = spec.consumer.signal_before_s
    if limit is not None and interval:
        needed = interval * step_time + signal_before
        if limit < needed:
            raise ConfigError(
                f"consumer.time={spec.consumer.resources.time!r} ({limit} s) is shorter than one checkpoint "
                f"interval: checkpoint.interval={interval} steps x {what} + signal_before_s={signal_before} s = "
                f"{needed:.0f} s; raise the time limit or lower consumer.config.checkpoint.interval"
            )
    budget = spec.consumer.shutdown_timeout_s
    if budget < step_time:
        raise ConfigError(
            f"consumer.signal_before_s={signal_before} leaves the training {budget} s from SIGTERM to finish its "
            f"step and save (signal_before_s less {EXIT_MARGIN_S} s for torchrun and the job to end), less than "
            f"one step: {what}; raise consumer.signal_before_s to at least {EXIT_MARGIN_S + step_time:.0f} s "
            "plus the time a checkpoint takes to save"
        )


def _check_data_parallel(spec: JobSpec) -> None:
    """Every stage's global batch must split over the data-parallel ranks of the consumer world."""
    from consumers.train import RunConfig

    cfg = RunConfig.from_dict(spec.run.consumer.config, source="consumer.config")
    layout = cfg.layout(spec.run.consumer.nproc_per_node)
    try:
        cfg.data.check_dp(layout.dp)
    except ConfigError as exc:
        raise ConfigError(
            f"consumer.config.{exc} (tp={layout.tp} x pp={layout.pp} x dp={layout.dp} on consumer.nodes="
            f"{spec.consumer.resources.nodes} x {spec.consumer.procs_per_node} processes)"
        ) from None


def _check_cache_exists(cache: str) -> None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(cache)
        exists = fs.exists(path)
    except Exception as exc:  # an unknown protocol, missing credentials...
        raise ConfigError(f"cache={cache!r}: cannot be reached ({type(exc).__name__}: {exc})") from None
    if not exists:
        raise ConfigError(
            f"cache={cache!r} does not exist; create the directory (or bucket prefix) first, or set create_cache: true "
            "to let the producer job create it"
        )


def check_ray_reachable(address: str, key: str, timeout_s: float = 5.0) -> None:
    """`ConfigError` naming `key` unless a TCP connection to the Ray address opens (GCS or dashboard)."""
    text = address.split("://", 1)[-1].rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{key}={address!r}: expected HOST:PORT (ray://HOST:PORT or http://HOST:8265 also work)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{key}={address!r}: nothing answers at {host}:{port} ({exc.strerror or exc}); start the Ray head "
            "or fix the address"
        ) from None
