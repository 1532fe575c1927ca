"""Hyperball and its aliases against float64 NumPy oracles.

``tests/oracle/hyperball_numpy.py`` (the wrapper, written from the paper's
formula) composed with an inner optimizer computed independently: optax's
own Adam, SOAP's oracle (``tests/oracle/soap_numpy.py``) for ``soap_h``, and
the transcription of the KL authors' step (``tests/oracle/kl_authors_numpy.py``)
for ``kl_soap_h``. Every run moves the parameters (``optax.apply_updates``),
so each call's step depends on the last one's retraction.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import soap_optax
from tests.oracle import hyperball_numpy
from tests.oracle import kl_authors_numpy
from tests.oracle import soap_numpy

CALLS = 8
# Measured: at most 3.4e-14 of each update's largest entry (float64; 2.8e-14
# around Adam, 3.4e-14 SOAP-H, 2.6e-14 KL-SOAP-H).
TOLERANCE = 1e-13


def _params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=shape) for name, shape in shapes.items()}


def _compare(tx, params, inner_updates, reference):
  """Runs ``tx`` on the parameters it moves, and ``reference`` (the oracle)
  with ``inner_updates(call, grads, params)``, the inner optimizer's
  updates computed independently; the largest relative difference."""
  rng = np.random.default_rng(1)
  current = {k: v.copy() for k, v in params.items()}
  state = tx.init(jax.tree.map(jnp.asarray, current))
  update = jax.jit(tx.update)
  worst = 0.0
  for call in range(CALLS):
    grads = {k: rng.normal(size=v.shape) for k, v in current.items()}
    got, state = update(jax.tree.map(jnp.asarray, grads), state,
                        jax.tree.map(jnp.asarray, current))
    expected = reference.step(current,
                              inner_updates(call, grads, current))
    for name in current:
      difference = np.max(np.abs(np.asarray(got[name]) - expected[name]))
      worst = max(worst, difference / max(np.max(np.abs(expected[name])),
                                          1e-300))
      current[name] = current[name] + expected[name]
  return worst, current


def test_hyperball_of_adam_matches_the_oracle(x64):
  """optax's Adam inside, a schedule outside; a masked-out matrix, a vector
  and a stacked 3-D leaf pass through."""
  del x64
  shapes = {'matrix': (6, 4), 'square': (5, 5), 'masked': (3, 3),
            'vector': (4,), 'stacked': (2, 3, 3)}
  params = _params(shapes)
  mask = {'matrix': True, 'square': True, 'masked': False, 'vector': True,
          'stacked': True}
  # A schedule of the count; one IEEE division, so that inside the jitted
  # update and outside it gives the same float32.
  schedule = lambda count: 0.05 / (1.0 + count)
  tx = soap_optax.hyperball(optax.adam(1e-2), schedule, mask=mask)
  adam = optax.adam(1e-2)  # The inner optimizer, run on its own.
  adam_state = adam.init(jax.tree.map(jnp.asarray, params))
  def inner(call, grads, current):
    nonlocal adam_state
    del call
    updates, adam_state = adam.update(jax.tree.map(jnp.asarray, grads),
                                      adam_state)
    return jax.tree.map(np.asarray, updates)
  reference = hyperball_numpy.HyperballReference(
      params, lambda t: float(schedule(jnp.int32(t))), mask=mask)
  worst, final = _compare(tx, params, inner, reference)
  assert worst <= TOLERANCE, worst
  for name in ('matrix', 'square'):  # Still on their spheres.
    np.testing.assert_allclose(np.linalg.norm(final[name]),
                               np.linalg.norm(params[name]), rtol=1e-14)
  assert not np.isclose(np.linalg.norm(final['masked']),
                        np.linalg.norm(params['masked']), rtol=1e-3)


def test_dimension_numbers_make_matrices_of_stacks_and_kernels(x64):
  """A stack with a batch axis keeps one sphere per slice, and a 3-D kernel
  read as a matrix keeps one sphere: against the oracle run on the slices
  and on the reshaped kernel, as 2-D parameters of their own."""
  del x64
  shapes = {'stacked': (3, 4, 5), 'kernel': (4, 2, 3), 'vector': (4,)}
  params = _params(shapes)
  numbers = {'stacked': soap_optax.EigenbasisDimensionNumbers(batch_axes=0),
             'kernel': soap_optax.EigenbasisDimensionNumbers(
                 reduction_axes=0, output_axes=(1, 2)),
             'vector': None}
  tx = soap_optax.hyperball(optax.adam(1e-2), 0.05, dimension_numbers=numbers)
  def as_matrices(tree):
    flat = {f'stacked{i}': tree['stacked'][i] for i in range(3)}
    return dict(flat, kernel=tree['kernel'].reshape(4, 6),
                vector=tree['vector'])
  reference = hyperball_numpy.HyperballReference(as_matrices(params), 0.05)
  adam = optax.adam(1e-2)
  adam_state = adam.init(jax.tree.map(jnp.asarray, params))
  rng = np.random.default_rng(1)
  current = {k: v.copy() for k, v in params.items()}
  state = tx.init(jax.tree.map(jnp.asarray, current))
  worst = 0.0
  for _ in range(CALLS):
    grads = jax.tree.map(jnp.asarray, {k: rng.normal(size=v.shape)
                                       for k, v in current.items()})
    got, state = jax.jit(tx.update)(grads, state,
                                    jax.tree.map(jnp.asarray, current))
    inner, adam_state = adam.update(grads, adam_state)
    expected = reference.step(as_matrices(current), as_matrices(
        jax.tree.map(np.asarray, inner)))
    expected = dict(stacked=np.stack([expected[f'stacked{i}']
                                      for i in range(3)]),
                    kernel=expected['kernel'].reshape(4, 2, 3),
                    vector=expected['vector'])
    for name in current:
      worst = max(worst, np.max(np.abs(np.asarray(got[name]) - expected[name]))
                  / np.max(np.abs(expected[name])))
      current[name] = current[name] + expected[name]
  assert worst <= TOLERANCE, worst
  for i in range(3):  # Each slice on its own sphere.
    np.testing.assert_allclose(np.linalg.norm(current['stacked'][i]),
                               np.linalg.norm(params['stacked'][i]),
                               rtol=1e-14)


def _around_direction_oracles(alias, shapes, make_reference, rate=0.02):
  """``alias(rate)`` against Hyperball's oracle around one direction oracle
  per parameter (``make_reference(shape).step(g)``, the direction that the
  rate's step subtracts): the largest relative difference."""
  params = _params(shapes)
  references = {name: make_reference(shape) for name, shape in shapes.items()}
  def inner(call, grads, current):
    del call, current
    return {name: -rate * references[name].step(g)
            for name, g in grads.items()}
  worst, _ = _compare(alias(rate), params, inner,
                      hyperball_numpy.HyperballReference(params, rate))
  return worst


def test_soap_h_is_hyperball_around_unbiased_soap(x64):
  """SOAP-H's defaults: a refresh every call, b1 = 0.95, b2 = 0.9, no bias
  correction; the vector gets SOAP's (Adam's) update times the rate."""
  del x64
  worst = _around_direction_oracles(
      soap_optax.soap_h, {'matrix': (6, 6), 'square': (4, 4), 'vector': (5,)},
      lambda shape: soap_numpy.SoapReference(
          shape, b1=0.95, b2=0.9, shampoo_beta=None, eps=1e-8, frequency=1,
          max_dim=10000, merge_dims=False, precondition_1d=False,
          bias_correction=False))
  assert worst <= TOLERANCE, worst


def test_kl_soap_h_is_hyperball_around_the_kl_authors_soap(x64):
  """KL-SOAP-H: the authors' KL-SOAP step (b1 = 0.95, b2 = shampoo_beta =
  0.9, a refresh every call) in Hyperball; square matrices, full rank from
  the first gradient on."""
  del x64
  worst = _around_direction_oracles(
      soap_optax.kl_soap_h, {'matrix': (6, 6), 'square': (4, 4)},
      lambda shape: kl_authors_numpy.AuthorsKLOpt(
          shape, klsoap=True, b1=0.95, b2=0.9, shampoo_beta=0.9, eps=1e-8,
          frequency=1))
  assert worst <= TOLERANCE, worst


@pytest.mark.parametrize('alias', ['soap_h', 'kl_soap_h'])
def test_each_wrapped_matrix_stays_on_its_sphere_in_float32(alias):
  """The invariant, in float32 over 20 calls: ``||W|| = ||W_0||`` to float
  rounding after every step; the first call's update is exactly zero."""
  params = jax.tree.map(jnp.asarray, jax.tree.map(
      lambda x: x.astype(np.float32),
      _params({'matrix': (16, 8), 'square': (8, 8), 'vector': (8,)})))
  initial_vector_norm = float(jnp.linalg.norm(params['vector']))
  tx = getattr(soap_optax, alias)(0.05)
  state = tx.init(params)
  update = jax.jit(tx.update)
  radius = {name: float(jnp.linalg.norm(params[name]))
            for name in ('matrix', 'square')}
  rng = np.random.default_rng(2)
  for call in range(20):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = update(grads, state, params)
    if call == 0:
      for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    params = optax.apply_updates(params, updates)
    for name, r in radius.items():
      assert abs(float(jnp.linalg.norm(params[name])) / r - 1) <= 4e-7, (
          call, name)
  # The vector is not wrapped: SOAP's steps move its norm (by 3e-4 here,
  # far above float32's rounding).
  assert abs(float(jnp.linalg.norm(params['vector'])) / initial_vector_norm
             - 1) > 1e-5


def test_a_zero_update_is_no_step():
  params = {'w': jnp.ones((3, 4))}
  tx = soap_optax.hyperball(optax.scale(0.0), 0.1)
  updates, _ = tx.update({'w': jnp.ones((3, 4))}, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(updates['w']), 0.0)


def test_a_zero_matrix_is_refused_at_init_by_name():
  tx = soap_optax.hyperball(optax.adam(1e-3), 0.1)
  with pytest.raises(ValueError, match=r"zero matrix.*\['layer'\]\['kernel'\]"):
    tx.init({'layer': {'kernel': jnp.zeros((4, 3)), 'bias': jnp.zeros(3)}})
  # One zero slice of a stack is refused too.
  with pytest.raises(ValueError, match=r"zero matrix.*\['stack'\]"):
    soap_optax.hyperball(
        optax.adam(1e-3), 0.1,
        dimension_numbers=soap_optax.EigenbasisDimensionNumbers(
            batch_axes=0)).init(
                {'stack': jnp.ones((2, 3, 3)).at[1].set(0.0)})
  # The bias is not a matrix, and a masked-out zero matrix is fine.
  tx = soap_optax.hyperball(optax.adam(1e-3), 0.1, mask={'k': False})
  tx.init({'k': jnp.zeros((4, 3))})


def test_bad_mask_and_missing_params_are_refused():
  params = {'w': jnp.ones((3, 4))}
  with pytest.raises(ValueError, match='mask'):
    soap_optax.hyperball(optax.adam(1e-3), 0.1, mask={'w': 1}).init(params)
  tx = soap_optax.hyperball(optax.adam(1e-3), 0.1)
  with pytest.raises(ValueError, match='params'):
    tx.update(params, tx.init(params))


def test_a_traced_init_cannot_refuse_a_zero_matrix_which_passes_through():
  """Under ``jax.jit(init)`` the values are unknown: a zero matrix is kept
  (radius 0) and gets the inner update unchanged, not a NaN."""
  params = {'zero': jnp.zeros((3, 4)), 'w': jnp.ones((3, 4))}
  tx = soap_optax.hyperball(optax.sgd(0.1), 0.1)
  state = jax.jit(tx.init)(params)
  grads = {'zero': jnp.full((3, 4), 2.0), 'w': jnp.ones((3, 4))}
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(np.asarray(updates['zero']),
                                np.float32(-0.1) * np.float32(2.0))
  assert np.all(np.isfinite(np.asarray(updates['w'])))


def test_a_non_finite_inner_update_stays_non_finite():
  """A NaN the inner optimizer lets through is not turned into a zero step
  (``optax.apply_if_finite`` and the like must still see it)."""
  params = {'w': jnp.ones((3, 4))}
  tx = soap_optax.hyperball(optax.sgd(0.1), 0.1)
  updates, _ = tx.update({'w': jnp.full((3, 4), jnp.nan)}, tx.init(params),
                         params)
  assert np.all(np.isnan(np.asarray(updates['w'])))


@pytest.mark.parametrize('make', [
    lambda: soap_optax.hyperball(optax.adam(1e-3), 0.1),
    lambda: soap_optax.soap_h(1e-2)], ids=['adam', 'soap_h'])
def test_optax_tree_map_params_maps_the_inner_state(make):
  """``optax.tree.map_params`` finds the inner optimizer's parameter-shaped
  trees (Adam's moments) and leaves the radii alone."""
  tx = make()
  params = {'w': jnp.ones((3, 4)), 'b': jnp.ones(4)}
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda x: x + 1.0, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  np.testing.assert_array_equal(np.asarray(mapped.radius[0]),
                                np.asarray(state.radius[0]))
