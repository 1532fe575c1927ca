"""Part 'soap_vs_muon': SOAP tuned against Muon on the main job.

On the main job's model at its default size: AdamW and Muon over their
grids, constant and warmup+cosine; SOAP from the main job's former settings
(``sweep.SOAP_BASE``), each setting (refresh frequency, b2 = shampoo_beta,
warmup+cosine, which parameters SOAP handles, one-sided) alone and combined,
every grid extended until its best rate is interior; the best of each
optimizer on two seeds and at a 4x larger batch; factorized SOAP and Shampoo
with the best settings (docs/choosing_and_tuning.md). Each run is kept as
JSON under ``soap_vs_muon/`` in the output folder and read back when the
part runs again.
"""

import pathlib

import numpy as np

import common
import optimizers

from experiment_parts.sweep import (
    LM_MAIN, LM_QUICK, LR_LADDER, MUON_OWN_GRID, SOAP_BASE, LmSweep, best_rate,
    result_row, rungs_around, score, seconds_cell, steps_cell, train_lm_run)

TITLE = 'SOAP against Muon, tuned'

# Each varied alone from SOAP_BASE (at the base's best rate; the schedule
# over its own grid, since warmup and decay move the best rate).
SOAP_AXES = (('soap_b2', (0.9, 0.99)),
             ('precondition_frequency', (1, 2, 5)),
             ('schedule', ('cosine',)),
             ('soap_params', ('matrices', 'hidden')),
             ('one_sided', (True,)))


SOAP_AXES_QUICK = (('soap_params', ('hidden',)),)


# SOAP's relatives, run with the best SOAP's settings.
RELATIVES = optimizers.check_names(('factorized_soap', 'shampoo'))


# Larger batch (4x the tokens per step, same steps): the SOAP paper's claim
# that its advantage grows with the batch.
LARGE_BATCH = 128


def run(quick: bool, out_dir: pathlib.Path, train=train_lm_run):
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
  sweep = LmSweep(sizes, out_dir / 'soap_vs_muon', train)
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
        start = rungs_around(found[0][0]['learning_rate'])
      runs = sweep.grid(name, start, extend=extend, schedule=schedule,
                        **options)
      found.append((runs[best_rate(runs)], runs))
    return found

  adamw = tuned('adamw', grid3)
  target = min(r['valid_loss'][-1] for r, _ in adamw)
  muon = tuned('muon', muon_grid)
  best_adamw = min(adamw, key=lambda f: f[0]['valid_loss'][-1])
  best_muon = min(muon, key=lambda f: score(f[0], target))

  base_runs = sweep.grid('soap', grid3, extend=extend)
  base = base_runs[best_rate(base_runs)]
  base_lr = base['learning_rate']
  axis_rows, winners = [], {}
  for axis, values in (SOAP_AXES_QUICK if quick else SOAP_AXES):
    candidates = [(SOAP_BASE[axis], base)]
    for value in values:
      if axis == 'schedule':
        runs = sweep.grid('soap', rungs_around(base_lr), extend=extend,
                          schedule=value)
        record = runs[best_rate(runs)]
        axis_rows.append(result_row(record, target, runs))
      else:
        record = sweep.run('soap', base_lr, **{axis: value})
        axis_rows.append(result_row(record, target))
      candidates.append((value, record))
    winners[axis] = min(candidates, key=lambda c: score(c[1], target))[0]
  combined = {k: v for k, v in winners.items() if v != SOAP_BASE[k]}
  start_lr = base_lr
  if combined.get('schedule') == 'cosine':
    start_lr = [r for r in axis_rows if r['options']['schedule'] == 'cosine'
                ][0]['lr']
  finalist_runs = sweep.grid(
      'soap', (start_lr,) if quick else rungs_around(start_lr),
      extend=extend, **combined)
  finalist = finalist_runs[best_rate(finalist_runs)]
  # Leave-one-out: the combination without each of its changes (at its rate;
  # without the schedule, over the constant schedule's own grid).
  ablations = []
  for axis in combined if len(combined) > 1 else ():
    options = {k: v for k, v in combined.items() if k != axis}
    if axis == 'schedule':
      runs = sweep.grid('soap', rungs_around(base_lr), extend=extend,
                        **options)
      ablations.append(result_row(runs[best_rate(runs)], target, runs))
    else:
      ablations.append(result_row(sweep.run('soap', finalist['learning_rate'],
                                      **options), target))
  # The best SOAP of everything tried (the combination need not win).
  soap_candidates = [(finalist, finalist_runs), (base, base_runs)] + [
      (sweep.records[k], None) for k in list(sweep.records)
      if k[0] == 'soap' and k[2] == 0]
  best_soap, best_soap_grid = min(soap_candidates,
                                  key=lambda c: score(c[0], target))

  def settings(record):
    options = dict(record['options'])
    options.pop('warmup_steps', None)
    return record['optimizer'], record['learning_rate'], options

  # SOAP's relatives with the best SOAP's settings, from its rate and one
  # rung above (Shampoo preferred larger rates at the smaller size, section
  # 4), extended like every grid.
  relatives = []
  for name in () if quick else RELATIVES:
    _, lr, options = settings(best_soap)
    if name == 'shampoo':
      options['one_sided'] = False
    rung = LR_LADDER.index(lr)
    runs = sweep.grid(name, (lr, LR_LADDER[rung + 1]), extend=extend,
                      **options)
    relatives.append((runs[best_rate(runs)], runs))

  finalists = {'adamw': best_adamw[0], 'muon': best_muon[0],
               'soap': best_soap}
  # The best relative joins the seeds (not the larger batch).
  on_seeds = dict(finalists)
  if relatives:
    on_seeds['relative'] = min(relatives, key=lambda c: score(c[0], target))[0]
  seed_rows = []
  for seed in seeds:
    records = {}
    for n, r in on_seeds.items():
      name, lr, options = settings(r)
      records[n] = sweep.run(name, lr, seed=seed, **options)
    seed_target = records['adamw']['valid_loss'][-1]
    seed_rows += [result_row(r, seed_target) for r in records.values()]

  large = LmSweep(dict(sizes, batch_size=(16 if quick else LARGE_BATCH)),
                        out_dir / 'soap_vs_muon', train)
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
    large_rows.append(result_row(runs[best_rate(runs)], large_target, runs))

  return dict(
      sizes=sizes, large_batch=large.sizes['batch_size'], target=target,
      soap_base=SOAP_BASE, winners=winners,
      adamw=[result_row(r, target, g) for r, g in adamw],
      muon=[result_row(r, target, g) for r, g in muon],
      soap_base_row=result_row(base, target, base_runs), soap_axes=axis_rows,
      soap_combined=result_row(finalist, target, finalist_runs),
      soap_ablations=ablations,
      relatives=[result_row(r, target, g) for r, g in relatives],
      best=dict(adamw=result_row(best_adamw[0], target, best_adamw[1]),
                muon=result_row(best_muon[0], target, best_muon[1]),
                soap=result_row(best_soap, target, best_soap_grid)),
      seeds=list(seeds), seed_rows=seed_rows,
      large_target=large_target, large_rows=large_rows)


def tables(section) -> str:
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
            f'{r["final_valid_loss"]:.4f} | {steps_cell(r)} | '
            f'{seconds_cell(r["seconds_to_target"])} | {r["seconds"]:.0f} | '
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
        f'{seconds_cell(np.mean(times) if times else None)} |')
  lines += ['', f'**Batch {section["large_batch"]}×{s["seq_len"]}** (4× the '
            f'tokens per step, {s["steps"]} steps, seed 0; each best '
            'configuration at its rate and one rung above; target: AdamW\'s '
            f'final loss here, {section["large_target"]:.4f})', '', head, rule]
  lines += [line(r) for r in section['large_rows']]
  return '\n'.join(lines)


def plot(section, out_dir) -> list:
  """soap_vs_muon.png: the best of each optimizer, at the main batch and at
  the larger one."""
  plt = common.pyplot()
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
  return [common.save_figure(fig, out_dir / 'soap_vs_muon.png')]
