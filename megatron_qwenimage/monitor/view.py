"""How ``qwenimage monitor`` shows a `MonitorSnapshot`: a rich panel (live or ``--once`` on a
terminal), plain text (``--once`` into a pipe or file) and one compact line per refresh (a live
monitor whose output is not a terminal). Every value that a file did not provide is ``n/a``.
"""

from __future__ import annotations

import time

from megatron_qwenimage.monitor.snapshot import MonitorSnapshot

NA = "n/a"


# --- formatting -----------------------------------------------------------------------------------
def fmt_float(x: float | None) -> str:
    """A rate or loss with as many digits as matter: 12,345 / 123.4 / 12.35 / 0.0123."""
    if x is None:
        return NA
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a == 0:
        return "0"
    return f"{x:.3g}"


def fmt_loss(x: float | None) -> str:
    return NA if x is None else f"{x:.4f}"


def fmt_int(n: int | None) -> str:
    return NA if n is None else f"{n:,}"


def fmt_pct(f: float | None) -> str:
    return NA if f is None else f"{100 * f:.1f}%"


def fmt_duration(s: float | None) -> str:
    """45s, 2m10s, 1h02m, 3d04h; negative durations keep their sign."""
    if s is None:
        return NA
    if s < 0:
        return "-" + fmt_duration(-s)
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return NA
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def fmt_map(d: dict | None, fmt=fmt_float, empty: str = "none") -> str:
    """``a 1.2, b 3.4`` (n/a for None, `empty` for an empty mapping)."""
    if d is None:
        return NA
    if not d:
        return empty
    return ", ".join(f"{k} {fmt(v)}" for k, v in d.items())


def fmt_when(ts: float | None, now: float) -> str:
    if ts is None:
        return NA
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f"{stamp} ({fmt_duration(max(0.0, now - ts))} ago)"


def _state(state: str | None, stale: bool, age_s: float | None) -> str:
    if state is None:
        return NA
    if stale:
        return f"{state}, but no update for {fmt_duration(age_s)} (stopped?)"
    return state


# --- sections: (title, [(label, value)]) shared by every mode -------------------------------------
def sections(snap: MonitorSnapshot) -> list[tuple[str, list[tuple[str, str]]]]:
    """The snapshot as titled lists of ``(label, value)`` rows."""
    now = snap.time_unix
    out: list[tuple[str, list[tuple[str, str]]]] = []
    p, c, k = snap.producer, snap.consumer, snap.commits

    if not p.present:
        out.append(("Producer", [("cache", "none given (--cache)")]))
    elif not p.started:
        out.append(("Producer", [("state", "waiting: no status.json in the cache yet")]))
    else:
        buckets = p.bucket_images_per_s
        if buckets:
            buckets_text = ", ".join(f"{b} {fmt_float(r)}/s" for b, r in buckets.items())
        else:
            buckets_text = fmt_map(buckets)
        quarantined = sum(p.quarantined.values()) if p.quarantined is not None else None
        images = fmt_float(p.images_per_s) + (" (from history)" if p.images_per_s_source == "history" else "")
        out.append(
            (
                "Producer",
                [
                    ("state", f"{_state(p.state, p.stale, p.age_s)}, run {p.run_id or NA}"),
                    ("updated", fmt_when(p.updated_unix, now)),
                    ("images/s", f"{images}   run average {fmt_float(p.committed_per_s_avg)}"),
                    ("per bucket", buckets_text),
                    ("text tokens/s", fmt_float(p.text_tokens_per_s)),
                    ("stage busy", fmt_map(p.stage_busy, fmt_pct)),
                    (
                        "encoders",
                        f"utilisation {fmt_map(p.encoder_utilization, fmt_pct)}; "
                        f"alive actors {fmt_map(p.actors, fmt_int)}"
                        + (
                            f"; pools {fmt_map(p.pool_bounds, str)}"
                            + (f" (autoscaler v{p.pool_control_version})" if p.pool_control_version else "")
                            if p.pool_bounds
                            else ""
                        ),
                    ),
                    (
                        "this run",
                        f"inputs {fmt_int(p.inputs)}, committed {fmt_int(p.committed)}, "
                        f"duplicates {fmt_int(p.duplicates)}, quarantined {fmt_int(quarantined)}, "
                        f"remaining {fmt_int(p.remaining_inputs)}",
                    ),
                    ("ETA", fmt_duration(p.eta_s)),
                ],
            )
        )

    if k is not None:
        rows = [
            (
                "committed",
                f"{fmt_int(k.committed_samples)} samples ({fmt_int(k.committed_inputs)} inputs) "
                f"in {fmt_int(k.partitions)} partitions, snapshot "
                + (NA if k.snapshot_version is None else f"v{k.snapshot_version}"),
            ),
            ("per bucket", fmt_map(k.buckets, fmt_int)),
            ("duplicates", fmt_int(k.duplicates)),
            ("quarantined", fmt_int(sum(k.quarantined.values()))),
        ]
        rows += [(f"  {reason}", fmt_int(n)) for reason, n in k.quarantined.items()]
        if k.unreadable_records:
            rows.append(("unreadable", f"{len(k.unreadable_records)} commit records"))
        out.append(("Cache (commit records)", rows))

    if not c.present:
        out.append(("Consumer", [("run", "none given (--run)")]))
    elif not c.started:
        out.append(("Consumer", [("state", "waiting: no records in metrics.jsonl yet")]))
    else:
        val = NA if c.val_loss is None else f"{fmt_loss(c.val_loss)} at step {fmt_int(c.val_step)}"
        consumed = fmt_int(c.consumed_samples)
        if c.consumed_source == "step*global_batch":
            consumed += " (step x global batch)"
        samples = fmt_float(c.samples_per_s) + (" (from history)" if c.samples_per_s_source == "history" else "")
        step_time = NA if c.step_time_s is None else f"{c.step_time_s * 1000:.0f} ms"
        out.append(
            (
                "Consumer",
                [
                    ("state", _state(c.state, c.stale, c.age_s)),
                    ("updated", fmt_when(c.updated_unix, now)),
                    ("step", f"{fmt_int(c.step)} / {fmt_int(c.train_steps)}   step time {step_time}"),
                    ("loss", f"{fmt_loss(c.loss)}   val {val}"),
                    ("samples/s", samples),
                    ("image tokens/s", fmt_float(c.image_tokens_per_s)),
                    ("TFLOP/s/GPU", f"{fmt_float(c.tflops_per_gpu)}   MFU {fmt_pct(c.mfu)}"),
                    ("data wait", fmt_pct(c.data_wait_fraction)),
                    ("consumed", f"{consumed} samples"),
                    ("ETA", fmt_duration(c.eta_s)),
                ],
            )
        )

    out.append(
        (
            "Pipeline",
            [
                ("backlog", f"{fmt_int(snap.backlog_samples)} samples (committed - consumed)"),
                ("lead time", fmt_duration(snap.lead_time_s) + " (backlog / consumer samples/s)"),
            ],
        )
    )
    if snap.warnings:
        out.append(("Warnings", [("", w) for w in snap.warnings]))
    return out


def title(snap: MonitorSnapshot) -> str:
    parts = ["qwenimage monitor"]
    if snap.run_label:
        parts.append(f"run {snap.run_label}")
    if snap.run_state:
        parts.append(f"({snap.run_state})")
    parts.append(time.strftime("%H:%M:%S", time.localtime(snap.time_unix)))
    return " ".join(parts)


def plain(snap: MonitorSnapshot) -> str:
    """Plain text, one ``label: value`` per line (``--once`` into a pipe or a file)."""
    lines = [title(snap)]
    if snap.cache:
        lines.append(f"cache: {snap.cache}")
    if snap.run:
        lines.append(f"run: {snap.run}")
    for name, rows in sections(snap):
        lines.append(f"{name}:")
        for label, value in rows:
            lines.append(f"  {label}: {value}" if label else f"  {value}")
    return "\n".join(lines)


def renderable(snap: MonitorSnapshot, error: str | None = None, width: int | None = None):
    """A rich renderable of the snapshot (a panel of small tables, producer and cache beside consumer
    and pipeline when `width` allows); `error`: why the newest refresh failed (shown above the
    previous snapshot)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    def table(name: str, rows: list[tuple[str, str]]) -> Table:
        t = Table(
            title=name,
            title_justify="left",
            title_style="bold yellow" if name == "Warnings" else "bold cyan",
            show_header=False,
            box=None,
            padding=(0, 1),
        )
        t.add_column("what", style="dim", no_wrap=True)
        t.add_column("value", overflow="fold")
        for label, value in rows:
            t.add_row(escape(label), escape(value))
        return t

    head = []
    if error:
        head.append(f"[bold red]refresh failed, retrying:[/] {escape(error)}")
    where = "   ".join(f"{k}: {escape(v)}" for k, v in (("cache", snap.cache), ("run", snap.run)) if v)
    if where:
        head.append(f"[dim]{where}[/]")
    left, right = [], []
    for name, rows in sections(snap):
        side = left if name.startswith(("Producer", "Cache")) else right
        side.append(table(name, rows))
    if width is not None and width >= 120:
        grid = Table.grid(expand=True, padding=(0, 2))
        grid.add_column(ratio=1)
        grid.add_column(ratio=1)
        grid.add_row(Group(*left), Group(*right))
        body = [grid]
    else:
        body = left + right
    return Panel(Group(*head, *body), title=escape(title(snap)), title_align="left")


def _compact(x: float | None) -> str:
    """A number without thousands separators (``key=value`` lines are parsed by scripts)."""
    return fmt_float(x).replace(",", "")


def line(snap: MonitorSnapshot) -> str:
    """One compact ``key=value`` line (a live monitor writing to a pipe or a file)."""
    p, c = snap.producer, snap.consumer
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(snap.time_unix))
    fields = [stamp]
    if p.present:
        q = sum(snap.quarantined.values()) if snap.quarantined is not None else None
        committed = snap.commits.committed_samples if snap.commits is not None else None
        fields += [
            f"producer={'stale' if p.stale else p.state or 'waiting'}",
            f"images/s={_compact(p.images_per_s)}",
            f"text_tokens/s={_compact(p.text_tokens_per_s)}",
            f"committed={committed if committed is not None else NA}",
            f"quarantined={q if q is not None else NA}",
            f"producer_eta={fmt_duration(p.eta_s)}",
        ]
    if c.present:
        step = NA if c.step is None else str(c.step)
        if c.train_steps is not None:
            step += f"/{c.train_steps}"
        fields += [
            f"consumer={'stale' if c.stale else c.state or 'waiting'}",
            f"step={step}",
            f"samples/s={_compact(c.samples_per_s)}",
            f"image_tokens/s={_compact(c.image_tokens_per_s)}",
            f"loss={fmt_loss(c.loss)}",
            f"mfu={fmt_pct(c.mfu)}",
            f"consumer_eta={fmt_duration(c.eta_s)}",
        ]
    fields += [
        f"backlog={snap.backlog_samples if snap.backlog_samples is not None else NA}",
        f"lead_time={fmt_duration(snap.lead_time_s)}",
    ]
    if snap.warnings:
        fields.append(f"warnings={len(snap.warnings)}")
    return " ".join(fields)
