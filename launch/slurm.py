"""``qwenimage launch slurm job.yaml [--dry-run] [--resume] [--nodes N]``: both sides as Slurm jobs.

The job spec (`launch.job_spec`) is validated first: every fault is one line naming the key, and
nothing is written or submitted before it passes. Then two batch scripts are rendered and
submitted with ``sbatch --parsable``:

* the **producer job** (`render_producer_script`) starts a Ray cluster inside its allocation:
  the head on the first node (``ray start --head --block``, GCS on ``producer.ray_port`` and its
  other daemons on the next ports, see `ray_start_args`), a worker on every other node (one
  ``srun`` step over them), waits until all nodes have joined (``ray status``, at most
  `RAY_START_TIMEOUT_S`), runs ``qwenimage produce`` on the first node with ``--ray-address`` of
  that head, and stops Ray when it ends, however it ends (an EXIT trap sends SIGTERM to the Ray
  steps: ``ray start --block`` then stops its daemons). With ``producer.ray_address`` the job only
  runs ``qwenimage produce`` against that cluster, on one node;
* the **consumer job** (`render_consumer_script`) runs one ``srun`` task per node, each a
  ``torchrun --nnodes $SLURM_NNODES --node-rank $SLURM_NODEID --nproc-per-node P`` with the
  first node of the allocation as the rendezvous (``consumer.master_port``), training with
  ``run_dir/slurm/train.yaml`` (the spec's run config with the run's paths). It is submitted
  with ``--dependency=after:<producer job>`` (it may start once the producers have started; it
  first waits until the cache exists, then tails it). ``#SBATCH --requeue`` and
  ``#SBATCH --signal=B:TERM@<consumer.signal_before_s>``: that long before the time limit Slurm
  sends SIGTERM to the batch script, which passes it to the training processes
  (``scancel --signal=TERM $SLURM_JOB_ID``: every step, not the script). They finish the step
  they are in, save and commit its checkpoint, and exit (`consumers.trainer.Trainer.train`);
  then the script requeues the job (``scontrol requeue``) unless ``SLURM_RESTART_COUNT`` has
  reached ``consumer.max_restarts``. The requeued job resumes from that checkpoint
  (``checkpoint.resume: auto``). (``srun`` itself must not get the SIGTERM: it would SIGKILL the
  tasks; ``torchrun`` does get it, forwards it to its workers and waits up to
  ``--shutdown-timeout`` = ``signal_before_s - EXIT_MARGIN_S`` for them
  (`launch.job_spec.ConsumerJob.shutdown_timeout_s`): the training gets that long to finish its
  step and save, and torchrun, the step and the requeue get the last `EXIT_MARGIN_S` seconds
  before the time limit.) Each node's torchrun is ``qwenimage torchrun``: its own log and failure
  report go to ``run_dir/logs/torchrun-<job id>-node<node id>.log``, so a failed job's output ends
  with the training's one-line error.

Both scripts run their steps in the side's environment: a container (pyxis: ``srun
--container-image --container-mounts --container-workdir --container-name``) or the host with
``env.vars`` exported and ``env.activate`` sourced. ``#SBATCH`` lines carry nodes, GPUs per node,
CPUs per task, partition, account, qos and time as the spec gives them; Slurm's own output goes
to ``run_dir/logs/slurm-<side>-<job id>.out``.

Written on submission: the scripts and ``train.yaml`` under ``run_dir/slurm/`` and the job ids
in ``run_dir/launch.json`` (what ``qwenimage launch status`` and ``cancel`` read); with
``producer.autoscale`` also ``run_dir/slurm/job.yaml``, the spec with absolute paths that the
producer job's ``qwenimage launch autoscale`` step reads (a background step on the first node,
started once the Ray cluster is up; it stops when the producers finish). Written by the producer
job once its Ray cluster is up: the head's address in ``run_dir/slurm/ray-address`` (where
``qwenimage launch autoscale --actuator slurm-workers`` joins extra workers). ``--dry-run``
prints the scripts and the sbatch command lines and writes or submits nothing.

``--resume [--nodes N]`` re-renders and submits only the consumer job, e.g. with another number
of nodes: the world is ``N x procs_per_node``, the layout's DP is recomputed (an explicit
``parallel.dp`` is dropped) and the layout and batch sizes are re-validated for it. A consumer job
of the run that is still running is first sent SIGTERM (its checkpoint is saved) and waited for.
The new job resumes from the latest checkpoint, resharded to the new data-parallel size.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from launch.job_spec import EXIT_MARGIN_S, RAY_PORTS, JobSpec, Resources, job_spec_from_dict
from megatron_qwenimage.config import ConfigError, read_yaml
from megatron_qwenimage.errors import UserError

#: Where the rendered scripts and the train config go, under run_dir.
SCRIPT_DIR = "slurm"
#: ``run_dir/slurm/ray-address``: the producer job's Ray head HOST:PORT, written once its cluster is up
#: (``qwenimage launch autoscale --actuator slurm-workers`` joins extra workers to it).
RAY_ADDRESS_FILE = "ray-address"
#: The record of submitted jobs, under run_dir.
LAUNCH_RECORD = "launch.json"
#: How long the producer job waits for every node of its Ray cluster to join.
RAY_START_TIMEOUT_S = 300
#: Seconds between the consumer job's looks for the cache the producers create.
CACHE_POLL_S = 5
#: Slurm's largest ``--signal`` lead time.
MAX_SIGNAL_S = 65535
REPO = Path(__file__).resolve().parents[1]

#: The consumer job's first step: wait until the cache exists (the producer job creates it).
WAIT_FOR_CACHE = """\
import sys, time
from megatron_qwenimage.cache import open_cache
from megatron_qwenimage.errors import UserError
said = False
while True:
    try:
        open_cache(sys.argv[1])
        break
    except UserError as exc:
        if not said:
            print(f"qwenimage launch: waiting for the producers to create the cache ({exc})", flush=True)
            said = True
        time.sleep(float(sys.argv[2]))
"""


class SubmitError(UserError):
    """``sbatch`` / ``scancel`` / ``squeue`` failed or is missing; the message quotes it."""

    exit_code = 1


# ------------------------------------------------------------------------------------------- spec
def prepare_spec(
    path: str | os.PathLike,
    *,
    nodes: int | None = None,
    check_paths: bool = True,
    check_ray: bool = True,
    cwd: str | os.PathLike | None = None,
) -> JobSpec:
    """`launch.job_spec.load_job_spec` for a batch job: ``run_dir`` and a local ``cache`` made
    absolute (the jobs run elsewhere), ``consumer.nodes`` replaced by `nodes` (and an explicit
    ``parallel.dp`` dropped, so that DP is recomputed), everything validated."""
    cwd = Path(cwd or os.getcwd())
    d = read_yaml(path, what="job spec")
    if isinstance(d, dict):
        d = copy.deepcopy(d)
        for key in ("run_dir", "cache"):
            value = d.get(key)
            if isinstance(value, str) and value.strip() and "://" not in value:
                d[key] = str((cwd / value).resolve()) if not os.path.isabs(value) else value
        run_dir = d.get("run_dir")
        if isinstance(run_dir, str) and ("://" in run_dir or any(c.isspace() for c in run_dir)):
            raise ConfigError(
                f"run_dir={run_dir!r}: Slurm jobs need a directory path without spaces on the file system the "
                "nodes share (their #SBATCH --output logs, scripts and checkpoints go there)"
            )
        if nodes is not None:
            if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
                raise ConfigError(f"--nodes {nodes!r}: expected a whole number >= 1")
            consumer = d.get("consumer")
            if isinstance(consumer, dict):
                consumer["nodes"] = nodes
                config = consumer.get("config")
                if isinstance(config, (str, os.PathLike)):
                    config = read_yaml(config, what="consumer.config")
                if isinstance(config, dict) and isinstance(config.get("parallel"), dict):
                    config = copy.deepcopy(config)
                    config["parallel"].pop("dp", None)
                consumer["config"] = config
    try:
        spec = job_spec_from_dict(d, source=str(path), check_paths=check_paths, check_ray=check_ray)
    except ConfigError as exc:
        if nodes is not None and "consumer" in str(exc):
            raise ConfigError(f"{exc} (with --nodes {nodes})") from None
        raise
    _check_slurm_limits(spec)
    return spec


def _check_slurm_limits(spec: JobSpec) -> None:
    c = spec.consumer
    if c.signal_before_s > MAX_SIGNAL_S:
        raise ConfigError(
            f"consumer.signal_before_s={c.signal_before_s}: Slurm's --signal allows at most {MAX_SIGNAL_S}"
        )
    if c.resources.time_s is not None and c.signal_before_s >= c.resources.time_s:
        raise ConfigError(
            f"consumer.signal_before_s={c.signal_before_s} is not shorter than consumer.time="
            f"{c.resources.time!r} ({c.resources.time_s} s): the checkpoint-and-requeue signal would come at the start"
        )
    if spec.producer.ray_address and spec.producer.resources.nodes != 1:
        raise ConfigError(
            f"producer.nodes={spec.producer.resources.nodes}: with producer.ray_address the producer job only runs "
            "`qwenimage produce` against that cluster, on one node; set producer.nodes: 1 (or drop ray_address for a "
            "Ray cluster inside the job)"
        )


def script_dir(spec: JobSpec) -> Path:
    return Path(spec.run.run_dir) / SCRIPT_DIR


def train_config_path(spec: JobSpec) -> Path:
    return script_dir(spec) / "train.yaml"


def python_for(res: Resources) -> str:
    """The interpreter the job's steps run: the environment's ``python3`` inside a container or after
    ``env.activate``, else this interpreter (the submitting host's, on the shared file system)."""
    return "python3" if res.container or res.env.get("activate") else sys.executable


# ------------------------------------------------------------------------------------------- render
def _header(spec: JobSpec, side: str, res: Resources, *, nodes: int, extra: tuple[str, ...] = ()) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=qwenimage-{spec.name}-{side}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if res.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={res.gpus_per_node}")
    if res.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={res.cpus_per_task}")
    for key in ("partition", "account", "qos", "time"):
        value = getattr(res, key)
        if value is not None:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [f"#SBATCH {e}" for e in extra]
    lines.append(f"#SBATCH --output={Path(spec.run.logs_dir) / f'slurm-{side}-%j.out'}")
    return lines


def _environment(res: Resources, cwd: str) -> list[str]:
    """Exports, activation and the srun prefix (``SRUN`` array) of one side."""
    lines = [f"cd {shlex.quote(cwd)}"]
    for key, value in res.env.get("vars", {}).items():
        lines.append(f"export {key}={shlex.quote(value)}")
    activate = res.env.get("activate")
    if activate:
        lines += ["set +u  # activation scripts read unset variables", str(activate), "set -u"]
    if not res.container:
        lines.append(f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}")
    lines.append("export TOKENIZERS_PARALLELISM=false")
    return lines


def _srun_prefix(res: Resources, side: str, *, overlap: bool) -> str:
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if overlap:
        srun.append("--overlap")  # the Ray head, the driver and the waits share the first node's allocation
    if res.cpus_per_task:
        srun.append(f"--cpus-per-task={res.cpus_per_task}")
    if res.container:
        c = res.container
        srun += [f"--container-image={c['image']}", f"--container-name=qwenimage-{side}"]
        if c.get("mounts"):
            srun.append(f"--container-mounts={','.join(c['mounts'])}")
        if c.get("workdir"):  # else the image's own; the run's paths are absolute
            srun.append(f"--container-workdir={c['workdir']}")
    return f"SRUN=({shlex.join(srun)})"


#: The first node of the allocation and its address (Slurm's NodeAddr, resolved to an IPv4 address).
HEAD_NODE_LINES = [
    'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
    'HEAD_NODE="${NODES[0]}"',
    "HEAD_ADDR=$(scontrol show node \"$HEAD_NODE\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' | head -n 1)",
    "HEAD_IP=$(getent ahostsv4 \"${HEAD_ADDR:-$HEAD_NODE}\" | awk 'NR == 1 {print $1}')",
    'HEAD_IP="${HEAD_IP:-${HEAD_ADDR:-$HEAD_NODE}}"',
]


def ray_start_args(port: int, *, head: bool) -> list[str]:
    """``ray start`` ports pinned from `port` (``producer.ray_port``): GCS `port` (head), Ray client
    +1 (head), node manager +2, object manager +3, metrics +4, dashboard agent gRPC +5 and HTTP +6,
    runtime-env agent +7 (`launch.job_spec.RAY_PORTS`). Workers use Ray's default worker port range."""
    args = []
    if head:
        args += [f"--port={port}", f"--ray-client-server-port={port + 1}"]
    args += [
        f"--node-manager-port={port + 2}",
        f"--object-manager-port={port + 3}",
        f"--metrics-export-port={port + 4}",
        f"--dashboard-agent-grpc-port={port + 5}",
        f"--dashboard-agent-listen-port={port + 6}",
        f"--runtime-env-agent-port={port + 7}",
    ]
    assert RAY_PORTS == 8
    return args


def producer_argv(spec: JobSpec, *, dry_run: bool = True) -> list[str]:
    """The ``qwenimage produce`` arguments of the run (without ``--ray-address``)."""
    run = spec.run
    input_spec = run.producer.options.get("input", "bundled")
    if run.producer.uses_bundled_input:
        from producers.bundled import MANIFEST, write_bundled_inputs

        if dry_run:
            input_spec = str(Path(run.inputs_dir) / MANIFEST)
        else:
            input_spec = write_bundled_inputs(run.inputs_dir, **run.producer.bundled)
    return run.producer.argv(input_spec=input_spec, cache=run.cache, run_label=run.name, sd_dir=run.sd_dir)


def render_producer_script(spec: JobSpec, *, cwd: str | None = None, argv: list[str] | None = None) -> str:
    """The producer job's batch script (see the module docstring)."""
    cwd = str(cwd or os.getcwd())
    p = spec.producer
    res = p.resources
    python = python_for(res)
    produce = shlex.join([python, "-m", "megatron_qwenimage.cli", *(argv or producer_argv(spec))])
    own_ray = not p.ray_address
    lines = _header(spec, "producer", res, nodes=res.nodes if own_ray else 1)
    nodes_text = f"{res.nodes} node(s)" if own_ray else "one node"
    lines += [
        "#",
        f"# Producers of run {spec.name} (job spec {spec.source}), rendered by `qwenimage launch slurm`.",
        f"# {'A Ray cluster over this allocation' if own_ray else f'The Ray cluster at {p.ray_address}'} "
        f"runs `qwenimage produce` into {spec.run.cache} ({nodes_text}).",
        "set -uo pipefail",
        "",
        *_environment(res, cwd),
        _srun_prefix(res, "producer", overlap=True),
        *HEAD_NODE_LINES,
        'echo "qwenimage launch: producer job $SLURM_JOB_ID on ${SLURM_NNODES} node(s): ${NODES[*]}"',
        "",
    ]
    if not own_ray:
        lines += [
            f"export QWENIMAGE_RAY_ADDRESS={shlex.quote(p.ray_address)}",
            "trap 'exit 143' TERM",
            *autoscale_lines(spec),
            f'"${{SRUN[@]}}" --nodes=1 --nodelist="$HEAD_NODE" {produce} --ray-address "$QWENIMAGE_RAY_ADDRESS"',
            "exit $?",
        ]
        return "\n".join(lines) + "\n"
    port = p.ray_port
    resources = []
    if res.cpus_per_task:
        resources.append(f"--num-cpus={res.cpus_per_task}")
    if res.gpus_per_node:
        resources.append(f"--num-gpus={res.gpus_per_node}")
    common = [*resources, "--include-dashboard=false", "--disable-usage-stats", "--block"]
    head = shlex.join(["ray", "start", "--head", *ray_start_args(port, head=True), *common])
    head += ' --temp-dir="$RAY_TMP"'
    worker = shlex.join(["ray", "start", *ray_start_args(port, head=False), *common])
    worker += ' --temp-dir="$RAY_TMP"'
    gpus = [f"--gpus-per-node={res.gpus_per_node}"] if res.gpus_per_node else []
    step_gpus = (" " + shlex.join(gpus)) if gpus else ""
    lines += [
        "# The Ray cluster: pinned ports from producer.ray_port (GCS) upwards.",
        f"RAY_PORT={port}",
        'export QWENIMAGE_RAY_ADDRESS="$HEAD_IP:$RAY_PORT"',
        "# A loopback head (a one-node test cluster): keep Ray on 127.0.0.1 (it would move it to the external address).",
        'case "$HEAD_IP" in 127.*) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ;; esac',
        "# This job's own session and address files (not /tmp/ray, which other Ray instances of the node share).",
        'RAY_TMP="/tmp/ray-qwenimage-${SLURM_CLUSTER_NAME:-slurm}-$SLURM_JOB_ID"',
        "# Slurm signals every process of a step at once, the GCS too: a node cannot drain then (Ray would try for 30 s).",
        "export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0",
        "RAY_PIDS=()",
        "stop_ray() {",
        "    trap '' TERM",
        '    if [ "${#RAY_PIDS[@]}" -gt 0 ]; then',
        '        echo "qwenimage launch: stopping Ray"',
        "        # SIGTERM to this job's steps (the Ray nodes; not this script): `ray start --block` stops its daemons",
        '        scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null',
        "        for _ in $(seq 60); do",
        '            alive=0; for pid in "${RAY_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done',
        '            [ "$alive" = 0 ] && break; sleep 1',
        "        done",
        "    fi",
        "}",
        "trap stop_ray EXIT",
        "trap 'exit 143' TERM",
        "",
        f'"${{SRUN[@]}}" --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --job-name=ray-head{step_gpus} \\',
        f'    {head} --node-ip-address="$HEAD_IP" &',
        "RAY_PIDS+=($!)",
        'if [ "$SLURM_NNODES" -gt 1 ]; then',
        f'    "${{SRUN[@]}}" --nodes=$((SLURM_NNODES - 1)) --exclude="$HEAD_NODE" --job-name=ray-workers{step_gpus} \\',
        f'        {worker} --address="$QWENIMAGE_RAY_ADDRESS" &',
        "    RAY_PIDS+=($!)",
        "fi",
        "# Wait until every node has joined (`ray status` lists the active nodes).",
        f"deadline=$((SECONDS + {RAY_START_TIMEOUT_S}))",
        "while :; do",
        '    joined=$("${SRUN[@]}" --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --job-name=ray-status '
        'ray status --address="$QWENIMAGE_RAY_ADDRESS" 2>/dev/null '
        "| awk '/^Active:/ {a = 1; next} /^[A-Z]/ {a = 0} a && / node_/ {n++} END {print n + 0}')",
        '    [ "$joined" -ge "$SLURM_NNODES" ] && break',
        '    if ! kill -0 "${RAY_PIDS[0]}" 2>/dev/null; then',
        '        echo "qwenimage launch: the Ray head exited before the cluster was up" >&2; exit 1',
        "    fi",
        '    if [ "$SECONDS" -ge "$deadline" ]; then',
        f'        echo "qwenimage launch: $joined of $SLURM_NNODES Ray nodes joined within {RAY_START_TIMEOUT_S} s" >&2',
        "        exit 1",
        "    fi",
        "    sleep 2",
        "done",
        'echo "qwenimage launch: Ray cluster up at $QWENIMAGE_RAY_ADDRESS ($joined node(s))"',
        f'echo "$QWENIMAGE_RAY_ADDRESS" > {shlex.quote(str(Path(spec.run.run_dir) / SCRIPT_DIR / RAY_ADDRESS_FILE))}',
        "",
        *autoscale_lines(spec),
        '"${SRUN[@]}" --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --job-name=produce \\',
        f'    {produce} --ray-address "$QWENIMAGE_RAY_ADDRESS"',
        "exit $?",
    ]
    return "\n".join(lines) + "\n"


def torchrun_command(spec: JobSpec, config_path: str | os.PathLike) -> str:
    """One node's ``qwenimage torchrun`` (a ``bash -c`` script: ``$SLURM_NNODES`` / ``$SLURM_NODEID``
    are the task's): torchrun with its own log and failure report in
    ``run_dir/logs/torchrun-<job id>-node<node id>.log``, so that the job's output ends with the
    training processes' own line (`launch.torchrun.run_torchrun`)."""
    c = spec.consumer
    python = python_for(c.resources)
    log = shlex.quote(str(Path(spec.run.logs_dir) / "torchrun-"))
    head = shlex.join([python, "-m", "megatron_qwenimage.cli", "torchrun"])
    tail = shlex.join(
        [
            f"--nproc-per-node={c.procs_per_node}",
            f"--master-port={c.master_port}",
            f"--shutdown-timeout={c.shutdown_timeout_s}",
            "-m",
            "megatron_qwenimage.cli",
            "train",
            "--config",
            str(config_path),
        ]
    )
    return (
        f'exec {head} --torchrun-log={log}"$SLURM_JOB_ID-node$SLURM_NODEID.log" --nnodes="$SLURM_NNODES" '
        f'--node-rank="$SLURM_NODEID" --master-addr="$QWENIMAGE_MASTER_ADDR" {tail}'
    )


def render_consumer_script(spec: JobSpec, *, cwd: str | None = None) -> str:
    """The consumer job's batch script (see the module docstring)."""
    cwd = str(cwd or os.getcwd())
    c = spec.consumer
    res = c.resources
    python = python_for(res)
    extra = ("--requeue", f"--signal=B:TERM@{c.signal_before_s}", "--open-mode=append")
    layout = _layout(spec)
    wait = shlex.join([python, "-c", WAIT_FOR_CACHE, spec.run.cache, str(CACHE_POLL_S)])
    lines = _header(spec, "consumer", res, nodes=res.nodes, extra=extra)
    lines += [
        "#",
        f"# Consumers of run {spec.name} (job spec {spec.source}), rendered by `qwenimage launch slurm`.",
        f"# One torchrun per node, {c.procs_per_node} process(es) each: tp={layout.tp} x pp={layout.pp} x "
        f"dp={layout.dp} = {layout.world_size} ranks.",
        f"# {c.signal_before_s} s before the time limit Slurm sends SIGTERM to this script: the training processes",
        f"# then finish their step, save a checkpoint and exit (torchrun gives them {c.shutdown_timeout_s} s, the",
        f"# last {EXIT_MARGIN_S} s are for the job to end), and the job requeues itself (at most",
        "# consumer.max_restarts times); the requeued job resumes from that checkpoint.",
        "set -uo pipefail",
        "",
        *_environment(res, cwd),
        f"export OMP_NUM_THREADS={spec.run.consumer.omp_num_threads}",
        _srun_prefix(res, "consumer", overlap=False),
        *HEAD_NODE_LINES,
        'export QWENIMAGE_MASTER_ADDR="$HEAD_IP"',
        f"MAX_RESTARTS={c.max_restarts}",
        'RESTARTS="${SLURM_RESTART_COUNT:-0}"',
        'echo "qwenimage launch: consumer job $SLURM_JOB_ID (restart $RESTARTS, at most $MAX_RESTARTS)'
        ' on ${SLURM_NNODES} node(s): ${NODES[*]}; rendezvous $QWENIMAGE_MASTER_ADDR"',
        "",
        "STOP=0",
        "STEP_PID=",
        "on_term() {",
        "    STOP=1",
        '    echo "qwenimage launch: SIGTERM: the training processes checkpoint and stop"',
        "    # every step of the job, not this script (srun would SIGKILL its tasks on SIGTERM)",
        '    scancel --signal=TERM "$SLURM_JOB_ID"',
        "}",
        "trap on_term TERM",
        "wait_step() {  # until the step has exited (the trap interrupts `wait`); its status in RC",
        '    while :; do RC=0; wait "$STEP_PID" || RC=$?; kill -0 "$STEP_PID" 2>/dev/null || break; done',
        "}",
        "",
        "# The cache must exist (the producer job creates it); training then tails it.",
        f'"${{SRUN[@]}}" --nodes=1 --ntasks=1 --job-name=wait-for-cache {wait} &',
        "STEP_PID=$!; wait_step",
        'if [ "$STOP" = 0 ] && [ "$RC" = 0 ]; then',
        f'    "${{SRUN[@]}}" --nodes="$SLURM_NNODES" --job-name=train bash -c {shlex.quote(torchrun_command(spec, train_config_path(spec)))} &',
        "    STEP_PID=$!; wait_step",
        "fi",
        "",
        'if [ "$STOP" = 1 ] && [ "$RC" != 0 ]; then',
        "    trap '' TERM",
        '    if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then',
        '        echo "qwenimage launch: not requeued: $RESTARTS restart(s), consumer.max_restarts is $MAX_RESTARTS" >&2',
        "        exit 143",
        "    fi",
        '    if [ "$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)" != RUNNING ]; then',
        '        echo "qwenimage launch: not requeued: the job is ending (cancelled)" >&2',
        "        exit 143",
        "    fi",
        '    echo "qwenimage launch: requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of at most $MAX_RESTARTS)"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '    echo "qwenimage launch: scontrol requeue failed" >&2',
        "    exit 143",
        "fi",
        'exit "$RC"',
    ]
    return "\n".join(lines) + "\n"


def _layout(spec: JobSpec):
    from consumers.train import RunConfig

    return RunConfig.from_dict(spec.run.consumer.config, source="consumer.config").layout(
        spec.run.consumer.nproc_per_node
    )


def job_spec_path(spec: JobSpec) -> Path:
    return script_dir(spec) / "job.yaml"


def job_spec_text(spec: JobSpec) -> str:
    """The job spec as the producer job's autoscaler reads it: paths absolute, the run config inline
    with the run's paths (what the consumer job trains with)."""
    document = copy.deepcopy(spec.document)
    document["consumer"] = {**document["consumer"], "config": spec.run.consumer.config}
    return (
        f"# Written by `qwenimage launch slurm` from {spec.source}; what the producer job's autoscaler reads.\n"
        + yaml.safe_dump(document, sort_keys=False)
    )


def autoscale_lines(spec: JobSpec) -> list[str]:
    """The producer job's background step running ``qwenimage launch autoscale`` (``producer.autoscale``)."""
    if spec.producer.autoscale is None:
        return []
    command = shlex.join(
        [
            python_for(spec.producer.resources),
            "-m",
            "megatron_qwenimage.cli",
            "launch",
            "autoscale",
            str(job_spec_path(spec)),
        ]
    )
    return [
        "# The lead-time autoscaler (producer.autoscale) beside the producers; it stops when they finish.",
        '"${SRUN[@]}" --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --job-name=autoscale \\',
        f'    {command} --head-address "$QWENIMAGE_RAY_ADDRESS" &',
    ]


def train_config_text(spec: JobSpec) -> str:
    return (
        f"# Written by `qwenimage launch slurm` from the consumer section of {spec.source}; what the consumer "
        "job trains with.\n" + yaml.safe_dump(spec.run.consumer.config, sort_keys=False)
    )


# ------------------------------------------------------------------------------------------- submit
def run_command(argv: list[str], *, what: str) -> str:
    """Run a Slurm client command; its stdout, or `SubmitError` quoting its last error line."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise SubmitError(f"{what}: `{argv[0]}` not found; run this where Slurm's client commands are") from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"{what}: `{shlex.join(argv)}` did not answer within 120 s") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise SubmitError(f"{what}: `{shlex.join(argv)}` exited {proc.returncode}: {last[-1] if last else ''}")
    return proc.stdout


def sbatch_argv(script: str | os.PathLike, *, dependency: str | None = None) -> list[str]:
    argv = ["sbatch", "--parsable"]
    if dependency:
        argv += [f"--dependency=after:{dependency}", "--kill-on-invalid-dep=yes"]
    return [*argv, str(script)]


def submit(argv: list[str], *, what: str) -> str:
    """``sbatch --parsable ...``: the job id."""
    out = run_command(argv, what=what).strip()
    job_id = out.splitlines()[-1].split(";")[0].strip() if out else ""
    if not job_id.isdigit():
        raise SubmitError(f"{what}: sbatch printed {out!r}, not a job id")
    return job_id


def job_state(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` of `job_id` as a mapping ({} when slurmctld no longer knows it)."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60, check=False
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise SubmitError(f"scontrol show job {job_id}: {exc}") from None
    if proc.returncode != 0:
        return {}
    fields: dict[str, str] = {}
    for token in proc.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


#: Job states in which a job may still run (or is about to end).
ACTIVE_STATES = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "CONFIGURING",
)


def read_launch_record(spec: JobSpec) -> dict[str, Any]:
    path = Path(spec.run.run_dir) / LAUNCH_RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: nothing was launched for this job spec (no {LAUNCH_RECORD} under run_dir); "
            "run `qwenimage launch slurm` without --resume first"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable launch record ({exc})") from None


def write_launch_record(spec: JobSpec, record: dict[str, Any]) -> Path:
    path = Path(spec.run.run_dir) / LAUNCH_RECORD
    tmp = path.with_name(f".{LAUNCH_RECORD}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def stop_consumer(job_id: str, *, timeout_s: float, poll_s: float = 2.0) -> str:
    """Stop a consumer job that is still queued or running, so that a new one can take its place:
    a running one gets SIGTERM on its steps (the trainer saves a checkpoint and exits; the batch
    script is not signalled, so it does not requeue), a pending one is cancelled. Returns its
    final state."""
    state = job_state(job_id).get("JobState", "")
    if state not in (*ACTIVE_STATES, "COMPLETING"):
        return state or "gone"
    if state == "RUNNING":
        run_command(["scancel", "--signal=TERM", str(job_id)], what=f"stop consumer job {job_id}")
    elif state != "COMPLETING":
        run_command(["scancel", str(job_id)], what=f"cancel consumer job {job_id}")
    deadline = time.monotonic() + timeout_s
    while True:
        state = job_state(job_id).get("JobState", "")
        if state not in (*ACTIVE_STATES, "COMPLETING"):
            return state or "gone"
        if time.monotonic() > deadline:
            raise SubmitError(
                f"consumer job {job_id} is still {state} {timeout_s:g} s after SIGTERM; wait for it or "
                f"`scancel {job_id}`, then rerun with --resume"
            )
        time.sleep(poll_s)


def latest_checkpoint(spec: JobSpec) -> int | None:
    from consumers.checkpoint import COMMITTED, committed_checkpoints

    for step, directory in committed_checkpoints(Path(spec.run.checkpoint_dir)):
        if (directory / COMMITTED).is_file():
            return step
    return None


# ------------------------------------------------------------------------------------------- command
def add_slurm_arguments(parser) -> None:
    parser.add_argument("job_spec", metavar="JOB_YAML", help="the job spec (docs/launch.md), e.g. examples/job.yaml")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print both batch scripts and the sbatch command lines; write and submit nothing",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="submit only a new consumer job for a run launched before (run_dir/launch.json): it resumes from "
        "the latest checkpoint; a consumer job of the run still running is stopped first (SIGTERM: it saves)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help="consumer nodes instead of consumer.nodes (with --resume: scale the training to N nodes; DP is "
        "recomputed and the layout re-validated)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="skip the checks that need the cluster (the cache exists, producer.ray_address answers): to render "
        "scripts elsewhere with --dry-run",
    )


def run_slurm(args) -> int:
    check = not args.offline
    spec = prepare_spec(args.job_spec, nodes=args.nodes, check_paths=check, check_ray=check)
    cwd = os.getcwd()
    record = read_launch_record(spec) if args.resume else None
    scripts = script_dir(spec)
    producer_path, consumer_path = scripts / "producer.sbatch", scripts / "consumer.sbatch"
    consumer_script = render_consumer_script(spec, cwd=cwd)
    if args.dry_run:
        if not args.resume:
            print(f"# {producer_path}\n{render_producer_script(spec, cwd=cwd)}")
        print(f"# {consumer_path}\n{consumer_script}")
        print(f"# {train_config_path(spec)}\n{train_config_text(spec)}")
        if spec.producer.autoscale is not None and not args.resume:
            print(f"# {job_spec_path(spec)}\n{job_spec_text(spec)}")
        if not args.resume:
            print(f"$ {shlex.join(sbatch_argv(producer_path))}")
            print(f"$ {shlex.join(sbatch_argv(consumer_path, dependency='<producer job id>'))}")
        else:
            print(f"$ {shlex.join(sbatch_argv(consumer_path))}")
        return 0

    for d in (scripts, Path(spec.run.logs_dir), Path(spec.run.sd_dir)):
        d.mkdir(parents=True, exist_ok=True)
    train_config_path(spec).write_text(train_config_text(spec))
    if spec.producer.autoscale is not None:
        job_spec_path(spec).write_text(job_spec_text(spec))
    consumer_path.write_text(consumer_script)
    now = time.time()
    consumer_entry = {"script": str(consumer_path), "nodes": spec.consumer.resources.nodes, "submitted_unix": now}
    if args.resume:
        old = (record.get("consumer") or {}).get("job_id")
        if old:
            state = stop_consumer(str(old), timeout_s=spec.consumer.signal_before_s + 120)
            print(f"consumer job {old}: {state}")
        step = latest_checkpoint(spec)
        print(
            f"the new consumer job resumes from checkpoint step {step}"
            if step is not None
            else f"no committed checkpoint in {spec.run.checkpoint_dir}: the new consumer job starts from step 0"
        )
        consumer_id = submit(sbatch_argv(consumer_path), what="submit the consumer job")
        history = list(record.get("consumer_history") or [])
        if record.get("consumer"):
            history.append(record["consumer"])
        record.update(consumer={"job_id": consumer_id, **consumer_entry}, consumer_history=history)
    else:
        producer_path.write_text(render_producer_script(spec, cwd=cwd, argv=producer_argv(spec, dry_run=False)))
        producer_id = submit(sbatch_argv(producer_path), what="submit the producer job")
        try:
            consumer_id = submit(sbatch_argv(consumer_path, dependency=producer_id), what="submit the consumer job")
        except SubmitError as exc:
            subprocess.run(["scancel", producer_id], capture_output=True, check=False)
            raise SubmitError(f"{exc}; the producer job {producer_id} was cancelled") from None
        record = {
            "backend": "slurm",
            "name": spec.name,
            "job_spec": os.path.abspath(spec.source),
            "run_dir": spec.run.run_dir,
            "cache": spec.run.cache,
            "producer": {
                "job_id": producer_id,
                "script": str(producer_path),
                "nodes": spec.producer.resources.nodes if not spec.producer.ray_address else 1,
                "submitted_unix": now,
            },
            "consumer": {"job_id": consumer_id, **consumer_entry},
        }
        print(f"producer job {producer_id}: {producer_path}")
    path = write_launch_record(spec, record)
    print(f"consumer job {consumer_id}: {consumer_path}")
    print(f"job ids in {path}; logs in {spec.run.logs_dir}; `qwenimage launch status {args.job_spec}` shows both")
    return 0
