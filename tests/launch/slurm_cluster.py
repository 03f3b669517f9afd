"""A real one-node Slurm cluster on localhost, for the live launch tests (`SlurmCluster`).

Debian's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm munge``; .ci/run installs
them) are started by hand, without systemd, each daemon in the foreground as a child of the
test process: ``munged`` (as the ``munge`` user when the tests run as root, else as the test's
user) with a fresh key, then ``slurmctld -i`` and ``slurmd -N localhost``. Everything (slurm.conf,
munge key and socket, state, spool, logs, pid files) lives in one temporary directory; the
daemons talk over 127.0.0.1 (``CommunicationParameters=NoCtldInAddrAny,NoInAddrAny``: bind the
node's address, not every interface) on free ports, so the machine's own Slurm, if any, is not
touched. Client commands find the cluster through ``SLURM_CONF`` (`SlurmCluster.env`).

No cgroups here: ``ProctrackType=proctrack/linuxproc`` (the process tree) and ``TaskPlugin=task/none``.
Jobs have no accounting database (no ``sacct``): `SlurmCluster.job` reads ``scontrol show job``,
which keeps a finished job for ``MinJobAge`` seconds.

`SlurmCluster.stop` cancels every job, waits for them to end, stops the daemons by pid, and
ends any process left over from a job (found by the ``SLURM_CONF`` in its environment, which
names this cluster's temporary directory), so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

#: Binaries the live tests need, by Debian package.
PACKAGES = {
    "slurm-wlm": ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun"),
    "munge": ("munged",),
}
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def which(name: str) -> str | None:
    """`shutil.which` that also looks in the sbin directories (not on a user's PATH everywhere)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_reason() -> str | None:
    """Why the live Slurm tests cannot run here (None: they can)."""
    missing = {pkg: [b for b in bins if which(b) is None] for pkg, bins in PACKAGES.items()}
    missing = {pkg: bins for pkg, bins in missing.items() if bins}
    if not missing:
        return None
    what = "; ".join(f"{', '.join(bins)} (Debian package {pkg})" for pkg, bins in missing.items())
    return (
        f"Slurm is not installed: missing {what}; install with `apt-get install --no-install-recommends "
        "slurm-wlm munge` (.ci/run does)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One-node Slurm (node ``localhost``, all CPUs of this machine) under `root`.

    Use as a context manager, or `start` / `stop`. `env` is the environment for client commands
    (sbatch, squeue, ...) and for anything that submits jobs. Without `root`, a new directory
    under the system's temporary directory, removed by `stop` (pytest's ``tmp_path`` does not do:
    its base is private to the test's user, and munged runs as ``munge``).
    """

    def __init__(self, root: Path | None = None, *, cpus: int | None = None) -> None:
        self.owns_root = root is None
        self.name = f"qwenimage{os.urandom(3).hex()}"  # jobs see it as SLURM_CLUSTER_NAME
        self.root = Path(root or tempfile.mkdtemp(prefix="qwenimage-slurm-"))
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_unix: float | None = None
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *SBIN])

    # ------------------------------------------------------------------ set up
    def _write_files(self) -> None:
        for d in ("state", "spool", "log", "munge", "munge/key"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged refuses group/other-writable directories on its paths and needs its socket's
        # directory searchable by all; the key stays in a directory of its own, private.
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)
        key = self.munge_key
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chmod(key.parent, 0o700)
        if os.getuid() == 0:  # munged runs as the munge user: it owns its directories and key
            munge = pwd.getpwnam("munge")
            for p in (self.root / "munge", key.parent, key):
                os.chown(p, munge.pw_uid, munge.pw_gid)
        ctld_port, slurmd_port = _free_port(), _free_port()
        lines = [
            "# Written by tests/launch/slurm_cluster.py: a private one-node cluster for the live tests.",
            f"ClusterName={self.name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"SlurmUser={self.user}",
            f"SlurmdUser={self.user}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "MailProg=/bin/true",
            "MinJobAge=600",
            "KillWait=10",
            "InactiveLimit=0",
            "JobRequeue=1",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def munge_key(self) -> Path:
        return self.root / "munge" / "key" / "munge.key"

    def _spawn(self, name: str, argv: list[str], *, user: str | None = None) -> None:
        """Start a daemon in the foreground as a child of this process (as `user`: root only)."""
        as_user = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        try:
            self.procs[name] = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                **as_user,
            )
        finally:
            log.close()

    def _wait(self, what: str, ok, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}: {self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}: {self.logs()}")
            time.sleep(0.2)

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        self.started_unix = time.time()
        self._write_files()
        m = self.root / "munge"
        munged = [
            which("munged"),
            "--foreground",
            f"--socket={self.munge_socket}",
            f"--key-file={self.munge_key}",
            f"--pid-file={m / 'munged.pid'}",
            f"--log-file={m / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}",
        ]
        self._spawn("munged", munged, user="munge" if os.getuid() == 0 else None)
        self._wait("munged's socket", self.munge_socket.exists, timeout_s)
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait("the node to be idle", lambda: self.node_state() in ("IDLE", "MIXED", "ALLOCATED"), timeout_s)
        return self

    # ------------------------------------------------------------------ queries
    def run(self, *argv: str, check: bool = True, timeout_s: float = 30) -> subprocess.CompletedProcess:
        """A client command (`argv[0]` found on the cluster's PATH) against this cluster."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, timeout=timeout_s)

    def node_state(self) -> str | None:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return out.stdout.strip().upper().rstrip("*~#") or None if out.returncode == 0 else None

    def job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once the job is forgotten)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if out.returncode != 0:
            return {}
        fields = {}
        for token in out.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def state(self, job_id: str | int) -> str | None:
        return self.job(job_id).get("JobState")

    def wait_for(self, job_id: str | int, states, timeout_s: float, *, poll_s: float = 0.5) -> dict:
        """Poll until the job's state is one of `states`; returns its ``scontrol show job`` record."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.job(job_id)
            if record.get("JobState") in states:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {record.get('JobState')!r}, not in {states} after {timeout_s} s")
            time.sleep(poll_s)

    def logs(self, tail: int = 20) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            with contextlib.suppress(OSError):
                lines = p.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # ------------------------------------------------------------------ tear down
    def leftovers(self) -> list[psutil.Process]:
        """Processes of this cluster's jobs that are still alive (their environment names our SLURM_CONF)."""
        mine = {p.pid for p in self.procs.values()}
        found = []
        for p in psutil.process_iter(["pid", "create_time"]):
            try:
                if p.pid in mine or p.info["create_time"] < (self.started_unix or 0) - 1 or p.pid == os.getpid():
                    continue
                if p.environ().get("SLURM_CONF") == str(self.conf):
                    found.append(p)
            except (psutil.Error, OSError):
                continue
        return found

    def stop(self) -> None:
        if not self.procs:
            return
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.run("scancel", "--full", "-u", self.user, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    out = self.run("squeue", "-h", "-o", "%i %T", check=False)
                    if out.returncode != 0 or not out.stdout.strip():
                        break
                    time.sleep(0.5)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                p = self.procs.get(name)
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(timeout=10)
            left = self.leftovers()
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            _, alive = psutil.wait_procs(left, timeout=10)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            self.procs.clear()
            if self.owns_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
