"""The GPU benchmark scripts (benchmarks/gpu/) run every code path on CPU at toy sizes.

They run for real on one GPU through benchmarks/gpu/device.sh; here they must not crash, must
write the records the docs quote, and must say why each GPU-only variant was skipped. No timing
is asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gpu_run_records_every_variant_on_cpu(tmp_path):
    out = tmp_path / "gpu.jsonl"
    proc = _run("run.py", "--tiny", "--skip-compile", "--te-standin-local", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    by = {}
    for r in records:
        by.setdefault((r["what"], r.get("variant"), r.get("shape")), r)
    errors = [r for r in records if "error" in r]
    assert not errors, errors
    eager = by[("step", "diffusers_eager", "64px_b2_t16")]
    for key in ("step_ms", "fwd_bwd_ms", "img_tokens_per_s", "model_tflops"):
        assert eager[key] > 0
    assert math.isfinite(eager["loss"])
    # The TE variants' code path (run with the local stand-in): unpadded and padded text.
    for variant in ("ours_te_bf16", "ours_te_fp8_delayed"):
        for shape in ("64px_b2_t16", "64px_b2_t16+pad4"):
            assert by[("step", variant, shape)]["step_ms"] > 0
    parity = by[("parity", "ours_te_bf16", next(k[2] for k in by if k[:2] == ("parity", "ours_te_bf16")))]
    assert parity["finite"] and parity["rel_l2"] < 1e-5  # fp32, weights copied before any step
    opt = next(r for r in records if r["what"] == "optimizer")
    assert opt["optimizer_ms"] > 0 and 0 < opt["optimizer_share"] < 1 and opt["predicted_mem_gib"] > 0
    skipped = {r["variant"]: r["skipped"] for r in records if "skipped" in r}
    assert "CUDA" in skipped["diffusers_torchao_fp8_compile"]
    assert "CUDA" in skipped["ours_te_fp8_delayed"]  # the profile
    assert skipped["diffusers_compile"] == "--skip-compile"
    summary = records[-1]
    assert summary["what"] == "summary" and summary["vs_diffusers_eager"]["ours_te_bf16"] > 0


def test_gpu_train_loop_runs_qwenimage_train_on_cpu(tmp_path):
    out = tmp_path / "loop.jsonl"
    proc = _run("train_loop.py", "--tiny", "--work", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    records = {(r["what"], r.get("precision")): r for r in _records(out)}
    bf16 = records[("train_loop", "bf16")]
    assert bf16["rc"] == 0 and len(bf16["loss_by_interval"]) == 2
    assert all(math.isfinite(x) for x in bf16["loss_by_interval"])
    assert bf16["tflops_steady"] > 0 and 0 <= bf16["data_wait_steady"] < 1
    assert "CUDA" in records[("train_loop", "fp8")]["skipped"]
