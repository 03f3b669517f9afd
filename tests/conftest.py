"""Shared fixtures: offline hub, tiny random diffusers transformers saved to disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests.helpers.mmdit import make_diffusers_transformer


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory):
    """A tiny random diffusers transformer written with save_pretrained (what a user has on disk)."""
    path = tmp_path_factory.mktemp("tiny_diffusers")
    make_diffusers_transformer().save_pretrained(path)
    return path
