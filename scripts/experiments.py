"""The SOAP paper's claims, checked at small scale.

(a) SOAP against AdamW and Shampoo: steps to reach AdamW's final loss, each
    optimizer at its best learning rate of the same grid, on the
    ill-conditioned Kronecker problem (``soap_optax.problems``) and on the main
    job's byte-level language model (``scripts/train_lm.py``, a smaller size).
(b) Robustness to the preconditioning frequency (1, 10, 30, 100) on the
    Kronecker problem: the paper's claim is that SOAP degrades more slowly than
    Shampoo as refreshes become rarer.
(c) One-sided and factorized SOAP against full SOAP, on both problems.
(d) 'muon': AdamW, SOAP (every 10 steps and adaptive) and optax's Muon on the
    main job's model at its default size, each over a learning-rate grid:
    steps and wall-clock to reach AdamW's best final validation loss.
(e) 'refresh': fixed refresh intervals (1, 10, 30, 100) against the adaptive
    policies (soap_optax.AdaptiveRefresh, and FoamRefresh for Shampoo) on the
    Kronecker problem and the main job's model: final loss, factor
    decompositions, wall-clock.

Every optimizer runs with weight decay 0 on the Kronecker problem (a quadratic
with a known optimum) and with the main job's settings on the language model.
"Final loss" is the mean over the last 10% of steps (Kronecker, averaged over
noise seeds) or the last evaluation (language model). Seeds: problem seeds
(Kronecker; each averaged over several noise seeds) and model/data seeds (LM).

Examples::

  python scripts/experiments.py              # ~15 min on 2 CPU cores
  python scripts/experiments.py --quick      # tiny sizes (CI)
  python scripts/experiments.py --parts kronecker

Outputs under ``--out``: ``results.json``, ``tables.md``, ``kronecker.png``,
``frequency.png``, ``lm.png``, ``muon.png`` and ``refresh.png``.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

PARTS = ('kronecker', 'lm', 'muon', 'refresh')
FREQUENCIES = (1, 10, 30, 100)
# Part 'refresh': the fixed intervals against the adaptive policies.
SCHEDULES = (1, 10, 30, 100, 'adaptive')
# FOAM for Shampoo, checked on the interval of the fixed baseline (10); its
# thresholds are in units of the factors' eigenvalues (see FoamRefresh).
FOAM = dict(check_interval=10, tau=0.75, max_damping=3e-7)
MUON_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
# Muon's matrices take larger rates (its Adam part stays at AdamW's best).
MUON_OWN_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
# The Kronecker grid: powers of two around the rates that worked in the tests.
KRONECKER_GRID = tuple(2.5e-3 * 2**k for k in range(-2, 8))  # 6.25e-4 .. 0.32
LM_GRID = (1e-3, 3e-3, 1e-2)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--parts', default=','.join(PARTS),
                      help=f'comma-separated subset of {",".join(PARTS)}')
  parser.add_argument('--out', default=None,
                      help='output folder (default runs/experiments-<time>)')
  args = parser.parse_args(argv)
  args.parts = benchmark.comma_list('--parts', args.parts, PARTS)
  return args


# ------------------------------------------------------------------------------
# Kronecker problem.


def kronecker_factories(frequency: int):
  """Learning rate -> optimizer, for every variant compared on the problem."""
  import optax  # pylint: disable=g-import-not-at-top
  import soap_optax  # pylint: disable=g-import-not-at-top
  return {
      'adamw': lambda learning_rate: optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=0.0),
      'soap': lambda learning_rate: soap_optax.soap(
          learning_rate, weight_decay=0.0, precondition_frequency=frequency),
      'shampoo': lambda learning_rate: soap_optax.shampoo(
          learning_rate, weight_decay=0.0, precondition_frequency=frequency),
      'soap_one_sided': lambda learning_rate: soap_optax.soap(
          learning_rate, weight_decay=0.0, precondition_frequency=frequency,
          one_sided=True),
      'factorized_soap': lambda learning_rate: soap_optax.factorized_soap(
          learning_rate, weight_decay=0.0, precondition_frequency=frequency),
  }


def loss_curve_fn(jax, factory, steps):
  """``(problem, grid, noise_keys) -> curves`` of shape ``(len(grid), steps +
  1)``, each the mean over the noise seeds. The learning rate is injected and
  vmapped, and the whole thing jitted: one compile per optimizer for every
  rate, noise seed and (same-shaped) problem."""
  import optax  # pylint: disable=g-import-not-at-top
  from soap_optax import problems  # pylint: disable=g-import-not-at-top

  @jax.jit
  def curves(problem, grid, noise_keys):
    def curve(learning_rate, key):
      optimizer = optax.inject_hyperparams(factory)(
          learning_rate=learning_rate)
      return problems.run_optimizer(problem, optimizer, steps, key)
    return jax.vmap(jax.vmap(curve, in_axes=(None, 0)), in_axes=(0, None))(
        grid, noise_keys).mean(axis=1)

  return curves


def tail_mean(curve, fraction=0.1):
  import numpy as np  # pylint: disable=g-import-not-at-top
  tail = max(1, int(len(curve) * fraction))
  return float(np.mean(curve[-tail:]))


def first_below(curve, target):
  import numpy as np  # pylint: disable=g-import-not-at-top
  below = np.nonzero(np.asarray(curve) <= target)[0]
  return int(below[0]) if below.size else None


def run_kronecker(jax, quick: bool):
  """(a), (b) and (c) on ``kronecker_quadratic`` (m x n, condition 100 per
  factor, Kronecker-structured gradient noise)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from soap_optax import problems  # pylint: disable=g-import-not-at-top
  m, n = (4, 6) if quick else (8, 16)
  steps = 60 if quick else 800
  problem_seeds = (0, 1)
  num_noise = 2 if quick else 4
  grid = KRONECKER_GRID[3:6] if quick else KRONECKER_GRID
  frequencies = (1, 10) if quick else FREQUENCIES
  runs = []  # (frequency, optimizer)
  for f in frequencies:
    runs += [(f, 'soap'), (f, 'shampoo')]
  runs += [(10, 'adamw'), (10, 'soap_one_sided'), (10, 'factorized_soap')]
  # curves[(f, name)][seed] = normalized loss curves over the grid.
  curves = {}
  for f, name in runs:
    print(f'  kronecker: {name} f={f}', flush=True)
    curves_of = loss_curve_fn(jax, kronecker_factories(f)[name], steps)
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
    steps_to = [first_below(c[s, index], targets[s])
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


def kronecker_tables(section) -> str:
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


# ------------------------------------------------------------------------------
# Language model.


def run_lm(quick: bool, out_dir: pathlib.Path):
  """The main job's model at a reduced size; every optimizer over LM_GRID and
  two seeds; the one-sided and factorized variants at SOAP's best rate."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import soap_optax  # pylint: disable=g-import-not-at-top
  import train_lm  # pylint: disable=g-import-not-at-top
  sizes = (dict(steps=20, batch_size=8, seq_len=32, d_model=32, num_layers=1,
                num_heads=2, eval_every=10, eval_batches=2) if quick else
           dict(steps=200, batch_size=16, seq_len=64, d_model=64, num_layers=2,
                num_heads=4, eval_every=20, eval_batches=8))
  grid = LM_GRID[1:2] if quick else LM_GRID
  seeds = (0,) if quick else (0, 1)
  records = {}  # (optimizer, lr, seed) -> record
  # Nothing is checkpointed (checkpoint_every=0); train_one only looks there.
  run_args = types.SimpleNamespace(checkpoint_every=0, stop_after=0)
  base_config = train_lm.Config(
      optimizers=('adamw',), learning_rates=(grid[0],), weight_decay=0.01,
      precondition_frequency=10, seed=0, corpus='stdlib', **sizes)
  lib = train_lm.build(base_config)  # the model and steps, built once.
  make_optimizer = lib['make_optimizer']
  lib['make_optimizer'] = lambda name, rate: (
      soap_optax.soap(rate, weight_decay=base_config.weight_decay,
                      precondition_frequency=base_config.precondition_frequency,
                      one_sided=True)
      if name == 'soap_one_sided' else make_optimizer(name, rate))
  data = train_lm.split_corpus(train_lm.load_corpus(None), sizes['seq_len'])

  def train(name, lr, seed):
    print(f'  lm: {name} lr={lr:g} seed={seed}', flush=True)
    config = dataclasses.replace(base_config, optimizers=(name,),
                                 learning_rates=(lr,), seed=seed)
    records[(name, lr, seed)] = train_lm.train_one(
        lib, config, name, lr, data, out_dir / 'lm', run_args,
        train_lm._SilentBar)  # pylint: disable=protected-access

  def best_lr(name):
    finals = {lr: np.mean([records[(name, lr, s)]['valid_loss'][-1]
                           for s in seeds]) for lr in grid}
    return min(finals, key=lambda lr: finals[lr]), finals

  # --quick (CI) checks the plumbing with two optimizers.
  tuned = ('adamw', 'soap') if quick else ('adamw', 'soap', 'shampoo')
  variants = () if quick else ('soap_one_sided', 'factorized_soap')
  for name in tuned:
    for lr in grid:
      for seed in seeds:
        train(name, lr, seed)
  soap_lr, _ = best_lr('soap')
  for name in variants:
    for seed in seeds:
      train(name, soap_lr, seed)
  adamw_lr, _ = best_lr('adamw')
  targets = {s: records[('adamw', adamw_lr, s)]['valid_loss'][-1]
             for s in seeds}
  rows = []
  for name in tuned + variants:
    if name in ('soap_one_sided', 'factorized_soap'):
      lr, finals = soap_lr, {}
    else:
      lr, finals = best_lr(name)
    mine = [records[(name, lr, s)] for s in seeds]
    rows.append(dict(
        optimizer=name, lr=lr,
        grid_final_losses={f'{k:g}': float(v) for k, v in finals.items()},
        final_valid_loss=[r['valid_loss'][-1] for r in mine],
        steps_to_adamw_final=[train_lm.steps_to_reach(r, targets[s])
                              for r, s in zip(mine, seeds)],
        seconds=[r['wall_clock'][-1] for r in mine],
        optimizer_step_share=[r['optimizer_step_share'] for r in mine],
        curve_steps=mine[0]['steps'],
        mean_curve=np.mean([r['valid_loss'] for r in mine], axis=0).tolist()))
  return dict(sizes=sizes, grid=list(grid), seeds=list(seeds),
              adamw_targets=[targets[s] for s in seeds], rows=rows)


def lm_table(section) -> str:
  s = section['sizes']
  lines = [f'Byte-level LM (scripts/train_lm.py model), d={s["d_model"]}, '
           f'{s["num_layers"]} layers, batch {s["batch_size"]}×{s["seq_len"]},'
           f' {s["steps"]} steps, seeds {section["seeds"]}; grid '
           f'{section["grid"]}; target: AdamW\'s final validation loss per seed'
           f' ({", ".join(f"{t:.4f}" for t in section["adamw_targets"])}).',
           '', '| optimizer | lr | final valid loss (per seed) | steps to AdamW '
           'final (per seed) | wall-clock s | grid: mean final loss per lr |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in section['rows']:
    grid = ', '.join(f'{k}: {v:.3f}' for k, v in r['grid_final_losses'].items())
    lines.append(
        f'| {r["optimizer"]} | {r["lr"]:g} | '
        f'{", ".join(f"{v:.4f}" for v in r["final_valid_loss"])} | '
        f'{", ".join("never" if v is None else str(v) for v in r["steps_to_adamw_final"])} | '
        f'{", ".join(f"{v:.0f}" for v in r["seconds"])} | '
        f'{grid or "(SOAP rate, not tuned)"} |')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------
# Refresh schedules: fixed intervals against the adaptive policies.


def schedule_name(schedule) -> str:
  return f'every {schedule}' if isinstance(schedule, int) else str(schedule)


def refresh_factory(name, schedule, **options):
  """Learning rate -> optimizer on the Kronecker problem."""
  import soap_optax  # pylint: disable=g-import-not-at-top
  if schedule == 'foam':
    schedule = soap_optax.FoamRefresh(**FOAM)
  elif schedule == 'foam, checked every step':
    schedule = soap_optax.FoamRefresh(**dict(FOAM, check_interval=1))
  alias = {'soap': soap_optax.soap, 'shampoo': soap_optax.shampoo,
           'shampoo_ungrafted': lambda lr, **kw: soap_optax.shampoo(
               lr, grafting='none', rayleigh_floor=False, **kw)}[name]
  return lambda learning_rate: alias(
      learning_rate, weight_decay=0.0, precondition_frequency=schedule,
      **options)


def run_refresh_kronecker(jax, quick: bool):
  """Each schedule at its best rate of the Kronecker grid: final loss,
  factor decompositions (from ``soap_optax.diagnostics``) and the
  wall-clock of one run. The grid runs are vmapped, so there every
  ``lax.cond`` becomes a select; the wall-clock comes from a separate,
  unbatched run at the best rate."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import soap_optax  # pylint: disable=g-import-not-at-top
  from soap_optax import problems  # pylint: disable=g-import-not-at-top
  m, n = (4, 6) if quick else (8, 16)
  steps = 60 if quick else 800
  problem_seeds = (0, 1)
  num_noise = 2 if quick else 4
  grid = KRONECKER_GRID[3:6] if quick else KRONECKER_GRID
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
    print(f'  refresh/kronecker: {name} {schedule_name(schedule)}', flush=True)
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
      finals.append([tail_mean(c.mean(axis=0)) for c in curves])
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
        optimizer=name, schedule=schedule_name(schedule), best_lr=grid[best],
        final_loss=float(mean_finals[best]),
        final_loss_per_seed=finals[:, best].tolist(),
        decompositions=float(np.mean([d[best] for d in decompositions])),
        seconds_per_run=time.perf_counter() - tick,
        diverged_rates=[grid[i] for i in range(len(grid))
                        if not np.isfinite(mean_finals[i])
                        or mean_finals[i] > 1.0]))
  return dict(m=m, n=n, steps=steps, problem_seeds=list(problem_seeds),
              noise_seeds=num_noise, grid=list(grid), foam=FOAM, rows=rows)


def run_refresh_lm(quick: bool, out_dir: pathlib.Path, learning_rate: float,
                   every_10=None):
  """SOAP on the main job's model at its default size, one rate, with each
  schedule: final validation loss, decompositions and wall-clock.
  ``every_10``: the record of the fixed interval 10 at this rate, if the
  'muon' part ran it already."""
  sizes = LM_QUICK if quick else LM_MAIN
  schedules = (10, 'adaptive') if quick else SCHEDULES
  rows = []
  for schedule in schedules:
    print(f'  refresh/lm: soap {schedule_name(schedule)}', flush=True)
    if schedule == 10 and every_10 is not None:
      record = every_10
    else:
      record = train_lm_run('soap', learning_rate, 0, sizes,
                            out_dir / 'refresh',
                            precondition_frequency=schedule)
    rows.append(dict(
        schedule=schedule_name(schedule), final_valid_loss=record['valid_loss'][-1],
        decompositions=record['decompositions'][-1],
        seconds=record['wall_clock'][-1],
        optimizer_step_share=record['optimizer_step_share'],
        staleness=record['staleness'][::max(1, sizes['steps'] // 150)],
        refresh_steps=[i + 1 for i, (a, b) in enumerate(zip(
            [0] + record['decompositions'][:-1], record['decompositions']))
                       if b > a]))
  return dict(sizes=sizes, learning_rate=learning_rate, rows=rows)


LM_MAIN = dict(steps=300, batch_size=32, seq_len=64, d_model=128, num_layers=2,
               num_heads=4, eval_every=10, eval_batches=8)
LM_QUICK = dict(steps=20, batch_size=8, seq_len=32, d_model=32, num_layers=1,
                num_heads=2, eval_every=10, eval_batches=2)
_LM_LIBS = {}


def train_lm_run(name, learning_rate, seed, sizes, out_dir,
                 precondition_frequency=10):
  """One run of the main job's model (built once per size and schedule)."""
  import train_lm  # pylint: disable=g-import-not-at-top
  config = train_lm.Config(
      optimizers=(name,), learning_rates=(learning_rate,), weight_decay=0.01,
      precondition_frequency=precondition_frequency, seed=seed,
      corpus='stdlib', **sizes)
  key = (tuple(sorted(sizes.items())), precondition_frequency)
  if key not in _LM_LIBS:
    _LM_LIBS[key] = (train_lm.build(config), train_lm.split_corpus(
        train_lm.load_corpus(None), sizes['seq_len']))
  lib, data = _LM_LIBS[key]
  run_args = types.SimpleNamespace(checkpoint_every=0, stop_after=0)
  return train_lm.train_one(lib, config, name, learning_rate, data, out_dir,
                            run_args, train_lm._SilentBar)  # pylint: disable=protected-access


def run_muon(quick: bool, out_dir: pathlib.Path):
  """AdamW, SOAP (every 10 and adaptive) and optax's Muon on the main job's
  model at its default size, each over MUON_GRID, evaluated every 10 steps:
  steps and wall-clock to reach AdamW's best final validation loss."""
  import train_lm  # pylint: disable=g-import-not-at-top
  sizes = LM_QUICK if quick else LM_MAIN
  grids = {'adamw': MUON_GRID, 'soap': MUON_GRID, 'muon': MUON_OWN_GRID,
           'muon_shared_lr': MUON_GRID}
  if quick:
    grids = {name: grid[2:3] for name, grid in grids.items()}
  candidates = (('adamw', 10), ('soap', 10), ('muon', 10),
                ('muon_shared_lr', 10))
  if quick:
    candidates = candidates[:3]
  results = {}
  for name, schedule in candidates:
    label = name if name != 'soap' else f'soap ({schedule_name(schedule)})'
    for lr in grids[name]:
      print(f'  muon: {label} lr={lr:g}', flush=True)
      results[(label, lr)] = train_lm_run(name, lr, 0, sizes, out_dir / 'muon',
                                          precondition_frequency=schedule)
  labels = list(dict.fromkeys(label for label, _ in results))
  grid_of = {label: [lr for l, lr in results if l == label] for label in labels}

  def best(label):
    return min(grid_of[label],
               key=lambda lr: results[(label, lr)]['valid_loss'][-1])

  target = results[('adamw', best('adamw'))]['valid_loss'][-1]
  rows = []
  for label in labels:
    lr = best(label)
    r = results[(label, lr)]
    reached = train_lm.steps_to_reach(r, target)
    grid = grid_of[label]
    rows.append(dict(
        optimizer=label, best_lr=lr,
        interior=lr not in (grid[0], grid[-1]),
        grid_final_losses={f'{x:g}': results[(label, x)]['valid_loss'][-1]
                           for x in grid},
        final_valid_loss=r['valid_loss'][-1],
        steps_to_adamw_best=reached,
        seconds_to_adamw_best=(None if reached is None else
                               r['wall_clock'][r['steps'].index(reached)]),
        seconds=r['wall_clock'][-1],
        decompositions=(r['decompositions'][-1] if r['decompositions']
                        else None),
        curve_steps=r['steps'], curve=r['valid_loss']))
  return dict(sizes=sizes, grids=grid_of, adamw_best_final=target,
              rows=rows, soap_best_record=results[('soap (every 10)',
                                                   best('soap (every 10)'))])


def refresh_tables(results) -> str:
  lines = []
  if 'refresh' in results:
    k = results['refresh']['kronecker']
    lines += [
        f'Kronecker problem {k["m"]}×{k["n"]}, {k["steps"]} steps, problem '
        f'seeds {k["problem_seeds"]} (each the mean of {k["noise_seeds"]} '
        'noise seeds), best rate of the grid per schedule; FOAM: '
        f'{k["foam"]} with eps = ε0 = 1e-12; `shampoo_ungrafted` is classic '
        'Shampoo (`grafting="none", rayleigh_floor=False`).', '',
        '| optimizer | schedule | best lr | final loss / initial | '
        'decompositions | s per run | lr diverged or > initial |',
        '| --- | --- | --- | --- | --- | --- | --- |']
    for r in k['rows']:
      lines.append(
          f'| {r["optimizer"]} | {r["schedule"]} | {r["best_lr"]:g} | '
          f'{r["final_loss"]:.4f} | {r["decompositions"]:.0f} | '
          f'{r["seconds_per_run"]:.2f} | '
          f'{", ".join(f"{x:g}" for x in r["diverged_rates"]) or "–"} |')
    lm = results['refresh']['lm']
    s = lm['sizes']
    lines += [
        '', f'Main job\'s model (d={s["d_model"]}, {s["num_layers"]} layers, '
        f'batch {s["batch_size"]}×{s["seq_len"]}, {s["steps"]} steps), '
        f'`soap` at lr {lm["learning_rate"]:g}, seed 0.', '',
        '| schedule | final valid loss | decompositions | wall-clock s | '
        'optimizer share of a step |', '| --- | --- | --- | --- | --- |']
    for r in lm['rows']:
      lines.append(
          f'| {r["schedule"]} | {r["final_valid_loss"]:.4f} | '
          f'{r["decompositions"]:.0f} | {r["seconds"]:.0f} | '
          f'{r["optimizer_step_share"]:.0%} |')
  if 'muon' in results:
    mu = results['muon']
    s = mu['sizes']
    lines += [
        '', f'Main job\'s model (d={s["d_model"]}, {s["num_layers"]} layers, '
        f'batch {s["batch_size"]}×{s["seq_len"]}, {s["steps"]} steps, '
        f'evaluated every {s["eval_every"]}), seed 0; `muon` is optax\'s '
        'Muon with its Adam part at 3e-3, `muon_shared_lr` optax\'s default '
        '(one rate for both parts); '
        f'target: AdamW\'s best final validation loss '
        f'{mu["adamw_best_final"]:.4f}.', '',
        '| optimizer | best lr | final valid loss | steps to target | '
        'wall-clock to target s | wall-clock s | decompositions | '
        'final loss per lr |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in mu['rows']:
      to_target = r['seconds_to_adamw_best']
      to_target = '–' if to_target is None else f'{to_target:.0f}'
      count = r['decompositions']
      count = '–' if count is None else f'{count:.0f}'
      per_lr = ', '.join(f'{k}: {v:.3f}'
                         for k, v in r['grid_final_losses'].items())
      lines.append(
          f'| {r["optimizer"]} | {r["best_lr"]:g}'
          f'{"" if r["interior"] else " (edge)"} | '
          f'{r["final_valid_loss"]:.4f} | '
          f'{r["steps_to_adamw_best"] or "never"} | {to_target} | '
          f'{r["seconds"]:.0f} | {count} | {per_lr} |')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------
# Plots and main.


def plot(results, out_dir):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  if 'kronecker' in results:
    k = results['kronecker']
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
    paths.append(benchmark.save_figure(fig, out_dir / 'kronecker.png'))

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
    paths.append(benchmark.save_figure(fig, out_dir / 'frequency.png'))
  if 'lm' in results:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results['lm']['rows']:
      ax.plot(r['curve_steps'], r['mean_curve'],
              label=f'{r["optimizer"]} (lr {r["lr"]:g})')
    ax.set_xlabel('step')
    ax.set_ylabel('validation loss (nats/byte, mean of seeds)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(benchmark.save_figure(fig, out_dir / 'lm.png'))
  if 'muon' in results:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results['muon']['rows']:
      ax.plot(r['curve_steps'], r['curve'],
              label=f'{r["optimizer"]} (lr {r["best_lr"]:g})')
    ax.axhline(results['muon']['adamw_best_final'], color='k', ls='--',
               lw=0.8, label="AdamW's best final")
    ax.set_xlabel('step')
    ax.set_ylabel('validation loss (nats/byte)')
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(benchmark.save_figure(fig, out_dir / 'muon.png'))
  if 'refresh' in results:
    rows = results['refresh']['lm']['rows']
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.9 * len(rows)),
                             sharex=True, squeeze=False)
    steps = results['refresh']['lm']['sizes']['steps']
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
    paths.append(benchmark.save_figure(fig, out_dir / 'refresh.png'))
  return paths


def main(argv) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  out_dir = pathlib.Path(args.out or os.path.join(
      'runs', 'experiments-' + datetime.datetime.now().strftime('%Y%m%d-%H%M%S')))
  out_dir.mkdir(parents=True, exist_ok=True)
  info = benchmark.machine_info(jax)
  results = dict(machine=info, quick=args.quick)
  text = [f'{info["date"]}, {info["backend"]} ({info["cpu"]}, '
          f'{info["cpu_count"]} cores), jax {info["jax"]}, optax '
          f'{info["optax"]}' + (' — QUICK sizes' if args.quick else '')]
  for part in args.parts:
    print(f'{part}:', flush=True)
    tick = time.perf_counter()
    if part == 'kronecker':
      results[part] = run_kronecker(jax, args.quick)
      text += ['', '### Kronecker problem', '', kronecker_tables(results[part])]
    elif part == 'lm':
      results[part] = run_lm(args.quick, out_dir)
      text += ['', '### Language model', '', lm_table(results[part])]
    elif part == 'muon':
      results[part] = run_muon(args.quick, out_dir)
      text += ['', '### SOAP, AdamW and Muon on the main job', '',
               refresh_tables({'muon': results[part]})]
    else:
      soap_lr, every_10 = 3e-3, None
      if 'muon' in results:
        every_10 = results['muon'].pop('soap_best_record')
        soap_lr = every_10['learning_rate']
      results[part] = dict(
          kronecker=run_refresh_kronecker(jax, args.quick),
          lm=run_refresh_lm(args.quick, out_dir, soap_lr, every_10))
      text += ['', '### Refresh schedules', '',
               refresh_tables({'refresh': results[part]})]
    results[part]['seconds'] = time.perf_counter() - tick
  (out_dir / 'tables.md').write_text('\n'.join(text) + '\n')
  (out_dir / 'results.json').write_text(json.dumps(results, indent=1))
  paths = plot(results, out_dir)
  print('\n'.join(text))
  print(f'\nresults: {out_dir / "results.json"}\nplots:   ' +
        ', '.join(str(p) for p in paths))
  return 0


if __name__ == '__main__':
  try:
    sys.exit(main(sys.argv[1:]))
  except benchmark.UsageError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
