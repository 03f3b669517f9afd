"""`ProducerRow`: the one row schema that flows from `stages.prepare_partition` through the encoder
stages (`stages.VaeStage`, `stages.TextStage`) to `partition_writer.write_partition`.

Ray Data carries rows as flat dicts (pandas/Arrow blocks), so every row of every kind has every
column, with the defaults of `empty_row` where a column does not apply; that keeps the schema of
all Arrow blocks the same. After a trip through pandas, ints/floats/bools may come back as numpy
scalars (hence the ``int(...)`` casts of the readers). Tensors travel as raw bytes: images as
uint8 HWC RGB, latents and text embeddings as bfloat16 bit patterns
(`megatron_qwenimage.cache.shard_format.bf16_to_bytes` / `bytes_to_bf16`).
"""

from __future__ import annotations

from typing import TypedDict


class ProducerRow(TypedDict):
    """One input (at one target area) between the producer's stages.

    Attributes:
        partition_id: the input partition the row belongs to.
        partition_rows: how many rows the partition emitted (the driver waits for all of them).
        partition_inputs: how many inputs the partition lists.
        kind: "encode" (to be encoded and written), "quarantine" (rejected, see `reason`) or
            "duplicate" (content already held, see `duplicate_of`).
        reason: quarantine reason code ("" unless kind == "quarantine").
        detail: human-readable detail of the quarantine reason.
        duplicate_of: partition that holds this content (the row's own partition for a copy
            inside it); "" unless kind == "duplicate".
        input_id: stable id of the input within its source.
        source_uri: printable name of the target image (``source_uri`` column of the cache).
        condition_uri: printable name of the edit source image; "" for t2i.
        task: cached sample kind, one of `megatron_qwenimage.cache.SAMPLE_KINDS` ("t2i"/"edit").
        caption: the decoded caption (edit: the instruction).
        content_hash: hash of image + condition + caption + encoder/producer fingerprint; the
            cached ``sample_id`` and the dedup key.
        area: name of the target-area bucket set this row was bucketed for.
        bucket_h: bucket height in pixels.
        bucket_w: bucket width in pixels.
        pixels: target image resized/cropped to the bucket, uint8 [bucket_h, bucket_w, 3] bytes;
            emptied by the VAE stage.
        cond_pixels: edit source image resized/cropped to the bucket (same layout); "" for t2i,
            emptied by the VAE stage.
        vl_pixels: edit source image resized for the Qwen2.5-VL text encoder, uint8 [vl_h, vl_w, 3]
            bytes; emptied by the text stage.
        vl_h: height of `vl_pixels`.
        vl_w: width of `vl_pixels`.
        orig_h: height of the decoded original image.
        orig_w: width of the decoded original image.
        crop_top: top offset of the center crop, in resized pixels.
        crop_left: left offset of the center crop, in resized pixels.
        latents: normalised VAE latents of the target, bf16 bits [latent_c, h/8, w/8] bytes.
        cond_latents: same for the edit source image; b"" for t2i.
        latent_c: VAE latent channels.
        text: text embedding, bf16 bits [text_len, text_dim] bytes (unpadded).
        text_len: tokens of the text embedding.
        text_dim: width of the text embedding.
        text_truncated: whether the caption was cut to the token limit.
        t_read: seconds spent reading the input's bytes.
        t_decode: seconds spent decoding/resizing.
        t_vae: seconds of VAE encoding attributed to this row.
        t_text: seconds of text encoding attributed to this row.
    """

    partition_id: str
    partition_rows: int
    partition_inputs: int
    kind: str
    reason: str
    detail: str
    duplicate_of: str
    input_id: str
    source_uri: str
    condition_uri: str
    task: str
    caption: str
    content_hash: str
    area: str
    bucket_h: int
    bucket_w: int
    pixels: bytes
    cond_pixels: bytes
    vl_pixels: bytes
    vl_h: int
    vl_w: int
    orig_h: int
    orig_w: int
    crop_top: int
    crop_left: int
    latents: bytes
    cond_latents: bytes
    latent_c: int
    text: bytes
    text_len: int
    text_dim: int
    text_truncated: bool
    t_read: float
    t_decode: float
    t_vae: float
    t_text: float


def empty_row() -> ProducerRow:
    """A row with every column at its default (what a column that does not apply holds)."""
    return {
        "partition_id": "",
        "partition_rows": 0,
        "partition_inputs": 0,
        "kind": "",
        "reason": "",
        "detail": "",
        "duplicate_of": "",
        "input_id": "",
        "source_uri": "",
        "condition_uri": "",
        "task": "t2i",
        "caption": "",
        "content_hash": "",
        "area": "",
        "bucket_h": 0,
        "bucket_w": 0,
        "pixels": b"",
        "cond_pixels": b"",
        "vl_pixels": b"",
        "vl_h": 0,
        "vl_w": 0,
        "orig_h": 0,
        "orig_w": 0,
        "crop_top": 0,
        "crop_left": 0,
        "latents": b"",
        "cond_latents": b"",
        "latent_c": 0,
        "text": b"",
        "text_len": 0,
        "text_dim": 0,
        "text_truncated": False,
        "t_read": 0.0,
        "t_decode": 0.0,
        "t_vae": 0.0,
        "t_text": 0.0,
    }
