"""A sample's σ and noise depend only on the seed, the step and its index in the step's *global*
batch, never on the data-parallel layout.

`step_batches` numbers DP rank r's samples from ``r * global_batch / dp``: one global batch of 8
split over 1, 2 or 4 DP ranks gives every sample the same index, and `make_inputs` the same σ,
noise and target, bit for bit; no two samples (within a step or across DP replicas) share a draw.
"""

from __future__ import annotations

import pytest
import torch

from consumers.batch import make_inputs
from consumers.data import step_batches
from megatron_qwenimage.data.mixing import SampleRef, StepPlan
from megatron_qwenimage.data.reader import MicroBatch
from megatron_qwenimage.flow_matching import UniformSigmaSampler

GLOBAL_BATCH, MICRO_BATCH, STEP, SEED = 8, 2, 5, 3


def _global_micro_batches() -> list[MicroBatch]:
    """The step's global batch in order, as micro-batches of `MICRO_BATCH` (edit: one condition)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(GLOBAL_BATCH // MICRO_BATCH):
        tokens = 3 + k  # the reader pads text to each micro-batch's longest; step_batches to the step's
        out.append(
            MicroBatch(
                latents=torch.randn(MICRO_BATCH, 4, 8, 8, generator=g),
                condition_latents=[torch.randn(MICRO_BATCH, 4, 8, 8, generator=g)],
                text=torch.randn(MICRO_BATCH, tokens, 8, generator=g),
                text_mask=torch.ones(MICRO_BATCH, tokens, dtype=torch.bool),
                task="edit",
                bucket="64x64",
                sample_ids=[f"id{k * MICRO_BATCH + j}" for j in range(MICRO_BATCH)],
            )
        )
    return out


PLAN = StepPlan(
    STEP, 0, "s", "edit", "c", 1, "64x64", MICRO_BATCH, tuple(SampleRef("shard", row) for row in range(GLOBAL_BATCH))
)


def _draws_by_global_index(dp: int) -> tuple[list[int], dict[int, dict[str, torch.Tensor]]]:
    """The global sample indices of DP ranks 0..dp-1 in order, and every DP rank's `make_inputs`
    of the step by global index: σ ``[]``, the target ``[N, 4C]`` (ε − x₀) and the noisy input
    ``[N, 4C]``."""
    micro = _global_micro_batches()
    per_rank = len(micro) // dp
    indices, draws = [], {}
    for dp_rank in range(dp):
        batches = step_batches(micro[dp_rank * per_rank : (dp_rank + 1) * per_rank], PLAN, dp_rank=dp_rank, dp_size=dp)
        for batch in batches:
            inputs = make_inputs(
                batch,
                step=STEP,
                seed=SEED,
                sigma_sampler=UniformSigmaSampler(),
                patch_size=2,
                dtype=torch.float32,
                device=torch.device("cpu"),
            )
            for j, index in enumerate(batch.sample_index.tolist()):
                indices.append(index)
                draws[index] = {
                    "sigma": inputs.sigma[j],
                    "target": inputs.target[j],
                    "noisy": inputs.hidden_states[j, : inputs.num_target_tokens],
                }
    return indices, draws


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_replicas_draw_what_one_rank_draws_for_each_global_sample(dp):
    indices, single = _draws_by_global_index(1)
    assert indices == list(range(GLOBAL_BATCH))
    assert len({float(d["sigma"]) for d in single.values()}) == GLOBAL_BATCH  # every sample its own draw
    indices, split = _draws_by_global_index(dp)
    assert indices == list(range(GLOBAL_BATCH)), f"dp={dp}: DP rank r must hold global samples r*{GLOBAL_BATCH // dp}.."
    for index, ref in single.items():
        for name, value in ref.items():
            assert torch.equal(split[index][name], value), (dp, index, name)
