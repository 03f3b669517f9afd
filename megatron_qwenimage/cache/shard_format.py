"""One latent shard: the unit a producer writes and a consumer reads (schema version 1).

A shard holds the samples of one input partition that fall in one aspect-ratio bucket, so every
latent in it has the same shape. On disk a shard is a directory::

    <shard>/tensors.zarr/           zarr v3 group (plain zarr-python 3 opens it)
        latents/                    uint16 [N, C, h, w]   bfloat16 bit patterns, normalised VAE mode
        text_embeddings/            uint16 [T, D]         bfloat16 bit patterns, unpadded, T = sum(len_i)
        text_offsets/               int64  [N + 1]        sample i owns rows offsets[i]:offsets[i+1]
        condition_latents/          uint16 [N, C, h, w]   edit samples only (zeros for t2i rows)
    <shard>/samples.parquet         one row per sample (see `SAMPLES_SCHEMA`)

bfloat16 has no numpy or parquet type, so tensors are stored as their raw 16-bit patterns in
uint16 arrays, with ``attributes["dtype"] == "bfloat16"``; ``torch.from_numpy(a.view(np.int16))
.view(torch.bfloat16)`` restores them bit-exactly (`bf16_to_bits` / `bits_to_bf16` and their bytes
and float32 variants below are the one implementation of that packing). Each shard is written once, whole, by one
writer into a private attempt directory (see `commit`), so zarr's sharding codec (one file per
array, one inner chunk per sample) is used only in the single-writer way it is safe for.

docs/cache_format.md documents the same layout for readers outside this package.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.config import PIXELS_PER_TOKEN_SIDE, validate_image_size
from megatron_qwenimage.errors import UserError

#: Bumped whenever the on-disk layout changes in a way a reader must know about.
SCHEMA_VERSION = 1
#: Spatial downsampling of the Qwen-Image VAE: pixels per latent cell per side.
VAE_SPATIAL_FACTOR = 8
TENSORS_DIR = "tensors.zarr"
SAMPLES_FILE = "samples.parquet"
#: Sample kinds a cache stores (the samples table's ``task`` column): "t2i" (target image + caption)
#: and "edit" (target image + edit source image + instruction). Training tasks built on them are
#: the reader's business (`megatron_qwenimage.data.reader_config.TASKS`).
SAMPLE_KINDS = ("t2i", "edit")
#: Text-embedding rows per zarr inner chunk.
_TEXT_CHUNK_ROWS = 256


class ShardFormatError(UserError, ValueError):
    """A shard's content does not follow the schema; the message names the shard."""


@dataclass(frozen=True, order=True)
class Bucket:
    """An aspect-ratio bucket: the pixel size images are resized and centre-cropped to.

    Both sides are multiples of 16 px (VAE factor 8 x patch 2), so the latent grid is
    ``(height_px / 8, width_px / 8)`` and packs into whole 2x2 tokens.
    """

    height_px: int
    width_px: int

    def __post_init__(self) -> None:
        validate_image_size(self.height_px, self.width_px, what=f"bucket {self.height_px}x{self.width_px}")

    @property
    def latent_height(self) -> int:
        return self.height_px // VAE_SPATIAL_FACTOR

    @property
    def latent_width(self) -> int:
        return self.width_px // VAE_SPATIAL_FACTOR

    @property
    def num_image_tokens(self) -> int:
        return (self.height_px // PIXELS_PER_TOKEN_SIDE) * (self.width_px // PIXELS_PER_TOKEN_SIDE)

    @property
    def name(self) -> str:
        """``"<height>x<width>"`` in pixels, e.g. ``"1328x1328"``."""
        return f"{self.height_px}x{self.width_px}"

    @classmethod
    def parse(cls, name: str) -> Bucket:
        """Inverse of `name`: ``"640x480"`` -> Bucket(640, 480)."""
        try:
            h, w = (int(part) for part in name.lower().split("x"))
        except ValueError as exc:
            raise ShardFormatError(f"bucket name {name!r}: expected '<height>x<width>' in pixels") from exc
        return cls(h, w)


#: Columns of ``samples.parquet``; one row per sample, in the order of the tensors.
SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # content hash (hex) of the sample
        pa.field("task", pa.string(), nullable=False),  # "t2i" or "edit"
        pa.field("caption", pa.string(), nullable=False),  # caption (t2i) or instruction (edit)
        pa.field("source_uri", pa.string(), nullable=False),  # target image
        pa.field("condition_uri", pa.string()),  # edit source image; null for t2i
        pa.field("text_len", pa.int32(), nullable=False),  # text-embedding rows of the sample
        pa.field("text_offset", pa.int64(), nullable=False),  # first row in text_embeddings
        pa.field("text_truncated", pa.bool_(), nullable=False),  # cut to the token limit
        pa.field("orig_height", pa.int32(), nullable=False),  # source image, after EXIF rotation
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("crop_top", pa.int32(), nullable=False),  # crop box in resized pixels
        pa.field("crop_left", pa.int32(), nullable=False),
    ]
)


@dataclass
class SampleMeta:
    """Per-sample metadata row of a shard (see `SAMPLES_SCHEMA`)."""

    sample_id: str
    task: str
    caption: str
    source_uri: str
    condition_uri: str | None
    text_len: int
    text_truncated: bool
    orig_height: int
    orig_width: int
    crop_top: int = 0
    crop_left: int = 0


@dataclass
class ShardTensors:
    """The tensors of one shard, in memory.

    Attributes:
        latents: bf16 [N, C, h, w], normalised VAE posterior mode, C = VAE z_dim.
        text_embeddings: bf16 [sum(text_len), D], the samples' embeddings back to back, unpadded.
        text_offsets: int64 [N + 1]; sample i owns rows ``text_offsets[i]:text_offsets[i + 1]``.
        condition_latents: bf16 [N, C, h, w] edit-source latents, or None when no sample is an
            edit sample (rows of t2i samples in a mixed shard are zeros).
    """

    latents: torch.Tensor
    text_embeddings: torch.Tensor
    text_offsets: torch.Tensor
    condition_latents: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return int(self.latents.shape[0])

    @property
    def text_lengths(self) -> torch.Tensor:
        """int64 [N] text tokens per sample."""
        return self.text_offsets[1:] - self.text_offsets[:-1]

    def text_embedding(self, i: int) -> torch.Tensor:
        """bf16 [text_len_i, D] embedding rows of sample `i`."""
        return self.text_embeddings[int(self.text_offsets[i]) : int(self.text_offsets[i + 1])]


def offsets_from_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """int64 [N + 1] exclusive prefix sums of `lengths`."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if len(lengths):
        out[1:] = torch.cumsum(torch.as_tensor(list(lengths), dtype=torch.int64), 0)
    return out


def bf16_to_bits(t: torch.Tensor) -> np.ndarray:
    """bf16 tensor -> uint16 numpy array of the same bit patterns."""
    if t.dtype != torch.bfloat16:
        raise ShardFormatError(f"expected a bfloat16 tensor, got {t.dtype}")
    return t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def bits_to_bf16(a: np.ndarray) -> torch.Tensor:
    """uint16 numpy array of bfloat16 bit patterns -> bf16 tensor (bit-exact)."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


def bf16_to_bytes(t: torch.Tensor) -> bytes:
    """bf16 tensor -> its bit patterns as raw native-endian uint16 bytes (C order)."""
    return bf16_to_bits(t).tobytes()


def bytes_to_bf16(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `bf16_to_bytes`: raw uint16 bit patterns -> bf16 tensor of `shape` (bit-exact)."""
    return bits_to_bf16(np.frombuffer(data, dtype=np.uint16).reshape(shape))


def bf16_bits_to_float32(bits: np.ndarray) -> torch.Tensor:
    """uint16 bfloat16 bit patterns -> float32 tensor, exactly (bf16 is the top half of fp32)."""
    return torch.from_numpy((bits.astype(np.uint32) << 16).view(np.float32))


def _validate(bucket: Bucket, tensors: ShardTensors, samples: Sequence[SampleMeta], where: str) -> None:
    n = len(samples)
    lat = tensors.latents
    if lat.dim() != 4 or lat.shape[0] != n or tuple(lat.shape[2:]) != (bucket.latent_height, bucket.latent_width):
        raise ShardFormatError(
            f"{where}: latents have shape {tuple(lat.shape)}, expected [{n}, C, "
            f"{bucket.latent_height}, {bucket.latent_width}] for bucket {bucket.name}"
        )
    if tensors.text_embeddings.dim() != 2:
        raise ShardFormatError(f"{where}: text_embeddings must be [T, D], got {tuple(tensors.text_embeddings.shape)}")
    lengths = [s.text_len for s in samples]
    expected = offsets_from_lengths(lengths)
    if not torch.equal(tensors.text_offsets.to(torch.int64), expected):
        raise ShardFormatError(f"{where}: text_offsets disagree with the samples' text_len {lengths}")
    if int(expected[-1]) != tensors.text_embeddings.shape[0]:
        raise ShardFormatError(
            f"{where}: text_embeddings have {tensors.text_embeddings.shape[0]} rows, "
            f"the samples' text_len sum to {int(expected[-1])}"
        )
    for s in samples:
        if s.task not in SAMPLE_KINDS:
            raise ShardFormatError(f"{where}: sample {s.sample_id} has task {s.task!r}, expected one of {SAMPLE_KINDS}")
    any_edit = any(s.task == "edit" for s in samples)
    if any_edit and (tensors.condition_latents is None or tensors.condition_latents.shape != lat.shape):
        raise ShardFormatError(f"{where}: edit samples need condition_latents shaped like latents {tuple(lat.shape)}")


def samples_table(samples: Sequence[SampleMeta], offsets: torch.Tensor) -> pa.Table:
    """The ``samples.parquet`` table of `samples` (text_offset taken from `offsets`)."""
    cols = {f.name: [] for f in SAMPLES_SCHEMA}
    for i, s in enumerate(samples):
        for name in cols:
            cols[name].append(int(offsets[i]) if name == "text_offset" else getattr(s, name))
    return pa.table(cols, schema=SAMPLES_SCHEMA)


def write_shard(
    storage: CacheStorage,
    relpath: str,
    bucket: Bucket,
    tensors: ShardTensors,
    samples: Sequence[SampleMeta],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one shard directory at `relpath` (which must not exist yet).

    Args:
        storage: the cache.
        relpath: shard directory inside the cache (a private attempt path, see `commit`).
        bucket: the bucket every latent of the shard belongs to.
        tensors: latents / text / condition tensors (bf16), validated against `samples`.
        samples: one metadata row per sample, in tensor order.
        metadata: extra string key/values stored in the zarr group attributes and the parquet
            footer (encoder version, producer run id...).
    """
    _validate(bucket, tensors, samples, where=f"shard {relpath}")
    import zarr

    attrs = {
        "schema_version": SCHEMA_VERSION,
        "bucket": bucket.name,
        "height_px": bucket.height_px,
        "width_px": bucket.width_px,
        "num_samples": len(samples),
        "latent_channels": int(tensors.latents.shape[1]),
        "text_dim": int(tensors.text_embeddings.shape[1]),
        **(metadata or {}),
    }
    tmpdir = None
    if storage.is_local:
        target = storage
        tensors_rel = f"{relpath}/{TENSORS_DIR}"
    else:  # build locally, then upload the finished directory in one go
        tmpdir = tempfile.TemporaryDirectory(prefix="qwenimage-shard-")
        target = CacheStorage(tmpdir.name)
        tensors_rel = TENSORS_DIR
    try:
        group = zarr.open_group(store=target.zarr_store(tensors_rel, read_only=False), mode="w-", attributes=attrs)
        n = len(samples)
        lat_shape = tuple(tensors.latents.shape)
        _write_array(group, "latents", bf16_to_bits(tensors.latents), chunks=(1, *lat_shape[1:]), bf16=True)
        text = bf16_to_bits(tensors.text_embeddings)
        _write_array(group, "text_embeddings", text, chunks=(_TEXT_CHUNK_ROWS, text.shape[1]), bf16=True)
        _write_array(group, "text_offsets", tensors.text_offsets.to(torch.int64).numpy(), chunks=(n + 1,), bf16=False)
        if tensors.condition_latents is not None and any(s.task == "edit" for s in samples):
            cond = bf16_to_bits(tensors.condition_latents)
            _write_array(group, "condition_latents", cond, chunks=(1, *lat_shape[1:]), bf16=True)
        table = samples_table(samples, tensors.text_offsets)
        table = table.replace_schema_metadata({k: str(v) for k, v in attrs.items()})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        samples_rel = f"{relpath}/{SAMPLES_FILE}" if tmpdir is None else SAMPLES_FILE
        target.write_atomic(samples_rel, buf.getvalue())
        if tmpdir is not None:
            storage.put_dir(tmpdir.name, relpath)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def _write_array(group, name: str, data: np.ndarray, chunks: tuple[int, ...], bf16: bool) -> None:
    """One uncompressed array; the whole array is one zarr shard (one file), `chunks` inner chunks."""
    chunks = tuple(max(1, min(c, s)) if s else max(1, c) for c, s in zip(chunks, data.shape))
    shards = tuple(max(s, 1) for s in data.shape)
    shards = tuple(((s + c - 1) // c) * c for s, c in zip(shards, chunks))
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=None,
        attributes={"dtype": "bfloat16"} if bf16 else {},
    )
    if data.size:
        arr[...] = data


def open_tensors_group(storage: CacheStorage, relpath: str):
    """The read-only zarr group of the shard at `relpath`."""
    import zarr

    return zarr.open_group(store=storage.zarr_store(f"{relpath}/{TENSORS_DIR}", read_only=True), mode="r")


def read_samples(storage: CacheStorage, relpath: str) -> pa.Table:
    """The ``samples.parquet`` table of the shard at `relpath`."""
    return read_parquet(storage, f"{relpath}/{SAMPLES_FILE}")


def read_parquet(storage: CacheStorage, rel: str) -> pa.Table:
    """The parquet table at cache-relative `rel` (FileNotFoundError naming it if it is missing)."""
    if storage.is_local:
        # By path, not from an in-memory buffer: a table decoded from a Python buffer in a process
        # that also imported torch makes the interpreter abort at exit now and then (pyarrow 26,
        # "terminate called without an active exception"), failing CLI commands that succeeded.
        if not storage.exists(rel):
            raise FileNotFoundError(f"cache file {storage.path(rel)} does not exist")
        return pq.read_table(storage.path(rel))
    return pq.read_table(io.BytesIO(storage.read_bytes(rel)))


def read_tensors(storage: CacheStorage, relpath: str, index: int | None = None) -> ShardTensors:
    """Tensors of the whole shard (`index` None) or of sample `index` alone (N = 1)."""
    group = open_tensors_group(storage, relpath)
    offsets = torch.from_numpy(np.asarray(group["text_offsets"][:], dtype=np.int64))
    names = set(group.array_keys())
    if index is None:
        latents = bits_to_bf16(group["latents"][:])
        text = bits_to_bf16(group["text_embeddings"][:])
        cond = bits_to_bf16(group["condition_latents"][:]) if "condition_latents" in names else None
        return ShardTensors(latents, text, offsets, cond)
    n = offsets.numel() - 1
    if not 0 <= index < n:
        raise IndexError(f"shard {relpath}: sample index {index} out of range [0, {n})")
    start, stop = int(offsets[index]), int(offsets[index + 1])
    latents = bits_to_bf16(group["latents"][index : index + 1])
    text = bits_to_bf16(group["text_embeddings"][start:stop])
    cond = bits_to_bf16(group["condition_latents"][index : index + 1]) if "condition_latents" in names else None
    return ShardTensors(latents, text, torch.tensor([0, stop - start], dtype=torch.int64), cond)


def shard_attributes(storage: CacheStorage, relpath: str) -> dict:
    """The zarr group attributes of the shard (schema version, bucket, encoder version...)."""
    return json.loads(json.dumps(dict(open_tensors_group(storage, relpath).attrs)))
