"""``qwenimage report``: a run's files over its whole life -> time series -> one PNG.

`load_report` reads what ``qwenimage monitor`` reads, but every record instead of the newest:
the consumer's ``metrics.jsonl`` (samples/s, consumed samples, loss and validation loss), the
producer's telemetry ``<cache>/telemetry/producer-*.jsonl`` (images/s and committed samples over
time; without telemetry, committed samples over time come from the commit records' creation
times) and the commit records (quarantine reasons). `build_figure` draws the panels (`PANELS`)
with matplotlib's Agg backend, no display needed; a missing piece is an empty panel saying why.

Backlog over time is committed(t) - consumed(t), each a step function of its own records, at
every time either changes (consumed counts 0 before the consumer's first record); lead time is
backlog(t) / consumer samples/s(t).
"""

from __future__ import annotations

import io
import os
import posixpath
import struct
import textwrap
import time
from bisect import bisect_right
from dataclasses import dataclass, field

from megatron_qwenimage.monitor.snapshot import (
    EXPECT_METRICS,
    EXPECT_TELEMETRY,
    METRICS_FILE,
    TELEMETRY_DIR,
    JsonlFollower,
    Monitor,
    MonitorError,
    MonitorSnapshot,
    count,
    number,
    rate_between,
    status_samples,
    text,
)

PANEL_THROUGHPUT = "Throughput (producer images/s, consumer samples/s)"
PANEL_BACKLOG = "Backlog (committed - consumed samples)"
PANEL_LEAD_TIME = "Lead time (backlog / consumer samples/s)"
PANEL_LOSS = "Loss"
PANEL_QUARANTINE = "Quarantined inputs by reason"
PANEL_SUMMARY = "Summary"
#: Every panel of the report, in reading order (left column: the time axis they share).
PANELS = (PANEL_THROUGHPUT, PANEL_LOSS, PANEL_BACKLOG, PANEL_QUARANTINE, PANEL_LEAD_TIME, PANEL_SUMMARY)
#: Line labels (the legend; tests find the lines by them).
LINE_PRODUCER = "producer images/s"
LINE_CONSUMER = "consumer samples/s"
LINE_BACKLOG = "backlog samples"
LINE_LEAD_TIME = "lead time"
LINE_LOSS = "train loss"
LINE_VAL_LOSS = "val loss"

Point = tuple[float, float]


@dataclass
class ReportData:
    """The report's series. Time series are ``(unix time, value)`` sorted by time; the loss
    curves are ``(step, value)``. `notes` says, per panel title, why it is (partly) empty."""

    run: str
    cache: str | None
    run_label: str | None
    producer_rate: list[Point] = field(default_factory=list)
    consumer_rate: list[Point] = field(default_factory=list)
    committed: list[Point] = field(default_factory=list)
    committed_source: str | None = None  # "producer telemetry" | "commit records"
    consumed: list[Point] = field(default_factory=list)
    backlog: list[Point] = field(default_factory=list)
    lead_time: list[Point] = field(default_factory=list)
    loss: list[Point] = field(default_factory=list)
    val_loss: list[Point] = field(default_factory=list)
    quarantined: dict[str, int] | None = None
    notes: dict[str, str] = field(default_factory=dict)
    snapshot: MonitorSnapshot | None = None  # the final state (summary panel)

    @property
    def t0(self) -> float | None:
        """The earliest time of any time series (the time axis starts there)."""
        starts = [s[0][0] for s in (self.producer_rate, self.consumer_rate, self.committed, self.consumed) if s]
        return min(starts) if starts else None

    @property
    def span_s(self) -> float:
        ends = [s[-1][0] for s in (self.producer_rate, self.consumer_rate, self.committed, self.consumed) if s]
        return max(ends) - self.t0 if ends and self.t0 is not None else 0.0


# --- series ---------------------------------------------------------------------------------------
def value_at(series: list[Point], t: float) -> float | None:
    """The value of step function `series` at time `t` (its newest point at or before `t`)."""
    i = bisect_right([p[0] for p in series], t)
    return series[i - 1][1] if i else None


def backlog_series(committed: list[Point], consumed: list[Point]) -> list[Point]:
    """committed(t) - consumed(t) at every time either series changes, from the first committed
    point on; consumed is 0 before its first point (nothing consumed yet)."""
    if not committed or not consumed:
        return []
    out = []
    for t in sorted({t for t, _ in committed} | {t for t, _ in consumed}):
        c = value_at(committed, t)
        if c is None:
            continue
        d = value_at(consumed, t)
        out.append((t, c - (d or 0)))
    return out


def lead_time_series(backlog: list[Point], rate: list[Point]) -> list[Point]:
    """backlog(t) / samples_per_s(t) wherever the consumer has a positive rate."""
    out = []
    for t, b in backlog:
        r = value_at(rate, t)
        if r is not None and r > 0:
            out.append((t, b / r))
    return out


def consumer_series(records: list[dict]) -> dict[str, list[Point]]:
    """``metrics.jsonl`` records -> rate, consumed, loss and val_loss series."""
    rate, consumed, loss, val = [], [], [], []
    global_batch = None
    prev: tuple[float, float] | None = None
    for rec in records:
        step, t = count(rec.get("step")), number(rec.get("time"))
        if (gb := count(rec.get("global_batch"))) is not None and gb > 0:
            global_batch = gb
        if "val_loss" in rec:
            if step is not None and (v := number(rec.get("val_loss"))) is not None:
                val.append((float(step), v))
            continue
        if step is not None and (v := number(rec.get("loss"))) is not None:
            loss.append((float(step), v))
        if t is None:
            continue
        n = count(rec.get("consumed_samples"))
        if n is None and step is not None and global_batch is not None:
            n = step * global_batch
        r = number(rec.get("samples_per_s"))
        if n is not None:
            if r is None:
                r = rate_between(prev, (t, n))
            prev = (t, n)
            consumed.append((t, float(n)))
        if r is not None:
            rate.append((t, r))
    return {
        "rate": sorted(rate),
        "consumed": sorted(consumed),
        "loss": sorted(loss),
        "val_loss": sorted(val),
    }


def producer_series(records: list[dict]) -> dict[str, list[Point]]:
    """Producer status records (telemetry, any runs) -> rate and committed series."""
    timed = sorted(
        ((t, rec) for rec in records if (t := number(rec.get("updated_unix"))) is not None), key=lambda x: x[0]
    )
    rate, committed = [], []
    prev: dict[str | None, tuple[float, float]] = {}  # run_id -> its previous (t, committed samples)
    for t, rec in timed:
        run_id = text(rec.get("run_id"))
        n = status_samples(rec)
        r = number(rec.get("images_per_s"))
        if n is not None:
            if r is None:
                r = rate_between(prev.get(run_id), (t, n))
            prev[run_id] = (t, n)
            committed.append((t, float(n)))
        if r is not None:
            rate.append((t, r))
    return {"rate": rate, "committed": committed}


def read_telemetry(storage) -> list[dict]:
    """Every record of every ``telemetry/producer-*.jsonl`` of the cache."""
    records = []
    for name in storage.listdir(TELEMETRY_DIR):
        if name.startswith("producer-") and name.endswith(".jsonl"):
            records += JsonlFollower(storage, f"{TELEMETRY_DIR}/{name}", EXPECT_TELEMETRY).read_all()
    return records


def load_report(run: str, cache: str | None = None) -> ReportData:
    """Read everything the report draws.

    Raises:
        MonitorError: `run` (or the cache) does not exist or is not one, a file is unreadable, or
            there is nothing to draw at all (no consumer records, no producer telemetry, no commits).
    """
    monitor = Monitor(cache, run)
    snap = monitor.poll()
    data = ReportData(run=run, cache=monitor.cache_url, run_label=snap.run_label, snapshot=snap)
    metrics = JsonlFollower(monitor.run_storage, METRICS_FILE, EXPECT_METRICS)
    consumer = consumer_series(metrics.read_all())
    telemetry, timeline = [], []
    if monitor.cache is not None:
        telemetry = read_telemetry(monitor.cache.storage)
        timeline = monitor.commits.timeline()
    producer = producer_series(telemetry)
    if metrics.records == 0 and not telemetry and not timeline:
        where = (
            f"cache {monitor.cache_url} has no producer telemetry and no commit records"
            if monitor.cache is not None
            else "no cache is known (--cache, or a run.json naming one)"
        )
        state = "has no records" if metrics.exists else "does not exist"
        raise MonitorError(
            f"{run}: nothing to report: {metrics.path} {state} and {where}; expected the logging.dir of a "
            "qwenimage train run"
        )
    data.producer_rate, data.consumer_rate = producer["rate"], consumer["rate"]
    data.consumed, data.loss, data.val_loss = consumer["consumed"], consumer["loss"], consumer["val_loss"]
    if producer["committed"]:
        data.committed, data.committed_source = producer["committed"], "producer telemetry"
    elif timeline:
        data.committed = [(t, float(n)) for t, n in timeline]
        data.committed_source = "commit records"
    data.backlog = backlog_series(data.committed, data.consumed)
    data.lead_time = lead_time_series(data.backlog, data.consumer_rate)
    data.quarantined = dict(snap.quarantined) if snap.quarantined is not None else None

    no_cache = "no cache: pass --cache CACHE (or run with a run.json naming it)"
    no_telemetry = f"no producer telemetry in {monitor.cache_url}/{TELEMETRY_DIR}/" if monitor.cache else no_cache
    no_consumer = f"no consumer records in {metrics.path}" if metrics.records == 0 else ""
    notes = data.notes
    if not data.producer_rate or not data.consumer_rate:
        missing = [no_telemetry] if not data.producer_rate else []
        if not data.consumer_rate:
            missing.append(no_consumer or "consumer records carry no samples_per_s and no time")
        notes[PANEL_THROUGHPUT] = "; ".join(missing)
    if not data.backlog:
        if not data.committed:
            why = no_cache if monitor.cache is None else "no producer telemetry and no commit records"
        elif not data.consumed:
            why = no_consumer or "consumer records carry no consumed_samples (nor step and global_batch) with a time"
        else:
            why = "no time at which both committed and consumed samples are known"
        notes[PANEL_BACKLOG] = why
    if not data.lead_time:
        notes[PANEL_LEAD_TIME] = notes.get(PANEL_BACKLOG) or "no positive consumer samples/s"
    if not data.loss and not data.val_loss:
        notes[PANEL_LOSS] = no_consumer or "the consumer records carry no loss"
    if data.quarantined is None:
        notes[PANEL_QUARANTINE] = no_cache
    elif not data.quarantined:
        notes[PANEL_QUARANTINE] = "no input was quarantined"
    return data


def describe(data: ReportData) -> dict[str, str]:
    """Panel title -> what it holds (what ``qwenimage report`` prints)."""

    def empty(panel: str) -> str:
        return f"empty ({data.notes[panel]})"

    q = data.quarantined
    return {
        PANEL_THROUGHPUT: (
            f"{len(data.producer_rate)} producer points, {len(data.consumer_rate)} consumer points"
            if data.producer_rate or data.consumer_rate
            else empty(PANEL_THROUGHPUT)
        ),
        PANEL_BACKLOG: f"{len(data.backlog)} points (committed from {data.committed_source})"
        if data.backlog
        else empty(PANEL_BACKLOG),
        PANEL_LEAD_TIME: f"{len(data.lead_time)} points" if data.lead_time else empty(PANEL_LEAD_TIME),
        PANEL_LOSS: f"{len(data.loss)} train points, {len(data.val_loss)} validation points"
        if data.loss or data.val_loss
        else empty(PANEL_LOSS),
        PANEL_QUARANTINE: f"{len(q)} reasons, {sum(q.values())} inputs" if q else empty(PANEL_QUARANTINE),
        PANEL_SUMMARY: "final counts and rates",
    }


# --- drawing --------------------------------------------------------------------------------------
def _time_unit(span_s: float) -> tuple[str, float]:
    if span_s < 600:
        return "s", 1.0
    if span_s < 10 * 3600:
        return "min", 60.0
    return "h", 3600.0


def _empty(ax, note: str) -> None:
    ax.text(0.5, 0.5, textwrap.fill(note, 60), ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _summary_lines(data: ReportData) -> list[str]:
    from megatron_qwenimage.monitor.view import fmt_duration, fmt_float, fmt_int, fmt_loss

    s = data.snapshot
    lines = [f"run: {data.run}"]
    if data.run_label:
        lines.append(f"label: {data.run_label}")
    lines.append(f"cache: {data.cache or 'none'}")
    if s is not None:
        p, c = s.producer, s.consumer
        lines += [
            "",
            f"committed samples: {fmt_int(s.committed_samples)}",
            f"consumed samples: {fmt_int(s.consumed_samples)}",
            f"backlog: {fmt_int(s.backlog_samples)}   lead time: {fmt_duration(s.lead_time_s)}",
            f"quarantined: {fmt_int(sum(s.quarantined.values())) if s.quarantined is not None else 'n/a'}",
            "",
            f"producer: {p.state or 'n/a'}   images/s: {fmt_float(p.images_per_s)}",
            f"consumer: {c.state or 'n/a'}   step {fmt_int(c.step)} / {fmt_int(c.train_steps)}",
            f"samples/s: {fmt_float(c.samples_per_s)}   TFLOP/s/GPU: {fmt_float(c.tflops_per_gpu)}",
            f"loss: {fmt_loss(c.loss)}   val loss: {fmt_loss(c.val_loss)}",
        ]
    lines.append("")
    lines.append(time.strftime("written %Y-%m-%d %H:%M:%S", time.localtime()))
    return [textwrap.shorten(line, 64, placeholder="...") if len(line) > 64 else line for line in lines]


def build_figure(data: ReportData):
    """The report as a matplotlib `Figure` (not attached to pyplot): one axes per `PANELS` entry,
    titled with it. Time panels share their x axis (time since the first record)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 12), dpi=100, layout="constrained")
    axes = fig.subplots(3, 2)
    ax_rate, ax_loss = axes[0]
    ax_backlog, ax_quarantine = axes[1]
    ax_lead, ax_summary = axes[2]
    for ax, name in zip((ax_rate, ax_loss, ax_backlog, ax_quarantine, ax_lead, ax_summary), PANELS, strict=True):
        ax.set_title(name)
    fig.suptitle(f"qwenimage report: {data.run_label or data.run}")

    t0 = data.t0 or 0.0
    unit, scale = _time_unit(data.span_s)
    xlabel = f"time since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t0))} ({unit})"

    def xs(points: list[Point]) -> list[float]:
        return [(t - t0) / scale for t, _ in points]

    def ys(points: list[Point]) -> list[float]:
        return [v for _, v in points]

    # share the wall-clock axis first (matplotlib shares axes before anything is drawn on them);
    # empty panels stay out of it (their hidden ticks would hide the shared ones)
    has_data = {
        ax_rate: bool(data.producer_rate or data.consumer_rate),
        ax_backlog: bool(data.backlog),
        ax_lead: bool(data.lead_time),
    }
    time_axes = [ax for ax, has in has_data.items() if has]
    for ax in time_axes[1:]:
        ax.sharex(time_axes[0])
    for ax in time_axes:
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)

    if has_data[ax_rate]:
        if data.producer_rate:
            ax_rate.plot(xs(data.producer_rate), ys(data.producer_rate), label=LINE_PRODUCER, color="tab:blue")
        if data.consumer_rate:
            ax_rate.plot(xs(data.consumer_rate), ys(data.consumer_rate), label=LINE_CONSUMER, color="tab:orange")
        ax_rate.set_ylabel("per second")
        ax_rate.legend(loc="best")
        if PANEL_THROUGHPUT in data.notes:
            ax_rate.text(
                0.01, 0.02, data.notes[PANEL_THROUGHPUT], transform=ax_rate.transAxes, fontsize=8, color="gray"
            )
    else:
        _empty(ax_rate, data.notes.get(PANEL_THROUGHPUT, "no data"))

    if has_data[ax_backlog]:
        ax_backlog.plot(
            xs(data.backlog), ys(data.backlog), label=LINE_BACKLOG, color="tab:green", drawstyle="steps-post"
        )
        ax_backlog.set_ylabel("samples")
        ax_backlog.legend(loc="best")
    else:
        _empty(ax_backlog, data.notes.get(PANEL_BACKLOG, "no data"))

    if has_data[ax_lead]:
        ax_lead.plot(xs(data.lead_time), ys(data.lead_time), label=LINE_LEAD_TIME, color="tab:purple")
        ax_lead.set_ylabel("seconds")
        ax_lead.legend(loc="best")
    else:
        _empty(ax_lead, data.notes.get(PANEL_LEAD_TIME, "no data"))

    if data.loss or data.val_loss:
        if data.loss:
            ax_loss.plot(steps_of(data.loss), ys(data.loss), label=LINE_LOSS, color="tab:blue")
        if data.val_loss:
            ax_loss.plot(steps_of(data.val_loss), ys(data.val_loss), "o", label=LINE_VAL_LOSS, color="tab:red")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.grid(True, alpha=0.3)
        ax_loss.legend(loc="best")
    else:
        _empty(ax_loss, data.notes.get(PANEL_LOSS, "no data"))

    if data.quarantined:
        reasons = list(data.quarantined)
        bars = ax_quarantine.bar(reasons, [data.quarantined[r] for r in reasons], color="tab:red")
        ax_quarantine.bar_label(bars)
        ax_quarantine.set_ylabel("inputs")
        ax_quarantine.tick_params(axis="x", labelrotation=20)
    else:
        _empty(ax_quarantine, data.notes.get(PANEL_QUARANTINE, "no data"))

    ax_summary.set_axis_off()
    ax_summary.text(
        0.0,
        1.0,
        "\n".join(_summary_lines(data)),
        transform=ax_summary.transAxes,
        va="top",
        ha="left",
        family="monospace",
        fontsize=9,
    )
    return fig


def steps_of(points: list[Point]) -> list[float]:
    """The steps (x values) of a loss curve."""
    return [s for s, _ in points]


def render_png(fig) -> bytes:
    """`fig` as PNG bytes (Agg: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's header."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def write_bytes(output: str, data: bytes) -> str:
    """Write `data` to `output` (a local path or fsspec URL; local: atomically). Returns the path written."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(output)
    except (ValueError, ImportError) as exc:
        raise MonitorError(f"--output {output}: cannot open this path or URL ({exc})") from None
    from fsspec.implementations.local import LocalFileSystem

    if fs.isdir(path):
        raise MonitorError(f"--output {output}: is a directory; expected the path of a .png file")
    try:
        if isinstance(fs, LocalFileSystem):
            path = os.path.abspath(path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            fs.pipe_file(path, data)
    except OSError as exc:
        raise MonitorError(f"--output {output}: cannot write it ({exc.strerror or exc})") from None
    return path


def default_output(run: str) -> str:
    return run.rstrip("/") + "/report.png"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(data: ReportData, output: str) -> dict:
    """Draw `data` and write the PNG to `output`; returns what ``qwenimage report`` prints."""
    if not matplotlib_available():
        raise MonitorError(
            "qwenimage report draws with matplotlib, which is not installed here (pip install matplotlib)"
        )
    png = render_png(build_figure(data))
    path = write_bytes(output, png)
    width, height = png_size(png)
    return {"output": path, "width": width, "height": height, "bytes": len(png), "panels": describe(data)}
