"""The layout x feature matrix: every training feature at once, under the layouts users run.

Each cell is one run of `qwenimage train` under ``torchrun --nproc-per-node 4`` (gloo, tiny model)
with, all at once: interval checkpoints, EMA, validation, a ``tail`` cache that grows while the
run waits for it, a SIGTERM stop, a resume into *another* layout and the final diffusers export.
Its per-step losses and grad norms, its validation losses, its exported weights and its final EMA
weights must equal those of one process trained, uninterrupted, on the same data (the layout
bounds of test_layouts.py).

| cell          | stopped in       | SIGTERM arrives                     | resumed in   |
|---------------|------------------|-------------------------------------|--------------|
| tp2sp_dp2     | TP2 + SP x DP2   | while the ranks wait for the cache  | PP2 x DP2    |
| pp2_dp2       | PP2 x DP2        | during a step                       | TP2 x PP2    |
| tp2_pp2       | TP2 x PP2        | during a step                       | TP2 + SP x DP2 |
| hsdp_zero2_zero3 | HSDP DP4 (shards of 2), ZeRO-2 | during a step      | TP2 + SP x DP2, ZeRO-3 |

The last cell's second run holds no whole parameters between uses (ZeRO-3): its checkpoints write
the parameters from the master shards, and the final export reads those.

The cache holds 4 steps of samples (snapshot v1) when a run starts; the run trains them and
waits; the test then commits 4 more steps' worth (snapshot v2), so the data order is the same
whenever v2 arrives. Checkpoints every 3 steps, 8 steps in all; validation every 3 steps.

The 8-rank TP2 x PP2 x DP2 is not a cell: eight ranks on CI's two cores take minutes per launch;
every pair of its dimensions is covered by the cells above.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.consumers import (
    QWENIMAGE_TRAIN,
    JobOutput,
    committed_steps,
    grow_cache,
    launch_train,
    read_jsonl,
    signal_job,
    write_cache,
    write_run_config,
)

STEPS = 8
GLOBAL_BATCH = 4
SAMPLES_PER_SNAPSHOT = 4 * GLOBAL_BATCH  # 4 steps of samples per snapshot
INTERVAL = 3
WAITING = "waiting for a newer snapshot"

TP2_SP_DP2 = {"tp": 2, "sequence_parallel": True}
PP2_DP2 = {"pp": 2}
TP2_PP2 = {"tp": 2, "pp": 2}
#: HSDP: the optimizer state sharded over pairs of DP ranks, replicated across the two pairs.
HSDP_DP4 = {"dp_shard": 2}
ZERO2 = {"sharding": "zero2"}
ZERO3 = {"sharding": "zero3"}
#: cell -> (first layout, resume layout, where the SIGTERM lands, the two runs' data_parallel sections)
CELLS = {
    "tp2sp_dp2": (TP2_SP_DP2, PP2_DP2, "waiting", {}, {}),
    "pp2_dp2": (PP2_DP2, TP2_PP2, "step", {}, {}),
    "tp2_pp2": (TP2_PP2, TP2_SP_DP2, "step", {}, {}),
    "hsdp_zero2_zero3": (HSDP_DP4, TP2_SP_DP2, "step", ZERO2, ZERO3),
}


def _config(
    root: Path,
    cache: str,
    val: str,
    out: Path,
    parallel: dict,
    *,
    prefetch_steps: int = 2,
    data_parallel: dict | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model": {"name": "tiny-16ch", "num_layers": 2},
        "parallel": parallel,
        "data_parallel": data_parallel or {},
        "optimizer": {"lr": 1e-3, "warmup_steps": 2, "clip_grad": 1.0, "ema_decay": 0.9},
        "flow_matching": {"kind": "uniform"},
        "data": {
            "caches": [{"path": cache, "mode": "tail"}],
            "seed": 3,
            "prefetch_steps": prefetch_steps,
            "tail_poll_s": 0.2,
            "tail_timeout_s": 240,
            "stages": [{"name": "s0", "buckets": ["32x32"], "micro_batch": 1, "global_batch": GLOBAL_BATCH}],
            "validation": {"path": val, "pin": 1, "buckets": ["32x32"], "samples_per_bucket": 4, "micro_batch": 2},
        },
        "schedule": {
            "train_steps": STEPS,
            "seed": 11,
            "eval_interval": INTERVAL,
            "eval_sigmas": [0.3, 0.7],
            "export_diffusers": str(out / "export"),
        },
        "checkpoint": {"dir": str(out / "ckpt"), "interval": INTERVAL, "keep_last": 5},
        "logging": {"dir": str(out / "logs"), "interval": 1, "tensorboard": False},
    }
    return write_run_config(cfg, out / f"run-{'-'.join(f'{k}{v}' for k, v in parallel.items())}.yaml")


def _launch(config: Path, nproc: int) -> JobOutput:
    return JobOutput(launch_train(config, entry=QWENIMAGE_TRAIN, nproc=nproc))


def _grow_when_waiting(job: JobOutput, cache: str) -> None:
    """Once the job says it waits for the tail cache, commit the second snapshot's samples."""
    job.wait_for(WAITING)
    grow_cache(cache, "p1", samples_per_bucket=SAMPLES_PER_SNAPSHOT, seed=1)


def _records(out: Path) -> tuple[dict[int, tuple[float, float]], dict[int, float]]:
    """(step -> (loss, grad norm), step -> validation loss) from the run's metrics.jsonl; a step
    logged twice (before a stop, again after the resume) counts as logged last."""
    train, val = {}, {}
    for r in read_jsonl(out / "logs" / "metrics.jsonl"):
        if "loss" in r:
            train[r["step"]] = (r["loss"], r["grad_norm"])
        if "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    return train, val


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.rglob("*.safetensors")):
        tensors.update({f"{f.relative_to(directory)}:{k}": v for k, v in load_file(f).items()})
    assert tensors, f"no weights under {directory}"
    return tensors


def _ema_export(out: Path, dest: Path) -> dict[str, torch.Tensor]:
    from consumers.checkpoint import export_checkpoint_to_diffusers, step_dir_name

    export_checkpoint_to_diffusers(out / "ckpt" / step_dir_name(STEPS), dest, ema=True)
    return _weights(dest)


def _assert_weights_equal(got: dict, ref: dict, what: str) -> None:
    assert sorted(got) == sorted(ref), what
    bad = {}
    for name, r in ref.items():
        g = got[name].float()
        r = r.float()
        # Each tensor at its own scale, with a floor for near-zero ones (a bias at ~1e-5 differs
        # by fp32 reduction order alone, ~1e-8).
        tol = 1e-7 + 1e-5 * r.abs().max() + 1e-4 * r.abs()
        if not bool(((g - r).abs() <= tol).all()):
            bad[name] = float((g - r).abs().max())
    assert not bad, f"{what}: {len(bad)} of {len(ref)} tensors differ from the single process: {bad}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, str, str]:
    """The first snapshot (4 steps of samples) and the held-out cache; each run copies the former."""
    root = tmp_path_factory.mktemp("matrix")
    cache = write_cache(root / "cache", samples_per_bucket=SAMPLES_PER_SNAPSHOT, seed=0)
    val = write_cache(root / "val", samples_per_bucket=4, seed=7, partition="held-out")
    return root, cache, val


def _copy_cache(cache: str, dest: Path) -> str:
    import shutil

    shutil.copytree(cache, dest)
    return str(dest)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One process, uninterrupted, on the same data: the cache grows while it waits."""
    root, cache, val = data
    out = tmp_path_factory.mktemp("reference")
    cache = _copy_cache(cache, out / "cache")
    job = _launch(_config(root, cache, val, out / "run", {}), nproc=1)
    _grow_when_waiting(job, cache)
    assert job.wait() == 0, job.text[-3000:]
    return out / "run"


@pytest.mark.parametrize("cell", list(CELLS))
def test_cell_equals_one_process(cell, data, reference, tmp_path):
    root, cache, val = data
    first, second, stop_at, first_dp, second_dp = CELLS[cell]
    cache = _copy_cache(cache, tmp_path / "cache")
    out = tmp_path / "run"
    # Loading inline, the wait's log line says the training loop itself waits (the prefetch thread
    # would wait, and say so, steps ahead of it); test_stop_while_waiting.py covers the prefetched wait.
    prefetch_steps = 0 if stop_at == "waiting" else 2

    # Phase 1: the first layout, stopped by SIGTERM (the whole job at once, as Slurm signals a step).
    job = _launch(_config(root, cache, val, out, first, prefetch_steps=prefetch_steps, data_parallel=first_dp), nproc=4)
    if stop_at == "waiting":
        job.wait_for(WAITING)
    else:
        job.wait_for(" step        2 | loss")  # a logged step; the signal lands in a later one
    signal_job(job.proc, signal.SIGTERM)
    assert job.wait() != 0, job.text[-3000:]
    log1 = job.text
    if cell == "hsdp_zero2_zero3":  # the first run really trained HSDP + ZeRO-2
        assert "optimizer state sharded zero2 over 2 DP ranks x 2 replicas" in log1, log1[-3000:]
    assert "qwenimage train: stopped by SIGTERM; committed work is kept, rerun to resume" in log1, log1[-3000:]
    train1, _ = _records(out)
    stopped_at = max(train1)
    assert committed_steps(out / "ckpt")[-1] == stopped_at, (committed_steps(out / "ckpt"), stopped_at, log1[-3000:])
    if stop_at == "waiting":
        assert "SIGTERM while waiting for data before step 4" in log1, log1[-3000:]
        assert stopped_at == 4  # every step of the first snapshot, none beyond it
    else:  # in step 3 or 4 (or, on a slow machine, once step 4 waits for data: a stop all the same)
        assert 2 <= stopped_at <= 4, stopped_at

    # Phase 2: the same command in another layout resumes, the cache grows, training ends.
    job = _launch(
        _config(root, cache, val, out, second, prefetch_steps=prefetch_steps, data_parallel=second_dp), nproc=4
    )
    if stop_at == "waiting":
        job.wait_for(f"resumed from {out / 'ckpt'}/step_{stopped_at:08d}")
        grow_cache(cache, "p1", samples_per_bucket=SAMPLES_PER_SNAPSHOT, seed=1)
    else:
        _grow_when_waiting(job, cache)
    assert job.wait() == 0, job.text[-3000:]
    assert f"resumed from {out / 'ckpt'}/step_{stopped_at:08d}" in job.text, job.text[-3000:]
    if cell == "hsdp_zero2_zero3":
        assert "optimizer state sharded zero3 over 2 DP ranks x 1 replicas" in job.text, job.text[-3000:]

    train, val_loss = _records(out)
    ref_train, ref_val = _records(reference)
    assert sorted(train) == list(range(1, STEPS + 1)) == sorted(ref_train)
    for step, (loss, grad_norm) in ref_train.items():
        assert train[step][0] == pytest.approx(loss, abs=1e-5, rel=1e-5), (step, train[step], loss)
        assert train[step][1] == pytest.approx(grad_norm, abs=1e-5, rel=1e-5), (step, train[step], grad_norm)
    assert ref_train[1][0] != ref_train[STEPS][0]  # the run moves
    assert sorted(val_loss) == sorted(ref_val) == [0, 3, 6]
    for step, loss in ref_val.items():
        assert val_loss[step] == pytest.approx(loss, abs=1e-5, rel=1e-5), (step, val_loss[step], loss)

    assert committed_steps(out / "ckpt")[-1] == STEPS
    _assert_weights_equal(_weights(out / "export"), _weights(reference / "export"), "exported weights")
    ema = _ema_export(out, tmp_path / "ema")
    ref_ema = _ema_export(reference, tmp_path / "ref-ema")
    _assert_weights_equal(ema, ref_ema, "EMA weights")
    exported = _weights(out / "export")
    assert any(not torch.equal(ema[k].float(), exported[k].float()) for k in ema)  # EMA is not the weights
