"""Worker bodies of the layout-equivalence test (run in spawned gloo ranks).

Every run (the single-process reference and each layout) leaves the adaLN-Zero init the same way
(`perturb_zero_init`: every zero-initialised tensor drawn from a generator seeded by its name,
model and fp32 master/EMA alike), so attention, MLP, QK-norm, text-stream and timestep-embedder
gradients are not negligible. After the steps, rank 0 gathers every parameter and every optimizer
state tensor (fp32 master, exp_avg, exp_avg_sq, EMA) to full tensors by canonical name and
compares them with the reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.distributed as dist

from consumers.batch import loss_sum_over_global, make_inputs
from consumers.data_parallel import DataParallelConfig
from consumers.engine import TrainEngine
from consumers.optimizer import LRSchedule, OptimizerConfig
from consumers.parallel import ParallelLayout, init_parallel
from megatron_qwenimage.config import load_config
from megatron_qwenimage.flow_matching import UniformSigmaSampler
from tests.helpers.consumers import (
    compare_states,
    gather_training_state,
    group_grad_norms,
    perturb_zero_init,
    synthetic_global_batch,
    to_microbatches,
)

MODEL = dict(num_layers=4)
OPT = OptimizerConfig(lr=3e-3, warmup_steps=2, decay_steps=10, min_lr=1e-4, weight_decay=0.01, clip_grad=0.05)
#: The layout runs (and their reference) also keep an EMA of the master weights.
OPT_EMA = replace(OPT, ema_decay=0.9)
GLOBAL_BATCH = 4
SEED = 7
PERTURB_SEED = 5
#: Element-wise tolerance of every parameter / optimizer-state tensor against the reference (fp32):
#: ``|got - ref| <= SCALE_ATOL * max|ref| + RTOL * |ref|``.
RTOL, SCALE_ATOL = 1e-4, 1e-5


def step_task(step: int) -> str:
    return "edit" if step == 2 else "t2i"


def reference_run(steps: int, opt_cfg: OptimizerConfig = OPT_EMA, snapshots: tuple[int, ...] = ()) -> tuple[dict, dict]:
    """Single process, no parallel machinery: plain model forward on the whole global batch,
    torch.nn.utils.clip_grad_norm_, torch.optim.AdamW and a hand-written EMA.

    Returns ``(metrics, states)``: metrics are the per-step loss, grad norm and per-group grad
    norms (`group_grad_norms`, before clipping); ``states[k]`` is the full training state after
    ``k`` steps (`gather_training_state`'s layout), for ``k`` in `snapshots` and `steps`.
    """
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

    cfg = load_config("tiny-16ch", **MODEL)
    model = QwenImageMMDiT(cfg, init_seed=0)
    perturbed = perturb_zero_init([model], seed=PERTURB_SEED)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": opt_cfg.weight_decay},
            {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=opt_cfg.lr,
        betas=opt_cfg.betas,
        eps=opt_cfg.eps,
    )
    ema = {n: p.detach().clone() for n, p in params.items()}
    sched = LRSchedule(opt_cfg)
    losses, norms, groups = [], [], []
    states = {}

    def snapshot() -> dict:
        state = {}
        for n, p in params.items():
            st = opt.state[p]
            state[n] = {
                "param": p.detach().clone(),
                "master": p.detach().clone(),
                "exp_avg": st["exp_avg"].clone(),
                "exp_avg_sq": st["exp_avg_sq"].clone(),
            }
            if opt_cfg.ema_decay > 0:
                state[n]["ema"] = ema[n].clone()
        return state

    for step in range(steps):
        task = step_task(step)
        (batch,) = to_microbatches(
            synthetic_global_batch(step, GLOBAL_BATCH, task=task), dp_rank=0, dp=1, micro_batch=GLOBAL_BATCH, task=task
        )
        inp = make_inputs(
            batch,
            step=step,
            seed=SEED,
            sigma_sampler=UniformSigmaSampler(),
            patch_size=2,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        opt.zero_grad()
        pred = model(inp.hidden_states, inp.text, inp.text_mask, inp.sigma, inp.img_shapes)
        loss = loss_sum_over_global(pred, inp.target, GLOBAL_BATCH)
        loss.backward()
        groups.append(group_grad_norms((n, p.grad) for n, p in params.items()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), opt_cfg.clip_grad)))
        for group in opt.param_groups:
            group["lr"] = sched(step)
        opt.step()
        with torch.no_grad():
            for n, p in params.items():
                ema[n].lerp_(p, 1.0 - opt_cfg.ema_decay)
        losses.append(float(loss))
        if step + 1 in snapshots or step + 1 == steps:
            states[step + 1] = snapshot()
    metrics = {
        "loss": losses,
        "grad_norm": norms,
        "group_grad_norms": groups,
        "perturbed": perturbed,
        "params": sorted(params),
    }
    return metrics, states


# ------------------------------------------------------------------------------------------------
# A deliberately broken pipeline boundary (test-only monkeypatch inside a worker process).
class _DropGrad(torch.autograd.Function):
    """Identity forward, zero gradient backward: the tensor is detached for autograd's purposes
    while the pipeline still sends (zero) gradients back, so the schedule runs unchanged."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


@contextlib.contextmanager
def broken_boundary(which: str):
    """Within the block, every non-first pipeline stage drops the gradient of the received
    ``which`` stream ("txt" or "temb"): the bug of a boundary that detaches it between stages."""
    from consumers.stage import MMDiTStage

    index = {"img": 0, "txt": 1, "temb": 2}[which]
    original = MMDiTStage.forward

    def forward(self, *inputs, text_mask):
        if not self.model.pre_process:
            inputs = tuple(_DropGrad.apply(x) if i == index else x for i, x in enumerate(inputs))
        return original(self, *inputs, text_mask=text_mask)

    MMDiTStage.forward = forward
    try:
        yield
    finally:
        MMDiTStage.forward = original


def run_layout(
    layout: ParallelLayout,
    steps: int,
    micro_batch: int = 1,
    *,
    reference: dict | None = None,
    break_boundary: str | None = None,
    data_parallel: DataParallelConfig = DataParallelConfig(),
) -> dict:
    """`steps` steps at `layout`; on global rank 0 (which holds `reference`, the reference state)
    also the comparison of every parameter and optimizer-state tensor."""
    pstate = init_parallel(layout)
    engine = TrainEngine(
        load_config("tiny-16ch", **MODEL),
        pstate,
        optimizer=OPT_EMA,
        data_parallel=data_parallel,
        seed=SEED,
        global_batch_size=GLOBAL_BATCH,
        init_seed=0,
    )
    perturb_zero_init(engine.chunks, engine.optimizer, seed=PERTURB_SEED)
    losses, norms = [], []
    with broken_boundary(break_boundary) if break_boundary else contextlib.nullcontext():
        for step in range(steps):
            task = step_task(step)
            mbs = to_microbatches(
                synthetic_global_batch(step, GLOBAL_BATCH, task=task),
                dp_rank=pstate.dp_rank,
                dp=layout.dp,
                micro_batch=micro_batch,
                task=task,
            )
            r = engine.train_step(step, mbs)
            losses.append(r.loss)
            norms.append(r.grad_norm)
    out = {"loss": losses, "grad_norm": norms}
    gathered = gather_training_state(engine, dst=0)
    if gathered is not None:
        state, replica_diff = gathered
        mismatches, worst = compare_states(state, reference, rtol=RTOL, scale_atol=SCALE_ATOL)
        out.update(
            mismatches=mismatches, worst=worst, max_replica_diff=max(replica_diff.values()), compared=sorted(state)
        )
    dist.barrier()
    return out


LAYOUTS = {
    "tp2_pp2_sp": ParallelLayout(tp=2, pp=2, dp=1, sequence_parallel=True),
    "dp2_tp2": ParallelLayout(tp=2, pp=1, dp=2),
    "pp2_dp2": ParallelLayout(tp=1, pp=2, dp=2),
    "pp2_vpp2_dp2": ParallelLayout(tp=1, pp=2, dp=2, vpp=2),
    # HSDP: optimizer state sharded over pairs of DP ranks, replicated across the two pairs.
    "hsdp_dp4_shard2": ParallelLayout(dp=4, dp_shard=2),
    # ZeRO-2: gradients in two rotating one-unit slots, reduced per micro-batch (two per rank here).
    "pp2_dp2_zero2": ParallelLayout(tp=1, pp=2, dp=2),
    # ZeRO-3: ZeRO-2's gradients, each block's parameters freed after its forward and backward.
    "dp2_tp2_zero3": ParallelLayout(tp=2, pp=1, dp=2),
    "pp2_dp2_zero3": ParallelLayout(tp=1, pp=2, dp=2),
}
#: Layouts trained with another DP engine config than the default.
DATA_PARALLEL = {
    "pp2_dp2_zero2": DataParallelConfig(sharding="zero2"),
    "dp2_tp2_zero3": DataParallelConfig(sharding="zero3"),
    "pp2_dp2_zero3": DataParallelConfig(sharding="zero3"),
}

#: Runs with a deliberately broken stage boundary (one step each: then exactly the parameters
#: upstream of the broken stream differ): name -> (layout, stream whose gradient is dropped).
BROKEN = {
    "pp2_dp2_txt_detached": (LAYOUTS["pp2_dp2"], "txt"),
    "pp2_dp2_temb_detached": (LAYOUTS["pp2_dp2"], "temb"),
}
BROKEN_STEPS = 1


def layouts_worker(rank: int, world: int, steps: int, names: list[str], broken: list[str] = ()) -> dict:
    out = {}
    states = {}
    if rank == 0:
        out["reference"], states = reference_run(steps, snapshots=(BROKEN_STEPS,) if broken else ())
    for name in names:
        dp_config = DATA_PARALLEL.get(name, DataParallelConfig())
        out[name] = run_layout(LAYOUTS[name], steps, reference=states.get(steps), data_parallel=dp_config)
    for name in broken:
        layout, which = BROKEN[name]
        out[name] = run_layout(layout, BROKEN_STEPS, reference=states.get(BROKEN_STEPS), break_boundary=which)
    return out
