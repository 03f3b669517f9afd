"""Producer telemetry: a Prometheus exporter (127.0.0.1 by default), ``status.json`` and the
telemetry history in the cache, a file-SD target, and the probes behind them (actors, GPUs).

``status.json`` is what the monitor reads without Prometheus: counts, windowed rates, stage busy
fractions, queue depths; rewritten atomically every few seconds (by `Heartbeat`, also while the
pipeline is stalled) and at the end of a run. ``telemetry/producer-<run_id>.jsonl`` gets the same
object once per update. The fields are the team's telemetry contract (docs/monitoring.md).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.errors import UserError

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
TELEMETRY_DIR = "telemetry"
#: Stages of `ProducerStatus.stage_busy`: read+decode tasks, the two encoder pools, shard writers.
STAGES = ("cpu", "vae", "text", "write")
#: Encoder actor pools (``actors``, ``encoder_utilization``, ``alive_actors{pool}``) and the
#: stage class Ray Data names each pool's actors after (``MapWorker(MapBatches(VaeStage))``).
POOLS = {"vae": "VaeStage", "text": "TextStage"}


def telemetry_path(run_id: str) -> str:
    """Cache-relative path of a producer run's telemetry history."""
    return f"{TELEMETRY_DIR}/producer-{run_id}.jsonl"


class MetricsPortError(UserError, OSError):
    """The Prometheus exporter cannot listen where asked; the message names the flag and the port."""


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)


@dataclass
class ProducerCounts:
    """Counts over the run's whole input: partitions found committed count as well (`partitions_skipped`)."""

    inputs: int = 0  # inputs listed
    read: int = 0  # inputs through the CPU stage
    encoded: int = 0  # encode rows through both encoders
    committed: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)  # committed samples per bucket
    partitions_total: int = 0
    partitions_done: int = 0
    partitions_skipped: int = 0  # already committed before this run
    bytes_written: int = 0
    text_tokens: int = 0  # text-embedding rows of the committed samples

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


class _RunLabelled:
    """A labelled metric whose `labels` takes the metric's own label values; the run label is added."""

    def __init__(self, metric, run_label: str) -> None:
        self._metric = metric
        self._run = run_label

    def labels(self, *values: str):
        return self._metric.labels(*values, self._run)


class ProducerMetrics:
    """Prometheus metrics of one producer process (own registry, so tests can run several).

    Every series carries ``run=<run_label>``. With `sd_dir` (and a port), a file-SD target file
    ``<sd_dir>/producer-<run_id>.json`` is published once the exporter listens and removed by `close`.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        run_label: str = "",
        run_id: str = "",
        buckets: Iterable[str] = (),
        sd_dir: str | None = None,
    ) -> None:
        self.registry = r = CollectorRegistry()
        self.run_label = run_label

        def metric(kind, name: str, doc: str, labels: tuple[str, ...] = (), **kw):
            m = kind(f"qwenimage_producer_{name}", doc, [*labels, "run"], registry=r, **kw)
            return _RunLabelled(m, run_label) if labels else m.labels(run_label)

        self.info = metric(Gauge, "info", "Always 1: the producer run (run_id)", ("run_id",))
        self.info.labels(run_id).set(1)
        self.images_read = metric(Counter, "images_read", "Inputs through the CPU stage")
        self.images_encoded = metric(Counter, "images_encoded", "Samples through both encoders")
        self.images_committed = metric(Counter, "images_committed", "Inputs committed")
        self.images_duplicate = metric(Counter, "images_duplicate", "Inputs skipped as duplicates")
        self.images_quarantined = metric(Counter, "images_quarantined", "Inputs quarantined", ("reason",))
        self.bytes_written = metric(Counter, "bytes_written", "Bytes of committed shard files")
        self.text_tokens = metric(Counter, "text_tokens", "Text-embedding tokens of committed samples")
        self.samples_committed = metric(Counter, "samples_committed", "Committed samples per bucket", ("bucket",))
        self.stage_latency = metric(
            Histogram,
            "stage_seconds",
            "Per-sample latency of a stage (write: per partition)",
            ("stage",),
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_depth = metric(Gauge, "queue_depth", "Items waiting at a point of the pipeline", ("queue",))
        self.alive_actors = metric(Gauge, "alive_actors", "Alive encoder actors", ("pool",))
        self.images_per_second = metric(Gauge, "images_per_second", "Committed samples/s over the last status interval")
        self.text_tokens_per_second = metric(
            Gauge, "text_tokens_per_second", "Committed text tokens/s over the last status interval"
        )
        self.bucket_images_per_second = metric(
            Gauge, "bucket_images_per_second", "Committed samples/s of a bucket over the last interval", ("bucket",)
        )
        self.stage_busy = metric(Gauge, "stage_busy", "Busy fraction of a stage's workers (0..1)", ("stage",))
        self.encoder_utilization = metric(
            Gauge, "encoder_utilization", "GPU utilisation of a pool's encoders, else their busy fraction", ("pool",)
        )
        self.snapshot_version = metric(Gauge, "snapshot_version", "Newest manifest snapshot published so far")
        for pool in POOLS:  # every series exists from the start (0 until measured)
            self.alive_actors.labels(pool).set(0)
            self.encoder_utilization.labels(pool).set(0)
        for stage in STAGES:
            self.stage_busy.labels(stage).set(0)
        for bucket in buckets:
            self.bucket_images_per_second.labels(bucket).set(0)
            self.samples_committed.labels(bucket)
        self.port = None
        self._server = None
        self._sd = None
        if port is None:
            return
        if not 0 <= port <= 65535:
            raise MetricsPortError(
                f"--metrics-port {port}: expected a TCP port 0..65535 (0: any free port; -1: no exporter)"
            )
        try:
            self._server, _thread = start_http_server(port, addr=host, registry=r)
        except socket.gaierror as exc:
            raise MetricsPortError(
                f"--metrics-host {host}: not an address this machine can listen on ({exc.strerror or exc})"
            ) from None
        except OSError as exc:
            raise MetricsPortError(
                f"--metrics-port {port}: cannot serve metrics on {host}:{port} ({exc.strerror or exc}); pass "
                "another --metrics-port, 0 for any free port, or -1 for no exporter"
            ) from None
        self.port = self._server.server_port
        if sd_dir is not None:
            from megatron_qwenimage.monitor.file_sd import FileSDTarget

            try:
                self._sd = FileSDTarget(
                    sd_dir, side="producer", ident=run_id, host=host, port=self.port, run_label=run_label
                )
            except OSError as exc:
                self.close()
                raise MetricsPortError(
                    f"--prometheus-sd-dir {sd_dir}: cannot write the file-SD target there ({exc.strerror or exc})"
                ) from None

    @property
    def sd_path(self) -> str | None:
        return self._sd.path if self._sd is not None else None

    def close(self) -> None:
        if self._sd is not None:
            self._sd.remove()
            self._sd = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class StatusFile:
    """``status.json`` and ``telemetry/producer-<run_id>.jsonl`` of one run, and the state behind
    their windowed fields. Thread-safe: the driver adds to it under `lock`, `Heartbeat` writes it.

    Windowed fields (``images_per_s``, ``text_tokens_per_s``, ``bucket_images_per_s``,
    ``stage_busy``) cover the last status interval (from the newest earlier update at least
    `interval_s` old) and count only what this run committed (not the partitions it found
    committed). ``stage_busy[s]`` is the stage's summed busy seconds in the window / (window
    seconds x `workers[s]`), clipped to 0..1.

    The telemetry history is appended to (local disk); on an object store, which cannot append,
    the whole file is rewritten, at most every `history_rewrite_s` seconds and at the end.
    """

    history_rewrite_s = 30.0

    def __init__(
        self,
        storage: CacheStorage,
        run_id: str,
        interval_s: float = 2.0,
        *,
        run_label: str = "",
        metrics: ProducerMetrics | None = None,
    ) -> None:
        self.storage = storage
        self.run_id = run_id
        self.run_label = run_label
        self.interval_s = interval_s
        self.metrics = metrics
        self.started = time.time()
        self.lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._last = 0.0
        self._ended = False
        # state the driver feeds (under `lock`)
        self.queues: dict[str, int] = {}
        self.busy_s = dict.fromkeys(STAGES, 0.0)  # cumulative busy seconds of this run's work
        self.fresh = {"samples": 0, "text_tokens": 0, "buckets": {}}  # committed by this run's work
        self.workers = dict.fromkeys(STAGES, 1)
        self.actors = dict.fromkeys(POOLS, 0)
        self.gpu_utilization: dict[str, float | None] = dict.fromkeys(POOLS)
        self.snapshot_version = 0
        # this window's actor bounds per pool and the control file version they came from (0: configured)
        self.pool_bounds: dict[str, list[int]] = {}
        self.pool_control_version = 0
        # (time, samples, text tokens, per-bucket samples, busy seconds) at each written update:
        # a window starts at the newest mark at least `interval_s` old (so a forced final update
        # soon after the previous one still covers a full interval)
        self._marks: deque[tuple] = deque([(self.started, 0, 0, {}, dict(self.busy_s))])
        self._history: list[bytes] = []  # object stores: the whole file is rewritten
        self._history_written = float("-inf")
        self._jsonl = None

    def set_pools(self, pools) -> None:
        """Record a window's pool bounds (`producers.pool_control.WindowPools`); until the actors
        are polled, a pool's lower bound stands for its workers."""
        with self.lock:
            self.pool_bounds = {p: [lo, hi] for p, (lo, hi) in pools.bounds.items()}
            self.pool_control_version = pools.version
            for pool, (lo, _) in pools.bounds.items():
                if not self.actors.get(pool):
                    self.workers[pool] = lo

    def update(self, counts: ProducerCounts, state: str, force: bool = False) -> dict | None:
        """Write the status (and a telemetry line) if `interval_s` has passed or `force`; returns it."""
        with self._write_lock:  # writes land in the order their statuses were taken
            with self.lock:
                now = time.time()
                if self._ended and state == "running":  # a late heartbeat never overwrites the final status
                    return None
                if not force and now - self._last < self.interval_s:
                    return None
                self._last = now
                self._ended = state != "running"
                status = self._status(counts, state, now)
            self.storage.write_atomic(STATUS_FILE, json.dumps(status, indent=1, sort_keys=True).encode())
            self._append(json.dumps(status, sort_keys=True).encode() + b"\n", now, final=self._ended)
        return status

    def _status(self, counts: ProducerCounts, state: str, now: float) -> dict:
        while len(self._marks) > 1 and now - self._marks[1][0] >= self.interval_s:
            self._marks.popleft()
        t0, samples0, tokens0, buckets0, busy0 = self._marks[0]
        dt = max(now - t0, 1e-9)
        fresh = self.fresh
        busy = {s: min(1.0, max(0.0, (self.busy_s[s] - busy0[s]) / (dt * max(1, self.workers[s])))) for s in STAGES}
        bucket_rates = {b: (n - buckets0.get(b, 0)) / dt for b, n in sorted(fresh["buckets"].items())}
        util = {p: self.gpu_utilization[p] if self.gpu_utilization[p] is not None else busy[p] for p in POOLS}
        self._marks.append((now, fresh["samples"], fresh["text_tokens"], dict(fresh["buckets"]), dict(self.busy_s)))
        elapsed = max(now - self.started, 1e-9)
        status = {
            "run_id": self.run_id,
            "run_label": self.run_label,
            "state": state,  # running / finished / failed
            "updated_unix": now,
            "started_unix": self.started,
            "inputs": counts.inputs,
            "read": counts.read,
            "encoded": counts.encoded,
            "committed": counts.committed,
            "duplicates": counts.duplicates,
            "quarantined": dict(counts.quarantined),
            "buckets": dict(counts.buckets),
            "partitions": {
                "total": counts.partitions_total,
                "done": counts.partitions_done,
                "skipped": counts.partitions_skipped,
            },
            "bytes_written": counts.bytes_written,
            "committed_per_s": counts.committed / elapsed,
            "text_tokens": counts.text_tokens,
            "images_per_s": (fresh["samples"] - samples0) / dt,
            "text_tokens_per_s": (fresh["text_tokens"] - tokens0) / dt,
            "bucket_images_per_s": bucket_rates,
            "stage_busy": busy,
            "encoder_utilization": util,
            "actors": dict(self.actors),
            "pool_bounds": {p: list(b) for p, b in self.pool_bounds.items()},
            "pool_control_version": self.pool_control_version,
            "snapshot_version": self.snapshot_version,
            "queues": dict(self.queues),
            "metrics_port": self.metrics.port if self.metrics is not None else None,
        }
        m = self.metrics
        if m is not None:
            m.images_per_second.set(status["images_per_s"])
            m.text_tokens_per_second.set(status["text_tokens_per_s"])
            for b, rate in bucket_rates.items():
                m.bucket_images_per_second.labels(b).set(rate)
            for s, v in busy.items():
                m.stage_busy.labels(s).set(v)
            for p, v in util.items():
                m.encoder_utilization.labels(p).set(v)
            m.snapshot_version.set(self.snapshot_version)
        return status

    def _append(self, line: bytes, now: float, final: bool) -> None:
        rel = telemetry_path(self.run_id)
        if not self.storage.is_local:  # object stores cannot append: rewrite the file
            self._history.append(line)
            if final or now - self._history_written >= self.history_rewrite_s:
                self._history_written = now
                self.storage.write_atomic(rel, b"".join(self._history))
            return
        if self._jsonl is None:
            self.storage.makedirs(TELEMETRY_DIR)
            self._jsonl = open(self.storage.path(rel), "ab")
        self._jsonl.write(line)
        self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class ActorPoller:
    """Alive encoder actors of this driver's Ray job, per pool, with their (node id, pid).

    Reads the GCS actor table (``ray._private.state.actors``), which every Ray has, the embedded
    one included; Ray's state API (``ray.util.state.list_actors``) needs the dashboard, which
    the embedded Ray does not start, and is only the fallback. Counting only this job's actors
    keeps other drivers on a shared cluster out.
    """

    def poll(self) -> dict[str, list[tuple[str, int]]] | None:
        """Pool -> [(node id, pid)] of its alive actors; None when no source answered."""
        import ray

        if not ray.is_initialized():
            return None
        job_hex = ray.get_runtime_context().get_job_id()
        try:
            from ray._private import state

            table = state.actors(job_id=ray.JobID.from_hex(job_hex), actor_state_name="ALIVE")
            actors = [
                (a.get("ActorClassName") or "", (a.get("Address") or {}).get("NodeID", ""), int(a.get("Pid") or 0))
                for a in table.values()
                if a.get("State") == "ALIVE"
            ]
        except Exception as exc:  # a Ray without this private API: the state API (needs the dashboard)
            log.debug("GCS actor table unavailable (%s), trying ray.util.state", exc)
            try:
                from ray.util.state import list_actors

                alive = list_actors(
                    filters=[("state", "=", "ALIVE"), ("job_id", "=", job_hex)], limit=10_000, timeout=2, detail=True
                )
                actors = [(a.class_name or "", a.node_id or "", int(a.pid or 0)) for a in alive]
            except Exception as exc2:
                log.debug("Ray state API unavailable: %s", exc2)
                return None
        return {pool: [(node, pid) for name, node, pid in actors if cls in name] for pool, cls in POOLS.items()}


class GpuProbe:
    """GPU utilisation (0..1) of the GPUs the given local processes run on, through NVML (pynvml).

    A pool's value is the mean utilisation of the GPUs its actors' processes hold; None when
    NVML is missing, sees no GPU, or finds none of the processes (actors on other nodes, or a
    container whose process ids NVML does not share): the caller then uses the busy fraction.
    """

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self._nvml = pynvml
        except Exception:  # no pynvml, no driver, no GPU
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def utilization(self, pids: dict[str, list[int]]) -> dict[str, float | None]:
        out: dict[str, float | None] = dict.fromkeys(pids)
        if self._nvml is None:
            return out
        nv = self._nvml
        try:
            per_gpu = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                running = {p.pid for p in nv.nvmlDeviceGetComputeRunningProcesses(h)}
                per_gpu.append((running, nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0))
        except Exception as exc:
            log.debug("NVML query failed: %s", exc)
            return out
        for pool, want in pids.items():
            rates = [rate for running, rate in per_gpu if running & set(want)]
            out[pool] = sum(rates) / len(rates) if rates else None
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


class Heartbeat:
    """A daemon thread that keeps a running producer's telemetry fresh, rows or no rows.

    Every `tick_s`: polls the alive encoder actors (and their GPUs) every `poll_s`, writes the
    status when due (`StatusFile.interval_s`), and every `snapshot_interval_s` (0: never) publishes
    a manifest snapshot (`snapshot`: returns its version) if the cache's commit records changed
    since the last look (`commits`: their number, one listing) -- this run's commits or a
    concurrent producer's. A failing write is logged, not raised: telemetry never stops the producer.
    """

    def __init__(
        self,
        status: StatusFile,
        counts: ProducerCounts,
        *,
        snapshot: Callable[[], int] | None = None,
        commits: Callable[[], int] | None = None,
        snapshot_interval_s: float = 0.0,
        pools: dict[str, int] | None = None,
        poll_s: float = 2.0,
        tick_s: float = 0.5,
    ) -> None:
        self.status = status
        self.counts = counts
        self.snapshot = snapshot
        self.commits = commits
        self.snapshot_interval_s = snapshot_interval_s
        self.min_actors = pools or {}
        self.poll_s = poll_s
        self.tick_s = tick_s
        self.poller = ActorPoller()
        self.gpu = GpuProbe()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_poll = 0.0
        self._last_snapshot = time.time()
        self._snapshot_commits: int | None = None  # commit records at the last look (None: not looked yet)
        self._warned: set[str] = set()
        self._node_id: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="producer-telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self.gpu.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.tick()

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if now - self._last_poll >= self.poll_s:
            self._last_poll = now
            self._guard("actors", self.poll_actors)
        self._guard("status", lambda: self.status.update(self.counts, "running"))
        if self.snapshot is not None and self.commits is not None and self.snapshot_interval_s > 0:
            if self._snapshot_commits is None:
                self._guard("snapshot", self._look)  # the commits there were when the run started
            elif now - self._last_snapshot >= self.snapshot_interval_s:
                self._last_snapshot = now
                before = self._snapshot_commits
                self._guard("snapshot", self._look)
                if self._snapshot_commits != before:
                    self._guard("snapshot", self._publish_snapshot)

    def _look(self) -> None:
        self._snapshot_commits = self.commits()

    def _publish_snapshot(self) -> None:
        version = self.snapshot()
        with self.status.lock:
            self.status.snapshot_version = max(self.status.snapshot_version, version)

    def poll_actors(self) -> None:
        found = self.poller.poll()
        if found is None:
            return
        import ray

        if self._node_id is None:
            self._node_id = ray.get_runtime_context().get_node_id()
        util = self.gpu.utilization(
            {pool: [pid for node, pid in actors if node == self._node_id] for pool, actors in found.items()}
        )
        metrics = self.status.metrics
        with self.status.lock:
            for pool, actors in found.items():
                n = len(actors)
                self.status.actors[pool] = n
                floor = self.status.pool_bounds.get(pool, [self.min_actors.get(pool, 1)])[0]
                self.status.workers[pool] = n or floor
                self.status.gpu_utilization[pool] = util.get(pool)
                if metrics is not None:
                    metrics.alive_actors.labels(pool).set(n)

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            if what not in self._warned:  # once per kind: a full disk must not flood the log
                self._warned.add(what)
                log.warning(
                    "producer telemetry: %s update failed (%s: %s); the run goes on", what, type(exc).__name__, exc
                )
