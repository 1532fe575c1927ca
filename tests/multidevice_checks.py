"""Checks that need several devices, run in a subprocess by test_sharding.py.

``python tests/multidevice_checks.py CHECK [ARGS]`` starts JAX with 8 host
CPU devices (or, for ``process``, joins a 2-process cluster on 127.0.0.1)
and prints one JSON line, ``RESULT {...}``, that the test asserts on. The
suite's own process keeps one device.
"""

import json
import os
import sys

if __name__ == '__main__':
  # Before JAX starts: 8 host devices (4 per process in the 2-process run),
  # and one OpenBLAS thread per device (several host devices oversubscribe
  # the cores otherwise; see docs/sharding.md, CPU notes).
  _DEVICES = 4 if sys.argv[1] == 'process' else 8
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') +
      f' --xla_force_host_platform_device_count={_DEVICES}')
  os.environ['OPENBLAS_NUM_THREADS'] = '1'
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import soap_optax
from soap_optax import _refresh

SCANNED = soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
DIMENSION_NUMBERS = {'embed': None, 'attention': None, 'layers': SCANNED,
                     'head': None, 'bias': None}


def init_params(dtype=jnp.float32):
  """A small model: several shapes, a scanned stack (with biases), a 3-D
  attention kernel, a bias."""
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  return {
      'embed': jax.random.normal(keys[0], (40, 16), dtype),
      'attention': jax.random.normal(keys[1], (16, 2, 8), dtype) / 4,
      'layers': {
          'w_in': jax.random.normal(keys[2], (3, 16, 24), dtype) / 4,
          'b_in': jnp.zeros((3, 24), dtype),
          'w_out': jax.random.normal(keys[3], (3, 24, 16), dtype) / 5,
      },
      'head': jax.random.normal(keys[4], (16, 40), dtype) / 4,
      'bias': jnp.zeros((40,), dtype),
  }


def loss_fn(params, step):
  """A smooth loss whose gradients are full rank and change every step."""
  key = jax.random.fold_in(jax.random.PRNGKey(1), step)
  total = 0.0
  for i, leaf in enumerate(jax.tree.leaves(params)):
    target = jax.random.normal(jax.random.fold_in(key, i), leaf.shape,
                               leaf.dtype)
    total = total + jnp.mean(jnp.square(jnp.tanh(leaf) - target))
  return total


def make_mesh(shape, axis_type):
  names = ('data', 'model')[:len(shape)]
  kind = AxisType.Explicit if axis_type == 'explicit' else AxisType.Auto
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def param_sharding(mesh, leaf):
  """FSDP-like: the first axis over 'data', the last over 'model' (where
  the mesh has it), whenever they divide evenly."""
  spec = [None] * leaf.ndim
  data = mesh.shape['data']
  if leaf.ndim and leaf.shape[0] % data == 0:
    spec[0] = 'data'
  if 'model' in mesh.axis_names and leaf.ndim >= 2 and (
      leaf.shape[-1] % mesh.shape['model'] == 0):
    spec[-1] = 'model'
  return NamedSharding(mesh, P(*spec))


def optimizers(adaptive=False, combined=False, **kwargs):
  # max_precond_dim=16: only axes of length <= 16 carry a factor, and each of
  # them is the shorter side of its unit, so every factor is full rank from
  # the first gradient on. (A rank-deficient factor's null-space basis is
  # whatever eigh's rounding makes it, so runs whose statistics differ in
  # the last bit could not be compared.)
  common = dict(precondition_frequency=5, dimension_numbers=DIMENSION_NUMBERS,
                max_precond_dim=16, **kwargs)
  txs = {
      'soap': soap_optax.soap(learning_rate=1e-2, **common),
      'factorized_soap': soap_optax.factorized_soap(
          learning_rate=1e-2, **common),
      'shampoo': soap_optax.shampoo(learning_rate=1e-2, refresh='eigh',
                                    **common),
  }
  if combined:
    # What the other entries leave out, in one tree: Adafactor in the
    # eigenbasis with blocks, Shampoo with FOAM's damping and refresh rule
    # (both with a rejected unit, see train), KL-Shampoo, SOAP-Muon. (Not
    # staggering: a sharded plan gives units other phases than an unsharded
    # one, balanced per device, so the two runs are different schedules.)
    blocked = dict(common, block_size=8, precondition_frequency=3)
    txs['adafactor_blocked'] = optax.chain(
        soap_optax.scale_by_adafactor_in_eigenbasis(**blocked),
        optax.scale(-1e-2))
    txs['kl_shampoo'] = soap_optax.kl_shampoo(learning_rate=1e-2, **common)
    txs['soap_muon'] = soap_optax.soap_muon(learning_rate=1e-2, **common)
    txs['shampoo_foam'] = soap_optax.shampoo(
        learning_rate=1e-2, eps=1e-6, **dict(
            common, precondition_frequency=soap_optax.FoamRefresh(
                check_interval=2, tau=0.75, max_damping=1e-5)))
  if adaptive:
    # Refresh decisions per stack from staleness read on the sharded state
    # (padding slots excluded).
    txs['soap_adaptive'] = soap_optax.soap(learning_rate=1e-2, **dict(
        common, precondition_frequency=soap_optax.AdaptiveRefresh(
            tolerance=0.1, min_interval=2, max_interval=4)))
  return txs


# On this step the attention kernel's gradient is NaN (a rejected unit).
REJECTED_STEP = 4


def train(tx, params, steps, shardings=None, reject=False):
  """``steps`` steps of ``tx`` from ``params``; the final params (NumPy).
  With ``reject``, the attention kernel's gradient is NaN on
  ``REJECTED_STEP``."""
  def step(params, state, i):
    grads = jax.grad(loss_fn)(params, i)
    if reject:
      grads['attention'] = jnp.where(i == REJECTED_STEP, jnp.nan,
                                     grads['attention'])
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if shardings is None:
    state = tx.init(params)
    step = jax.jit(step)
  else:
    param_shardings, state_shardings = shardings
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    step = jax.jit(step, out_shardings=(param_shardings, state_shardings))
  for i in range(steps):
    params, state = step(params, state, i)
  compiles = step._cache_size() if hasattr(step, '_cache_size') else None  # pylint: disable=protected-access
  return jax.tree.map(np.asarray, params), state, compiles


def eigenbasis_states(state):
  """Every EigenbasisState inside an optimizer state."""
  from soap_optax import _state  # pylint: disable=g-import-not-at-top
  is_state = lambda x: isinstance(x, _state.EigenbasisState)
  return [x for x in jax.tree.leaves(state, is_leaf=is_state)
          if is_state(x)]


def stacked_states(state):
  """The states of the eigenbasis transforms inside an optimizer state."""
  from soap_optax import _sharding  # pylint: disable=g-import-not-at-top
  is_state = _sharding._is_stacked_state  # pylint: disable=protected-access
  return [x for x in jax.tree.leaves(state, is_leaf=is_state)
          if is_state(x)]


def ulp_perturbed(params, seed):
  """``params`` with every entry moved by one ulp of its dtype (its own
  magnitude times eps), up or down at random."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + jnp.where(jax.random.bernoulli(k, 0.5, x.shape), 1, -1).astype(
          x.dtype) * jnp.abs(x) * jnp.finfo(x.dtype).eps
      for x, k in zip(leaves, keys)])


def relative_error(a, b):
  return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------
# Checks.


def check_parity(dtype_name):
  """Sharded vs unsharded runs, 12 steps (refreshes at 0, 5 and 10)."""
  dtype = {'float64': jnp.float64, 'float32': jnp.float32}[dtype_name]
  if dtype == jnp.float64:
    jax.config.update('jax_enable_x64', True)
  # Every optimizer on each of the three mesh shapes (float64 or float32),
  # and each axis type, at least once.
  meshes = {
      'soap': [((8,), 'auto', None), ((2, 4), 'explicit', 'data')],
      'factorized_soap': [((8,), 'explicit', None), ((2, 4), 'auto', None)],
      'shampoo': [((4, 2), 'auto', None), ((2, 4), 'explicit', None)],
      'soap_adaptive': [((8,), 'explicit', None)],
      'adafactor_blocked': [((8,), 'explicit', None)],
      'shampoo_foam': [((2, 4), 'auto', None)],
      'kl_shampoo': [((2, 4), 'explicit', None)],
      'soap_muon': [((8,), 'explicit', None)],
  }
  if dtype == jnp.float32:
    meshes = {'soap': [((4, 2), 'explicit', None)],
              'factorized_soap': [((4, 2), 'explicit', None)],
              'shampoo': [((8,), 'explicit', None)]}
  params = init_params(dtype)
  results = {}
  for name, tx in optimizers(adaptive=True, combined=True).items():
    if name not in meshes:
      continue
    reject = name in ('adafactor_blocked', 'shampoo_foam')
    reference, reference_state, _ = train(tx, params, 12, reject=reject)
    expected = {k: np.asarray(v) for k, v in
                soap_optax.diagnostics(reference_state).items()}
    # float32: how far the unsharded run itself moves when its starting
    # parameters move by one ulp (every entry, random signs): the problem's
    # own rounding noise floor after 12 steps, to compare the sharded run
    # with.
    noise_floor = None if dtype == jnp.float64 else max(
        relative_error(train(tx, ulp_perturbed(params, seed), 12,
                             reject=reject)[0], reference)
        for seed in range(2))
    for shape, axis_type, axes in meshes[name]:
      mesh = make_mesh(shape, axis_type)
      placed = jax.tree.map(
          lambda x: jax.device_put(x, param_sharding(mesh, x)), params)
      sharded_tx = optimizers(adaptive=True, combined=True, mesh=mesh,
                              shard_axes=axes)[name]
      out, state, _ = train(sharded_tx, placed, 12, reject=reject)
      key = f'{name} {shape} {axis_type} shard_axes={axes}'
      engines = eigenbasis_states(state)
      got = {k: np.asarray(v) for k, v in soap_optax.diagnostics(state).items()}
      results[key] = {
          'relative_error': relative_error(out, reference),
          'noise_floor': noise_floor,
          'bitwise': all(np.array_equal(x, y) for x, y in zip(
              jax.tree.leaves(out), jax.tree.leaves(reference))),
          'engines': len(engines),
          'refreshes_failed': sum(int(e.failed_refreshes) for e in engines),
          'skipped': sum(int(e.skipped) for e in engines),
          'reference_skipped': sum(int(e.skipped) for e in eigenbasis_states(
              reference_state)),
          # Of the stacks with factors (the others refresh every call).
          'refresh_counts': sorted({
              int(v) for k, v in got.items() if k.startswith('refreshes/')
              and f'staleness/{k.split("/", 1)[1]}/' in ' '.join(got)}),
          # The parameters agree to about 1e-15 (float64), so do the
          # statistics behind every diagnostic: rtol 1e-9 in float64, as the
          # parameters. Staleness is the square root of a difference of O(1)
          # numbers, s = sqrt(1 - D/T): an error of k ulps in D/T moves s by
          # up to sqrt(k ulps) absolute, 1.5e-7 for k = 100 in float64 and
          # about 2e-3 for k = 30 in float32.
          'diagnostics_differ': sorted(
              k for k, v in got.items()
              if not np.allclose(v, expected[k], rtol=(
                  1e-9 if dtype == jnp.float64 else 1e-4), atol=(
                      (1.5e-7 if dtype == jnp.float64 else 2e-3)
                      if 'staleness' in k else
                      (0 if dtype == jnp.float64 else 1e-6)))),
      }
  return results


_SOLVERS = ('syevd', 'geqrf')
_COLLECTIVES = ('all-reduce', 'all-gather', 'collective-permute',
                'all-to-all', 'reduce-scatter')


def compiled_counts(text):
  """From a compiled (partitioned, per-device) HLO module: the solver
  calls' operand shapes, the trip counts of the loops around them, the
  collectives inside the divided refresh (under its shard_map) and the
  number of all-to-alls (the exchange's)."""
  solver_shapes, loops, refresh_collectives, loop_collectives = [], [], [], []
  exchanges = []
  for line in text.splitlines():
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name.group(1) if op_name else ''
    if 'custom-call(' in line and any(s in line for s in _SOLVERS):
      shape = re.search(r'operand_layout_constraints=\{\w+\[([\d,]+)\]',
                        line)
      solver_shapes.append(tuple(int(n) for n in shape.group(1).split(',')))
    if ' while(' in line and 'shard_map/while' in op_name:
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
      size = re.search(r'\w+\[\d+,(\d+),(\d+)\]', line)
      loops.append((int(size.group(1)) if size else -1,
                    int(trip.group(1)) if trip else -1))
    for kind in _COLLECTIVES:
      if f' {kind}(' in line or f' {kind}-start(' in line:
        if kind == 'all-to-all':  # the exchange's, counted apart
          exchanges.append(kind)
        elif 'shard_map' in op_name:
          refresh_collectives.append(kind)
          if '/while/' in op_name.split('shard_map', 1)[1]:
            loop_collectives.append(kind)
  return (solver_shapes, loops, refresh_collectives, loop_collectives,
          len(exchanges))


def check_compiled():
  """What one device runs in a step on an (8,) mesh, per optimizer, the
  parameters laid out as the exchange takes them (parameter_shardings)."""
  params = init_params()
  mesh = make_mesh((8,), 'auto')
  results = {}
  for name, tx in optimizers(mesh=mesh).items():
    placed = jax.tree.map(jax.device_put, params,
                          soap_optax.parameter_shardings(tx, params))
    state = tx.init(placed)
    plan = state[0].eigenbasis.plan if name != 'shampoo' else (
        state[0].direction.eigenbasis.plan)
    # Expected: per solver size (the factor sizes padded as the plan's
    # bound allows), the sum over stacks (and their factors of that size)
    # of ceil(U / 8): the slots each device loops over.
    solver_sizes = _refresh.solver_sizes(
        [jax.ShapeDtypeStruct((stack.size, d, d), jnp.float32)
         for stack in plan.stacks for d in stack.layout.factor_sizes],
        plan.solver_padding)
    expected = {}
    for stack in plan.stacks:
      for d in stack.layout.factor_sizes:
        solved = solver_sizes[(d, jnp.dtype(jnp.float32))]
        expected[solved] = expected.get(solved, 0) + math.ceil(
            stack.size / 8)
    text = jax.jit(tx.update).lower(placed, state, placed).compile().as_text()
    shapes, loops, collectives, in_loops, exchanges = compiled_counts(text)
    results[name] = {
        'solver_sizes': sorted(expected),
        'expected_trips': sorted(expected.items()),
        'stack_sizes': [s.size for s in plan.stacks],
        'solver_shapes': sorted(set(shapes)),
        'loop_trips': loops,
        'refresh_collectives': collectives,
        'collectives_in_loops': in_loops,
        'all_to_alls': exchanges,
        'stacks': len(plan.stacks),
    }
  return results


def check_state():
  """state_shardings: jit(init) and the step take it, the step compiles
  once, per-device bytes, and Orbax restores bitwise onto the same mesh and
  onto other mesh shapes."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = init_params()
  results = {}
  mesh = make_mesh((8,), 'explicit')
  placed = jax.tree.map(
      lambda x: jax.device_put(x, param_sharding(mesh, x)), params)
  param_shardings = jax.tree.map(lambda x: x.sharding, placed)
  for name, tx in optimizers(mesh=mesh).items():
    shardings = soap_optax.state_shardings(tx, placed)
    _, state, compiles = train(tx, placed, 7, (param_shardings, shardings))
    per_device = soap_optax.state_nbytes_per_device(state)
    total = soap_optax.state_nbytes(state)
    # The layout's bound: 1/8 of the unpadded state (the same optimizer
    # without a mesh), plus at most one slot (one unit) of every stacked
    # array, plus the parameter-like arrays that stay replicated because
    # their parameter is (its first axis does not divide by 8).
    unpadded = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(optimizers()[name].init, params)))
    one_slot_each = sum(
        x.nbytes // x.shape[0] for node in stacked_states(state)
        for x in jax.tree.leaves(node) if x.ndim)
    stacked_ids = {id(x) for node in stacked_states(state)
                   for x in jax.tree.leaves(node)}
    replicated = sum(x.nbytes for x in jax.tree.leaves(state)
                     if id(x) not in stacked_ids and x.ndim
                     and x.sharding.is_fully_replicated)
    # init places the stacks itself (no out_shardings), eagerly too.
    eager = tx.init(placed)
    placed_like_shardings = all(
        a.sharding.is_equivalent_to(b, a.ndim)
        for node, target in zip(stacked_states(eager),
                                stacked_states(shardings))
        for a, b in zip(jax.tree.leaves(node), jax.tree.leaves(target))
        if a.ndim)
    results[name] = {
        'compiles': compiles,
        'total_bytes': total,
        'max_device_bytes': max(per_device.values()),
        'bound_bytes': unpadded / 8 + one_slot_each + replicated,
        'unpadded_bytes': unpadded,
        'init_places_stacks': placed_like_shardings,
        'matches_shardings': all(
            leaf.sharding.is_equivalent_to(s, leaf.ndim)
            for leaf, s in zip(jax.tree.leaves(state),
                               jax.tree.leaves(shardings))),
    }
    if name == 'soap':  # no mesh given, Explicit-sharded parameters
      plain = optimizers()[name]
      grads = jax.jit(jax.grad(loss_fn))(placed, 0)
      plain_state = jax.jit(plain.update)(grads, plain.init(placed), placed)[1]
      plain_updates, _ = jax.jit(plain.update)(grads, plain_state, placed)
      reference_updates, _ = jax.jit(plain.update)(
          *jax.tree.map(np.asarray, (grads, plain_state, params)))
      results[name]['explicit_without_mesh_matches'] = all(
          np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
          for a, b in zip(jax.tree.leaves(plain_updates),
                          jax.tree.leaves(reference_updates)))
    if name == 'soap':  # an eager update on the Explicit mesh
      grads = jax.jit(jax.grad(loss_fn))(placed, 0)
      eager_updates, _ = tx.update(grads, eager, placed)
      jitted_updates, _ = jax.jit(tx.update)(grads, eager, placed)
      results[name]['eager_update_matches'] = all(
          np.allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
          and a.sharding.is_equivalent_to(g.sharding, a.ndim)
          for a, b, g in zip(jax.tree.leaves(eager_updates),
                             jax.tree.leaves(jitted_updates),
                             jax.tree.leaves(grads)))
    # Orbax: save, then restore onto the same mesh and onto others.
    restored_ok = {}
    with tempfile.TemporaryDirectory() as directory:
      path = os.path.join(directory, 'state')
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
        # Meshes of 8 devices: the layout (where the padding goes)
        # depends on the number of shards only.
        for shape, axis_type in (((8,), 'explicit'), ((4, 2), 'auto'),
                                 ((2, 4), 'explicit')):
          other = make_mesh(shape, axis_type)
          other_params = jax.tree.map(
              lambda x, other=other: jax.ShapeDtypeStruct(
                  x.shape, x.dtype, sharding=param_sharding(other, x)),
              params)
          other_tx = optimizers(mesh=other)[name]
          target_shardings = soap_optax.state_shardings(
              other_tx, other_params)
          target = jax.tree.map(
              lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
              jax.eval_shape(other_tx.init, other_params), target_shardings)
          restored = checkpointer.restore(path, target)
          restored_ok[f'{shape} {axis_type}'] = all(
              np.array_equal(np.asarray(a), np.asarray(b))
              and a.sharding.is_equivalent_to(s, a.ndim)
              for a, b, s in zip(jax.tree.leaves(restored),
                                 jax.tree.leaves(state),
                                 jax.tree.leaves(target_shardings)))
    results[name]['restored'] = restored_ok
  return results


def _moved_mesh(shape):
  """A mesh of the first ``prod(shape)`` devices (None for one device)."""
  if shape == (1,):
    return None
  names = ('data', 'model')[:len(shape)]
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:math.prod(shape)])


def check_portable(problem='full_rank'):
  """A checkpoint written on one mesh (portable_state, Orbax) restores on
  another (reshard_state) and continues as the uninterrupted run (float64);
  a state of other units is refused with the difference named."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_x64', True)
  params = init_params(jnp.float64)
  # Every move for SOAP; two for Shampoo (its graft and momentum are
  # parameter-shaped), one for Adafactor in the eigenbasis.
  moves = {'soap': [((8,), (4,)), ((4,), (8,)), ((8,), (1,)), ((1,), (8,)),
                    ((4, 2), (8,))],
           'shampoo': [((8,), (4,)), ((4, 2), (8,))],
           'factorized_soap': [((1,), (8,))]}
  results = {}
  for name in moves:
    reference, reference_state, _ = train(optimizers()[name], params, 6)
    errors = {}
    for source, destination in moves[name]:
      def build(shape, name=name):
        mesh = _moved_mesh(shape)
        tx = optimizers(**({} if mesh is None else {'mesh': mesh}))[name]
        placed = params if mesh is None else jax.tree.map(
            lambda x: jax.device_put(x, param_sharding(mesh, x)), params)
        return mesh, tx, placed
      _, tx, placed = build(source)
      halfway, state, _ = train(tx, placed, 3)
      mesh, tx, placed = build(destination)
      with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, 'state')
        with ocp.StandardCheckpointer() as checkpointer:
          checkpointer.save(path, soap_optax.portable_state(state))
          checkpointer.wait_until_finished()
          replicated = (NamedSharding(mesh, P()) if mesh is not None else
                        jax.sharding.SingleDeviceSharding(jax.devices()[0]))
          target = jax.tree.map(
              lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                             sharding=replicated),
              soap_optax.portable_state(jax.eval_shape(tx.init, placed)))
          restored = checkpointer.restore(path, target)
      moved = soap_optax.reshard_state(restored, tx, placed)
      shardings = soap_optax.state_shardings(tx, placed) if mesh else None
      placed_like_tx = shardings is None or all(
          a.sharding.is_equivalent_to(b, a.ndim) for a, b in zip(
              jax.tree.leaves(moved), jax.tree.leaves(shardings)))

      def step(params, state, i, tx=tx):
        grads = jax.grad(loss_fn)(params, i)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
      step = jax.jit(step)
      current = jax.tree.map(
          lambda x, p: jax.device_put(x, p.sharding), halfway, placed)
      for i in range(3, 6):
        current, moved = step(current, moved, i)
      errors[f'{source}->{destination}'] = {
          'params': relative_error(jax.tree.map(np.asarray, current),
                                   reference),
          'state': relative_error(
              jax.tree.map(np.asarray, soap_optax.portable_state(moved)),
              jax.tree.map(np.asarray, reference_state)),
          'placed': placed_like_tx}
    results[name] = errors
    if name == 'soap':
      # A live state on Explicit axes is cut too: its unit axis is divided
      # over the mesh, so the cut must say where the shorter stack lives.
      explicit = jax.make_mesh((8,), ('data',),
                               axis_types=(AxisType.Explicit,))
      placed = jax.tree.map(
          lambda x: jax.device_put(x, param_sharding(explicit, x)), params)
      _, state, _ = train(optimizers(mesh=explicit)['soap'], placed, 6)
      results['explicit_cut'] = relative_error(
          jax.tree.map(np.asarray, soap_optax.portable_state(state)),
          jax.tree.map(np.asarray, reference_state))
  # Other units (block_size) are refused, naming the stack that differs.
  mesh = _moved_mesh((4,))
  state = optimizers(mesh=mesh)['soap'].init(params)
  other = optimizers(mesh=mesh, block_size=8)['soap']
  try:
    soap_optax.reshard_state(state, other, params)
    results['refused'] = None
  except ValueError as error:
    results['refused'] = str(error)
  return results


def exchange_params(dtype=jnp.float64):
  """Every geometry of the exchange on 8 shards: parameters divided along a
  matrix axis (parts of a unit on several shards, whole units, blocks cut
  inside a shard), along a batch axis (the units stay where they are),
  replicated (no axis of 8), a 3-D kernel grouped into a (6, 24) matrix and
  divided along its second axis (3 of the matrix's 24 columns a shard), a
  scalar and an empty parameter."""
  shapes = {'rows': (24, 40), 'blocked': (40, 24), 'tall': (64, 8),
            'slices': (8, 3, 5), 'replicated': (5, 3), 'vector': (16,),
            'kernel': (6, 8, 3), 'scalar': (), 'empty': (0, 4)}
  keys = jax.random.split(jax.random.PRNGKey(7), len(shapes))
  return {name: jax.random.normal(key, shape, dtype)
          for (name, shape), key in zip(shapes.items(), keys)}


EXCHANGE_NUMBERS = {
    'rows': None, 'blocked': None, 'tall': None, 'vector': None,
    'slices': soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,)),
    'replicated': None, 'scalar': None, 'empty': None,
    'kernel': soap_optax.EigenbasisDimensionNumbers(reduction_axes=(0,),
                                                    output_axes=(1, 2))}


def check_exchange():
  """The exchange moves data exactly, and the compiled update holds only
  the collectives it should (float64, an (8,) mesh and a (2, 4) mesh
  divided over both axes)."""
  from soap_optax import _stacks  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_x64', True)
  params = exchange_params()
  results = {}
  for shape, block_size in (((8,), None), ((8,), 4), ((2, 4), 8)):
    mesh = make_mesh(shape, 'auto')
    tx = soap_optax.soap(1e-2, precondition_frequency=2, mesh=mesh,
                         block_size=block_size,
                         dimension_numbers=EXCHANGE_NUMBERS)
    layout = soap_optax.parameter_shardings(tx, params)
    placed = jax.tree.map(jax.device_put, params, layout)
    plan = tx.init(placed)[0].eigenbasis.plan
    leaves = jax.tree.leaves(placed)
    stacks = jax.jit(lambda l, plan=plan: _stacks.gather(l, plan))(leaves)
    reference = _stacks.gather([np.asarray(x) for x in leaves],
                               plan.unsharded())
    gathered = max((float(np.max(np.abs(
        np.asarray(a)[plan.sharding.unit_slots(s)] - np.asarray(b))))
                    for s, (a, b) in enumerate(zip(stacks, reference))
                    if b.size), default=0.0)
    padding_zero = all(
        np.all(np.asarray(a)[~plan.real_slots(s)] == 0)
        for s, a in enumerate(stacks))
    back = jax.jit(lambda st, plan=plan: _stacks.scatter(st, plan))(stacks)
    round_trip = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     if a.size else 0.0 for a, b in zip(back, leaves))
    # Three steps against the unsharded optimizer.
    plain = soap_optax.soap(1e-2, precondition_frequency=2,
                            block_size=block_size,
                            dimension_numbers=EXCHANGE_NUMBERS)
    def run(tx, params):
      state = tx.init(params)
      step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
      for i in range(3):
        grads = jax.tree.map(lambda x, i=i: jnp.cos(x * (i + 1.0)), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
      return jax.tree.map(np.asarray, params)
    nonempty = lambda tree: [x for x in jax.tree.leaves(tree) if x.size]
    trained = relative_error(nonempty(run(tx, placed)),
                             nonempty(run(plain, params)))
    text = jax.jit(tx.update).lower(placed, tx.init(placed), placed).compile(
        ).as_text()
    kinds = {}
    for line in text.splitlines():
      match = re.match(r'\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z\-]+)\(', line)
      if match:
        kind = match.group(2).removesuffix('-start')
        if kind in _COLLECTIVES:
          sizes = [int(np.prod([int(n) for n in dims.split(',') if n]))
                   for dims in re.findall(r'\[([\d,]*)\]', match.group(1))]
          kinds.setdefault(kind, []).append(max(sizes, default=1))
    results[f'{shape} block_size={block_size}'] = {
        'gathered': gathered, 'round_trip': round_trip,
        'padding_zero': bool(padding_zero), 'trained': trained,
        'stacks': len(plan.stacks),
        'exchange_buffers': len(_exchange_tables(plan).groups),
        'geometries': sorted({g.mode for g in plan.sharding.geometries}),
        'collectives': {k: len(v) for k, v in kinds.items()},
        'largest_all_reduce': max(kinds.get('all-reduce', [0])),
        'largest_parameter': max(x.size for x in leaves),
    }
  return results


def _exchange_tables(plan):
  from soap_optax import _exchange  # pylint: disable=g-import-not-at-top
  return _exchange.tables(plan)


def rank_deficient_params(dtype):
  """Four 64 x 256 matrices: one gradient leaves each 256 x 256 factor
  rank-deficient (rank 64), and so does every step until the fourth."""
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  return {f'layer{i}': jax.random.normal(k, (64, 256), dtype) / 16
          for i, k in enumerate(keys)}


def check_rank_deficient():
  """SOAP where the factors' null eigenspaces are picked by rounding:
  on an (8,) mesh against one device, and moved 8 -> 4 devices halfway,
  against the uninterrupted one-device run (float64)."""
  jax.config.update('jax_enable_x64', True)
  params = rank_deficient_params(jnp.float64)
  def build(shape):
    mesh = _moved_mesh(shape)
    tx = soap_optax.soap(learning_rate=1e-2, precondition_frequency=2,
                         **({} if mesh is None else {'mesh': mesh}))
    placed = params if mesh is None else jax.tree.map(
        lambda x: jax.device_put(x, param_sharding(mesh, x)), params)
    return tx, placed
  reference, _, _ = train(build((1,))[0], params, 6)
  tx, placed = build((8,))
  sharded, _, _ = train(tx, placed, 6)
  halfway, state, _ = train(tx, placed, 3)
  tx, placed = build((4,))
  state = soap_optax.reshard_state(soap_optax.portable_state(state), tx,
                                   placed)

  def step(params, state, i):
    grads = jax.grad(loss_fn)(params, i)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  step = jax.jit(step)
  current = jax.tree.map(lambda x, p: jax.device_put(x, p.sharding),
                         halfway, placed)
  for i in range(3, 6):
    current, state = step(current, state, i)
  return {'sharded': relative_error(sharded, reference),
          'moved': relative_error(jax.tree.map(np.asarray, current),
                                  reference)}


def check_process(process_id, port, layout='fsdp', checkpoint=None):
  """One of 2 processes (4 host devices each): train with the divided
  refresh on the global mesh; print the final parameters.

  ``layout`` 'fsdp': an (8,) mesh, 11 steps from the start. 'hsdp': a
  (data, model) = (2, 4) mesh whose 'data' axis spans the processes, the
  parameters and the optimizer state divided over 'model' only (replicated
  over 'data'); the run resumes at step 5 from ``checkpoint``, written by
  one process on one device (parameters and portable_state), and goes on
  to step 11."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}', num_processes=2,
      process_id=int(process_id))
  if layout == 'fsdp':
    mesh = make_mesh((8,), 'explicit')
    sharding_of = lambda x: param_sharding(mesh, x)
    tx = optimizers(mesh=mesh)['soap']
  else:
    mesh = jax.make_mesh((2, 4), ('data', 'model'),
                         axis_types=(AxisType.Explicit,) * 2)
    def sharding_of(x):
      spec = [None] * x.ndim
      if x.ndim and x.shape[-1] % 4 == 0:
        spec[-1] = 'model'
      return NamedSharding(mesh, P(*spec))
    tx = optimizers(mesh=mesh, shard_axes='model')['soap']
  params = init_params()
  placed = jax.tree.map(
      lambda x: jax.make_array_from_callback(
          x.shape, sharding_of(x), lambda index, x=x: x[index]),
      params)
  shardings = soap_optax.state_shardings(tx, placed)
  param_shardings = jax.tree.map(lambda x: x.sharding, placed)
  first = 0
  if checkpoint is None:
    state = jax.jit(tx.init, out_shardings=shardings)(placed)
  else:
    replicated = NamedSharding(mesh, P())
    target = {
        'params': jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding), placed),
        'state': jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=replicated),
            soap_optax.portable_state(jax.eval_shape(tx.init, placed)))}
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(checkpoint, target)
    placed = restored['params']
    state = soap_optax.reshard_state(restored['state'], tx, placed)
    first = CHECKPOINT_STEP

  def step(params, state, i):
    grads = jax.grad(loss_fn)(params, i)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, out_shardings=(param_shardings, shardings))
  for i in range(first, 11):
    placed, state = step(placed, state, i)
  # Every process sees the whole result once it is replicated.
  gathered = jax.jit(lambda p: p, out_shardings=NamedSharding(mesh, P()))(
      placed)
  return {'process': jax.process_index(),
          'devices': jax.device_count(),
          'local_devices': jax.local_device_count(),
          'params': {k: np.asarray(v).tolist() for k, v in
                     zip(['/'.join(str(getattr(p, 'key', p)) for p in path)
                          for path, _ in
                          jax.tree_util.tree_flatten_with_path(gathered)[0]],
                         jax.tree.leaves(gathered))}}


# The step the 'hsdp' 2-process run resumes from.
CHECKPOINT_STEP = 5


def write_process_checkpoint(path):
  """The one-device run's parameters and portable state after
  CHECKPOINT_STEP steps, saved with Orbax (for check_process 'hsdp')."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tx = optimizers()['soap']
  params, state, _ = train(tx, init_params(), CHECKPOINT_STEP)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {'params': params,
                             'state': soap_optax.portable_state(state)})
    checkpointer.wait_until_finished()


def reference_process_run():
  """The single-process (one device) run that check_process must equal."""
  tx = optimizers()['soap']
  params, _, _ = train(tx, init_params(), 11)
  return params


if __name__ == '__main__':
  CHECKS = {'parity': check_parity, 'compiled': check_compiled,
            'state': check_state, 'process': check_process,
            'portable': check_portable, 'exchange': check_exchange,
            'rank_deficient': check_rank_deficient}
  print('RESULT ' + json.dumps(CHECKS[sys.argv[1]](*sys.argv[2:])),
        flush=True)
