"""Shardings of an optimizer state, for ``jit``'s ``out_shardings`` and Orbax.

The eigenbasis transforms keep their state stacked (see
:mod:`soap_optax._stacks`); given a mesh, every stack's leading axis is
divided over the mesh, and the plan in the state says how. The rest of a
chained optimizer's state is optax's own: moments shaped like the parameters
(``optax.scale_by_adam``'s, ``MultiSteps``' accumulated gradients, the
shampoo alias's graft and momentum), counters and injected hyperparameters.
"""

from typing import Any

import jax
import numpy as np

from soap_optax import _dimension_numbers
from soap_optax import _state


def _is_stacked_state(x: Any) -> bool:
  """An eigenbasis transform's state (the protocol of
  :mod:`soap_optax._state`: an ``eigenbasis`` field holding an
  :class:`EigenbasisState`), whose arrays are all stacked or scalars."""
  return _state.is_eigenbasis_state(x)


def _names(path: Any) -> tuple[Any, ...]:
  """A key path as plain names, without the ``.value`` of Flax boxes."""
  return _dimension_numbers.key_path(tuple(
      k for k in path if not (
          isinstance(k, jax.tree_util.GetAttrKey) and k.name == 'value')))


def state_shardings(tx: Any, params: Any) -> Any:
  """The ``NamedSharding`` of every array of ``tx.init(params)``'s state.

  The result has the tree structure of ``jax.eval_shape(tx.init, params)``
  and serves as ``out_shardings`` of a jitted ``init`` and of the train step,
  and as the sharding of Orbax's restore target. ``tx`` may be any chain of
  this library's transforms with optax's own (``optax.chain``,
  ``inject_hyperparams``, ``MultiSteps``, ``masked``, ``partition``...).

  Rules, per array of the state:

  * inside the state of an eigenbasis transform (any rule of the skeleton)
    built with a ``mesh``: stacked arrays have their leading axis divided over the
    transform's ``shard_axes`` (each device holds its own units), scalars
    are replicated; without a ``mesh`` everything there is replicated;
  * an array whose key path ends with a parameter's key path and that has
    the parameter's shape (Adam's moments, accumulated gradients, the
    graft's second moment) takes the parameter's sharding;
  * anything else (counters, hyperparameters) is replicated.

  Args:
    tx: an ``optax.GradientTransformation`` (or anything with ``init``).
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct``\\ s,
      carrying their shardings (``NamedSharding``; a parameter without one
      is treated as replicated).

  Returns:
    A pytree of ``jax.sharding.NamedSharding``.

  Raises:
    ValueError: if no mesh can be found: the parameters carry no
      ``NamedSharding`` and no transform was given a ``mesh``.
  """
  state = jax.eval_shape(tx.init, params)
  param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  by_path = {}
  mesh = None
  for path, leaf in param_leaves:
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      mesh = mesh or sharding.mesh
    else:
      sharding = None
    by_path[_names(path)] = (tuple(np.shape(leaf)), sharding)
  nodes = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=_is_stacked_state)[0]
  for _, node in nodes:
    if _is_stacked_state(node):
      layout = node.eigenbasis.plan.sharding
      mesh = mesh or (layout.mesh if layout is not None else None)
  if mesh is None:
    raise ValueError(
        'state_shardings needs a mesh: give the parameters NamedShardings '
        '(arrays or jax.ShapeDtypeStruct(..., sharding=...)) or build the '
        'transforms with mesh=.')
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def stacked_shardings(node):
    layout = node.eigenbasis.plan.sharding
    if layout is None:
      return jax.tree.map(lambda _: replicated, node)
    divided = jax.sharding.NamedSharding(layout.mesh, layout.spec)
    return jax.tree.map(
        lambda x: divided if np.ndim(x) else jax.sharding.NamedSharding(
            layout.mesh, jax.sharding.PartitionSpec()), node)

  def like_a_parameter(path, leaf):
    names = _names(path)
    for start in range(len(names) + 1):
      shape_and_sharding = by_path.get(names[start:])
      if shape_and_sharding is not None:
        shape, sharding = shape_and_sharding
        if shape == tuple(np.shape(leaf)) and sharding is not None:
          return sharding
        break
    return replicated

  shardings = []
  for path, node in nodes:
    if _is_stacked_state(node):
      shardings.append(stacked_shardings(node))
    else:
      shardings.append(like_a_parameter(path, node))
  treedef = jax.tree.structure(state, is_leaf=_is_stacked_state)
  return jax.tree.unflatten(treedef, shardings)

