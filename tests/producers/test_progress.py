"""The producer's progress: a bar on a terminal, whole plain lines anywhere else."""

from __future__ import annotations

import io

from producers.metrics import ProducerCounts
from producers.progress import ProducerProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _counts(**kw) -> ProducerCounts:
    base = dict(inputs=40, read=30, encoded=28, committed=25, duplicates=2, quarantined={"corrupt_image": 1})
    base.update(kw)
    return ProducerCounts(**base)


def test_not_a_terminal_prints_whole_lines_at_intervals_and_at_the_end():
    out = io.StringIO()
    with ProducerProgress(stream=out, line_interval_s=3600) as progress:
        progress.update(_counts())
        progress.update(_counts(committed=26))  # within the interval: no second line
        progress.update(_counts(committed=37))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("produce: 28/40 inputs | read 30 · encoded 28 · committed 25 · dup 2 · quarantined 1 |")
    assert lines[-1].startswith("produce: 40/40 inputs |") and "committed 37" in lines[-1]
    assert "…" not in out.getvalue() and "\x1b" not in out.getvalue()  # no cut columns, no escape codes


def test_a_terminal_gets_the_bar_and_disabled_draws_nothing():
    tty = _Tty()
    with ProducerProgress(stream=tty) as progress:
        assert progress.bar
        progress.update(_counts())
    assert "produce" in tty.getvalue()
    quiet = io.StringIO()
    with ProducerProgress(enabled=False, stream=quiet) as progress:
        progress.update(_counts())
    assert quiet.getvalue() == ""
