"""A real ``ray start --head --block`` on 127.0.0.1 for tests that need a Ray cluster outside the
test process (Ray Jobs, workers joining through Slurm).

The head runs in a private temp dir on free ports, without a dashboard login (``RAY_AUTH_MODE=
disabled``), and is stopped by killing exactly the processes it started (its process tree), never
with ``ray stop``, which would stop every Ray of this machine's user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from megatron_qwenimage.processes import descendants, terminate

#: What every process of a test cluster needs: no token auth, Ray kept on 127.0.0.1, no usage stats.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1, held open together while chosen (one at a time, the
    kernel may hand the same port out twice, and Ray refuses two components on one port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass(frozen=True)
class RayHead:
    gcs_address: str  # 127.0.0.1:PORT, what `ray start --address` and `ray status --address` take
    dashboard_url: str  # http://127.0.0.1:PORT, the Jobs API
    temp_dir: str  # the session's temp dir (a worker on this machine joins with the same)
    log: Path  # `ray start --head`'s output


@contextlib.contextmanager
def ray_head(num_cpus: int = 4, *, timeout_s: float = 120.0) -> Iterator[RayHead]:
    """Start a head (with its Jobs API) and yield it once the Jobs API answers; stop it after.

    Sets `RAY_ENV` in this process too (its Ray clients), and restores the variables after."""
    from ray.job_submission import JobSubmissionClient

    old = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    temp = tempfile.mkdtemp(prefix="qi-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    flags = (
        "--port",
        "--dashboard-port",
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    )
    ports = dict(zip(flags, free_ports(len(flags)), strict=True))
    gcs, dashboard = ports["--port"], ports["--dashboard-port"]
    argv = ["ray", "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", str(num_cpus)]
    argv += ["--temp-dir", temp, "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1"]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    log_path = Path(temp) / "ray-start.log"
    log = open(log_path, "w")  # closed in the finally
    proc = subprocess.Popen(argv, env={**os.environ, **RAY_ENV}, stdout=log, stderr=subprocess.STDOUT)
    head = psutil.Process(proc.pid)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                JobSubmissionClient(url)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start --head did not come up: {log_path.read_text()}") from None
                time.sleep(0.5)
        yield RayHead(gcs_address=f"127.0.0.1:{gcs}", dashboard_url=url, temp_dir=temp, log=log_path)
    finally:
        terminate([head, *descendants(head)], grace_s=3.0, reap_s=5.0)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
