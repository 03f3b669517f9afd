"""``qwenimage monitor``: the snapshot's numbers, old and partial files, URLs, output modes, bad input."""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter

import fsspec
import pytest

from megatron_qwenimage.cache import open_cache
from megatron_qwenimage.cache.commit import list_commits
from megatron_qwenimage.cache.writer import publish_partition, read_quarantine
from megatron_qwenimage.monitor import Monitor
from megatron_qwenimage.monitor.snapshot import JsonlFollower
from tests.helpers.reader import B32, payload
from tests.monitor.fixtures import (
    COMMITTED_SAMPLES,
    QUARANTINED,
    T0,
    TELEMETRY,
    build_cache,
    build_run,
    cli_main,
    jsonl,
    metrics_records,
    status_record,
    write_consumer,
    write_producer,
    write_text,
)


def _snapshot(capsys, *args) -> dict:
    rc, out, err = cli_main(["monitor", *args, "--once", "--json"], capsys)
    assert rc == 0, err
    return json.loads(out)  # exactly one JSON object on stdout


def test_json_snapshot_numbers(scenario, capsys):
    cache, run = scenario
    snap = _snapshot(capsys, "--cache", cache, "--run", run)

    # committed samples from the commit records, quarantine counts from the quarantine tables
    storage = open_cache(cache).storage
    records = list_commits(storage, strict=True)
    committed = sum(s.num_samples for r in records for s in r.shards)
    reasons = Counter(reason for r in records for reason in read_quarantine(storage, r).column("reason").to_pylist())
    assert committed == COMMITTED_SAMPLES and dict(reasons) == QUARANTINED
    assert snap["committed_samples"] == committed
    assert snap["quarantined"] == dict(reasons)
    assert snap["commits"]["buckets"] == {"16x16": 20, "32x32": 12}
    assert snap["commits"]["snapshot_version"] == 2

    consumer = snap["consumer"]
    assert consumer["consumed_samples"] == 24 and consumer["consumed_source"] == "consumed_samples"
    assert snap["consumed_samples"] == 24
    assert snap["backlog_samples"] == committed - 24 == 8
    assert consumer["samples_per_s"] == 2.0
    assert snap["lead_time_s"] == snap["backlog_samples"] / consumer["samples_per_s"] == 4.0
    assert consumer["image_tokens_per_s"] == 32.0 and consumer["tflops_per_gpu"] == 1.5 and consumer["mfu"] == 0.25
    assert consumer["data_wait_fraction"] == 0.1
    assert (consumer["step"], consumer["train_steps"], consumer["loss"]) == (6, 10, 0.8)
    assert (consumer["val_loss"], consumer["val_step"]) == (0.95, 4)
    assert consumer["eta_s"] == (10 - 6) * 2.0  # remaining steps x step time

    producer = snap["producer"]
    assert producer["images_per_s"] == 2.5 and producer["images_per_s_source"] == "status"
    assert producer["bucket_images_per_s"] == {"16x16": 1.5, "32x32": 1.0}
    assert producer["text_tokens_per_s"] == 40.0
    assert producer["stage_busy"] == {"cpu": 0.5, "text": 0.8, "vae": 0.9, "write": 0.1}
    assert producer["encoder_utilization"] == {"text": 0.75, "vae": 0.9}
    assert producer["actors"] == {"text": 1, "vae": 2}
    assert producer["pool_bounds"] == {"text": "1:2", "vae": "3"} and producer["pool_control_version"] == 4
    assert producer["state"] == "running" and producer["telemetry_records"] == 3
    assert producer["remaining_inputs"] == 50 - 32 - 3
    assert producer["eta_s"] == 15 / 2.5  # remaining inputs / images/s
    assert snap["eta_s"] == {"producer": 6.0, "consumer": 8.0}
    assert snap["run_label"] == "exp1" and snap["cache"] == cache and snap["run"] == run
    assert snap["state"] == {"producer": "running", "consumer": "running", "run": None}


def test_producer_eta_counts_each_inputs_samples_at_every_area(tmp_path, capsys):
    # 10 inputs committed as 30 samples (3 bucket areas each) at 3 samples/s; 20 inputs to go:
    # 60 samples, 20 s (not 20 inputs / 3 per s)
    cache = build_cache(str(tmp_path / "cache"))
    status = status_record(len(TELEMETRY) - 1)
    status.update(inputs=30, committed=10, duplicates=0, quarantined={}, images_per_s=3.0)
    status["buckets"] = {"16x16": 10, "32x32": 10, "48x48": 10}
    write_text(f"{cache}/status.json", json.dumps(status))
    p = _snapshot(capsys, "--cache", cache)["producer"]
    assert (p["remaining_inputs"], p["committed_samples"]) == (20, 30)
    assert p["eta_s"] == pytest.approx(20.0)


def test_old_files_without_new_fields_show_na(tmp_path, capsys):
    cache = build_cache(str(tmp_path / "cache"))
    write_producer(cache, new=False, telemetry=False)
    run = str(tmp_path / "run")
    write_consumer(run, metrics_records(new=False))

    snap = _snapshot(capsys, "--cache", cache, "--run", run)
    p, c = snap["producer"], snap["consumer"]
    for key in ("images_per_s", "text_tokens_per_s", "bucket_images_per_s", "stage_busy", "encoder_utilization"):
        assert p[key] is None, key
    assert p["actors"] is None and p["eta_s"] is None and p["committed"] == 32
    assert p["pool_bounds"] is None and p["pool_control_version"] is None
    assert c["consumed_samples"] is None and c["train_steps"] is None and c["eta_s"] is None
    assert c["samples_per_s"] == 2.0 and c["step"] == 6
    assert snap["backlog_samples"] is None and snap["lead_time_s"] is None
    assert snap["committed_samples"] == COMMITTED_SAMPLES  # the commit records need no new field

    rc, out, err = cli_main(["monitor", "--cache", cache, "--run", run, "--once"], capsys)
    assert rc == 0, err
    rows = dict(line.strip().split(": ", 1) for line in out.splitlines() if ": " in line and line.startswith("  "))
    assert rows["backlog"].startswith("n/a") and rows["lead time"].startswith("n/a")
    assert rows["text tokens/s"] == "n/a" and rows["stage busy"] == "n/a"
    assert rows["images/s"].startswith("n/a")


def test_rates_and_consumed_derived_from_history(tmp_path, capsys):
    cache = build_cache(str(tmp_path / "cache"))
    write_producer(cache, new=False, telemetry=True)  # old fields only, but a history
    run = str(tmp_path / "run")
    records = metrics_records(drop=("samples_per_s", "consumed_samples", "step_time_s"))
    records[-1]["time"] = T0 + 18  # step 4 at T0+16 -> step 6 at T0+18: 2 steps x 4 samples in 2 s
    write_consumer(run, records)

    snap = _snapshot(capsys, "--cache", cache, "--run", run)
    p, c = snap["producer"], snap["consumer"]
    # telemetry at T0+15 (26 samples: 16 + 10) and T0+20 (32: 20 + 12)
    assert p["images_per_s"] == pytest.approx((32 - 26) / 5) and p["images_per_s_source"] == "history"
    assert p["bucket_images_per_s"] == pytest.approx({"16x16": (20 - 16) / 5, "32x32": (12 - 10) / 5})
    assert p["text_tokens_per_s"] is None  # the old telemetry has no text_tokens
    assert c["consumed_samples"] == 6 * 4 and c["consumed_source"] == "step*global_batch"
    assert c["samples_per_s"] == pytest.approx(8 / 2) and c["samples_per_s_source"] == "history"
    assert c["step_time_s"] == pytest.approx(1.0) and c["eta_s"] == pytest.approx(4 * 1.0)
    assert snap["backlog_samples"] == COMMITTED_SAMPLES - 24
    assert snap["lead_time_s"] == pytest.approx((COMMITTED_SAMPLES - 24) / 4)


def test_memory_and_file_urls(tmp_path, capsys):
    root = f"memory://monitor-{uuid.uuid4().hex[:8]}"
    try:
        cache, run = build_run(root)
        snap = _snapshot(capsys, "--cache", cache, "--run", run)
        assert snap["committed_samples"] == COMMITTED_SAMPLES
        assert snap["backlog_samples"] == 8 and snap["lead_time_s"] == 4.0
        assert snap["quarantined"] == QUARANTINED
        assert snap["producer"]["images_per_s"] == 2.5
    finally:
        fs, path = fsspec.core.url_to_fs(root)
        fs.rm(path, recursive=True)

    local_cache, local_run = build_run(str(tmp_path))
    snap = _snapshot(capsys, "--cache", f"file://{local_cache}", "--run", f"file://{local_run}")
    assert snap["backlog_samples"] == 8 and snap["consumer"]["step"] == 6


def test_run_json_names_the_cache(scenario, capsys):
    cache, run = scenario
    write_text(f"{run}/run.json", json.dumps({"run_label": "from-run-json", "cache": cache, "state": "running"}))
    snap = _snapshot(capsys, "--run", run)
    assert snap["cache"] == cache and snap["committed_samples"] == COMMITTED_SAMPLES
    assert snap["backlog_samples"] == 8 and snap["run_label"] == "from-run-json" and snap["run_state"] == "running"


def test_either_side_may_be_absent(scenario, capsys):
    cache, run = scenario
    snap = _snapshot(capsys, "--cache", cache)
    assert snap["consumer"]["present"] is False and snap["consumer"]["samples_per_s"] is None
    assert snap["backlog_samples"] is None and snap["committed_samples"] == COMMITTED_SAMPLES
    snap = _snapshot(capsys, "--run", run)
    assert snap["producer"]["present"] is False and snap["producer"]["images_per_s"] is None
    assert snap["quarantined"] is None and snap["backlog_samples"] is None and snap["consumer"]["step"] == 6


def test_not_started_and_finished_runs(tmp_path, capsys):
    from megatron_qwenimage.cache import init_cache

    cache = str(tmp_path / "cache")
    init_cache(cache)
    run = tmp_path / "run"
    run.mkdir()
    snap = _snapshot(capsys, "--cache", cache, "--run", str(run))
    assert snap["producer"]["state"] == "waiting" and snap["producer"]["started"] is False
    assert snap["consumer"]["state"] == "waiting" and snap["consumer"]["started"] is False
    assert snap["committed_samples"] == 0 and snap["consumed_samples"] is None and snap["backlog_samples"] is None

    cache = build_cache(str(tmp_path / "done" / "cache"))
    write_producer(cache, state="finished")
    records = metrics_records()
    records[-1]["step"] = 10  # train_steps reached
    write_consumer(str(tmp_path / "done" / "run"), records)
    snap = _snapshot(capsys, "--cache", cache, "--run", str(tmp_path / "done" / "run"))
    assert snap["eta_s"] == {"producer": 0.0, "consumer": 0.0}
    assert snap["state"]["producer"] == "finished" and snap["state"]["consumer"] == "finished"


def test_once_human_output_has_the_key_numbers(scenario, capsys):
    cache, run = scenario
    rc, out, err = cli_main(["monitor", "--cache", cache, "--run", run, "--once"], capsys)
    assert rc == 0, err
    rows = {}
    for line in out.splitlines():
        if line.startswith("  ") and ": " in line:
            label, value = line.strip().split(": ", 1)
            rows.setdefault(label, value)
    assert rows["images/s"].startswith("2.50 ")
    assert rows["per bucket"] == "16x16 1.50/s, 32x32 1.00/s"
    assert rows["text tokens/s"] == "40.00"
    assert rows["stage busy"] == "cpu 50.0%, text 80.0%, vae 90.0%, write 10.0%"
    assert rows["encoders"].endswith("alive actors text 1, vae 2; pools text 1:2, vae 3 (autoscaler v4)")
    assert rows["samples/s"] == "2.00" and rows["image tokens/s"] == "32.00"
    assert rows["TFLOP/s/GPU"] == "1.50   MFU 25.0%" and rows["data wait"] == "10.0%"
    assert rows["step"].startswith("6 / 10") and rows["loss"].startswith("0.8000   val 0.9500 at step 4")
    assert rows["consumed"] == "24 samples"
    assert rows["backlog"].startswith("8 samples") and rows["lead time"].startswith("4s")
    assert rows["quarantined"] == "3" and rows["corrupt_image"] == "2" and rows["missing_file"] == "1"
    assert rows["committed"].startswith("32 samples")


def test_rich_view_renders_the_numbers(scenario):
    from rich.console import Console

    from megatron_qwenimage.monitor.view import renderable

    cache, run = scenario
    snap = Monitor(cache, run).poll()
    for width in (80, 160):
        console = Console(width=width, record=True, force_terminal=True, color_system=None)
        console.print(renderable(snap, error="status.json [vanished]", width=width))
        text = console.export_text()
        for needle in ("2.50", "8 samples", "4s", "6 / 10", "corrupt_image", "status.json [vanished]"):
            assert needle in text, (width, needle)


def test_line_mode_when_not_a_terminal(scenario, capsys):
    cache, run = scenario
    rc, out, err = cli_main(["monitor", "--cache", cache, "--run", run, "--interval", "0.01", "--count", "3"], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    for line in lines:  # whole key=value lines, not a panel and not cut at the terminal width
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        assert fields["images/s"] == "2.50" and fields["samples/s"] == "2.00" and fields["step"] == "6/10"
        assert fields["backlog"] == "8" and fields["lead_time"] == "4s" and fields["quarantined"] == "3"
        assert len(line) > 80 and "│" not in line

    rc, out, err = cli_main(["monitor", "--run", run, "--interval", "0.01", "--count", "2", "--json"], capsys)
    assert rc == 0, err
    assert [json.loads(line)["consumer"]["step"] for line in out.splitlines()] == [6, 6]


def test_live_panel_on_a_terminal(scenario, capsys, monkeypatch):
    import sys

    cache, run = scenario
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "160")
    rc, out, err = cli_main(["monitor", "--cache", cache, "--run", run, "--interval", "0.01", "--count", "2"], capsys)
    assert rc == 0, err
    assert "qwenimage monitor" in out and "╭" in out  # a rich panel, not key=value lines
    for needle in ("2.50", "8 samples", "6 / 10", "corrupt_image"):
        assert needle in out, needle
    assert "backlog=" not in out


def test_live_refresh_survives_files_changing(tmp_path):
    cache, run = build_run(str(tmp_path))
    monitor = Monitor(cache, run)
    first = monitor.poll(now=T0 + 21)
    assert first.backlog_samples == 8 and not first.producer.stale

    # a new commit appears between refreshes: read incrementally
    storage = open_cache(cache).storage
    assert publish_partition(storage, "late", inputs=5, shards=[payload(B32, 5, prefix="late", seed=9)]).won
    # status.json is gone for a moment, the consumer is mid-way through writing a line
    os.remove(os.path.join(cache, "status.json"))
    more = {"step": 8, "time": T0 + 24, "loss": 0.7, "consumed_samples": 32, "samples_per_s": 2.0}
    line = json.dumps(more)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(line[:20])
    second = monitor.poll(now=T0 + 25)
    assert second.committed_samples == COMMITTED_SAMPLES + 5
    assert second.producer.images_per_s == 2.5 and any("vanished" in w for w in second.warnings)
    assert second.consumer.step == 6 and second.consumed_samples == 24  # the partial line waits
    assert second.backlog_samples == COMMITTED_SAMPLES + 5 - 24

    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(line[20:] + "\n")
    write_producer(cache)
    third = monitor.poll(now=T0 + 26)
    assert third.consumer.step == 8 and third.consumed_samples == 32 and not third.warnings
    assert third.backlog_samples == COMMITTED_SAMPLES + 5 - 32 and third.lead_time_s == pytest.approx(5 / 2)

    # metrics.jsonl replaced by a shorter file (a fresh run in the same directory): read from its start
    write_consumer(run, metrics_records()[:1])
    fourth = monitor.poll(now=T0 + 27)
    assert fourth.consumer.step == 2 and fourth.consumed_samples == 8 and fourth.consumer.records == 1


def test_jsonl_follower_lines(tmp_path):
    from megatron_qwenimage.cache.storage import CacheStorage

    storage = CacheStorage(str(tmp_path))
    follower = JsonlFollower(storage, "m.jsonl", "records")
    assert follower.read_new() == [] and not follower.exists
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')
    assert follower.read_new() == [{"a": 1}]
    with open(path, "a") as f:
        f.write(', "b": 3}\n{"a": 3, "cut\n[1, 2]\n{"a": 4}\n')  # a crash cut a line; a resumed run appended
    assert follower.read_new() == [{"a": 2, "b": 3}, {"a": 4}]
    assert follower.bad_lines == 2 and follower.first_bad.startswith("line 3 is not valid JSON")
    follower.check()  # good records exist: the bad lines are skipped, not an error


@pytest.mark.parametrize(
    "case",
    [
        "run-missing",
        "run-is-file",
        "cache-missing",
        "not-a-cache",
        "metrics-garbage",
        "status-garbage",
        "runjson-garbage",
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, case):
    cache, run = build_run(str(tmp_path))
    args = ["--cache", cache, "--run", run]
    if case == "run-missing":
        bad = str(tmp_path / "nope")
        args = ["--cache", cache, "--run", bad]
        expect = "does not exist"
    elif case == "run-is-file":
        bad = os.path.join(run, "metrics.jsonl")
        args = ["--run", bad]
        expect = "is a file"
    elif case == "cache-missing":
        bad = str(tmp_path / "no-cache")
        args = ["--cache", bad]
        expect = "does not exist"
    elif case == "not-a-cache":
        bad = run
        args = ["--cache", bad]
        expect = "cache.json"
    elif case == "metrics-garbage":
        bad = os.path.join(run, "metrics.jsonl")
        write_text(bad, "this is not json\n")
        expect = "line 1 is not valid JSON"
    elif case == "status-garbage":
        bad = os.path.join(cache, "status.json")
        write_text(bad, "{not json")
        expect = "not valid JSON"
    else:
        bad = os.path.join(run, "run.json")
        write_text(bad, "[1, 2]")
        expect = "a JSON list"
    rc, out, err = cli_main(["monitor", *args, "--once"], capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenimage monitor: error: "), err
    assert bad in lines[0] and expect in lines[0] and "expected" in lines[0]


@pytest.mark.parametrize(
    "argv,expect",
    [
        ([], "expected --cache CACHE and/or --run RUN"),
        (["--run", "RUN", "--interval", "0"], "--interval 0: expected a positive number"),
        (["--run", "RUN", "--count", "0"], "--count 0: expected a positive number"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, argv, expect):
    rc, out, err = cli_main(["monitor", *[str(tmp_path) if a == "RUN" else a for a in argv]], capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qwenimage monitor: error: {expect}"), err


def test_bad_input_under_json_is_an_error_object(tmp_path, capsys):
    rc, out, err = cli_main(["monitor", "--run", str(tmp_path / "nope"), "--once", "--json"], capsys)
    assert rc == 2
    assert json.loads(out)["error"].startswith(f"--run {tmp_path / 'nope'}: does not exist")
    assert len(err.strip().splitlines()) == 1


def test_corrupt_metrics_line_amid_good_ones_is_skipped_with_a_warning(scenario, capsys):
    cache, run = scenario
    records = metrics_records()
    write_text(f"{run}/metrics.jsonl", jsonl(records[:2]) + '{"step": 5, "lo\n' + jsonl(records[2:]))
    snap = _snapshot(capsys, "--cache", cache, "--run", run)
    assert snap["consumer"]["step"] == 6 and snap["consumer"]["bad_lines"] == 1
    assert any("metrics.jsonl: 1 line(s) are not JSON records" in w for w in snap["warnings"])
