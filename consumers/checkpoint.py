"""Distributed, atomic, reshardable checkpoints with ``torch.distributed.checkpoint`` (DCP).

What a checkpoint holds (directory ``<root>/step_00001234``):

* DCP tensors, keyed by canonical names (independent of TP/PP/DP):
  - ``model/<name>``: every parameter and carried buffer, a DTensor on the ``(tp, dp)`` mesh of its
    pipeline rank with placements ``[Shard(tp_dim) | Replicate, Replicate]`` (ZeRO-3: parameters
    ``[Shard(tp_dim) | Replicate, Shard(0)]``, from the master chunks; the same global tensors);
  - ``optim/<name>/{master,exp_avg,exp_avg_sq[,ema]}``: the ZeRO-1 chunks, placements
    ``[Shard(tp_dim) | Replicate, Shard(0)]`` (see `consumers.optimizer`).
  DCP stores each chunk with its global offsets, so any other TP/PP/DP layout reads exactly its
  own pieces (resharding); replicated copies are written once.
* ``meta.json`` (rank 0): step, optimizer step count, LR schedule, reader state, run info.
* ``rng/rank_XXXXX.safetensors``: torch/CUDA/numpy/python RNG states per rank, without pickle
  (`save_rng_state`; restored when the world size is unchanged; training randomness is seeded per
  step and sample, so resharding does not need them). Old ``rank_XXXXX.pt`` pickles are refused.
* ``COMMITTED``: written last, holding the size and SHA-256 of every file.

Atomicity: everything is written under ``.tmp-step_XXXXXXXX``; after all ranks finish, rank 0
writes ``COMMITTED`` and renames the directory. A directory without a valid ``COMMITTED`` (or
whose files do not match it, or whose saved model config differs from the run's architecture) is
never loaded: `CheckpointManager.load_latest` refuses it, says why, and falls back to the previous
checkpoint.

Resume policy (``checkpoint.resume``): a run never silently starts over. With ``auto`` it starts
fresh only when the directory holds no committed checkpoint; when it holds some and none can be
loaded, `ResumeRefused` names each one and why, and nothing is deleted. ``required`` needs a
loadable checkpoint; ``never`` refuses a directory that already holds committed checkpoints.

Pruning (keep-last-N) only ever deletes checkpoints this `CheckpointManager` wrote in this
process; checkpoints of earlier runs or processes are left alone. A foreign directory in the way
of a new checkpoint (same step) is renamed aside (``step_XXXXXXXX.replaced-<time>``), not deleted.

Async saving (``async_save``) copies this rank's tensors into host memory (pinned under CUDA,
reused across saves), writes them in the background, and commits as soon as every rank's write
has finished: `CheckpointManager.poll` (called by the train loop after every step) checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

from consumers.parallel import ParallelState
from megatron_qwenimage.checkpoint_metadata import RestrictedFileSystemReader
from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.errors import UserError

log = logging.getLogger(__name__)

COMMITTED = "COMMITTED"
META = "meta.json"
STEP_RE = re.compile(r"^step_(\d{8})$")
VERIFY_MODES = ("size", "sha256")
RESUME_MODES = ("auto", "required", "never")

#: MMDiTConfig fields that may differ between a checkpoint and the run resuming it: how the model
#: is built (layout, kernels), not what it computes. Every other field (architecture and
#: ``params_dtype``) must match exactly.
RESUMABLE_BUILD_OPTIONS = frozenset(
    {"tensor_model_parallel_size", "sequence_parallel", "backend", "fused_elementwise", "name"}
)


class CheckpointCorrupt(UserError, RuntimeError):
    """A checkpoint directory is partial or does not match its COMMITTED record (names the file)."""


class ResumeRefused(ConfigError):
    """The checkpoint directory and ``checkpoint.resume`` disagree: training does not start.

    Raised alike on every rank (the decision rests on collective verification and shared files).
    The message is one line naming the directory, each checkpoint with why it was refused, and
    the way out; nothing in the directory has been deleted or changed.
    """


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often to checkpoint, and whether to resume.

    Attributes:
        dir: root directory (shared by all ranks).
        interval: save every N steps (0: only at the end).
        keep_last: checkpoints *written by this run* to keep; older ones of this run are deleted.
            Checkpoints of earlier runs/processes in `dir` are never deleted.
        async_save: stage into host memory and write in the background; committed as soon as the
            write finishes (checked after every step), at the next save, or at the end.
        verify: on load, check every file's ``size`` or ``sha256`` against COMMITTED (spread over ranks).
        resume: ``auto`` (default): resume from the newest loadable checkpoint; start fresh only
            when `dir` holds no committed checkpoint, and stop with `ResumeRefused` when it holds
            some but none loads. ``required``: a loadable checkpoint must exist, else
            `ResumeRefused`. ``never``: do not load; refuse to start (`ResumeRefused`) if `dir`
            already holds committed checkpoints (use a new `dir`).
        load: deprecated spelling kept for old configs: ``load: false`` means ``resume: never``
            (contradicting ``resume: required`` is an error); ``load: true`` changes nothing.
            After validation ``load`` is False exactly when ``resume`` is ``never``.
    """

    dir: str
    interval: int = 100
    keep_last: int = 3
    async_save: bool = False
    verify: str = "sha256"
    resume: str = "auto"
    load: bool = True

    def __post_init__(self) -> None:
        if not self.dir or not isinstance(self.dir, (str, os.PathLike)):
            raise ConfigError("checkpoint.dir: expected a directory path")
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 0:
            raise ConfigError(f"checkpoint.interval={self.interval!r}: expected an integer >= 0")
        if not isinstance(self.keep_last, int) or isinstance(self.keep_last, bool) or self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last!r}: expected a positive integer")
        if not isinstance(self.async_save, bool):
            raise ConfigError(f"checkpoint.async_save={self.async_save!r}: expected true or false")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"checkpoint.verify={self.verify!r}: expected one of {VERIFY_MODES}")
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"checkpoint.resume={self.resume!r}: expected one of {RESUME_MODES}")
        if not isinstance(self.load, bool):
            raise ConfigError(f"checkpoint.load={self.load!r}: expected true or false (prefer checkpoint.resume)")
        if not self.load:
            if self.resume == "required":
                raise ConfigError(
                    "checkpoint.load=false contradicts checkpoint.resume='required' "
                    "(load: false means resume: never; drop `load`)"
                )
            object.__setattr__(self, "resume", "never")
        object.__setattr__(self, "load", self.resume != "never")


def model_config_differences(saved: Any, run: dict) -> list[str]:
    """Why a checkpoint's saved model config (meta.json ``model_config``) cannot resume `run`.

    Fields in `RESUMABLE_BUILD_OPTIONS` may differ; every other field must be equal. A field the
    checkpoint lacks (written before the field existed) counts as its `MMDiTConfig` default.
    Returns one ``key: checkpoint <v>, run <v>`` string per difference (empty: compatible).
    """
    import dataclasses

    from megatron_qwenimage.config import MMDiTConfig

    if not isinstance(saved, dict):
        return [f"meta.json has no model_config (got {type(saved).__name__})"]
    defaults = {f.name: f.default for f in dataclasses.fields(MMDiTConfig) if f.default is not dataclasses.MISSING}
    out = []
    for key in sorted(set(saved) | set(run)):
        if key in RESUMABLE_BUILD_OPTIONS:
            continue
        a = saved.get(key, defaults.get(key, "<absent>"))
        b = run.get(key, "<absent>")
        norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (JSON gives lists)
        if norm(a) != norm(b):
            out.append(f"{key}: checkpoint {norm(a)!r}, run {norm(b)!r}")
    return out


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------- state
def _dtensor(local: torch.Tensor, mesh, placements, full_shape: tuple[int, ...]) -> DTensor:
    stride = torch.empty(full_shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(full_shape), stride=stride)


def build_state(engine, pstate: ParallelState) -> tuple[dict[str, DTensor], list[tuple[torch.Tensor, DTensor]]]:
    """The DCP state dict of `engine` (model + optimizer) and (live tensor, DTensor) pairs.

    The DTensors wrap the live tensors (``detach()`` shares storage); the pairs let a load copy
    back explicitly should DCP replace a local tensor instead of filling it.
    """
    engine.optimizer.finish_param_sync()  # the parameters equal the master weights
    mesh = pstate.model_mesh()
    # Over DP: parameters replicated; optimizer chunks sharded over the last DP dimension (the
    # whole DP group, or HSDP's dp_shard, replicated over dp_replicate).
    dp_model = [Replicate()] * (mesh.ndim - 1)
    dp_optim = [Replicate()] * (mesh.ndim - 2) + [Shard(0)]
    state: dict[str, DTensor] = {}
    pairs: list[tuple[torch.Tensor, DTensor]] = []
    opt = engine.optimizer
    # ZeRO-3 holds no whole parameters between forwards: a parameter is written from this rank's
    # master chunk in the parameter dtype, sharded over DP like the optimizer state (the same
    # global tensor; a load fills a temporary, the master weights then set the parameters).
    zero3 = opt.resharding is not None
    for chunk in engine.chunks:
        param_names = {name for name, _ in chunk.named_parameters()}
        for name, tensor in chunk.named_model_tensors():
            dim = chunk.partition_dims[name]
            tp_place = Shard(dim) if dim is not None else Replicate()
            if zero3 and name in param_names:
                local = opt.master[name].to(tensor.dtype)
                dt = _dtensor(local, mesh, [tp_place, *dp_optim], chunk.full_shape(name, tensor))
            else:
                local = tensor.detach()
                dt = _dtensor(local, mesh, [tp_place, *dp_model], chunk.full_shape(name, tensor))
            state[f"model/{name}"] = dt
            pairs.append((local, dt))
    full_shapes = {name: chunk.full_shape(name, p) for chunk in engine.chunks for name, p in chunk.named_parameters()}
    opt_state = opt.state_tensors()
    for s in opt.shards:
        tp_place = Shard(s.tp_dim) if s.tp_dim is not None else Replicate()
        for key, local in opt_state[s.name].items():
            dt = _dtensor(local, mesh, [tp_place, *dp_optim], full_shapes[s.name])
            state[f"optim/{s.name}/{key}"] = dt
            pairs.append((local, dt))
    return state, pairs


#: The optimizer-state key of the EMA weights (``optim/<name>/ema``; `DistributedOptimizer.state_tensors`).
EMA_KEY = "ema"

RNG_DIR = "rng"
RNG_FORMAT = "qwenimage-rng-v1"


def rng_file(directory: Path, rank: int) -> Path:
    """The RNG state file of `rank` in checkpoint `directory`."""
    return Path(directory) / RNG_DIR / f"rank_{rank:05d}.safetensors"


def save_rng_state(path: Path) -> None:
    """Write this process's torch, CUDA, numpy and python RNG states to `path`, without pickle.

    A safetensors file: tensors ``torch`` and ``cuda_<i>`` (uint8 generator states) and
    ``numpy_keys`` (uint32 MT19937 key); the header metadata holds JSON for the rest (python's
    ``random.getstate()`` and numpy's position/gaussian cache), all plain ints and floats.
    """
    from safetensors.numpy import save_file

    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors = {"torch": torch.get_rng_state().numpy(), "numpy_keys": np.ascontiguousarray(np_keys, dtype=np.uint32)}
    tensors.update({f"cuda_{i}": state.cpu().numpy() for i, state in enumerate(cuda)})
    metadata = {
        "format": RNG_FORMAT,
        "python": json.dumps([py_version, list(py_internal), py_gauss_next]),
        "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_cached)]),
        "cuda_devices": str(len(cuda)),
    }
    save_file(tensors, str(path), metadata=metadata)
    _fsync(path)  # on disk before rank 0 writes COMMITTED


def load_rng_state(path: Path) -> None:
    """Restore the RNG states `save_rng_state` wrote to `path` (safetensors + JSON; nothing is unpickled).

    Raises:
        CheckpointCorrupt: naming `path` if it is not such a file.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != RNG_FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {RNG_FORMAT!r}")
        np_name, np_pos, np_has_gauss, np_cached = json.loads(metadata["numpy"])
        py_version, py_internal, py_gauss_next = json.loads(metadata["python"])
        torch_state = torch.from_numpy(tensors["torch"].copy())
        cuda = [torch.from_numpy(tensors[f"cuda_{i}"].copy()) for i in range(int(metadata["cuda_devices"]))]
        np_state = (np_name, tensors["numpy_keys"], np_pos, np_has_gauss, np_cached)
        py_state = (py_version, tuple(py_internal), py_gauss_next)
    except Exception as exc:  # safetensors' own error type, KeyError, ValueError...
        raise CheckpointCorrupt(
            f"{path}: not an RNG state file of this trainer ({type(exc).__name__}: {exc})"
        ) from None
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def refuse_pickled_rng_files(directory: Path) -> None:
    """Raise `CheckpointCorrupt` naming the file if `directory` holds RNG states in the old pickle format.

    Checkpoints written before the safetensors format saved ``rng/rank_XXXXX.pt`` with
    ``torch.save``; reading those means unpickling, which can run arbitrary code, so they are
    never opened. Every rank sees the same listing, so every rank refuses alike.
    """
    old = sorted((Path(directory) / RNG_DIR).glob("*.pt"))
    if old:
        raise CheckpointCorrupt(
            f"checkpoint {directory}: {old[0]} is an RNG state in the old pickle format (torch.save); it is not "
            f"loaded because unpickling can run arbitrary code (RNG states are now rng/rank_XXXXX.safetensors)"
        )


# ---------------------------------------------------------------------------------------- files
def _file_digest(path: Path, mode: str) -> dict:
    entry = {"bytes": path.stat().st_size}
    if mode == "sha256":
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        entry["sha256"] = h.hexdigest()
    return entry


def _list_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != COMMITTED)


def _write_synced(path: Path, text: str) -> None:
    """Write `text` to `path` and flush it to stable storage."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush the file `path`, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_files(directory: Path, record: dict, mode: str, part: int = 0, parts: int = 1) -> None:
    """Check the files of `directory` against its COMMITTED `record` (this rank's `part` of them)."""
    listed = record.get("files", {})
    present = set(_list_files(directory))
    missing = sorted(set(listed) - present)
    if missing:
        raise CheckpointCorrupt(f"checkpoint {directory}: missing file(s) {missing[:5]}")
    for i, rel in enumerate(sorted(listed)):
        if i % parts != part:
            continue
        want = listed[rel]
        got = _file_digest(directory / rel, "sha256" if (mode == "sha256" and "sha256" in want) else "size")
        if got["bytes"] != want["bytes"]:
            raise CheckpointCorrupt(
                f"checkpoint {directory}: file {rel} has {got['bytes']} bytes, COMMITTED says {want['bytes']}"
            )
        if "sha256" in got and got["sha256"] != want["sha256"]:
            raise CheckpointCorrupt(
                f"checkpoint {directory}: file {rel} has sha256 {got['sha256'][:16]}..., "
                f"COMMITTED says {want['sha256'][:16]}..."
            )


def read_committed(directory: Path) -> dict:
    """The COMMITTED record of `directory`; raises `CheckpointCorrupt` when absent or unreadable."""
    marker = directory / COMMITTED
    if not marker.is_file():
        raise CheckpointCorrupt(f"checkpoint {directory}: no {COMMITTED} marker (partial write)")
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointCorrupt(f"checkpoint {directory}: unreadable {COMMITTED} marker ({exc})") from None


def committed_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step_XXXXXXXX`` directory under `root` (committed or not), newest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


# ---------------------------------------------------------------------------------------- manager
def _one_line(text: str, limit: int = 300) -> str:
    """`text` on one line (DCP errors carry tracebacks), cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _is_committed(directory: Path) -> bool:
    return (directory / COMMITTED).is_file()


class _AlreadyStaged:
    """A DCP ``AsyncStager`` for a state dict that is already a private host copy: returns it as is
    (DCP's default stager would copy it to host memory a second time)."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def stage(self, state_dict, **kwargs):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _async_save_takes_stager() -> bool:
    import inspect

    try:
        return "async_stager" in inspect.signature(dcp.async_save).parameters
    except (TypeError, ValueError):
        return False


class CheckpointManager:
    """Save / load / prune checkpoints of a `TrainEngine` (every rank calls every method).

    Attributes:
        refused: one line per checkpoint the last `load_latest` refused (name and reason).
        saved_steps: steps this manager committed in this process (the only ones `_prune` may delete).
        resumed_step: the step of the checkpoint `load_latest` loaded (None: none was loaded).

    It owns the save policy too (`should_save`): the train loop calls
    ``save(step, engine, meta, last_step=...)`` after every step and once at the end, and the
    manager decides whether that step is due (``checkpoint.interval``, and the final-save rule).
    """

    def __init__(self, config: CheckpointConfig, pstate: ParallelState):
        self.config = config
        self.pstate = pstate
        self.root = Path(config.dir)
        self.refused: list[str] = []
        self.saved_steps: list[int] = []
        self.resumed_step: int | None = None
        self._pending: tuple[Any, Path, Path, dict] | None = None
        self._staged: dict[str, DTensor] | None = None
        self._cpu_group = None
        self._poll_group = None
        if config.async_save:
            # DCP's background thread runs collectives on `_cpu_group`; `poll` agrees on
            # completion over its own group so the two never interleave on one group.
            self._cpu_group = dist.new_group(backend="gloo")
            self._poll_group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ save
    def should_save(self, step: int, *, last_step: bool = False) -> bool:
        """Whether a checkpoint is due after `step` completed steps.

        During training (``last_step=False``) every ``checkpoint.interval``-th step is due (none
        when the interval is 0). When training has ended after `step` steps (``last_step=True``:
        the last step, or the data ran out) a final checkpoint is due unless the interval rule has
        just saved `step`, or nothing was trained after resuming at `step` (its checkpoint is the
        one `load_latest` loaded).
        """
        interval = self.config.interval
        due = bool(interval) and step % interval == 0
        if not last_step:
            return due
        nothing_trained = self.resumed_step is not None and self.resumed_step > 0 and step == self.resumed_step
        return not due and not nothing_trained

    def save(self, step: int, engine, meta: dict | Callable[[], dict], *, last_step: bool | None = None) -> Path | None:
        """Checkpoint after `step` completed steps; `meta` (JSON-able: reader state...) goes to meta.json.

        With `last_step` given (the train loop: False after each step, True once at the end) the
        save happens only when `should_save` says it is due; otherwise None is returned and `meta`
        is not evaluated (it may be a zero-argument callable returning the mapping). Without
        `last_step` the checkpoint is written unconditionally. Returns the checkpoint directory.
        """
        if last_step is not None and not self.should_save(step, last_step=last_step):
            return None
        if callable(meta):
            meta = meta()
        self.wait_pending()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.pstate.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            (tmp / RNG_DIR).mkdir()
        dist.barrier()
        state, _ = build_state(engine, self.pstate)
        save_rng_state(rng_file(tmp, self.pstate.rank))
        full_meta = {
            "step": step,
            "optimizer_steps": engine.optimizer.num_steps,
            "lr_schedule": engine.optimizer.schedule.state_dict(),
            "layout": {k: getattr(self.pstate.layout, k) for k in ("tp", "pp", "dp", "vpp", "sequence_parallel")},
            "world_size": self.pstate.world_size,
            "model_config": engine.model_config.to_dict(),
            **meta,
        }
        if self.config.async_save:
            staged = self._stage_to_host(state)
            kwargs = {"async_stager": _AlreadyStaged()} if _async_save_takes_stager() else {}
            future = dcp.async_save(staged, checkpoint_id=str(tmp), process_group=self._cpu_group, **kwargs)
            self._pending = (future, tmp, final, full_meta)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp, final, full_meta)
        return final

    def _stage_to_host(self, state: dict[str, DTensor]) -> dict[str, DTensor]:
        """Copy `state` into host buffers (allocated at the first save, then reused).

        Under CUDA the buffers are pinned and filled with non-blocking copies, then the device is
        synchronised once, so the training step can change the live tensors while DCP writes.
        The previous write has finished (`save` waits) before the buffers are refilled.
        """
        pin = torch.cuda.is_available() and any(v.to_local().is_cuda for v in state.values())
        if self._staged is None or set(self._staged) != set(state):
            staged = {}
            for key, v in state.items():
                local = v.to_local()
                if v.device_mesh.device_type == "cpu":
                    host = torch.empty(local.shape, dtype=local.dtype)
                    staged[key] = _dtensor(host, v.device_mesh, v.placements, tuple(v.shape))
                else:
                    # A DTensor on the device mesh holding a host local tensor: what DCP's own
                    # stager builds (DTensor.from_local would move a host tensor to the device).
                    dt = v.detach().to("cpu")
                    dt._local_tensor = torch.empty(local.shape, dtype=local.dtype, pin_memory=pin)
                    staged[key] = dt
            self._staged = staged
        with torch.no_grad():
            for key, v in state.items():
                self._staged[key].to_local().copy_(v.to_local(), non_blocking=pin)
        if pin:
            torch.cuda.synchronize()
        return self._staged

    def poll(self) -> Path | None:
        """Commit the async save in flight if every rank's write has finished; returns its path.

        Cheap: without a pending save it does nothing (no collective); with one, one tiny
        all-reduce on a dedicated gloo group makes every rank take the same decision.
        """
        if self._pending is None:
            return None
        future, _, final, _ = self._pending
        done = torch.tensor([1 if future.done() else 0], dtype=torch.int32)
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._poll_group)
        if not int(done.item()):
            return None
        self.wait_pending()
        return final

    def wait_pending(self) -> None:
        """Finish (and commit) an async save in flight."""
        if self._pending is None:
            return
        future, tmp, final, meta = self._pending
        self._pending = None
        future.result()
        self._commit(tmp, final, meta)

    def finalize(self) -> None:
        self.wait_pending()

    def _commit(self, tmp: Path, final: Path, meta: dict) -> None:
        dist.barrier()
        step = int(meta["step"])
        if self.pstate.rank == 0:
            # Everything COMMITTED vouches for is on stable storage before it is written: DCP's
            # files (its writer syncs them), every rank's RNG file (synced before the barrier),
            # meta.json, and the directory entries naming them.
            _write_synced(tmp / META, json.dumps(meta, sort_keys=True))
            _fsync(tmp / RNG_DIR)
            _fsync(tmp)
            files = {rel: _file_digest(tmp / rel, self.config.verify) for rel in _list_files(tmp)}
            record = {"step": step, "files": files}
            marker_tmp = tmp / f"{COMMITTED}.tmp"
            with open(marker_tmp, "w") as f:
                json.dump(record, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.rename(marker_tmp, tmp / COMMITTED)
            if final.exists():
                if step in self.saved_steps:
                    shutil.rmtree(final)
                else:  # not ours (an earlier run's, refused or partial): keep it, out of the way
                    aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
                    os.rename(final, aside)
                    log.warning("checkpoint %s was not written by this run; moved it to %s", final, aside)
            os.rename(tmp, final)
            _fsync(self.root)
        if step not in self.saved_steps:
            self.saved_steps.append(step)
        self._prune()
        dist.barrier()

    def _prune(self) -> None:
        """Delete this run's committed checkpoints beyond the newest `keep_last` (rank 0 deletes).

        Only steps in `saved_steps` (committed by this manager in this process) are candidates:
        a checkpoint of an earlier run or process is never deleted, whatever its step.
        """
        mine = sorted(self.saved_steps, reverse=True)
        if self.pstate.rank == 0:
            for step in mine[self.config.keep_last :]:
                path = self.root / step_dir_name(step)
                if _is_committed(path):
                    shutil.rmtree(path, ignore_errors=True)
        self.saved_steps = sorted(mine[: self.config.keep_last])

    # ------------------------------------------------------------------ load
    def _verify_everywhere(self, directory: Path) -> str | None:
        """Every rank checks a share of the files; returns the first failure message, or None."""
        err = ""
        try:
            record = read_committed(directory)
            verify_files(directory, record, self.config.verify, self.pstate.rank, self.pstate.world_size)
        except CheckpointCorrupt as exc:
            err = str(exc)
        errors: list[str] = [""] * self.pstate.world_size
        dist.all_gather_object(errors, err)
        bad = [e for e in errors if e]
        return bad[0] if bad else None

    def _config_mismatch(self, directory: Path, engine) -> str | None:
        """Why `directory`'s saved model config cannot resume `engine` (None: compatible)."""
        try:
            saved = json.loads((directory / META).read_text()).get("model_config")
        except (OSError, ValueError, AttributeError) as exc:
            return f"checkpoint {directory}: unreadable {META} ({type(exc).__name__}: {exc})"
        diffs = model_config_differences(saved, engine.model_config.to_dict())
        if diffs:
            return f"checkpoint {directory}: saved model config differs from the run's ({'; '.join(diffs)})"
        return None

    def load_latest(self, engine) -> dict | None:
        """Resume per ``checkpoint.resume``; returns the loaded checkpoint's meta.json, or None.

        Candidates are tried newest first; one is refused (logged, added to `refused`) when its
        COMMITTED record or files do not match, its saved model config differs from the run's
        (`model_config_differences`), or DCP fails to read it; then the previous one is tried.

        Raises:
            ResumeRefused: ``auto``: the directory holds committed checkpoints and none loads;
                ``required``: none loads (or there is none); ``never``: the directory holds
                committed checkpoints. Nothing is deleted in any case.
        """
        mode = self.config.resume
        candidates = committed_checkpoints(self.root)
        committed = [d for _, d in candidates if _is_committed(d)]
        self.refused = []
        if mode == "never":
            if committed:
                names = ", ".join(d.name for d in committed)
                raise ResumeRefused(
                    f"checkpoint.resume=never, but checkpoint.dir={str(self.root)!r} already holds committed "
                    f"checkpoint(s) {names}, which this run would overwrite or mix with its own; nothing was "
                    f"deleted. Set a new checkpoint.dir to start a fresh run (or checkpoint.resume=auto to resume)"
                )
            return None
        for step, directory in candidates:
            reason = self._verify_everywhere(directory)
            if reason is None:
                reason = self._config_mismatch(directory, engine)
            if reason is None:
                try:
                    meta = self.load(directory, engine)
                except (
                    dcp.api.CheckpointException,
                    CheckpointCorrupt,
                    OSError,
                    ValueError,
                    KeyError,
                    RuntimeError,
                ) as exc:
                    reason = f"checkpoint {directory}: load failed ({type(exc).__name__}: {exc})"
                else:
                    self.resumed_step = int(meta["step"])
                    return meta
            reason = _one_line(reason, 600)
            if self.pstate.rank == 0:
                log.warning("refusing checkpoint step %d: %s; trying the previous one", step, reason)
            self.refused.append(reason)
        if mode == "auto" and not committed:
            return None  # a fresh directory (at most partial writes): start from step 0
        if not candidates:
            detail = "it holds no checkpoint"
        else:
            detail = "none can be loaded: " + " | ".join(
                f"{d.name}: {r}" for (_, d), r in zip(candidates, self.refused)
            )
        raise ResumeRefused(
            f"checkpoint.resume={mode}: checkpoint.dir={str(self.root)!r} has no loadable checkpoint; {detail}. "
            f"Nothing was deleted. Fix the cause, or set a new checkpoint.dir to start a fresh run"
        )

    def load(self, directory: Path, engine) -> dict:
        """Load `directory` (already verified) into `engine`, resharding to the current layout."""
        refuse_pickled_rng_files(directory)  # before any collective: every rank raises alike
        meta = json.loads((directory / META).read_text())
        state, pairs = build_state(engine, self.pstate)
        reader = RestrictedFileSystemReader.checked(directory)  # .metadata: no pickle
        ema_keys = {key for key in state if key.endswith(f"/{EMA_KEY}")}
        ema_saved = any(key.endswith(f"/{EMA_KEY}") for key in reader.read_metadata().state_dict_metadata)
        if ema_keys and not ema_saved:  # EMA switched on since this checkpoint: it starts from it
            state = {key: dt for key, dt in state.items() if key not in ema_keys}
            kept = {id(dt) for dt in state.values()}
            pairs = [(live, dt) for live, dt in pairs if id(dt) in kept]
        dcp.load(state, storage_reader=reader)
        with torch.no_grad():
            for live, dt in pairs:
                local = dt.to_local()
                if local.data_ptr() != live.data_ptr():
                    live.copy_(local)
        engine.optimizer.set_num_steps(int(meta["optimizer_steps"]))
        engine.optimizer.load_master_into_params()
        if ema_keys and not ema_saved:
            engine.optimizer.start_ema_from_master()
            if self.pstate.rank == 0:
                log.info(
                    "checkpoint %s holds no EMA weights (saved with optimizer.ema_decay=0): the EMA starts from "
                    "its master weights",
                    directory,
                )
        elif ema_saved and not ema_keys and self.pstate.rank == 0:
            log.info("checkpoint %s holds EMA weights; optimizer.ema_decay=0 drops them from here on", directory)
        rng = rng_file(directory, self.pstate.rank)
        if (
            meta.get("world_size") == self.pstate.world_size
            and meta.get("layout")
            == {k: getattr(self.pstate.layout, k) for k in ("tp", "pp", "dp", "vpp", "sequence_parallel")}
            and rng.is_file()
        ):
            load_rng_state(rng)
        dist.barrier()
        return meta


# ---------------------------------------------------------------------------------------- export
def export_checkpoint_to_diffusers(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ema: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a committed checkpoint's model (or its EMA weights) as a diffusers directory.

    Runs in one process, with or without a process group (e.g. on rank 0 at the end of a TP/PP
    run), whatever layout/backend the checkpoint was trained with, and without building the model:
    DCP assembles every full tensor from the shards of any layout (``no_dist``), by the canonical
    names and full shapes of `megatron_qwenimage.model.state_dict_names`, and
    `megatron_qwenimage.convert.save_full_state` writes them through the same rules as
    `save_diffusers`. EMA weights (fp32; parameters only, the carried buffers have none) are cast
    to the model's ``params_dtype`` first, as loading them into the model would.
    """
    from megatron_qwenimage.config import MMDiTConfig
    from megatron_qwenimage.convert import save_full_state
    from megatron_qwenimage.model.state_dict_names import DIFFUSERS, diffusers_rules, native_shapes

    directory = Path(checkpoint_dir)
    record = read_committed(directory)
    verify_files(directory, record, "size")
    meta = json.loads((directory / META).read_text())
    cfg_dict = dict(meta["model_config"])
    # The single-rank ``local`` build of the same architecture: valid wherever this runs.
    cfg_dict.update(tensor_model_parallel_size=1, sequence_parallel=False, backend="local", fused_elementwise=False)
    config = MMDiTConfig(**cfg_dict)
    shapes = native_shapes(config)
    keys = {
        rule.ours: f"optim/{rule.ours}/{EMA_KEY}" if (ema and not rule.carried) else f"model/{rule.ours}"
        for rule in diffusers_rules(config)
    }
    state = {
        key: torch.empty(shapes[name], dtype=torch.float32 if key.startswith("optim") else config.torch_dtype)
        for name, key in keys.items()
    }
    with warnings.catch_warnings():  # DCP warns that no_dist means one process: it is asked for here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, storage_reader=RestrictedFileSystemReader.checked(directory), no_dist=True)
    full = {name: state[key].to(config.torch_dtype) for name, key in keys.items()}
    save_full_state(DIFFUSERS, full, config, out_dir, dtype=dtype)
