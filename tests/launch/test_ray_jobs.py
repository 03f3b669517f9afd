"""`qwenimage launch ray`: the producers as a Ray Job on a real `ray start --head` (127.0.0.1 only;
`tests.helpers.ray_head`: private temp dir, free ports, stopped by killing its own process tree)."""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import pytest
import yaml

from launch.job_spec import job_spec_from_dict
from launch.ray_jobs import (
    RayJobFailed,
    add_ray_arguments,
    build_submission,
    last_error_line,
    producer_argv,
    run_ray,
)
from megatron_qwenimage.cli import report_user_error
from megatron_qwenimage.config import ConfigError
from tests.helpers.ray_head import free_port
from tests.helpers.ray_head import ray_head as start_ray_head

REPO = Path(__file__).resolve().parents[2]
LOCAL = yaml.safe_load((REPO / "examples" / "local.yaml").read_text())


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 (free ports, 4 CPUs, no auth); yields the Jobs API URL."""
    with start_ray_head(num_cpus=4) as head:
        yield head.dashboard_url


def _job(tmp_path: Path, input_spec: str) -> Path:
    """A tiny job spec: 16 synthetic captions, tiny encoders on CPU, a 1-process consumer config."""
    consumer = copy.deepcopy(LOCAL["consumer"]["config"])
    consumer["parallel"] = {"tp": 1, "pp": 1, "sequence_parallel": False}
    spec = {
        "name": "rayjob",
        "cache": str(tmp_path / "cache"),
        "run_dir": str(tmp_path / "run"),
        "create_cache": True,
        "producer": {
            "nodes": 1,
            "gpus_per_node": 0,
            "env": {
                "vars": {
                    "QWENIMAGE_TINY_ENCODERS_DIR": str(tmp_path / "tiny-encoders"),
                    "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                }
            },
            "options": {"input": input_spec, "encoders": "tiny", "partition_size": 8, "metrics_port": -1},
        },
        "consumer": {"nodes": 1, "gpus_per_node": 0, "config": consumer},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_ray_arguments(parser)
    return parser.parse_args(list(argv))


def test_tiny_producer_job_succeeds_and_the_cache_verifies(ray_head, tmp_path, capsys):
    from megatron_qwenimage.cache import open_cache, verify_cache

    job = _job(tmp_path, "synthetic:text?n=16&seed=0")
    assert run_ray(_args(str(job), "--address", ray_head, "--poll-interval", "0.5", "--timeout", "300")) == 0
    out = capsys.readouterr()
    [line] = out.out.strip().splitlines()
    assert line.startswith("Ray job qwenimage-rayjob-produce-") and " SUCCEEDED (logs: " in line, line
    job_id = line.split()[2]
    log = tmp_path / "run" / "logs" / f"ray-job-{job_id}.log"
    assert log.is_file() and "16 inputs: 16 committed" in log.read_text()
    assert "--ray-address auto" in out.err and "Connecting to existing Ray cluster" in log.read_text()
    report = verify_cache(open_cache(str(tmp_path / "cache")))
    assert report.ok and report.inputs == 16 and report.committed == 16


def test_a_missing_input_fails_the_job_and_says_so_in_one_line(ray_head, tmp_path, capsys):
    missing = tmp_path / "no-such-input"
    job = _job(tmp_path, str(missing))
    with pytest.raises(RayJobFailed) as info:
        run_ray(_args(str(job), "--address", ray_head, "--poll-interval", "0.5", "--timeout", "120"))
    capsys.readouterr()
    report_user_error("launch", info.value, as_json=False, debug=False)  # as the CLI prints it
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("qwenimage launch: error: Ray job qwenimage-rayjob-produce-") and " FAILED: " in line
    assert f"qwenimage produce: error: --input {missing}: does not exist" in line, line
    assert info.value.exit_code == 1
    assert list((tmp_path / "run" / "logs").glob("ray-job-*.log"))  # its logs are kept


def test_no_wait_prints_the_submission_id(ray_head, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    job = _job(tmp_path, str(tmp_path / "absent"))
    assert run_ray(_args(str(job), "--address", ray_head, "--no-wait", "--submission-id", "nowait-1")) == 0
    assert capsys.readouterr().out.strip() == "nowait-1"
    client = JobSubmissionClient(ray_head)
    deadline = time.monotonic() + 120
    while not client.get_job_status("nowait-1").is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status("nowait-1").value == "FAILED"


def test_an_unreachable_address_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    job = _job(tmp_path, "synthetic:text?n=16&seed=0")
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError) as info:
        run_ray(_args(str(job), "--address", address))
    message = str(info.value)
    assert message.startswith(f"--address {address}: no Ray Jobs API answers there") and "\n" not in message
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="^--address: missing"):
        run_ray(_args(str(job)))


def test_the_submission_joins_the_cluster_and_carries_the_environment(tmp_path):
    d = yaml.safe_load(_job(tmp_path, "synthetic:text?n=4").read_text())
    d["producer"]["env"]["activate"] = "source /opt/venv/bin/activate"
    spec = job_spec_from_dict(d, check_paths=False, check_ray=False)
    argv = producer_argv(spec)
    assert argv[argv.index("--ray-address") + 1] == "auto" and argv.count("--ray-address") == 1
    assert argv[argv.index("--output") + 1] == str(tmp_path / "cache")
    sub = build_submission(spec)
    assert sub["entrypoint"].startswith("source /opt/venv/bin/activate && qwenimage produce --input ")
    assert sub["runtime_env"] == {"env_vars": d["producer"]["env"]["vars"]}
    assert sub["metadata"]["qwenimage_run"] == "rayjob"
    uploaded = build_submission(spec, working_dir=str(REPO))
    assert " && python -m megatron_qwenimage.cli produce " in uploaded["entrypoint"]
    assert uploaded["runtime_env"]["working_dir"] == str(REPO) and ".git" in uploaded["runtime_env"]["excludes"]


def test_last_error_line_prefers_the_command_error():
    logs = (
        "2026-11-30 04:14:34,672\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
        "[2026-11-30 04:14:05,286 E 22638 22638] core_worker.cc:2465: Actor with class name ...\n"
        "qwenimage produce: error: --input /x: does not exist\n"
        "\x1b[33m2026-11-30 WARNING worker.py: shutting down, no error here\x1b[0m\n"
    )
    assert last_error_line(logs) == "qwenimage produce: error: --input /x: does not exist"
    assert last_error_line("Traceback (most recent call last):\n  ...\nValueError: bad\nbye\n") == "ValueError: bad"
    assert last_error_line("just this\n") == "just this" and last_error_line("") is None
