"""Part 'chinchilla': the ranking against tokens per parameter.

AdamW, the strong Muon, SOAP and KL-Shampoo (the main job's routing and
tuned settings) on a main-job model small enough that 8x Chinchilla (160
tokens per parameter, every parameter counted) runs in minutes: each at its
best rate of a short grid at 1x, rechecked one rung either side at 8x; the
final validation loss and the ranking per ratio (chinchilla.png).
"""

import pathlib

import common
import lm
import lm_config
import optimizers

from experiment_parts.sweep import LmSweep, rungs_around, tuned_options

TITLE = 'The ranking against tokens per parameter'

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
optimizers.check_names(CHINCHILLA_GRIDS)


def chinchilla_parameters(model) -> int:
  """The main job's ByteTransformer's parameter count at these sizes."""
  return lm.parameter_count(lm_config.Config(
      optimizers=('adamw',), learning_rates=(1e-3,), steps=1, eval_every=1,
      weight_decay=0.0, precondition_frequency=1, seed=0, corpus='stdlib',
      **model))


def run(quick: bool, out_dir: pathlib.Path):
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
                                          **tuned_options(name, 3e-3))
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
        rates = list(rungs_around(best_lr))
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


def tables(section) -> str:
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


def plot(section, out_dir) -> list:
  """chinchilla.png: final validation loss against tokens per parameter."""
  plt = common.pyplot()
  c = section
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
  return [common.save_figure(fig, out_dir / 'chinchilla.png')]
