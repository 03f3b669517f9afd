"""Fixtures shared by the consumer tests."""

from __future__ import annotations

import pytest

from consumers.parallel import ParallelLayout, init_parallel, shutdown
from tests.helpers.consumers import single_rank_env


@pytest.fixture(scope="module")
def pstate():
    """A one-rank world (gloo, this process) and its `ParallelState`, for engines built in the test."""
    with single_rank_env():
        state = init_parallel(ParallelLayout())
        try:
            yield state
        finally:
            shutdown()
