"""What ``qwenimage run`` shows: the monitor's view of both sides while they run, then a summary.

The view is `megatron_qwenimage.monitor` reading the run's own files (the cache's commit records
and producer telemetry, the run's ``metrics.jsonl``), exactly what ``qwenimage monitor`` shows
from another machine. On a terminal it is one rich live panel; otherwise one ``key=value`` line
per `interval_s` (never a bar cut to a console width that is not there).
"""

from __future__ import annotations

import sys
import time

from launch.run_config import RunSpec
from megatron_qwenimage.errors import UserError


class RunView:
    """The live view of a `RunSpec`'s run (`LocalRun` calls `update` about once a second).

    Args:
        spec: the run. live: a rich live panel (a terminal) instead of lines.
        interval_s: seconds between lines (line mode). stream: where to draw.
    """

    def __init__(self, spec: RunSpec, *, live: bool, interval_s: float = 5.0, stream=None) -> None:
        self.spec = spec
        self.live = live
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stdout
        self._monitor = None
        self._live = None
        self._console = None
        self._last_line = 0.0
        self._snap = None

    def _poll(self):
        from megatron_qwenimage.monitor.snapshot import Monitor

        if self._monitor is None:
            try:  # the cache exists once the producer has checked its input and created it
                self._monitor = Monitor(self.spec.cache, self.spec.run_dir)
            except UserError:
                return None
        try:
            self._snap = self._monitor.poll()
        except (UserError, OSError):
            pass  # a file replaced between list and read: the previous snapshot stays, next poll retries
        return self._snap

    def update(self, *, producer_alive: bool, consumer_alive: bool) -> None:
        from megatron_qwenimage.monitor import view

        now = time.monotonic()
        if not self.live and now - self._last_line < self.interval_s:
            return
        snap = self._poll()
        sides = f"producer {'running' if producer_alive else 'done'}, consumer {'running' if consumer_alive else 'not started'}"
        if self.live:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            if self._live is None:
                self._console = Console(file=self.stream)
                self._live = Live(console=self._console, auto_refresh=False, transient=False)
                self._live.__enter__()
            body = view.renderable(snap, None, self._console.width) if snap is not None else Text(f"starting: {sides}")
            self._live.update(body, refresh=True)
            return
        self._last_line = now
        text = view.line(snap) if snap is not None else f"{time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {sides}"
        print(f"run {self.spec.name}: {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None

    def print_summary(self, summary: dict) -> None:
        """Where the outputs are and what they hold, one line each."""
        cache = summary["cache"]
        buckets = ", ".join(f"{k} {v}" for k, v in sorted(cache["per_bucket"].items()))
        lines = [
            f"run {summary['run']} finished: step {summary['final_step']}, loss {summary['final_loss']:.4f}"
            if summary.get("final_loss") is not None
            else f"run {summary['run']} finished",
            f"  cache       {cache['path']}: snapshot v{cache['snapshot']}, {cache['samples']} samples ({buckets})",
            f"  checkpoint  {summary['checkpoint'] or 'none'}",
            f"  diffusers   {summary['diffusers_export'] or 'none'}",
            f"  metrics     {summary['metrics'] or 'none'}",
        ]
        if summary.get("report"):
            lines.append(f"  report      {summary['report']}")
        lines += [
            f"  logs        {summary['logs']}",
            f"  watch again: qwenimage monitor --run {summary['run_dir']} --once",
        ]
        print("\n".join(lines), file=self.stream, flush=True)


def render_report(spec: RunSpec) -> str:
    """Render ``run_dir/report.png`` from the run's records; returns its path."""
    from megatron_qwenimage.monitor.report import default_output, load_report, write_report

    return write_report(load_report(spec.run_dir, spec.cache), default_output(spec.run_dir))["output"]
