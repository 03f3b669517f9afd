"""Must show: save at TP2·PP2, resume at TP1·DP4 (and the reverse): the next step's loss equals the
uninterrupted run's; a corrupted or partial checkpoint is refused and the previous one is used."""

from __future__ import annotations

import pytest

from ckpt_workers import reshard_worker
from consumer_helpers import spawn


def test_reshard_resume_and_refuse_corrupt(tmp_path):
    results = spawn(reshard_worker, 4, tmp_path / "out", str(tmp_path / "ckpt"))
    for rank, r in results.items():
        u = r["uninterrupted"]
        assert r["resumed_b"] == pytest.approx([u[2]], abs=1e-6), rank
        assert r["resumed_a"] == pytest.approx([u[3]], abs=1e-6), rank
        assert r["fallback_step"] == 2, rank
        assert any("step_00000009" in m and "COMMITTED" in m for m in r["refused"]), r["refused"]
        assert any("step_00000004" in m and "sha256" in m for m in r["refused"]), r["refused"]
