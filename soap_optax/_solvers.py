"""The solvers that refresh one factor's basis.

Three solvers (:data:`SOLVERS`, by the name the transforms' ``refresh=``
takes); :mod:`soap_optax._refresh` runs them over every factor of the same
size and dtype in one batched call (:func:`soap_optax._batching.map_by_size`):

* :func:`solve_eigh`: a full symmetric eigendecomposition of ``GG_i``
  (about ``9 d^3`` flops);
* :func:`solve_power_qr` (``"qr"``): one step of power iteration
  warm-started from the current basis, followed by a QR decomposition (about
  ``14/3 d^3`` flops), as in the SOAP reference implementation:
  ``est = diag(Q^T GG Q)``, columns of ``Q`` sorted by ``est`` descending,
  ``Q <- qr(GG Q).Q``;
* :func:`solve_unsorted_power_qr` (``"qr_unsorted"``): the same step without
  the sort, ``Q <- qr(GG Q).Q``, as in the KL-Shampoo/KL-SOAP reference
  implementation (Lin et al.).

All three give a rank-deficient factor's null space a canonical basis
(:func:`canonical_null_space`; after an unsorted QR, on the trailing run of
null columns only).

A refresh never replaces a finite basis by a non-finite one: when the new basis
of a factor is not finite the old one is kept.

References:
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithms 2 and 3); Lin et
  al., `Understanding and Improving Shampoo and SOAP via Kullback-Leibler
  Minimization <https://arxiv.org/abs/2509.03378>`_, 2025 (their code,
  ``yorkerlin/KL-Methods``, ``optim/kl_opt.py``: ``qr(GG @ Q)``, unsorted).
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from soap_optax import _kronecker

HIGHEST = _kronecker.HIGHEST


def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


def rayleigh_quotients(stat: jax.Array, basis: jax.Array) -> jax.Array:
  """``diag(Q^T GG Q)``: the factor's eigenvalue estimates in basis ``Q``."""
  return jnp.einsum('ij,ij->j', basis,
                    jnp.matmul(stat, basis, precision=HIGHEST),
                    precision=HIGHEST)


class Solution(NamedTuple):
  """What a solver returns for one factor ``GG`` with current basis ``Q``.

  Attributes:
    basis: the new orthonormal basis (columns by decreasing eigenvalue
      estimate, or, unsorted, in the old columns' order); the old one where
      the solver's result was not finite.
    values: the eigenvalue estimates matching the new basis's columns.
    order: the old basis's column that each new column follows (QR: the
      old columns sorted by ``diag(Q^T GG Q)``, descending; unsorted QR and
      eigh: the same index, the eigh bases being sorted by decreasing
      eigenvalue, the unsorted QR's following the old ones). Per-column
      quantities kept in the old basis (SOAP's second moment) are permuted
      by it.
    ok: whether the result was finite.
  """

  basis: jax.Array
  values: jax.Array
  order: jax.Array
  ok: jax.Array


# An eigenvalue (estimate) at most this many times ``d * eps * largest`` is
# zero to the working precision (eps of the factor's dtype): ``eigh``'s
# backward error and the accumulated statistics' rounding are of the order
# ``d * eps * largest``.
NULL_SPACE_TOLERANCE = 1.0


def null_space_threshold(values: jax.Array, stat: jax.Array) -> jax.Array:
  """Below this, an eigenvalue of the factor ``stat`` whose eigenvalues
  (estimates) are ``values`` is rounding: ``d eps max(values)``, ``d`` the
  number of axes on which ``stat`` is not exactly zero (a zero row and
  column, a dead input or a size bucket's padding, adds no rounding: the
  threshold of a padded factor is its real part's)."""
  live = jnp.sum(jnp.diagonal(stat, axis1=-2, axis2=-1) != 0, axis=-1,
                 keepdims=True)
  d = jnp.maximum(live, 1).astype(values.dtype)
  return (NULL_SPACE_TOLERANCE * d * jnp.finfo(values.dtype).eps
          * jnp.max(values, axis=-1, keepdims=True))


def null_space_reference(d: int, dtype: Any) -> jax.Array:
  """The fixed ``d x d`` matrix that :func:`canonical_null_space` projects.

  Entries uniform in ``[-1/2, 1/2)`` from an integer hash of ``(i, j)``
  (a multiply-xorshift mix of 32-bit words): generic, so that its first
  ``m`` columns project onto any ``m``-dimensional subspace with full rank,
  exact on every platform, and computed without the loop of a random-number
  generator.
  """
  i = jnp.arange(d, dtype=jnp.uint32)[:, None]
  j = jnp.arange(d, dtype=jnp.uint32)[None, :]
  h = i * jnp.uint32(0x9E3779B1) + j * jnp.uint32(0x85EBCA77) + jnp.uint32(
      0xC2B2AE3D)
  for shift, factor in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, 0x9E3779B1)):
    h = (h ^ (h >> jnp.uint32(shift))) * jnp.uint32(factor)
  h = h ^ (h >> jnp.uint32(16))
  # The top 24 bits: exact in float32 and float64.
  return ((h >> jnp.uint32(8)).astype(dtype) / 2**24 - 0.5).astype(dtype)


def canonical_null_space(stat: jax.Array, basis: jax.Array,
                         values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``basis`` with its near-null eigenspace given a canonical basis.

  Where a factor is rank-deficient (early in training, or a unit with fewer
  rows than columns), the eigenvectors of its (near-)zero eigenvalues are
  any orthonormal basis of that subspace: ``eigh`` and QR pick one from
  rounding alone, so runs that differ in the last bit (another device
  count, jit against eager) pick different ones, and a later gradient's
  energy there is normalized in different coordinates. This replaces them by
  a deterministic function of the subspace.

  Let the last ``m`` columns ``Q_0`` of ``basis`` be the null ones: the
  longest run at the end whose ``values`` are at most
  :func:`null_space_threshold` (all of them when the factor is zero: it
  gets the identity, every axis being dead). Their subspace's projector
  ``P = Q_0 Q_0^T = I - Q_1 Q_1^T`` (``Q_1``: the other columns) does not
  depend on the basis chosen; the new columns are the Gram-Schmidt
  orthonormalization of ``P R_m``, the projection of the first ``m``
  columns of the fixed
  :func:`null_space_reference` ``R`` (computed as one Householder QR of
  ``[Q_1 | R_m]``, each column's sign chosen positive against its ``R``
  column), except that coordinate axes on which ``GG`` is exactly zero (a
  dead input or output) stay axes (the last columns, in index order); their
  values are their Rayleigh quotients ``diag(Q^T GG Q)`` (rounding-level,
  like the eigenvalues they replace, but a continuous function of ``GG``).
  Where every null column is such an axis, no QR is needed and none is run
  (under ``lax.map``; a batched ``vmap`` computes every branch).

  Args:
    stat: the ``(d, d)`` factor ``GG``.
    basis: ``(d, d)`` orthonormal columns, sorted by decreasing ``values``
      (at least the null ones last).
    values: ``(d,)`` their eigenvalues (estimates).

  Returns:
    ``(basis, values)`` with the null columns replaced.
  """
  null, m = _trailing_null(values, stat)
  on_axis = jnp.diagonal(stat) == 0
  axes = jnp.minimum(jnp.sum(on_axis.astype(jnp.int32)), m)

  def axes_only(operands):
    basis, values = operands
    d = basis.shape[0]
    position = jnp.arange(d)[None, :]
    columns = jnp.where(position >= d - axes,
                        _axis_columns(on_axis, axes, basis.dtype), basis)
    return columns, jnp.where(null, jnp.zeros_like(values), values)

  def canonical(operands):
    basis, values = operands
    basis = _with_reference_columns(stat, basis, null, m, on_axis, axes)
    return basis, jnp.where(null, rayleigh_quotients(stat, basis), values)

  # No null column: nothing to do. Every null column a dead axis (a
  # full-rank factor padded to its solver size, a unit padded to its
  # bucket): the axes put in place, no QR. Otherwise the reference columns.
  branch = jnp.where(m > 0, 1 + (m > axes).astype(jnp.int32), 0)
  return jax.lax.switch(branch, (lambda operands: operands, axes_only,
                                 canonical), (basis, values))


def _trailing_null(values: jax.Array, stat: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """The null columns (the longest run at the end whose ``values`` are at
  most :func:`null_space_threshold`; every column of a zero factor, whose
  axes are all dead) and their number."""
  threshold = null_space_threshold(values, stat)[0]
  small = values <= threshold
  null = jnp.flip(jnp.cumprod(jnp.flip(small).astype(jnp.int32))) > 0
  return null, jnp.sum(null.astype(jnp.int32))


def _axis_columns(on_axis: jax.Array, axes: jax.Array,
                  dtype: Any) -> jax.Array:
  """The coordinate axes where ``on_axis`` as the last ``axes`` columns of a
  ``(d, d)`` matrix, in index order."""
  d = on_axis.shape[0]
  columns = jnp.eye(d, dtype=dtype)[:, jnp.argsort(~on_axis, stable=True)]
  return jnp.roll(columns, d - axes, axis=1)


def _with_reference_columns(stat: jax.Array, columns: jax.Array,
                            null: jax.Array, m: jax.Array,
                            on_axis: jax.Array, axes: jax.Array) -> jax.Array:
  """An orthonormal basis whose last ``m`` columns (``null``) are the
  canonical basis of the complement of the other ``columns``' span.

  Coordinate axes with a zero row and column in ``stat`` (a unit's dead
  inputs or outputs: exactly zero gradient there) are exact null vectors,
  whatever the rounding: they are kept as axes, last, in index order, so
  that a zero gradient coordinate stays exactly zero rotated. The rest: the
  first ``m - axes`` columns of :func:`null_space_reference` ``R`` (off the
  axes) orthonormalized after the other columns by one Householder QR of
  ``[columns | R | axes]``. Its column ``j`` spans the part of ``R_j``
  orthogonal to the columns before it, which depends on their span alone;
  its sign is made canonical too: positive against ``R_j``. The other
  columns are ``columns``, unchanged.
  """
  d, dtype = columns.shape[0], columns.dtype
  live = (~on_axis)[:, None].astype(dtype)
  position = jnp.arange(d)[None, :]
  in_reference = null[None, :] & (position < d - axes)
  reference = jnp.roll(null_space_reference(d, dtype), d - m, axis=1) * live
  # Scaled like the largest other column (the result does not depend on
  # it), so that the QR's rounding, relative to its largest column, is
  # rounding relative to the reference columns too.
  norms = jnp.sqrt(jnp.sum(jnp.square(reference), axis=0))
  largest = jnp.max(jnp.where(null, 0, jnp.sqrt(jnp.sum(
      jnp.square(columns), axis=0))))
  reference = reference * jnp.where(
      norms > 0, jnp.where(largest > 0, largest, 1) / jnp.where(
          norms > 0, norms, 1), 0)[None, :]
  on_axes = _axis_columns(on_axis, axes, dtype)
  augmented = jnp.where(position >= d - axes, on_axes,
                        jnp.where(in_reference, reference, columns))
  orthonormal = jnp.linalg.qr(augmented)[0]
  sign = jnp.where(jnp.sum(orthonormal * reference, axis=0) < 0, -1, 1)
  canonical = orthonormal * live * sign.astype(dtype)
  return jnp.where(position >= d - axes, on_axes, jnp.where(
      in_reference, canonical, columns))


def _eigh(stat: jax.Array, old_basis: jax.Array, by_rank: bool) -> Solution:
  """A full symmetric eigendecomposition of one factor; see the two
  solvers. ``by_rank``: the old columns follow the new ones in the order of
  their Rayleigh quotients, not index for index."""
  eigenvalues, basis = jnp.linalg.eigh(stat)
  eigenvalues, basis = eigenvalues[::-1], basis[:, ::-1]
  ok = _all_finite(basis) & _all_finite(eigenvalues)
  basis, eigenvalues = canonical_null_space(stat, basis, eigenvalues)
  old_values = rayleigh_quotients(stat, old_basis)
  identity_order = jnp.arange(eigenvalues.shape[0]) + jnp.zeros_like(
      old_values, dtype=jnp.arange(1).dtype)
  if by_rank:
    order = jnp.argsort(old_values, descending=True, stable=True)
    order = jnp.where(ok, order + jnp.zeros_like(identity_order),
                      identity_order)
  else:
    # Column i of the new basis follows column i of the old one: both are
    # sorted by decreasing eigenvalue (estimate) when they come from eigh.
    order = identity_order
  return Solution(jnp.where(ok, basis, old_basis),
                  jnp.where(ok, eigenvalues, old_values), order, ok)


def solve_eigh(stat: jax.Array, old_basis: jax.Array) -> Solution:
  """A full symmetric eigendecomposition of one factor (about ``9 d^3``
  flops); eigenvalues descending. When it is not finite, the old basis and
  its Rayleigh quotients ``diag(Q^T GG Q)`` are returned."""
  return _eigh(stat, old_basis, by_rank=False)


def solve_eigh_by_rank(stat: jax.Array, old_basis: jax.Array) -> Solution:
  """:func:`solve_eigh` replacing a basis that another solver made (a QR
  refresh's, on a call where another unit initializes and every due unit is
  solved by ``eigh``): the old columns, ranked by their Rayleigh quotients
  ``diag(Q^T GG Q)`` (descending, stable), are matched to the new columns in
  that order, so that per-column state (SOAP's ``v``, KL's estimates)
  follows its direction even where the old basis was not sorted (unsorted
  QR)."""
  return _eigh(stat, old_basis, by_rank=True)


def _power_qr(stat: jax.Array, old_basis: jax.Array, sort: bool) -> Solution:
  """One power-iteration step from ``old_basis`` (its columns sorted by
  ``diag(Q^T GG Q)`` first if ``sort``), then QR; see the two solvers."""
  power = jnp.matmul(stat, old_basis, precision=HIGHEST)
  identity_order = jnp.arange(power.shape[-1]) + jnp.zeros_like(
      power[0], dtype=jnp.arange(1).dtype)
  if sort:
    estimates = jnp.einsum('ij,ij->j', old_basis, power, precision=HIGHEST)
    # (= rayleigh_quotients(stat, old_basis), reusing the product GG Q.)
    # Estimates at rounding level are ties (kept in their order), so that
    # the null columns' order does not depend on rounding either.
    estimates = jnp.where(estimates <= null_space_threshold(estimates, stat),
                          jnp.zeros_like(estimates), estimates)
    order = jnp.argsort(estimates, descending=True, stable=True)
    # Typed like ``estimates`` (inside ``shard_map``: varying over the mesh
    # as the other outputs; ``argsort``'s index operand alone is not).
    order = order + jnp.zeros_like(estimates, dtype=order.dtype)
    power = power[:, order]
  else:
    order = identity_order
  new_basis, _ = jnp.linalg.qr(power)
  ok = _all_finite(new_basis)
  basis = jnp.where(ok, new_basis, old_basis)
  basis, values = canonical_null_space(stat, basis,
                                       rayleigh_quotients(stat, basis))
  return Solution(basis, values, jnp.where(ok, order, identity_order), ok)


def solve_power_qr(stat: jax.Array, old_basis: jax.Array) -> Solution:
  """One step of power iteration warm-started from the current basis, then
  QR (about ``14/3 d^3`` flops), as in the SOAP reference implementation:
  ``est = diag(Q^T GG Q)``, ``order`` sorts ``est`` descending (stable),
  ``Q <- qr(GG Q[:, order]).Q``; the values are ``diag(Q_new^T GG Q_new)``.
  When the new basis is not finite, the old one is kept (identity order).
  The null space then gets the basis of :func:`canonical_null_space`."""
  return _power_qr(stat, old_basis, sort=True)


def solve_unsorted_power_qr(stat: jax.Array, old_basis: jax.Array
                            ) -> Solution:
  """:func:`solve_power_qr` without the sort, as in the KL-Shampoo and
  KL-SOAP reference implementation: ``Q <- qr(GG Q).Q``, column ``j`` of the
  new basis following column ``j`` of the old one (identity ``order``: the
  per-column estimates stay where they are). Warm-started from a basis
  sorted by decreasing eigenvalue (``eigh``'s, on the first call), the
  columns stay close to that order; :func:`canonical_null_space` then acts
  on the trailing run of null columns only."""
  return _power_qr(stat, old_basis, sort=False)


def keep_basis(stat: jax.Array, old_basis: jax.Array) -> Solution:
  """The solution of a factor that is not refreshed: its basis unchanged.

  Built from ``old_basis``, so that inside ``shard_map`` it varies over the
  mesh as a solver's output does (the branches of a ``lax.cond`` must agree).
  """
  del stat
  zeros = jnp.zeros_like(old_basis[0])
  order = jnp.arange(zeros.shape[0]) + zeros.astype(jnp.arange(1).dtype)
  return Solution(old_basis, zeros, order, jnp.isfinite(zeros[0]) | True)


# The solvers a refresh can use, by the name the transforms' ``refresh=``
# takes. A new solver is one entry here.
SOLVERS: dict[str, Callable[[jax.Array, jax.Array], Solution]] = {
    'eigh': solve_eigh,
    'qr': solve_power_qr,
    'qr_unsorted': solve_unsorted_power_qr,
}


def eigh_basis(
    stat: jax.Array, old_basis: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(new_basis, eigenvalues)`` of :func:`solve_eigh`."""
  solution = solve_eigh(stat, old_basis)
  return solution.basis, solution.values


def power_qr_basis(
    stat: jax.Array, old_basis: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(new_basis, order)`` of :func:`solve_power_qr`; ``order`` must be
  applied to every quantity kept per column of the old basis."""
  solution = solve_power_qr(stat, old_basis)
  return solution.basis, solution.order
