"""The real thing: Debian's ``prometheus`` scrapes a running producer and a consumer exporter
through the SHIPPED scrape config (launch/monitoring/prometheus.yml, its file-SD glob pointed at
this test's directory), and every PromQL expression of the shipped Grafana dashboard
(launch/monitoring/grafana-dashboard.json) names only metrics a live scrape shows and returns
data for the run.

The producer is a real `producers.pipeline.produce` run (tiny encoders, local Ray on 127.0.0.1)
whose last input is served by a gate that opens only after the checks, so it is running while
they run; the consumer is a real
`MetricsLogger` fed training steps, reading the producer's cache in tail mode. Prometheus listens
on 127.0.0.1 (a free port, a temporary storage directory) and is stopped afterwards, also on
failure; the producer's Ray stops with its run.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers.telemetry import wait_until

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "launch" / "monitoring"
PROMETHEUS = shutil.which("prometheus")
LABEL = "live-run"
RATE_WINDOW = "30s"  # stands for Grafana's $__rate_interval

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the `prometheus` binary is not on PATH (CI installs Debian's prometheus package, see .ci/run)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, **params) -> dict:
    query = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{url}?{query}" if query else url, timeout=10) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def prometheus(tmp: Path, sd_dir: Path):
    """Prometheus with the shipped config (glob -> `sd_dir`, 1 s scrapes) on 127.0.0.1:<free port>."""
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = cfg["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    sd["files"] = [str(sd_dir / "*.json")]
    sd["refresh_interval"] = "1s"
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({proc.returncode}): {(tmp / 'prometheus.log').read_text()}")
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("prometheus did not become ready within 60 s") from None
                time.sleep(0.2)
        yield base, job["job_name"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        log.close()


def _gated_manifest(root: Path, n: int):
    """A manifest of `n` distinct noise images, one empty file (quarantined as zero_bytes) and,
    last, an image behind a `Gate` (the run cannot end before the gate opens)."""
    from tests.producers.test_telemetry import Gate

    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = root / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "caption": f"noise picture number {i}"})
    (root / "empty.png").write_bytes(b"")
    rows.insert(1, {"image": str(root / "empty.png"), "caption": "an empty file"})
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(buf, format="PNG")
    # Ray Data streams the other partitions' rows to the driver only once this read returns (seen
    # here: the checks below start after the gate's own release), so the gate lets go after 15 s;
    # the producer stays alive and exporting while the checks run (they hold its driver).
    gate = Gate(buf.getvalue(), timeout_s=15)
    rows.append({"image": gate.url, "caption": "the last picture"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, gate


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (``qwenimage_*`` tokens; histogram series keep their
    ``_bucket``/``_sum``/``_count`` suffix, which is the name Prometheus stores them under)."""
    return set(re.findall(r"\bqwenimage_[a-z_]*[a-z]\b", expr))


def test_dashboard_is_well_formed():
    """Static checks (no Prometheus needed): variables, the run filter, producers beside consumers."""
    d = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query" and run["datasource"]["uid"] == "${datasource}"
    assert re.fullmatch(r"label_values\(.+, run\)", run["definition"])
    exprs = dashboard_exprs(d)
    assert len(exprs) >= 14
    for e in exprs:
        assert 'run=~"$run"' in e, e
        for name in metric_names(e):
            assert name.startswith(("qwenimage_producer_", "qwenimage_consumer_")), name
        for m in metric_names(e):  # each metric's own selector filters on the run
            assert re.search(rf'{m}\{{[^}}]*run=~"\$run"', e), (m, e)
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["gridPos"]["w"] == 12 and p["gridPos"]["x"] in (0, 12)
    sides = {p["gridPos"]["x"]: set() for p in d["panels"] if p["type"] != "row"}
    for p in d["panels"]:
        if p["type"] != "row":
            sides[p["gridPos"]["x"]] |= {
                n.split("_")[1] for e in dashboard_exprs({"panels": [p]}) for n in metric_names(e)
            }
    assert "producer" in sides[0] and "consumer" in sides[12]
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for want in ("images/s", "text tokens/s", "stage busy", "alive", "quarantined", "samples/s", "image tokens/s",
                 "tflop/s", "mfu", "data wait", "step time", "loss", "backlog", "lead time"):  # fmt: skip
        assert want in titles, want


def test_prometheus_scrapes_both_sides_and_the_dashboard_queries_answer(tmp_path, monkeypatch):
    from consumers.metrics import LoggingConfig, MetricsLogger
    from producers.config import PoolConfig, ProducerConfig, buckets_for_area
    from producers.encoders import build_tiny_encoders
    from producers.pipeline import ProduceRequest, produce

    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_DEDUP_LOGS": "0",
        "QWENIMAGE_TINY_ENCODERS_DIR": str(tmp_path / "tiny"),
    }.items():
        monkeypatch.setenv(k, v)
    build_tiny_encoders(tmp_path / "tiny")
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    run_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "run")["definition"]
    run_selector = re.fullmatch(r"label_values\((.+), run\)", run_var).group(1)
    exprs = dashboard_exprs(dashboard)
    wanted = set().union(*(metric_names(e) for e in exprs), metric_names(run_var))
    sd_dir, cache = tmp_path / "prometheus-sd", tmp_path / "cache"
    source, gate = _gated_manifest(tmp_path / "input", 23)
    checked: dict = {}

    with prometheus(tmp_path / "prom", sd_dir) as (base, job):

        def query(expr: str) -> list:
            out = _get_json(f"{base}/api/v1/query", query=expr)
            assert out["status"] == "success", (expr, out)
            return out["data"]["result"]

        missing: dict = {}

        def wait(what: str, check, timeout_s: float = 90.0):
            return wait_until(
                check,
                timeout_s=timeout_s,
                interval_s=0.5,
                failure=lambda: f"{what}: not seen within {timeout_s:g} s (missing: {missing})",
            )

        def healthy_targets():
            up = [
                t
                for t in _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
                if t["health"] == "up" and t["labels"].get("job") == job
            ]
            return up if {t["labels"].get("side") for t in up} == {"producer", "consumer"} else None

        def run_metric_names():
            found = _get_json(f"{base}/api/v1/label/__name__/values", **{"match[]": f'{{run="{LABEL}"}}'})["data"]
            missing["names"] = sorted(wanted - set(found))
            return set(found) if wanted <= set(found) else None

        def dashboard_answers():
            res = {e: query(e.replace("$run", LABEL).replace("$__rate_interval", RATE_WINDOW)) for e in exprs}
            missing["answers"] = [e for e, r in res.items() if not r]
            return res if all(res.values()) else None

        consumer = MetricsLogger(
            LoggingConfig(
                dir=str(tmp_path / "run"),
                interval=1,
                tensorboard=False,
                prometheus_port=0,
                prometheus_sd_dir=str(sd_dir),
                run_label=LABEL,
            ),
            enabled=True,
            world_size=1,
            peak_flops=1e12,
            train_steps=100,
            stages=[SimpleNamespace(steps=None, global_batch=2)],
            tail_caches=[str(cache)],
        )
        try:

            def on_progress(counts) -> None:
                if checked or counts.read < 24:
                    return
                # Every partition but the gate's is whole and on its way to the cache (the empty
                # file's too); the producer runs until the gate opens (this callback holds its
                # driver; the exporter, the heartbeat and the writers go on). Train a few steps,
                # then look.
                for step in range(3):
                    consumer.record_step(
                        step=step,
                        loss=1.0 / (step + 1),
                        lr=1e-4,
                        grad_norm=0.5,
                        samples=2,
                        image_tokens=32,
                        flops=1e10,
                        step_time_s=0.2,
                        data_wait_s=0.01,
                    )
                consumer.emit({"step": 3, "val_loss": 0.4})
                targets = wait("both exporters as healthy targets", healthy_targets)
                names = wait("every metric the dashboard reads, with the run label", run_metric_names)
                answers = wait("an answer to every dashboard expression", dashboard_answers)
                checked.update(
                    targets=targets,
                    names=names,
                    answers=answers,
                    runs=_get_json(f"{base}/api/v1/label/run/values", **{"match[]": run_selector})["data"],
                    actors=wait(
                        "an alive encoder actor",
                        lambda: query(f'max_over_time(qwenimage_producer_alive_actors{{run="{LABEL}"}}[5m]) > 0'),
                    ),
                    backlog=query(f'qwenimage_consumer_backlog_samples{{run="{LABEL}"}}'),
                    sd_files=sorted(p.name for p in sd_dir.iterdir()),
                )
                gate.open()

            cfg = ProducerConfig(
                buckets={"64": buckets_for_area(64)},
                partition_size=4,
                vae_pool=PoolConfig(batch_size=2),
                text_pool=PoolConfig(batch_size=2),
            )
            counts = produce(
                ProduceRequest(
                    str(source),
                    str(cache),
                    config=cfg,
                    metrics_port=0,
                    run_label=LABEL,
                    prometheus_sd_dir=str(sd_dir),
                    local_num_cpus=4,
                ),
                on_progress=on_progress,
            )
        finally:
            gate.close()
            consumer.close()
        assert list(sd_dir.iterdir()) == []  # both targets gone with their exporters
        # ...and Prometheus drops them
        wait(
            "the targets to go",
            lambda: (
                not [
                    t
                    for t in _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
                    if t["labels"].get("job") == job
                ]
            ),
            timeout_s=30,
        )

    assert checked, "the producer finished before the checks ran"
    assert (counts.committed, counts.quarantined) == (24, {"zero_bytes": 1})
    assert {t["labels"]["run"] for t in checked["targets"]} == {LABEL}
    assert [n.split("-")[0] for n in checked["sd_files"]] == ["consumer", "producer"]
    assert any(n.startswith("qwenimage_producer_") for n in checked["names"])
    assert any(n.startswith("qwenimage_consumer_") for n in checked["names"])
    assert LABEL in checked["runs"]  # the dashboard's run variable offers the run
    (series,) = checked["backlog"]
    assert series["metric"]["run"] == LABEL and float(series["value"][1]) >= 0
    # every series of the run carries the label: each metric name the dashboard reads answered for it
    for expr, result in checked["answers"].items():
        for r in result:
            assert r["metric"].get("run") == LABEL, (expr, r)
