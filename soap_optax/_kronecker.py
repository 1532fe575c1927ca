"""A unit's Kronecker factors: which axes get one, and rotation into bases.

Every transformation in this package keeps its statistics in the eigenbasis of
Shampoo's preconditioner. It works on *units*: a parameter, or one slice or
block of it (see :mod:`soap_optax._stacks`, which cuts parameters into units
and stacks units of the same shape). For a unit ``G`` whose (merged) shape is
``(d_0, ..., d_{N-1})`` it keeps, for each *factored* axis ``i``, a Kronecker
factor ``GG_i`` (what it absorbs: :mod:`soap_optax._estimators`) and an
orthonormal basis ``Q_i`` of ``R^{d_i}`` refreshed from it
(:mod:`soap_optax._solvers`), and rotates a tensor into, and out of, that
basis:

.. math::

  rotate(G) = G \\times_0 Q_0^T \\times_1 Q_1^T \\cdots   (matrix: Q_L^T G Q_R)

  unrotate(X) = X \\times_0 Q_0 \\times_1 Q_1 \\cdots       (matrix: Q_L X Q_R^T)

Axes that are not factored use the identity basis. Which axes are factored is
decided once, at ``init``, by :func:`plan_layout`, and stored in the state as
part of a static plan (the tree structure, not an array), so the compiled
``update`` never depends on a traced ``max_precond_dim`` (as
:func:`optax.inject_hyperparams` would pass it). The per-unit functions here are
:func:`jax.vmap`-ed over a stack by the transforms.

References:
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithms 2 and 3).
"""

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FactorLayout:
  """How the engine sees one parameter. Static (no array leaves).

  Attributes:
    shape: the parameter's shape.
    merged_shape: the shape the factors are built on (``shape`` unless
      ``merge_dims`` merged consecutive axes; ``(1,)`` for a scalar).
    factored_axes: the axes of ``merged_shape`` that carry a Kronecker factor,
      in increasing order; every other axis uses the identity basis.
  """

  shape: tuple[int, ...]
  merged_shape: tuple[int, ...]
  factored_axes: tuple[int, ...]

  @property
  def factor_sizes(self) -> tuple[int, ...]:
    return tuple(self.merged_shape[i] for i in self.factored_axes)

  def unfactored(self, per_axis: Sequence[Any]) -> tuple[Any, ...]:
    """The entries of a per-axis tuple that belong to axes without a
    factor."""
    return tuple(x for axis, x in enumerate(per_axis)
                 if axis not in self.factored_axes)

  def interleave(self, factored: Sequence[Any], unfactored: Sequence[Any]
                 ) -> tuple[Any, ...]:
    """One entry per axis: the factored axes' from ``factored``, the others'
    from ``unfactored``, each in axis order."""
    factored, unfactored = iter(factored), iter(unfactored)
    return tuple(
        next(factored) if axis in self.factored_axes else next(unfactored)
        for axis in range(len(self.merged_shape)))

  @property
  def unit_cost(self) -> int:
    """A unit's work, in multiply-adds up to constants: its refresh
    ``sum(d_i^3)`` over the factors plus a step's ``n (1 + sum(d_i))``
    (elementwise work and the rotations; ``n`` its size)."""
    sizes = self.factor_sizes
    return sum(d**3 for d in sizes) + max(1, math.prod(self.merged_shape)) * (
        1 + sum(sizes))


class KroneckerFactors(NamedTuple):
  """The factors of one unit, or of a stack of units (a leading ``U`` axis).

  The per-unit functions below take one unit; the transforms :func:`jax.vmap`
  them over a stack.

  Attributes:
    layout: the unit's :class:`FactorLayout` (static).
    stats: ``GG_i``, one ``(d_i, d_i)`` array per factored axis.
    bases: ``Q_i``, one orthonormal ``(d_i, d_i)`` array per factored axis.
    extent: in a size bucket, the unit's own length along each axis of
      ``merged_shape`` (an int array; the rest is zero padding), for the
      few quantities that count entries (means); None: ``merged_shape``.
  """

  layout: FactorLayout
  stats: tuple[jax.Array, ...]
  bases: tuple[jax.Array, ...]
  extent: jax.Array | None = None


def unit_mean(x: jax.Array, extent: jax.Array | None,
              summed_axis: int | None = None) -> jax.Array:
  """The mean of ``x`` over a unit's own entries: ``x``'s sum over the count
  ``extent`` gives (a size bucket's zero padding is not counted); with
  ``summed_axis``, ``x`` was already summed along that axis (length 1)."""
  if extent is None:
    return jnp.mean(x)
  count = jnp.prod(extent)
  if summed_axis is not None:
    count = count // extent[summed_axis]
  return jnp.sum(x) / jnp.maximum(count, 1).astype(x.dtype)


def merge_axes(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
  """Merges consecutive axes greedily, left to right, up to ``max_dim``.

  The running product keeps absorbing the next axis while it stays
  ``<= max_dim``; otherwise a new merged axis starts. An axis that alone exceeds
  ``max_dim`` stays alone. Example: ``(2, 3, 8, 5)`` with ``max_dim=10`` gives
  ``(6, 8, 5)``.
  """
  merged: list[int] = []
  for size in shape:
    if merged and merged[-1] * size <= max_dim:
      merged[-1] *= size
    else:
      merged.append(size)
  return tuple(merged)


def plan_layout(
    shape: Sequence[int],
    *,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    one_sided: bool = False,
) -> FactorLayout:
  """Decides which axes of a parameter carry a Kronecker factor.

  Rules, in order:

  * scalars (seen as shape ``(1,)``) and empty arrays never get a factor;
  * a 1-D parameter gets one only if ``precondition_1d`` and its length is
    ``<= max_precond_dim``;
  * otherwise the shape is first merged with :func:`merge_axes` when
    ``merge_dims``, and every (merged) axis of length ``<= max_precond_dim``
    gets a factor;
  * with ``one_sided``, only the shortest factored axis longer than 1 keeps
    its factor (the first one on ties); a length-1 axis's factor is the
    scalar 1, so picking it would leave plain Adam.

  Args:
    shape: the parameter's shape.
    max_precond_dim: axes longer than this get no factor.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor.
    one_sided: keep a factor only on the shortest axis.

  Returns:
    The parameter's :class:`FactorLayout`.
  """
  shape = tuple(int(n) for n in shape)
  if not shape:
    return FactorLayout(shape, (1,), ())
  if math.prod(shape) == 0:
    return FactorLayout(shape, shape, ())
  if len(shape) == 1:
    factored = (0,) if precondition_1d and shape[0] <= max_precond_dim else ()
    return FactorLayout(shape, shape, factored)
  merged = merge_axes(shape, max_precond_dim) if merge_dims else shape
  factored = tuple(i for i, n in enumerate(merged) if n <= max_precond_dim)
  if one_sided and len(factored) > 1:
    longer = [i for i in factored if merged[i] > 1] or list(factored)
    factored = (min(longer, key=lambda i: merged[i]),)
  return FactorLayout(shape, merged, factored)


def state_dtype(dtype: Any) -> jnp.dtype:
  """float32, or the parameter's dtype where that is wider (float64)."""
  return jnp.promote_types(jnp.float32, dtype)


# ------------------------------------------------------------------------------
# Per-unit operations (one slice or block; :func:`jax.vmap` them over a stack).


def multiply_along_axis(
    matrix: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  """``y[..., j, ...] = sum_a matrix[j, a] x[..., a, ...]`` along ``axis``."""
  y = jnp.tensordot(matrix, x, axes=((1,), (axis,)), precision=HIGHEST)
  return jnp.moveaxis(y, 0, axis)


def rotate(x: jax.Array, factors: KroneckerFactors) -> jax.Array:
  """``x ×_i Q_i^T`` over the factored axes (matrix: ``Q_L^T x Q_R``).

  ``x`` has the merged shape; so has the result.
  """
  for axis, basis in zip(factors.layout.factored_axes, factors.bases):
    x = multiply_along_axis(basis.T, x, axis)
  return x


def unrotate(x: jax.Array, factors: KroneckerFactors) -> jax.Array:
  """``x ×_i Q_i`` over the factored axes (matrix: ``Q_L x Q_R^T``)."""
  for axis, basis in zip(factors.layout.factored_axes, factors.bases):
    x = multiply_along_axis(basis, x, axis)
  return x


def permute_axes(
    x: jax.Array, layout: FactorLayout, orders: Sequence[jax.Array]
) -> jax.Array:
  """Reorders each factored axis of a merged-shape ``x`` by ``orders[i]``."""
  for axis, order in zip(layout.factored_axes, orders):
    x = jnp.take(x, order, axis=axis)
  return x


def permute_per_axis(per_axis: Sequence[jax.Array], layout: FactorLayout,
                     orders: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """One vector per (merged) axis, each factored axis's reordered by
  ``orders[i]`` (it follows its basis's columns)."""
  per_axis = list(per_axis)
  for axis, order in zip(layout.factored_axes, orders):
    per_axis[axis] = per_axis[axis][order]
  return tuple(per_axis)


class BasisChange(NamedTuple):
  """A unit's refresh: its old bases, its new ones and how the columns moved.

  What a rule whose moments live in the basis needs to carry them across:
  :meth:`tensor` for a tensor in rotated coordinates (exact), :meth:`permuted`
  and :meth:`per_axis` for statistics that follow their columns.

  Attributes:
    old: the unit's factors with the bases the step used.
    new: the same factors with the refreshed bases.
    orders: per factored axis, the old column each new one follows (see
      :class:`soap_optax._solvers.Solution`).
  """

  old: KroneckerFactors
  new: KroneckerFactors
  orders: tuple[jax.Array, ...]

  def tensor(self, x: jax.Array) -> jax.Array:
    """``rotate_new(unrotate_old(x))``, computed in the statistics' dtype and
    returned in ``x``'s."""
    dtype = self.old.stats[0].dtype
    return rotate(unrotate(x.astype(dtype), self.old), self.new).astype(
        x.dtype)

  def permuted(self, x: jax.Array) -> jax.Array:
    """A merged-shape ``x`` with each factored axis reordered like its
    basis's columns."""
    return permute_axes(x, self.old.layout, self.orders)

  def per_axis(self, vectors: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """One vector per (merged) axis, each factored one reordered like its
    basis's columns."""
    return permute_per_axis(vectors, self.old.layout, self.orders)
