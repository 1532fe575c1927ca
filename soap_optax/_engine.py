"""The eigenbasis engine: Kronecker factors, rotation and the batched refresh.

Every transformation in this package keeps its statistics in the eigenbasis of
Shampoo's preconditioner, and every one of them gets that basis from here.

The engine works on *units*: a parameter, or one slice or block of it (see
:mod:`soap_optax._stacks`, which cuts parameters into units and stacks units
of the same shape). For a unit ``G`` whose (merged) shape is
``(d_0, ..., d_{N-1})`` the engine keeps, for each *factored* axis ``i``, a
Kronecker factor and a basis:

.. math::

  C_i(G) = G_{(i)} G_{(i)}^T \\in R^{d_i x d_i}
      (G_{(i)}: the mode-i unfolding; for a matrix C_0 = G G^T, C_1 = G^T G)

  GG_i \\leftarrow \\beta GG_i + (1 - \\beta) C_i(G)

  Q_i: an orthonormal basis of R^{d_i}, refreshed from GG_i

(KL-Shampoo's factors absorb the gradient whitened by the other factors
instead, :func:`kl_factor_statistics`)

and rotates a tensor into, and out of, that basis:

.. math::

  rotate(G) = G \\times_0 Q_0^T \\times_1 Q_1^T \\cdots   (matrix: Q_L^T G Q_R)

  unrotate(X) = X \\times_0 Q_0 \\times_1 Q_1 \\cdots       (matrix: Q_L X Q_R^T)

Axes that are not factored use the identity basis. Which axes are factored is
decided once, at ``init``, by :func:`plan_layout`, and stored in the state as
part of a static plan (the tree structure, not an array), so the compiled
``update`` never depends on a traced ``max_precond_dim`` (as
``optax.inject_hyperparams`` would pass it). The per-unit functions here are
``jax.vmap``-ed over a stack by the transforms.

Two solvers refresh one factor's basis (:data:`SOLVERS`, by the name the
transforms' ``refresh=`` takes); :mod:`soap_optax._refresh` runs them over
every factor of the same size and dtype across the whole parameter tree in one
batched call (:func:`map_by_size`):

* :func:`solve_eigh`: a full symmetric eigendecomposition of ``GG_i``
  (about ``9 d^3`` flops);
* :func:`solve_power_qr`: one step of power iteration warm-started from the
  current basis, followed by a QR decomposition (about ``14/3 d^3`` flops),
  as in the SOAP reference implementation:
  ``est = diag(Q^T GG Q)``, columns of ``Q`` sorted by ``est`` descending,
  ``Q <- qr(GG Q).Q``.

A refresh never replaces a finite basis by a non-finite one: when the new basis
of a factor is not finite the old one is kept.

References:
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithms 2 and 3).
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

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

  The per-unit functions below take one unit; the transforms ``jax.vmap``
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
# Per-unit operations (one slice or block; ``jax.vmap`` them over a stack).


def _multiply_along_axis(
    matrix: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  """``y[..., j, ...] = sum_a matrix[j, a] x[..., a, ...]`` along ``axis``."""
  y = jnp.tensordot(matrix, x, axes=((1,), (axis,)), precision=HIGHEST)
  return jnp.moveaxis(y, 0, axis)


def rotate(x: jax.Array, factors: KroneckerFactors) -> jax.Array:
  """``x ×_i Q_i^T`` over the factored axes (matrix: ``Q_L^T x Q_R``).

  ``x`` has the merged shape; so has the result.
  """
  for axis, basis in zip(factors.layout.factored_axes, factors.bases):
    x = _multiply_along_axis(basis.T, x, axis)
  return x


def unrotate(x: jax.Array, factors: KroneckerFactors) -> jax.Array:
  """``x ×_i Q_i`` over the factored axes (matrix: ``Q_L x Q_R^T``)."""
  for axis, basis in zip(factors.layout.factored_axes, factors.bases):
    x = _multiply_along_axis(basis, x, axis)
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


def factor_statistics(
    grad: jax.Array, layout: FactorLayout) -> tuple[jax.Array, ...]:
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
    factors: KroneckerFactors, statistics: Sequence[jax.Array], beta: Any
) -> KroneckerFactors:
  """``GG_i <- beta GG_i + (1 - beta) C_i``, ``C_i`` per factored axis (by
  default :func:`factor_statistics` of the gradient). ``1 - beta`` is taken
  in the factors' dtype, so that a Python ``beta`` and the same ``beta``
  injected as an array (``optax.inject_hyperparams``) give the same bits:
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


def kl_factor_statistics(grad: jax.Array, factors: KroneckerFactors,
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
        x = _multiply_along_axis(basis.T, x, other)
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


def kl_absorbed_statistics(grad: jax.Array, factors: KroneckerFactors,
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


# Rotated coordinates that hold only the rotation's rounding error: below this
# many machine epsilons of the energy they could have leaked from, a rotated
# coordinate is treated as noise (see :func:`rounding_floor_squared`).
ROUNDING_FLOOR_ULPS = 1000.0


def _rounding_floor_scale(dtype: Any) -> float:
  """``(κ ε)^2`` for ``dtype``: the floor's factor on an energy."""
  return (ROUNDING_FLOOR_ULPS * float(jnp.finfo(dtype).eps))**2


def rounding_floor_squared(
    second_moment: jax.Array, layout: FactorLayout,
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
  :class:`KroneckerFactors`); the transforms divide by ``sqrt(V + f^2)``
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
    energy = energy + fibre + unit_mean(fibre, extent, axis)
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


# ------------------------------------------------------------------------------
# Batched refresh.


def map_items(fn: Callable[..., Any], stacked: Sequence[jax.Array]):
  """``fn`` over the leading axis of ``stacked`` as one ``jax.lax.map``."""
  return jax.lax.map(lambda args: fn(*args), tuple(stacked))


def vmap_items(fn: Callable[..., Any], stacked: Sequence[jax.Array]):
  """``fn`` over the leading axis of ``stacked`` as one ``jax.vmap``."""
  return jax.vmap(fn)(*stacked)


def _map_stacked(fn: Callable[..., Any], stacked: Sequence[jax.Array]):
  """``fn`` over the leading axis of ``stacked``: one call for the whole stack.

  On accelerators this is ``jax.vmap`` (one batched solver launch). On CPU it
  is ``jax.lax.map``: jaxlib's batched LAPACK kernels (``syevd``) share XLA's
  CPU thread pool, and with a batch inside a larger program they can wait for
  pool threads that are themselves waiting, so the step never finishes
  (observed with jax 0.10.2 on 2 cores, in about 1 run of 3; never with
  ``lax.map``). It is still one primitive per stack in the program.
  """
  if jax.default_backend() == 'cpu':
    return map_items(fn, stacked)
  return vmap_items(fn, stacked)


def map_by_size(fn: Callable[..., Any], *arg_lists: Sequence[jax.Array],
                batched_call: Callable[..., Any] = _map_stacked):
  """Applies ``fn`` to every item of every stack, batched by item shape.

  Each argument list holds stacks: arrays whose leading axis counts items
  (``(U_k, ...)``). Stacks whose first argument shares item shape and dtype
  are concatenated and sent through one batched call
  (``batched_call(fn, joined_args)``, by default :func:`_map_stacked`), so
  the number of linear-algebra primitives is the number of distinct
  (item shape, dtype) pairs, not the number of stacks or items.

  Returns:
    A list with ``fn``'s stacked output for each stack, in the input order.
  """
  groups: dict[tuple[Any, ...], list[int]] = {}
  for k, first in enumerate(arg_lists[0]):
    groups.setdefault((first.shape[1:], first.dtype), []).append(k)
  results: list[Any] = [None] * len(arg_lists[0])
  for members in groups.values():
    joined = [args[members[0]] if len(members) == 1 else
              jnp.concatenate([args[k] for k in members])
              for args in arg_lists]
    batched = batched_call(fn, joined)
    start = 0
    for k in members:
      size = arg_lists[0][k].shape[0]
      results[k] = jax.tree.map(
          lambda out, start=start, size=size: out[start:start + size],
          batched)
      start += size
  return results


def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


def rayleigh_quotients(stat: jax.Array, basis: jax.Array) -> jax.Array:
  """``diag(Q^T GG Q)``: the factor's eigenvalue estimates in basis ``Q``."""
  return jnp.einsum('ij,ij->j', basis,
                    jnp.matmul(stat, basis, precision=HIGHEST),
                    precision=HIGHEST)


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


def foam_damping(
    stat: jax.Array, basis: jax.Array, eigenvalues: jax.Array,
    damping: jax.Array, *, exponent: float, tau: float, base_damping: float,
) -> jax.Array:
  r"""FOAM's damping update for one factor (see
  :class:`soap_optax.FoamRefresh`).

  With ``B = Q^T GG Q``, cached eigenvalues ``D``, ``p = 1/exponent`` and the
  current damping ``ε``:
  ``RC = ‖(D + ε)^{-1/2} (B - D) (D + ε)^{-1/2}‖_F``,
  ``α = max(λ̃) / ‖λ̃‖_2`` with ``λ̃ = (D + ε)^{-1/p}``,
  ``h = RC α / p``; returns ``max(ε_0, ε h / τ)``. Non-positive ``D + ε``
  count as zero in the inverse powers. Costs two ``d x d`` products.
  """
  rotated = jnp.matmul(basis.T, jnp.matmul(stat, basis, precision=HIGHEST),
                       precision=HIGHEST)
  shifted = eigenvalues + damping
  positive = shifted > 0
  safe = jnp.where(positive, shifted, 1)
  scale = jnp.where(positive, safe ** -0.5, 0)
  residual = rotated - jnp.diag(eigenvalues)
  relative = jnp.sqrt(jnp.sum(jnp.square(
      scale[:, None] * residual * scale[None, :])))
  inverse_root = jnp.where(positive, safe ** -exponent, 0)
  norm = jnp.sqrt(jnp.sum(jnp.square(inverse_root)))
  alpha = jnp.where(norm > 0, jnp.max(inverse_root) / jnp.where(
      norm > 0, norm, 1), 0)
  proxy = relative * alpha * exponent
  return jnp.maximum(jnp.asarray(base_damping, damping.dtype),
                     (damping * proxy / tau).astype(damping.dtype))


class Solution(NamedTuple):
  """What a solver returns for one factor ``GG`` with current basis ``Q``.

  Attributes:
    basis: the new orthonormal basis (columns by decreasing eigenvalue
      estimate); the old one where the solver's result was not finite.
    values: the eigenvalue estimates matching the new basis's columns.
    order: the old basis's column that each new column follows (QR: the
      old columns sorted by ``diag(Q^T GG Q)``, descending; eigh: the same
      index, both bases being sorted by decreasing eigenvalue). Per-column
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
  :func:`null_space_threshold` (``m = 0`` when the factor is zero: its
  basis is kept). Their subspace's projector ``P = Q_0 Q_0^T = I - Q_1
  Q_1^T`` (``Q_1``: the other columns) does not depend on the basis chosen;
  the new columns are the Q factor of ``P R_m``, the projection of the first
  ``m`` columns of the fixed :func:`null_space_reference` ``R``, except
  that coordinate axes on which ``GG`` is exactly zero (a dead input or
  output) stay axes (the last columns, in index order); their values are
  their Rayleigh quotients ``diag(Q^T GG Q)`` (rounding-level, like the
  eigenvalues they replace, but a continuous function of ``GG``).

  Args:
    stat: the ``(d, d)`` factor ``GG``.
    basis: ``(d, d)`` orthonormal columns, sorted by decreasing ``values``
      (at least the null ones last).
    values: ``(d,)`` their eigenvalues (estimates).

  Returns:
    ``(basis, values)`` with the null columns replaced.
  """
  d = values.shape[0]
  threshold = null_space_threshold(values, stat)[0]
  small = (values <= threshold) & (threshold > 0)
  null = jnp.flip(jnp.cumprod(jnp.flip(small).astype(jnp.int32))) > 0
  m = jnp.sum(null.astype(jnp.int32))

  def canonical(operands):
    basis, values = operands
    dtype = basis.dtype
    # Coordinate axes with a zero row and column in GG (a unit's dead
    # inputs or outputs: exactly zero gradient there) are exact null
    # vectors, whatever the rounding: they are kept as axes, last, in index
    # order, so that a zero gradient coordinate stays exactly zero rotated.
    on_axis = jnp.diagonal(stat) == 0
    axes = jnp.minimum(jnp.sum(on_axis.astype(jnp.int32)), m)
    live = (~on_axis)[:, None].astype(dtype)
    axis_columns = jnp.eye(d, dtype=dtype)[
        :, jnp.argsort(~on_axis, stable=True)]
    # The rest of the null space: project the first m - axes columns of R
    # with I - Q_1 Q_1^T (Q_1: the kept columns) and off the axes, and
    # orthonormalize (Householder QR: its first columns depend on the first
    # columns of its argument alone, the rest being zero); twice: the first
    # QR's result leans into the kept span by rounding times R's condition
    # number, the second starts from orthonormal columns.
    kept = basis * (~null)[None, :].astype(dtype)
    first = (jnp.arange(d) < m - axes)[None, :].astype(dtype)
    projected = null_space_reference(d, dtype) * first
    for _ in range(2):
      projected = projected - jnp.matmul(kept, jnp.matmul(
          kept.T, projected, precision=HIGHEST), precision=HIGHEST)
      projected = jnp.linalg.qr(projected * live)[0] * first * live
    position = jnp.arange(d)[None, :]
    basis = jnp.where(
        position >= d - axes, jnp.roll(axis_columns, d - axes, axis=1),
        jnp.where(null[None, :], jnp.roll(projected, d - m, axis=1), basis))
    return basis, jnp.where(null, rayleigh_quotients(stat, basis), values)

  return jax.lax.cond(m > 0, canonical, lambda operands: operands,
                      (basis, values))


def solve_eigh(stat: jax.Array, old_basis: jax.Array) -> Solution:
  """A full symmetric eigendecomposition of one factor (about ``9 d^3``
  flops); eigenvalues descending. When it is not finite, the old basis and
  its Rayleigh quotients ``diag(Q^T GG Q)`` are returned."""
  eigenvalues, basis = jnp.linalg.eigh(stat)
  eigenvalues, basis = eigenvalues[::-1], basis[:, ::-1]
  ok = _all_finite(basis) & _all_finite(eigenvalues)
  basis, eigenvalues = canonical_null_space(stat, basis, eigenvalues)
  old_values = rayleigh_quotients(stat, old_basis)
  # Column i of the new basis follows column i of the old one: both are
  # sorted by decreasing eigenvalue (estimate) when they come from eigh.
  order = jnp.arange(eigenvalues.shape[0]) + jnp.zeros_like(
      old_values, dtype=jnp.arange(1).dtype)
  return Solution(jnp.where(ok, basis, old_basis),
                  jnp.where(ok, eigenvalues, old_values), order, ok)


def solve_power_qr(stat: jax.Array, old_basis: jax.Array) -> Solution:
  """One step of power iteration warm-started from the current basis, then
  QR (about ``14/3 d^3`` flops), as in the SOAP reference implementation:
  ``est = diag(Q^T GG Q)``, ``order`` sorts ``est`` descending (stable),
  ``Q <- qr(GG Q[:, order]).Q``; the values are ``diag(Q_new^T GG Q_new)``.
  When the new basis is not finite, the old one is kept (identity order)."""
  power = jnp.matmul(stat, old_basis, precision=HIGHEST)
  estimates = jnp.einsum('ij,ij->j', old_basis, power, precision=HIGHEST)
  # (= rayleigh_quotients(stat, old_basis), reusing the product GG Q.)
  # Estimates at rounding level are ties (kept in their order), so that the
  # null columns' order does not depend on rounding either.
  estimates = jnp.where(estimates <= null_space_threshold(estimates, stat),
                        jnp.zeros_like(estimates), estimates)
  order = jnp.argsort(estimates, descending=True, stable=True)
  # Typed like ``estimates`` (inside ``shard_map``: varying over the mesh as
  # the other outputs; ``argsort``'s index operand alone is not).
  order = order + jnp.zeros_like(estimates, dtype=order.dtype)
  new_basis, _ = jnp.linalg.qr(power[:, order])
  ok = _all_finite(new_basis)
  basis = jnp.where(ok, new_basis, old_basis)
  basis, values = canonical_null_space(stat, basis,
                                       rayleigh_quotients(stat, basis))
  identity_order = jnp.arange(order.shape[0], dtype=order.dtype)
  return Solution(basis, values, jnp.where(ok, order, identity_order), ok)


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
