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

Faults of the source as a whole (it does not exist, a manifest without an image or caption
column, a file that is not a readable tar / Parquet / JSONL / CSV, no inputs at all, a bad
``synthetic:`` query) raise `SourceError` before anything is written. Faults of one input that
show at listing time (a manifest row whose image is not a path string, a caption value that is
not text, a second image under one WebDataset key) become an item with `InputItem.rejected`
set, which the CPU stage records as a quarantine row with that reason.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import tarfile
from collections.abc import Iterator
from urllib.parse import parse_qs

import fsspec

from megatron_qwenimage.errors import UserError
from producers.items import InputItem, SourceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
#: Manifest columns naming the (target) image, in order of preference; the first present is used.
IMAGE_COLUMNS = ("image", "target_image", "path")
#: Manifest columns holding the caption (t2i) or instruction (edit); the first present is used.
CAPTION_COLUMNS = ("caption", "instruction")
#: Query keys of ``synthetic:text?...``.
SYNTHETIC_KEYS = ("n", "seed")


class UrlError(UserError, ValueError):
    """A path or URL names no file system this machine can open (an unknown protocol, or one
    whose package is not installed); the message names the flag, the URL and the fix."""


def url_filesystem(url: str, flag: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs(url)``, with a `UrlError` naming `flag` when the protocol is unknown
    or its package is missing (fsspec says ``Protocol not known`` / raises ImportError)."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = _missing_package(url, exc)
        raise UrlError(
            f"{flag} {url}: the {_protocol(url)}:// file system needs the Python package {package}, which is not "
            f"installed here; install it (pip install {package}) or give a local path"
        ) from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise UrlError(
            f"{flag} {url}: unknown protocol {_protocol(url)}://; expected a local path or a URL of a protocol "
            "fsspec knows (s3://, gs://, hf://, http://, ...: fsspec.available_protocols())"
        ) from None


def _protocol(url: str) -> str:
    return (fsspec.core.split_protocol(url)[0] or "file").split("::")[0]


def _missing_package(url: str, exc: ImportError) -> str:
    """The package a protocol needs: the module Python could not import, else the top module of
    fsspec's registered class for the protocol."""
    cause = exc.__cause__
    if isinstance(cause, ModuleNotFoundError) and cause.name:
        return cause.name.split(".")[0]
    from fsspec.registry import known_implementations

    return known_implementations.get(_protocol(url), {}).get("class", "?").split(".")[0]


def read_uri_bytes(uri: str, member: tuple[int, int] | None = None) -> bytes:
    """Bytes of `uri` (whole file, or `member` = (offset, size) inside it). FileNotFoundError if absent."""
    with fsspec.open(uri, "rb") as f:
        if member is None:
            return f.read()
        f.seek(member[0])
        return f.read(member[1])


def list_inputs(spec: str) -> list[InputItem]:
    """Every input of `spec`, listed eagerly; `SourceError` if there are none."""
    items = list(open_source(spec))
    if not items:
        raise SourceError(f"--input {spec}: no inputs found")
    return items


def open_source(spec: str) -> Iterator[InputItem]:
    """Items of the source named by `spec` (see the module docstring), in a stable order."""
    if spec.startswith("synthetic:"):
        return _synthetic_source(spec)
    fs, path = url_filesystem(spec, "--input")
    proto = spec.split("://")[0] + "://" if "://" in spec else ""
    if not fs.exists(path):
        raise SourceError(f"--input {spec}: does not exist")
    lower = path.lower()
    if lower.endswith((".parquet", ".jsonl", ".csv")):
        return _manifest_items(fs, path, proto)
    if lower.endswith(".tar"):
        return _webdataset_items(fs, [path], proto, spec)
    if fs.isdir(path):
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
        if not names:
            raise SourceError(
                f"--input {spec}: the folder is empty (expected images with .txt sidecars or "
                "captions.jsonl/csv, or WebDataset .tar shards)"
            )
        if all(n.lower().endswith(".tar") for n in names):
            return _webdataset_items(fs, sorted(posixpath.join(path, n) for n in names), proto, spec)
        return _folder_items(fs, path, proto, spec)
    raise SourceError(f"--input {spec}: expected a folder, a .parquet/.jsonl/.csv manifest, a .tar shard or synthetic:")


def _synthetic_source(spec: str) -> Iterator[InputItem]:
    from producers.synthetic import KINDS, synthetic_items

    kind, _, query = spec[len("synthetic:") :].partition("?")
    kind = kind or "text"
    if kind not in KINDS:
        raise SourceError(
            f"--input {spec}: unknown synthetic source {kind!r}; available: "
            + ", ".join(f"synthetic:{k}" for k in KINDS)
        )
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise SourceError(
            f"--input {spec}: malformed query {query!r} ({exc}); expected e.g. synthetic:text?n=64&seed=0"
        ) from None
    unknown = sorted(set(params) - set(SYNTHETIC_KEYS))
    if unknown:
        raise SourceError(
            f"--input {spec}: unknown query key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; known keys: {', '.join(SYNTHETIC_KEYS)}"
        )
    values = {}
    for key, default, minimum in (("n", 64, 1), ("seed", 0, None)):
        given = params.get(key)
        if given is None:
            values[key] = default
            continue
        if len(given) > 1:
            raise SourceError(f"--input {spec}: query key {key!r} is given {len(given)} times; give it once")
        try:
            values[key] = int(given[0])
        except ValueError:
            raise SourceError(f"--input {spec}: {key}={given[0]!r} is not an integer") from None
        if minimum is not None and values[key] < minimum:
            raise SourceError(f"--input {spec}: {key}={values[key]}: expected an integer >= {minimum}")
    return synthetic_items(kind, n=values["n"], seed=values["seed"])


# --- tables (manifests and caption indexes) ------------------------------------------------
def _read_table(fs, path: str) -> tuple[list[dict], list[str]]:
    """Rows and column names of a .parquet / .jsonl / .csv file; `SourceError` naming it if unreadable."""
    lower = path.lower()
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, expected a {posixpath.splitext(lower)[1]} table") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if lower.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise SourceError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        return table.to_pylist(), list(table.column_names)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SourceError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if lower.endswith(".jsonl"):
        rows, columns = [], {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{n}: not a JSON object ({exc})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}:{n}: expected a JSON object per line, got a JSON {type(row).__name__}")
            rows.append(row)
            columns.update(dict.fromkeys(row))
        return rows, list(columns)
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
    except csv.Error as exc:
        raise SourceError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return rows, [c for c in (reader.fieldnames or []) if c is not None]


def printable(text: str) -> str:
    """`text` with anything UTF-8 cannot hold (lone surrogates: file names that are not UTF-8,
    JSON escapes like ``\\ud800``) written as backslash escapes: safe for ids, labels and Parquet."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _ref_problem(value) -> str | None:
    """Why a manifest cell cannot name an image, or None."""
    if _missing(value) or value == "":
        return "is empty"
    if not isinstance(value, str):
        return f"is {_describe(value)}"
    if "\x00" in value:
        return f"contains a NUL character ({printable(value)!r})"
    return None


def _missing(value) -> bool:
    """None, or a float NaN (how pandas writes a missing value into a numeric column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _describe(value) -> str:
    """``an int (7)``, ``a list (['a', 'b'])``: what a cell holds, for messages."""
    name, text = type(value).__name__, repr(value)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({text[:40] + '...' if len(text) > 40 else text})"


def _caption_value(value, where: str) -> tuple[str | None, tuple[str, str] | None]:
    """A caption cell -> (caption, None) or (None, (reason, detail)) when it is not text."""
    if _missing(value) or isinstance(value, str):
        return (None if _missing(value) else value), None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return None, ("undecodable_caption", f"{where}: caption is not valid UTF-8 ({exc})")
    return None, ("caption_not_text", f"{where}: caption is {_describe(value)}, expected a string")


def _resolve(base_dir: str, proto: str, ref: str) -> str:
    if "://" in ref:
        return ref
    return proto + (ref if ref.startswith("/") else posixpath.join(base_dir, ref))


def _manifest_items(fs, path: str, proto: str) -> Iterator[InputItem]:
    rows, columns = _read_table(fs, path)
    image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    for what, col, names in (("image", image_col, IMAGE_COLUMNS), ("caption", caption_col, CAPTION_COLUMNS)):
        if col is None:
            raise SourceError(
                f"{proto}{path}: manifest has no {what} column (expected one of "
                f"{', '.join(names)}); columns found: {', '.join(columns) or 'none'}"
            )
    if not rows:
        raise SourceError(f"{proto}{path}: manifest has no rows")
    base = posixpath.dirname(path)
    for i, row in enumerate(rows):
        label = f"{proto}{path}#row={i}"
        image, source = row.get(image_col), row.get("source_image")
        problem = None
        for col, value in ((image_col, image), ("source_image", source)):
            if col == "source_image" and (_missing(value) or value == ""):
                continue
            why = _ref_problem(value)
            if why:
                problem = ("invalid_image_ref", f"{label}: column {col!r} {why}; expected an image path or URL string")
                break
        if problem:
            name = printable(image.replace("\x00", "\\0")) if isinstance(image, str) else f"<{type(image).__name__}>"
            yield InputItem(input_id=f"{i:09d}:{name}", image_uri=label, label=label, rejected=problem)
            continue
        caption, rejected = _caption_value(row.get(caption_col), f"{label} ({printable(image)})")
        is_edit = isinstance(source, str) and source != ""
        image_uri = _resolve(base, proto, image)
        yield InputItem(
            input_id=printable(f"{i:09d}:{image}"),
            image_uri=image_uri,
            caption=caption,
            task="edit" if is_edit else "t2i",
            condition_uri=_resolve(base, proto, source) if is_edit else None,
            label=None if printable(image_uri) == image_uri else printable(image_uri),
            rejected=rejected,
        )


def _folder_items(fs, path: str, proto: str, spec: str) -> Iterator[InputItem]:
    files = sorted(fs.find(path))
    index: dict[str, object] = {}
    for name in ("captions.jsonl", "captions.csv"):
        candidate = posixpath.join(path, name)
        if fs.exists(candidate):
            rows, columns = _read_table(fs, candidate)
            missing = [c for c in ("path", "caption") if c not in columns]
            if missing:
                raise SourceError(
                    f"{proto}{candidate}: caption index has no {' or '.join(map(repr, missing))} "
                    f"column (expected path, caption); columns found: {', '.join(columns) or 'none'}"
                )
            for i, row in enumerate(rows):
                if not isinstance(row.get("path"), str):
                    raise SourceError(
                        f"{proto}{candidate}: row {i}: column 'path' is {_describe(row.get('path'))}, "
                        "expected the image's path relative to the folder"
                    )
                index[row["path"]] = row.get("caption")
            break
    items = []
    for full in files:
        rel = posixpath.relpath(full, path)
        if not rel.lower().endswith(IMAGE_EXTENSIONS) and not _looks_like_input(rel, files):
            continue
        label = None if printable(full) == full else printable(proto + full)  # a file name that is not UTF-8
        if index:
            caption, rejected = _caption_value(index.get(rel), printable(proto + full))
            items.append(InputItem(printable(rel), proto + full, caption=caption, label=label, rejected=rejected))
        else:
            stem = posixpath.splitext(full)[0]
            items.append(InputItem(printable(rel), proto + full, caption_uri=proto + stem + ".txt", label=label))
    if not items:
        raise SourceError(
            f"--input {spec}: no inputs in the folder ({len(files)} files, none an image "
            f"({', '.join(IMAGE_EXTENSIONS)}) or a file with a .txt caption sidecar)"
        )
    return iter(items)


def _looks_like_input(rel: str, files: list[str]) -> bool:
    """Files with a non-image extension still count as inputs when they have a caption sidecar
    (a broken download saved as .bin is quarantined, not silently skipped)."""
    lower = rel.lower()
    if lower.endswith((".txt", ".jsonl", ".csv", ".json")):
        return False
    stem = posixpath.splitext(rel)[0]
    return any(f.endswith("/" + stem + ".txt") or f == stem + ".txt" for f in files)


def _tar_groups(fs, tar_path: str, spec: str) -> dict[str, list[tuple[str, tuple[int, int]]]]:
    """key -> [(extension, (offset, size)), ...] in tar order; `SourceError` if not a readable tar."""
    groups: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    try:
        with fs.open(tar_path, "rb") as f:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    base = posixpath.basename(member.name)
                    key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
                    ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                    groups.setdefault(key, []).append((ext, (member.offset_data, member.size)))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceError(
            f"--input {spec}: {tar_path} is not a readable tar archive ({type(exc).__name__}: {exc}); "
            "repair it or move it out of the input"
        ) from None
    return groups


def _webdataset_items(fs, tars: list[str], proto: str, spec: str) -> Iterator[InputItem]:
    items = []
    for tar_path in tars:
        uri = proto + tar_path
        tar_name = printable(posixpath.basename(tar_path))
        for key, parts in _tar_groups(fs, tar_path, spec).items():
            images = [(ext, member) for ext, member in parts if ext in IMAGE_EXTENSIONS]
            caption = next(((ext, m) for want in (".txt", ".caption") for ext, m in parts if ext == want), None)
            label = printable(f"{uri}#{key}")
            key = printable(key)
            if not images:
                items.append(
                    InputItem(
                        input_id=f"{tar_name}/{key}",
                        image_uri=label,
                        label=label,
                        rejected=(
                            "missing_file",
                            f"{label}: no image member ({', '.join(IMAGE_EXTENSIONS)}) under this key",
                        ),
                    )
                )
                continue
            (first_ext, first), extra = images[0], images[1:]
            items.append(
                InputItem(
                    input_id=f"{tar_name}/{key}",
                    image_uri=uri,
                    tar_member=first,
                    label=label,
                    caption_uri=uri if caption else None,
                    caption_member=caption[1] if caption else None,
                )
            )
            for ext, member in extra:  # one sample per key: a second image is counted, not dropped
                extra_label = printable(f"{uri}#{key}{ext}@{member[0]}")
                items.append(
                    InputItem(
                        input_id=printable(f"{tar_name}/{key}{ext}@{member[0]}"),
                        image_uri=uri,
                        tar_member=member,
                        label=extra_label,
                        rejected=(
                            "extra_image",
                            f"{extra_label}: a second image member under key {key!r} "
                            f"(the key's sample uses its {first_ext} member); one image per key",
                        ),
                    )
                )
    if not items:
        raise SourceError(
            f"--input {spec}: no samples in {len(tars)} tar file{'s' if len(tars) != 1 else ''} (no member files)"
        )
    return iter(items)
