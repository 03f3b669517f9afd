"""The GPU benchmark scripts (benchmarks/gpu/) run every code path on CPU at toy sizes.

They run for real on one GPU through benchmarks/gpu/device.sh; here they must not crash, must
write the records the docs quote, and must say why each GPU-only variant was skipped. No timing
is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
    # Per-block CUDA graphs need the hardware: skipped saying so, at the main shape and the buckets.
    graph_skips = [r for r in records if r.get("variant") in ("ours_te_fp8_delayed_graphs", "ours_te_bf16_graphs")]
    assert {(r["variant"], r["shape"]) for r in graph_skips} == {
        ("ours_te_fp8_delayed_graphs", "64px_b2_t16"),
        ("ours_te_bf16_graphs", "64px_b2_t16"),
        ("ours_te_fp8_delayed_graphs", "96px_b2_t16"),
    }
    assert all("CUDA GPU" in r["skipped"] and "CUDA graphs" in r["skipped"] for r in graph_skips)
    # FP8 with its weights re-quantized every step, the graphs' eager counterpart (stand-in: no FP8 here)
    nocache = by[("step", "ours_te_fp8_delayed_nocache", "64px_b2_t16")]
    assert nocache["step_ms"] > 0 and nocache["fp8_weights"] == "re-quantized every step"
    for variant in ("diffusers_eager", "ours_te_fp8_delayed", "ours_te_fp8_delayed_nocache"):
        assert by[("step", variant, "96px_b2_t16")]["step_ms"] > 0  # a bucket
    summary = records[-1]
    assert summary["what"] == "summary" and summary["vs_diffusers_eager"]["ours_te_bf16"] > 0
    assert summary["graphs_vs_eager"]["ours_te_bf16_graphs_vs_ours_te_bf16"] is None  # skipped, not invented
    # FP8 attention needs Transformer Engine itself (the local stand-in has none): skipped saying why
    assert "Transformer Engine" in skipped["ours_te_fp8_delayed_dpa"] or "CUDA" in skipped["ours_te_fp8_delayed_dpa"]
    assert summary["fp8_attention"]["ours_te_fp8_delayed_dpa_vs_nocache"] is None
    assert summary["buckets"]["96px_b2_t16"]["vs_diffusers_eager"]["ours_te_fp8_delayed_nocache"] > 0


def test_gpu_run_graph_variants_code_path_on_cpu(tmp_path):
    """``--graphs-standin``: the graph variants' whole code path (eager warm-up, recorded block
    calls, the tensors-only wrappers installed in the model, parity, timing, release), with the
    capture replaced by calling the blocks eagerly; and ``--skip`` / ``--buckets`` honoured."""
    out = tmp_path / "gpu.jsonl"
    proc = _run(
        "run.py",
        "--tiny",
        "--skip-compile",
        "--te-standin-local",
        "--graphs-standin",
        "--skip",
        "te_fp8,padded,local,dist_opt,profile",
        "--buckets",
        "96",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    env = records[0]
    assert env["skip"] == ["dist_opt", "local", "padded", "profile", "te_fp8"] and env["buckets"] == ["96:2"]
    steps = {(r["variant"], r["shape"]): r for r in records if r["what"] == "step"}
    # skipped parts leave no trace; the anchors stay
    assert not any(v in ("ours_te_fp8_delayed", "ours_local") or "+pad" in s for v, s in steps)
    assert steps[("diffusers_eager", "64px_b2_t16")]["step_ms"] > 0
    assert steps[("diffusers_eager", "96px_b2_t16")]["step_ms"] > 0
    for variant, shapes in (
        ("ours_te_fp8_delayed_graphs", ("64px_b2_t16", "96px_b2_t16")),
        ("ours_te_bf16_graphs", ("64px_b2_t16",)),
    ):
        for shape in shapes:
            step = steps[(variant, shape)]
            assert step["step_ms"] > 0 and step["graphs"] == 2 and step["standin"] is True
            parity = next(
                r for r in records if r["what"] == "parity" and r["variant"] == variant and r["shape"] == shape
            )
            assert parity["standin"] and parity["finite"] and parity["grads_missing"] == 0
            # through the wrappers, the same computation as eager: no further from it than eager
            # from itself (both exact on CPU)
            for key in ("out_max_abs", "grad_max_rel", "loss_abs_diff"):
                assert parity[key] <= parity[f"{key}_eager_repeat"] + 1e-7, (key, parity)
            assert math.isfinite(parity["loss"]) and parity["loss"] > 0
    # the graphs around compiled chains need the compiler: skipped saying so under --skip-compile
    fused = next(r for r in records if r.get("variant") == "ours_te_fp8_delayed_graphs_fused")
    assert fused["skipped"] == "--skip-compile"
    summary = records[-1]
    assert summary["graphs_vs_eager"]["ours_te_fp8_delayed_graphs_fused_vs_ours_te_fp8_delayed_graphs"] is None
    assert summary["graphs_vs_eager"]["ours_te_bf16_graphs_vs_ours_te_bf16"] > 0
    assert summary["graphs_vs_eager"]["ours_te_fp8_delayed_graphs_vs_ours_te_fp8_delayed_nocache"] > 0
    assert summary["vs_diffusers_eager"]["ours_te_fp8_delayed_graphs"] > 0
    assert summary["buckets"]["96px_b2_t16"]["graphs_vs_nocache"] > 0
    assert summary["targets_graphs"]["ours_te_fp8_delayed_graphs_vs_diffusers_compile (>=1.5)"] is None  # no anchor


def test_gpu_run_rejects_unknown_parts_and_buckets():
    proc = _run("run.py", "--tiny", "--skip", "te_fp8,graphs")
    assert proc.returncode != 0 and "unknown part(s) ['graphs']" in proc.stderr and "te_fp8_graphs" in proc.stderr
    proc = _run("run.py", "--tiny", "--buckets", "700")
    assert proc.returncode != 0 and "--buckets '700'" in proc.stderr


def _script_module(name: str, script: str):
    """benchmarks/gpu/`script` imported as `name` (its dataclasses need it registered in sys.modules)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu" / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _run_module():
    return _script_module("gpu_bench_run", "run.py")


def test_gpu_run_flags_parse():
    run = _run_module()
    assert run.parse_skip("te_fp8, padded,,") == {"te_fp8", "padded"}
    assert run.parse_skip("") == frozenset()
    with pytest.raises(SystemExit, match="te_bf16_graphs"):
        run.parse_skip("help")
    assert run.parse_buckets("640,1328:4, 256") == [(640, 8), (1328, 4), (256, 32)]
    for bad in ("650", "abc", "640:0", "100:2"):
        with pytest.raises(SystemExit):
            run.parse_buckets(bad)
    args = run.resolve(run.build_parser().parse_args(["--skip", "local", "--buckets", "640"]))
    assert args.skip == {"local"} and args.buckets == [(640, 8)] and args.res == 1024
    assert run.resolve(run.build_parser().parse_args(["--tiny"])).buckets == [(64, 2), (96, 2)]


def test_gpu_run_summary_with_graph_records():
    run = _run_module()

    def step(variant, ms, res=1024, fwd_bwd=None, padded=0):
        r = {"what": "step", "variant": variant, "res": res, "shape": f"{res}px", "padded_text": padded, "step_ms": ms}
        if fwd_bwd:
            r["fwd_bwd_ms"] = fwd_bwd
        return r

    records = [
        step("diffusers_eager", 90.0),
        step("diffusers_compile", 75.0, fwd_bwd=68.0),
        step("diffusers_torchao_fp8_compile", 70.0),
        step("ours_te_bf16", 80.0),
        step("ours_te_fp8_delayed", 72.0),
        step("ours_te_fp8_delayed_nocache", 74.0, fwd_bwd=70.0),
        step("ours_te_bf16_graphs", 64.0),
        step("ours_te_fp8_delayed_graphs", 50.0, fwd_bwd=46.0),
        {"what": "step", "variant": "ours_te_fp8_delayed_graphs", "shape": "1024px", "skipped": "x"},
        step("diffusers_eager", 40.0, res=640),
        step("diffusers_compile", 30.0, res=640),
        step("ours_te_fp8_delayed_nocache", 25.0, res=640),
        step("ours_te_fp8_delayed_graphs", 20.0, res=640),
        {"what": "step", "variant": "ours_te_fp8_delayed_graphs", "res": 1328, "shape": "1328px", "error": "boom"},
    ]
    s = run.summarize(records)
    g = s["targets_graphs"]
    assert g["ours_te_fp8_delayed_graphs_vs_diffusers_compile (>=1.5)"] == pytest.approx(75 / 50)
    assert g["ours_te_fp8_delayed_graphs_vs_torchao_fp8_compile (>=1.25)"] == pytest.approx(70 / 50)
    assert g["ours_te_bf16_graphs_vs_diffusers_compile (>=1.15)"] == pytest.approx(75 / 64)
    assert g["ours_te_fp8_delayed_graphs_fwd_bwd_vs_diffusers_compile"] == pytest.approx(68 / 46)
    e = s["graphs_vs_eager"]
    assert e["ours_te_fp8_delayed_graphs_vs_ours_te_fp8_delayed_nocache"] == pytest.approx(74 / 50)
    assert e["ours_te_bf16_graphs_vs_ours_te_bf16"] == pytest.approx(80 / 64)
    assert e["ours_te_fp8_delayed_graphs_fwd_bwd_vs_ours_te_fp8_delayed_nocache"] == pytest.approx(70 / 46)
    assert s["vs_diffusers_eager"]["ours_te_fp8_delayed_graphs"] == pytest.approx(90 / 50)
    b = s["buckets"]["640px"]
    assert b["vs_diffusers_compile"]["ours_te_fp8_delayed_graphs"] == pytest.approx(30 / 20)
    assert b["vs_diffusers_eager"]["diffusers_compile"] == pytest.approx(40 / 30)
    assert b["graphs_vs_nocache"] == pytest.approx(25 / 20)
    assert b["vs_diffusers_compile"]["ours_te_fp8_delayed"] is None
    assert s["buckets"]["1328px"]["vs_diffusers_compile"]["ours_te_fp8_delayed_graphs"] is None  # error record
    assert s["targets"]["ours_te_fp8_delayed_vs_diffusers_compile (>=1.5)"] == pytest.approx(75 / 72)
    assert run.kernel_class("void cutlass_sm90_gemm") == "gemm" and run.kernel_class("Memcpy DtoD") == "memory_comm"


def test_gpu_train_loop_runs_qwenimage_train_on_cpu(tmp_path):
    out = tmp_path / "loop.jsonl"
    proc = _run("train_loop.py", "--tiny", "--work", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    records = {(r["what"], r.get("precision")): r for r in _records(out)}
    bf16 = records[("train_loop", "bf16")]
    assert bf16["rc"] == 0 and len(bf16["loss_by_interval"]) == 2
    assert all(math.isfinite(x) for x in bf16["loss_by_interval"])
    assert bf16["tflops_steady"] > 0 and 0 <= bf16["data_wait_steady"] < 1
    # the memory check: the planner's prediction and the log's peak (on CPU an RSS: no ratio)
    assert bf16["predicted_peak_gib"] > 0 and bf16["peak_gib"] > 0 and "peak_vs_predicted" not in bf16
    assert "CUDA" in records[("train_loop", "fp8")]["skipped"]
    assert "CUDA" in records[("train_loop", "fp8:graphs")]["skipped"]  # the default runs


def test_gpu_train_loop_run_options(tmp_path):
    loop = _script_module("gpu_train_loop", "train_loop.py")
    assert loop.parse_run("fp8:nofused:graphs") == ("fp8", frozenset({"nofused", "graphs"}))
    assert loop.parse_run("fp8:dpa") == ("fp8", frozenset({"dpa"}))
    for bad in ("fp16", "bf16:graph", "fp8:graphs:x", "bf16:dpa"):
        with pytest.raises(ValueError, match=repr(bad)):
            loop.parse_run(bad)
    args = loop.main.__globals__["argparse"].Namespace(
        config="tiny-16ch", layers=2, tiny=True, backend="local", fused=False, steps=3, text_tokens=16,
        res=64, batch=2, log_interval=1,
    )  # fmt: skip
    plain = loop.run_config(args, "cache", "bf16", tmp_path)
    graphed = loop.run_config(args, "cache", "bf16:graphs", tmp_path)
    assert plain["cuda_graphs"] == {"scope": "none"} and "text_pad_multiple" not in plain["schedule"]
    assert graphed["cuda_graphs"] == {"scope": "blocks"} and graphed["schedule"]["text_pad_multiple"] == 16
    assert not plain["precision"]["fp8_attention"]
    assert loop.run_config(args, "cache", "fp8:dpa", tmp_path)["precision"]["fp8_attention"]
    from consumers.train import RunConfig

    data = dict(graphed, data=dict(graphed["data"], caches=[{"path": str(tmp_path), "mode": "fixed"}]))
    assert RunConfig.from_dict(data).cuda_graphs.enabled  # the YAML is a valid run config
    proc = _run("train_loop.py", "--tiny", "--runs", "bf16:graph", "--work", str(tmp_path / "w"))
    assert proc.returncode == 2 and "'bf16:graph' is not bf16 or fp8" in proc.stderr
