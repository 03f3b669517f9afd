"""Smoke test of benchmarks/optimizer_step.py (its plumbing and JSON; no timing assertions)."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "optimizer_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("optimizer_step_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_json_smoke(capsys):
    bench = _load()
    assert bench.main(["--params", "200000", "--iters", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("new_median_s", "naive_median_s", "ratio", "params", "tensors"):
        assert result[key] > 0, key
    assert 100_000 < result["params"] < 400_000
    assert result["max_abs_diff_params"] < 1e-2  # the two optimizers make the same update (bf16 rounding)
