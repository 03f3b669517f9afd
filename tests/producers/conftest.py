"""Fixtures for the producer tests: one local Ray head on 127.0.0.1 and tiny encoders, per session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def producer_env(tmp_path_factory):
    """Environment for producer runs: offline hub, Ray private to 127.0.0.1, tiny encoders dir."""
    tiny = tmp_path_factory.mktemp("tiny-encoders") / "enc"
    env = {
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "QWENIMAGE_TINY_ENCODERS_DIR": str(tiny),
        "RAY_DEDUP_LOGS": "0",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from producers.encoders import build_tiny_encoders

    build_tiny_encoders(tiny)
    yield dict(os.environ)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(producer_env):
    """A local Ray head started by this test process (4 logical CPUs, 127.0.0.1 only, no dashboard).

    `ray.shutdown()` stops exactly the processes it started. Yields the GCS address that
    subprocess producers join with ``--ray-address``.
    """
    import ray

    # address="local": always a new private cluster, never one a RAY_ADDRESS or another test left behind.
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    try:
        yield address
    finally:
        ray.shutdown()
