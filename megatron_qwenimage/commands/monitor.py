"""``qwenimage monitor`` and ``qwenimage report``: watch a run, or draw it, from its files only.

Both read the cache's commit records, ``status.json`` and producer telemetry and the run
directory's ``metrics.jsonl`` and ``run.json`` through fsspec, so they work from any machine that
can read those paths (local disk, ``file://``, object stores), on a running or a finished run::

    qwenimage monitor --cache /data/cache --run runs/exp1          # live view, every 2 s
    qwenimage monitor --run runs/exp1 --once --json                # one JSON snapshot
    qwenimage report runs/exp1                                     # runs/exp1/report.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from megatron_qwenimage.errors import UserError


def _positive_float(flag: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag} {value:g}: expected a positive number of seconds")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``monitor`` and ``report`` subcommands to the ``qwenimage`` parser."""
    p = subparsers.add_parser(
        "monitor",
        help="Watch a producer/consumer run live from its files (rates, backlog, lead time, ETA).",
        description=(
            "A live view of a run: producer images/s (per bucket), text tokens/s, stage busy fractions, "
            "encoder utilisation, committed/duplicate/quarantined counts; consumer samples/s, image tokens/s, "
            "TFLOP/s per GPU, MFU, data wait, step and loss; the backlog (committed minus consumed samples), "
            "the lead time (backlog / consumer samples/s) and ETAs. It reads only files (local paths or fsspec "
            "URLs), so it works from another machine and on a finished run. Not a terminal: one line per refresh."
        ),
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="CACHE",
        help="the latent cache the producer writes (default: the cache named by RUN/run.json, if any)",
    )
    p.add_argument(
        "--run",
        default=None,
        metavar="RUN",
        help="the training run directory (the train config's logging.dir, holding metrics.jsonl)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between refreshes (default: %(default)s)",
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON: with --once exactly one object, otherwise one object per line per refresh",
    )
    p.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="stop after N refreshes (default: until Ctrl-C)",
    )
    p.set_defaults(func=run_monitor)

    r = subparsers.add_parser(
        "report",
        help="Draw a PNG report of a run: rates, backlog, lead time, loss, quarantine reasons.",
        description=(
            "Renders RUN's logs as one PNG (matplotlib, no display needed): producer images/s and consumer "
            "samples/s on a shared wall-clock axis, backlog and lead time over time, the loss curve with "
            "validation points, and quarantined inputs by reason. A missing piece is an empty panel saying why."
        ),
    )
    r.add_argument("run", metavar="RUN", help="the training run directory (holding metrics.jsonl)")
    r.add_argument(
        "--cache",
        default=None,
        metavar="CACHE",
        help="the latent cache the run read (default: the cache named by RUN/run.json, if any)",
    )
    r.add_argument("--output", default=None, metavar="PNG", help="where to write the PNG (default: RUN/report.png)")
    r.set_defaults(func=run_report)


def run_monitor(args: argparse.Namespace) -> int:
    """Entry point of ``qwenimage monitor``."""
    from megatron_qwenimage.monitor.snapshot import Monitor

    if args.cache is None and args.run is None:
        raise UserError("expected --cache CACHE and/or --run RUN (the run directory, holding metrics.jsonl)")
    interval = _positive_float("--interval", args.interval)
    if args.count is not None and args.count < 1:
        raise UserError(f"--count {args.count}: expected a positive number of refreshes")
    monitor = Monitor(args.cache, args.run)
    if args.once:
        _print_once(monitor.poll(), as_json=args.json)
        return 0
    try:
        _follow(monitor, interval, args.count, as_json=args.json)
    except KeyboardInterrupt:  # Ctrl-C is how a live view ends
        pass
    return 0


def _print_once(snap, *, as_json: bool) -> None:
    from megatron_qwenimage.monitor import view

    if as_json:
        print(json.dumps(snap.to_dict(), sort_keys=True, allow_nan=False))
    elif sys.stdout.isatty():
        from rich.console import Console

        console = Console()
        console.print(view.renderable(snap, width=console.width))
    else:
        print(view.plain(snap))


def _follow(monitor, interval: float, count: int | None, *, as_json: bool) -> None:
    """Refresh every `interval` s: a rich live panel on a terminal, else one line (or JSON object)
    per refresh. A refresh that fails after the first (a file replaced or unreachable meanwhile)
    keeps the previous snapshot on screen, says why, and is retried at the next refresh."""
    from megatron_qwenimage.monitor import view

    state = {"snap": None, "error": None}

    def refresh() -> None:
        try:
            state["snap"], state["error"] = monitor.poll(), None
        except (UserError, OSError) as exc:
            if state["snap"] is None:
                raise
            state["error"] = " ".join(str(exc).split()) or type(exc).__name__

    polls = 0
    if sys.stdout.isatty() and not as_json:
        from rich.console import Console
        from rich.live import Live

        console = Console()
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                refresh()
                live.update(view.renderable(state["snap"], state["error"], console.width), refresh=True)
                polls += 1
                if count is not None and polls >= count:
                    return
                time.sleep(interval)
    while True:
        refresh()
        if as_json:
            obj = state["snap"].to_dict()
            if state["error"]:
                obj["refresh_error"] = state["error"]
            print(json.dumps(obj, sort_keys=True, allow_nan=False), flush=True)
        else:
            out = view.line(state["snap"])
            if state["error"]:
                out += f" refresh_error={json.dumps(state['error'])}"
            print(out, flush=True)
        polls += 1
        if count is not None and polls >= count:
            return
        time.sleep(interval)


def run_report(args: argparse.Namespace) -> int:
    """Entry point of ``qwenimage report``."""
    from megatron_qwenimage.monitor.report import default_output, load_report, write_report

    data = load_report(args.run, args.cache)
    info = write_report(data, args.output or default_output(args.run))
    print(f"wrote {info['output']} ({info['width']}x{info['height']} px, {info['bytes']:,} bytes):")
    for panel, what in info["panels"].items():
        print(f"  {panel}: {what}")
    return 0
