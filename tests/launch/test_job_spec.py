"""The job spec's own checks (`launch.job_spec`), straight from dicts: the consumer time limit
against one checkpoint interval (a given step time, or the capacity planner's prediction for
``consumer.gpu``), and the documented faults no other test covers (unknown keys, heads not
divisible by TP, more pipeline stages than blocks)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

from launch.job_spec import job_spec_from_dict, predict_step_time
from megatron_qwenimage import planner as plan
from megatron_qwenimage.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
JOB = yaml.safe_load((REPO / "examples" / "job.yaml").read_text())
CONFIG_20B = yaml.safe_load((REPO / "examples" / "train-qwen-image-20b.yaml").read_text())
INTERVAL = CONFIG_20B["checkpoint"]["interval"]  # steps between checkpoints of the 20B example


def _job_20b(**consumer) -> dict:
    """examples/job.yaml (4 nodes x 8 GPUs) with the 20B run config inline and no step time or GPU;
    `consumer`: keys to set (None deletes)."""
    d = copy.deepcopy(JOB)
    d["consumer"]["config"] = copy.deepcopy(CONFIG_20B)
    d["consumer"].pop("step_time_s", None)
    d["consumer"].pop("gpu", None)
    return _with(d, consumer)


def _with(d: dict, consumer: dict) -> dict:
    """`d` with the consumer keys of `consumer` set (a None value deletes the key)."""
    for key, value in consumer.items():
        if value is None:
            d["consumer"].pop(key, None)
        else:
            d["consumer"][key] = value
    return d


def _tiny_cpu(**consumer) -> dict:
    """A CPU job spec (gpus_per_node 0, 4 processes, TP2 over a 2-block tiny model); `consumer`:
    keys of the consumer to set (None deletes)."""
    d = {
        "name": "t1",
        "cache": "/nonexistent/cache",
        "run_dir": "/nonexistent/run",
        "producer": {
            "nodes": 1,
            "gpus_per_node": 0,
            "options": {"input": "synthetic:text?n=8", "encoders": "tiny", "buckets": "64"},
        },
        "consumer": {
            "nodes": 1,
            "gpus_per_node": 0,
            "procs_per_node": 4,
            "time": "00:01:00",
            "signal_before_s": 30,
            "config": {
                "model": {"name": "tiny-16ch", "num_layers": 2},
                "parallel": {"tp": 2},
                "optimizer": {"lr": 1.0e-3, "warmup_steps": 2},
                "data": {"stages": [{"name": "s", "buckets": ["64x64"], "micro_batch": 1, "global_batch": 4}]},
                "schedule": {"train_steps": 8},
                "checkpoint": {"interval": 4},
            },
        },
    }
    return _with(d, consumer)


def _load(d: dict):
    return job_spec_from_dict(d, source="job.yaml", check_paths=False, check_ray=False)


def _error(d: dict) -> str:
    with pytest.raises(ConfigError) as err:
        _load(d)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------- time limit
def test_a_given_step_time_too_slow_for_one_checkpoint_interval_is_refused():
    # INTERVAL steps x 60 s + 180 s > 1 h; the given step time wins over consumer.gpu's prediction.
    needed = INTERVAL * 60 + 180
    assert 3600 < needed <= 2 * 86400
    message = _error(_job_20b(time="01:00:00", step_time_s=60.0, gpu="h200"))
    assert message.startswith("consumer.time='01:00:00' (3600 s) is shorter than one checkpoint interval: ")
    assert (
        f"checkpoint.interval={INTERVAL} steps x consumer.step_time_s=60 s + signal_before_s=180 s = {needed} s"
        in message
    )
    assert "consumer.config.checkpoint.interval" in message and "predicted" not in message
    _load(_job_20b(time="2-00:00:00", step_time_s=60.0, gpu="h200"))


def test_without_a_step_time_the_planner_predicts_it_for_the_gpu():
    predicted = predict_step_time(_load(_job_20b(time="2-00:00:00", gpu="h200")))
    message = _error(_job_20b(time="00:05:00", gpu="h200"))
    assert message.startswith("consumer.time='00:05:00' (300 s) is shorter than one checkpoint interval: ")
    assert f"checkpoint.interval={INTERVAL} steps x predicted step time {predicted.seconds:.1f} s (" in message
    assert "qwenimage plan's model for h200, bucket " in message and "consumer.step_time_s" in message
    assert "tp=4+SP pp=1 dp=8 recompute=none, bf16" in message
    needed = INTERVAL * predicted.seconds + 180
    assert f"= {needed:.0f} s; raise the time limit" in message
    # Without consumer.gpu: the card the planner's rates were measured on, said so.
    default = _error(_job_20b(time="00:05:00"))
    assert f"for {plan.MEASURED_GPU}, the planner's measured GPU (set consumer.gpu)" in default
    assert f"predicted step time {predicted.seconds:.1f} s" in default


def test_a_generous_time_limit_passes_the_prediction():
    spec = _load(_job_20b(time="2-00:00:00", gpu="h200"))  # 172800 s
    assert spec.consumer.gpu == "h200" and spec.consumer.step_time_s is None
    assert 172800 >= INTERVAL * predict_step_time(spec).seconds + 180
    _load(JOB)  # the example as shipped: its 04:00:00 holds one interval at the predicted step time


def test_an_unknown_gpu_is_one_line_listing_the_choices():
    message = _error(_job_20b(gpu="tpu9"))
    assert message == (
        f"consumer.gpu='tpu9': not a GPU the capacity planner knows; expected one of {sorted(plan.GPUS)}"
    )
    assert all(name in message for name in ("h100", "h200", "b200"))


def test_a_cpu_job_without_a_step_time_is_not_checked():
    spec = _load(_tiny_cpu())  # 1 min limit, 4-step interval: no step time, no GPUs -> no check
    assert spec.consumer.resources.gpus_per_node == 0 and spec.consumer.step_time_s is None
    # A given step time is still checked on CPU: 4 x 60 s + 30 s > 60 s.
    assert "consumer.step_time_s=60 s" in _error(_tiny_cpu(step_time_s=60))


def test_the_checked_step_time_is_launch_plan_step_time_of_the_slowest_bucket():
    spec = _load(_job_20b(time="2-00:00:00", gpu="h200"))
    predicted = predict_step_time(spec)
    # The example on 4 x 8 GPUs: TP4 + SP, PP1, DP8, no recompute, bf16; per stage (micro-batch,
    # micro-batches = global_batch / (dp x micro-batch)) and each bucket as the square of at least its tokens.
    layout = plan.Layout(tp=4, pp=1, dp=8, recompute="none", sequence_parallel=True)
    rates = plan.step_rates("h200", "bf16")
    model = load_config("qwen-image-20b")
    cases = {
        ("s256", "256x256"): (256, 32, 4096 // (8 * 32)),
        ("s640", "640x640"): (640, 8, 2048 // (8 * 8)),
        ("s640", "560x736"): (656, 8, 2048 // (8 * 8)),  # 35 x 46 = 1610 tokens <= 41^2
        ("s640", "736x560"): (656, 8, 2048 // (8 * 8)),
        ("s1328", "1328x1328"): (1328, 2, 1024 // (8 * 2)),
        ("s1328", "1152x1536"): (1344, 2, 1024 // (8 * 2)),  # 72 x 96 = 6912 tokens <= 84^2
        ("s1328", "1536x1152"): (1344, 2, 1024 // (8 * 2)),
    }
    times = {
        key: plan.step_time(model, layout, res, mb, m, 256, rates, plan.GPUS["h200"], 8)["total"]
        for key, (res, mb, m) in cases.items()
    }
    slowest = max(times, key=times.get)
    assert (predicted.stage, predicted.bucket) == slowest
    assert predicted.seconds == times[slowest]
    assert predicted.layout == layout and predicted.precision == "bf16" and predicted.text_tokens == 256
    assert (predicted.resolution, predicted.micro_batch, predicted.microbatches) == cases[slowest]
    assert math.isclose(predicted.parts["total"], predicted.seconds)
    # What the check reports is that number.
    assert f"predicted step time {predicted.seconds:.1f} s" in _error(_job_20b(time="00:05:00", gpu="h200"))


def test_fp8_and_recompute_reach_the_prediction():
    base = predict_step_time(_load(_job_20b(time="2-00:00:00", gpu="h200")))
    d = _job_20b(time="2-00:00:00", gpu="h200")
    d["consumer"]["config"]["recompute"] = {"mode": "full"}
    full = predict_step_time(_load(d))
    assert full.layout.recompute == "full" and full.seconds > base.seconds
    d = _job_20b(time="2-00:00:00", gpu="b200")
    d["consumer"]["config"]["precision"] = {"autocast": "bf16", "fp8": "delayed"}
    d["consumer"]["config"]["model"] = {"name": "qwen-image-20b", "backend": "transformer_engine"}
    fp8 = predict_step_time(_load(d))
    assert fp8.precision == "fp8" and fp8.gpu == "b200" and not fp8.gpu_assumed


# ------------------------------------------------------------- documented faults not tested elsewhere
@pytest.mark.parametrize(
    "where, key, needle",
    [
        (None, "nmae", "job.yaml: unknown key(s) ['nmae']"),
        ("consumer", "step_time", "consumer: unknown key(s) ['step_time']"),
        ("producer", "gpus", "producer: unknown key(s) ['gpus']"),
    ],
)
def test_unknown_keys_are_named(where, key, needle):
    d = _tiny_cpu()
    (d if where is None else d[where])[key] = 1
    assert needle in _error(d)


def test_heads_not_divisible_by_tp_are_refused():
    d = _tiny_cpu(procs_per_node=8)  # tiny-16ch has 4 heads
    d["consumer"]["config"]["parallel"] = {"tp": 8}
    assert "parallel.tp=8 does not divide num_attention_heads=4" in _error(d)


def test_more_pipeline_stages_than_blocks_are_refused():
    d = _tiny_cpu()  # 2 blocks, 4 processes
    d["consumer"]["config"]["parallel"] = {"tp": 1, "pp": 4}
    assert "num_layers=2 is not divisible by pp*vpp = 4*1 = 4 pipeline stages" in _error(d)


def test_the_predicted_step_time_follows_the_runs_dp_reduction_dtype(monkeypatch):
    """``data_parallel.grad_reduce_dtype`` reaches the planner's DP model: bf16 reduce-scatters
    move half the gradient bytes (seen in the arguments `step_time` gets, and in its result)."""
    seen = []
    step_time = plan.step_time

    def recording(*args, **kwargs):
        seen.append((kwargs["grad_reduce_bytes"], kwargs["param_gather_depth"]))
        return step_time(*args, **kwargs)

    monkeypatch.setattr(plan, "step_time", recording)
    fp32 = predict_step_time(_load(_job_20b(time="2-00:00:00", gpu="h200")))
    job = _job_20b(time="2-00:00:00", gpu="h200")
    job["consumer"]["config"]["data_parallel"] = {"grad_reduce_dtype": "bfloat16", "param_gather_depth": 3}
    bf16 = predict_step_time(_load(job))
    assert {s for s in seen[: len(seen) // 2]} == {(4, 2)} and {s for s in seen[len(seen) // 2 :]} == {(2, 3)}
    assert bf16.seconds <= fp32.seconds
