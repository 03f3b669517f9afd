"""Worker bodies of the checkpoint tests (spawned gloo ranks)."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from consumers.checkpoint import CheckpointConfig, CheckpointManager
from consumers.data_parallel import DataParallelConfig
from consumers.engine import TrainEngine
from consumers.parallel import ParallelLayout, init_parallel
from megatron_qwenimage.config import load_config
from tests.consumers.layout_workers import (
    GLOBAL_BATCH,
    MODEL,
    OPT,
    OPT_EMA,
    PERTURB_SEED,
    RTOL,
    SCALE_ATOL,
    SEED,
    step_task,
)
from tests.helpers.consumers import (
    compare_states,
    gather_training_state,
    perturb_zero_init,
    synthetic_global_batch,
    to_microbatches,
)


def _engine(
    layout: ParallelLayout, *, optimizer=OPT, perturb: bool = False, data_parallel: DataParallelConfig | None = None
):
    """A `TrainEngine` at `layout`; `perturb`: leave the adaLN-Zero init (`perturb_zero_init`,
    model and fp32 master / EMA alike) right after building it, so every tensor gets gradients."""
    pstate = init_parallel(layout)
    engine = TrainEngine(
        load_config("tiny-16ch", **MODEL),
        pstate,
        optimizer=optimizer,
        data_parallel=data_parallel or DataParallelConfig(),
        seed=SEED,
        global_batch_size=GLOBAL_BATCH,
        init_seed=0,
    )
    if perturb:
        perturb_zero_init(engine.chunks, engine.optimizer, seed=PERTURB_SEED)
    return pstate, engine


def _run(engine, pstate, steps) -> list[float]:
    out = []
    for step in steps:
        task = step_task(step)
        mbs = to_microbatches(
            synthetic_global_batch(step, GLOBAL_BATCH, task=task),
            dp_rank=pstate.dp_rank,
            dp=pstate.layout.dp,
            micro_batch=1,
            task=task,
        )
        out.append(engine.train_step(step, mbs).loss)
    return out


class _States:
    """Full training states gathered on rank 0 (`gather_training_state`) and their comparisons."""

    def __init__(self):
        self.checks: dict[str, dict] = {}

    @staticmethod
    def gather(engine):
        gathered = gather_training_state(engine, dst=0)
        dist.barrier()
        return None if gathered is None else gathered[0]

    def check(self, label: str, engine, ref, *, exact: bool = False):
        """Gather `engine`'s state and compare it with `ref` (rank 0): bit-exact for a state just
        loaded from the checkpoint that holds `ref`, else the layout tests' fp32 tolerance."""
        state = self.gather(engine)
        if state is not None:
            tol = dict(rtol=0.0, scale_atol=0.0) if exact else dict(rtol=RTOL, scale_atol=SCALE_ATOL)
            mismatches, worst = compare_states(state, ref, **tol)
            self.checks[label] = {
                "mismatches": mismatches,
                "worst": worst,
                "compared": sorted(state),
                "kinds": sorted({k for v in state.values() for k in v}),
            }
        return state


def reshard_worker(rank: int, world: int, root: str) -> dict:
    """TP2·PP2 -> TP1·DP4 as HSDP (optimizer state sharded over 2, replicated twice) with ZeRO-3
    (parameters freed between uses, written from the master shards) -> TP2·PP2 with EMA, from a
    perturbed (non adaLN-Zero) init.

    Rank 0 gathers every parameter, fp32 master, exp_avg, exp_avg_sq and EMA by canonical name:
    of the uninterrupted run after 2, 3 and 4 steps, and of each resumed run right after its load
    (bit-exact against the saved state, within tolerance of the uninterrupted one) and after its
    remaining step (within tolerance of the uninterrupted one). Comparisons are in ``checks``.
    """
    a = ParallelLayout(tp=2, pp=2, dp=1, sequence_parallel=True)
    b = ParallelLayout(tp=1, pp=1, dp=4, dp_shard=2)
    ZERO3 = DataParallelConfig(sharding="zero3")
    states = _States()
    # Uninterrupted run at TP2·PP2, checkpoint after 2 steps.
    pstate, engine = _engine(a, optimizer=OPT_EMA, perturb=True)
    ckpt = CheckpointManager(CheckpointConfig(dir=f"{root}/a", keep_last=2), pstate)
    uninterrupted = _run(engine, pstate, [0, 1])
    ref = {2: states.gather(engine)}
    ckpt.save(2, engine, {"reader": {"step": 2}})
    uninterrupted += _run(engine, pstate, [2])
    ref[3] = states.gather(engine)
    uninterrupted += _run(engine, pstate, [3])
    ref[4] = states.gather(engine)
    # Resume at TP1·DP4 from the TP2·PP2 checkpoint; checkpoint again after step 2.
    pstate, engine = _engine(b, optimizer=OPT_EMA, perturb=True, data_parallel=ZERO3)
    meta = CheckpointManager(CheckpointConfig(dir=f"{root}/a"), pstate).load_latest(engine)
    assert meta is not None and meta["step"] == 2 and meta["reader"] == {"step": 2}
    states.check("b_loaded", engine, ref[2], exact=True)
    resumed_b = _run(engine, pstate, [2])
    saved_b = states.check("b_step2", engine, ref[3])
    saver = CheckpointManager(CheckpointConfig(dir=f"{root}/b", async_save=True), pstate)
    saver.save(3, engine, {})
    saver.finalize()
    # Back to TP2·PP2 (other direction) from the TP1·DP4 checkpoint.
    pstate, engine = _engine(a, optimizer=OPT_EMA, perturb=True)
    mgr = CheckpointManager(CheckpointConfig(dir=f"{root}/b"), pstate)
    assert mgr.load_latest(engine)["step"] == 3
    states.check("a_loaded_exact", engine, saved_b, exact=True)
    states.check("a_loaded", engine, ref[3])
    resumed_a = _run(engine, pstate, [3])
    states.check("a_step3", engine, ref[4])
    # A corrupted newest checkpoint and a partial one are refused; the previous one is used.
    if rank == 0:
        os.makedirs(f"{root}/a/step_00000009")  # partial: no COMMITTED marker
    ckpt_a = CheckpointManager(CheckpointConfig(dir=f"{root}/a", keep_last=3), pstate)
    ckpt_a.save(4, engine, {"tag": "newest"})
    if rank == 0:
        victim = sorted(Path(root, "a", "step_00000004").glob("*.distcp"))[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different content: only sha256 catches it
        victim.write_bytes(bytes(data))
    dist.barrier()
    meta = ckpt_a.load_latest(engine)
    states.check("fallback_loaded", engine, ref[2], exact=True)
    return {
        "uninterrupted": uninterrupted,
        "resumed_b": resumed_b,
        "resumed_a": resumed_a,
        "fallback_step": meta["step"],
        "refused": ckpt_a.refused,
        "checks": states.checks,
    }


# ------------------------------------------------------------------ resume policy / pruning / async
def _flip_a_byte(directory: Path) -> None:
    victim = sorted(directory.glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only sha256 catches it
    victim.write_bytes(bytes(data))


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit())


def _refusal(fn) -> str:
    from consumers.checkpoint import ResumeRefused

    try:
        fn()
    except ResumeRefused as exc:
        return str(exc)
    raise AssertionError("expected ResumeRefused")


def resume_policy_worker(rank: int, world: int, root: str) -> dict:
    """DP2: resume modes, refusal messages, model-config check, prune-only-own, fallback + set-aside."""
    layout = ParallelLayout(tp=1, pp=1, dp=2)
    pstate, engine = _engine(layout)
    out: dict = {}
    cfg = lambda d, **kw: CheckpointConfig(dir=f"{root}/{d}", **kw)  # noqa: E731
    # auto on an empty (missing) dir: fresh start; required: refused; never: fine.
    out["auto_empty"] = CheckpointManager(cfg("empty"), pstate).load_latest(engine)
    out["required_empty"] = _refusal(
        lambda: CheckpointManager(cfg("empty", resume="required"), pstate).load_latest(engine)
    )
    out["never_empty"] = CheckpointManager(cfg("empty", resume="never"), pstate).load_latest(engine)
    # Two committed checkpoints, both corrupted: auto refuses naming each, deletes nothing.
    a = CheckpointManager(cfg("bad", keep_last=5), pstate)
    _run(engine, pstate, [0])
    a.save(1, engine, {})
    a.save(2, engine, {})
    if rank == 0:
        _flip_a_byte(Path(root, "bad", "step_00000001"))
        _flip_a_byte(Path(root, "bad", "step_00000002"))
    dist.barrier()
    out["auto_bad"] = _refusal(lambda: CheckpointManager(cfg("bad"), pstate).load_latest(engine))
    out["required_bad"] = _refusal(lambda: CheckpointManager(cfg("bad", resume="required"), pstate).load_latest(engine))
    out["never_bad"] = _refusal(lambda: CheckpointManager(cfg("bad", resume="never"), pstate).load_latest(engine))
    out["never_bad_load_false"] = _refusal(
        lambda: CheckpointManager(cfg("bad", load=False), pstate).load_latest(engine)
    )
    out["bad_after"] = _steps(Path(root, "bad"))
    # A checkpoint of another architecture is refused naming the field and both values.
    other = TrainEngine(
        load_config("tiny-16ch", **{**MODEL, "num_layers": 2}),
        pstate,
        optimizer=OPT,
        seed=SEED,
        global_batch_size=GLOBAL_BATCH,
        init_seed=0,
    )
    CheckpointManager(cfg("arch"), pstate).save(1, other, {})
    out["arch"] = _refusal(lambda: CheckpointManager(cfg("arch"), pstate).load_latest(engine))
    # An earlier run wrote steps 1..3 and 4 (then corrupted); this run falls back to 3,
    # saves 4 (the corrupt one is set aside, not deleted), 5, 6 with keep_last 2: only its own
    # step 4 is pruned; the earlier run's 1, 2, 3 stay.
    pstate, engine = _engine(layout)
    earlier = CheckpointManager(cfg("prune", keep_last=4), pstate)
    for s in (1, 2, 3):
        earlier.save(s, engine, {"reader": {"step": s}})
    earlier.save(4, engine, {"reader": {"step": 4}})
    if rank == 0:
        _flip_a_byte(Path(root, "prune", "step_00000004"))
    dist.barrier()
    out["prune_before"] = _steps(Path(root, "prune"))
    later = CheckpointManager(cfg("prune", keep_last=2), pstate)
    out["fallback"] = later.load_latest(engine)["step"]
    out["fallback_refused"] = later.refused
    for s in (4, 5, 6):
        later.save(s, engine, {})
    dist.barrier()
    out["prune_after"] = _steps(Path(root, "prune"))
    out["set_aside"] = sorted(p.name for p in Path(root, "prune").iterdir() if ".replaced-" in p.name)
    out["later_saved"] = later.saved_steps
    return out


def async_poll_worker(rank: int, world: int, root: str, wait_s: float) -> dict:
    """TP2: an async save at step 1 with interval 100 is committed by `poll` while training goes on;
    the checkpoint holds the state at the save, not the state after the following steps."""
    import time

    import torch

    pstate, engine = _engine(ParallelLayout(tp=2, pp=1, dp=1))
    _run(engine, pstate, [0])
    at_save = {n: t.detach().clone() for c in engine.chunks for n, t in c.named_model_tensors()}
    mgr = CheckpointManager(CheckpointConfig(dir=root, interval=100, async_save=True), pstate)
    final = mgr.save(1, engine, {"reader": {"step": 1}})
    _run(engine, pstate, [1])  # changes the live tensors while the write may still be running
    committed_by = None
    polls = 0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        polls += 1
        if mgr.poll() is not None:
            committed_by = polls
            break
        time.sleep(0.05)
    flag = torch.tensor([1 if committed_by else 0])
    dist.all_reduce(flag)
    committed = (final / "COMMITTED").is_file()
    pending_after = mgr._pending is not None
    mgr.finalize()
    pstate, fresh = _engine(ParallelLayout(tp=2, pp=1, dp=1))
    meta = CheckpointManager(CheckpointConfig(dir=root), pstate).load_latest(fresh)
    same = all(torch.equal(t, at_save[n]) for c in fresh.chunks for n, t in c.named_model_tensors())
    return {
        "committed_by_poll": committed_by,
        "all_ranks": int(flag),
        "committed": committed,
        "pending_after": pending_after,
        "loaded_step": meta["step"],
        "equals_state_at_save": same,
        "staged_on_host": all(v.to_local().device.type == "cpu" for v in (mgr._staged or {}).values()),
    }
