"""Measures the numerics goals: the rounding-noise floor and ungrafted Shampoo.

Each goal is measured with the safeguard on (the default) and off (the
reference implementation's float32 behaviour), in one run, on this machine:

* ``dead``: a linear regression whose input features 3, 7, 11, 19, 22 and 28
  (of 32) are always zero, so their weight columns get exactly zero
  gradient; 10,000 float32
  steps of ``soap(weight_decay=0)`` in one ``lax.scan``; how far the dead
  columns moved, relative to their initial norm (float64 for comparison).
* ``span``: rank-1 to rank-4 gradients of a 64 x 32 matrix, all in one fixed
  span (well-conditioned random mixing), 60 steps of float32
  ``scale_by_rotated_adam``; the share of the update norm, summed over the
  run, outside that span (4 seeds: mean and max).
* ``eager``: a ReLU MLP (one batch of 4 rows) and a tanh network (fresh
  batches of 64 or 4 rows) trained for 25 steps with ``soap`` jitted and
  eager (``jax.disable_jit``); relative distance of the final parameters.
* ``full_rank``: the Kronecker problem (16 x 16, float32), 500 steps of
  ``soap``, 8 seeds: final losses with and without the floor.
* ``shampoo``: ungrafted Shampoo (frequency 10) on rank-4 gradients: update RMS
  over the first 20 calls, with and without the Rayleigh floor; and
  ``shampoo(grafting="none")`` at its defaults on the Kronecker problem.

Usage::

  python scripts/numerics.py [--out DIR] [--quick]
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import soap_optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from soap_optax import problems  # pylint: disable=g-import-not-at-top,wrong-import-position


def dead_weights(steps: int, rounding_floor: bool, dtype) -> float:
  return problems.dead_weight_movement(problems.dead_feature_regression(
      steps, rounding_floor=rounding_floor, dtype=dtype))


def _orthonormal(rng, n, r):
  return np.linalg.qr(rng.normal(size=(n, r)))[0]


def span_share(rank: int, rounding_floor: bool, seed: int,
               steps: int = 60) -> float:
  rng = np.random.default_rng(seed)
  left, right = _orthonormal(rng, 64, rank), _orthonormal(rng, 32, rank)
  tx = soap_optax.scale_by_rotated_adam(rounding_floor=rounding_floor)
  params = {'w': jnp.zeros((64, 32), jnp.float32)}
  state, update = tx.init(params), jax.jit(tx.update)
  outside = total = 0.0
  for _ in range(steps):
    mix = (_orthonormal(rng, rank, rank)
           @ np.diag(rng.uniform(0.5, 1.0, rank)) @ _orthonormal(rng, rank, rank))
    grad = left @ mix @ right.T
    out, state = update({'w': jnp.asarray(grad, jnp.float32)}, state)
    u = np.asarray(out['w'], np.float64)
    inside = left @ (left.T @ u @ right) @ right.T
    outside += np.sum((u - inside)**2)
    total += np.sum(u**2)
  return float(np.sqrt(outside / total))


def eager_versus_jit(rounding_floor: bool, steps: int = 25) -> float:
  rng = np.random.default_rng(0)
  start = {'w1': jnp.asarray(rng.normal(size=(16, 32)) / 4, jnp.float32),
           'w2': jnp.asarray(rng.normal(size=(32, 8)) / 6, jnp.float32)}
  x = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  tx = soap_optax.soap(weight_decay=0.0, rounding_floor=rounding_floor)

  def loss(p):
    return jnp.mean((jax.nn.relu(x @ p['w1']) @ p['w2'] - y)**2)

  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  def train(step_fn):
    params, state = start, tx.init(start)
    for _ in range(steps):
      params, state = step_fn(params, state)
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(params)])

  jitted = train(jax.jit(step))
  with jax.disable_jit():
    eager = train(step)
  return float(np.linalg.norm(jitted - eager) / np.linalg.norm(jitted))


def eager_versus_jit_full_rank(rounding_floor: bool, batch: int,
                               steps: int = 25) -> float:
  """A tanh network (16 -> 16 -> 16) on fresh batches of ``batch`` rows (64:
  every factor full rank from the first call; 4: rank-deficient)."""
  rng = np.random.default_rng(0)
  start = {'w1': jnp.asarray(rng.normal(size=(16, 16)) / 4, jnp.float32),
           'w2': jnp.asarray(rng.normal(size=(16, 16)) / 6, jnp.float32)}
  data = [(jnp.asarray(rng.normal(size=(batch, 16)), jnp.float32),
           jnp.asarray(rng.normal(size=(batch, 16)), jnp.float32))
          for _ in range(steps)]
  tx = soap_optax.soap(weight_decay=0.0, rounding_floor=rounding_floor)

  def step(params, state, x, y):
    loss = lambda p: jnp.mean((jnp.tanh(x @ p['w1']) @ p['w2'] - y)**2)
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  def train(step_fn):
    params, state = start, tx.init(start)
    for x, y in data:
      params, state = step_fn(params, state, x, y)
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(params)])

  jitted = train(jax.jit(step))
  with jax.disable_jit():
    eager = train(step)
  return float(np.linalg.norm(jitted - eager) / np.linalg.norm(jitted))


def kronecker_final_losses(make_tx, seeds, steps: int) -> list[float]:
  out = []
  for seed in seeds:
    problem = problems.kronecker_quadratic(jax.random.PRNGKey(seed))
    losses = problems.run_optimizer(problem, make_tx(), steps,
                                    jax.random.PRNGKey(1000 + seed))
    out.append(float(losses[-1]))
  return out


def ungrafted_shampoo_rms(rayleigh_floor: bool, calls: int = 20) -> list[float]:
  rng = np.random.default_rng(0)
  tx = soap_optax.scale_by_shampoo_eigenbasis(
      precondition_frequency=10, rayleigh_floor=rayleigh_floor)
  params = {'w': jnp.zeros((64, 32), jnp.float32)}
  state, update = tx.init(params), jax.jit(tx.update)
  rms = []
  for _ in range(calls):
    grad = rng.normal(size=(4, 64)).T @ rng.normal(size=(4, 32))
    out, state = update({'w': jnp.asarray(grad, jnp.float32)}, state)
    rms.append(float(jnp.sqrt(jnp.mean(out['w']**2))))
  return rms


def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='scripts/results/cpu/numerics')
  parser.add_argument('--quick', action='store_true',
                      help='fewer steps and seeds (proves the script runs)')
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  steps = 200 if args.quick else 10_000
  seeds = range(2 if args.quick else 8)
  results = dict(
      machine=dict(platform=platform.platform(), python=platform.python_version(),
                   jax=jax.__version__, optax=optax.__version__,
                   cpu_count=os.cpu_count(),
                   date=time.strftime('%Y-%m-%d')),
      quick=args.quick)
  tick = time.perf_counter()
  print('dead weights', flush=True)
  results['dead'] = dict(steps=steps, **{
      f'float32_floor_{on}': dead_weights(steps, on, jnp.float32)
      for on in (True, False)})
  with jax.enable_x64(True):
    results['dead']['float64'] = dead_weights(steps, True, jnp.float64)
  print('span', flush=True)
  results['span'] = {
      f'rank_{r}': {str(on): [span_share(r, on, s) for s in range(4)]
                    for on in (True, False)} for r in (1, 2, 3, 4)}
  print('eager', flush=True)
  results['eager'] = {str(on): eager_versus_jit(on) for on in (True, False)}
  results['eager_tanh'] = {
      f'batch_{b}': {str(on): eager_versus_jit_full_rank(on, b)
                     for on in (True, False)} for b in (64, 4)}
  print('full rank', flush=True)
  kron_steps = 100 if args.quick else 500
  results['full_rank'] = dict(steps=kron_steps, **{
      str(on): kronecker_final_losses(
          lambda on=on: soap_optax.soap(rounding_floor=on), seeds, kron_steps)
      for on in (True, False)})
  print('shampoo', flush=True)
  results['shampoo'] = dict(
      rms={str(on): ungrafted_shampoo_rms(on) for on in (True, False)},
      kronecker_ungrafted=kronecker_final_losses(
          lambda: soap_optax.shampoo(grafting='none'), seeds, kron_steps),
      kronecker_grafted=kronecker_final_losses(
          soap_optax.shampoo, seeds, kron_steps))
  results['seconds'] = time.perf_counter() - tick
  (out / 'results.json').write_text(json.dumps(results, indent=1))
  (out / 'tables.md').write_text(tables(results) + '\n')
  print(tables(results))
  return 0


def tables(r) -> str:
  d = r['dead']
  lines = [f'Dead weights after {d["steps"]:,} steps (movement / initial norm): '
           f'float32 with the floor {d["float32_floor_True"]:.2e}, without '
           f'{d["float32_floor_False"]:.2e}; float64 {d["float64"]:.2e}.', '',
           '| rank | outside the span, floor on (mean / max of 4) | floor off |',
           '| --- | --- | --- |']
  for rank, by in r['span'].items():
    on, off = by['True'], by['False']
    lines.append(f'| {rank[-1]} | {100 * np.mean(on):.2f}% / '
                 f'{100 * max(on):.2f}% | {100 * np.mean(off):.1f}% / '
                 f'{100 * max(off):.1f}% |')
  t = r['eager_tanh']
  lines += ['', 'Jitted vs eager after 25 steps (relative distance of the '
            'parameters), floor on / off: ReLU MLP on one batch of 4 rows '
            f'{r["eager"]["True"]:.2e} / {r["eager"]["False"]:.2e}; tanh '
            f'network, fresh batches of 64 {t["batch_64"]["True"]:.2e} / '
            f'{t["batch_64"]["False"]:.2e}, of 4 {t["batch_4"]["True"]:.2e} / '
            f'{t["batch_4"]["False"]:.2e}.', '']
  f = r['full_rank']
  on, off = np.array(f['True']), np.array(f['False'])
  lines.append(
      f'Kronecker problem, {f["steps"]} float32 steps, {len(on)} seeds: final '
      f'loss with the floor {on.mean():.5f} ± {on.std():.5f}, without '
      f'{off.mean():.5f} ± {off.std():.5f}; largest per-seed relative '
      f'difference {np.max(np.abs(on - off) / off):.2e}.')
  s = r['shampoo']
  lines += ['', 'Ungrafted Shampoo (frequency 10), update RMS over calls 1–19: '
            f'Rayleigh floor on max {max(s["rms"]["True"][1:]):.3g}, off max '
            f'{max(s["rms"]["False"][1:]):.3g}. `shampoo(grafting="none")` on '
            f'the Kronecker problem: final loss {np.mean(s["kronecker_ungrafted"]):.5f} '
            f'(grafted {np.mean(s["kronecker_grafted"]):.5f}).']
  return '\n'.join(lines)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
