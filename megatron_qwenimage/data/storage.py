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
import uuid
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

#: Read size when hashing files.
_HASH_BLOCK_BYTES = 4 << 20


class StorageError(RuntimeError):
    """A storage operation failed; the message names the path."""


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


def _durable_temp_copy(full: str, data: bytes) -> str:
    """Write `data` to a fresh temporary file beside local path `full`, fsynced; returns its path."""
    tmp = f"{full}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp
