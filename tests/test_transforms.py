"""Tests of the three transforms against the float64 NumPy oracles.

(Rejection of non-finite gradients is in test_contract.py, over every rule.)
"""

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


def _bases_after_first_call(state, params, name):
  """The library's initial bases of one parameter (for rank-deficient GG).

  Every parameter of these trees is a single unit.
  """
  index = sorted(params).index(name)
  plan = state[0].eigenbasis.plan
  piece, = plan.placements[index].pieces
  bases = plan.split(state[0].eigenbasis.bases)[piece.stack]
  return [np.asarray(q[piece.offset]) for q in bases]


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
    dict(shampoo_beta=None, normalize_grads=False, factored=True),
    dict(shampoo_beta=None, normalize_grads=False, one_sided=True),
    dict(shampoo_beta=0.8, normalize_grads=False, factored=True,
         one_sided=True),
])
def test_soap_matches_numpy_oracle(x64, tree_name, variant):
  """soap / factorized_soap follow the oracle for 31 steps (6 refreshes).

  To 1e-9 relative, with every axis rule of the engine exercised.
  """
  del x64
  variant = dict(variant)
  factored = variant.pop('factored', False)
  one_sided = variant.pop('one_sided', False)
  tree = TREES[tree_name]
  rng = np.random.default_rng(0)
  problems = {k: _make_problem(s, rng) for k, s in tree['shapes'].items()}
  # A schedule that stays float64 under jit (optax's built-in schedules round
  # through float32, which would blur a 1e-9 comparison).
  learning_rate = lambda count: 0.05 / (1.0 + 0.1 * count)
  weight_decay = 0.1
  alias = soap_optax.factorized_soap if factored else soap_optax.soap
  opt = alias(
      learning_rate=learning_rate, weight_decay=weight_decay,
      one_sided=one_sided, **ADAM, **variant, **tree['options'])

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
        shared = (_bases_after_first_call(state, params, k)
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
            initial_bases=shared, one_sided=one_sided, factored=factored)
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


# ------------------------------------------------------------------------------
# Behaviour that every update must have.

MIXED_PARAMS = {
    'dense': jnp.ones((8, 16)),
    'conv': jnp.ones((3, 3, 4, 8)),
    'bias': jnp.ones((16,)),
    'scale': jnp.ones(()),
}


def _random_like(tree, seed, dtype=None):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([
      jax.random.normal(k, x.shape, dtype or x.dtype)
      for k, x in zip(keys, leaves)])


def test_update_is_jitted_once_and_never_retraces():
  opt = soap_optax.soap(precondition_frequency=2)
  state = opt.init(MIXED_PARAMS)
  params = MIXED_PARAMS
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(7):
    params, state = step(params, state, _random_like(params, i))
  assert len(traces) == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_first_call_returns_zeros_and_later_calls_do_not():
  opt = soap_optax.scale_by_rotated_adam()
  state = opt.init(MIXED_PARAMS)
  updates, state = opt.update(_random_like(MIXED_PARAMS, 0), state)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  for mu in state.mu:  # t stays 0: no moment yet.
    np.testing.assert_array_equal(np.asarray(mu), 0.0)
  updates, _ = opt.update(_random_like(MIXED_PARAMS, 1), state)
  for leaf in jax.tree.leaves(updates):
    assert float(jnp.max(jnp.abs(leaf))) > 0.0


def test_bfloat16_parameters_keep_float32_statistics():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), MIXED_PARAMS)
  opt = soap_optax.soap(precondition_frequency=1)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for i in range(4):
    grads = _random_like(params, i, jnp.bfloat16)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves(updates) + jax.tree.leaves(params):
    assert leaf.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(leaf)))
  inner = state[0]
  for leaf in jax.tree.leaves((inner.mu, inner.nu, inner.eigenbasis.stats,
                               inner.eigenbasis.bases)):
    assert leaf.dtype == jnp.float32


def test_float64_run_is_float64_throughout(x64):
  del x64
  params = jax.tree.map(lambda x: x.astype(jnp.float64), MIXED_PARAMS)
  opt = soap_optax.scale_by_rotated_adam(precondition_frequency=1)
  state = opt.init(params)
  for i in range(3):
    updates, state = opt.update(_random_like(params, i), state)
  for leaf in jax.tree.leaves((updates, state.mu, state.nu,
                               state.eigenbasis.stats, state.eigenbasis.bases)):
    assert leaf.dtype == jnp.float64


def test_zero_gradients_give_finite_updates():
  opt = soap_optax.soap(precondition_frequency=1)
  state = opt.init(MIXED_PARAMS)
  zeros = jax.tree.map(jnp.zeros_like, MIXED_PARAMS)
  update = jax.jit(opt.update)
  for _ in range(4):
    updates, state = update(zeros, state, MIXED_PARAMS)
    for leaf in jax.tree.leaves((updates, state)):
      assert bool(jnp.all(jnp.isfinite(leaf)))


def test_state_round_trips_through_flatten_and_unflatten():
  opt = soap_optax.soap(precondition_frequency=1)
  state = opt.init(MIXED_PARAMS)
  _, state = opt.update(_random_like(MIXED_PARAMS, 0), state, MIXED_PARAMS)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  rebuilt = jax.tree_util.tree_unflatten(
      treedef, [np.asarray(x) for x in leaves])
  assert jax.tree_util.tree_structure(rebuilt) == treedef
  grads = _random_like(MIXED_PARAMS, 1)
  expected, _ = opt.update(grads, state, MIXED_PARAMS)
  got, _ = opt.update(grads, jax.tree.map(jnp.asarray, rebuilt), MIXED_PARAMS)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('bucket_padding, sizes', [(None, 3), (0.1, 2)])
def test_update_launches_one_eigh_and_one_qr_per_solver_size(
    bucket_padding, sizes):
  from tests.test_engine import count_primitives
  params = {'a': jnp.zeros((8, 16)), 'b': jnp.zeros((16, 8)),
            'c': jnp.zeros((8, 8)), 'd': jnp.zeros((4, 8, 16))}
  opt = soap_optax.scale_by_rotated_adam(bucket_padding=bucket_padding)
  state = opt.init(params)
  jaxpr = jax.make_jaxpr(opt.update)(params, state).jaxpr
  # Factor sizes 4, 8, 16 (1, 4, 3 factors); by default the factor of size
  # 4 is solved padded to 8 (adds 448 of the tree's 14,400 work, d^3 each).
  assert count_primitives(jaxpr, 'eigh') == sizes
  # Per size: the power step's QR, and one in canonical_null_space after
  # each solver (in a switch that skips it on full-rank factors).
  assert count_primitives(jaxpr, 'qr') == 3 * sizes


@pytest.mark.parametrize('kwargs, name', [
    (dict(b1=1.0), 'b1'), (dict(b1=-0.1), 'b1'), (dict(b2=1.5), 'b2'),
    (dict(shampoo_beta=1.0), 'shampoo_beta'), (dict(eps=-1e-8), 'eps'),
    (dict(eps=float('nan')), 'eps'),
    (dict(precondition_frequency=0), 'precondition_frequency'),
    (dict(precondition_frequency=2.5), 'precondition_frequency'),
    (dict(max_precond_dim=-1), 'max_precond_dim'),
])
def test_bad_hyperparameters_raise_at_construction(kwargs, name):
  with pytest.raises(ValueError, match=name):
    soap_optax.scale_by_rotated_adam(**kwargs)
  with pytest.raises(ValueError, match=name):
    soap_optax.soap(**kwargs)


def test_non_float_parameters_raise_at_init():
  opt = soap_optax.soap()
  with pytest.raises(ValueError, match=r"params.*\['step'\].*int32"):
    opt.init({'w': jnp.ones((2, 2)), 'step': jnp.zeros((), jnp.int32)})


# ------------------------------------------------------------------------------
# Shampoo and Adafactor in the eigenbasis.

from tests.oracle import shampoo_numpy  # pylint: disable=g-import-not-at-top


def _gradient_stream(shapes, steps, seed):
  rng = np.random.default_rng(seed)
  return [{k: rng.normal(size=s) for k, s in shapes.items()}
          for _ in range(steps)]


def _max_relative_error(got, expected):
  scale = max(np.max(np.abs(expected)), 1e-300)
  return np.max(np.abs(np.asarray(got) - expected)) / scale


IDENTITY_SHAPES = {'square': (6, 6), 'cube': (3, 4, 5), 'vector': (7,),
                   'scalar': (), 'long_axis': (3, 40), 'wide': (4, 9)}


@pytest.mark.parametrize('options', [
    dict(),
    dict(precondition_1d=True, max_precond_dim=20),
    dict(merge_dims=True, max_precond_dim=12),
])
def test_shampoo_half_equals_adafactor_in_eigenbasis(x64, options):
  """The SOAP paper's identity through the public API, float64, 25 steps."""
  del x64
  beta = 0.9
  shampoo = soap_optax.scale_by_shampoo_eigenbasis(
      shampoo_beta=beta, exponent=0.5, trace_normalize=True,
      precondition_frequency=1, eps=0.0, **options)
  adafactor = soap_optax.scale_by_adafactor_in_eigenbasis(
      b2=beta, precondition_frequency=1, eps=0.0, **options)
  params = {k: jnp.zeros(s) for k, s in IDENTITY_SHAPES.items()}
  s_state, a_state = shampoo.init(params), adafactor.init(params)
  s_update, a_update = jax.jit(shampoo.update), jax.jit(adafactor.update)
  for grads in _gradient_stream(IDENTITY_SHAPES, 25, seed=1):
    grads = jax.tree.map(jnp.asarray, grads)
    s_out, s_state = s_update(grads, s_state)
    a_out, a_state = a_update(grads, a_state)
    for k in IDENTITY_SHAPES:
      assert _max_relative_error(a_out[k], np.asarray(s_out[k])) < 1e-10, k


def test_identity_breaks_between_refreshes(x64):
  """At frequency 5 Adafactor's statistics move while classic Shampoo's are
  frozen."""
  del x64
  shampoo = soap_optax.scale_by_shampoo_eigenbasis(
      shampoo_beta=0.9, precondition_frequency=5, eps=0.0,
      rayleigh_floor=False)
  adafactor = soap_optax.scale_by_adafactor_in_eigenbasis(
      b2=0.9, precondition_frequency=5, eps=0.0)
  params = {'w': jnp.zeros((6, 6))}
  s_state, a_state = shampoo.init(params), adafactor.init(params)
  errors = []
  for grads in _gradient_stream({'w': (6, 6)}, 10, seed=2):
    grads = jax.tree.map(jnp.asarray, grads)
    s_out, s_state = shampoo.update(grads, s_state)
    a_out, a_state = adafactor.update(grads, a_state)
    errors.append(_max_relative_error(a_out['w'], np.asarray(s_out['w'])))
  assert errors[0] < 1e-10 and errors[5] < 1e-10  # refresh calls agree.
  assert min(errors[1:5] + errors[6:]) > 1e-3     # the others do not.


SHAMPOO_ORACLE_SHAPES = {'a': (6, 6), 'b': (5, 7), 'c': (3, 4, 5)}


@pytest.mark.parametrize('exponent, trace_normalize', [
    (0.5, True), (0.25, False), (0.25, True)])
@pytest.mark.parametrize('frequency, refresh, rayleigh_floor', [
    (1, 'eigh', True), (3, 'eigh', False), (3, 'qr', False), (3, 'eigh', True),
    (3, 'qr', True)])
def test_shampoo_matches_matrix_power_oracle(
    x64, exponent, trace_normalize, frequency, refresh, rayleigh_floor):
  """One optimizer over the three shapes (one stack each: the same as three
  separate runs), one oracle per shape."""
  del x64
  opt = soap_optax.scale_by_shampoo_eigenbasis(
      shampoo_beta=0.8, exponent=exponent, eps=1e-6,
      precondition_frequency=frequency, trace_normalize=trace_normalize,
      refresh=refresh, rayleigh_floor=rayleigh_floor)
  oracles = {name: shampoo_numpy.ShampooReference(
      shape, beta=0.8, exponent=exponent, eps=1e-6, frequency=frequency,
      trace_normalize=trace_normalize, refresh=refresh,
      rayleigh_floor=rayleigh_floor)
             for name, shape in SHAMPOO_ORACLE_SHAPES.items()}
  state = opt.init({name: jnp.zeros(shape)
                    for name, shape in SHAMPOO_ORACLE_SHAPES.items()})
  update = jax.jit(opt.update)
  for i, grads in enumerate(
      _gradient_stream(SHAMPOO_ORACLE_SHAPES, 10, seed=3)):
    out, state = update(jax.tree.map(jnp.asarray, grads), state)
    plan = state.eigenbasis.plan
    bases = plan.split(state.eigenbasis.bases)
    for name, oracle in oracles.items():
      expected = oracle.step(grads[name])
      if i == 0 or (rayleigh_floor and i % frequency == 0):
        # The power iteration is warm-started from the first basis, and the
        # Rayleigh floor reads the basis, which a rank-deficient factor (5x7:
        # the 7x7 one) does not determine: share it.
        stack = plan.placements[sorted(oracles).index(name)].pieces[0].stack
        oracle.share_bases([q[0] for q in bases[stack]])
      assert _max_relative_error(out[name], expected) < 1e-9, (name, i)


@pytest.mark.parametrize('shape', [(6, 6), (3, 4, 5)])
@pytest.mark.parametrize('frequency, refresh', [(1, 'eigh'), (4, 'eigh'),
                                                (4, 'qr')])
def test_adafactor_in_eigenbasis_matches_oracle(x64, shape, frequency,
                                                refresh):
  del x64
  opt = soap_optax.scale_by_adafactor_in_eigenbasis(
      b2=0.85, eps=1e-12, precondition_frequency=frequency, refresh=refresh)
  oracle = shampoo_numpy.AdafactorInEigenbasisReference(
      shape, b2=0.85, eps=1e-12, frequency=frequency, refresh=refresh)
  state = opt.init({'w': jnp.zeros(shape)})
  update = jax.jit(opt.update)
  for i, grads in enumerate(_gradient_stream({'w': shape}, 13, seed=4)):
    out, state = update({'w': jnp.asarray(grads['w'])}, state)
    expected = oracle.step(grads['w'])
    assert _max_relative_error(out['w'], expected) < 1e-9, i


def test_whitening_view_idealized_soap_equals_idealized_shampoo(x64):
  """Theorem 1 of the whitening paper, with the library's Shampoo.

  For a gradient covariance ``Σ = (R ⊗ L) / tr(L)`` (``tr L = tr R``), the
  whitened gradient ``Σ^{-1/2} g`` equals idealized SOAP (Adam's diagonal
  normalization by the exact second moment in the Kronecker eigenbasis) and
  the library's Shampoo^(1/2) and Adafactor-in-eigenbasis updates when their
  statistics are exactly ``L`` and ``R``.
  """
  del x64
  rng = np.random.default_rng(5)
  m, n = 5, 4

  def spd(d):
    a = rng.normal(size=(d, d))
    s = a @ a.T + 0.1 * np.eye(d)
    return s / np.trace(s)

  left, right = spd(m), spd(n)
  sigma = np.kron(right, left) / np.trace(left)  # column-major vec(G).
  grad = rng.normal(size=(m, n))
  g = grad.reshape(-1, order='F')

  w, v = np.linalg.eigh(sigma)
  whitened = (v @ ((v.T @ g) / np.sqrt(w))).reshape((m, n), order='F')

  q = np.kron(np.linalg.eigh(right)[1], np.linalg.eigh(left)[1])
  second_moment = np.diag(q.T @ sigma @ q)  # diag(E[g' g'^T]).
  soap_direction = (q @ ((q.T @ g) / np.sqrt(second_moment))).reshape(
      (m, n), order='F')
  np.testing.assert_allclose(soap_direction, whitened, rtol=0, atol=1e-10)

  beta = 0.5
  # Statistics chosen so that, once the call absorbs ``grad``, they are
  # exactly L and R.
  stats = ((left - (1 - beta) * grad @ grad.T) / beta,
           (right - (1 - beta) * grad.T @ grad) / beta)
  for opt in (soap_optax.scale_by_shampoo_eigenbasis(
                  shampoo_beta=beta, eps=0.0),
              soap_optax.scale_by_adafactor_in_eigenbasis(b2=beta, eps=0.0)):
    state = opt.init({'w': jnp.zeros((m, n))})
    state = state._replace(eigenbasis=state.eigenbasis._replace(
        stats=tuple(jnp.asarray(s)[None] for s in stats)))
    out, _ = opt.update({'w': jnp.asarray(grad)}, state)
    np.testing.assert_allclose(np.asarray(out['w']), whitened, rtol=0,
                               atol=1e-10)


@pytest.mark.parametrize('factory', [
    soap_optax.scale_by_shampoo_eigenbasis,
    soap_optax.scale_by_adafactor_in_eigenbasis,
])
def test_eigenbasis_transforms_are_finite_on_zero_gradients_and_bf16(factory):
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), MIXED_PARAMS)
  opt = factory(precondition_frequency=2)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for i in range(4):
    grads = (jax.tree.map(jnp.zeros_like, params) if i < 2
             else _random_like(params, i, jnp.bfloat16))
    updates, state = update(grads, state)
    for leaf in jax.tree.leaves(updates):
      assert leaf.dtype == jnp.bfloat16
      assert bool(jnp.all(jnp.isfinite(leaf)))
  assert update._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize('factory, kwargs, name', [
    (soap_optax.scale_by_shampoo_eigenbasis, dict(refresh='svd'), 'refresh'),
    (soap_optax.scale_by_shampoo_eigenbasis, dict(exponent=-0.5), 'exponent'),
    (soap_optax.scale_by_shampoo_eigenbasis, dict(shampoo_beta=1.0),
     'shampoo_beta'),
    (soap_optax.scale_by_adafactor_in_eigenbasis, dict(refresh='x'),
     'refresh'),
    (soap_optax.scale_by_adafactor_in_eigenbasis, dict(eps=-1.0), 'eps'),
    (soap_optax.scale_by_adafactor_in_eigenbasis,
     dict(precondition_frequency=0), 'precondition_frequency'),
])
def test_eigenbasis_transforms_reject_bad_arguments(factory, kwargs, name):
  with pytest.raises(ValueError, match=name):
    factory(**kwargs)
