"""``qwenimage launch ray job.yaml --address http://HEAD:8265``: the producers as a Ray Job.

The job spec's producer side (`launch.job_spec`) becomes one Ray Job on an existing cluster,
submitted through the Jobs API of its dashboard (`ray.job_submission.JobSubmissionClient`):

* entrypoint: ``qwenimage produce ...`` with the spec's flags (`ProducerSpec.argv`) and
  ``--ray-address auto``: the job's driver runs on the head and joins the cluster it runs on (the
  job supervisor sets ``RAY_ADDRESS`` for it) instead of starting an embedded Ray;
* runtime environment: ``env_vars`` from ``producer.env.vars``. The package is expected to be
  installed on the cluster (the container image of ``producer.container``, or the nodes'
  environment): nothing is uploaded. ``--working-dir DIR`` uploads a checkout of this repository
  instead (``runtime_env.working_dir``, which Ray also puts on every worker's ``sys.path``) and
  runs ``python -m megatron_qwenimage.cli produce ...`` from it, for clusters that have the
  dependencies but not this package;
* paths: the cache and the run directory are given to the job as absolute paths (relative ones
  are resolved here, against the current directory): they must be the same paths on the cluster
  (a shared file system) or URLs (``s3://...``). ``input: bundled`` is written here, under
  ``run_dir/inputs``, so it needs the shared file system too.

Then it waits: the job's status is polled (``get_job_status``; a CLI's exit status is not
trusted)
until it is terminal, its logs are saved to ``run_dir/logs/ray-job-<id>.log``, and the command
exits 0 only when the job SUCCEEDED; otherwise it prints one line with the status and the last
error line of the logs (exit 1). ``--no-wait`` prints the submission id and returns at once. An
address where no Jobs API answers is one line naming ``--address`` (exit 2).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
import uuid
from pathlib import Path

from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.errors import UserError

#: Files a ``--working-dir`` upload leaves out (Ray refuses packages over its size limit).
WORKING_DIR_EXCLUDES = [
    ".git",
    "**/__pycache__",
    "*.egg-info",
    "cache",
    "runs",
    "**/*.safetensors",
    "**/*.pt",
]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RayJobFailed(UserError):
    """The Ray Job ended in another state than SUCCEEDED (or could not be followed to its end)."""

    exit_code = 1


def add_ray_arguments(parser) -> None:
    parser.add_argument(
        "job_spec", metavar="JOB_YAML", help="the job spec (docs/launch.md): its producer side becomes the Ray Job"
    )
    parser.add_argument(
        "--address",
        default=None,
        metavar="URL",
        help="the Ray dashboard (Jobs API) of the cluster, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
        "else producer.ray_address when it is an http(s):// URL)",
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="submit, print the submission id and return (do not follow the job)"
    )
    parser.add_argument(
        "--working-dir",
        default=None,
        metavar="DIR",
        help="upload DIR (a checkout of this repository) as the job's working_dir, for a cluster without this "
        "package installed; the entrypoint then runs `python -m megatron_qwenimage.cli` from it",
    )
    parser.add_argument(
        "--submission-id", default=None, metavar="ID", help="the job's id (default qwenimage-<name>-produce-<random>)"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=2.0, metavar="S", help="seconds between status polls (default 2)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop waiting after S seconds and exit 1 (the job keeps running; default: wait for its end)",
    )


# --- building the submission ------------------------------------------------------------------------
def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def resolve_address(given: str | None, spec) -> str:
    """The Jobs API address: `given`, $RAY_API_SERVER_ADDRESS, or an http(s) ``producer.ray_address``."""
    address = given or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and (spec.producer.ray_address or "").startswith(("http://", "https://")):
        address = spec.producer.ray_address
    if not address:
        raise ConfigError(
            "--address: missing; give the Ray dashboard (Jobs API) of the producer cluster, e.g. --address "
            "http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address


def producer_argv(spec, input_spec: str | None = None) -> list[str]:
    """``qwenimage produce`` arguments for a driver that joins the cluster it runs on."""
    run = spec.run
    argv = run.producer.argv(
        input_spec=input_spec or run.producer.options.get("input", "bundled"),
        cache=_absolute(run.cache),
        run_label=run.name,
        sd_dir=_absolute(run.sd_dir),
    )
    out: list[str] = []
    skip = False
    for arg in argv:  # the spec's own --ray-address (if any) is replaced: the job joins its own cluster
        if skip:
            skip = False
            continue
        if arg == "--ray-address":
            skip = True
            continue
        out.append(arg)
    return [*out, "--ray-address", "auto"]


def build_submission(spec, *, input_spec: str | None = None, working_dir: str | None = None) -> dict:
    """`JobSubmissionClient.submit_job` keyword arguments (entrypoint, runtime_env, metadata)."""
    argv = producer_argv(spec, input_spec)
    program = ["python", "-m", "megatron_qwenimage.cli"] if working_dir else ["qwenimage"]
    command = shlex.join([*program, *argv])
    activate = spec.producer.resources.env.get("activate")
    entrypoint = f"{activate} && {command}" if activate else command
    runtime_env: dict = {}
    variables = dict(spec.producer.resources.env.get("vars") or {})
    if variables:
        runtime_env["env_vars"] = variables
    if working_dir:
        runtime_env["working_dir"] = os.path.abspath(working_dir)
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return {
        "entrypoint": entrypoint,
        "runtime_env": runtime_env or None,
        "metadata": {"qwenimage_run": spec.name, "job_spec": str(spec.source), "side": "producer"},
    }


# --- talking to the cluster -------------------------------------------------------------------------
def connect(address: str):
    """A `JobSubmissionClient` for `address`; `ConfigError` naming ``--address`` when nothing answers."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, requests' errors, a version mismatch, a non-dashboard port
        detail = " ".join(str(exc).split())
        if len(detail) > 200:
            detail = detail[:200] + "..."
        raise ConfigError(
            f"--address {address}: no Ray Jobs API answers there ({type(exc).__name__}: {detail}); give the head's "
            "dashboard address (http://HEAD:8265) and check that the cluster is up"
        ) from None


def last_error_line(logs: str) -> str | None:
    """The line of a job's logs that says best why it failed: a ``qwenimage ...: error:`` line, else
    the last exception line (``SomeError: ...``), else the last line mentioning an error, else the
    last line. None for empty logs."""
    lines = [_ANSI.sub("", line).strip() for line in logs.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    patterns = (
        re.compile(r"^qwenimage [\w-]+: error: "),
        re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*:"),
        re.compile(r"\berror\b", re.IGNORECASE),
    )
    for pattern in patterns:
        for line in reversed(lines):
            if pattern.search(line):
                return line
    return lines[-1]


def save_logs(client, job_id: str, logs_dir: str) -> Path | None:
    """Write the job's logs to ``logs_dir/ray-job-<id>.log`` (None when they cannot be read)."""
    try:
        logs = client.get_job_logs(job_id)
    except Exception:
        return None
    path = Path(logs_dir) / f"ray-job-{job_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(logs)
    return path


def wait_for_job(client, job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None, stream=None):
    """Poll until the job is terminal; returns its status (None when `timeout_s` passed first).
    Each status change is one line on `stream`."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        status = client.get_job_status(job_id)
        if status != last and stream is not None:
            print(f"Ray job {job_id}: {status.value}", file=stream, flush=True)
        last = status
        if status.is_terminal():
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def run_ray(args) -> int:
    from launch.job_spec import load_job_spec

    if not args.poll_interval > 0:
        raise ConfigError(f"--poll-interval {args.poll_interval:g}: expected seconds > 0")
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout:g}: expected seconds > 0")
    if args.working_dir is not None and not Path(args.working_dir).is_dir():
        raise ConfigError(f"--working-dir {args.working_dir}: not a directory (a checkout of this repository)")
    spec = load_job_spec(args.job_spec, check_ray=False)
    address = resolve_address(args.address, spec)
    client = connect(address)
    input_spec = None
    if spec.run.producer.uses_bundled_input:
        from producers.bundled import write_bundled_inputs

        input_spec = write_bundled_inputs(_absolute(spec.run.inputs_dir), **spec.run.producer.bundled)
    submission = build_submission(spec, input_spec=input_spec, working_dir=args.working_dir)
    job_id = args.submission_id or f"qwenimage-{spec.name}-produce-{uuid.uuid4().hex[:8]}"
    try:
        job_id = client.submit_job(submission_id=job_id, **submission)
    except Exception as exc:
        raise RayJobFailed(
            f"--address {address}: the Jobs API refused the producer job ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]})"
        ) from None
    if args.no_wait:
        print(job_id)
        return 0
    print(f"Ray job {job_id} submitted to {address}: {submission['entrypoint']}", file=sys.stderr, flush=True)
    logs_dir = _absolute(spec.run.logs_dir)
    try:
        status = wait_for_job(client, job_id, poll_s=args.poll_interval, timeout_s=args.timeout, stream=sys.stderr)
    except KeyboardInterrupt:
        save_logs(client, job_id, logs_dir)
        print(
            f"stopped waiting; Ray job {job_id} keeps running (stop it with: ray job stop --address {address} {job_id})",
            file=sys.stderr,
        )
        return 130
    log_path = save_logs(client, job_id, logs_dir)
    where = f"logs: {log_path}" if log_path else "its logs could not be read"
    if status is None:
        raise RayJobFailed(
            f"Ray job {job_id} still {client.get_job_status(job_id).value} after --timeout {args.timeout:g} s; it "
            f"keeps running ({where})"
        )
    if status.value == "SUCCEEDED":
        print(f"Ray job {job_id} SUCCEEDED ({where})")
        return 0
    logs = log_path.read_text() if log_path else ""
    reason = last_error_line(logs)
    if reason is None:
        try:
            reason = " ".join((client.get_job_info(job_id).message or "").split()) or None
        except Exception:
            reason = None
    raise RayJobFailed(f"Ray job {job_id} {status.value}: {reason or 'no error in its logs'} ({where})")
