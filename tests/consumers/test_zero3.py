"""ZeRO-3 frees every block's parameters between its uses, and gathers them back just in time.

Two gloo ranks train `consumers.engine.TrainEngine` (DP2, tiny-16ch, 5 blocks) with
``data_parallel.sharding: zero3`` and two micro-batches per rank per step. Module hooks placed
after the engine's record which blocks hold allocated parameter storage; the optimizer's
`ParameterResharding.events` records each unit's gathers (launched), lands and frees. Nothing is
timed. Shown:

* while a block's forward runs, it is the only block whose parameters are allocated (the next
  one's all-gather is already in flight); when its forward returns, its parameters are freed;
* every block is gathered twice per micro-batch (forward and backward) and freed twice; one block
  at a time is allocated (five without resharding): a block's backward frees it before the
  gradients reach the block before it;
* the next unit's all-gather is launched before the current one is freed, in both directions
  (prefetch), and never more than `param_gather_depth` are in flight;
* between steps and after validation no parameter storage is allocated;
* full activation recompute (each block's forward re-run inside the backward) works under ZeRO-3,
  and the losses and grad norms equal ZeRO-1's (the layout tests compare every tensor).
"""

from __future__ import annotations

import pytest

from tests.helpers.consumers import spawn, synthetic_global_batch, to_microbatches

LAYERS = 5
GLOBAL_BATCH = 4
STEPS = 2


def _worker(rank: int, world: int, sharding: str, recompute: str, keep_params: bool = False) -> dict:
    import torch.distributed as dist

    from consumers.data_parallel import DataParallelConfig
    from consumers.engine import TrainEngine
    from consumers.optimizer import OptimizerConfig
    from consumers.parallel import ParallelLayout, init_parallel
    from consumers.recompute import RecomputeConfig
    from megatron_qwenimage.config import load_config

    pstate = init_parallel(ParallelLayout(dp=world))
    engine = TrainEngine(
        load_config("tiny-16ch", num_layers=LAYERS),
        pstate,
        optimizer=OptimizerConfig(lr=1e-3, clip_grad=1.0),
        data_parallel=DataParallelConfig(sharding=sharding),
        recompute=RecomputeConfig(mode=recompute),
        seed=3,
        global_batch_size=GLOBAL_BATCH,
    )
    opt = engine.optimizer
    resharding = opt.resharding
    if keep_params:  # the break on purpose: parameters are never freed
        resharding.free = lambda i: None
    blocks = engine.chunks[0].blocks
    block_params = {k: list(b.parameters()) for k, b in blocks.items()}

    def allocated() -> list[str]:
        return [k for k, ps in block_params.items() if all(p.untyped_storage().nbytes() > 0 for p in ps)]

    trace: list = []  # ("fwd" | "fwd_end", block, allocated blocks)
    for key, block in blocks.items():
        block.register_forward_pre_hook(lambda m, a, k=key: trace.append(["fwd", k, allocated()]))
        block.register_forward_hook(lambda m, a, o, k=key: trace.append(["fwd_end", k, allocated()]))
    between_steps, losses, norms, events = [], [], [], []
    in_flight_max = 0
    if resharding is not None:
        launch = resharding._launch

        def counting_launch(i):
            nonlocal in_flight_max
            launch(i)
            in_flight_max = max(in_flight_max, len(resharding._in_flight))

        resharding._launch = counting_launch
    for step in range(STEPS):
        trace.append(["step", step, []])
        if resharding is not None:
            resharding.events.clear()
        mbs = to_microbatches(
            synthetic_global_batch(step, GLOBAL_BATCH), dp_rank=pstate.dp_rank, dp=world, micro_batch=1
        )
        r = engine.train_step(step, mbs)
        losses.append(r.loss)
        norms.append(r.grad_norm)
        if resharding is not None:
            events.append([list(e) for e in resharding.events])
        between_steps.append(sum(p.untyped_storage().nbytes() for c in engine.chunks for p in c.parameters()))
    engine.eval_local_loss(-1, mbs, 0.5, GLOBAL_BATCH)
    after_eval = sum(p.untyped_storage().nbytes() for c in engine.chunks for p in c.parameters())
    dist.barrier()
    return {
        "trace": trace,
        "events": events,
        "units": [u.name for u in opt.units],
        "between_steps": between_steps,
        "after_eval": after_eval,
        "loss": losses,
        "grad_norm": norms,
        "in_flight_max": in_flight_max,
        "depth": opt.dp_config.param_gather_depth,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    return {
        "zero3": spawn(_worker, 2, root / "zero3", "zero3", "none"),
        "zero3_recompute": spawn(_worker, 2, root / "zero3_recompute", "zero3", "full"),
        "zero1": spawn(_worker, 2, root / "zero1", "zero1", "none"),
    }


def _forward_trace_problems(trace: list) -> list[str]:
    """What is wrong with a trace of block forwards under ZeRO-3 (empty: nothing)."""
    problems = []
    for kind, block, alloc in trace:
        if kind == "fwd" and alloc != [block]:
            problems.append(f"block {block} forward starts with blocks {alloc} allocated")
        if kind == "fwd_end" and alloc:
            problems.append(f"block {block} forward ended with blocks {alloc} still allocated")
    return problems


def _max_allocated_blocks(events: list, units: list[str]) -> int:
    live, peak = set(), 0
    for kind, i in events:
        if not units[i].startswith("blocks."):
            continue
        if kind == "land":
            live.add(i)
        elif kind == "free":
            live.discard(i)
        peak = max(peak, len(live))
    return peak


def test_a_block_holds_its_parameters_only_while_it_runs(runs):
    for rank, res in runs["zero3"].items():
        fwd = [t for t in res["trace"] if t[0] != "step"]
        # pre + post hook per block, 2 micro-batches per step and in the validation pass
        assert len(fwd) == 2 * LAYERS * 2 * (STEPS + 1), (rank, len(fwd))
        assert not _forward_trace_problems(res["trace"]), (rank, _forward_trace_problems(res["trace"])[:3])
        assert res["between_steps"] == [0] * STEPS, rank
        assert res["after_eval"] == 0, rank


def test_each_block_is_gathered_and_freed_twice_per_micro_batch(runs):
    for rank, res in runs["zero3"].items():
        units = res["units"]
        blocks = [i for i, n in enumerate(units) if n.startswith("blocks.")]
        assert len(blocks) == LAYERS
        for step_events in res["events"]:
            for i in blocks:
                for kind in ("gather", "land", "free"):
                    assert step_events.count([kind, i]) == 4, (rank, units[i], kind, step_events)
            assert _max_allocated_blocks(step_events, units) == 1, (rank, step_events)
        assert res["in_flight_max"] <= res["depth"], rank


def test_the_next_gather_is_launched_before_the_current_unit_is_freed(runs):
    """Prefetch: in the forward, unit i+1's gather is issued before block i is freed; in the
    backward, unit i-1's before block i is freed again."""
    for rank, res in runs["zero3"].items():
        units = res["units"]
        blocks = [i for i, n in enumerate(units) if n.startswith("blocks.")]
        for ev in res["events"]:
            for i in blocks:
                frees = [k for k, e in enumerate(ev) if e == ["free", i]]
                gathers_next = [k for k, e in enumerate(ev) if e == ["gather", i + 1]]
                gathers_prev = [k for k, e in enumerate(ev) if e == ["gather", i - 1]]
                fwd_frees, bwd_frees = frees[0::2], frees[1::2]
                if i + 1 < len(units):  # a micro-batch's forward: free i after launching i+1
                    for f in fwd_frees:
                        assert any(g < f for g in gathers_next), (rank, units[i], ev)
                if i - 1 >= 0 and units[i - 1].startswith("blocks."):  # its backward: i-1 launched first
                    for f in bwd_frees:
                        assert any(g < f for g in gathers_prev), (rank, units[i], ev)


def test_recompute_and_zero1_give_the_same_numbers(runs):
    z3, rc, z1 = (runs[k][0] for k in ("zero3", "zero3_recompute", "zero1"))
    assert z3["loss"] == pytest.approx(z1["loss"], rel=1e-6, abs=1e-7)
    assert z3["grad_norm"] == pytest.approx(z1["grad_norm"], rel=1e-5, abs=1e-7)
    assert rc["loss"] == pytest.approx(z3["loss"], rel=1e-6, abs=1e-7)
    assert rc["grad_norm"] == pytest.approx(z3["grad_norm"], rel=1e-5, abs=1e-7)
    assert not _forward_trace_problems(rc["trace"])
    assert rc["between_steps"] == [0] * STEPS
    assert z1["between_steps"][0] > 0  # the check sees allocated parameters when they are


def test_the_check_fails_when_parameters_are_never_freed(tmp_path):
    res = spawn(_worker, 2, tmp_path / "kept", "zero3", "none", True)[0]
    assert _forward_trace_problems(res["trace"])  # blocks stay allocated
    assert res["between_steps"][-1] > 0
    assert _max_allocated_blocks(res["events"][0], res["units"]) == LAYERS
