"""The one eigenbasis transform: the engine options, the rule interface, and
the update every rule shares.

Every transform of this package is a *rule* plugged into
:func:`eigenbasis_transform` with a *factor estimator*
(:mod:`soap_optax._estimators`). Per call, for every stack of same-shape
units (see :mod:`soap_optax._stacks`):

1. **gather** the gradients into stacks ``(U, *merged_shape)``;
2. **reject** each unit whose gradient is not finite (or whose ``sum(G**2)``
   overflows): its gradient is replaced by zeros here, its update is zero, and
   every floating array of its state is left bitwise unchanged;
3. **absorb** the gradient into the Kronecker factors,
   ``GG_i <- β GG_i + (1 - β) C_i``, with the estimator's ``beta`` and
   statistics (Shampoo's ``C_i(G)``, or KL's whitened ones);
4. **refresh** the bases of the units due (:func:`soap_optax._refresh.refresh`,
   the one driver), either *before* the step (Shampoo, Adafactor: a step's
   own gradient shapes the basis on a refresh call) or *after* it (rules
   that declare ``carries_moments``, SOAP and KL-Shampoo: a step is
   preconditioned in the old bases, then the rule's state is carried into
   the new ones by its ``on_refresh``, the estimator's by its own);
5. per unit, :func:`jax.vmap`-ed over each stack: **rotate** the gradient into
   the bases, update the **tracked quotients** ``diag(Q_i^T GG_i Q_i)``
   (``q <- β q + (1 - β)`` the estimator's increments; the refresh's values
   on a refresh before the step), the rule's **step** (a direction in the
   basis and a scale), **rotate** the direction out and scale it;
6. **keep** rejected units unchanged, **pack** the state, **scatter** the
   updates back to the parameters' shapes and dtypes.

On an Explicit mesh the whole update runs inside :func:`jax.sharding.auto_axes`
(:func:`soap_optax._mesh.on_any_mesh`).

A rule says only what it keeps and how it steps in the basis (five
members: see :class:`Rule`). Adding a rule is one file with a :class:`Rule`
and its public ``scale_by_*``.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _estimators
from soap_optax import _kronecker
from soap_optax import _mesh
from soap_optax import _refresh
from soap_optax import _solvers
from soap_optax import _stacks
from soap_optax import _state

REFRESH_METHODS = tuple(_solvers.SOLVERS)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """The options every eigenbasis transform shares, validated once.

  Users read these options in the API reference's "Engine options"
  (``docs/api.md``, written for users; keep the two in step: the docs test
  checks that every field but ``foam_allowed`` is there).

  Attributes:
    precondition_frequency: refresh the bases every this many calls (an
      integer >= 1); or ``"adaptive"`` / an :class:`soap_optax.AdaptiveRefresh`:
      refresh a stack when one of its factors' staleness
      ``‖B - diag B‖_F / ‖B‖_F`` (``B = Q^T GG Q``, measured every call at
      ``O(d^2)`` extra per factor) passes a tolerance, within a minimum and a
      maximum interval; or (Shampoo only) a :class:`soap_optax.FoamRefresh`.
    max_precond_dim: axes longer than this get no Kronecker factor (>= 0).
    merge_dims: merge consecutive axes greedily up to ``max_precond_dim``
      before factoring.
    precondition_1d: give 1-D parameters a factor too.
    one_sided: keep a factor only on the shortest axis of each unit.
    dimension_numbers: ``None``, an :class:`EigenbasisDimensionNumbers` for
      every parameter, a tree prefix of the parameters with such leaves (or
      ``None``), or a callable of the parameters returning one. Batch axes get
      no factor, and every slice along them is optimized exactly as if it
      were a parameter of its own.
    block_size: cut every non-batch axis longer than this into blocks with
      their own factors (``None``: no blocking, the authors' semantics).
    bucket_padding: let units of different shapes share one stack (and so
      one compiled per-unit program and one solver program), each reordered
      longest axis first and padded with zeros up to the stack's shape,
      when that adds at most this fraction of the unit's own work (refresh
      plus step); ``None`` or 0: one stack per unit shape. Padding changes
      no number of a unit (zero rows and columns stay exactly zero, and the
      canonical null-space basis keeps them as coordinate axes). Rules that
      count a unit's entries in their arithmetic (the KL estimators, FOAM)
      do not bucket, nor do adaptive refresh policies (they decide per
      stack); under ``staggered_refresh`` phases are assigned over the
      bucketed stacks (each unit still refreshes every
      ``precondition_frequency`` calls). The same bound plans the solver
      sizes, for every rule: factor sizes whose refresh work is small share
      the solver program of a larger size, padded with zero rows and
      columns (and so a dead axis each), while the padding adds at most
      this fraction of the whole tree's refresh work (``d^3`` per factor;
      :func:`soap_optax._refresh.solver_sizes`). Under
      :func:`optax.inject_hyperparams` with a ``jit``-ed ``init``, list it in
      ``static_args``.
    staggered_refresh: spread the refreshes over the ``precondition_frequency``
      calls instead of refreshing every unit on the same call: each unit is
      still refreshed every ``precondition_frequency`` calls, on the residue
      (its phase) given to it at ``init`` so that every call does about the
      same share of the decomposition work (largest units first, each onto
      the least-loaded residue). ``precondition_frequency`` must then be an
      integer.
    rounding_floor: floor the second moment (or eigenvalues) at the level of
      the rotation's own rounding error (about ``1.2e-4`` of the norm of the
      fibres through a coordinate in float32, ``2.2e-13`` in float64), so
      that coordinates holding only rounding noise, e.g. outside the span of
      a rank-deficient gradient, are not normalized up to full-size updates.
    refresh: the solver of later refreshes: ``"qr"`` (one step of power
      iteration warm-started from the current basis, its columns sorted by
      ``diag(Q^T GG Q)``, then QR; about ``14/3 d^3`` flops),
      ``"qr_unsorted"`` (the same without the sort) or ``"eigh"`` (about
      ``9 d^3``). A unit's first refresh is always ``"eigh"``.
    mesh: a :class:`jax.sharding.Mesh` to divide the optimizer over, or ``None``
      (single device). With a mesh, every unit has one owner device along
      ``shard_axes``, which keeps its state and does its per-unit work and
      refresh; the gradients reach the owners and the updates come back
      through one ``all_to_all`` each way. See
      :func:`soap_optax.state_shardings` and
      :func:`soap_optax.parameter_shardings`.
    shard_axes: the mesh axis name, or tuple of names, to divide over;
      ``None`` with a mesh means all of its axes.
    foam_allowed: set by each transform, not by users: whether its rule
      accepts :class:`soap_optax.FoamRefresh` (Shampoo's only).
  """

  precondition_frequency: Any = 10
  max_precond_dim: int = 10000
  merge_dims: bool = False
  precondition_1d: bool = False
  one_sided: bool = False
  dimension_numbers: Any = None
  block_size: int | None = None
  bucket_padding: float | None = 0.1
  staggered_refresh: bool = False
  rounding_floor: bool = True
  refresh: str = 'qr'
  mesh: Any = None
  shard_axes: Any = None
  foam_allowed: bool = False

  def __post_init__(self):
    _mesh.check_mesh(self.mesh, self.shard_axes)
    for name in ('merge_dims', 'precondition_1d', 'one_sided',
                 'staggered_refresh', 'rounding_floor'):
      _checks.check_bool(name, getattr(self, name))
    _checks.check_int('max_precond_dim', self.max_precond_dim, 0)
    if self.block_size is not None:
      _checks.check_int('block_size', self.block_size, 1)
    if self.bucket_padding is not None:
      _checks.check_nonnegative('bucket_padding', self.bucket_padding)
    _checks.check_choice('refresh', self.refresh, REFRESH_METHODS)
    object.__setattr__(self, 'schedule', _refresh.resolve(
        self.precondition_frequency, foam_allowed=self.foam_allowed,
        staggered_refresh=self.staggered_refresh))

  @classmethod
  def from_arguments(cls, arguments: dict[str, Any], **overrides: Any
                     ) -> 'EngineConfig':
    """The config of a transform's own keyword arguments (its ``locals()``
    before any other name is bound): the engine options among them, plus
    ``overrides``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in arguments.items() if k in names},
               **overrides)

  def init_eigenbasis(self, params: Any) -> _state.EigenbasisState:
    """The engine's state for ``params`` (dtypes checked)."""
    _checks.check_float_params(params)
    return _state.init_eigenbasis(
        params, max_precond_dim=self.max_precond_dim,
        merge_dims=self.merge_dims, precondition_1d=self.precondition_1d,
        one_sided=self.one_sided, dimension_numbers=self.dimension_numbers,
        block_size=self.block_size, bucket_padding=self.bucket_padding,
        staggered_refresh_frequency=(
            self.precondition_frequency if self.staggered_refresh else None),
        mesh=self.mesh, shard_axes=self.shard_axes)


class View(NamedTuple):
  """What the skeleton tells a rule's step about one unit.

  Attributes:
    quotients: per factored axis, the tracked ``diag(Q^T GG Q)`` in the
      bases the gradient was rotated into, this call's gradient included
      (the refresh's values on a unit refreshed before its step).
    values: per factored axis, the refresh's eigenvalue estimates (rules
      that do not carry moments; zeros where not ``due``); ``()`` otherwise.
    due: scalar boolean, whether the unit was refreshed before its step
      (always False for rules that carry moments: they refresh after).
    count: the number of calls before this one.
    estimates: the factor estimator's per-axis estimates from before the
      call (KL's ``λ_k`` as ``estimates.eigenvalues``; empty for Shampoo's).
    layout: the unit's :class:`soap_optax._kronecker.FactorLayout` (static).
    extent: the unit's own lengths in a size bucket, or None (see
      :class:`soap_optax._kronecker.KroneckerFactors`).
    factors: the unit's factors and bases (before a refresh after the
      step), for rules that act on the direction in the parameters' space:
      such a step returns ``rotate(D)``, which the skeleton rotates back to
      ``D``.
  """

  quotients: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  due: jax.Array
  count: jax.Array
  estimates: Any
  layout: _kronecker.FactorLayout
  extent: jax.Array | None
  factors: _kronecker.KroneckerFactors


class Rule:
  """A coordinate-wise optimizer in the eigenbasis (override in a subclass).

  The skeleton rotates the gradient into the unit's bases, hands it to
  :meth:`step`, and rotates the direction back out; it keeps the tracked
  quotients and the factors. A rule says only what it keeps and how it
  steps.

  Attributes:
    State: the public state class: a NamedTuple with an ``eigenbasis`` field
      and one field per field of the per-stack state (the rule's, then its
      factor estimator's), holding that field's arrays flat over the stacks
      (a per-stack tuple is concatenated).
    carries_moments: ``True``: the rule's state lives in the basis (SOAP's
      moments). A step is preconditioned in the old bases, then the due
      units are refreshed and :meth:`on_refresh` carries the state into the
      new bases; a unit's first accepted call only initializes it (zero
      update, state unchanged). ``False``: the due units are refreshed
      first, and the step runs in the new bases.
  """

  State: type
  carries_moments = False

  def init_stack(self, stack: _stacks.Stack) -> Any:
    """The rule's zero state for a stack: a NamedTuple of ``(U, ...)`` arrays
    or tuples of them."""
    raise NotImplementedError

  def step(self, rotated: jax.Array, state: Any, view: View
           ) -> tuple[jax.Array, Any, Any]:
    """One unit's step on its rotated gradient: ``(direction in the basis,
    scale, new state)``; the unit's update is ``scale * unrotate(direction)``
    (scalars that apply after the rotation out, as a bias correction)."""
    raise NotImplementedError

  def on_refresh(self, state: Any, change: _kronecker.BasisChange) -> Any:
    """One refreshed unit's state carried into its new bases (rules that
    carry moments)."""
    raise NotImplementedError


class _OutsideMapParams:
  """The state ``init`` gives ``optax.tree.map_params``' placeholder.

  No array of an eigenbasis transform's state is shaped like the parameters
  (moments and factors are laid out flat over stacks of units), so
  ``map_params`` maps none of them: it sees this one leaf where the state
  is, and hands the transform's whole state, unchanged, to
  ``transform_non_params`` when one is given. The shardings of the state
  come from :func:`soap_optax.state_shardings`.
  """

  def __repr__(self):
    return '<eigenbasis state: no parameter-shaped tree>'


OUTSIDE_MAP_PARAMS = _OutsideMapParams()


def is_optax_params_placeholder(params: Any) -> bool:
  """Whether ``params`` is the leafless stand-in with which
  ``optax.tree.map_params`` calls ``init`` to find parameter-shaped trees."""
  kind = type(params)
  return (kind.__name__ == '_ParamsPlaceholder'
          and kind.__module__.startswith('optax.'))


def _as_tuple(x: Any) -> tuple[Any, ...]:
  return x if isinstance(x, tuple) else (x,)


def _fields_of(parts: tuple[Any, ...]) -> dict[str, Any]:
  """One stack's fields: the rule's state's, then its estimator's."""
  return {name: value for part in parts for name, value in part._asdict().items()}


def _to_public(state_class: type, eigenbasis: _state.EigenbasisState,
               per_stack: list[tuple[Any, ...]], fields: tuple[str, ...]
               ) -> Any:
  """The public state: each field's arrays, flat over the stacks."""
  merged = [_fields_of(parts) for parts in per_stack]
  return state_class(eigenbasis=eigenbasis, **{
      name: tuple(x for stack in merged for x in _as_tuple(stack[name]))
      for name in fields})


def _from_public(state: Any, init_parts: Any) -> list[tuple[Any, ...]]:
  """Inverse of :func:`_to_public`: every stack's parts (the rule's state,
  its estimator's), shaped like ``init_parts(stack)``."""
  plan = state.eigenbasis.plan
  starts: dict[str, int] = {}
  per_stack = []
  for stack in plan.stacks:
    parts = []
    for shape in jax.eval_shape(init_parts, stack):
      fields = {}
      for name, like in zip(shape._fields, shape):
        # A per-stack field the public state lacks must be empty.
        if not hasattr(state, name) and like != ():
          raise ValueError(
              f'{type(state).__name__} has no field {name!r}, which this '
              f'transform keeps: a state of another transform or option?')
        flat, start = getattr(state, name, ()), starts.get(name, 0)
        count = len(like) if isinstance(like, tuple) else 1
        part = tuple(flat[start:start + count])
        fields[name] = part if isinstance(like, tuple) else part[0]
        starts[name] = start + count
      parts.append(type(shape)(**fields))
    per_stack.append(tuple(parts))
  return per_stack


def _where_units(mask: jax.Array, new: Any, old: Any) -> Any:
  """Per unit of a stack: ``new`` where ``mask``, else ``old`` (any tree of
  ``(U, ...)`` arrays)."""
  def select(n, o):
    return jnp.where(mask.reshape((-1,) + (1,) * (jnp.ndim(n) - 1)), n, o)
  return jax.tree.map(select, new, old)


def _carry_on_refresh(carried, per_stack, old_factors, refreshed, due,
                      plan: _stacks.EigenbasisPlan):
  """``carried(parts, change, values)`` on every due unit. Per stack inside
  a ``lax.cond`` (nothing runs on calls without a due unit); with
  staggering per unit under ``lax.map`` and a ``lax.cond``, so that only
  the due units pay."""
  out = []
  for parts, old, new, orders, values, mask in zip(
      per_stack, old_factors, refreshed.factors, refreshed.orders,
      refreshed.values, due):
    if not old.layout.factored_axes:
      out.append(parts)
      continue
    def unit(parts, old, new, orders, values):
      return carried(parts, _kronecker.BasisChange(old, new, orders), values)
    def carry(args):
      if plan.refresh_phases is None:
        return _where_units(args[-1], jax.vmap(unit)(*args[:-1]), args[0])
      return jax.lax.map(lambda one: jax.lax.cond(
          one[-1], lambda: unit(*one[:-1]), lambda: one[0]), args)
    out.append(jax.lax.cond(jnp.any(mask), carry, lambda args: args[0],
                            (parts, old, new, orders, values, mask)))
  return out


def estimator_of(arguments: dict[str, Any]) -> tuple[Any, str, bool]:
  """The factor estimator a SOAP-like transform's keyword ``arguments`` (its
  ``locals()``) name, checked, and its ``refresh`` and ``bias_correction``
  with ``None`` replaced by that estimator's authors' choice
  (:data:`soap_optax._estimators.AUTHORS_CHOICES`).

  The estimator is ``factor_estimator``'s, with the decay ``shampoo_beta``
  (``b2`` where that is None); ``initial_eigenvalue`` (``None``: 0.1) is the
  KL estimator's, and an error with the Frobenius one, which keeps no
  estimates.
  """
  name, initial = arguments['factor_estimator'], arguments['initial_eigenvalue']
  _checks.check_choice('factor_estimator', name, tuple(_estimators.ESTIMATORS))
  if arguments['bias_correction'] is not None:
    _checks.check_bool('bias_correction', arguments['bias_correction'])
  beta = arguments['shampoo_beta']
  beta = arguments['b2'] if beta is None else beta
  if name == 'kl':
    if initial is None:
      initial = _estimators.KL_INITIAL_EIGENVALUE
    _checks.check_positive('initial_eigenvalue', initial)
    estimator = _estimators.KL(beta, initial)
  elif initial is not None:
    raise ValueError(
        'initial_eigenvalue applies to factor_estimator="kl" only (the '
        f'Frobenius factors keep no eigenvalue estimates); got '
        f'factor_estimator={name!r}.')
  else:
    estimator = _estimators.Frobenius(beta)
  authors = _estimators.AUTHORS_CHOICES[name]
  return estimator, *(authors[key] if arguments[key] is None
                      else arguments[key]
                      for key in ('refresh', 'bias_correction'))


def eigenbasis_transform(
    rule: Rule, config: EngineConfig, estimator: Any, *,
    pads_exactly: bool = True, decide: Any = None,
) -> optax.GradientTransformation:
  """The :class:`optax.GradientTransformation` of ``rule`` on the engine.

  Args:
    rule: what the transform computes per unit (see :class:`Rule`).
    config: the engine options (see :class:`EngineConfig`).
    estimator: what the factors absorb and the estimates kept besides them
      (:class:`soap_optax._estimators.Frobenius` or ``KL``); its ``beta`` is
      the factors' and the tracked quotients' decay.
    pads_exactly: whether a unit padded with zeros (a size bucket) computes
      its real entries exactly as unpadded; False (or an estimator that
      counts a unit's entries, or a refresh policy) turns buckets off.
    decide: a refresh decision of the transform's own,
      ``decide(count, factors, states, eigenbasis) -> (states, due per
      stack)`` (FOAM's: :func:`soap_optax._refresh.foam_decision`), or None
      (the engine's schedule or policy decides).

  Returns:
    An :class:`optax.GradientTransformation` whose state is ``rule.State``.
  """
  fields = tuple(name for name in rule.State._fields if name != 'eigenbasis')
  carries, beta = rule.carries_moments, estimator.beta
  # Solver sizes pad the solver's input alone: exact for every rule.
  solver_padding = config.bucket_padding
  if (not (pads_exactly and estimator.pads_exactly)
      or _refresh.is_policy(config.schedule)):
    # A policy decides per stack: a bucket would tie its shapes' refreshes.
    config = dataclasses.replace(config, bucket_padding=None)

  def init_parts(stack):
    state, estimates = rule.init_stack(stack), estimator.init_stack(stack)
    if set(state._fields) & set(estimates._fields):
      raise ValueError(
          f'{type(rule).__name__} and {type(estimator).__name__} both keep '
          f'{sorted(set(state._fields) & set(estimates._fields))}: the '
          f'public state holds each field once.')
    return state, estimates

  def init_fn(params):
    if is_optax_params_placeholder(params):
      return OUTSIDE_MAP_PARAMS
    eigenbasis = config.init_eigenbasis(params)
    layout = eigenbasis.plan.sharding
    per_stack = [_mesh.place_state(init_parts(stack), layout)
                 for stack in eigenbasis.plan.stacks]
    # Which stack each array of the public fields belongs to (for
    # soap_optax.portable_state and reshard_state).
    merged = [_fields_of(parts) for parts in per_stack]
    field_stacks = tuple(
        (name, tuple(s for s, stack in enumerate(merged)
                     for _ in _as_tuple(stack[name])))
        for name in fields)
    eigenbasis = eigenbasis._replace(plan=dataclasses.replace(
        eigenbasis.plan, field_stacks=field_stacks,
        solver_padding=None if solver_padding is None else float(
            solver_padding)))
    return _to_public(rule.State, eigenbasis, per_stack, fields)

  def unit_step(grad, factors, state, estimates, quotients, values, due,
                count):
    """One unit: rotate in, track the quotients, the rule's step, rotate
    out."""
    rotated = _kronecker.rotate(grad, factors)
    increments = estimator.increments(rotated, estimates)
    tracked = tuple(
        beta * q + (1 - beta) * increments[axis]
        for q, axis in zip(quotients, factors.layout.factored_axes))
    if not carries:  # Refreshed before the step: the refresh's values.
      tracked = tuple(jnp.where(due, v, q) for v, q in zip(values, tracked))
    direction, scale, state = rule.step(rotated, state, View(
        tracked, values, due, count, estimates, factors.layout,
        factors.extent, factors))
    return (scale * _kronecker.unrotate(direction, factors), state,
            estimator.advance(estimates, increments, factors.layout), tracked)

  def carried(parts, change, values):
    state, estimates = parts
    return (rule.on_refresh(state, change),
            estimator.on_refresh(estimates, change, values))

  def update_fn(updates, state, params=None):
    del params
    eigenbasis = state.eigenbasis
    plan, count = eigenbasis.plan, eigenbasis.count
    _state.check_updates(updates, plan)
    grads, treedef = jax.tree.flatten(updates)
    stacked = _stacks.gather(grads, plan)
    accepted = [
        jnp.isfinite(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))
        for g in stacked]
    stacked = [_where_units(ok, g, jnp.zeros_like(g))
               for ok, g in zip(accepted, stacked)]
    factors = _state.unpack(eigenbasis)
    old_states, old_estimates = (
        [list(parts) for parts in zip(*_from_public(state, init_parts))]
        or ([], []))
    old_quotients = plan.split(eigenbasis.quotients)
    def absorb(f, g, estimates, initializing):
      return _estimators.accumulate(f, estimator.statistics(
          g, f, estimates, initializing), beta)
    absorbed = [
        _where_units(ok, jax.vmap(absorb)(f, g, est, refreshes == 0), f)
        for ok, f, g, est, refreshes in zip(
            accepted, factors, stacked, old_estimates, eigenbasis.refreshes)]
    states, decided = (old_states, None) if decide is None else decide(
        count, absorbed, old_states, eigenbasis)
    due = _refresh.due_units(eigenbasis, config.schedule, accepted, decided)
    refresh = functools.partial(
        _refresh.refresh, method=config.refresh, plan=plan,
        partial=_refresh.is_policy(config.schedule))

    if carries:  # The step in the old bases; the refresh comes after.
      advanced = [ok & ~new for ok, new in zip(accepted, due.initializing)]
      bases, values = factors, [()] * len(factors)
      before = [jnp.zeros_like(mask) for mask in due.units]
    else:
      refreshed = refresh(absorbed, due)
      advanced, bases, values, before = (
          accepted, refreshed.factors, refreshed.values, due.units)
    steps = [
        jax.vmap(functools.partial(unit_step, count=count))(*unit)
        for unit in zip(stacked, bases, states, old_estimates, old_quotients,
                        values, before)]
    directions = [_where_units(ok, d, jnp.zeros_like(d))
                  for ok, (d, *_) in zip(advanced, steps)]
    per_stack = [_where_units(ok, (st, est), (old_st, old_est))
                 for ok, (_, st, est, _), old_st, old_est in zip(
                     advanced, steps, old_states, old_estimates)]
    quotients = [_where_units(ok, step[3], old)
                 for ok, step, old in zip(advanced, steps, old_quotients)]
    if carries:
      refreshed = refresh(absorbed, due)
      per_stack = _carry_on_refresh(carried, per_stack, absorbed, refreshed,
                                    due.units, plan)
    quotients = [_where_units(mask, values, q) for mask, values, q in zip(
        due.units, refreshed.values, quotients)]

    new_eigenbasis = _state.pack(
        eigenbasis, refreshed.factors,
        skipped=sum((jnp.sum(~ok, dtype=jnp.int32) for ok in accepted),
                    jnp.zeros([], jnp.int32)),
        failed_refreshes=refreshed.failures, quotients=quotients,
        refreshed=due.units)
    new_state = _to_public(rule.State, new_eigenbasis, per_stack, fields)
    outputs = treedef.unflatten([
        d.astype(g.dtype)
        for d, g in zip(_stacks.scatter(directions, plan, count), grads)])
    return outputs, _mesh.place_state(new_state, plan.sharding)

  return optax.GradientTransformation(
      init_fn, _mesh.on_any_mesh(
          update_fn, lambda state: state.eigenbasis.plan.sharding))
