"""Shared fixtures: float64 mode for the oracle comparisons."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test with ``jax_enable_x64`` on, restoring it afterwards."""
  with jax.enable_x64(True):
    yield
