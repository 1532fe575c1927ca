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
under :func:`jax.vmap`, and the compiled program grows with the number of distinct
shapes, not with depth.

No padding is needed: an uneven last block is simply a unit of another shape,
and lands in another stack.
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soap_optax import _dimension_numbers
from soap_optax import _exchange
from soap_optax import _kronecker
from soap_optax import _mesh


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
    unit_shape: the shape of one of these units as cut from the parameter
      (None: the stack's ``unit_shape``).
    axes: in a size bucket (see :func:`plan_buckets`), the unit's axis that
      each axis of the stack's units holds (None: the same order); the
      unit is padded with zeros at the end of every axis up to the stack's
      ``unit_shape``.
  """

  stack: int
  offset: int
  region: tuple[tuple[int, int], ...]
  blocks: tuple[int, ...]
  unit_shape: tuple[int, ...] | None = None
  axes: tuple[int, ...] | None = None

  def real_shape(self, stack: 'Stack') -> tuple[int, ...]:
    """The shape of one of these units before any padding."""
    return stack.unit_shape if self.unit_shape is None else self.unit_shape

  def is_padded(self, stack: 'Stack') -> bool:
    """Whether these units are transposed or padded in their stack."""
    return self.axes is not None or self.real_shape(stack) != stack.unit_shape


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
  layout: _kronecker.FactorLayout
  slots: int | None = None

  @property
  def num_slots(self) -> int:
    """The length of the stack's leading axis in the state: ``size``, or,
    when the plan is sharded, ``size`` padded to a multiple of the shards."""
    return self.size if self.slots is None else self.slots


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class EigenbasisPlan:
  """Static layout of a parameter tree: placements and stacks.

  Part of the state's tree structure (no arrays), so the compiled ``update``
  knows it while tracing, and ``jit``, Orbax and :class:`flax.nnx.Optimizer` keep it
  unchanged.
  """

  placements: tuple[ParameterPlacement, ...]
  stacks: tuple[Stack, ...]
  refresh_phases: tuple[tuple[int, ...], ...] | None = None
  refresh_frequency: int | None = None
  leaf_paths: tuple[str, ...] | None = None
  sharding: _mesh.ShardedLayout | None = None
  field_stacks: tuple[tuple[str, tuple[int, ...]], ...] = ()
  solver_padding: float | None = None

  def unsharded(self) -> 'EigenbasisPlan':
    """This plan without its mesh: every stack ``U`` slots, no padding."""
    return dataclasses.replace(
        self, sharding=None,
        stacks=tuple(dataclasses.replace(s, slots=None) for s in self.stacks))

  def per_slot(self, s: int, per_unit: Sequence[Any], fill: Any) -> np.ndarray:
    """A per-unit sequence (or ``(U, ...)`` array) of stack ``s`` laid out
    over its slots (padding slots get ``fill``, broadcast)."""
    values = np.asarray(per_unit)
    if self.sharding is None:
      return values
    out = np.full((self.stacks[s].num_slots,) + values.shape[1:], fill,
                  values.dtype)
    out[self.sharding.unit_slots(s)] = values
    return out

  def unit_extents(self, s: int) -> np.ndarray | None:
    """``(slots, ndim)``: each unit's own length along each axis of stack
    ``s`` (padding slots: the stack's shape); None when no unit of the
    stack is padded (see :class:`Piece`)."""
    stack = self.stacks[s]
    extents = np.tile(np.asarray(stack.unit_shape, np.int32),
                      (stack.size, 1))
    padded = False
    for placement in self.placements:
      for piece in placement.pieces:
        if piece.stack == s and piece.is_padded(stack):
          padded = True
          real = piece.real_shape(stack)
          count = placement.num_slices * math.prod(piece.blocks)
          extents[piece.offset:piece.offset + count] = (
              real if piece.axes is None else [real[a] for a in piece.axes])
    return self.per_slot(s, extents, stack.unit_shape) if padded else None

  def real_slots(self, s: int) -> np.ndarray:
    """Stack ``s``'s slots that hold a unit (all of them unsharded)."""
    return self.per_slot(s, np.ones((self.stacks[s].size,), bool), False)

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


def assign_refresh_phases(
    stacks: Sequence[Stack], frequency: int,
    sharding: _mesh.ShardedLayout | None = None,
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



def plan_buckets(
    unit_counts: dict[tuple[tuple[int, ...], str], int],
    unit_layout: Callable[[tuple[int, ...]], _kronecker.FactorLayout],
    max_padding: float | None,
) -> dict[tuple[tuple[int, ...], str], tuple[tuple[int, ...],
                                              tuple[int, ...] | None]]:
  """Size buckets: which stack shape each unit shape is laid out in.

  A unit of shape ``s`` may share a stack with units of a larger shape
  ``b`` (its axes reordered longest first, the order every shape of a
  bucket is compared in, then padded with zeros at the end of every axis)
  when ``b`` covers ``s`` axis by axis, the same axes carry a factor, and
  ``b``'s work (:attr:`soap_optax._kronecker.FactorLayout.unit_cost`: refresh
  plus step) is at most ``1 + max_padding`` times ``s``'s. Shapes are taken
  from the most to the least costly; each joins the cheapest bucket it may
  join, or opens one. A bucket that ends with a single shape keeps that
  shape as it is (no reordering, no padding), so that a tree without
  shapes to share lays its units out exactly as without buckets.

  Zero rows and columns are exact for the rules that allow buckets: a zero
  row of ``G`` is a zero row and column of its factor, which the canonical
  null-space basis keeps as a coordinate axis, so the real unit's numbers
  do not change (``tests/test_stacks.py`` compares in float64).

  Args:
    unit_counts: ``{(unit shape, dtype name): number of units}``.
    unit_layout: the axis rules, applied to one unit's shape.
    max_padding: the most extra work padding may add to a unit, as a
      fraction of its own (``None`` or 0: no buckets).

  Returns:
    ``{(unit shape, dtype name): (stack shape, axes)}``, ``axes`` as in
    :class:`Piece` (None: not reordered).
  """
  result = {key: (key[0], None) for key in unit_counts}
  if not max_padding:
    return result
  candidates = []
  for (shape, dtype), count in unit_counts.items():
    layout = unit_layout(shape)
    axes = tuple(sorted(range(len(shape)), key=lambda a: -shape[a]))
    oriented = tuple(shape[a] for a in axes)
    factored = tuple(sorted(axes.index(a) for a in layout.factored_axes))
    oriented_layout = unit_layout(oriented)
    if (not shape or layout.merged_shape != shape
        or oriented_layout.merged_shape != oriented
        or oriented_layout.factored_axes != factored):
      continue  # merged axes, or rules that do not commute with the order
    candidates.append((layout.unit_cost, count, shape, dtype, axes, oriented,
                       factored))
  buckets: list[dict[str, Any]] = []
  for cost, _, shape, dtype, axes, oriented, factored in sorted(
      candidates, key=lambda c: (-c[0], -c[1], c[2])):
    fits = [b for b in buckets
            if (b['dtype'], b['factored'], len(b['shape'])) == (
                dtype, factored, len(oriented))
            and all(x <= y for x, y in zip(oriented, b['shape']))
            and b['cost'] <= (1 + max_padding) * cost]
    if fits:
      bucket = min(fits, key=lambda b: b['cost'])
    else:
      bucket = dict(shape=oriented, dtype=dtype, factored=factored,
                    cost=cost, members=[])
      buckets.append(bucket)
    bucket['members'].append((shape, axes))
  for bucket in buckets:
    if len(bucket['members']) > 1:
      for shape, axes in bucket['members']:
        identity = axes == tuple(range(len(axes)))
        result[shape, bucket['dtype']] = (bucket['shape'],
                                          None if identity else axes)
  return result


def plan_stacks(
    shapes: Sequence[tuple[int, ...]],
    state_dtypes: Sequence[Any],
    dimension_numbers: Sequence[_dimension_numbers.EigenbasisDimensionNumbers | None],
    *,
    block_size: int | None,
    unit_layout: Callable[[tuple[int, ...]], _kronecker.FactorLayout],
    bucket_padding: float | None = None,
) -> EigenbasisPlan:
  """Cuts every parameter into units and groups the units into stacks.

  Args:
    shapes: the parameters' shapes, in leaf order.
    state_dtypes: the dtype of each parameter's statistics.
    dimension_numbers: one entry per parameter (see
      :func:`resolve_dimension_numbers`).
    block_size: cut longer grouped axes into blocks of this length, or None.
    unit_layout: the axis rules, applied to one unit's shape.
    bucket_padding: let units of different shapes share a stack, padded,
      within this much extra work (see :func:`plan_buckets`); None: one
      stack per unit shape.

  Returns:
    The :class:`EigenbasisPlan`.
  """
  cut = []
  unit_counts: dict[tuple[tuple[int, ...], str], int] = {}
  for shape, dtype, numbers in zip(shapes, state_dtypes, dimension_numbers):
    shape = tuple(int(n) for n in shape)
    permutation, num_batch, grouped = _dimension_numbers.placement_axes(
        shape, numbers)
    slices = math.prod(shape[a] for a in permutation[:num_batch])
    combos = _product([_segments(n, block_size) for n in grouped])
    name = jnp.dtype(dtype).name
    for combo in combos:
      key = (tuple(length for _, _, _, length in combo), name)
      unit_counts[key] = unit_counts.get(key, 0) + slices * math.prod(
          count for _, _, count, _ in combo)
    cut.append((shape, name, permutation, num_batch, grouped, slices, combos))
  buckets = plan_buckets(unit_counts, unit_layout, bucket_padding)

  stack_index: dict[tuple[Any, ...], int] = {}
  stack_sizes: list[int] = []
  stack_keys: list[tuple[Any, ...]] = []
  placements = []
  for shape, name, permutation, num_batch, grouped, slices, combos in cut:
    pieces = []
    for combo in combos:
      unit_shape = tuple(length for _, _, _, length in combo)
      blocks = tuple(count for _, _, count, _ in combo)
      stack_shape, axes = buckets[unit_shape, name]
      key = (stack_shape, name)
      if key not in stack_index:
        stack_index[key] = len(stack_sizes)
        stack_sizes.append(0)
        stack_keys.append(key)
      index = stack_index[key]
      pieces.append(Piece(
          stack=index, offset=stack_sizes[index],
          region=tuple((start, stop) for start, stop, _, _ in combo),
          blocks=blocks,
          unit_shape=None if unit_shape == stack_shape else unit_shape,
          axes=axes))
      stack_sizes[index] += slices * math.prod(blocks)
    placements.append(ParameterPlacement(
        shape, permutation, num_batch, grouped, tuple(pieces)))
  stacks = tuple(
      Stack(unit_shape, dtype, size, unit_layout(unit_shape))
      for (unit_shape, dtype), size in zip(stack_keys, stack_sizes))
  return EigenbasisPlan(tuple(placements), stacks)


def shard_plan(plan: EigenbasisPlan, mesh: Any, shard_axes: Any
               ) -> EigenbasisPlan:
  """``plan`` with its units given owners on ``mesh`` (see
  :func:`soap_optax._exchange.assign`); ``plan`` itself when ``mesh`` is
  None."""
  if mesh is None:
    return plan
  layout = _exchange.assign(plan.placements, plan.stacks, mesh,
                            _mesh.resolve_shard_axes(mesh, shard_axes))
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


def _no_factors(shape: tuple[int, ...]) -> _kronecker.FactorLayout:
  return _kronecker.FactorLayout(shape, shape or (1,), ())


def plan_units(
    leaves: Sequence[Any], dimension_numbers: Any, tree: Any,
    block_size: int | None,
    unit_layout: Callable[[tuple[int, ...]], _kronecker.FactorLayout] = (
        _no_factors),
    bucket_padding: float | None = None,
) -> EigenbasisPlan:
  """:func:`plan_stacks` for the leaves of ``tree``.

  With the default ``unit_layout`` the plan only cuts ``leaves`` into units
  (no Kronecker factors), for per-unit reductions outside the engine
  (grafting norms).
  """
  return plan_stacks(
      [jnp.shape(x) for x in leaves],
      [_kronecker.state_dtype(jnp.result_type(x)) for x in leaves],
      _dimension_numbers.resolve_dimension_numbers(dimension_numbers, tree),
      block_size=block_size, unit_layout=unit_layout,
      bucket_padding=bucket_padding)



# ------------------------------------------------------------------------------
# Gather and scatter.


def gather(leaves: Sequence[jax.Array], plan: EigenbasisPlan) -> list[jax.Array]:
  """Parameter-shaped arrays to stacks ``(U, *merged_shape)`` in state dtype.

  With a mesh, the stacks are the owners' ``(N k, *merged_shape)``, divided
  over the shard axes, and the gradients reach them through the exchange
  (:func:`soap_optax._exchange.gather`)."""
  if plan.sharding is not None:
    return _exchange.gather(leaves, plan)
  parts: list[list[jax.Array]] = [[] for _ in plan.stacks]
  for x, placement in zip(leaves, plan.placements):
    dtype = plan.stacks[placement.pieces[0].stack].dtype
    grouped = _exchange.to_grouped(jnp.asarray(x).astype(dtype), placement)
    for piece in placement.pieces:
      region = grouped[(slice(None),) + tuple(
          slice(start, stop) for start, stop in piece.region)]
      stack = plan.stacks[piece.stack]
      parts[piece.stack].append(_exchange.units_to_stack(
          _exchange.blocks_to_units(region, piece.blocks),
          piece.real_shape(stack), piece.axes, stack.unit_shape))
  stacked = []
  for stack, members in zip(plan.stacks, parts):
    joined = members[0] if len(members) == 1 else jnp.concatenate(members)
    stacked.append(joined.reshape((stack.size,) + stack.layout.merged_shape))
  return stacked


def scatter(stacked: Sequence[jax.Array], plan: EigenbasisPlan,
            step: jax.Array | None = None) -> list[jax.Array]:
  """Inverse of :func:`gather`: stacks back to parameter-shaped arrays.

  With ``step`` (a traced integer scalar: the step count), the units are
  sliced at offsets the compiler cannot see (:func:`opaque_offsets`), so
  that the pieces of one shape in one stack share one kernel. XLA fuses the
  consumers' elementwise chain (an alias's weight decay and learning rate)
  into each slice, and at constant offsets every parameter got a kernel of
  its own (BENCHMARKS.md, section 11). With a mesh, the exchange scatters
  (:func:`soap_optax._exchange.scatter`) and ``step`` is not used."""
  if plan.sharding is not None:
    return _exchange.scatter(stacked, plan)
  starts = [piece.offset for placement in plan.placements
            for piece in placement.pieces]
  starts = iter(starts if step is None else opaque_offsets(starts, step))
  leaves = []
  for placement in plan.placements:
    regions = {}
    for piece in placement.pieces:
      stack = plan.stacks[piece.stack]
      count = placement.num_slices * math.prod(piece.blocks)
      # A dynamic slice clamps its start: a plan whose piece overran its
      # stack would silently read other units.
      assert piece.offset + count <= stacked[piece.stack].shape[0], piece
      units = jax.lax.dynamic_slice_in_dim(
          stacked[piece.stack], next(starts), count,
          allow_negative_indices=False)
      units = _exchange.stack_to_units(
          units.reshape((count,) + stack.unit_shape),
          piece.real_shape(stack), piece.axes)
      regions[piece.region] = _exchange.units_to_blocks(
          units, placement.num_slices, piece.blocks)
    leaves.append(_exchange.from_grouped(_exchange.assemble(regions),
                                         placement))
  return leaves


def opaque_offsets(offsets: Sequence[int], step: jax.Array
                   ) -> tuple[jax.Array, ...]:
  """``offsets`` as int32 scalars whose values XLA cannot see at compile time.

  They pass through a loop of ``min(step, 0)`` iterations: none, for every
  value of ``step``, so the results equal ``offsets`` exactly. The loop's body
  (never run) rotates them, so that XLA can neither drop the loop nor fold
  their values (two or more of them) into the kernels that use them; a kernel
  that slices at one of them then serves every slice of its shape. ``step``
  must be traced: a concrete one gives the constants back. On a GPU the loop's
  condition is read on the host once per call, as the refresh's ``lax.cond``
  is.
  """
  values = tuple(jnp.int32(offset) for offset in offsets)
  trips = jnp.minimum(jnp.asarray(step).astype(jnp.int32), 0)
  return jax.lax.fori_loop(0, trips, lambda _, v: v[1:] + v[:1], values)
