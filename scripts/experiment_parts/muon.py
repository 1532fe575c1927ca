"""Part 'muon': AdamW, SOAP and optax's Muon on the main job.

AdamW, SOAP (a refresh every 10 steps), optax's Muon with its Adam part at
the main job's rate and Muon with one rate for both parts, on the main job's
model at its default size, each over a learning-rate grid, evaluated every
10 steps: steps and wall-clock to reach AdamW's best final validation loss
(muon.png: each one's validation loss at its best rate).
"""

import pathlib

import common
import lm_training
import optimizers

from experiment_parts import sweep

TITLE = 'SOAP, AdamW and Muon on the main job'


def run(quick: bool, out_dir: pathlib.Path):
  """AdamW, SOAP (every 10 and adaptive) and optax's Muon on the main job's
  model at its default size, each over its grid (sweep.MUON_GRID; Muon:
  sweep.MUON_OWN_GRID), evaluated every 10 steps: steps and wall-clock to
  reach AdamW's best final validation loss."""
  sizes = sweep.LM_QUICK if quick else sweep.LM_MAIN
  grids = {'adamw': sweep.MUON_GRID, 'soap': sweep.MUON_GRID,
           'muon': sweep.MUON_OWN_GRID, 'muon_shared_lr': sweep.MUON_GRID}
  if quick:
    grids = {name: grid[2:3] for name, grid in grids.items()}
  candidates = tuple((name, 10) for name in optimizers.check_names(grids))
  if quick:
    candidates = candidates[:3]
  results = {}
  for name, schedule in candidates:
    label = (name if name != 'soap' else
             f'soap ({sweep.schedule_name(schedule)})')
    for lr in grids[name]:
      print(f'  muon: {label} lr={lr:g}', flush=True)
      results[(label, lr)] = sweep.train_lm_run(
          name, lr, 0, sizes, out_dir / 'muon',
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
    reached = lm_training.steps_to_reach(r, target)
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


def tables(section) -> str:
  """The table, after an empty line."""
  lines = []
  mu = section
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


def plot(section, out_dir) -> list:
  """muon.png: the validation loss of each optimizer at its best rate."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for r in section['rows']:
    ax.plot(r['curve_steps'], r['curve'],
            label=f'{r["optimizer"]} (lr {r["best_lr"]:g})')
  ax.axhline(section['adamw_best_final'], color='k', ls='--',
             lw=0.8, label="AdamW's best final")
  ax.set_xlabel('step')
  ax.set_ylabel('validation loss (nats/byte)')
  ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return [common.save_figure(fig, out_dir / 'muon.png')]
