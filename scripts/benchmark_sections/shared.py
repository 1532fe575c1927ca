"""What several benchmark sections share: the optimizers and their settings,
the parameter sets, and the FLOP count of a SOAP step.

* :data:`OPTIMIZERS` and :func:`make_optimizer`: the optimizers compared
  (names of ``optimizers.OPTIMIZERS``), each with its library defaults at
  refresh frequency :data:`FREQUENCY`.
* :func:`scanned_transformer_shapes`: ``common.transformer_shapes`` (a
  GPT-style parameter set as ``name -> shape``; the memory section's
  closed-form checks, GPT-2 small's included, are written against those
  shapes) with its layers stacked, and :func:`layer_axis_numbers` for it.
* :func:`rotated_axes` and :func:`step_flops`: which axes SOAP rotates under
  the aliases' defaults, and the matrix-product flops of one regular step.
* :func:`random_tree` and :func:`abstract_tree`: arrays or shape-only
  stand-ins for a parameter set.
* :func:`summarize_calls`: regular and refresh calls of a timed loop apart.
"""

import statistics

import common
import jax
import jax.numpy as jnp
import optax
import optimizers

import soap_optax
from benchmark_sections import FREQUENCY

OPTIMIZERS = optimizers.check_names(
    ('adamw', 'soap', 'shampoo', 'factorized_soap', 'soap_one_sided'))
FULL_SHAPES = ((256, 1024), (512, 512), (1024, 1024), (1024, 4096))
QUICK_SHAPES = ((32, 64),)
MAX_PRECOND_DIM = 10000  # the aliases' default
# GPT-2 small's sizes: d_model, layers, vocabulary, sequence.
GPT2_SMALL = (768, 12, 50257, 1024)


def rotated_axes(shape, one_sided: bool) -> tuple[int, ...]:
  """Lengths of the axes SOAP rotates (the aliases' defaults: max_precond_dim
  10000, no precondition_1d, no merge_dims)."""
  if len(shape) < 2:
    return ()
  axes = tuple(n for n in shape if n <= MAX_PRECOND_DIM)
  if one_sided and len(axes) > 1:
    axes = (min(axes),)
  return axes


def numel(shape) -> int:
  total = 1
  for n in shape:
    total *= n
  return total


def step_flops(shapes, one_sided: bool = False) -> int:
  """Matrix-product flops of one regular step: ``6 * numel * sum(d_i)``.

  Per rotated axis of length ``d``: rotating in, rotating out and the factor
  product each cost ``2 * numel * d``.
  """
  return sum(6 * numel(s) * sum(rotated_axes(s, one_sided)) for s in shapes)


def single_matrix_sets(quick: bool) -> dict:
  """``'m x n' -> {'w': (m, n)}`` for the sizes of the step and memory
  sections."""
  return {f'{m}x{n}': {'w': (m, n)}
          for m, n in (QUICK_SHAPES if quick else FULL_SHAPES)}


def small_transformer_shapes(quick: bool) -> dict:
  """The step and memory sections' small transformer (d 256, 4 layers;
  d 32, 1 layer with ``--quick``)."""
  return (common.transformer_shapes(32, 1, 256, 32) if quick else
          common.transformer_shapes(256, 4, 256, 256))


def scanned_transformer_shapes(d: int, layers: int, vocab: int, seq: int):
  """``common.transformer_shapes`` with the layers stacked: ``h/...`` leaves
  get a leading ``layers`` axis, as ``nnx.scan``/``nn.scan`` keep them."""
  shapes = dict(common.transformer_shapes(d, 0, vocab, seq))
  for name, shape in common.transformer_shapes(d, 1, vocab, seq).items():
    if name.startswith('h0/'):
      shapes['h/' + name[3:]] = (layers,) + shape
  return shapes


def layer_axis_numbers(params):
  """``dimension_numbers`` for :func:`scanned_transformer_shapes`."""
  return {name: soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
          if name.startswith('h/') else None for name in params}


def make_optimizer(name: str, frequency: int = FREQUENCY,
                   learning_rate: float = 1e-3, **layout):
  """Each optimizer with its library defaults (shampoo: eigh refresh, Adam
  grafting, momentum; 'muon': optax's Muon with its default routing, one
  rate for both parts). ``layout`` (``dimension_numbers``, ``block_size``,
  ``mu_dtype``, ``one_sided``) goes to the eigenbasis optimizers, less
  ``mu_dtype`` where the alias has none (shampoo)."""
  if name == optimizers.ADAMW:
    return optax.adamw(learning_rate, mu_dtype=layout.get('mu_dtype'))
  if name == 'muon':
    return optax.contrib.muon(learning_rate)
  if not optimizers.takes_option(name, 'mu_dtype'):
    layout.pop('mu_dtype', None)
  return optimizers.make_eigenbasis_optimizer(
      name, learning_rate, precondition_frequency=frequency, **layout)


def random_tree(shapes: dict, seed: int, scale: float = 1.0):
  """``name -> scale * N(0, 1)`` array of each shape."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {name: scale * jax.random.normal(k, shape)
          for k, (name, shape) in zip(keys, shapes.items())}


def abstract_tree(shapes: dict):
  """``name -> float32 ShapeDtypeStruct``: no memory allocated."""
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def summarize_calls(name: str, seconds_by_call) -> dict:
  """Median regular-call and refresh-call seconds, their counts and the mean
  over all calls. Calls are numbered from 1; call ``k`` refreshes the bases
  when ``k % FREQUENCY == 0``, for every eigenbasis optimizer here (never
  for AdamW)."""
  regular, refresh = [], []
  for k, seconds in enumerate(seconds_by_call, start=1):
    (refresh if name != 'adamw' and k % FREQUENCY == 0 else regular).append(
        seconds)
  return dict(regular_s=statistics.median(regular), regular_n=len(regular),
              refresh_s=statistics.median(refresh) if refresh else None,
              refresh_n=len(refresh),
              mean_s=(sum(regular) + sum(refresh)) / len(seconds_by_call))
