"""Staleness: how far a basis is from diagonalizing its factor.

Read by the adaptive refresh policy (:class:`soap_optax.AdaptiveRefresh`),
by :func:`soap_optax.diagnostics` and by the engine's state, from numbers the
update keeps anyway (the factor and its tracked Rayleigh quotients).
"""

import jax
import jax.numpy as jnp


def staleness(stat: jax.Array, quotients: jax.Array) -> jax.Array:
  r"""How far a basis is from diagonalizing its factor, from tracked numbers.

  With ``B = Q^T GG Q`` and ``quotients = diag(B)``:

  .. math::

    s = \frac{\lVert B - \operatorname{diag} B \rVert_F}{\lVert B \rVert_F}
      = \sqrt{\max\Big(0,\ 1 - \frac{\lVert \operatorname{diag} B
        \rVert^2}{\lVert GG \rVert_F^2}\Big)}

  since an orthogonal ``Q`` keeps the Frobenius norm. The transforms keep
  ``diag B`` current without forming ``B``: while ``Q`` is fixed,
  ``diag(Q^T C(G) Q)`` is the sum of the squared rotated gradient over the
  other axes, which the update computes anyway, so
  ``diag B <- β diag B + (1 - β) sums`` is exact; a refresh sets it to the
  new basis's eigenvalue estimates. The cost is ``O(d^2)`` per factor for
  ``‖GG‖_F`` (against ``O(d^3)`` for ``B``). A zero factor has ``s = 0``.

  Args:
    stat: a factor ``GG``, ``(d, d)``.
    quotients: ``diag(Q^T GG Q)``, ``(d,)``.

  Returns:
    The scalar ``s`` in [0, 1].
  """
  # Scaled by the largest entry first, so that squaring neither overflows
  # nor underflows the dtype.
  scale = jnp.max(jnp.abs(stat))
  scale = jnp.where(scale > 0, scale, 1)
  total = jnp.sum(jnp.square(stat / scale))
  diagonal = jnp.sum(jnp.square(quotients / scale))
  share = jnp.where(total > 0, 1 - diagonal / jnp.where(total > 0, total, 1),
                    0)
  return jnp.sqrt(jnp.clip(share, 0, 1))
