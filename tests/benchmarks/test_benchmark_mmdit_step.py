"""Smoke test of benchmarks/mmdit_step.py (correctness of its plumbing, no timing assertions)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "mmdit_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("mmdit_step_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_json_smoke(capsys):
    bench = _load()
    argv = [
        "--config",
        "tiny-16ch",
        "--patches",
        "4",
        "6",
        "--text-tokens",
        "8",
        "--batch",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--peak-tflops",
        "1",
        "--json",
    ]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ratio"] > 0
    assert result["image_tokens"] == 24 and result["batch"] == 2
    assert result["max_abs_diff_forward"] < 1e-4  # same weights, same math
    for name in ("ours", "diffusers"):
        assert result[name]["image_tokens_per_s"] > 0
        assert result[name]["mfu"] > 0
    from megatron_qwenimage.accounting import model_flops_per_sample
    from megatron_qwenimage.config import load_config

    assert result["model_flops_per_sample"] == model_flops_per_sample(load_config("tiny-16ch"), 24, 8)


def test_benchmark_rejects_conflicting_sizes():
    bench = _load()
    with pytest.raises(SystemExit, match="either --patches"):
        bench.main(["--patches", "4", "4", "--height", "64", "--width", "64"])
    with pytest.raises(Exception, match="height=100"):
        bench.main(["--height", "100", "--width", "64"])
