"""Per-block CUDA graphs in the training loop (`consumers.graphs`, `BlockGraphCache`), on CPU.

The capture needs a GPU; here `tests.helpers.graphs.StaticBufferGrapher` stands in for Transformer
Engine's ``make_graphed_callables`` with its contract (warm-up backward passes that must see every
parameter's ``.grad``, static input buffers refilled per call, parameter gradients returned through
autograd). The engine with graphs must train exactly as the eager engine: same losses, grad norms
and parameters at every step, over a sequence of layouts that exercises warm-up, capture,
replay, several layouts, the layout limit and evaluation. Under FP8 (the stand-in's
`FP8LinearStandIn`: Transformer Engine's FP8 weight cache), every replayed step must run on the FP8
copy of the weights it trains. The GPU half (the real capture, FP8) is the skipped-here tests below,
`tests/model/test_te_backend.py` and benchmarks/gpu/train_loop.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from consumers.batch import Batch
from consumers.engine import TrainEngine
from consumers.graphs import CudaGraphConfig, all_ranks_agree, check_cuda_graph_layout
from consumers.optimizer import DistributedOptimizer, OptimizerConfig
from consumers.precision import PrecisionConfig
from consumers.recompute import RecomputeConfig
from megatron_qwenimage.config import ConfigError, load_config
from megatron_qwenimage.model.backends import transformer_engine_available
from megatron_qwenimage.model.block import MMDiTBlock
from tests.helpers.consumers import perturb_zero_init, spawn
from tests.helpers.graphs import FP8LinearStandIn, StaticBufferGrapher, fp8_cast, install_fp8_linear_standins

#: (latent h, latent w, text tokens, valid text tokens per sample or None for all valid)
LAYOUT_A = (8, 8, 8, None)
LAYOUT_B = (8, 8, 8, (8, 5))  # same shapes, right-padded text: another layout (key tensors)
LAYOUT_C = (12, 8, 16, (16, 9))
#: Warm-up 2 passes, two passes a step: A is captured before step 1, B before step 4; C meets the
#: limit of 2 layouts.
SEQUENCE = [LAYOUT_A, LAYOUT_A, LAYOUT_A, LAYOUT_B, LAYOUT_B, LAYOUT_B, LAYOUT_A, LAYOUT_C, LAYOUT_C, LAYOUT_C]


def _batch(step: int, layout, micro_batch: int = 2, text_dim: int = 32) -> Batch:
    h, w, t, valid = layout
    g = torch.Generator().manual_seed(100 + step)
    mask = torch.ones(micro_batch, t, dtype=torch.bool)
    for i, n in enumerate(valid or ()):
        mask[i, n:] = False
    return Batch(
        latents=torch.randn(micro_batch, 16, h, w, generator=g),
        text=torch.randn(micro_batch, t, text_dim, generator=g) * mask[..., None],
        text_mask=mask,
        sample_index=torch.arange(step * micro_batch, (step + 1) * micro_batch),
        condition_latents=[],
        task="t2i",
    )


def _engine(pstate, graphs: CudaGraphConfig = CudaGraphConfig(), grapher=None, **kw) -> TrainEngine:
    opt = OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0, ema_decay=0.9)
    engine = TrainEngine(
        load_config("tiny-16ch", num_layers=3, **kw.pop("model", {})),
        pstate,
        optimizer=opt,
        cuda_graphs=graphs,
        global_batch_size=4,
        seed=5,
        make_graphed_callables=grapher,
        **kw,
    )
    perturb_zero_init(engine.chunks, engine.optimizer)  # adaLN-Zero: else every block is the identity
    return engine


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.chunks[0].named_parameters()}


def _train_side_by_side(
    pstate,
    grapher,
    *,
    loss_rtol: float,
    norm_rtol: float,
    param_tol: float,
    prepare=None,
    check_step=None,
    **engine_kw,
):
    """The eager engine and one with graphs (warm-up 2, at most 2 layouts) over `SEQUENCE`, two
    micro-batches a step; asserts the same losses, grad norms and parameters at every step and
    returns ``(eager, graphed, {layout: step captured before})``.

    ``prepare(engine)`` runs on both engines once built; ``check_step(step, before, replayed)``
    after each step, before the comparisons (``before``: each engine's parameters at the start
    of the step, by engine; ``replayed``: whether the graphed engine replayed the step)."""
    eager = _engine(pstate, **engine_kw)
    graphed = _engine(pstate, CudaGraphConfig(scope="blocks", warmup_passes=2, max_layouts=2), grapher, **engine_kw)
    for engine in (eager, graphed) if prepare is not None else ():
        prepare(engine)
    for a, b in zip(_params(eager).values(), _params(graphed).values()):
        assert torch.equal(a, b)
    captured_at = {}
    for step, layout in enumerate(SEQUENCE):
        before = len(graphed.graphs.layouts)
        replays_before = graphed.graphs.stats.replayed_passes
        params_before = {engine: _params(engine) for engine in (eager, graphed)} if check_step is not None else None
        mbs = [_batch(2 * step, layout), _batch(2 * step + 1, layout)]  # gradients accumulate over replays
        r_eager = eager.train_step(step, mbs)
        r_graphed = graphed.train_step(step, mbs)
        if len(graphed.graphs.layouts) > before:
            captured_at[layout] = step
        if check_step is not None:
            check_step(step, params_before, graphed.graphs.stats.replayed_passes > replays_before)
        assert r_graphed.loss == pytest.approx(r_eager.loss, rel=loss_rtol, abs=0), step
        assert r_graphed.grad_norm == pytest.approx(r_eager.grad_norm, rel=norm_rtol), step
        ours = _params(graphed)
        for name, p in _params(eager).items():
            torch.testing.assert_close(ours[name], p, rtol=param_tol, atol=param_tol, msg=f"{name} at step {step}")
    return eager, graphed, captured_at


#: Two passes a step, warm-up 2: A's two eager passes are step 0's (the second recorded), captured
#: before step 1; B's are step 3's, captured before step 4; C, a third layout, is over the limit
#: of 2 and stays eager. Steps replayed: A at 1, 2 and 6, B at 4 and 5.
EXPECTED = {"captured": {LAYOUT_A: 1, LAYOUT_B: 4}, "replayed_steps": [1, 2, 4, 5, 6], "uncaptured": ["txt [16, 2,"]}
#: Under FP8 the streams are padded to 16 tokens, so A's 8 text tokens carry key tensors too and A
#: and B are one layout (replayed from step 1 to 6); C is the second, captured before step 8.
EXPECTED_FP8 = {"captured": {LAYOUT_A: 1, LAYOUT_C: 8}, "replayed_steps": [1, 2, 3, 4, 5, 6, 8, 9], "uncaptured": []}


def _check_cache(graphed, captured_at, expected: dict) -> None:
    assert captured_at == expected["captured"]
    stats = graphed.graphs.stats
    assert len(graphed.graphs.layouts) == len(expected["captured"])
    assert stats.replayed_passes == 2 * len(expected["replayed_steps"])
    assert stats.eager_passes == 2 * (len(SEQUENCE) - len(expected["replayed_steps"]))
    assert len(stats.uncaptured_layouts) == len(expected["uncaptured"])
    assert all(want in got for want, got in zip(expected["uncaptured"], stats.uncaptured_layouts))
    # outside the step the model is its own: its blocks, names and state
    assert all(type(b) is MMDiTBlock for b in graphed.chunks[0].blocks.values())


def test_graphed_engine_trains_exactly_as_the_eager_one(pstate):
    grapher = StaticBufferGrapher()
    eager, graphed, captured_at = _train_side_by_side(pstate, grapher, loss_rtol=1e-6, norm_rtol=1e-5, param_tol=1e-6)
    _check_cache(graphed, captured_at, EXPECTED)
    assert len(grapher.calls) == 2
    assert grapher.replays == 3 * graphed.graphs.stats.replayed_passes  # every block of every replayed pass
    # each layout was captured on the real block inputs of the pass it recorded
    (_, sample_a, _), (_, sample_b, _) = grapher.calls
    assert [len(args) for args in sample_a] == [5, 5, 5]  # all valid text: no key tensors
    assert [len(args) for args in sample_b] == [7, 7, 7]  # right-padded: key_mask + kv_lengths
    assert list(graphed.chunks[0].state_dict().keys()) == list(eager.chunks[0].state_dict().keys())
    # evaluation runs eagerly on the same model
    replayed = graphed.graphs.stats.replayed_passes
    mbs = [_batch(99, LAYOUT_A)]
    assert graphed.eval_local_loss(7, mbs, 0.5, 2) == pytest.approx(eager.eval_local_loss(7, mbs, 0.5, 2), rel=1e-6)
    assert graphed.graphs.stats.replayed_passes == replayed


def _fp8_standins(engine) -> dict[str, FP8LinearStandIn]:
    return {n: m for n, m in engine.chunks[0].named_modules() if isinstance(m, FP8LinearStandIn)}


def test_graphed_fp8_weights_are_recast_from_the_current_weights(pstate):
    """Under FP8 every replayed step multiplies with the FP8 copy of the weights it trains.

    The blocks' TE linears are `FP8LinearStandIn`s (TE's weight cache: the FP8 copy is refreshed
    when ``is_first_microbatch`` is True or None, reused when it is False; a replay repeats what
    its capture did). After every replayed step, each linear's FP8 copy equals an eager re-cast
    (`fp8_cast`) of the master weights the step started from, in the graphed engine as in the
    eager one, and the two engines train alike. A capture that records no cast (the flag False,
    as a training pass leaves it) would replay on the copy cast at the first step forever.
    """
    checked = []

    def check(step, before, replayed):
        if not replayed:
            return
        for engine, params in before.items():
            kind = "graphed" if engine.graphs is not None else "eager"
            for name, linear in _fp8_standins(engine).items():
                want = fp8_cast(params[f"{name}.weight"])
                stale = (linear.last_fp8_weight != want).float().mean().item()
                assert stale == 0, f"{kind} step {step}: {name} ran on a stale FP8 weight ({stale:.0%} of it differs)"
        checked.append(step)

    _, graphed, captured_at = _train_side_by_side(
        pstate,
        StaticBufferGrapher(),
        # a rounding-level difference between replayed and eager sums may move a weight across an
        # FP8 step: the engines drift apart slowly (1.6e-5 by the last step), the FP8 check is exact
        loss_rtol=1e-5,
        norm_rtol=1e-5,
        param_tol=1e-4,
        prepare=lambda engine: install_fp8_linear_standins(engine.chunks[0]),
        check_step=check,
    )
    _check_cache(graphed, captured_at, EXPECTED)
    assert checked == EXPECTED["replayed_steps"]
    linears = _fp8_standins(graphed)
    assert {name.split(".")[1] for name in linears} == set(graphed.chunks[0].blocks.keys())  # every block
    assert all(linear.disable_parameter_transpose_cache for linear in linears.values())


@pytest.mark.skipif(
    not (torch.cuda.is_available() and transformer_engine_available()),
    reason="needs an NVIDIA GPU (CUDA graphs) with Transformer Engine installed",
)
@pytest.mark.parametrize("fp8", [None, "delayed"])
def test_te_cuda_graphs_train_as_the_eager_engine_on_gpu(pstate, fp8):
    """The real capture (Transformer Engine's ``make_graphed_callables``), bf16 and FP8: the same
    steps, layouts and limits as the CPU test, within bf16 / FP8 rounding of the eager engine."""
    precision = PrecisionConfig(autocast="bf16", fp8=fp8, fp8_exclude=())
    _, graphed, captured_at = _train_side_by_side(
        pstate,
        None,
        loss_rtol=2e-2,
        norm_rtol=5e-2,
        param_tol=2e-2,
        model={"backend": "transformer_engine"},
        precision=precision,
    )
    _check_cache(graphed, captured_at, EXPECTED_FP8 if fp8 else EXPECTED)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.skipif(
    not (torch.cuda.is_available() and transformer_engine_available()),
    reason="needs an NVIDIA GPU (CUDA graphs) with Transformer Engine installed",
)
def test_te_graphed_fp8_weights_are_recast_from_the_current_weights_on_gpu(pstate):
    """The GPU half of `test_graphed_fp8_weights_are_recast_from_the_current_weights`, with
    Transformer Engine's capture and FP8 current scaling (an FP8 weight copy is then a function of
    the weight alone). After several replayed steps, each graphed block replayed on a new input
    changes its streams as the eager block does on that input with its TE linears' weights
    re-cast from the current master weights, and unlike the eager block with the FP8 copies of
    the weights the capture saw (so the comparison can tell a stale copy).
    """
    steps = 6
    precision = PrecisionConfig(autocast="bf16", fp8="current", fp8_exclude=())
    engine = _engine(
        pstate,
        CudaGraphConfig(scope="blocks", warmup_passes=1, max_layouts=1),
        model={"backend": "transformer_engine"},
        precision=precision,
    )
    model = engine.chunks[0]
    for step in range(steps):
        engine.train_step(step, [_batch(2 * step, LAYOUT_A), _batch(2 * step + 1, LAYOUT_A)])
        if step == 0:
            captured_weights = _params(engine)  # what the capture before step 1 quantized, if it did
    assert engine.graphs.stats.replayed_passes == 2 * (steps - 1)
    (layout,) = engine.graphs.layouts.values()

    # One more replayed pass (no optimizer step after it); each block's call and result kept.
    calls = {}

    def keep(key):
        def hook(module, args, out):
            img, txt, temb, rope, keys = args
            streams = tuple(t.detach().clone() for t in (img, txt, temb))
            calls[key] = ((*streams, rope, keys), tuple(None if o is None else o.detach().clone() for o in out))

        return hook

    handles = [g.register_forward_hook(keep(key)) for key, g in layout.blocks.items()]
    (mb,) = engine._inputs(steps, [_batch(2 * steps, LAYOUT_A)], engine.sigma_sampler)
    engine.stages[0].set_shapes(mb.img_shapes, mb.num_target_tokens)
    try:
        with engine.graphs.dispatching():
            engine.stages[0](mb.hidden_states, mb.text, mb.sigma, text_mask=mb.text_mask)
    finally:
        for handle in handles:
            handle.remove()
    assert engine.graphs.stats.replayed_passes == 2 * (steps - 1) + 1 and set(calls) == set(layout.blocks)

    def eager_updates() -> dict[str, list[torch.Tensor]]:
        """Each block's change of its streams, eager, its TE linears quantizing their weights now."""
        updates = {}
        with torch.no_grad(), engine.precision.forward_context():
            for key, (args, _) in calls.items():
                out = model.blocks[key](*args)
                updates[key] = [o - i for o, i in zip(out, args[:2]) if o is not None]
        return updates

    fresh = eager_updates()
    te_weights = {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if name.startswith("blocks.") and hasattr(module, "is_first_microbatch")
    }
    assert te_weights and all(
        model.get_submodule(n.rpartition(".")[0]).disable_parameter_transpose_cache for n in te_weights
    )
    current = {n: w.detach().clone() for n, w in te_weights.items()}
    with torch.no_grad():
        for n, w in te_weights.items():
            w.copy_(captured_weights[n])
    try:
        stale = eager_updates()
    finally:
        with torch.no_grad():
            for n, w in te_weights.items():
                w.copy_(current[n])
    for key, (args, out) in calls.items():
        replayed = [o - i for o, i in zip(out, args[:2]) if o is not None]
        for r, f, s in zip(replayed, fresh[key], stale[key]):
            off, stale_off = _relative(r, f), _relative(s, f)
            assert off <= 1e-2, f"block {key}: the replay differs from a fresh FP8 cast by {off:.2e}"
            assert stale_off > 5 * max(off, 1e-3), f"block {key}: a stale FP8 weight is not visible ({stale_off:.2e})"
    engine.graphs.release()


def test_capture_needs_the_optimizer_hooks_paused(pstate, monkeypatch):
    """Without `grad_hooks_paused` the hooks move each warm-up gradient into the flat buffer and
    the capture sees none (on a GPU the hook would be recorded into the graph: gradients twice)."""
    monkeypatch.setattr(DistributedOptimizer, "grad_hooks_paused", lambda self: contextlib.nullcontext())
    engine = _engine(pstate, CudaGraphConfig(scope="blocks", warmup_passes=1), StaticBufferGrapher())
    engine.train_step(0, [_batch(0, LAYOUT_A)])
    assert engine.graphs.pending is not None
    with pytest.raises(RuntimeError, match="no gradient"):
        engine.train_step(1, [_batch(1, LAYOUT_A)])


def test_capture_waits_until_every_rank_has_a_layout_pending(pstate):
    engine = _engine(pstate, CudaGraphConfig(scope="blocks", warmup_passes=1), StaticBufferGrapher())
    engine.train_step(0, [_batch(0, LAYOUT_A)])
    votes = []
    engine._agree_capture = lambda ready: votes.append(ready) or False  # another rank has none pending
    assert engine.capture_graphs() is None
    assert votes == [True] and engine.graphs.pending is not None and not engine.graphs.layouts
    engine._agree_capture = lambda ready: votes.append(ready) or True
    assert engine.capture_graphs() is not None
    assert votes == [True, True] and engine.graphs.pending is None and len(engine.graphs.layouts) == 1
    assert engine.capture_graphs() is None and votes == [True, True, False]  # still votes: in step with the others


def _agree_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    agree = all_ranks_agree(dist.new_group(backend="gloo"))
    return {"both": agree(True), "one": agree(rank == 0), "none": agree(False)}


def test_all_ranks_agree_is_a_min_over_the_group(tmp_path):
    assert all_ranks_agree(None) is None
    results = spawn(_agree_worker, 2, tmp_path)
    assert results == {0: {"both": True, "one": False, "none": False}, 1: {"both": True, "one": False, "none": False}}


def test_graph_layout_limits_name_the_keys():
    blocks = CudaGraphConfig(scope="blocks")
    check_cuda_graph_layout(blocks, tp=1, pp=1, recompute_mode="none")
    check_cuda_graph_layout(CudaGraphConfig(), tp=4, pp=2, recompute_mode="full")  # off: anything goes
    with pytest.raises(ConfigError) as exc:
        check_cuda_graph_layout(blocks, tp=2, pp=2, recompute_mode="selective")
    for needle in (
        "cuda_graphs.scope='blocks' refused",
        "parallel.tp=2",
        "parallel.pp=2",
        "recompute.mode='selective'",
    ):
        assert needle in str(exc.value)
    with pytest.raises(ConfigError, match="cuda_graphs.scope='all'"):
        CudaGraphConfig(scope="all")
    with pytest.raises(ConfigError, match="cuda_graphs.warmup_passes=0"):
        CudaGraphConfig(scope="blocks", warmup_passes=0)
    with pytest.raises(ConfigError, match="cuda_graphs.max_layouts=True"):
        CudaGraphConfig(scope="blocks", max_layouts=True)
    assert RecomputeConfig().mode == "none"
