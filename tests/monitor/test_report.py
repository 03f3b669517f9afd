"""``qwenimage report``: the series it computes, the figure's panels, the PNG, missing pieces, bad input."""

from __future__ import annotations

import json

import pytest

from megatron_qwenimage.monitor import report
from megatron_qwenimage.monitor.report import (
    LINE_BACKLOG,
    LINE_CONSUMER,
    LINE_LEAD_TIME,
    LINE_LOSS,
    LINE_PRODUCER,
    LINE_VAL_LOSS,
    PANEL_BACKLOG,
    PANEL_LEAD_TIME,
    PANEL_LOSS,
    PANEL_QUARANTINE,
    PANEL_THROUGHPUT,
    PANELS,
    load_report,
)
from tests.monitor.fixtures import (
    COMMITTED_SAMPLES,
    QUARANTINED,
    T0,
    build_cache,
    cli_main,
    metrics_records,
    write_consumer,
    write_text,
)


def test_series_backlog_and_lead_time(scenario):
    cache, run = scenario
    data = load_report(run, cache)
    # producer telemetry: committed 20, 26, 32 samples at T0+10/15/20; consumer: 8, 16, 24 at T0+12/16/20
    assert data.committed_source == "producer telemetry"
    assert data.committed == [(T0 + 10, 20), (T0 + 15, 26), (T0 + 20, 32)]
    assert data.consumed == [(T0 + 12, 8), (T0 + 16, 16), (T0 + 20, 24)]
    assert data.backlog == [(T0 + 10, 20), (T0 + 12, 12), (T0 + 15, 18), (T0 + 16, 10), (T0 + 20, 8)]
    # lead time = backlog / consumer samples/s (2.0 from T0+12 on; none before the first record)
    assert data.lead_time == [(T0 + 12, 6.0), (T0 + 15, 9.0), (T0 + 16, 5.0), (T0 + 20, 4.0)]
    assert data.producer_rate == [(T0 + 10, 2.5), (T0 + 15, 2.5), (T0 + 20, 2.5)]
    assert data.consumer_rate == [(T0 + 12, 2.0), (T0 + 16, 2.0), (T0 + 20, 2.0)]
    assert data.loss == [(2, 1.0), (4, 0.9), (6, 0.8)] and data.val_loss == [(4, 0.95)]
    assert data.quarantined == QUARANTINED
    assert data.notes == {}  # nothing missing
    assert data.snapshot.backlog_samples == COMMITTED_SAMPLES - 24  # the summary: the monitor's final numbers


def test_series_derive_rates_and_fall_back_to_commit_records(tmp_path):
    cache = build_cache(str(tmp_path / "cache"))  # no producer telemetry
    run = str(tmp_path / "run")
    write_consumer(run, metrics_records(drop=("samples_per_s", "consumed_samples")))
    data = load_report(run, cache)
    assert data.committed_source == "commit records"
    assert [n for _, n in data.committed] == [14, 28, 32]  # cumulative samples per commit, in time order
    assert data.consumed == [(T0 + 12, 8), (T0 + 16, 16), (T0 + 20, 24)]  # step x global batch
    assert data.consumer_rate == [(T0 + 16, 2.0), (T0 + 20, 2.0)]  # derived from consecutive records
    assert data.producer_rate == [] and "no producer telemetry" in data.notes[PANEL_THROUGHPUT]
    assert [b for _, b in data.backlog][-1] == 32 - 24


def test_missing_pieces_are_notes_not_errors(tmp_path):
    run = str(tmp_path / "run")
    write_consumer(run, metrics_records(new=False))  # old records: no consumed samples, and no cache
    data = load_report(run)
    assert data.consumer_rate and data.loss and not data.backlog and data.quarantined is None
    assert "no cache" in data.notes[PANEL_BACKLOG] and "no cache" in data.notes[PANEL_QUARANTINE]
    assert PANEL_LEAD_TIME in data.notes and PANEL_LOSS not in data.notes
    described = report.describe(data)
    assert (
        described[PANEL_BACKLOG].startswith("empty (")
        and described[PANEL_LOSS] == "3 train points, 1 validation points"
    )


def test_figure_panels_and_lines(scenario):
    pytest.importorskip("matplotlib")
    cache, run = scenario
    fig = report.build_figure(load_report(run, cache))
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == set(PANELS) and len(fig.axes) == len(PANELS)

    def lines(title):
        return {line.get_label(): len(line.get_xdata()) for line in axes[title].get_lines()}

    assert lines(PANEL_THROUGHPUT) == {LINE_PRODUCER: 3, LINE_CONSUMER: 3}
    assert lines(PANEL_BACKLOG) == {LINE_BACKLOG: 5}
    assert lines(PANEL_LEAD_TIME) == {LINE_LEAD_TIME: 4}
    assert lines(PANEL_LOSS) == {LINE_LOSS: 3, LINE_VAL_LOSS: 1}
    bars = axes[PANEL_QUARANTINE].patches
    assert sorted(b.get_height() for b in bars) == sorted(QUARANTINED.values())
    # the time panels share one wall-clock axis
    rate, backlog = axes[PANEL_THROUGHPUT], axes[PANEL_BACKLOG]
    assert rate.get_shared_x_axes().joined(rate, backlog)


def test_figure_empty_panels_say_why(tmp_path):
    pytest.importorskip("matplotlib")
    run = str(tmp_path / "run")
    write_consumer(run, metrics_records(new=False))
    fig = report.build_figure(load_report(run))
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == set(PANELS)
    for title in (PANEL_BACKLOG, PANEL_LEAD_TIME, PANEL_QUARANTINE):
        assert not axes[title].get_lines() and "no cache" in " ".join(t.get_text() for t in axes[title].texts)
    assert {line.get_label() for line in axes[PANEL_THROUGHPUT].get_lines()} == {LINE_CONSUMER}


def test_report_writes_a_png(scenario, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    cache, run = scenario
    write_text(f"{run}/run.json", json.dumps({"run_label": "exp1", "cache": cache, "state": "finished"}))
    rc, out, err = cli_main(["report", run], capsys)  # the cache comes from run.json
    assert rc == 0, err
    png = f"{run}/report.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1400, 1200)
        image.verify()
    assert 20_000 < len(open(png, "rb").read()) < 5_000_000
    assert f"wrote {png} (1400x1200 px" in out
    for panel in PANELS:
        assert panel in out
    assert "3 producer points, 3 consumer points" in out and "2 reasons, 3 inputs" in out


def test_report_output_flag_and_missing_pieces(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    run = str(tmp_path / "run")
    write_consumer(run, metrics_records(new=False))
    out_png = tmp_path / "out" / "r.png"
    rc, out, err = cli_main(["report", run, "--output", str(out_png)], capsys)
    assert rc == 0, err
    with Image.open(out_png) as image:
        assert image.format == "PNG"
    assert "empty (no cache" in out


def test_report_without_matplotlib_is_one_line(scenario, capsys, monkeypatch):
    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    _, run = scenario
    rc, out, err = cli_main(["report", run], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        "qwenimage report: error: qwenimage report draws with matplotlib, which is not installed here "
        "(pip install matplotlib)"
    ]


@pytest.mark.parametrize("case", ["empty-run", "missing-run", "garbage-metrics"])
def test_report_bad_input_is_one_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing-run":
        run.mkdir()
    if case == "garbage-metrics":
        (run / "metrics.jsonl").write_text("not json\n")
    rc, out, err = cli_main(["report", str(run)], capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenimage report: error: ") and str(run) in lines[0]
    expect = {"empty-run": "nothing to report", "missing-run": "does not exist", "garbage-metrics": "line 1"}[case]
    assert expect in lines[0]
