"""Section ``versus_torch``: soap_optax side by side with PyTorch SOAPs.

soap_optax (default, ``block_size``, ``staggered_refresh``) and the PyTorch
SOAPs that are installed (the optional ``torch-bench`` extra:
pytorch-optimizer, HeavyBall; ``--torch-soap-file`` for the authors'
``soap.py``), float32 on the CPU, with the same settings, on the layouts
issue's transformer-like set: mean step, median step and the refresh spike
(the median over 10-step windows of each window's slowest step, whichever
step an implementation refreshes on). ``--quick`` times soap_optax alone on
a small set.
"""

import importlib.util
import os
import statistics
import time

import jax
import optax

from benchmark_sections import shared

TITLE = 'Side by side with PyTorch SOAPs'

# The transformer-like set of the layouts issue: an embedding, attention and
# MLP matrices of one layer, two vectors.
VERSUS_TORCH_SHAPES = {
    'embedding': (2048, 256), 'q': (256, 256), 'k': (256, 256),
    'v': (256, 256), 'o': (256, 256), 'up': (256, 1024), 'down': (1024, 256),
    'scale': (256,), 'bias': (256,)}
QUICK_SHAPES = {'embedding': (256, 32), 'w': (32, 32), 'up': (32, 128),
                'bias': (32,)}
VERSUS_TORCH_JAX = (
    ('soap_optax', {}),
    ('soap_optax staggered_refresh', dict(staggered_refresh=True)),
    ('soap_optax block_size=1024', dict(block_size=1024)),
    ('soap_optax block_size=1024, staggered', dict(
        block_size=1024, staggered_refresh=True)),
    ('soap_optax block_size=512', dict(block_size=512)),
    ('soap_optax block_size=512, staggered', dict(
        block_size=512, staggered_refresh=True)),
)
FREQUENCY = shared.FREQUENCY


def window_stats(seconds, window: int = FREQUENCY) -> dict:
  """Mean step, median step, and the median over windows of ``window`` steps
  of each window's slowest step (the refresh spike, whichever step of the
  window an implementation refreshes on)."""
  windows = [seconds[i:i + window]
             for i in range(0, len(seconds) - window + 1, window)]
  spike = statistics.median([max(w) for w in windows])
  return dict(mean_s=sum(seconds) / len(seconds),
              median_s=statistics.median(seconds), spike_s=spike,
              spike_over_median=spike / statistics.median(seconds))


def time_jax_soap(shapes, steps, layout) -> list[float]:
  """Seconds of ``steps`` jitted SOAP steps (update + apply), after a warm-up
  of one refresh period."""
  tx = shared.make_optimizer('soap', learning_rate=3e-3, **layout)
  params = shared.random_tree(shapes, 0)
  grads = [shared.random_tree(shapes, 10 + i, scale=1e-2) for i in range(4)]

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for k in range(FREQUENCY):  # compile, initialize, one refresh: warm-up.
    params, state = jax.block_until_ready(step(params, state, grads[k % 4]))
  seconds = []
  for k in range(steps):
    tick = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, grads[k % 4]))
    seconds.append(time.perf_counter() - tick)
  return seconds


def torch_optimizers(soap_file) -> dict:
  """``name -> factory(params)`` for the PyTorch SOAPs that are installed,
  with the settings of ``soap_optax.soap`` (frequency 10, max_precond_dim
  10000, no merge_dims, betas 0.95/0.95, eps 1e-8, weight decay 0.01)."""
  factories = {}
  settings = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, eps=1e-8,
                  precondition_frequency=FREQUENCY)
  try:
    import pytorch_optimizer  # pylint: disable=g-import-not-at-top
    factories['pytorch-optimizer SOAP'] = lambda p: pytorch_optimizer.SOAP(
        p, max_precondition_dim=shared.MAX_PRECOND_DIM, **settings)
  except ImportError:
    pass
  try:
    import heavyball  # pylint: disable=g-import-not-at-top
    factories['HeavyBall SOAP (torch.compile)'] = lambda p: heavyball.SOAP(
        p, max_precond_dim=shared.MAX_PRECOND_DIM, merge_dims=False,
        use_precond_schedule=False, **settings)
  except ImportError:
    pass
  if soap_file:
    spec = importlib.util.spec_from_file_location('authors_soap', soap_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    factories['authors\' SOAP (PyTorch, eager)'] = lambda p: module.SOAP(
        p, max_precond_dim=shared.MAX_PRECOND_DIM, **settings)
  return factories


def time_torch_soap(factory, shapes, steps) -> list[float]:
  """Seconds of ``steps`` PyTorch optimizer steps, after two refresh periods
  (HeavyBall compiles in its first calls)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes.values()]
  grads = [[1e-2 * torch.randn(*s) for s in shapes.values()] for _ in range(4)]
  optimizer = factory(params)

  def step(k):
    for p, g in zip(params, grads[k % 4]):
      p.grad = g.clone()
    optimizer.step()

  for k in range(2 * FREQUENCY):  # compile (HeavyBall), first refreshes.
    step(k)
  seconds = []
  for k in range(steps):
    tick = time.perf_counter()
    step(k)
    seconds.append(time.perf_counter() - tick)
  return seconds


def run(torch_soap_file, quick: bool) -> dict:
  """soap_optax's variants, then every installed PyTorch SOAP (not with
  ``quick``); a PyTorch SOAP that fails is reported as a row with its
  error."""
  shapes = QUICK_SHAPES if quick else VERSUS_TORCH_SHAPES
  steps = 2 * FREQUENCY if quick else 4 * FREQUENCY
  rows = []
  for label, layout in VERSUS_TORCH_JAX[:1] if quick else VERSUS_TORCH_JAX:
    print(f'  versus_torch: {label}', flush=True)
    rows.append(dict(implementation=label, **window_stats(
        time_jax_soap(shapes, steps, layout))))
  if not quick:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(os.cpu_count() or 1)
      torch_version = torch.__version__
    except ImportError:
      torch_version = None
    if torch_version:
      for label, factory in torch_optimizers(torch_soap_file).items():
        print(f'  versus_torch: {label}', flush=True)
        try:
          rows.append(dict(implementation=label, **window_stats(
              time_torch_soap(factory, shapes, steps))))
        except Exception as error:  # pylint: disable=broad-except
          rows.append(dict(implementation=label, error=repr(error)[:200]))
  base = rows[0]['mean_s']
  for r in rows:
    if 'mean_s' in r:
      r['mean_over_soap_optax'] = r['mean_s'] / base
  return dict(rows=rows, shapes={k: list(v) for k, v in shapes.items()},
              torch=None if quick else torch_version)


def table(section) -> str:
  lines = [f'PyTorch: {section["torch"] or "not installed"}.', '',
           '| implementation | mean step ms | median step ms | refresh spike ms '
           '| spike / median | mean / soap_optax |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in section['rows']:
    if 'error' in r:
      lines.append(f'| {r["implementation"]} | failed: {r["error"]} | | | | |')
      continue
    lines.append(
        f'| {r["implementation"]} | {1e3 * r["mean_s"]:.1f} | '
        f'{1e3 * r["median_s"]:.1f} | {1e3 * r["spike_s"]:.1f} | '
        f'{r["spike_over_median"]:.2f} | {r["mean_over_soap_optax"]:.2f} |')
  return '\n'.join(lines)
