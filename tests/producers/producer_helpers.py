"""Helpers shared by the producer tests (imported by name: tests/ has no __init__.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
