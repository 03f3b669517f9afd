"""Fixtures of the monitor and report tests."""

from __future__ import annotations

import pytest

from tests.monitor.fixtures import build_run


@pytest.fixture
def scenario(tmp_path) -> tuple[str, str]:
    """(cache, run) of the whole scenario (`build_run`) under this test's temporary directory."""
    return build_run(str(tmp_path))
