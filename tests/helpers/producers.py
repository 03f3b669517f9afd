"""Helpers shared by the producer tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from megatron_qwenimage.cache import open_cache, verify_cache

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"


def run_cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `qwenimage ...` in a fresh process (a separate producer)."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_qwenimage.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fault_input(root: Path) -> Path:
    """Six scikit-image photos with captions in `root` (the input of the fault tests)."""
    root.mkdir()
    for name in ("astronaut.png", "camera.png", "coffee.png", "chelsea.png", "horse.png", "rocket.jpg"):
        shutil.copy(SKIMAGE_DATA / name, root / name)
        (root / f"{Path(name).stem}.txt").write_text(f"photo {name}")
    return root


def assert_complete_once(cache_dir: Path, n_inputs: int) -> None:
    """The cache verifies, publishes each of `n_inputs` inputs exactly once, and keeps one attempt per partition."""
    cache = open_cache(str(cache_dir))
    assert verify_cache(cache).ok
    snap = cache.snapshot()
    keys = [(s.bucket.name, sid) for s in snap.shards for sid in s.samples.column("sample_id").to_pylist()]
    assert len(keys) == len(set(keys)), "a sample was published twice"
    uris = {u for s in snap.shards for u in s.samples.column("source_uri").to_pylist()}
    assert len(uris) == n_inputs
    for partition in cache.storage.listdir("attempts"):
        assert len(cache.storage.listdir(f"attempts/{partition}")) == 1, "orphaned attempt left behind"
