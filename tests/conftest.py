"""Shared fixtures, and a persistent compilation cache for the test run.

Most of the suite's time is XLA compiling the same update programs in several
processes (the xdist workers, and the scripts and multi-device checks run as
subprocesses). The cache directory is set through the environment, before JAX
is imported, so that every one of those processes shares it.
"""

import os
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), 'soap_optax-test-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def x64():
  """Runs a test with ``jax_enable_x64`` on, restoring it afterwards."""
  with jax.enable_x64(True):
    yield
