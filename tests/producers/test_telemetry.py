"""Producer telemetry (the team's telemetry contract, docs/monitoring.md): status.json and the
telemetry history agree with the committed cache, periodic snapshots while running, the alive
actors gauge on a local Ray without the dashboard, the file-SD target, the CLI flags' errors.

One real run on the session's local Ray (`ray_cluster`, no dashboard: like the embedded Ray)
observed from inside (`on_progress`), a resume of it, and unit tests of the window arithmetic.
"""

from __future__ import annotations

import http.server
import json
import re
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest

from megatron_qwenimage.cache import open_cache
from megatron_qwenimage.cli import build_parser
from megatron_qwenimage.config import ConfigError
from producers.cli import config_from_args
from producers.config import PoolConfig, ProducerConfig, buckets_for_area
from producers.metrics import (
    POOLS,
    STAGES,
    ActorPoller,
    GpuProbe,
    Heartbeat,
    MetricsPortError,
    ProducerCounts,
    ProducerMetrics,
    StatusFile,
    telemetry_path,
)
from producers.pipeline import ProduceRequest, _RowTimes, produce, stage_workers
from tests.helpers.producers import run_cli
from tests.helpers.telemetry import NEW_PRODUCER_FIELDS, wait_until

LABEL = "telemetry-test"
#: Fields status.json had before the contract (`NEW_PRODUCER_FIELDS`: the fields it added).
OLD_FIELDS = {
    "run_id",
    "state",
    "updated_unix",
    "started_unix",
    "inputs",
    "read",
    "encoded",
    "committed",
    "duplicates",
    "quarantined",
    "buckets",
    "partitions",
    "bytes_written",
    "committed_per_s",
    "queues",
    "metrics_port",
}


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def sample(body: str, name: str, **labels: str) -> float | None:
    """The value of the series `name{labels}` in an exposition (labels in any order), or None."""
    for line in body.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def cache_text_tokens(cache_dir: Path) -> int:
    snap = open_cache(str(cache_dir)).snapshot()
    return sum(sum(s.samples.column("text_len").to_pylist()) for s in snap.shards)


class Gate:
    """An input image served over HTTP on 127.0.0.1 whose download waits for `open`: the read
    task that fetches it blocks, so the run (and its encoder pools) cannot end before the test
    has looked. `close` releases it and stops the server; it also releases itself after
    `timeout_s` (a run must end even if a test never opens it)."""

    def __init__(self, data: bytes, timeout_s: float = 300.0) -> None:
        released = self.released = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_GET(self) -> None:
                released.wait(timeout_s)
                self.do_HEAD()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/gate.png"

    def open(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def gated_manifest(root: Path, n: int) -> tuple[Path, Gate]:
    """A manifest of `n` synthetic text renders, files on disk but the last one behind a `Gate`."""
    from producers.synthetic import render

    root.mkdir()
    rows, gate = [], None
    for i in range(n):
        data, caption = render(i, 5)
        if i == n - 1:
            gate = Gate(data)
            image = gate.url
        else:
            image = str(root / f"img{i:03d}.png")
            Path(image).write_bytes(data)
        rows.append({"image": image, "caption": caption})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, gate


@pytest.fixture(scope="module")
def telemetry_run(ray_cluster, tmp_path_factory):
    """A real producer run (32 inputs, partitions of 4, encoder batches of 2) watched from its
    progress callback. The last input is a `Gate`: the run cannot end until the callback has seen
    what a live run must show (the callback blocks the driver; the exporter and the heartbeat go
    on), so nothing depends on timing luck."""
    tmp = tmp_path_factory.mktemp("telemetry")
    cache, sd = tmp / "cache", tmp / "sd"
    manifest, gate = gated_manifest(tmp / "input", 32)
    cfg = ProducerConfig(
        buckets={"64": buckets_for_area(64)},
        partition_size=4,
        snapshot_interval_s=1.0,
        vae_pool=PoolConfig(batch_size=2),
        text_pool=PoolConfig(batch_size=2),
    )
    seen: dict = {"first_row": None, "first_commit": None, "sd": None}
    metrics_port: list[int] = []

    def wait_for(what: str, check, timeout_s: float = 30.0):
        failure = f"while the producer ran: {what} did not show within {timeout_s:g} s"
        return wait_until(check, timeout_s=timeout_s, interval_s=0.2, failure=lambda: failure)

    def status():
        return json.loads((cache / "status.json").read_text())

    def on_progress(counts: ProducerCounts) -> None:
        if not metrics_port:
            metrics_port.append(status()["metrics_port"])
        port = metrics_port[0]
        if seen["first_row"] is None:  # rows are coming out: the encoder pools are up
            sd_files = list(sd.glob("*.json"))
            seen["sd"] = {p.name: json.loads(p.read_text()) for p in sd_files}

            def alive():
                body = scrape(port)
                n = sample(body, "qwenimage_producer_alive_actors", pool="text", run=LABEL)
                st = status()
                return (n, st) if n and st["actors"]["text"] > 0 else None

            n, st = wait_for("an alive text actor in the gauge and status.json", alive)
            seen["first_row"] = {"gauge": n, "status": st}
        if seen["first_commit"] is None and counts.read:  # a partition is whole: its write is on its way

            def snapshot_while_running():
                st = status()
                return st if st["state"] == "running" and st["snapshot_version"] >= 1 else None

            st = wait_for("a periodic snapshot while running", snapshot_while_running)
            seen["first_commit"] = {
                "status": st,
                "snapshots": open_cache(str(cache)).snapshot_versions(),
                "body": scrape(port),
            }
            gate.open()  # seen all: let the run finish

    try:
        counts = produce(
            ProduceRequest(
                str(manifest),
                str(cache),
                config=cfg,
                ray_address=ray_cluster,
                metrics_port=0,
                run_label=LABEL,
                prometheus_sd_dir=str(sd),
            ),
            on_progress=on_progress,
        )
    finally:
        gate.close()
    seen["final"] = json.loads((cache / "status.json").read_text())
    return counts, cache, sd, seen, manifest


def test_status_and_history_follow_the_contract_and_the_cache(telemetry_run):
    counts, cache, _, seen, _ = telemetry_run
    status = seen["final"]
    assert set(status) == OLD_FIELDS | NEW_PRODUCER_FIELDS
    assert status["state"] == "finished" and status["run_label"] == LABEL
    # text tokens: exactly the committed samples' text lengths, as the shards store them
    assert status["text_tokens"] == counts.text_tokens == cache_text_tokens(cache) > 0
    assert status["buckets"] == open_cache(str(cache)).snapshot().samples_per_bucket()
    assert status["committed"] == 32
    assert status["pool_bounds"] == {"vae": [1, 1], "text": [1, 1]} and status["pool_control_version"] == 0
    for key in ("stage_busy", "encoder_utilization", "actors"):
        assert set(status[key]) == (set(STAGES) if key == "stage_busy" else set(POOLS)), key
    for v in [*status["stage_busy"].values(), *status["encoder_utilization"].values()]:
        assert 0.0 <= v <= 1.0
    # the final snapshot is the newest one and says so
    versions = open_cache(str(cache)).snapshot_versions()
    assert status["snapshot_version"] == versions[-1]
    assert len(open_cache(str(cache)).snapshot().partitions) == 8

    history = [json.loads(line) for line in (cache / telemetry_path(status["run_id"])).read_text().splitlines()]
    assert history[-1] == status  # one line per update, the last one is status.json
    running = [h for h in history if h["state"] == "running"]
    assert running and all(set(h) == OLD_FIELDS | NEW_PRODUCER_FIELDS for h in history)
    times = [h["updated_unix"] for h in history]
    assert times == sorted(times)
    # rates: over the run, the windows add up to what was committed (each window's rate x its length)
    assert max(h["images_per_s"] for h in history) > 0
    assert max(h["text_tokens_per_s"] for h in history) > 0
    assert max(max(h["stage_busy"].values()) for h in history) > 0
    for h in history:
        assert sum(h["bucket_images_per_s"].values()) == pytest.approx(h["images_per_s"])
        assert h["text_tokens"] <= status["text_tokens"]


def test_periodic_snapshots_while_running(telemetry_run):
    _, cache, _, seen, _ = telemetry_run
    live = seen["first_commit"]
    assert live["status"]["state"] == "running" and live["status"]["snapshot_version"] >= 1
    assert live["snapshots"], "no snapshot file while the producer ran"
    # ...and a consumer could read it then: it lists committed partitions
    first = open_cache(str(cache)).snapshot(live["snapshots"][0])
    assert 1 <= len(first.partitions) < 8
    assert sample(live["body"], "qwenimage_producer_snapshot_version", run=LABEL) >= 1


def test_alive_actors_gauge_counts_on_a_ray_without_dashboard(telemetry_run):
    """The gauge used Ray's state API, which needs the dashboard the embedded Ray does not start:
    it stayed 0. Now it reads the GCS actor table: > 0 while the pools run."""
    _, _, _, seen, _ = telemetry_run
    assert seen["first_row"]["gauge"] >= 1
    assert seen["first_row"]["status"]["actors"]["text"] >= 1


def test_actor_poller_counts_this_jobs_pool_actors(ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    class VaeStage:  # named like the pool's stage class, as Ray Data's MapWorker(MapBatches(VaeStage))
        def ping(self):
            import os

            return os.getpid()

    actor = VaeStage.remote()
    pid = ray.get(actor.ping.remote())
    try:
        found = ActorPoller().poll()
        assert [p for _, p in found["vae"]] == [pid] and found["text"] == []
    finally:
        ray.kill(actor)
    deadline = time.monotonic() + 20
    while ActorPoller().poll()["vae"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ActorPoller().poll()["vae"] == []


def test_sd_target_published_while_running_and_removed(telemetry_run):
    counts, cache, sd, seen, _ = telemetry_run
    status = seen["final"]
    (name, group), *rest = seen["sd"].items()
    assert not rest and name == f"producer-{status['run_id']}.json"
    assert group == [{"targets": [f"127.0.0.1:{status['metrics_port']}"], "labels": {"run": LABEL, "side": "producer"}}]
    assert list(sd.iterdir()) == []  # removed when the exporter stopped (no temporary files left)


def test_every_producer_series_has_the_run_label(telemetry_run):
    _, _, _, seen, _ = telemetry_run
    body = seen["first_commit"]["body"]
    series = [line for line in body.splitlines() if line and not line.startswith("#")]
    assert series and all(line.startswith("qwenimage_producer_") for line in series)
    assert all(f'run="{LABEL}"' in line for line in series), [s for s in series if LABEL not in s][:3]
    for name in (
        "qwenimage_producer_images_committed_total",
        "qwenimage_producer_text_tokens_total",
        "qwenimage_producer_images_per_second",
        "qwenimage_producer_stage_busy",
        "qwenimage_producer_encoder_utilization",
        "qwenimage_producer_bucket_images_per_second",
        "qwenimage_producer_stage_seconds_bucket",
        "qwenimage_producer_info",
    ):
        assert sample(body, name, run=LABEL) is not None, name


def test_resume_counts_the_committed_partitions_tokens(telemetry_run, tmp_path):
    """A rerun with everything committed: no Ray, totals (text tokens included) from the cache,
    no rates (nothing this run did), its own telemetry history next to the first run's."""
    counts, cache, _, _, manifest = telemetry_run
    cfg = ProducerConfig(buckets={"64": buckets_for_area(64)}, partition_size=4)
    again = produce(ProduceRequest(str(manifest), str(cache), config=cfg, metrics_port=None))
    assert again.partitions_skipped == 8 and again.text_tokens == counts.text_tokens
    status = json.loads((cache / "status.json").read_text())
    assert status["text_tokens"] == cache_text_tokens(cache)
    assert status["images_per_s"] == 0 and status["run_label"] == "cache"  # default: the cache dir's name
    assert len(list((cache / "telemetry").glob("producer-*.jsonl"))) == 2


# --- units ----------------------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_status_windows_rates_and_busy(tmp_path, monkeypatch):
    from megatron_qwenimage.cache.storage import CacheStorage

    clock = Clock()
    monkeypatch.setattr("producers.metrics.time.time", clock)
    metrics = ProducerMetrics(run_label="u", buckets=["64x64"])
    status = StatusFile(CacheStorage(str(tmp_path)), "r1", interval_s=2.0, run_label="u", metrics=metrics)
    status.workers.update(cpu=4, vae=1, text=2, write=1)
    counts = ProducerCounts()
    clock.t += 2.0
    status.fresh["samples"], status.fresh["text_tokens"], status.fresh["buckets"] = 10, 400, {"64x64": 10}
    status.busy_s.update(cpu=4.0, vae=1.0, text=8.0, write=0.5)
    first = status.update(counts, "running")
    assert first["images_per_s"] == 5.0 and first["text_tokens_per_s"] == 200.0
    assert first["bucket_images_per_s"] == {"64x64": 5.0}
    # busy = seconds / (window x workers), clipped to 1
    assert first["stage_busy"] == {"cpu": 0.5, "vae": 0.5, "text": 1.0, "write": 0.25}
    assert first["encoder_utilization"] == {"vae": 0.5, "text": 1.0}  # no GPU: the pools' busy fraction
    assert status.update(counts, "running") is None  # not due yet
    clock.t += 2.0
    idle = status.update(counts, "running")
    assert idle["images_per_s"] == 0 and idle["stage_busy"]["cpu"] == 0  # nothing new: 0
    # a forced final update soon after still covers a whole interval
    clock.t += 0.5
    status.fresh["samples"] = 15
    status.fresh["buckets"] = {"64x64": 15}
    final = status.update(counts, "finished", force=True)
    assert final["images_per_s"] == pytest.approx(5 / 2.5)
    clock.t += 5
    assert status.update(counts, "running") is None  # a late heartbeat never overwrites the end
    status.close()
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "finished"
    lines = (tmp_path / telemetry_path("r1")).read_text().splitlines()
    assert [json.loads(x)["state"] for x in lines] == ["running", "running", "finished"]
    body = metrics.registry
    from prometheus_client import generate_latest

    text = generate_latest(body).decode()
    assert sample(text, "qwenimage_producer_images_per_second", run="u") == pytest.approx(2.0)
    assert sample(text, "qwenimage_producer_stage_busy", stage="cpu", run="u") == 0


def test_history_on_an_object_store_is_rewritten_whole(monkeypatch):
    """No append on object stores: the whole history is rewritten, at most every 30 s and at the end."""
    from megatron_qwenimage.cache.storage import CacheStorage

    clock = Clock()
    monkeypatch.setattr("producers.metrics.time.time", clock)
    storage = CacheStorage("memory://telemetry-history/cache")
    status = StatusFile(storage, "r3", run_label="u")

    def lines() -> list[str]:
        return [json.loads(x)["state"] for x in storage.read_bytes(telemetry_path("r3")).decode().splitlines()]

    for _ in range(3):
        clock.t += 2.0
        status.update(ProducerCounts(), "running")
    assert lines() == ["running"]  # written at the first update, not again within 30 s
    clock.t += 30.0
    status.update(ProducerCounts(), "running")
    assert lines() == ["running"] * 4
    clock.t += 1.0
    status.update(ProducerCounts(), "failed", force=True)
    assert lines() == ["running"] * 4 + ["failed"]
    assert json.loads(storage.read_bytes("status.json"))["state"] == "failed"
    storage.fs.rm(storage.path(""), recursive=True)


def test_row_times_count_each_inputs_work_once():
    times = _RowTimes()
    base = {"partition_id": "p", "t_vae": 0.5}
    # one input at two areas: the same read and text seconds, decode counted from the input's start
    a1 = times.add({**base, "input_id": "a", "t_read": 1.0, "t_decode": 2.0, "t_text": 3.0})
    a2 = times.add({**base, "input_id": "a", "t_read": 1.0, "t_decode": 2.5, "t_text": 3.0})
    b = times.add({**base, "input_id": "b", "t_read": 0.25, "t_decode": 0.25, "t_text": 1.0})
    assert a1 == {"cpu": 3.0, "vae": 0.5, "text": 3.0}
    assert a2 == {"cpu": 0.5, "vae": 0.5, "text": 0.0}
    assert b == {"cpu": 0.5, "vae": 0.5, "text": 1.0}
    times.forget("p")
    assert times.add({**base, "input_id": "a", "t_read": 1.0, "t_decode": 0.0, "t_text": 0.0})["cpu"] == 1.0


def test_stage_workers():
    cfg = ProducerConfig()
    assert stage_workers(cfg, None) == dict.fromkeys(STAGES, 1)
    # 4 CPUs - 2 pools x 0.5 - one writer 0.25 = 2.75 CPUs for read tasks of 0.25
    assert stage_workers(cfg, 4.0) == {"cpu": 11, "vae": 1, "text": 1, "write": 8}


def test_gpu_utilization_by_the_actors_processes(monkeypatch):
    """NVML (faked): a pool's utilisation is that of the GPUs its actors' processes are on; a pool
    whose processes no GPU lists falls back (None: the busy fraction is used)."""

    class Dev:
        def __init__(self, pids, util):
            self.pids, self.util = pids, util

    devs = [Dev([11], 80), Dev([22, 33], 40), Dev([], 0)]
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(devs),
        nvmlDeviceGetHandleByIndex=lambda i: devs[i],
        nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=p) for p in h.pids],
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=h.util),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = GpuProbe()
    assert probe.available
    assert probe.utilization({"vae": [11, 22], "text": [99]}) == {"vae": pytest.approx(0.6), "text": None}
    probe.close()


def test_heartbeat_snapshots_only_after_new_commits(tmp_path, monkeypatch):
    from megatron_qwenimage.cache.storage import CacheStorage

    clock = Clock()
    monkeypatch.setattr("producers.metrics.time.time", clock)
    status = StatusFile(CacheStorage(str(tmp_path)), "r2", run_label="u")
    made, records = [], [5]  # 5 commit records when the run starts

    def snapshot() -> int:
        made.append(clock.t)
        return len(made)

    beat = Heartbeat(status, ProducerCounts(), snapshot=snapshot, commits=lambda: records[0], snapshot_interval_s=30.0)
    beat.tick(clock.t)  # looks at the commit records once
    beat.tick(clock.t + 31)
    assert made == []  # due, but nothing new committed
    records[0] = 7
    beat.tick(clock.t + 50)
    assert made == []  # something new, not due yet
    beat.tick(clock.t + 62)
    assert len(made) == 1 and status.snapshot_version == 1
    beat.tick(clock.t + 93)
    assert len(made) == 1  # nothing new since
    records[0] = 8
    beat.tick(clock.t + 124)
    assert len(made) == 2 and status.snapshot_version == 2
    beat.stop()
    off = Heartbeat(status, ProducerCounts(), snapshot=snapshot, commits=lambda: records[0], snapshot_interval_s=0)
    off.tick(clock.t)
    records[0] = 20
    off.tick(clock.t + 1e6)
    assert len(made) == 2  # 0: only the final snapshot


def test_sd_file_of_the_exporter(tmp_path):
    metrics = ProducerMetrics(port=0, run_label="r", run_id="abc", sd_dir=str(tmp_path / "sd"))
    try:
        path = Path(metrics.sd_path)
        assert path.name == "producer-abc.json" and oct(path.stat().st_mode & 0o777) == "0o644"
        assert json.loads(path.read_text()) == [
            {"targets": [f"127.0.0.1:{metrics.port}"], "labels": {"run": "r", "side": "producer"}}
        ]
    finally:
        metrics.close()
    assert not path.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MetricsPortError, match="--prometheus-sd-dir"):
        ProducerMetrics(port=0, run_label="r", run_id="abc", sd_dir=str(tmp_path / "file" / "sd"))


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--run-label", ""], "--run-label"),
        (["--run-label", " padded"], "--run-label"),
        (["--run-label", "x" * 200], "--run-label"),
        (["--run-label", "tab\there"], "--run-label"),
        (["--snapshot-interval-s", "-1"], "--snapshot-interval-s"),
        (["--snapshot-interval-s", "nan"], "--snapshot-interval-s"),
        (["--prometheus-sd-dir", "s3://bucket/sd"], "--prometheus-sd-dir"),
    ],
)
def test_bad_telemetry_flags_name_the_flag(flags, needle):
    args = build_parser().parse_args(["produce", "--input", "x", "--output", "y", *flags])
    with pytest.raises(ConfigError) as exc:
        config_from_args(args)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_bad_sd_dir_is_one_line_at_the_command_line(tmp_path, producer_env):
    (tmp_path / "file").write_text("x")
    proc = run_cli(
        [
            "produce",
            "--input",
            "synthetic:text?n=2",
            "--output",
            str(tmp_path / "cache"),
            "--no-progress",
            "--prometheus-sd-dir",
            str(tmp_path / "file"),
        ],
        producer_env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"qwenimage produce: error: --prometheus-sd-dir={str(tmp_path / 'file')!r}: is an existing file, not a "
        "directory"
    ]
    assert not (tmp_path / "cache").exists()


def test_default_run_label_is_the_output_basename():
    from megatron_qwenimage.monitor.file_sd import default_run_label

    assert default_run_label("s3://bucket/caches/run1/", "--run-label") == "run1"
    assert default_run_label("/data/cache-a", "--run-label") == "cache-a"
    assert default_run_label("s3://bucket", "--run-label") == "bucket"
