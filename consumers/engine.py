"""The training engine: model chunks + stages + distributed optimizer + one-step logic.

`TrainEngine` owns everything that changes with the parallel layout and nothing about data or
logging: give it this rank's micro-batches of a step and it returns the step's global loss,
grad norm and learning rate. The same engine runs TP / SP / PP / DP and their combinations.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from consumers.batch import Batch, count_image_tokens, loss_sum_over_global, make_inputs
from consumers.data_parallel import DataParallelConfig, dp_units
from consumers.graphs import CudaGraphConfig, all_ranks_agree, build_block_graphs, check_cuda_graph_layout
from consumers.optimizer import DistributedOptimizer, OptimizerConfig
from consumers.parallel import ParallelState
from consumers.pipeline import (
    PipelineRunner,
    broadcast_loss_from_last_stage,
    build_model_chunks,
    named_trainable,
    run_local_microbatches,
)
from consumers.precision import Precision, PrecisionConfig, begin_weight_update_window
from consumers.recompute import RecomputeConfig, apply_recompute
from consumers.stage import MMDiTStage
from megatron_qwenimage.config import MMDiTConfig
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.flow_matching import SigmaSampler, UniformSigmaSampler

log = logging.getLogger(__name__)


class NonFiniteTrainingError(UserError, RuntimeError):
    """More than ``optimizer.max_skipped_steps`` consecutive steps had a non-finite loss or grad norm.

    Attributes: step (the global step that gave up), loss, grad_norm (its values), consecutive
    (skipped steps in a row, this one included), first_step (the first of them).
    """

    def __init__(self, step: int, loss: float, grad_norm: float, consecutive: int, limit: int):
        self.step, self.loss, self.grad_norm, self.consecutive = step, loss, grad_norm, consecutive
        self.first_step = step - consecutive + 1
        run = f"step {step}" if consecutive == 1 else f"steps {self.first_step}..{step}"
        super().__init__(
            f"training stopped at step {step}: loss {loss!r}, grad norm {grad_norm!r} is not finite; {run} "
            f"({consecutive} in a row) {'was' if consecutive == 1 else 'were'} skipped, more than optimizer.max_skipped_steps={limit}. Parameters "
            f"and optimizer state are those before step {self.first_step}; look for bad samples in "
            f"{'that step' if consecutive == 1 else 'those steps'} or lower the learning rate"
        )


def amax_reduction_group(tp_only: bool = False) -> dist.ProcessGroup | None:
    """The group FP8 amax statistics are reduced over, as Megatron-LM does: megatron-core's
    ``get_amax_reduction_group(with_context_parallel=True)``, the tensor x data (x context)
    parallel group of this pipeline stage (every rank that runs the same layers on other data
    or other shards agrees on the FP8 scales); `tp_only`: the TP group only (Megatron's
    ``--tp-only-amax-red``). None (TE's default: no reduction) without megatron-core's groups.
    """
    from megatron.core import parallel_state as ps

    if not (dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    return ps.get_amax_reduction_group(with_context_parallel=True, tp_only_amax_red=tp_only)


@dataclass
class StepResult:
    """Metrics of one optimizer step (identical on every rank)."""

    loss: float  #: mean per-sample flow-matching loss over the global batch
    grad_norm: float  #: global L2 norm before clipping
    lr: float
    image_tokens: int  #: target image tokens processed by this DP replica
    samples: int  #: samples processed by this DP replica
    skipped: bool = False  #: the update was skipped (non-finite loss or grad norm)
    skipped_steps: int = 0  #: steps skipped by this engine so far (this one included)
    consecutive_skipped: int = 0  #: skipped steps in a row ending here (0 after an update)


class TrainEngine:
    """Model, optimizer and step for one rank.

    Args:
        model_config: architecture (TP size / SP are taken from ``pstate.layout``).
        pstate: this rank's `ParallelState`.
        optimizer: `OptimizerConfig`. precision: `PrecisionConfig`. recompute: `RecomputeConfig`.
        cuda_graphs: `CudaGraphConfig` (per-block CUDA graphs of training passes).
        data_parallel: `DataParallelConfig` (the DP engine's overlap and reduction dtype).
        sigma_sampler: σ distribution for training. seed: seed of σ/noise draws.
        global_batch_size: samples per optimizer step over all DP ranks.
        init_seed: model initialisation seed (TP-invariant).
        make_graphed_callables: the graph capture function (None: Transformer Engine's; tests
            pass a stand-in with its contract to run the plumbing on CPU).
    """

    def __init__(
        self,
        model_config: MMDiTConfig,
        pstate: ParallelState,
        *,
        optimizer: OptimizerConfig,
        precision: PrecisionConfig = PrecisionConfig(),
        recompute: RecomputeConfig = RecomputeConfig(),
        cuda_graphs: CudaGraphConfig = CudaGraphConfig(),
        data_parallel: DataParallelConfig = DataParallelConfig(),
        sigma_sampler: SigmaSampler | None = None,
        seed: int = 0,
        global_batch_size: int,
        init_seed: int = 0,
        make_graphed_callables=None,
    ):
        self.pstate = pstate
        self.model_config = pstate.layout.model_config(model_config)
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.sigma_sampler = sigma_sampler or UniformSigmaSampler()
        check_cuda_graph_layout(cuda_graphs, tp=pstate.layout.tp, pp=pstate.layout.pp, recompute_mode=recompute.mode)
        data_parallel.check_layout(vpp=pstate.layout.vpp, cuda_graphs=cuda_graphs.enabled)
        self.precision = Precision(precision, self.model_config, pstate.device, amax_group=amax_reduction_group())
        self.chunks = build_model_chunks(model_config, pstate, init_seed=init_seed)
        for chunk in self.chunks:
            apply_recompute(chunk, recompute)
            self.precision.prepare_model(chunk)
        self.stages = [MMDiTStage(c, self.precision) for c in self.chunks]
        #: DP communication units (one per block, the embedders, the head), in forward order.
        self.dp_units = dp_units(self.chunks)
        self.optimizer = DistributedOptimizer(
            named_trainable(self.chunks),
            optimizer,
            dp_group=pstate.dp_shard_group if pstate.dp_shard_group is not None else pstate.dp_group,
            replica_group=pstate.dp_replica_group,
            tp_rank=pstate.tp_rank,
            units=[(u.name, u.param_names) for u in self.dp_units],
            data_parallel=data_parallel,
        )
        # Each unit's parameters are gathered right before its forward; the stage's own forward
        # waits for its chunk's first unit (parameters held directly by the chunk have no module).
        # ZeRO-3: gathered before their forward and backward instead, and blocks freed after each.
        zero3 = self.optimizer.resharding is not None
        for unit in self.dp_units:
            if zero3:
                self.optimizer.reshard_hooks(unit.name, unit.modules, reshard=unit.name.startswith("blocks."))
            else:
                self.optimizer.wait_before_forward(unit.name, unit.modules)
        for stage, chunk in zip(self.stages, self.chunks):
            first = next(u for u in self.dp_units if u.param_names[0] in dict(chunk.named_parameters()))
            if zero3:
                self.optimizer.reshard_hooks(first.name, [stage], reshard=False)
            else:
                self.optimizer.wait_before_forward(first.name, [stage])
        self.runner = PipelineRunner(self.stages, pstate, global_batch_size) if pstate.layout.pp > 1 else None
        #: Per-block CUDA graphs of training passes (None: eager), and the ranks' capture agreement.
        self.graphs = build_block_graphs(
            cuda_graphs,
            self.chunks[0],
            fp8_recipe=self.precision.recipe,
            amax_group=self.precision.amax_group,
            make_graphed_callables=make_graphed_callables,
        )
        self._agree_capture = None
        if self.graphs is not None and dist.is_initialized() and dist.get_world_size() > 1:
            # All ranks capture at the same steps; the vote runs on the host (gloo), never on the GPU queue.
            self._agree_capture = all_ranks_agree(dist.new_group(backend="gloo"))
        self.max_skipped_steps = optimizer.max_skipped_steps
        #: Steps skipped for a non-finite loss or grad norm: in total and in a row (`train_step`).
        self.skipped_steps = 0
        self.consecutive_skipped = 0

    @property
    def param_dtype(self) -> torch.dtype:
        return self.model_config.torch_dtype

    def _inputs(self, step: int, microbatches: Sequence[Batch], sampler: SigmaSampler):
        return [
            make_inputs(
                b,
                step=step,
                seed=self.seed,
                sigma_sampler=sampler,
                patch_size=self.model_config.patch_size,
                dtype=self.param_dtype,
                device=self.pstate.device,
            )
            for b in microbatches
        ]

    def dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over the DP group (on CPU)."""
        buf = value.to(self.pstate.device)
        if self.pstate.layout.dp > 1:
            dist.all_reduce(buf, group=self.pstate.dp_group)
        return buf.cpu()

    def train_step(self, step: int, microbatches: Sequence[Batch], global_batch_size: int | None = None) -> StepResult:
        """Forward/backward of this rank's micro-batches of global step `step`, then the update.

        `global_batch_size` (samples of the step over all DP ranks) defaults to the engine's; a
        curriculum stage may change it.

        A non-finite loss or global grad norm (both identical on every rank) skips the update
        (`DistributedOptimizer.step`) and counts it; more than ``optimizer.max_skipped_steps``
        skipped steps in a row raise `NonFiniteTrainingError` naming the step (on every rank).
        """
        gbs = global_batch_size or self.global_batch_size
        for chunk in self.chunks:
            chunk.train()
        self.capture_graphs()  # before the gradients are zeroed: a capture runs backward passes
        begin_weight_update_window(self.chunks)  # FP8 weights are re-cast from this step's weights
        inputs = self._inputs(step, microbatches, self.sigma_sampler)
        self.optimizer.zero_grad()
        self.optimizer.begin_accumulation(len(inputs))  # each unit's reduce-scatter starts with its last gradient
        if self.graphs is not None:  # graphed blocks replay without their forward hooks
            self.optimizer.finish_param_sync()
        if self.runner is None:
            with self.graphs.dispatching() if self.graphs is not None else contextlib.nullcontext():
                local = run_local_microbatches(self.stages[0], inputs, gbs)
        else:
            local = broadcast_loss_from_last_stage(self.runner.run(inputs, gbs), self.pstate)
        loss = float(self.dp_sum(local.float()))
        opt = self.optimizer.step(step, skip=not math.isfinite(loss))
        if opt["skipped"]:
            self.skipped_steps += 1
            self.consecutive_skipped += 1
            if self.pstate.rank == 0:
                log.warning(
                    "step %d skipped: loss %r, grad norm %r not finite (%d in a row, %d in total; limit %d in a row)",
                    step,
                    loss,
                    opt["grad_norm"],
                    self.consecutive_skipped,
                    self.skipped_steps,
                    self.max_skipped_steps,
                )
            if self.consecutive_skipped > self.max_skipped_steps:
                raise NonFiniteTrainingError(
                    step, loss, opt["grad_norm"], self.consecutive_skipped, self.max_skipped_steps
                )
        else:
            self.consecutive_skipped = 0
        return StepResult(
            loss=loss,
            grad_norm=opt["grad_norm"],
            lr=opt["lr"],
            image_tokens=count_image_tokens(inputs),
            samples=sum(b.size for b in microbatches),
            skipped=opt["skipped"],
            skipped_steps=self.skipped_steps,
            consecutive_skipped=self.consecutive_skipped,
        )

    def capture_graphs(self):
        """Capture the per-block CUDA graphs of the layout a training pass recorded, when every
        rank has one pending (`BlockGraphCache.capture_pending`); returns the `CapturedLayout`
        or None. Runs between steps, before the gradients are zeroed (a capture's warm-up runs
        backward passes), with the optimizer's grad hooks paused: the capture must find each
        gradient in ``param.grad``, and a hook run while capturing would be recorded into the
        graph and add every replayed gradient to the buffer twice."""
        if self.graphs is None:
            return None
        self.optimizer.finish_param_sync()
        with self.optimizer.grad_hooks_paused():
            return self.graphs.capture_pending(self._agree_capture)

    @torch.no_grad()
    def eval_local_loss(self, step_key: int, microbatches: Sequence[Batch], sigma: float, num_samples: int) -> float:
        """``sum(per-sample loss) / num_samples`` over this DP replica's `microbatches` at a fixed σ.

        Not reduced over DP (callers sum with `dp_sum` once, so DP ranks may evaluate different
        numbers of micro-batches). Under PP every stage returns the last stage's value; the
        micro-batches may have different shapes: they go through the pipeline one shape group
        (`shape_groups`) per forward-only schedule call, with as many micro-batches as the group
        has, so every rank of the pipeline group must pass the same list (as the ranks of one DP
        replica do). Noise is seeded by ``(seed, step_key, sample index)``.
        """
        for chunk in self.chunks:
            chunk.eval()
        self.optimizer.finish_param_sync()
        begin_weight_update_window(self.chunks)
        inputs = self._inputs(step_key, microbatches, _ConstantSigma(sigma))
        if self.runner is None:
            total = torch.zeros(())
            for mb in inputs:
                self.stages[0].set_shapes(mb.img_shapes, mb.num_target_tokens)
                pred = self.stages[0](mb.hidden_states, mb.text, mb.sigma, text_mask=mb.text_mask)
                total += loss_sum_over_global(pred, mb.target, num_samples).cpu()
            self.optimizer.release_params()  # ZeRO-3: the units a forward leaves gathered
            return float(total)
        groups = shape_groups(microbatches)
        if not groups:  # the same on every rank of the pipeline: nothing to run or broadcast
            return 0.0
        total = None
        for idx in groups:
            loss = self.runner.evaluate([inputs[i] for i in idx], num_samples)
            if loss is not None:  # last stage
                total = loss if total is None else total + loss
        self.optimizer.release_params()
        return float(broadcast_loss_from_last_stage(total, self.pstate))


def shape_groups(microbatches: Sequence[Batch]) -> list[list[int]]:
    """Indices of `microbatches` grouped by `Batch.shape_key` (task, bucket, batch size, text
    length, condition shapes), groups in order of first appearance, indices ascending: the
    micro-batches of a group can share one pipeline schedule call."""
    groups: dict[tuple, list[int]] = {}
    for i, mb in enumerate(microbatches):
        groups.setdefault(mb.shape_key(), []).append(i)
    return list(groups.values())


class _ConstantSigma(SigmaSampler):
    """σ fixed to one value (validation grid points, including the ends 0 and 1)."""

    def __init__(self, sigma: float):
        self.sigma = float(sigma)

    def sample(self, batch_size, *, generator=None, image_tokens=None, device=None):
        return torch.full((batch_size,), self.sigma, device=device)
