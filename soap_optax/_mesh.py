"""Everything :mod:`jax.sharding`: the stacks' layout over a mesh, placement,
Explicit meshes, and the refresh divided over the devices.

With ``mesh=``, every stack of same-shape units (see :mod:`soap_optax._stacks`)
has its leading (unit) axis divided over the mesh's ``shard_axes``: each device
holds the state of the units it owns (see :mod:`soap_optax._exchange`), does
their per-unit work and their refresh. Every shard has the same number of
slots of a stack; a padding slot holds zeros and identity bases, gets a zero
gradient and is never refreshed.
"""

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_mesh(mesh: Any, shard_axes: Any) -> None:
  """``mesh`` is None or a :class:`jax.sharding.Mesh`; ``shard_axes`` names its
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
  resolve_shard_axes(mesh, shard_axes)


def resolve_shard_axes(mesh: Any, shard_axes: Any) -> tuple[str, ...]:
  """The mesh axes the stacks are divided over (validated).

  Args:
    mesh: a :class:`jax.sharding.Mesh`.
    shard_axes: a mesh axis name, a tuple of them, or ``None`` for all of the
      mesh's axes.

  Returns:
    A tuple of axis names.
  """
  names = tuple(mesh.axis_names)
  if shard_axes is None:
    return names
  axes = (shard_axes,) if isinstance(shard_axes, str) else shard_axes
  try:
    axes = tuple(axes)
  except TypeError:
    axes = None
  if (not axes or not all(isinstance(a, str) for a in axes)
      or len(set(axes)) != len(axes) or not set(axes) <= set(names)):
    raise ValueError(
        f'shard_axes must be None, one of the mesh axes {names} or a tuple '
        f'of distinct ones, got {shard_axes!r}.')
  return axes


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ShardedLayout:
  """How the stacks are divided over a mesh (static).

  Every unit has one owner among the ``N`` shards (the devices along
  ``axes``). Stack ``s`` has ``k_s`` slots on each shard, ``N k_s`` in all,
  sharded evenly along its leading axis: slot ``q k_s + j`` holds the
  ``j``-th unit that shard ``q`` owns. Slots without a unit (padding) hold
  zeros and identity bases; their gradient is zero, so are their updates,
  and the refresh skips them.

  Attributes:
    mesh: the :class:`jax.sharding.Mesh`.
    axes: the mesh axes the leading axis is sharded over.
    units_per_shard: per stack, the number of units each shard owns.
    unit_slots_: per stack, the slot of each unit, in unit order (see
      :func:`soap_optax._exchange.assign`).
    geometries: per parameter, how it is divided over the shards (see
      :mod:`soap_optax._exchange`).
  """

  mesh: Any
  axes: tuple[str, ...]
  units_per_shard: tuple[tuple[int, ...], ...]
  unit_slots_: tuple[tuple[int, ...], ...]
  geometries: tuple[Any, ...]

  @property
  def num_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.axes)

  @property
  def spec(self) -> jax.sharding.PartitionSpec:
    """The partition spec of a stacked array (leading axis divided)."""
    return jax.sharding.PartitionSpec(self.axes)

  def slots_per_shard(self, s: int) -> int:
    return max(self.units_per_shard[s], default=0)

  def unit_slots(self, s: int) -> np.ndarray:
    """The slot of each unit of stack ``s``, in unit order."""
    return np.asarray(self.unit_slots_[s], np.int64)

  def shard_of_units(self, s: int) -> np.ndarray:
    """The shard that owns each unit of stack ``s``, in unit order."""
    return self.unit_slots(s) // max(self.slots_per_shard(s), 1)

  def slot_mask(self, s: int, units: Any) -> np.ndarray:
    """A boolean mask over stack ``s``'s slots, true at ``units``' slots."""
    mask = np.zeros((self.num_shards * self.slots_per_shard(s),), bool)
    mask[self.unit_slots(s)[np.asarray(list(units), int)]] = True
    return mask


def constrain(x: jax.Array, mesh: Any,
              spec: jax.sharding.PartitionSpec) -> jax.Array:
  """``x`` laid out as ``spec`` on ``mesh``.

  Outside ``jit`` this is a ``device_put``. Under ``jit`` it is a sharding
  constraint: against the context mesh where one is set (inside
  :func:`on_any_mesh`'s ``auto_axes`` region, whose axes are Auto), else
  against ``mesh``.
  """
  if not isinstance(x, jax.core.Tracer):
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  context = jax.sharding.get_abstract_mesh()
  if context.empty:
    types, target = mesh.axis_types, jax.sharding.NamedSharding(mesh, spec)
    names = mesh.axis_names
  else:
    types, target, names = context.axis_types, spec, context.axis_names
  used = {a for entry in spec if entry is not None
          for a in ((entry,) if isinstance(entry, str) else entry)}
  if any(t == jax.sharding.AxisType.Explicit
         for name, t in zip(names, types) if name in used):
    return jax.sharding.reshard(x, target)
  return jax.lax.with_sharding_constraint(x, target)



def context_mesh(mesh: Any) -> Any:
  """The mesh to give :func:`jax.shard_map`: the context's, where one is set."""
  abstract = jax.sharding.get_abstract_mesh()
  return mesh if abstract.empty else abstract

def place(x: jax.Array, layout: 'ShardedLayout | None') -> jax.Array:
  """A stacked array constrained to its sharding (leading axis divided);
  ``x`` itself without a layout. Works eagerly and under ``jit``, on Auto
  and Explicit meshes (see :func:`constrain`)."""
  if layout is None:
    return x
  return constrain(x, layout.mesh, layout.spec)


def place_state(tree: Any, layout: 'ShardedLayout | None') -> Any:
  """Every stacked (non-scalar) array of a transform's state :func:`place`-d."""
  if layout is None:
    return tree
  return jax.tree.map(lambda x: place(x, layout) if jnp.ndim(x) else x, tree)


def _explicit_mesh(tree: Any) -> Any:
  """The mesh of the first leaf whose type is sharded over Explicit axes."""
  for leaf in jax.tree.leaves(tree):
    mesh = jax.typeof(leaf).sharding.mesh
    if not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      return mesh
  return None


def on_any_mesh(update_fn: Callable[..., Any],
                layout_of: Callable[[Any], 'ShardedLayout | None']):
  """``update_fn`` made to work on Explicit meshes as on Auto ones.

  With Explicit axes (:func:`jax.make_mesh`'s default), every array's sharding
  is part of its type and each operation must say how its result is sharded.
  The engine's arithmetic is written for GSPMD's propagation instead, so on
  an Explicit mesh the update runs inside :func:`jax.sharding.auto_axes`: the
  gradients enter as they are, and the updates leave sharded like them, the
  state as ``layout_of(state)`` says (stacks divided over the shard axes,
  scalars replicated).
  """
  def on_auto_axes(updates, state):
    mesh = _explicit_mesh((updates, state))
    layout = layout_of(state)
    stacked = (layout.spec if layout is not None
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


def divided_map(
    fn: Callable[..., Any], layout: 'ShardedLayout',
    arg_lists: Sequence[Sequence[jax.Array]],
    local: Callable[..., Any],
) -> tuple[Any, jax.Array]:
  """``local(fn, *arg_lists)`` run as one :func:`jax.shard_map` over the layout's
  shard axes: each device sees only its own slots of every stacked argument
  (their leading axes are divided), so no operand of ``fn`` is partitioned.

  ``local`` returns ``(results, count)``: per stack ``fn``'s stacked outputs,
  and an int32 scalar that is summed over the devices (the only collective).
  """
  spec = layout.spec
  def body(*lists):
    results, count = local(fn, *lists)
    return results, jax.lax.psum(count, layout.axes)
  return jax.shard_map(
      body, mesh=context_mesh(layout.mesh),
      in_specs=tuple([spec] * len(args) for args in arg_lists),
      out_specs=(spec, jax.sharding.PartitionSpec()),
  )(*[list(args) for args in arg_lists])
