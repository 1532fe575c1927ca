"""Per-axis second-moment statistics: Adafactor's factored estimate.

For a (merged) tensor ``X`` with axes ``0..N-1`` the statistic of axis ``k`` is
the sum of ``X**2`` over every other axis (for a matrix: row sums and column
sums). Adafactor rebuilds a full second moment from them as

.. math::

  \\hat V = \\frac{s_0 \\otimes s_1 \\otimes \\cdots \\otimes s_{N-1}}{T^{N-1}},
  \\qquad T = \\sum_i (s_0)_i = \\sum X^2

(for a matrix ``V = r c^T / sum(r)``), which is exact when ``X**2`` has rank
one. The statistic of an axis is unchanged by any rotation of the *other* axes,
and it is the diagonal of that axis's Kronecker factor ``C_k(X)``.

References:
  Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
  Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
"""

from typing import Sequence

import jax
import jax.numpy as jnp


def axis_sums_of_squares(x: jax.Array) -> tuple[jax.Array, ...]:
  """``sum(x**2)`` over every axis but ``k``, for each axis ``k``."""
  squared = jnp.square(x)
  return tuple(
      jnp.sum(squared, axis=tuple(a for a in range(x.ndim) if a != k))
      for k in range(x.ndim))


def outer_product(vectors: Sequence[jax.Array]) -> jax.Array:
  """``v_0 ⊗ v_1 ⊗ ...`` as an N-d array."""
  n = len(vectors)
  result = jnp.ones((), vectors[0].dtype)
  for k, v in enumerate(vectors):
    shape = [1] * n
    shape[k] = v.shape[0]
    result = result * v.reshape(shape)
  return result


def factored_second_moment(stats: Sequence[jax.Array]) -> jax.Array:
  """Adafactor's ``(s_0 ⊗ ... ⊗ s_{N-1}) / T^{N-1}``, ``T = sum(s_0)``.

  Where ``T`` is zero (no gradient seen yet) the result is zero. Computed as
  ``((s_0 / T) ⊗ ... ⊗ (s_{N-1} / T)) T``, so that no intermediate product
  exceeds ``T`` (the plain product of N statistics can overflow where the
  result does not).
  """
  total = jnp.sum(stats[0])
  safe_total = jnp.where(total > 0, total, 1.0)
  return outer_product([s / safe_total for s in stats]) * safe_total


def inverse_power(x: jax.Array, exponent: jax.typing.ArrayLike) -> jax.Array:
  """``x ** -exponent`` where ``x > 0``, and 0 elsewhere (a pseudo-inverse)."""
  positive = x > 0
  return jnp.where(positive, jnp.where(positive, x, 1.0) ** (-exponent), 0.0)
