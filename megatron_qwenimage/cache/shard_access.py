"""Fast random access to one shard's arrays, for the training reader's hot path.

`shard_format` writes each array as a single zarr v3 *shard* file of uncompressed inner chunks
(one chunk per sample for latents, 256 rows for text embeddings). Going through zarr-python costs
about a millisecond per slice (event-loop round trip, index decode), more than the rest of the
reader together. The zarr v3 sharding codec is a published spec: the file is the inner chunks'
bytes followed by an index of ``(offset, nbytes)`` uint64 pairs per chunk in C order plus a CRC32C,
``2**64 - 1`` marking a chunk that was not written (all fill value). `ShardedArray` reads that
layout directly: the index once, then one seek + read per chunk.

It accepts only the exact layout `shard_format` writes (checked against ``zarr.json``) and says
so by returning None otherwise, so callers fall back to zarr; tests compare both paths.
"""

from __future__ import annotations

import json
import math

import numpy as np

from megatron_qwenimage.cache.storage import CacheStorage

_MISSING = np.uint64(2**64 - 1)
_DTYPES = {"uint16": np.dtype("<u2"), "int64": np.dtype("<i8")}


class ShardedArray:
    """One zarr v3 array stored as one shard of uncompressed, chunked-along-axis-0 inner chunks.

    Attributes:
        shape: the array shape; rows: ``shape[0]``; chunk_rows: rows per inner chunk.
    """

    def __init__(
        self,
        storage: CacheStorage,
        relpath: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunk_rows: int,
        fill_value: int,
    ) -> None:
        self.storage, self.relpath = storage, relpath
        self.shape, self.dtype, self.chunk_rows, self.fill_value = shape, dtype, chunk_rows, fill_value
        self.row_shape = shape[1:]
        self.chunk_bytes = chunk_rows * math.prod(self.row_shape) * dtype.itemsize
        n_chunks = -(-shape[0] // chunk_rows)
        self._file = storage.fs.open(storage.path(f"{relpath}/c/" + "/".join("0" * len(shape))), "rb")
        index_bytes = n_chunks * 16
        self._file.seek(-(index_bytes + 4), 2)
        self._index = np.frombuffer(self._file.read(index_bytes), dtype="<u8").reshape(n_chunks, 2)

    @classmethod
    def open(cls, storage: CacheStorage, relpath: str) -> ShardedArray | None:
        """The array at `relpath` (a zarr array directory), or None if its layout is not the one
        `shard_format` writes (then read it with zarr)."""
        meta = json.loads(storage.read_bytes(f"{relpath}/zarr.json"))
        shape = tuple(meta.get("shape", ()))
        codecs = meta.get("codecs", [])
        if (
            meta.get("zarr_format") != 3
            or meta.get("node_type") != "array"
            or not shape
            or 0 in shape
            or meta.get("data_type") not in _DTYPES
            or meta.get("storage_transformers")
            or meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
            or len(codecs) != 1
            or codecs[0].get("name") != "sharding_indexed"
        ):
            return None
        cfg = codecs[0].get("configuration", {})
        outer = tuple(meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", ()))
        inner = tuple(cfg.get("chunk_shape", ()))
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        if (
            cfg.get("codecs") != [little]
            or cfg.get("index_codecs") != [little, {"name": "crc32c"}]
            or cfg.get("index_location", "end") != "end"
            or len(outer) != len(shape)
            or len(inner) != len(shape)
            or outer[0] < shape[0]
            or outer[1:] != shape[1:]
            or inner[1:] != shape[1:]
            or outer[0] % inner[0]
        ):
            return None  # not one shard, or chunks split more than axis 0
        dtype = _DTYPES[meta["data_type"]]
        return cls(storage, relpath, shape, dtype, inner[0], int(meta.get("fill_value", 0)))

    def _chunk(self, k: int) -> np.ndarray:
        offset, nbytes = self._index[k]
        if offset == _MISSING and nbytes == _MISSING:
            return np.full((self.chunk_rows, *self.row_shape), self.fill_value, dtype=self.dtype)
        if int(nbytes) != self.chunk_bytes:
            raise ValueError(f"{self.relpath}: inner chunk {k} has {int(nbytes)} bytes, expected {self.chunk_bytes}")
        self._file.seek(int(offset))
        return np.frombuffer(self._file.read(self.chunk_bytes), dtype=self.dtype).reshape(
            self.chunk_rows, *self.row_shape
        )

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (a copy), like ``zarr_array[start:stop]``."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"{self.relpath}: rows {start}:{stop} out of range [0, {self.shape[0]}]")
        if start == stop:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        parts = [self._chunk(k) for k in range(first, last + 1)]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        lo = start - first * self.chunk_rows
        return block[lo : lo + stop - start].copy()

    def close(self) -> None:
        self._file.close()
