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
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from megatron_qwenimage.data.commit import read_commit, sweep_orphans
from megatron_qwenimage.data.manifest import init_cache
from producers.config import ProducerConfig
from producers.encoders import encoder_version, resolve_encoders_dir
from producers.metrics import ProducerCounts, ProducerMetrics, StatusFile
from producers.partition_writer import PartitionOutcome, outcome_from_record, write_partition
from producers.sources import InputItem, open_source
from producers.stages import TextStage, VaeStage, prepare_partition

log = logging.getLogger("qwenimage.produce")
#: Partitions per Ray Data execution (bounds driver memory for huge inputs).
WINDOW_PARTITIONS = 256


@dataclass
class ProduceRequest:
    input: str
    output: str
    encoders: str = "tiny"
    config: ProducerConfig = field(default_factory=ProducerConfig)
    ray_address: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    device: str | None = None
    local_num_cpus: float | None = None


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


#: The one address every listener of the embedded local Ray binds to.
LOOPBACK = "127.0.0.1"
#: Ray reads this once, when `ray` is first imported (ray/_private/ray_constants.py, ENABLE_RAY_CLUSTER).
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _ensure_ray(address: str | None, local_num_cpus: float | None) -> bool:
    """Connect to Ray; returns True if this call started a local instance (to shut down later).

    A cluster named by `address` (or, when it is unset, by a non-empty ``RAY_ADDRESS``) is joined
    as it is: its bind addresses and its authentication (``RAY_AUTH_MODE`` and the token, as the
    user's environment sets them) are the cluster's business. Otherwise ('local' or unset) this
    starts a private local Ray whose whole process tree listens on 127.0.0.1 only.
    """
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, log_to_driver=False)
        return False
    # Embedded default: at least 4 logical CPUs even on a 2-core machine, so fractional actor
    # reservations never leave the read tasks without a slot (the pool would sit "pending").
    _init_loopback_ray(local_num_cpus or max(4, os.cpu_count() or 1))
    return True


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
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host=LOOPBACK,
                 _node_ip_address=LOOPBACK, log_to_driver=False)
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
        raise RuntimeError(f"the embedded Ray came up on {node_ip} (GCS {gcs_host}), not {LOOPBACK}: "
                           "refusing to run with listeners beyond loopback")


def produce(req: ProduceRequest, on_progress: Callable[[ProducerCounts], None] | None = None) -> ProducerCounts:
    """Run the producer to completion and return the counts over the whole input."""
    import ray

    cfg = req.config
    cache = init_cache(req.output)
    storage = cache.storage
    encoders_dir = str(resolve_encoders_dir(req.encoders))
    enc_version = encoder_version(encoders_dir)
    run_id = uuid.uuid4().hex[:12]
    items = list(open_source(req.input))
    partitions = make_partitions(items, cfg.partition_size, enc_version + "|" + cfg.fingerprint())
    counts = ProducerCounts(inputs=len(items), partitions_total=len(partitions))
    metrics = ProducerMetrics(port=req.metrics_port, host=req.metrics_host) if req.metrics_port is not None else ProducerMetrics()
    status = StatusFile(storage, run_id)
    try:
        started_ray = _ensure_ray(req.ray_address, req.local_num_cpus)
    except BaseException:
        metrics.close()
        raise
    writes: dict = {}  # ObjectRef -> partition id
    state = "failed"
    try:
        sweep_orphans(storage, grace_s=cfg.sweep_grace_s)
        todo = []
        for p in partitions:
            record = read_commit(storage, p.partition_id)
            if record is not None:
                _account(counts, metrics, outcome_from_record(record, won=False), skipped=True)
            else:
                todo.append(p)
        log.info("run %s: %d inputs in %d partitions, %d already committed, encoders %s (%s)", run_id, len(items),
                 len(partitions), len(partitions) - len(todo), encoders_dir, enc_version)
        remote_write = ray.remote(write_partition).options(num_cpus=cfg.writer_cpus, max_retries=cfg.writer_max_retries)

        def finish_one(block: bool) -> None:
            ready, _ = ray.wait(list(writes), num_returns=1, timeout=None if block else 0)
            for ref in ready:
                writes.pop(ref)
                outcome: PartitionOutcome = ray.get(ref)
                _account(counts, metrics, outcome, skipped=False)
                if cfg.fault.kill_writer_at and cfg.fault.kill_scope == "driver" and counts.partitions_done - counts.partitions_skipped >= cfg.fault.after_partitions:
                    os._exit(137)  # fault injection: the whole producer dies; rerun resumes

        for w in range(0, len(todo), WINDOW_PARTITIONS):
            window = todo[w : w + WINDOW_PARTITIONS]
            ds = _build_dataset(window, req, cfg, encoders_dir, enc_version)
            pending: dict[str, list[dict]] = {}
            for row in ds.iter_rows():
                pid = row["partition_id"]
                rows = pending.setdefault(pid, [])
                rows.append(dict(row))
                if row["kind"] == "encode":
                    counts.encoded += 1
                    metrics.images_encoded.inc()
                if len(rows) == int(row["partition_rows"]):
                    rows = pending.pop(pid)
                    n_inputs = len({r["input_id"] for r in rows})
                    counts.read += n_inputs
                    metrics.images_read.inc(n_inputs)
                    while len(writes) >= cfg.max_inflight_partitions:
                        finish_one(block=True)
                    writes[remote_write.remote(req.output, pid, rows, encoder_version=enc_version, run_id=run_id,
                                               fault=cfg.fault)] = pid
                finish_one(block=False) if writes else None
                queues = {"partitions_assembling": len(pending), "writes_inflight": len(writes)}
                for name, depth in queues.items():
                    metrics.queue_depth.labels(name).set(depth)
                _poll_actors(metrics)
                status.update(counts, "running", queues, metrics.port)
                if on_progress:
                    on_progress(counts)
            if pending:
                raise RuntimeError(f"partitions {sorted(pending)} lost rows in the pipeline (got fewer than emitted)")
            while writes:
                finish_one(block=True)
                if on_progress:
                    on_progress(counts)
        sweep_orphans(storage, grace_s=cfg.sweep_grace_s)
        cache.create_snapshot()
        state = "finished"
    finally:
        status.update(counts, state, {}, metrics.port, force=True)
        metrics.close()
        if started_ray:
            ray.shutdown()
    return counts


def _account(counts: ProducerCounts, metrics: ProducerMetrics, o: PartitionOutcome, skipped: bool) -> None:
    counts.partitions_done += 1
    counts.partitions_skipped += int(skipped)
    counts.committed += o.committed
    counts.duplicates += o.duplicates
    counts.bytes_written += o.bytes_written
    for reason, n in o.quarantined.items():
        counts.quarantined[reason] = counts.quarantined.get(reason, 0) + n
        metrics.images_quarantined.labels(reason).inc(n)
    for bucket, n in o.buckets.items():
        counts.buckets[bucket] = counts.buckets.get(bucket, 0) + n
    metrics.images_committed.inc(o.committed)
    metrics.images_duplicate.inc(o.duplicates)
    metrics.bytes_written.inc(o.bytes_written)
    for key, values in o.stage_seconds.items():
        for v in values:
            metrics.stage_latency.labels(key[2:]).observe(v)


_last_actor_poll = [0.0]


def _poll_actors(metrics: ProducerMetrics, every_s: float = 5.0) -> None:
    """Alive encoder actors, from Ray's state API (best effort: needs the dashboard agent)."""
    now = time.time()
    if now - _last_actor_poll[0] < every_s:
        return
    _last_actor_poll[0] = now
    try:
        from ray.util.state import list_actors

        alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, timeout=2)
    except Exception:  # noqa: BLE001 - no state API on a head started without dashboard
        return
    for pool in ("VaeStage", "TextStage"):  # Ray Data names them MapWorker(MapBatches(<class>))
        metrics.alive_actors.labels(pool).set(sum(1 for a in alive if pool in (a.class_name or "")))


def _build_dataset(window: list[Partition], req: ProduceRequest, cfg: ProducerConfig, encoders_dir: str, enc_version: str):
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    rows = [{"partition_id": p.partition_id, "items_json": json.dumps([it.to_dict() for it in p.items])} for p in window]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.flat_map(prepare_partition, num_cpus=cfg.cpu_task_cpus,
                     fn_kwargs={"cache_url": req.output, "config": cfg, "encoder_version": enc_version})
    for stage, pool, kwargs in (
        (VaeStage, cfg.vae_pool, {"encoders_dir": encoders_dir, "device": req.device}),
        (TextStage, cfg.text_pool, {"encoders_dir": encoders_dir, "device": req.device,
                                    "max_text_tokens": cfg.max_text_tokens, "overlong_caption": cfg.overlong_caption}),
    ):
        ds = ds.map_batches(
            stage,
            fn_constructor_kwargs=kwargs,
            batch_size=pool.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
        )
    return ds
