"""Non-finite loss / grad norm: the step is skipped, counted, and too many in a row stop training.

A single-rank engine (gloo world of one, in this process) on `tiny-16ch`; a batch is poisoned
with NaN latents (NaN loss, NaN grads).
"""

from __future__ import annotations

import math

import pytest
import torch

from consumers.engine import NonFiniteTrainingError, TrainEngine
from consumers.optimizer import OptimizerConfig
from megatron_qwenimage.config import load_config
from tests.helpers.consumers import synthetic_global_batch, to_microbatches


def _engine(pstate, max_skipped_steps: int = 10) -> TrainEngine:
    opt = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0, ema_decay=0.9, max_skipped_steps=max_skipped_steps)
    return TrainEngine(load_config("tiny-16ch", num_layers=2), pstate, optimizer=opt, global_batch_size=2, seed=5)


def _batches(step: int, poison: bool = False):
    mbs = to_microbatches(synthetic_global_batch(step, 2), dp_rank=0, dp=1, micro_batch=2)
    if poison:
        mbs[0].latents[1, 3, 2, 2] = float("nan")
    return mbs


def _snapshot(engine: TrainEngine) -> dict:
    opt = engine.optimizer
    snap = {f"param/{n}": p.detach().clone() for c in engine.chunks for n, p in c.named_parameters()}
    for name, entry in opt.state_tensors().items():
        for kind, t in entry.items():
            snap[f"{kind}/{name}"] = t.clone()
    snap["adam_steps"] = torch.stack([t.clone() for g in opt._adam_groups for t in g[4]])
    snap["num_steps"] = torch.tensor(opt.num_steps)
    return snap


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_poisoned_step_is_skipped_and_the_next_good_step_updates_normally(pstate):
    engine, reference = _engine(pstate), _engine(pstate)
    r0 = engine.train_step(0, _batches(0))
    reference.train_step(0, _batches(0))
    assert not r0.skipped and r0.skipped_steps == 0 and math.isfinite(r0.grad_norm)

    before = _snapshot(engine)
    bad = engine.train_step(1, _batches(1, poison=True))
    assert bad.skipped and bad.skipped_steps == 1 and bad.consecutive_skipped == 1
    assert math.isnan(bad.loss) and math.isnan(bad.grad_norm)
    _assert_same(_snapshot(engine), before)  # params, masters, moments, EMA, step counters
    assert float(engine.optimizer._grad_storage.abs().sum()) == 0.0  # the NaN grads were dropped

    good = engine.train_step(2, _batches(2))
    ref = reference.train_step(2, _batches(2))
    assert not good.skipped and good.skipped_steps == 1 and good.consecutive_skipped == 0
    assert (good.loss, good.grad_norm, good.lr) == (ref.loss, ref.grad_norm, ref.lr)
    # the skipped step left no trace: same state as an engine that never saw it
    _assert_same(_snapshot(engine), _snapshot(reference))


def test_too_many_consecutive_skips_raise_naming_the_step(pstate):
    engine = _engine(pstate, max_skipped_steps=2)
    engine.train_step(0, _batches(0, poison=True))
    engine.train_step(1, _batches(1))  # a good step resets the run
    assert engine.consecutive_skipped == 0 and engine.skipped_steps == 1
    for step in (2, 3):
        assert engine.train_step(step, _batches(step, poison=True)).consecutive_skipped == step - 1
    with pytest.raises(NonFiniteTrainingError) as err:
        engine.train_step(4, _batches(4, poison=True))
    e = err.value
    assert (e.step, e.first_step, e.consecutive) == (4, 2, 3) and math.isnan(e.loss) and math.isnan(e.grad_norm)
    msg = str(e)
    assert "training stopped at step 4" in msg and "steps 2..4" in msg and "max_skipped_steps=2" in msg
    assert "loss nan" in msg and "grad norm nan" in msg


def test_max_skipped_steps_zero_stops_at_the_first(pstate):
    engine = _engine(pstate, max_skipped_steps=0)
    engine.train_step(0, _batches(0))
    with pytest.raises(NonFiniteTrainingError, match="training stopped at step 1: .*step 1 \\(1 in a row\\)"):
        engine.train_step(1, _batches(1, poison=True))


def test_metrics_leave_skipped_steps_out_of_the_means_and_count_them(tmp_path):
    from consumers.metrics import LoggingConfig, MetricsLogger, format_line

    logger = MetricsLogger(
        LoggingConfig(dir=str(tmp_path), interval=3, tensorboard=False), enabled=True, world_size=1, peak_flops=None
    )
    try:
        common = dict(lr=1e-3, samples=2, image_tokens=10, flops=1e9, step_time_s=0.1, data_wait_s=0.0)
        assert logger.record_step(step=0, loss=1.0, grad_norm=2.0, **common) is None
        assert (
            logger.record_step(step=1, loss=math.nan, grad_norm=math.nan, skipped=True, skipped_steps=1, **common)
            is None
        )
        record = logger.record_step(step=2, loss=3.0, grad_norm=4.0, skipped_steps=1, **common)
        assert (record["loss"], record["grad_norm"], record["skipped_steps"]) == (2.0, 3.0, 1)
        assert "skipped steps: 1" in format_line(record)
        for step in (3, 4):
            logger.record_step(
                step=step, loss=math.nan, grad_norm=math.inf, skipped=True, skipped_steps=step - 1, **common
            )
        record = logger.record_step(step=5, loss=math.nan, grad_norm=math.nan, skipped=True, skipped_steps=7, **common)
        assert math.isnan(record["loss"]) and math.isnan(record["grad_norm"]) and record["skipped_steps"] == 7
    finally:
        logger.close()
    assert "skipped_steps" in __import__("consumers.metrics", fromlist=["_Prometheus"])._Prometheus.NAMES
