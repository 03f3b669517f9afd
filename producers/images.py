"""CPU stage for one image: decode, validate, orient, convert to RGB, resize + centre-crop to a bucket.

Every rejection raises `Rejected` with one of the `QUARANTINE_REASONS` and a detail naming the
input, so the caller records it in the quarantine table instead of losing it or crashing.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_qwenimage.cache.shard_format import Bucket

#: Every reason an input can be quarantined for.
QUARANTINE_REASONS = (
    "missing_file",  # the image (or edit source image) does not exist / cannot be opened
    "zero_bytes",  # the file is empty
    "not_an_image",  # no image format recognises the bytes
    "corrupt_image",  # recognised, but truncated or undecodable
    "too_small",  # shorter side below the configured minimum
    "decompression_bomb",  # more pixels than the configured maximum
    "missing_caption",  # no caption at all
    "empty_caption",  # empty or whitespace-only caption
    "undecodable_caption",  # caption bytes are not valid UTF-8
    "caption_not_text",  # a manifest's caption value is not a string (a number, list, object...)
    "unreadable_caption",  # the caption sidecar exists but cannot be read (a directory, permissions, I/O)
    "caption_too_long",  # over the token limit, with overlong_caption="reject"
    "read_error",  # the storage backend failed to read the input
    "invalid_image_ref",  # a manifest's image / source_image value is empty or not a path string
    "extra_image",  # a second image member under one WebDataset key (the key's sample uses the first)
)

#: Version of the caption clean-up rule (`clean_caption`); part of the producer settings a cache records.
CAPTION_RULES = "strip-controls-v1"
#: C0 control characters except tab and newline, DEL, and C1 control characters.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Rejected(Exception):
    """An input cannot be used; `reason` is one of `QUARANTINE_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in QUARANTINE_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    """An RGB image after EXIF orientation: uint8 [H, W, 3]."""

    pixels: np.ndarray
    frames: int = 1  # frames in the file (multi-page TIFF, GIF); the first is used

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def decode_image(data: bytes, *, uri: str, min_side_px: int, max_pixels: int) -> DecodedImage:
    """Decode `data` into RGB uint8, or raise `Rejected`.

    Any PIL mode is converted: grayscale and 16-bit (scaled to 8 bits), palette (through RGBA
    when it has transparency), RGBA/LA (composited on white), CMYK, YCbCr. The header's pixel
    count is checked against `max_pixels` before any pixel is decoded.
    """
    if len(data) == 0:
        raise Rejected("zero_bytes", f"{uri}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data[:4] in _TIFF_MAGIC:  # float / planar / multi-sample TIFFs PIL cannot decode
            return _decode_tiff(data, uri=uri, min_side_px=min_side_px, max_pixels=max_pixels)
        raise Rejected("not_an_image", f"{uri}: {len(data)} bytes that no image format recognises") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("decompression_bomb", f"{uri}: {exc}") from None
    except Exception as exc:
        raise Rejected("corrupt_image", f"{uri}: cannot read the image header ({exc})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise Rejected(
            "decompression_bomb", f"{uri}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
        )
    frames = int(getattr(img, "n_frames", 1) or 1)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except Exception as exc:
        raise Rejected(
            "corrupt_image", f"{uri}: truncated or corrupt image data ({type(exc).__name__}: {exc})"
        ) from None
    if min(rgb.shape[0], rgb.shape[1]) < min_side_px:
        raise Rejected(
            "too_small", f"{uri}: {rgb.shape[1]}x{rgb.shape[0]} px, the shorter side must be at least {min_side_px} px"
        )
    return DecodedImage(rgb, frames)


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


def _decode_tiff(data: bytes, *, uri: str, min_side_px: int, max_pixels: int) -> DecodedImage:
    """TIFFs PIL cannot read (float samples, planar RGB): first page via tifffile, scaled to 8 bits."""
    try:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            frames = len(tif.pages)
            shape = page.shape
            if int(np.prod(shape[-3:] if len(shape) >= 3 else shape)) > max_pixels * 4:
                raise Rejected("decompression_bomb", f"{uri}: TIFF page of shape {shape} is over {max_pixels} pixels")
            arr = page.asarray()
    except Rejected:
        raise
    except Exception as exc:
        raise Rejected("corrupt_image", f"{uri}: TIFF that neither PIL nor tifffile can decode ({exc})") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar -> interleaved
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise Rejected("corrupt_image", f"{uri}: TIFF page of shape {arr.shape} is not a gray or RGB(A) image")
    integer_8bit = arr.dtype == np.uint8
    arr = arr[:, :, :3].astype(np.float64)
    if not integer_8bit:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    rgb = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if rgb.shape[0] * rgb.shape[1] > max_pixels:
        raise Rejected(
            "decompression_bomb", f"{uri}: {rgb.shape[1]}x{rgb.shape[0]} pixels is over the limit of {max_pixels}"
        )
    if min(rgb.shape[:2]) < min_side_px:
        raise Rejected(
            "too_small", f"{uri}: {rgb.shape[1]}x{rgb.shape[0]} px, the shorter side must be at least {min_side_px} px"
        )
    return DecodedImage(np.ascontiguousarray(rgb), frames)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 [H, W, 3]."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        scaled = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to height/width (in log space)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b.height_px / b.width_px) - ratio), b.height_px))


@dataclass
class Cropped:
    """An image resized to cover its bucket and centre-cropped: uint8 [bucket.h, bucket.w, 3]."""

    pixels: np.ndarray
    bucket: Bucket
    crop_top: int
    crop_left: int


def resize_center_crop(image: np.ndarray, bucket: Bucket) -> Cropped:
    """Scale `image` (uint8 [H, W, 3]) so it covers `bucket`, then cut the centre."""
    h, w = image.shape[:2]
    scale = max(bucket.height_px / h, bucket.width_px / w)
    new_h, new_w = max(bucket.height_px, round(h * scale)), max(bucket.width_px, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    top, left = (new_h - bucket.height_px) // 2, (new_w - bucket.width_px) // 2
    out = np.ascontiguousarray(resized[top : top + bucket.height_px, left : left + bucket.width_px])
    return Cropped(out, bucket, top, left)


def clean_caption(text: str) -> str:
    """The caption as committed: CR LF and CR become LF, control characters other than tab and
    newline (C0, DEL, C1: NUL, escape sequences, form feeds...) are removed, a byte-order mark and
    surrounding whitespace are stripped. Rule version: `CAPTION_RULES`."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    return text.strip().lstrip("\ufeff").strip()


def decode_caption(raw: bytes | str | None, *, uri: str) -> str:
    """Caption bytes/str -> cleaned str (`clean_caption`), or raise `Rejected` (missing, not
    text, undecodable, empty or nothing but control characters)."""
    if raw is None:
        raise Rejected("missing_caption", f"{uri}: no caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("undecodable_caption", f"{uri}: caption is not valid UTF-8 ({exc})") from None
    if not isinstance(raw, str):
        name = type(raw).__name__
        raise Rejected(
            "caption_not_text",
            f"{uri}: caption is {'an' if name[0] in 'aeiou' else 'a'} {name} ({raw!r:.40}), expected a string",
        )
    text = clean_caption(raw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. a JSON "\ud800" escape
        raise Rejected(
            "undecodable_caption", f"{uri}: caption is not valid Unicode ({exc.reason} at {exc.start})"
        ) from None
    if not text:
        what = "control characters and whitespace" if _CONTROL_CHARS.search(raw) else "empty or whitespace"
        raise Rejected("empty_caption", f"{uri}: caption is {what}")
    return text
