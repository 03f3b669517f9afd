"""Producer metrics: a Prometheus exporter (127.0.0.1 by default) and ``status.json`` in the cache.

The status file is what the monitor reads without Prometheus: counts, rates and queue depths,
rewritten atomically every few seconds and at the end of a run.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.errors import UserError

STATUS_FILE = "status.json"


class MetricsPortError(UserError, OSError):
    """The Prometheus exporter cannot listen where asked; the message names the flag and the port."""


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)


@dataclass
class ProducerCounts:
    inputs: int = 0  # inputs listed
    read: int = 0  # inputs through the CPU stage
    encoded: int = 0  # encode rows through both encoders
    committed: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)
    partitions_total: int = 0
    partitions_done: int = 0
    partitions_skipped: int = 0  # already committed before this run
    bytes_written: int = 0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


class ProducerMetrics:
    """Prometheus metrics of one producer process (own registry, so tests can run several)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.images_read = Counter("qwenimage_producer_images_read", "Inputs through the CPU stage", registry=r)
        self.images_encoded = Counter("qwenimage_producer_images_encoded", "Samples through both encoders", registry=r)
        self.images_committed = Counter("qwenimage_producer_images_committed", "Inputs committed", registry=r)
        self.images_duplicate = Counter(
            "qwenimage_producer_images_duplicate", "Inputs skipped as duplicates", registry=r
        )
        self.images_quarantined = Counter(
            "qwenimage_producer_images_quarantined", "Inputs quarantined", ["reason"], registry=r
        )
        self.bytes_written = Counter("qwenimage_producer_bytes_written", "Bytes of committed shard files", registry=r)
        self.stage_latency = Histogram(
            "qwenimage_producer_stage_seconds",
            "Per-sample latency of a stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "qwenimage_producer_queue_depth", "Items waiting at a point of the pipeline", ["queue"], registry=r
        )
        self.alive_actors = Gauge("qwenimage_producer_alive_actors", "Alive encoder actors", ["pool"], registry=r)
        self.port = None
        self._server = None
        if port is not None:
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

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class StatusFile:
    """Writes ``status.json`` at most every `interval_s` seconds (and always when forced)."""

    def __init__(self, storage: CacheStorage, run_id: str, interval_s: float = 2.0) -> None:
        self.storage = storage
        self.run_id = run_id
        self.interval_s = interval_s
        self.started = time.time()
        self._last = 0.0

    def update(
        self, counts: ProducerCounts, state: str, queues: dict[str, int], metrics_port: int | None, force: bool = False
    ) -> None:
        now = time.time()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        status = {
            "run_id": self.run_id,
            "state": state,  # running / finished / failed
            "updated_unix": now,
            "started_unix": self.started,
            "inputs": counts.inputs,
            "read": counts.read,
            "encoded": counts.encoded,
            "committed": counts.committed,
            "duplicates": counts.duplicates,
            "quarantined": counts.quarantined,
            "buckets": counts.buckets,
            "partitions": {
                "total": counts.partitions_total,
                "done": counts.partitions_done,
                "skipped": counts.partitions_skipped,
            },
            "bytes_written": counts.bytes_written,
            "committed_per_s": counts.committed / elapsed,
            "queues": queues,
            "metrics_port": metrics_port,
        }
        self.storage.write_atomic(STATUS_FILE, json.dumps(status, indent=1, sort_keys=True).encode())
