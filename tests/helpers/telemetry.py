"""Helpers shared by the telemetry tests (producer telemetry, monitor, live Prometheus): the
fields the telemetry contract (docs/monitoring.md) added to the producer's status records, and
polling a live run until it shows something."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Fields the telemetry contract added to the producer's ``status.json`` and telemetry history
#: (a record written before it has none of them).
NEW_PRODUCER_FIELDS = frozenset(
    {
        "run_label",
        "text_tokens",
        "images_per_s",
        "text_tokens_per_s",
        "bucket_images_per_s",
        "stage_busy",
        "encoder_utilization",
        "actors",
        "snapshot_version",
        "pool_bounds",
        "pool_control_version",
    }
)


def wait_until(check: Callable[[], T], *, timeout_s: float, interval_s: float, failure: Callable[[], str]) -> T:
    """Call `check` every `interval_s` seconds until it returns something truthy, and return that.

    Raises:
        AssertionError: with message ``failure()`` when a call after `timeout_s` seconds still
            returned something falsy (`failure` is called then, so it may report what the
            checks last saw).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(failure())
        time.sleep(interval_s)
