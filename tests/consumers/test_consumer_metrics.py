"""The consumer's side of the telemetry contract (docs/monitoring.md): metrics.jsonl fields
(consumed samples, schedule, run label, backlog and lead time of tail caches), Prometheus
``qwenimage_consumer_*`` series with a ``run`` label and a step-time histogram, the file-SD target,
and one-line errors for the new ``logging`` keys; then the same through a real ``qwenimage train``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from consumers.metrics import LoggingConfig, MetricsLogger, consumed_before
from consumers.train import RunConfig
from megatron_qwenimage.config import ConfigError
from tests.helpers.consumers import QWENIMAGE_TRAIN, read_jsonl, run_config, run_train, write_cache, write_run_config

STEP = dict(lr=1e-3, grad_norm=1.0, image_tokens=64, flops=1e9, data_wait_s=0.01)
CONTRACT = ("consumed_samples", "train_steps", "global_batch", "run_label", "backlog_samples", "lead_time_s")


def _logger(tmp_path: Path, **kw) -> MetricsLogger:
    cfg = {"dir": str(tmp_path / "run-a"), "interval": 2, "tensorboard": False, **kw.pop("config", {})}
    return MetricsLogger(LoggingConfig(**cfg), enabled=kw.pop("enabled", True), world_size=1, peak_flops=1e12, **kw)


def test_run_label_defaults_to_the_logging_dir_basename(tmp_path):
    assert LoggingConfig(dir=str(tmp_path / "exp-7")).run_label == "exp-7"
    assert LoggingConfig(dir="runs/demo/").run_label == "demo"
    assert LoggingConfig(dir="runs/demo", run_label="main job").run_label == "main job"
    assert LoggingConfig(dir="x").prometheus_sd_dir is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("run_label", ""),
        ("run_label", "  "),
        ("run_label", " lead"),
        ("run_label", "a\nb"),
        ("run_label", 5),
        ("run_label", "x" * 129),
        ("prometheus_sd_dir", ""),
        ("prometheus_sd_dir", ["a"]),
        ("prometheus_sd_dir", "s3://bucket/sd"),
        ("prometheus_sd_dir", "FILE"),
    ],
)
def test_bad_logging_keys_are_one_line_naming_the_key(tmp_path, key, value):
    (tmp_path / "file").write_text("x")
    value = str(tmp_path / "file") if value == "FILE" else value
    cfg = run_config(str(tmp_path / "cache"), tmp_path, steps=1)
    cfg["logging"][key] = value
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_dict(cfg)
    message = str(exc.value)
    assert message.startswith(f"logging.{key}") and "\n" not in message, message


def test_consumed_before_follows_the_curriculum():
    stages = [SimpleNamespace(steps=10, global_batch=4), SimpleNamespace(steps=None, global_batch=8)]
    assert [consumed_before(stages, s) for s in (0, 1, 10, 11, 15)] == [0, 4, 40, 48, 80]
    finite = [SimpleNamespace(steps=2, global_batch=3), SimpleNamespace(steps=2, global_batch=5)]
    assert [consumed_before(finite, s) for s in (1, 2, 3, 4)] == [3, 6, 11, 16]


def test_records_carry_the_contract_fields_and_the_backlog_of_tail_caches(tmp_path):
    cache = write_cache(tmp_path / "cache", samples_per_bucket=8, buckets=((32, 32), (64, 64)))  # 16 samples
    stages = [SimpleNamespace(steps=4, global_batch=1), SimpleNamespace(steps=None, global_batch=4)]
    logger = _logger(tmp_path, train_steps=100, stages=stages, tail_caches=[cache])
    try:
        # resumed at step 4: the 4 steps before consumed 1 sample each
        assert logger.record_step(step=4, loss=1.0, samples=4, step_time_s=0.5, **STEP) is None
        first = logger.record_step(step=5, loss=2.0, samples=4, step_time_s=1.5, **STEP)
        assert first["consumed_samples"] == 4 + 8 and first["global_batch"] == 4 and first["train_steps"] == 100
        assert first["run_label"] == "run-a"
        assert first["backlog_samples"] == 16 - 12
        assert first["lead_time_s"] == pytest.approx(4 / first["samples_per_s"]) and first["samples_per_s"] == 4
        # a producer commits more partitions: the backlog follows the commit records
        write_cache(tmp_path / "cache", samples_per_bucket=20, partition="p1", seed=1)
        logger.record_step(step=6, loss=1.0, samples=4, step_time_s=1.0, **STEP)
        second = logger.record_step(step=7, loss=1.0, samples=4, step_time_s=1.0, **STEP)
        assert second["consumed_samples"] == 20 and second["backlog_samples"] == 36 - 20
        write_cache(tmp_path / "cache", samples_per_bucket=30, partition="p2", seed=2)
        logger.record_step(step=8, loss=1.0, samples=4, step_time_s=1.0, **STEP)
        third = logger.record_step(step=9, loss=1.0, samples=4, step_time_s=1.0, **STEP)
        assert third["consumed_samples"] == 28 and third["backlog_samples"] == 66 - 28
        logger.emit({"step": 10, "val_loss": 0.5, "val_loss_by_sigma": {}})
    finally:
        logger.close()
    records = read_jsonl(tmp_path / "run-a" / "metrics.jsonl")
    assert [r["step"] for r in records] == [6, 8, 10, 10]
    assert all(set(CONTRACT) <= set(r) for r in records[:3])
    assert records[-1]["run_label"] == "run-a" and "backlog_samples" not in records[-1]


def test_backlog_is_never_negative(tmp_path):
    """Consumed samples can outnumber a tail cache's when the run also reads other caches."""
    cache = write_cache(tmp_path / "cache", samples_per_bucket=2)
    logger = _logger(tmp_path, stages=[SimpleNamespace(steps=None, global_batch=4)], tail_caches=[cache])
    try:
        logger.record_step(step=0, loss=1.0, samples=4, step_time_s=0.1, **STEP)
        rec = logger.record_step(step=1, loss=1.0, samples=4, step_time_s=0.1, **STEP)
    finally:
        logger.close()
    assert rec["backlog_samples"] == 0 and rec["lead_time_s"] == 0


def test_no_tail_cache_means_null_backlog_and_other_ranks_read_nothing(tmp_path):
    cache = write_cache(tmp_path / "cache", samples_per_bucket=4)
    fixed = _logger(tmp_path, train_steps=4, stages=[SimpleNamespace(steps=None, global_batch=2)])
    try:
        fixed.record_step(step=0, loss=1.0, samples=2, step_time_s=0.1, **STEP)
        rec = fixed.record_step(step=1, loss=1.0, samples=2, step_time_s=0.1, **STEP)
    finally:
        fixed.close()
    assert rec["backlog_samples"] is None and rec["lead_time_s"] is None and rec["consumed_samples"] == 4
    other = MetricsLogger(
        LoggingConfig(dir=str(tmp_path / "r1"), interval=1, tensorboard=False),
        enabled=False,
        world_size=2,
        peak_flops=None,
        tail_caches=[cache],
    )
    assert other.backlog is None  # rank != 0: no cache listing at all
    assert other.record_step(step=0, loss=1.0, samples=2, step_time_s=0.1, **STEP)["backlog_samples"] is None
    assert not (tmp_path / "r1").exists()


def _get(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_prometheus_series_histogram_and_sd_target(tmp_path):
    cache = write_cache(tmp_path / "cache", samples_per_bucket=8)
    sd = tmp_path / "prometheus"
    logger = _logger(
        tmp_path,
        config={"prometheus_port": 0, "prometheus_sd_dir": str(sd), "run_label": "live"},
        train_steps=10,
        stages=[SimpleNamespace(steps=None, global_batch=2)],
        tail_caches=[cache],
    )
    try:
        port = logger.prometheus.port
        for step in range(3):
            logger.record_step(step=step, loss=1.0, samples=2, step_time_s=0.2 * (step + 1), **STEP)
        logger.emit({"step": 3, "val_loss": 0.25})
        (target,) = sd.iterdir()
        group = json.loads(target.read_text())
        body = _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        logger.close()
    assert target.name.startswith("consumer-") and target.name.endswith(".json")
    assert group == [{"targets": [f"127.0.0.1:{port}"], "labels": {"run": "live", "side": "consumer"}}]
    assert not target.exists() and list(sd.iterdir()) == []  # removed with the exporter
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{port}/metrics")
    series = [line for line in body.splitlines() if line and not line.startswith("#")]
    assert all(line.startswith("qwenimage_consumer_") and 'run="live"' in line for line in series), series[:3]
    assert "qwenimage_train_" not in body
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in series}
    assert values['qwenimage_consumer_step_time_seconds_count{run="live"}'] == 3
    assert values['qwenimage_consumer_step_time_seconds_sum{run="live"}'] == pytest.approx(1.2)
    assert values['qwenimage_consumer_step_time_seconds_bucket{le="0.25",run="live"}'] == 1
    assert values['qwenimage_consumer_step{run="live"}'] == 3  # the validation record's
    assert values['qwenimage_consumer_consumed_samples{run="live"}'] == 4
    assert values['qwenimage_consumer_backlog_samples{run="live"}'] == 8 - 4
    assert values['qwenimage_consumer_lead_time_seconds{run="live"}'] > 0
    assert values['qwenimage_consumer_val_loss{run="live"}'] == 0.25
    assert values['qwenimage_consumer_samples_per_second{run="live"}'] > 0
    assert values['qwenimage_consumer_info{run="live"}'] == 1


def _listening() -> set:
    import psutil

    me = psutil.Process(os.getpid())
    conns = (me.net_connections if hasattr(me, "net_connections") else me.connections)(kind="inet")
    return {c.laddr for c in conns if c.status == psutil.CONN_LISTEN}


def test_unwritable_sd_dir_is_a_config_error_and_leaves_nothing_open(tmp_path):
    (tmp_path / "file").write_text("x")
    before = _listening()
    cfg = LoggingConfig(
        dir=str(tmp_path / "logs"),
        tensorboard=False,
        prometheus_port=0,
        prometheus_sd_dir=str(tmp_path / "file" / "sd"),
    )
    with pytest.raises(ConfigError, match=r"^logging\.prometheus_sd_dir=.*cannot write the file-SD target"):
        MetricsLogger(cfg, enabled=True, world_size=1, peak_flops=None)
    assert _listening() <= before  # the exporter it had started is closed again


def test_train_cli_writes_the_contract_fields(tmp_path):
    """A real ``qwenimage train`` (3 steps, tail mode, Prometheus on with a file-SD dir): every
    record has the fields, consumed samples follow the steps, the backlog the cache."""
    cache = write_cache(tmp_path / "cache", samples_per_bucket=16)
    cfg = run_config(cache, tmp_path, steps=3, global_batch=4, micro_batch=2)
    cfg["data"]["caches"] = [{"path": cache, "mode": "tail"}]
    cfg["logging"].update(prometheus_port=0, prometheus_sd_dir=str(tmp_path / "sd"), run_label="cli-run")
    r = run_train(write_run_config(cfg, tmp_path / "run.yaml"), entry=QWENIMAGE_TRAIN, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert [x["step"] for x in records] == [1, 2, 3]
    for x in records:
        assert x["consumed_samples"] == 4 * x["step"] and x["global_batch"] == 4 and x["train_steps"] == 3
        assert x["run_label"] == "cli-run"
        assert x["backlog_samples"] == 16 - x["consumed_samples"]
        assert x["lead_time_s"] == pytest.approx(x["backlog_samples"] / x["samples_per_s"])
    assert list((tmp_path / "sd").iterdir()) == []  # the target went with the exporter


def test_bad_run_label_at_the_command_line_is_one_line(tmp_path):
    cache = write_cache(tmp_path / "cache", samples_per_bucket=4)
    cfg = run_config(cache, tmp_path, steps=1)
    cfg["logging"]["run_label"] = "two\nlines"
    r = run_train(write_run_config(cfg, tmp_path / "run.yaml"), entry=QWENIMAGE_TRAIN, timeout=120)
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith("qwenimage train: error: logging.run_label=") and "run label" in line, r.stderr
