"""Shardings of an optimizer state, for ``jit``'s ``out_shardings`` and Orbax.

The eigenbasis transforms keep their state stacked (see
:mod:`soap_optax._stacks`); given a mesh, every stack's leading axis is
divided over the mesh, and the plan in the state says how. The rest of a
chained optimizer's state is optax's own: moments shaped like the parameters
(:func:`optax.scale_by_adam`'s, ``MultiSteps``' accumulated gradients, the
shampoo alias's graft and momentum), counters and injected hyperparameters.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from soap_optax import _dimension_numbers
from soap_optax import _exchange
from soap_optax import _mesh
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
  this library's transforms with optax's own (:func:`optax.chain`,
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
    tx: an :class:`optax.GradientTransformation` (or anything with ``init``).
    params: the parameters, as arrays or :class:`jax.ShapeDtypeStruct`\\ s,
      carrying their shardings (``NamedSharding``; a parameter without one
      is treated as replicated).

  Returns:
    A pytree of :class:`jax.sharding.NamedSharding`.

  Raises:
    ValueError: if no mesh can be found: the parameters carry no
      ``NamedSharding`` and no transform was given a ``mesh``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> mesh = jax.sharding.Mesh(jax.devices(), ('data',))
    >>> tx = soap_optax.soap(3e-3, mesh=mesh)
    >>> params = {'w': jnp.ones((3, 4))}
    >>> shardings = soap_optax.state_shardings(tx, params)
    >>> print({type(s).__name__ for s in jax.tree.leaves(shardings)})
    {'NamedSharding'}
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
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



def parameter_shardings(tx: Any, params: Any) -> Any:
  """The parameters' layout that ``tx``'s sharded update exchanges without
  a reshard.

  Under ``mesh=``, each parameter's gradient is cut into its units' rows and
  sent to their owners (see ``docs/sharding.md``, "The owner layout and the
  exchange"). The exchange expects each parameter divided over the shard
  axes along one axis: the matrix axis whose shards cut the units into the
  tallest equal parts (then the longest, the first on ties); without one,
  the first batch axis; else replicated. A gradient laid out otherwise is
  first moved to this layout (one reshard of it per step). Lay the
  parameters out with these shardings (:func:`jax.device_put`, or as the
  ``out_shardings`` of their initialization) and the update moves every
  gradient row exactly once.

  Args:
    tx: an optimizer holding an eigenbasis transform built with ``mesh=``
      (the first one found in its state is used) for all of ``params``.
    params: the parameters (arrays or :class:`jax.ShapeDtypeStruct`\\ s).

  Returns:
    A pytree like ``params`` of :class:`jax.sharding.NamedSharding`.

  Raises:
    ValueError: if ``tx`` holds no eigenbasis transform with a mesh for
      every leaf of ``params``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> mesh = jax.sharding.Mesh(jax.devices(), ('data',))
    >>> tx = soap_optax.soap(3e-3, mesh=mesh)
    >>> params = {'w': jnp.ones((8, 4))}
    >>> shardings = soap_optax.parameter_shardings(tx, params)
    >>> print(type(shardings['w']).__name__, shardings['w'].mesh.axis_names)
    NamedSharding ('data',)
    >>> params = jax.device_put(params, shardings)
  """
  state = jax.eval_shape(tx.init, params)
  leaves, treedef = jax.tree.flatten(params)
  for node in jax.tree.leaves(state, is_leaf=_is_stacked_state):
    if not _is_stacked_state(node):
      continue
    plan = node.eigenbasis.plan
    if plan.sharding is not None and len(plan.placements) == len(leaves):
      layout = plan.sharding
      return treedef.unflatten([
          jax.sharding.NamedSharding(layout.mesh, spec)
          for spec in _exchange.leaf_specs(plan)])
  raise ValueError(
      'parameter_shardings needs an eigenbasis transform built with mesh= '
      'for every parameter in tx (soap_optax.soap(..., mesh=mesh), ...).')


# ------------------------------------------------------------------------------
# Moving a state between layouts.

_EIGENBASIS_FIELDS = ('stats', 'bases', 'quotients', 'age', 'refreshes')


def _stack_of_arrays(node: Any) -> dict[str, tuple[int, ...]]:
  """For every array field of an eigenbasis transform's state, the stack
  each of its arrays belongs to."""
  plan = node.eigenbasis.plan
  per_factor = tuple(s for s, stack in enumerate(plan.stacks)
                     for _ in stack.layout.factored_axes)
  per_stack = tuple(range(len(plan.stacks)))
  return dict(plan.field_stacks, stats=per_factor, bases=per_factor,
              quotients=per_factor, age=per_stack, refreshes=per_stack)


def _map_stacked(fn, node: Any, *others: Any, plan: Any) -> Any:
  """``node`` with ``fn(s, x, *others' x)`` in place of every stacked array
  ``x`` (of stack ``s``; scalars are kept) and ``plan`` as its plan."""
  stacks = _stack_of_arrays(node)

  def field(objects, name):
    values = [getattr(o, name) for o in objects]
    single = not isinstance(values[0], tuple)
    values = [(v,) if single else v for v in values]
    out = tuple(fn(s, *xs) if np.ndim(xs[0]) else xs[0]
                for s, *xs in zip(stacks[name], *values))
    return out[0] if single else out

  eigenbases = [o.eigenbasis for o in (node,) + others]
  eigenbasis = node.eigenbasis._replace(plan=plan, **{
      name: field(eigenbases, name) for name in _EIGENBASIS_FIELDS})
  return node._replace(eigenbasis=eigenbasis, **{
      name: field((node,) + others, name)
      for name in node._fields if name != 'eigenbasis'})


def _nodes(state: Any):
  return jax.tree_util.tree_flatten_with_path(
      state, is_leaf=_is_stacked_state)


def portable_state(state: Any) -> Any:
  """``state`` in a layout that does not depend on the device count.

  A transform built with ``mesh=`` keeps every unit in its owner's slot and
  pads every stack to the same number of slots per shard (see
  :doc:`/sharding`). This returns the same state with the units
  back in unit order and the padding cut off: every stacked array has one
  entry per unit, exactly as the transform would hold it without a mesh.
  Save this form, and a checkpoint restores on any number of devices (see
  :func:`reshard_state`). ``state`` may hold arrays or
  :class:`jax.ShapeDtypeStruct`\\ s (to build Orbax's restore target); anything
  outside the eigenbasis transforms' states is returned as it is.

  Example::

    checkpointer.save(path, soap_optax.portable_state(opt_state))
    ...  # later, on another number of devices
    target = soap_optax.portable_state(jax.eval_shape(tx.init, params))
    restored = checkpointer.restore(path, target)
    opt_state = soap_optax.reshard_state(restored, tx, params)

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> mesh = jax.sharding.Mesh(jax.devices(), ('data',))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = soap_optax.soap(3e-3, mesh=mesh).init(params)
    >>> portable = soap_optax.portable_state(state)
    >>> # Laid out as without a mesh, whatever the number of devices:
    >>> unsharded = soap_optax.soap(3e-3).init(params)
    >>> shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]
    >>> print(shapes(portable) == shapes(unsharded))
    True
  """
  def cut(node):
    if not _is_stacked_state(node) or node.eigenbasis.plan.sharding is None:
      return node
    plan = node.eigenbasis.plan
    def unpadded(s, x):
      size = plan.stacks[s].size
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((size,) + x.shape[1:], x.dtype)
      slots = jnp.asarray(plan.sharding.unit_slots(s))
      sharding = getattr(x, 'sharding', None)
      if isinstance(sharding, jax.sharding.NamedSharding):
        # The unit axis is divided over the mesh, the units sit in their
        # owners' slots: the cut stack is replicated along it (on Explicit
        # axes an index must say so), its other axes stay divided.
        spec = tuple(sharding.spec)[1:]
        return x.at[slots].get(out_sharding=jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(None, *spec)))
      return x[slots]
    return _map_stacked(unpadded, node, plan=plan.unsharded())
  return jax.tree.map(cut, state, is_leaf=_is_stacked_state)


def _units_text(stack: Any) -> str:
  return (f'{stack.size} unit(s) of shape {stack.unit_shape} '
          f'({stack.dtype}, factors {stack.layout.factor_sizes})')


def _check_same_units(source: Any, target: Any, where: str) -> None:
  """The two plans cut the parameters into the same units (whatever their
  meshes); a ValueError naming the first difference otherwise."""
  hint = ('the state was made by an optimizer with other block_size, '
          'bucket_padding, dimension_numbers, max_precond_dim, merge_dims, '
          'precondition_1d or one_sided, or for other parameters')
  if len(source.stacks) != len(target.stacks):
    raise ValueError(
        f'reshard_state: at {where} the state has {len(source.stacks)} '
        f'stacks of units and the optimizer {len(target.stacks)}: {hint}.')
  for s, (a, b) in enumerate(zip(source.stacks, target.stacks)):
    if (a.unit_shape, a.dtype, a.size, a.layout) != (
        b.unit_shape, b.dtype, b.size, b.layout):
      raise ValueError(
          f'reshard_state: at {where}, stack {s} holds {_units_text(a)} in '
          f'the state and {_units_text(b)} in the optimizer: {hint}.')
  if source.placements != target.placements:
    raise ValueError(
        f'reshard_state: at {where} the state places the parameters\' units '
        f'otherwise than the optimizer: {hint}.')


def reshard_state(state: Any, tx: Any, params: Any) -> Any:
  """``state``, from any mesh or device count, laid out for ``tx``.

  ``state`` is an optimizer state of the same optimizer (the same chain, the
  same units: ``block_size``, ``dimension_numbers``... may not differ) made
  on another mesh, another number of devices or none: a live state, or one
  restored from a checkpoint of :func:`portable_state`. Every stack keeps
  its units; the padding slots that ``tx``'s mesh needs are filled as
  ``tx.init`` fills them, and every array is placed as
  :func:`state_shardings` says (on one device when ``tx`` has no mesh and
  ``params`` no shardings). The optimizer then continues exactly as it
  would have on the state's own layout.

  Args:
    state: the state to move.
    tx: the optimizer to move it to.
    params: the parameters (arrays or :class:`jax.ShapeDtypeStruct`\\ s with
      their shardings), as for :func:`state_shardings`.

  Returns:
    The state in ``tx``'s layout.

  Raises:
    ValueError: if ``state`` does not belong to ``tx`` and ``params``: the
      message names the first difference (tree structure, a stack's units,
      an array's shape).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = soap_optax.soap(3e-3).init(params)  # made without a mesh
    >>> mesh = jax.sharding.Mesh(jax.devices(), ('data',))
    >>> tx = soap_optax.soap(3e-3, mesh=mesh)
    >>> moved = soap_optax.reshard_state(state, tx, params)
    >>> print(jax.tree.structure(moved) == jax.tree.structure(tx.init(params)))
    True
  """
  target = jax.eval_shape(tx.init, params)
  # Units in unit order, whatever layout the state was made on.
  state = portable_state(state)
  source_nodes, _ = _nodes(state)
  target_nodes, _ = _nodes(target)
  source_paths = [jax.tree_util.keystr(p) for p, _ in source_nodes]
  target_paths = [jax.tree_util.keystr(p) for p, _ in target_nodes]
  if source_paths != target_paths:
    raise ValueError(
        'reshard_state: the state does not have the structure of '
        f'tx.init(params): its entries are {source_paths}, the optimizer\'s '
        f'{target_paths}.')
  for (path, a), (_, b) in zip(source_nodes, target_nodes):
    where = jax.tree_util.keystr(path) or 'the root'
    if _is_stacked_state(b):
      if not _is_stacked_state(a):
        raise ValueError(f'reshard_state: at {where} the state has no '
                         'eigenbasis state where the optimizer has one.')
      _check_same_units(a.eigenbasis.plan, b.eigenbasis.plan, where)
      def same_unit_shape(s, x, y, where=where):
        if tuple(np.shape(x)[1:]) != tuple(y.shape[1:]):
          raise ValueError(
              f'reshard_state: at {where}, an array of stack {s} has units '
              f'of shape {np.shape(x)[1:]} where the optimizer\'s have '
              f'{tuple(y.shape[1:])}.')
        return y
      _map_stacked(same_unit_shape, a, b, plan=b.eigenbasis.plan)
    elif np.shape(a) != tuple(b.shape):
      raise ValueError(
          f'reshard_state: at {where} the state holds an array of shape '
          f'{np.shape(a)} where the optimizer holds {tuple(b.shape)}.')
  try:
    shardings = state_shardings(tx, params)
  except ValueError:  # no mesh anywhere: one device
    shardings = None
  devices = (set(jax.tree.leaves(shardings)[0].device_set)
             if shardings is not None and jax.tree.leaves(shardings) else
             {jax.devices()[0]})
  def to_target_devices(x):
    # Arrays on other devices (a live state from another mesh) go through
    # the host; those already on the target's devices stay where they are.
    if isinstance(x, jax.Array) and set(x.sharding.device_set) != devices:
      return np.asarray(x)
    return x
  state = jax.tree.map(to_target_devices, state)

  def merge(state, params):
    fresh = tx.init(params)
    def node(a, b):
      if not _is_stacked_state(b):
        return jnp.asarray(a, b.dtype)
      plan = b.eigenbasis.plan
      def fill(s, x, y):
        size = plan.stacks[s].size
        x = jnp.asarray(x, y.dtype)[:size]
        if plan.sharding is None:
          return x
        # Each unit into its owner's slot; padding slots as init fills them.
        return y.at[jnp.asarray(plan.sharding.unit_slots(s))].set(x)
      return _map_stacked(fill, a, b, plan=plan)
    fresh_nodes, treedef = jax.tree.flatten(fresh, is_leaf=_is_stacked_state)
    return treedef.unflatten([
        node(a, b) for a, b in zip(
            jax.tree.leaves(state, is_leaf=_is_stacked_state), fresh_nodes)])

  mesh = _mesh._explicit_mesh((state, params))  # pylint: disable=protected-access
  if mesh is not None:
    # On an Explicit mesh every array's sharding is part of its type; the
    # merge's slices and concatenations are written for GSPMD's propagation,
    # as the update is (see soap_optax._mesh.on_any_mesh).
    specs = jax.tree.map(lambda s: s.spec, shardings)
    explicit_merge = merge
    def merge(state, params):  # pylint: disable=function-redefined
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.sharding.auto_axes(explicit_merge, out_sharding=specs)(
            state, params)
  return jax.jit(merge, out_shardings=shardings)(state, params)
