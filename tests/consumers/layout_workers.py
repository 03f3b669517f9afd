"""Worker bodies of the layout-equivalence test (run in spawned gloo ranks)."""

from __future__ import annotations

import torch

from consumer_helpers import synthetic_global_batch, to_microbatches
from consumers.engine import TrainEngine
from consumers.optimizer import LRSchedule, OptimizerConfig
from consumers.parallel import ParallelLayout, init_parallel
from consumers.step import loss_sum_over_global, make_inputs
from megatron_qwenimage.config import load_config
from megatron_qwenimage.flow_matching import UniformSigmaSampler

MODEL = dict(num_layers=4)
OPT = OptimizerConfig(lr=3e-3, warmup_steps=2, decay_steps=10, min_lr=1e-4, weight_decay=0.01, clip_grad=0.05)
GLOBAL_BATCH = 4
SEED = 7


def step_task(step: int) -> str:
    return "edit" if step == 2 else "t2i"


def reference_losses(steps: int) -> dict:
    """Single process, no parallel machinery: plain model forward on the whole global batch,
    torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW."""
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

    cfg = load_config("tiny-16ch", **MODEL)
    model = QwenImageMMDiT(cfg, init_seed=0)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": OPT.weight_decay},
         {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}],
        lr=OPT.lr, betas=OPT.betas, eps=OPT.eps)
    sched = LRSchedule(OPT)
    losses, norms = [], []
    for step in range(steps):
        task = step_task(step)
        (batch,) = to_microbatches(synthetic_global_batch(step, GLOBAL_BATCH, task=task), dp_rank=0, dp=1,
                                   micro_batch=GLOBAL_BATCH, task=task)
        inp = make_inputs(batch, step=step, seed=SEED, sigma_sampler=UniformSigmaSampler(), patch_size=2,
                          dtype=torch.float32, device=torch.device("cpu"))
        opt.zero_grad()
        pred = model(inp.hidden_states, inp.text, inp.text_mask, inp.sigma, inp.img_shapes)
        loss = loss_sum_over_global(pred, inp.target, GLOBAL_BATCH)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), OPT.clip_grad)))
        for group in opt.param_groups:
            group["lr"] = sched(step)
        opt.step()
        losses.append(float(loss))
    return {"loss": losses, "grad_norm": norms}


def run_layout(layout: ParallelLayout, steps: int, micro_batch: int = 1) -> dict:
    pstate = init_parallel(layout)
    engine = TrainEngine(load_config("tiny-16ch", **MODEL), pstate, optimizer=OPT, seed=SEED,
                         global_batch_size=GLOBAL_BATCH, init_seed=0)
    losses, norms = [], []
    for step in range(steps):
        task = step_task(step)
        mbs = to_microbatches(synthetic_global_batch(step, GLOBAL_BATCH, task=task), dp_rank=pstate.dp_rank,
                              dp=layout.dp, micro_batch=micro_batch, task=task)
        r = engine.train_step(step, mbs)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    return {"loss": losses, "grad_norm": norms}


LAYOUTS = {
    "tp2_pp2_sp": ParallelLayout(tp=2, pp=2, dp=1, sequence_parallel=True),
    "dp2_tp2": ParallelLayout(tp=2, pp=1, dp=2),
    "pp2_dp2": ParallelLayout(tp=1, pp=2, dp=2),
    "pp2_vpp2_dp2": ParallelLayout(tp=1, pp=2, dp=2, vpp=2),
}


def layouts_worker(rank: int, world: int, steps: int, names: list[str]) -> dict:
    out = {}
    if rank == 0:
        out["reference"] = reference_losses(steps)
    for name in names:
        out[name] = run_layout(LAYOUTS[name], steps)
    return out
