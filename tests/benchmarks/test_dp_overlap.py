"""Smoke test of benchmarks/dp_overlap.py: a tiny 2-rank gloo run, its JSON and the order evidence
(no timing assertions)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "dp_overlap.py"
BLOCKS, DEPTH = 3, 2


def _load():
    spec = importlib.util.spec_from_file_location("dp_overlap_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_json_smoke():
    argv = ["--ranks", "2", "--blocks", str(BLOCKS), "--dim", "64", "--tokens", "32", "--gather-depth", str(DEPTH)]
    argv += ["--iters", "2", "--warmup", "1", "--rounds", "1", "--json"]
    # Its own process: the ranks are spawned, which re-imports the script as the main module.
    out = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    records = {r["engine"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    assert set(records) == {"today", "new"}
    for name, r in records.items():
        assert r["ranks"] == 2 and r["blocks"] == BLOCKS and r["microbatches"] == 1
        assert 0.0 <= r["hidden_fraction"] <= 1.0, name
        assert len(r["hidden_fraction_per_rank"]) == 2
        assert all(0.0 <= f <= 1.0 for f in r["hidden_fraction_per_rank"])
        for key in ("step_s", "compute_s", "comm_s"):
            assert r[key] > 0, (name, key)
        assert r["step_ratio_to_today"] > 0
        assert isinstance(r["collectives_async"], bool) and isinstance(r["note"], str)
        assert r["order"]["reduce_scatters"] == BLOCKS and r["order"]["all_gathers"] == BLOCKS
    assert records["today"]["step_ratio_to_today"] == 1.0
    assert records["today"]["saved_vs_today_fraction"] == 0.0

    # Order: the new engine issues every unit's reduce-scatter during the backward and the gathers
    # beyond the first `DEPTH` during the next forward, waited by the forward hooks; today's
    # engine issues all of them in `step`.
    new, today = records["new"]["order"], records["today"]["order"]
    assert new["first_reduce_scatter_before_backward_end"] is True
    assert new["reduce_scatters_during_backward"] == BLOCKS
    assert new["all_gathers_during_step"] == DEPTH
    assert new["all_gathers_during_next_forward"] == BLOCKS - DEPTH
    assert new["units_waited_by_forward_hooks"] == BLOCKS
    assert today["first_reduce_scatter_before_backward_end"] is False
    assert today["reduce_scatters_during_backward"] == 0
    assert today["all_gathers_during_step"] == BLOCKS
    assert today["all_gathers_during_next_forward"] == 0
    assert today["units_waited_by_forward_hooks"] == 0


def test_hidden_fraction_and_arguments():
    bench = _load()
    assert bench.hidden_fraction(compute=1.0, comm=1.0, step=1.5) == pytest.approx(0.5)
    assert bench.hidden_fraction(compute=1.0, comm=1.0, step=2.5) == 0.0  # slower than both in turn
    assert bench.hidden_fraction(compute=1.0, comm=1.0, step=0.5) == 1.0  # faster than compute alone
    assert bench.hidden_fraction(compute=1.0, comm=0.0, step=1.0) == 0.0
    with pytest.raises(SystemExit, match="--ranks must be >= 2"):
        bench.main(["--ranks", "1"])
    with pytest.raises(SystemExit, match="--warmup must be >= 1"):
        bench.main(["--warmup", "0"])
