"""Validation: the mean flow-matching loss on a fixed held-out set at a fixed σ grid.

`validate` computes it; `Validator` (torchtitan's ``components/validate.py`` shape) holds the
held-out reader, the σ grid and ``schedule.eval_interval`` for the `consumers.trainer.Trainer`
loop. ``consumers.train.validate`` is this `validate` (re-exported there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Validator:
    """Runs `validate` every `interval` completed steps.

    Attributes:
        reader: the held-out set (``megatron_qwenimage.data.reader.ValidationReader``).
        sigmas: the fixed σ grid (``schedule.eval_sigmas``).
        interval: validate after every N-th completed step (``schedule.eval_interval``, > 0).
    """

    def __init__(self, reader: Any, sigmas: Sequence[float], interval: int):
        self.reader = reader
        self.sigmas = sigmas
        self.interval = interval

    def should_validate(self, step: int) -> bool:
        """Whether validation is due after `step` completed steps."""
        return step % self.interval == 0

    def validate(self, engine, step: int) -> dict:
        """The validation record of `engine` after `step` steps (see `validate`)."""
        return validate(engine, self.reader, self.sigmas, step)


def validate(engine, val, sigmas, step: int) -> dict:
    """Mean validation loss at each σ of the fixed grid.

    The held-out micro-batches are fixed (`ValidationReader`); noise is seeded by the σ's index
    and the sample's global index, so the numbers are comparable across steps and layouts.
    Works under every layout: each σ evaluates all of this rank's micro-batches in one
    `TrainEngine.eval_local_loss` call, which under PP runs each group of equal shapes (task,
    bucket, batch size, text length) through one forward-only pipeline schedule, whatever its
    micro-batch count; the ranks of a pipeline hold the same micro-batches, so they run the same
    calls. DP replicas evaluate their own micro-batches and meet only in the final `dp_sum`.
    """
    from consumers.batch import Batch

    offsets, acc = [], 0
    for _, _, refs in val.micro_batches:
        offsets.append(acc)
        acc += len(refs)
    n_global = acc
    my_ids = range(val.dp_rank, len(val.micro_batches), val.dp_size)
    mine = [
        Batch(
            latents=mb.latents,
            text=mb.text,
            text_mask=mb.text_mask,
            sample_index=torch.arange(offsets[gi], offsets[gi] + mb.batch_size),
            condition_latents=list(mb.condition_latents),
            task=mb.task,
        )
        for mb, gi in zip(val.batches(), my_ids)
    ]
    local = torch.tensor(
        [engine.eval_local_loss(-(i + 1), mine, s, n_global) for i, s in enumerate(sigmas)], dtype=torch.float64
    )
    totals = engine.dp_sum(local)
    by_sigma = {s: float(v) for s, v in zip(sigmas, totals)}
    return {"step": step, "val_loss": sum(by_sigma.values()) / len(by_sigma), "val_loss_by_sigma": by_sigma}
