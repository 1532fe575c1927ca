"""What every script under scripts/ needs: usage errors and argument helpers,
device selection, the machine description the scripts record, saving figures,
timing, parameter sets and their count, and a silent progress bar.

This module imports neither JAX nor matplotlib at import time: a script
imports it, parses its arguments and selects its device (``select_device``)
before JAX's backend starts. The functions that need JAX import it when
called, after that.
"""

import datetime
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable


class UsageError(Exception):
  """Bad input: reported as one line on stderr, exit status 2."""


def exit_with_main(main: Callable[[list[str]], int]) -> None:
  """Runs a script's ``main(argv)`` on the command line's arguments and
  exits with its status; a UsageError is one line on stderr and status 2."""
  try:
    status = main(sys.argv[1:])
  except UsageError as error:
    print(f'error: {error}', file=sys.stderr)
    status = 2
  sys.exit(status)


# ------------------------------------------------------------------------------
# Arguments.


def comma_list(flag: str, text: str, choices: tuple[str, ...]):
  """``"a,b"`` -> ``("a", "b")``; UsageError unless a non-empty subset of
  ``choices``."""
  items = tuple(s.strip() for s in text.split(',') if s.strip())
  unknown = [s for s in items if s not in choices]
  if not items or unknown:
    raise UsageError(f'{flag}: unknown {", ".join(unknown) or "(empty)"}; '
                     f'choose from {", ".join(choices)}')
  return items


def positive_float(flag: str, text: str, what: str = 'values') -> float:
  """``text`` as a float > 0; UsageError naming ``flag`` (and ``what`` must be
  positive) otherwise."""
  try:
    value = float(text)
  except ValueError:
    raise UsageError(f'{flag}: {text!r} is not a number') from None
  if not value > 0:
    raise UsageError(f'{flag}: {what} must be > 0, got {text}')
  return value


# ------------------------------------------------------------------------------
# Device and machine.


def select_device(choice: str):
  """Imports JAX on the requested platform ('cpu', 'gpu' or anything else for
  JAX's default); returns the jax module. Call it before anything starts
  JAX's backend."""
  if choice == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  if choice == 'gpu':
    try:
      jax.devices('gpu')
    except RuntimeError:
      raise UsageError('--device gpu: JAX sees no GPU on this machine '
                       f'(devices: {jax.devices()})') from None
    jax.config.update('jax_default_device', jax.devices('gpu')[0])
  return jax


def cpu_name() -> str:
  """The processor's model name (/proc/cpuinfo), else what platform says."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return cpu


def machine_info() -> dict:
  """Date, JAX backend and devices, CPU, core count and versions: the machine
  the benchmark and the experiments record with their results."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return dict(date=datetime.date.today().isoformat(),
              backend=jax.default_backend(),
              devices=[d.device_kind for d in jax.devices()], cpu=cpu_name(),
              cpu_count=os.cpu_count(), python=sys.version.split()[0],
              jax=jax.__version__, jaxlib=jaxlib.__version__,
              optax=optax.__version__)


# ------------------------------------------------------------------------------
# Figures.


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: pathlib.Path, dpi: int = 100) -> pathlib.Path:
  """Writes a matplotlib figure as a PNG, closes it and returns the path."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


# ------------------------------------------------------------------------------
# Timing.


def time_calls(fn: Callable[..., Any], args, repeats: int,
               budget_s: float = float('inf')) -> list[float]:
  """Seconds of ``repeats`` calls (after one warm-up), each waited for.

  Stops early once ``budget_s`` is spent, keeping at least 3 calls.
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  times = []
  while len(times) < repeats:
    tick = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tick)
    if len(times) >= 3 and sum(times) > budget_s:
      break
  return times


# ------------------------------------------------------------------------------
# Parameter sets.


def transformer_shapes(d: int, layers: int, vocab: int, seq: int):
  """A GPT-style parameter set: name -> shape (fused qkv, 4x MLP, tied head)."""
  shapes = {'wte': (vocab, d), 'wpe': (seq, d), 'ln_f/scale': (d,),
            'ln_f/bias': (d,)}
  for i in range(layers):
    shapes.update({
        f'h{i}/ln1/scale': (d,), f'h{i}/ln1/bias': (d,),
        f'h{i}/qkv/kernel': (d, 3 * d), f'h{i}/qkv/bias': (3 * d,),
        f'h{i}/proj/kernel': (d, d), f'h{i}/proj/bias': (d,),
        f'h{i}/ln2/scale': (d,), f'h{i}/ln2/bias': (d,),
        f'h{i}/fc/kernel': (d, 4 * d), f'h{i}/fc/bias': (4 * d,),
        f'h{i}/out/kernel': (4 * d, d), f'h{i}/out/bias': (d,),
    })
  return shapes


def parameter_count(params) -> int:
  """Every element of a parameter tree (arrays or shape-only stand-ins)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(leaf.size for leaf in jax.tree.leaves(params))


# ------------------------------------------------------------------------------
# Progress.


class SilentProgressBar:
  """The part of tqdm's interface the scripts use, doing nothing."""

  def __init__(self, **kwargs):
    del kwargs

  def update(self, n):
    del n

  def set_postfix(self, **kwargs):
    del kwargs

  def close(self):
    pass


def progress_bar_class(show: bool):
  """``tqdm.tqdm`` when ``show``, else ``SilentProgressBar``."""
  if not show:
    return SilentProgressBar
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm
