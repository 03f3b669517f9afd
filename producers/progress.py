"""Progress of a producer run: inputs done (committed + duplicate + quarantined) of all.

On a terminal, a rich progress bar; otherwise (a log file, a pipe, CI) one plain line every
`line_interval_s` seconds and a last one at the end, never a bar cut to the width of a console
that is not there.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_detail(counts) -> str:
    """``read 16 · encoded 16 · committed 12 · dup 0 · quarantined 1`` of a `ProducerCounts`."""
    return (
        f"read {counts.read} · encoded {counts.encoded} · committed {counts.committed} · "
        f"dup {counts.duplicates} · quarantined {counts.quarantined_total}"
    )


class ProducerProgress:
    """Context manager; `update(counts)` redraws (or prints a line). Draws on `stream` (stderr).

    Args:
        enabled: False draws nothing. line_interval_s: seconds between plain lines (not a tty).
        stream: where to draw; its ``isatty()`` picks the bar or the lines.
    """

    def __init__(self, enabled: bool = True, *, line_interval_s: float = 10.0, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.line_interval_s = line_interval_s
        self.bar = enabled and self.stream.isatty()
        self._progress = None
        self._task = None
        self._started = time.monotonic()  # the run's clock, not the first update's
        self._last_line = 0.0
        self._last_counts = None

    def __enter__(self) -> ProducerProgress:
        if self.bar:
            self._progress = Progress(
                TextColumn("[bold]produce"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("produce", total=None, detail="listing inputs", rate="")
        return self

    def update(self, counts) -> None:
        if not self.enabled:
            return
        self._last_counts = counts
        done = counts.committed + counts.duplicates + counts.quarantined_total
        if self._progress is not None:
            speed = self._progress.tasks[0].speed or 0.0
            self._progress.update(
                self._task,
                total=counts.inputs or None,
                completed=done,
                detail=progress_detail(counts),
                rate=f"{speed:.1f} img/s",
            )
            return
        now = time.monotonic()
        if now - self._last_line >= self.line_interval_s:
            self._print_line(counts, now)

    def _print_line(self, counts, now: float) -> None:
        self._last_line = now
        done = counts.committed + counts.duplicates + counts.quarantined_total
        elapsed = max(now - self._started, 1e-9)
        print(
            f"produce: {done}/{counts.inputs} inputs | {progress_detail(counts)} | {done / elapsed:.1f} img/s | "
            f"{elapsed:.0f} s",
            file=self.stream,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
        elif self.enabled and self._last_counts is not None:
            self._print_line(self._last_counts, time.monotonic())
