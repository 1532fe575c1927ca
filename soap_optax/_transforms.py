"""Gradient transformations that run in the eigenbasis of Shampoo's factors."""

import contextlib
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from soap_optax import _checks
from soap_optax import _engine
from soap_optax import _factored
from soap_optax import _refresh_policy
from soap_optax import _stacks

REFRESH_METHODS = ('eigh', 'qr')


def _check_eigenbasis_args(
    precondition_frequency: Any, max_precond_dim: Any, block_size: Any,
    foam_allowed: bool = False, **switches: Any) -> Any:
  """The arguments every transform shares; ``switches`` must be booleans.

  Returns ``precondition_frequency`` resolved: an integer or a refresh
  policy (see :mod:`soap_optax._refresh_policy`).
  """
  for name, value in switches.items():
    _checks.check_bool(name, value)
  frequency = _refresh_policy.resolve(
      precondition_frequency, foam_allowed=foam_allowed,
      staggered_refresh=switches.get('staggered_refresh', False))
  _checks.check_int('max_precond_dim', max_precond_dim, 0)
  if block_size is not None:
    _checks.check_int('block_size', block_size, 1)
  return frequency


def _check_mesh(mesh: Any, shard_axes: Any) -> None:
  """``mesh`` is None or a ``jax.sharding.Mesh``; ``shard_axes`` names its
  axes (and needs a mesh)."""
  if mesh is None:
    if shard_axes is not None:
      raise ValueError(
          f'shard_axes={shard_axes!r} needs a mesh: pass mesh=, a '
          'jax.sharding.Mesh, or leave shard_axes=None.')
    return
  if not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(
        f'mesh must be None or a jax.sharding.Mesh, got {type(mesh).__name__}.')
  _stacks.resolve_shard_axes(mesh, shard_axes)


def _explicit_mesh(tree: Any) -> Any:
  """The mesh of the first leaf whose type is sharded over Explicit axes."""
  for leaf in jax.tree.leaves(tree):
    mesh = jax.typeof(leaf).sharding.mesh
    if not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      return mesh
  return None


def _on_any_mesh(update_fn):
  """``update_fn`` made to work on Explicit meshes as on Auto ones.

  With Explicit axes (``jax.make_mesh``'s default), every array's sharding
  is part of its type and each operation must say how its result is sharded.
  The engine's arithmetic is written for GSPMD's propagation instead, so on
  an Explicit mesh the update runs inside ``jax.sharding.auto_axes``: the
  gradients enter as they are, and the updates leave sharded like them, the
  state like the plan says (stacks divided over the shard axes, scalars
  replicated).
  """
  def on_auto_axes(updates, state):
    mesh = _explicit_mesh((updates, state))
    plan = state.eigenbasis.plan
    stacked = (plan.sharding.spec if plan.sharding is not None
               else jax.sharding.PartitionSpec())
    out_specs = (
        jax.tree.map(lambda g: jax.typeof(g).sharding.spec, updates),
        jax.tree.map(lambda x: stacked if jnp.ndim(x)
                     else jax.sharding.PartitionSpec(), state))
    context = (jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
               if jax.sharding.get_abstract_mesh().empty
               else contextlib.nullcontext())
    with context:
      return jax.sharding.auto_axes(
          lambda u, s: update_fn(u, s, None), out_sharding=out_specs)(
              updates, state)

  # Called eagerly, auto_axes needs a trace to change the inputs' types.
  on_auto_axes_jitted = jax.jit(on_auto_axes)

  def wrapped(updates, state, params=None):
    if _explicit_mesh((updates, state)) is None:
      return update_fn(updates, state, params)
    if any(isinstance(x, jax.core.Tracer)
           for x in jax.tree.leaves((updates, state))):
      return on_auto_axes(updates, state)
    return on_auto_axes_jitted(updates, state)

  return wrapped


def _init_eigenbasis(
    params: Any, *, staggered_refresh: bool, precondition_frequency: Any,
    **layout_options) -> _stacks.EigenbasisState:
  """Checks the parameters' dtypes and builds the engine's stacked state."""
  _checks.check_float_params(params)
  return _stacks.init_eigenbasis(
      params, staggered_refresh_frequency=(
          precondition_frequency if staggered_refresh else None),
      **layout_options)


def _gather_gradients(updates: Any, eigenbasis: _stacks.EigenbasisState):
  """What every ``update_fn`` starts from.

  Non-finite gradients (the policy shared by every transform): a unit whose
  gradient has a non-finite entry, or whose squared norm ``sum(G**2)``
  overflows the statistics' dtype, is *rejected*. Its gradient is replaced by
  zeros here (so nothing non-finite reaches the arithmetic), the transforms
  keep its state unchanged (:func:`_keep_rejected`), its update is zero and
  ``EigenbasisState.skipped`` counts it. Every statistic of an accepted unit
  is a running average of quantities bounded by ``sum(G**2)`` (the entries of
  ``G G^T``, squared rotated coordinates, their sums), so a finite gradient
  can never make the state non-finite. ``optax.apply_if_finite`` still works
  on top, and skips the whole step instead.

  Returns:
    ``(grads, treedef, factors, stacked_grads, accepted)``: the gradient
    leaves and their tree structure, the per-stack :class:`KroneckerFactors`,
    the gradients gathered into stacks ``(U, *merged_shape)`` in the state's
    dtype, and per stack a ``(U,)`` boolean mask of the accepted units.
  """
  _stacks.check_updates(updates, eigenbasis.plan)
  grads, treedef = jax.tree.flatten(updates)
  stacked = _stacks.gather(grads, eigenbasis.plan)
  accepted = [
      jnp.isfinite(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))
      for g in stacked]
  stacked = [_keep_rejected(ok, g, jnp.zeros_like(g))
             for ok, g in zip(accepted, stacked)]
  return (grads, treedef, _stacks.unpack(eigenbasis), stacked, accepted)


def _keep_rejected(accepted: jax.Array, new: Any, old: Any) -> Any:
  """Per unit of a stack: ``new`` where accepted, else ``old`` (any tree of
  ``(U, ...)`` arrays)."""
  def select(n, o):
    return jnp.where(accepted.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(select, new, old)


def _count_rejected(accepted: list[jax.Array]) -> jax.Array:
  return sum((jnp.sum(~ok, dtype=jnp.int32) for ok in accepted),
             jnp.zeros([], jnp.int32))


def _outputs(directions, plan, grads, treedef):
  """Stacked directions back to the gradients' tree, shapes and dtypes."""
  return treedef.unflatten([
      d.astype(g.dtype)
      for d, g in zip(_stacks.scatter(directions, plan), grads)])


def _accumulate(factors, stacked_grads, beta):
  """``GG_i <- beta GG_i + (1 - beta) C_i(G)`` for every unit of every stack."""
  accumulate = jax.vmap(lambda f, g: _engine.accumulate(f, g, beta))
  return [accumulate(f, g) for f, g in zip(factors, stacked_grads)]


def _on_refresh_schedule(plan, step, frequency, refresh, keep, operands):
  """``refresh(operands, units)`` on the steps the plan refreshes, else ``keep``.

  Without staggering every unit refreshes when ``step % frequency == 0``
  (``units`` is None for every stack: all of them). With staggering
  (``plan.refresh_phases``), the units whose phase is ``step % frequency``
  refresh, one static subset per residue, selected by ``lax.switch``.
  """
  if plan.refresh_phases is None:
    every_unit = plan.all_units()
    return jax.lax.cond(step % frequency == 0,
                        lambda x: refresh(x, every_unit), keep, operands)
  branches = []
  for residue in range(plan.refresh_frequency):
    units = plan.units_due(residue)
    branches.append(
        functools.partial(refresh, units=units)
        if any(_stacks.is_selected(u) for u in units) else keep)
  return jax.lax.switch(step % plan.refresh_frequency, branches, operands)


def _on_stale_stacks(plan, due_stacks, refresh, operands):
  """``refresh(operands, units)`` on each stack whose ``due_stacks`` entry
  (a traced boolean) is true: one ``lax.cond`` per stack, each refreshing all
  of that stack's units in one batched decomposition."""
  for s, due in enumerate(due_stacks):
    operands = jax.lax.cond(
        due, functools.partial(refresh, units=plan.only_stack(s)),
        lambda x: x, operands)
  return operands


def _stale_stacks(eigenbasis: _stacks.EigenbasisState,
                  policy: _refresh_policy.AdaptiveRefresh) -> list[jax.Array]:
  """Per stack, whether :class:`AdaptiveRefresh` refreshes it this call.

  Read from the state as the previous call left it: the staleness of every
  factor (:func:`soap_optax._engine.staleness`) and the calls since the
  stack's last refresh (``age + 1`` if refreshed now). Padding slots of a
  sharded stack do not count.
  """
  plan = eigenbasis.plan
  stale = _stacks.staleness_per_stack(eigenbasis)
  return _due_stacks(
      eigenbasis, lambda s: plan.largest_over_units(s, stale[s])
      > policy.tolerance, policy.min_interval, policy.max_interval)


def _due_stacks(eigenbasis, over, min_interval, max_interval):
  """Per stack, the refresh decision of a policy: ``over(s)`` (a traced
  boolean) once the stack was refreshed ``min_interval`` calls ago, or in
  any case ``max_interval`` calls after (``None``: never). The interval
  counts calls since the stack's last refresh, ``age + 1`` if refreshed
  now; padding slots of a sharded stack do not count. A stack without a
  factor has nothing to decompose and is "refreshed" every call (Shampoo's
  axes without a factor then take their current diagonals as eigenvalues).
  """
  plan = eigenbasis.plan
  due = []
  for s, age in enumerate(eigenbasis.age):
    if not plan.stacks[s].layout.factored_axes:
      due.append(jnp.ones([], bool))
      continue
    interval = plan.largest_over_units(s, age) + 1
    decision = over(s) & (interval >= min_interval)
    if max_interval is not None:
      decision |= interval >= max_interval
    due.append(decision)
  return due


def _units_mask(plan, s, units):
  """The ``(U,)`` boolean mask, placed like the state, of a selection of
  stack ``s``'s units (see :func:`soap_optax._stacks.take_units`)."""
  if isinstance(units, np.ndarray):
    mask = units
  else:
    mask = np.zeros((plan.stacks[s].num_slots,), bool)
    mask[slice(None) if units is None else units] = True
  return _stacks.place(jnp.asarray(mask), plan)


def _no_units(plan):
  """Per stack, an all-false ``(U,)`` mask."""
  return [jnp.zeros((stack.num_slots,), bool) for stack in plan.stacks]


def _marked(plan, masks, units):
  """``masks`` with the units of the selection ``units`` set."""
  return [m | _units_mask(plan, s, u) if _stacks.is_selected(u) else m
          for s, (m, u) in enumerate(zip(masks, units))]


def _refreshed_stacks(factors, units, plan):
  """The stacks with factors and units to refresh, those units' factors, and
  how to divide their refresh over the plan's mesh (None: not sharded)."""
  active = [s for s, (f, u) in enumerate(zip(factors, units))
            if f.layout.factored_axes and _stacks.is_selected(u)]
  return (active, [_stacks.take_units(factors[s], units[s]) for s in active],
          _divided(plan, [units[s] for s in active]))


def _divided(plan, masks):
  """The refresh of the stacks with these slot masks, divided over the
  plan's mesh; None for an unsharded plan."""
  if plan.sharding is None or not masks:  # nothing to refresh, or unsharded.
    return None
  return _engine.DividedRefresh(
      plan.sharding.mesh, plan.sharding.axes, list(masks))


def _refresh_if_due(
    factors: list[_engine.KroneckerFactors],
    count: jax.Array,
    frequency: Any,
    method: str,
    plan: _stacks.EigenbasisPlan,
    due_stacks: list[jax.Array] | None = None,
):
  """Refreshes the bases that are due at call ``count``.

  Due: every unit on the first call (always a full ``eigh``); later, with an
  integer ``frequency``, when ``count % frequency == 0`` or, with
  staggering, the units whose phase is ``count % frequency``; with an
  adaptive policy, every unit of each stack whose ``due_stacks`` entry is
  true. Later refreshes use ``method``. Returns the factors, the eigenvalue
  estimates of each factored axis in the new bases (``(U, d)`` per stack and
  axis; zeros for units not refreshed), per stack a ``(U,)`` boolean mask of
  the refreshed units (a unit without a factor is "refreshed" on the same
  schedule: it takes its eigenvalues from its running diagonals), and the
  number of failed factor refreshes.
  """
  def refresh(operands, units, method):
    fs, values, masks, failures = operands
    fs, values = list(fs), list(values)
    active, selected, divided = _refreshed_stacks(fs, units, plan)
    refreshed = _engine.refresh_with_eigenvalues(selected, method, divided)
    for s, new, fresh in zip(active, refreshed.factors, refreshed.extras):
      fs[s] = _stacks.put_units(fs[s], new, units[s])
      values[s] = tuple(_stacks.put_units(old, v, units[s])
                        for old, v in zip(values[s], fresh))
    return (fs, values, _marked(plan, masks, units),
            failures + refreshed.failures)

  def scheduled(operands, method):
    due = functools.partial(refresh, method=method)
    if due_stacks is not None:
      return _on_stale_stacks(plan, due_stacks, due, operands)
    return _on_refresh_schedule(plan, count, frequency, due, lambda x: x,
                                operands)

  operands = (list(factors),
              [tuple(jnp.zeros(q.shape[:2], q.dtype) for q in f.bases)
               for f in factors],
              _no_units(plan), jnp.zeros([], jnp.int32))
  if (method == 'eigh' and plan.refresh_phases is None
      and due_stacks is None):
    return scheduled(operands, 'eigh')  # the first call is a refresh call.
  return jax.lax.cond(
      count == 0,
      lambda ops: refresh(ops, plan.all_units(), 'eigh'),
      lambda ops: scheduled(ops, method),
      operands)


def _per_axis(layout: _engine.FactorLayout, factored: tuple, unfactored: tuple):
  """Interleaves per-factored-axis and per-unfactored-axis values by axis."""
  factored, unfactored = iter(factored), iter(unfactored)
  return tuple(
      next(factored) if axis in layout.factored_axes else next(unfactored)
      for axis in range(len(layout.merged_shape)))


class ScaleByRotatedAdamState(NamedTuple):
  """State of :func:`scale_by_rotated_adam`.

  Every array is stacked (see :mod:`soap_optax._stacks`): one entry per stack
  of same-shape units, with a leading unit axis ``U``.

  Attributes:
    mu: first moment in the rotated basis, one ``(U, *merged_shape)`` array
      per stack, in ``mu_dtype``.
    nu: second moment in the rotated basis, shaped like ``mu``; with
      ``factored=True`` instead one ``(U, d_k)`` array per (merged) axis of
      each stack (Adafactor's row and column statistics).
    eigenbasis: the engine's factors and bases. ``eigenbasis.count - 1`` is the
      Adam step ``t`` once the first call has initialized the preconditioner.
  """

  mu: tuple[jax.Array, ...]
  nu: tuple[jax.Array, ...]
  eigenbasis: _stacks.EigenbasisState


def scale_by_rotated_adam(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    one_sided: bool = False,
    factored: bool = False,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Adam run in the eigenbasis of Shampoo's preconditioner (SOAP).

  Per unit (a parameter, or one slice along its batch axes or one block of it:
  see ``dimension_numbers`` and ``block_size``), with
  ``sb = shampoo_beta if shampoo_beta is not None else b2`` and the Kronecker
  factors ``GG_i`` and bases ``Q_i`` of :mod:`._engine`:

  * first call (initialization): ``GG_i = (1 - sb) C_i(G)``,
    ``Q_i = eigh(GG_i)``; the update is zero and ``t`` stays 0;
  * every later call, with ``G' = rotate(G)`` in the current bases:

    .. math::

      t &\leftarrow t + 1 \\
      m &\leftarrow b_1 m + (1 - b_1) G', \qquad
      v \leftarrow b_2 v + (1 - b_2) G'^2 \\
      D &= unrotate\Big(\frac{m}{\sqrt{v + f^2} + \epsilon}\Big), \qquad
      U = \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}\, D

    where, if ``normalize_grads``, ``D <- D / (1e-30 + rms(D))`` first (the
    authors' order: normalized, then bias-corrected), and ``f^2`` is the
    rounding-noise floor of :func:`soap_optax._engine.rounding_floor_squared`
    (``rounding_floor=True``; 0 otherwise); then
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

  Units (see :mod:`soap_optax._stacks`): batch axes named by
  ``dimension_numbers`` get no factor, and every slice along them is
  optimized exactly as if it were a parameter of its own; with
  ``block_size``, every other axis longer than ``block_size`` is cut into
  blocks, and every block likewise. Units of the same shape, from anywhere in
  the tree, are stacked and updated by one ``vmap``-ed computation.

  Axis rules, applied to each unit (see
  :func:`soap_optax._engine.plan_layout`): axes longer than
  ``max_precond_dim`` are not rotated; 1-D units only with
  ``precondition_1d``; scalars never; ``merge_dims`` merges consecutive axes
  greedily up to ``max_precond_dim`` first; ``one_sided`` rotates only the
  shortest axis.

  State for an ``m x n`` matrix: ``m`` and ``v`` (``2mn``; ``mn + m + n`` when
  factored) plus ``GG`` and ``Q`` for each rotated axis (``2m^2 + 2n^2``; only
  ``2 min(m, n)^2`` one-sided), plus the engine's tracked ``diag(Q^T GG Q)``
  (``m + n``) and two counters per unit (refresh age and count). Cost per step: about ``6 m n (m + n)`` flops
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
      (integer >= 1); or ``"adaptive"`` / an
      :class:`soap_optax.AdaptiveRefresh`: refresh a stack when one of its
      factors' staleness ``‖B - diag B‖_F / ‖B‖_F`` (``B = Q^T GG Q``,
      measured every step at ``O(d^2)`` extra per factor) passes a tolerance,
      within a minimum and a maximum interval.
    max_precond_dim: axes longer than this keep the identity basis (>= 0).
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor too.
    normalize_grads: divide each unit's update by its RMS.
    one_sided: rotate only the shortest axis of each parameter.
    factored: keep Adafactor's factored second moment instead of ``v``.
    mu_dtype: dtype of the first moment (e.g. ``jnp.bfloat16``); ``None``
      keeps the statistics' dtype. The arithmetic is done in the statistics'
      dtype, as in ``optax.scale_by_adam``.
    dimension_numbers: ``None``, an :class:`EigenbasisDimensionNumbers` for
      every parameter, a tree prefix of the parameters with such leaves (or
      ``None``), or a callable of the parameters returning one.
    block_size: cut every non-batch axis longer than this into blocks with
      their own factors (``None``: no blocking, the authors' semantics).
    staggered_refresh: spread the refreshes over the ``precondition_frequency``
      steps instead of refreshing every unit on the same step: each unit is
      still refreshed every ``precondition_frequency`` steps, on the step
      residue (its phase) given to it at ``init`` so that every step does
      about the same share of the decomposition work (largest units first,
      each onto the least-loaded residue). Units of phase 0 refresh exactly
      as without it. ``precondition_frequency`` must then be static.
    rounding_floor: divide by ``sqrt(v + f^2)``, where ``f`` is the level of
      the rotation's own rounding error (about ``1.2e-4`` of the norm of the
      fibres through a coordinate in float32, ``2.2e-13`` in float64), so that
      rotated coordinates holding nothing but rounding noise, e.g. outside
      the span of a rank-deficient gradient, are not normalized up to
      full-size updates. ``False`` reproduces the reference's float32
      behaviour.
    mesh: a ``jax.sharding.Mesh`` to divide the optimizer over, or ``None``
      (single device; the state is whatever ``jit`` makes of it). With a
      mesh, every stack of same-shape units has its leading (unit) axis
      sharded over ``shard_axes``, padded to a multiple of the number of
      shards: each device keeps the state of, and does the per-unit work
      (rotations, moments, statistics) and the refresh for, its own units
      only; the gradients are brought to their units and the updates sent
      back by one reshard each. See :func:`soap_optax.state_shardings`.
    shard_axes: the mesh axis name, or tuple of names, to divide over;
      ``None`` with a mesh means all of its axes.

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
  _check_mesh(mesh, shard_axes)
  frequency = _check_eigenbasis_args(
      precondition_frequency, max_precond_dim, block_size,
      merge_dims=merge_dims, precondition_1d=precondition_1d,
      normalize_grads=normalize_grads, one_sided=one_sided, factored=factored,
      staggered_refresh=staggered_refresh, rounding_floor=rounding_floor)
  adaptive = frequency if _refresh_policy.is_policy(frequency) else None
  mu_dtype = _checks.check_float_dtype('mu_dtype', mu_dtype)
  factor_beta = b2 if shampoo_beta is None else shampoo_beta

  def init_fn(params):
    eigenbasis = _init_eigenbasis(
        params,
        max_precond_dim=max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        one_sided=one_sided,
        dimension_numbers=dimension_numbers,
        block_size=block_size,
        staggered_refresh=staggered_refresh,
        precondition_frequency=precondition_frequency,
        mesh=mesh,
        shard_axes=shard_axes,
    )
    plan = eigenbasis.plan
    nu = (_stacks.zeros_per_axis(plan, 'all') if factored
          else _stacks.zeros_per_stack(plan))
    return ScaleByRotatedAdamState(
        mu=_stacks.zeros_per_stack(plan, mu_dtype), nu=nu,
        eigenbasis=eigenbasis)

  def update_fn(updates, state, params=None):
    del params
    grads, treedef, factors, stacked_grads, accepted = _gather_gradients(
        updates, state.eigenbasis)
    plan = state.eigenbasis.plan
    t = state.eigenbasis.count  # t after the increment (count counts init).
    # Second moments, per stack: (v,) or (s_0, ..., s_{N-1}) when factored.
    if factored:
      nus = plan.split_axes(state.nu)
    else:
      nus = [(v,) for v in state.nu]
    absorbed = [
        _keep_rejected(ok, new, old) for ok, new, old in zip(
            accepted, _accumulate(factors, stacked_grads, factor_beta),
            factors)]

    def initialize():
      refreshed = _engine.refresh_eigh(
          absorbed, _divided(plan, plan.all_units()))
      directions = [jnp.zeros_like(g) for g in stacked_grads]
      return (directions, list(state.mu), nus, refreshed.factors,
              refreshed.failures, refreshed.extras,
              _marked(plan, _no_units(plan), plan.all_units()))

    def unit_step(g, f, mu, nu):
      """One unit's Adam step in its eigenbasis; also returns the sums of the
      squared rotated gradient over the other axes, per factored axis."""
      rotated = _engine.rotate(g, f)
      sums = _factored.axis_sums_of_squares(rotated)
      new_mu = b1 * mu.astype(g.dtype) + (1 - b1) * rotated
      if factored:
        nu = tuple(b2 * s + (1 - b2) * new for s, new in zip(nu, sums))
        second_moment = _factored.factored_second_moment(nu)
      else:
        nu = (b2 * nu[0] + (1 - b2) * rotated**2,)
        second_moment = nu[0]
      if rounding_floor:
        second_moment = second_moment + _engine.rounding_floor_squared(
            second_moment, f.layout)
      direction = _engine.unrotate(
          new_mu / (jnp.sqrt(second_moment) + eps), f)
      if normalize_grads:  # Normalized first, bias-corrected after.
        direction = direction / (
            1e-30 + jnp.sqrt(jnp.mean(jnp.square(direction))))
      scale = (jnp.sqrt(1 - b2**t) / (1 - b1**t)).astype(g.dtype)
      return (scale * direction, new_mu.astype(mu.dtype), nu,
              tuple(sums[axis] for axis in f.layout.factored_axes))

    def carry_first_moment(mu, old, new):
      """``m`` in the new basis: ``rotate_new(unrotate_old(m))``."""
      moved = _engine.rotate(
          _engine.unrotate(mu.astype(old.stats[0].dtype), old), new)
      return moved.astype(mu.dtype)

    def adam_step():
      steps = [jax.vmap(unit_step)(g, f, mu, nu)
               for g, f, mu, nu in zip(stacked_grads, factors, state.mu, nus)]
      directions = [_keep_rejected(ok, d, jnp.zeros_like(d))
                    for ok, (d, _, _, _) in zip(accepted, steps)]
      # diag(Q^T GG Q) with the factors that absorbed G, in the bases G was
      # rotated in (see _engine.staleness).
      quotients = [
          _keep_rejected(ok, tuple(
              factor_beta * q + (1 - factor_beta) * new
              for q, new in zip(old, sums)), old)
          for ok, (_, _, _, sums), old in zip(
              accepted, steps, plan.split(state.eigenbasis.quotients))]
      operands = (
          absorbed,
          [_keep_rejected(ok, m, old)
           for ok, (_, m, _, _), old in zip(accepted, steps, state.mu)],
          [_keep_rejected(ok, n, old)
           for ok, (_, _, n, _), old in zip(accepted, steps, nus)],
          jnp.zeros([], jnp.int32), quotients, _no_units(plan))

      def refresh(operands, units):
        old_factors, mus, nus, failures, quotients, masks = operands
        new_factors, new_mus, new_nus = list(old_factors), list(mus), list(nus)
        quotients = list(quotients)
        active, selected, divided = _refreshed_stacks(
            old_factors, units, plan)
        refreshed = _engine.refresh_power_qr(selected, divided)
        for s, old, new, order in zip(active, selected, refreshed.factors,
                                      refreshed.extras):
          mu = _stacks.take_units(mus[s], units[s])
          nu = _stacks.take_units(nus[s], units[s])
          new_mus[s] = _stacks.put_units(
              mus[s], jax.vmap(carry_first_moment)(mu, old, new), units[s])
          new_nus[s] = _stacks.put_units(
              nus[s], jax.vmap(functools.partial(
                  _permute_second_moment, layout=old.layout,
                  factored=factored))(nu, orders=order), units[s])
          new_factors[s] = _stacks.put_units(old_factors[s], new, units[s])
          quotients[s] = tuple(
              _stacks.put_units(q, jax.vmap(_engine.rayleigh_quotients)(
                  stat, basis), units[s])
              for q, stat, basis in zip(quotients[s], new.stats, new.bases))
        return (new_factors, new_mus, new_nus,
                failures + refreshed.failures, quotients,
                _marked(plan, masks, units))

      if adaptive is not None:
        operands = _on_stale_stacks(plan, due_stacks, refresh, operands)
      elif any(stack.layout.factored_axes for stack in plan.stacks):
        operands = _on_refresh_schedule(
            plan, t, frequency, refresh, lambda x: x, operands)
      new_factors, new_mus, new_nus, failures, quotients, masks = operands
      return (directions, new_mus, new_nus, new_factors, failures, quotients,
              masks)

    due_stacks = (None if adaptive is None
                  else _stale_stacks(state.eigenbasis, adaptive))
    directions, mus, nus, factors, failures, quotients, refreshed = (
        jax.lax.cond(t == 0, initialize, adam_step))
    if factored:
      nu = tuple(s for per_stack in nus for s in per_stack)
    else:
      nu = tuple(v[0] for v in nus)
    new_state = ScaleByRotatedAdamState(
        mu=tuple(mus), nu=nu,
        eigenbasis=_stacks.pack(
            state.eigenbasis, factors, skipped=_count_rejected(accepted),
            failed_refreshes=failures, quotients=quotients,
            refreshed=refreshed))
    return (_outputs(directions, plan, grads, treedef),
            _stacks.place_state(new_state, plan))

  return optax.GradientTransformation(init_fn, _on_any_mesh(update_fn))


def _permute_second_moment(nu, orders, *, layout, factored):
  """Reorders one unit's second moment with its bases' columns.

  (Permuted, not rotated.)

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
      factor, ``(U, d_k)`` per stack and axis, flat (stacks in plan order,
      axes in order).
    eigenvalues: ``Λ_k`` for every (merged) axis of every stack, ``(U, d_k)``,
      flat, from the last refresh (held fixed between refreshes).
    rayleigh_quotients: ``diag(Q_k^T GG_k Q_k)`` with the current factors and
      bases, shaped like ``eigenvalues`` (equal to them on a refresh call,
      updated every call from the rotated gradient).
    damping: with ``precondition_frequency=FoamRefresh(...)``, FOAM's
      damping ``ε`` of every factor, ``(U,)`` per stack and factored axis,
      flat like the engine's factors (``eps`` after a refresh); otherwise
      empty.
  """

  eigenbasis: _stacks.EigenbasisState
  diagonals: tuple[jax.Array, ...]
  eigenvalues: tuple[jax.Array, ...]
  rayleigh_quotients: tuple[jax.Array, ...]
  damping: tuple[jax.Array, ...] = ()


def scale_by_shampoo_eigenbasis(
    shampoo_beta: jax.typing.ArrayLike = 0.95,
    exponent: jax.typing.ArrayLike = 0.5,
    eps: jax.typing.ArrayLike = 1e-12,
    precondition_frequency: Any = 1,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    trace_normalize: bool = True,
    refresh: str = 'eigh',
    dimension_numbers: Any = None,
    block_size: int | None = None,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    rayleigh_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Shampoo, computed through the eigenbasis of its Kronecker factors.

  For each unit (a parameter, a slice along its batch axes or a block; see
  :func:`scale_by_rotated_adam`) with (merged) axes ``k = 0..N-1``, factors
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

  Two safeguards, on by default and negligible where Shampoo is well posed:

  * ``rayleigh_floor``: between refreshes each ``Λ_k`` is used as
    ``max(Λ_k, R_k)`` with ``R_k = diag(Q_k^T GG_k Q_k)``, the Rayleigh
    quotients of the *current* factor in the current basis (kept exactly, at
    no extra product, as ``R_k <- β R_k + (1 - β) sum_{other axes} G'^2``;
    ``R_k = Λ_k`` on a refresh call). Frozen eigenvalues of a factor that was
    rank-deficient at its last refresh (the first one, say) are otherwise
    near zero in directions the new gradients do reach, and the update
    explodes until the next refresh. With the floor, a direction's
    eigenvalue is never below the energy the factor already holds there.
  * ``rounding_floor``: ``Λ_k + (κ ε)^2 sum(Λ_k)``, the separable form of
    :func:`scale_by_rotated_adam`'s rounding-noise floor (``κ ε ≈ 1.2e-4``
    in float32, ``2.2e-13`` in float64; see
    :func:`soap_optax._engine.with_separable_rounding_floor`), so that
    coordinates holding only the rotation's rounding error are not scaled
    up.

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
    precondition_frequency: refresh every this many calls (integer >= 1);
      ``"adaptive"`` / an :class:`soap_optax.AdaptiveRefresh` (see
      :func:`scale_by_rotated_adam`); or a :class:`soap_optax.FoamRefresh`:
      FOAM's rule, every ``check_interval`` calls a damping ``ε_k`` per
      factor, used instead of ``eps`` (which is its base value ``ε_0``), is
      raised with the measured staleness, and a stack is decomposed afresh
      (``eigh`` or ``refresh``'s method) when one of its ``ε_k`` passes
      ``max_damping``; its ``ε_k`` then go back to ``eps``.
    max_precond_dim: axes longer than this get a diagonal preconditioner.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a full factor.
    trace_normalize: multiply by ``T^{(N-1) e}`` (see above).
    refresh: ``"eigh"`` or ``"qr"`` (power iteration + QR warm-started from
      the current basis, with ``Λ = diag(Q^T GG Q)``).
    dimension_numbers: batch axes per parameter (see
      :func:`scale_by_rotated_adam`).
    block_size: cut longer axes into blocks (see
      :func:`scale_by_rotated_adam`).
    staggered_refresh: spread the refreshes over the
      ``precondition_frequency`` calls (see :func:`scale_by_rotated_adam`);
      the first call still refreshes every unit.
    rounding_floor: add the rounding-noise floor to the eigenvalues (above).
    rayleigh_floor: never use an eigenvalue below its current Rayleigh
      quotient (above); ``False`` is classic Shampoo, whose eigenvalues stay
      frozen between refreshes.
    mesh: divide the state and the work over this ``jax.sharding.Mesh``
      (see :func:`scale_by_rotated_adam`); ``None``: single device.
    shard_axes: the mesh axis (or axes) to divide over; ``None``: all.

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
  _check_mesh(mesh, shard_axes)
  frequency = _check_eigenbasis_args(
      precondition_frequency, max_precond_dim, block_size, foam_allowed=True,
      merge_dims=merge_dims, precondition_1d=precondition_1d,
      trace_normalize=trace_normalize, staggered_refresh=staggered_refresh,
      rounding_floor=rounding_floor, rayleigh_floor=rayleigh_floor)
  _check_refresh(refresh)
  foam = frequency if isinstance(frequency, _refresh_policy.FoamRefresh) else None
  if foam is not None and not isinstance(eps, jax.core.Tracer) and not (
      float(eps) > 0):
    raise ValueError(
        f'eps must be > 0 with precondition_frequency=FoamRefresh(...): it is '
        f'the damping FOAM starts from and multiplies, got {eps!r}.')
  adaptive = (frequency if isinstance(frequency, _refresh_policy.AdaptiveRefresh)
              else None)

  def init_fn(params):
    eigenbasis = _init_eigenbasis(
        params,
        max_precond_dim=max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        dimension_numbers=dimension_numbers,
        block_size=block_size,
        staggered_refresh=staggered_refresh,
        precondition_frequency=precondition_frequency,
        mesh=mesh,
        shard_axes=shard_axes,
    )
    return ScaleByShampooEigenbasisState(
        eigenbasis=eigenbasis,
        diagonals=_stacks.zeros_per_axis(eigenbasis.plan, 'unfactored'),
        eigenvalues=_stacks.zeros_per_axis(eigenbasis.plan, 'all'),
        rayleigh_quotients=_stacks.zeros_per_axis(eigenbasis.plan, 'all'),
        damping=() if foam is None else tuple(
            _stacks.place(jnp.full(stat.shape[:1], eps, stat.dtype),
                          eigenbasis.plan)
            for stat in eigenbasis.stats),
    )

  def foam_check(factors, eigenvalues, damping):
    """FOAM's damping update of every factor (see :class:`FoamRefresh`)."""
    update = jax.vmap(functools.partial(
        _engine.foam_damping, exponent=exponent, tau=foam.tau,
        base_damping=eps))
    return [
        tuple(update(stat, basis, values[axis], d) for stat, basis, axis, d
              in zip(f.stats, f.bases, f.layout.factored_axes, damp))
        for f, values, damp in zip(factors, eigenvalues, damping)]

  def foam_due(plan, eigenbasis, damping, checked):
    """Per stack: a factor's damping passed ``max_damping`` on a check call,
    or the stack is ``max_interval`` calls from its last refresh."""
    def over(s):
      return checked & functools.reduce(jnp.logical_or, [
          plan.largest_over_units(s, d) > foam.max_damping
          for d in damping[s]], jnp.zeros([], bool))
    return _due_stacks(eigenbasis, over, 1, foam.max_interval)

  def precondition(g, f, values, quotients, due, damping):
    """One unit: ``G ×_k P_k`` in its eigenbasis, times the trace factor.

    Returns the direction and the unit's new Rayleigh quotients.
    """
    rotated = _engine.rotate(g, f)
    quotients = tuple(
        jnp.where(due, v, shampoo_beta * r + (1 - shampoo_beta) * new)
        for v, r, new in zip(
            values, quotients, _factored.axis_sums_of_squares(rotated)))
    if rayleigh_floor:
      values = tuple(jnp.maximum(v, r) for v, r in zip(values, quotients))
    if rounding_floor:
      values = _engine.with_separable_rounding_floor(values)
    scaled = rotated * _factored.outer_product(
        [_factored.inverse_power(v + (eps if d is None else d), exponent)
         for v, d in zip(values, damping)])
    direction = _engine.unrotate(scaled, f)
    if trace_normalize:
      total = jnp.maximum(jnp.sum(values[0]), 0.0)
      direction = direction * total ** ((len(values) - 1) * exponent)
    return direction, quotients

  def update_fn(updates, state, params=None):
    del params
    grads, treedef, factors, stacked_grads, accepted = _gather_gradients(
        updates, state.eigenbasis)
    plan = state.eigenbasis.plan
    count = state.eigenbasis.count

    factors = [_keep_rejected(ok, new, old) for ok, new, old in zip(
        accepted, _accumulate(factors, stacked_grads, shampoo_beta), factors)]
    old_diagonals = plan.split_unfactored(state.diagonals)
    diagonals = [
        _keep_rejected(ok, tuple(
            shampoo_beta * d + (1 - shampoo_beta) * new for d, new in zip(
                diag, _unfactored(
                    jax.vmap(_factored.axis_sums_of_squares)(g),
                    stack.layout))), diag)
        for ok, diag, g, stack in zip(
            accepted, old_diagonals, stacked_grads, plan.stacks)]
    old_values = plan.split_axes(state.eigenvalues)
    if foam is not None:
      checked = (count > 0) & (count % foam.check_interval == 0)
      damping = jax.lax.cond(
          checked, lambda: foam_check(factors, old_values,
                                      plan.split(state.damping)),
          lambda: plan.split(state.damping))
      due_stacks = foam_due(plan, state.eigenbasis, damping, checked)
    else:
      damping = [() for _ in plan.stacks]
      due_stacks = (None if adaptive is None
                    else _stale_stacks(state.eigenbasis, adaptive))
    factors, fresh, due, failures = _refresh_if_due(
        factors, count, frequency, refresh, plan, due_stacks)
    # Damping back to eps where refreshed; eps for axes without a factor.
    damping = [tuple(jnp.where(due_units, jnp.asarray(eps, d.dtype), d)
                     for d in damp)
               for damp, due_units in zip(damping, due)]
    # Per axis: the factor's FOAM damping, or None for ``eps``.
    per_axis_damping = [
        _per_axis(stack.layout,
                  damp or (None,) * len(stack.layout.factored_axes),
                  (None,) * (len(stack.layout.merged_shape)
                             - len(stack.layout.factored_axes)))
        for stack, damp in zip(plan.stacks, damping)]
    eigenvalues = [
        tuple(jnp.where(due_units[:, None], new, old) for new, old in zip(
            _per_axis(stack.layout, fresh_k, diag), old_values))
        for stack, fresh_k, diag, old_values, due_units in zip(
            plan.stacks, fresh, diagonals, old_values, due)]
    old_quotients = plan.split_axes(state.rayleigh_quotients)
    steps = [jax.vmap(precondition)(g, f, values, quotients, due_units, damp)
             for g, f, values, quotients, due_units, damp in zip(
                 stacked_grads, factors, eigenvalues, old_quotients, due,
                 per_axis_damping)]
    directions = [_keep_rejected(ok, d, jnp.zeros_like(d))
                  for ok, (d, _) in zip(accepted, steps)]
    quotients = [_keep_rejected(ok | due_units, new, old)
                 for ok, due_units, (_, new), old in zip(
                     accepted, due, steps, old_quotients)]

    new_state = ScaleByShampooEigenbasisState(
        eigenbasis=_stacks.pack(
            state.eigenbasis, factors, skipped=_count_rejected(accepted),
            failed_refreshes=failures, refreshed=due, quotients=[
                tuple(r[axis] for axis in stack.layout.factored_axes)
                for r, stack in zip(quotients, plan.stacks)]),
        diagonals=tuple(d for per_stack in diagonals for d in per_stack),
        eigenvalues=tuple(v for per_stack in eigenvalues for v in per_stack),
        rayleigh_quotients=tuple(r for per_stack in quotients
                                 for r in per_stack),
        damping=tuple(d for per_stack in damping for d in per_stack),
    )
    return (_outputs(directions, plan, grads, treedef),
            _stacks.place_state(new_state, plan))

  return optax.GradientTransformation(init_fn, _on_any_mesh(update_fn))


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
      stack, ``(U, d_k)``, in the rotated basis, flat.
  """

  eigenbasis: _stacks.EigenbasisState
  axis_stats: tuple[jax.Array, ...]


def scale_by_adafactor_in_eigenbasis(
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-30,
    precondition_frequency: Any = 1,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    refresh: str = 'eigh',
    dimension_numbers: Any = None,
    block_size: int | None = None,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Adafactor (no first moment) run in the eigenbasis of Shampoo's factors.

  Per unit (a parameter, a slice along its batch axes or a block; see
  :func:`scale_by_rotated_adam`), with ``G' = rotate(G)`` in the current
  bases, per (merged) axis ``k``:

  .. math::

    s_k \leftarrow b_2 s_k + (1 - b_2) \sum_{\text{other axes}} G'^2, \qquad
    V = \frac{s_0 \otimes \cdots \otimes s_{N-1}}{(\sum s_0)^{N-1}}, \qquad
    U = unrotate\big(G' \,(V + \epsilon)^{-1/2}\big)

  (for a matrix ``V = r c^T / sum(r)``; with ``rounding_floor`` each ``s_k``
  enters ``V`` as ``s_k + (κ ε)^2 sum(s_k)``, the separable rounding-noise
  floor of :func:`soap_optax._engine.with_separable_rounding_floor`, the same
  as :func:`scale_by_shampoo_eigenbasis`'s). The factors ``GG_k`` use the
  same ``b2``. On a refresh (same schedule and order as
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
    precondition_frequency: refresh every this many calls (integer >= 1),
      or ``"adaptive"`` / an :class:`soap_optax.AdaptiveRefresh` (see
      :func:`scale_by_rotated_adam`).
    max_precond_dim: axes longer than this keep the identity basis.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor.
    refresh: ``"eigh"`` or ``"qr"``.
    dimension_numbers: batch axes per parameter (see
      :func:`scale_by_rotated_adam`).
    block_size: cut longer axes into blocks (see
      :func:`scale_by_rotated_adam`).
    staggered_refresh: spread the refreshes over the
      ``precondition_frequency`` calls (see :func:`scale_by_rotated_adam`);
      the first call still refreshes every unit.
    rounding_floor: floor each statistic at the rotation's rounding level
      (above); the same rule as :func:`scale_by_shampoo_eigenbasis`'s, so the
      identity holds with it on.
    mesh: divide the state and the work over this ``jax.sharding.Mesh``
      (see :func:`scale_by_rotated_adam`); ``None``: single device.
    shard_axes: the mesh axis (or axes) to divide over; ``None``: all.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, 2024 (Section 3,
    the Shampoo–Adafactor identity); Shazeer and Stern, `Adafactor
    <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  _checks.check_beta('b2', b2)
  _checks.check_nonnegative('eps', eps)
  _check_mesh(mesh, shard_axes)
  frequency = _check_eigenbasis_args(
      precondition_frequency, max_precond_dim, block_size,
      merge_dims=merge_dims, precondition_1d=precondition_1d,
      staggered_refresh=staggered_refresh, rounding_floor=rounding_floor)
  _check_refresh(refresh)
  adaptive = frequency if _refresh_policy.is_policy(frequency) else None

  def init_fn(params):
    eigenbasis = _init_eigenbasis(
        params,
        max_precond_dim=max_precond_dim,
        merge_dims=merge_dims,
        precondition_1d=precondition_1d,
        dimension_numbers=dimension_numbers,
        block_size=block_size,
        staggered_refresh=staggered_refresh,
        precondition_frequency=precondition_frequency,
        mesh=mesh,
        shard_axes=shard_axes,
    )
    return ScaleByAdafactorInEigenbasisState(
        eigenbasis=eigenbasis,
        axis_stats=_stacks.zeros_per_axis(eigenbasis.plan, 'all'))

  def update_fn(updates, state, params=None):
    del params
    grads, treedef, factors, stacked_grads, accepted = _gather_gradients(
        updates, state.eigenbasis)
    plan = state.eigenbasis.plan
    count = state.eigenbasis.count

    factors = [_keep_rejected(ok, new, old) for ok, new, old in zip(
        accepted, _accumulate(factors, stacked_grads, b2), factors)]
    factors, fresh, due, failures = _refresh_if_due(
        factors, count, frequency, refresh, plan,
        None if adaptive is None
        else _stale_stacks(state.eigenbasis, adaptive))

    def unit_step(g, f, old_stats, fresh_k, due):
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
      second_moment = _factored.factored_second_moment(
          _engine.with_separable_rounding_floor(stats) if rounding_floor
          else stats)
      direction = _engine.unrotate(
          rotated * _factored.inverse_power(second_moment + eps, 0.5), f)
      return direction, stats

    old_stats = plan.split_axes(state.axis_stats)
    steps = [jax.vmap(unit_step)(g, f, stats, fresh_k, due_units)
             for g, f, stats, fresh_k, due_units in zip(
                 stacked_grads, factors, old_stats, fresh, due)]
    # A rejected unit due for a refresh still takes its re-estimated
    # statistics (they come from its unchanged factors).
    stats = [_keep_rejected(ok | due_units, new, old)
             for ok, due_units, (_, new), old in zip(
                 accepted, due, steps, old_stats)]
    directions = [_keep_rejected(ok, d, jnp.zeros_like(d))
                  for ok, (d, _) in zip(accepted, steps)]
    new_state = ScaleByAdafactorInEigenbasisState(
        eigenbasis=_stacks.pack(
            state.eigenbasis, factors, skipped=_count_rejected(accepted),
            failed_refreshes=failures, refreshed=due, quotients=[
                tuple(per_axis[axis] for axis in stack.layout.factored_axes)
                for per_axis, stack in zip(stats, plan.stacks)]),
        axis_stats=tuple(s for per_stack in stats for s in per_stack))
    return (_outputs(directions, plan, grads, treedef),
            _stacks.place_state(new_state, plan))

  return optax.GradientTransformation(init_fn, _on_any_mesh(update_fn))
