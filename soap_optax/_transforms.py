"""Gradient transformations that run in the eigenbasis of Shampoo's factors."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _engine
from soap_optax import _factored

REFRESH_METHODS = ('eigh', 'qr')


def _check_eigenbasis_args(
    precondition_frequency: Any, max_precond_dim: Any) -> None:
  _checks.check_int('precondition_frequency', precondition_frequency, 1)
  _checks.check_int('max_precond_dim', max_precond_dim, 0)


def _init_eigenbasis(params: Any, **layout_options) -> _engine.EigenbasisState:
  """Checks the parameters' dtypes and builds the engine's state."""
  _checks.check_float_params(params)
  return _engine.init_eigenbasis(params, **layout_options)


def _unpack_gradients(updates: Any, eigenbasis: _engine.EigenbasisState):
  """What every ``update_fn`` starts from.

  Returns:
    ``(grads, treedef, factors, layouts, merged_grads)``: the gradient leaves
    and their tree structure, the per-parameter :class:`KroneckerFactors` and
    layouts, and the gradients reshaped to their merged shape in the state's
    dtype.
  """
  grads, treedef = jax.tree.flatten(updates)
  factors = _engine.unpack(eigenbasis, len(grads))
  layouts = [f.layout for f in factors]
  merged_grads = [
      _engine.to_merged(g.astype(_engine.state_dtype(g.dtype)), layout)
      for g, layout in zip(grads, layouts)
  ]
  return grads, treedef, factors, layouts, merged_grads


def _outputs(directions, layouts, grads):
  """Merged-shape directions back to parameter shapes and gradient dtypes."""
  return [
      _engine.from_merged(d, layout).astype(g.dtype)
      for d, layout, g in zip(directions, layouts, grads)
  ]


def _zeros_per_axis(params: Any, plan: _engine.EigenbasisPlan, which: str):
  """A zero vector for each (merged) axis of each parameter, flat.

  ``which`` is ``"all"`` for every axis or ``"unfactored"`` for the axes
  without a Kronecker factor.
  """
  zeros = []
  for leaf, layout in zip(jax.tree.leaves(params), plan.layouts):
    dtype = _engine.state_dtype(jnp.result_type(leaf))
    for axis, size in enumerate(layout.merged_shape):
      if which == 'all' or axis not in layout.factored_axes:
        zeros.append(jnp.zeros((size,), dtype))
  return tuple(zeros)


def _refresh_if_due(
    factors: list[_engine.KroneckerFactors],
    count: jax.Array,
    frequency: Any,
    method: str,
):
  """Refreshes every basis when ``count % frequency == 0``.

  The first refresh (``count == 0``) is always a full ``eigh``; later ones use
  ``method``. Returns the (possibly) refreshed factors, the eigenvalue
  estimates of each factored axis in the new bases (zeros when nothing was
  refreshed) and the boolean ``due``.
  """
  due = count % frequency == 0

  def refresh(fs):
    if method == 'eigh':
      return _engine.refresh_with_eigenvalues(fs, 'eigh')
    return jax.lax.cond(
        count == 0,
        lambda x: _engine.refresh_with_eigenvalues(x, 'eigh'),
        lambda x: _engine.refresh_with_eigenvalues(x, method),
        fs)

  def keep(fs):
    return list(fs), [
        tuple(jnp.zeros(q.shape[:1], q.dtype) for q in f.bases) for f in fs]

  new_factors, eigenvalues = jax.lax.cond(due, refresh, keep, factors)
  return new_factors, eigenvalues, due


def _per_axis(layout: _engine.FactorLayout, factored: tuple, unfactored: tuple):
  """Interleaves per-factored-axis and per-unfactored-axis values by axis."""
  factored, unfactored = iter(factored), iter(unfactored)
  return tuple(
      next(factored) if axis in layout.factored_axes else next(unfactored)
      for axis in range(len(layout.merged_shape)))


class ScaleByRotatedAdamState(NamedTuple):
  """State of :func:`scale_by_rotated_adam`.

  Attributes:
    mu: first moment, in the rotated basis, shaped like the parameters.
    nu: second moment in the rotated basis. Shaped like the parameters; with
      ``factored=True`` instead a flat tuple with one vector per (merged) axis
      of each parameter (Adafactor's row and column statistics).
    eigenbasis: the engine's factors and bases. ``eigenbasis.count - 1`` is the
      Adam step ``t`` once the first call has initialized the preconditioner.
  """

  mu: optax.Updates
  nu: optax.Updates | tuple[jax.Array, ...]
  eigenbasis: _engine.EigenbasisState


def scale_by_rotated_adam(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    one_sided: bool = False,
    factored: bool = False,
) -> optax.GradientTransformation:
  r"""Adam run in the eigenbasis of Shampoo's preconditioner (SOAP).

  Per parameter, with ``sb = shampoo_beta if shampoo_beta is not None else b2``
  and the Kronecker factors ``GG_i`` and bases ``Q_i`` of :mod:`._engine`:

  * first call (initialization): ``GG_i = (1 - sb) C_i(G)``,
    ``Q_i = eigh(GG_i)``; the update is zero and ``t`` stays 0;
  * every later call, with ``G' = rotate(G)`` in the current bases:

    .. math::

      t &\leftarrow t + 1 \\
      m &\leftarrow b_1 m + (1 - b_1) G', \qquad
      v \leftarrow b_2 v + (1 - b_2) G'^2 \\
      U &= \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}\,
           unrotate\Big(\frac{m}{\sqrt{v} + \epsilon}\Big)

    then, if ``normalize_grads``, ``U <- U / (1e-30 + rms(U))``; then
    ``GG_i <- sb GG_i + (1 - sb) C_i(G)`` (a step's own gradient never shapes
    the basis it is preconditioned in); and when ``t % precondition_frequency
    == 0`` every basis is refreshed by power iteration + QR (columns sorted by
    ``diag(Q_i^T GG_i Q_i)``; ``v`` is permuted along with them, ``m`` is
    carried exactly into the new basis: ``m <- rotate_new(unrotate_old(m))``).

  ``eps`` is added to the *uncorrected* ``sqrt(v)``, as in the authors'
  implementation (``optax.scale_by_adam`` adds it to the corrected one).

  With ``factored=True`` (factorized SOAP) ``v`` is replaced by Adafactor's
  estimate built from one running statistic per (merged) axis,
  ``s_k <- b2 s_k + (1 - b2) sum_{other axes} G'^2`` (for a matrix the row and
  column averages), ``v = (s_0 ⊗ ... ⊗ s_{N-1}) / sum(s_0)^{N-1}``; at a
  refresh each ``s_k`` is permuted with its basis, as ``v`` would be. For
  1-D parameters and scalars this is ``v`` itself.

  Axis rules (see :func:`soap_optax._engine.plan_layout`): axes longer than
  ``max_precond_dim`` are not rotated; 1-D parameters only with
  ``precondition_1d``; scalars never; ``merge_dims`` merges consecutive axes
  greedily up to ``max_precond_dim`` first; ``one_sided`` rotates only the
  shortest axis.

  State for an ``m x n`` matrix: ``m`` and ``v`` (``2mn``; ``mn + m + n`` when
  factored) plus ``GG`` and ``Q`` for each rotated axis (``2m^2 + 2n^2``; only
  ``2 min(m, n)^2`` one-sided). Cost per step: about ``6 m n (m + n)`` flops
  (4 rotations, 2 factor products); a refresh adds about
  ``14/3 (m^3 + n^3)`` every ``precondition_frequency`` steps. Statistics,
  bases and moments are float32, or the parameter dtype where that is wider;
  updates come out in the gradient's dtype.

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    shampoo_beta: decay of the Kronecker factors, in [0, 1); ``None`` uses
      ``b2``.
    eps: added to ``sqrt(v)``, >= 0.
    precondition_frequency: refresh the bases every this many Adam steps
      (integer >= 1).
    max_precond_dim: axes longer than this keep the identity basis (>= 0).
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor too.
    normalize_grads: divide each parameter's update by its RMS.
    one_sided: rotate only the shortest axis of each parameter.
    factored: keep Adafactor's factored second moment instead of ``v``.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithm 3; one-sided and
    factorized variants: Section 7).
  """
  _checks.check_beta('b1', b1)
  _checks.check_beta('b2', b2)
  if shampoo_beta is not None:
    _checks.check_beta('shampoo_beta', shampoo_beta)
  _checks.check_nonnegative('eps', eps)
  _check_eigenbasis_args(precondition_frequency, max_precond_dim)
  factor_beta = b2 if shampoo_beta is None else shampoo_beta

  def init_fn(params):
    eigenbasis = _init_eigenbasis(
        params,
        max_precond_dim=max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        one_sided=one_sided,
    )
    zeros = lambda p: jnp.zeros(
        jnp.shape(p), _engine.state_dtype(jnp.result_type(p)))
    if factored:
      nu = _zeros_per_axis(params, eigenbasis.plan, 'all')
    else:
      nu = jax.tree.map(zeros, params)
    return ScaleByRotatedAdamState(
        mu=jax.tree.map(zeros, params), nu=nu, eigenbasis=eigenbasis)

  def update_fn(updates, state, params=None):
    del params
    grads, treedef, factors, layouts, merged_grads = _unpack_gradients(
        updates, state.eigenbasis)
    mus = treedef.flatten_up_to(state.mu)
    # Second moments, per parameter, as tuples in the merged shape: (v,) or
    # (s_0, ..., s_{N-1}) when factored.
    if factored:
      nus = state.eigenbasis.plan.split_axes(state.nu)
    else:
      nus = [(_engine.to_merged(v, layout),)
             for v, layout in zip(treedef.flatten_up_to(state.nu), layouts)]
    mus = [_engine.to_merged(m, layout) for m, layout in zip(mus, layouts)]

    def absorb_gradients():
      return [_engine.accumulate(f, g, factor_beta)
              for f, g in zip(factors, merged_grads)]

    def initialize():
      new_factors, _ = _engine.refresh_eigh(absorb_gradients())
      directions = [jnp.zeros_like(g) for g in merged_grads]
      return directions, mus, nus, new_factors

    def adam_step():
      t = state.eigenbasis.count  # t after the increment (count counts init).
      directions, new_mus, new_nus = [], [], []
      for g, f, mu, nu in zip(merged_grads, factors, mus, nus):
        rotated = _engine.rotate(g, f)
        mu = b1 * mu + (1 - b1) * rotated
        if factored:
          nu = tuple(b2 * s + (1 - b2) * new for s, new in zip(
              nu, _factored.axis_sums_of_squares(rotated)))
          second_moment = _factored.factored_second_moment(nu)
        else:
          nu = (b2 * nu[0] + (1 - b2) * rotated**2,)
          second_moment = nu[0]
        scale = (jnp.sqrt(1 - b2**t) / (1 - b1**t)).astype(mu.dtype)
        direction = scale * _engine.unrotate(
            mu / (jnp.sqrt(second_moment) + eps), f)
        if normalize_grads:
          direction = direction / (
              1e-30 + jnp.sqrt(jnp.mean(jnp.square(direction))))
        directions.append(direction)
        new_mus.append(mu)
        new_nus.append(nu)
      new_factors = absorb_gradients()

      def refresh(operands):
        old_factors, mus, nus = operands
        refreshed, orders = _engine.refresh_power_qr(old_factors)
        mus = [_engine.rotate(_engine.unrotate(mu, old), new)
               for mu, old, new in zip(mus, old_factors, refreshed)]
        nus = [_permute_second_moment(nu, f.layout, order, factored)
               for nu, f, order in zip(nus, refreshed, orders)]
        return refreshed, mus, nus

      operands = (new_factors, new_mus, new_nus)
      if any(layout.factored_axes for layout in layouts):
        operands = jax.lax.cond(
            t % precondition_frequency == 0, refresh, lambda x: x, operands)
      new_factors, new_mus, new_nus = operands
      return directions, new_mus, new_nus, new_factors

    directions, mus, nus, factors = jax.lax.cond(
        state.eigenbasis.count == 0, initialize, adam_step)
    if factored:
      nu = tuple(s for per_param in nus for s in per_param)
    else:
      nu = treedef.unflatten([
          _engine.from_merged(v[0], layout) for v, layout in zip(nus, layouts)])
    new_state = ScaleByRotatedAdamState(
        mu=treedef.unflatten([
            _engine.from_merged(m, layout) for m, layout in zip(mus, layouts)]),
        nu=nu,
        eigenbasis=_engine.pack(
            factors, optax.safe_increment(state.eigenbasis.count)),
    )
    return treedef.unflatten(_outputs(directions, layouts, grads)), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _permute_second_moment(nu, layout, orders, factored):
  """Reorders a second moment with its bases' columns (permuted, not rotated).

  ``nu`` is ``(v,)``, whose factored axes are permuted, or, when ``factored``,
  the per-axis statistics ``(s_0, ..., s_{N-1})``, of which each factored
  axis's vector is permuted (the sums along the other axes do not change).
  """
  if not factored:
    return (_engine.permute_axes(nu[0], layout, orders),)
  stats = list(nu)
  for axis, order in zip(layout.factored_axes, orders):
    stats[axis] = stats[axis][order]
  return tuple(stats)


def _check_refresh(refresh: str) -> None:
  _checks.check_choice('refresh', refresh, REFRESH_METHODS)


class ScaleByShampooEigenbasisState(NamedTuple):
  """State of :func:`scale_by_shampoo_eigenbasis`.

  Attributes:
    eigenbasis: the engine's factors ``GG_k`` and bases ``Q_k``;
      ``eigenbasis.count`` is the number of calls so far.
    diagonals: running ``diag(GG_k)`` for every axis without a Kronecker
      factor, flat (parameters in leaf order, axes in order).
    eigenvalues: ``Λ_k`` for every (merged) axis of every parameter, flat,
      from the last refresh (held fixed between refreshes).
  """

  eigenbasis: _engine.EigenbasisState
  diagonals: tuple[jax.Array, ...]
  eigenvalues: tuple[jax.Array, ...]


def scale_by_shampoo_eigenbasis(
    shampoo_beta: jax.typing.ArrayLike = 0.95,
    exponent: jax.typing.ArrayLike = 0.5,
    eps: jax.typing.ArrayLike = 1e-12,
    precondition_frequency: int = 1,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    trace_normalize: bool = True,
    refresh: str = 'eigh',
) -> optax.GradientTransformation:
  r"""Shampoo, computed through the eigenbasis of its Kronecker factors.

  For a (merged) parameter with axes ``k = 0..N-1``, factors
  ``GG_k <- β GG_k + (1 - β) C_k(G)``, bases ``Q_k`` and eigenvalue estimates
  ``Λ_k`` from the last refresh:

  .. math::

    U = G \times_0 P_0 \times_1 P_1 \cdots \times_{N-1} P_{N-1}
        \cdot T^{(N-1)\,e}, \qquad
    P_k = Q_k\,(Λ_k + \epsilon)^{-e}\,Q_k^T

  with ``e = exponent`` and, when ``trace_normalize``, ``T = sum(Λ_0)``
  (``= tr GG_k`` at the refresh, the same for every ``k``); without it the
  ``T`` factor is 1. For a matrix with ``exponent=0.5`` this is
  ``U = Q_L (Λ_L + eps)^{-1/2} Q_L^T G Q_R (Λ_R + eps)^{-1/2} Q_R^T sqrt(tr GG_L)``,
  i.e. ``H^{-1/2} g`` with ``H = (GG_L ⊗ GG_R) / tr(GG_L)``: the SOAP paper's
  Shampoo^(1/2). ``exponent=0.25`` without normalization is classic Shampoo.
  Non-positive ``Λ + eps`` is given a zero inverse power (a pseudo-inverse).

  An axis without a Kronecker factor (longer than ``max_precond_dim``, 1-D
  without ``precondition_1d``, a scalar seen as ``(1,)``) uses the identity
  basis with ``Λ_k = diag(GG_k)``, the running sum of ``G**2`` over the other
  axes, so every axis is preconditioned.

  Order within a call (the rule shared with
  :func:`scale_by_adafactor_in_eigenbasis`): the statistics absorb the current
  gradient first; then, on a refresh call (the call index ``c``, 0-based,
  satisfies ``c % precondition_frequency == 0``; the first call always,
  with ``eigh``), ``Q_k`` and ``Λ_k`` are recomputed from them; then the
  gradient is preconditioned. So a step's own gradient is part of the
  preconditioner exactly when it is a refresh step.

  Args:
    shampoo_beta: decay of the factors, in [0, 1).
    exponent: the inverse power ``e`` (0.5: Shampoo^(1/2); 0.25: classic).
    eps: added to the eigenvalues, >= 0.
    precondition_frequency: refresh every this many calls (integer >= 1).
    max_precond_dim: axes longer than this get a diagonal preconditioner.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a full factor.
    trace_normalize: multiply by ``T^{(N-1) e}`` (see above).
    refresh: ``"eigh"`` or ``"qr"`` (power iteration + QR warm-started from
      the current basis, with ``Λ = diag(Q^T GG Q)``).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018; Vyas et al., `SOAP
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Section 3).
  """
  _checks.check_beta('shampoo_beta', shampoo_beta)
  _checks.check_nonnegative('exponent', exponent)
  _checks.check_nonnegative('eps', eps)
  _check_eigenbasis_args(precondition_frequency, max_precond_dim)
  _check_refresh(refresh)

  def init_fn(params):
    eigenbasis = _init_eigenbasis(
        params,
        max_precond_dim=max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
    )
    return ScaleByShampooEigenbasisState(
        eigenbasis=eigenbasis,
        diagonals=_zeros_per_axis(params, eigenbasis.plan, 'unfactored'),
        eigenvalues=_zeros_per_axis(params, eigenbasis.plan, 'all'),
    )

  def update_fn(updates, state, params=None):
    del params
    grads, treedef, factors, layouts, merged_grads = _unpack_gradients(
        updates, state.eigenbasis)
    plan = state.eigenbasis.plan
    count = state.eigenbasis.count

    factors = [_engine.accumulate(f, g, shampoo_beta)
               for f, g in zip(factors, merged_grads)]
    diagonals = plan.split_unfactored(state.diagonals)
    diagonals = [
        tuple(shampoo_beta * d + (1 - shampoo_beta) * new for d, new in zip(
            diag, _unfactored(_factored.axis_sums_of_squares(g), layout)))
        for diag, g, layout in zip(diagonals, merged_grads, layouts)]
    factors, fresh, due = _refresh_if_due(
        factors, count, precondition_frequency, refresh)
    eigenvalues = [
        tuple(jnp.where(due, new, old) for new, old in zip(
            _per_axis(layout, fresh_k, diag), old_values))
        for layout, fresh_k, diag, old_values in zip(
            layouts, fresh, diagonals, plan.split_axes(state.eigenvalues))]

    directions = []
    for g, f, values in zip(merged_grads, factors, eigenvalues):
      rotated = _engine.rotate(g, f)
      scaled = rotated * _factored.outer_product(
          [_factored.inverse_power(v + eps, exponent) for v in values])
      direction = _engine.unrotate(scaled, f)
      if trace_normalize:
        total = jnp.maximum(jnp.sum(values[0]), 0.0)
        direction = direction * total ** ((len(values) - 1) * exponent)
      directions.append(direction)

    new_state = ScaleByShampooEigenbasisState(
        eigenbasis=_engine.pack(factors, optax.safe_increment(count)),
        diagonals=tuple(d for per_param in diagonals for d in per_param),
        eigenvalues=tuple(v for per_param in eigenvalues for v in per_param),
    )
    return treedef.unflatten(_outputs(directions, layouts, grads)), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _unfactored(per_axis: tuple, layout: _engine.FactorLayout) -> tuple:
  """The entries of a per-axis tuple that belong to axes without a factor."""
  return tuple(x for axis, x in enumerate(per_axis)
               if axis not in layout.factored_axes)


class ScaleByAdafactorInEigenbasisState(NamedTuple):
  """State of :func:`scale_by_adafactor_in_eigenbasis`.

  Attributes:
    eigenbasis: the engine's factors ``GG_k`` and bases ``Q_k``;
      ``eigenbasis.count`` is the number of calls so far.
    axis_stats: Adafactor's statistic ``s_k`` for every (merged) axis of every
      parameter, in the rotated basis, flat.
  """

  eigenbasis: _engine.EigenbasisState
  axis_stats: tuple[jax.Array, ...]


def scale_by_adafactor_in_eigenbasis(
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-30,
    precondition_frequency: int = 1,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    refresh: str = 'eigh',
) -> optax.GradientTransformation:
  r"""Adafactor (no first moment) run in the eigenbasis of Shampoo's factors.

  With ``G' = rotate(G)`` in the current bases, per (merged) axis ``k``:

  .. math::

    s_k \leftarrow b_2 s_k + (1 - b_2) \sum_{\text{other axes}} G'^2, \qquad
    V = \frac{s_0 \otimes \cdots \otimes s_{N-1}}{(\sum s_0)^{N-1}}, \qquad
    U = unrotate\big(G' \,(V + \epsilon)^{-1/2}\big)

  (for a matrix ``V = r c^T / sum(r)``). The factors ``GG_k`` use the same
  ``b2``. On a refresh (same schedule and order as
  :func:`scale_by_shampoo_eigenbasis`: statistics absorb the gradient, then
  the refresh, then the preconditioning) the statistic of each rotated axis is
  re-estimated in the new basis, ``s_k = diag(Q_k^T GG_k Q_k)``: after an
  ``eigh`` refresh that is ``Λ_k``. Between refreshes the basis is fixed and
  the running average keeps ``s_k = diag(Q_k^T GG_k Q_k)`` exactly, now with
  the *current* ``GG_k``, while Shampoo's ``Λ_k`` stay frozen.

  Hence the identity: with ``precondition_frequency=1``, ``refresh="eigh"``,
  ``b2`` equal to Shampoo's ``shampoo_beta`` and ``eps=0``, the update equals
  ``scale_by_shampoo_eigenbasis(exponent=0.5, trace_normalize=True, eps=0)``:
  ``G'_{ij} / sqrt(Λ_{L,i} Λ_{R,j} / tr GG_L)`` is Shampoo^(1/2) written in its
  eigenbasis. Axes without a Kronecker factor keep the identity basis (their
  ``s_k`` is Shampoo's diagonal ``Λ_k``). ``V + eps <= 0`` gives a zero update
  for that entry.

  Args:
    b2: decay of the statistics and of the factors, in [0, 1).
    eps: added to ``V`` inside the square root, >= 0.
    precondition_frequency: refresh every this many calls (integer >= 1).
    max_precond_dim: axes longer than this keep the identity basis.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor.
    refresh: ``"eigh"`` or ``"qr"``.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, 2024 (Section 3,
    the Shampoo–Adafactor identity); Shazeer and Stern, `Adafactor
    <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  _checks.check_beta('b2', b2)
  _checks.check_nonnegative('eps', eps)
  _check_eigenbasis_args(precondition_frequency, max_precond_dim)
  _check_refresh(refresh)

  def init_fn(params):
    eigenbasis = _init_eigenbasis(
        params,
        max_precond_dim=max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
    )
    return ScaleByAdafactorInEigenbasisState(
        eigenbasis=eigenbasis,
        axis_stats=_zeros_per_axis(params, eigenbasis.plan, 'all'))

  def update_fn(updates, state, params=None):
    del params
    grads, treedef, factors, layouts, merged_grads = _unpack_gradients(
        updates, state.eigenbasis)
    count = state.eigenbasis.count

    factors = [_engine.accumulate(f, g, b2)
               for f, g in zip(factors, merged_grads)]
    factors, fresh, due = _refresh_if_due(
        factors, count, precondition_frequency, refresh)
    directions, all_stats = [], []
    for g, f, old_stats, fresh_k in zip(
        merged_grads, factors,
        state.eigenbasis.plan.split_axes(state.axis_stats), fresh):
      # Rotated in the current bases (new ones on a refresh call): the
      # statistic of an unrotated axis does not depend on the other axes'
      # rotation, and the rotated axes' statistics are re-estimated anyway.
      rotated = _engine.rotate(g, f)
      running = tuple(b2 * s + (1 - b2) * new for s, new in zip(
          old_stats, _factored.axis_sums_of_squares(rotated)))
      stats = _per_axis(
          f.layout,
          tuple(jnp.where(due, new, running[axis])
                for axis, new in zip(f.layout.factored_axes, fresh_k)),
          _unfactored(running, f.layout))
      second_moment = _factored.factored_second_moment(stats)
      directions.append(_engine.unrotate(
          rotated * _factored.inverse_power(second_moment + eps, 0.5), f))
      all_stats.extend(stats)

    new_state = ScaleByAdafactorInEigenbasisState(
        eigenbasis=_engine.pack(factors, optax.safe_increment(count)),
        axis_stats=tuple(all_stats))
    return treedef.unflatten(_outputs(directions, layouts, grads)), new_state

  return optax.GradientTransformation(init_fn, update_fn)
