"""Checkpoints of earlier versions, converted to today's state trees.

Two fields were dropped when the skeleton took over the tracked quotients
``diag(Q_k^T GG_k Q_k)`` (kept once, in ``eigenbasis.quotients``):

* ``ScaleByShampooEigenbasisState.rayleigh_quotients``: on a factored axis
  the same numbers as ``eigenbasis.quotients``; on an axis without a factor
  the running diagonal, ``diagonals``;
* ``ScaleByAdafactorInEigenbasisState.axis_stats`` on the factored axes
  (again ``eigenbasis.quotients``): it now holds the axes without a factor.

:func:`upgrade_state` reads a state as Orbax restores it without a target
and returns it in the structure of today's state.
"""

from typing import Any

import jax.numpy as jnp

from soap_optax import _state


def _is_namedtuple(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(x, '_fields')


def _field(saved: Any, name: str, where: str) -> Any:
  if isinstance(saved, dict):
    if name not in saved:
      raise ValueError(f'{where}: the saved state has no field {name!r} '
                       f'(it has {sorted(saved)}): a state of another '
                       f'optimizer?')
    return saved[name]
  if _is_namedtuple(saved) and name in saved._fields:
    return getattr(saved, name)
  raise ValueError(f'{where}: the saved state has no field {name!r} (it is a '
                   f'{type(saved).__name__}): a state of another optimizer?')


def _per_axis_of_factored_units(saved: list, like: tuple, plan: Any,
                                where: str) -> list:
  """A per-axis field saved for every axis of every stack, kept for the axes
  without a factor only (Adafactor's ``axis_stats``)."""
  every = sum(len(stack.layout.merged_shape) for stack in plan.stacks)
  if len(saved) == len(like):
    return saved
  if len(saved) != every:
    raise ValueError(f'{where}: {len(saved)} saved arrays, expected '
                     f'{len(like)} (or {every}, one per axis, as saved by '
                     f'soap_optax 0.1.0)')
  kept, start = [], 0
  for stack in plan.stacks:
    axes = len(stack.layout.merged_shape)
    kept.extend(stack.layout.unfactored(saved[start:start + axes]))
    start += axes
  return kept


def _convert(saved: Any, like: Any, where: str, plan: Any = None) -> Any:
  if _state.is_eigenbasis_state(like):
    eigenbasis = like.eigenbasis
    fields = {'eigenbasis': eigenbasis._replace(**{
        name: _convert(_field(_field(saved, 'eigenbasis', where), name,
                              where), getattr(eigenbasis, name),
                       f'{where}.eigenbasis.{name}')
        for name in eigenbasis._fields if name != 'plan'})}
    for name in like._fields:
      if name == 'eigenbasis':
        continue
      value = _field(saved, name, where) if getattr(like, name) != () else ()
      fields[name] = _convert(value, getattr(like, name), f'{where}.{name}',
                              plan=eigenbasis.plan)
    return type(like)(**fields)
  if _is_namedtuple(like):
    if not like._fields or saved is None:
      if like._fields or not (saved is None or (
        isinstance(saved, (dict, list, tuple)) and not saved)):
        raise ValueError(f'{where}: saved {saved!r} for {type(like).__name__}')
      return like
    return type(like)(**{
        name: _convert(_field(saved, name, where), getattr(like, name),
                       f'{where}.{name}') for name in like._fields})
  if isinstance(like, (tuple, list)):
    saved = list(saved) if saved is not None else []
    if plan is not None and len(saved) != len(like):
      saved = _per_axis_of_factored_units(saved, like, plan, where)
    if len(saved) != len(like):
      raise ValueError(f'{where}: {len(saved)} saved entries, expected '
                       f'{len(like)}')
    return type(like)(_convert(s, l, f'{where}[{i}]')
                      for i, (s, l) in enumerate(zip(saved, like)))
  if isinstance(like, dict):
    return {key: _convert(_field(saved, key, where), value,
                          f'{where}[{key!r}]') for key, value in like.items()}
  if like is None:
    return None
  shape, dtype = jnp.shape(like), jnp.result_type(like)
  if jnp.shape(saved) != shape:
    raise ValueError(f'{where}: saved shape {jnp.shape(saved)}, expected '
                     f'{shape}')
  return jnp.asarray(saved, dtype)


def upgrade_state(saved: Any, like: Any) -> Any:
  """An optimizer state saved by an earlier soap_optax, in today's structure.

  Args:
    saved: the state as Orbax restores it without a target (named tuples as
      dicts of their fields, tuples as lists; an empty named tuple as
      ``None``), or a state of today's structure.
    like: today's state of the same optimizer and parameters, e.g.
      ``jax.eval_shape(tx.init, params)`` (its static plan is used).

  Returns:
    The state, with ``like``'s tree structure and dtypes: the fields this
    version no longer has (0.1.0's Shampoo ``rayleigh_quotients``, and
    Adafactor's ``axis_stats`` on its factored axes) left out, every other
    array as saved.

  Raises:
    ValueError: naming the field, where the saved state does not fit
      ``like`` (another optimizer, other parameters or options).

  The arrays come back as plain (unplaced) arrays. For a transform built
  with a ``mesh``, a checkpoint saved through
  :func:`soap_optax.portable_state` is converted against
  ``portable_state(jax.eval_shape(tx.init, params))`` and then placed with
  :func:`soap_optax.reshard_state`.

  Example::

    with orbax.checkpoint.StandardCheckpointer() as checkpointer:
      saved = checkpointer.restore(path)  # no target: the saved tree
    opt_state = soap_optax.upgrade_state(saved, jax.eval_shape(tx.init, params))

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.soap(3e-3)
    >>> params = {'w': jnp.ones((3, 4))}
    >>> saved = tx.init(params)  # e.g. restored from a checkpoint
    >>> state = soap_optax.upgrade_state(saved, jax.eval_shape(tx.init, params))
    >>> print(jax.tree.structure(state) == jax.tree.structure(saved))
    True
  """
  return _convert(saved, like, 'state')
