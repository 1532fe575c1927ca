"""Shared fixtures, and a persistent compilation cache for the test run.

Most of the suite's time is XLA compiling the same update programs in several
processes (the xdist workers, and the scripts and multi-device checks run as
subprocesses). The cache directory is set through the environment, before JAX
is imported, so that every one of those processes shares it.
"""

import os
import subprocess
import sys
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), 'soap_optax-test-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The tests compile many small programs and run each a few times, so the
# backend's optimizations cost far more than they save: without LLVM's
# optimization passes and with XLA's older CPU loop emitters, a cold suite
# compiles in well under half the time (BENCHMARKS.md, section 14).
# Neither flag changes the HLO program; they change how it becomes machine
# code, so float32 results may differ in their last bits (a multiply-add
# fused or not), as between any two builds (the sharded float32 parity,
# tolerance 1e-5, measures 3.6e-6 with them and 1.0e-7 without).
# Subprocesses (the scripts, the multi-device checks) inherit them; a flag
# already named in XLA_FLAGS is left as it is (the user's own flags are kept
# in USER_XLA_FLAGS_VARIABLE, which also tells xdist workers that the
# controller has probed).
FAST_COMPILE_FLAGS = {'--xla_backend_optimization_level': '0',
                      '--xla_cpu_use_fusion_emitters': 'false'}
USER_XLA_FLAGS_VARIABLE = 'SOAP_OPTAX_USER_XLA_FLAGS'


def _with_fast_compile_flags(flags: str) -> str:
  """``flags`` and the fast-compile flags it does not name, if this jaxlib
  knows them (XLA aborts on an unknown flag; a one-second probe)."""
  added = ' '.join(f'{name}={value}'
                   for name, value in FAST_COMPILE_FLAGS.items()
                   if name not in flags)
  combined = f'{flags} {added}'.strip()
  try:
    probe = subprocess.run(
        [sys.executable, '-c', 'import jax; jax.devices()'],
        env=dict(os.environ, XLA_FLAGS=combined, JAX_PLATFORMS='cpu'),
        stdin=subprocess.DEVNULL, capture_output=True, check=False,
        timeout=120)
  except subprocess.TimeoutExpired:
    return flags
  return combined if probe.returncode == 0 else flags


if USER_XLA_FLAGS_VARIABLE not in os.environ:  # not in an xdist worker
  os.environ[USER_XLA_FLAGS_VARIABLE] = os.environ.get('XLA_FLAGS', '')
  os.environ['XLA_FLAGS'] = _with_fast_compile_flags(
      os.environ[USER_XLA_FLAGS_VARIABLE])

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def x64():
  """Runs a test with ``jax_enable_x64`` on, restoring it afterwards."""
  with jax.enable_x64(True):
    yield

