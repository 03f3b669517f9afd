"""The pipeline's stages as plain functions/classes that Ray Data runs.

Rows flowing between stages are flat dicts with a fixed set of typed columns (`producers.row.ProducerRow`,
defaults in `producers.row.empty_row`), so every Arrow block has the same schema. A row is one of:

* ``kind == "encode"``: one input at one target area (pixels of its bucket, caption...);
* ``kind == "quarantine"``: an input rejected with a ``reason``;
* ``kind == "duplicate"``: an input whose content a committed partition holds (``duplicate_of``),
  or an earlier input of the same partition holds (``duplicate_of`` = the partition itself);
  see `producers.dedup` for the rule and `producers.dedup.resolve_duplicates` for the final
  decision at write time.

Every partition's rows carry ``partition_rows`` (how many rows the partition emitted) so the
driver knows when all of them have come through the encoders.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from megatron_qwenimage.cache.shard_format import bf16_to_bytes
from megatron_qwenimage.cache.storage import CacheStorage
from producers.config import ProducerConfig
from producers.dedup import CLAIMS_DIR, CommittedContent, claim_content  # noqa: F401 (CLAIMS_DIR: re-export)
from producers.images import Rejected, decode_caption, decode_image, nearest_bucket, resize_center_crop
from producers.items import InputItem
from producers.row import ProducerRow, empty_row
from producers.sources import printable, read_uri_bytes
from producers.synthetic import URI_PREFIX, read_synthetic


def _read_image_bytes(uri: str, member, label: str | None = None) -> bytes:
    """Bytes of an image (`member` inside a tar); `label` names it in rejections (default `uri`)."""
    if uri.startswith(URI_PREFIX):
        return read_synthetic(uri)
    label = label or uri
    try:
        return read_uri_bytes(uri, tuple(member) if member else None)
    except FileNotFoundError:
        raise Rejected("missing_file", f"{label}: file not found") from None
    except IsADirectoryError:
        raise Rejected("missing_file", f"{label}: is a directory, not an image file") from None
    except (OSError, ValueError) as exc:  # ValueError: a path the OS refuses (e.g. embedded NUL)
        raise Rejected("read_error", printable(f"{label}: {type(exc).__name__}: {exc}")) from None


def _read_caption(item: InputItem):
    """The inline caption, or the sidecar's bytes; None when there is neither. A sidecar that
    exists but cannot be read is `Rejected` (``unreadable_caption``) naming it."""
    if item.caption is not None or item.caption_uri is None:
        return item.caption
    where = printable(
        f"{item.source_uri}: caption {'member of ' if item.caption_member else 'sidecar '}{item.caption_uri}"
    )
    try:
        return read_uri_bytes(item.caption_uri, tuple(item.caption_member) if item.caption_member else None)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise Rejected("unreadable_caption", f"{where} is a directory, not a text file") from None
    except (OSError, ValueError) as exc:  # ValueError: a path the OS refuses (e.g. embedded NUL)
        raise Rejected(
            "unreadable_caption", printable(f"{where} cannot be read ({type(exc).__name__}: {exc})")
        ) from None


def _vl_size(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) of about side^2 pixels with the aspect of (h, w), multiples of 32 (edit pipeline)."""
    scale = (side * side / (h * w)) ** 0.5
    return max(32, round(h * scale / 32) * 32), max(32, round(w * scale / 32) * 32)


def prepare_partition(row: dict, *, cache_url: str, config: ProducerConfig, encoder_version: str) -> list[ProducerRow]:
    """CPU stage for a whole partition: read, validate, dedup, decode, bucket. Never raises for
    a bad input: it becomes a quarantine row."""
    storage = CacheStorage(cache_url)
    partition_id = row["partition_id"]
    items = [InputItem(**d) for d in json.loads(row["items_json"])]
    fingerprint = (encoder_version + "|" + config.fingerprint()).encode()
    seen: dict[str, str] = {}
    committed = CommittedContent(storage)
    out: list[ProducerRow] = []
    for item in items:
        uri = item.source_uri
        cond_label = printable(item.condition_uri or "")
        base = empty_row() | {
            "partition_id": partition_id,
            "partition_inputs": len(items),
            "input_id": item.input_id,
            "source_uri": uri,
            "condition_uri": cond_label,
            "task": item.task,
        }
        if item.rejected:  # known bad at listing time (e.g. a manifest cell that is not a path)
            reason, detail = item.rejected
            out.append(base | {"kind": "quarantine", "reason": reason, "detail": detail})
            continue
        t0 = time.perf_counter()
        try:
            data = _read_image_bytes(item.image_uri, item.tar_member, uri)
            cond_data = _read_image_bytes(item.condition_uri, None, cond_label) if item.task == "edit" else b""
            caption = decode_caption(_read_caption(item), uri=uri)
            t_read = time.perf_counter() - t0
            content_hash = hashlib.sha256(
                hashlib.sha256(data).digest()
                + hashlib.sha256(cond_data).digest()
                + hashlib.sha256(caption.encode()).digest()
                + fingerprint
            ).hexdigest()[:32]
            base |= {"caption": caption, "content_hash": content_hash}
            if content_hash in seen:  # a copy inside this partition: committed with it or not at all
                out.append(base | {"kind": "duplicate", "duplicate_of": partition_id})
                continue
            # The claim is advisory: skip only content that its claimer has COMMITTED. Content
            # claimed by a partition that is not committed (still running, or dead) is encoded here.
            owner = claim_content(storage, content_hash, partition_id)
            if owner != partition_id and committed.holds(owner, content_hash):
                out.append(base | {"kind": "duplicate", "duplicate_of": owner})
                continue
            seen[content_hash] = item.input_id
            t1 = time.perf_counter()
            decoded = decode_image(data, uri=uri, min_side_px=config.min_side_px, max_pixels=config.max_pixels)
            cond = None
            if item.task == "edit":
                cond = decode_image(
                    cond_data, uri=cond_label, min_side_px=config.min_side_px, max_pixels=config.max_pixels
                )
                vh, vw = _vl_size(cond.height, cond.width, config.edit_vl_area_px)
                vl = resize_center_crop(cond.pixels, _AnyBucket(vh, vw))
                base |= {"vl_pixels": vl.pixels.tobytes(), "vl_h": vh, "vl_w": vw}
            for area, buckets in sorted(config.buckets.items()):
                bucket = nearest_bucket(decoded.height, decoded.width, buckets)
                crop = resize_center_crop(decoded.pixels, bucket)
                cond_pixels = resize_center_crop(cond.pixels, bucket).pixels.tobytes() if cond is not None else b""
                out.append(
                    base
                    | {
                        "kind": "encode",
                        "area": area,
                        "bucket_h": bucket.height_px,
                        "bucket_w": bucket.width_px,
                        "pixels": crop.pixels.tobytes(),
                        "cond_pixels": cond_pixels,
                        "orig_h": decoded.height,
                        "orig_w": decoded.width,
                        "crop_top": crop.crop_top,
                        "crop_left": crop.crop_left,
                        "t_read": t_read,
                        "t_decode": time.perf_counter() - t1,
                    }
                )
        except Rejected as rej:
            out.append(base | {"kind": "quarantine", "reason": rej.reason, "detail": rej.detail})
    for r in out:
        r["partition_rows"] = len(out)
    return out


class _AnyBucket:
    """A (height, width) target for resize_center_crop that need not be a 16-px bucket."""

    def __init__(self, h: int, w: int) -> None:
        self.height_px, self.width_px = h, w


def _pixels(row: ProducerRow, key: str = "pixels", h: str = "bucket_h", w: str = "bucket_w") -> np.ndarray:
    return np.frombuffer(row[key], dtype=np.uint8).reshape(int(row[h]), int(row[w]), 3)


class VaeStage:
    """Ray Data actor: VAE-encode the ``encode`` rows of a batch, one forward per bucket."""

    def __init__(
        self,
        encoders_dir: str,
        device: str | None = None,
        channels_last: bool = False,
        compile_mode: str = "off",
        conv2d: bool = False,
    ) -> None:
        from producers.encoders import VaeEncoder

        self.encoder = VaeEncoder(
            encoders_dir, device=device, channels_last=channels_last, compile_mode=compile_mode, conv2d=conv2d
        )

    def __call__(self, batch):
        import pandas as pd

        rows = batch.to_dict("records")
        groups: dict[tuple[int, int], list[ProducerRow]] = {}
        for r in rows:
            if r["kind"] == "encode":
                groups.setdefault((int(r["bucket_h"]), int(r["bucket_w"])), []).append(r)
        for members in groups.values():
            t0 = time.perf_counter()
            images = np.stack([_pixels(r) for r in members])
            latents = self.encoder.encode(images)
            edits = [i for i, r in enumerate(members) if r["task"] == "edit"]
            cond = self.encoder.encode(np.stack([_pixels(members[i], "cond_pixels") for i in edits])) if edits else None
            dt = (time.perf_counter() - t0) / len(members)
            for i, r in enumerate(members):
                r["latents"] = bf16_to_bytes(latents[i])
                r["latent_c"] = int(latents.shape[1])
                if r["task"] == "edit":
                    r["cond_latents"] = bf16_to_bytes(cond[edits.index(i)])
                r["pixels"] = b""  # not needed downstream: keep the object store small
                r["cond_pixels"] = b""
                r["t_vae"] = dt
        return pd.DataFrame(rows)


class TextStage:
    """Ray Data actor: Qwen2.5-VL text conditioning for the ``encode`` rows of a batch."""

    def __init__(
        self, encoders_dir: str, max_text_tokens: int, overlong_caption: str, device: str | None = None
    ) -> None:
        from producers.encoders import TextEncoder

        self.encoder = TextEncoder(encoders_dir, device=device, max_text_tokens=max_text_tokens)
        self.overlong_caption = overlong_caption

    def __call__(self, batch):
        import pandas as pd

        rows = batch.to_dict("records")
        todo = [r for r in rows if r["kind"] == "encode"]
        results: dict[str, object] = {}  # input_id -> TextEncoding (one per input, shared by its areas)
        t0 = time.perf_counter()
        t2i = sorted({r["input_id"]: r["caption"] for r in todo if r["task"] == "t2i"}.items())
        if t2i:
            for (input_id, _), enc in zip(t2i, self.encoder.encode_t2i([c for _, c in t2i])):
                results[input_id] = enc
        for r in todo:
            if r["task"] == "edit" and r["input_id"] not in results:
                results[r["input_id"]] = self.encoder.encode_edit(r["caption"], _pixels(r, "vl_pixels", "vl_h", "vl_w"))
        dt = (time.perf_counter() - t0) / max(1, len(results))
        for r in todo:
            enc = results[r["input_id"]]
            if enc.truncated and self.overlong_caption == "reject":
                r.update(
                    kind="quarantine",
                    reason="caption_too_long",
                    latents=b"",
                    cond_latents=b"",
                    detail=f"{r['source_uri']}: caption is {enc.num_tokens_before_truncation} tokens, "
                    f"over the limit of {self.encoder.max_text_tokens}",
                )
                continue
            r["text"] = bf16_to_bytes(enc.embedding)
            r["text_len"] = int(enc.embedding.shape[0])
            r["text_dim"] = int(enc.embedding.shape[1])
            r["text_truncated"] = bool(enc.truncated)
            r["vl_pixels"] = b""
            r["t_text"] = dt
        return pd.DataFrame(rows)
