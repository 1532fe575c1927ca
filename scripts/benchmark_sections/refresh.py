"""Section ``refresh``: what one basis refresh costs.

Per factor size, one factor's ``eigh`` refresh against the power-iteration +
QR refresh (the engine's own functions, jitted alone, warm-started from a
random orthonormal basis), with the FLOP/s each reaches (``9 n^3`` and
``14/3 n^3``); then 8 same-size factors refreshed in one batched call, as the
engine does (``lax.map`` on a CPU, ``vmap`` elsewhere), against one call per
factor. Writes ``refresh_cost.png``.
"""

import json
import statistics

import common
import jax
import jax.numpy as jnp

from soap_optax import _batching
from soap_optax import _solvers

TITLE = 'Refresh cost'

BATCHED_FACTORS = 8


def random_factor(n: int, seed: int):
  """A symmetric PSD factor ``G G^T / 2n`` (G: n x 2n) and a random
  orthonormal warm-start basis."""
  key_g, key_q = jax.random.split(jax.random.PRNGKey(seed))
  g = jax.random.normal(key_g, (n, 2 * n))
  stat = jnp.dot(g, g.T, precision=jax.lax.Precision.HIGHEST) / (2 * n)
  basis = jnp.linalg.qr(jax.random.normal(key_q, (n, n)))[0]
  return stat, basis


def run(quick: bool) -> dict:
  """Single-factor refreshes per size, then batched against one by one."""
  sizes = (32, 64, 128) if quick else (256, 512, 1024, 2048, 4096)
  repeats = 3 if quick else 5
  budget = 5.0 if quick else 60.0
  single = []
  eigh_refresh = jax.jit(_solvers.eigh_basis)
  qr_refresh = jax.jit(_solvers.power_qr_basis)
  for n in sizes:
    print(f'  refresh: n={n}', flush=True)
    stat, basis = random_factor(n, n)
    eigh_s = statistics.median(common.time_calls(eigh_refresh, (stat, basis),
                                             repeats, budget))
    qr_s = statistics.median(common.time_calls(qr_refresh, (stat, basis), repeats,
                                           budget))
    single.append(dict(n=n, eigh_s=eigh_s, qr_s=qr_s, qr_over_eigh=qr_s / eigh_s,
                       eigh_flops_per_s=9 * n**3 / eigh_s,
                       qr_flops_per_s=(14 / 3) * n**3 / qr_s))
    print('  row ' + json.dumps(single[-1]), flush=True)

  batched = []
  count = BATCHED_FACTORS
  for n in ((32, 64) if quick else (256, 512, 1024)):
    print(f'  refresh: {count} x n={n}, batched and one by one', flush=True)
    factors = [random_factor(n, 100 + i) for i in range(count)]
    stats = [s for s, _ in factors]
    bases = [q for _, q in factors]
    for method, fn in (('eigh', _solvers.eigh_basis),
                       ('qr', _solvers.power_qr_basis)):
      # map_by_size takes stacks: here, 8 stacks of one factor each.
      together = jax.jit(lambda s, q, fn=fn: _batching.map_by_size(
          fn, [a[None] for a in s], [b[None] for b in q]))
      apart = jax.jit(
          lambda s, q, fn=fn: [fn(a, b) for a, b in zip(s, q)])
      together_s = statistics.median(common.time_calls(
          together, (stats, bases), repeats, budget))
      apart_s = statistics.median(common.time_calls(apart, (stats, bases),
                                                repeats, budget))
      batched.append(dict(n=n, count=count, method=method,
                          batched_s=together_s, per_factor_s=apart_s,
                          batched_over_per_factor=together_s / apart_s))
      print('  row ' + json.dumps(batched[-1]), flush=True)
  return dict(single=single, batched=batched,
              batch_mode='lax.map' if jax.default_backend() == 'cpu' else 'vmap')


def table(section) -> str:
  lines = ['| n | eigh refresh ms | QR refresh ms | QR / eigh | eigh GFLOP/s '
           '(9n³) | QR GFLOP/s (14/3 n³) |', '| --- | --- | --- | --- | --- | --- |']
  for r in section['single']:
    lines.append(
        f'| {r["n"]} | {1e3 * r["eigh_s"]:.1f} | {1e3 * r["qr_s"]:.1f} | '
        f'{r["qr_over_eigh"]:.2f} | {r["eigh_flops_per_s"] / 1e9:.1f} | '
        f'{r["qr_flops_per_s"] / 1e9:.1f} |')
  lines += ['', f'Batched ({section["batch_mode"]}, one call) against one call '
            'per factor:', '',
            '| factors | method | batched ms | per factor ms | batched / per factor |',
            '| --- | --- | --- | --- | --- |']
  for r in section['batched']:
    lines.append(
        f'| {r["count"]} × {r["n"]}² | {r["method"]} | '
        f'{1e3 * r["batched_s"]:.1f} | {1e3 * r["per_factor_s"]:.1f} | '
        f'{r["batched_over_per_factor"]:.2f} |')
  return '\n'.join(lines)


def plot(section, out_dir):
  """One factor's refresh time against its size, both methods:
  ``refresh_cost.png``."""
  plt = common.pyplot()
  rows = section['single']
  fig, ax = plt.subplots(figsize=(6, 4))
  ns = [r['n'] for r in rows]
  ax.loglog(ns, [1e3 * r['eigh_s'] for r in rows], 'o-', label='eigh')
  ax.loglog(ns, [1e3 * r['qr_s'] for r in rows], 's-',
            label='power iteration + QR')
  ax.set_xlabel('factor size n')
  ax.set_ylabel('refresh of one factor (ms)')
  ax.grid(alpha=0.3, which='both')
  ax.legend()
  return common.save_figure(fig, out_dir / 'refresh_cost.png')
