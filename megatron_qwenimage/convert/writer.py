"""The one checkpoint writer: a stream of named tensors -> safetensors (sharded with an index when
large) + the format's config file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from megatron_qwenimage.config import MMDiTConfig
from megatron_qwenimage.convert.formats import DEFAULT_MAX_SHARD_BYTES, LAYOUTS, write_config


class ShardedSafetensorsWriter:
    """Writes tensors into ``<stem>.safetensors``, or numbered shards plus an index once the total
    passes `max_shard_bytes` (the layout diffusers and transformers use)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        weights_name: str,
        index_name: str,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes}: expected a positive byte count")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.weights_name, self.index_name = weights_name, index_name
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"part-{len(self._files) + 1:05d}.safetensors.tmp"
        save_file(self._pending, str(self.directory / tmp), metadata=self.metadata)
        self._files.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._files:
            self._flush()
        stem = self.weights_name[: -len(".safetensors")]
        if len(self._files) == 1:
            os.replace(self.directory / self._files[0][0], self.directory / self.weights_name)
            return
        weight_map = {}
        n = len(self._files)
        for k, (tmp, names) in enumerate(self._files, start=1):
            final = f"{stem}-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            weight_map.update({name: final for name in names})
        with open(self.directory / self.index_name, "w") as f:
            json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f, indent=2)


def write_checkpoint(
    fmt: str,
    directory: str | os.PathLike,
    items: Iterable[tuple[str, torch.Tensor]],
    config: MMDiTConfig,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stream `items` (the format's tensor names) into a `fmt` (``"diffusers"`` | ``"native"``)
    checkpoint directory, cast to `dtype` when given, then write its config file.
    `progress(done)` is called after each tensor."""
    layout = LAYOUTS[fmt]
    writer = ShardedSafetensorsWriter(
        directory, layout.weights_name, layout.index_name, max_shard_bytes, layout.metadata
    )
    for done, (name, tensor) in enumerate(items, start=1):
        writer.add(name, tensor if dtype is None else tensor.to(dtype))
        if progress is not None:
            progress(done)
    writer.close()
    write_config(fmt, directory, config)
