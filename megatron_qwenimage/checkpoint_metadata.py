"""Reading a DCP checkpoint's ``.metadata`` without letting the file run code.

``torch.distributed.checkpoint`` (DCP) writes a checkpoint's index, ``.metadata``, with ``pickle``
and its ``FileSystemReader.read_metadata`` reads it back with ``pickle.load``: a tampered file can
name any callable (``os.system``, ``builtins.exec``, ...) and have it called while it is read, in
every process that loads the checkpoint (every rank at resume, the export process). The tensor
files are not the problem: DCP reads each tensor with ``torch.load(weights_only=True)``.

`RestrictedFileSystemReader` is DCP's ``FileSystemReader`` whose `read_metadata` unpickles with
`MetadataUnpickler`: it resolves only the globals DCP's own writer puts there (the dataclasses of
``torch.distributed.checkpoint.metadata``, ``filesystem._StorageInfo``, ``torch.Size``, torch
dtypes and layouts, ``pathlib`` paths, ``collections.OrderedDict``) and refuses any other global,
and persistent ids, with `CheckpointMetadataRefused` naming the file and the global, before
anything the global names is called. None of the admitted callables runs code or touches a file.
`check_metadata` then checks what was built: DCP's ``Metadata`` holding tensor entries only (a
bytes entry would make DCP's load planner unpickle that entry's data with
``torch.load(weights_only=False)``; this project's checkpoints hold tensors only) and data
locations that are plain file names inside the checkpoint directory.

Build the reader with `RestrictedFileSystemReader.checked` and pass it as ``storage_reader=`` to
``dcp.load``: the metadata is read and checked right there, so a refused file raises
`CheckpointMetadataRefused` itself, on every rank alike and before any collective (inside
``dcp.load`` a metadata error would come back wrapped, after a fallback read and a logged
traceback). The threat model is in docs/training.md ("Loading untrusted checkpoints").
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_qwenimage.errors import UserError


class CheckpointMetadataRefused(UserError, ValueError):
    """A DCP ``.metadata`` file names something other than DCP's metadata classes, or does not
    describe a tensor checkpoint; the message names the file and what was found. Nothing the file
    names was called."""

    exit_code = 1


def _torch_layouts() -> dict[str, torch.layout]:
    return {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


_LAYOUTS = _torch_layouts()


def _layout(name: str) -> torch.layout:
    """``torch.serialization._get_layout`` (how ``torch.layout`` pickles) over a fixed table."""
    try:
        return _LAYOUTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown torch layout {name!r}") from None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """``(module, name) -> object`` of every global DCP's writer pickles into ``.metadata``."""
    allowed: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", cls.__name__): cls
        for cls in (
            Metadata,
            TensorStorageMetadata,
            BytesStorageMetadata,  # admitted so that `check_metadata` can name the entry it refuses
            ChunkStorageMetadata,
            TensorProperties,
            MetadataIndex,
            StorageMeta,
            dcp_metadata._MEM_FORMAT_ENCODING,  # TensorProperties pickles its memory format as this enum
        )
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = _layout
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # StorageMeta.checkpoint_id is the path the checkpoint was written to; the module pathlib's
    # classes pickle under moved to pathlib._local in Python 3.13.
    for module in ("pathlib", "pathlib._local"):
        for cls in (
            pathlib.Path,
            pathlib.PosixPath,
            pathlib.WindowsPath,
            pathlib.PurePosixPath,
            pathlib.PureWindowsPath,
        ):
            allowed[(module, cls.__name__)] = cls
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):  # a dtype pickles as the global torch.<name>
            allowed[("torch", name)] = value
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only `ALLOWED_GLOBALS` (exact ``(module, name)`` pairs,
    so no dotted attribute path reaches past them) and no persistent ids.

    Args:
        file: the binary stream of a ``.metadata`` file.
        source: how errors name the file.
    """

    def __init__(self, file: IO[bytes], *, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointMetadataRefused(
                f"checkpoint metadata {self.source}: refused, it names {module}.{name}, which is not one of "
                f"DCP's metadata classes (a tampered or foreign file: loading it with pickle would call it); "
                f"nothing in it was run"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointMetadataRefused(
            f"checkpoint metadata {self.source}: refused, it holds a persistent id, which DCP's metadata never "
            f"does; nothing in it was run"
        )


def load_metadata(file: IO[bytes], source: str) -> Metadata:
    """Unpickle a DCP ``.metadata`` stream with `MetadataUnpickler` and `check_metadata` it.

    Raises:
        CheckpointMetadataRefused: naming `source`, when the file names anything else, is not a
            pickle of DCP's ``Metadata`` or does not describe a tensor checkpoint.
    """
    try:
        metadata = MetadataUnpickler(file, source=source).load()
    except CheckpointMetadataRefused:
        raise
    except Exception as exc:  # truncated, garbled, or admitted classes called with bad arguments
        raise CheckpointMetadataRefused(
            f"checkpoint metadata {source}: unreadable ({type(exc).__name__}: {exc})"
        ) from None
    check_metadata(metadata, source)
    return metadata


def _is_file_name(path: Any) -> bool:
    return isinstance(path, str) and path not in ("", ".", "..") and "/" not in path and "\\" not in path


def check_metadata(metadata: Any, source: str) -> None:
    """`CheckpointMetadataRefused` unless `metadata` is DCP's ``Metadata`` of a tensor checkpoint:
    every entry a ``TensorStorageMetadata`` (no bytes entries: DCP would unpickle their data with
    ``torch.load(weights_only=False)``), every data location a plain file name (read inside the
    checkpoint directory, never beside it)."""

    def refuse(why: str) -> CheckpointMetadataRefused:
        return CheckpointMetadataRefused(f"checkpoint metadata {source}: refused, {why}")

    if type(metadata) is not Metadata:
        raise refuse(f"it holds a {type(metadata).__name__}, not DCP's Metadata")
    if not isinstance(metadata.state_dict_metadata, dict):
        raise refuse("its state_dict_metadata is not a dict")
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            raise refuse(
                f"entry {key!r} is a pickled object (BytesStorageMetadata), which DCP would load with "
                f"torch.load(weights_only=False); these checkpoints hold tensors only"
            )
        if not (
            isinstance(key, str)
            and type(entry) is TensorStorageMetadata
            and type(entry.properties) is TensorProperties
            and isinstance(entry.properties.dtype, torch.dtype)
            and type(entry.size) is torch.Size
            and isinstance(entry.chunks, list)
            and all(
                type(c) is ChunkStorageMetadata and type(c.offsets) is torch.Size and type(c.sizes) is torch.Size
                for c in entry.chunks
            )
        ):
            raise refuse(f"entry {key!r} is not a tensor entry ({type(entry).__name__})")
    if not isinstance(metadata.storage_data, dict):
        raise refuse("its storage_data is not a dict")
    for index, info in metadata.storage_data.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise refuse(f"a data location is a {type(index).__name__} -> {type(info).__name__}")
        if not _is_file_name(info.relative_path):
            raise refuse(f"data of {index.fqn!r} is said to be in {info.relative_path!r}, not a file of the checkpoint")
        if not all(isinstance(n, int) and n >= 0 for n in (info.offset, info.length)):
            raise refuse(f"data of {index.fqn!r} has offset {info.offset!r} and length {info.length!r}")
    if metadata.storage_meta is not None and type(metadata.storage_meta) is not StorageMeta:
        raise refuse(f"its storage_meta is a {type(metadata.storage_meta).__name__}")


class RestrictedFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` whose ``.metadata`` goes through `load_metadata`.

    `read_metadata` is torch 2.13's ``FileSystemReader.read_metadata`` (same file, the
    ``__<rank>.metadata`` one for ``rank=``, the same ``StorageMeta`` with this reader's
    ``load_id``) with ``pickle.load`` replaced; the global metadata, once read, is kept until
    `reset`. Tensor data is read by the base class (``torch.load(weights_only=True)``).
    """

    def __init__(self, path: str | os.PathLike, _extension_registry=None):
        super().__init__(path, _extension_registry)
        self._metadata: Metadata | None = None

    @classmethod
    def checked(cls, path: str | os.PathLike) -> RestrictedFileSystemReader:
        """A reader of the checkpoint at `path` whose metadata has been read and checked: pass it as
        ``dcp.load(..., storage_reader=...)``. Raises `CheckpointMetadataRefused` (or OSError when
        there is no ``.metadata``) here, before ``dcp.load`` and its collectives."""
        reader = cls(path)
        reader.read_metadata()
        return reader

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is None and self._metadata is not None:
            return self._metadata
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as metadata_file:
            metadata = load_metadata(metadata_file, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        if rank is None:
            self._metadata = metadata
        return metadata


__all__ = [
    "ALLOWED_GLOBALS",
    "CheckpointMetadataRefused",
    "MetadataUnpickler",
    "RestrictedFileSystemReader",
    "check_metadata",
    "load_metadata",
]
