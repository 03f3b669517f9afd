"""Worker bodies of the validation-layout test (run in spawned gloo ranks).

Every world builds the same model (`TrainEngine` with ``init_seed=0``, adaLN-Zero init left by
`perturb_zero_init` as in the layout test, so predictions depend on every block and a broken
pipeline boundary would show) and runs `consumers.train.validate` on the same held-out set.
The reference is a plain single-process model, no engine and no parallel machinery, evaluating
every global micro-batch with the seeding `validate` documents (σ index, global sample index).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from consumers.batch import Batch, loss_sum_over_global, make_inputs
from consumers.engine import TrainEngine, _ConstantSigma, shape_groups
from consumers.optimizer import OptimizerConfig
from consumers.parallel import ParallelLayout, init_parallel
from consumers.train import validate
from megatron_qwenimage.config import load_config
from megatron_qwenimage.data.reader import ValidationConfig, ValidationReader
from tests.helpers.consumers import perturb_zero_init

MODEL = dict(num_layers=4)
SEED = 7
PERTURB_SEED = 5
SIGMAS = (0.0, 0.35, 1.0)
TEXT_LENGTH = 8
STEP = 3

LAYOUTS = {
    "single": ParallelLayout(tp=1, pp=1, dp=1),
    "pp2": ParallelLayout(tp=1, pp=2, dp=1),
    "pp2_dp2": ParallelLayout(tp=1, pp=2, dp=2),
    "tp2_pp2_sp": ParallelLayout(tp=2, pp=2, dp=1, sequence_parallel=True),
    "pp2_vpp2": ParallelLayout(tp=1, pp=2, dp=1, vpp=2),
    "pp2_vpp2_dp2": ParallelLayout(tp=1, pp=2, dp=2, vpp=2),
}


def val_config(cache: str) -> ValidationConfig:
    """Two buckets x (t2i, edit), 7 samples each in micro-batches of 2: per (bucket, task) three
    micro-batches of 2 and one of 1 (two shape groups: 3 micro-batches and 1)."""
    return ValidationConfig(cache, pin=1, tasks=("t2i", "edit"), samples_per_bucket=7, micro_batch=2)


def global_batches(val: ValidationReader) -> list[Batch]:
    """All held-out micro-batches as `Batch`es with their global sample indices (as `validate`)."""
    whole = ValidationReader(val.config, text_length=TEXT_LENGTH).batches()
    out, acc = [], 0
    for mb in whole:
        out.append(
            Batch(
                latents=mb.latents,
                text=mb.text,
                text_mask=mb.text_mask,
                sample_index=torch.arange(acc, acc + mb.batch_size),
                condition_latents=list(mb.condition_latents),
                task=mb.task,
            )
        )
        acc += mb.batch_size
    return out


def reference(cache: str) -> dict:
    """Plain model, every global micro-batch one forward: ``val_loss_by_sigma`` by hand."""
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

    cfg = load_config("tiny-16ch", **MODEL)
    model = QwenImageMMDiT(cfg, init_seed=0)
    perturb_zero_init([model], seed=PERTURB_SEED)
    model.eval()
    batches = global_batches(ValidationReader(val_config(cache), text_length=TEXT_LENGTH))
    n = sum(b.size for b in batches)
    by_sigma = {}
    with torch.no_grad():
        for i, s in enumerate(SIGMAS):
            total = 0.0
            for b in batches:
                inp = make_inputs(
                    b,
                    step=-(i + 1),
                    seed=SEED,
                    sigma_sampler=_ConstantSigma(s),
                    patch_size=2,
                    dtype=torch.float32,
                    device=torch.device("cpu"),
                )
                pred = model(inp.hidden_states, inp.text, inp.text_mask, inp.sigma, inp.img_shapes)
                total += float(loss_sum_over_global(pred, inp.target, n))
            by_sigma[s] = total
    return {
        "val_loss": sum(by_sigma.values()) / len(by_sigma),
        "by_sigma": [by_sigma[s] for s in SIGMAS],
        "micro_batches": len(batches),
        "samples": n,
    }


def run_layout(name: str, cache: str) -> dict:
    layout = LAYOUTS[name]
    pstate = init_parallel(layout)
    engine = TrainEngine(
        load_config("tiny-16ch", **MODEL),
        pstate,
        optimizer=OptimizerConfig(lr=1e-3),
        seed=SEED,
        global_batch_size=4,
        init_seed=0,
    )
    perturb_zero_init(engine.chunks, engine.optimizer, seed=PERTURB_SEED)
    val = ValidationReader(val_config(cache), dp_rank=pstate.dp_rank, dp_size=layout.dp, text_length=TEXT_LENGTH)
    # This rank's shape groups, as `eval_local_loss` forms them (micro-batch count per call).
    groups = [
        len(g)
        for g in shape_groups(
            [
                Batch(
                    latents=mb.latents,
                    text=mb.text,
                    text_mask=mb.text_mask,
                    sample_index=torch.zeros(mb.batch_size, dtype=torch.long),
                    condition_latents=list(mb.condition_latents),
                    task=mb.task,
                )
                for mb in val.batches()
            ]
        )
    ]
    first = validate(engine, val, SIGMAS, STEP)
    again = validate(engine, val, SIGMAS, STEP + 1)  # cached schedules, same numbers
    dist.barrier()
    return {
        "val_loss": first["val_loss"],
        "by_sigma": [first["val_loss_by_sigma"][s] for s in SIGMAS],
        "again": [again["val_loss_by_sigma"][s] for s in SIGMAS],
        "step": first["step"],
        "group_sizes": groups,
        "pp_rank": pstate.pp_rank,
        "dp_rank": pstate.dp_rank,
    }


def validation_worker(rank: int, world: int, cache: str, names: list[str], with_reference: bool = False) -> dict:
    torch.manual_seed(0)
    out = {name: run_layout(name, cache) for name in names}
    if with_reference and rank == 0:
        out["reference"] = reference(cache)
    return out
