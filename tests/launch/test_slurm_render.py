"""`qwenimage launch slurm` without a Slurm: the rendered scripts, --dry-run, submission, --resume
--nodes, status and cancel against fake ``sbatch`` / ``scontrol`` / ``scancel`` on PATH, and the
job spec's one-line errors (nothing is submitted when the spec is wrong)."""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import slurm
from launch.job_spec import EXIT_MARGIN_S
from megatron_qwenimage.cli import build_parser, main
from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.errors import UserError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "job.yaml").read_text())


def _tiny_config() -> dict:
    return {
        "model": {"name": "tiny-16ch", "num_layers": 2},
        "parallel": {"tp": 2},
        "optimizer": {"lr": 1.0e-3, "warmup_steps": 2},
        "data": {"stages": [{"name": "s", "buckets": ["64x64"], "micro_batch": 1, "global_batch": 4}]},
        "schedule": {"train_steps": 8},
        "checkpoint": {"interval": 4},
    }


def _tiny(tmp: Path, **changes) -> dict:
    """A CPU job spec on a cache directory that exists; `changes`: dotted keys -> values (None deletes)."""
    (tmp / "cache").mkdir(exist_ok=True)
    d = {
        "name": "t1",
        "cache": str(tmp / "cache"),
        "run_dir": str(tmp / "run"),
        "producer": {
            "nodes": 2,
            "gpus_per_node": 0,
            "ray_port": 7000,
            "env": {"activate": "source /opt/venv/bin/activate", "vars": {"RAY_AUTH_MODE": "disabled"}},
            "options": {"input": "synthetic:text?n=8", "encoders": "tiny", "buckets": "64"},
        },
        "consumer": {
            "nodes": 1,
            "gpus_per_node": 0,
            "procs_per_node": 4,
            "cpus_per_task": 4,
            "master_port": 29999,
            "time": "00:30:00",
            "signal_before_s": 90,
            "max_restarts": 3,
            "env": {"activate": "source /opt/venv/bin/activate", "vars": {"HF_HOME": "/scratch/hf cache"}},
            "config": _tiny_config(),
        },
    }
    for key, value in changes.items():
        *path, last = key.split(".")
        node = d
        for part in path:
            node = node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return d


def _write(tmp: Path, d: dict, name: str = "job.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _example(tmp: Path) -> Path:
    """examples/job.yaml with its run_dir under `tmp` (its cache is a cluster path: --offline)."""
    d = copy.deepcopy(EXAMPLE)
    d["run_dir"] = str(tmp / "exp1")
    d["consumer"]["config"] = str(REPO / d["consumer"]["config"])
    return _write(tmp, d, "exp1.yaml")


# ------------------------------------------------------------------------------------------- fakes
FAKE_SBATCH = """#!/bin/bash
echo "$@" >> "{log}"
n=$(grep -c -e --parsable "{log}")
echo "$((1000 + n));testcluster"
"""
FAILING = """#!/bin/bash
echo "$0 $@" >> "{log}"
echo "must not be called" >&2
exit 1
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol show job -o ID: the state from {states}/ID (JobState=...), else unknown
id="${{@: -1}}"
echo "scontrol $@" >> "{log}"
if [ -f "{states}/$id" ]; then
    state=$(head -n 1 "{states}/$id")
    [ -f "{states}/$id.next" ] && mv "{states}/$id.next" "{states}/$id"
    echo "JobId=$id JobName=x JobState=$state Reason=None Restarts=1 RunTime=00:01:00 TimeLimit=00:30:00 NodeList=n1"
    exit 0
fi
echo "slurm_load_jobs error: Invalid job id specified" >&2
exit 1
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $@" >> "{log}"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake sbatch / scontrol / scancel first on PATH; returns (bin dir, log file, states dir)."""
    bin_dir, states, log = tmp_path / "bin", tmp_path / "states", tmp_path / "calls.log"
    bin_dir.mkdir()
    states.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text.format(log=log, states=states))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir, log, states


def _launch(*argv: str) -> int:
    args = build_parser().parse_args(["launch", *argv])
    return args.func(args)


# ------------------------------------------------------------------------------------------- render
def _bash_n(text: str, tmp: Path) -> None:
    path = tmp / "check.sh"
    path.write_text(text)
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_example_producer_script_starts_ray_over_the_allocation_and_produces(tmp_path):
    spec = slurm.prepare_spec(_example(tmp_path), check_paths=False, check_ray=False)
    text = slurm.render_producer_script(spec, cwd="/home/me/qwenimage")
    _bash_n(text, tmp_path)
    lines = text.splitlines()
    sbatch = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=qwenimage-exp1-producer",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=08:00:00",
        f"#SBATCH --output={tmp_path}/exp1/logs/slurm-producer-%j.out",
    ]
    srun = next(ln for ln in lines if ln.startswith("SRUN=("))
    for flag in (
        "--overlap",
        "--cpus-per-task=64",
        "--container-image=nvcr.io/acme/qwenimage:latest",
        "--container-mounts=/lustre:/lustre,/data:/data",
        "--container-name=qwenimage-producer",
    ):
        assert flag in srun
    assert "source " not in text and "PYTHONPATH" not in text  # the container has the environment
    head = text.split("--job-name=ray-head")[1].split("\n", 2)[1]
    assert "ray start --head --port=6379 --ray-client-server-port=6380 --node-manager-port=6381" in head
    assert "--num-cpus=64 --num-gpus=8" in head and '--node-ip-address="$HEAD_IP"' in head
    assert '--nodes=$((SLURM_NNODES - 1)) --exclude="$HEAD_NODE" --job-name=ray-workers' in text
    assert '--address="$QWENIMAGE_RAY_ADDRESS"' in text
    assert 'ray status --address="$QWENIMAGE_RAY_ADDRESS"' in text and "deadline=$((SECONDS + 300))" in text
    assert "trap stop_ray EXIT" in text and 'scancel --signal=TERM "$SLURM_JOB_ID"' in text
    produce = text.split("--job-name=produce")[1]
    assert "python3 -m megatron_qwenimage.cli produce --input /lustre/raw/laion-aesthetic" in produce
    assert "--output /data/qwen-image/t2i-latents --run-label exp1" in produce
    assert "--vae-actors 8:16" in produce and '--ray-address "$QWENIMAGE_RAY_ADDRESS"' in produce


def test_example_consumer_script_requeues_on_sigterm_within_the_restart_budget(tmp_path):
    spec = slurm.prepare_spec(_example(tmp_path), check_paths=False, check_ray=False)
    text = slurm.render_consumer_script(spec, cwd="/home/me/qwenimage")
    _bash_n(text, tmp_path)
    sbatch = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=qwenimage-exp1-consumer",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@180",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/exp1/logs/slurm-consumer-%j.out",
    ]
    assert "# One torchrun per node, 8 process(es) each: tp=4 x pp=1 x dp=8 = 32 ranks." in text
    train = next(ln for ln in text.splitlines() if "--job-name=train" in ln)
    assert train.startswith('    "${SRUN[@]}" --nodes="$SLURM_NNODES" --job-name=train bash -c ')
    for part in (
        "exec python3 -m megatron_qwenimage.cli torchrun",
        '--nnodes="$SLURM_NNODES"',
        '--node-rank="$SLURM_NODEID"',
        '--master-addr="$QWENIMAGE_MASTER_ADDR"',
        "--nproc-per-node=8",
        "--master-port=29500",
        f"--shutdown-timeout={180 - EXIT_MARGIN_S}",
        f"-m megatron_qwenimage.cli train --config {tmp_path}/exp1/slurm/train.yaml",
    ):
        assert part in train
    assert "--container-image=nvcr.io/acme/qwenimage:latest" in text
    # SIGTERM: the steps get it (not srun: it would SIGKILL them), then the requeue within the budget
    assert "trap on_term TERM" in text and 'scancel --signal=TERM "$SLURM_JOB_ID"' in text
    assert 'RESTARTS="${SLURM_RESTART_COUNT:-0}"' in text and "MAX_RESTARTS=10" in text
    assert 'if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then' in text
    assert 'scontrol requeue "$SLURM_JOB_ID" && exit 0' in text
    assert "wait-for-cache" in text and "/data/qwen-image/t2i-latents 5 &" in text


def test_environment_activation_and_cpu_processes(tmp_path):
    spec = slurm.prepare_spec(_write(tmp_path, _tiny(tmp_path)))
    consumer = slurm.render_consumer_script(spec, cwd=str(tmp_path))
    producer = slurm.render_producer_script(spec, cwd=str(tmp_path))
    for text in (consumer, producer):
        _bash_n(text, tmp_path)
        assert "container" not in text
        assert "set +u  # activation scripts read unset variables\nsource /opt/venv/bin/activate\nset -u" in text
        assert f"export PYTHONPATH={REPO}" in text and f"cd {tmp_path}" in text
    assert "export HF_HOME='/scratch/hf cache'" in consumer
    assert "export RAY_AUTH_MODE=disabled" in producer
    assert "#SBATCH --gpus-per-node" not in consumer and "#SBATCH --cpus-per-task=4" in consumer
    assert "--nproc-per-node=4" in consumer and "--master-port=29999" in consumer and "MAX_RESTARTS=3" in consumer
    assert "#SBATCH --signal=B:TERM@90" in consumer and f"--shutdown-timeout={90 - EXIT_MARGIN_S}" in consumer
    assert "exec python3 -m megatron_qwenimage.cli torchrun" in consumer  # the activated environment's python
    assert "--num-gpus" not in producer and "--port=7000" in producer and "--runtime-env-agent-port=7007" in producer


@pytest.mark.parametrize("signal_before_s", [EXIT_MARGIN_S + 1, 90, 3600])
def test_torchrun_stops_the_training_before_the_signal_lead_runs_out(tmp_path, signal_before_s):
    """Slurm signals `signal_before_s` before the time limit; torchrun then gives the training that
    less EXIT_MARGIN_S to finish its step and save (--shutdown-timeout), strictly less than the lead,
    so that torchrun, the step and the requeue are done before the time limit kills the job."""
    d = _tiny(tmp_path, **{"consumer.signal_before_s": signal_before_s, "consumer.time": "02:00:00"})
    spec = slurm.prepare_spec(_write(tmp_path, d))
    text = slurm.render_consumer_script(spec, cwd=str(tmp_path))
    lead = int(re.search(r"^#SBATCH --signal=B:TERM@(\d+)$", text, re.M)[1])
    [timeout] = [int(t) for t in re.findall(r"--shutdown-timeout=(\d+)", text)]
    assert lead == signal_before_s
    assert timeout == lead - EXIT_MARGIN_S and 0 < timeout < lead
    assert f"(torchrun gives them {timeout} s, the\n# last {EXIT_MARGIN_S} s are for the job to end)" in text


def test_each_node_runs_qwenimage_torchrun_with_its_own_log_under_the_run(tmp_path):
    """The train step is `qwenimage torchrun` (its own report to a log file, so the job's output ends
    with the training's one line): the rendered command, as bash expands it on node 1 of job 7,
    is a valid `qwenimage torchrun` command line."""
    spec = slurm.prepare_spec(_write(tmp_path, _tiny(tmp_path)))
    command = slurm.torchrun_command(spec, slurm.train_config_path(spec))
    assert command.startswith("exec ")
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_NODEID": "1", "SLURM_NNODES": "2", "QWENIMAGE_MASTER_ADDR": "h0"}
    printed = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + command[len("exec ") :]], env=env, capture_output=True, text=True, check=True
    )
    argv = printed.stdout.splitlines()
    assert argv[:4] == [slurm.python_for(spec.consumer.resources), "-m", "megatron_qwenimage.cli", "torchrun"]
    args = build_parser().parse_args(argv[3:])
    from launch.torchrun import run_torchrun

    assert args.func is run_torchrun
    assert args.torchrun_log == str(Path(spec.run.logs_dir) / "torchrun-7-node1.log")
    assert (args.nnodes, args.node_rank, args.master_addr, args.nproc_per_node) == ("2", 1, "h0", "4")
    assert args.shutdown_timeout == 90 - EXIT_MARGIN_S
    assert args.module and args.training_script == "megatron_qwenimage.cli"
    assert args.training_script_args == ["train", "--config", str(slurm.train_config_path(spec))]


@pytest.mark.parametrize(
    "job_cache, config_cache",
    [("cache", "cache"), ("cache", "./cache/"), ("./cache", "ABS"), ("ABS", "cache"), ("cache/../cache", "cache")],
)
def test_the_jobs_cache_named_by_a_relative_path_in_the_consumer_config_is_the_same_cache(
    tmp_path, monkeypatch, capsys, job_cache, config_cache
):
    """Relative paths mean what they mean to every command here: relative to the working directory
    (the jobs cd there). Both sides are resolved before they are compared, however written."""
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "cache")
    config = _tiny_config()
    config["data"]["caches"] = [{"path": absolute if config_cache == "ABS" else config_cache, "mode": "tail"}]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    d = _tiny(tmp_path, **{"cache": absolute if job_cache == "ABS" else job_cache, "consumer.config": "train.yaml"})
    path = _write(tmp_path, d)
    assert _launch("slurm", str(path), "--dry-run") == 0
    assert f"{absolute} 5 &" in capsys.readouterr().out  # the consumer job waits for that cache
    # Another directory is still refused, in one line naming the key.
    config["data"]["caches"] = [{"path": "other-cache", "mode": "tail"}]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"^consumer.config.data.caches=.*must read the run's cache"):
        _launch("slurm", str(path), "--dry-run")


def test_a_layout_error_reads_well_and_names_the_keys_that_set_the_world(tmp_path, capsys):
    path = _write(tmp_path, _tiny(tmp_path, **{"consumer.procs_per_node": 3}))
    assert main(["launch", "slurm", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "qwenimage launch slurm: error: consumer.nodes=1 x consumer.procs_per_node=3 = 3 ranks does not fit "
        "consumer.config.parallel: world size 3 is not divisible by tp*pp = 2*1 = 2 (parallel.tp x parallel.pp); "
        "launch a multiple of 2 ranks (torchrun --nproc-per-node) or change them\n"
    )
    assert not (tmp_path / "run").exists()


def test_external_ray_address_runs_only_the_driver(tmp_path):
    with socket.socket() as server:  # something that answers, as a Ray head would
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        spec = slurm.prepare_spec(
            _write(tmp_path, _tiny(tmp_path, **{"producer.ray_address": address, "producer.nodes": 1}))
        )
    text = slurm.render_producer_script(spec, cwd=str(tmp_path))
    _bash_n(text, tmp_path)
    assert "ray start" not in text and "#SBATCH --nodes=1" in text
    assert f"export QWENIMAGE_RAY_ADDRESS={address}" in text and '--ray-address "$QWENIMAGE_RAY_ADDRESS"' in text


# ------------------------------------------------------------------------------------------- CLI
def test_dry_run_prints_both_scripts_and_submits_nothing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "scancel", "scontrol"):
        (bin_dir / name).write_text(FAILING.format(log=tmp_path / "called"))
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_qwenimage.cli",
            "launch",
            "slurm",
            str(_example(tmp_path)),
            "--dry-run",
            "--offline",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "called").exists()  # no Slurm command ran
    assert not (tmp_path / "exp1").exists()  # nothing written
    text = out.stdout
    assert f"# {tmp_path}/exp1/slurm/producer.sbatch\n#!/bin/bash" in text
    assert f"# {tmp_path}/exp1/slurm/consumer.sbatch\n#!/bin/bash" in text
    assert f"# {tmp_path}/exp1/slurm/train.yaml" in text and "model: qwen-image-20b" in text
    assert f"$ sbatch --parsable {tmp_path}/exp1/slurm/producer.sbatch" in text
    assert (
        f"$ sbatch --parsable '--dependency=after:<producer job id>' --kill-on-invalid-dep=yes "
        f"{tmp_path}/exp1/slurm/consumer.sbatch" in text
    )


def test_submit_writes_scripts_and_job_ids_and_the_consumer_depends_on_the_producer(tmp_path, fake_slurm, capsys):
    _, log, _ = fake_slurm
    path = _write(tmp_path, _tiny(tmp_path))
    assert _launch("slurm", str(path)) == 0
    calls = log.read_text().splitlines()
    run = tmp_path / "run"
    assert calls == [
        f"--parsable {run}/slurm/producer.sbatch",
        f"--parsable --dependency=after:1001 --kill-on-invalid-dep=yes {run}/slurm/consumer.sbatch",
    ]
    record = json.loads((run / "launch.json").read_text())
    assert record["producer"]["job_id"] == "1001" and record["consumer"]["job_id"] == "1002"
    assert record["backend"] == "slurm" and record["run_dir"] == str(run)
    assert (run / "slurm" / "producer.sbatch").read_text().startswith("#!/bin/bash")
    config = yaml.safe_load((run / "slurm" / "train.yaml").read_text())
    assert config["checkpoint"]["dir"] == str(run / "checkpoints") and config["logging"]["dir"] == str(run)
    assert (run / "logs").is_dir()  # Slurm writes its output there, it does not create the directory
    assert "producer job 1001" in capsys.readouterr().out


def test_an_autoscale_section_runs_the_controller_in_the_producer_job(tmp_path, fake_slurm):
    section = {"low_s": 600, "high_s": 3600, "actuator": "pools", "cooldown_s": 120}
    path = _write(tmp_path, _tiny(tmp_path, **{"producer.autoscale": section, "producer.options.vae_actors": "1:4"}))
    assert _launch("slurm", str(path)) == 0
    run = tmp_path / "run"
    text = (run / "slurm" / "producer.sbatch").read_text()
    _bash_n(text, tmp_path)
    step = text.split("--job-name=autoscale")[1].split("\n", 2)[1]
    assert step.strip().startswith("python3 -m megatron_qwenimage.cli launch autoscale ")
    assert f'autoscale {run}/slurm/job.yaml --head-address "$QWENIMAGE_RAY_ADDRESS" &' in step
    # after the cluster is up (the controller may name its head), before the producers start
    assert text.index("Ray cluster up at") < text.index("--job-name=autoscale") < text.index("--job-name=produce")
    # what the step reads: the same job, paths absolute, the run config inline with the run's paths
    from launch.autoscale_settings import resolve
    from launch.job_spec import load_job_spec

    spec = load_job_spec(run / "slurm" / "job.yaml")
    assert (spec.run.run_dir, spec.run.cache, spec.producer.autoscale) == (str(run), str(tmp_path / "cache"), section)
    assert spec.run.consumer.config["checkpoint"]["dir"] == str(run / "checkpoints")
    values, policy = resolve(None, spec)
    assert (policy.low_s, policy.high_s, policy.min_size, policy.max_size, policy.cooldown_s) == (600, 3600, 1, 4, 120)
    # without the section: no controller, no job.yaml
    other = tmp_path / "other"
    other.mkdir()
    assert _launch("slurm", str(_write(other, _tiny(other)))) == 0
    assert "--job-name=autoscale" not in (other / "run" / "slurm" / "producer.sbatch").read_text()
    assert not (other / "run" / "slurm" / "job.yaml").exists()


def test_resume_with_more_nodes_stops_the_running_consumer_and_recomputes_dp(tmp_path, fake_slurm, capsys):
    _, log, states = fake_slurm
    path = _write(tmp_path, _tiny(tmp_path, **{"consumer.config.parallel": {"tp": 2, "dp": 2}}))
    assert _launch("slurm", str(path)) == 0
    (states / "1002").write_text("RUNNING\n")  # the consumer runs; after the SIGTERM it has ended
    (states / "1002.next").write_text("FAILED\n")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "COMMITTED").write_text("{}")
    assert _launch("slurm", str(path), "--resume", "--nodes", "2") == 0
    calls = log.read_text().splitlines()
    assert "scancel --signal=TERM 1002" in calls  # its steps: the trainer saves, the batch script does not requeue
    assert calls[-1] == f"--parsable {tmp_path}/run/slurm/consumer.sbatch"  # no producer, no dependency
    script = (tmp_path / "run" / "slurm" / "consumer.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "tp=2 x pp=1 x dp=4 = 8 ranks" in script
    config = yaml.safe_load((tmp_path / "run" / "slurm" / "train.yaml").read_text())
    assert config["parallel"] == {"tp": 2}  # dp is recomputed from the world
    record = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert record["consumer"]["job_id"] == "1003" and record["consumer"]["nodes"] == 2
    assert [c["job_id"] for c in record["consumer_history"]] == ["1002"] and record["producer"]["job_id"] == "1001"
    out = capsys.readouterr().out
    assert "consumer job 1002: FAILED" in out and "resumes from checkpoint step 4" in out


def test_resume_to_a_world_the_layout_does_not_fit_is_one_line(tmp_path, fake_slurm):
    _, log, _ = fake_slurm
    d = _tiny(tmp_path)
    d["consumer"]["config"]["data"]["stages"][0]["global_batch"] = 2  # dp 2 fits, dp 4 does not
    path = _write(tmp_path, d)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "launch.json").write_text(json.dumps({"consumer": {"job_id": "7"}}))
    with pytest.raises(ConfigError) as err:
        _launch("slurm", str(path), "--resume", "--nodes", "2")
    message = str(err.value)
    assert "\n" not in message and "global_batch=2" in message and "dp=4" in message and "--nodes 2" in message
    assert not log.exists()


def test_resume_without_a_launch_record_says_so(tmp_path, fake_slurm):
    with pytest.raises(ConfigError, match="nothing was launched for this job spec"):
        _launch("slurm", str(_write(tmp_path, _tiny(tmp_path))), "--resume")


def test_status_and_cancel(tmp_path, fake_slurm, capsys):
    _, log, states = fake_slurm
    path = _write(tmp_path, _tiny(tmp_path))
    assert _launch("slurm", str(path)) == 0
    (states / "1001").write_text("COMPLETED\n")
    (states / "1002").write_text("RUNNING\n")
    run = tmp_path / "run"
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss": 0.25}) + "\n" + json.dumps({"event": "validation", "step": 5}) + "\n"
    )
    capsys.readouterr()
    assert _launch("status", str(path), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["producer"]["state"] == "COMPLETED" and info["consumer"]["state"] == "RUNNING"
    assert info["consumer"]["restarts"] == 1 and info["consumer"]["max_restarts"] == 3
    assert info["training"] == {"step": 5, "loss": 0.25, "train_steps": 8, "checkpoint_step": None}
    assert _launch("status", str(path)) == 0
    text = capsys.readouterr().out
    assert "consumer  job 1002  RUNNING" in text and "restarts 1 of at most 3" in text
    assert "training  step 5 of 8, loss 0.25; latest checkpoint: none" in text

    assert _launch("cancel", str(path)) == 0
    assert log.read_text().splitlines()[-1] == "scancel 1002"  # the finished producer is left alone
    assert "cancelled_unix" in json.loads((run / "launch.json").read_text())


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "changes,needle",
    [
        (
            {"consumer.step_time_s": 600.0},  # 4 steps x 600 s + 90 s > 30 min
            "consumer.time='00:30:00' (1800 s) is shorter than one checkpoint interval",
        ),
        (
            {"consumer.config.parallel": {"tp": 2, "dp": 3}},
            "consumer.nodes=1 x consumer.procs_per_node=4 = 4 ranks does not fit consumer.config.parallel: "
            "parallel.dp=3 but world size 4 / (tp*pp=2) = 2",
        ),
        (
            {"consumer.gpus_per_node": 3, "consumer.procs_per_node": None},
            "consumer.nodes=1 x consumer.gpus_per_node=3 = 3 ranks does not fit consumer.config.parallel: world size "
            "3 is not divisible by tp*pp = 2*1 = 2 (parallel.tp x parallel.pp); launch a multiple of 2 ranks "
            "(torchrun --nproc-per-node) or change them",
        ),
        (
            {"consumer.signal_before_s": EXIT_MARGIN_S},
            f"consumer.signal_before_s={EXIT_MARGIN_S}: expected more than {EXIT_MARGIN_S} s",
        ),
        (
            {"consumer.step_time_s": 100, "consumer.time": "02:00:00"},
            "consumer.signal_before_s=90 leaves the training 70 s from SIGTERM to finish its step and save",
        ),
        ({"consumer.gpus_per_node": 8}, "consumer.procs_per_node=4: one training process per GPU"),
        ({"cache": "/nonexistent/qwenimage-cache"}, "cache='/nonexistent/qwenimage-cache' does not exist"),
        ({"consumer.signal_before_s": 1800}, "consumer.signal_before_s=1800 is not shorter than consumer.time"),
        ({"consumer.master_port": 70000}, "consumer.master_port: expected a TCP port"),
        ({"producer.ray_port": 65530}, "producer.ray_port: expected a TCP port 1..65528"),
        ({"producer.options.ray_address": "10.0.0.1:6379"}, "producer.options.ray_address: the job decides"),
        ({"consumer.nodes": 0}, "consumer.nodes: expected a whole number >= 1"),
        ({"consumer.partition": "gpu a100"}, "consumer.partition: expected a Slurm name without spaces"),
    ],
)
def test_spec_errors_are_one_line_naming_the_key(tmp_path, fake_slurm, changes, needle):
    _, log, _ = fake_slurm
    path = _write(tmp_path, _tiny(tmp_path, **changes))
    with pytest.raises(UserError) as err:
        _launch("slurm", str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not log.exists() and not (tmp_path / "run").exists()  # nothing submitted or written


def test_unreachable_ray_address_is_one_line_from_the_command_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing answers there
    path = _write(tmp_path, _tiny(tmp_path, **{"producer.ray_address": f"127.0.0.1:{port}", "producer.nodes": 1}))
    out = subprocess.run(
        [sys.executable, "-m", "megatron_qwenimage.cli", "launch", "slurm", str(path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(
        f"qwenimage launch slurm: error: producer.ray_address='127.0.0.1:{port}': nothing answers"
    )
