"""Network exposure of the producer's Ray: the embedded default listens on loopback only, and a
cluster joined with --ray-address keeps the authentication the user's environment gives it."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from megatron_qwenimage.cache import open_cache

_LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        # gRPC binds 127.0.0.1 on a dual-stack socket: the kernel shows it as ::ffff:127.0.0.1.
        addr = addr.ipv4_mapped
    return addr in _LOOPBACK


def _tree_listeners(root_pid: int) -> dict[tuple[int, str, int], str]:
    """(pid, ip, port) -> process name for every listening socket of `root_pid` and its descendants:
    TCP in LISTEN, and UDP sockets bound without a peer."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    names = {}
    for p in procs:
        try:
            names[p.pid] = p.name()
        except psutil.Error:
            pass
    try:
        conns = [(c.pid, c) for c in psutil.net_connections(kind="inet") if c.pid in names]
    except psutil.AccessDenied:  # not root where the system hides other processes' sockets
        conns = []
        for pid in names:
            try:
                p = psutil.Process(pid)
                conns += [
                    (pid, c)
                    for c in (p.net_connections if hasattr(p, "net_connections") else p.connections)(kind="inet")
                ]
            except psutil.Error:
                pass
    out = {}
    for pid, c in conns:
        listening = c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
        if listening and c.laddr:
            out[(pid, c.laddr.ip, c.laddr.port)] = names[pid]
    return out


def test_embedded_ray_listens_on_loopback_only(producer_env, tmp_path):
    """No --ray-address, in an environment that sets none of Ray's knobs (no RAY_ADDRESS, no
    RAY_AUTH_MODE, no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER): while the run goes, every socket listening
    in the producer's process tree (driver, GCS, raylet, agents, workers) is bound to loopback."""
    env = {k: v for k, v in producer_env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", _CLUSTER_ENV)}
    env["HOME"] = str(tmp_path / "home")  # Ray's default token auth writes ~/.ray/auth_token: keep it here
    n = 6
    args = [
        sys.executable,
        "-m",
        "megatron_qwenimage.cli",
        "produce",
        "--input",
        f"synthetic:text?n={n}&seed=3",
        "--output",
        str(tmp_path / "cache"),
        "--buckets",
        "64",
        "--partition-size",
        "2",
        "--json",
        "--no-progress",
        "--metrics-port",
        "0",
    ]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=err, text=True)
        seen: dict[tuple[int, str, int], str] = {}
        samples_with_raylet = 0
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                found = _tree_listeners(proc.pid)
                seen.update(found)
                samples_with_raylet += any(name == "raylet" for name in found.values())
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((tmp_path / "stdout").read_text().strip().splitlines()[-1])
    assert (summary["inputs"], summary["committed"]) == (n, n)
    assert len(open_cache(str(tmp_path / "cache")).snapshot().shards) > 0

    # Not vacuous: Ray's processes were sampled while up, and the core listeners were among them.
    names = set(seen.values())
    assert samples_with_raylet >= 3, (samples_with_raylet, sorted(names))
    assert {"gcs_server", "raylet"} <= names, sorted(names)
    assert any(pid == proc.pid for pid, _, _ in seen), "no listener of the driver itself was seen"
    assert any(name.startswith("ray::") for name in names), sorted(names)  # agents and workers
    exposed = sorted(
        f"{name} (pid {pid}) on {ip}:{port}" for (pid, ip, port), name in seen.items() if not _is_loopback(ip)
    )
    assert not exposed, "listening beyond loopback: " + "; ".join(exposed)


def test_joining_a_cluster_leaves_its_auth_and_addresses_to_the_environment(monkeypatch):
    """--ray-address (or RAY_ADDRESS when the flag is unset): ray.init(address=...) with the user's
    RAY_AUTH_MODE untouched, and no loopback pinning of the driver."""
    import ray

    from producers import pipeline

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append((kw, dict(os.environ))))
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", _CLUSTER_ENV):
        monkeypatch.delenv(var, raising=False)

    assert pipeline._ensure_ray("10.1.2.3:6379", None) is False
    kw, env_at_init = calls[-1]
    assert kw["address"] == "10.1.2.3:6379"
    assert "RAY_AUTH_MODE" not in env_at_init and "RAY_AUTH_MODE" not in os.environ
    assert _CLUSTER_ENV not in env_at_init and _CLUSTER_ENV not in os.environ

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert pipeline._ensure_ray("auto", None) is False
    assert calls[-1][0]["address"] == "auto" and calls[-1][1]["RAY_AUTH_MODE"] == "token"

    monkeypatch.setenv("RAY_ADDRESS", "10.9.8.7:6379")  # e.g. a Ray job's driver
    assert pipeline._ensure_ray(None, None) is False
    assert calls[-1][0]["address"] == "10.9.8.7:6379" and calls[-1][1]["RAY_AUTH_MODE"] == "token"


def test_embedded_ray_pins_loopback_and_fails_closed(monkeypatch):
    """The embedded start asks for a new local instance on 127.0.0.1 with Ray's localhost rewrite
    off, restores Ray's settings afterwards, and shuts Ray down if it came up elsewhere anyway."""
    import ray
    import ray.util
    from ray._private import ray_constants

    from producers import pipeline

    at_init = {}

    def fake_init(**kw):
        at_init.update(
            kw,
            env=os.environ.get(_CLUSTER_ENV),
            flag=ray_constants.ENABLE_RAY_CLUSTER,
            auth=os.environ.get("RAY_AUTH_MODE"),
        )

    shutdowns = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.7")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="192.0.2.7:6379"))
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", _CLUSTER_ENV):
        monkeypatch.delenv(var, raising=False)

    with pytest.raises(RuntimeError, match="loopback"):
        pipeline._ensure_ray(None, 4)
    assert at_init["address"] == "local" and at_init["_node_ip_address"] == "127.0.0.1"
    assert at_init["num_cpus"] == 4 and at_init["include_dashboard"] is False
    assert (at_init["env"], at_init["flag"]) == ("0", False)
    assert at_init["auth"] is None  # auth is left to Ray's default for a new local cluster
    assert shutdowns == [1]
    assert _CLUSTER_ENV not in os.environ and ray_constants.ENABLE_RAY_CLUSTER is True
