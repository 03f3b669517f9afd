"""End-to-end training through the entry points (`python -m consumers.train`, torchrun).

Must show: learning works end to end (>= 10x loss cut on a handful of fixed samples); training
reads a cache written with the producers' writer, and a corrupted shard is detected by checksum
and named in the error. (Kill-and-resume runs: tests/consumers/test_crash_resume.py.)
"""

from __future__ import annotations

from tests.helpers.consumers import (
    QWENIMAGE_TRAIN,
    corrupt_latent_chunk,
    read_jsonl,
    run_config,
    run_train,
    write_cache,
    write_run_config,
)


def test_tiny_model_learns_and_exports(tmp_path):
    """200 steps on 4 distinct samples (each repeated 4x in a global batch of 16): the validation
    loss on a fixed σ grid drops >= 10x; metrics carry every field; the final model exports to a
    diffusers directory that diffusers loads."""
    cache = write_cache(tmp_path / "cache", samples_per_bucket=16, distinct=4, buckets=((64, 64),))
    cfg = run_config(
        cache,
        tmp_path,
        steps=200,
        global_batch=16,
        micro_batch=16,
        lr=1e-3,
        ckpt_interval=100,
        model={"attention_head_dim": 32, "axes_dims_rope": [8, 12, 12], "num_layers": 3},
        optimizer={"betas": [0.9, 0.99], "clip_grad": 0.0, "warmup_steps": 10},
    )
    cfg["data"]["stages"][0]["buckets"] = ["64x64"]
    cfg["data"]["validation"] = {"path": cache, "samples_per_bucket": 4, "micro_batch": 4}
    cfg["schedule"].update(
        eval_interval=200, eval_sigmas=[0.1, 0.3, 0.5, 0.7, 0.9], export_diffusers=str(tmp_path / "diffusers")
    )
    cfg["logging"].update(interval=20, prometheus_port=0)
    r = run_train(write_run_config(cfg, tmp_path / "run.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    val = [x for x in records if "val_loss" in x]
    assert [v["step"] for v in val] == [0, 200]
    assert val[0]["val_loss"] / val[1]["val_loss"] >= 10, val
    train = [x for x in records if "val_loss" not in x]
    assert [x["step"] for x in train] == list(range(20, 201, 20))
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "image_tokens_per_s",
        "tflops_per_gpu",
        "mfu",
        "data_wait_fraction",
        "memory_bytes",
    ):
        assert key in train[-1], key
    assert train[-1]["tflops_per_gpu"] > 0 and 0 <= train[-1]["data_wait_fraction"] < 1
    assert "image tokens/s" in r.stdout and "TFLOP/s/GPU" in r.stdout  # the Megatron-style line
    from diffusers import QwenImageTransformer2DModel

    exported = QwenImageTransformer2DModel.from_pretrained(tmp_path / "diffusers")
    assert exported.config.num_layers == 3


def test_corrupted_shard_is_named(tmp_path):
    cache = write_cache(tmp_path / "cache", samples_per_bucket=8)
    shard = corrupt_latent_chunk(cache)
    r = run_train(write_run_config(run_config(cache, tmp_path, steps=2), tmp_path / "run.yaml"))
    assert r.returncode != 0
    # One line at the command line's boundary, naming the shard and what is wrong with it.
    lines = [x for x in r.stderr.splitlines() if x.startswith("qwenimage train: error: ")]
    assert len(lines) == 1 and shard.shard_id in lines[0] and "sha256" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bad_run_config_exits_2_naming_the_key(tmp_path):
    cache = write_cache(tmp_path / "cache", samples_per_bucket=4)
    cfg = run_config(cache, tmp_path, steps=2)
    cfg["optimizer"]["lr_typo"] = 1.0
    r = run_train(write_run_config(cfg, tmp_path / "run.yaml"), entry=QWENIMAGE_TRAIN, timeout=None)
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith("qwenimage train: error: optimizer:") and "lr_typo" in line, r.stderr
