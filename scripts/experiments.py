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
(f) 'soap_vs_muon': SOAP tuned against Muon on the main job's model: each
    setting (refresh frequency, b2 = shampoo_beta, warmup+cosine, which
    parameters SOAP handles, one-sided) alone and combined, every grid
    extended until its best rate is interior; the best of each optimizer on
    two seeds and at a 4x larger batch; factorized SOAP and Shampoo with the
    best settings (README "Choosing and tuning").

Every optimizer runs with weight decay 0 on the Kronecker problem (a quadratic
with a known optimum) and with the main job's settings on the language model.
"Final loss" is the mean over the last 10% of steps (Kronecker, averaged over
noise seeds) or the last evaluation (language model). Seeds: problem seeds
(Kronecker; each averaged over several noise seeds) and model/data seeds (LM).

Examples::

  python scripts/experiments.py              # ~2 h on 2 CPU cores
  python scripts/experiments.py --parts soap_vs_muon   # ~75 min
  python scripts/experiments.py --quick      # tiny sizes (CI)
  python scripts/experiments.py --parts kronecker

Outputs under ``--out``: ``results.json``, ``tables.md``, ``kronecker.png``,
``frequency.png``, ``lm.png``, ``muon.png``, ``refresh.png`` and
``soap_vs_muon.png``; the 'soap_vs_muon' part keeps each run as JSON under
``soap_vs_muon/`` there and reads it back when run again.
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

PARTS = ('kronecker', 'lm', 'muon', 'refresh', 'soap_vs_muon', 'kl_vs_muon',
         'chinchilla')
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
      'kl_shampoo': lambda learning_rate: soap_optax.kl_shampoo(
          learning_rate, weight_decay=0.0, precondition_frequency=frequency),
      'kl_soap': lambda learning_rate: soap_optax.soap(
          learning_rate, weight_decay=0.0, precondition_frequency=frequency,
          factor_estimator='kl'),
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
  runs += [(10, 'adamw'), (10, 'soap_one_sided'), (10, 'factorized_soap'),
           (10, 'kl_shampoo'), (10, 'kl_soap')]
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
                 precondition_frequency=10, **options):
  """One run of the main job's model (built once per size and settings);
  ``options``: other train_lm.Config fields (schedule, soap_b2, ...)."""
  import train_lm  # pylint: disable=g-import-not-at-top
  config = train_lm.Config(
      optimizers=(name,), learning_rates=(learning_rate,), weight_decay=0.01,
      precondition_frequency=precondition_frequency, seed=seed,
      corpus='stdlib', **sizes, **options)
  key = (tuple(sorted(sizes.items())), precondition_frequency,
         tuple(sorted(options.items())))
  if key not in _LM_LIBS:
    _LM_LIBS.clear()  # one compiled model at a time.
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


# ------------------------------------------------------------------------------
# Part 'soap_vs_muon': SOAP tuned against Muon on the main job.

# The learning-rate ladder every grid is cut from (half-decades).
LR_LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
# The main job's settings before this sweep (train_lm's defaults until then).
SOAP_BASE = dict(precondition_frequency=10, soap_b2=0.95, schedule='constant',
                 soap_params='all', one_sided=False)
# Each varied alone from SOAP_BASE (at the base's best rate; the schedule
# over its own grid, since warmup and decay move the best rate).
SOAP_AXES = (('soap_b2', (0.9, 0.99)),
             ('precondition_frequency', (1, 2, 5)),
             ('schedule', ('cosine',)),
             ('soap_params', ('matrices', 'hidden')),
             ('one_sided', (True,)))
SOAP_AXES_QUICK = (('soap_params', ('hidden',)),)
# Larger batch (4x the tokens per step, same steps): the SOAP paper's claim
# that its advantage grows with the batch.
LARGE_BATCH = 128


def _options_label(name, options):
  """'soap f=1 b2=0.9 hidden only one-sided warmup+cosine': the settings
  that differ from SOAP_BASE (the eigenbasis optimizers), or the schedule
  alone (AdamW, Muon)."""
  parts = [name]
  if name in ('soap', 'factorized_soap', 'shampoo', 'kl_shampoo', 'kl_soap'):
    if options['precondition_frequency'] != SOAP_BASE['precondition_frequency']:
      parts.append(f'f={options["precondition_frequency"]}')
    if options['soap_b2'] != SOAP_BASE['soap_b2']:
      parts.append(f'b2={options["soap_b2"]:g}')
    if options['soap_params'] != 'all':
      parts.append(f'{options["soap_params"]} only')
    if options['one_sided']:
      parts.append('one-sided')
  if options['schedule'] != 'constant':
    parts.append('warmup+cosine')
  if options.get('adam_lr', 3e-3) != 3e-3:
    parts.append(f'adam={options["adam_lr"]:g}')
  return ' '.join(parts)


class LmSweep:
  """Runs of the main job's model, each kept as JSON under ``directory`` so
  an interrupted sweep continues where it stopped."""

  def __init__(self, sizes, directory: pathlib.Path):
    self.sizes, self.directory = sizes, directory
    self.records = {}  # (name, lr, seed, options tuple) -> record
    directory.mkdir(parents=True, exist_ok=True)

  def run(self, name, lr, seed=0, **options):
    import train_lm  # pylint: disable=g-import-not-at-top
    options = {**SOAP_BASE, **options}
    options['warmup_steps'] = train_lm.default_warmup_steps(
        options['schedule'], self.sizes['steps'])
    key = (name, lr, seed, tuple(sorted(options.items())))
    if key in self.records:
      return self.records[key]
    label = _options_label(name, options)
    path = self.directory / (
        f'{label.replace(" ", "_").replace("=", "")}_lr{lr:g}_seed{seed}'
        f'_b{self.sizes["batch_size"]}.json')
    if path.exists():
      record = json.loads(path.read_text())
    else:
      print(f'  soap_vs_muon: {label} lr={lr:g} seed={seed} batch '
            f'{self.sizes["batch_size"]}', flush=True)
      record = train_lm_run(name, lr, seed, self.sizes,
                            self.directory / 'scratch', **options)
      record = {k: v for k, v in record.items() if k != 'diagnostics'}
      record.update(label=label, options=options, seed=seed)
      path.write_text(json.dumps(record))
    self.records[key] = record
    return record

  def grid(self, name, rates, extend=2, **options):
    """Runs ``rates``; while the best is at an edge, adds the next rung of
    LR_LADDER beyond it (at most ``extend`` times). Returns lr -> record."""
    rates = sorted(rates)
    runs = {lr: self.run(name, lr, **options) for lr in rates}
    for _ in range(extend):
      best = _best(runs)
      if len(runs) > 1 and best not in (min(runs), max(runs)):
        break
      rung = LR_LADDER.index(best)
      step = -1 if best == min(runs) else 1
      if not 0 <= rung + step < len(LR_LADDER):
        break
      lr = LR_LADDER[rung + step]
      runs[lr] = self.run(name, lr, **options)
    return dict(sorted(runs.items()))


def _best(runs):
  return min(runs, key=lambda lr: runs[lr]['valid_loss'][-1])


def _rungs_around(lr):
  """``lr`` and its neighbours on LR_LADDER (a grid to start from)."""
  rung = LR_LADDER.index(lr)
  return LR_LADDER[max(0, rung - 1):rung + 2]


def _score(record, target):
  """Sort key: steps to the target (never: infinite), then final loss."""
  import train_lm  # pylint: disable=g-import-not-at-top
  reached = train_lm.steps_to_reach(record, target)
  return (float('inf') if reached is None else reached,
          record['valid_loss'][-1])


def _row(record, target, grid=None):
  import train_lm  # pylint: disable=g-import-not-at-top
  reached = train_lm.steps_to_reach(record, target)
  row = dict(
      label=record['label'], optimizer=record['optimizer'],
      options=record['options'], lr=record['learning_rate'],
      seed=record['seed'], final_valid_loss=record['valid_loss'][-1],
      steps_to_target=reached,
      seconds_to_target=(None if reached is None else
                         record['wall_clock'][record['steps'].index(reached)]),
      seconds=record['wall_clock'][-1],
      optimizer_step_share=record['optimizer_step_share'],
      decompositions=(record['decompositions'][-1]
                      if record['decompositions'] else None),
      curve_steps=record['steps'], curve=record['valid_loss'])
  if grid is not None:
    row['grid_final_losses'] = {f'{lr:g}': r['valid_loss'][-1]
                                for lr, r in grid.items()}
    row['interior'] = min(grid) < record['learning_rate'] < max(grid)
  return row


def run_soap_vs_muon(quick: bool, out_dir: pathlib.Path):
  """SOAP against Muon and AdamW on the main job's model at its default size.

  1. AdamW and Muon over their grids, constant and warmup+cosine; the target
     is AdamW's best final validation loss over both.
  2. SOAP from SOAP_BASE over its grid, then each setting of SOAP_AXES alone,
     then the combination of every axis's winner over its own grid. Winner:
     fewest steps to the target, then the lower final loss.
  3. The best of each optimizer on more seeds (each seed's target: AdamW's
     best configuration on that seed).
  4. The three at LARGE_BATCH sequences per step, at their best rate and one
     rung above.
  """
  sizes = LM_QUICK if quick else LM_MAIN
  sweep = LmSweep(sizes, out_dir / 'soap_vs_muon')
  grid3 = (3e-3,) if quick else (1e-3, 3e-3, 1e-2)
  muon_grid = (3e-2,) if quick else MUON_OWN_GRID
  extend = 0 if quick else 2
  schedules = ('constant',) if quick else ('constant', 'cosine')
  seeds = (0,) if quick else (0, 1)

  def tuned(name, base_grid, **options):
    """Best over the grid per schedule: (record, its grid)."""
    found = []
    for schedule in schedules:
      start = base_grid
      if found:  # the other schedule: around the first's best rate.
        start = _rungs_around(found[0][0]['learning_rate'])
      runs = sweep.grid(name, start, extend=extend, schedule=schedule,
                        **options)
      found.append((runs[_best(runs)], runs))
    return found

  adamw = tuned('adamw', grid3)
  target = min(r['valid_loss'][-1] for r, _ in adamw)
  muon = tuned('muon', muon_grid)
  best_adamw = min(adamw, key=lambda f: f[0]['valid_loss'][-1])
  best_muon = min(muon, key=lambda f: _score(f[0], target))

  base_runs = sweep.grid('soap', grid3, extend=extend)
  base = base_runs[_best(base_runs)]
  base_lr = base['learning_rate']
  axis_rows, winners = [], {}
  for axis, values in (SOAP_AXES_QUICK if quick else SOAP_AXES):
    candidates = [(SOAP_BASE[axis], base)]
    for value in values:
      if axis == 'schedule':
        runs = sweep.grid('soap', _rungs_around(base_lr), extend=extend,
                          schedule=value)
        record = runs[_best(runs)]
        axis_rows.append(_row(record, target, runs))
      else:
        record = sweep.run('soap', base_lr, **{axis: value})
        axis_rows.append(_row(record, target))
      candidates.append((value, record))
    winners[axis] = min(candidates, key=lambda c: _score(c[1], target))[0]
  combined = {k: v for k, v in winners.items() if v != SOAP_BASE[k]}
  start_lr = base_lr
  if combined.get('schedule') == 'cosine':
    start_lr = [r for r in axis_rows if r['options']['schedule'] == 'cosine'
                ][0]['lr']
  finalist_runs = sweep.grid(
      'soap', (start_lr,) if quick else _rungs_around(start_lr),
      extend=extend, **combined)
  finalist = finalist_runs[_best(finalist_runs)]
  # Leave-one-out: the combination without each of its changes (at its rate;
  # without the schedule, over the constant schedule's own grid).
  ablations = []
  for axis in combined if len(combined) > 1 else ():
    options = {k: v for k, v in combined.items() if k != axis}
    if axis == 'schedule':
      runs = sweep.grid('soap', _rungs_around(base_lr), extend=extend,
                        **options)
      ablations.append(_row(runs[_best(runs)], target, runs))
    else:
      ablations.append(_row(sweep.run('soap', finalist['learning_rate'],
                                      **options), target))
  # The best SOAP of everything tried (the combination need not win).
  soap_candidates = [(finalist, finalist_runs), (base, base_runs)] + [
      (sweep.records[k], None) for k in list(sweep.records)
      if k[0] == 'soap' and k[2] == 0]
  best_soap, best_soap_grid = min(soap_candidates,
                                  key=lambda c: _score(c[0], target))

  def settings(record):
    options = dict(record['options'])
    options.pop('warmup_steps', None)
    return record['optimizer'], record['learning_rate'], options

  # SOAP's relatives with the best SOAP's settings, from its rate and one
  # rung above (Shampoo preferred larger rates at the smaller size, section
  # 4), extended like every grid.
  relatives = []
  for name in () if quick else ('factorized_soap', 'shampoo'):
    _, lr, options = settings(best_soap)
    if name == 'shampoo':
      options['one_sided'] = False
    rung = LR_LADDER.index(lr)
    runs = sweep.grid(name, (lr, LR_LADDER[rung + 1]), extend=extend,
                      **options)
    relatives.append((runs[_best(runs)], runs))

  finalists = {'adamw': best_adamw[0], 'muon': best_muon[0],
               'soap': best_soap}
  # The best relative joins the seeds (not the larger batch).
  on_seeds = dict(finalists)
  if relatives:
    on_seeds['relative'] = min(relatives, key=lambda c: _score(c[0], target))[0]
  seed_rows = []
  for seed in seeds:
    records = {}
    for n, r in on_seeds.items():
      name, lr, options = settings(r)
      records[n] = sweep.run(name, lr, seed=seed, **options)
    seed_target = records['adamw']['valid_loss'][-1]
    seed_rows += [_row(r, seed_target) for r in records.values()]

  large = LmSweep(dict(sizes, batch_size=(16 if quick else LARGE_BATCH)),
                  out_dir / 'soap_vs_muon')
  large_rows = []
  large_runs = {}
  for n, r in finalists.items():
    if quick and n != 'adamw':
      continue  # --quick: the target's run only.
    name, lr, options = settings(r)
    rates = (lr,) if n == 'adamw' else (lr, LR_LADDER[LR_LADDER.index(lr) + 1])
    large_runs[n] = {x: large.run(name, x, **options) for x in rates}
  large_target = min(r['valid_loss'][-1] for r in large_runs['adamw'].values())
  for n, runs in large_runs.items():
    large_rows.append(_row(runs[_best(runs)], large_target, runs))

  return dict(
      sizes=sizes, large_batch=large.sizes['batch_size'], target=target,
      soap_base=SOAP_BASE, winners=winners,
      adamw=[_row(r, target, g) for r, g in adamw],
      muon=[_row(r, target, g) for r, g in muon],
      soap_base_row=_row(base, target, base_runs), soap_axes=axis_rows,
      soap_combined=_row(finalist, target, finalist_runs),
      soap_ablations=ablations,
      relatives=[_row(r, target, g) for r, g in relatives],
      best=dict(adamw=_row(best_adamw[0], target, best_adamw[1]),
                muon=_row(best_muon[0], target, best_muon[1]),
                soap=_row(best_soap, target, best_soap_grid)),
      seeds=list(seeds), seed_rows=seed_rows,
      large_target=large_target, large_rows=large_rows)


def _steps_cell(row):
  return str(row['steps_to_target'] or 'never')


def _seconds_cell(value):
  return '–' if value is None else f'{value:.0f}'


def soap_vs_muon_tables(section) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top
  s = section['sizes']
  head = ('| configuration | lr | final valid loss | steps to target | '
          'wall-clock to target s | wall-clock s | optimizer share | '
          'decompositions | final loss per lr |')
  rule = '| --- ' * 9 + '|'

  def line(r):
    per_lr = ', '.join(f'{k}: {v:.3f}' for k, v in
                       r.get('grid_final_losses', {}).items()) or '–'
    edge = '' if r.get('interior', True) else ' (edge)'
    count = r['decompositions']
    return (f'| {r["label"]} | {r["lr"]:g}{edge} | '
            f'{r["final_valid_loss"]:.4f} | {_steps_cell(r)} | '
            f'{_seconds_cell(r["seconds_to_target"])} | {r["seconds"]:.0f} | '
            f'{r["optimizer_step_share"]:.0%} | '
            f'{"–" if count is None else f"{count:.0f}"} | {per_lr} |')

  lines = [
      f'Main job\'s model (d={s["d_model"]}, {s["num_layers"]} layers, batch '
      f'{s["batch_size"]}×{s["seq_len"]}, {s["steps"]} steps, evaluated every '
      f'{s["eval_every"]}), seed 0. Target: AdamW\'s best final validation '
      f'loss over its grid and both schedules, {section["target"]:.4f}. '
      'Warmup+cosine: linear warmup over 10% of the steps, cosine decay to '
      'a tenth of the peak. Muon: optax.contrib.muon, its Adam part at 3e-3 '
      '(same schedule).', '', '**Tuned baselines and SOAP**', '', head, rule]
  lines += [line(r) for r in section['adamw'] + section['muon']]
  lines += [line(section['soap_base_row'])]
  lines += [line(r) for r in section['soap_axes']]
  lines += [line(section['soap_combined'])]
  lines += [line(r) for r in section['soap_ablations']]
  lines += [line(r) for r in section['relatives']]
  winners = ', '.join(f'{k}={v}' for k, v in section['winners'].items())
  lines += ['', f'Each SOAP setting varied alone from the base '
            f'(f=10, b2=0.95, constant, all parameters, two-sided) at its '
            f'best rate {section["soap_base_row"]["lr"]:g}; winners per axis: '
            f'{winners}; the next row combines them over its own grid, the '
            'rows after it leave one change out each, and '
            'factorized SOAP and Shampoo (Adam-grafted) follow with the best '
            'SOAP\'s settings over their own grids.']
  lines += ['', f'**Best of each on seeds {section["seeds"]}** (target per '
            'seed: AdamW\'s best configuration on that seed)', '',
            '| configuration | lr | steps to target per seed | mean | '
            'final loss per seed | mean | wall-clock to target s (mean) |',
            '| --- ' * 7 + '|']
  for label in dict.fromkeys(r['label'] for r in section['seed_rows']):
    mine = [r for r in section['seed_rows'] if r['label'] == label]
    steps = [r['steps_to_target'] for r in mine]
    reached = [x for x in steps if x is not None]
    times = [r['seconds_to_target'] for r in mine
             if r['seconds_to_target'] is not None]
    finals = [r['final_valid_loss'] for r in mine]
    mean_steps = (f'{np.mean(steps):.0f}' if len(reached) == len(steps)
                  else 'never')
    lines.append(
        f'| {label} | {mine[0]["lr"]:g} | '
        f'{", ".join(str(x or "never") for x in steps)} | {mean_steps} | '
        f'{", ".join(f"{x:.3f}" for x in finals)} | {np.mean(finals):.3f} | '
        f'{_seconds_cell(np.mean(times) if times else None)} |')
  lines += ['', f'**Batch {section["large_batch"]}×{s["seq_len"]}** (4× the '
            f'tokens per step, {s["steps"]} steps, seed 0; each best '
            'configuration at its rate and one rung above; target: AdamW\'s '
            f'final loss here, {section["large_target"]:.4f})', '', head, rule]
  lines += [line(r) for r in section['large_rows']]
  return '\n'.join(lines)


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


# ------------------------------------------------------------------------------
# Part 'kl_vs_muon': KL-Shampoo and KL-SOAP against tuned SOAP, the strong
# Muon and AdamW on the main job.

# The Adam/AdamW part's rate, tuned alike for Muon and the eigenbasis
# optimizers.
ADAM_PART_GRID = (3e-3, 1e-2)
# Rate grids (extended while the best is at an edge).
KL_GRIDS = {'adamw': (3e-3,), 'muon': (1e-2, 3e-2), 'soap': (3e-3,),
            'kl_shampoo': (1e-3, 3e-3, 1e-2), 'kl_soap': (3e-3,)}
KL_SEEDS = (0, 1)
# KL-Shampoo's factor decay away from SOAP's tuned 0.9, at its best rate.
KL_VARIANTS = (dict(soap_b2=0.95), dict(soap_b2=0.99))


def _kl_options(name, adam_lr):
  """The main job's tuned SOAP settings for the eigenbasis optimizers (its
  refresh interval, b2 = shampoo_beta, the blocks' matrices only) and the
  Adam part's rate; AdamW alone has none."""
  import train_lm  # pylint: disable=g-import-not-at-top
  if name == 'adamw':
    return {}
  if name == 'muon':
    return dict(adam_lr=adam_lr)
  return dict(train_lm.TUNED_SOAP, adam_lr=adam_lr)


def run_kl_vs_muon(quick: bool, out_dir: pathlib.Path):
  """Each optimizer over its rate grid and ADAM_PART_GRID on seed 0; the best
  (fewest steps to AdamW's final loss, then the lowest final loss) again on
  seed 1 (its target: AdamW on seed 1)."""
  sizes = LM_QUICK if quick else LM_MAIN
  sweep = LmSweep(sizes, out_dir / 'kl_vs_muon')
  adam_grid = ADAM_PART_GRID[:1] if quick else ADAM_PART_GRID
  extend = 0 if quick else 2
  seeds = KL_SEEDS[:1] if quick else KL_SEEDS
  adamw = {seed: sweep.run('adamw', 3e-3, seed) for seed in seeds}
  targets = {seed: r['valid_loss'][-1] for seed, r in adamw.items()}
  rows, best = [], {}
  for name, rates in KL_GRIDS.items():
    if name == 'adamw':
      continue
    runs = []
    for adam_lr in adam_grid:
      options = _kl_options(name, adam_lr)
      grid = sweep.grid(name, rates[:1] if quick else rates, extend=extend,
                        **options)
      runs += [(record, grid) for record in grid.values()]
    for record, grid in runs:
      rows.append(_kl_row(record, targets[0]))
    chosen = min(runs, key=lambda r: _score(r[0], targets[0]))[0]
    if name == 'kl_shampoo' and not quick:
      for variant in KL_VARIANTS:
        rows.append(_kl_row(sweep.run(name, chosen['learning_rate'], **{
            **chosen['options'], **variant}), targets[0]))
    best[name] = [_kl_row(chosen, targets[0])] + [
        _kl_row(sweep.run(name, chosen['learning_rate'], seed,
                          **_kl_options(name, chosen['options'].get(
                              'adam_lr', 3e-3))), targets[seed])
        for seed in seeds[1:]]
  best['adamw'] = [_kl_row(adamw[seed], targets[seed]) for seed in seeds]
  gpt2 = gpt2_state_bytes()
  return dict(sizes=sizes, targets=[targets[s] for s in seeds],
              seeds=list(seeds), adam_grid=list(adam_grid), rows=rows,
              best=best, gpt2_state=gpt2)


def _kl_row(record, target):
  row = _row(record, target)
  row.update(adam_lr=record['options'].get('adam_lr'),
             state_bytes=record.get('state_bytes'))
  return row


def gpt2_state_bytes():
  """Optimizer state of GPT-2 small (124 M parameters, no allocation): AdamW,
  SOAP, KL-Shampoo and KL-SOAP, every parameter to the optimizer."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import soap_optax  # pylint: disable=g-import-not-at-top
  params = {k: jax.ShapeDtypeStruct(shape, jax.numpy.float32) for k, shape in
            benchmark.transformer_shapes(768, 12, 50257, 1024).items()}
  txs = {'adamw': optax.adamw(1e-3)}
  for label, layout in (('', {}), (' one-sided', dict(one_sided=True)),
                        (' block_size=1024', dict(block_size=1024))):
    txs['soap' + label] = soap_optax.soap(**layout)
    txs['kl_shampoo' + label] = soap_optax.kl_shampoo(**layout)
  txs['kl_soap'] = soap_optax.soap(factor_estimator='kl')
  return {name: soap_optax.state_nbytes(jax.eval_shape(tx.init, params))
          for name, tx in txs.items()}


def kl_vs_muon_tables(section) -> str:
  sizes = section['sizes']
  lines = [
      f'Main job (d {sizes["d_model"]}, {sizes["num_layers"]} layers, '
      f'{sizes["steps"]} steps, evaluated every {sizes["eval_every"]}); '
      f'eigenbasis optimizers with the tuned SOAP settings (refresh every 2, '
      f'b2 = shampoo_beta = 0.9, the blocks\' matrices only, AdamW on the '
      f'rest); Muon on the blocks\' matrices (attention kernels as '
      f'matrices), Adam on the rest. Target: AdamW\'s final loss at 3e-3 '
      f'per seed ({", ".join(f"{t:.4f}" for t in section["targets"])}).', '',
      '| optimizer | lr | Adam part | seed | final valid loss | steps to '
      'AdamW\'s | s to AdamW\'s | wall-clock s | opt-step share | state KiB |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  def line(r):
    share, adam_lr = r['optimizer_step_share'], r['adam_lr']
    return (f'| {r["optimizer"]} | {r["lr"]:g} | '
            f'{"–" if adam_lr is None else f"{adam_lr:g}"} | '
            f'{r["seed"]} | {r["final_valid_loss"]:.4f} | {_steps_cell(r)} | '
            f'{_seconds_cell(r["seconds_to_target"])} | {r["seconds"]:.0f} | '
            f'{"–" if share is None else f"{100 * share:.0f}%"} | '
            f'{"–" if r["state_bytes"] is None else r["state_bytes"] // 1024} |')
  order = ('adamw', 'muon', 'soap', 'kl_shampoo', 'kl_soap')
  lines += [line(r) for name in order for r in section['best'].get(name, [])]
  lines += ['', 'Every run on seed 0:', '',
            '| run | lr | Adam part | final valid loss | steps to '
            'AdamW\'s |', '| --- | --- | --- | --- | --- |']
  lines += [f'| {r["label"]} | {r["lr"]:g} | {r["adam_lr"]:g} | '
            f'{r["final_valid_loss"]:.4f} | {_steps_cell(r)} |'
            for r in section['rows']]
  gpt2 = section['gpt2_state']
  lines += ['', 'Optimizer state of GPT-2 small (124 M parameters, every one '
            'to the optimizer, float32):', '',
            '| optimizer | state MiB | × AdamW | × SOAP (same layout) |',
            '| --- | --- | --- | --- |']
  for name, nbytes in gpt2.items():
    soap = gpt2.get(name.replace('kl_shampoo', 'soap').replace('kl_soap',
                                                                'soap'))
    lines.append(f'| {name} | {nbytes / 2**20:,.0f} | '
                 f'{nbytes / gpt2["adamw"]:.2f} | '
                 f'{"–" if name == "adamw" else f"{nbytes / soap:.2f}"} |')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------
# Part 'chinchilla': the ranking against tokens per parameter.

# A model small enough that 8x Chinchilla (160 tokens per parameter) runs in
# minutes: every parameter counted, the embedding and head included.
CHINCHILLA_MODEL = dict(batch_size=32, seq_len=64, d_model=16, num_layers=2,
                        num_heads=2, eval_batches=8)
CHINCHILLA_QUICK = dict(batch_size=8, seq_len=32, d_model=16, num_layers=1,
                        num_heads=2, eval_batches=2)
# Tokens per parameter: 1x, 4x and 8x Chinchilla's 20.
TOKENS_PER_PARAMETER = (20, 80, 160)
CHINCHILLA_GRIDS = {'adamw': (1e-3, 3e-3, 1e-2), 'muon': (1e-2, 3e-2, 1e-1),
                    'soap': (1e-3, 3e-3, 1e-2),
                    'kl_shampoo': (1e-3, 3e-3, 1e-2)}


def chinchilla_parameters(model) -> int:
  """The main job's ByteTransformer's parameter count at these sizes."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import train_lm  # pylint: disable=g-import-not-at-top
  config = train_lm.Config(
      optimizers=('adamw',), learning_rates=(1e-3,), steps=1, eval_every=1,
      weight_decay=0.0, precondition_frequency=1, seed=0, corpus='stdlib',
      **model)
  built = train_lm.build(config)['ByteTransformer'](nnx.Rngs(0))
  return sum(x.size for x in jax.tree.leaves(nnx.state(built, nnx.Param)))


def run_chinchilla(quick: bool, out_dir: pathlib.Path):
  """AdamW, the strong Muon, SOAP and KL-Shampoo (the main job's routing and
  tuned settings) at 1x, 4x and 8x Chinchilla tokens per parameter: each at
  its best rate of a short grid at 1x, rechecked one rung either side at 8x;
  the final validation loss per ratio."""
  model = CHINCHILLA_QUICK if quick else CHINCHILLA_MODEL
  ratios = TOKENS_PER_PARAMETER[:2] if quick else TOKENS_PER_PARAMETER
  parameters = chinchilla_parameters(model)
  tokens_per_step = model['batch_size'] * model['seq_len']
  runs = {}  # (name, ratio, lr) -> record

  def run(name, ratio, lr):
    if (name, ratio, lr) not in runs:
      steps = (10 if quick else
               max(1, round(ratio * parameters / tokens_per_step)))
      sizes = dict(model, steps=steps, eval_every=max(1, steps // 10))
      sweep = LmSweep(sizes, out_dir / 'chinchilla' / f'{ratio}')
      runs[(name, ratio, lr)] = sweep.run(name, lr, 0,
                                          **_kl_options(name, 3e-3))
    return runs[(name, ratio, lr)]

  final = lambda r: r['valid_loss'][-1]
  grids = {name: (grid[1:2] if quick else grid)
           for name, grid in CHINCHILLA_GRIDS.items()}
  best = {}
  for name, grid in grids.items():
    best_lr = min(grid, key=lambda lr: final(run(name, ratios[0], lr)))
    best[name] = {ratios[0]: best_lr}
    for ratio in ratios[1:]:
      rates = [best_lr]
      if ratio == ratios[-1] and not quick:
        rates = list(_rungs_around(best_lr))
      best[name][ratio] = min(rates, key=lambda lr: final(run(name, ratio,
                                                                lr)))
  rows = [dict(optimizer=name, tokens_per_parameter=ratio, lr=lr,
               steps=runs[(name, ratio, lr)]['steps'][-1],
               final_valid_loss=final(runs[(name, ratio, lr)]),
               seconds=runs[(name, ratio, lr)]['wall_clock'][-1],
               grid={f'{g:g}': final(r) for (n, q, g), r in runs.items()
                     if n == name and q == ratio})
          for name, per_ratio in best.items()
          for ratio, lr in per_ratio.items()]
  ranking = {ratio: [r['optimizer'] for r in sorted(
      (r for r in rows if r['tokens_per_parameter'] == ratio),
      key=lambda r: r['final_valid_loss'])] for ratio in ratios}
  return dict(model=model, parameters=parameters,
              tokens_per_step=tokens_per_step, ratios=list(ratios), rows=rows,
              ranking={str(k): v for k, v in ranking.items()})


def chinchilla_table(section) -> str:
  m = section['model']
  lines = [
      f'Model: d {m["d_model"]}, {m["num_layers"]} layers, '
      f'{section["parameters"]:,} parameters (all counted), '
      f'{section["tokens_per_step"]} tokens per step; one seed. Each '
      f'optimizer at its best rate at 1× (and of its rung either side at the '
      f'largest ratio).', '',
      '| tokens / parameter | × Chinchilla | optimizer | lr | steps | final '
      'valid loss | wall-clock s |', '| --- | --- | --- | --- | --- | --- | --- |']
  for r in sorted(section['rows'], key=lambda r: (r['tokens_per_parameter'],
                                                  r['final_valid_loss'])):
    lines.append(
        f'| {r["tokens_per_parameter"]} | {r["tokens_per_parameter"] / 20:g} | '
        f'{r["optimizer"]} | {r["lr"]:g} | {r["steps"]} | '
        f'{r["final_valid_loss"]:.4f} | {r["seconds"]:.0f} |')
  lines += ['', 'Ranking (best first): ' + '; '.join(
      f'{int(k) / 20:g}×: {" < ".join(v)}'
      for k, v in section['ranking'].items()) + '.']
  return '\n'.join(lines)


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
  if 'chinchilla' in results:
    c = results['chinchilla']
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r['optimizer'] for r in c['rows']):
      mine = sorted((r['tokens_per_parameter'], r['final_valid_loss'])
                    for r in c['rows'] if r['optimizer'] == name)
      ax.plot([t for t, _ in mine], [v for _, v in mine], 'o-', label=name)
    ax.set_xscale('log')
    ax.set_xticks(c['ratios'], [f'{t} ({t / 20:g}×)' for t in c['ratios']])
    ax.set_xlabel('tokens per parameter (× Chinchilla)')
    ax.set_ylabel('final validation loss (nats/byte)')
    ax.set_title(f'{c["parameters"]:,} parameters, best rate per optimizer')
    ax.grid(alpha=0.3, which='both')
    ax.legend()
    paths.append(benchmark.save_figure(fig, out_dir / 'chinchilla.png'))
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
  if 'soap_vs_muon' in results:
    section = results['soap_vs_muon']
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, target in (
        (axes[0], list(section['best'].values()), section['target']),
        (axes[1], section['large_rows'], section['large_target'])):
      for r in rows:
        ax.plot(r['curve_steps'], r['curve'],
                label=f'{r["label"]} (lr {r["lr"]:g})')
      ax.axhline(target, color='k', ls='--', lw=0.8,
                 label="AdamW's best final")
      ax.set_xlabel('step')
      ax.set_ylabel('validation loss (nats/byte)')
      ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    s = section['sizes']
    axes[0].set_title(f'batch {s["batch_size"]}×{s["seq_len"]}, seed 0',
                      fontsize=9)
    axes[1].set_title(f'batch {section["large_batch"]}×{s["seq_len"]}',
                      fontsize=9)
    paths.append(benchmark.save_figure(fig, out_dir / 'soap_vs_muon.png'))
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
    elif part == 'soap_vs_muon':
      results[part] = run_soap_vs_muon(args.quick, out_dir)
      text += ['', '### SOAP against Muon, tuned', '',
               soap_vs_muon_tables(results[part])]
    elif part == 'kl_vs_muon':
      results[part] = run_kl_vs_muon(args.quick, out_dir)
      text += ['', '### KL-Shampoo against the strong Muon', '',
               kl_vs_muon_tables(results[part])]
    elif part == 'chinchilla':
      results[part] = run_chinchilla(args.quick, out_dir)
      text += ['', '### The ranking against tokens per parameter', '',
               chinchilla_table(results[part])]
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
