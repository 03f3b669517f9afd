"""Model chunks per rank and the micro-batch schedules: ``torch.distributed.pipelining`` (PP > 1,
`PipelineRunner`) and plain gradient accumulation (PP = 1, `run_local_microbatches`).

megatron-core 0.16.1's schedules hard-code CUDA (docs/spec.md §9), so pipelining uses PyTorch's
``Schedule1F1B`` (one stage per rank) and ``ScheduleInterleaved1F1B`` (``vpp`` stages per rank,
stage ``s`` on pipeline rank ``s % pp``): one code path on gloo (CPU) and NCCL (GPU).

Stage ``s`` holds blocks ``layout.stage_layer_range(s)``; stage 0 also the embedders, the last stage
the head. Between stages travel ``img [n, b, D]``, ``txt [t, b, D]`` and ``temb [b, D]``; every stage
gets the ``text_mask`` micro-batch as a keyword. All micro-batches of a step share one bucket and
one padded text length, so shapes are static within a step; a schedule (and its stage buffers) is
built per distinct shape key and cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from consumers.batch import StepInputs, loss_sum_over_global
from consumers.parallel import ParallelState
from consumers.stage import MMDiTStage
from megatron_qwenimage.config import MMDiTConfig
from megatron_qwenimage.model.mmdit import QwenImageMMDiT


def build_model_chunks(
    config: MMDiTConfig, pstate: ParallelState, *, init_seed: int = 0, meta: bool = False
) -> list[QwenImageMMDiT]:
    """This rank's model chunks (one per virtual stage), on `pstate.device`.

    `config` is the architecture; its TP size and SP flag are taken from the layout.
    """
    layout = pstate.layout
    cfg = layout.model_config(config)
    layout.validate_for(cfg, pstate.world_size)
    chunks = []
    for stage in layout.stages_of_rank(pstate.pp_rank):
        start, end = layout.stage_layer_range(stage, cfg.num_layers)
        device = torch.device("meta") if meta else pstate.device
        with device:
            chunk = QwenImageMMDiT(
                cfg,
                tp_group=pstate.tp_group,
                pre_process=(stage == 0),
                post_process=(stage == layout.num_stages - 1),
                layer_range=(start, end),
                init_seed=init_seed,
            )
        chunks.append(chunk)
    return chunks


def named_trainable(chunks: Sequence[QwenImageMMDiT]):
    """``(canonical name, param, tp partition dim)`` over all chunks of this rank."""
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            yield name, p, chunk.partition_dims[name]


class PipelineRunner:
    """Runs one step's micro-batches through the pipeline (forward + backward).

    Args:
        stages: this rank's `MMDiTStage` per virtual stage (in `layout.stages_of_rank` order).
        pstate: parallel state (PP group, layout, device).
        global_batch_size: samples per optimizer step over all DP ranks (loss normalisation).
    """

    def __init__(self, stages: Sequence[MMDiTStage], pstate: ParallelState, global_batch_size: int):
        self.stages = list(stages)
        self.pstate = pstate
        self.global_batch_size = global_batch_size
        self._normalizer = global_batch_size
        self._schedules: dict[tuple, object] = {}

    def _loss_fn(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_sum_over_global(prediction, target, self._normalizer)

    def _schedule(self, key: tuple, n_microbatches: int, train: bool):
        """The cached schedule of `key`: 1F1B / interleaved 1F1B to train; to evaluate (forward
        only) GPipe / looped BFS, which take any micro-batch count (`evaluate`)."""
        if key in self._schedules:
            return self._schedules[key]
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleLoopedBFS,
        )

        layout = self.pstate.layout
        pipe_stages = [
            PipelineStage(
                stage,
                stage_index=idx,
                num_stages=layout.num_stages,
                device=self.pstate.device,
                group=self.pstate.pp_group,
            )
            for stage, idx in zip(self.stages, layout.stages_of_rank(self.pstate.pp_rank))
        ]
        if not train:
            # Forward only: all forwards of a stage in order, no backward to interleave, so no
            # minimum and no multiple of pp (1F1B needs >= pp micro-batches, interleaved 1F1B a
            # count that divides into rounds); every micro-batch is one real one.
            if layout.vpp == 1:
                sched = ScheduleGPipe(pipe_stages[0], n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
            else:
                sched = ScheduleLoopedBFS(pipe_stages, n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
        elif layout.vpp == 1:
            if n_microbatches < layout.pp:
                raise ValueError(
                    f"1F1B needs at least pp={layout.pp} micro-batches per step, got {n_microbatches} "
                    "(raise global_batch_size or lower micro_batch_size)"
                )
            sched = Schedule1F1B(pipe_stages[0], n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
        else:
            if n_microbatches % layout.pp:
                raise ValueError(
                    f"interleaved 1F1B needs the micro-batch count ({n_microbatches}) to be a multiple of pp={layout.pp}"
                )
            sched = ScheduleInterleaved1F1B(pipe_stages, n_microbatches, loss_fn=self._loss_fn, scale_grads=False)
        self._schedules[key] = sched
        return sched

    def run(self, inputs: Sequence[StepInputs], global_batch_size: int | None = None) -> torch.Tensor | None:
        """Forward+backward all micro-batches; returns the summed loss on the last stage, else None."""
        self._normalizer = global_batch_size or self.global_batch_size
        return self._execute(inputs, train=True)

    def evaluate(self, inputs: Sequence[StepInputs], num_samples: int) -> torch.Tensor | None:
        """Forward only; returns ``sum(per-sample loss) / num_samples`` on the last stage, else None.

        `inputs` must share shapes (one bucket, task and text length) and every rank of the
        pipeline must pass the same count; any count >= 1 works (GPipe, or looped BFS under
        interleaving: forward-only schedules have no micro-batch minimum). Communicates only
        within the pipeline group (stage-to-stage sends, once-per-schedule shape inference) and
        the tensor-parallel group inside the blocks, so DP replicas may evaluate different numbers
        of micro-batches in different calls.
        """
        self._normalizer = num_samples
        return self._execute(inputs, train=False)

    def _execute(self, inputs: Sequence[StepInputs], train: bool) -> torch.Tensor | None:
        first = inputs[0]
        for mb in inputs:
            if mb.hidden_states.shape != first.hidden_states.shape or mb.text.shape != first.text.shape:
                raise ValueError(
                    "micro-batches of one pipelined step must have equal shapes (one bucket, one text length)"
                )
        for stage in self.stages:
            stage.set_shapes(first.img_shapes, first.num_target_tokens)
        key = (tuple(first.hidden_states.shape), tuple(first.text.shape), len(inputs), first.num_target_tokens)
        sched = self._schedule(key + (train,), len(inputs), train)
        hidden = torch.cat([mb.hidden_states for mb in inputs])
        text = torch.cat([mb.text for mb in inputs])
        sigma = torch.cat([mb.sigma for mb in inputs])
        mask = torch.cat([mb.text_mask for mb in inputs])
        target = torch.cat([mb.target for mb in inputs])
        losses: list[torch.Tensor] = []
        is_first = self.pstate.is_first_pp
        is_last = self.pstate.is_last_pp
        args = (hidden, text, sigma) if is_first else ()
        if train:
            sched.step(*args, target=target if is_last else None, losses=losses if is_last else None, text_mask=mask)
        else:  # the losses are all we need: do not keep and merge the last stage's outputs
            sched.eval(
                *args,
                target=target if is_last else None,
                losses=losses if is_last else None,
                return_outputs=False,
                text_mask=mask,
            )
        if is_last:
            return torch.stack([loss.detach().float().cpu() for loss in losses]).sum()
        return None


def run_local_microbatches(stage: MMDiTStage, inputs: Sequence[StepInputs], global_batch_size: int) -> torch.Tensor:
    """Forward + backward of every micro-batch on a whole-model stage; returns the summed loss.

    The schedule without a pipeline (PP = 1; megatron-core's ``forward_backward_no_pipelining``),
    the counterpart of `PipelineRunner.run`. Each micro-batch's loss is
    ``sum(per-sample loss) / global_batch_size``; gradients accumulate.
    """
    if not (stage.model.pre_process and stage.model.post_process):
        raise RuntimeError("run_local_microbatches needs the whole model (PP = 1)")
    total = torch.zeros((), dtype=torch.float32)
    for mb in inputs:
        stage.set_shapes(mb.img_shapes, mb.num_target_tokens)
        pred = stage(mb.hidden_states, mb.text, mb.sigma, text_mask=mb.text_mask)
        loss = loss_sum_over_global(pred, mb.target, global_batch_size)
        loss.backward()
        total += loss.detach().cpu()
    return total


def broadcast_loss_from_last_stage(loss: torch.Tensor | None, pstate: ParallelState) -> torch.Tensor:
    """Every rank of the pipeline group gets the last stage's loss (for logging)."""
    buf = loss.clone() if loss is not None else torch.zeros(())
    if pstate.layout.pp > 1:
        buf = buf.to(pstate.device)
        src = dist.get_global_rank(pstate.pp_group, pstate.layout.pp - 1)
        dist.broadcast(buf, src=src, group=pstate.pp_group)
    return buf.cpu()
