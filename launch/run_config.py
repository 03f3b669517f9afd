"""The run YAML of ``qwenimage run``: both sides of one job, validated as a whole before anything starts.

    name: local                  # the run label (Prometheus `run` label, monitor, report)
    run_dir: runs/local          # metrics, checkpoints, diffusers export, logs, report
    cache: cache/local           # the latent cache the producers write and the consumers tail
    producer:                    # `qwenimage produce` flags, as keys (see `PRODUCER_FLAGS`)
      input: bundled             # or any --input SRC (folder, manifest, .tar, synthetic:text?...)
      bundled: {text_renders: 64, edit_pairs: 6}
      encoders: tiny
      buckets: "256"
      partition_size: 8
    consumer:
      nproc_per_node: 2          # torchrun processes (CPU + gloo here)
      config: {...}              # the run config `qwenimage train --config` takes (or a path to one)

Paths are relative to the working directory (as ``qwenimage train``'s). The run owns where the
consumer writes: ``logging.dir`` is the run directory, checkpoints go to ``run_dir/checkpoints``,
the diffusers export to ``run_dir/diffusers`` and Prometheus file-SD targets to
``run_dir/prometheus``; a consumer config that sets them elsewhere is refused, so that the
monitor and the report find everything under ``run_dir``. The consumer reads the run's cache in
``tail`` mode unless its ``data.caches`` says otherwise (it must include the run's cache).

Every fault is one `ConfigError` naming the key (``producer.partition_size``,
``consumer.config.optimizer.lr``) and what was expected.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_qwenimage.config import ConfigError, read_yaml
from megatron_qwenimage.errors import UserError

TOP_KEYS = ("name", "run_dir", "cache", "producer", "consumer", "report")

#: producer keys -> ``qwenimage produce`` flags (values are passed as the flag's argument).
PRODUCER_FLAGS = {
    "input": "--input",
    "encoders": "--encoders",
    "buckets": "--buckets",
    "partition_size": "--partition-size",
    "snapshot_interval_s": "--snapshot-interval-s",
    "window_partitions": "--window-partitions",
    "max_inflight_partitions": "--max-inflight-partitions",
    "local_num_cpus": "--local-num-cpus",
    "ray_address": "--ray-address",
    "min_side": "--min-side",
    "max_pixels": "--max-pixels",
    "max_text_tokens": "--max-text-tokens",
    "overlong_caption": "--overlong-caption",
    "vae_actors": "--vae-actors",
    "text_actors": "--text-actors",
    "gpus_per_actor": "--gpus-per-actor",
    "cpus_per_actor": "--cpus-per-actor",
    "batch_size": "--batch-size",
    "device": "--device",
    "metrics_port": "--metrics-port",
}
#: producer keys that are not flags: the bundled input's size.
BUNDLED_KEYS = ("text_renders", "edit_pairs", "seed")
CONSUMER_KEYS = ("nproc_per_node", "config", "omp_num_threads")


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
    return dict(value)


def _unknown(d: Mapping, allowed, key: str) -> None:
    unknown = sorted(set(d) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")


def _path(value: Any, key: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    return os.fspath(value)


@dataclass(frozen=True)
class ProducerSpec:
    """The producer side: ``qwenimage produce`` arguments (`argv`) and the bundled input's size."""

    options: dict[str, Any]
    """Keys of `PRODUCER_FLAGS` as written in the YAML (``input`` defaults to ``bundled``)."""

    bundled: dict[str, int] = field(default_factory=dict)
    """``text_renders``, ``edit_pairs``, ``seed`` of `producers.bundled.write_bundled_inputs`."""

    @property
    def uses_bundled_input(self) -> bool:
        return self.options.get("input", "bundled") == "bundled"

    def argv(self, *, input_spec: str, cache: str, run_label: str, sd_dir: str) -> list[str]:
        """``qwenimage produce`` arguments (the run adds output, label, SD dir and no progress bar)."""
        argv = ["produce", "--input", input_spec, "--output", cache, "--run-label", run_label]
        argv += ["--prometheus-sd-dir", sd_dir, "--no-progress"]
        opts = {"metrics_port": 0, **self.options}
        for key, value in opts.items():
            if key != "input" and value is not None:
                argv += [PRODUCER_FLAGS[key], str(value)]
        return argv


@dataclass(frozen=True)
class ConsumerSpec:
    """The consumer side: torchrun size and the ``qwenimage train`` run config (a mapping)."""

    nproc_per_node: int
    config: dict[str, Any]
    omp_num_threads: int = 1


@dataclass(frozen=True)
class RunSpec:
    """One ``qwenimage run``: where things go and both sides' configs (`load_run_spec`)."""

    name: str
    run_dir: str
    cache: str
    producer: ProducerSpec
    consumer: ConsumerSpec
    report: bool = True
    source: str = "<dict>"

    @property
    def sd_dir(self) -> str:
        return str(Path(self.run_dir) / "prometheus")

    @property
    def logs_dir(self) -> str:
        return str(Path(self.run_dir) / "logs")

    @property
    def checkpoint_dir(self) -> str:
        return str(Path(self.run_dir) / "checkpoints")

    @property
    def export_dir(self) -> str:
        return str(Path(self.run_dir) / "diffusers")

    @property
    def inputs_dir(self) -> str:
        return str(Path(self.run_dir) / "inputs")


def load_run_spec(path: str | os.PathLike) -> RunSpec:
    """Read and validate the run YAML `path` (both sides; nothing is started or written)."""
    return run_spec_from_dict(read_yaml(path, what="run config"), source=str(path))


def run_spec_from_dict(
    d: Any,
    source: str = "<dict>",
    *,
    replace_owned_paths: bool = False,
    world: str | None = None,
    local_producer: bool = True,
) -> RunSpec:
    """Validate a run config mapping: every key, both sides, and how they fit together.

    `replace_owned_paths`: the consumer config's output paths (logging dir, checkpoint dir,
    export, SD dir) are set to the run's instead of refused when they differ (a cluster job spec
    naming an existing training config). `world`: how a layout error names the keys that set the
    consumer's world size (default ``consumer.nproc_per_node=N``). `local_producer`: the producer
    runs here, on an embedded Ray unless ``producer.ray_address`` is set, so that Ray's resources
    on this machine are checked too (`producers.cli.check_embedded_ray`); a cluster job spec's
    producer runs elsewhere.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping with keys {list(TOP_KEYS)}, got {d!r}")
    _unknown(d, TOP_KEYS, source)
    for key in ("name", "run_dir", "cache", "producer", "consumer"):
        if key not in d:
            raise ConfigError(f"{source}: missing key `{key}`")
    name = d["name"]
    if not isinstance(name, str) or not name.strip() or any(c.isspace() or c in '"{}=,' for c in name):
        raise ConfigError(f"name: {name!r}: expected a non-empty label without spaces, quotes, braces, '=' or ','")
    run_dir, cache = _path(d["run_dir"], "run_dir"), _path(d["cache"], "cache")
    report = d.get("report", True)
    if not isinstance(report, bool):
        raise ConfigError(f"report: expected true or false, got {report!r}")
    producer = _producer_spec(_mapping(d["producer"], "producer"), local=local_producer)
    spec = RunSpec(
        name=name,
        run_dir=run_dir,
        cache=cache,
        producer=producer,
        consumer=ConsumerSpec(nproc_per_node=1, config={}),
        report=report,
        source=source,
    )
    consumer = _consumer_spec(_mapping(d["consumer"], "consumer"), spec, replace_owned_paths, world)
    spec = RunSpec(**{**spec.__dict__, "consumer": consumer})
    _check_fit(spec)
    return spec


def _producer_spec(p: dict, *, local: bool = True) -> ProducerSpec:
    _unknown(p, (*PRODUCER_FLAGS, "bundled"), "producer")
    bundled = _mapping(p.pop("bundled", None), "producer.bundled")
    _unknown(bundled, BUNDLED_KEYS, "producer.bundled")
    for key, value in bundled.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"producer.bundled.{key}: expected a whole number >= 0, got {value!r}")
    for key, value in p.items():
        if isinstance(value, (Mapping, list, tuple)) or (key != "input" and isinstance(value, bool)):
            raise ConfigError(f"producer.{key}: expected a single value ({PRODUCER_FLAGS[key]} VALUE), got {value!r}")
    spec = ProducerSpec(options=p, bundled=bundled)
    if bundled and not spec.uses_bundled_input:
        raise ConfigError(f"producer.bundled: only used with `input: bundled`, but input is {p['input']!r}")
    # The produce command's own parser and checks, with its flags named as this file's keys.
    from megatron_qwenimage.cli import build_parser
    from producers.cli import check_embedded_ray, config_from_args

    argv = spec.argv(input_spec="bundled", cache="cache", run_label="check", sd_dir="sd")
    with _as_keys():
        args = _parse(build_parser(), argv)
        cfg = config_from_args(args)
        if local:
            check_embedded_ray(args, cfg)
    return spec


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse without its exit: a bad value raises ConfigError with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "invalid arguments"
        raise ConfigError(message.split("error: ", 1)[-1]) from None


@contextlib.contextmanager
def _as_keys():
    """Re-word ``--flag`` in a user error of the produce command's checks as the producer key that set it."""
    try:
        yield
    except UserError as exc:
        message = str(exc)
        for key, flag in sorted(PRODUCER_FLAGS.items(), key=lambda kv: -len(kv[1])):
            message = message.replace(f"argument {flag}", f"producer.{key}").replace(flag, f"producer.{key}")
        raise ConfigError(message) from None


def _consumer_spec(c: dict, spec: RunSpec, replace_owned_paths: bool = False, world: str | None = None) -> ConsumerSpec:
    _unknown(c, CONSUMER_KEYS, "consumer")
    nproc = c.get("nproc_per_node", 2)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"consumer.nproc_per_node: expected a whole number >= 1, got {nproc!r}")
    omp = c.get("omp_num_threads", 1)
    if not isinstance(omp, int) or isinstance(omp, bool) or omp < 1:
        raise ConfigError(f"consumer.omp_num_threads: expected a whole number >= 1, got {omp!r}")
    if "config" not in c:
        raise ConfigError("consumer: missing key `config` (the run config `qwenimage train --config` takes)")
    raw = c["config"]
    if isinstance(raw, (str, os.PathLike)):
        raw = read_yaml(raw, what="consumer.config")
    config = copy.deepcopy(_mapping(raw, "consumer.config"))
    config = _owned_paths(config, spec, replace=replace_owned_paths)
    from consumers.train import RunConfig

    with _in_consumer_config():
        cfg = RunConfig.from_dict(config, source="consumer.config")
    try:
        layout = cfg.parallel.layout(nproc)  # TP x PP x DP on the world: what RunConfig.layout checks first
    except ConfigError as exc:
        world = world or f"consumer.nproc_per_node={nproc}"
        raise ConfigError(f"{world} does not fit consumer.config.parallel: {exc}") from None
    with _in_consumer_config():
        layout.validate_for(cfg.model)  # heads, blocks, the model's own checks at this TP size
    return ConsumerSpec(nproc_per_node=nproc, config=config, omp_num_threads=omp)


@contextlib.contextmanager
def _in_consumer_config():
    """Name a key of the run config as the run YAML does: ``consumer.config.<key>``."""
    try:
        yield
    except ConfigError as exc:
        message = str(exc)
        if not message.startswith("consumer.config"):
            message = f"consumer.config.{message}"
        raise ConfigError(message) from None


def same_location(a: Any, b: Any) -> bool:
    """Whether two paths or URLs name the same place: local paths resolved from the working
    directory (what a relative path means to every command here, and to the jobs, which run
    there), URLs compared as written less a trailing ``/``."""
    a, b = str(a), str(b)
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _owned_paths(config: dict, spec: RunSpec, *, replace: bool = False) -> dict:
    """Fill what the run owns (logging dir, checkpoints, export, SD dir, label, the cache)."""
    owned = {
        ("logging", "dir"): spec.run_dir,
        ("logging", "run_label"): spec.name,
        ("logging", "prometheus_sd_dir"): spec.sd_dir,
        ("checkpoint", "dir"): spec.checkpoint_dir,
        ("schedule", "export_diffusers"): spec.export_dir,
    }
    for (section, key), value in owned.items():
        sec = config.setdefault(section, {})
        if not isinstance(sec, Mapping):
            raise ConfigError(f"consumer.config.{section}: expected a mapping of keys, got {sec!r}")
        sec = config[section] = dict(sec)
        given = sec.get(key)
        if not replace and given is not None and not same_location(given, value):
            raise ConfigError(
                f"consumer.config.{section}.{key}={given!r}: the run puts this at {value!r} (under run_dir, where "
                "the monitor and the report look); remove the key"
            )
        sec[key] = value
    logging_section = config["logging"]
    logging_section.setdefault("prometheus_port", 0)
    data = config.setdefault("data", {})
    if not isinstance(data, Mapping):
        raise ConfigError(f"consumer.config.data: expected a mapping of keys, got {data!r}")
    data = config["data"] = dict(data)
    caches = data.get("caches")
    if caches is None:
        data["caches"] = [{"path": spec.cache, "mode": "tail"}]
    elif not isinstance(caches, list) or not any(
        isinstance(c, Mapping) and same_location(c.get("path", ""), spec.cache) for c in caches
    ):
        raise ConfigError(
            f"consumer.config.data.caches={caches!r}: must read the run's cache {spec.cache!r} (what its producers "
            "write); leave the key out to tail it"
        )
    return config


def _check_fit(spec: RunSpec) -> None:
    """The consumer trains on buckets the producers make."""
    from producers.config import parse_buckets

    made = set()
    for buckets in parse_buckets(str(spec.producer.options.get("buckets", "256"))).values():
        made |= {b.name if hasattr(b, "name") else str(b) for b in buckets}
    stages = spec.consumer.config["data"].get("stages") or []
    for i, stage in enumerate(stages):
        for bucket in (stage or {}).get("buckets", []) if isinstance(stage, Mapping) else []:
            if str(bucket) not in made:
                raise ConfigError(
                    f"consumer.config.data.stages[{i}].buckets: {bucket!r} is not a bucket the producers make "
                    f"(producer.buckets={spec.producer.options.get('buckets', '256')!r} gives {sorted(made)})"
                )
