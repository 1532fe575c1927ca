"""The exchange: one owner per unit, and the all-to-all that moves gradient
rows to the owners and update rows back.

With ``mesh=``, every unit (a parameter, a layer's slice, a block; see
:mod:`soap_optax._stacks`) has one **owner**: the device (along the shard
axes) that keeps its state and does its per-unit work and refresh. Each stack
of same-shape units is an array ``(N k, ...)`` divided over the ``N`` shards,
``k`` slots each; slot ``q k + j`` holds the ``j``-th unit owned by shard
``q``.

**The parameters' layout.** Each parameter is expected divided over the shard
axes along one axis (see :func:`choose_geometry`: the non-batch axis whose
shards cut the units into the tallest equal *parts*, then the longest, the
first on ties; else its first batch axis; else it is replicated). Its
gradient arrives in that layout (:func:`leaf_spec`; a gradient laid out
otherwise is moved to it by one reshard at the update's boundary).

**One exchange in, one out.** Inside :func:`jax.shard_map`, each device cuts
its gradient shards into *parts* (``h`` consecutive rows of a unit along the
divided axis; a whole unit where the division runs along a batch axis or the
parameter is replicated) and writes each into its owner's chunk of one send
buffer ``[N, F]`` per state dtype (``F``: the most entries one device sends
another); one :func:`jax.lax.all_to_all` delivers every part to its unit's
owner, which assembles its units. The update's parts go back the same way,
to the same places. Everything between the two exchanges is the owners'
local work; a replicated parameter's update is summed over the shards (only
its owner's part is not zero).

**The owners** come from a static, deterministic plan (:func:`assign`):
units from the most to the least expensive (refresh ``sum d^3`` plus the
step), each to the shard that keeps the send buffer narrowest (``F``), then
has the least work so far, with at most ``ceil(U / N)`` units of a stack per
shard (so the state stays within one unit of an even share per stack). It
depends on the shapes, the plan and the number of shards only: a state saved
with :func:`soap_optax.portable_state` (units in unit order) restores on any
mesh.

References:
  Shi et al., `A Distributed Data-Parallel PyTorch Implementation of the
  Distributed Shampoo Optimizer <https://arxiv.org/abs/2309.06497>`_, 2023
  (one owner per block, balanced by cost). The same owner-and-all-to-all
  pattern is used by Megatron's layer-sharded Muon and by Marin's sharded
  Muon (whole matrices moved onto a stack axis by one all-to-all).
"""

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soap_optax import _mesh

# Geometry modes: how a parameter is divided over the shards.
ROWS = 'rows'          # along a (grouped) matrix axis: parts of h rows
SLICES = 'slices'      # along its first batch axis: whole units
REPLICATED = 'replicated'  # not divided: every shard holds it all


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LeafGeometry:
  """How one parameter is divided over the shards (static).

  Attributes:
    mode: :data:`ROWS`, :data:`SLICES` or :data:`REPLICATED`.
    axis: the parameter's divided axis (None when replicated).
    dim: the divided axis of the grouped parameter (ROWS: a grouped axis;
      SLICES: the slices; -1 otherwise).
    rows: the length of that grouped axis (or of the slices) on one shard.
    height: ROWS: the rows of one part (a divisor of ``rows`` and of every
      block boundary along ``dim``).
  """

  mode: str
  axis: int | None = None
  dim: int = -1
  rows: int = 0
  height: int = 0


# ------------------------------------------------------------------------------
# Local layout helpers (shared with the unsharded gather and scatter).


def blocks_to_units(region: jax.Array, blocks: tuple[int, ...]) -> jax.Array:
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


def units_to_blocks(units: jax.Array, slices: int,
                    blocks: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`blocks_to_units`."""
  if all(k == 1 for k in blocks):
    return units
  n = len(blocks)
  lengths = units.shape[1:]
  split = units.reshape((slices,) + blocks + lengths)
  order = (0,) + tuple(v for i in range(n) for v in (1 + i, 1 + n + i))
  return split.transpose(order).reshape(
      (slices,) + tuple(k * b for k, b in zip(blocks, lengths)))


def units_to_stack(units: jax.Array, real_shape: tuple[int, ...],
                   axes: tuple[int, ...] | None,
                   stack_shape: tuple[int, ...]) -> jax.Array:
  """``(n, *real_shape)`` units to their stack's ``(n, *stack_shape)``:
  axes reordered (stack axis ``j`` holds the unit's axis ``axes[j]``), then
  zero-padded at the end of every axis (a size bucket)."""
  if axes is not None:
    units = jnp.transpose(units, (0,) + tuple(1 + a for a in axes))
  if units.shape[1:] == tuple(stack_shape):
    return units
  return jnp.pad(units, [(0, 0)] + [
      (0, b - x) for x, b in zip(units.shape[1:], stack_shape)])


def stack_to_units(units: jax.Array, real_shape: tuple[int, ...],
                   axes: tuple[int, ...] | None) -> jax.Array:
  """Inverse of :func:`units_to_stack`: the real part, in the unit's own
  axis order."""
  oriented = (real_shape if axes is None
              else tuple(real_shape[a] for a in axes))
  if units.shape[1:] != oriented:
    units = units[(slice(None),) + tuple(slice(0, n) for n in oriented)]
  if axes is None:
    return units
  return jnp.transpose(units, (0,) + tuple(1 + axes.index(a)
                                           for a in range(len(axes))))


def assemble(regions: dict[Any, jax.Array], axis: int = 0,
             prefix: tuple = ()) -> jax.Array:
  """Concatenates a grid of regions (keyed by their spans) along each axis."""
  if axis == len(next(iter(regions))):
    return regions[prefix]
  spans = sorted({key[axis] for key in regions if key[:axis] == prefix})
  parts = [assemble(regions, axis + 1, prefix + (span,)) for span in spans]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis + 1)


def to_grouped(x: jax.Array, placement: Any,
               local: tuple[int, ...] | None = None) -> jax.Array:
  """``(slices, *grouped_shape)``: batch axes first, then the matrix.
  ``local``: that shape on one shard instead (``x`` a local shard)."""
  x = jnp.transpose(x, placement.permutation)
  return x.reshape(local or (placement.num_slices,) + placement.grouped_shape)


def from_grouped(x: jax.Array, placement: Any,
                 shape: tuple[int, ...] | None = None) -> jax.Array:
  """Inverse of :func:`to_grouped` (``shape``: the local shard's)."""
  shape = shape or placement.shape
  transposed = tuple(shape[a] for a in placement.permutation)
  inverse = tuple(int(i) for i in np.argsort(placement.permutation))
  return jnp.transpose(x.reshape(transposed), inverse)


# ------------------------------------------------------------------------------
# Geometry: which axis of a parameter is divided.


def _group_first_axes(placement: Any) -> list[tuple[int, int]]:
  """Per grouped axis: ``(first original axis, product of the others)``."""
  axes = placement.permutation[placement.num_batch_axes:]
  grouped = placement.grouped_shape
  shape = placement.shape
  if len(grouped) == len(axes):
    return [(a, 1) for a in axes]
  # Grouped into (reduction, output): the split where the products match.
  for k in range(1, len(axes)):
    if (math.prod(shape[a] for a in axes[:k]) == grouped[0]
        and math.prod(shape[a] for a in axes[k:]) == grouped[1]):
      return [(axes[0], grouped[0] // max(shape[axes[0]], 1)),
              (axes[k], grouped[1] // max(shape[axes[k]], 1))]
  return []


def _segments_along(placement: Any, dim: int) -> list[tuple[int, int, int]]:
  """The ``(start, stop, blocks)`` segments of grouped axis ``dim``."""
  return sorted({(p.region[dim][0], p.region[dim][1], p.blocks[dim])
                 for p in placement.pieces})


def choose_geometry(placement: Any, num_shards: int) -> LeafGeometry:
  """How a parameter is divided over ``num_shards`` shards.

  Among the grouped matrix axes whose first original axis ``num_shards``
  divides, the one whose shards cut its units into the tallest parts
  ``h = gcd(rows per shard, every block boundary)``, then the longest, then
  the first. Without one, the first batch axis if ``num_shards`` divides it
  (units stay whole), else none (replicated).
  """
  shape = placement.shape
  if math.prod(shape) == 0:
    return LeafGeometry(REPLICATED)
  candidates = []
  for dim, (axis, rest) in enumerate(_group_first_axes(placement)):
    if shape[axis] % num_shards:
      continue
    rows = shape[axis] // num_shards * rest
    height = rows
    for start, stop, blocks in _segments_along(placement, dim):
      height = math.gcd(height, start, stop, (stop - start) // blocks)
    candidates.append((height, shape[axis], -axis, dim, rows))
  if candidates:
    height, _, axis, dim, rows = max(candidates)
    return LeafGeometry(ROWS, -axis, dim, rows, height)
  if placement.num_batch_axes:
    axis = placement.permutation[0]
    if shape[axis] % num_shards == 0:
      rows = shape[axis] // num_shards * (
          placement.num_slices // shape[axis])
      return LeafGeometry(SLICES, axis, -1, rows, 0)
  return LeafGeometry(REPLICATED)


def leaf_spec(geometry: LeafGeometry, ndim: int,
              axes: tuple[str, ...]) -> jax.sharding.PartitionSpec:
  """The partition spec the exchange expects of a parameter."""
  if geometry.axis is None:
    return jax.sharding.PartitionSpec()
  return jax.sharding.PartitionSpec(*[
      axes if a == geometry.axis else None for a in range(ndim)])


# ------------------------------------------------------------------------------
# The static plan: owners, lanes, and where every part goes.


@dataclasses.dataclass(frozen=True)
class _View:
  """A same-shape group of parts cut from one parameter's local shard.

  ``region``/``blocks`` per grouped axis, on the local grouped shard (the
  divided axis: its local rows, cut into parts of ``height``); the parts
  come out ``(n, height, row)`` in the order of :func:`blocks_to_units`
  with the divided axis (``lane_dim``) moved first.
  """

  leaf: int
  region: tuple[tuple[int, int], ...]
  blocks: tuple[int, ...]
  lane_dim: int
  height: int


@dataclasses.dataclass(frozen=True)
class _Lane:
  """Units of one stack cut into parts the same way: along one axis, in
  parts of equal height.

  Attributes:
    stack, dim, height: the stack, the unit axis the parts are cut along,
      and the rows of a part.
    length, row: the unit's length along ``dim`` and the length of a row
      (a part is ``height * row`` consecutive entries of the buffer).
    group: the exchange buffer (one per state dtype) the parts travel in.
    units: ``(N, K)`` lane slots per owner: index into the stack's local
      slots (``k`` for an empty lane slot).
    starts: ``(N, K, G)`` per lane slot and part, where the part starts in
      the received buffer (its end, ``N F``, for none).
    sources: ``(view index, (N, n) start of each of the view's local parts
      in the send buffer, N F where the part is not in this lane)``.
    shape, axes: the shape of the lane's units as cut from their
      parameters, and their order in the stack (a size bucket reorders and
      pads them; see :class:`soap_optax._stacks.Piece`).
  """

  stack: int
  dim: int
  height: int
  length: int
  row: int
  group: int
  units: np.ndarray
  starts: np.ndarray
  sources: tuple
  shape: tuple[int, ...] = ()
  axes: tuple[int, ...] | None = None

  @property
  def window(self) -> int:
    return self.height * self.row


@dataclasses.dataclass(frozen=True)
class Exchange:
  """Everything the exchange needs, derived from the plan (not stored in
  the state: :func:`tables` rebuilds it, cached).

  Attributes:
    num_shards: ``N``.
    views: the local parts of every parameter.
    lanes: per stack, its lanes.
    groups: per exchange buffer, ``(dtype, F)``: the buffer is ``[N, F]``,
      ``F`` the most entries one shard sends another.
  """

  num_shards: int
  views: tuple[_View, ...]
  lanes: tuple[tuple[_Lane, ...], ...]
  groups: tuple[tuple[str, int], ...]


def _unit_rows(shape: tuple[int, ...], dim: int) -> tuple[int, int]:
  """``(length along dim, row length)`` of a unit (a scalar is 1 x 1)."""
  if not shape:
    return 1, 1
  length = shape[dim]
  return length, (math.prod(shape) // length if length else
                  math.prod(shape[:dim] + shape[dim + 1:]))


def _enumerate_units(placements, stacks, geometries):
  """Per stack, per unit: ``(lane dim, part height, parts, shape, axes)``,
  ``parts`` a list of the shard that sends each part (-1: the owner
  itself), ``shape`` and ``axes`` the unit's own shape and its order in the
  stack (see :class:`soap_optax._stacks.Piece`)."""
  units = [[None] * stack.size for stack in stacks]
  for placement, geometry in zip(placements, geometries):
    for piece in placement.pieces:
      shape = piece.real_shape(stacks[piece.stack])
      grid = (placement.num_slices,) + piece.blocks
      for index in range(math.prod(grid)):
        position = np.unravel_index(index, grid)
        u = piece.offset + index
        if geometry.mode == ROWS:
          dim, height = geometry.dim, geometry.height
          start, stop = piece.region[dim]
          block = (stop - start) // piece.blocks[dim]
          first = start + int(position[1 + dim]) * block
          units[piece.stack][u] = (dim, height, [
              (first + p * height) // geometry.rows
              for p in range(block // height)], shape, piece.axes)
          continue
        length, _ = _unit_rows(shape, 0)
        sender = (int(position[0]) // geometry.rows
                  if geometry.mode == SLICES else -1)
        units[piece.stack][u] = (0, length, [sender] if length else [],
                                 shape, piece.axes)
  return units


def _part_size(shape: tuple[int, ...], dim: int, height: int) -> int:
  return height * _unit_rows(shape, dim)[1]


def _groups_of(stacks) -> tuple[list[str], list[int]]:
  """The exchange buffers (one per state dtype) and each stack's."""
  names = sorted({stack.dtype for stack in stacks})
  return names, [names.index(stack.dtype) for stack in stacks]


def assign(placements: Sequence[Any], stacks: Sequence[Any], mesh: Any,
           axes: tuple[str, ...]) -> _mesh.ShardedLayout:
  """The owners of every unit (see the module docstring), as a layout."""
  return _assign(tuple(placements), tuple(stacks), mesh, tuple(axes))


@functools.lru_cache(maxsize=64)
def _assign(placements, stacks, mesh, axes) -> _mesh.ShardedLayout:
  num_shards = math.prod(mesh.shape[a] for a in axes)
  geometries = tuple(choose_geometry(p, num_shards) for p in placements)
  units = _enumerate_units(placements, stacks, geometries)
  names, group_of = _groups_of(stacks)
  # Entries each shard sends each other shard, per exchange buffer; the
  # buffer's width F is the largest of them.
  pair = np.zeros((len(names), num_shards, num_shards), np.int64)
  width = np.zeros((len(names),), np.int64)
  work = np.zeros((num_shards,), np.int64)
  counts = np.zeros((len(stacks), num_shards), np.int64)
  caps = [-(-stack.size // num_shards) for stack in stacks]
  owners = [np.zeros((stack.size,), np.int64) for stack in stacks]
  order = sorted(((stack.layout.unit_cost, s, u)
                  for s, stack in enumerate(stacks)
                  for u in range(stack.size)),
                 key=lambda t: (-t[0], t[1], t[2]))
  shards = np.arange(num_shards)
  for cost, s, u in order:
    dim, height, parts, shape, _ = units[s][u]
    group, size = group_of[s], _part_size(shape, dim, height)
    senders: dict[int, int] = {}
    for sender in parts:
      senders[sender] = senders.get(sender, 0) + size
    if not senders:
      grown = np.zeros((num_shards,), np.int64)
    elif -1 in senders:  # replicated: the owner sends to itself
      grown = pair[group, shards, shards] + senders[-1]
    else:
      from_ = np.asarray(list(senders))
      sizes = np.asarray(list(senders.values()))[:, None]
      grown = np.max(pair[group, from_, :] + sizes, axis=0)
    growth = np.maximum(grown - width[group], 0)
    full = counts[s] >= caps[s]
    q = int(np.lexsort((shards, work, growth, full))[0])
    owners[s][u] = q
    counts[s, q] += 1
    work[q] += cost
    for sender, size in senders.items():
      pair[group, q if sender == -1 else sender, q] += size
    width[group] = max(width[group], int(grown[q]))
  # Slots: each owner's units of a stack in unit order.
  unit_slots, per_shard = [], []
  for s, stack in enumerate(stacks):
    k = caps[s]
    seen = np.zeros((num_shards,), np.int64)
    slots = []
    for u in range(stack.size):
      q = int(owners[s][u])
      slots.append(q * k + int(seen[q]))
      seen[q] += 1
    unit_slots.append(tuple(slots))
    per_shard.append(tuple(int(c) for c in counts[s]))
  return _mesh.ShardedLayout(
      mesh, axes, tuple(per_shard), unit_slots_=tuple(unit_slots),
      geometries=geometries)


def tables(plan: Any) -> Exchange:
  """The exchange of a sharded plan (cached)."""
  return _tables(plan.placements, plan.stacks, plan.sharding)


@functools.lru_cache(maxsize=64)
def _tables(placements, stacks, layout) -> Exchange:
  num_shards = layout.num_shards
  geometries = layout.geometries
  units = _enumerate_units(placements, stacks, geometries)
  names, group_of = _groups_of(stacks)
  owner_of = [layout.shard_of_units(s) for s in range(len(stacks))]
  local_slot = [layout.unit_slots(s) % max(layout.slots_per_shard(s), 1)
                for s in range(len(stacks))]

  # Lanes and their units, per owner in slot order.
  lane_keys: dict[tuple[Any, ...], list[list[int]]] = {}
  for s in range(len(stacks)):
    for u in np.argsort(layout.unit_slots(s), kind='stable'):
      dim, height, _, shape, axes = units[s][u]
      lane_keys.setdefault((s, dim, height, shape, axes), [
          [] for _ in range(num_shards)])[owner_of[s][u]].append(int(u))
  # Where every part sits in its pair's chunk: owners in order, their
  # lanes' units in slot order, parts in order.
  offsets = np.zeros((len(names), num_shards, num_shards), np.int64)
  placed = {}  # (s, u, part) -> (sender, owner, offset)
  for q in range(num_shards):
    for (s, dim, height, shape, _), per_owner in lane_keys.items():
      size = _part_size(shape, dim, height)
      for u in per_owner[q]:
        for p, sender in enumerate(units[s][u][2]):
          d = q if sender == -1 else sender
          placed[s, u, p] = (d, q, int(offsets[group_of[s], d, q]))
          offsets[group_of[s], d, q] += size
  widths = [int(offsets[g].max()) for g in range(len(names))]

  # Views: the local parts of every parameter.
  views = []
  for leaf, (placement, geometry) in enumerate(zip(placements, geometries)):
    if math.prod(placement.shape) == 0:
      continue
    if geometry.mode == ROWS:
      dim = geometry.dim
      others = sorted({tuple(p.region[j] + (p.blocks[j],)
                             for j in range(len(p.region)) if j != dim)
                       for p in placement.pieces})
      for combo in others:
        spans = list(combo)
        spans.insert(dim, (0, geometry.rows, geometry.rows // geometry.height))
        views.append(_View(leaf, tuple((a, b) for a, b, _ in spans),
                           tuple(k for _, _, k in spans), dim,
                           geometry.height))
    else:
      for piece in placement.pieces:
        views.append(_View(leaf, piece.region, piece.blocks, 0, _unit_rows(
            piece.real_shape(stacks[piece.stack]), 0)[0]))

  def locate(view, d):
    """Per local part of ``view`` on shard ``d``: ``(stack, unit, part)``."""
    placement = placements[view.leaf]
    geometry = geometries[view.leaf]
    slices = (geometry.rows if geometry.mode == SLICES
              else placement.num_slices)
    grid = (slices,) + view.blocks
    found = []
    for index in range(math.prod(grid)):
      position = [int(i) for i in np.unravel_index(index, grid)]
      slice_ = position[0] + (d * geometry.rows if geometry.mode == SLICES
                              else 0)
      region, block, part = list(view.region), list(position[1:]), 0
      if geometry.mode == ROWS:
        dim = geometry.dim
        row = d * geometry.rows + position[1 + dim] * geometry.height
        for start, stop, count in _segments_along(placement, dim):
          if start <= row < stop:
            length = (stop - start) // count
            region[dim] = (start, stop)
            block[dim] = (row - start) // length
            part = (row - start) % length // geometry.height
            break
      piece = next(p for p in placement.pieces if p.region == tuple(region))
      u = piece.offset + int(np.ravel_multi_index(
          [slice_] + block, (placement.num_slices,) + piece.blocks))
      found.append((piece.stack, u, part))
    return found

  located = [[locate(view, d) for d in range(num_shards)] for view in views]

  lanes_per_stack = [[] for _ in stacks]
  for (s, dim, height, shape, axes), per_owner in lane_keys.items():
    group = group_of[s]
    nowhere = num_shards * widths[group]
    length, row = _unit_rows(shape, dim)
    parts = length // height if height else 0
    k = layout.slots_per_shard(s)
    count = max(len(m) for m in per_owner)
    lane_units = np.full((num_shards, count), k, np.int64)
    starts = np.full((num_shards, count, max(parts, 1)), nowhere, np.int64)
    for q, members in enumerate(per_owner):
      for j, u in enumerate(members):
        lane_units[q, j] = local_slot[s][u]
        for p in range(len(units[s][u][2])):
          d, _, offset = placed[s, u, p]
          starts[q, j, p] = d * widths[group] + offset
    sources = []
    for v, view in enumerate(views):
      if (view.lane_dim, view.height) != (dim, height):
        continue
      table = np.full((num_shards, len(located[v][0])), nowhere, np.int64)
      for d in range(num_shards):
        for t, (stack, u, part) in enumerate(located[v][d]):
          if (stack == s and units[s][u][3:] == (shape, axes)
              and placed[s, u, part][0] == d):
            _, q, offset = placed[s, u, part]
            table[d, t] = q * widths[group] + offset
      if np.any(table != nowhere):
        sources.append((v, table))
    lanes_per_stack[s].append(_Lane(s, dim, height, length, row, group,
                                    lane_units, starts, tuple(sources),
                                    shape, axes))
  return Exchange(num_shards, tuple(views),
                  tuple(tuple(l) for l in lanes_per_stack),
                  tuple(zip(names, widths)))


# ------------------------------------------------------------------------------
# The exchange itself.


def _local_shape(placement: Any, geometry: LeafGeometry, num_shards: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(local leaf shape, local grouped shape)`` of one shard."""
  shape = list(placement.shape)
  grouped = [placement.num_slices] + list(placement.grouped_shape)
  if geometry.axis is not None:
    shape[geometry.axis] //= num_shards
    grouped[1 + geometry.dim] = geometry.rows
  return tuple(shape), tuple(grouped)


def _view_parts(grouped: jax.Array, view: _View) -> jax.Array:
  """``(n, height, row)``: the view's parts of a local grouped shard."""
  region = grouped[(slice(None),) + tuple(slice(a, b) for a, b in view.region)]
  parts = blocks_to_units(region, view.blocks)
  if parts.ndim == 1:  # scalar units
    parts = parts[:, None]
  parts = jnp.moveaxis(parts, 1 + view.lane_dim, 1)
  return parts.reshape(parts.shape[:2] + (-1,))


def _parts_to_region(parts: jax.Array, view: _View, slices: int
                     ) -> jax.Array:
  """Inverse of :func:`_view_parts`."""
  dim = view.lane_dim
  lengths = [b - a for a, b in view.region]
  blocks = [length // k for length, k in zip(lengths, view.blocks)]
  if not blocks:
    return parts.reshape((slices,))
  moved = [blocks[dim]] + blocks[:dim] + blocks[dim + 1:]
  units = jnp.moveaxis(parts.reshape((parts.shape[0],) + tuple(moved)), 1,
                       1 + dim)
  return units_to_blocks(units, slices, view.blocks)


def _take_windows(flat: jax.Array, starts: jax.Array, size: int
                  ) -> jax.Array:
  """``(m, size)``: ``flat[start:start + size]`` for each start (zeros
  where the window is out of bounds)."""
  numbers = jax.lax.GatherDimensionNumbers(
      offset_dims=(1,), collapsed_slice_dims=(), start_index_map=(0,))
  return jax.lax.gather(
      flat, starts.reshape(-1, 1), numbers, slice_sizes=(size,),
      mode=jax.lax.GatherScatterMode.FILL_OR_DROP, fill_value=0)


def _put_windows(flat: jax.Array, starts: jax.Array, windows: jax.Array
                 ) -> jax.Array:
  """``flat`` with ``windows[i]`` written at ``starts[i]`` (dropped where
  out of bounds)."""
  numbers = jax.lax.ScatterDimensionNumbers(
      update_window_dims=(1,), inserted_window_dims=(),
      scatter_dims_to_operand_dims=(0,))
  return jax.lax.scatter(
      flat, starts.reshape(-1, 1), windows.reshape(starts.size, -1), numbers,
      mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _shard_index(layout: _mesh.ShardedLayout) -> jax.Array:
  return jax.lax.axis_index(layout.axes)


def leaf_specs(plan: Any) -> list[jax.sharding.PartitionSpec]:
  """Per parameter, the partition spec the exchange expects."""
  layout = plan.sharding
  return [leaf_spec(g, len(p.shape), layout.axes)
          for g, p in zip(layout.geometries, plan.placements)]


def _exchanged(buffers: list[jax.Array], exchange: Exchange, layout
               ) -> list[jax.Array]:
  """One ``all_to_all`` per exchange buffer ``(N F,)``: chunk ``q`` to
  shard ``q``; chunk ``d`` of the result came from shard ``d``."""
  n = exchange.num_shards
  return [buffer if not width else jax.lax.all_to_all(
      buffer.reshape(n, width), layout.axes, 0, 0, tiled=True).reshape(-1)
          for buffer, (_, width) in zip(buffers, exchange.groups)]


def gather(leaves: Sequence[jax.Array], plan: Any) -> list[jax.Array]:
  """Gradients to the owners' stacks ``(N k, *merged_shape)``, divided over
  the shard axes: one ``all_to_all`` per state dtype."""
  layout, exchange = plan.sharding, tables(plan)
  n = exchange.num_shards
  dtypes = [plan.stacks[p.pieces[0].stack].dtype for p in plan.placements]

  def body(*local):
    q = _shard_index(layout)
    grouped = [
        None if math.prod(p.shape) == 0 else to_grouped(
            x.astype(dtype), p, _local_shape(p, g, n)[1])
        for x, p, g, dtype in zip(local, plan.placements, layout.geometries,
                                  dtypes)]
    parts = [_view_parts(grouped[v.leaf], v) for v in exchange.views]
    buffers = [jnp.zeros((n * width,), dtype)
               for dtype, width in exchange.groups]
    for lanes in exchange.lanes:
      for lane in lanes:
        for v, table in lane.sources:
          buffers[lane.group] = _put_windows(
              buffers[lane.group], jnp.asarray(table)[q], parts[v])
    received = _exchanged(buffers, exchange, layout)
    stacked = []
    for s, stack in enumerate(plan.stacks):
      lanes = exchange.lanes[s]
      k = layout.slots_per_shard(s)
      units = []
      for lane in lanes:
        count = lane.units.shape[1]
        if lane.window:
          rows = _take_windows(received[lane.group],
                               jnp.asarray(lane.starts)[q], lane.window)
        else:
          rows = jnp.zeros((count, lane.length, lane.row), stack.dtype)
        units.append(_lane_to_units(
            rows.reshape(count, lane.length, lane.row), lane, stack))
      if not lanes:  # a stack without units
        stacked.append(jnp.zeros((k,) + stack.layout.merged_shape,
                                 stack.dtype))
      elif _in_slot_order(lanes, k):
        stacked.append(units[0])
      else:  # local slot j <- the lane slot that holds it
        stacked.append(jnp.concatenate(units).at[
            jnp.asarray(_slot_sources(lanes, k, n))[q]].get(
                mode='fill', fill_value=0))
    return stacked

  specs = leaf_specs(plan)
  # The one place a gradient may move before the exchange: where it is not
  # laid out as the exchange expects (one reshard of that gradient).
  leaves = [_mesh.constrain(x, layout.mesh, spec)
            for x, spec in zip(leaves, specs)]
  return jax.shard_map(
      body, mesh=_mesh.context_mesh(layout.mesh), in_specs=tuple(specs),
      out_specs=[layout.spec] * len(plan.stacks), check_vma=False)(*leaves)


def scatter(stacked: Sequence[jax.Array], plan: Any) -> list[jax.Array]:
  """Inverse of :func:`gather`: the owners' stacks back to parameter-shaped
  arrays in the layout :func:`leaf_specs` gives (a replicated parameter's
  update is summed over the shards: only its owner's is not zero)."""
  layout, exchange = plan.sharding, tables(plan)
  n = exchange.num_shards

  def body(*local):
    q = _shard_index(layout)
    buffers = [jnp.zeros((n * width,), dtype)
               for dtype, width in exchange.groups]
    for s, stack in enumerate(plan.stacks):
      lanes = exchange.lanes[s]
      in_order = _in_slot_order(lanes, layout.slots_per_shard(s))
      for lane in lanes:
        if not lane.window:
          continue
        units = local[s] if in_order else local[s].at[
            jnp.asarray(lane.units)[q]].get(mode='fill', fill_value=0)
        buffers[lane.group] = _put_windows(
            buffers[lane.group], jnp.asarray(lane.starts)[q],
            _units_to_lane(units, lane, stack))
    received = _exchanged(buffers, exchange, layout)
    parts = [None] * len(exchange.views)
    for lanes in exchange.lanes:
      for lane in lanes:
        for v, table in lane.sources:
          got = _take_windows(received[lane.group], jnp.asarray(table)[q],
                              lane.window).reshape(-1, lane.height, lane.row)
          parts[v] = got if parts[v] is None else parts[v] + got
    outputs = []
    for leaf, (placement, geometry) in enumerate(
        zip(plan.placements, layout.geometries)):
      shape, grouped = _local_shape(placement, geometry, n)
      dtype = plan.stacks[placement.pieces[0].stack].dtype
      if math.prod(placement.shape) == 0:
        outputs.append(jnp.zeros(shape, dtype))
        continue
      regions = {}
      for v, view in enumerate(exchange.views):
        if view.leaf == leaf:  # every view feeds a lane: its parts came back
          regions[view.region] = _parts_to_region(parts[v], view, grouped[0])
      x = from_grouped(assemble(regions) if placement.grouped_shape
                       else regions[()].reshape(grouped), placement, shape)
      if geometry.mode == REPLICATED:
        x = jax.lax.psum(x, layout.axes)
      outputs.append(x)
    return outputs

  stacked = [_mesh.place(x, layout) for x in stacked]
  return jax.shard_map(
      body, mesh=_mesh.context_mesh(layout.mesh),
      in_specs=tuple([layout.spec] * len(plan.stacks)),
      out_specs=leaf_specs(plan), check_vma=False)(*stacked)


def _lane_to_units(rows: jax.Array, lane: _Lane, stack: Any) -> jax.Array:
  """``(K, length, row)`` in the lane's order to ``(K, *merged_shape)``."""
  shape = lane.shape
  if not shape:
    return rows.reshape((rows.shape[0],) + stack.layout.merged_shape)
  moved = (lane.length,) + shape[:lane.dim] + shape[lane.dim + 1:]
  units = jnp.moveaxis(rows.reshape((rows.shape[0],) + moved), 1,
                       1 + lane.dim)
  units = units_to_stack(units, shape, lane.axes, stack.unit_shape)
  return units.reshape((rows.shape[0],) + stack.layout.merged_shape)


def _units_to_lane(units: jax.Array, lane: _Lane, stack: Any) -> jax.Array:
  """Inverse of :func:`_lane_to_units`: ``(K, length, row)``."""
  shape = lane.shape
  k = units.shape[0]
  if not shape:
    return units.reshape(k, 1, 1)
  units = stack_to_units(units.reshape((k,) + stack.unit_shape), shape,
                         lane.axes)
  units = jnp.moveaxis(units, 1 + lane.dim, 1)
  return units.reshape(k, lane.length, lane.row)


def _in_slot_order(lanes: Sequence[_Lane], slots: int) -> bool:
  """Whether the stack's one lane holds every shard's units in its slots'
  order (lane slot j is local slot j, padding last): no reordering."""
  if len(lanes) != 1 or lanes[0].units.shape[1] != slots:
    return False
  units = lanes[0].units
  return bool(np.all((units == np.arange(slots)) | (units == slots)))


def _slot_sources(lanes: Sequence[_Lane], slots: int, n: int) -> np.ndarray:
  """``(N, k)``: for each local slot, its row in the lanes' units joined
  (the total for a padding slot)."""
  total = sum(lane.units.shape[1] for lane in lanes)
  order = np.full((n, slots), total, np.int64)
  start = 0
  for lane in lanes:
    for q in range(n):
      for j, slot in enumerate(lane.units[q]):
        if slot < slots:
          order[q, slot] = start + j
    start += lane.units.shape[1]
  return order
