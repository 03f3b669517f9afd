"""The DP engine hides its communication: the order in which it issues its collectives.

Two gloo ranks run `consumers.engine.TrainEngine` (DP2; tiny-16ch, 3 blocks) with the overlap on
(the default) and off, and record, in one list per rank, the reduce-scatters and all-gathers the
optimizer issues (`consumers.optimizer.reduce_scatter_single` / ``all_gather_single`` wrapped)
between the blocks' forward starts and backward ends (module hooks). No timing: on gloo the CPU
shows the order of issue, which is what the overlap is made of.

* one micro-batch per step: the first reduce-scatter is issued while blocks still have their
  backward to run (before block 0's backward ends), one per unit, in reverse forward order; the
  next step's first all-gathers are issued before block 0's forward, and later units' gathers are
  issued during the forward (after block 0's forward has started), never all up front;
* two micro-batches (deferred sync): no reduce-scatter before the second micro-batch's forward;
* overlap off (today's engine): every reduce-scatter after the last backward, every all-gather
  before the next forward: the test's own check that it can tell the two apart;
* the losses and grad norms are the same with the overlap on and off, and the parameters equal
  the fp32 master weights once `finish_param_sync` returns.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers.consumers import spawn, synthetic_global_batch, to_microbatches

NUM_LAYERS = 3
GLOBAL_BATCH = 4


def _order_worker(
    rank: int,
    world: int,
    overlap: bool,
    micro_batch: int,
    steps: int,
    pp: int = 1,
    layers: int = NUM_LAYERS,
    sharding: str = "zero1",
) -> dict:
    import consumers.optimizer as optimizer_module
    from consumers.data_parallel import DataParallelConfig
    from consumers.engine import TrainEngine
    from consumers.optimizer import OptimizerConfig
    from consumers.parallel import ParallelLayout, init_parallel
    from megatron_qwenimage.config import load_config

    events: list[list] = []
    units: list[str] = []

    def recording(kind, fn):
        def wrapped(output, input, *args, **kwargs):
            # The unit a collective belongs to: the one whose buffer it reads or writes (ZeRO-2's
            # slots serve every unit: its launches are recorded where the slot names the unit).
            ptr = output.data_ptr() if kind == "rs" else input.data_ptr()
            if ptr in unit_at:
                events.append([kind, unit_at[ptr]])
            return fn(output, input, *args, **kwargs)

        return wrapped

    optimizer_module.reduce_scatter_single = recording("rs", optimizer_module.reduce_scatter_single)
    optimizer_module.all_gather_single = recording("ag", optimizer_module.all_gather_single)

    pstate = init_parallel(ParallelLayout(pp=pp, dp=world // pp))
    dp_config = DataParallelConfig(overlap_grad_reduce=overlap, overlap_param_gather=overlap, sharding=sharding)
    engine = TrainEngine(
        load_config("tiny-16ch", num_layers=layers),
        pstate,
        optimizer=OptimizerConfig(lr=1e-3, clip_grad=1.0),
        data_parallel=dp_config,
        seed=3,
        global_batch_size=GLOBAL_BATCH,
    )
    opt = engine.optimizer
    units = [u.name for u in opt.units]
    if opt._slots is not None:
        launch = opt._slots._launch
        opt._slots._launch = lambda ui: (events.append(["rs", units[ui]]), launch(ui))[1]
    unit_at = {}
    for i, u in enumerate(opt.units):
        unit_at[u.reduced.data_ptr()] = u.name  # reduce-scatter output (ZeRO-1)
        for master, send, _, _ in opt._gather_plan[i]:
            unit_at[(master if send is None else send).data_ptr()] = u.name  # all-gather input
    for key, block in engine.chunks[0].blocks.items():
        # prepend: recorded before the optimizer's own hook waits for the block's gather.
        block.register_forward_pre_hook(lambda m, a, k=key: events.append(["fwd", f"blocks.{k}"]), prepend=True)
        block.register_full_backward_hook(lambda m, gi, go, k=key: events.append(["bwd_end", f"blocks.{k}"]))
    losses, norms = [], []
    for step in range(steps):
        events.append(["step", step])
        batches = to_microbatches(
            synthetic_global_batch(step, GLOBAL_BATCH),
            dp_rank=pstate.dp_rank,
            dp=pstate.layout.dp,
            micro_batch=micro_batch,
        )
        result = engine.train_step(step, batches)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    opt.finish_param_sync()
    params_equal_master = all(
        torch.equal(
            s.param.detach().view(s.rows, s.cols)[s.row_start : s.row_end],
            opt.master[s.name].view(-1, s.cols).to(s.param.dtype),
        )
        for s in opt.shards
    )
    dist.barrier()
    blocks = [f"blocks.{k}" for k in engine.chunks[0].blocks]
    return {
        "events": events,
        "units": units,
        "blocks": blocks,
        "loss": losses,
        "grad_norm": norms,
        "params_equal": params_equal_master,
    }


def _step_events(events: list, step: int) -> list:
    """The events of `step` (from its marker to the next)."""
    start = events.index(["step", step])
    nxt = events.index(["step", step + 1]) if ["step", step + 1] in events else len(events)
    return events[start + 1 : nxt]


def _first(events: list, kind: str, name: str | None = None) -> int:
    return next(i for i, (k, n) in enumerate(events) if k == kind and (name is None or n == name))


def _last(events: list, kind: str, name: str | None = None) -> int:
    return max(i for i, (k, n) in enumerate(events) if k == kind and (name is None or n == name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_overlap")
    out = {
        (overlap, micro): spawn(_order_worker, 2, root / f"{overlap}_{micro}", overlap, micro, 3)
        for overlap, micro in ((True, 2), (False, 2), (True, 1))
    }
    out["pp2_dp2"] = spawn(_order_worker, 4, root / "pp2_dp2", True, 1, 2, 2, 4)  # blocks 0-1 | 2-3
    out["zero2"] = spawn(_order_worker, 2, root / "zero2", True, 1, 2, 1, 4, "zero2")  # two micro-batches
    return out


def test_reduce_scatters_start_during_the_backward_in_reverse_unit_order(runs):
    for rank, res in runs[(True, 2)].items():  # micro-batch 2 of a 4-sample global batch: one per DP rank
        units = res["units"]
        for step in range(3):
            ev = _step_events(res["events"], step)
            rs = [n for k, n in ev if k == "rs"]
            assert rs == units[::-1], (rank, step, rs)  # one per unit, the order the backward completes them
            # The first reduce-scatter (the head's) is issued before any block's backward ends, and
            # block 2's before blocks 1 and 0 have run their backward.
            assert _first(ev, "rs") < _first(ev, "bwd_end"), (rank, step)
            assert _first(ev, "rs", "blocks.2") < _first(ev, "bwd_end", "blocks.1"), (rank, step)
            assert _first(ev, "rs", "blocks.1") < _first(ev, "bwd_end", "blocks.0"), (rank, step)


def test_all_gathers_run_ahead_of_the_next_forward_unit_by_unit(runs):
    for rank, res in runs[(True, 2)].items():
        units = res["units"]
        for step in (1, 2):  # the gathers of the update made at the end of the previous step
            prev = _step_events(res["events"], step - 1)
            ev = _step_events(res["events"], step)
            ag_before = [n for k, n in prev[_last(prev, "rs") :] if k == "ag"]
            ag_during = [n for k, n in ev[: _first(ev, "rs")] if k == "ag"]  # before this step's own update
            assert ag_before + ag_during == units, (rank, step)  # each unit once, in forward order
            assert ag_before == units[:2], (rank, step)  # the first two (depth 2) are in flight before the forward
            # Later units are gathered while the forward runs, each as the unit two before it is
            # consumed: block 2's once block 0's forward starts, the head's once block 1's does.
            order = [_first(ev, "fwd", "blocks.0"), _first(ev, "ag", "blocks.2"), _first(ev, "fwd", "blocks.1")]
            order += [_first(ev, "ag", "head"), _first(ev, "fwd", "blocks.2")]
            assert order == sorted(order), (rank, step, ev)


def test_several_micro_batches_defer_the_reduce_scatter_to_the_last_backward(runs):
    for rank, res in runs[(True, 1)].items():  # two micro-batches per rank per step
        for step in range(3):
            ev = _step_events(res["events"], step)
            forwards = [i for i, (k, n) in enumerate(ev) if k == "fwd" and n == "blocks.0"]
            assert len(forwards) == 2, (rank, step)
            assert _first(ev, "rs") > forwards[1], (rank, step)  # nothing during the first micro-batch
            assert _first(ev, "rs") < _last(ev, "bwd_end", "blocks.0"), (rank, step)  # still overlapped


def test_without_overlap_every_collective_waits_for_the_whole_backward(runs):
    for rank, res in runs[(False, 2)].items():
        for step in (1, 2):
            ev = _step_events(res["events"], step)
            assert _first(ev, "rs") > _last(ev, "bwd_end"), (rank, step)
            assert not any(k == "ag" for k, _ in ev[: _first(ev, "rs")]), (rank, step)  # gathered after the update


def test_overlap_changes_no_number(runs):
    on, off = runs[(True, 2)], runs[(False, 2)]
    for rank in (0, 1):
        assert on[rank]["loss"] == off[rank]["loss"]
        assert on[rank]["grad_norm"] == off[rank]["grad_norm"]
        assert on[rank]["params_equal"] and off[rank]["params_equal"]
    assert on[0]["loss"] == on[1]["loss"]


def test_under_pp_each_stage_overlaps_its_last_backward(runs):
    """PP2 x DP2, two micro-batches per rank under 1F1B: on each stage the reduce-scatters wait for
    the last micro-batch's backward and are issued during it; the gathers run ahead of the forward."""
    for rank, res in runs["pp2_dp2"].items():
        units, first_block = res["units"], res["blocks"][0]
        assert ("embed" in units) == (rank in (0, 1)) and ("head" in units) == (rank in (2, 3)), (rank, units)
        for step in range(2):
            ev = _step_events(res["events"], step)
            assert [n for k, n in ev if k == "rs"] == units[::-1], (rank, step)
            assert _first(ev, "rs") > _last(ev, "fwd", first_block), (rank, step)  # deferred to the last micro-batch
            assert _first(ev, "rs") < _last(ev, "bwd_end", first_block), (rank, step)  # during its backward
        ev = _step_events(res["events"], 1)
        gathered = [n for k, n in ev[: _first(ev, "rs")] if k == "ag"]
        assert gathered == units[2:], (rank, gathered)  # the first two were issued at the end of step 0
        assert len(units) == 3, units  # embed, blocks.0, blocks.1 | blocks.2, blocks.3, head
    first_stage, last_stage = runs["pp2_dp2"][0], runs["pp2_dp2"][2]
    assert first_stage["loss"] == last_stage["loss"]  # the last stage's loss, on every rank


def test_zero2_reduces_each_micro_batch_during_its_backward(runs):
    """ZeRO-2 (two micro-batches per rank, 4 blocks): every unit is reduce-scattered once per
    micro-batch, in reverse order, the first micro-batch's before its backward has left block 0."""
    for rank, res in runs["zero2"].items():
        units = res["units"]
        assert len({n for n in units}) == len(units) == 6
        for step in range(2):
            ev = _step_events(res["events"], step)
            rs = [n for k, n in ev if k == "rs"]
            assert rs == units[::-1] * 2, (rank, step, rs)
            first_bwd_end_block0 = _first(ev, "bwd_end", "blocks.0")
            assert _first(ev, "rs", "blocks.1") < first_bwd_end_block0, (rank, step)
            second_forward = [i for i, (k, n) in enumerate(ev) if k == "fwd" and n == "blocks.0"][1]
            assert sum(1 for k, _ in ev[:second_forward] if k == "rs") == len(units), (rank, step)
    assert runs["zero2"][0]["loss"] == runs["zero2"][1]["loss"]


def test_combinations_that_cannot_work_are_one_line_refusals():
    from consumers.data_parallel import DataParallelConfig
    from consumers.train import RunConfig
    from megatron_qwenimage.config import ConfigError

    with pytest.raises(ConfigError, match=r"^data_parallel.sharding=zero2 needs overlap_grad_reduce: true \("):
        DataParallelConfig(sharding="zero2", overlap_grad_reduce=False)
    with pytest.raises(ConfigError, match=r"^data_parallel.sharding=zero3 needs overlap_grad_reduce: true \("):
        DataParallelConfig(sharding="zero3", overlap_grad_reduce=False)
    with pytest.raises(
        ConfigError, match=r"^data_parallel.sharding='zero4': expected one of \['zero1', 'zero2', 'zero3'\]$"
    ):
        DataParallelConfig(sharding="zero4")
    with pytest.raises(ConfigError, match=r"^data_parallel.grad_reduce_dtype='float16': expected one of"):
        DataParallelConfig(grad_reduce_dtype="float16")
    run = {
        "model": "tiny-16ch",
        "parallel": {"pp": 2, "vpp": 2},
        "data_parallel": {"sharding": "zero2"},
        "data": {
            "caches": [{"path": "unused"}],
            "stages": [{"name": "s", "buckets": ["32x32"], "micro_batch": 1, "global_batch": 4}],
        },
        "schedule": {"train_steps": 1},
    }
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(run)
    assert str(info.value).startswith("data_parallel.sharding=zero2 with parallel.vpp=2: the interleaved schedule")
    assert "\n" not in str(info.value)
    graphed = {**run, "parallel": {}, "data_parallel": {"sharding": "zero3"}, "cuda_graphs": {"scope": "blocks"}}
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(graphed)
    assert str(info.value).startswith("data_parallel.sharding=zero3 with cuda_graphs.scope=blocks: graphed blocks")
    assert "\n" not in str(info.value)
    RunConfig.from_dict({**graphed, "cuda_graphs": {"scope": "none"}})  # zero3 itself is accepted
