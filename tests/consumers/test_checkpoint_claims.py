"""Must show what the checkpoint / optimizer / precision docs claim, on a single-rank engine (a gloo
world of one in this process, `tiny-16ch`):

* keep-last-N: a run saving every step with ``keep_last: 2`` leaves exactly its own 2 newest
  committed checkpoints, and a checkpoint an earlier run wrote in the same directory survives;
* EMA: the optimizer's EMA is the recursive EMA of the fp32 master weights; the checkpoint holds it
  under ``optim/<name>/ema``; ``export_checkpoint_to_diffusers(..., ema=True)`` writes it;
* bf16 autocast: with ``precision.autocast: bf16`` on an fp32 model the block linears compute in
  bf16 during the training forward; with ``none`` in fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from consumers.engine import TrainEngine
from consumers.optimizer import OptimizerConfig
from consumers.parallel import ParallelLayout, init_distributed, init_parallel, shutdown
from consumers.precision import PrecisionConfig
from megatron_qwenimage.config import load_config
from tests.helpers.consumers import (
    perturb_zero_init,
    run_config,
    single_rank_env,
    synthetic_global_batch,
    to_microbatches,
    write_cache,
)


@pytest.fixture(scope="module")
def world():
    """torch.distributed with one gloo rank for this module (megatron-core groups per test)."""
    with single_rank_env():
        init_distributed()
        try:
            yield
        finally:
            shutdown()


@pytest.fixture
def pstate(world):
    return init_parallel(ParallelLayout())


def _engine(pstate, *, ema_decay: float = 0.0, autocast: str = "none", perturb: bool = True) -> TrainEngine:
    opt = OptimizerConfig(lr=3e-3, warmup_steps=1, weight_decay=0.01, clip_grad=1.0, ema_decay=ema_decay)
    engine = TrainEngine(
        load_config("tiny-16ch", num_layers=2),
        pstate,
        optimizer=opt,
        global_batch_size=2,
        seed=5,
        precision=PrecisionConfig(autocast=autocast),
        init_seed=0,
    )
    if perturb:  # leave the adaLN-Zero init: every parameter gets a gradient and moves
        perturb_zero_init(engine.chunks, engine.optimizer, seed=3)
    return engine


def _step(engine: TrainEngine, step: int):
    return engine.train_step(step, to_microbatches(synthetic_global_batch(step, 2), dp_rank=0, dp=1, micro_batch=2))


def _steps_in(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step_"))


# ------------------------------------------------------------------------------------ keep-last-N
def test_keep_last_keeps_this_runs_newest_and_never_an_earlier_runs(tmp_path, world):
    """An earlier run (another `train` call, so another `CheckpointManager`) leaves step 1 in the
    directory. This run resumes from it and trains 5 steps (1..5) saving after each (interval 1,
    keep_last 2): of its checkpoints 2..6 only 5 and 6 remain, each committed, and step 1 survives.

    Fails if pruning is removed (2, 3, 4 would remain), keeps a different number, deletes the
    oldest instead of its own oldest, or counts/deletes checkpoints it did not write (step 1 gone).
    """
    from consumers.checkpoint import COMMITTED, read_committed
    from consumers.train import RunConfig, train

    cache = write_cache(tmp_path / "cache", samples_per_bucket=8)
    earlier = run_config(cache, tmp_path / "earlier", steps=1, global_batch=2, ckpt_interval=1)
    earlier["checkpoint"].update(dir=str(tmp_path / "ckpt"), keep_last=2)
    assert train(RunConfig.from_dict(earlier))["final_step"] == 1
    root = tmp_path / "ckpt"
    assert _steps_in(root) == [1]
    earlier_record = (root / "step_00000001" / COMMITTED).read_bytes()

    this = run_config(cache, tmp_path / "this", steps=6, global_batch=2, ckpt_interval=1)
    this["checkpoint"].update(dir=str(root), keep_last=2)
    assert train(RunConfig.from_dict(this))["final_step"] == 6
    assert _steps_in(root) == [1, 5, 6]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000005", "step_00000006"]
    for step in (5, 6):
        assert read_committed(root / f"step_{step:08d}")["step"] == step
    assert (root / "step_00000001" / COMMITTED).read_bytes() == earlier_record  # untouched


# ------------------------------------------------------------------------------------------- EMA
def test_ema_is_the_recursive_ema_of_the_master_and_is_checkpointed_and_exported(tmp_path, pstate):
    """3 steps with ema_decay 0.8 from a perturbed init: ``ema_k = d * ema_{k-1} + (1 - d) *
    master_k`` with ``ema_0 = master_0``, from fp32 masters captured after each step, equals the
    optimizer's EMA (fails if the update is dropped, uses the other weight, runs before the
    master update or tracks something else). The checkpoint's ``optim/<name>/ema`` equals it
    exactly (fails if EMA is not saved or saved under another kind); the diffusers export with
    ``ema=True`` holds the EMA (fails if it exports the model weights), with ``ema=False`` the
    master/model weights. The EMA is checked to be far from the final and the initial master.
    """
    import torch.distributed.checkpoint as dcp
    from diffusers import QwenImageTransformer2DModel

    from consumers.checkpoint import CheckpointConfig, CheckpointManager, export_checkpoint_to_diffusers
    from megatron_qwenimage.convert import load_diffusers

    decay, steps = 0.8, 3
    engine = _engine(pstate, ema_decay=decay)
    opt = engine.optimizer
    assert opt.dp == 1  # one rank: each state tensor is the full tensor
    masters = lambda: {n: e["master"].detach().clone() for n, e in opt.state_tensors().items()}  # noqa: E731
    master0 = masters()
    ema = {n: m.clone() for n, m in master0.items()}
    for step in range(steps):
        assert not _step(engine, step).skipped
        for n, m in masters().items():
            ema[n] = decay * ema[n] + (1 - decay) * m
    final = masters()
    got = {n: e["ema"].detach().clone() for n, e in opt.state_tensors().items()}
    assert sorted(got) == sorted(ema)
    for n in ema:
        torch.testing.assert_close(got[n], ema[n], rtol=1e-5, atol=1e-7, msg=n)
    # The checks below can tell EMA from master: they differ (measurably) on the moving tensors.
    moved = [n for n in ema if (final[n] - master0[n]).abs().max() > 1e-3]
    assert len(moved) > len(ema) // 2, (len(moved), len(ema))
    for n in moved:
        assert (ema[n] - final[n]).abs().max() > 1e-4 and (ema[n] - master0[n]).abs().max() > 1e-4, n

    ckpt = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt")), pstate).save(steps, engine, {})
    md = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert {k for k in md if k.endswith("/ema")} == {f"optim/{n}/ema" for n in ema}
    saved = {
        f"optim/{n}/{kind}": torch.empty(tuple(md[f"optim/{n}/{kind}"].size), dtype=torch.float32)
        for n in ema
        for kind in ("ema", "master")
    }
    dcp.load(saved, checkpoint_id=str(ckpt), no_dist=True)
    for n in ema:
        assert torch.equal(saved[f"optim/{n}/ema"], got[n]), n
        assert torch.equal(saved[f"optim/{n}/master"], final[n]), n

    export_checkpoint_to_diffusers(ckpt, tmp_path / "ema", ema=True)
    export_checkpoint_to_diffusers(ckpt, tmp_path / "model", ema=False)
    # diffusers reads the export; img_in is named alike in both models.
    exported = QwenImageTransformer2DModel.from_pretrained(tmp_path / "ema")
    w = exported.img_in.weight.detach().float()
    assert torch.equal(w, got["img_in.weight"])
    assert not torch.allclose(w, final["img_in.weight"], rtol=0, atol=1e-4)
    # Every parameter, read back by canonical name.
    ema_model = dict(load_diffusers(tmp_path / "ema").named_parameters())
    plain_model = dict(load_diffusers(tmp_path / "model").named_parameters())
    assert sorted(ema_model) == sorted(ema) == sorted(plain_model)
    for n in ema:
        assert torch.equal(ema_model[n].detach().float(), got[n]), n
        assert torch.equal(plain_model[n].detach().float(), final[n]), n


# ------------------------------------------------------------------------------------ bf16 autocast
@pytest.mark.parametrize("autocast,expect", [("bf16", torch.bfloat16), ("none", torch.float32)])
def test_autocast_setting_decides_the_block_linear_dtype(pstate, autocast, expect):
    """A forward hook on block 0's ``img_qkv`` (and the last block's ``img_mlp.fc2``) records the
    output dtype during `TrainEngine.train_step` on an fp32 model: bf16 under ``autocast: bf16``
    (fails if the engine's forward does not enter ``torch.autocast``), fp32 under ``none`` (fails
    if autocast is always on). Parameters and the fp32 master stay fp32 either way, and the step
    updates them (a finite loss, not skipped)."""
    engine = _engine(pstate, autocast=autocast, perturb=False)
    model = engine.chunks[0]
    assert engine.model_config.torch_dtype == torch.float32
    first, last = model.blocks["0"], model.blocks[str(len(model.blocks) - 1)]
    seen: dict[str, list[torch.dtype]] = {"qkv": [], "fc2": []}

    def record(key):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[key].append(out.dtype)

        return hook

    handles = [
        first.img_qkv.register_forward_hook(record("qkv")),
        last.img_mlp.fc2.register_forward_hook(record("fc2")),
    ]
    try:
        result = _step(engine, 0)
    finally:
        for h in handles:
            h.remove()
    assert seen["qkv"] and seen["fc2"], seen  # the hooks ran during the training forward
    assert set(seen["qkv"]) == {expect} and set(seen["fc2"]) == {expect}, seen
    assert not result.skipped and torch.isfinite(torch.tensor(result.loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(e["master"].dtype == torch.float32 for e in engine.optimizer.state_tensors().values())


# ------------------------------------------------------------------------- FP8 weight cast window
def test_each_step_and_evaluation_recasts_fp8_weights_once(pstate):
    """megatron-core's TE linears reuse their FP8 weight copy while ``is_first_microbatch`` is
    False and set it False after every forward. The engine must set it True before each step's
    (and each evaluation's) first micro-batch, or FP8 training would keep its first step's
    weights. A block linear given the flag records what each forward sees: two steps of two
    micro-batches each, then one evaluation of two."""
    engine = _engine(pstate)
    linear = engine.chunks[0].blocks["0"].img_qkv
    linear.is_first_microbatch, linear.disable_parameter_transpose_cache = True, False
    seen: list[bool] = []

    def record(module, args):
        seen.append(module.is_first_microbatch)
        module.is_first_microbatch = False  # what megatron-core's TELinear.forward does

    linear.register_forward_pre_hook(record)
    for step in range(2):
        engine.train_step(step, to_microbatches(synthetic_global_batch(step, 2), dp_rank=0, dp=1, micro_batch=1))
    engine.eval_local_loss(-1, to_microbatches(synthetic_global_batch(5, 2), dp_rank=0, dp=1, micro_batch=1), 0.5, 2)
    assert seen == [True, False, True, False, True, False]
