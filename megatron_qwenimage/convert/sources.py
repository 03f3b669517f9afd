"""Read-only tensor sources (a safetensors checkpoint directory, an in-memory state dict) and
the checks a source passes before anything is read from it."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_qwenimage.convert.formats import INDEX_NAME, LAYOUTS, WEIGHTS_NAME, CheckpointError, read_json


class TensorSource(abc.ABC):
    """Read-only access to a checkpoint's tensors: names, shapes, dtypes, and slices along one dim."""

    @abc.abstractmethod
    def names(self) -> set[str]: ...

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor `name`, or its ``[start:stop]`` slice along `dim`."""

    @abc.abstractmethod
    def dtype(self, name: str) -> str:
        """The stored dtype of `name`, as torch names it without ``torch.`` (``float32``, ``int32``)."""


#: safetensors dtype codes -> torch dtype names (messages) and whether they are floating point.
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class StateDictSource(TensorSource):
    """A diffusers model instance's (or any) in-memory state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> set[str]:
        return set(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> str:
        return str(self.state[name].dtype).removeprefix("torch.")

    def read(self, name, dim=None, start=0, stop=None):
        t = self.state[name].detach()
        if dim is None:
            return t.clone()
        return t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start).clone()


class SafetensorsDirSource(TensorSource):
    """A directory of one ``<weights_name>`` file or shards listed in ``<index_name>``.

    Slices are read with ``safe_open(...).get_slice`` so only the requested rows leave the disk.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        weights_name: str = WEIGHTS_NAME,
        index_name: str = INDEX_NAME,
    ):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / index_name
        single = self.directory / weights_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: no `weight_map` of tensor name -> file; not a safetensors index")
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [weights_name]
        else:
            raise CheckpointError(f"{self.directory}: no {weights_name} or {index_name}")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise CheckpointError(f"{self.directory}: the index names {name}, which does not exist")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors' own error type: a truncated or foreign file
                raise CheckpointError(
                    f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})"
                ) from None
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name

    @classmethod
    def of_format(cls, directory: str | os.PathLike, fmt: str) -> SafetensorsDirSource:
        """The weights of a `fmt` (``"diffusers"`` | ``"native"``) checkpoint directory."""
        layout = LAYOUTS[fmt]
        return cls(directory, layout.weights_name, layout.index_name)

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        code = self._handles[self._file_of[name]].get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES.get(code, code.lower())

    def read(self, name, dim=None, start=0, stop=None):
        sl = self._handles[self._file_of[name]].get_slice(name)
        if dim is None:
            return sl[:]
        stop = self.shape(name)[dim] if stop is None else stop
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[index]


# ----------------------------------------------------------------------------- checks
def check_shapes(
    source: TensorSource, expected: dict[str, tuple[int, ...]], what: str, *, allow_unexpected: bool = False
) -> None:
    """Raise `CheckpointError` (prefixed by `what`) naming every missing, mis-shaped and, unless
    `allow_unexpected`, unexpected tensor of `source` against `expected` shapes."""
    present = source.names()
    missing = sorted(set(expected) - present)
    unexpected = [] if allow_unexpected else sorted(present - set(expected))
    wrong = [
        f"{n}: expected {expected[n]}, found {source.shape(n)}"
        for n in sorted(set(expected) & present)
        if source.shape(n) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_preview(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with wrong shape: {_preview(wrong)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def check_floating(source: TensorSource, names: Iterable[str], where: str) -> None:
    """Raise `CheckpointError` naming every tensor of `names` whose dtype is not floating point
    (weights are never integers or booleans: such a tensor would be cast silently)."""
    bad = []
    for name in sorted(names):
        dtype = source.dtype(name)
        if not (dtype.startswith("float") or dtype.startswith("bfloat")):
            bad.append(f"{name} ({dtype})")
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} tensor(s) with a non-floating-point dtype: {_preview(bad)}; a transformer "
            "checkpoint holds floating-point weights only"
        )


def _preview(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
