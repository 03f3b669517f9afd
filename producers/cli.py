"""``qwenimage produce``: the producer side of the CLI (see `producers.pipeline`)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from megatron_qwenimage.config import MAX_TEXT_TOKENS, ConfigError
from megatron_qwenimage.errors import UserError

if TYPE_CHECKING:
    from producers.config import ProducerConfig

DEFAULT_METRICS_PORT = 9464


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "produce",
        help="encode images and captions into a committed latent cache (Ray)",
        description=(
            "Read images and captions from SRC, decode/validate/bucket them, encode them with the VAE and "
            "Qwen2.5-VL, and publish each input partition exactly once into the cache at CACHE. Rerunning the "
            "same command resumes: committed partitions are skipped."
        ),
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="SRC",
        help="folder of images (+ .txt sidecars or captions.jsonl/csv), .parquet/.jsonl/.csv manifest "
        "(image, caption[, source_image]), WebDataset .tar or folder of .tar, or synthetic:text?n=N&seed=S; "
        "local paths or fsspec URLs",
    )
    p.add_argument("--output", required=True, metavar="CACHE", help="cache directory (local path or fsspec URL)")
    p.add_argument(
        "--buckets",
        default="256",
        metavar="SPEC",
        help="target areas as sides in px ('256,640,1328': each image is encoded once per area, at the "
        "nearest aspect-ratio bucket), or explicit buckets 'HxW,HxW' (multiples of 16). Default 256",
    )
    p.add_argument(
        "--encoders",
        default="tiny",
        metavar="DIR|tiny",
        help="local HF-format directory with vae/, text_encoder/, tokenizer/ (never downloaded), or 'tiny' "
        "for small random encoders built locally. Default tiny",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join a Ray cluster ('auto' or host:port); 'local' or unset starts an embedded local Ray on 127.0.0.1",
    )
    p.add_argument(
        "--ray-connect-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="give up joining the --ray-address cluster after this many seconds (default 30)",
    )
    p.add_argument(
        "--local-num-cpus",
        type=float,
        default=None,
        metavar="N",
        help="logical CPUs (a whole number) of the embedded local Ray (default max(4, cores), so fractional "
        "actors never starve reads); a value too small for the actor pools plus one read task and one "
        "writer is refused",
    )
    p.add_argument(
        "--partition-size", type=int, default=64, help="inputs per partition, the exactly-once unit (default 64)"
    )
    p.add_argument(
        "--min-side",
        type=int,
        default=32,
        help="quarantine images whose shorter side is below this many px (default 32)",
    )
    p.add_argument(
        "--max-pixels", type=int, default=64_000_000, help="quarantine images with more pixels (decompression bombs)"
    )
    p.add_argument(
        "--max-text-tokens",
        type=int,
        default=MAX_TEXT_TOKENS,
        help=f"text tokens kept per sample (<= {MAX_TEXT_TOKENS})",
    )
    p.add_argument(
        "--overlong-caption",
        choices=("truncate", "reject"),
        default="truncate",
        help="captions over --max-text-tokens: truncate with a flag (default) or quarantine",
    )
    p.add_argument(
        "--vae-actors", default="1:1", metavar="MIN:MAX", help="VAE actor pool size range (autoscaled by Ray Data)"
    )
    p.add_argument("--text-actors", default="1:1", metavar="MIN:MAX", help="text-encoder actor pool size range")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs reserved per encoder actor (0 on CPU)")
    p.add_argument(
        "--cpus-per-actor", type=float, default=0.5, help="CPUs reserved per encoder actor (fractional; default 0.5)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="samples per encoder batch (grouped per bucket inside)")
    p.add_argument("--device", default=None, help="torch device for the encoders (default cuda if available, else cpu)")
    p.add_argument(
        "--vae-channels-last",
        action="store_true",
        help="run the VAE encoder in channels_last_3d memory format (its weights and input; a speed knob, "
        "off by default: latents change by float rounding only, so the cache's settings do not record it)",
    )
    p.add_argument(
        "--vae-conv2d",
        action="store_true",
        help="run the VAE encoder's causal 3-D convolutions as 2-D convolutions over the single frame an image "
        "is (the causal padding's zero frames only meet the other temporal taps: a third of the multiply-adds; "
        "a speed knob, off by default: latents change by float rounding only, not recorded as a setting)",
    )
    p.add_argument(
        "--vae-compile",
        default="off",
        metavar="MODE",
        help="torch.compile the VAE encoder's forward with this mode: off (default), default, reduce-overhead, "
        "max-autotune or max-autotune-no-cudagraphs. Each actor compiles at its first batch of each shape "
        "(minutes at full size on a GPU); latents change by float rounding only, not recorded as a setting",
    )
    p.add_argument(
        "--sweep-grace",
        type=float,
        default=3600.0,
        help="seconds after which an uncommitted attempt counts as dead and is swept (default 3600)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus exporter port (0: any free port, -1: off; default {DEFAULT_METRICS_PORT})",
    )
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the exporter binds to (default 127.0.0.1)")
    p.add_argument(
        "--run-label",
        default=None,
        metavar="LABEL",
        help="the run's label: the `run` label of every Prometheus series and status.json's run_label "
        "(default: the --output directory's basename)",
    )
    p.add_argument(
        "--prometheus-sd-dir",
        default=None,
        metavar="DIR",
        help="publish the exporter as a Prometheus file-SD target DIR/producer-<run id>.json while it runs "
        "(launch/monitoring/prometheus.yml reads such files); default: none",
    )
    p.add_argument(
        "--snapshot-interval-s",
        type=float,
        default=30.0,
        metavar="S",
        help="while running, publish a manifest snapshot every S seconds when partitions were committed since "
        "the last one (tail-mode consumers can start before the end); 0: only the final snapshot. Default 30",
    )
    p.add_argument(
        "--max-inflight-partitions",
        type=int,
        default=8,
        metavar="N",
        help="partitions whose rows are all encoded but whose shard write has not finished, at most (default "
        "8): the driver waits for a write before it hands out the next, which bounds the memory of rows in "
        "flight",
    )
    p.add_argument(
        "--window-partitions",
        type=int,
        default=256,
        metavar="N",
        help="partitions per Ray Data execution (default 256). Each window starts its encoder pools afresh, "
        "at the sizes a lead-time autoscaler wrote to CACHE/control/pools.json (`qwenimage launch autoscale`) "
        "when there is one, else autoscaled by Ray Data within --vae-actors/--text-actors: smaller windows "
        "follow the autoscaler sooner and load the encoders more often",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="exit 0 even when no input ends in the cache (every input quarantined); by default such a run "
        "prints its summary and fails with exit status 1",
    )
    p.add_argument(
        "--new-settings-version",
        action="store_true",
        help="the cache records the settings that shape its samples (encoders, buckets, --min-side, "
        "--max-pixels, --max-text-tokens, --overlong-caption) in producer_settings.json and refuses a run "
        "with other values; with this flag such a run starts a new settings version instead and adds "
        "its samples next to the earlier ones (an image produced under two versions is two samples). "
        "With unchanged settings it changes nothing",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary object at the end (for scripts and CI); on an error, an error object",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_produce)


class NothingCommittedError(UserError):
    """A run over a non-empty input left nothing in the cache (every input quarantined)."""

    exit_code = 1


def parse_pool_range(text: str, flag: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: expected MIN:MAX actor counts, e.g. 1:4") from exc
    if not 1 <= lo_n <= hi_n:
        raise ConfigError(f"{flag} {text!r}: expected 1 <= MIN <= MAX actor counts, e.g. 1:4")
    return lo_n, hi_n


def config_from_args(args) -> ProducerConfig:
    from producers.config import PoolConfig, ProducerConfig, parse_buckets

    n = args.local_num_cpus
    if n is not None and not (1 <= n < float("inf") and float(n).is_integer()):
        raise ConfigError(f"--local-num-cpus {n:g}: expected a whole number of CPUs >= 1 (Ray's logical CPUs)")
    if not (0 < args.ray_connect_timeout < float("inf")):
        raise ConfigError(f"--ray-connect-timeout {args.ray_connect_timeout:g}: expected seconds > 0")
    if not -1 <= args.metrics_port <= 65535:
        raise ConfigError(
            f"--metrics-port {args.metrics_port}: expected a TCP port 0..65535, 0 for any free port "
            "or -1 for no exporter"
        )
    from megatron_qwenimage.monitor.file_sd import check_run_label, check_sd_dir

    if args.run_label is not None:
        check_run_label(args.run_label, "--run-label")
    check_sd_dir(args.prometheus_sd_dir, "--prometheus-sd-dir")
    pools = []
    for flag, text in (("--vae-actors", args.vae_actors), ("--text-actors", args.text_actors)):
        lo, hi = parse_pool_range(text, flag)
        pools.append(
            PoolConfig(
                min_actors=lo,
                max_actors=hi,
                num_gpus=args.gpus_per_actor,
                num_cpus=args.cpus_per_actor,
                batch_size=args.batch_size,
            )
        )
    return ProducerConfig(
        buckets=parse_buckets(args.buckets),
        partition_size=args.partition_size,
        min_side_px=args.min_side,
        max_pixels=args.max_pixels,
        max_text_tokens=args.max_text_tokens,
        overlong_caption=args.overlong_caption,
        vae_pool=pools[0],
        text_pool=pools[1],
        sweep_grace_s=args.sweep_grace,
        snapshot_interval_s=args.snapshot_interval_s,
        window_partitions=args.window_partitions,
        max_inflight_partitions=args.max_inflight_partitions,
        vae_channels_last=args.vae_channels_last,
        vae_compile=args.vae_compile,
        vae_conv2d=args.vae_conv2d,
        fault=_fault_from_env(),
    )


def embedded_ray(ray_address: str | None) -> bool:
    """Whether the run starts an embedded local Ray on this machine (no ``--ray-address`` or
    ``RAY_ADDRESS``, or ``local``): its encoder actors then run here."""
    from producers.pipeline import _ray_address

    return _ray_address(ray_address)[0] is None


def check_embedded_ray(args, cfg: ProducerConfig) -> None:
    """What the embedded local Ray needs of this machine, checked before anything starts: the
    ``--device`` of its encoder actors exists here, and ``--local-num-cpus`` holds the actor
    pools plus one read task and one writer (`producers.pipeline.check_resources`; Ray would
    otherwise wait forever). Nothing to check when the run joins a cluster."""
    if not embedded_ray(args.ray_address):
        return
    check_device(args.device)
    if args.local_num_cpus is not None:
        from producers.pipeline import check_resources

        check_resources(cfg, args.local_num_cpus, None, f"--local-num-cpus {args.local_num_cpus:g}")


def check_device(device: str | None) -> None:
    """``--device`` names a torch device this machine has (the encoders run here)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: expected a torch device such as cpu, cuda or cuda:1") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"--device {device}: torch {torch.__version__} here sees no CUDA device "
                "(torch.cuda.is_available() is False); the embedded Ray's encoders run on this machine: give "
                "--device cpu, or leave it out to use a GPU when there is one"
            )
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")


def check_output_location(url: str) -> None:
    """``--output`` can be created and written: its file system is known and installed, and a
    local path's nearest existing directory accepts a new entry (tried with a temporary directory,
    removed at once: permission bits alone say nothing for root, a read-only mount or /sys).
    Creates nothing."""
    import os
    import tempfile

    from fsspec.implementations.local import LocalFileSystem

    from producers.sources import url_filesystem

    fs, path = url_filesystem(url, "--output")
    if not isinstance(fs, LocalFileSystem):
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return  # a file where a directory must be: `producers.pipeline.check_output` names it
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qwenimage-write-check-", dir=existing))
    except OSError as exc:
        raise ConfigError(
            f"--output {url}: cannot create it, {existing} is not writable here ({exc.strerror or exc}); "
            "give a directory you can write to"
        ) from None


def _fault_from_env():
    """QWENIMAGE_FAULT='kill_writer_at=shard_written,kill_scope=worker,once_marker=/tmp/x' (tests)."""
    import os

    from producers.config import FaultConfig

    spec = os.environ.get("QWENIMAGE_FAULT", "")
    if not spec:
        return FaultConfig()
    kv = dict(part.split("=", 1) for part in spec.split(",") if part)
    if "after_partitions" in kv:
        kv["after_partitions"] = int(kv["after_partitions"])
    return FaultConfig(**kv)


def summary_dict(counts) -> dict:
    return {
        "inputs": counts.inputs,
        "committed": counts.committed,
        "duplicates": counts.duplicates,
        "quarantined": dict(sorted(counts.quarantined.items())),
        "buckets": dict(sorted(counts.buckets.items())),
        "partitions": counts.partitions_total,
        "partitions_skipped": counts.partitions_skipped,
        "bytes_written": counts.bytes_written,
        "text_tokens": counts.text_tokens,
    }


def run_produce(args) -> int:
    from megatron_qwenimage.cli import configure_logging
    from producers.pipeline import ProduceRequest, produce
    from producers.progress import ProducerProgress

    configure_logging(logging.INFO, fmt="%(asctime)s %(name)s %(message)s")
    cfg = config_from_args(args)
    check_embedded_ray(args, cfg)
    check_output_location(args.output)
    req = ProduceRequest(
        args.input,
        args.output,
        encoders=args.encoders,
        config=cfg,
        ray_address=args.ray_address,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host,
        device=args.device,
        local_num_cpus=args.local_num_cpus,
        new_settings_version=args.new_settings_version,
        ray_connect_timeout_s=args.ray_connect_timeout,
        run_label=args.run_label,
        prometheus_sd_dir=args.prometheus_sd_dir,
    )
    # The bar starts with the pipeline's first progress, so an up-front error stays one line on stderr.
    progress = ProducerProgress(enabled=not args.no_progress)
    started = False

    def on_progress(counts) -> None:
        nonlocal started
        if not started:
            progress.__enter__()
            started = True
        progress.update(counts)

    try:
        counts = produce(req, on_progress=on_progress)
        if started:
            progress.update(counts)
    finally:
        if started:
            progress.__exit__(None, None, None)
    summary = summary_dict(counts)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        q = ", ".join(f"{k} {v}" for k, v in summary["quarantined"].items()) or "none"
        print(
            f"{counts.inputs} inputs: {counts.committed} committed, {counts.duplicates} duplicates, "
            f"{counts.quarantined_total} quarantined ({q})"
        )
        print("per bucket: " + ", ".join(f"{k} {v}" for k, v in summary["buckets"].items()))
    total = counts.committed + counts.duplicates + counts.quarantined_total
    if total != counts.inputs:  # an accounting bug, not a user error: keeps its traceback
        raise RuntimeError(f"qwenimage produce: counts do not add up ({total} != {counts.inputs} inputs)")
    if counts.inputs and counts.committed + counts.duplicates == 0 and not args.allow_empty:
        reasons = ", ".join(f"{k} {v}" for k, v in summary["quarantined"].items())
        raise NothingCommittedError(
            f"--input {args.input}: none of its {counts.inputs} inputs is in the cache, all were quarantined "
            f"({reasons}); each partition's quarantine.parquet in {args.output} (named by commits/*.json) has the "
            "reason per input. Pass --allow-empty if that is expected"
        )
    return 0
