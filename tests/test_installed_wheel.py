"""The package works as an installed wheel, not only from this checkout.

A wheel is built from a copy of the checkout and installed (not editable, without dependencies:
the venv sees this interpreter's site-packages for torch, Ray and the rest) into a fresh venv. From
a directory outside the checkout, with no ``PYTHONPATH``, its ``qwenimage``:

* plans 64 H200 with the measured GPU rates, which ship as package data
  (``megatron_qwenimage/gpu_results``): a checkout-relative path would leave a wheel without them;
* renders examples/job.yaml's Slurm jobs (``--dry-run --offline``), whose time-limit check asks the
  planner for the 20B step time on H200;
* runs a tiny ``qwenimage run`` (producers on embedded Ray and a torchrun consumer, both started
  by the installed package) to its last step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
#: Left out of the copy the wheel is built from: anywhere, and (run outputs) at the top only, since
#: ``megatron_qwenimage/cache`` is a package.
IGNORE_ANYWHERE = shutil.ignore_patterns(".git", "*.egg-info", "__pycache__", ".pytest_cache")
IGNORE_AT_TOP = {"build", "dist", "cache", "runs"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    ignored = set(IGNORE_ANYWHERE(directory, names))
    if Path(directory) == REPO:
        ignored |= IGNORE_AT_TOP & set(names)
    return ignored


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this checkout; returns its ``bin`` directory."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(root)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = root.glob("megatron_qwenimage-*.whl")
    for package in ("megatron_qwenimage", "producers", "consumers", "launch"):  # every subpackage is in it
        expected = {str(p.parent.relative_to(REPO)) for p in (REPO / package).rglob("__init__.py")}
        listed = subprocess.run(
            [sys.executable, "-m", "zipfile", "-l", str(wheel)], check=True, capture_output=True, text=True
        ).stdout
        missing = [d for d in expected if f"{d}/__init__.py" not in listed]
        assert not missing, f"the wheel lacks {missing}"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], check=True)
    bin_dir = root / "venv" / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    return bin_dir


def _outside(tmp_path: Path) -> dict:
    """Environment of a command run outside the checkout: no PYTHONPATH, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", HOME=os.environ.get("HOME", str(tmp_path)))
    return env


def _run(venv: Path, tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = _outside(tmp_path)
    env["PATH"] = f"{venv}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [str(venv / "qwenimage"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_installed_package_is_the_wheel_not_the_checkout(venv, tmp_path):
    code = "import consumers, launch, megatron_qwenimage, producers; print(megatron_qwenimage.__file__, consumers.__file__)"
    out = subprocess.run(
        [str(venv / "python"), "-c", code], cwd=tmp_path, env=_outside(tmp_path), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    paths = out.stdout.split()
    assert all(str(venv.parent) in p and str(REPO) not in p for p in paths), paths


def test_plan_reads_the_measured_rates_shipped_in_the_wheel(venv, tmp_path):
    out = _run(venv, tmp_path, "plan", "--gpus", "64", "--gpu", "h200", "--resolution-mix", "1024:1", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rates = json.loads(out.stdout)["rates"]
    assert rates["source"].startswith("measured on NVIDIA H200"), rates["source"]
    assert "gpu_results/" in rates["source"] and rates["scale"] == 1.0


def test_launch_slurm_dry_run(venv, tmp_path):
    job = yaml.safe_load((REPO / "examples" / "job.yaml").read_text())
    job["run_dir"] = str(tmp_path / "exp1")
    train = tmp_path / "train.yaml"
    shutil.copy(REPO / job["consumer"]["config"], train)
    job["consumer"]["config"] = str(train)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    out = _run(venv, tmp_path, "launch", "slurm", "job.yaml", "--dry-run", "--offline")
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    assert "#SBATCH" in out.stdout, out.stdout[-2000:]


def test_a_tiny_run_to_its_last_step(venv, tmp_path):
    steps = 4
    d = yaml.safe_load((REPO / "examples" / "local.yaml").read_text())
    d["run_dir"] = str(tmp_path / "run")
    d["cache"] = str(tmp_path / "cache")
    d["producer"]["bundled"] = {"text_renders": 16, "edit_pairs": 2, "seed": 0}
    d["producer"]["snapshot_interval_s"] = 2
    d["consumer"]["config"]["schedule"]["train_steps"] = steps
    d["consumer"]["config"]["checkpoint"]["interval"] = steps
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(d))
    out = _run(venv, tmp_path, "run", "run.yaml", timeout=600)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == steps, records[-3:]
