"""`qwenimage torchrun`: torchrun whose own log and failure report go to a file, so that a failed
run ends with the training processes' one line (and their exit status), never with torchrun's
``ChildFailedError`` traceback. `qwenimage run`'s consumer and the Slurm consumer job run it.

The training here is either the real ``qwenimage train`` (a config error only the training
processes can see: the run's cache does not exist yet) or a tiny script, to keep the cases cheap.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from launch.local import LocalRun, free_port, last_error_line
from launch.run_config import load_run_spec

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_NOISE = ("ChildFailedError", "Traceback", "torch.distributed.elastic", "SignalException", "OMP_NUM_THREADS")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def _torchrun(tmp: Path, script: str, *flags: str) -> subprocess.Popen:
    (tmp / "child.py").write_text(script)
    argv = [sys.executable, "-m", "megatron_qwenimage.cli", "torchrun", f"--torchrun-log={tmp / 'torchrun.log'}"]
    argv += ["--nproc-per-node=2", f"--master-port={free_port()}", *flags, str(tmp / "child.py")]
    return subprocess.Popen(
        argv, cwd=tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def test_the_run_consumer_fails_with_the_trainings_own_line(tmp_path):
    """`qwenimage run`'s consumer side, started as the run starts it, on a run config whose cache
    does not exist yet (only the training processes look): its log ends with `qwenimage train`'s
    one line, its status is that error's (2), and torchrun's report is in logs/torchrun.log."""
    d = yaml.safe_load((REPO / "examples" / "local.yaml").read_text())
    d["run_dir"], d["cache"] = str(tmp_path / "run"), str(tmp_path / "no-cache")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(d))
    spec = load_run_spec(tmp_path / "run.yaml")
    run = LocalRun(spec)
    run.run_dir.mkdir(parents=True)
    side = run._consumer_side()
    assert side.argv[1:4] == ["-m", "megatron_qwenimage.cli", "torchrun"]
    side.env = {**side.env, **_env()}
    side.start()
    assert side.proc.wait(timeout=300) == 2
    log = side.log_path.read_text()
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert lines[-1].startswith("qwenimage train: error: ") and "no-cache" in lines[-1], log[-3000:]
    assert not any(noise in log for noise in TORCHRUN_NOISE), log[-3000:]
    assert last_error_line(side.log_path) == lines[-1]  # what the run's RunFailed quotes
    report = (tmp_path / "run" / "logs" / "torchrun.log").read_text()
    assert "megatron_qwenimage.cli FAILED" in report and "Root Cause" in report


def test_a_child_error_line_ends_the_console_with_its_status(tmp_path):
    proc = _torchrun(
        tmp_path,
        "import os, sys\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('qwenimage train: error: [rank 1] shard x: unreadable', file=sys.stderr)\n"
        "    sys.exit(1)\n"
        "import time; time.sleep(60)\n",
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.strip().splitlines() == ["qwenimage train: error: [rank 1] shard x: unreadable"], err


def test_a_child_killed_by_a_signal_is_one_line_naming_rank_signal_and_report(tmp_path):
    proc = _torchrun(
        tmp_path,
        "import os, signal, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(60)\n",
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL, err
    [line] = err.strip().splitlines()
    assert line.startswith("qwenimage torchrun: error: rank 1 (local rank 1, pid ") and "killed by SIGKILL" in line
    assert line.endswith(f"torchrun's report: {tmp_path / 'torchrun.log'}")
    assert "Root Cause" in (tmp_path / "torchrun.log").read_text()


def test_sigterm_stops_torchrun_and_the_training_without_a_traceback(tmp_path):
    proc = _torchrun(
        tmp_path,
        "import os, signal, sys, time\n"
        "def stop(*_):\n"
        "    if os.environ['RANK'] == '0':\n"
        "        print('qwenimage train: stopped by SIGTERM; committed work is kept, rerun to resume', file=sys.stderr)\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "open(f\"ready-{os.environ['RANK']}\", 'w').close()\n"
        "time.sleep(60)\n",
    )
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun: it stops the training processes
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "qwenimage train: stopped by SIGTERM; committed work is kept, rerun to resume"
    ], err
