"""Encoder pool sizes set from outside a running producer (the lead-time autoscaler).

Ray Data's actor-pool autoscaler sizes a pool from its own input queue only; it cannot know that
the consumers are about to run out of data. The lead-time controller (`launch.autoscale`) knows,
and tells a running producer through one small file in the cache:

    <cache>/control/pools.json   {"version": 3, "sizes": {"vae": 4, "text": 2},
                                  "reason": "lead time 12 s < low 60 s ...", "written_unix": ...}

The producer reads it before each window of partitions (`producers.pipeline`, ``--window-partitions``)
and runs that window's pools at exactly the sizes it names, each clamped to the pool's own bounds
(``--vae-actors`` / ``--text-actors MIN:MAX``, which the resource check sized the cluster for). A
pool the file does not name, or no file, keeps Ray Data's autoscaling between its bounds. A file
that cannot be read or parsed is reported once and ignored (the producer keeps its last sizes):
a control hiccup must never stop the producers.

The writer replaces the file atomically (`CacheStorage.write_atomic`) with a version one higher
than the one it found; there must be one writer (one controller) per cache.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.config import ConfigError

log = logging.getLogger(__name__)

POOL_CONTROL_FILE = "control/pools.json"
#: The pools a producer runs; the keys `sizes` may hold.
POOL_NAMES = ("vae", "text")


@dataclass(frozen=True)
class PoolTarget:
    """The pool sizes a controller asks for (actors per pool), and why.

    Attributes:
        sizes: pool name (``vae``, ``text``) -> actors; a pool not named keeps its own bounds.
        version: 1 for the first target written to a cache, +1 for each one after.
        reason: the controller's one-line reason (logged by the producer when it applies it).
        written_unix: when it was written (seconds since the epoch).
    """

    sizes: Mapping[str, int]
    version: int = 1
    reason: str = ""
    written_unix: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sizes) - set(POOL_NAMES))
        if unknown:
            raise ConfigError(f"PoolTarget.sizes: unknown pool(s) {unknown}; expected some of {list(POOL_NAMES)}")
        for pool, n in self.sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"PoolTarget.sizes[{pool!r}]={n!r}: expected a whole number of actors >= 1")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"PoolTarget.version={self.version!r}: expected a whole number >= 1")
        if not isinstance(self.written_unix, (int, float)) or not math.isfinite(self.written_unix):
            raise ConfigError(f"PoolTarget.written_unix={self.written_unix!r}: expected seconds since the epoch")

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": self.version,
                "sizes": dict(self.sizes),
                "reason": self.reason,
                "written_unix": self.written_unix,
            },
            indent=1,
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PoolTarget:
        """Parse a control file; `ConfigError` naming what is wrong."""
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{POOL_CONTROL_FILE}: not JSON ({exc})") from None
        if not isinstance(d, dict) or not isinstance(d.get("sizes"), dict):
            raise ConfigError(f"{POOL_CONTROL_FILE}: expected an object with 'version' and 'sizes', got {d!r:.200}")
        return cls(
            sizes=dict(d["sizes"]),
            version=d.get("version", 1),
            reason=str(d.get("reason", "")),
            written_unix=d.get("written_unix", 0.0),
        )


def read_pool_target(storage: CacheStorage) -> PoolTarget | None:
    """The cache's control file; None when there is none. Raises `ConfigError` for a bad file and
    `OSError` when the storage cannot be read."""
    if not storage.exists(POOL_CONTROL_FILE):
        return None
    try:
        data = storage.read_bytes(POOL_CONTROL_FILE)
    except FileNotFoundError:  # removed between the two calls
        return None
    return PoolTarget.from_json(data)


def write_pool_target(storage: CacheStorage, sizes: Mapping[str, int], reason: str = "") -> PoolTarget:
    """Replace the control file with `sizes` (version: the file's + 1, or 1); returns what was written.

    A file that cannot be parsed is replaced (version 1 again): the writer owns it."""
    try:
        previous = read_pool_target(storage)
    except ConfigError as exc:
        log.warning("pool control: replacing an unreadable %s (%s)", storage.path(POOL_CONTROL_FILE), exc)
        previous = None
    target = PoolTarget(sizes=dict(sizes), version=(previous.version + 1) if previous else 1, reason=reason)
    storage.write_atomic(POOL_CONTROL_FILE, target.to_json())
    return target


@dataclass(frozen=True)
class WindowPools:
    """One window's actor bounds per pool, ``(min_size, max_size)`` for Ray Data's ActorPoolStrategy,
    and where they came from (the control file's version, or 0 for the configured bounds)."""

    bounds: Mapping[str, tuple[int, int]]
    version: int = 0
    reason: str = ""

    def describe(self) -> str:
        """``vae 4, text 1:2``: a fixed size or the MIN:MAX Ray Data autoscales between."""
        return ", ".join(f"{p} {lo}" if lo == hi else f"{p} {lo}:{hi}" for p, (lo, hi) in self.bounds.items())


class PoolControl:
    """The producer's side: the bounds of each window's pools, from the configured bounds
    (`configured`: pool -> ``(min_actors, max_actors)``) and the cache's control file.

    `for_window` reads the file (one small read per window), clamps each named size into its
    pool's configured bounds and logs one line when the bounds change (with the controller's
    reason and any clamping). A bad or unreadable file is logged once per distinct problem and the
    previous window's bounds are kept.
    """

    def __init__(self, storage: CacheStorage, configured: Mapping[str, tuple[int, int]]) -> None:
        self.storage = storage
        self.configured = dict(configured)
        self.current = WindowPools(bounds=dict(configured))
        self._problems: set[str] = set()

    def for_window(self, window: int) -> WindowPools:
        try:
            target = read_pool_target(self.storage)
        except (ConfigError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if problem not in self._problems:
                self._problems.add(problem)
                log.warning(
                    "pool control: %s ignored (%s); window %d keeps %s",
                    POOL_CONTROL_FILE,
                    problem,
                    window,
                    self.current.describe(),
                )
            return self.current
        if target is None:
            return self.current
        bounds, clamped = {}, []
        for pool, (lo, hi) in self.configured.items():
            want = target.sizes.get(pool)
            if want is None:
                bounds[pool] = (lo, hi)
                continue
            size = min(hi, max(lo, want))
            if size != want:
                clamped.append(f"{pool} {want} -> {size} (its bounds {lo}:{hi})")
            bounds[pool] = (size, size)
        new = WindowPools(bounds=bounds, version=target.version, reason=target.reason)
        if new.bounds != self.current.bounds or new.version != self.current.version:
            log.info(
                "pool control v%d from window %d: %s -> %s%s%s",
                target.version,
                window,
                self.current.describe(),
                new.describe(),
                f" ({target.reason})" if target.reason else "",
                f"; clamped {', '.join(clamped)}" if clamped else "",
            )
        self.current = new
        return new
