"""The producer settings a cache's samples were made with, recorded at the cache root.

``CACHE/producer_settings.json`` is written by the first ``qwenimage produce`` into a cache and
names every setting that shapes a sample: the encoders (their version fingerprint), the
buckets, ``--min-side``, ``--max-pixels``, ``--max-text-tokens``, ``--overlong-caption``, the
edit vision area, and the caption clean-up rule. These are exactly what salts a sample's content
hash (`producers.config.ProducerConfig.fingerprint` + encoder version), so a run with other
values would not recognise any earlier sample as a duplicate and would commit every input a
second time. Settings that do not shape samples (actor counts and CPUs, batch size, partition
size, metrics, Ray address, device, sweep grace) are not recorded and never compared.

A run whose settings differ from the cache's current settings version is refused before it
writes anything, with the keys that differ (old -> new). The ways out: the cache's settings, a
new ``--output`` cache, or ``--new-settings-version``, which appends the run's settings as a new
version and makes it current. Samples made under an earlier version stay in the cache (readers
see them all); an image produced under two versions is two samples (different ``sample_id``),
because a content hash covers the settings. A later run must match the newest version (or
pass ``--new-settings-version`` again; rerunning with the flag and unchanged settings is a
plain resume).

File format (``format`` 1)::

    {"format": 1, "current": 2,
     "versions": [{"version": 1, "created_unix": ..., "run_id": "...", "encoders": "tiny",
                   "commits_before": 0, "settings": {"encoder_version": "...", "buckets": {...}, ...}},
                  {"version": 2, ...}]}

``commits_before`` > 0 marks a version recorded in a cache that already held commits made
before settings were recorded (their settings are unknown). Starting a new version is a
read-modify-replace of this one small file (`CacheStorage.write_atomic`): start new versions
from one producer at a time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from megatron_qwenimage.cache.storage import CacheStorage
from megatron_qwenimage.errors import UserError
from producers.config import ProducerConfig
from producers.images import CAPTION_RULES

SETTINGS_FILE = "producer_settings.json"
FORMAT = 1
#: Where each recorded setting comes from, for messages.
SETTING_FLAGS = {
    "encoder_version": "--encoders",
    "buckets": "--buckets",
    "min_side_px": "--min-side",
    "max_pixels": "--max-pixels",
    "max_text_tokens": "--max-text-tokens",
    "overlong_caption": "--overlong-caption",
    "edit_vl_area_px": "ProducerConfig.edit_vl_area_px",
    "caption_rules": "the producer version's caption clean-up",
}

log = logging.getLogger(__name__)


class SettingsError(UserError):
    """The cache's recorded producer settings refuse this run, or cannot be read; names the file."""


def sample_settings(config: ProducerConfig, encoder_version: str) -> dict:
    """The settings that shape samples, as a JSON-able dict (see the module docstring)."""
    return {
        "encoder_version": encoder_version,
        "buckets": {area: [b.name for b in buckets] for area, buckets in sorted(config.buckets.items())},
        "min_side_px": config.min_side_px,
        "max_pixels": config.max_pixels,
        "max_text_tokens": config.max_text_tokens,
        "overlong_caption": config.overlong_caption,
        "edit_vl_area_px": config.edit_vl_area_px,
        "caption_rules": CAPTION_RULES,
    }


def settings_diff(old: dict, new: dict) -> dict[str, tuple[object, object]]:
    """key -> (old, new) for every key whose value differs (a missing key reads as None)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _show(value) -> str:
    if value is None:
        return "(not recorded)"
    if isinstance(value, dict):
        return ";".join(f"{k}:{','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in value.items())
    return str(value)


def read_settings(storage: CacheStorage) -> dict | None:
    """The parsed settings file, or None if the cache has none; `SettingsError` if malformed."""
    try:
        raw = storage.read_bytes(SETTINGS_FILE)
    except FileNotFoundError:
        return None
    where = storage.path(SETTINGS_FILE)
    try:
        doc = json.loads(raw)
        versions = doc["versions"]
        current = int(doc["current"])
        if doc.get("format") != FORMAT or not isinstance(versions, list):
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
        by_number = {int(v["version"]): v for v in versions}
        if current not in by_number or not isinstance(by_number[current].get("settings"), dict):
            raise ValueError(f"current version {current} is not among the versions")
    except (ValueError, KeyError, TypeError) as exc:
        raise SettingsError(
            f"{where}: not a producer settings file this producer can read ({type(exc).__name__}: {exc}); it records "
            "the settings this cache's samples were made with: restore it, or produce into a new --output cache"
        ) from None
    return doc


def current_settings(doc: dict) -> tuple[int, dict]:
    current = int(doc["current"])
    entry = next(v for v in doc["versions"] if int(v["version"]) == current)
    return current, entry["settings"]


@dataclass
class SettingsPlan:
    """What `record_settings` will do: "create" the file, "match" (nothing to write), or "new_version"."""

    action: str
    settings: dict
    version: int
    encoders: str


def check_settings(storage: CacheStorage | None, settings: dict, *, encoders: str, new_version: bool) -> SettingsPlan:
    """Compare `settings` with the cache's current version, writing nothing.

    `storage` is None when the cache does not exist yet. Raises `SettingsError` (naming the keys
    that differ, old -> new, and the ways out) unless they match or `new_version` is set.
    """
    doc = read_settings(storage) if storage is not None else None
    if doc is None:
        return SettingsPlan("create", settings, 1, encoders)
    current, old = current_settings(doc)
    diff = settings_diff(old, settings)
    if not diff:
        return SettingsPlan("match", settings, current, encoders)
    if new_version:
        return SettingsPlan("new_version", settings, max(int(v["version"]) for v in doc["versions"]) + 1, encoders)
    changes = "; ".join(f"{k} {_show(a)} -> {_show(b)} ({SETTING_FLAGS.get(k, k)})" for k, (a, b) in diff.items())
    raise SettingsError(
        f"--output {storage.url}: this cache's samples were made with other producer settings "
        f"({storage.path(SETTINGS_FILE)}, version {current}): {changes}. Nothing was written. Rerun with the "
        "cache's settings, produce into a new --output cache, or pass --new-settings-version to add samples made "
        f"with these settings to this cache as settings version "
        f"{max(int(v['version']) for v in doc['versions']) + 1} (earlier samples stay; they are not duplicates of new ones)"
    )


def record_settings(storage: CacheStorage, plan: SettingsPlan, *, run_id: str, commits_before: int) -> int:
    """Write what `plan` says (the cache exists by now); returns the settings version of the run.

    A producer that raced another one to create the file re-checks against the winner's settings.
    """
    entry = {
        "version": plan.version,
        "created_unix": time.time(),
        "run_id": run_id,
        "encoders": plan.encoders,
        "commits_before": commits_before,
        "settings": plan.settings,
    }
    if plan.action == "match":
        return plan.version
    if plan.action == "create":
        if commits_before:
            log.warning(
                "cache %s holds %d commits made before producer settings were recorded; recording this "
                "run's settings as version 1",
                storage.url,
                commits_before,
            )
        doc = {"format": FORMAT, "current": 1, "versions": [entry]}
        if storage.write_exclusive(SETTINGS_FILE, json.dumps(doc, indent=1, sort_keys=True).encode()):
            return 1
        # Another producer created it first: its settings decide.
        again = check_settings(storage, plan.settings, encoders=plan.encoders, new_version=False)
        return again.version
    doc = read_settings(storage)
    current, old = current_settings(doc)
    if not settings_diff(old, plan.settings):
        return current
    entry["version"] = max(int(v["version"]) for v in doc["versions"]) + 1
    doc = dict(doc, current=entry["version"], versions=[*doc["versions"], entry])
    storage.write_atomic(SETTINGS_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())
    log.info("cache %s: started producer settings version %d", storage.url, entry["version"])
    return entry["version"]


__all__ = [
    "SETTINGS_FILE",
    "SettingsError",
    "SettingsPlan",
    "check_settings",
    "read_settings",
    "record_settings",
    "sample_settings",
    "settings_diff",
]
