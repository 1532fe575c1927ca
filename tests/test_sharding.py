"""The optimizer divided over a jax.sharding mesh.

The checks that need several devices run in subprocesses with 8 host CPU
devices (``tests/multidevice_checks.py``); the suite's own process keeps
its single device, on which a 1-device mesh still runs the divided code.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import soap_optax
from soap_optax import _exchange
from soap_optax import _kronecker
from soap_optax import _stacks

CHECKS = os.path.join(os.path.dirname(__file__), 'multidevice_checks.py')


def _result(text):
  lines = [l for l in text.splitlines() if l.startswith('RESULT ')]
  return json.loads(lines[-1][len('RESULT '):]) if lines else None


# The 8-device checks, started together the first time one is asked for:
# each is mostly XLA compiling, one core's work, so two cores run them in
# about half the time they take one after the other.
_CHECK_ARGS = (('compiled',), ('parity', 'float64'), ('parity', 'float32'),
               ('state',), ('portable',), ('rank_deficient',),
               ('exchange',))
_CHECK_RESULTS = {}


def _run_check(*args, timeout=1200):
  if not _CHECK_RESULTS:
    with tempfile.TemporaryDirectory() as directory:
      logs = [open(os.path.join(directory, f'{i}.log'), 'w+')
              for i in range(len(_CHECK_ARGS))]
      processes = [subprocess.Popen(
          [sys.executable, CHECKS, *check], stdout=log,
          stderr=subprocess.STDOUT, text=True)
                   for check, log in zip(_CHECK_ARGS, logs)]
      try:
        for p in processes:
          p.wait(timeout=timeout)
      finally:
        for p in processes:
          p.kill()
      for check, p, log in zip(_CHECK_ARGS, processes, logs):
        log.seek(0)
        text = log.read()
        log.close()
        _CHECK_RESULTS[check] = (p.returncode, text)
  returncode, text = _CHECK_RESULTS[args]
  result = _result(text)
  assert returncode == 0 and result is not None, text[-6000:]
  print(f'{" ".join(args)}: {json.dumps(result)}')  # shown with -s
  return result


ALL = {
    'scale_by_rotated_adam': soap_optax.scale_by_rotated_adam,
    'scale_by_shampoo_eigenbasis': soap_optax.scale_by_shampoo_eigenbasis,
    'scale_by_adafactor_in_eigenbasis':
        soap_optax.scale_by_adafactor_in_eigenbasis,
    'soap': soap_optax.soap,
    'factorized_soap': soap_optax.factorized_soap,
    'shampoo': soap_optax.shampoo,
    'scale_by_kl_shampoo': soap_optax.scale_by_kl_shampoo,
    'kl_shampoo': soap_optax.kl_shampoo,
}


def _one_device_mesh():
  return jax.make_mesh((1,), ('data',))


# ------------------------------------------------------------------------------
# Construction and layout (one device).


@pytest.mark.parametrize('name', sorted(ALL))
def test_mesh_arguments_are_checked_at_construction(name):
  make = ALL[name]
  mesh = _one_device_mesh()
  with pytest.raises(ValueError, match='mesh must be None or a jax.sharding'):
    make(mesh='data')
  with pytest.raises(ValueError, match='shard_axes'):
    make(mesh=mesh, shard_axes='model')
  with pytest.raises(ValueError, match='shard_axes'):
    make(mesh=mesh, shard_axes=('data', 'data'))
  with pytest.raises(ValueError, match='shard_axes.*needs a mesh'):
    make(shard_axes='data')
  make(mesh=mesh, shard_axes='data')
  make(mesh=mesh, shard_axes=('data',))


def _plan(shapes, block_size=None, numbers=None):
  leaves = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  return _stacks.plan_units(
      leaves, numbers, leaves, block_size,
      unit_layout=lambda shape: _kronecker.plan_layout(
          shape, max_precond_dim=10000, merge_dims=False,
          precondition_1d=False))


def _owners(plan, n):
  mesh = jax.sharding.AbstractMesh((n,), ('data',))
  return _exchange.assign(plan.placements, plan.stacks, mesh, ('data',))


SHAPES = [(40, 16), (16, 2, 8), (3, 16, 24), (3, 24), (3, 24, 16), (16, 40),
          (40,), (), (5, 3)]


@pytest.mark.parametrize('block_size', [None, 8])
def test_every_unit_has_one_owner_and_each_shard_at_most_its_share(
    block_size):
  numbers = [None, None, soap_optax.EigenbasisDimensionNumbers((0,)),
             soap_optax.EigenbasisDimensionNumbers((0,)),
             soap_optax.EigenbasisDimensionNumbers((0,)), None, None, None,
             None]
  plan = _plan(SHAPES, block_size, numbers)
  for n in (1, 2, 4, 8, 16):
    layout = _owners(plan, n)
    assert layout.num_shards == n
    for s, stack in enumerate(plan.stacks):
      k = -(-stack.size // n)
      slots = layout.unit_slots(s)
      # One slot per unit, all distinct, k per shard.
      assert len(slots) == stack.size == len(set(slots.tolist()))
      assert layout.slots_per_shard(s) == k
      assert np.all((0 <= slots) & (slots < n * k))
      counts = np.bincount(layout.shard_of_units(s), minlength=n)
      np.testing.assert_array_equal(counts, layout.units_per_shard[s])
      assert counts.max() <= k
    # Deterministic: the same plan again from scratch.
    _exchange._assign.cache_clear()  # pylint: disable=protected-access
    assert _owners(plan, n) == layout


@pytest.mark.parametrize('shape, numbers, block_size, expected', [
    # Both axes divide by 8: the taller parts (8 rows a shard) win.
    ((64, 32), None, None, ('rows', 0, 8)),
    # Blocks of 8: 40 rows give parts of 1 row (5 a shard across block
    # boundaries), 16 columns parts of 2: the columns.
    ((40, 16), None, 8, ('rows', 1, 2)),
    # No matrix axis of 8: the layers (units stay whole).
    ((8, 3, 5), soap_optax.EigenbasisDimensionNumbers((0,)), None,
     ('slices', 0, 0)),
    # Nothing divides by 8: replicated.
    ((5, 3), None, None, ('replicated', None, 0)),
    # A kernel grouped into (6, 8 * 3): its second axis, 3 of the 24
    # columns a shard.
    ((6, 8, 3), soap_optax.EigenbasisDimensionNumbers(
        reduction_axes=(0,), output_axes=(1, 2)), None, ('rows', 1, 3)),
])
def test_each_parameter_is_divided_where_its_units_cut_evenly(
    shape, numbers, block_size, expected):
  plan = _plan([shape], block_size, [numbers])
  geometry = _exchange.choose_geometry(plan.placements[0], 8)
  assert (geometry.mode, geometry.axis, geometry.height) == expected


def test_parameter_shardings_names_the_exchange_layout():
  mesh = _one_device_mesh()
  params = {'w': jnp.ones((6, 4)), 'b': jnp.ones((4,))}
  layout = soap_optax.parameter_shardings(soap_optax.soap(mesh=mesh), params)
  assert layout['w'].spec == jax.sharding.PartitionSpec(('data',), None)
  assert layout['b'].spec == jax.sharding.PartitionSpec(('data',))
  with pytest.raises(ValueError, match='built with mesh='):
    soap_optax.parameter_shardings(soap_optax.soap(), params)


def test_owners_balance_the_refresh_work():
  """Longest-processing-time placement: the busiest shard's refresh work
  (sum d^3 over its units' factors) within 4/3 of the best possible, here
  within 1.15x of an even share (a scanned stack of 32 layers cut into
  blocks: 288 units of three sizes on 16 shards)."""
  numbers = [soap_optax.EigenbasisDimensionNumbers((0,))]
  plan = _plan([(32, 40, 24)], 16, numbers)
  layout = _owners(plan, 16)
  work = np.zeros(16)
  for s, stack in enumerate(plan.stacks):
    cost = sum(d**3 for d in stack.layout.factor_sizes)
    np.add.at(work, layout.shard_of_units(s), cost)
  assert work.max() <= 1.15 * work.sum() / 16, work


def _train(tx, params, steps):
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads_of = jax.jit(jax.grad(lambda p, i: sum(
      jnp.sum(jnp.sin(x * (i + 1.0)) * x) for x in jax.tree.leaves(p))))
  for i in range(steps):
    updates, state = step(grads_of(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize('name', ['soap', 'factorized_soap', 'shampoo'])
def test_one_device_mesh_gives_the_unsharded_result(name, x64):
  """The divided code path (slots, shard_map refresh) on one device."""
  del x64
  layers = soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
  params = {'w': jnp.linspace(-1.0, 1.0, 6 * 8).reshape(6, 8),
            'stack': jnp.cos(jnp.arange(3 * 5 * 5.0)).reshape(3, 5, 5),
            'b': jnp.ones((8,)), 'no_layers': jnp.zeros((0, 4, 5))}
  numbers = {'w': None, 'b': None, 'stack': layers, 'no_layers': layers}
  kwargs = dict(precondition_frequency=3, dimension_numbers=numbers,
                max_precond_dim=6)
  reference, _ = _train(ALL[name](**kwargs), params, 8)
  sharded, state = _train(ALL[name](mesh=_one_device_mesh(), **kwargs),
                          params, 8)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
  assert jax.tree.leaves(state)  # a state came back


def test_state_shardings_follows_optax_wrappers():
  mesh = _one_device_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = {'a': jax.ShapeDtypeStruct((4, 6), jnp.float32, sharding=sharding),
            'b': jax.ShapeDtypeStruct((6,), jnp.float32, sharding=sharding)}
  tx = optax.MultiSteps(optax.chain(
      optax.inject_hyperparams(soap_optax.soap, static_args=(
          'precondition_frequency', 'max_precond_dim', 'block_size',
          'bucket_padding', 'mesh', 'shard_axes'))(learning_rate=1e-3,
                                                   mesh=mesh),
      optax.masked(optax.scale_by_adam(), {'a': True, 'b': False})),
      every_k_schedule=2)
  shardings = soap_optax.state_shardings(tx, params)
  shapes = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(shardings) == jax.tree.structure(shapes)
  assert all(isinstance(s, jax.sharding.NamedSharding)
             for s in jax.tree.leaves(shardings))
  concrete = {k: jnp.ones(v.shape, v.dtype) for k, v in params.items()}
  state = jax.jit(tx.init, out_shardings=shardings)(concrete)
  assert jax.tree.structure(state) == jax.tree.structure(shapes)


def test_state_shardings_needs_a_mesh():
  with pytest.raises(ValueError, match='needs a mesh'):
    soap_optax.state_shardings(soap_optax.soap(), {'w': jnp.ones((3, 3))})


# ------------------------------------------------------------------------------
# 8 host devices (subprocesses).


def test_refresh_is_divided_in_the_compiled_program():
  """Per device: one loop per solver size (factor sizes padded to shared
  sizes) whose trip count is the sum of ceil(U / 8) over the stacks (the
  device's slots), solvers on whole (D, D) solver inputs only, and one collective (the failure count's psum) per
  refresh, none inside a loop."""
  results = _run_check('compiled')
  for name, r in results.items():
    message = f'{name}: {json.dumps(r)}'
    assert r['solver_shapes'] == [[d, d] for d in r['solver_sizes']], message
    expected = dict(r['expected_trips'])
    # Each refresh variant (the first call's eigh, the scheduled one) has
    # its loops; a trip count of 1 may be unrolled by XLA.
    assert r['loop_trips'], message
    for size, trips in r['loop_trips']:
      assert trips == expected[size], message
    assert {s for s, t in expected.items() if t > 1} <= {
        s for s, _ in r['loop_trips']}, message
    variants = 1 if name == 'shampoo' else 2
    assert r['refresh_collectives'] == ['all-reduce'] * variants, message
    assert not r['collectives_in_loops'], message
    # The exchange: one all-to-all in and one out (one state dtype).
    assert r['all_to_alls'] == 2, message


@pytest.mark.parametrize('dtype,tolerance', [('float64', 1e-9),
                                             ('float32', 1e-5)])
def test_sharded_runs_match_the_unsharded_run(dtype, tolerance):
  """soap, factorized_soap and shampoo on meshes (8,), (4, 2) and (2, 4)
  (each optimizer on each shape, over the two dtypes), Auto and Explicit,
  12 steps with refreshes at 0, 5 and 10; in float64 also adaptive SOAP,
  and a combined tree of what the others leave out: Adafactor in the
  eigenbasis with blocks, Shampoo with FoamRefresh, each with a unit
  rejected on step 4, KL-Shampoo and SOAP-Muon."""
  results = _run_check('parity', dtype)
  assert len(results) == (11 if dtype == 'float64' else 3)
  for key, r in results.items():
    # float32: 12 steps of this problem amplify rounding. The unsharded run
    # started from parameters one ulp away ends up to 2e-5 from itself for
    # soap (5e-7 for the others), measured in the same process on two
    # perturbations (noise_floor). The sharded run is one more draw of that
    # rounding noise (2.3e-5 for soap, 6.6e-6 on another build of the
    # program), so it is held to the tolerance, or, where the problem's own
    # floor is higher, to twice the largest of the two draws; a wrong
    # algorithm is off by 1e-2 here. float64 is the test of exactness.
    bound = tolerance if dtype == 'float64' else max(
        tolerance, 2 * r['noise_floor'])
    assert r['relative_error'] <= bound, f'{key}: {r}'
    assert r['engines'] == 1, f'{key}: {r}'
    assert r['refreshes_failed'] == 0, f'{key}: {r}'
    # The combined tree's attention kernel (16, 2, 8) is rejected once, on
    # the mesh and off it alike: one unit, two with blocks of 8.
    rejected = (2 if key.startswith('adafactor_blocked') else
                1 if key.startswith('shampoo_foam') else 0)
    assert r['skipped'] == r['reference_skipped'] == rejected, f'{key}: {r}'
    # soap_optax.diagnostics reads the sharded state as the unsharded one.
    assert not r['diagnostics_differ'], f'{key}: {r}'
  if dtype == 'float64':
    adaptive = [r for k, r in results.items() if k.startswith('soap_adaptive')]
    # 12 calls, refreshes at least every 4 and at most every 2 calls.
    assert len(adaptive) == 1, results
    assert all(3 <= n <= 6 for n in adaptive[0]['refresh_counts']), adaptive


def test_state_shardings_jit_orbax_and_bytes_per_device():
  results = _run_check('state')
  for name, r in results.items():
    message = f'{name}: {json.dumps(r)}'
    assert r['compiles'] == 1, message
    assert r['matches_shardings'], message
    assert r['init_places_stacks'], message
    assert r['max_device_bytes'] <= r['bound_bytes'], message
    assert r['restored'] and all(r['restored'].values()), message
  # Run for soap only (the checks' own choice): a missing result fails.
  assert results['soap']['eager_update_matches'], results['soap']
  assert results['soap']['explicit_without_mesh_matches'], results['soap']


def test_checkpoints_move_between_device_counts():
  """portable_state saved with Orbax on one mesh, restored on another by
  reshard_state: 8->4, 4->8, 8->1, 1->8 and (4,2)->(8,) devices (Auto
  axes; a live Explicit-mesh state is cut too), then three
  more steps against the uninterrupted one-device run (float64). The bound
  is the one between a sharded and an unsharded run: XLA partitions the
  same arithmetic differently, and the bases (eigenvectors) amplify the
  last-bit differences of the statistics by their eigengaps' condition
  (measured: parameters 1e-15, Shampoo's bases up to 7e-13)."""
  result = _run_check('portable')
  for name in ('soap', 'shampoo', 'factorized_soap'):
    for move, errors in result[name].items():
      assert errors['params'] <= 1e-13, (name, move, errors)
      assert errors['state'] <= 1e-12, (name, move, errors)
      assert errors['placed'], (name, move)
  assert len(result['soap']) == 5
  # A live state on an Explicit (8,) mesh, cut by portable_state, against
  # the one-device run (ShardingTypeError before the fix).
  assert result['explicit_cut'] <= 1e-12, result['explicit_cut']
  refused = result['refused']
  assert refused is not None and 'stacks of units' in refused
  assert 'block_size' in refused

def test_rank_deficient_factors_give_the_same_answer_on_any_layout():
  """Four 64 x 256 matrices whose 256 x 256 factors are rank-deficient for
  the first steps: eigh/QR pick the null eigenspace's basis from rounding,
  so without the canonical null basis an (8,) mesh and one device differ
  by 3.5e-2 after 6 steps (measured on the code before it). Now: the
  sharded run and a run moved 8 -> 4 devices at step 3 against one device,
  float64 (measured 1.0e-13)."""
  result = _run_check('rank_deficient')
  assert result['sharded'] <= 1e-9, result
  assert result['moved'] <= 1e-12, result

def test_the_exchange_moves_every_row_exactly_and_only_by_all_to_all():
  """Gradients to the owners' stacks and back on (8,) and (2, 4) meshes,
  with parameters divided along a matrix axis, along a batch axis and
  replicated (float64): the gathered stacks equal the unsharded gather at
  the owners' slots bit for bit, padding slots are zero, the round trip is
  the identity, and three steps match the unsharded optimizer. The compiled
  update (parameters laid out by parameter_shardings) holds one all-to-all
  in and one out (every stack's parts in one buffer), no all-gather and no
  collective-permute; its all-reduces are scalars and the replicated (5, 3)
  parameter's update (15 entries)."""
  results = _run_check('exchange')
  assert len(results) == 3
  for key, r in results.items():
    message = f'{key}: {json.dumps(r)}'
    assert r['gathered'] == 0.0 and r['round_trip'] == 0.0, message
    assert r['padding_zero'], message
    assert r['trained'] <= 1e-14, message
    assert r['geometries'] == ['replicated', 'rows', 'slices'], message
    assert set(r['collectives']) == {'all-to-all', 'all-reduce'}, message
    assert r['exchange_buffers'] == 1, message  # one state dtype
    assert r['collectives']['all-to-all'] == 2, message
    assert r['largest_all_reduce'] <= 15 < r['largest_parameter'], message


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('layout', ['fsdp', 'hsdp'])
def test_two_processes_match_a_single_process_run(layout):
  """jax.distributed on 127.0.0.1, 2 processes of 4 CPU devices each (gloo
  collectives), 11 soap steps with the divided refresh, against the same
  training run in this process (one device, no mesh). 'fsdp': an (8,) mesh.
  'hsdp': a (data, model) = (2, 4) mesh, the state divided over 'model'
  only, resuming at step 5 from a checkpoint this process wrote on one
  device (portable_state)."""
  sys.path.insert(0, os.path.dirname(CHECKS))
  try:
    import multidevice_checks  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  port = str(_free_port())
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  with tempfile.TemporaryDirectory() as directory:
    extra = [layout]
    if layout == 'hsdp':
      extra.append(os.path.join(directory, 'checkpoint'))
      multidevice_checks.write_process_checkpoint(extra[-1])
    # Outputs to files, not pipes: a process blocked on a full pipe would
    # never reach jax.distributed's shutdown barrier.
    logs = [open(os.path.join(directory, f'{i}.log'), 'w+')
            for i in range(2)]
    processes = [subprocess.Popen(
        [sys.executable, CHECKS, 'process', str(i), port, *extra],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
                 for i, log in enumerate(logs)]
    try:
      for p in processes:
        p.wait(timeout=600)
    finally:
      for p in processes:
        p.kill()
    outputs = []
    for p, log in zip(processes, logs):
      log.seek(0)
      text = log.read()
      log.close()
      assert p.returncode == 0 and _result(text), text[-5000:]
      outputs.append(_result(text))
  reference = multidevice_checks.reference_process_run()
  flat = jax.tree_util.tree_flatten_with_path(reference)[0]
  for result in outputs:
    assert result['devices'] == 8 and result['local_devices'] == 4
    for path, expected in flat:
      key = '/'.join(str(getattr(p, 'key', p)) for p in path)
      got = np.asarray(result['params'][key], np.float32)
      np.testing.assert_allclose(got, expected, rtol=1e-5,
                                 atol=1e-5 * np.abs(expected).max())
  for key in outputs[0]['params']:
    assert outputs[0]['params'][key] == outputs[1]['params'][key]


@pytest.mark.parametrize('name', ['soap', 'shampoo'])
def test_staggered_refresh_on_a_mesh(name, x64):
  """Staggered refreshes select slots by mask on a mesh. With one unit per
  stack the phases are the same as without a mesh, and so is the result."""
  del x64
  params = {'a': jnp.linspace(-1.0, 1.0, 5 * 4).reshape(5, 4),
            'b': jnp.cos(jnp.arange(6 * 3.0)).reshape(6, 3),
            'c': jnp.sin(jnp.arange(2 * 7.0)).reshape(2, 7)}
  kwargs = dict(precondition_frequency=3, staggered_refresh=True)
  reference, _ = _train(ALL[name](**kwargs), params, 8)
  sharded, _ = _train(ALL[name](mesh=_one_device_mesh(), **kwargs), params, 8)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
