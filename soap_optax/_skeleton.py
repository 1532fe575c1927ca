"""The one eigenbasis transform: the engine options, the rule interface, and
the update every rule shares.

Every transform of this package is a *rule* plugged into
:func:`eigenbasis_transform`. Per call, for every stack of same-shape units
(see :mod:`soap_optax._stacks`):

1. **gather** the gradients into stacks ``(U, *merged_shape)``;
2. **reject** each unit whose gradient is not finite (or whose ``sum(G**2)``
   overflows): its gradient is replaced by zeros here, its update is zero, and
   every floating array of its state is left bitwise unchanged;
3. **absorb** the gradient into the Kronecker factors,
   ``GG_i <- β GG_i + (1 - β) C_i``, with the rule's ``factor_beta`` and
   statistics (Shampoo's ``C_i(G)``, or KL's whitened ones);
4. **refresh** the bases of the units due (:func:`soap_optax._refresh.refresh`,
   the one driver), either *before* the rule's step (Shampoo, Adafactor: a
   step's own gradient shapes the basis on a refresh call) or *after* it
   (SOAP: a step is preconditioned in the old basis, then the rule's state is
   carried into the new one by ``on_refresh``);
5. the rule's **per-unit step**, ``jax.vmap``-ed over each stack;
6. **keep** rejected units unchanged, **pack** the state, **scatter** the
   updates back to the parameters' shapes and dtypes.

On an Explicit mesh the whole update runs inside ``jax.sharding.auto_axes``
(:func:`soap_optax._mesh.on_any_mesh`).

A rule says only what differs: its factor decay, its order, its per-stack
state, its per-unit step and what a refresh does to its state. Adding a rule
is one file with a :class:`Rule` and its public ``scale_by_*``.
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
      ``precondition_frequency`` calls). Under ``optax.inject_hyperparams``
      with a ``jit``-ed ``init``, list it in ``static_args``.
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
      iteration warm-started from the current basis, then QR; about
      ``14/3 d^3`` flops) or ``"eigh"`` (about ``9 d^3``). A unit's first
      refresh is always ``"eigh"``.
    mesh: a ``jax.sharding.Mesh`` to divide the optimizer over, or ``None``
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


class UnitRefresh(NamedTuple):
  """What the refresh gave one unit on this call (refresh-first rules).

  Attributes:
    values: per factored axis, the eigenvalue estimates in the new basis.
    due: scalar boolean, whether the unit was refreshed on this call.
  """

  values: tuple[jax.Array, ...]
  due: jax.Array


class UnitStep(NamedTuple):
  """A rule's per-unit step.

  Attributes:
    direction: the unit's update, in the merged shape.
    state: the unit's new rule state.
    quotients: per factored axis, ``diag(Q^T GG Q)`` with the factor that
      absorbed this call's gradient, in the basis the gradient was
      preconditioned in (see :func:`soap_optax._staleness.staleness`).
  """

  direction: jax.Array
  state: Any
  quotients: tuple[jax.Array, ...]


class Rule:
  """What a transform adds to the skeleton (override in a subclass).

  Attributes:
    State: the public state class: a NamedTuple with an ``eigenbasis`` field
      and one field per field of the per-stack state, holding that field's
      arrays flat over the stacks (a per-stack tuple is concatenated).
    factor_beta: the decay of the Kronecker factors.
    refresh_first: ``True``: refresh, then the step in the new bases
      (Shampoo, Adafactor); ``False``: the step in the old bases, then the
      refresh and :meth:`on_refresh` (SOAP).
    initializes_first: a unit's first accepted call only initializes it (its
      update is zero and its rule state unchanged), as SOAP's first call.
  """

  State: type
  factor_beta: Any
  refresh_first = True
  initializes_first = False

  @property
  def pads_exactly(self) -> bool:
    """Whether a unit padded with zeros (a size bucket) computes its real
    entries exactly as unpadded. Rules whose arithmetic counts a unit's
    entries or adds to its padded coordinates say False."""
    return True

  def init_stack(self, stack: _stacks.Stack) -> Any:
    """The rule's zero state for a stack: a NamedTuple of ``(U, ...)`` arrays
    or tuples of them."""
    raise NotImplementedError

  def unit_step(self, grad: jax.Array, factors: _kronecker.KroneckerFactors,
                state: Any, quotients: tuple[jax.Array, ...],
                refreshed: UnitRefresh | None, count: jax.Array) -> UnitStep:
    """One unit's step. ``count`` is the number of calls before this one;
    ``refreshed`` is None for rules that refresh after their step."""
    raise NotImplementedError

  def factor_statistics(self, grad: jax.Array,
                        factors: _kronecker.KroneckerFactors, state: Any,
                        initializing: jax.Array) -> tuple[jax.Array, ...]:
    """What one unit's factors absorb on this call, per factored axis, with
    the unit's bases and rule state before the call; ``initializing``: a
    scalar boolean, whether this is the unit's first accepted call. By
    default Shampoo's ``C_i(G)``."""
    del state, initializing
    return _estimators.factor_statistics(grad, factors.layout)

  def on_refresh(self, state: Any, old: _kronecker.KroneckerFactors,
                 new: _kronecker.KroneckerFactors,
                 orders: tuple[jax.Array, ...],
                 values: tuple[jax.Array, ...]) -> Any:
    """One refreshed unit's rule state carried into its new bases (rules
    that refresh after their step); ``values``: per factored axis, the
    refresh's eigenvalue estimates in the new bases."""
    del old, new, orders, values
    return state

  def decide(self, count: jax.Array,
             factors: list[_kronecker.KroneckerFactors], states: list[Any],
             eigenbasis: _state.EigenbasisState
             ) -> tuple[list[Any], list[jax.Array] | None]:
    """A rule's own refresh decision (FOAM): per stack, the states it
    updated and whether the stack is due; ``None`` leaves the decision to
    the engine's schedule or policy."""
    del count, factors, eigenbasis
    return states, None


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


def _is_optax_params_placeholder(params: Any) -> bool:
  """Whether ``params`` is the leafless stand-in with which
  ``optax.tree.map_params`` calls ``init`` to find parameter-shaped trees."""
  kind = type(params)
  return (kind.__name__ == '_ParamsPlaceholder'
          and kind.__module__.startswith('optax.'))


def _as_tuple(x: Any) -> tuple[Any, ...]:
  return x if isinstance(x, tuple) else (x,)


def _to_public(rule: Rule, eigenbasis: _state.EigenbasisState,
               per_stack: list[Any], fields: tuple[str, ...]) -> Any:
  """The public state: each field's arrays, flat over the stacks."""
  return rule.State(eigenbasis=eigenbasis, **{
      name: tuple(x for state in per_stack
                  for x in _as_tuple(getattr(state, name)))
      for name in fields})


def _from_public(rule: Rule, state: Any) -> list[Any]:
  """Inverse of :func:`_to_public`: the rule's state of every stack."""
  plan = state.eigenbasis.plan
  shapes = [jax.eval_shape(rule.init_stack, stack) for stack in plan.stacks]
  starts = {name: 0 for name in (shapes[0]._fields if shapes else ())}
  per_stack = []
  for shape in shapes:
    fields = {}
    for name, like in zip(shape._fields, shape):
      # A per-stack field the public state lacks must be empty (a rule
      # option that is off, as KL-SOAP's estimates in plain SOAP).
      if not hasattr(state, name) and like != ():
        raise ValueError(
            f'{type(state).__name__} has no field {name!r}, which this '
            f'transform keeps: a state of another transform or option?')
      flat, start = getattr(state, name, ()), starts[name]
      count = len(like) if isinstance(like, tuple) else 1
      part = tuple(flat[start:start + count])
      fields[name] = part if isinstance(like, tuple) else part[0]
      starts[name] = start + count
    per_stack.append(type(shape)(**fields))
  return per_stack


def _where_units(mask: jax.Array, new: Any, old: Any) -> Any:
  """Per unit of a stack: ``new`` where ``mask``, else ``old`` (any tree of
  ``(U, ...)`` arrays)."""
  def select(n, o):
    return jnp.where(mask.reshape((-1,) + (1,) * (jnp.ndim(n) - 1)), n, o)
  return jax.tree.map(select, new, old)


def _carry_on_refresh(rule: Rule, states, old_factors, refreshed, due,
                      plan: _stacks.EigenbasisPlan):
  """:meth:`Rule.on_refresh` on every due unit. Per stack inside a
  ``lax.cond`` (nothing runs on calls without a due unit); with staggering
  per unit under ``lax.map`` and a ``lax.cond``, so that only the due units
  pay."""
  out = []
  for state, old, new, orders, values, mask in zip(
      states, old_factors, refreshed.factors, refreshed.orders,
      refreshed.values, due):
    if not old.layout.factored_axes:
      out.append(state)
      continue
    def carry(args):
      state, old, new, orders, values, mask = args
      if plan.refresh_phases is None:
        return _where_units(mask, jax.vmap(rule.on_refresh)(
            state, old, new, orders, values), state)
      return jax.lax.map(lambda unit: jax.lax.cond(
          unit[-1], lambda: rule.on_refresh(*unit[:-1]), lambda: unit[0]),
                         (state, old, new, orders, values, mask))
    operands = (state, old, new, orders, values, mask)
    out.append(jax.lax.cond(jnp.any(mask), carry, lambda args: args[0],
                            operands))
  return out


def eigenbasis_transform(rule: Rule, config: EngineConfig
                         ) -> optax.GradientTransformation:
  """The ``optax.GradientTransformation`` of ``rule`` on the engine.

  Args:
    rule: what the transform computes per unit (see :class:`Rule`).
    config: the engine options (see :class:`EngineConfig`).

  Returns:
    An ``optax.GradientTransformation`` whose state is ``rule.State``.
  """
  fields = tuple(name for name in rule.State._fields if name != 'eigenbasis')
  if not rule.pads_exactly or _refresh.is_policy(config.schedule):
    # A policy decides per stack: a bucket would tie its shapes' refreshes.
    config = dataclasses.replace(config, bucket_padding=None)

  def init_fn(params):
    if _is_optax_params_placeholder(params):
      return OUTSIDE_MAP_PARAMS
    eigenbasis = config.init_eigenbasis(params)
    layout = eigenbasis.plan.sharding
    per_stack = [_mesh.place_state(rule.init_stack(stack), layout)
                 for stack in eigenbasis.plan.stacks]
    # Which stack each array of the rule's fields belongs to (for
    # soap_optax.portable_state and reshard_state).
    field_stacks = tuple(
        (name, tuple(s for s, state in enumerate(per_stack)
                     for _ in _as_tuple(getattr(state, name))))
        for name in fields)
    eigenbasis = eigenbasis._replace(plan=dataclasses.replace(
        eigenbasis.plan, field_stacks=field_stacks))
    return _to_public(rule, eigenbasis, per_stack, fields)

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
    old_states = _from_public(rule, state)
    old_quotients = plan.split(eigenbasis.quotients)
    def absorb(f, g, st, initializing):
      return _estimators.accumulate(
          f, rule.factor_statistics(g, f, st, initializing), rule.factor_beta)
    absorbed = [
        _where_units(ok, jax.vmap(absorb)(f, g, st, refreshes == 0), f)
        for ok, f, g, st, refreshes in zip(
            accepted, factors, stacked, old_states, eigenbasis.refreshes)]
    states, decided = rule.decide(count, absorbed, old_states, eigenbasis)
    due = _refresh.due_units(eigenbasis, config.schedule, accepted, decided)
    advanced = ([ok & ~new for ok, new in zip(accepted, due.initializing)]
                if rule.initializes_first else accepted)
    refresh = functools.partial(
        _refresh.refresh, method=config.refresh, plan=plan,
        partial=_refresh.is_policy(config.schedule))

    if rule.refresh_first:
      refreshed = refresh(absorbed, due)
      steps = [
          jax.vmap(lambda g, f, st, q, r: rule.unit_step(g, f, st, q, r,
                                                         count))(
              g, f, st, q, UnitRefresh(values, mask))
          for g, f, st, q, values, mask in zip(
              stacked, refreshed.factors, states, old_quotients,
              refreshed.values, due.units)]
    else:
      steps = [
          jax.vmap(lambda g, f, st, q: rule.unit_step(g, f, st, q, None,
                                                      count))(g, f, st, q)
          for g, f, st, q in zip(stacked, factors, states, old_quotients)]
    directions = [_where_units(ok, step.direction,
                               jnp.zeros_like(step.direction))
                  for ok, step in zip(advanced, steps)]
    new_states = [_where_units(ok, step.state, old)
                  for ok, step, old in zip(advanced, steps, old_states)]
    quotients = [_where_units(ok, step.quotients, old)
                 for ok, step, old in zip(advanced, steps, old_quotients)]
    if not rule.refresh_first:
      refreshed = refresh(absorbed, due)
      new_states = _carry_on_refresh(rule, new_states, absorbed, refreshed,
                                     due.units, plan)
    quotients = [_where_units(mask, values, q) for mask, values, q in zip(
        due.units, refreshed.values, quotients)]

    new_eigenbasis = _state.pack(
        eigenbasis, refreshed.factors,
        skipped=sum((jnp.sum(~ok, dtype=jnp.int32) for ok in accepted),
                    jnp.zeros([], jnp.int32)),
        failed_refreshes=refreshed.failures, quotients=quotients,
        refreshed=due.units)
    new_state = _to_public(rule, new_eigenbasis, new_states, fields)
    outputs = treedef.unflatten([
        d.astype(g.dtype)
        for d, g in zip(_stacks.scatter(directions, plan), grads)])
    return outputs, _mesh.place_state(new_state, plan.sharding)

  return optax.GradientTransformation(
      init_fn, _mesh.on_any_mesh(
          update_fn, lambda state: state.eigenbasis.plan.sharding))
