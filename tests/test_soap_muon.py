"""SOAP-Muon against its float64 NumPy oracle (``tests/oracle/soap_muon_numpy.py``,
written from the issue's text without reading the implementation).

The algorithm is checked apart from the Newton-Schulz iteration's own error
by running both with an exact orthogonalization: the oracle takes the polar
factor from an SVD, the library the cubic Newton-Schulz iteration
``X <- 1.5 X - 0.5 X X^T X`` run to convergence (60 steps). Then the default
quintic (optax.contrib.muon's) against optax's own function and against the
oracle's transcription of it. Square units, full rank from the first
gradient on (no basis depends on how rounding picks a null space), whose
whitened momentum is checked to be well conditioned on every call (the
first step's is a sign pattern, singular for some small matrices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import soap_optax
from soap_optax import _soap_muon
from tests.oracle import soap_muon_numpy as oracle

CALLS, FREQUENCY = 20, 3
MU, B2, BETA, EPS = 0.95, 0.95, 0.9, 1e-8
SHAPES = {'square': (6, 6), 'larger': (8, 8), 'stacked': (2, 5, 5)}
BATCH = soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
CONVERGED = dict(ns_coeffs=(1.5, -0.5, 0.0), ns_steps=60)
# Measured: at most 1.6e-14 (polar) and 3.2e-14 (the default quintic) of each
# update's largest entry.
TOLERANCE = 1e-12


def _run(tx, orthogonalize, monkeypatch=None):
  """CALLS calls of ``tx`` and of one oracle per matrix: the largest
  relative difference, and the ``(call, parameter)`` pairs left out because
  a polar factor of theirs was not unique (with ``monkeypatch``, which
  records the singular values of every matrix the oracle's ``polar``
  sees)."""
  rng = np.random.default_rng(0)
  references = {
      name: [oracle.SoapMuonReference(
          shape[-2:], mu=MU, b2=B2, shampoo_beta=BETA, eps=EPS,
          frequency=FREQUENCY, orthogonalize=orthogonalize)
             for _ in range(shape[0] if len(shape) == 3 else 1)]
      for name, shape in SHAPES.items()}
  conditioning = []
  if monkeypatch is not None:
    polar = oracle.polar
    def recording_polar(x):
      values = np.linalg.svd(x, compute_uv=False)
      conditioning.append(values[-1] / values[0])
      return polar(x)
    monkeypatch.setattr(oracle, 'polar', recording_polar)
  state = tx.init({k: jnp.zeros(s, jnp.float64) for k, s in SHAPES.items()})
  update = jax.jit(tx.update)
  worst, left_out = 0.0, []
  for call in range(CALLS):
    grads = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    got, state = update(jax.tree.map(jnp.asarray, grads), state)
    for name, refs in references.items():
      g = grads[name].reshape((len(refs),) + SHAPES[name][-2:])
      conditioning.clear()
      expected = np.stack([r.step(x) for r, x in zip(refs, g)]).reshape(
          SHAPES[name])
      if conditioning and min(conditioning) <= 1e-8:
        left_out.append((call, name))
        continue
      scale = max(float(np.max(np.abs(expected))), 1e-300)
      worst = max(worst, float(np.max(np.abs(
          np.asarray(got[name]) - expected))) / scale)
  return worst, left_out


def _transform(**options):
  return soap_optax.scale_by_soap_muon(
      b1=MU, b2=B2, shampoo_beta=BETA, eps=EPS,
      precondition_frequency=FREQUENCY,
      dimension_numbers={'square': None, 'larger': None, 'stacked': BATCH},
      **options)


def test_matches_the_oracle_with_an_exact_polar_factor(monkeypatch, x64):
  """Where the whitened momentum ``P`` is singular its polar factor is not
  unique, and that call of that parameter compares nothing: here the first
  step of the 6 x 6 matrix and of the stack, where ``P`` is a sign pattern
  (``V = (1 - b2) Û^2``). Every other call of every parameter is
  compared."""
  del x64
  worst, left_out = _run(_transform(**CONVERGED), 'polar', monkeypatch)
  assert worst <= TOLERANCE, worst
  assert left_out == [(1, 'square'), (1, 'stacked')], left_out


def test_the_default_iteration_matches_the_oracles(x64):
  """Every call, the sign-pattern first step included: the quintic is a
  polynomial, defined for every ``P``."""
  del x64
  worst, _ = _run(_transform(), 'newton_schulz')
  assert worst <= TOLERANCE, worst


@pytest.mark.parametrize('shape', [(5, 3), (3, 5), (4, 4)])
def test_newton_schulz_is_optax_muons(shape, x64):
  del x64
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape))
  expected = optax.contrib._muon.orthogonalize_via_newton_schulz(  # pylint: disable=protected-access
      x, jnp.asarray(_soap_muon.MUON_NS_COEFFS), _soap_muon.MUON_NS_STEPS)
  np.testing.assert_allclose(np.asarray(_soap_muon.newton_schulz(x)),
                             np.asarray(expected), rtol=0, atol=1e-13)


@pytest.mark.parametrize('kwargs, match', [
    (dict(ns_coeffs=(1.0, 2.0)), 'ns_coeffs'),
    (dict(ns_steps=-1), 'ns_steps'),
    (dict(b1=1.0), 'b1'),
    (dict(eps=-1.0), 'eps'),
])
def test_bad_arguments_are_refused_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    soap_optax.scale_by_soap_muon(**kwargs)
  with pytest.raises(ValueError, match=match):
    soap_optax.soap_muon(**kwargs)


def test_the_scale_is_the_root_of_rows_over_cols(x64):
  """``O = NS(P) sqrt(max(1, rows / cols))`` with the unit's shape as
  stored: the algorithm is transposition-equivariant (the factors swap,
  ``NS(P^T) = NS(P)^T``), so a tall unit's update is ``sqrt(2)`` times the
  transpose of the same run on the transposed gradients."""
  del x64
  tx = soap_optax.scale_by_soap_muon(precondition_frequency=2)
  state = tx.init({'tall': jnp.zeros((8, 4)), 'wide': jnp.zeros((4, 8))})
  update = jax.jit(tx.update)
  rng = np.random.default_rng(3)
  for _ in range(5):
    g = jnp.asarray(rng.normal(size=(8, 4)))
    updates, state = update({'tall': g, 'wide': g.T}, state)
    np.testing.assert_allclose(np.asarray(updates['tall']),
                               np.sqrt(2) * np.asarray(updates['wide']).T,
                               rtol=0, atol=1e-13)
