"""The trainer's Prometheus exporter listens on 127.0.0.1 only, and closing it frees the port."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import psutil
import pytest

from consumers.metrics import LoggingConfig, MetricsLogger


def _listening(port: int) -> list[str]:
    """Addresses this process LISTENs on at `port` (a scrape of 127.0.0.1 also works on 0.0.0.0)."""
    me = psutil.Process(os.getpid())
    conns = (me.net_connections if hasattr(me, "net_connections") else me.connections)(kind="inet")
    return [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def test_prometheus_exporter_binds_localhost_only(tmp_path):
    logger = MetricsLogger(
        LoggingConfig(dir=str(tmp_path), tensorboard=False, prometheus_port=0),
        enabled=True,
        world_size=1,
        peak_flops=None,
    )
    try:
        port = logger.prometheus.port
        assert port > 0
        logger.emit(
            {
                "step": 1,
                "loss": 0.5,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "samples_per_s": 2.0,
                "image_tokens_per_s": 3.0,
                "tflops_per_gpu": 0.1,
                "mfu": None,
                "data_wait_fraction": 0.0,
                "memory_bytes": 1,
                "step_time_s": 0.1,
                "time": 0.0,
            }
        )
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        bound = _listening(port)
    finally:
        logger.close()
    assert bound == ["127.0.0.1"], bound
    assert 'qwenimage_consumer_loss{run="' + Path(tmp_path).name + '"} 0.5' in body
    assert _listening(port) == [], "close() left the socket listening"


def test_the_check_sees_the_real_bind_address(tmp_path):
    """Another loopback address (never exposed) shows up as itself: the check reads the socket."""
    try:
        logger = MetricsLogger(
            LoggingConfig(dir=str(tmp_path), tensorboard=False, prometheus_port=0, prometheus_host="127.0.0.2"),
            enabled=True,
            world_size=1,
            peak_flops=None,
        )
    except OSError as exc:  # 127.0.0.2 is not configured on every OS
        pytest.skip(f"cannot bind 127.0.0.2: {exc}")
    try:
        bound = _listening(logger.prometheus.port)
    finally:
        logger.close()
    assert bound == ["127.0.0.2"], bound
