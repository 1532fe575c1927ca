"""Tests of the per-unit math: axis rules and rotation (_kronecker), factor
statistics (_estimators), solvers (_solvers), batched refresh (_batching)."""

import dataclasses

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from soap_optax import _batching
from soap_optax import _estimators
from soap_optax import _kronecker
from soap_optax import _refresh
from soap_optax import _solvers
from soap_optax import _state
from tests.oracle import soap_numpy


def _random_orthonormal(n, rng):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return q


@pytest.mark.parametrize('shape, limit, expected', [
    ((2, 3, 8, 5), 10, (6, 8, 5)),
    ((4, 20), 10, (4, 20)),            # an axis alone above the limit stays.
    ((20, 2, 3), 10, (20, 6)),
    ((3, 3, 3, 3), 9, (9, 9)),
    ((3, 3, 3, 3), 10000, (81,)),
    ((7,), 5, (7,)),
])
def test_merge_axes_is_greedy_left_to_right(shape, limit, expected):
  assert _kronecker.merge_axes(shape, limit) == expected
  assert soap_numpy.merged_shape(shape, limit) == expected


@pytest.mark.parametrize('shape, options, merged, factored', [
    ((), {}, (1,), ()),
    ((7,), {}, (7,), ()),
    ((7,), {'precondition_1d': True}, (7,), (0,)),
    ((7,), {'precondition_1d': True, 'max_precond_dim': 6}, (7,), ()),
    ((4, 20), {'max_precond_dim': 10}, (4, 20), (0,)),
    ((30, 40), {'max_precond_dim': 10}, (30, 40), ()),
    ((3, 4, 5), {}, (3, 4, 5), (0, 1, 2)),
    ((2, 3, 8, 5), {'max_precond_dim': 10, 'merge_dims': True},
     (6, 8, 5), (0, 1, 2)),
    ((2, 3, 20), {'max_precond_dim': 10, 'merge_dims': True}, (6, 20), (0,)),
    ((8, 3), {'one_sided': True}, (8, 3), (1,)),
    ((5, 5), {'one_sided': True}, (5, 5), (0,)),
    ((6, 2, 4), {'one_sided': True}, (6, 2, 4), (1,)),
    ((0, 4), {}, (0, 4), ()),
])
def test_plan_layout_axis_rules(shape, options, merged, factored):
  kwargs = dict(max_precond_dim=10000, merge_dims=False, precondition_1d=False)
  kwargs.update(options)
  layout = _kronecker.plan_layout(shape, **kwargs)
  assert layout.shape == shape
  assert layout.merged_shape == merged
  assert layout.factored_axes == factored


def test_rotate_and_unrotate_match_mode_products():
  rng = np.random.default_rng(1)
  layout = _kronecker.FactorLayout((3, 4, 5), (3, 4, 5), (0, 2))
  bases = (_random_orthonormal(3, rng), _random_orthonormal(5, rng))
  factors = _kronecker.KroneckerFactors(
      layout, stats=tuple(np.zeros_like(q) for q in bases), bases=bases)
  x = rng.normal(size=(3, 4, 5))
  with jax.enable_x64(True):
    rotated = np.asarray(_kronecker.rotate(jnp.asarray(x), factors))
    back = np.asarray(_kronecker.unrotate(jnp.asarray(rotated), factors))
  expected = soap_numpy.mode_product(
      soap_numpy.mode_product(x, bases[0].T, 0), bases[1].T, 2)
  np.testing.assert_allclose(rotated, expected, rtol=0, atol=1e-13)
  np.testing.assert_allclose(back, x, rtol=0, atol=1e-13)


def test_rotate_of_a_matrix_is_ql_transpose_g_qr():
  rng = np.random.default_rng(2)
  ql, qr = _random_orthonormal(4, rng), _random_orthonormal(6, rng)
  g = rng.normal(size=(4, 6))
  factors = _kronecker.KroneckerFactors(
      _kronecker.FactorLayout((4, 6), (4, 6), (0, 1)), (ql, qr), (ql, qr))
  with jax.enable_x64(True):
    got = np.asarray(_kronecker.rotate(jnp.asarray(g), factors))
  np.testing.assert_allclose(got, ql.T @ g @ qr, rtol=0, atol=1e-13)


def test_factor_statistics_are_unfolding_gram_matrices():
  rng = np.random.default_rng(3)
  g = rng.normal(size=(3, 4, 5))
  layout = _kronecker.FactorLayout((3, 4, 5), (3, 4, 5), (0, 1, 2))
  with jax.enable_x64(True):
    stats = _estimators.factor_statistics(jnp.asarray(g), layout)
  for axis, stat in enumerate(stats):
    unfolded = soap_numpy.unfold(g, axis)
    np.testing.assert_allclose(
        np.asarray(stat), unfolded @ unfolded.T, rtol=1e-13, atol=0)
  matrix = rng.normal(size=(4, 6))
  layout = _kronecker.FactorLayout((4, 6), (4, 6), (0, 1))
  with jax.enable_x64(True):
    left, right = _estimators.factor_statistics(jnp.asarray(matrix), layout)
  np.testing.assert_allclose(np.asarray(left), matrix @ matrix.T, rtol=1e-13)
  np.testing.assert_allclose(np.asarray(right), matrix.T @ matrix, rtol=1e-13)


def test_power_qr_basis_sorts_then_orthonormalizes(x64):
  del x64
  rng = np.random.default_rng(4)
  a = rng.normal(size=(6, 6))
  stat = a @ a.T
  old = _random_orthonormal(6, rng)
  new, order = _solvers.power_qr_basis(jnp.asarray(stat), jnp.asarray(old))
  estimates = np.diag(old.T @ stat @ old)
  expected_order = np.argsort(-estimates, kind='stable')
  np.testing.assert_array_equal(np.asarray(order), expected_order)
  expected = np.linalg.qr(stat @ old[:, expected_order])[0]
  # QR is unique up to the sign of each column.
  signs = np.sign(np.sum(np.asarray(new) * expected, axis=0))
  np.testing.assert_allclose(np.asarray(new), expected * signs, atol=1e-12)
  np.testing.assert_allclose(np.asarray(new).T @ np.asarray(new), np.eye(6),
                             atol=1e-12)


def test_eigh_basis_diagonalizes_in_descending_order(x64):
  del x64
  rng = np.random.default_rng(5)
  a = rng.normal(size=(5, 5))
  stat = a @ a.T
  basis, values = _solvers.eigh_basis(jnp.asarray(stat), jnp.eye(5))
  basis, values = np.asarray(basis), np.asarray(values)
  np.testing.assert_allclose(values, np.linalg.eigvalsh(stat)[::-1],
                             rtol=1e-12)
  np.testing.assert_allclose(basis.T @ stat @ basis, np.diag(values),
                             atol=1e-11)


@pytest.mark.parametrize('basis_fn', [_solvers.eigh_basis,
                                      _solvers.power_qr_basis])
def test_refresh_keeps_the_old_basis_when_the_new_one_is_not_finite(basis_fn):
  old = jnp.asarray(_random_orthonormal(4, np.random.default_rng(6)),
                    jnp.float32)
  stat = jnp.full((4, 4), jnp.nan, jnp.float32)
  new, _ = basis_fn(stat, old)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
  if basis_fn is _solvers.power_qr_basis:
    _, order = basis_fn(stat, old)
    np.testing.assert_array_equal(np.asarray(order), np.arange(4))


def count_primitives(jaxpr, name):
  """Counts ``name`` equations in a jaxpr, nested jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      count += 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      count += count_primitives(sub, name)
  return count


def test_refresh_is_one_batched_call_per_distinct_factor_size():
  params = {
      'a': jnp.zeros((8, 16)), 'b': jnp.zeros((16, 8)), 'c': jnp.zeros((8, 8)),
      'd': jnp.zeros((4, 8, 16)), 'e': jnp.zeros((32,)), 'f': jnp.zeros(()),
      'g': jnp.zeros((8, 16)),
  }
  state = _state.init_eigenbasis(
      params, max_precond_dim=10000, merge_dims=False, precondition_1d=True)
  factors = _state.unpack(state)
  sizes = {n for f in factors for n in f.layout.factor_sizes}
  assert sizes == {4, 8, 16, 32}
  n_factors = sum(len(f.bases) * f.bases[0].shape[0]
                  for f in factors if f.bases)
  assert n_factors == 12  # 2 * 2 (a, g stacked) + 2 + 2 + 3 + 1 + 0

  due = _refresh.Due(
      units=[jnp.ones(f.stats[0].shape[:1] if f.stats else (1,), bool)
             for f in factors],
      initializing=[jnp.zeros(f.stats[0].shape[:1] if f.stats else (1,), bool)
                    for f in factors])
  def refresh(method, solver_padding=None):
    plan = dataclasses.replace(state.plan, solver_padding=solver_padding)
    return jax.make_jaxpr(
        lambda fs: _refresh.refresh(fs, due, method, plan))(factors)
  qr_jaxpr, eigh_jaxpr = refresh('qr'), refresh('eigh')
  # With "qr", a unit's first refresh is still a full eigh: one call of each
  # solver per size. Each solver's result then goes through
  # canonical_null_space: one more QR (in a switch that skips it on
  # full-rank factors and on null spaces of dead axes) per solver and size.
  assert count_primitives(qr_jaxpr.jaxpr, 'qr') == 3 * len(sizes)
  assert count_primitives(qr_jaxpr.jaxpr, 'eigh') == len(sizes)
  assert count_primitives(eigh_jaxpr.jaxpr, 'eigh') == len(sizes)
  assert count_primitives(eigh_jaxpr.jaxpr, 'qr') == len(sizes)
  # Solver sizes (factors of size 4, 8, 16, 32: 1, 6, 4, 1; work d^3 each,
  # 52,288 in all): within 0.1, 4 joins 8 (adds 448); 8 joining 16 would
  # add 21,504. Everything at 32 adds 340,928: within 7 times the work.
  assert count_primitives(refresh('qr', 0.1).jaxpr, 'qr') == 3 * 3
  merged = refresh('qr', solver_padding=7.0)
  assert count_primitives(merged.jaxpr, 'qr') == 3
  assert count_primitives(merged.jaxpr, 'eigh') == 1


def test_map_by_size_keeps_input_order():
  stacks = [jnp.full((1, 2, 2), 1.0), jnp.full((2, 3, 3), 2.0),
            jnp.full((3, 2, 2), 3.0)]
  out = _batching.map_by_size(lambda m: m.sum(), stacks)
  assert [o.shape for o in out] == [(1,), (2,), (3,)]
  np.testing.assert_allclose(np.concatenate(out),
                             [4.0, 18.0, 18.0, 12.0, 12.0, 12.0])


_TRANSFORMER_SHAPES = """
import jax, jax.numpy as jnp, soap_optax
shapes = [(2, 16), (32, 2, 16), (32,), (2, 16, 32), (2, 16), (32, 2, 16),
          (2, 16), (32, 2, 16), (32,), (128, 32), (32,), (32,), (32,), (32,),
          (128,), (32, 128), (256, 32), (256,), (32, 256), (32,), (32,),
          (32, 32)]
params = {f'{i:02d}': jnp.ones(s) for i, s in enumerate(shapes)}
opt = soap_optax.scale_by_rotated_adam(precondition_frequency=1)
update = jax.jit(opt.update)
for seed in range(5):
  state = opt.init(params)
  grads = jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape), params)
  for _ in range(2):
    updates, state = update(grads, state)
  jax.block_until_ready(updates)
print('finished')
"""


def test_batched_refresh_does_not_wedge_the_cpu_thread_pool():
  """Regression: with vmap-batched LAPACK calls this hung about 1 run in 3.

  The parameter shapes of a small transformer (many factor sizes, 3-D
  attention kernels); run in a subprocess so that a hang fails the test
  instead of stopping the suite.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, '-c', _TRANSFORMER_SHAPES], capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'finished' in result.stdout


# ------------------------------------------------------------------------------
# The canonical basis of a factor's null eigenspace.


def _rank_deficient_factor(rng, d, rank, dead=()):
  g = rng.normal(size=(rank, d))
  g[:, list(dead)] = 0.0
  return g.T @ g


def _eigh_descending(a):
  w, v = np.linalg.eigh(a)
  return w[::-1].copy(), v[:, ::-1].copy()


def test_canonical_null_space_depends_on_the_subspace_only(x64):
  del x64
  rng = np.random.default_rng(0)
  a = _rank_deficient_factor(rng, 12, 4)
  w, v = _eigh_descending(a)
  rotated = v.copy()
  rotated[:, 4:] = v[:, 4:] @ np.linalg.qr(rng.normal(size=(8, 8)))[0]
  out = [np.asarray(_solvers.canonical_null_space(
      jnp.asarray(a), jnp.asarray(b), jnp.asarray(w))[0])
         for b in (v, rotated)]
  np.testing.assert_allclose(out[0], out[1], atol=1e-13)
  q = out[0]
  np.testing.assert_allclose(q.T @ q, np.eye(12), atol=1e-13)
  np.testing.assert_array_equal(q[:, :4], v[:, :4])  # the range is kept
  # The new columns lie in the null space: GG Q_0 = 0 (to rounding).
  assert np.max(np.abs(a @ q[:, 4:])) <= 1e-13 * np.max(np.abs(a))
  # The oracle, from the definition: the first 8 columns of the fixed
  # reference projected off the range, orthonormalized in order, each
  # column's sign positive against its reference column.
  np.testing.assert_allclose(q[:, 4:], _null_basis_oracle(v[:, :4], 8),
                             atol=1e-13)


def _null_basis_oracle(kept, m):
  """The canonical null columns from their definition (Gram-Schmidt of
  the reference's first ``m`` columns against ``kept``'s span and the
  columns before them; signs positive against the reference columns)."""
  d = kept.shape[0]
  reference = np.asarray(_solvers.null_space_reference(d, jnp.float64))
  kept = np.linalg.qr(kept)[0]
  columns = []
  for j in range(m):
    x = reference[:, j].copy()
    for _ in range(2):  # twice is enough
      for q in [*kept.T, *columns]:
        x -= q * (q @ x)
    x /= np.linalg.norm(x)
    columns.append(x if x @ reference[:, j] > 0 else -x)
  return np.stack(columns, axis=1)


def test_power_qr_gives_the_canonical_null_basis_from_a_canonical_one(x64):
  """From a canonical basis of a factor that moved within its range, one
  power step gives QR(GG Q)'s columns for the range and the canonical
  null columns (signs included) for the rest."""
  del x64
  rng = np.random.default_rng(3)
  a = _rank_deficient_factor(rng, 12, 4)
  w, v = _eigh_descending(a)
  start = np.asarray(_solvers.canonical_null_space(
      jnp.asarray(a), jnp.asarray(v), jnp.asarray(w))[0])
  # The factor moves within its range: the same null space.
  moved = a + 0.3 * v[:, :4] @ np.diag(rng.uniform(1, 2, 4)) @ v[:, :4].T
  solution = _solvers.solve_power_qr(jnp.asarray(moved), jnp.asarray(start))
  q = np.asarray(solution.basis)
  np.testing.assert_allclose(q.T @ q, np.eye(12), atol=1e-13)
  order = np.asarray(solution.order)
  np.testing.assert_array_equal(np.sort(order[:4]), np.arange(4))
  plain = np.linalg.qr((moved @ start)[:, order])[0]
  np.testing.assert_allclose(np.abs(np.sum(q[:, :4] * plain[:, :4], axis=0)),
                             1.0, atol=1e-12)
  np.testing.assert_allclose(q[:, 4:], _null_basis_oracle(q[:, :4], 8),
                             atol=1e-12)


def test_canonical_null_space_keeps_full_rank_bases_and_dead_axes(x64):
  del x64
  rng = np.random.default_rng(1)
  full = _rank_deficient_factor(rng, 6, 10)
  w, v = _eigh_descending(full)
  q, values = _solvers.canonical_null_space(
      jnp.asarray(full), jnp.asarray(v), jnp.asarray(w))
  np.testing.assert_array_equal(q, v)
  np.testing.assert_array_equal(values, w)
  # Features 2 and 7 are dead (zero row and column): they stay axes, the
  # last columns in index order, exactly.
  dead = _rank_deficient_factor(rng, 10, 3, dead=(2, 7))
  w, v = _eigh_descending(dead)
  q = np.asarray(_solvers.canonical_null_space(
      jnp.asarray(dead), jnp.asarray(v), jnp.asarray(w))[0])
  np.testing.assert_array_equal(q[:, -2:], np.eye(10)[:, [2, 7]])
  # (the other new null columns have exact zeros there; the range's columns
  # are eigh's own, zero to rounding)
  np.testing.assert_array_equal(q[[2, 7], 3:-2], 0.0)
  np.testing.assert_allclose(q.T @ q, np.eye(10), atol=1e-13)
  # Dead axes and nothing else null (a full-rank factor with zero rows, as
  # a factor padded to its solver size): the axes in place, exactly and
  # with a positive sign, whatever the solver left there (here the
  # eigenvectors of the dead axes rotated into each other and negated),
  # and no QR run.
  live = _rank_deficient_factor(rng, 8, 8)
  padded = np.zeros((10, 10))
  padded[np.ix_([0, 1, 3, 4, 5, 6, 8, 9], [0, 1, 3, 4, 5, 6, 8, 9])] = live
  w, v = _eigh_descending(padded)
  mixed = v.copy()
  mixed[:, -2:] = -v[:, -2:] @ np.array([[0.6, 0.8], [-0.8, 0.6]])
  q, values = (np.asarray(x) for x in _solvers.canonical_null_space(
      jnp.asarray(padded), jnp.asarray(mixed), jnp.asarray(w)))
  np.testing.assert_array_equal(q[:, -2:], np.eye(10)[:, [2, 7]])
  np.testing.assert_array_equal(q[:, :-2], mixed[:, :-2])
  np.testing.assert_array_equal(values[-2:], 0.0)
  assert 'qr' not in str(jax.make_jaxpr(
      lambda s, b, v: _solvers.canonical_null_space(s, b, v)[0])(
          jnp.asarray(padded), jnp.asarray(mixed), jnp.asarray(w)).jaxpr
      .eqns[-1].params['branches'][1])
  # A zero factor keeps its basis.
  zero = jnp.zeros((5, 5))
  np.testing.assert_array_equal(_solvers.canonical_null_space(
      zero, jnp.eye(5), jnp.zeros((5,)))[0], np.eye(5))


@pytest.mark.parametrize('solver', ['eigh', 'qr'])
def test_both_solvers_give_the_canonical_null_basis(solver, x64):
  """From two old bases that differ inside the null space, the refreshed
  bases agree (they would differ by the rotation without it)."""
  del x64
  rng = np.random.default_rng(2)
  a = _rank_deficient_factor(rng, 12, 3)
  _, v = _eigh_descending(a + 0.1 * _rank_deficient_factor(rng, 12, 12))
  rotated = v @ np.linalg.qr(rng.normal(size=(12, 12)))[0]
  out = [_solvers.SOLVERS[solver](jnp.asarray(a), jnp.asarray(b))
         for b in (v, rotated)]
  null = slice(3, None)
  if solver == 'eigh':
    np.testing.assert_allclose(out[0].basis, out[1].basis, atol=1e-12)
  else:  # one power step: only the null columns are a function of GG alone
    p = [np.asarray(o.basis)[:, :3] for o in out]
    for o in out:  # the range's columns span GG's range
      q = np.asarray(o.basis)
      assert np.max(np.abs(a @ q[:, null])) <= 1e-12 * np.max(np.abs(a))
    np.testing.assert_allclose(p[0] @ p[0].T, p[1] @ p[1].T, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out[0].basis)[:, null],
                               np.asarray(out[1].basis)[:, null], atol=1e-12)
