"""Tests of soap_optax._stacks: batch axes, blocks, grouping, one update per shape.

The reference for "a slice (or block) is optimized exactly as if the transform
ran on it alone" is literally that: a separate optimizer state per slice or
block, driven with the slice's gradients, in float64.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import soap_optax
from soap_optax import _floors
from soap_optax import _kronecker
from soap_optax import _solvers
from soap_optax import _stacks
from tests.oracle import soap_numpy
from tests.test_engine import count_primitives

Dims = soap_optax.EigenbasisDimensionNumbers

# Every transform and alias, with settings that refresh often (eigh at the
# first call, then every 2 calls) and no weight decay (so that a zero gradient
# must give a zero update).
def _every(**kw):
  """The common keywords: refresh every 2 calls, and ``kw``."""
  return dict(precondition_frequency=2, **kw)


FACTORIES = {
    'soap': lambda **kw: soap_optax.soap(
        0.1, b1=0.9, weight_decay=0.0, **_every(**kw)),
    'factorized_soap': lambda **kw: soap_optax.factorized_soap(
        0.1, b1=0.9, weight_decay=0.0, **_every(**kw)),
    'one_sided_soap': lambda **kw: soap_optax.soap(
        0.1, b1=0.9, weight_decay=0.0, one_sided=True, **_every(**kw)),
    'shampoo': lambda **kw: soap_optax.shampoo(
        0.1, weight_decay=0.0, eps=1e-6, **_every(**kw)),
    # eps well above round-off (here and for Shampoo): a block's factor is
    # rank-deficient after one gradient, and with eps ~ 0 the rotated
    # gradient's round-off in the null space is divided by the factor's
    # round-off there, which a batched and an unbatched product round
    # differently (measured: 2e-8 relative at eps=1e-20, 4e-10 for Shampoo at
    # eps=1e-12). Shampoo refreshes with eigh: QR of GG Q on a rank-deficient
    # factor orthonormalizes round-off in the null-space columns.
    'adafactor_in_eigenbasis': lambda **kw: (
        soap_optax.scale_by_adafactor_in_eigenbasis(eps=1e-6, **_every(**kw))),
}
NUM_CALLS = 7  # refreshes at calls 0 (eigh), 2, 4 and 6.


def _relative_error(got, expected):
  scale = max(float(np.max(np.abs(expected))), 1e-300)
  return float(np.max(np.abs(np.asarray(got) - expected))) / scale


def _independent_updates(factory, pieces_per_call):
  """Updates of one separate optimizer per piece, driven piece by piece.

  Args:
    factory: builds the optimizer (no dimension numbers, no blocks).
    pieces_per_call: per call, a list of the pieces' gradients.

  Returns:
    Per call, the list of the pieces' updates.
  """
  tx = factory()
  update = jax.jit(tx.update)
  states = [tx.init({'w': jnp.asarray(g)}) for g in pieces_per_call[0]]
  outputs = []
  for pieces in pieces_per_call:
    call = []
    for k, g in enumerate(pieces):
      params = {'w': jnp.zeros_like(jnp.asarray(g))}
      out, states[k] = update({'w': jnp.asarray(g)}, states[k], params)
      call.append(np.asarray(out['w']))
    outputs.append(call)
  return outputs


def _stacked_updates(factory, grads_per_call, **kwargs):
  tx = factory(**kwargs)
  update = jax.jit(tx.update)
  params = {'w': jnp.zeros(grads_per_call[0].shape)}
  state = tx.init(params)
  outputs = []
  for g in grads_per_call:
    out, state = update({'w': jnp.asarray(g)}, state, params)
    outputs.append(np.asarray(out['w']))
  assert update._cache_size() == 1  # pylint: disable=protected-access
  return outputs


def _gradients(shape, zero_slice, seed):
  rng = np.random.default_rng(seed)
  grads = [rng.normal(size=shape) for _ in range(NUM_CALLS)]
  for g in grads:
    g[zero_slice] = 0.0
  return grads


@pytest.mark.parametrize('name', sorted(FACTORIES))
@pytest.mark.parametrize('shape, batch_axes, zero_slice', [
    ((3, 6, 6), (0,), (1,)),              # [L, m, n], layer 1 has no gradient.
    ((2, 3, 4, 4), (0, 1), (1, 0)),       # [L, H, m, n], head (1, 0).
    ((6, 3, 6), (-2,), (slice(None), 2)),  # a middle, negative batch axis.
    ((3, 5), (0,), (1,)),                 # slices without a factor: vectors,
    ((4,), (0,), (2,)),                   # and scalars.
])
def test_batch_axes_equal_independent_runs_per_slice(
    x64, name, shape, batch_axes, zero_slice):
  del x64
  factory = FACTORIES[name]
  grads = _gradients(shape, zero_slice, seed=0)
  stacked = _stacked_updates(
      factory, grads, dimension_numbers=Dims(batch_axes=batch_axes))

  batch = tuple(a % len(shape) for a in batch_axes)
  moved = [np.moveaxis(g, batch, range(len(batch))) for g in grads]
  slice_shape = moved[0].shape[len(batch):]
  pieces = [list(m.reshape((-1,) + slice_shape)) for m in moved]
  expected = _independent_updates(factory, pieces)

  zero_index = np.ravel_multi_index(
      tuple(0 if isinstance(i, slice) else i for i in np.index_exp[zero_slice]),
      tuple(shape[a] for a in batch)) if len(batch) > 1 else (
          [i for i in np.index_exp[zero_slice] if not isinstance(i, slice)][0])
  for call, (got, want) in enumerate(zip(stacked, expected)):
    got_pieces = np.moveaxis(got, batch, range(len(batch))).reshape(
        (-1,) + slice_shape)
    want = np.stack(want)
    assert _relative_error(got_pieces, want) < 1e-12, call
    np.testing.assert_array_equal(got_pieces[zero_index], 0.0)
    if call > 0:
      assert np.max(np.abs(want)) > 0


def _blocks(x, block_size):
  """The blocks of a matrix, row-major over the block grid, in NumPy."""
  rows = range(0, x.shape[0], block_size)
  cols = range(0, x.shape[1], block_size)
  return [x[r:r + block_size, c:c + block_size] for r in rows for c in cols]


@pytest.mark.parametrize('name', sorted(FACTORIES))
def test_blocks_equal_independent_runs_per_block(x64, name):
  """An uneven grid of blocks: 64 and 44 rows by 64 and 44 columns.

  ``max_precond_dim=63`` leaves the 64-long axes unrotated, so every factor
  (44 x 44) is full rank from the first call. (A thin block's long-side
  factor is rank-deficient for many calls, and the basis of its null space
  is whatever the decomposition's rounding makes it: a batched and an
  unbatched program pick different ones, and a later gradient's components
  in that null space are normalized in different coordinates, O(1)
  differences that no tolerance covers. See BENCHMARKS.md section 7.)
  """
  del x64
  factory = functools.partial(FACTORIES[name], max_precond_dim=63)
  grads = _gradients((300, 108), (slice(0, 0),), seed=1)
  stacked = _stacked_updates(factory, grads, block_size=64)
  expected = _independent_updates(factory, [_blocks(g, 64) for g in grads])
  for call, (got, want) in enumerate(zip(stacked, expected)):
    got_blocks = _blocks(got, 64)
    assert len(got_blocks) == 10
    for k, (a, b) in enumerate(zip(got_blocks, want)):
      assert _relative_error(a, b) < 1e-12, (call, k)


def _bases_by_corner(state, shape):
  """The library's bases of each unit, keyed by the unit's first element.

  Found by gathering an array of element indices with the state's own plan.
  """
  plan = state.eigenbasis.plan
  index = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
  stacked = _stacks.gather([jnp.asarray(index)], plan)
  by_corner = {}
  for units, bases in zip(stacked, plan.split(state.eigenbasis.bases)):
    for u in range(units.shape[0]):
      corner = np.unravel_index(int(np.asarray(units[u]).ravel()[0]), shape)
      by_corner[tuple(int(i) for i in corner)] = [np.asarray(q[u])
                                                  for q in bases]
  return by_corner


def test_blocked_rotated_adam_matches_numpy_oracle_per_block(x64):
  """Blocks of batch slices against the float64 NumPy SOAP oracle."""
  del x64
  shape, block = (2, 10, 7), 4   # 2 layers, rows cut 4+4+2, columns 4+3.
  tx = soap_optax.scale_by_rotated_adam(
      b1=0.9, b2=0.95, eps=1e-8, precondition_frequency=3, block_size=block,
      dimension_numbers=Dims(batch_axes=(0,)))
  state = tx.init({'w': jnp.zeros(shape)})
  update = jax.jit(tx.update)
  rng = np.random.default_rng(2)
  oracles = {}
  for call in range(10):
    g = rng.normal(size=shape)
    out, state = update({'w': jnp.asarray(g)}, state)
    out = np.asarray(out['w'])
    if call == 0:
      np.testing.assert_array_equal(out, 0.0)
      # One gradient leaves most block factors rank-deficient, so their first
      # eigenbasis is not unique: the oracle starts from the library's.
      first_bases = _bases_by_corner(state, shape)
    for layer in range(shape[0]):
      for r in range(0, shape[1], block):
        for c in range(0, shape[2], block):
          gb = g[layer, r:r + block, c:c + block]
          key = (layer, r, c)
          if key not in oracles:
            oracles[key] = soap_numpy.SoapReference(
                gb.shape, b1=0.9, b2=0.95, shampoo_beta=None, eps=1e-8,
                frequency=3, max_dim=10000, merge_dims=False,
                precondition_1d=False, initial_bases=first_bases[key])
          expected = oracles[key].step(gb)
          if call > 0:
            got = out[layer, r:r + block, c:c + block]
            assert _relative_error(got, expected) < 1e-9, (call, key)
  assert len(oracles) == 12


def test_long_axis_blocks_hold_exactly_the_state_of_their_blocks():
  blocked = jax.eval_shape(
      soap_optax.soap(block_size=1024).init, {'w': jnp.zeros((8192, 64))})
  one_block = jax.eval_shape(
      soap_optax.soap().init, {'w': jnp.zeros((1024, 64))})
  assert soap_optax.state_size(blocked) == 8 * soap_optax.state_size(
      one_block)
  stats = blocked[0].eigenbasis.stats
  assert sorted(s.shape for s in stats) == [(8, 64, 64), (8, 1024, 1024)]


def test_max_precond_dim_keeps_its_meaning_for_axes_that_are_not_cut():
  state = soap_optax.soap(block_size=64, max_precond_dim=32).init(
      {'w': jnp.zeros((128, 48))})
  stack, = state[0].eigenbasis.plan.stacks
  assert stack.unit_shape == (64, 48) and stack.size == 2
  assert stack.layout.factored_axes == ()   # 64 and 48 both exceed 32.


def test_reduction_and_output_axes_equal_the_reshaped_matrix(x64):
  del x64
  d, heads, head_dim = 6, 2, 3
  grads = _gradients((d, heads, head_dim), (slice(0, 0),), seed=3)
  for name, factory in FACTORIES.items():
    grouped = _stacked_updates(
        factory, grads,
        dimension_numbers=Dims(reduction_axes=(0,), output_axes=(1, 2)))
    as_matrix = _stacked_updates(
        factory, [g.reshape(d, heads * head_dim) for g in grads])
    for got, want in zip(grouped, as_matrix):
      assert _relative_error(got.reshape(d, -1), want) < 1e-12, name


def test_a_conv_kernel_groups_spatial_and_input_axes(x64):
  del x64
  grads = _gradients((3, 3, 2, 4), (slice(0, 0),), seed=4)
  factory = FACTORIES['soap']
  grouped = _stacked_updates(
      factory, grads, dimension_numbers=Dims(output_axes=(3,)))
  as_matrix = _stacked_updates(factory, [g.reshape(18, 4) for g in grads])
  for got, want in zip(grouped, as_matrix):
    assert _relative_error(got.reshape(18, 4), want) < 1e-12


@pytest.mark.parametrize('shape, numbers, block_size', [
    ((300, 70), None, 64),
    ((4, 9, 5), Dims(batch_axes=(1,)), 3),
    ((5, 2, 3, 7), Dims(batch_axes=(0,), reduction_axes=(2, 1)), 4),
    ((), None, 2),
    ((3,), Dims(batch_axes=(0,)), None),
    ((0, 4), None, 2),
])
def test_gather_then_scatter_is_the_identity(shape, numbers, block_size):
  x = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
  plan = _stacks.plan_units([x], numbers, [x], block_size)
  stacked = _stacks.gather([jnp.asarray(x)], plan)
  assert sum(int(np.prod(s.shape)) for s in stacked) == x.size
  np.testing.assert_array_equal(
      np.asarray(_stacks.scatter(stacked, plan)[0]), x)


def _scatter_plan():
  """Four parameters cut into blocks of 4: units of shapes (4, 4) and (1, 4)
  from several parameters in each stack."""
  shapes = [(8, 8), (8, 8), (9, 8), (8, 12)]
  leaves = [np.arange(math.prod(s), dtype=np.float32).reshape(s) * (i + 1)
            for i, s in enumerate(shapes)]
  return leaves, _stacks.plan_units(leaves, None, leaves, 4)


def test_scatter_at_opaque_offsets_is_exact_for_every_step():
  leaves, plan = _scatter_plan()
  stacked = _stacks.gather([jnp.asarray(x) for x in leaves], plan)
  scatter = jax.jit(lambda st, step: _stacks.scatter(st, plan, step))
  offsets = jax.jit(
      lambda s: jnp.stack(_stacks.opaque_offsets([3, 0, 5, 5], s)))
  # Step 7 first: a loop that ran would fail there, not run 2**31 times.
  for step in (7, 0, -3, np.iinfo(np.int32).max, np.iinfo(np.int32).min):
    for got, want in zip(scatter(stacked, np.int32(step)), leaves):
      np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(offsets(np.int32(step)), [3, 0, 5, 5])


def _distinct_fusions(hlo: str, result: str) -> int:
  """How many different fused computations in compiled ``hlo`` return
  ``result`` (names and metadata aside): XLA compiles one kernel for each."""
  bodies = re.findall(r'^%fused\S* \([^\n]*\) -> ' + re.escape(result) +
                      r' \{\n(.*?)\n\}', hlo, flags=re.M | re.S)
  return len({re.sub(r'%[\w.\-]+|, metadata=\{[^}]*\}', '', body)
              for body in bodies})


def test_slices_of_one_stack_share_one_kernel():
  # Six parameters in one stack, each scaled after the scatter as an alias's
  # learning rate would be: XLA fuses the scaling into each slice.
  leaves = [np.full((8, 8), i, np.float32) for i in range(6)]
  plan = _stacks.plan_units(leaves, None, leaves, None)
  stacked = _stacks.gather([jnp.asarray(x) for x in leaves], plan)
  def program(opaque):
    return jax.jit(lambda st, n: [
        -0.1 * x for x in _stacks.scatter(st, plan, n if opaque else None)
    ]).lower(stacked, np.int32(0)).compile().as_text()
  assert _distinct_fusions(program(True), 'f32[8,8]') == 1
  # At constant offsets, every slice is a kernel of its own.
  assert _distinct_fusions(program(False), 'f32[8,8]') == 6


def test_the_update_scatters_at_opaque_offsets(monkeypatch):
  # The skeleton passes its step count: without it, each of the six
  # parameters' slices (with the alias's chain) is one more kernel.
  params = {f'w{i}': jnp.zeros((8, 8)) for i in range(6)}
  def distinct():
    tx = soap_optax.soap(1e-3)
    state = tx.init(params)
    return _distinct_fusions(jax.jit(tx.update).lower(
        params, state, params).compile().as_text(), 'f32[8,8]')
  opaque = distinct()
  scatter = _stacks.scatter
  monkeypatch.setattr(_stacks, 'scatter',
                      lambda stacked, plan, step=None: scatter(stacked, plan))
  assert distinct() == opaque + 5


def test_gathered_blocks_are_the_numpy_blocks():
  x = np.random.default_rng(5).normal(size=(300, 70)).astype(np.float32)
  plan = _stacks.plan_units([x], None, [x], 64)
  stacked = _stacks.gather([jnp.asarray(x)], plan)
  got = sorted((np.asarray(u) for s in stacked for u in s),
               key=lambda u: (u.shape, u[0, 0]))
  want = sorted(_blocks(x, 64), key=lambda u: (u.shape, u[0, 0]))
  assert len(got) == len(want) == 10
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_same_shape_units_from_different_parameters_share_one_stack():
  params = {'a': jnp.zeros((4, 8, 8)), 'b': jnp.zeros((8, 8)),
            'c': jnp.zeros((8, 16)), 'd': jnp.zeros((8, 8), jnp.bfloat16)}
  state = soap_optax.scale_by_rotated_adam(
      dimension_numbers={'a': Dims(batch_axes=(0,)), 'b': None, 'c': None,
                         'd': None}).init(params)
  stacks = state.eigenbasis.plan.stacks
  assert [(s.unit_shape, s.size) for s in stacks] == [((8, 8), 6),
                                                       ((8, 16), 1)]
  assert [m.shape for m in state.mu] == [(6, 8, 8), (1, 8, 16)]


def _layered_params(num_layers):
  layer = {'attn': jnp.zeros((16, 16)), 'up': jnp.zeros((16, 64)),
           'down': jnp.zeros((64, 16)), 'norm': jnp.zeros((16,)),
           'bias': jnp.zeros((64,))}
  params = {f'layer_{i:02d}': dict(layer) for i in range(num_layers)}
  params['embed'] = jnp.zeros((100, 16))
  return params


@pytest.mark.parametrize('name', sorted(FACTORIES))
def test_the_program_does_not_grow_with_depth(name):
  counts = []
  for num_layers in (2, 24):
    params = _layered_params(num_layers)
    tx = FACTORIES[name]()
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(lambda g, s, p, tx=tx: tx.update(g, s, p))(
        params, state, params).jaxpr
    counts.append({p: count_primitives(jaxpr, p)
                   for p in ('dot_general', 'eigh', 'qr')})
  assert counts[0] == counts[1], counts
  assert counts[0]['dot_general'] > 0


def test_mu_dtype_keeps_the_first_moment_in_bfloat16():
  params = {'w': jnp.ones((3, 8, 8)), 'b': jnp.ones((8,))}
  for alias in (soap_optax.soap, soap_optax.factorized_soap):
    tx = alias(1e-2, mu_dtype=jnp.bfloat16, precondition_frequency=2,
               dimension_numbers={'w': Dims(batch_axes=(0,)), 'b': None})
    state = tx.init(params)
    update = jax.jit(tx.update)
    p = params
    for i in range(5):
      grads = jax.tree.map(
          lambda x, i=i: jax.random.normal(jax.random.PRNGKey(i), x.shape), p)
      updates, state = update(grads, state, p)
      p = optax.apply_updates(p, updates)
    inner = state[0]
    assert all(m.dtype == jnp.bfloat16 for m in inner.mu)
    for leaf in jax.tree.leaves((inner.nu, inner.eigenbasis.stats,
                                 inner.eigenbasis.bases)):
      assert leaf.dtype == jnp.float32
    for leaf in jax.tree.leaves((updates, p)):
      assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))


def test_mu_dtype_changes_only_the_rounding_of_the_first_moment():
  rng = np.random.default_rng(6)
  params = {'w': jnp.zeros((8, 8))}
  full, half = (soap_optax.scale_by_rotated_adam(
      b1=0.9, precondition_frequency=2, mu_dtype=d) for d in (None, 'bfloat16'))
  s_full, s_half = full.init(params), half.init(params)
  for _ in range(6):
    g = {'w': jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    u_full, s_full = full.update(g, s_full)
    u_half, s_half = half.update(g, s_half)
  # bfloat16 keeps 8 bits of mantissa: the first moments agree to ~2^-8.
  assert _relative_error(np.asarray(s_half.mu[0], np.float32),
                         np.asarray(s_full.mu[0])) < 2e-2
  assert _relative_error(u_half['w'], np.asarray(u_full['w'])) < 5e-2


@pytest.mark.parametrize('kwargs, match', [
    (dict(block_size=0), 'block_size'),
    (dict(block_size=2.5), 'block_size'),
    (dict(mu_dtype=jnp.int32), 'mu_dtype'),
    (dict(mu_dtype='not a dtype'), 'mu_dtype'),
])
def test_bad_layout_arguments_raise_at_construction(kwargs, match):
  for factory in (soap_optax.soap, soap_optax.factorized_soap,
                  soap_optax.scale_by_rotated_adam):
    with pytest.raises(ValueError, match=match):
      factory(**kwargs)
  if 'block_size' in kwargs:
    for factory in (soap_optax.shampoo,
                    soap_optax.scale_by_shampoo_eigenbasis,
                    soap_optax.scale_by_adafactor_in_eigenbasis):
      with pytest.raises(ValueError, match=match):
        factory(**kwargs)


@pytest.mark.parametrize('numbers, match', [
    (Dims(batch_axes=(3,)), 'batch_axes'),
    (Dims(batch_axes=(0, -3)), 'batch_axes'),
    (Dims(batch_axes=(0,), reduction_axes=(0,)), 'reduction_axes'),
    (Dims(reduction_axes=(1,), output_axes=(1, 2)), 'reduction_axes'),
    (Dims(reduction_axes=(0,), output_axes=(1,)), 'reduction_axes'),
    ({'v': None}, 'prefix'),
    ({'w': 'layers'}, 'EigenbasisDimensionNumbers'),
])
def test_bad_dimension_numbers_raise_at_init(numbers, match):
  tx = soap_optax.soap(dimension_numbers=numbers)
  with pytest.raises(ValueError, match=match):
    tx.init({'w': jnp.zeros((2, 3, 4))})


def test_dimension_numbers_are_hashable_and_normalize_lists():
  a = Dims(batch_axes=[0], output_axes=[2])
  assert a == Dims(batch_axes=(0,), output_axes=(2,))
  assert hash(a) == hash(Dims(batch_axes=(0,), output_axes=(2,)))
  with pytest.raises(ValueError, match='batch_axes'):
    Dims(batch_axes=('layers',))


def test_dimension_numbers_may_be_a_callable_of_the_params():
  params = {'w': jnp.zeros((3, 4, 4)), 'b': jnp.zeros((4,))}
  tx = soap_optax.soap(dimension_numbers=lambda p: jax.tree.map(
      lambda x: Dims(batch_axes=(0,)) if x.ndim == 3 else None, p))
  stacks = tx.init(params)[0].eigenbasis.plan.stacks
  assert {(s.unit_shape, s.size) for s in stacks} == {((4, 4), 3), ((4,), 1)}


def test_update_with_another_shape_raises():
  tx = soap_optax.scale_by_rotated_adam()
  state = tx.init({'w': jnp.zeros((6, 4))})
  with pytest.raises(ValueError, match='shape'):
    tx.update({'w': jnp.zeros((4, 6))}, state)


# ------------------------------------------------------------------------------
# Staggered refresh.

from tests.oracle import shampoo_numpy  # pylint: disable=g-import-not-at-top

STAGGER_PARAMS = {'a': (4, 6, 6), 'b': (7, 7), 'c': (5,)}
STAGGER_DIMS = {'a': Dims(batch_axes=(0,)), 'b': None, 'c': None}


def _unit_phases(state):
  """``{(leaf name, slice): phase}`` from the state's plan."""
  plan = state.eigenbasis.plan
  phases = {}
  for name, placement in zip(sorted(STAGGER_PARAMS), plan.placements):
    piece, = placement.pieces
    for k in range(placement.num_slices):
      phases[name, k] = plan.refresh_phases[piece.stack][piece.offset + k]
  return phases


def _slices(tree):
  return {(name, k): np.asarray(x).reshape(
      (-1,) + STAGGER_PARAMS[name][-2:] if name == 'a' else (1,) + x.shape)[k]
          for name, x in tree.items()
          for k in range(4 if name == 'a' else 1)}


@pytest.mark.parametrize('kind', ['rotated_adam', 'shampoo', 'adafactor'])
def test_staggered_refresh_matches_oracles_with_each_units_phase(x64, kind):
  del x64
  frequency = 3
  common = dict(precondition_frequency=frequency, staggered_refresh=True,
                dimension_numbers=STAGGER_DIMS)
  if kind == 'rotated_adam':
    tx = soap_optax.scale_by_rotated_adam(b1=0.9, b2=0.95, **common)
    make_oracle = lambda shape, phase: soap_numpy.SoapReference(
        shape, b1=0.9, b2=0.95, shampoo_beta=None, eps=1e-8,
        frequency=frequency, max_dim=10000, merge_dims=False,
        precondition_1d=False, phase=phase)
  elif kind == 'shampoo':
    tx = soap_optax.scale_by_shampoo_eigenbasis(
        shampoo_beta=0.8, eps=1e-6, refresh='qr', rayleigh_floor=False,
        **common)
    make_oracle = lambda shape, phase: shampoo_numpy.ShampooReference(
        shape, beta=0.8, exponent=0.5, eps=1e-6, frequency=frequency,
        trace_normalize=True, refresh='qr', phase=phase)
  else:
    tx = soap_optax.scale_by_adafactor_in_eigenbasis(
        b2=0.85, eps=1e-12, refresh='qr', **common)
    make_oracle = lambda shape, phase: (
        shampoo_numpy.AdafactorInEigenbasisReference(
            shape, b2=0.85, eps=1e-12, frequency=frequency, refresh='qr',
            phase=phase))
  params = {k: jnp.zeros(s) for k, s in STAGGER_PARAMS.items()}
  state = tx.init(params)
  # Units without a factor ('c') have phase 0: exactly as without staggering.
  unstaggered = _unstaggered(kind, frequency)
  plain_state = unstaggered.init(params)
  phases = _unit_phases(state)
  assert sorted(set(phases.values())) == [0, 1, 2]  # really staggered.
  matrices = {key: phase for key, phase in phases.items() if key[0] != 'c'}
  oracles = {key: make_oracle((6, 6) if key[0] == 'a' else (7, 7), phase)
             for key, phase in matrices.items()}
  update = jax.jit(tx.update)
  rng = np.random.default_rng(7)
  for call in range(10):
    grads = {k: rng.normal(size=s) for k, s in STAGGER_PARAMS.items()}
    out, state = update(jax.tree.map(jnp.asarray, grads), state)
    plain_out, plain_state = unstaggered.update(
        jax.tree.map(jnp.asarray, grads), plain_state)
    assert _relative_error(out['c'], np.asarray(plain_out['c'])) < 1e-12
    if call > 0 or kind != 'rotated_adam':
      assert float(jnp.max(jnp.abs(out['c']))) > 0
    got, given = _slices(out), _slices(grads)
    for key, oracle in oracles.items():
      expected = oracle.step(given[key])
      if kind == 'rotated_adam' and call == 0:
        continue
      assert _relative_error(got[key], expected) < 1e-9, (call, key)


def _unstaggered(kind, frequency):
  """The transforms of the staggered test, without staggering."""
  common = dict(precondition_frequency=frequency,
                dimension_numbers=STAGGER_DIMS)
  if kind == 'rotated_adam':
    tx = soap_optax.scale_by_rotated_adam(b1=0.9, b2=0.95, **common)
  elif kind == 'shampoo':
    tx = soap_optax.scale_by_shampoo_eigenbasis(
        shampoo_beta=0.8, eps=1e-6, refresh='qr', rayleigh_floor=False,
        **common)
  else:
    tx = soap_optax.scale_by_adafactor_in_eigenbasis(
        b2=0.85, eps=1e-12, refresh='qr', **common)
  return tx


def test_refresh_phases_balance_the_decomposition_work():
  layout = lambda n: soap_optax._kronecker.plan_layout(  # pylint: disable=protected-access
      (n, n), max_precond_dim=10000, merge_dims=False, precondition_1d=False)
  stacks = [_stacks.Stack((8, 8), 'float32', 10, layout(8)),
            _stacks.Stack((16, 16), 'float32', 1, layout(16)),
            _stacks.Stack((4,), 'float32', 3,
                          _engine_layout_without_factors((4,)))]
  phases = _stacks.assign_refresh_phases(stacks, 5)
  assert phases[2] == (0, 0, 0)  # nothing to decompose.
  loads = [0] * 5
  for stack, stack_phases in zip(stacks, phases):
    for phase in stack_phases:
      loads[phase] += sum(d**3 for d in stack.layout.factor_sizes)
  # The 16x16 unit (8192) alone on one residue, the ten 8x8 units (1024
  # each) spread over the four others: loads 8192, 3072, 3072, 2048, 2048.
  assert sorted(loads) == [2048, 2048, 3072, 3072, 8192]
  assert sorted(phases[0]).count(phases[1][0]) == 0


def _engine_layout_without_factors(shape):
  return soap_optax._kronecker.FactorLayout(shape, shape, ())  # pylint: disable=protected-access


def test_staggered_refresh_compiles_once_and_refreshes_each_unit_per_period():
  params = {'w': jnp.zeros((6, 8, 8))}
  tx = soap_optax.scale_by_rotated_adam(
      precondition_frequency=3, staggered_refresh=True,
      dimension_numbers=Dims(batch_axes=(0,)))
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(8)
  changed = []
  for _ in range(10):
    before = [np.asarray(q) for q in state.eigenbasis.bases]
    _, state = update({'w': jnp.asarray(rng.normal(size=(6, 8, 8)),
                                        jnp.float32)}, state)
    after = [np.asarray(q) for q in state.eigenbasis.bases]
    changed.append(sorted({int(u) for b, a in zip(before, after)
                           for u in np.nonzero(np.any(b != a, axis=(1, 2)))[0]}))
  assert update._cache_size() == 1  # pylint: disable=protected-access
  assert changed[0] == list(range(6))           # the first call: every unit.
  for start in (1, 4, 7):                        # then each once per period.
    period = sorted(u for c in changed[start:start + 3] for u in c)
    assert period == list(range(6)), changed
  assert all(len(c) == 2 for c in changed[1:])  # two units per step.


# ------------------------------------------------------------------------------
# Size buckets.

# Shapes that share stacks at bucket_padding=0.5: a matrix and its transpose
# (reordered), a shorter and a narrower one (zero-padded), a 3-D kernel in
# two axis orders, and two vectors.
BUCKET_SHAPES = {'a': (10, 6), 'b': (6, 10), 'c': (9, 6), 'd': (5, 10),
                 'e': (4, 3, 5), 'f': (5, 4, 3), 'g': (10,), 'h': (9,)}


def _bucket_gradients(seed):
  """Per call, the gradients of :data:`BUCKET_SHAPES`: ``c``'s row 3 is
  always zero (a dead input) and ``d`` has rank 2 (the same two row
  vectors every call), so that their factors are rank-deficient."""
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(2, 10))
  calls = []
  for _ in range(NUM_CALLS):
    grads = {k: rng.normal(size=s) for k, s in BUCKET_SHAPES.items()}
    grads['c'][3] = 0.0
    grads['d'] = rng.normal(size=(5, 2)) @ rows
    calls.append(grads)
  return calls


def test_buckets_share_stacks_within_the_padding_bound():
  params = {k: jnp.zeros(s) for k, s in BUCKET_SHAPES.items()}
  tx = soap_optax.soap(bucket_padding=0.5)
  plan = tx.init(params)[0].eigenbasis.plan
  assert [(s.unit_shape, s.size) for s in plan.stacks] == [
      ((10, 6), 4), ((5, 4, 3), 2), ((10,), 2)]
  pieces = {path: placement.pieces[0] for path, placement in zip(
      sorted(BUCKET_SHAPES), plan.placements)}
  assert (pieces['a'].unit_shape, pieces['a'].axes) == (None, None)
  assert (pieces['b'].unit_shape, pieces['b'].axes) == ((6, 10), (1, 0))
  assert (pieces['c'].unit_shape, pieces['c'].axes) == ((9, 6), None)
  assert (pieces['d'].unit_shape, pieces['d'].axes) == ((5, 10), (1, 0))
  assert (pieces['e'].unit_shape, pieces['e'].axes) == ((4, 3, 5), (2, 0, 1))
  # Each padded unit's work within 1.5x its own.
  for path, piece in pieces.items():
    stack = plan.stacks[piece.stack]
    own = soap_optax._kronecker.plan_layout(  # pylint: disable=protected-access
        BUCKET_SHAPES[path], max_precond_dim=10000, merge_dims=False,
        precondition_1d=False)
    assert stack.layout.unit_cost <= 1.5 * own.unit_cost, path
  # The default bound (0.1) only reorders the transposes (a shape alone in
  # its bucket keeps its own order); None: no buckets.
  default = soap_optax.soap().init(params)[0].eigenbasis.plan
  assert sorted(s.unit_shape for s in default.stacks) == sorted(
      [(10, 6), (9, 6), (5, 10), (5, 4, 3), (10,), (9,)])
  unbucketed = soap_optax.soap(bucket_padding=None).init(params)[0]
  assert len(unbucketed.eigenbasis.plan.stacks) == len(BUCKET_SHAPES)


def test_gather_pads_and_reorders_and_scatter_inverts_it(x64):
  del x64
  rng = np.random.default_rng(3)
  leaves = [rng.normal(size=s) for _, s in sorted(BUCKET_SHAPES.items())]
  tx = soap_optax.soap(bucket_padding=0.5)
  tree = dict(zip(sorted(BUCKET_SHAPES), leaves))
  plan = tx.init(tree)[0].eigenbasis.plan
  stacks = _stacks.gather([jnp.asarray(x) for x in leaves], plan)
  by_name = dict(zip(sorted(BUCKET_SHAPES), leaves))
  # Independent: the stack rows, written out by hand from the bucket rule.
  np.testing.assert_array_equal(stacks[0][1], np.pad(by_name['b'].T,
                                                     ((0, 0), (0, 0))))
  np.testing.assert_array_equal(stacks[0][2], np.pad(by_name['c'],
                                                     ((0, 1), (0, 0))))
  np.testing.assert_array_equal(stacks[0][3], np.pad(by_name['d'].T,
                                                     ((0, 0), (0, 1))))
  np.testing.assert_array_equal(stacks[1][0],
                                np.transpose(by_name['e'], (2, 0, 1)))
  np.testing.assert_array_equal(stacks[2][1], np.pad(by_name['h'], (0, 1)))
  for got, want in zip(_stacks.scatter(stacks, plan), leaves):
    np.testing.assert_array_equal(got, want)


# As FACTORIES, with eps 1e-6 throughout: round-off in the null coordinates
# of a rank-deficient factor (c's dead row, d's rank-2 rows) is divided by
# eps, and a padded and an unpadded product round differently (measured with
# eps 1e-8: 1.5e-9 absolute, 1.6e-8 relative, in factorized SOAP's dead row).
_SOAP = dict(learning_rate=0.1, b1=0.9, weight_decay=0.0, eps=1e-6)
BUCKET_FACTORIES = {
    'soap': lambda **kw: soap_optax.soap(**_SOAP, **_every(**kw)),
    'factorized_soap': lambda **kw: soap_optax.factorized_soap(
        **_SOAP, **_every(**kw)),
    'one_sided_soap': lambda **kw: soap_optax.soap(
        **_SOAP, one_sided=True, **_every(**kw)),
    'normalized_soap': lambda **kw: soap_optax.soap(
        **_SOAP, normalize_grads=True, **_every(**kw)),
    'soap_1d_eigh': lambda **kw: soap_optax.scale_by_rotated_adam(
        eps=1e-6, precondition_1d=True, refresh='eigh', **_every(**kw)),
    # Ungrafted, without the trace normalization (which turns buckets off):
    # no per-unit rescaling hides a wrong scale.
    'shampoo': lambda **kw: soap_optax.shampoo(
        0.1, weight_decay=0.0, eps=1e-6, grafting='none',
        trace_normalize=False, **_every(**kw)),
    'adafactor_in_eigenbasis': lambda **kw: (
        soap_optax.scale_by_adafactor_in_eigenbasis(
            eps=1e-6, rounding_floor=False, **_every(**kw))),
}


@pytest.mark.parametrize('factory', [
    lambda: soap_optax.soap(factor_estimator='kl'),
    lambda: soap_optax.kl_shampoo(),
    lambda: soap_optax.shampoo(),  # trace_normalize: axis 0's sum
    lambda: soap_optax.shampoo(trace_normalize=False, grafting='none',
                               precondition_frequency=soap_optax.FoamRefresh()),
    lambda: soap_optax.scale_by_adafactor_in_eigenbasis(),  # separable floor
    lambda: soap_optax.soap(precondition_frequency='adaptive'),
], ids=['kl_soap', 'kl_shampoo', 'trace_normalized_shampoo', 'foam',
        'floored_adafactor', 'adaptive_soap'])
def test_rules_and_policies_that_count_entries_do_not_bucket(factory):
  """Where padding or reordering would change a number (entry counts, an
  axis-0 trace, a floor added to padded entries, a per-stack refresh
  decision), every unit shape keeps its own stack."""
  params = {k: jnp.zeros(s) for k, s in BUCKET_SHAPES.items()}
  state = factory().init(params)
  plan, = [x.plan for x in jax.tree.leaves(
      state, is_leaf=lambda x: hasattr(x, 'plan')) if hasattr(x, 'plan')]
  assert len(plan.stacks) == len(BUCKET_SHAPES)


@pytest.mark.parametrize('name', sorted(BUCKET_FACTORIES))
def test_bucketed_units_equal_independent_unpadded_runs(x64, name):
  """Every leaf of a bucketed tree (reordered, padded, rank-deficient
  factors included) is updated exactly as by its own optimizer, alone and
  unpadded (float64)."""
  del x64
  factory = BUCKET_FACTORIES[name]
  calls = _bucket_gradients(seed=11)
  tx = factory(bucket_padding=0.5)
  update = jax.jit(tx.update)
  params = {k: jnp.zeros(s) for k, s in BUCKET_SHAPES.items()}
  state = tx.init(params)
  plan, = [x.plan for x in jax.tree.leaves(
      state, is_leaf=lambda x: hasattr(x, 'plan')) if hasattr(x, 'plan')]
  assert any(p.is_padded(plan.stacks[p.stack]) and p.axes
             for placement in plan.placements for p in placement.pieces)
  together = []
  for grads in calls:
    out, state = update(jax.tree.map(jnp.asarray, grads), state, params)
    together.append(out)
  for k, shape in BUCKET_SHAPES.items():
    alone = _independent_updates(
        lambda: factory(bucket_padding=None),
        [[grads[k]] for grads in calls])
    # Rank-deficient factors (c, d): their null-space round-off is
    # normalized by eps (see BUCKET_FACTORIES).
    tolerance = 1e-9 if k in 'cd' else 1e-12
    for call, (got, want) in enumerate(zip(together, alone)):
      assert got[k].shape == shape
      assert _relative_error(got[k], want[0]) < tolerance, (k, call)


def test_rounding_floor_of_a_padded_unit_is_its_own(x64):
  """The floor's mean fibre energy counts the unit's own fibres only
  (NumPy, from the formula: f^2 = (κε)^2 Σ_a (F_a + mean F_a))."""
  del x64
  v = np.random.default_rng(5).uniform(size=(3, 4))
  scale = (_floors.ROUNDING_FLOOR_ULPS * np.finfo(np.float64).eps)**2
  rows, cols = v.sum(axis=1, keepdims=True), v.sum(axis=0, keepdims=True)
  want = scale * (rows + rows.mean() + cols + cols.mean())
  padded = np.pad(v, ((0, 2), (0, 3)))
  layout = _kronecker.plan_layout((5, 7), max_precond_dim=100, merge_dims=False,
                                  precondition_1d=False)
  got = _floors.rounding_floor_squared(jnp.asarray(padded), layout,
                                       jnp.asarray([3, 4]))
  np.testing.assert_allclose(np.asarray(got)[:3, :4], want, rtol=1e-15)


def test_null_space_of_a_padded_factor_is_its_own_plus_the_padding(x64):
  """A factor padded with zero rows and columns gets the unpadded factor's
  eigenvalues and basis (up to column signs), the padding as the last
  coordinate axes, and the same null-space threshold (``d eps max`` with d
  the 6 real axes, not the 8 padded ones: an eigenvalue of ``7 eps max``
  lies between the two)."""
  del x64
  rng = np.random.default_rng(8)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  eps = np.finfo(np.float64).eps
  values = np.array([2.0, 1.0, 0.5, 7 * eps * 2.0, 0.0, 0.0])
  stat = (q * values) @ q.T
  padded = np.pad(stat, ((0, 2), (0, 2)))
  for solver in (_solvers.solve_eigh, _solvers.solve_power_qr):
    own = solver(jnp.asarray(stat), jnp.eye(6))
    pad = solver(jnp.asarray(padded), jnp.eye(8))
    basis, basis_pad = np.asarray(own.basis), np.asarray(pad.basis)
    signs = np.sign(np.sum(basis * basis_pad[:6, :6], axis=0))
    np.testing.assert_allclose(basis_pad[:6, :6] * signs, basis, atol=1e-14)
    np.testing.assert_array_equal(basis_pad[6:, 6:], np.eye(2))
    np.testing.assert_array_equal(basis_pad[:6, 6:], 0.0)
    np.testing.assert_allclose(np.asarray(pad.values)[:6], own.values,
                               atol=1e-15)


def test_condition_diagnostics_read_each_units_own_rows(x64):
  """A padded unit's zero rows are not its eigenvalues: the largest
  condition number over the tree is the same with and without buckets."""
  del x64
  params = {k: jnp.zeros(s) for k, s in BUCKET_SHAPES.items()}
  largest = []
  for padding in (0.5, None):
    tx = soap_optax.soap(bucket_padding=padding, precondition_frequency=1)
    state = tx.init(params)
    rng = np.random.default_rng(4)
    for _ in range(3):  # full-rank factors: every condition number finite
      grads = {k: jnp.asarray(rng.normal(size=s))
               for k, s in BUCKET_SHAPES.items()}
      _, state = tx.update(grads, state, params)
    found = soap_optax.diagnostics(state)
    largest.append(max(float(v) for k, v in found.items()
                       if k.startswith('condition/')))
  assert largest[1] < 1e6
  np.testing.assert_allclose(largest[0], largest[1], rtol=1e-10)
