"""Rounding-noise floors: rotated coordinates that hold only rounding error.

Rotating a gradient into a basis in floating point leaves an error of about
machine epsilon times the energy it could have leaked from; where the true
rotated value is (near) zero, that error is all there is, and a normalizing
step (Adam's ``m / sqrt(v)``, Shampoo's inverse roots) would turn it into a
full-size update. The floors here are what the rules add before normalizing.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from soap_optax import _kronecker


# Rotated coordinates that hold only the rotation's rounding error: below this
# many machine epsilons of the energy they could have leaked from, a rotated
# coordinate is treated as noise (see :func:`rounding_floor_squared`).
ROUNDING_FLOOR_ULPS = 1000.0


def _rounding_floor_scale(dtype: Any) -> float:
  """``(κ ε)^2`` for ``dtype``: the floor's factor on an energy."""
  return (ROUNDING_FLOOR_ULPS * float(jnp.finfo(dtype).eps))**2


def rounding_floor_squared(
    second_moment: jax.Array, layout: _kronecker.FactorLayout,
    extent: jax.Array | None = None) -> jax.Array:
  r"""The squared rounding-noise floor of one unit's rotated second moment.

  Rotating along a factored axis ``a`` (a product with ``Q_a^T``, computed in
  floating point) leaves in every output coordinate an error of the order of
  ``ε ||fibre_a||``: machine epsilon of the dtype times the norm of the fibre
  along ``a`` through that coordinate, which the rotation preserves. Where the
  true rotated value is (near) zero, e.g. outside the span of a rank-deficient
  gradient, that error is all there is, and Adam's ``m / sqrt(v)`` would
  normalize it to a full-size update. Measured on float32 rank-1 to rank-8
  gradients, the error reaches about ``1.3 ε ||G||_F`` in the coordinates next
  to the gradient's span and is about ``0.2 ε ||G||_F sqrt(sum_a 1/d_a)``
  (root mean square) elsewhere. The floor is

  .. math::

    f^2(x) = (κ ε)^2 \sum_{a \in factored} \big(F_a(x) + \bar F_a\big),
    \qquad F_a(x) = \sum_{y \in fibre_a(x)} V_y

  with ``V`` the second moment (its sum over a fibre is the running fibre
  energy), ``\bar F_a`` the mean of ``F_a`` over the unit and
  ``κ = ROUNDING_FLOOR_ULPS`` (over the unit's own fibres: ``extent`` as in
  :class:`soap_optax._kronecker.KroneckerFactors`); the transforms divide
  by ``sqrt(V + f^2)``
  instead of ``sqrt(V)``. In float32 ``κ ε ≈ 1.2e-4``: a coordinate is
  damped only where its energy is below about ``1e-8`` of the energy of the
  fibres through it. In float64 ``κ ε ≈ 2.2e-13`` and the floor is far below
  any ``eps``. A unit without factored axes is never rotated and has no floor.

  Returns:
    ``f^2``, broadcastable against ``second_moment`` (0 without factors).
  """
  if not layout.factored_axes:
    return jnp.zeros((), second_moment.dtype)
  scale = _rounding_floor_scale(second_moment.dtype)
  energy = jnp.zeros((), second_moment.dtype)
  for axis in layout.factored_axes:
    fibre = jnp.sum(second_moment, axis=axis, keepdims=True)
    energy = energy + fibre + _kronecker.unit_mean(fibre, extent, axis)
  return scale * energy


def with_separable_rounding_floor(
    per_axis: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """``s_k + (κ ε)^2 sum(s_k)`` for each axis's statistic (or eigenvalues).

  The separable form of :func:`rounding_floor_squared`, for second moments
  built as products of per-axis statistics (Shampoo's ``Λ_L ⊗ Λ_R / T``,
  Adafactor's ``r c^T / sum(r)``): the product of the floored statistics is
  the product plus about ``(κ ε)^2 (Λ_L ⊗ tr Λ_R + tr Λ_L ⊗ Λ_R) / T``, the
  fibre energies of :func:`rounding_floor_squared`. Non-positive statistics
  (round-off of a null direction) stay non-positive where the floor is below
  them in magnitude, so Shampoo and Adafactor zero the same coordinates and
  their identity holds with the floor on.
  """
  return tuple(
      s + _rounding_floor_scale(s.dtype) * jnp.sum(s)
      for s in per_axis)
