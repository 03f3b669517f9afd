"""A tiny producer/consumer run on disk (or in fsspec memory) for the monitor and report tests.

The cache is real (committed shards written with the cache package, no Ray); ``status.json``,
the producer telemetry and the consumer's ``metrics.jsonl`` are written as the telemetry contract
says, with round numbers so that the tests can state every expected value.
"""

from __future__ import annotations

import copy
import json

import fsspec

from megatron_qwenimage import cli
from megatron_qwenimage.cache import open_cache
from megatron_qwenimage.cache.writer import QuarantineRow, publish_partition
from tests.helpers.reader import B16, B32, make_cache, payload
from tests.helpers.telemetry import NEW_PRODUCER_FIELDS

T0 = 1_700_000_000.0

#: Samples in committed shards: 2 partitions x (8 of 16x16 + 6 of 32x32) + 4 of 16x16.
COMMITTED_SAMPLES = 32
BUCKETS = {"16x16": 20, "32x32": 12}
QUARANTINED = {"corrupt_image": 2, "missing_file": 1}

#: Producer status records over time (the last one is status.json), new fields included.
TELEMETRY = [
    {"updated_unix": T0 + 10, "buckets": {"16x16": 12, "32x32": 8}, "committed": 20, "text_tokens": 300},
    {"updated_unix": T0 + 15, "buckets": {"16x16": 16, "32x32": 10}, "committed": 26, "text_tokens": 390},
    {"updated_unix": T0 + 20, "buckets": dict(BUCKETS), "committed": 32, "text_tokens": 500},
]


def status_record(i: int, *, new: bool = True, state: str = "running") -> dict:
    base = {
        "run_id": "prod1",
        "state": state,
        "started_unix": T0,
        "inputs": 50,
        "read": 40,
        "encoded": 36,
        "duplicates": 0,
        "quarantined": dict(QUARANTINED),
        "partitions": {"total": 5, "done": 3, "skipped": 0},
        "bytes_written": 123456,
        "committed_per_s": 1.6,
        "queues": {"encode": 3},
        "metrics_port": None,
        "run_label": "exp1",
        "images_per_s": 2.5,
        "text_tokens_per_s": 40.0,
        "bucket_images_per_s": {"16x16": 1.5, "32x32": 1.0},
        "stage_busy": {"cpu": 0.5, "vae": 0.9, "text": 0.8, "write": 0.1},
        "encoder_utilization": {"vae": 0.9, "text": 0.75},
        "actors": {"vae": 2, "text": 1},
        "pool_bounds": {"vae": [3, 3], "text": [1, 2]},  # the autoscaler's 3 VAE actors; text: Ray Data's 1:2
        "pool_control_version": 4,
        "snapshot_version": 1,
    }
    base.update(copy.deepcopy(TELEMETRY[i]))
    if not new:
        for key in NEW_PRODUCER_FIELDS:
            base.pop(key, None)
    return base


#: Consumer records: 3 training records (global batch 4, 2 steps each) and one validation record.
TRAIN = [
    {"step": 2, "time": T0 + 12, "loss": 1.0, "consumed_samples": 8},
    {"step": 4, "time": T0 + 16, "loss": 0.9, "consumed_samples": 16},
    {"step": 6, "time": T0 + 20, "loss": 0.8, "consumed_samples": 24},
]
NEW_CONSUMER_FIELDS = ("consumed_samples", "train_steps", "global_batch", "run_label", "backlog_samples", "lead_time_s")


def metrics_records(*, new: bool = True, drop: tuple[str, ...] = ()) -> list[dict]:
    out = []
    for rec in TRAIN:
        r = {
            "lr": 1e-4,
            "grad_norm": 0.5,
            "samples_per_s": 2.0,
            "image_tokens_per_s": 32.0,
            "tflops_per_gpu": 1.5,
            "mfu": 0.25,
            "data_wait_fraction": 0.1,
            "memory_bytes": 2**30,
            "step_time_s": 2.0,
            "skipped_steps": 0,
            "train_steps": 10,
            "global_batch": 4,
            "run_label": "exp1",
            "backlog_samples": None,
            "lead_time_s": None,
            **rec,
        }
        if not new:
            for key in NEW_CONSUMER_FIELDS:
                r.pop(key, None)
        for key in drop:
            r.pop(key, None)
        out.append(r)
    out.insert(2, {"step": 4, "val_loss": 0.95, "val_loss_by_sigma": {"0.5": 0.95}})
    return out


def write_text(url: str, data: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data.encode())


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def build_cache(url: str) -> str:
    """The committed part: 3 partitions, 32 samples, 3 quarantined inputs (2 reasons)."""
    make_cache(url, partitions=2, per_bucket={B16: 8, B32: 6})
    cache = open_cache(url)
    rows = [
        QuarantineRow("q0", "file://q0.png", "corrupt_image", "cannot decode"),
        QuarantineRow("q1", "file://q1.png", "corrupt_image", "cannot decode"),
        QuarantineRow("q2", "file://q2.png", "missing_file", "gone"),
    ]
    shards = [payload(B16, 4, prefix="pq", seed=7)]
    assert publish_partition(cache.storage, "pq", inputs=7, shards=shards, quarantine=rows).won
    cache.create_snapshot()
    return url


def write_producer(cache: str, *, new: bool = True, telemetry: bool = True, state: str = "running") -> None:
    records = [status_record(i, new=new, state=state) for i in range(len(TELEMETRY))]
    write_text(f"{cache}/status.json", json.dumps(records[-1], indent=1))
    if telemetry:
        write_text(f"{cache}/telemetry/producer-prod1.jsonl", jsonl(records))


def write_consumer(run: str, records: list[dict] | None = None) -> None:
    write_text(f"{run}/metrics.jsonl", jsonl(metrics_records() if records is None else records))


def build_run(root: str, *, new: bool = True) -> tuple[str, str]:
    """(cache, run) of the whole scenario under `root` (a local directory or a URL)."""
    cache = build_cache(f"{root}/cache")
    write_producer(cache, new=new)
    run = f"{root}/run"
    write_consumer(run, metrics_records(new=new))
    return cache, run


def cli_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``qwenimage <argv>`` in this process; returns its exit status and what it wrote to
    stdout and stderr (read through pytest's `capsys`)."""
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err
