"""benchmarks/produce.py's arithmetic: start-up and steady state from the commit records' times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.produce import commit_times, steady_state
from megatron_qwenimage.cache import init_cache
from megatron_qwenimage.cache.commit import CommitRecord
from megatron_qwenimage.cache.storage import CacheStorage


def test_steady_state_excludes_the_first_partition_and_the_start_up():
    commits = [(110.0, 16), (118.0, 16), (126.0, 16), (134.0, 8)]  # (commit time, images)
    startup, steady = steady_state(100.0, commits)
    assert startup == pytest.approx(10.0)
    assert steady == pytest.approx((16 + 16 + 8) / (134.0 - 110.0))
    assert steady_state(100.0, [(105.0, 16)]) == (pytest.approx(5.0), None)  # one commit: no steady state


def test_commit_times_come_from_the_records_in_commit_order(tmp_path):
    url = str(tmp_path / "cache")
    init_cache(url)
    storage = CacheStorage(url)
    for pid, t, n in (("p-b", 20.0, 3), ("p-a", 30.0, 5), ("p-c", 10.0, 2)):
        record = CommitRecord(
            pid, "a1", inputs=n, committed=n, duplicates=0, quarantined={}, shards=[], tables={}, created_unix=t
        )
        storage.write_atomic(f"commits/{pid}.json", record.to_json())
    assert commit_times(url) == [(10.0, 2), (20.0, 3), (30.0, 5)]


def test_the_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path):
    """The script a GPU session runs at full size must not crash, and its figures must agree: every
    part, the pipeline with both VAE knobs on (compiled with TorchDynamo's eager backend, as
    inductor takes ~20 s per shape on 2 cores), the VAE variants next to the bare diffusers encode."""
    argv = ["--n", "12", "--side", "64", "--partition-size", "4", "--vae-base-dim", "8", "--batch", "4"]
    argv += ["--vae-actors", "1", "--workdir", str(tmp_path), "--out", str(tmp_path / "out" / "produce.json")]
    argv += ["--parts", "vae,text,pipeline", "--vae-channels-last", "--vae-conv2d", "--vae-compile", "default"]
    argv += ["--vae-variants", "default,conv2d+channels_last,channels_last+compile+conv2d"]
    argv += ["--vae-steps", "2", "--text-steps", "2"]
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[2] / "benchmarks" / "produce.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "QWENIMAGE_VAE_COMPILE_BACKEND": "eager",
        },
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [line["parts_done"] for line in lines] == [
        ["vae"],
        ["vae", "text"],
        ["vae", "text", "pipeline"],
        ["vae", "text", "pipeline", "vae_compile"],
    ]
    r = lines[-1]
    assert json.loads((tmp_path / "out" / "produce.json").read_text()) == r  # --out keeps the latest line
    assert (r["images"], r["side"], r["actors"]) == (12, 64, {"vae": 1, "text": 1, "cpus_each": 0.5})
    assert r["startup_s"] > 0 and r["steady_img_s"] > 0 and r["bare_img_s"] > 0
    # the printed figures are rounded (img/s to 0.01, ratios to 0.001)
    assert r["steady_ratio"] == pytest.approx(r["steady_img_s"] / r["bare_img_s"], rel=0.01, abs=0.002)
    assert r["ratio"] == pytest.approx(r["pipeline_img_s"] / r["bare_img_s"], rel=0.01, abs=0.002)
    assert commit_times(str(tmp_path / "cache"))[-1][1] > 0  # the timed cache is the run's own
    vae = r["vae"]
    assert vae["bare_diffusers_img_s"] > 0 and vae["dtype"] == "float32"
    assert list(vae["producer"]) == ["default", "conv2d+channels_last", "channels_last+compile+conv2d"]
    for name, v in vae["producer"].items():
        assert "error" not in v, (name, v)
        assert v["ratio"] == pytest.approx(v["img_s"] / vae["bare_diffusers_img_s"], rel=0.01, abs=0.002)
        assert v["max_abs_diff"] <= 0.02 * v["max_abs_ref"]  # bf16 latents: rounding only
    assert vae["producer"]["default"]["max_abs_diff"] == 0.0  # the same kernels as the bare encode
    v = vae["producer"]["channels_last+compile+conv2d"]
    assert (v["channels_last"], v["conv2d"], v["compile_mode"], v["graphs"]) == (True, True, "default", 1)
    assert vae["producer"]["default"]["graphs"] == 0
    assert r["vae_knobs"] == {"channels_last": True, "compile_mode": "default", "conv2d": True}
    text = r["text"]
    assert min(text["bare_prompts_s"], text["bare_no_lm_head_prompts_s"], text["producer_prompts_s"]) > 0
    assert text["ratio"] == pytest.approx(text["producer_prompts_s"] / text["bare_prompts_s"], rel=0.01, abs=0.002)


def test_the_benchmark_refuses_unknown_parts_and_variants(capsys):
    from benchmarks.produce import parse_args

    for argv in (["--parts", "vae,gpu"], ["--vae-variants", "default,fold"], ["--vae-variants", "conv2d+conv2d"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert argv[0] in capsys.readouterr().err
    args = parse_args(["--full"])
    assert args.parts == ["vae", "text", "pipeline"] and len(args.variants) == 7
    assert args.variants["compile"] == {
        "channels_last": False,
        "conv2d": False,
        "compile": True,
    }
    assert parse_args([]).parts == ["pipeline"]
