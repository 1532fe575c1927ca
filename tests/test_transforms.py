"""Tests of soap_optax._transforms against the float64 NumPy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import soap_optax
from tests.oracle import soap_numpy


def _loss_gradient(param, problem, call):
  """Gradient of 0.5 ||P x_i A_i - T||^2 + 0.1 sum(log cosh P), in NumPy.

  Plus seeded minibatch-like noise that depends only on ``call``, so the
  library and the oracle see the same noise along their own trajectories.
  (Without it the second gradient equals the first, which is exactly diagonal
  in its own eigenbasis: its off-diagonal entries would be pure round-off.)
  """
  p = np.asarray(param, np.float64)
  noise = problem['noise'][call]
  residual = p
  for axis, a in enumerate(problem['mixers']):
    residual = soap_numpy.mode_product(residual, a, axis)
  residual = residual - problem['target']
  grad = residual
  for axis, a in enumerate(problem['mixers']):
    grad = soap_numpy.mode_product(grad, a.T, axis)
  return grad + 0.1 * np.tanh(p) + noise


def _make_problem(shape, rng):
  mixers = [rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d) for d in shape]
  return {
      'init': rng.normal(size=shape),
      'target': rng.normal(size=shape),
      'mixers': mixers,
      'noise': 0.3 * rng.normal(size=(32,) + tuple(shape)),
  }


# Each tree is optimized by one optimizer, so factors of equal size from
# different parameters are refreshed in the same batch.
TREES = {
    'default_axes': dict(
        shapes={'square': (6, 6), 'wide': (5, 8), 'cube': (3, 4, 5),
                'vector': (7,), 'scalar': ()},
        options=dict(max_precond_dim=10000, merge_dims=False,
                     precondition_1d=False)),
    'precondition_1d': dict(
        shapes={'vector': (7,), 'square': (5, 5)},
        options=dict(max_precond_dim=10000, merge_dims=False,
                     precondition_1d=True)),
    'max_dim_and_merge': dict(
        shapes={'long_axis': (4, 20), 'merged': (2, 3, 8, 5),
                'square': (6, 6)},
        options=dict(max_precond_dim=10, merge_dims=True,
                     precondition_1d=False)),
    'long_axis_no_merge': dict(
        shapes={'long_axis': (4, 20), 'cube': (3, 12, 4)},
        options=dict(max_precond_dim=10, merge_dims=False,
                     precondition_1d=False)),
}

ADAM = dict(b1=0.9, b2=0.95, eps=1e-8, precondition_frequency=5)


def _bases_after_first_call(state, name):
  """The library's initial bases of one parameter (for rank-deficient GG)."""
  factors = state[0].eigenbasis.factors[name]
  return [np.asarray(q) for q in factors.bases]


def _first_factor_is_rank_deficient(shape, options):
  """True when one gradient cannot make every factor full rank."""
  oracle = soap_numpy.SoapReference(
      shape, b1=0.9, b2=0.9, shampoo_beta=None, eps=0.0, frequency=1,
      max_dim=options['max_precond_dim'], merge_dims=options['merge_dims'],
      precondition_1d=options['precondition_1d'])
  n = int(np.prod(oracle.work_shape)) if oracle.work_shape else 1
  return any(n // oracle.work_shape[a] < oracle.work_shape[a]
             for a in oracle.axes)


@pytest.mark.parametrize('tree_name', sorted(TREES))
@pytest.mark.parametrize('variant', [
    dict(shampoo_beta=None, normalize_grads=False),
    dict(shampoo_beta=0.8, normalize_grads=False),
    dict(shampoo_beta=None, normalize_grads=True),
])
def test_soap_matches_numpy_oracle(x64, tree_name, variant):
  """soap() follows the oracle for 31 steps (6 refreshes), to 1e-9 relative."""
  del x64
  tree = TREES[tree_name]
  rng = np.random.default_rng(0)
  problems = {k: _make_problem(s, rng) for k, s in tree['shapes'].items()}
  # A schedule that stays float64 under jit (optax's built-in schedules round
  # through float32, which would blur a 1e-9 comparison).
  learning_rate = lambda count: 0.05 / (1.0 + 0.1 * count)
  weight_decay = 0.1
  opt = soap_optax.soap(
      learning_rate=learning_rate, weight_decay=weight_decay,
      **ADAM, **variant, **tree['options'])

  params = {k: jnp.asarray(p['init']) for k, p in problems.items()}
  state = opt.init(params)
  update = jax.jit(opt.update)
  ref_params = {k: p['init'].copy() for k, p in problems.items()}
  oracles = {}

  for call in range(32):
    grads = {k: _loss_gradient(params[k], problems[k], call)
             for k in problems}
    updates, state = update(jax.tree.map(jnp.asarray, grads), state, params)
    params = optax.apply_updates(params, updates)
    if call == 0:
      for k, shape in tree['shapes'].items():
        shared = (_bases_after_first_call(state, k)
                  if _first_factor_is_rank_deficient(shape, tree['options'])
                  else None)
        oracles[k] = soap_numpy.SoapReference(
            shape, b1=ADAM['b1'], b2=ADAM['b2'],
            shampoo_beta=variant['shampoo_beta'], eps=ADAM['eps'],
            frequency=ADAM['precondition_frequency'],
            max_dim=tree['options']['max_precond_dim'],
            merge_dims=tree['options']['merge_dims'],
            precondition_1d=tree['options']['precondition_1d'],
            normalize_grads=variant['normalize_grads'],
            initial_bases=shared)
    lr = float(learning_rate(call))
    for k in problems:
      ref_grad = _loss_gradient(ref_params[k], problems[k], call)
      direction = oracles[k].step(ref_grad)
      if call == 0:
        expected = np.zeros_like(ref_params[k])
      else:
        expected = -lr * (direction + weight_decay * ref_params[k])
      ref_params[k] = ref_params[k] + expected
      got = np.asarray(updates[k])
      assert got.dtype == np.float64
      scale = max(np.max(np.abs(expected)), 1e-300)
      np.testing.assert_array_less(
          np.max(np.abs(got - expected)) / scale, 1e-9,
          err_msg=f'{k} at call {call}')
  assert int(state[0].eigenbasis.count) == 32
