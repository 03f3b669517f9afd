"""Must show: with the same global batch, the first K steps' losses of (TP2, PP2), (DP2, TP2) and
(PP2, DP2) runs (and interleaved PP2·VPP2·DP2) equal a single-process run (fp32, <= 1e-5)."""

from __future__ import annotations

import pytest

from consumer_helpers import spawn
from layout_workers import LAYOUTS, layouts_worker

STEPS = 3


def test_layouts_match_single_process(tmp_path):
    results = spawn(layouts_worker, 4, tmp_path, STEPS, list(LAYOUTS))
    ref = results[0]["reference"]
    assert len(ref["loss"]) == STEPS
    assert ref["loss"][0] != ref["loss"][-1]  # the run moves
    for name in LAYOUTS:
        for rank, res in results.items():
            got = res[name]
            assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5, rel=1e-5), (name, rank)
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], abs=1e-5, rel=1e-5), (name, rank)
