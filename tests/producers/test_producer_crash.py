"""A producer SIGKILLed from outside between writing a partition and committing it loses nothing.

`qwenimage produce` runs on its embedded local Ray (so Ray's processes are its descendants); the
test watches the cache and SIGKILLs the whole process tree the moment an attempt's files are all
written (its ``duplicates.parquet``, the last table, exists) while its commit record does not. The
same command rerun must then commit every input exactly once (no duplicate, no loss), sweep the
dead attempt, and leave a cache that verifies. No hook inside the producer knows about the kill.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.producers import assert_complete_once, fault_input

REPO = Path(__file__).resolve().parents[2]


def _args(src: Path, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megatron_qwenimage.cli",
        "produce",
        "--input",
        str(src),
        "--output",
        str(cache),
        "--buckets",
        "64",
        "--partition-size",
        "2",
        "--json",
        "--no-progress",
        "--metrics-port",
        "-1",
        "--sweep-grace",
        "0",
        "--local-num-cpus",
        "4",
    ]


def _written_not_committed(cache: Path) -> bool:
    for done in cache.glob("attempts/*/*/duplicates.parquet"):
        partition = done.parent.parent.name
        if not (cache / "commits" / f"{partition}.json").exists():
            return True
    return False


def _kill_tree(proc: subprocess.Popen) -> None:
    tree = [psutil.Process(proc.pid)]
    tree += tree[0].children(recursive=True)
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=60)
    proc.communicate(timeout=60)


def test_kill_between_write_and_commit_then_rerun_commits_each_input_once(producer_env, tmp_path):
    src = fault_input(tmp_path / "in")
    for attempt in range(3):  # the window is milliseconds wide; a loaded machine may miss it
        cache = tmp_path / f"cache{attempt}"
        proc = subprocess.Popen(
            _args(src, cache), cwd=REPO, env=producer_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline, hit = time.monotonic() + 240, False
        while time.monotonic() < deadline and proc.poll() is None:
            if _written_not_committed(cache):
                _kill_tree(proc)
                hit = True
                break
            time.sleep(0.0005)
        if hit:
            break
        if proc.poll() is None:
            _kill_tree(proc)
        proc.communicate(timeout=60)
    else:
        pytest.fail("three produce runs committed every partition before the kill point")
    committed_before = {p.stem for p in (cache / "commits").glob("*.json")}
    assert len(committed_before) < 3
    rerun = subprocess.run(_args(src, cache), cwd=REPO, env=producer_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (summary["inputs"], summary["committed"], summary["partitions_skipped"]) == (6, 6, len(committed_before))
    assert_complete_once(cache, 6)
    assert not any(
        p.info["cmdline"] and "raylet" in " ".join(p.info["cmdline"]) and str(cache) in " ".join(p.info["cmdline"])
        for p in psutil.process_iter(["cmdline"])
    )
