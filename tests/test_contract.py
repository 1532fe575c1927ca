"""The contract every rule of the skeleton keeps (the idea of optax's
``contrib/_common_test.py``), run over every transform and alias.

Adding a rule means adding it to ``TRANSFORMS`` (and its alias to
``ALIASES``).

One tree holds a 1-D, a 2-D, a stacked (batch axis) and a blocked parameter
(cut into four 8 x 8 blocks).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import soap_optax
from soap_optax import _state

BLOCK_SIZE = 8


ENGINE = dict(
    dimension_numbers={
        'vector': None, 'matrix': None, 'blocked': None,
        'stacked': soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))},
    block_size=BLOCK_SIZE)

# name -> factory(precondition_frequency) of the transform.
TRANSFORMS = {
    'rotated_adam': functools.partial(soap_optax.scale_by_rotated_adam,
                                      **ENGINE),
    'rotated_adam_factored': functools.partial(
        soap_optax.scale_by_rotated_adam, factored=True, **ENGINE),
    'shampoo_eigenbasis': functools.partial(
        soap_optax.scale_by_shampoo_eigenbasis, refresh='qr', **ENGINE),
    'adafactor_in_eigenbasis': functools.partial(
        soap_optax.scale_by_adafactor_in_eigenbasis, **ENGINE),
    'kl_shampoo_eigenbasis': functools.partial(
        soap_optax.scale_by_kl_shampoo, **ENGINE),
    'rotated_adam_kl': functools.partial(
        soap_optax.scale_by_rotated_adam, factor_estimator='kl', **ENGINE),
    'soap_muon_transform': functools.partial(soap_optax.scale_by_soap_muon,
                                             **ENGINE),
}
ALIASES = {
    'soap': functools.partial(soap_optax.soap, 1e-2, **ENGINE),
    'factorized_soap': functools.partial(soap_optax.factorized_soap, 1e-2,
                                         **ENGINE),
    'shampoo': functools.partial(soap_optax.shampoo, 1e-2, **ENGINE),
    'kl_shampoo': functools.partial(soap_optax.kl_shampoo, 1e-2, **ENGINE),
    'kl_soap': functools.partial(soap_optax.soap, 1e-2, factor_estimator='kl',
                                 **ENGINE),
    'soap_h': functools.partial(soap_optax.soap_h, 1e-2, **ENGINE),
    'kl_soap_h': functools.partial(soap_optax.kl_soap_h, 1e-2, **ENGINE),
    'soap_muon': functools.partial(soap_optax.soap_muon, 1e-2, **ENGINE),
}
EVERY = {**TRANSFORMS, **ALIASES}
# Aliases whose update is a difference of parameters, ``W_new - W``
# (Hyperball's retraction): its float32 rounding is that of ``W``, not of
# the update.
PARAMETER_DIFFERENCES = ('soap_h', 'kl_soap_h')
# Rules whose update is a Newton-Schulz polynomial of the whitened momentum:
# its gain at zero, 3.4445^5 = 484, multiplies float32's rounding of small
# singular directions (jit against eager: 3e-5 of an update where float32's
# rounding alone gives 1e-6), so they are compared in float64.
ORTHOGONALIZED = ('soap_muon', 'soap_muon_transform')


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  # Square units: their factors are full rank from the first gradient on, so
  # no basis depends on how rounding picks a null space's vectors.
  shapes = {'vector': (5,), 'matrix': (6, 6), 'stacked': (3, 4, 4),
            'blocked': (16, 16)}
  return {name: jnp.asarray(rng.normal(size=shape), dtype)
          for name, shape in shapes.items()}


def _gradients(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _eigenbasis_states(state):
  return [x for x in jax.tree.leaves(state, is_leaf=_state.is_eigenbasis_state)
          if _state.is_eigenbasis_state(x)]


def _floating(tree):
  return [x for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def _run(opt, params, grads_list, state=None):
  update = jax.jit(opt.update)
  state = opt.init(params) if state is None else state
  outs = []
  for grads in grads_list:
    updates, state = update(grads, state, params)
    outs.append(updates)
  return outs, state


@pytest.mark.parametrize('frequency', [1, 2])
@pytest.mark.parametrize('name', sorted(EVERY))
def test_a_rejected_call_leaves_the_eigenbasis_states_floats_unchanged(
    name, frequency):
  """All units rejected (NaN gradients) on call 2 (a refresh call at both
  frequencies) and on call 5 (between refreshes at frequency 2): every
  floating array of the eigenbasis transforms' states is bitwise unchanged
  and the transforms' own updates are zero; the refresh that fell due on
  call 2 is done on call 3, the next accepted call. (The aliases' optax
  links after the transform, weight decay and Shampoo's momentum, act on
  the zero as on any zero gradient: docs/numerics.md.)"""
  opt = EVERY[name](precondition_frequency=frequency)
  params = _params()
  update = jax.jit(opt.update)
  state = opt.init(params)
  nan = jax.tree.map(lambda p: jnp.full(p.shape, jnp.nan, p.dtype), params)
  for call in range(7):
    before = _eigenbasis_states(state)
    if call in (2, 5):
      updates, state = update(nan, state, params)
      if name in TRANSFORMS:
        for leaf in jax.tree.leaves(updates):
          np.testing.assert_array_equal(np.asarray(leaf), 0.0)
      after = _eigenbasis_states(state)
      for old, new in zip(_floating(before), _floating(after)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
      for old, new in zip(before, after):
        for old_n, new_n in zip(old.eigenbasis.refreshes,
                                new.eigenbasis.refreshes):
          np.testing.assert_array_equal(np.asarray(new_n), np.asarray(old_n))
      continue
    _, state = update(_gradients(params, call), state, params)
    if call == 3:  # The first accepted call after the missed refresh.
      for old, new in zip(before, _eigenbasis_states(state)):
        for old_n, new_n, age in zip(old.eigenbasis.refreshes,
                                     new.eigenbasis.refreshes,
                                     new.eigenbasis.age):
          np.testing.assert_array_equal(np.asarray(new_n),
                                        np.asarray(old_n) + 1)
          np.testing.assert_array_equal(np.asarray(age), 0)
  for eigenbasis in _eigenbasis_states(state):
    assert int(eigenbasis.eigenbasis.skipped) == 2 * 9  # 9 units, 2 calls.


@pytest.mark.parametrize('name', sorted(TRANSFORMS))
def test_one_rejected_parameter_does_not_change_the_others(name):
  """A NaN in one parameter rejects its units only: the other parameters'
  updates are those of the run that never saw the NaN."""
  opt = TRANSFORMS[name](precondition_frequency=2)
  params = _params()
  grads = [_gradients(params, k) for k in range(4)]
  clean, _ = _run(opt, params, grads)
  poisoned = [dict(g) for g in grads]
  poisoned[2]['matrix'] = poisoned[2]['matrix'].at[0, 0].set(jnp.inf)
  dirty, _ = _run(opt, params, poisoned)
  np.testing.assert_array_equal(np.asarray(dirty[2]['matrix']), 0.0)
  for k in range(4):
    for key in ('vector', 'stacked', 'blocked'):
      np.testing.assert_array_equal(np.asarray(dirty[k][key]),
                                    np.asarray(clean[k][key]))


@pytest.mark.parametrize('name', ['shampoo_eigenbasis', 'adafactor_in_eigenbasis'])
def test_the_first_accepted_call_initializes(name, x64):
  """A non-finite first call leaves the optimizer as new: the next call's
  update is that of a fresh optimizer's first call."""
  del x64
  opt = TRANSFORMS[name](precondition_frequency=1)
  params = _params(jnp.float64)
  nan = jax.tree.map(lambda p: jnp.full(p.shape, jnp.nan, p.dtype), params)
  grads = _gradients(params, 7)
  late = _run(opt, params, [nan, grads])[0][1]
  fresh = _run(opt, params, [grads])[0][0]
  for a, b in zip(jax.tree.leaves(late), jax.tree.leaves(fresh)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize(
    'name', ['rotated_adam', 'rotated_adam_kl', 'kl_shampoo_eigenbasis'])
def test_soap_initializes_on_its_first_accepted_call(name, x64):
  """SOAP (and the KL rules, which initialize as it does) after a
  non-finite first call: the next call returns a zero update and sets the
  factors and bases as a fresh first call does."""
  del x64
  opt = TRANSFORMS[name](precondition_frequency=1)
  params = _params(jnp.float64)
  nan = jax.tree.map(lambda p: jnp.full(p.shape, jnp.nan, p.dtype), params)
  grads = _gradients(params, 7)
  late_updates, late = _run(opt, params, [nan, grads])
  _, fresh = _run(opt, params, [grads])
  for leaf in jax.tree.leaves(late_updates):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  # Every floating array (factors, bases, moments, estimates, quotients).
  for a, b in zip(_floating(late), _floating(fresh), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Then it runs Adam from there: the next update is not zero.
  (after,), _ = _run(opt, params, [_gradients(params, 8)], late)
  assert all(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(after))


@pytest.mark.parametrize('name', sorted(EVERY))
def test_jit_equals_eager_and_traces_once(name):
  """Three float32 calls (the initialization, an Adam step, a refresh
  call), jitted and eager: the same updates up to float32 rounding (XLA
  fuses the jitted program differently), measured against each update's
  largest entry (plus float32's rounding of the parameter where the update
  is a difference of parameters; the orthogonalized rules in float64, to
  1e-10); one trace for the three jitted calls."""
  if name in ORTHOGONALIZED:
    with jax.enable_x64(True):
      _jit_against_eager(name, jnp.float64, 1e-10)
  else:
    _jit_against_eager(name, jnp.float32, 1e-5)


def _jit_against_eager(name, dtype, tolerance):
  opt = EVERY[name](precondition_frequency=2)
  params = _params(dtype)
  grads = [_gradients(params, k) for k in range(3)]
  traces = []

  def update(g, s, p):
    traces.append(1)
    return opt.update(g, s, p)

  jitted = jax.jit(update)
  state_jit = state_eager = opt.init(params)
  for g in grads:
    u_jit, state_jit = jitted(g, state_jit, params)
    u_eager, state_eager = opt.update(g, state_eager, params)
    for a, b, p in zip(jax.tree.leaves(u_jit), jax.tree.leaves(u_eager),
                       jax.tree.leaves(params)):
      atol = tolerance * float(np.max(np.abs(np.asarray(b))))
      if name in PARAMETER_DIFFERENCES:  # A few roundings of W.
        atol += 8 * np.finfo(np.float32).eps * float(
            np.max(np.abs(np.asarray(p))))
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                 atol=atol)
  assert len(traces) == 1


@pytest.mark.parametrize('name', sorted(EVERY))
def test_state_structure_and_dtypes_are_stable_across_update(name):
  opt = EVERY[name](precondition_frequency=2)
  params = _params(jnp.bfloat16)
  state = opt.init(params)
  updates, new_state = jax.jit(opt.update)(_gradients(params, 0), state,
                                           params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert old.dtype == new.dtype and old.shape == new.shape
  # Updates follow the gradients' dtype.
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype


@pytest.mark.parametrize('name', sorted(ALIASES))
def test_inject_hyperparams_matches_the_plain_alias(name, x64):
  """In float64, so that the comparison is at float64's rounding: traced
  hyperparameters round ``1 - b`` differently from Python floats, a
  difference float32's QR refresh amplifies to ~3e-5 of an update."""
  del x64
  plain = ALIASES[name](precondition_frequency=2)
  injected = optax.inject_hyperparams(
      ALIASES[name].func, static_args=(
          'precondition_frequency', 'max_precond_dim', 'block_size'))(
              1e-2, precondition_frequency=2, **ALIASES[name].keywords)
  params = _params(jnp.float64)
  grads = [_gradients(params, k) for k in range(3)]
  expected, _ = _run(plain, params, grads)
  got, state = _run(injected, params, grads)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12,
                               atol=1e-15)
  assert float(state.hyperparams['learning_rate']) == pytest.approx(1e-2)


@pytest.mark.parametrize('name', sorted(ALIASES))
def test_multisteps_applies_the_average_of_the_micro_gradients(name, x64):
  del x64
  k = 2
  # (MultiSteps accumulates in float32 unless told otherwise.)
  accumulated = optax.MultiSteps(ALIASES[name](precondition_frequency=2),
                                 every_k_schedule=k,
                                 accumulator_dtype=jnp.float64)
  plain = ALIASES[name](precondition_frequency=2)
  params = _params(jnp.float64)
  micro = [_gradients(params, i) for i in range(2 * k)]
  def mean(grads):  # MultiSteps' running mean, acc + (g - acc) / (i + 1).
    acc = jax.tree.map(jnp.zeros_like, grads[0])
    for i, g in enumerate(grads):
      acc = jax.tree.map(lambda a, g, i=i: a + (g - a) / (i + 1), acc, g)
    return acc
  averaged = [mean(micro[i:i + k]) for i in range(0, 2 * k, k)]
  expected, _ = _run(plain, params, averaged)
  got, _ = _run(accumulated, params, micro)
  for step in range(2):
    for leaf in jax.tree.leaves(got[k * step]):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    for a, b in zip(jax.tree.leaves(expected[step]),
                    jax.tree.leaves(got[k * step + k - 1])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10,
                                 atol=1e-13)


def _dot_precisions(jaxpr):
  """The precision of every ``dot_general`` in a jaxpr and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append(eqn.params['precision'])
    for param in eqn.params.values():
      subs = param if isinstance(param, (tuple, list)) else (param,)
      for sub in subs:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found.extend(_dot_precisions(sub.jaxpr))
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found.extend(_dot_precisions(sub))
  return found


@pytest.mark.parametrize('name', sorted(EVERY))
def test_every_matrix_product_runs_at_highest_precision(name):
  """Default precision is TF32 on recent GPUs and bfloat16 passes on TPUs:
  every product of the update (rotations, factors, refresh, Rayleigh
  quotients) asks for HIGHEST."""
  opt = EVERY[name](precondition_frequency=2)
  params = _params()
  state = opt.init(params)
  jaxpr = jax.make_jaxpr(opt.update)(_gradients(params, 0), state, params)
  precisions = _dot_precisions(jaxpr.jaxpr)
  assert precisions, 'no dot_general found'
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  assert all(p == highest for p in precisions), precisions
