"""Must show: `consumers.train.validate` works under pipeline parallelism (1F1B needs >= pp
micro-batches per schedule call, interleaved a count that divides into rounds; validation calls
have any count) and gives the single-process numbers: single process, PP2, PP2·DP2, TP2·PP2·SP
and interleaved PP2·VPP2 and PP2·VPP2·DP2, every rank's `val_loss` and `val_loss_by_sigma` within 1e-5 of a
plain single-process model evaluating every held-out micro-batch.

The held-out set (two buckets x t2i/edit, 7 samples each in micro-batches of 2) gives each
(bucket, task) a shape group of 3 micro-batches (> pp, not a multiple of pp) and one of 1 (< pp);
under DP2 the replicas hold different groups (replica 0: four calls of 2 micro-batches; replica 1:
eight calls of 1), so their pipeline calls differ and meet only in the DP sum.
"""

from __future__ import annotations

import pytest

from tests.consumers.validation_workers import SIGMAS, STEP, validation_worker
from tests.helpers.consumers import spawn
from tests.helpers.reader import B16, B32, make_cache

TOL = dict(abs=1e-5, rel=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three gloo worlds: 1 rank (reference + single-process validate), 2 ranks (PP2,
    PP2·VPP2), 4 ranks (PP2·DP2, TP2·PP2·SP, PP2·VPP2·DP2)."""
    root = tmp_path_factory.mktemp("validation")
    cache = make_cache(root / "val", partitions=1, per_bucket={B16: 14, B32: 14}, edit=7)
    return {
        1: spawn(validation_worker, 1, root / "w1", cache, ["single"], True),
        2: spawn(validation_worker, 2, root / "w2", cache, ["pp2", "pp2_vpp2"]),
        4: spawn(validation_worker, 4, root / "w4", cache, ["pp2_dp2", "tp2_pp2_sp", "pp2_vpp2_dp2"]),
    }


def test_reference_is_not_trivial(runs):
    ref = runs[1][0]["reference"]
    assert ref["micro_batches"] == 16 and ref["samples"] == 28
    by = ref["by_sigma"]
    assert len(set(by)) == len(by) and all(v > 0 for v in by)  # σ changes the loss


def test_groups_exercise_short_and_odd_calls(runs):
    """The PP runs have schedule calls with fewer micro-batches than pp and with a count that is
    no multiple of pp; the DP replicas' call sequences differ."""
    for name in ("pp2", "pp2_vpp2"):
        assert runs[2][0][name]["group_sizes"] == [3, 1] * 4, name
    sizes = {r: res["pp2_dp2"]["group_sizes"] for r, res in runs[4].items()}
    by_dp = {runs[4][r]["pp2_dp2"]["dp_rank"]: s for r, s in sizes.items()}
    assert by_dp == {0: [2] * 4, 1: [1] * 8}, by_dp
    assert {
        runs[4][r]["pp2_vpp2_dp2"]["dp_rank"]: res["pp2_vpp2_dp2"]["group_sizes"] for r, res in runs[4].items()
    } == by_dp


@pytest.mark.parametrize(
    "world,name", [(1, "single"), (2, "pp2"), (4, "pp2_dp2"), (4, "tp2_pp2_sp"), (2, "pp2_vpp2"), (4, "pp2_vpp2_dp2")]
)
def test_validation_matches_single_process(runs, world, name):
    ref = runs[1][0]["reference"]
    assert sorted(runs[world]) == list(range(world))
    for rank, res in runs[world].items():
        got = res[name]
        assert got["step"] == STEP
        assert got["by_sigma"] == pytest.approx(ref["by_sigma"], **TOL), (name, rank, SIGMAS)
        assert got["val_loss"] == pytest.approx(ref["val_loss"], **TOL), (name, rank)
        assert got["again"] == got["by_sigma"], (name, rank)  # deterministic, cached schedules
