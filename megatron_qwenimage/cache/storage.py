"""Filesystem access for a latent cache, local disk or any fsspec URL.

A cache root is a local path or an fsspec URL (``s3://bucket/cache``, ``memory://c``...). All cache
code goes through `CacheStorage`, which offers the four operations the commit protocol needs:

* plain reads, listings and deletes;
* `CacheStorage.write_exclusive`: create a small object only if it does not exist yet (POSIX:
  write a private temporary file, then ``os.link`` it to the final name, which fails with
  EEXIST atomically; object stores: ``open(path, "xb")``, a conditional put such as S3's
  ``If-None-Match: *``). Exactly one of several concurrent callers wins;
* `CacheStorage.write_atomic`: replace a small object whole (temp file + rename on POSIX);
* `CacheStorage.zarr_store`: a zarr v3 store rooted at a path of the cache.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import fsspec
from fsspec.implementations.local import LocalFileSystem

from megatron_qwenimage.errors import UserError

#: Read size when hashing files.
_HASH_BLOCK_BYTES = 4 << 20


class StorageError(UserError, RuntimeError):
    """A storage operation failed; the message names the path."""


class CacheError(UserError, RuntimeError):
    """The cache or one of its snapshots is missing or malformed; the message names it."""


class CachePathError(CacheError):
    """A path read from a commit record or snapshot does not name a location inside the cache.

    The message names the record (commit record file or snapshot version), the entry (e.g.
    ``shards[0].path``) and the offending value.
    """


#: ``C:``, ``file:``, ``s3:``... at the start: a drive letter or a URL scheme.
_SCHEME_OR_DRIVE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_EXPECTED_PATH = (
    "expected a relative POSIX path inside the cache root ('/'-separated, no leading '/', "
    "no '..', '.' or empty components, no backslashes, drive letters or URL schemes)"
)


def _record_path_problem(relpath: object) -> str | None:
    """Why `relpath` is not an acceptable cache-relative path, or None if it is."""
    if not isinstance(relpath, str):
        return f"is not a string ({type(relpath).__name__})"
    if not relpath:
        return "is empty"
    if "\x00" in relpath:
        return "contains a NUL character"
    if "://" in relpath:
        return "is a URL"
    if "\\" in relpath:
        return "contains a backslash"
    if relpath.startswith("/"):
        return "is absolute"
    prefix = _SCHEME_OR_DRIVE.match(relpath)
    if prefix:
        return "starts with a drive letter" if len(prefix.group()) == 2 else "starts with a URL scheme"
    for part in relpath.split("/"):
        if part == "..":
            return "has a '..' component"
        if part in ("", "."):
            return "has an empty or '.' component"
    return None


def resolve_record_path(root: CacheStorage | None, relpath: str, *, record: str, entry: str) -> str:
    """Check a path taken from a commit record or snapshot; returns `relpath` unchanged if it is safe.

    Every path string that a record or snapshot (JSON written by producers) holds and that is
    turned into a location goes through here: shard directories, the files listed in a shard,
    the quarantine/duplicates tables. `relpath` must be a non-empty relative POSIX path without
    ``..``, ``.`` or empty components, backslashes, a drive letter or a URL scheme. With `root`
    (the cache's `CacheStorage`) it is also joined to the root, and the result must lie inside
    it; on local disk after resolving symbolic links (``os.path.realpath``), so a shard directory
    that is a link to somewhere else is refused. `root=None` checks the string only (parsing).

    Args:
        record: names the record, e.g. ``commit record /cache/commits/p.json``.
        entry: names the entry in it, e.g. ``shards[0].path``.

    Raises:
        CachePathError: naming `record`, `entry` and the value, and saying what was expected.
    """
    problem = _record_path_problem(relpath)
    if problem is None and root is not None:
        full = posixpath.join(root.root, relpath)
        if root.is_local:
            real_root = os.path.realpath(root.root).rstrip(os.sep) + os.sep
            real = os.path.realpath(full)
            if not real.startswith(real_root):
                problem = (
                    f"resolves to {real} (a symbolic link), outside the cache root {real_root.rstrip(os.sep) or os.sep}"
                )
        else:
            prefix = root.root.rstrip("/")
            if prefix and not posixpath.normpath(full).startswith(prefix + "/"):
                problem = f"joins to {full}, outside the cache root {prefix}"
    if problem is not None:
        raise CachePathError(f"{record}: {entry} = {relpath!r} {problem}; {_EXPECTED_PATH}")
    return relpath


class CacheStorage:
    """Paths relative to one cache root, on local disk or an fsspec filesystem.

    Args:
        root: local directory or fsspec URL of the cache root. It is created if missing.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = os.fspath(root)
        self.url = root
        self.fs, path = fsspec.core.url_to_fs(root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")

    # --- paths ----------------------------------------------------------------------------
    def path(self, relpath: str) -> str:
        """Absolute filesystem path of `relpath` (a '/'-separated path inside the cache)."""
        return posixpath.join(self.root, relpath) if relpath else self.root

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))

    def makedirs(self, relpath: str) -> None:
        self.fs.makedirs(self.path(relpath), exist_ok=True)

    def listdir(self, relpath: str) -> list[str]:
        """Names (not paths) directly under `relpath`; empty if it does not exist."""
        full = self.path(relpath)
        if not self.fs.exists(full):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(full, detail=False)]
        return sorted(n for n in names if n)

    def walk_files(self, relpath: str) -> Iterator[str]:
        """Every file under `relpath`, as '/'-separated paths relative to `relpath`, sorted."""
        base = self.path(relpath).rstrip("/").lstrip("/")
        if not self.fs.exists(self.path(relpath)):
            return
        for found in sorted(self.fs.find(self.path(relpath))):
            stripped = found.lstrip("/")
            if stripped.startswith(base + "/"):
                yield stripped[len(base) + 1 :]

    def newest_modified(self, relpath: str) -> float | None:
        """Newest modification time (seconds since the epoch) of `relpath` and of every file and
        directory under it: when anything there was last written, created or removed. None when
        it does not exist or the filesystem reports no times."""
        full = self.path(relpath)
        try:
            found = self.fs.find(full, withdirs=True, detail=True)
            if not found and self.fs.exists(full):  # a plain file, or a backend that lists no root
                found = {full: self.fs.info(full)}
        except FileNotFoundError:
            return None
        times = [t for path, info in found.items() if (t := _modified_unix(self.fs, path, info)) is not None]
        return max(times, default=None)

    # --- reads and writes -----------------------------------------------------------------
    def read_bytes(self, relpath: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(relpath))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"cache file {self.path(relpath)} does not exist") from exc

    def write_atomic(self, relpath: str, data: bytes) -> None:
        """Replace `relpath` with `data` so that readers see the old or the new object whole."""
        full = self.path(relpath)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        if self.is_local:
            os.replace(_durable_temp_copy(full, data), full)
        else:  # object stores: a single put is atomic
            with self.fs.open(full, "wb") as f:
                f.write(data)

    def write_exclusive(self, relpath: str, data: bytes) -> bool:
        """Create `relpath` holding `data` unless it exists. Returns True if this call created it.

        Atomic and exclusive: concurrent callers race and exactly one gets True; a reader never
        sees a partly written object (POSIX: the content is complete before ``link`` publishes it).
        """
        full = self.path(relpath)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        if self.is_local:
            tmp = _durable_temp_copy(full, data)
            try:
                os.link(tmp, full)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            with self.fs.open(full, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError) as exc:
            raise StorageError(
                f"{self.url}: the fsspec backend {type(self.fs).__name__} cannot create {full} "
                "exclusively (open mode 'xb'); the commit protocol needs exclusive create "
                "(POSIX O_EXCL/link or a conditional put)"
            ) from exc

    def move(self, src: str, dst: str) -> None:
        """Rename file `src` to `dst` (a new name: an existing `dst` is never replaced).

        Local disk: ``link`` then ``unlink`` (FileExistsError if `dst` exists), fsyncing the
        directories; object stores: copy then delete. FileNotFoundError if `src` is gone.
        """
        full_src, full_dst = self.path(src), self.path(dst)
        self.fs.makedirs(posixpath.dirname(full_dst), exist_ok=True)
        if self.is_local:
            os.link(full_src, full_dst)
            _fsync_directory(os.path.dirname(full_dst))
            os.unlink(full_src)
            _fsync_directory(os.path.dirname(full_src))
            return
        if self.fs.exists(full_dst):
            raise FileExistsError(f"cache file {full_dst} exists")
        self.fs.mv(full_src, full_dst)

    def remove(self, relpath: str) -> None:
        """Delete a file or a directory tree; missing paths are ignored."""
        full = self.path(relpath)
        try:
            if self.fs.isdir(full):
                self.fs.rm(full, recursive=True)
            elif self.fs.exists(full):
                self.fs.rm(full)
        except FileNotFoundError:
            pass

    def sync_tree(self, relpath: str) -> None:
        """Make every file under `relpath` durable before something that names them is published.

        Local disk: ``fsync`` each file, then each directory bottom-up, then the directories above
        `relpath` up to the cache root (so the new entries survive a power loss as well as a
        crash). Object stores: nothing to do, a completed put is durable.
        """
        if not self.is_local:
            return
        top = self.path(relpath)
        if not os.path.isdir(top):
            return
        for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
            for name in filenames:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_directory(dirpath)
        root = os.path.realpath(self.root)
        parent = os.path.dirname(os.path.realpath(top))
        while parent.startswith(root) and len(parent) >= len(root):
            _fsync_directory(parent)
            if parent == root:
                break
            parent = os.path.dirname(parent)

    def put_dir(self, local_dir: str, relpath: str) -> None:
        """Upload a local directory tree to `relpath` (used for non-local caches)."""
        self.fs.put(local_dir.rstrip("/") + "/", self.path(relpath), recursive=True)

    def sha256(self, relpath: str) -> tuple[str, int]:
        """(hex sha256, size in bytes) of the file at `relpath`."""
        digest = hashlib.sha256()
        size = 0
        with self.fs.open(self.path(relpath), "rb") as f:
            while True:
                block = f.read(_HASH_BLOCK_BYTES)
                if not block:
                    break
                digest.update(block)
                size += len(block)
        return digest.hexdigest(), size

    def zarr_store(self, relpath: str, *, read_only: bool):
        """A zarr v3 store rooted at `relpath`."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.path(relpath), read_only=read_only)
        return FsspecStore.from_url(
            f"{self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol}://"
            f"{self.path(relpath)}",
            read_only=read_only,
        )


#: Keys of an fsspec `info` dict that hold a modification time: local and sftp ("mtime", seconds),
#: s3fs ("LastModified"), adlfs ("last_modified"), gcsfs ("updated"), memory ("created").
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")


def _modified_unix(fs, path: str, info: dict) -> float | None:
    """Modification time of `path` (seconds since the epoch) from its fsspec `info`, else
    ``fs.modified``; None when neither tells (e.g. an object store's pseudo-directory)."""
    for key in _MTIME_KEYS:
        value = info.get(key)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    try:
        return fs.modified(path).timestamp()
    except (FileNotFoundError, NotImplementedError, OSError, AttributeError, ValueError):
        return None


def _fsync_directory(path: str) -> None:
    """fsync a directory (its entries); platforms that cannot open directories skip it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _durable_temp_copy(full: str, data: bytes) -> str:
    """Write `data` to a fresh temporary file beside local path `full`, fsynced; returns its path."""
    tmp = f"{full}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp
