"""The main job end to end: `qwenimage produce` (Ray) writes a cache, `qwenimage train` trains on it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import yaml


def test_train_on_a_cache_written_by_the_ray_producer(ray_cluster, producer_env, tmp_path):
    cache = tmp_path / "cache"
    produce = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_qwenimage.cli",
            "produce",
            "--input",
            "synthetic:text?n=8&seed=2",
            "--output",
            str(cache),
            "--buckets",
            "64",
            "--partition-size",
            "4",
            "--ray-address",
            ray_cluster,
            "--json",
            "--no-progress",
            "--metrics-port",
            "0",
        ],
        env=producer_env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert produce.returncode == 0, produce.stderr[-3000:]
    summary = json.loads(produce.stdout.strip().splitlines()[-1])
    assert summary["committed"] == 8

    run = {
        "model": "tiny-16ch",
        "parallel": {"tp": 1, "pp": 1},
        "optimizer": {"lr": 1.0e-3, "warmup_steps": 2, "decay_steps": 20, "clip_grad": 1.0},
        "data": {
            "seed": 0,
            "tasks": {"t2i": 1.0},
            "caches": [{"path": str(cache), "mode": "fixed"}],
            "stages": [{"name": "s64", "buckets": sorted(summary["buckets"]), "micro_batch": 2, "global_batch": 4}],
        },
        "schedule": {"train_steps": 6, "export_diffusers": str(tmp_path / "export")},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 3, "keep_last": 2},
        "logging": {"dir": str(tmp_path / "logs"), "interval": 1},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    train = subprocess.run(
        [sys.executable, "-m", "megatron_qwenimage.cli", "train", "--config", str(tmp_path / "run.yaml")],
        env={**producer_env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_")) == [
        "step_00000003",
        "step_00000006",
    ]

    from diffusers import QwenImageTransformer2DModel

    exported = QwenImageTransformer2DModel.from_pretrained(tmp_path / "export")
    assert exported.config.in_channels == 64 and exported.config.joint_attention_dim == 32
