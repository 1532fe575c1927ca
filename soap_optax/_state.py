"""The engine's stacked state and its lifecycle: init, check, unpack, pack.

Every eigenbasis transform keeps, besides its own per-unit state, one
:class:`EigenbasisState`: the Kronecker factors and bases of every stack of
same-shape units (see :mod:`soap_optax._stacks`), the tracked
``diag(Q^T GG Q)``, per-unit refresh counters and the rejection and failure
counts. A transform's state is a NamedTuple with an ``eigenbasis`` field
holding it: that field is the protocol by which :func:`soap_optax.diagnostics`
and :func:`soap_optax.state_shardings` find eigenbasis states.
"""

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from soap_optax import _dimension_numbers
from soap_optax import _kronecker
from soap_optax import _mesh
from soap_optax import _stacks
from soap_optax import _staleness


class EigenbasisState(NamedTuple):
  """The engine's state for a whole parameter tree, kept stacked.

  Attributes:
    count: int32 scalar, the number of gradients absorbed into the statistics
      (0 until the first ``update``).
    plan: the static :class:`EigenbasisPlan`.
    stats: ``GG_i`` of every stack's factored axes, each ``(U, d_i, d_i)``
      (stacks in plan order, axes in increasing order).
    bases: ``Q_i``, shaped like ``stats``.
    skipped: int32 scalar, the number of unit updates skipped because the
      unit's gradient was not finite or its squared norm overflowed the
      statistics' dtype (the unit's state was left unchanged and its update
      was zero).
    failed_refreshes: int32 scalar, the number of factor refreshes whose
      result was not finite (the factor kept its old basis). A count that
      keeps growing means a basis that has gone stale.
    quotients: ``diag(Q_i^T GG_i Q_i)``, ``(U, d_i)``, shaped and ordered
      like the factors' diagonals: kept exact every call from the rotated
      gradient (see :func:`soap_optax._staleness.staleness`), reset by every
      refresh.
    age: per stack, ``(U,)`` int32: calls since each unit's last refresh
      (0 on the call that refreshed it).
    refreshes: per stack, ``(U,)`` int32: how many times each unit's bases
      were refreshed (the first call included).
  """

  count: jax.Array
  plan: _stacks.EigenbasisPlan
  stats: tuple[jax.Array, ...]
  bases: tuple[jax.Array, ...]
  skipped: jax.Array
  failed_refreshes: jax.Array
  quotients: tuple[jax.Array, ...] = ()
  age: tuple[jax.Array, ...] = ()
  refreshes: tuple[jax.Array, ...] = ()


def is_eigenbasis_state(x: Any) -> bool:
  """Whether ``x`` is an eigenbasis transform's state: a NamedTuple with an
  ``eigenbasis`` field holding an :class:`EigenbasisState` (the protocol
  :func:`soap_optax.diagnostics` and :func:`soap_optax.state_shardings` use)."""
  return isinstance(getattr(x, 'eigenbasis', None), EigenbasisState)


def init_eigenbasis(
    params: Any,
    *,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    one_sided: bool = False,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    bucket_padding: float | None = None,
    staggered_refresh_frequency: int | None = None,
    mesh: Any = None,
    shard_axes: Any = None,
) -> EigenbasisState:
  """Zero statistics and identity bases for every stack of a tree.

  With ``staggered_refresh_frequency``, each unit is also given a refresh
  phase (:func:`assign_refresh_phases`). With ``mesh``, every stack is
  divided over ``shard_axes`` (:func:`shard_plan`) and placed there.

  ``max_precond_dim`` (and ``block_size``) decide array shapes, so they must be
  concrete here. They are tracers only when :func:`optax.inject_hyperparams`
  injected them and ``init`` runs under ``jit``; the error then says how to
  keep them static.
  """
  for name, value in (('max_precond_dim', max_precond_dim),
                      ('block_size', block_size),
                      ('bucket_padding', bucket_padding),
                      ('precondition_frequency', staggered_refresh_frequency)):
    if isinstance(value, jax.core.Tracer):
      raise ValueError(
          f'{name} decides the shapes of the optimizer state and must be a '
          'concrete number at init, but it is traced here (optax.'
          'inject_hyperparams under jit). Pass static_args=("max_precond_dim",'
          ' "precondition_frequency", "block_size", "bucket_padding") to '
          'optax.inject_hyperparams.')
  plan = _stacks.plan_units(
      jax.tree.leaves(params), dimension_numbers, params,
      None if block_size is None else int(block_size),
      unit_layout=lambda shape: _kronecker.plan_layout(
          shape, max_precond_dim=int(max_precond_dim), merge_dims=merge_dims,
          precondition_1d=precondition_1d, one_sided=one_sided),
      bucket_padding=None if bucket_padding is None else float(
          bucket_padding))
  plan = dataclasses.replace(
      plan, leaf_paths=_dimension_numbers.leaf_paths(params))
  plan = _stacks.shard_plan(plan, mesh, shard_axes)
  if staggered_refresh_frequency is not None:
    frequency = int(staggered_refresh_frequency)
    plan = dataclasses.replace(
        plan, refresh_phases=_stacks.assign_refresh_phases(
            plan.stacks, frequency, plan.sharding),
        refresh_frequency=frequency)
  place = functools.partial(_mesh.place, layout=plan.sharding)
  stats, bases = [], []
  for stack in plan.stacks:
    for n in stack.layout.factor_sizes:
      stats.append(place(jnp.zeros((stack.num_slots, n, n), stack.dtype)))
      bases.append(place(jnp.broadcast_to(
          jnp.eye(n, dtype=stack.dtype), (stack.num_slots, n, n))))
  def per_unit():  # distinct buffers: a state may be donated.
    return tuple(place(jnp.zeros((stack.num_slots,), jnp.int32))
                 for stack in plan.stacks)
  return EigenbasisState(
      count=jnp.zeros([], jnp.int32), plan=plan, stats=tuple(stats),
      bases=tuple(bases), skipped=jnp.zeros([], jnp.int32),
      failed_refreshes=jnp.zeros([], jnp.int32),
      quotients=tuple(place(jnp.zeros(s.shape[:2], s.dtype)) for s in stats),
      age=per_unit(), refreshes=per_unit())


def check_updates(updates: Any, plan: _stacks.EigenbasisPlan) -> None:
  """Raises a ValueError when a gradient tree does not match the initialized
  one: another number of leaves, a leaf at another key path (renamed keys, a
  list for a dict), or another shape."""
  leaves = jax.tree.leaves(updates)
  if len(leaves) != len(plan.placements):
    raise ValueError(
        f'updates have {len(leaves)} leaves but the optimizer state was '
        f'initialized for {len(plan.placements)} parameters.')
  for i, (where, x, placement) in enumerate(
      zip(_dimension_numbers.leaf_paths(updates), leaves, plan.placements)):
    if plan.leaf_paths is not None and where != plan.leaf_paths[i]:
      raise ValueError(
          f'updates do not have the structure of the parameters the optimizer '
          f'state was initialized with: leaf {i} is at {where or "the root"} '
          f'but the state expects {plan.leaf_paths[i] or "the root"}.')
    if tuple(jnp.shape(x)) != placement.shape:
      raise ValueError(
          f'the update at {where or "the root"} has shape '
          f'{tuple(jnp.shape(x))} but the optimizer state was initialized for '
          f'shape {placement.shape}.')


def unpack(state: EigenbasisState) -> list[_kronecker.KroneckerFactors]:
  """The per-stack factors (arrays with a leading unit axis)."""
  plan = state.plan
  return [
      _kronecker.KroneckerFactors(
          stack.layout, stats, bases,
          None if extent is None else jnp.asarray(extent))
      for stack, stats, bases, extent in zip(
          plan.stacks, plan.split(state.stats), plan.split(state.bases),
          map(plan.unit_extents, range(len(plan.stacks))))
  ]


def pack(state: EigenbasisState,
         factors: Sequence[_kronecker.KroneckerFactors], *,
         skipped: jax.Array, failed_refreshes: jax.Array,
         quotients: Sequence[tuple[jax.Array, ...]],
         refreshed: Sequence[jax.Array]) -> EigenbasisState:
  """Inverse of :func:`unpack`: ``state`` one call later.

  ``count`` is incremented; ``skipped`` and ``failed_refreshes`` are this
  call's numbers, added to the state's. ``quotients`` are the new
  ``diag(Q^T GG Q)`` per stack and factored axis; ``refreshed`` per stack a
  ``(U,)`` mask of the units refreshed this call (their age goes to 0, their
  refresh count up by one; every other unit ages by one call).
  """
  return EigenbasisState(
      count=optax.safe_increment(state.count), plan=state.plan,
      stats=tuple(s for f in factors for s in f.stats),
      bases=tuple(q for f in factors for q in f.bases),
      skipped=state.skipped + skipped,
      failed_refreshes=state.failed_refreshes + failed_refreshes,
      quotients=tuple(q for per_stack in quotients for q in per_stack),
      age=tuple(jnp.where(mask, 0, optax.safe_increment(age))
                for mask, age in zip(refreshed, state.age)),
      refreshes=tuple(n + mask.astype(n.dtype)
                      for mask, n in zip(refreshed, state.refreshes)))


def staleness_per_factor(eigenbasis: EigenbasisState
                         ) -> list[tuple[jax.Array, ...]]:
  """Per stack and factored axis, ``(U,)``: each unit's staleness
  (:func:`soap_optax._staleness.staleness`)."""
  plan = eigenbasis.plan
  return [tuple(jax.vmap(_staleness.staleness)(stat, q)
                for stat, q in zip(stats, quotients))
          for stats, quotients in zip(plan.split(eigenbasis.stats),
                                      plan.split(eigenbasis.quotients))]


def staleness_per_stack(eigenbasis: EigenbasisState) -> list[jax.Array]:
  """Per stack, ``(U,)``: the largest staleness over each unit's factors
  (0 for units without a factor)."""
  return [functools.reduce(jnp.maximum, per_factor) if per_factor
          else jnp.zeros((stack.num_slots,), stack.dtype)
          for stack, per_factor in zip(eigenbasis.plan.stacks,
                                       staleness_per_factor(eigenbasis))]
