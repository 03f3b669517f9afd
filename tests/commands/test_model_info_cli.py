"""``qwenimage model-info``."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_qwenimage import accounting
from megatron_qwenimage.commands import model_info
from megatron_qwenimage.config import ConfigError, load_config


def _parser():
    p = argparse.ArgumentParser(prog="qwenimage")
    sp = p.add_subparsers(dest="command", required=True)
    model_info.register(sp)
    return p


def _run(argv, capsys):
    """``qwenimage model-info ARGV`` in-process, through the command line's error boundary."""
    from megatron_qwenimage import cli

    rc = cli.main(["model-info", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_20b_tp4(capsys):
    rc, out, err = _run(["--config", "qwen-image-20b", "--tp", "4", "--dp", "8", "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)  # exactly one JSON object on stdout
    assert info["params"] == 20_430_401_088
    assert info["trainable_params"] == 20_430_401_088 - 132_154_496
    assert info["image_tokens"] == 4096 and info["text_tokens"] == 256
    config = load_config("qwen-image-20b")
    assert info["flops_per_sample"] == accounting.model_flops_per_sample(config, 4096, 256)
    # the same prediction as qwenimage plan's (within a few % of measured tensors)
    peak = accounting.peak_memory_per_gpu(config, 4, 1, 8, 1, 4096, 256)
    parts = ("params", "grads", "optimizer", "activations", "buffers", "backward_working_set")
    assert info["memory_per_gpu_bytes"] == {**{k: peak[k] for k in parts}, "total": peak["total"]}
    assert info["memory_per_gpu_bytes"]["total"] == sum(peak[k] for k in parts)
    assert info["memory_per_gpu_bytes"]["backward_working_set"] > 0
    assert info["layout"]["tp"] == 4 and info["layout"]["dp"] == 8


def test_resolution_and_layout_flags(capsys):
    rc, out, _ = _run(
        [
            "--config",
            "tiny",
            "--height",
            "1328",
            "--width",
            "928",
            "--text-tokens",
            "40",
            "--pp",
            "2",
            "--micro-batch",
            "2",
            "--recompute",
            "full",
            "--sequence-parallel",
            "--tp",
            "2",
            "--json",
        ],
        capsys,
    )
    assert rc == 0
    info = json.loads(out)
    assert info["image_tokens"] == 83 * 58
    assert len(info["memory_stages"]) == 2
    assert info["layout"]["recompute"] == "full" and info["layout"]["sequence_parallel"] is True
    assert info["flops_per_sample"] == accounting.model_flops_per_sample(load_config("tiny"), 83 * 58, 40)


def test_table_output(capsys):
    rc, out, _ = _run(["--config", "qwen-image-20b", "--tp", "4"], capsys)
    assert rc == 0
    assert "20,430,401,088" in out
    assert "Memory per GPU" in out and "Model FLOPs per sample" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--height", "1000"], "height=1000"),
        (["--width", "0"], "width=0"),
        (["--tp", "5"], "tp=5"),
        (["--dp", "0"], "dp=0"),
        (["--text-tokens", "2000"], "2000 tokens"),
        (["--config", "no-such-model"], "no-such-model"),
        (["--pp", "7"], "--pp 7"),
    ],
)
def test_bad_arguments_exit_2_with_message(capsys, argv, needle):
    rc, out, err = _run([*argv, "--json"], capsys)
    assert rc == 2
    (line,) = err.splitlines()
    assert line.startswith("qwenimage model-info: error: ") and needle in line
    error = json.loads(out)  # under --json, the error object is the one JSON document on stdout
    assert error["command"] == "model-info" and needle in error["error"]


def test_every_flag_has_help():
    p = _parser()
    sub = p._subparsers._group_actions[0].choices["model-info"]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings


def test_cli_main_dispatches(capsys):
    from megatron_qwenimage import cli

    assert cli.main(["model-info", "--config", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == accounting.parameter_counts(load_config("tiny")).total


def test_console_script_json():
    exe = shutil.which("qwenimage")
    cmd = [exe] if exe else [sys.executable, "-m", "megatron_qwenimage.cli"]
    proc = subprocess.run(
        [*cmd, "model-info", "--config", "qwen-image-20b", "--tp", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["params"] == 20430401088
    assert set(info["memory_per_gpu_bytes"]) >= {"params", "grads", "optimizer", "activations", "total"}


def test_grad_reduce_dtype_halves_the_gradient_buffer_and_shrinks_no_parameter():
    cfg = load_config("qwen-image-20b")
    kw = dict(tp=8, pp=1, dp=256, micro_batch=1, height=1024, width=1024, text_tokens=256)
    fp32 = model_info.model_info(cfg, **kw)
    bf16 = model_info.model_info(cfg, **kw, grad_reduce_dtype="bfloat16")
    assert bf16["memory_per_gpu_bytes"]["grads"] == fp32["memory_per_gpu_bytes"]["grads"] / 2
    assert bf16["memory_per_gpu_bytes"]["params"] == fp32["memory_per_gpu_bytes"]["params"]
    assert bf16["layout"]["grad_dtype"] == "bfloat16"
    # The DP buffers are the gather slots of two units and the reduced shard: far below the
    # parameters (a whole-model receive buffer would be as large as them).
    assert fp32["memory_per_gpu_bytes"]["buffers"] < 0.1 * fp32["memory_per_gpu_bytes"]["params"]


def test_dp_shard_keeps_the_optimizer_state_of_its_shard_group_and_refuses_a_non_divisor():
    cfg = load_config("qwen-image-20b")
    kw = dict(tp=8, pp=1, dp=256, micro_batch=1, height=1024, width=1024, text_tokens=256)
    full = model_info.model_info(cfg, **kw)
    hsdp = model_info.model_info(cfg, **kw, dp_shard=8)  # one node's 8 DP ranks per shard group
    ratio = hsdp["memory_per_gpu_bytes"]["optimizer"] / full["memory_per_gpu_bytes"]["optimizer"]
    assert 28 < ratio <= 32  # sharded 8 ways instead of 256 (less row padding at 256)
    assert hsdp["layout"]["dp_shard"] == 8
    with pytest.raises(
        ConfigError, match=r"--dp-shard 3: parallel.dp_shard=3: expected a positive integer dividing dp=256"
    ):
        model_info.model_info(cfg, **kw, dp_shard=3)


def test_zero2_keeps_two_units_of_gradients_instead_of_the_models():
    cfg = load_config("qwen-image-20b")
    kw = dict(tp=8, pp=1, dp=256, micro_batch=1, height=1024, width=1024, text_tokens=256)
    zero1 = model_info.model_info(cfg, **kw)["memory_per_gpu_bytes"]
    zero2 = model_info.model_info(cfg, **kw, sharding="zero2")["memory_per_gpu_bytes"]
    # 60 blocks (and the embedders and head) of gradients down to the two largest units.
    assert zero2["grads"] < zero1["grads"] / 20
    assert zero2["params"] == zero1["params"] and zero2["optimizer"] == zero1["optimizer"]


def test_zero3_holds_one_block_of_whole_parameters_instead_of_the_models():
    cfg = load_config("qwen-image-20b")
    kw = dict(tp=2, pp=1, dp=64, micro_batch=1, height=1024, width=1024, text_tokens=256)
    zero2 = model_info.model_info(cfg, **kw, sharding="zero2")["memory_per_gpu_bytes"]
    zero3 = model_info.model_info(cfg, **kw, sharding="zero3")["memory_per_gpu_bytes"]
    # 60 blocks of bf16 parameters down to one block, the embedders and the head.
    assert zero3["params"] < zero2["params"] / 30
    assert zero3["grads"] == zero2["grads"] and zero3["optimizer"] == zero2["optimizer"]
