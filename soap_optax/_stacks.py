"""Stacks: the engine's unit of work, built from batch axes, blocks and shapes.

A parameter is cut into *units*, each of which the transforms treat exactly as
if it were a parameter of its own (its own Kronecker factors, bases, moments
and refresh):

1. **batch axes** (:class:`EigenbasisDimensionNumbers`) get no factor: every
   slice along them is a separate unit (the layers of a scanned ``[L, d, 4d]``
   weight, the heads of an ``[L, H, m, n]`` one);
2. the remaining axes are optionally **grouped** into one matrix,
   ``reduction_axes x output_axes`` (an attention kernel ``(d, heads,
   head_dim)`` becomes ``(d, heads * head_dim)``);
3. with ``block_size``, every remaining axis longer than ``block_size`` is
   **cut into blocks** of ``block_size`` (the last one may be shorter), and
   every block of the product of the cuts is a unit (a block-diagonal
   Kronecker preconditioner, as in Distributed Shampoo).

Units of the same shape and state dtype, from every parameter of the tree, form
one **stack**: an array ``(U, *merged_shape)``. The state is kept stacked, so
a step only gathers the gradients into stacks (:func:`gather`) and scatters
the updates back (:func:`scatter`); the per-unit arithmetic runs once per stack
under ``jax.vmap``, and the compiled program grows with the number of distinct
shapes, not with depth.

No padding is needed: an uneven last block is simply a unit of another shape,
and lands in another stack.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from soap_optax import _engine


@dataclasses.dataclass(frozen=True)
class EigenbasisDimensionNumbers:
  """Which axes of a parameter are batch axes, and how to read it as a matrix.

  Like ``optax.contrib.MuonDimensionNumbers``: a batch axis gets no Kronecker
  factor, and each slice along the batch axes is optimized exactly as if it
  were a parameter of its own.

  Attributes:
    batch_axes: axes whose slices are independent (negative values count from
      the end), e.g. ``(0,)`` for the layer axis of a scanned ``[L, d, 4d]``
      weight.
    reduction_axes: optional; with ``output_axes``, the non-batch axes are
      grouped into one ``(prod reduction, prod output)`` matrix before
      factoring (instead of ``merge_dims``). When only one of the two is
      given, the other is every remaining non-batch axis.
    output_axes: optional; see ``reduction_axes``.
  """

  batch_axes: tuple[int, ...] = ()
  reduction_axes: tuple[int, ...] | None = None
  output_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ('batch_axes', 'reduction_axes', 'output_axes'):
      value = getattr(self, name)
      if value is None and name != 'batch_axes':
        continue
      if isinstance(value, (int, np.integer)):
        value = (value,)
      try:
        value = tuple(value)
      except TypeError:
        raise ValueError(
            f'EigenbasisDimensionNumbers.{name} must be a tuple of integers, '
            f'got {value!r}.') from None
      if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                 for a in value):
        raise ValueError(
            f'EigenbasisDimensionNumbers.{name} must be a tuple of integers, '
            f'got {value!r}.')
      object.__setattr__(self, name, tuple(int(a) for a in value))


def _is_dimension_leaf(x: Any) -> bool:
  return x is None or isinstance(x, EigenbasisDimensionNumbers)


def _key_path(path: Sequence[Any]) -> tuple[Any, ...]:
  """A key path with the container types dropped (dict, State, dataclass)."""
  names = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        names.append(getattr(key, attribute))
        break
    else:
      names.append(str(key))
  return tuple(names)


def resolve_dimension_numbers(
    dimension_numbers: Any, params: Any
) -> list[EigenbasisDimensionNumbers | None]:
  """One entry per leaf of ``params``, from a prefix tree (or a callable).

  Entries are matched by key path, so a tree built from ``flax.nnx.State``
  (or from boxed Linen parameters) also serves the pure-array dictionaries
  that ``nnx.Optimizer`` and ``nn.unbox`` give the optimizer.

  Args:
    dimension_numbers: ``None`` (no batch axes anywhere), one
      :class:`EigenbasisDimensionNumbers` for every parameter, a tree whose
      key paths are prefixes of the parameters' with such leaves (or
      ``None``), or a callable of ``params`` returning one of these (like
      optax's masks).
    params: the parameter (or gradient) tree.

  Returns:
    A list in ``jax.tree.leaves(params)`` order.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if dimension_numbers is None:
    return [None] * len(leaves)
  if callable(dimension_numbers) and not isinstance(
      dimension_numbers, EigenbasisDimensionNumbers):
    dimension_numbers = dimension_numbers(params)
  table = {}
  for path, numbers in jax.tree_util.tree_flatten_with_path(
      dimension_numbers, is_leaf=_is_dimension_leaf)[0]:
    if not _is_dimension_leaf(numbers):
      raise ValueError(
          'dimension_numbers must hold EigenbasisDimensionNumbers or None at '
          f'its leaves, got {numbers!r} at {jax.tree_util.keystr(path)}.')
    table[_key_path(path)] = numbers
  resolved = []
  for path, _ in leaves:
    key = _key_path(path)
    prefixes = [key[:k] for k in range(len(key) + 1) if key[:k] in table]
    if not prefixes:
      raise ValueError(
          'dimension_numbers must be a tree prefix of the parameters (or a '
          'callable returning one), but it has no entry for the parameter at '
          f'{jax.tree_util.keystr(path)}.')
    resolved.append(table[prefixes[-1]])
  return resolved


def _normalize_axes(axes: Sequence[int], ndim: int, what: str,
                    shape: tuple[int, ...]) -> tuple[int, ...]:
  normalized = []
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
          f'dimension_numbers: {what} {tuple(axes)} out of range for a '
          f'parameter of shape {shape}.')
    normalized.append(axis % ndim)
  if len(set(normalized)) != len(normalized):
    raise ValueError(
        f'dimension_numbers: {what} {tuple(axes)} repeat an axis of a '
        f'parameter of shape {shape}.')
  return tuple(normalized)


# ------------------------------------------------------------------------------
# The static plan.


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Piece:
  """A same-shape group of units cut from one parameter.

  Attributes:
    stack: index of the stack the units belong to.
    offset: index of the first unit in that stack.
    region: ``(start, stop)`` per grouped axis: the part of the (grouped)
      parameter these units cover.
    blocks: number of blocks per grouped axis inside ``region``.
  """

  stack: int
  offset: int
  region: tuple[tuple[int, int], ...]
  blocks: tuple[int, ...]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ParameterPlacement:
  """Where the units of one parameter live.

  Attributes:
    shape: the parameter's shape.
    permutation: the transpose that puts the batch axes first, then the
      non-batch axes (reduction axes, then output axes, when grouped).
    num_batch_axes: how many leading axes of the transposed parameter are
      batch axes.
    grouped_shape: the shape of one slice after grouping (``(R, O)`` for a
      grouped matrix, otherwise the non-batch axes' lengths).
    pieces: the parameter's units, one :class:`Piece` per unit shape.
  """

  shape: tuple[int, ...]
  permutation: tuple[int, ...]
  num_batch_axes: int
  grouped_shape: tuple[int, ...]
  pieces: tuple[Piece, ...]

  @property
  def num_slices(self) -> int:
    return math.prod(self.shape[a] for a in
                     self.permutation[:self.num_batch_axes])


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Stack:
  """Units of one shape and state dtype, from anywhere in the tree.

  Attributes:
    unit_shape: the shape of one unit (a slice or block).
    dtype: the dtype of the stack's statistics (the state dtype).
    size: the number of units ``U``.
    layout: the engine's :class:`FactorLayout` of one unit.
  """

  unit_shape: tuple[int, ...]
  dtype: str
  size: int
  layout: _engine.FactorLayout
  slots: int | None = None

  @property
  def num_slots(self) -> int:
    """The length of the stack's leading axis in the state: ``size``, or,
    when the plan is sharded, ``size`` padded to a multiple of the shards."""
    return self.size if self.slots is None else self.slots

  @property
  def refresh_cost(self) -> int:
    """A unit's refresh cost, ``sum d^3`` over its factors, plus its size
    (so that units without factors are spread by the memory they hold)."""
    return (sum(d**3 for d in self.layout.factor_sizes)
            + math.prod(self.layout.merged_shape))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class EigenbasisPlan:
  """Static layout of a parameter tree: placements and stacks.

  Part of the state's tree structure (no arrays), so the compiled ``update``
  knows it while tracing, and ``jit``, Orbax and ``flax.nnx.Optimizer`` keep it
  unchanged.
  """

  placements: tuple[ParameterPlacement, ...]
  stacks: tuple[Stack, ...]
  refresh_phases: tuple[tuple[int, ...], ...] | None = None
  refresh_frequency: int | None = None
  leaf_paths: tuple[str, ...] | None = None
  sharding: 'ShardedLayout | None' = None

  def units_due(self, residue: int) -> list[Any]:
    """Per stack, the units whose refresh phase is ``residue`` (staggered).

    Unsharded, a stack's phases are sorted, so they are one contiguous run
    of units (a slice). Sharded, a boolean mask over the stack's slots.
    """
    runs = []
    for s, phases in enumerate(self.refresh_phases):
      due = [u for u, phase in enumerate(phases) if phase == residue]
      if self.sharding is not None:
        runs.append(self.sharding.slot_mask(s, due))
      else:
        runs.append(slice(due[0], due[-1] + 1) if due else slice(0, 0))
    return runs

  def all_units(self) -> list[Any]:
    """Per stack, every unit: ``None`` unsharded, else the mask of the real
    (not padding) slots. The selection a full refresh runs on."""
    if self.sharding is None:
      return [None] * len(self.stacks)
    return [self.sharding.slot_mask(s, range(stack.size))
            for s, stack in enumerate(self.stacks)]

  def only_stack(self, s: int) -> list[Any]:
    """Per stack, a selection: every unit of stack ``s``, none elsewhere."""
    everything = self.all_units()
    return [units if k == s else (
        slice(0, 0) if self.sharding is None
        else np.zeros((stack.num_slots,), bool))
            for k, (stack, units) in enumerate(zip(self.stacks, everything))]

  def real_slots(self, s: int) -> np.ndarray:
    """Stack ``s``'s slots that hold a unit (all of them unsharded)."""
    if self.sharding is None:
      return np.ones((self.stacks[s].num_slots,), bool)
    return self.sharding.slot_mask(s, range(self.stacks[s].size))

  def largest_over_units(self, s: int, x: jax.Array) -> jax.Array:
    """The largest entry of a ``(U,)`` array of stack ``s`` over the slots
    that hold a unit (padding counts as 0)."""
    real = jnp.asarray(self.real_slots(s))
    return jnp.max(jnp.where(real, x, jnp.zeros_like(x)))

  def split(self, flat: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Groups a flat per-factor sequence into one tuple per stack."""
    return _split(flat, [len(s.layout.factored_axes) for s in self.stacks])

  def split_axes(self, flat: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Groups a flat per-(merged)-axis sequence into one tuple per stack."""
    return _split(flat, [len(s.layout.merged_shape) for s in self.stacks])

  def split_unfactored(self, flat: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Groups a flat sequence with one entry per axis *without* a factor."""
    return _split(flat, [
        len(s.layout.merged_shape) - len(s.layout.factored_axes)
        for s in self.stacks])


def assign_refresh_phases(
    stacks: Sequence[Stack], frequency: int,
    sharding: 'ShardedLayout | None' = None,
) -> tuple[tuple[int, ...], ...]:
  """Spreads the units' refreshes evenly over ``frequency`` steps.

  A unit's refresh costs about ``sum(d_i^3)`` over its factors. Units are
  taken from the most to the least expensive (ties in stack, then unit order)
  and each is given the phase (a step residue modulo ``frequency``) whose
  load is smallest so far: the longest-processing-time rule, within 4/3 of
  the best possible largest load. Unsharded, the phases are then sorted
  within a stack (its units are interchangeable in cost), so that the units
  of one phase are a contiguous run: a static slice, not a gather. Sharded,
  the loads are kept per shard and residue (a unit's shard is fixed by the
  layout), so that every shard's work is spread over the steps.
  """
  if sharding is not None:
    slots = [sharding.unit_slots(s) for s in range(len(stacks))]
    shard_of = lambda s, u: int(slots[s][u]) // sharding.slots_per_shard(s)
  else:
    shard_of = lambda s, u: 0
  loads: dict[tuple[int, int], int] = {}
  phases = [[0] * stack.size for stack in stacks]
  units = [(sum(d**3 for d in stack.layout.factor_sizes), s, u)
           for s, stack in enumerate(stacks) if stack.layout.factored_axes
           for u in range(stack.size)]
  for cost, s, u in sorted(units, key=lambda item: -item[0]):
    shard = shard_of(s, u)
    phase = min(range(frequency), key=lambda r: loads.get((shard, r), 0))
    phases[s][u] = phase
    loads[shard, phase] = loads.get((shard, phase), 0) + cost
  if sharding is not None:
    return tuple(tuple(p) for p in phases)
  return tuple(tuple(sorted(p)) for p in phases)


# ------------------------------------------------------------------------------
# Sharded layout: every stack's leading axis divided over mesh axes.


def resolve_shard_axes(mesh: Any, shard_axes: Any) -> tuple[str, ...]:
  """The mesh axes the stacks are divided over (validated).

  Args:
    mesh: a ``jax.sharding.Mesh``.
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

  Stack ``s`` has ``k_s = ceil(U_s / N)`` slots on each of the ``N`` shards
  (the devices along ``axes``); shard ``d`` holds a contiguous run of
  ``units_per_shard[s][d]`` units (``k_s`` or ``k_s - 1``) followed by
  padding, so the stack's leading axis in the state has ``N k_s`` slots and
  is sharded evenly. Padding slots hold zeros and identity bases: their
  gradient is zero, so are their updates, and the refresh skips them.

  Attributes:
    mesh: the ``jax.sharding.Mesh``.
    axes: the mesh axes the leading axis is sharded over.
    units_per_shard: per stack, the number of real units on each shard.
  """

  mesh: Any
  axes: tuple[str, ...]
  units_per_shard: tuple[tuple[int, ...], ...]

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
    k = self.slots_per_shard(s)
    return np.concatenate(
        [d * k + np.arange(n) for d, n in enumerate(self.units_per_shard[s])]
        or [np.zeros((0,), int)]).astype(int)

  def slot_mask(self, s: int, units: Any) -> np.ndarray:
    """A boolean mask over stack ``s``'s slots, true at ``units``' slots."""
    mask = np.zeros((self.num_shards * self.slots_per_shard(s),), bool)
    mask[self.unit_slots(s)[np.asarray(list(units), int)]] = True
    return mask


def assign_shards(stacks: Sequence[Stack], mesh: Any, axes: tuple[str, ...]
                  ) -> ShardedLayout:
  """Divides every stack's units over the shards, balancing the refresh.

  Every shard gets ``floor(U_s / N)`` units of stack ``s``; the ``U_s mod N``
  remaining units go, one each, to the shards least loaded so far (stacks
  taken from the most to the least expensive unit, a unit costing
  :attr:`Stack.refresh_cost`). So single large factors (an embedding, an
  output layer) land on different shards, and a shard that got one is given
  none of the next remainders until the others catch up: a greedy
  bin-packing of the remainders, the rest being split evenly.
  """
  num_shards = math.prod(mesh.shape[a] for a in axes)
  loads = [0] * num_shards
  counts = [[stack.size // num_shards] * num_shards for stack in stacks]
  for s, stack in enumerate(stacks):
    for d in range(num_shards):
      loads[d] += counts[s][d] * stack.refresh_cost
  order = sorted(range(len(stacks)), key=lambda s: -stacks[s].refresh_cost)
  for s in order:
    extra = stacks[s].size % num_shards
    for d in sorted(range(num_shards), key=lambda d: (loads[d], d))[:extra]:
      counts[s][d] += 1
      loads[d] += stacks[s].refresh_cost
  return ShardedLayout(mesh, axes, tuple(tuple(c) for c in counts))


def place(x: jax.Array, plan: 'EigenbasisPlan') -> jax.Array:
  """A stacked array constrained to its sharding (leading axis divided);
  ``x`` itself without a sharded plan. Works eagerly and under ``jit``, on
  Auto and Explicit meshes (see :func:`constrain`)."""
  if plan.sharding is None:
    return x
  return constrain(x, plan.sharding.mesh, plan.sharding.spec)


def constrain(x: jax.Array, mesh: Any,
              spec: jax.sharding.PartitionSpec) -> jax.Array:
  """``x`` laid out as ``spec`` on ``mesh``.

  Outside ``jit`` this is a ``device_put``. Under ``jit`` it is a sharding
  constraint: against the context mesh where one is set (inside
  :func:`auto_sharded`'s region, whose axes are Auto), else against
  ``mesh``.
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


def place_state(tree: Any, plan: 'EigenbasisPlan') -> Any:
  """Every stacked (non-scalar) array of a transform's state :func:`place`-d.
  """
  return jax.tree.map(lambda x: place(x, plan) if jnp.ndim(x) else x, tree)


def context_mesh(mesh: Any) -> Any:
  """The mesh to give ``jax.shard_map``: the context's, where one is set."""
  abstract = jax.sharding.get_abstract_mesh()
  return mesh if abstract.empty else abstract


def take_units(tree: Any, units: Any) -> Any:
  """A run of units (leading axis) of every array of ``tree``; all if None.

  ``units`` is a slice, ``None``, or (sharded plans) a boolean mask over
  the slots, for which the whole stack is taken (the work is masked
  instead, and :func:`put_units` selects).
  """
  if units is None or isinstance(units, np.ndarray):
    return tree
  return jax.tree.map(lambda x: x[units], tree)


def put_units(full: Any, part: Any, units: Any) -> Any:
  """``full`` with a run of units replaced by ``part``; ``part`` if None;
  with a mask, ``part`` where it is true."""
  if units is None:
    return part
  if isinstance(units, np.ndarray):
    return jax.tree.map(
        lambda x, y: jnp.where(
            units.reshape((-1,) + (1,) * (x.ndim - 1)), y, x), full, part)
  return jax.tree.map(
      lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, units.start, 0),
      full, part)


def is_selected(units: Any) -> bool:
  """Whether a selection (see :func:`take_units`) holds any unit."""
  if units is None:
    return True
  if isinstance(units, np.ndarray):
    return bool(units.any())
  return units.stop > units.start


def _split(flat: Sequence[Any], counts: Sequence[int]) -> list[tuple[Any, ...]]:
  groups, start = [], 0
  for count in counts:
    groups.append(tuple(flat[start:start + count]))
    start += count
  if start != len(flat):
    raise ValueError(f'expected {start} entries in the state, got {len(flat)}.')
  return groups


def _segments(length: int, block_size: int | None):
  """``(start, stop, blocks, block_length)`` pieces of one axis."""
  if block_size is None or length <= block_size:
    return [(0, length, 1, length)]
  full, rest = divmod(length, block_size)
  segments = [(0, full * block_size, full, block_size)]
  if rest:
    segments.append((full * block_size, length, 1, rest))
  return segments


def _placement_axes(shape, numbers):
  """The transpose and grouped shape for one parameter (validated)."""
  ndim = len(shape)
  if numbers is None:
    numbers = EigenbasisDimensionNumbers()
  batch = _normalize_axes(numbers.batch_axes, ndim, 'batch_axes', shape)
  rest = [a for a in range(ndim) if a not in batch]
  reduction, output = numbers.reduction_axes, numbers.output_axes
  if reduction is None and output is None:
    return batch + tuple(rest), len(batch), tuple(shape[a] for a in rest)
  given = {}
  for name, axes in (('reduction_axes', reduction), ('output_axes', output)):
    if axes is not None:
      given[name] = _normalize_axes(axes, ndim, name, shape)
      if set(given[name]) & set(batch):
        raise ValueError(
            f'dimension_numbers: {name} {axes} overlap batch_axes '
            f'{numbers.batch_axes} for a parameter of shape {shape}.')
  if reduction is None:
    given['reduction_axes'] = tuple(
        a for a in rest if a not in given['output_axes'])
  if output is None:
    given['output_axes'] = tuple(
        a for a in rest if a not in given['reduction_axes'])
  reduction, output = given['reduction_axes'], given['output_axes']
  if set(reduction) & set(output) or sorted(reduction + output) != rest:
    raise ValueError(
        'dimension_numbers: reduction_axes and output_axes must split the '
        f'non-batch axes {tuple(rest)} of a parameter of shape {shape} '
        f'between them, got {reduction} and {output}.')
  grouped = (math.prod(shape[a] for a in reduction),
             math.prod(shape[a] for a in output))
  return batch + reduction + output, len(batch), grouped


def plan_stacks(
    shapes: Sequence[tuple[int, ...]],
    state_dtypes: Sequence[Any],
    dimension_numbers: Sequence[EigenbasisDimensionNumbers | None],
    *,
    block_size: int | None,
    unit_layout: Callable[[tuple[int, ...]], _engine.FactorLayout],
) -> EigenbasisPlan:
  """Cuts every parameter into units and groups the units into stacks.

  Args:
    shapes: the parameters' shapes, in leaf order.
    state_dtypes: the dtype of each parameter's statistics.
    dimension_numbers: one entry per parameter (see
      :func:`resolve_dimension_numbers`).
    block_size: cut longer grouped axes into blocks of this length, or None.
    unit_layout: the axis rules, applied to one unit's shape.

  Returns:
    The :class:`EigenbasisPlan`.
  """
  stack_index: dict[tuple[Any, ...], int] = {}
  stack_sizes: list[int] = []
  stack_keys: list[tuple[Any, ...]] = []
  placements = []
  for shape, dtype, numbers in zip(shapes, state_dtypes, dimension_numbers):
    shape = tuple(int(n) for n in shape)
    permutation, num_batch, grouped = _placement_axes(shape, numbers)
    slices = math.prod(shape[a] for a in permutation[:num_batch])
    pieces = []
    for combo in _product([_segments(n, block_size) for n in grouped]):
      unit_shape = tuple(length for _, _, _, length in combo)
      blocks = tuple(count for _, _, count, _ in combo)
      key = (unit_shape, jnp.dtype(dtype).name)
      if key not in stack_index:
        stack_index[key] = len(stack_sizes)
        stack_sizes.append(0)
        stack_keys.append(key)
      index = stack_index[key]
      pieces.append(Piece(
          stack=index, offset=stack_sizes[index],
          region=tuple((start, stop) for start, stop, _, _ in combo),
          blocks=blocks))
      stack_sizes[index] += slices * math.prod(blocks)
    placements.append(ParameterPlacement(
        shape, permutation, num_batch, grouped, tuple(pieces)))
  stacks = tuple(
      Stack(unit_shape, dtype, size, unit_layout(unit_shape))
      for (unit_shape, dtype), size in zip(stack_keys, stack_sizes))
  return EigenbasisPlan(tuple(placements), stacks)


def shard_plan(plan: EigenbasisPlan, mesh: Any, shard_axes: Any
               ) -> EigenbasisPlan:
  """``plan`` with its stacks divided over ``mesh`` (see
  :func:`assign_shards`); ``plan`` itself when ``mesh`` is None."""
  if mesh is None:
    return plan
  layout = assign_shards(plan.stacks, mesh, resolve_shard_axes(mesh,
                                                               shard_axes))
  stacks = tuple(
      dataclasses.replace(stack, slots=layout.num_shards
                          * layout.slots_per_shard(s))
      for s, stack in enumerate(plan.stacks))
  return dataclasses.replace(plan, stacks=stacks, sharding=layout)


def _product(lists):
  combos = [()]
  for options in lists:
    combos = [c + (o,) for c in combos for o in options]
  return combos


def _no_factors(shape: tuple[int, ...]) -> _engine.FactorLayout:
  return _engine.FactorLayout(shape, shape or (1,), ())


def plan_units(
    leaves: Sequence[Any], dimension_numbers: Any, tree: Any,
    block_size: int | None,
    unit_layout: Callable[[tuple[int, ...]], _engine.FactorLayout] = (
        _no_factors),
) -> EigenbasisPlan:
  """:func:`plan_stacks` for the leaves of ``tree``.

  With the default ``unit_layout`` the plan only cuts ``leaves`` into units
  (no Kronecker factors), for per-unit reductions outside the engine
  (grafting norms).
  """
  return plan_stacks(
      [jnp.shape(x) for x in leaves],
      [_engine.state_dtype(jnp.result_type(x)) for x in leaves],
      resolve_dimension_numbers(dimension_numbers, tree),
      block_size=block_size, unit_layout=unit_layout)


# ------------------------------------------------------------------------------
# Gather and scatter.


def _to_grouped(x: jax.Array, placement: ParameterPlacement) -> jax.Array:
  """``(num_slices, *grouped_shape)``: batch axes first, then the matrix."""
  x = jnp.transpose(x, placement.permutation)
  return x.reshape((placement.num_slices,) + placement.grouped_shape)


def _from_grouped(x: jax.Array, placement: ParameterPlacement) -> jax.Array:
  transposed = tuple(placement.shape[a] for a in placement.permutation)
  inverse = tuple(int(i) for i in np.argsort(placement.permutation))
  return jnp.transpose(x.reshape(transposed), inverse)


def _blocks_to_units(region: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
  """``(S, k_0 b_0, k_1 b_1, ...)`` to ``(S k_0 k_1 ..., b_0, b_1, ...)``."""
  if all(k == 1 for k in blocks):
    return region
  n = len(blocks)
  lengths = tuple(region.shape[1 + i] // k for i, k in enumerate(blocks))
  split = region.reshape(
      (region.shape[0],) + tuple(v for k, b in zip(blocks, lengths)
                                 for v in (k, b)))
  order = (0,) + tuple(1 + 2 * i for i in range(n)) + tuple(
      2 + 2 * i for i in range(n))
  return split.transpose(order).reshape(
      (region.shape[0] * math.prod(blocks),) + lengths)


def _units_to_blocks(units: jax.Array, slices: int,
                     blocks: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`_blocks_to_units`."""
  if all(k == 1 for k in blocks):
    return units
  n = len(blocks)
  lengths = units.shape[1:]
  split = units.reshape((slices,) + blocks + lengths)
  order = (0,) + tuple(v for i in range(n) for v in (1 + i, 1 + n + i))
  return split.transpose(order).reshape(
      (slices,) + tuple(k * b for k, b in zip(blocks, lengths)))


def gather(leaves: Sequence[jax.Array], plan: EigenbasisPlan) -> list[jax.Array]:
  """Parameter-shaped arrays to stacks ``(U, *merged_shape)`` in state dtype."""
  parts: list[list[jax.Array]] = [[] for _ in plan.stacks]
  for x, placement in zip(leaves, plan.placements):
    dtype = plan.stacks[placement.pieces[0].stack].dtype
    grouped = _to_grouped(jnp.asarray(x).astype(dtype), placement)
    for piece in placement.pieces:
      region = grouped[(slice(None),) + tuple(
          slice(start, stop) for start, stop in piece.region)]
      parts[piece.stack].append(_blocks_to_units(region, piece.blocks))
  stacked = []
  for s, (stack, members) in enumerate(zip(plan.stacks, parts)):
    joined = members[0] if len(members) == 1 else jnp.concatenate(members)
    joined = joined.reshape((stack.size,) + stack.layout.merged_shape)
    stacked.append(place(_to_slots(joined, plan, s), plan))
  return stacked


def _to_slots(units: jax.Array, plan: EigenbasisPlan, s: int) -> jax.Array:
  """``(U, ...)`` units to the stack's ``(N k, ...)`` slots (zero padding)."""
  if plan.sharding is None:
    return units
  k = plan.sharding.slots_per_shard(s)
  runs, start = [], 0
  for n in plan.sharding.units_per_shard[s]:
    runs.append(units[start:start + n])
    if n < k:
      runs.append(jnp.zeros((k - n,) + units.shape[1:], units.dtype))
    start += n
  return jnp.concatenate(runs)


def _from_slots(slots: jax.Array, plan: EigenbasisPlan, s: int) -> jax.Array:
  """Inverse of :func:`_to_slots`: the real units, in unit order."""
  if plan.sharding is None:
    return slots
  k = plan.sharding.slots_per_shard(s)
  runs = [slots[d * k:d * k + n]
          for d, n in enumerate(plan.sharding.units_per_shard[s]) if n]
  if not runs:
    return slots[:0]
  return runs[0] if len(runs) == 1 else jnp.concatenate(runs)


def scatter(stacked: Sequence[jax.Array], plan: EigenbasisPlan
            ) -> list[jax.Array]:
  """Inverse of :func:`gather`: stacks back to parameter-shaped arrays."""
  unslotted = [_from_slots(x, plan, s) for s, x in enumerate(stacked)]
  leaves = []
  for placement in plan.placements:
    regions = {}
    for piece in placement.pieces:
      stack = plan.stacks[piece.stack]
      count = placement.num_slices * math.prod(piece.blocks)
      units = unslotted[piece.stack][piece.offset:piece.offset + count]
      units = units.reshape((count,) + stack.unit_shape)
      regions[piece.region] = _units_to_blocks(
          units, placement.num_slices, piece.blocks)
    leaves.append(_from_grouped(_assemble(regions, 0, ()), placement))
  return leaves


def _assemble(regions: dict[Any, jax.Array], axis: int, prefix: tuple):
  """Concatenates a grid of regions (keyed by their spans) along each axis."""
  if axis == len(next(iter(regions))):
    return regions[prefix]
  spans = sorted({key[axis] for key in regions if key[:axis] == prefix})
  parts = [_assemble(regions, axis + 1, prefix + (span,)) for span in spans]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis + 1)


# ------------------------------------------------------------------------------
# The stacked state of the engine.


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
      gradient (see :func:`soap_optax._engine.staleness`), reset by every
      refresh.
    age: per stack, ``(U,)`` int32: calls since each unit's last refresh
      (0 on the call that refreshed it).
    refreshes: per stack, ``(U,)`` int32: how many times each unit's bases
      were refreshed (the first call included).
  """

  count: jax.Array
  plan: EigenbasisPlan
  stats: tuple[jax.Array, ...]
  bases: tuple[jax.Array, ...]
  skipped: jax.Array
  failed_refreshes: jax.Array
  quotients: tuple[jax.Array, ...] = ()
  age: tuple[jax.Array, ...] = ()
  refreshes: tuple[jax.Array, ...] = ()


def init_eigenbasis(
    params: Any,
    *,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    one_sided: bool = False,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    staggered_refresh_frequency: int | None = None,
    mesh: Any = None,
    shard_axes: Any = None,
) -> EigenbasisState:
  """Zero statistics and identity bases for every stack of a tree.

  With ``staggered_refresh_frequency``, each unit is also given a refresh
  phase (:func:`assign_refresh_phases`). With ``mesh``, every stack is
  divided over ``shard_axes`` (:func:`shard_plan`) and placed there.

  ``max_precond_dim`` (and ``block_size``) decide array shapes, so they must be
  concrete here. They are tracers only when ``optax.inject_hyperparams``
  injected them and ``init`` runs under ``jit``; the error then says how to
  keep them static.
  """
  for name, value in (('max_precond_dim', max_precond_dim),
                      ('block_size', block_size),
                      ('precondition_frequency', staggered_refresh_frequency)):
    if isinstance(value, jax.core.Tracer):
      raise ValueError(
          f'{name} decides the shapes of the optimizer state and must be a '
          'concrete integer at init, but it is traced here (optax.'
          'inject_hyperparams under jit). Pass static_args=("max_precond_dim",'
          ' "precondition_frequency", "block_size") to '
          'optax.inject_hyperparams.')
  plan = plan_units(
      jax.tree.leaves(params), dimension_numbers, params,
      None if block_size is None else int(block_size),
      unit_layout=lambda shape: _engine.plan_layout(
          shape, max_precond_dim=int(max_precond_dim), merge_dims=merge_dims,
          precondition_1d=precondition_1d, one_sided=one_sided))
  plan = dataclasses.replace(plan, leaf_paths=_leaf_paths(params))
  plan = shard_plan(plan, mesh, shard_axes)
  if staggered_refresh_frequency is not None:
    frequency = int(staggered_refresh_frequency)
    plan = dataclasses.replace(
        plan, refresh_phases=assign_refresh_phases(
            plan.stacks, frequency, plan.sharding),
        refresh_frequency=frequency)
  stats, bases = [], []
  for stack in plan.stacks:
    for n in stack.layout.factor_sizes:
      stats.append(place(jnp.zeros((stack.num_slots, n, n), stack.dtype),
                         plan))
      bases.append(place(jnp.broadcast_to(
          jnp.eye(n, dtype=stack.dtype), (stack.num_slots, n, n)), plan))
  def per_unit():  # distinct buffers: a state may be donated.
    return tuple(place(jnp.zeros((stack.num_slots,), jnp.int32), plan)
                 for stack in plan.stacks)
  return EigenbasisState(
      count=jnp.zeros([], jnp.int32), plan=plan, stats=tuple(stats),
      bases=tuple(bases), skipped=jnp.zeros([], jnp.int32),
      failed_refreshes=jnp.zeros([], jnp.int32),
      quotients=tuple(place(jnp.zeros(s.shape[:2], s.dtype), plan)
                      for s in stats),
      age=per_unit(), refreshes=per_unit())


def _leaf_paths(tree: Any) -> tuple[str, ...]:
  """Each leaf's key path, without the ``.value`` of boxes (Flax variables,
  ``nn.Partitioned``), which parameters carry and gradients may not."""
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = tuple(k for k in path if not (
        isinstance(k, jax.tree_util.GetAttrKey) and k.name == 'value'))
    paths.append(jax.tree_util.keystr(path))
  return tuple(paths)


def check_updates(updates: Any, plan: EigenbasisPlan) -> None:
  """Raises a ValueError when a gradient tree does not match the initialized
  one: another number of leaves, a leaf at another key path (renamed keys, a
  list for a dict), or another shape."""
  leaves = jax.tree.leaves(updates)
  if len(leaves) != len(plan.placements):
    raise ValueError(
        f'updates have {len(leaves)} leaves but the optimizer state was '
        f'initialized for {len(plan.placements)} parameters.')
  for i, (where, x, placement) in enumerate(
      zip(_leaf_paths(updates), leaves, plan.placements)):
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


def unpack(state: EigenbasisState) -> list[_engine.KroneckerFactors]:
  """The per-stack factors (arrays with a leading unit axis)."""
  plan = state.plan
  return [
      _engine.KroneckerFactors(stack.layout, stats, bases)
      for stack, stats, bases in zip(
          plan.stacks, plan.split(state.stats), plan.split(state.bases))
  ]


def pack(state: EigenbasisState,
         factors: Sequence[_engine.KroneckerFactors], *,
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
  (:func:`soap_optax._engine.staleness`)."""
  plan = eigenbasis.plan
  return [tuple(jax.vmap(_engine.staleness)(stat, q)
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


def zeros_per_stack(plan: EigenbasisPlan, dtype: Any = None) -> tuple:
  """A zero ``(U, *merged_shape)`` array per stack."""
  return tuple(
      place(jnp.zeros((s.num_slots,) + s.layout.merged_shape,
                      dtype or s.dtype), plan)
      for s in plan.stacks)


def zeros_per_axis(plan: EigenbasisPlan, which: str) -> tuple:
  """A zero ``(U, d)`` array for each (merged) axis of each stack, flat.

  ``which`` is ``"all"`` for every axis or ``"unfactored"`` for the axes
  without a Kronecker factor.
  """
  return tuple(
      place(jnp.zeros((s.num_slots, size), s.dtype), plan)
      for s in plan.stacks
      for axis, size in enumerate(s.layout.merged_shape)
      if which == 'all' or axis not in s.layout.factored_axes)
