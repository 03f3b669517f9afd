"""Encoder pool sizes set from outside a running producer (the lead-time autoscaler).

Ray Data's actor-pool autoscaler sizes a pool from its own input queue only; it cannot know that
the consumers are about to run out of data. The lead-time controller (`launch.autoscale`) knows,
and tells a running producer through one small file in the cache:

    <cache>/control/pools.json   {"schema_version": 1, "version": 3, "sizes": {"vae": 4, "text": 2},
                                  "reason": "lead time 12 s < low 60 s ...", "written_unix": ...,
                                  "lease_s": 600}

The producer reads it before each window of partitions (`producers.pipeline`, ``--window-partitions``)
and runs that window's pools at exactly the sizes it names, each clamped to the pool's own bounds
(``--vae-actors`` / ``--text-actors MIN:MAX``, which the resource check sized the cluster for). A
pool the file does not name keeps Ray Data's autoscaling between its bounds.

The file is a **lease**: it stands for `lease_s` seconds after `written_unix` (the writer's clock,
seconds since the epoch; clocks must agree to well within the lease), and a live controller renews
it (`renew_pool_target`, on every observation). A file older than its lease belongs to a controller
that stopped: the producer ignores it (one log line) and runs its configured bounds, so a dead
controller never pins later windows or later producer runs. So does no file, and a file of another
`schema_version` (reported once: written by another release). A file that cannot be read or parsed
is reported once and ignored (the producer keeps its last sizes): a control hiccup must never stop
the producers.

The writer replaces the file atomically (`CacheStorage.write_atomic`) with a version one higher
than the one it found (a renewal keeps the version); there must be one writer (one controller) per
cache. The producer publishes the sizes it really runs, after clamping, in its ``status.json``
(``pool_bounds``, and ``pool_control_version``: the file version they came from, 0 for the
configured bounds); the controller reads those back (`launch.autoscale.ProducerPoolActuator`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.config import ConfigError

log = logging.getLogger(__name__)

POOL_CONTROL_FILE = "control/pools.json"
#: The layout of the control file this release reads and writes; a file of another (or no)
#: ``schema_version`` is ignored by the producer.
POOL_CONTROL_SCHEMA_VERSION = 1
#: Seconds a target stands after it was written unless renewed (the writer may set another).
DEFAULT_LEASE_S = 600.0
#: The pools a producer runs; the keys `sizes` may hold.
POOL_NAMES = ("vae", "text")


class PoolControlVersionError(ConfigError):
    """The control file has another ``schema_version`` than this release knows (names it)."""


@dataclass(frozen=True)
class PoolTarget:
    """The pool sizes a controller asks for (actors per pool), and why, for how long.

    Attributes:
        sizes: pool name (``vae``, ``text``) -> actors; a pool not named keeps its own bounds.
        version: 1 for the first target written to a cache, +1 for each one after.
        reason: the controller's one-line reason (logged by the producer when it applies it).
        written_unix: when it was written or last renewed (seconds since the epoch).
        lease_s: seconds after `written_unix` that it stands; later it has expired and is ignored.
    """

    sizes: Mapping[str, int]
    version: int = 1
    reason: str = ""
    written_unix: float = field(default_factory=time.time)
    lease_s: float = DEFAULT_LEASE_S

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sizes) - set(POOL_NAMES))
        if unknown:
            raise ConfigError(f"PoolTarget.sizes: unknown pool(s) {unknown}; expected some of {list(POOL_NAMES)}")
        for pool, n in self.sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"PoolTarget.sizes[{pool!r}]={n!r}: expected a whole number of actors >= 1")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"PoolTarget.version={self.version!r}: expected a whole number >= 1")
        if not _is_finite(self.written_unix):
            raise ConfigError(f"PoolTarget.written_unix={self.written_unix!r}: expected seconds since the epoch")
        if not _is_finite(self.lease_s) or self.lease_s <= 0:
            raise ConfigError(f"PoolTarget.lease_s={self.lease_s!r}: expected a finite number of seconds > 0")

    def age_s(self, now: float) -> float:
        """Seconds since it was written or renewed, at `now` (seconds since the epoch)."""
        return now - self.written_unix

    def expired(self, now: float) -> bool:
        """True once its lease ran out at `now`: its controller stopped renewing it."""
        return self.age_s(now) > self.lease_s

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "schema_version": POOL_CONTROL_SCHEMA_VERSION,
                "version": self.version,
                "sizes": dict(self.sizes),
                "reason": self.reason,
                "written_unix": self.written_unix,
                "lease_s": self.lease_s,
            },
            indent=1,
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PoolTarget:
        """Parse a control file; `PoolControlVersionError` for another ``schema_version``,
        `ConfigError` naming what is wrong otherwise."""
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{POOL_CONTROL_FILE}: not JSON ({exc})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{POOL_CONTROL_FILE}: expected a JSON object, got {d!r:.200}")
        if d.get("schema_version") != POOL_CONTROL_SCHEMA_VERSION:
            raise PoolControlVersionError(
                f"{POOL_CONTROL_FILE}: schema_version {d.get('schema_version')!r}, expected "
                f"{POOL_CONTROL_SCHEMA_VERSION} (written by another release of `qwenimage launch autoscale`)"
            )
        missing = [key for key in ("version", "sizes", "written_unix", "lease_s") if key not in d]
        if missing or not isinstance(d["sizes"], dict):
            raise ConfigError(
                f"{POOL_CONTROL_FILE}: expected an object with 'version', 'sizes' (an object), 'written_unix' "
                f"and 'lease_s', got {d!r:.200}"
            )
        return cls(
            sizes=dict(d["sizes"]),
            version=d["version"],
            reason=str(d.get("reason", "")),
            written_unix=d["written_unix"],
            lease_s=d["lease_s"],
        )


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_pool_target(storage: CacheStorage) -> PoolTarget | None:
    """The cache's control file; None when there is none. Raises `PoolControlVersionError` for a
    file of another format, `ConfigError` for a bad file and `OSError` when the storage cannot be
    read. Whether it has expired is the caller's question (`PoolTarget.expired`)."""
    if not storage.exists(POOL_CONTROL_FILE):
        return None
    try:
        data = storage.read_bytes(POOL_CONTROL_FILE)
    except FileNotFoundError:  # removed between the two calls
        return None
    return PoolTarget.from_json(data)


def write_pool_target(
    storage: CacheStorage, sizes: Mapping[str, int], reason: str = "", *, lease_s: float = DEFAULT_LEASE_S
) -> PoolTarget:
    """Replace the control file with `sizes`, leased for `lease_s` seconds from now (version: the
    file's + 1, or 1); returns what was written.

    A file that cannot be parsed, or of another format, is replaced (version 1 again): the writer owns it."""
    try:
        previous = read_pool_target(storage)
    except ConfigError as exc:
        log.warning("pool control: replacing an unreadable %s (%s)", storage.path(POOL_CONTROL_FILE), exc)
        previous = None
    version = previous.version + 1 if previous else 1
    target = PoolTarget(sizes=dict(sizes), version=version, reason=reason, lease_s=lease_s)
    storage.write_atomic(POOL_CONTROL_FILE, target.to_json())
    return target


def renew_pool_target(storage: CacheStorage, now: float | None = None) -> PoolTarget | None:
    """Renew the lease of the live target: the same version, sizes, reason and lease, written at
    `now` (seconds since the epoch; default the clock). Returns it; None, writing nothing, when
    there is no file, it cannot be read, or it already expired (a lapsed target is not brought
    back: its producer already runs its configured bounds; a new decision writes a new version)."""
    now = time.time() if now is None else now
    try:
        target = read_pool_target(storage)
    except ConfigError:
        return None
    if target is None or target.expired(now):
        return None
    renewed = replace(target, written_unix=now)
    storage.write_atomic(POOL_CONTROL_FILE, renewed.to_json())
    return renewed


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
    reason and any clamping). Without a live target (no file, an expired lease, another format)
    the window runs the configured bounds; an expired or other-format file is logged once. A bad
    or unreadable file is logged once per distinct problem and the previous window's bounds are
    kept. `clock` gives seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        storage: CacheStorage,
        configured: Mapping[str, tuple[int, int]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.configured = dict(configured)
        self.clock = clock
        self.current = WindowPools(bounds=dict(configured))
        self._problems: set[str] = set()

    def for_window(self, window: int) -> WindowPools:
        configured = WindowPools(bounds=dict(self.configured))
        try:
            target = read_pool_target(self.storage)
        except PoolControlVersionError as exc:
            self._warn_once(
                str(exc), f"{exc}; ignored: window {window} runs the configured bounds {configured.describe()}"
            )
            return self._set(configured)
        except (ConfigError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            self._warn_once(
                problem, f"{POOL_CONTROL_FILE} ignored ({problem}); window {window} keeps {self.current.describe()}"
            )
            return self.current
        if target is None:
            if self.current.version:
                log.info(
                    "pool control: %s is gone; window %d runs the configured bounds %s",
                    POOL_CONTROL_FILE,
                    window,
                    configured.describe(),
                )
            return self._set(configured)
        now = self.clock()
        if target.expired(now):
            self._warn_once(
                f"expired v{target.version} written at {target.written_unix!r}",
                f"{POOL_CONTROL_FILE} v{target.version} expired: written {target.age_s(now):.0f} s ago, lease "
                f"{target.lease_s:g} s (its controller stopped renewing it); ignored: window {window} runs the "
                f"configured bounds {configured.describe()} (Ray Data autoscaling)",
            )
            return self._set(configured)
        return self._apply(window, target)

    def _apply(self, window: int, target: PoolTarget) -> WindowPools:
        """The bounds `target` sets, each named size clamped into its pool's configured bounds."""
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

    def _set(self, pools: WindowPools) -> WindowPools:
        self.current = pools
        return pools

    def _warn_once(self, key: str, message: str) -> None:
        """Log `message` (``pool control: ...``) once per distinct `key`: a file that stays bad or
        expired must not flood the log, one window after another."""
        if key not in self._problems:
            self._problems.add(key)
            log.warning("pool control: %s", message)
