"""Every rank trains on the same data: snapshot pins decided once and shared, a per-step check.

Two gloo ranks start while a snapshot is published between their starts, and a grow cache gains
another mid-run. With the agreement the ranks read identical steps; without it they do not
(which is what the agreement is for, and shows the scenario is real).
"""

from __future__ import annotations

import pytest

from megatron_qwenimage.data.agreement import SingleProcess, plan_digest
from megatron_qwenimage.data.reader import CacheReader, ReaderConfig, ReaderError
from tests.consumers.reader_agreement_workers import STAGE, agreement_worker
from tests.helpers.consumers import spawn
from tests.helpers.reader import B16, payload, publish

STEPS = 8


def test_ranks_agree_on_pins_and_grow_repins(tmp_path):
    results = spawn(agreement_worker, 2, tmp_path / "out", str(tmp_path / "cache"), STEPS, True)
    assert results[0]["steps"] == results[1]["steps"]
    pins = [pin for pin, _ in results[0]["steps"]]
    assert pins[0] == 1  # rank 0's view at start, although rank 1 saw v2
    assert pins[-1] > 1  # the grow cache re-pinned at an epoch boundary, on both ranks alike


def test_without_agreement_the_same_start_splits_the_ranks(tmp_path):
    results = spawn(agreement_worker, 2, tmp_path / "out", str(tmp_path / "cache"), 2, False)
    assert results[0]["steps"][0][0] == 1 and results[1]["steps"][0][0] == 2


class _Disagreeing(SingleProcess):
    """Rank 0's view of the pins; a peer whose step hash differs."""

    def __init__(self, pins):
        self.pins = pins

    def broadcast(self, obj):
        return self.pins if isinstance(obj, dict) and set(obj) == set(self.pins) else obj

    def gather_int(self, value):
        if value in (0, 1, 2):  # the per-step load outcome (a digest is a 64-bit hash): both loaded
            return [value, value]
        return [value, value ^ 1]


def test_pins_come_from_rank_zero_and_a_step_mismatch_stops_the_reader(tmp_path):
    path = tmp_path / "c"
    publish(path, "p0", [payload(B16, 8, prefix="p0", seed=0)])
    publish(path, "p1", [payload(B16, 8, prefix="p1", seed=1)])  # v2: newest here
    cfg = ReaderConfig.from_dict({"caches": [{"path": str(path)}], "stages": [STAGE], "prefetch_steps": 0})
    with CacheReader(cfg, dp_rank=0, dp_size=1, agreement=_Disagreeing({"c": 1})) as reader:
        with pytest.raises(
            ReaderError,
            match=r"step 0: ranks disagree on the step's samples \(rank groups "
            r"\[\[0\], \[1\]\]; this rank: cache 'c' snapshot v1",
        ):
            reader.next_global_step()
        with pytest.raises(ReaderError, match="step 0: ranks disagree"):  # stays failed
            reader.next_global_step()


def test_plan_digest_names_the_samples(tmp_path):
    path = tmp_path / "c"
    publish(path, "p0", [payload(B16, 8, prefix="p0", seed=0)])
    cfg = ReaderConfig.from_dict({"caches": [{"path": str(path)}], "stages": [STAGE], "prefetch_steps": 0})
    with CacheReader(cfg, dp_rank=0, dp_size=1) as reader:
        reader.next_global_step()
        first = reader.last_step
        reader.next_global_step()
        second = reader.last_step
    assert plan_digest(first) == plan_digest(first) and plan_digest(first) != plan_digest(second)
