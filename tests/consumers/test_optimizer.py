"""`consumers.optimizer.DistributedOptimizer`: flat-buffer ZeRO-1 AdamW against plain torch AdamW.

* a single rank with bf16 params matches ``torch.optim.AdamW(foreach=False)`` on fp32 copies
  (weight decay, active clipping, EMA, two micro-batches accumulated in fp32), fused and foreach;
* a grad norm under ``clip_grad`` is not scaled up: the update equals the unclipped one, fused
  and foreach;
* with ``dp == 1`` the hook-accumulated main grads are views of the one flat grad buffer;
* ``state_tensors()`` chunks are live views of the flat state;
* TP-replicated params leave the grad norm on TP rank != 0;
* two gloo DP ranks (odd row counts, a 1-row param, mixed param dtypes) match one rank.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from consumers.optimizer import DistributedOptimizer, OptimizerConfig
from tests.helpers.consumers import spawn

CFG = OptimizerConfig(
    lr=1e-2,
    warmup_steps=2,
    decay_steps=4,
    min_lr=1e-3,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    eps=1e-8,
    clip_grad=0.05,
    ema_decay=0.9,
)
# TP split dims as a TP model would report them (None: replicated over TP).
TP_DIMS = {
    "fc1.weight": 0,
    "fc1.bias": 0,
    "fc2.weight": 1,
    "mix": None,
    "scale": None,
    "norm.weight": None,
    "norm.bias": None,
    "fc2.bias": None,
}


class Tiny(torch.nn.Module):
    """Rows 10, 10, 10, 10, 3, 3, 5 (3-D) and 1: partial and empty DP chunks at dp = 2."""

    def __init__(self, dtype: torch.dtype, mix_dtype: torch.dtype | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(6, 10)
        self.norm = torch.nn.LayerNorm(10)
        self.fc2 = torch.nn.Linear(10, 3)
        self.mix = torch.nn.Parameter(torch.randn(5, 2, 3, generator=g) * 0.3)
        self.scale = torch.nn.Parameter(torch.ones(1, 3) + 0.1 * torch.randn(1, 3, generator=g))
        with torch.no_grad():
            for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.norm.weight, self.norm.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4 + (1.0 if p is self.norm.weight else 0.0))
        self.to(dtype)
        if mix_dtype is not None:
            self.mix.data = self.mix.data.to(mix_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.norm(F.gelu(self.fc1(x)))) * self.scale
        z = torch.einsum("bk,rck->brc", y, self.mix.to(y.dtype))
        return (z.float() - 0.5).square().mean() + y.float().square().mean()


def _inputs(step: int, micro: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + micro)).to(dtype)


def _named(model: torch.nn.Module):
    return [(n, p, TP_DIMS[n]) for n, p in model.named_parameters()]


def _train(opt: DistributedOptimizer, model: torch.nn.Module, steps: int, micro: int, start: int = 0) -> list[float]:
    norms = []
    for step in range(start, start + steps):
        opt.zero_grad()
        for mb in range(micro):
            (model(_inputs(step, mb, model.fc1.weight.dtype)) / micro).backward()
        norms.append(opt.step(step)["grad_norm"])
    return norms


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_single_rank_bf16_matches_torch_adamw(fused):
    """3 steps of 2 micro-batches against fp32 masters + ``torch.optim.AdamW(foreach=False)``.

    The reference model's bf16 forward weights are copied from ours before each step (otherwise a
    1-ulp fp32 difference that flips one bf16 rounding changes the next gradients chaotically);
    masters, moments, clipping and EMA of the reference are independent of ours.
    """
    from consumers.optimizer import LRSchedule

    model = Tiny(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DistributedOptimizer(_named(model), CFG, dp_group=None, tp_rank=0, fused=fused)
    assert opt.fused is fused

    ref_params = dict(ref_model.named_parameters())
    master = {n: p.detach().float().clone().requires_grad_(True) for n, p in ref_params.items()}
    ema = {n: m.detach().clone() for n, m in master.items()}
    ref_opt = torch.optim.AdamW(
        [
            {"params": [m for m in master.values() if m.ndim >= 2], "weight_decay": CFG.weight_decay},
            {"params": [m for m in master.values() if m.ndim < 2], "weight_decay": 0.0},
        ],
        lr=CFG.lr,
        betas=CFG.betas,
        eps=CFG.eps,
        foreach=False,
    )
    sched = LRSchedule(CFG)
    for step in range(3):
        with torch.no_grad():
            for n, p in model.named_parameters():
                ref_params[n].copy_(p)
        # ours
        opt.zero_grad()
        for mb in range(2):
            (model(_inputs(step, mb, torch.bfloat16)) / 2).backward()
        # reference: fp32 accumulation of the same bf16 micro-batch grads, clip_grad_norm_ semantics
        acc = {n: torch.zeros_like(m) for n, m in master.items()}
        for mb in range(2):
            (ref_model(_inputs(step, mb, torch.bfloat16)) / 2).backward()
            for n, p in ref_params.items():
                acc[n] += p.grad.float()
                p.grad = None
        for n in acc:
            assert torch.equal(opt.main_grads[n], acc[n]), (step, n)
        norm = torch.sqrt(sum(g.square().sum() for g in acc.values()))
        coef = min(1.0, CFG.clip_grad / (float(norm) + 1e-6))
        assert coef < 0.1  # clipping is active
        for n, m in master.items():
            m.grad = acc[n] * coef
        for group in ref_opt.param_groups:
            group["lr"] = sched(step)
        ref_opt.step()
        with torch.no_grad():
            for n, m in master.items():
                ema[n].mul_(CFG.ema_decay).add_(m, alpha=1 - CFG.ema_decay)

        out = opt.step(step)
        assert out["lr"] == sched(step)
        assert out["grad_norm"] == pytest.approx(float(norm), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(opt.master[n], master[n].detach(), rtol=1e-6, atol=1e-7, msg=n)
        torch.testing.assert_close(opt.ema[n], ema[n], rtol=1e-6, atol=1e-7, msg=n)
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), opt.master[n].bfloat16()), n
        torch.testing.assert_close(p.detach(), master[n].detach().bfloat16(), rtol=8e-3, atol=1e-6, msg=n)
        assert not torch.equal(p.detach(), initial[n]), n  # every parameter moved


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_a_norm_under_the_clip_leaves_the_gradients_unscaled(fused):
    """The clip coefficient ``clip_grad / (norm + 1e-6)`` is clamped to at most 1: with the clip
    far above the grad norm, 3 steps update exactly as with clipping off (fused: the kernel's
    ``grad_scale`` is 1; foreach: the flat grad is multiplied by 1). AdamW's eps is large enough
    that its update depends on the gradients' scale, so scaling small gradients up would show."""
    cfg = dataclasses.replace(CFG, eps=1e-3)
    clip_grad = 100.0
    runs = {}
    for clip in (0.0, clip_grad):
        model = Tiny(torch.bfloat16)
        opt = DistributedOptimizer(
            _named(model), dataclasses.replace(cfg, clip_grad=clip), dp_group=None, tp_rank=0, fused=fused
        )
        assert opt.fused is fused
        runs[clip] = (_train(opt, model, steps=3, micro=2), opt)
    norms, unclipped = runs[0.0]
    assert runs[clip_grad][0] == norms
    assert max(norms) < clip_grad / 10, norms  # an unclamped coefficient would be over 10
    clipped = runs[clip_grad][1]
    assert torch.equal(clipped._master_flat, unclipped._master_flat)
    assert torch.equal(clipped._exp_avg_flat, unclipped._exp_avg_flat)
    assert torch.equal(clipped._exp_avg_sq_flat, unclipped._exp_avg_sq_flat)


def test_dp1_main_grads_are_views_of_the_flat_buffer():
    model = Tiny(torch.bfloat16, mix_dtype=torch.float32)  # bf16 and fp32 params both use the buffer
    opt = DistributedOptimizer(_named(model), CFG, dp_group=None, tp_rank=0)
    ref_model = copy.deepcopy(model)
    for mb in range(2):
        model(_inputs(0, mb, torch.bfloat16)).backward()
        ref_model(_inputs(0, mb, torch.bfloat16)).backward()
    buf_ptr = opt._grad_storage.untyped_storage().data_ptr()
    for n, p in model.named_parameters():
        assert p.grad is None, n  # moved into the buffer by the hook, no second copy kept
        g = opt.main_grads[n]
        assert g.dtype == torch.float32 and g.shape == p.shape
        assert g.untyped_storage().data_ptr() == buf_ptr, n
        torch.testing.assert_close(g, ref_model.get_parameter(n).grad.float(), rtol=2e-2, atol=1e-3, msg=n)
    total = sum(float(opt.main_grads[n].square().sum()) for n, _ in model.named_parameters())
    assert float(opt._grad_storage.square().sum()) == pytest.approx(total, rel=1e-6)  # nothing else in the buffer
    # The reduce-scatter at dp == 1 is the buffer itself (no copy).
    flat = opt._reduce_scatter_grads()
    assert flat.untyped_storage().data_ptr() == buf_ptr and flat.numel() == opt.shard_numel
    # Hand-set grads (no autograd hook) are folded in once, then cleared.
    opt.zero_grad()
    manual = torch.full(model.fc1.weight.shape, 0.25, dtype=torch.bfloat16)
    model.fc1.weight.grad = manual.clone()
    opt._reduce_scatter_grads()
    assert model.fc1.weight.grad is None
    torch.testing.assert_close(opt.main_grads["fc1.weight"], manual.float())
    assert float(opt._grad_storage.abs().sum()) == pytest.approx(float(manual.float().abs().sum()))


def test_state_tensors_are_live_views_of_the_flat_state():
    model_a, model_b = Tiny(torch.float32), Tiny(torch.float32)
    opt_a = DistributedOptimizer(_named(model_a), CFG, dp_group=None, tp_rank=0)
    opt_b = DistributedOptimizer(_named(model_b), CFG, dp_group=None, tp_rank=0)
    st_b = opt_b.state_tensors()
    flats = {
        "master": opt_b._master_flat,
        "exp_avg": opt_b._exp_avg_flat,
        "exp_avg_sq": opt_b._exp_avg_sq_flat,
        "ema": opt_b._ema_flat,
    }
    for name, entry in st_b.items():
        assert set(entry) == set(flats)
        for key, t in entry.items():
            assert t.dtype == torch.float32 and t.shape == opt_b._by_name[name].owned_shape
            assert t.untyped_storage().data_ptr() == flats[key].untyped_storage().data_ptr(), (name, key)
    _train(opt_a, model_a, steps=1, micro=1)
    _train(opt_b, model_b, steps=1, micro=1)
    # Loading garbage into B's chunks changes its next step...
    for entry in opt_b.state_tensors().values():
        entry["exp_avg"].fill_(0.3)
        entry["exp_avg_sq"].fill_(0.01)
    _train(opt_a, model_a, steps=1, micro=1, start=1)
    _train(opt_b, model_b, steps=1, micro=1, start=1)
    assert not torch.allclose(opt_a._master_flat, opt_b._master_flat)
    # ...and loading A's state (as a checkpoint load does) makes B step exactly like A.
    st_a = opt_a.state_tensors()
    for name, entry in opt_b.state_tensors().items():
        for key, t in entry.items():
            t.copy_(st_a[name][key])
    opt_b.set_num_steps(opt_a.num_steps)
    opt_b.load_master_into_params()
    for (n, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), n
    _train(opt_a, model_a, steps=2, micro=1, start=2)
    _train(opt_b, model_b, steps=2, micro=1, start=2)
    assert torch.equal(opt_a._master_flat, opt_b._master_flat)
    assert torch.equal(opt_a._exp_avg_sq_flat, opt_b._exp_avg_sq_flat)
    assert torch.equal(opt_a._ema_flat, opt_b._ema_flat)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_grad_norm_counts_tp_replicated_params_on_tp_rank0_only():
    model = Tiny(torch.float32)
    norms = {}
    for tp_rank in (0, 1):
        opt = DistributedOptimizer(
            _named(model), OptimizerConfig(lr=1e-3, clip_grad=0.0), dp_group=None, tp_rank=tp_rank
        )
        model(_inputs(0, 0, torch.float32)).backward()
        grads = {n: opt.main_grads[n].clone() for n, _ in model.named_parameters()}
        norms[tp_rank] = opt.step(0)["grad_norm"]
        for h in opt._hooks:
            h.remove()
        want = sum(float(g.double().square().sum()) for n, g in grads.items() if tp_rank == 0 or TP_DIMS[n] is not None)
        assert norms[tp_rank] == pytest.approx(want**0.5, rel=1e-6)
    assert norms[1] < norms[0]


# ---------------------------------------------------------------------------------------- dp = 2
def _dp_worker(rank: int, world: int, steps: int) -> dict:
    """DP over `world` ranks (rank r runs micro-batch r) and, in the same process, a one-rank
    optimizer on all micro-batches (its forward weights copied from the DP model each step)."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    solo = [dist.new_group([r]) for r in range(world)][rank]
    model = Tiny(torch.bfloat16, mix_dtype=torch.float32)
    ref_model = copy.deepcopy(model)
    opt = DistributedOptimizer(_named(model), CFG, dp_group=dist.group.WORLD, tp_rank=0)
    ref = DistributedOptimizer(_named(ref_model), CFG, dp_group=None, tp_rank=0, norm_group=solo)
    assert opt.dp == 2 and ref.dp == 1
    out = {"norms": [], "ref_norms": [], "grads_equal": []}
    for step in range(steps):
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref_model.parameters()):
                q.copy_(p)
        opt.zero_grad()
        ref.zero_grad()
        (model(_inputs(step, rank, torch.bfloat16)) / world).backward()
        for mb in range(world):
            (ref_model(_inputs(step, mb, torch.bfloat16)) / world).backward()
        flat = opt._reduce_scatter_grads()  # idempotent: step() reduces the same buffer again
        out["grads_equal"].append(
            all(
                torch.equal(
                    opt._owned(flat, opt._by_name[n]),
                    ref.main_grads[n].view(s.rows, s.cols)[s.row_start : s.row_end].view(s.owned_shape),
                )
                for n, s in opt._by_name.items()
            )
        )
        opt._grad_shard.zero_()
        out["norms"].append(opt.step(step)["grad_norm"])
        opt.finish_param_sync()  # no forward hooks on this model: gather every unit now
        out["ref_norms"].append(ref.step(step)["grad_norm"])
    chunks = lambda o: {n: o.master[n].flatten().tolist() for n in o.master}  # noqa: E731
    out["master"] = chunks(opt)
    out["ref_master"] = {
        n: ref.master[n].view(s.rows, -1)[s.row_start : s.row_end].flatten().tolist() for n, s in opt._by_name.items()
    }
    out["ema"] = {n: e.flatten().tolist() for n, e in opt.ema_full_params().items()}
    out["ref_ema"] = {n: e.flatten().tolist() for n, e in ref.ema.items()}
    out["params"] = {n: p.detach().float().flatten().tolist() for n, p in model.named_parameters()}
    out["params_match_master"] = all(
        torch.equal(p.detach().view(s.rows, -1)[s.row_start : s.row_end], opt.master[n].view(-1, s.cols).to(p.dtype))
        for (n, p), s in zip(model.named_parameters(), (opt._by_name[n] for n, _ in model.named_parameters()))
    )
    return out


def test_two_dp_ranks_match_one_rank(tmp_path):
    results = spawn(_dp_worker, 2, tmp_path, 3)
    assert set(results) == {0, 1}
    for rank, res in results.items():
        assert all(res["grads_equal"]), rank  # the reduce-scattered chunks are the one-rank sums, bit for bit
        assert res["params_match_master"], rank
        assert res["norms"] == pytest.approx(res["ref_norms"], rel=1e-6)
        assert res["params"] == results[0]["params"]  # every rank gathers the same model
        for n in res["master"]:
            torch.testing.assert_close(
                torch.tensor(res["master"][n]), torch.tensor(res["ref_master"][n]), rtol=1e-6, atol=1e-7, msg=(rank, n)
            )
            torch.testing.assert_close(
                torch.tensor(res["ema"][n]), torch.tensor(res["ref_ema"][n]), rtol=1e-6, atol=1e-7, msg=(rank, n)
            )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_non_finite_grad_norm_skips_the_update_and_drops_the_grads(bad):
    """NaN/inf in one gradient (or ``skip=True``: a non-finite loss) leaves params and every piece of
    optimizer state as they were, zeroes the grads, and the next step updates as if nothing happened."""
    model, ref_model = Tiny(torch.bfloat16), Tiny(torch.bfloat16)
    opt = DistributedOptimizer(_named(model), CFG, dp_group=None, tp_rank=0)
    ref = DistributedOptimizer(_named(ref_model), CFG, dp_group=None, tp_rank=0)
    for o, m in ((opt, model), (ref, ref_model)):
        o.zero_grad()
        m(_inputs(0, 0, torch.bfloat16)).backward()
        out = o.step(0)
        assert out["skipped"] is False and math.isfinite(out["grad_norm"]) and out["lr"] == o.schedule(0)
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_tensors().items()}
    params = [p.detach().clone() for p in model.parameters()]
    steps = [t.clone() for g in opt._adam_groups for t in g[4]]

    opt.zero_grad()
    model(_inputs(1, 0, torch.bfloat16)).backward()
    if bad is not None:
        opt._accumulate(opt._by_name["fc2.weight"], torch.full_like(model.fc2.weight, bad))
    out = opt.step(1, skip=bad is None)
    assert out["skipped"] is True and out["lr"] == opt.schedule(1)
    assert math.isfinite(out["grad_norm"]) if bad is None else not math.isfinite(out["grad_norm"])
    assert opt.num_steps == 1 and opt.skipped_steps == 1
    assert float(opt._grad_storage.abs().sum()) == 0.0
    for name, entry in opt.state_tensors().items():
        for kind, t in entry.items():
            assert torch.equal(t, state[name][kind]), (name, kind)  # master, moments, EMA
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(t, s) for t, s in zip((t for g in opt._adam_groups for t in g[4]), steps))

    for o, m in ((opt, model), (ref, ref_model)):
        o.zero_grad()
        m(_inputs(2, 0, torch.bfloat16)).backward()
        assert o.step(2)["skipped"] is False
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p.detach(), q.detach()), n


def test_max_skipped_steps_validation():
    assert OptimizerConfig().max_skipped_steps == 10
    OptimizerConfig(max_skipped_steps=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(Exception, match="optimizer.max_skipped_steps"):
            OptimizerConfig(max_skipped_steps=bad)


def _uneven_worker(rank: int, world: int) -> dict:
    """Three same-shape units; on rank 1 the middle one gets no gradient (data-dependent use)."""
    import consumers.optimizer as optimizer_module
    from consumers.data_parallel import DataParallelConfig

    dist.init_process_group("gloo", rank=rank, world_size=world)
    issued = []
    reduce = optimizer_module.reduce_scatter_single

    def recording(output, input, *args, **kwargs):
        issued.append(unit_of[output.data_ptr()])
        return reduce(output, input, *args, **kwargs)

    optimizer_module.reduce_scatter_single = recording
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(3))
    named = [(f"{i}.weight", layer.weight, None) for i, layer in enumerate(layers)]
    opt = DistributedOptimizer(
        named,
        OptimizerConfig(lr=1e-2, clip_grad=0.0),
        dp_group=dist.group.WORLD,
        tp_rank=0,
        units=[(f"l{i}", [f"{i}.weight"]) for i in range(3)],
        data_parallel=DataParallelConfig(),
    )
    unit_of = {u.reduced.data_ptr(): u.name for u in opt.units}
    opt.zero_grad()
    opt.begin_accumulation(1)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(rank))
    h = layers[0](x)
    if rank == 0:
        h = layers[1](h)
    layers[2](h).square().sum().backward()
    flat = opt._reduce_scatter_grads()
    reduced = {s.name: opt._owned(flat, s).flatten().tolist() for s in opt.shards}
    # What each rank contributed, to build the expected DP sums.
    local = {s.name: opt.main_grads[s.name].flatten().tolist() for s in opt.shards}
    dist.barrier()
    return {
        "issued": issued,
        "reduced": reduced,
        "local": local,
        "rows": {s.name: [s.row_start, s.row_end] for s in opt.shards},
    }


def test_units_are_reduced_in_one_order_on_every_rank_whatever_gradients_arrive(tmp_path):
    """A unit whose parameter got no gradient on one rank holds back the units before it until
    `step`: both ranks issue l2, l1, l0, and every reduced chunk is the sum of the two ranks'
    gradients (issued in another order, same-shape units would be summed with each other)."""
    results = spawn(_uneven_worker, 2, tmp_path)
    assert results[0]["issued"] == results[1]["issued"] == ["l2", "l1", "l0"]
    for rank, res in results.items():
        for name, (start, end) in res["rows"].items():
            total = torch.tensor(results[0]["local"][name]) + torch.tensor(results[1]["local"][name])
            expected = total.view(4, 4)[start:end].flatten()
            torch.testing.assert_close(torch.tensor(res["reduced"][name]), expected, msg=(rank, name))
