"""Part 'lm': the SOAP paper's claims on the main job's language model.

The main job's byte-level model (``scripts/lm.py``) at a reduced size, with
its settings (weight decay 0.01, precondition frequency 10): AdamW, SOAP and
Shampoo each over LM_GRID on two model/data seeds, steps to reach AdamW's
final validation loss per seed; one-sided and factorized SOAP at SOAP's best
rate. "Final loss" is the last evaluation.
"""

import dataclasses
import pathlib

import numpy as np

import common
import lm_config
import lm_training
import optimizers

TITLE = 'Language model'


LM_GRID = (1e-3, 3e-3, 1e-2)

# Tuned over LM_GRID (--quick, CI, checks the plumbing with the first two),
# and SOAP's variants at SOAP's best rate.
TUNED_OPTIMIZERS = optimizers.check_names(('adamw', 'soap', 'shampoo'))
SOAP_VARIANTS = optimizers.check_names(('soap_one_sided', 'factorized_soap'))


def run(quick: bool, out_dir: pathlib.Path):
  """The main job's model at a reduced size; every optimizer over LM_GRID and
  two seeds; the one-sided and factorized variants at SOAP's best rate."""
  sizes = (dict(steps=20, batch_size=8, seq_len=32, d_model=32, num_layers=1,
                num_heads=2, eval_every=10, eval_batches=2) if quick else
           dict(steps=200, batch_size=16, seq_len=64, d_model=64, num_layers=2,
                num_heads=4, eval_every=20, eval_batches=8))
  grid = LM_GRID[1:2] if quick else LM_GRID
  seeds = (0,) if quick else (0, 1)
  records = {}  # (optimizer, lr, seed) -> record
  base_config = lm_config.Config(
      optimizers=('adamw',), learning_rates=(grid[0],), weight_decay=0.01,
      precondition_frequency=10, seed=0, corpus='stdlib', **sizes)
  data = lm_config.split_corpus(lm_config.load_corpus(None),
                                sizes['seq_len'])

  def train(name, lr, seed):
    print(f'  lm: {name} lr={lr:g} seed={seed}', flush=True)
    config = dataclasses.replace(base_config, optimizers=(name,),
                                 learning_rates=(lr,), seed=seed)
    records[(name, lr, seed)] = lm_training.train_one(
        config, name, lr, data, out_dir / 'lm')

  def best_lr(name):
    finals = {lr: np.mean([records[(name, lr, s)]['valid_loss'][-1]
                           for s in seeds]) for lr in grid}
    return min(finals, key=lambda lr: finals[lr]), finals

  tuned = TUNED_OPTIMIZERS[:2] if quick else TUNED_OPTIMIZERS
  variants = () if quick else SOAP_VARIANTS
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
    if name in SOAP_VARIANTS:
      lr, finals = soap_lr, {}
    else:
      lr, finals = best_lr(name)
    mine = [records[(name, lr, s)] for s in seeds]
    rows.append(dict(
        optimizer=name, lr=lr,
        grid_final_losses={f'{k:g}': float(v) for k, v in finals.items()},
        final_valid_loss=[r['valid_loss'][-1] for r in mine],
        steps_to_adamw_final=[lm_training.steps_to_reach(r, targets[s])
                              for r, s in zip(mine, seeds)],
        seconds=[r['wall_clock'][-1] for r in mine],
        optimizer_step_share=[r['optimizer_step_share'] for r in mine],
        curve_steps=mine[0]['steps'],
        mean_curve=np.mean([r['valid_loss'] for r in mine], axis=0).tolist()))
  return dict(sizes=sizes, grid=list(grid), seeds=list(seeds),
              adamw_targets=[targets[s] for s in seeds], rows=rows)


def tables(section) -> str:
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


def plot(section, out_dir) -> list:
  """lm.png: each optimizer's validation loss (mean of the seeds)."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for r in section['rows']:
    ax.plot(r['curve_steps'], r['mean_curve'],
            label=f'{r["optimizer"]} (lr {r["lr"]:g})')
  ax.set_xlabel('step')
  ax.set_ylabel('validation loss (nats/byte, mean of seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return [common.save_figure(fig, out_dir / 'lm.png')]
