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

**One exchange in, one out, per stack.** Inside ``jax.shard_map``, each
device cuts its gradient shards into *parts*: ``h`` consecutive rows of a
unit along the divided axis (a whole unit where the division runs along a
batch axis or the parameter is replicated), packs them into one send buffer
``[N, M, row]`` per stack (rows of the same length, ``M`` the most rows one
device sends another), and one ``jax.lax.all_to_all`` delivers every part to
its unit's owner, which assembles its units. The update's rows go back the
same way, to the same places. Everything between the two exchanges is the
owners' local work; a replicated parameter's update is summed over the
shards (only its owner's part is non-zero).

**The owners** come from a static, deterministic plan (:func:`assign`):
units from the most to the least expensive (refresh ``sum d^3`` plus the
step), each to the shard that keeps the stack's send buffer smallest, then
has the least work so far, with at most ``ceil(U / N)`` units of a stack per
shard (so the state stays within one unit of an even share per stack).
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
SLICES = 'slices'      # along its first batch axis: whole units, local
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
  """Units of one stack exchanged along one axis (rows of equal length).

  Attributes:
    stack, dim: the stack and the unit axis the parts are cut along.
    length, row: the unit's length along ``dim`` and the length of a row.
    depth: ``M``, the most rows one shard sends another in this lane.
    units: ``(N, K)`` lane slots per owner: index into the stack's local
      slots (``k`` for an empty lane slot).
    starts: ``(N, K, G)`` per lane slot and part, the part's first row in
      the received ``[N M, row]`` buffer (``N M`` for none).
    heights: ``(N, K)`` rows per part of the unit in each lane slot.
    sources: ``(view index, (N, n) first row of each part in the send
      buffer, N M where the part is not in this lane)``.
  """

  stack: int
  dim: int
  length: int
  row: int
  depth: int
  units: np.ndarray
  starts: np.ndarray
  heights: np.ndarray
  sources: tuple


@dataclasses.dataclass(frozen=True)
class Exchange:
  """Everything the exchange needs, derived from the plan (not stored in
  the state: :func:`tables` rebuilds it, cached)."""

  num_shards: int
  views: tuple[_View, ...]
  lanes: tuple[tuple[_Lane, ...], ...]  # per stack


def _unit_rows(shape: tuple[int, ...], dim: int) -> tuple[int, int]:
  """``(length along dim, row length)`` of a unit (a scalar is 1 x 1)."""
  if not shape:
    return 1, 1
  length = shape[dim]
  return length, (math.prod(shape) // length if length else
                  math.prod(shape[:dim] + shape[dim + 1:]))


def _enumerate_units(placements, stacks, geometries, num_shards):
  """Per stack, per unit: ``(leaf, lane dim, parts)`` where ``parts`` is a
  list of ``(sender shard or -1 for the owner, rows)``."""
  units = [[None] * stack.size for stack in stacks]
  for leaf, (placement, geometry) in enumerate(zip(placements, geometries)):
    for piece in placement.pieces:
      shape = stacks[piece.stack].unit_shape
      grid = (placement.num_slices,) + piece.blocks
      for index in range(math.prod(grid)):
        position = np.unravel_index(index, grid)
        u = piece.offset + index
        if geometry.mode == ROWS:
          dim = geometry.dim
          start, stop = piece.region[dim]
          block = (stop - start) // piece.blocks[dim]
          first = start + int(position[1 + dim]) * block
          parts = [((first + p * geometry.height) // geometry.rows,
                    geometry.height)
                   for p in range(block // geometry.height)]
          units[piece.stack][u] = (leaf, dim, parts)
          continue
        length, _ = _unit_rows(shape, 0)
        sender = (int(position[0]) // geometry.rows
                  if geometry.mode == SLICES else -1)
        units[piece.stack][u] = (leaf, 0, [(sender, length)] if length
                                 else [])
  return units


def _unit_cost(stack: Any) -> int:
  sizes = stack.layout.factor_sizes
  size = max(1, math.prod(stack.unit_shape))
  return sum(d**3 for d in sizes) + size * (1 + sum(sizes))


def assign(placements: Sequence[Any], stacks: Sequence[Any], mesh: Any,
           axes: tuple[str, ...]) -> _mesh.ShardedLayout:
  """The owners of every unit (see the module docstring), as a layout."""
  return _assign(tuple(placements), tuple(stacks), mesh, tuple(axes))


@functools.lru_cache(maxsize=64)
def _assign(placements, stacks, mesh, axes) -> _mesh.ShardedLayout:
  num_shards = math.prod(mesh.shape[a] for a in axes)
  geometries = tuple(choose_geometry(p, num_shards) for p in placements)
  units = _enumerate_units(placements, stacks, geometries, num_shards)
  lane_of = {}
  for s, per_unit in enumerate(units):
    for leaf, dim, _ in per_unit:
      lane_of.setdefault((s, dim), len(lane_of))
  pair_rows = np.zeros((len(lane_of), num_shards, num_shards), np.int64)
  depth = np.zeros((len(lane_of),), np.int64)
  work = np.zeros((num_shards,), np.int64)
  counts = np.zeros((len(stacks), num_shards), np.int64)
  caps = [-(-stack.size // num_shards) for stack in stacks]
  owners = [np.zeros((stack.size,), np.int64) for stack in stacks]
  order = sorted(((_unit_cost(stack), s, u) for s, stack in enumerate(stacks)
                  for u in range(stack.size)), key=lambda t: (-t[0], t[1], t[2]))
  shards = np.arange(num_shards)
  for cost, s, u in order:
    _, dim, parts = units[s][u]
    lane = lane_of[s, dim]
    senders: dict[int, int] = {}
    for sender, rows in parts:
      senders[sender] = senders.get(sender, 0) + rows
    if not senders:
      grown = np.zeros((num_shards,), np.int64)
    elif -1 in senders:  # replicated: the owner sends to itself
      grown = pair_rows[lane, shards, shards] + senders[-1]
    else:
      from_ = np.asarray(list(senders))
      rows = np.asarray(list(senders.values()))[:, None]
      grown = np.max(pair_rows[lane, from_, :] + rows, axis=0)
    growth = np.maximum(grown - depth[lane], 0)
    full = counts[s] >= caps[s]
    key = np.lexsort((shards, work, growth, full))
    q = int(key[0])
    owners[s][u] = q
    counts[s, q] += 1
    work[q] += cost
    for sender, rows in senders.items():
      d = q if sender == -1 else sender
      pair_rows[lane, d, q] += rows
    depth[lane] = max(depth[lane], int(grown[q]))
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
  units = _enumerate_units(placements, stacks, geometries, num_shards)
  owner_of = [np.asarray(layout.unit_slots(s)) // max(layout.slots_per_shard(s), 1)
              for s in range(len(stacks))]
  local_slot = [np.asarray(layout.unit_slots(s)) % max(layout.slots_per_shard(s), 1)
                for s in range(len(stacks))]

  # Lanes and their units, per owner in slot order.
  lane_keys: dict[tuple[int, int], list[list[int]]] = {}
  for s in range(len(stacks)):
    for u in np.argsort(layout.unit_slots(s), kind='stable'):
      _, dim, _ = units[s][u]
      per_owner = lane_keys.setdefault(
          (s, dim), [[] for _ in range(num_shards)])
      per_owner[owner_of[s][u]].append(int(u))
  # Rows each sender sends each owner, part by part, in the owners' order.
  placed_parts = {}  # (s, u, part) -> (sender, owner, offset)
  depths = {}
  for (s, dim), per_owner in lane_keys.items():
    offsets = np.zeros((num_shards, num_shards), np.int64)
    for q, members in enumerate(per_owner):
      for u in members:
        for p, (sender, rows) in enumerate(units[s][u][2]):
          d = q if sender == -1 else sender
          placed_parts[s, u, p] = (d, q, int(offsets[d, q]))
          offsets[d, q] += rows
    depths[s, dim] = int(offsets.max()) if offsets.size else 0

  # Views: the local parts of every parameter, and where each goes.
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
        shape = stacks[piece.stack].unit_shape
        views.append(_View(leaf, piece.region, piece.blocks, 0,
                           _unit_rows(shape, 0)[0]))

  # Which (unit, part) each local part of each view is, per shard.
  def locate(view, d):
    """Per local part of ``view`` on shard ``d``: (stack, unit, part) or
    None."""
    placement = placements[view.leaf]
    geometry = geometries[view.leaf]
    slices = (geometry.rows if geometry.mode == SLICES
              else placement.num_slices)
    grid = (slices,) + view.blocks
    found = []
    for index in range(math.prod(grid)):
      position = [int(i) for i in np.unravel_index(index, grid)]
      slice_ = position[0]
      if geometry.mode == SLICES:
        slice_ += d * geometry.rows
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
      piece = next(p for p in placement.pieces
                   if p.region == tuple(region))
      grid_unit = (placement.num_slices,) + piece.blocks
      u = piece.offset + int(np.ravel_multi_index(
          [slice_] + block, grid_unit))
      found.append((piece.stack, u, part))
    return found

  located = [[locate(view, d) for d in range(num_shards)] for view in views]

  lanes_per_stack = [[] for _ in stacks]
  for (s, dim), per_owner in lane_keys.items():
    depth = depths[s, dim]
    length, row = _unit_rows(stacks[s].unit_shape, dim)
    nowhere = num_shards * depth
    width = max(len(m) for m in per_owner)
    parts_max = max([len(units[s][u][2]) for m in per_owner for u in m],
                    default=0)
    k = layout.slots_per_shard(s)
    lane_units = np.full((num_shards, width), k, np.int64)
    starts = np.full((num_shards, width, max(parts_max, 1)), nowhere,
                     np.int64)
    heights = np.full((num_shards, width), max(length, 1), np.int64)
    for q, members in enumerate(per_owner):
      for j, u in enumerate(members):
        lane_units[q, j] = local_slot[s][u]
        parts = units[s][u][2]
        if parts:
          heights[q, j] = parts[0][1]
        for p in range(len(parts)):
          d, _, offset = placed_parts[s, u, p]
          starts[q, j, p] = d * depth + offset
    sources = []
    for v, view in enumerate(views):
      if view.lane_dim != dim:
        continue
      table = np.full((num_shards, len(located[v][0])), nowhere, np.int64)
      used = False
      for d in range(num_shards):
        for t, (stack, u, part) in enumerate(located[v][d]):
          if stack != s:
            continue
          sender, q, offset = placed_parts[s, u, part]
          if sender != d:  # replicated: only the owner sends
            continue
          table[d, t] = q * depth + offset
          used = True
      if used:
        sources.append((v, table))
    lanes_per_stack[s].append(_Lane(s, dim, length, row, depth, lane_units,
                                    starts, heights, tuple(sources)))
  return Exchange(num_shards, tuple(views),
                  tuple(tuple(l) for l in lanes_per_stack))


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


def _rows(starts: jax.Array, heights: jax.Array, length: int) -> jax.Array:
  """``(K, length)`` row indices of units assembled from parts."""
  rho = jnp.arange(length)
  part = rho[None, :] // heights[:, None]
  first = jnp.take_along_axis(starts, jnp.minimum(part, starts.shape[1] - 1),
                              axis=1)
  return first + rho[None, :] % heights[:, None]


def _shard_index(layout: _mesh.ShardedLayout) -> jax.Array:
  return jax.lax.axis_index(layout.axes)


def leaf_specs(plan: Any) -> list[jax.sharding.PartitionSpec]:
  layout = plan.sharding
  return [leaf_spec(g, len(p.shape), layout.axes)
          for g, p in zip(layout.geometries, plan.placements)]


def gather(leaves: Sequence[jax.Array], plan: Any) -> list[jax.Array]:
  """Gradients to the owners' stacks ``(N k, *merged_shape)``, divided over
  the shard axes: one ``all_to_all`` per stack."""
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
    stacked = []
    for s, stack in enumerate(plan.stacks):
      lanes = exchange.lanes[s]
      buffers = []
      for lane in lanes:
        buffer = jnp.zeros((n * lane.depth, lane.row), stack.dtype)
        for v, table in lane.sources:
          first = jnp.asarray(table)[q]
          height = exchange.views[v].height
          rows = (first[:, None] + jnp.arange(height)).reshape(-1)
          buffer = buffer.at[rows].set(parts[v].reshape(-1, lane.row),
                                       mode='drop')
        buffers.append(buffer.reshape(n, -1))
      received = _all_to_all(buffers, layout)
      units = []
      for lane, buffer in zip(lanes, received):
        rows = _rows(jnp.asarray(lane.starts)[q], jnp.asarray(lane.heights)[q],
                     lane.length)
        got = buffer.reshape(-1, lane.row).at[rows].get(
            mode='fill', fill_value=0)
        units.append(_lane_to_units(got, lane, stack))
      k = layout.slots_per_shard(s)
      if not lanes:  # a stack without units
        stacked.append(jnp.zeros((k,) + stack.layout.merged_shape,
                                 stack.dtype))
        continue
      if _in_slot_order(lanes, k):
        stacked.append(units[0])
        continue
      joined = jnp.concatenate(units)
      # Local slot j <- the lane slot that holds it.
      order = _slot_sources(lanes, k, n)
      stacked.append(joined.at[jnp.asarray(order)[q]].get(
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
  arrays in the layout :func:`leaf_specs` gives."""
  layout, exchange = plan.sharding, tables(plan)
  n = exchange.num_shards

  def body(*local):
    q = _shard_index(layout)
    received = []
    for s, stack in enumerate(plan.stacks):
      lanes = exchange.lanes[s]
      buffers = []
      in_order = _in_slot_order(lanes, layout.slots_per_shard(s))
      for lane in lanes:
        units = local[s] if in_order else local[s].at[
            jnp.asarray(lane.units)[q]].get(mode='fill', fill_value=0)
        rows = _rows(jnp.asarray(lane.starts)[q], jnp.asarray(lane.heights)[q],
                     lane.length)
        buffer = jnp.zeros((n * lane.depth, lane.row), stack.dtype)
        buffer = buffer.at[rows.reshape(-1)].set(
            _units_to_lane(units, lane, stack).reshape(-1, lane.row),
            mode='drop')
        buffers.append(buffer.reshape(n, -1))
      received.append(_all_to_all(buffers, layout))
    parts = [None] * len(exchange.views)
    for s, lanes in enumerate(exchange.lanes):
      for lane, buffer in zip(lanes, received[s]):
        buffer = buffer.reshape(-1, lane.row)
        for v, table in lane.sources:
          height = exchange.views[v].height
          rows = jnp.asarray(table)[q][:, None] + jnp.arange(height)
          got = buffer.at[rows].get(mode='fill', fill_value=0)
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
        if view.leaf != leaf:
          continue
        got = parts[v]
        if got is None:
          got = jnp.zeros(_view_parts_shape(view, grouped), dtype)
        regions[view.region] = _parts_to_region(got, view, grouped[0])
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


def _view_parts_shape(view: _View, grouped: tuple[int, ...]
                      ) -> tuple[int, int, int]:
  lengths = [b - a for a, b in view.region]
  count = grouped[0] * math.prod(view.blocks)
  blocks = [length // k for length, k in zip(lengths, view.blocks)]
  if not blocks:
    return count, 1, 1
  return count, blocks[view.lane_dim], math.prod(
      blocks[:view.lane_dim] + blocks[view.lane_dim + 1:])


def _all_to_all(buffers: list[jax.Array], layout) -> list[jax.Array]:
  """One ``all_to_all`` of the lanes' ``[N, ...]`` buffers, concatenated."""
  widths = [b.shape[1] for b in buffers]
  if not sum(widths):
    return buffers
  joined = buffers[0] if len(buffers) == 1 else jnp.concatenate(buffers, 1)
  received = jax.lax.all_to_all(joined, layout.axes, 0, 0, tiled=True)
  out, start = [], 0
  for width in widths:
    out.append(received[:, start:start + width])
    start += width
  return out


def _lane_to_units(rows: jax.Array, lane: _Lane, stack: Any) -> jax.Array:
  """``(K, length, row)`` in the lane's order to ``(K, *merged_shape)``."""
  shape = stack.unit_shape
  if not shape:
    return rows.reshape((rows.shape[0],) + stack.layout.merged_shape)
  moved = (lane.length,) + shape[:lane.dim] + shape[lane.dim + 1:]
  units = jnp.moveaxis(rows.reshape((rows.shape[0],) + moved), 1,
                       1 + lane.dim)
  return units.reshape((rows.shape[0],) + stack.layout.merged_shape)


def _units_to_lane(units: jax.Array, lane: _Lane, stack: Any) -> jax.Array:
  """Inverse of :func:`_lane_to_units`: ``(K, length, row)``."""
  shape = stack.unit_shape
  k = units.shape[0]
  if not shape:
    return units.reshape(k, 1, 1)
  units = jnp.moveaxis(units.reshape((k,) + shape), 1 + lane.dim, 1)
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
