"""Input sources: list inputs (cheap, on the driver) and read one input's bytes (in a CPU task).

Kinds, picked by `open_source` from the ``--input`` string:

* **folder**: a directory of images; captions from sidecar ``<stem>.txt`` files, or from a
  ``captions.jsonl`` / ``captions.csv`` (columns ``path``, ``caption``) inside the directory.
* **manifest**: a ``.parquet`` / ``.jsonl`` / ``.csv`` table with columns ``image`` (URI or path
  relative to the manifest) and ``caption``; edit pairs add ``source_image`` and use ``caption``
  as the instruction (``instruction`` is accepted as its name too).
* **webdataset**: a ``.tar`` shard, or a directory of them; samples are grouped by key, the
  image from ``.jpg/.jpeg/.png/.webp/.tif``, the caption from ``.txt`` / ``.caption``.
* **synthetic**: ``synthetic:text?n=64&seed=0`` renders text on plain and photo backgrounds
  (see `producers.synthetic`).

Every path goes through fsspec, so ``s3://...`` works wherever the backend is installed. Each
input gets a stable `InputItem.input_id`, so partitions (and their commit records) are the same
on every rerun over the same input.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import parse_qs

import fsspec

from megatron_qwenimage.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")


class SourceError(UserError, ValueError):
    """The input cannot be listed at all (not a per-sample problem); the message names it."""


@dataclass
class InputItem:
    """One input sample, before reading.

    Attributes:
        input_id: stable id, unique within the source.
        image_uri: fsspec URL of the (target) image, or a ``tar://`` / ``synthetic:`` locator.
        caption: inline caption (str or raw bytes); None with `caption_uri` or when missing.
        caption_uri: fsspec URL of a caption file (sidecar); a missing file = missing caption.
        task: "t2i" or "edit".
        condition_uri: edit source image; None for t2i.
        tar_member: (offset, size) of the image bytes inside `image_uri`'s tar (webdataset).
    """

    input_id: str
    image_uri: str
    caption: str | bytes | None = None
    caption_uri: str | None = None
    task: str = "t2i"
    condition_uri: str | None = None
    tar_member: tuple[int, int] | None = None
    caption_member: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def read_uri_bytes(uri: str, member: tuple[int, int] | None = None) -> bytes:
    """Bytes of `uri` (whole file, or `member` = (offset, size) inside it). FileNotFoundError if absent."""
    with fsspec.open(uri, "rb") as f:
        if member is None:
            return f.read()
        f.seek(member[0])
        return f.read(member[1])


def open_source(spec: str) -> Iterator[InputItem]:
    """Items of the source named by `spec` (see the module docstring), in a stable order."""
    if spec.startswith("synthetic:"):
        from producers.synthetic import synthetic_items

        kind, _, query = spec[len("synthetic:"):].partition("?")
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        return synthetic_items(kind or "text", n=int(params.get("n", 64)), seed=int(params.get("seed", 0)))
    fs, path = fsspec.core.url_to_fs(spec)
    proto = spec.split("://")[0] + "://" if "://" in spec else ""
    if not fs.exists(path):
        raise SourceError(f"--input {spec}: does not exist")
    lower = path.lower()
    if lower.endswith((".parquet", ".jsonl", ".csv")):
        return _manifest_items(fs, path, proto)
    if lower.endswith(".tar"):
        return _webdataset_items(fs, [path], proto)
    if fs.isdir(path):
        names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
        if names and all(n.lower().endswith(".tar") for n in names):
            return _webdataset_items(fs, sorted(posixpath.join(path, n) for n in names), proto)
        return _folder_items(fs, path, proto)
    raise SourceError(f"--input {spec}: expected a folder, a .parquet/.jsonl/.csv manifest, a .tar shard or synthetic:")


def _read_table_rows(fs, path: str) -> list[dict]:
    lower = path.lower()
    with fs.open(path, "rb") as f:
        data = f.read()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8")
    if lower.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{n}: not a JSON object ({exc})") from exc
        return rows
    return list(csv.DictReader(io.StringIO(text)))


def _resolve(base_dir: str, proto: str, ref: str) -> str:
    if "://" in ref:
        return ref
    return proto + (ref if ref.startswith("/") else posixpath.join(base_dir, ref))


def _manifest_items(fs, path: str, proto: str) -> Iterator[InputItem]:
    base = posixpath.dirname(path)
    for i, row in enumerate(_read_table_rows(fs, path)):
        image = row.get("image") or row.get("target_image") or row.get("path")
        if not image:
            raise SourceError(f"{path}: row {i} has no 'image' column value")
        source = row.get("source_image")
        caption = row.get("caption", row.get("instruction"))
        yield InputItem(
            input_id=f"{i:09d}:{image}",
            image_uri=_resolve(base, proto, image),
            caption=caption,
            task="edit" if source else "t2i",
            condition_uri=_resolve(base, proto, source) if source else None,
        )


def _folder_items(fs, path: str, proto: str) -> Iterator[InputItem]:
    files = sorted(fs.find(path))
    index = {}
    for name in ("captions.jsonl", "captions.csv"):
        candidate = posixpath.join(path, name)
        if fs.exists(candidate):
            for row in _read_table_rows(fs, candidate):
                index[row["path"]] = row.get("caption")
            break
    for full in files:
        rel = posixpath.relpath(full, path)
        if not rel.lower().endswith(IMAGE_EXTENSIONS) and not _looks_like_input(rel, files):
            continue
        if index:
            yield InputItem(rel, proto + full, caption=index.get(rel))
        else:
            stem = posixpath.splitext(full)[0]
            yield InputItem(rel, proto + full, caption_uri=proto + stem + ".txt")


def _looks_like_input(rel: str, files: list[str]) -> bool:
    """Files with a non-image extension still count as inputs when they have a caption sidecar
    (a broken download saved as .bin is quarantined, not silently skipped)."""
    lower = rel.lower()
    if lower.endswith((".txt", ".jsonl", ".csv", ".json")):
        return False
    stem = posixpath.splitext(rel)[0]
    return any(f.endswith("/" + stem + ".txt") or f == stem + ".txt" for f in files)


def _webdataset_items(fs, tars: list[str], proto: str) -> Iterator[InputItem]:
    for tar_path in tars:
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        with fs.open(tar_path, "rb") as f:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    base = posixpath.basename(member.name)
                    key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
                    ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                    groups.setdefault(key, {})[ext] = (member.offset_data, member.size)
        uri = proto + tar_path
        for key, parts in groups.items():
            image_ext = next((e for e in parts if e in IMAGE_EXTENSIONS), None)
            caption_ext = next((e for e in (".txt", ".caption") if e in parts), None)
            yield InputItem(
                input_id=f"{posixpath.basename(tar_path)}/{key}",
                image_uri=uri if image_ext else f"{uri}#{key}(no image member)",
                tar_member=parts[image_ext] if image_ext else None,
                caption_uri=uri if caption_ext else None,
                caption_member=parts[caption_ext] if caption_ext else None,
            )
