"""Watch a producer/consumer run from its files: ``qwenimage monitor`` and ``qwenimage report``.

Everything here reads only files, through fsspec (local paths and URLs alike), so it works from
any machine that can see the cache and the run directory, on a running or a finished run:

* `snapshot`: the cache's commit records, ``status.json`` and producer telemetry plus the run's
  ``metrics.jsonl`` and ``run.json`` -> one typed `MonitorSnapshot` (``--once --json`` prints it).
* `view`: the rich live view, the plain ``--once`` text and the one-line-per-interval mode.
* `report`: the same files over the whole run -> time series -> a matplotlib PNG.
* `file_sd`: the Prometheus file-based service-discovery targets both exporters write.

docs/monitoring.md describes the commands; the files they read are the telemetry contract
(producer: ``<cache>/status.json``, ``<cache>/telemetry/producer-<run_id>.jsonl``; consumer:
``<run>/metrics.jsonl``, ``<run>/run.json``).
"""

from megatron_qwenimage.monitor.snapshot import (
    CommitsView,
    ConsumerView,
    Monitor,
    MonitorError,
    MonitorSnapshot,
    ProducerView,
)

__all__ = ["CommitsView", "ConsumerView", "Monitor", "MonitorError", "MonitorSnapshot", "ProducerView"]
