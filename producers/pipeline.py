"""The producer driver: list inputs, partition them, run the Ray Data pipeline, publish, report.

::

    partitions ─► flat_map(prepare_partition)      CPU tasks (fractional CPUs): read, validate,
                                                   dedup, decode, orient, RGB, bucket, crop
               ─► map_batches(VaeStage)            actor pool [min, max], autoscaled by Ray Data
               ─► map_batches(TextStage)           actor pool [min, max], autoscaled by Ray Data
               ─► driver groups rows per partition ─► write_partition (Ray task, retried):
                                                   private attempt, checksums, exclusive commit

Partitions are deterministic (same input + config + encoders -> same ids), so a rerun of the
same command skips every committed partition and redoes only the rest. Memory stays flat:
partitions go through Ray Data in windows, Ray Data bounds its own operator queues, and the
driver holds at most `max_inflight_partitions` partitions waiting for their writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import signal
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import psutil

from megatron_qwenimage.cache.commit import commit_record_names, read_commit
from megatron_qwenimage.cache.manifest import CACHE_INFO_FILE, init_cache, open_cache
from megatron_qwenimage.cache.sweep import sweep_orphans
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.monitor.file_sd import check_run_label, default_run_label
from megatron_qwenimage.processes import descendants, terminate
from producers.config import FaultConfig, ProducerConfig
from producers.encoders import encoder_version, resolve_encoders_dir
from producers.items import InputItem
from producers.metrics import STAGES, Heartbeat, ProducerCounts, ProducerMetrics, StatusFile
from producers.partition_writer import PartitionOutcome, outcome_from_record, write_partition
from producers.pool_control import PoolControl, WindowPools
from producers.settings import check_settings, record_settings, sample_settings
from producers.sources import list_inputs
from producers.stages import TextStage, VaeStage, prepare_partition

log = logging.getLogger(__name__)


@dataclass
class ProduceRequest:
    """One ``qwenimage produce`` run.

    Attributes:
        new_settings_version: start a new producer settings version in a cache whose recorded
            settings differ from this run's (`producers.settings`); refused otherwise.
        ray_connect_timeout_s: how long to wait for the cluster named by `ray_address`.
        run_label: the ``run`` label of every Prometheus series and the status's ``run_label``
            (default: the output directory's basename).
        prometheus_sd_dir: directory for the exporter's file-SD target (`megatron_qwenimage.monitor.file_sd`).
    """

    input: str
    output: str
    encoders: str = "tiny"
    config: ProducerConfig = field(default_factory=ProducerConfig)
    ray_address: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    device: str | None = None
    local_num_cpus: float | None = None
    new_settings_version: bool = False
    ray_connect_timeout_s: float = 30.0
    run_label: str | None = None
    prometheus_sd_dir: str | None = None


class OutputError(UserError):
    """``--output`` cannot hold a cache (a file, or a directory with other content); names it."""


class RayConnectError(UserError):
    """The Ray cluster named by ``--ray-address`` / ``RAY_ADDRESS`` cannot be joined; names the address."""


class ResourceError(UserError):
    """The Ray resources cannot run the pipeline (it would wait forever); names the flags."""


@dataclass
class Partition:
    index: int
    partition_id: str
    items: list[InputItem]


def make_partitions(items: list[InputItem], size: int, salt: str) -> list[Partition]:
    """Cut `items` into partitions of `size`; ids hash the input ids with `salt` (config+encoders)."""
    ids = [it.input_id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"input id {dup!r} appears twice in the source listing")
    out = []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        digest = hashlib.sha256((salt + "\0" + "\0".join(it.input_id for it in chunk)).encode()).hexdigest()[:16]
        out.append(Partition(start // size, f"{start // size:06d}-{digest}", chunk))
    return out


def check_output(url: str) -> bool:
    """Refuse an ``--output`` that cannot be a cache; returns whether a cache exists there already.

    Refused: an existing file (or a path below one), and an existing non-empty directory without
    ``cache.json`` (so a typo never spreads cache files into someone's folder). Creates nothing.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isfile(path):
        raise OutputError(
            f"--output {url}: is an existing file, not a cache directory; name a new or existing cache directory"
        )
    if fs.isdir(path):
        if fs.exists(posixpath.join(path, CACHE_INFO_FILE)):
            return True
        if fs.ls(path, detail=False):
            raise OutputError(
                f"--output {url}: is a non-empty directory that is not a latent cache (no "
                f"{CACHE_INFO_FILE}); name a new or empty directory, or an existing cache"
            )
        return False
    parent = posixpath.dirname(path.rstrip("/"))
    while parent and parent != path and not fs.exists(parent):
        path, parent = parent, posixpath.dirname(parent.rstrip("/"))
    if parent and fs.isfile(parent):
        raise OutputError(f"--output {url}: {parent} is a file, so no directory can be created below it")
    return False


#: The one address every listener of the embedded local Ray binds to.
LOOPBACK = "127.0.0.1"
#: Ray reads this once, when `ray` is first imported (ray/_private/ray_constants.py, ENABLE_RAY_CLUSTER).
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def embedded_num_cpus(local_num_cpus: float | None) -> float:
    """Logical CPUs of the embedded local Ray: `local_num_cpus`, or max(4, cores)."""
    # At least 4 logical CPUs even on a 2-core machine, so fractional actor reservations never
    # leave the read tasks without a slot (the pool would sit "pending").
    return local_num_cpus or max(4, os.cpu_count() or 1)


def _ray_address(address: str | None) -> tuple[str | None, str]:
    """(address to join or None for the embedded Ray, how the user gave it: flag or env var)."""
    if address is None and os.environ.get("RAY_ADDRESS") not in (None, "", "local"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address in (None, "local"):
        return None, "--ray-address"
    return address, "--ray-address"


def check_resources(cfg: ProducerConfig, cpus: float, gpus: float | None, where: str) -> None:
    """Refuse a pipeline that could never start: the encoder pools' minimum actors plus one read
    task and one shard writer must fit in `cpus` (and the actors' GPUs in `gpus`, when known).
    Ray would otherwise keep the read tasks (or an actor) pending forever. `where` names the
    resources ("--local-num-cpus 1", "the Ray cluster at ...")."""
    vae, text = cfg.vae_pool, cfg.text_pool
    pools = vae.min_actors * vae.num_cpus + text.min_actors * text.num_cpus
    need = pools + cfg.cpu_task_cpus + cfg.writer_cpus
    if need > cpus + 1e-9:
        raise ResourceError(
            f"{where}: {cpus:g} CPUs, but the encoder actor pools reserve {pools:g} (--vae-actors MIN {vae.min_actors} "
            f"x {vae.num_cpus:g} + --text-actors MIN {text.min_actors} x {text.num_cpus:g}, --cpus-per-actor) and a "
            f"read task and a shard writer need {cfg.cpu_task_cpus + cfg.writer_cpus:g} more: {need:g} CPUs in all, "
            "or the run would wait forever. Give more CPUs (--local-num-cpus for the embedded Ray), or lower "
            "--cpus-per-actor or the MIN of --vae-actors / --text-actors"
        )
    gpu_need = vae.min_actors * vae.num_gpus + text.min_actors * text.num_gpus
    if gpus is not None and gpu_need > gpus + 1e-9:
        raise ResourceError(
            f"{where}: {gpus:g} GPUs, but the encoder actor pools reserve {gpu_need:g} (--gpus-per-actor "
            f"{max(vae.num_gpus, text.num_gpus):g} x the MIN of --vae-actors / --text-actors), so no actor could start; "
            "lower --gpus-per-actor (0 on CPU) or run where the GPUs are"
        )


def _ensure_ray(address: str | None, local_num_cpus: float | None, connect_timeout_s: float = 30.0) -> bool:
    """Connect to Ray; returns True if this call started a local instance (to shut down later).

    A cluster named by `address` (or, when it is unset, by a non-empty ``RAY_ADDRESS``) is joined
    as it is: its bind addresses and its authentication (``RAY_AUTH_MODE`` and the token, as the
    user's environment sets them) are the cluster's business. Joining gives up after
    `connect_timeout_s` (Ray itself retries an unreachable address for many minutes) with
    `RayConnectError`. Otherwise ('local' or unset) this starts a private local Ray whose whole
    process tree listens on 127.0.0.1 only.

    Either way the process's SIGTERM handler stays what it was (ray.init would replace it with
    one that exits with status 15 or 1), so SIGTERM keeps stopping the command like Ctrl-C.
    """
    import ray

    if ray.is_initialized():
        return False
    address, given_as = _ray_address(address)
    if address is not None:
        _join_ray(address, given_as, connect_timeout_s)
        return False
    from ray._private import utils as ray_utils

    saved = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    # ray.init and the Node it starts each install a SIGTERM handler (sys.exit with 15 or 1) that
    # would make a SIGTERM during start-up exit with another status: keep the process's handler.
    set_handler = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    try:
        _init_loopback_ray(embedded_num_cpus(local_num_cpus))
    except BaseException:
        # Stopped (SIGTERM, Ctrl-C) or failed half way: ray.shutdown knows the node only once
        # ray.init has finished creating it, so also stop every process the start spawned
        # (listed now, while the raylet's agents are still its children).
        started = [c for c in descendants(me) if c.pid not in before]
        try:
            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            log.exception("ray.shutdown after a failed start")
        terminate(started, grace_s=5.0)
        raise
    finally:
        ray_utils.set_sigterm_handler = set_handler
        if saved is not None:
            signal.signal(signal.SIGTERM, saved)
    return True


class _DropRayThreadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


def _join_ray(address: str, given_as: str, timeout_s: float) -> None:
    """ray.init(address) on a daemon thread, waited for at most `timeout_s` (interruptible)."""
    import ray

    result: dict = {}

    def connect() -> None:
        try:
            ray.init(address=address, log_to_driver=False)
            result["ok"] = True
        except BaseException as exc:
            result["error"] = exc

    ray_logger = logging.getLogger("ray._private.worker")
    quiet = _DropRayThreadWarning()
    ray_logger.addFilter(quiet)  # the thread is on purpose: Ray's SIGTERM handler stays out
    try:
        thread = threading.Thread(target=connect, name="ray-connect", daemon=True)
        thread.start()
        thread.join(timeout_s)
    finally:
        ray_logger.removeFilter(quiet)
    if thread.is_alive():
        raise RayConnectError(
            f"{given_as} {address}: no Ray cluster answered within {timeout_s:g} s (--ray-connect-timeout); check "
            "the address (the head's GCS host:port, e.g. 10.0.0.5:6379, or 'auto') and that the cluster is up, or "
            "leave --ray-address unset for the embedded local Ray"
        )
    error = result.get("error")
    if isinstance(error, (ConnectionError, TimeoutError, ValueError, OSError)):
        raise RayConnectError(
            f"{given_as} {address}: cannot join the Ray cluster ({type(error).__name__}: {error})"
        ) from error
    if error is not None:
        raise error


def _init_loopback_ray(num_cpus: float) -> None:
    """Start a private local Ray (new GCS, raylet, agents, workers) listening on 127.0.0.1 only.

    Ray derives every bind address from the node IP: the gRPC servers of the GCS, the raylet's
    node and object managers and each core worker (driver included) listen on loopback only when
    the node IP is 127.0.0.1 and on all interfaces otherwise; the dashboard, runtime-env and
    metrics agents, the dashboard and autoscaler metrics exporters do the same (`is_localhost`).
    ``_node_ip_address="127.0.0.1"`` alone is not enough: ray.init turns a loopback node IP into
    the machine's external address (services.resolve_ip_for_localhost) unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is false, a constant Ray reads from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import, usually before this runs. So both are set for
    the duration of ray.init (the env var for the processes it spawns, which import ray afresh),
    then restored; and the node IP Ray ended up with is checked, failing closed.

    Authentication is left to the environment: with RAY_AUTH_MODE unset Ray 2.60 starts a new
    local cluster with token auth (token in ~/.ray/auth_token, created if missing), which also
    keeps other users of this machine off the loopback ports.
    """
    import ray
    from ray._private import ray_constants

    saved_env = os.environ.get(_RAY_CLUSTER_ENV)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # address="local": always a new instance, never a `ray start` head found on this machine.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            log_to_driver=False,
            logging_level=logging.WARNING,  # Ray's INFO banner is not for the user; warnings stay
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_RAY_CLUSTER_ENV, None)
        else:
            os.environ[_RAY_CLUSTER_ENV] = saved_env
    node_ip = ray.util.get_node_ip_address()
    gcs_host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if node_ip != LOOPBACK or gcs_host != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(
            f"the embedded Ray came up on {node_ip} (GCS {gcs_host}), not {LOOPBACK}: "
            "refusing to run with listeners beyond loopback"
        )


def produce(req: ProduceRequest, on_progress: Callable[[ProducerCounts], None] | None = None) -> ProducerCounts:
    """Run the producer to completion and return the counts over the whole input.

    Everything a user can get wrong is checked before anything is written: the output path,
    the input (listed whole), the encoders, the cache's recorded producer settings, the
    resources of the embedded Ray, the metrics port and the connection to a cluster. Only then
    is the cache created (if new) and its settings recorded. A cache whose partitions are all
    committed already needs no Ray at all (a resume with nothing left to do).
    """
    cfg = req.config
    cache_exists = check_output(req.output)
    items = list_inputs(req.input)
    encoders_dir = str(resolve_encoders_dir(req.encoders))
    enc_version = encoder_version(encoders_dir)
    run_id = uuid.uuid4().hex[:12]
    run_label = (
        check_run_label(req.run_label, "--run-label")
        if req.run_label is not None
        else default_run_label(req.output, "--run-label")
    )
    existing = open_cache(req.output).storage if cache_exists else None
    plan = check_settings(
        existing, sample_settings(cfg, enc_version), encoders=req.encoders, new_version=req.new_settings_version
    )
    partitions = make_partitions(items, cfg.partition_size, enc_version + "|" + cfg.fingerprint())
    counts = ProducerCounts(inputs=len(items), partitions_total=len(partitions))
    records = {p.partition_id: read_commit(existing, p.partition_id) for p in partitions} if existing else {}
    todo = [p for p in partitions if records.get(p.partition_id) is None]
    needs_ray = any(_needs_encoding(p) for p in todo)
    embedded = _ray_address(req.ray_address)[0] is None
    if needs_ray and embedded:  # before starting it: the GPUs it would see are the ones torch sees
        import torch

        check_resources(
            cfg,
            embedded_num_cpus(req.local_num_cpus),
            float(torch.cuda.device_count()),
            f"--local-num-cpus {req.local_num_cpus:g}"
            if req.local_num_cpus
            else f"the embedded Ray (max(4, cores) = {embedded_num_cpus(None):g} CPUs)",
        )
    metrics = ProducerMetrics(
        port=req.metrics_port,
        host=req.metrics_host,
        run_label=run_label,
        run_id=run_id,
        buckets=sorted({b.name for group in cfg.buckets.values() for b in group}),
        sd_dir=req.prometheus_sd_dir if req.metrics_port is not None else None,
    )
    started_ray = False
    try:
        cluster_cpus = None
        if needs_ray:
            import ray

            started_ray = _ensure_ray(req.ray_address, req.local_num_cpus, req.ray_connect_timeout_s)
            total = ray.cluster_resources()
            check_resources(
                cfg,
                float(total.get("CPU", 0.0)),
                float(total.get("GPU", 0.0)),
                "the embedded Ray" if started_ray else f"the Ray cluster at {ray.get_runtime_context().gcs_address}",
            )
            cluster_cpus = float(total.get("CPU", 0.0))
        cache = init_cache(req.output)
        storage = cache.storage
        settings_version = record_settings(
            storage,
            plan,
            run_id=run_id,
            commits_before=0 if plan.action != "create" else len(storage.listdir("commits")),
        )
        status = StatusFile(storage, run_id, run_label=run_label, metrics=metrics)
        status.workers.update(stage_workers(cfg, cluster_cpus))
        versions = cache.snapshot_versions()
        status.snapshot_version = versions[-1] if versions else 0
        heartbeat = Heartbeat(
            status,
            counts,
            snapshot=lambda: cache.create_snapshot().version,
            commits=lambda: len(commit_record_names(storage)),
            snapshot_interval_s=cfg.snapshot_interval_s,
            pools={"vae": cfg.vae_pool.min_actors, "text": cfg.text_pool.min_actors},
        )
        state = "failed"
        heartbeat.start()
        try:
            _run(
                req,
                cfg,
                partitions,
                todo,
                records,
                counts,
                metrics,
                status,
                storage,
                encoders_dir,
                enc_version,
                run_id,
                on_progress,
            )
            heartbeat.stop()  # no snapshot of its own from here on
            sweep_orphans(storage, grace_s=cfg.sweep_grace_s)
            snap = cache.create_snapshot()
            status.snapshot_version = max(status.snapshot_version, snap.version)
            state = "finished"
            log.info("run %s finished (producer settings version %d)", run_id, settings_version)
        finally:
            heartbeat.stop()
            status.queues = {}
            try:
                status.update(counts, state, force=True)
            finally:
                status.close()
    finally:
        metrics.close()
        if started_ray:
            import ray

            ray.shutdown()
    return counts


def stage_workers(cfg: ProducerConfig, cluster_cpus: float | None) -> dict[str, int]:
    """Workers per stage, the denominators of ``stage_busy``: the read tasks the CPUs left by the
    encoder pools (at their maximum) can run at once, each pool's minimum actors (the alive
    count replaces it once polled), and the shard writers that may be in flight. Without Ray
    (the driver writes): one of each."""
    if cluster_cpus is None:
        return dict.fromkeys(STAGES, 1)
    vae, text = cfg.vae_pool, cfg.text_pool
    free = cluster_cpus - vae.max_actors * vae.num_cpus - text.max_actors * text.num_cpus - cfg.writer_cpus
    return {
        "cpu": max(1, int(free / cfg.cpu_task_cpus + 1e-9)),
        "vae": vae.min_actors,
        "text": text.min_actors,
        "write": max(1, min(cfg.max_inflight_partitions, int(cluster_cpus / cfg.writer_cpus + 1e-9))),
    }


def _run(
    req: ProduceRequest,
    cfg: ProducerConfig,
    partitions: list[Partition],
    todo: list[Partition],
    records: dict,
    counts: ProducerCounts,
    metrics: ProducerMetrics,
    status: StatusFile,
    storage,
    encoders_dir: str,
    enc_version: str,
    run_id: str,
    on_progress,
) -> None:
    """Skip committed partitions, run the rest through Ray Data and the writers."""
    sweep_orphans(storage, grace_s=cfg.sweep_grace_s)
    # Commit records read before Ray started, or committed since by another producer.
    todo_ids = set()
    found = []
    for p in partitions:
        record = records.get(p.partition_id) or read_commit(storage, p.partition_id)
        if record is not None:
            found.append(record)
        else:
            todo_ids.add(p.partition_id)
    if found:  # their text tokens: one small read per shard, in parallel (object stores)
        with ThreadPoolExecutor(max_workers=min(16, len(found))) as pool:
            skipped = list(pool.map(lambda rec: outcome_from_record(rec, won=False, storage=storage), found))
        for outcome in skipped:
            _account(counts, metrics, status, outcome, skipped=True)
    todo = [p for p in todo if p.partition_id in todo_ids]
    log.info(
        "run %s: %d inputs in %d partitions, %d already committed, encoders %s (%s)",
        run_id,
        counts.inputs,
        len(partitions),
        len(partitions) - len(todo),
        encoders_dir,
        enc_version,
    )
    # Partitions whose every input was rejected while listing need no reading, no encoders and
    # no Ray: the driver writes their quarantine tables itself.
    for p in [p for p in todo if not _needs_encoding(p)]:
        rows = prepare_partition(_partition_row(p), cache_url=req.output, config=cfg, encoder_version=enc_version)
        with status.lock:
            counts.read += len(p.items)
        metrics.images_read.inc(len(p.items))
        _account(
            counts,
            metrics,
            status,
            write_partition(
                req.output, p.partition_id, rows, encoder_version=enc_version, run_id=run_id, fault=FaultConfig()
            ),
            skipped=False,
        )
    todo = [p for p in todo if _needs_encoding(p)]
    if not todo:
        return
    import ray

    remote_write = ray.remote(write_partition).options(num_cpus=cfg.writer_cpus, max_retries=cfg.writer_max_retries)

    def committed(outcome: PartitionOutcome) -> None:
        _account(counts, metrics, status, outcome, skipped=False)
        if (
            cfg.fault.kill_writer_at
            and cfg.fault.kill_scope == "driver"
            and counts.partitions_done - counts.partitions_skipped >= cfg.fault.after_partitions
        ):
            os._exit(137)  # fault injection: the whole producer dies; rerun resumes

    writes = _Writes(committed, cfg.max_inflight_partitions)
    control = PoolControl(
        storage,
        {
            "vae": (cfg.vae_pool.min_actors, cfg.vae_pool.max_actors),
            "text": (cfg.text_pool.min_actors, cfg.text_pool.max_actors),
        },
    )
    try:
        for index, w in enumerate(range(0, len(todo), cfg.window_partitions)):
            window = todo[w : w + cfg.window_partitions]
            pools = control.for_window(index)
            status.set_pools(pools)
            ds = _build_dataset(window, req, cfg, encoders_dir, enc_version, pools)
            pending: dict[str, list[dict]] = {}
            row_times = _RowTimes()
            for row in ds.iter_rows():
                pid = row["partition_id"]
                rows = pending.setdefault(pid, [])
                rows.append(dict(row))
                busy = row_times.add(row)
                with status.lock:
                    for stage, seconds in busy.items():
                        status.busy_s[stage] += seconds
                    if row["kind"] == "encode":
                        counts.encoded += 1
                if row["kind"] == "encode":
                    metrics.images_encoded.inc()
                if len(rows) == int(row["partition_rows"]):
                    rows = pending.pop(pid)
                    row_times.forget(pid)
                    n_inputs = len({r["input_id"] for r in rows})
                    with status.lock:
                        counts.read += n_inputs
                    metrics.images_read.inc(n_inputs)
                    writes.submit(  # waits while max_inflight_partitions writes are in flight
                        remote_write.remote(
                            req.output, pid, rows, encoder_version=enc_version, run_id=run_id, fault=cfg.fault
                        )
                    )
                writes.poll()
                queues = {"partitions_assembling": len(pending), "writes_inflight": len(writes)}
                for name, depth in queues.items():
                    metrics.queue_depth.labels(name).set(depth)
                with status.lock:
                    status.queues = queues
                if on_progress:
                    on_progress(counts)
            if pending:
                raise RuntimeError(f"partitions {sorted(pending)} lost rows in the pipeline (got fewer than emitted)")
            writes.drain(on_progress=(lambda: on_progress(counts)) if on_progress else None)
    finally:
        writes.close()


class _Writes:
    """The shard writes in flight, each accounted (`on_done`) as soon as it is seen finished.

    The driver looks after every row (`poll`) and waits for the first write to finish when too
    many are in flight (`submit`) or at the end (`drain`), exactly as before; a thread also looks
    every `poll_s`, so the counts, the status and the metrics follow the commits while the driver
    waits for rows (a stalled encoder, a slow read). Whoever sees a write finished first accounts
    it. A write that failed (after Ray's retries) raises in the driver: at once when the driver saw
    it, else at its next `poll`, `submit` or `drain`.
    """

    def __init__(self, on_done: Callable[[PartitionOutcome], None], max_inflight: int, poll_s: float = 0.5) -> None:
        self.on_done = on_done
        self.max_inflight = max_inflight
        self.poll_s = poll_s
        self._refs: set = set()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="producer-writes", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._refs)

    def submit(self, ref) -> None:
        while len(self) >= self.max_inflight:
            self._finish(block=True)
        with self._lock:
            self._refs.add(ref)

    def poll(self) -> None:
        self._finish(block=False)

    def drain(self, on_progress: Callable[[], None] | None = None) -> None:
        """Wait for every write in flight (`on_progress` after each one)."""
        while len(self):
            self._finish(block=True)
            if on_progress:
                on_progress()
        self._raise()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _raise(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _finish(self, block: bool) -> None:
        """Account the finished writes (block: until one finishes); raises a failed write's error."""
        import ray

        self._raise()
        with self._lock:
            refs = list(self._refs)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        for ref in ready:
            with self._lock:  # claim it: the other thread may have seen it too
                if ref not in self._refs:
                    continue
                self._refs.discard(ref)
            self.on_done(ray.get(ref))

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._finish(block=False)
            except BaseException as exc:  # the driver raises it
                with self._lock:
                    self._error = self._error or exc
                return


def _needs_encoding(p: Partition) -> bool:
    return any(not it.rejected for it in p.items)


def _partition_row(p: Partition) -> dict:
    return {"partition_id": p.partition_id, "items_json": json.dumps([it.to_dict() for it in p.items])}


def _account(
    counts: ProducerCounts, metrics: ProducerMetrics, status: StatusFile, o: PartitionOutcome, skipped: bool
) -> None:
    """Add one partition's outcome to the counts, the status's windows and the Prometheus metrics.
    A partition found committed (`skipped`) counts in the totals, not in this run's rates or busy time."""
    with status.lock:
        counts.partitions_done += 1
        counts.partitions_skipped += int(skipped)
        counts.committed += o.committed
        counts.duplicates += o.duplicates
        counts.bytes_written += o.bytes_written
        counts.text_tokens += o.text_tokens
        for reason, n in o.quarantined.items():
            counts.quarantined[reason] = counts.quarantined.get(reason, 0) + n
        for bucket, n in o.buckets.items():
            counts.buckets[bucket] = counts.buckets.get(bucket, 0) + n
        if not skipped:
            fresh = status.fresh
            fresh["samples"] += sum(o.buckets.values())
            fresh["text_tokens"] += o.text_tokens
            for bucket, n in o.buckets.items():
                fresh["buckets"][bucket] = fresh["buckets"].get(bucket, 0) + n
            status.busy_s["write"] += o.write_seconds
    for reason, n in o.quarantined.items():
        metrics.images_quarantined.labels(reason).inc(n)
    for bucket, n in o.buckets.items():
        metrics.samples_committed.labels(bucket).inc(n)
    metrics.images_committed.inc(o.committed)
    metrics.images_duplicate.inc(o.duplicates)
    metrics.bytes_written.inc(o.bytes_written)
    metrics.text_tokens.inc(o.text_tokens)
    for key, values in o.stage_seconds.items():
        for v in values:
            metrics.stage_latency.labels(key[2:]).observe(v)
    if o.write_seconds:
        metrics.stage_latency.labels("write").observe(o.write_seconds)


class _RowTimes:
    """Busy seconds per stage from the rows leaving the pipeline, each input's work counted once.

    A row carries its input's read seconds (the same on each of the input's rows, one per target
    area), its decode seconds (counted from the start of the input's decode, so the input's last
    row holds the whole), its share of a VAE batch, and its input's share of a text batch (the
    same on each of the input's rows).
    """

    def __init__(self) -> None:
        self._inputs: dict[str, dict[str, tuple[float, bool]]] = {}  # partition -> input -> (decode seen, text)

    def add(self, row) -> dict[str, float]:
        busy = {"cpu": 0.0, "vae": float(row.get("t_vae") or 0.0), "text": 0.0}
        inputs = self._inputs.setdefault(row["partition_id"], {})
        key = row["input_id"]
        decode, text_done = inputs.get(key, (None, False))
        t_read, t_decode, t_text = (float(row.get(k) or 0.0) for k in ("t_read", "t_decode", "t_text"))
        if decode is None:
            busy["cpu"] += t_read
            decode = 0.0
        if t_decode > decode:
            busy["cpu"] += t_decode - decode
            decode = t_decode
        if t_text and not text_done:
            busy["text"] = t_text
            text_done = True
        inputs[key] = (decode, text_done)
        return busy

    def forget(self, partition_id: str) -> None:
        self._inputs.pop(partition_id, None)


def _build_dataset(
    window: list[Partition],
    req: ProduceRequest,
    cfg: ProducerConfig,
    encoders_dir: str,
    enc_version: str,
    pools: WindowPools,
):
    """One window's Ray Data pipeline: read/decode tasks, then the VAE and text-encoder actor pools
    with this window's bounds (`pools`: the configured MIN:MAX, or a controller's fixed size)."""
    import ray
    import ray.data
    from ray.util.debug import log_once

    # Ray Data logs every execution plan at INFO, and warns once that its progress bars are off
    # (which we ask for: our own progress lines say what a user needs); consume that one-time
    # notice, keep its real warnings.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    log_once("ray_data_progress_manager_disabled")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    rows = [_partition_row(p) for p in window]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.flat_map(
        prepare_partition,
        num_cpus=cfg.cpu_task_cpus,
        fn_kwargs={"cache_url": req.output, "config": cfg, "encoder_version": enc_version},
    )
    for stage, name, pool, kwargs in (
        (
            VaeStage,
            "vae",
            cfg.vae_pool,
            {
                "encoders_dir": encoders_dir,
                "device": req.device,
                "channels_last": cfg.vae_channels_last,
                "compile_mode": cfg.vae_compile,
                "conv2d": cfg.vae_conv2d,
            },
        ),
        (
            TextStage,
            "text",
            cfg.text_pool,
            {
                "encoders_dir": encoders_dir,
                "device": req.device,
                "max_text_tokens": cfg.max_text_tokens,
                "overlong_caption": cfg.overlong_caption,
            },
        ),
    ):
        ds = ds.map_batches(
            stage,
            fn_constructor_kwargs=kwargs,
            batch_size=pool.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=pools.bounds[name][0], max_size=pools.bounds[name][1]),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
        )
    return ds
