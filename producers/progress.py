"""Rich progress bar of a producer run: inputs done (committed + duplicate + quarantined) of all."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProducerProgress:
    """Context manager; `update(counts)` redraws. Draws on stderr, only when enabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> ProducerProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]produce"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("produce", total=None, detail="listing inputs", rate="")
        return self

    def update(self, counts) -> None:
        if self._progress is None:
            return
        done = counts.committed + counts.duplicates + counts.quarantined_total
        task = self._progress.tasks[0]
        speed = task.speed or 0.0
        detail = (
            f"read {counts.read} · encoded {counts.encoded} · committed {counts.committed} · "
            f"dup {counts.duplicates} · quarantined {counts.quarantined_total}"
        )
        self._progress.update(
            self._task, total=counts.inputs or None, completed=done, detail=detail, rate=f"{speed:.1f} img/s"
        )

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
