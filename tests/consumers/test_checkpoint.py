"""Must show: save at TP2·PP2, resume at TP1·DP4 as HSDP (two shard pairs) with ZeRO-3 (and the reverse): the resumed run's full training
state equals the uninterrupted run's; a corrupted or partial checkpoint is refused and the previous
one is used.

The runs leave the adaLN-Zero init (`perturb_zero_init`) and keep an EMA, so every parameter and
every optimizer-state tensor moves; rank 0 compares each of them (param, fp32 master, exp_avg,
exp_avg_sq, EMA) by canonical name. Right after a load the state must be bit-identical to the one
saved (a dropped, misplaced or mis-sharded key, e.g. an EMA not saved or a TP shard loaded on the
wrong rank, differs there), and within the layout tests' fp32 tolerance of the uninterrupted run;
after the remaining step still within that tolerance (e.g. an optimizer step count or Adam moments
not restored would show there, while the loss of that step alone would not).
"""

from __future__ import annotations

import pytest

from tests.consumers.ckpt_workers import reshard_worker
from tests.helpers.consumers import OPT_KINDS, spawn

#: (label, compared to) of the state comparisons the worker makes on rank 0.
CHECKS = ("b_loaded", "b_step2", "a_loaded_exact", "a_loaded", "a_step3", "fallback_loaded")


def test_reshard_resume_and_refuse_corrupt(tmp_path):
    results = spawn(reshard_worker, 4, tmp_path / "out", str(tmp_path / "ckpt"))
    assert sorted(results) == [0, 1, 2, 3]
    for rank, r in results.items():
        u = r["uninterrupted"]
        assert r["resumed_b"] == pytest.approx([u[2]], abs=1e-6), rank
        assert r["resumed_a"] == pytest.approx([u[3]], abs=1e-6), rank
        assert r["fallback_step"] == 2, rank
        assert any("step_00000009" in m and "COMMITTED" in m for m in r["refused"]), r["refused"]
        assert any("step_00000004" in m and "sha256" in m for m in r["refused"]), r["refused"]
    checks = results[0]["checks"]
    assert sorted(checks) == sorted(CHECKS)
    for label in CHECKS:
        c = checks[label]
        assert c["kinds"] == sorted(("param", *OPT_KINDS)), (label, c["kinds"])
        assert len(c["compared"]) > 50, (label, len(c["compared"]))  # every trainable tensor, by name
        assert not c["mismatches"], (label, dict(list(c["mismatches"].items())[:10]), c["worst"])
        assert set(c["worst"]) == set(c["kinds"]), (label, c["worst"])
