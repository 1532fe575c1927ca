"""KL-Shampoo and KL-SOAP against their float64 NumPy oracles
(``tests/oracle/kl_shampoo_numpy.py``, written from the paper's equations).

Every unit's first factors are full rank (square matrices, or axes no longer
than the product of the others), so that no basis depends on how rounding
picks a null space's vectors; the idealized run's (6, 10) matrix is the
exception: its right factor starts rank-deficient, and the floored
eigenvalues make ``S^{-1}`` independent of that choice.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import soap_optax
from tests.oracle import kl_shampoo_numpy as oracle

STEPS = 30
# Measured: at most 1e-14 of each update's largest entry (float64, QR
# refreshes every 5 calls), 8e-13 for the idealized run's rank-deficient
# start (matrix square roots of the full Kronecker product); the issue asks
# for 1e-9.
TOLERANCE = 1e-11
B1, BETA, EPS = 0.9, 0.95, 1e-8

BATCH = soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))


def _run(tx, shapes, references, steps=STEPS, scale=1.0):
  """``steps`` calls of ``tx`` and of the references (one per unit: a
  function of a parameter's gradient returning its oracle direction), on
  normal gradients times ``scale``; the largest relative difference per
  parameter."""
  rng = np.random.default_rng(0)
  params = {name: jnp.zeros(shape, jnp.float64)
            for name, shape in shapes.items()}
  update = jax.jit(tx.update)
  state = tx.init(params)
  worst = dict.fromkeys(shapes, 0.0)
  for _ in range(steps):
    grads = {name: scale * rng.normal(size=shape)
             for name, shape in shapes.items()}
    updates, state = update(jax.tree.map(jnp.asarray, grads), state)
    for name, reference in references.items():
      expected = reference(grads[name])
      got = np.asarray(updates[name])
      magnitude = max(float(np.max(np.abs(expected))), 1e-300)
      worst[name] = max(worst[name],
                        float(np.max(np.abs(got - expected))) / magnitude)
  return worst


def _per_slice(references):
  """A reference for a parameter with a leading batch axis: one oracle per
  slice."""
  return lambda g: np.stack([r.step(x) for r, x in zip(references, g)])


def _per_block(references, shape, block):
  """A reference for a blocked matrix: one oracle per ``block x block``
  block, row-major."""
  rows, cols = shape[0] // block, shape[1] // block

  def step(g):
    out = np.zeros(shape)
    for i in range(rows):
      for j in range(cols):
        cut = np.s_[i * block:(i + 1) * block, j * block:(j + 1) * block]
        out[cut] = references[i * cols + j].step(g[cut])
    return out
  return step


@pytest.mark.parametrize('eigenvalues, refresh', [
    ('running', 'qr_unsorted'), ('running', 'qr'), ('refresh', 'qr'),
    ('running', 'eigh')])
def test_practical_kl_shampoo_matches_the_oracle(eigenvalues, refresh, x64):
  """A 2-D, a 3-D, a stacked (batch axis), a matrix with a diagonal axis
  (longer than max_precond_dim) and a vector; refreshes every 5 calls."""
  del x64
  shapes = {'matrix': (8, 8), 'tensor': (4, 5, 6), 'stacked': (3, 8, 8),
            'wide': (8, 40), 'vector': (5,)}
  tx = soap_optax.scale_by_kl_shampoo(
      b1=B1, shampoo_beta=BETA, eps=EPS, eigenvalues=eigenvalues,
      precondition_frequency=5, refresh=refresh, max_precond_dim=16,
      dimension_numbers={'matrix': None, 'tensor': None, 'stacked': BATCH,
                         'wide': None, 'vector': None})
  make = lambda shape, **kw: oracle.KLShampooReference(
      shape, b1=B1, beta=BETA, eps=EPS, frequency=5, refresh=refresh,
      eigenvalues=eigenvalues, **kw)
  references = {
      'matrix': make((8, 8)).step,
      'tensor': make((4, 5, 6)).step,
      'stacked': _per_slice([make((8, 8)) for _ in range(3)]),
      'wide': make((8, 40), factored=(True, False)).step,
      'vector': make((5,), factored=(False,)).step,
  }
  worst = _run(tx, shapes, references)
  assert max(worst.values()) <= TOLERANCE, worst


def test_blocked_kl_shampoo_matches_the_oracle_per_block(x64):
  """A (16, 24) matrix cut into six 8 x 8 blocks, each its own oracle."""
  del x64
  tx = soap_optax.scale_by_kl_shampoo(
      b1=B1, shampoo_beta=BETA, eps=EPS, precondition_frequency=5,
      block_size=8)
  references = {'blocked': _per_block(
      [oracle.KLShampooReference((8, 8), b1=B1, beta=BETA, eps=EPS,
                                 frequency=5) for _ in range(6)],
      (16, 24), 8)}
  worst = _run(tx, {'blocked': (16, 24)}, references)
  assert worst['blocked'] <= TOLERANCE, worst


@pytest.mark.parametrize('initial_eigenvalue, scale', [(0.5, 1.0),
                                                       (1e-3, 1e-3)])
def test_initial_eigenvalue_and_the_floor(initial_eigenvalue, scale, x64):
  """Another prior, and small gradients that drive the estimates onto their
  floors ``1 / clip(d, 10, 4000)^2`` (1/144 for the 12-long axes, 1/100 for
  the 3-D tensor's), starting from a prior below them."""
  del x64
  shapes = {'matrix': (12, 12), 'tensor': (4, 5, 6)}
  tx = soap_optax.scale_by_kl_shampoo(
      b1=B1, shampoo_beta=BETA, eps=EPS, precondition_frequency=5,
      initial_eigenvalue=initial_eigenvalue)
  references = {name: oracle.KLShampooReference(
      shape, b1=B1, beta=BETA, eps=EPS, frequency=5,
      lam0=initial_eigenvalue).step for name, shape in shapes.items()}
  worst = _run(tx, shapes, references, scale=scale)
  assert max(worst.values()) <= TOLERANCE, worst


def test_idealized_kl_shampoo_matches_exact_matrix_functions(x64):
  """``eigenvalues="refresh"``, a decomposition every call: the oracle
  builds ``(⊗ S~_k)^{1/2}`` and the whitening ``⊗ S~_j^{-1}`` as full matrix
  functions, no eigenbasis carried."""
  del x64
  shapes = {'matrix': (6, 10), 'tensor': (4, 5, 6)}
  tx = soap_optax.scale_by_kl_shampoo(
      b1=B1, shampoo_beta=BETA, eps=EPS, eigenvalues='refresh',
      precondition_frequency=1, refresh='eigh')
  references = {name: oracle.IdealizedKLShampoo(shape, b1=B1, beta=BETA,
                                                eps=EPS).step
                for name, shape in shapes.items()}
  worst = _run(tx, shapes, references)
  assert max(worst.values()) <= TOLERANCE, worst


@pytest.mark.parametrize('options', [
    {}, {'refresh': 'qr', 'bias_correction': True}],
    ids=['authors_defaults', 'sorted_and_corrected'])
def test_kl_soap_matches_the_oracle(options, x64):
  """SOAP with ``factor_estimator="kl"``: Adam in the eigenbasis of the
  KL-estimated factors; a 2-D, a 3-D, a stacked parameter and one with a
  diagonal axis (which whitens the other's factor by its estimates). The
  defaults (unsorted QR, no bias correction) and the named options that
  restore SOAP's choices."""
  del x64
  shapes = {'matrix': (8, 8), 'tensor': (4, 5, 6), 'stacked': (2, 6, 6),
            'wide': (8, 40)}
  b2 = 0.99
  tx = soap_optax.scale_by_rotated_adam(
      b1=B1, b2=b2, shampoo_beta=BETA, eps=EPS, factor_estimator='kl',
      precondition_frequency=5, max_precond_dim=16,
      dimension_numbers={'matrix': None, 'tensor': None, 'stacked': BATCH,
                         'wide': None}, **options)
  make = lambda shape, **kw: oracle.KLSoapReference(
      shape, b1=B1, b2=b2, beta=BETA, eps=EPS, frequency=5, **options, **kw)
  references = {'matrix': make((8, 8)).step, 'tensor': make((4, 5, 6)).step,
                'stacked': _per_slice([make((6, 6)) for _ in range(2)]),
                'wide': make((8, 40), factored=(True, False)).step}
  worst = _run(tx, shapes, references)
  assert max(worst.values()) <= TOLERANCE, worst


def test_the_state_is_soaps_less_its_second_moment():
  """Per unit: momentum and one estimate per axis entry, against SOAP's two
  moments; the factors and bases are the same."""
  params = {'w': jnp.zeros((8, 12)), 'b': jnp.zeros((12,))}
  kl = soap_optax.state_size(soap_optax.scale_by_kl_shampoo().init(params))
  soap = soap_optax.state_size(soap_optax.scale_by_rotated_adam().init(params))
  # SOAP: m and v (2 * 96 + 2 * 12); KL: m and λ (96 + 8 + 12, 12 + 12).
  assert soap - kl == (2 * 96 + 2 * 12) - (96 + 20 + 24)


@pytest.mark.parametrize('kwargs, match', [
    (dict(eigenvalues='exact'), 'eigenvalues'),
    (dict(initial_eigenvalue=0.0), 'initial_eigenvalue'),
    (dict(initial_eigenvalue=-1.0), 'initial_eigenvalue'),
    (dict(shampoo_beta=1.0), 'shampoo_beta'),
    (dict(b1=-0.1), 'b1'),
    (dict(eps=-1.0), 'eps'),
    (dict(refresh='svd'), 'refresh'),
])
def test_bad_arguments_are_rejected_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    soap_optax.scale_by_kl_shampoo(**kwargs)
  with pytest.raises(ValueError, match=match):
    soap_optax.kl_shampoo(**kwargs)


def test_soap_rejects_an_unknown_factor_estimator():
  with pytest.raises(ValueError, match="factor_estimator.*'frobenius', 'kl'"):
    soap_optax.soap(factor_estimator='kullback')


@pytest.mark.parametrize('kwargs, match', [
    (dict(factor_estimator='kl', initial_eigenvalue=0.0),
     'initial_eigenvalue'),
    (dict(factor_estimator='kl', initial_eigenvalue=-1.0),
     'initial_eigenvalue'),
    (dict(initial_eigenvalue=0.5), 'initial_eigenvalue.*"kl" only'),
    (dict(factor_estimator='kl', bias_correction='no'), 'bias_correction'),
    (dict(factor_estimator='kl', refresh='svd'), 'refresh'),
])
def test_kl_soap_options_are_checked_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    soap_optax.scale_by_rotated_adam(**kwargs)
  with pytest.raises(ValueError, match=match):
    soap_optax.soap(**kwargs)


def test_an_empty_parameter_keeps_a_finite_state():
  params = {'empty': jnp.zeros((0, 5)), 'w': jnp.zeros((3, 3))}
  tx = soap_optax.scale_by_kl_shampoo(precondition_frequency=1)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_a_state_of_another_option_is_refused_by_name():
  params = {'w': jnp.zeros((3, 3))}
  plain = soap_optax.scale_by_rotated_adam().init(params)
  with pytest.raises(ValueError, match="no field 'eigenvalues'"):
    soap_optax.scale_by_rotated_adam(factor_estimator='kl').update(
        params, plain)
