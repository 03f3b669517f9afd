"""The training engine: model chunks + stages + distributed optimizer + one-step logic.

`TrainEngine` owns everything that changes with the parallel layout and nothing about data or
logging: give it this rank's micro-batches of a step and it returns the step's global loss,
grad norm and learning rate. The same engine runs TP / SP / PP / DP and their combinations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from consumers.optimizer import DistributedOptimizer, OptimizerConfig
from consumers.parallel import ParallelState
from consumers.pipeline import PipelineRunner, broadcast_loss_from_last_stage, build_model_chunks, named_trainable
from consumers.step import (
    Batch,
    MMDiTStage,
    Precision,
    PrecisionConfig,
    RecomputeConfig,
    apply_recompute,
    count_image_tokens,
    loss_sum_over_global,
    make_inputs,
    run_local_microbatches,
)
from megatron_qwenimage.config import MMDiTConfig
from megatron_qwenimage.flow_matching import SigmaSampler, UniformSigmaSampler


@dataclass
class StepResult:
    """Metrics of one optimizer step (identical on every rank)."""

    loss: float  #: mean per-sample flow-matching loss over the global batch
    grad_norm: float  #: global L2 norm before clipping
    lr: float
    image_tokens: int  #: target image tokens processed by this DP replica
    samples: int  #: samples processed by this DP replica


class TrainEngine:
    """Model, optimizer and step for one rank.

    Args:
        model_config: architecture (TP size / SP are taken from ``pstate.layout``).
        pstate: this rank's `ParallelState`.
        optimizer: `OptimizerConfig`. precision: `PrecisionConfig`. recompute: `RecomputeConfig`.
        sigma_sampler: σ distribution for training. seed: seed of σ/noise draws.
        global_batch_size: samples per optimizer step over all DP ranks.
        init_seed: model initialisation seed (TP-invariant).
    """

    def __init__(
        self,
        model_config: MMDiTConfig,
        pstate: ParallelState,
        *,
        optimizer: OptimizerConfig,
        precision: PrecisionConfig = PrecisionConfig(),
        recompute: RecomputeConfig = RecomputeConfig(),
        sigma_sampler: Optional[SigmaSampler] = None,
        seed: int = 0,
        global_batch_size: int,
        init_seed: int = 0,
    ):
        self.pstate = pstate
        self.model_config = pstate.layout.model_config(model_config)
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.sigma_sampler = sigma_sampler or UniformSigmaSampler()
        self.precision = Precision(precision, self.model_config, pstate.device, amax_group=pstate.tp_group)
        self.chunks = build_model_chunks(model_config, pstate, init_seed=init_seed)
        for chunk in self.chunks:
            apply_recompute(chunk, recompute)
            self.precision.prepare_model(chunk)
        self.stages = [MMDiTStage(c, self.precision) for c in self.chunks]
        self.optimizer = DistributedOptimizer(
            named_trainable(self.chunks), optimizer, dp_group=pstate.dp_group, tp_rank=pstate.tp_rank
        )
        self.runner = PipelineRunner(self.stages, pstate, global_batch_size) if pstate.layout.pp > 1 else None

    @property
    def param_dtype(self) -> torch.dtype:
        return self.model_config.torch_dtype

    def _inputs(self, step: int, microbatches: Sequence[Batch], sampler: SigmaSampler):
        return [
            make_inputs(b, step=step, seed=self.seed, sigma_sampler=sampler, patch_size=self.model_config.patch_size,
                        dtype=self.param_dtype, device=self.pstate.device)
            for b in microbatches
        ]

    def dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over the DP group (on CPU)."""
        buf = value.to(self.pstate.device)
        if self.pstate.layout.dp > 1:
            dist.all_reduce(buf, group=self.pstate.dp_group)
        return buf.cpu()

    def train_step(self, step: int, microbatches: Sequence[Batch], global_batch_size: Optional[int] = None) -> StepResult:
        """Forward/backward of this rank's micro-batches of global step `step`, then the update.

        `global_batch_size` (samples of the step over all DP ranks) defaults to the engine's; a
        curriculum stage may change it.
        """
        gbs = global_batch_size or self.global_batch_size
        for chunk in self.chunks:
            chunk.train()
        inputs = self._inputs(step, microbatches, self.sigma_sampler)
        self.optimizer.zero_grad()
        if self.runner is None:
            local = run_local_microbatches(self.stages[0], inputs, gbs)
        else:
            local = broadcast_loss_from_last_stage(self.runner.run(inputs, gbs), self.pstate)
        loss = float(self.dp_sum(local.float()))
        opt = self.optimizer.step(step)
        return StepResult(
            loss=loss,
            grad_norm=opt["grad_norm"],
            lr=opt["lr"],
            image_tokens=count_image_tokens(inputs),
            samples=sum(b.size for b in microbatches),
        )

    @torch.no_grad()
    def eval_local_loss(self, step_key: int, microbatches: Sequence[Batch], sigma: float, num_samples: int) -> float:
        """``sum(per-sample loss) / num_samples`` over this DP replica's `microbatches` at a fixed σ.

        Not reduced over DP (callers sum with `dp_sum` once, so DP ranks may evaluate different
        numbers of micro-batches). Under PP every stage returns the last stage's value. Noise is
        seeded by ``(seed, step_key, sample index)``.
        """
        for chunk in self.chunks:
            chunk.eval()
        inputs = self._inputs(step_key, microbatches, _ConstantSigma(sigma))
        if self.runner is None:
            total = torch.zeros(())
            for mb in inputs:
                self.stages[0].set_shapes(mb.img_shapes, mb.num_target_tokens)
                pred = self.stages[0](mb.hidden_states, mb.text, mb.sigma, text_mask=mb.text_mask)
                total += loss_sum_over_global(pred, mb.target, num_samples).cpu()
            return float(total)
        return float(broadcast_loss_from_last_stage(self.runner.evaluate(inputs, num_samples), self.pstate))


class _ConstantSigma(SigmaSampler):
    """σ fixed to one value (validation grid points, including the ends 0 and 1)."""

    def __init__(self, sigma: float):
        self.sigma = float(sigma)

    def sample(self, batch_size, *, generator=None, image_tokens=None, device=None):
        return torch.full((batch_size,), self.sigma, device=device)
