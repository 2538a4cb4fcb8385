"""Fixtures for the training tests (helpers live in train_testlib.py)."""
from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp("jax_cache")
