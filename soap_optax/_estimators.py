"""What a unit's Kronecker factors absorb: the factor estimators.

Shampoo's (the paper's SOAP, Shampoo, Adafactor in the eigenbasis), per
factored axis ``i`` with ``G_{(i)}`` the mode-``i`` unfolding:

.. math::

  C_i(G) = G_{(i)} G_{(i)}^T, \\qquad
  GG_i \\leftarrow \\beta GG_i + (1 - \\beta) C_i(G)

(for a matrix ``C_0 = G G^T``, ``C_1 = G^T G``); and KL-Shampoo's, whose
factors absorb the gradient whitened by the other factors' eigenvalue
estimates, which it keeps and floors (:func:`kl_factor_statistics`). A
transform picks one (:class:`Frobenius` or :class:`KL`) and hands it to the
skeleton; both feed the same factors, refresh and rotation.

An estimator says, per unit: what the factors absorb (``statistics``), what
each basis column gains from the rotated gradient (``increments``: the
engine's tracked ``diag(Q^T GG Q)`` is their running average), the estimates
it keeps besides the factors (``init_stack``, ``advance``) and what a refresh
does to them (``on_refresh``).

References:
  Gupta et al., `Shampoo <https://arxiv.org/abs/1802.09568>`_, 2018; Lin et
  al., `Understanding and Improving Shampoo and SOAP via Kullback-Leibler
  Minimization <https://arxiv.org/abs/2509.03378>`_, 2025.
"""

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from soap_optax import _factored
from soap_optax import _kronecker

HIGHEST = _kronecker.HIGHEST


def factor_statistics(
    grad: jax.Array, layout: _kronecker.FactorLayout) -> tuple[jax.Array, ...]:
  """``C_i(G)``: ``G`` contracted with itself over every axis but ``i``.

  ``grad`` has the merged shape.
  """
  stats = []
  for axis in layout.factored_axes:
    others = tuple(a for a in range(grad.ndim) if a != axis)
    stats.append(
        jnp.tensordot(grad, grad, axes=(others, others), precision=HIGHEST))
  return tuple(stats)


def accumulate(
    factors: _kronecker.KroneckerFactors, statistics: Sequence[jax.Array],
    beta: Any,
) -> _kronecker.KroneckerFactors:
  """``GG_i <- beta GG_i + (1 - beta) C_i``, ``C_i`` per factored axis (by
  default :func:`factor_statistics` of the gradient). ``1 - beta`` is taken
  in the factors' dtype, so that a Python ``beta`` and the same ``beta``
  injected as an array (:func:`optax.inject_hyperparams`) give the same bits:
  a rank-deficient float32 factor would carry their last-bit difference into
  the update."""
  new_stats = tuple(
      beta * old + (1 - jnp.asarray(beta, old.dtype)) * new
      for old, new in zip(factors.stats, statistics))
  return factors._replace(stats=new_stats)


# ------------------------------------------------------------------------------
# The KL estimator of the factors (Lin et al., arXiv 2509.03378).

# The eigenvalue estimates' prior: every estimate starts here (the authors'
# ``init_factor``).
KL_INITIAL_EIGENVALUE = 0.1
# Estimates are kept >= 1 / c^2 with c = clip(d, 10, 4000) for an axis of
# length d: the authors' clamp of the inverse square roots at c.
KL_CLAMP_RANGE = (10, 4000)


def kl_eigenvalue_floor(d: int) -> float:
  """``1 / c^2``, ``c = clip(d, 10, 4000)``: the least eigenvalue estimate of
  an axis of length ``d``."""
  low, high = KL_CLAMP_RANGE
  return 1.0 / float(min(max(d, low), high))**2


def _inverse_outer(values: Sequence[jax.Array], skip: int,
                   exponent: float) -> jax.Array:
  """``⊗_{j != skip} values_j^-exponent``, broadcastable against the unit
  (length 1 along axis ``skip``)."""
  n = len(values)
  result = jnp.ones((1,) * n, values[0].dtype)
  for j, v in enumerate(values):
    if j != skip:
      result = result * (v**-exponent).reshape(
          tuple(-1 if a == j else 1 for a in range(n)))
  return result


def kl_factor_statistics(grad: jax.Array, factors: _kronecker.KroneckerFactors,
                         values: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  r"""The KL rule's contribution to each factor, whitened by the others.

  .. math::

    C_k = \frac{d_k}{n}\, G_{(k)} \Big(\bigotimes_{j \neq k} S_j^{-1}\Big)
          G_{(k)}^T, \qquad S_j^{-1} \approx Q_j \operatorname{diag}(λ_j)^{-1}
          Q_j^T

  (``n`` the unit's size; an axis without a factor has ``Q_j = I``), computed
  as ``C_k(X_k)`` of ``X_k = G ×_{j≠k} Λ_j^{-1/2} Q_j^T``. For a matrix:
  ``C_L = G S_R^{-1} G^T / d_R``, ``C_R = G^T S_L^{-1} G / d_L``.

  Args:
    grad: the unit's gradient, merged shape.
    factors: the unit's factors (their bases are used).
    values: per (merged) axis, the positive eigenvalue estimates ``λ_j``.
  """
  layout = factors.layout
  bases = dict(zip(layout.factored_axes, factors.bases))
  stats = []
  for axis in layout.factored_axes:
    x = grad
    for other, basis in bases.items():
      if other != axis:
        x = _kronecker.multiply_along_axis(basis.T, x, other)
    x = x * _inverse_outer(values, axis, 0.5)
    others = tuple(a for a in range(grad.ndim) if a != axis)
    stats.append(jnp.tensordot(x, x, axes=(others, others), precision=HIGHEST)
                 / _size_of_others(grad.shape, axis))
  return tuple(stats)


def _size_of_others(shape: Sequence[int], axis: int) -> int:
  """``n / d_axis``, the number of fibres along ``axis`` (1 if none: an
  empty parameter's statistics stay zero)."""
  return max(1, math.prod(d for a, d in enumerate(shape) if a != axis))


def kl_eigenvalue_increments(rotated: jax.Array,
                             values: Sequence[jax.Array]
                             ) -> tuple[jax.Array, ...]:
  r"""Per axis ``k``: ``diag(Q_k^T C_k Q_k)`` of :func:`kl_factor_statistics`,
  i.e. ``mean_{i_{j≠k}} G'^2 / Π_{j≠k} λ_j`` with ``G'`` the rotated
  gradient: what the KL rule adds to the factor along each basis column."""
  squared = jnp.square(rotated)
  return tuple(
      jnp.sum(squared * _inverse_outer(values, axis, 1.0),
              axis=tuple(a for a in range(rotated.ndim) if a != axis))
      / _size_of_others(rotated.shape, axis)
      for axis in range(rotated.ndim))


def kl_absorbed_statistics(grad: jax.Array,
                           factors: _kronecker.KroneckerFactors,
                           values: Sequence[jax.Array],
                           initializing: jax.Array) -> tuple[jax.Array, ...]:
  """What the factors absorb under the KL rule (:func:`kl_factor_statistics`
  with the estimates ``values``); on a unit's first call (its bases are
  still the identity) Shampoo's ``d_k / n C_k(G)``, the authors'
  initialization."""
  values = tuple(jnp.where(initializing, jnp.ones_like(v), v) for v in values)
  return kl_factor_statistics(grad, factors, values)


def kl_updated_eigenvalues(values: Sequence[jax.Array],
                           increments: Sequence[jax.Array], beta: Any,
                           running_axes: Sequence[int]
                           ) -> tuple[jax.Array, ...]:
  """The KL estimates after one gradient: on ``running_axes``
  ``λ_k <- max(β λ_k + (1 - β) increment_k, floor_k)`` with the increments
  of :func:`kl_eigenvalue_increments`; the other axes keep theirs."""
  return tuple(
      kl_floored(beta * v + (1 - beta) * new) if axis in running_axes else v
      for axis, (v, new) in enumerate(zip(values, increments)))


def kl_floored(values: jax.Array) -> jax.Array:
  """One axis's estimates clamped at :func:`kl_eigenvalue_floor`."""
  return jnp.maximum(values, jnp.asarray(
      kl_eigenvalue_floor(values.shape[-1]), values.dtype))


# ------------------------------------------------------------------------------
# The estimators a transform picks.


class NoEstimates(NamedTuple):
  """The per-stack state of an estimator that keeps nothing besides the
  factors."""


class KLEstimates(NamedTuple):
  """The KL estimator's per-stack state.

  Attributes:
    eigenvalues: ``λ_k`` for every (merged) axis, ``(U, d_k)`` per axis.
  """

  eigenvalues: tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class Frobenius:
  """Shampoo's estimator: ``GG_k`` absorbs ``C_k(G)``; a column gains the
  rotated gradient's sum of squares along it.

  Attributes:
    beta: the decay of the factors.
  """

  beta: Any
  pads_exactly = True

  def init_stack(self, stack: Any) -> NoEstimates:
    del stack  # Nothing is kept besides the factors.
    return NoEstimates()

  def statistics(self, grad, factors, estimates, initializing):
    del estimates, initializing  # C_k(G) depends on the gradient alone.
    return factor_statistics(grad, factors.layout)

  def increments(self, rotated, estimates):
    del estimates
    return _factored.axis_sums_of_squares(rotated)

  def advance(self, estimates, increments, layout):
    del increments, layout
    return estimates

  def on_refresh(self, estimates, change, values):
    del change, values
    return estimates


@dataclasses.dataclass(frozen=True)
class KL:
  """KL-Shampoo's estimator (Lin et al.): the factors absorb the gradient
  whitened by the other axes' estimates ``λ_j``, which it keeps per axis.

  Attributes:
    beta: the decay of the factors and of the estimates.
    initial_eigenvalue: the estimates' starting value.
    running: ``True``: every axis's ``λ_k`` is a running estimate, permuted
      with its columns at a refresh; ``False``: a factored axis's ``λ_k`` is
      the refresh's eigenvalues, floored, held between refreshes.
  """

  beta: Any
  initial_eigenvalue: Any = KL_INITIAL_EIGENVALUE
  running: bool = True
  pads_exactly = False  # d_k / n and the floors count the unit's entries

  def init_stack(self, stack: Any) -> KLEstimates:
    return KLEstimates(tuple(
        jnp.full((stack.num_slots, d), self.initial_eigenvalue, stack.dtype)
        for d in stack.layout.merged_shape))

  def statistics(self, grad, factors, estimates, initializing):
    return kl_absorbed_statistics(grad, factors, estimates.eigenvalues,
                                  initializing)

  def increments(self, rotated, estimates):
    return kl_eigenvalue_increments(rotated, estimates.eigenvalues)

  def advance(self, estimates, increments, layout):
    running_axes = tuple(
        axis for axis in range(len(layout.merged_shape))
        if self.running or axis not in layout.factored_axes)
    return KLEstimates(kl_updated_eigenvalues(
        estimates.eigenvalues, increments, self.beta, running_axes))

  def on_refresh(self, estimates, change, values):
    if self.running:
      return KLEstimates(change.per_axis(estimates.eigenvalues))
    eigenvalues = list(estimates.eigenvalues)
    for axis, refreshed in zip(change.old.layout.factored_axes, values):
      eigenvalues[axis] = kl_floored(refreshed)
    return KLEstimates(tuple(eigenvalues))


# ``factor_estimator`` name -> estimator class.
ESTIMATORS = {'frobenius': Frobenius, 'kl': KL}

# What each estimator's authors run SOAP with: the refresh solver and
# Adam's bias correction. Vyas et al.'s ``soap.py`` sorts the QR refresh's
# columns and corrects the bias; Lin et al.'s ``KLOpt(using_klsoap=True)``
# (``yorkerlin/KL-Methods``, ``optim/kl_opt.py``) does neither.
AUTHORS_CHOICES = {
    'frobenius': {'refresh': 'qr', 'bias_correction': True},
    'kl': {'refresh': 'qr_unsorted', 'bias_correction': False},
}
