"""The training loop: `Trainer`, in the shape of torchtitan's ``Trainer``.

Construction does everything before step 0: the config's checks on disk (`preflight`),
torch.distributed and the process groups, the `TrainEngine` (model, optimizer, precision,
recompute, σ sampler), the cache reader, the checkpoint manager and the resume
(`CheckpointManager.load_latest`), the validator and the metrics logger. `Trainer.train` is a
loop of `Trainer.train_step`, the `Validator` and ``checkpointer.save(step, ..., last_step=...)``
(the manager decides whether a step is due: `CheckpointManager.should_save`), then the final
save and the optional diffusers export. ``consumers.train.train(cfg)`` builds one and runs it.

Errors that every rank raises alike (config, shared files, world-agreed values) are marked
collective (`megatron_qwenimage.errors.mark_collective`) so that only rank 0 reports them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from consumers.run_config import RunConfig, preflight
from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.errors import UserError, collective, mark_collective

log = logging.getLogger(__name__)


def _job_store():
    """The job's c10d store (the rendezvous store of the default process group), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):  # no default group, or a torch without it
        return None


def _any_rank_failed(failed: bool, device) -> bool:
    """One all-reduce over the world: whether `failed` is true on some rank."""
    flag = torch.tensor([1 if failed else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class _StopRequest:
    """SIGTERM while `Trainer.train` runs: noted here, acted on at the end of a step by every rank alike.

    Raising where the signal lands (the CLI's handler raises `Terminated`) would stop each rank at
    another point, some between two collectives of a step, so the ranks could neither agree on
    a step nor save one. Repeated signals are one request (under torchrun a worker gets SIGTERM from
    Slurm and again from torchrun, which forwards it). Outside the main thread nothing is installed.

    While the ranks wait for a tail cache no step ends, so the reader polls `requested_anywhere`
    instead: a rank that noted a request publishes it in the job's c10d store (the rendezvous
    store every rank already holds), so the ranks whose wait it did not reach learn it without a
    collective (they are not in step with each other while they wait).
    """

    #: The store key of a published request, per torchelastic restart (the store outlives restarts).
    KEY = "qwenimage/stop-requested/{restart}"

    def __init__(self, store=None) -> None:
        self.requested = False
        self._previous = None
        self._store = store
        self._key = self.KEY.format(restart=os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self._published = False

    def requested_anywhere(self) -> bool:
        """Whether this rank or another noted a stop request (publishing this rank's); thread-safe."""
        if self._store is None:
            return self.requested
        if self.requested:
            if not self._published:
                self._store.set(self._key, "1")
                self._published = True
            return True
        return self._store.check([self._key])

    def _note(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def raise_stop(self) -> None:
        """Stop as the process's own SIGTERM handler would: the CLI's raises its `Terminated` (exit 143;
        the class of the CLI module that is running, ``__main__`` under ``python -m``)."""
        if callable(self._previous):
            self._previous(signal.SIGTERM, None)
        from megatron_qwenimage.cli import Terminated

        raise Terminated()


class _DataFailed(Exception):
    """The reader failed step `Trainer.step` on every rank alike; ``__cause__`` is its error."""


class Trainer:
    """One training run (or its resume) of a `RunConfig`; every rank builds one and calls `train`.

    Attributes:
        cfg: the run config.
        layout, pstate: the parallel layout and this rank's process groups.
        engine: the `TrainEngine` (model chunks, optimizer, step functions).
        reader: the training `CacheReader` (its state is checkpointed with the model).
        checkpointer: the `CheckpointManager` (None without a ``checkpoint`` section).
        validator: the `Validator` (None without ``data.validation`` or ``schedule.eval_interval``).
        metrics: the `MetricsLogger` (writes on rank 0 only).
        step: steps completed (the resumed step right after construction).
        start_step: the step training started (or resumed) at.
        last_record: the last metrics record logged.
    """

    def __init__(self, cfg: RunConfig):
        from consumers.checkpoint import CheckpointManager
        from consumers.engine import TrainEngine
        from consumers.parallel import init_distributed, init_parallel
        from consumers.validate import Validator
        from megatron_qwenimage.data.agreement import TorchDistributedAgreement
        from megatron_qwenimage.data.reader import CacheReader, ValidationReader

        self.cfg = cfg
        with collective():  # config and files only: every rank fails alike, before any collective
            preflight(cfg)
        init_distributed()
        with collective():
            self.layout = layout = cfg.layout(dist.get_world_size())
            cfg.data.check_dp(layout.dp)
        self.pstate = pstate = init_parallel(layout)
        torch.manual_seed(cfg.schedule.seed)
        with collective():  # the model, precision and recompute settings are checked alike everywhere
            self.engine = TrainEngine(
                cfg.model,
                pstate,
                optimizer=cfg.optimizer,
                precision=cfg.precision,
                recompute=cfg.recompute,
                cuda_graphs=cfg.cuda_graphs,
                data_parallel=cfg.data_parallel,
                sigma_sampler=cfg.flow_matching.build_sampler(),
                seed=cfg.schedule.seed,
                global_batch_size=cfg.data.stages[0].global_batch,
                init_seed=cfg.schedule.init_seed,
            )
        # Every rank (TP/PP peers, DP replicas) must read the same global steps: pins are decided on
        # rank 0 and each step's samples are compared across the world (data/agreement.py).
        # On a gloo group: the per-step agreement then never waits for the GPU to drain its queue
        # (the previous step's optimizer kernels), which an NCCL collective read back on the host does.
        agreement = TorchDistributedAgreement(group=dist.new_group(backend="gloo"), device="cpu")
        # One rank per data-parallel replica reads (and verifies) the cache; its TP/PP peers receive.
        self.reader = CacheReader(
            cfg.data, dp_rank=pstate.dp_rank, dp_size=layout.dp, agreement=agreement, read_samples=pstate.reads_data
        )
        self.checkpointer = CheckpointManager(cfg.checkpoint, pstate) if cfg.checkpoint else None
        self.step = 0
        self._resume()
        self.start_step = self.step
        self.validator = None
        if cfg.data.validation is not None and cfg.schedule.eval_interval:
            val = ValidationReader(
                cfg.data.validation,
                dp_rank=pstate.dp_rank,
                dp_size=layout.dp,
                agreement=agreement,
                verify_checksums=cfg.data.verify_checksums,
                text_length=cfg.data.text_length,
            )
            self.validator = Validator(val, cfg.schedule.eval_sigmas, cfg.schedule.eval_interval)
        self.metrics = self._start_metrics()
        self.last_record: dict | None = None
        if pstate.rank == 0:
            log.info(
                "training %s on tp=%d pp=%d vpp=%d dp=%d (sp=%s; optimizer state sharded %s over %d DP ranks x %d replicas), steps %d..%d",
                cfg.model.name,
                layout.tp,
                layout.pp,
                layout.vpp,
                layout.dp,
                layout.sequence_parallel,
                cfg.data_parallel.sharding,
                layout.shard_size,
                layout.replicas,
                self.step,
                cfg.schedule.train_steps,
            )

    def _resume(self) -> None:
        """Load the newest loadable checkpoint per ``checkpoint.resume`` (model, optimizer, reader)."""
        from consumers.checkpoint import ResumeRefused

        if self.checkpointer is None:
            return
        try:  # checkpoint.resume decides; ResumeRefused (every rank alike) stops the run here
            meta = self.checkpointer.load_latest(self.engine)
        except BaseException as exc:
            self.reader.close()
            if isinstance(exc, ResumeRefused):
                mark_collective(exc)
            raise
        if meta is not None:
            self.step = int(meta["step"])
            self.reader.load_state_dict(meta["reader"])
            if self.pstate.rank == 0:
                log.info(
                    "resumed from %s/step_%08d (saved at layout %s)", self.cfg.checkpoint.dir, self.step, meta["layout"]
                )

    def _start_metrics(self):
        """The metrics logger. Rank 0 opens the metrics files and the Prometheus port; if it cannot
        (port in use...), the others must not wait for it in the first step's collectives: all
        learn it and stop alike."""
        from consumers.metrics import MetricsLogger

        cfg, pstate = self.cfg, self.pstate
        metrics_error = None
        try:
            metrics = MetricsLogger(
                cfg.logging,
                enabled=pstate.rank == 0,
                world_size=pstate.world_size,
                peak_flops=cfg.logging.peak_flops(fp8=cfg.precision.fp8 is not None),
                train_steps=cfg.schedule.train_steps,
                stages=cfg.data.stages,
                tail_caches=[c.path for c in cfg.data.caches if c.mode == "tail"],
            )
        except UserError as exc:
            metrics_error = exc
        if _any_rank_failed(metrics_error is not None, pstate.device):
            self.reader.close()
            if metrics_error is not None:
                raise metrics_error
            raise mark_collective(
                ConfigError("logging: rank 0 could not start the metrics logger (its error says why)")
            )
        return metrics

    def _checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint holds besides model and optimizer: the reader's position."""
        return {"reader": self.reader.state_dict()}

    def train_step(self, step: int) -> bool:
        """Read global step `step`, train it and log its metrics; False when the data has run out."""
        from consumers.data import broadcast_micro_batches, step_batches
        from megatron_qwenimage.accounting import step_model_flops
        from megatron_qwenimage.data.reader import EndOfData, ReaderInterrupted

        cfg, pstate, reader = self.cfg, self.pstate, self.reader
        t0 = time.perf_counter()
        try:
            micro = reader.next_global_step()
        except EndOfData:
            if pstate.rank == 0:
                log.info("data: the curriculum is complete after %d steps", step)
            return False
        except ReaderInterrupted:
            raise
        except Exception as exc:  # raised by every rank alike: the reader agrees on each step's outcome
            raise _DataFailed() from exc
        micro = broadcast_micro_batches(
            micro, group=pstate.model_parallel_group, src=pstate.data_source_rank, device=pstate.device
        )
        plan = reader.last_step
        if plan.step != step:
            raise RuntimeError(f"reader is at step {plan.step} but training at step {step} (reader state mismatch)")
        batches = step_batches(
            micro, plan, dp_rank=pstate.dp_rank, dp_size=self.layout.dp, pad_multiple=cfg.schedule.text_pad_multiple
        )
        t_data = time.perf_counter() - t0
        result = self.engine.train_step(step, batches, global_batch_size=len(plan.refs))
        step_time = time.perf_counter() - t0
        b0 = batches[0]
        flops = step_model_flops(
            cfg.model,
            len(plan.refs),
            b0.latents.shape,
            int(b0.text_mask.sum()),
            b0.size,
            [c.shape for c in b0.condition_latents],
        )
        record = self.metrics.record_step(
            step=step,
            loss=result.loss,
            lr=result.lr,
            grad_norm=result.grad_norm,
            samples=len(plan.refs),
            image_tokens=result.image_tokens * self.layout.dp,
            flops=flops,
            step_time_s=step_time,
            data_wait_s=t_data,
            skipped=result.skipped,
            skipped_steps=result.skipped_steps,
        )
        self.last_record = record or self.last_record
        return True

    def train(self) -> dict:
        """Train from `step` up to ``schedule.train_steps`` (or until the data runs out), then save
        the final checkpoint and export; returns ``{"final_step", "last_record"}``.

        SIGTERM (Slurm's warning before the time limit, a preemption, ``qwenimage run`` stopping)
        does not stop a rank where it lands: the step it arrived in is finished, every rank agrees
        on the stop at the step's end (`_stop_agreed`), the checkpoint of that step is saved and
        committed (`_save_and_stop`), then `megatron_qwenimage.cli.Terminated` (exit 143) is raised.
        A SIGTERM during the final save and export lets them finish. A SIGTERM while the ranks wait
        for a tail cache ends the wait (`_StopRequest.requested_anywhere`) and stops the same way.

        When the data fails (a tail timeout, a corrupted shard, data that cannot feed the config:
        the reader raises it on every rank alike) the steps trained since the last checkpoint are
        saved first (`_save_before_failing`); then the reader's error is raised (exit non-zero).
        """
        from consumers.engine import NonFiniteTrainingError
        from megatron_qwenimage.data.reader import ReaderInterrupted

        stop_group = dist.new_group(backend="gloo")  # the per-step stop agreement never waits for the GPU
        try:
            with _StopRequest(_job_store()) as stop:
                self.reader.set_interrupt(stop.requested_anywhere)
                if self.validator is not None and self.step == 0:
                    self.metrics.emit(self.validator.validate(self.engine, 0))
                for step in range(self.step, self.cfg.schedule.train_steps):
                    try:
                        if not self.train_step(step):
                            break
                    except ReaderInterrupted:
                        if self.pstate.rank == 0:
                            log.info("SIGTERM while waiting for data before step %d", step)
                        self._save_and_stop(stop)
                    except _DataFailed as failed:
                        self._save_before_failing(failed.__cause__)
                        raise failed.__cause__ from None
                    self.step = step + 1
                    if self.checkpointer is not None:
                        self.checkpointer.save(self.step, self.engine, self._checkpoint_meta, last_step=False)
                        self.checkpointer.poll()  # commits an async save as soon as every rank's write has finished
                    if self.validator is not None and self.validator.should_validate(self.step):
                        self.metrics.emit(self.validator.validate(self.engine, self.step))
                    if self._stop_agreed(stop.requested, stop_group):
                        self._save_and_stop(stop)
                if self.checkpointer is not None:
                    self.checkpointer.save(self.step, self.engine, self._checkpoint_meta, last_step=True)
                    self.checkpointer.finalize()
                    self._export()
                    dist.barrier()
        except NonFiniteTrainingError as exc:  # raised on every rank alike (world-reduced loss and grad norm)
            mark_collective(exc)
            raise
        finally:
            self.close()
        return {"final_step": self.step, "last_record": self.last_record}

    @staticmethod
    def _stop_agreed(requested: bool, group) -> bool:
        """Whether some rank got SIGTERM: one int all-reduce over `group` (gloo) after every step."""
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def _save_and_stop(self, stop: _StopRequest) -> None:
        """Save (synchronously) and commit the checkpoint of `step`, unless the interval rule has just
        saved it or nothing was trained since the resume; wait for an async save in flight; then
        raise `Terminated` on every rank (the CLI exits 143; the same command resumes from here)."""
        if self.pstate.rank == 0:
            log.info("SIGTERM: stopping after step %d", self.step)
        if self.checkpointer is not None:
            self.checkpointer.save(self.step, self.engine, self._checkpoint_meta, last_step=True)
            self.checkpointer.finalize()
            if self.pstate.rank == 0:
                log.info("checkpoint of step %d committed in %s", self.step, self.cfg.checkpoint.dir)
        stop.raise_stop()

    def _save_before_failing(self, error: BaseException) -> None:
        """Commit the checkpoint of the steps trained so far (when one is due: not just saved, not
        nothing trained since the resume) before the data error `error` ends the run, and say so."""
        if self.checkpointer is None:
            return
        saved = self.checkpointer.save(self.step, self.engine, self._checkpoint_meta, last_step=True)
        self.checkpointer.finalize()
        if self.pstate.rank == 0:
            if saved is not None:
                what = f"checkpoint of step {self.step} committed in {self.cfg.checkpoint.dir}"
            elif self.step == self.start_step:
                what = f"nothing was trained since the run started at step {self.step}"
            else:
                what = f"the interval checkpoint of step {self.step} already holds every trained step"
            log.error("the data failed before step %d (%s); %s; the run stops", self.step, type(error).__name__, what)

    def _export(self) -> None:
        """Rank 0 writes the final checkpoint as a diffusers directory (``schedule.export_diffusers``)."""
        if self.cfg.schedule.export_diffusers and self.pstate.rank == 0:
            from consumers.checkpoint import export_checkpoint_to_diffusers, step_dir_name

            export_checkpoint_to_diffusers(
                Path(self.cfg.checkpoint.dir) / step_dir_name(self.step), self.cfg.schedule.export_diffusers
            )

    def close(self) -> None:
        """Close the reader and the metrics logger."""
        self.reader.close()
        self.metrics.close()
