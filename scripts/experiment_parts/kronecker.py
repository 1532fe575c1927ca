"""Part 'kronecker': the SOAP paper's claims on the Kronecker problem.

On ``soap_optax.problems.kronecker_quadratic`` (m x n, condition 100 per
factor, Kronecker-structured gradient noise), every optimizer at its best
learning rate of the same grid (weight decay 0), averaged over noise seeds:
(a) SOAP against AdamW and Shampoo, steps to reach AdamW's final loss;
(b) robustness to the preconditioning frequency (1, 10, 30, 100): SOAP
should degrade more slowly than Shampoo as refreshes become rarer; (c)
one-sided and factorized SOAP (and the KL estimators) against full SOAP.
"Final loss" is the mean over the last 10% of steps.
"""

import jax
import numpy as np
import optax

import common
import optimizers
from soap_optax import problems

TITLE = 'Kronecker problem'
FREQUENCIES = (1, 10, 30, 100)


# The Kronecker grid: powers of two around the rates that worked in the tests.
KRONECKER_GRID = tuple(2.5e-3 * 2**k for k in range(-2, 8))  # 6.25e-4 .. 0.32


# The optimizers compared on the problem (names of optimizers.OPTIMIZERS).
KRONECKER_OPTIMIZERS = optimizers.check_names(
    ('adamw', 'soap', 'shampoo', 'soap_one_sided', 'factorized_soap',
     'kl_shampoo', 'kl_soap'))


def kronecker_factories(frequency: int):
  """Learning rate -> optimizer, for every variant compared on the problem:
  weight decay 0, the eigenbasis optimizers refreshed every ``frequency``
  steps, AdamW at b1 = 0.9, b2 = 0.95."""
  def eigenbasis(name):
    return lambda learning_rate: optimizers.make_eigenbasis_optimizer(
        name, learning_rate, weight_decay=0.0,
        precondition_frequency=frequency)

  factories = {name: eigenbasis(name) for name in KRONECKER_OPTIMIZERS
               if name != optimizers.ADAMW}
  factories[optimizers.ADAMW] = lambda learning_rate: optax.adamw(
      learning_rate, b1=0.9, b2=0.95, weight_decay=0.0)
  return factories


def loss_curve_fn(factory, steps, mapped=False):
  """``(problem, grid, noise_keys) -> curves`` of shape ``(len(grid), steps +
  1)``, each the mean over the noise seeds. The learning rate is injected and
  vmapped, and the whole thing jitted: one compile per optimizer for every
  rate, noise seed and (same-shaped) problem. ``mapped``: the runs one after
  another under ``lax.map`` instead (a vmapped refresh calls batched LAPACK,
  which can deadlock XLA's CPU thread pool: docs/numerics.md)."""

  @jax.jit
  def curves(problem, grid, noise_keys):
    def curve(learning_rate, key):
      optimizer = optax.inject_hyperparams(factory)(
          learning_rate=learning_rate)
      return problems.run_optimizer(problem, optimizer, steps, key)
    if mapped:
      runs = jax.lax.map(lambda pair: curve(*pair), (
          jax.numpy.repeat(grid, len(noise_keys)),
          jax.numpy.tile(noise_keys, (len(grid), 1))))
      return runs.reshape(len(grid), len(noise_keys), -1).mean(axis=1)
    return jax.vmap(jax.vmap(curve, in_axes=(None, 0)), in_axes=(0, None))(
        grid, noise_keys).mean(axis=1)

  return curves


def tail_mean(curve, fraction=0.1):
  tail = max(1, int(len(curve) * fraction))
  return float(np.mean(curve[-tail:]))


def run(quick: bool, out_dir=None):
  """(a), (b) and (c) on ``kronecker_quadratic`` (m x n, condition 100 per
  factor, Kronecker-structured gradient noise)."""
  m, n = (4, 6) if quick else (8, 16)
  steps = 60 if quick else 800
  problem_seeds = (0, 1)
  num_noise = 2 if quick else 4
  grid = KRONECKER_GRID[3:6] if quick else KRONECKER_GRID
  frequencies = (1, 10) if quick else FREQUENCIES
  runs = []  # (frequency, optimizer)
  for f in frequencies:
    runs += [(f, 'soap'), (f, 'shampoo')]
  runs += [(10, 'adamw'), (10, 'soap_one_sided'), (10, 'factorized_soap'),
           (10, 'kl_shampoo'), (10, 'kl_soap')]
  # curves[(f, name)][seed] = normalized loss curves over the grid.
  curves = {}
  for f, name in runs:
    print(f'  kronecker: {name} f={f}', flush=True)
    curves_of = loss_curve_fn(kronecker_factories(f)[name], steps)
    per_seed = []
    for seed in problem_seeds:
      problem = problems.kronecker_quadratic(
          jax.random.PRNGKey(seed), m=m, n=n, condition=100.0, noise_scale=1.0)
      keys = jax.random.split(jax.random.PRNGKey(1000 + seed), num_noise)
      c = np.asarray(curves_of(problem, jax.numpy.asarray(grid), keys))
      per_seed.append(c / float(problem.loss(problem.init)))
    curves[(f, name)] = np.stack(per_seed)  # (seed, lr, step)

  def best_rate(c):
    """Grid index with the lowest final loss averaged over seeds (inf if a
    seed diverged)."""
    finals = np.array([[tail_mean(c[s, i]) for i in range(c.shape[1])]
                       for s in range(c.shape[0])])
    finals = np.where(np.isfinite(finals), finals, np.inf).mean(axis=0)
    return int(np.argmin(finals)), finals

  adamw_index, _ = best_rate(curves[(10, 'adamw')])
  targets = [tail_mean(curves[(10, 'adamw')][s, adamw_index])
             for s in range(len(problem_seeds))]
  rows = []
  for (f, name), c in curves.items():
    index, finals = best_rate(c)
    steps_to = [problems.steps_to_reach(c[s, index], targets[s])
                for s in range(len(problem_seeds))]
    rows.append(dict(
        optimizer=name, frequency=f, best_lr=grid[index],
        final_loss=float(finals[index]),
        final_loss_per_seed=[tail_mean(c[s, index])
                             for s in range(len(problem_seeds))],
        steps_to_adamw_final=steps_to,
        diverged_rates=[grid[i] for i in range(len(grid))
                        if not np.isfinite(finals[i])],
        mean_curve=np.nanmean(c[:, index], axis=0)[::max(1, steps // 200)]
        .tolist()))
  return dict(m=m, n=n, steps=steps, problem_seeds=list(problem_seeds),
              noise_seeds=num_noise, grid=list(grid), adamw_targets=targets,
              rows=rows)


def tables(section) -> str:
  def fmt_steps(values):
    return ', '.join('never' if v is None else str(v) for v in values)

  header = (f'Kronecker problem {section["m"]}×{section["n"]}, '
            f'{section["steps"]} steps, problem seeds '
            f'{section["problem_seeds"]} (each the mean of '
            f'{section["noise_seeds"]} noise seeds); target: AdamW\'s final '
            f'loss per seed ({", ".join(f"{t:.4f}" for t in section["adamw_targets"])}'
            ' of the initial loss).')
  lines = [header, '',
           '| optimizer | frequency | best lr | final loss / initial | '
           'steps to AdamW final (per seed) | diverged at lr |',
           '| --- | --- | --- | --- | --- | --- |']
  order = sorted(section['rows'], key=lambda r: (r['optimizer'] != 'adamw',
                                                 r['optimizer'], r['frequency']))
  for r in order:
    lines.append(
        f'| {r["optimizer"]} | {r["frequency"]} | {r["best_lr"]:g} | '
        f'{r["final_loss"]:.4f} | {fmt_steps(r["steps_to_adamw_final"])} | '
        f'{", ".join(f"{x:g}" for x in r["diverged_rates"]) or "–"} |')
  return '\n'.join(lines)


def plot(section, out_dir) -> list:
  """kronecker.png (the loss curves at frequency 10) and frequency.png (the
  final loss against the preconditioning frequency)."""
  plt = common.pyplot()
  paths = []
  k = section
  stride = max(1, k['steps'] // 200)
  fig, ax = plt.subplots(figsize=(7, 4))
  for r in k['rows']:
    if r['frequency'] == 10:
      xs = [i * stride for i in range(len(r['mean_curve']))]
      ax.semilogy(xs, r['mean_curve'],
                  label=f'{r["optimizer"]} (lr {r["best_lr"]:g})')
  ax.set_xlabel('step')
  ax.set_ylabel('loss / initial loss (mean of seeds)')
  ax.set_title(f'Kronecker problem {k["m"]}×{k["n"]}, frequency 10')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  paths.append(common.save_figure(fig, out_dir / 'kronecker.png'))

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in ('soap', 'shampoo'):
    mine = sorted((r['frequency'], r['final_loss']) for r in k['rows']
                  if r['optimizer'] == name)
    ax.loglog([f for f, _ in mine], [v for _, v in mine], 'o-', label=name)
  adamw = [r for r in k['rows'] if r['optimizer'] == 'adamw'][0]
  ax.axhline(adamw['final_loss'], color='k', ls='--', lw=0.8, label='adamw')
  ax.set_xlabel('precondition_frequency')
  ax.set_ylabel('final loss / initial (best lr)')
  ax.grid(alpha=0.3, which='both')
  ax.legend()
  paths.append(common.save_figure(fig, out_dir / 'frequency.png'))
  return paths
