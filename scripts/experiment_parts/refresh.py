"""Part 'refresh': fixed refresh intervals against the adaptive policies.

SOAP and Shampoo with fixed intervals (1, 10, 30, 100) against
``soap_optax.AdaptiveRefresh`` (and ``FoamRefresh`` for Shampoo, classic
ungrafted Shampoo included) on the Kronecker problem, each at its best rate
of the Kronecker grid; and SOAP with each schedule on the main job's model
at its default size: final loss, factor decompositions, wall-clock, and the
staleness between refreshes (refresh.png).
"""

import pathlib
import time

import jax
import numpy as np
import optax

import common
import optimizers
import soap_optax
from soap_optax import problems

from experiment_parts import kronecker
from experiment_parts import sweep

TITLE = 'Refresh schedules'

# Part 'refresh': the fixed intervals against the adaptive policies.
SCHEDULES = (1, 10, 30, 100, 'adaptive')


# FOAM for Shampoo, checked on the interval of the fixed baseline (10); its
# thresholds are in units of the factors' eigenvalues (see FoamRefresh).
FOAM = dict(check_interval=10, tau=0.75, max_damping=3e-7)


def refresh_factory(name, schedule, **options):
  """Learning rate -> the eigenbasis optimizer ``name`` on the Kronecker
  problem, refreshed on ``schedule``; 'shampoo_ungrafted' is classic
  Shampoo, without the Rayleigh floor too."""
  if schedule == 'foam':
    schedule = soap_optax.FoamRefresh(**FOAM)
  elif schedule == 'foam, checked every step':
    schedule = soap_optax.FoamRefresh(**dict(FOAM, check_interval=1))
  if name == 'shampoo_ungrafted':
    options = dict(options, rayleigh_floor=False)
  return lambda learning_rate: optimizers.make_eigenbasis_optimizer(
      name, learning_rate, weight_decay=0.0, precondition_frequency=schedule,
      **options)


def run_kronecker(quick: bool):
  """Each schedule at its best rate of the Kronecker grid: final loss,
  factor decompositions (from ``soap_optax.diagnostics``) and the
  wall-clock of one run. The grid runs are vmapped, so there every
  ``lax.cond`` becomes a select; the wall-clock comes from a separate,
  unbatched run at the best rate."""
  m, n = (4, 6) if quick else (8, 16)
  steps = 60 if quick else 800
  problem_seeds = (0, 1)
  num_noise = 2 if quick else 4
  grid = kronecker.KRONECKER_GRID[3:6] if quick else kronecker.KRONECKER_GRID
  if quick:
    runs = [('soap', 10), ('soap', 'adaptive'), ('shampoo', 'foam')]
  else:
    runs = [(name, sched) for name in ('soap', 'shampoo')
            for sched in SCHEDULES]
    runs += [('shampoo', 'foam'), ('shampoo_ungrafted', 10),
             ('shampoo_ungrafted', 'foam'),
             ('shampoo_ungrafted', 'foam, checked every step')]
  rows = []
  for name, schedule in runs:
    print(f'  refresh/kronecker: {name} {sweep.schedule_name(schedule)}', flush=True)
    factory = refresh_factory(name, schedule)

    @jax.jit
    def grid_runs(problem, rates, noise_keys, factory=factory):
      def one(rate, key):
        tx = optax.inject_hyperparams(factory)(learning_rate=rate)
        curve, state = problems.run_optimizer(problem, tx, steps, key,
                                              return_state=True)
        return curve, soap_optax.diagnostics(state)['decompositions']
      return jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))(
          rates, noise_keys)

    finals, decompositions = [], []
    problems_by_seed = []
    for seed in problem_seeds:
      problem = problems.kronecker_quadratic(
          jax.random.PRNGKey(seed), m=m, n=n, condition=100.0, noise_scale=1.0)
      problems_by_seed.append(problem)
      keys = jax.random.split(jax.random.PRNGKey(1000 + seed), num_noise)
      curves, counts = grid_runs(problem, jax.numpy.asarray(grid), keys)
      curves = np.asarray(curves) / float(problem.loss(problem.init))
      finals.append([kronecker.tail_mean(c.mean(axis=0)) for c in curves])
      decompositions.append(np.asarray(counts).mean(axis=1))
    finals = np.asarray(finals)
    mean_finals = np.where(np.isfinite(finals), finals, np.inf).mean(axis=0)
    best = int(np.argmin(mean_finals))
    # Wall-clock: one unbatched run at the best rate, after compiling.
    run_once = jax.jit(lambda key, factory=factory, lr=grid[best]:
                       problems.run_optimizer(problems_by_seed[0],
                                              factory(lr), steps, key))
    run_once(jax.random.PRNGKey(0)).block_until_ready()
    tick = time.perf_counter()
    run_once(jax.random.PRNGKey(1)).block_until_ready()
    rows.append(dict(
        optimizer=name, schedule=sweep.schedule_name(schedule), best_lr=grid[best],
        final_loss=float(mean_finals[best]),
        final_loss_per_seed=finals[:, best].tolist(),
        decompositions=float(np.mean([d[best] for d in decompositions])),
        seconds_per_run=time.perf_counter() - tick,
        diverged_rates=[grid[i] for i in range(len(grid))
                        if not np.isfinite(mean_finals[i])
                        or mean_finals[i] > 1.0]))
  return dict(m=m, n=n, steps=steps, problem_seeds=list(problem_seeds),
              noise_seeds=num_noise, grid=list(grid), foam=FOAM, rows=rows)


def run_lm(quick: bool, out_dir: pathlib.Path, learning_rate: float,
                   every_10=None):
  """SOAP on the main job's model at its default size, one rate, with each
  schedule: final validation loss, decompositions and wall-clock.
  ``every_10``: the record of the fixed interval 10 at this rate, if the
  'muon' part ran it already."""
  sizes = sweep.LM_QUICK if quick else sweep.LM_MAIN
  schedules = (10, 'adaptive') if quick else SCHEDULES
  rows = []
  for schedule in schedules:
    print(f'  refresh/lm: soap {sweep.schedule_name(schedule)}', flush=True)
    if schedule == 10 and every_10 is not None:
      record = every_10
    else:
      record = sweep.train_lm_run('soap', learning_rate, 0, sizes,
                            out_dir / 'refresh',
                            precondition_frequency=schedule)
    rows.append(dict(
        schedule=sweep.schedule_name(schedule), final_valid_loss=record['valid_loss'][-1],
        decompositions=record['decompositions'][-1],
        seconds=record['wall_clock'][-1],
        optimizer_step_share=record['optimizer_step_share'],
        staleness=record['staleness'][::max(1, sizes['steps'] // 150)],
        refresh_steps=[i + 1 for i, (a, b) in enumerate(zip(
            [0] + record['decompositions'][:-1], record['decompositions']))
                       if b > a]))
  return dict(sizes=sizes, learning_rate=learning_rate, rows=rows)


def run(quick: bool, out_dir: pathlib.Path, learning_rate: float = 3e-3,
        every_10=None):
  """Both halves; ``learning_rate`` and ``every_10`` as in run_lm."""
  return dict(kronecker=run_kronecker(quick),
              lm=run_lm(quick, out_dir, learning_rate, every_10))


def tables(section) -> str:
  lines = []
  k = section['kronecker']
  lines += [
      f'Kronecker problem {k["m"]}×{k["n"]}, {k["steps"]} steps, problem '
      f'seeds {k["problem_seeds"]} (each the mean of {k["noise_seeds"]} '
      'noise seeds), best rate of the grid per schedule; FOAM: '
      f'{k["foam"]} with $\\varepsilon = \\varepsilon_0 = 10^{{-12}}$; '
      '`shampoo_ungrafted` is classic Shampoo '
      '(`grafting="none", rayleigh_floor=False`).', '',
      '| optimizer | schedule | best lr | final loss / initial | '
      'decompositions | s per run | lr diverged or > initial |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for r in k['rows']:
    lines.append(
        f'| {r["optimizer"]} | {r["schedule"]} | {r["best_lr"]:g} | '
        f'{r["final_loss"]:.4f} | {r["decompositions"]:.0f} | '
        f'{r["seconds_per_run"]:.2f} | '
        f'{", ".join(f"{x:g}" for x in r["diverged_rates"]) or "–"} |')
  lm_section = section['lm']
  s = lm_section['sizes']
  lines += [
      '', f'Main job\'s model (d={s["d_model"]}, {s["num_layers"]} layers, '
      f'batch {s["batch_size"]}×{s["seq_len"]}, {s["steps"]} steps), '
      f'`soap` at lr {lm_section["learning_rate"]:g}, seed 0.', '',
      '| schedule | final valid loss | decompositions | wall-clock s | '
      'optimizer share of a step |', '| --- | --- | --- | --- | --- |']
  for r in lm_section['rows']:
    lines.append(
        f'| {r["schedule"]} | {r["final_valid_loss"]:.4f} | '
        f'{r["decompositions"]:.0f} | {r["seconds"]:.0f} | '
        f'{r["optimizer_step_share"]:.0%} |')
  return '\n'.join(lines)


def plot(section, out_dir) -> list:
  """refresh.png: the staleness of SOAP on the main job's model under each
  schedule, and its refreshes."""
  plt = common.pyplot()
  rows = section['lm']['rows']
  fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.9 * len(rows)),
                           sharex=True, squeeze=False)
  steps = section['lm']['sizes']['steps']
  for ax, r in zip(axes[:, 0], rows):
    stride = max(1, steps // 150)
    ax.plot([1 + i * stride for i in range(len(r['staleness']))],
            r['staleness'], lw=0.9)
    for step in r['refresh_steps']:
      ax.axvline(step, color='tab:red', lw=0.5, alpha=0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel('staleness', fontsize=8)
    ax.set_title(f'soap, {r["schedule"]}: {r["decompositions"]:.0f} '
                 f'decompositions, final loss {r["final_valid_loss"]:.3f}',
                 fontsize=8)
    ax.grid(alpha=0.3)
  axes[-1, 0].set_xlabel('step (red: refreshes)')
  return [common.save_figure(fig, out_dir / 'refresh.png')]
