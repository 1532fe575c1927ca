"""Inspecting optimizer states."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from soap_optax import _state


def state_size(state: Any) -> int:
  """Number of array elements in an optimizer state, scalars (counters,
  injected hyperparameters) excluded.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {'w': jnp.ones((3, 4))}
    >>> soap_optax.state_size(optax.adamw(1e-3).init(params))  # m and v
    24
    >>> # m and v (24), factors and bases (50), their diagonals (7), counters:
    >>> soap_optax.state_size(soap_optax.soap().init(params))
    83
  """
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)
             if np.ndim(x) > 0)


def state_nbytes(state: Any) -> int:
  """Bytes held by an optimizer state's arrays, scalars included.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {'w': jnp.ones((3, 4))}
    >>> soap_optax.state_nbytes(optax.adamw(1e-3).init(params))  # with count
    100
    >>> soap_optax.state_nbytes(soap_optax.soap().init(params))
    348
  """
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(state))


def state_nbytes_per_device(state: Any) -> dict[Any, int]:
  """Bytes of an optimizer state's arrays held by each device (the
  addressable shards of each array, replicas counted on every device that
  holds one).

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> state = soap_optax.soap().init({'w': jnp.ones((3, 4))})
    >>> per_device = soap_optax.state_nbytes_per_device(state)
    >>> print(sum(per_device.values()) == soap_optax.state_nbytes(state))
    True
  """
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = (
          per_device.get(shard.device, 0) + shard.data.nbytes)
  return per_device


def _eigenbasis_states(state: Any) -> list[tuple[Any, Any]]:
  """Every ``(transform state, EigenbasisState)`` pair in a (chained,
  injected, wrapped) optimizer state, in tree order."""
  found = []
  for node in jax.tree.leaves(state, is_leaf=_state.is_eigenbasis_state):
    if _state.is_eigenbasis_state(node):
      found.append((node, node.eigenbasis))
  return found


def stack_names(state: Any) -> dict[str, tuple[str, ...]]:
  """The names :func:`diagnostics` gives the stacks, each with the key paths
  of the parameters whose units it holds.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> params = {'a': jnp.ones((3, 4)), 'b': jnp.ones((3, 4)),
    ...           'c': jnp.ones((8, 2))}
    >>> state = soap_optax.soap().init(params)
    >>> soap_optax.stack_names(state)
    {'stack0_3x4': ("['a']", "['b']"), 'stack1_8x2': ("['c']",)}
  """
  names = {}
  found = _eigenbasis_states(state)
  for k, (_, eigenbasis) in enumerate(found):
    plan = eigenbasis.plan
    members: dict[int, list[str]] = {}
    for i, placement in enumerate(plan.placements):
      for piece in placement.pieces:
        path = plan.leaf_paths[i] if plan.leaf_paths else str(i)
        if path not in members.setdefault(piece.stack, []):
          members[piece.stack].append(path)
    for s in range(len(plan.stacks)):
      names[_stack_name(plan, s, k, len(found))] = tuple(members.get(s, ()))
  return names


def _stack_name(plan, s: int, which: int, how_many: int) -> str:
  shape = 'x'.join(str(d) for d in plan.stacks[s].layout.merged_shape) or '1'
  prefix = f'tx{which}/' if how_many > 1 else ''
  return f'{prefix}stack{s}_{shape}'


def diagnostics(state: Any) -> dict[str, jax.Array]:
  r"""Scalars that say what the eigenbasis optimizers in ``state`` are doing.

  Works on any state that holds eigenbasis transforms' states (chained,
  injected, inside :class:`flax.nnx.Optimizer`'s ``opt_state``, sharded or not),
  and under ``jit``.
  Per stack of same-shape units (named ``stack{s}_{shape}``, prefixed by
  ``tx{k}/`` when the state holds several such transforms; see
  :func:`stack_names` for the parameters in each), the maximum over the
  stack's units of:

  * ``staleness/{stack}/axis{i}``:
    :math:`\lVert B - \operatorname{diag} B \rVert_F / \lVert B \rVert_F` of
    the factor of merged axis :math:`i`, :math:`B = Q^\top GG\, Q` (0: the
    basis diagonalizes the factor; see :term:`staleness`);
  * ``condition/{stack}/axis{i}``: :math:`\max(\lambda) / \min(\lambda)` of
    that factor's eigenvalue estimates
    :math:`\operatorname{diag}(Q^\top GG\, Q)` (the eigenvalues right after a
    refresh), capped at :math:`1 / \varepsilon_{\mathrm{dtype}}` (the
    dtype's epsilon) where :math:`\min(\lambda)` is not positive or that
    small;
  * ``damping/{stack}/axis{i}``: FOAM's current damping (Shampoo with
    :class:`FoamRefresh` only);
  * ``steps_since_refresh/{stack}``: calls since the last refresh (0: this
    one);
  * ``refreshes/{stack}``: refreshes of the stack's bases so far;

  and over the whole state: ``decompositions`` (factor decompositions done:
  refreshes times factors, summed over units), ``failed_refreshes``
  (decompositions rejected as non-finite), ``skipped_units`` (unit updates
  rejected for non-finite gradients) and ``count``.

  Returns:
    A flat ``dict[str, jax.Array]`` of scalars, ready for a logger.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> params = {'w': jnp.ones((3, 4))}
    >>> tx = soap_optax.soap()
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.full((3, 4), 0.1)}, state, params)
    >>> stats = soap_optax.diagnostics(state)
    >>> for name in sorted(stats):
    ...   print(name)
    condition/stack0_3x4/axis0
    condition/stack0_3x4/axis1
    count
    decompositions
    failed_refreshes
    refreshes/stack0_3x4
    skipped_units
    staleness/stack0_3x4/axis0
    staleness/stack0_3x4/axis1
    steps_since_refresh/stack0_3x4
    >>> print(int(stats['count']), int(stats['refreshes/stack0_3x4']))
    1 1
  """
  out: dict[str, jax.Array] = {}
  found = _eigenbasis_states(state)
  for k, (owner, eigenbasis) in enumerate(found):
    plan = eigenbasis.plan
    prefix = f'tx{k}/' if len(found) > 1 else ''
    stale = _state.staleness_per_factor(eigenbasis)
    damping = getattr(owner, 'damping', ())
    damping = plan.split(damping) if damping else None
    decompositions = jnp.zeros([], jnp.int32)
    for s, stack in enumerate(plan.stacks):
      name = _stack_name(plan, s, k, len(found))
      largest = functools.partial(plan.largest_over_units, s)
      quotients = plan.split(eigenbasis.quotients)[s]
      extents = plan.unit_extents(s)
      for i, axis in enumerate(stack.layout.factored_axes):
        out[f'staleness/{name}/axis{axis}'] = largest(stale[s][i])
        # A size bucket's padded rows (quotient 0) are not the unit's.
        length = (quotients[i].shape[-1] if extents is None
                  else extents[:, axis])
        out[f'condition/{name}/axis{axis}'] = largest(
            _condition(quotients[i], length))
        if damping is not None:
          out[f'damping/{name}/axis{axis}'] = largest(damping[s][i])
      out[f'steps_since_refresh/{name}'] = largest(eigenbasis.age[s])
      out[f'refreshes/{name}'] = largest(eigenbasis.refreshes[s])
      decompositions += len(stack.layout.factored_axes) * jnp.sum(
          jnp.where(plan.real_slots(s), eigenbasis.refreshes[s], 0))
    out[f'{prefix}decompositions'] = decompositions
    out[f'{prefix}failed_refreshes'] = eigenbasis.failed_refreshes
    out[f'{prefix}skipped_units'] = eigenbasis.skipped
    out[f'{prefix}count'] = eigenbasis.count
  return out


def _condition(values: jax.Array, length: Any) -> jax.Array:
  """Per unit of a ``(U, d)`` stack: ``max / min`` of its first ``length``
  eigenvalue estimates (the unit's own rows; ``length`` an int or a static
  ``(U,)`` array), at most ``1 / epsilon``."""
  largest = jnp.max(values, axis=-1, keepdims=True)
  floor = jnp.finfo(values.dtype).eps * largest
  own = np.arange(values.shape[-1])[None, :] < np.reshape(length, (-1, 1))
  smallest = jnp.min(jnp.where(own, values, largest), axis=-1, keepdims=True)
  ratio = (largest / jnp.maximum(smallest, floor))[:, 0]
  largest = largest[:, 0]
  return jnp.where(largest > 0, ratio, 1.0)
