"""Section ``step``: the optimizer step against the machine's own limits.

The median jitted ``update`` time of ``optax.adamw``, ``soap``, ``shampoo``,
``factorized_soap`` and one-sided SOAP on single matrices and a small
transformer, regular calls and refresh calls (frequency 10) reported apart.
SOAP-family FLOP/s are counted as ``6 * numel * sum(rotated axis lengths)``
(``6 m n (m + n)`` for an m x n matrix: four rotations and two factor
products) and compared with the FLOP/s of the same products written as plain
``jnp.dot`` calls on the same shapes, measured in the same run. AdamW's
bandwidth (28 bytes per parameter: read g, p, m, v; write m, v, the update)
is compared with a measured read+write stream (``x + 1``, in place, over the
same number of bytes). Writes ``step_cost.png``.
"""

import json
import statistics
import time

import common
import jax
import jax.numpy as jnp

from benchmark_sections import shared

TITLE = 'Optimizer step against the machine'

ADAMW_BYTES_PER_PARAM = 28


def measure_reference_rates(shapes: dict, repeats: int) -> float:
  """Plain ``jnp.dot`` FLOP/s on the products a regular step makes.

  For every matrix ``G`` (m x n) of the set, each product shape is timed on
  its own: ``(m x m)(m x n)`` and ``(m x n)(n x n)`` (rotating in and out: two
  of each), ``(m x n)(n x m)`` and ``(n x m)(m x n)`` (the factors). The rate
  is ``6 m n (m + n)`` summed over the matrices, over the summed medians.
  """
  hi = jax.lax.Precision.HIGHEST
  dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=hi))
  key = jax.random.PRNGKey(1)
  matrices = [s for s in shapes.values()
              if len(shared.rotated_axes(s, False)) == 2]
  timings: dict[tuple[int, int, int], float] = {}
  seconds = 0.0
  for m, n in matrices:
    for (rows, inner, cols), times in (((m, m, n), 2), ((m, n, n), 2),
                                       ((m, n, m), 1), ((n, m, n), 1)):
      if (rows, inner, cols) not in timings:
        a = jax.random.normal(key, (rows, inner))
        b = jax.random.normal(key, (inner, cols))
        timings[(rows, inner, cols)] = statistics.median(
            common.time_calls(dot, (a, b), repeats, budget_s=10.0))
      seconds += times * timings[(rows, inner, cols)]
  return shared.step_flops(matrices) / seconds


def measure_stream_bandwidth(num_floats: int, repeats: int) -> float:
  """Bytes/s of ``x <- x + 1`` on ``num_floats`` float32 (read + write, the
  buffer donated so that no call allocates)."""
  add_one = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  x = jax.block_until_ready(add_one(jnp.zeros((num_floats,), jnp.float32)))
  times = []
  for _ in range(repeats):
    tick = time.perf_counter()
    x = jax.block_until_ready(add_one(x))
    times.append(time.perf_counter() - tick)
  return 8 * num_floats / statistics.median(times)


def time_optimizer(name: str, shapes: dict, steps: int) -> dict:
  """Times ``steps`` jitted update calls after the first one.

  Returns a dict with the median regular-call and refresh-call seconds (see
  :func:`shared.summarize_calls`), their counts, the mean over all calls, the
  compile time and the first call's time.
  """
  tx = shared.make_optimizer(name)
  params = shared.random_tree(shapes, 0)
  grads = [shared.random_tree(shapes, 10 + i, scale=1e-2) for i in range(4)]
  state = tx.init(params)
  tick = time.perf_counter()
  update = jax.jit(tx.update).lower(grads[0], state, params).compile()
  compile_s = time.perf_counter() - tick
  tick = time.perf_counter()
  state = jax.block_until_ready(update(grads[0], state, params)[1])
  first_s = time.perf_counter() - tick
  seconds = []
  for k in range(1, steps + 1):
    tick = time.perf_counter()
    updates, state = update(grads[k % len(grads)], state, params)
    jax.block_until_ready((updates, state))
    seconds.append(time.perf_counter() - tick)
  return dict(**shared.summarize_calls(name, seconds), compile_s=compile_s,
              first_call_s=first_s)


def run(steps: int, quick: bool) -> dict:
  """Every optimizer on every parameter set, with the set's reference rates."""
  sets = shared.single_matrix_sets(quick)
  sets['transformer'] = shared.small_transformer_shapes(quick)
  repeats = 5 if quick else 30
  rows = []
  for set_name, shapes in sets.items():
    rate = measure_reference_rates(shapes, repeats)
    num_params = common.parameter_count(shared.abstract_tree(shapes))
    # The same number of bytes as AdamW moves: 28 per parameter.
    bandwidth = measure_stream_bandwidth(
        ADAMW_BYTES_PER_PARAM * num_params // 8, repeats)
    for name in shared.OPTIMIZERS:
      print(f'  step: {set_name} {name}', flush=True)
      timing = time_optimizer(name, shapes, steps)
      row = dict(params=set_name, optimizer=name, num_params=num_params,
                 matmul_flops_per_s=rate, stream_bytes_per_s=bandwidth,
                 **timing)
      if name == 'adamw':
        achieved = ADAMW_BYTES_PER_PARAM * num_params / timing['regular_s']
        row.update(bytes_per_s=achieved, percent_of_stream=100 * achieved /
                   bandwidth)
      else:
        flops = shared.step_flops(shapes.values(),
                                  one_sided=name == 'soap_one_sided')
        row.update(flops=flops, flops_per_s=flops / timing['regular_s'],
                   percent_of_matmul=100 * flops / timing['regular_s'] / rate)
      rows.append(row)
      print('  row ' + json.dumps(row), flush=True)
  return dict(rows=rows, frequency=shared.FREQUENCY)


def table(section) -> str:
  lines = [
      '| params | optimizer | regular step ms (n) | refresh step ms (n) | '
      'mean ms at f=10 | achieved | of attainable |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for r in section['rows']:
    refresh = (f'{1e3 * r["refresh_s"]:.2f} ({r["refresh_n"]})'
               if r['refresh_s'] is not None else '–')
    if r['optimizer'] == 'adamw':
      achieved = f'{r["bytes_per_s"] / 1e9:.1f} GB/s'
      share = f'{r["percent_of_stream"]:.0f}% of copy bw'
    else:
      achieved = f'{r["flops_per_s"] / 1e9:.1f} GFLOP/s'
      share = f'{r["percent_of_matmul"]:.0f}% of matmul'
    lines.append(
        f'| {r["params"]} | {r["optimizer"]} | {1e3 * r["regular_s"]:.2f} '
        f'({r["regular_n"]}) | {refresh} | {1e3 * r["mean_s"]:.2f} | '
        f'{achieved} | {share} |')
  rates = {r['params']: (r['matmul_flops_per_s'], r['stream_bytes_per_s'])
           for r in section['rows']}
  lines.append('')
  lines.append('Reference rates measured in the same run (plain `jnp.dot` on '
               'the step\'s product shapes; `x + 1` over the bytes AdamW '
               'moves): ' + '; '.join(
                   f'{k}: {f / 1e9:.1f} GFLOP/s, {b / 1e9:.1f} GB/s'
                   for k, (f, b) in rates.items()) + '.')
  return '\n'.join(lines)


def plot(section, out_dir):
  """Regular-step times (log scale) and the share of the matmul rate, per
  parameter set and optimizer: ``step_cost.png``."""
  plt = common.pyplot()
  rows = section['rows']
  sets = list(dict.fromkeys(r['params'] for r in rows))
  fig, (times, shares) = plt.subplots(1, 2, figsize=(12, 4))
  width = 0.8 / len(shared.OPTIMIZERS)
  for j, name in enumerate(shared.OPTIMIZERS):
    mine = {r['params']: r for r in rows if r['optimizer'] == name}
    xs = [i + j * width for i in range(len(sets))]
    times.bar(xs, [1e3 * mine[s]['regular_s'] for s in sets], width,
              label=name)
    if name != 'adamw':
      shares.bar(xs, [mine[s]['percent_of_matmul'] for s in sets], width,
                 label=name, color=f'C{j}')
  for ax in (times, shares):
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets)
    ax.grid(alpha=0.3, axis='y')
    ax.legend(fontsize=8)
  times.set_yscale('log')
  times.set_ylabel('regular update step (ms, median)')
  shares.axhline(50, color='k', lw=0.8, ls='--')
  shares.set_ylabel('% of measured matmul FLOP/s')
  return common.save_figure(fig, out_dir / 'step_cost.png')
