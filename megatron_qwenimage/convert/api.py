"""Loading and saving `QwenImageMMDiT` checkpoints, and converting between the formats.

One loader (`_load`) reads any model piece from either format through the rules table of
`megatron_qwenimage.model.state_dict_names`; one writer (`writer.write_checkpoint`) writes our full
tensors in either format through the same table. `load_diffusers` / `load_native`,
`save_diffusers` / `save_native`, `save_full_state` and `convert_checkpoint` are those two with a
format and a source.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_qwenimage.config import MMDiTConfig
from megatron_qwenimage.convert.formats import (
    DEFAULT_MAX_SHARD_BYTES,
    NATIVE_CONFIG_NAME,
    CheckpointError,
    checkpoint_format,
    config_from_diffusers,
    model_config,
    native_model_config,
    read_diffusers_config,
)
from megatron_qwenimage.convert.sources import (
    SafetensorsDirSource,
    StateDictSource,
    TensorSource,
    check_floating,
    check_shapes,
)
from megatron_qwenimage.convert.writer import write_checkpoint
from megatron_qwenimage.model.state_dict_names import (
    DIFFUSERS,
    NATIVE,
    SCHEMES,
    Rule,
    checkpoint_rules,
    checkpoint_shapes,
    checkpoint_tensors,
    read_shard,
)

if TYPE_CHECKING:
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

#: The keywords of `load_diffusers` / `load_native` that go to the `QwenImageMMDiT` constructor.
_MODEL_KWARGS = ("tp_group", "pre_process", "post_process", "layer_range")


# ----------------------------------------------------------------------------- load
@torch.no_grad()
def load_diffusers(path_or_model, **overrides: Any) -> QwenImageMMDiT:
    """Build a `QwenImageMMDiT` from a diffusers ``QwenImageTransformer2DModel`` directory or instance.

    `overrides` are `MMDiTConfig` fields (e.g. ``sequence_parallel=True``,
    ``params_dtype='bfloat16'``), the constructor's keywords (``tp_group``, ``pre_process``,
    ``post_process``, ``layer_range``) and ``device`` (default CPU). With megatron-core's parallel
    state initialised, each rank reads only its own TP shard of every tensor.
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        where = str(path_or_model)
        if checkpoint_format(path_or_model) != DIFFUSERS:
            raise CheckpointError(f"{where}: a native checkpoint; use megatron_qwenimage.convert.load_native")
        diffusers_config = read_diffusers_config(path_or_model)
        source: TensorSource = SafetensorsDirSource.of_format(path_or_model, DIFFUSERS)
    else:
        where = f"{type(path_or_model).__name__} instance"
        diffusers_config = dict(path_or_model.config)
        source = StateDictSource(path_or_model.state_dict())
    model_kwargs, device, config_overrides = _split_overrides(overrides)
    config = config_from_diffusers(diffusers_config, where, **config_overrides)
    return _load(DIFFUSERS, source, config, where, model_kwargs, device)


@torch.no_grad()
def load_native(directory: str | os.PathLike, **overrides: Any) -> QwenImageMMDiT:
    """Build a `QwenImageMMDiT` from a native checkpoint directory (`save_native`), for any TP/PP
    piece; takes the same `overrides` as `load_diffusers` (each rank reads only its TP shard)."""
    where = str(directory)
    if checkpoint_format(directory) != NATIVE:
        raise CheckpointError(f"{where}: a diffusers directory; use megatron_qwenimage.convert.load_diffusers")
    source = SafetensorsDirSource.of_format(directory, NATIVE)
    model_kwargs, device, config_overrides = _split_overrides(overrides)
    config = native_model_config(directory, **config_overrides)
    return _load(NATIVE, source, config, where, model_kwargs, device)


def _load(
    fmt: str,
    source: TensorSource,
    config: MMDiTConfig,
    where: str,
    model_kwargs: dict[str, Any],
    device: torch.device,
) -> QwenImageMMDiT:
    """The one loader: build the model piece empty, then read each of its tensors (this rank's
    shard) from `source` through the `fmt` rules.

    A diffusers source is checked whole (names, shapes, dtypes) before the model is built; a
    native one for the piece's tensors only, since a pipeline stage loads a subset of it (other
    stages' tensors are expected there).
    """
    if fmt == DIFFUSERS:
        check_checkpoint(fmt, source, config, where)
    model = _empty_model(config, model_kwargs, device)
    rules = checkpoint_rules(
        fmt, config, pre_process=model.pre_process, post_process=model.post_process, layer_range=model.layer_range
    )
    if fmt == NATIVE:
        shapes = checkpoint_shapes(fmt, config)
        expected = {rule.ours: shapes[rule.ours] for rule in rules}
        check_shapes(source, expected, f"{where} does not match the model", allow_unexpected=True)
        check_floating(source, expected, where)
    _load_rules(model, source, rules, where)
    return model


def _split_overrides(overrides: dict[str, Any]):
    """(constructor kwargs incl. the TP group, device, MMDiTConfig overrides)."""
    from megatron_qwenimage.model.mmdit import default_tp_group

    overrides = dict(overrides)
    model_kwargs = {k: overrides.pop(k) for k in _MODEL_KWARGS if k in overrides}
    device = torch.device(overrides.pop("device", "cpu"))
    tp_group = model_kwargs.get("tp_group") or default_tp_group()
    model_kwargs["tp_group"] = tp_group
    tp_size = 1 if tp_group is None else tp_group.size()
    overrides.setdefault("tensor_model_parallel_size", tp_size)
    return model_kwargs, device, overrides


def _empty_model(config: MMDiTConfig, model_kwargs: dict[str, Any], device: torch.device) -> QwenImageMMDiT:
    """Build on the meta device (nothing allocated, no init), then allocate this rank's shards."""
    from megatron_qwenimage.model.mmdit import QwenImageMMDiT

    with torch.device("meta"):
        model = QwenImageMMDiT(config, **model_kwargs)
    return model.to_empty(device=device)


def _load_rules(model: QwenImageMMDiT, source: TensorSource, rules: list[Rule], where: str) -> None:
    tensors = dict(model.named_model_tensors())
    covered = {r.ours for r in rules}
    if covered != set(tensors):
        raise RuntimeError(f"conversion rules do not cover the model: {sorted(set(tensors) ^ covered)}")
    for rule in rules:
        shard = read_shard(source, rule, model.tp.rank, model.tp.size, model.config.attention_head_dim)
        target = tensors[rule.ours]
        if tuple(shard.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{where}: {rule.sources} gives a shard of shape {tuple(shard.shape)} for {rule.ours}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(shard.to(target.dtype))


def check_checkpoint(fmt: str, source: TensorSource, config: MMDiTConfig, where: str) -> None:
    """Raise `CheckpointError` naming every missing, unexpected or mis-shaped tensor of a whole
    `fmt` checkpoint for `config`, then every one that is not floating point."""
    if fmt == DIFFUSERS:
        what = f"{where} does not match the model config ({config.name})"
    else:
        what = f"{where} does not match its {NATIVE_CONFIG_NAME}"
    check_shapes(source, checkpoint_shapes(fmt, config), what)
    check_floating(source, source.names(), where)


# ----------------------------------------------------------------------------- save
def gather_full_state(model: QwenImageMMDiT) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) tensors of `model` by canonical name, on CPU (collective over TP)."""
    full = {}
    for name, tensor in model.named_model_tensors():
        dim = model.partition_dims[name]
        t = tensor.detach()
        if dim is not None and model.tp.size > 1:
            parts = [torch.empty_like(t) for _ in range(model.tp.size)]
            torch.distributed.all_gather(parts, t.contiguous(), group=model.tp.group)
            t = torch.cat(parts, dim=dim)
        full[name] = t.cpu()
    return full


def save_full_state(
    fmt: str,
    full: Mapping[str, torch.Tensor],
    config: MMDiTConfig,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write a whole model's full tensors (`full`, by canonical name) as a `fmt` (``"diffusers"`` |
    ``"native"``) checkpoint directory, cast to `dtype` when given."""
    items = checkpoint_tensors(fmt, full.__getitem__, config)
    write_checkpoint(fmt, directory, items, config, dtype=dtype, max_shard_bytes=max_shard_bytes)


def save_diffusers(
    model: QwenImageMMDiT,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    write: bool | None = None,
) -> None:
    """Write `model` (whole) as a diffusers ``QwenImageTransformer2DModel`` directory.

    Collective over the TP group when TP > 1 (every TP rank must call it); only TP rank 0 writes
    unless `write` says otherwise. Shards with an index past `max_shard_bytes`, as diffusers does.
    """
    _save(DIFFUSERS, model, directory, max_shard_bytes=max_shard_bytes, dtype=dtype, write=write)


def save_native(
    model: QwenImageMMDiT,
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    write: bool | None = None,
) -> None:
    """Write `model` (whole) as a native checkpoint of full canonical tensors (collective over TP,
    as `save_diffusers`)."""
    _save(NATIVE, model, directory, max_shard_bytes=max_shard_bytes, dtype=dtype, write=write)


def _save(fmt: str, model: QwenImageMMDiT, directory, *, max_shard_bytes: int, dtype, write: bool | None) -> None:
    if not (model.pre_process and model.post_process and model.layer_range == (0, model.config.num_layers)):
        raise ValueError(f"saving a {fmt} checkpoint needs the whole model, not one pipeline stage")
    full = gather_full_state(model)
    if not (model.tp.rank == 0 if write is None else write):
        return
    save_full_state(fmt, full, model.config, directory, dtype=dtype, max_shard_bytes=max_shard_bytes)


# ----------------------------------------------------------------------------- streaming conversion
def convert_checkpoint(
    src,
    dst,
    *,
    to: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Convert a checkpoint directory between the diffusers and native formats, tensor by tensor.

    Memory stays at one output shard plus the tensors in flight; the model is never built.
    Returns the target format. `progress(done, total)` is called after each tensor.
    """
    source_format = checkpoint_format(src)
    to = to or (NATIVE if source_format == DIFFUSERS else DIFFUSERS)
    if to not in SCHEMES:
        raise ValueError(f"to={to!r}: expected 'native' or 'diffusers'")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory; refusing to overwrite it")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: exists and is not empty; refusing to overwrite a checkpoint")
    # Everything about the source is checked before anything is written: names, shapes, dtypes.
    config = model_config(source_format, src)
    source = SafetensorsDirSource.of_format(src, source_format)
    check_checkpoint(source_format, source, config, str(src))

    if source_format == to:
        items = ((n, source.read(n)) for n in sorted(source.names()))
    else:
        rules = {rule.ours: rule for rule in checkpoint_rules(source_format, config)}
        head_dim = config.attention_head_dim
        items = checkpoint_tensors(to, lambda name: read_shard(source, rules[name], 0, 1, head_dim), config)
    total = len(checkpoint_shapes(to, config))

    # Written next to `dst` and renamed into place at the end: an interrupted or failed conversion
    # leaves no partial checkpoint behind (an empty `dst` is replaced by the rename).
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_checkpoint(
            to,
            tmp,
            items,
            config,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            progress=None if progress is None else (lambda done: progress(done, total)),
        )
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return to
