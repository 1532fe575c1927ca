"""The main job's report: its table, its plots and its JSON.

The table has one row per optimizer: rate, final validation and training
loss, the steps it took to reach AdamW's final validation loss, wall-clock,
the share of a step spent in the optimizer and the factor decompositions.
``losses.png`` plots the validation loss against steps and wall-clock,
``diagnostics.png`` the eigenbasis optimizers' staleness and refreshes, and
``results.json`` keeps every number.

It imports JAX: import it after choosing the device.
"""

import dataclasses
import json
import os
import pathlib
import sys

import jax
from matplotlib.ticker import MaxNLocator

import common
import lm_config
import lm_training

HEADER = ('optimizer', 'lr', 'valid loss', 'train loss',
          'steps to AdamW final', 'wall-clock s', 'opt-step share',
          'decompositions')


def table_rows(config: lm_config.Config, records: dict) -> list[dict]:
  """One row of numbers per optimizer (results.json's 'table')."""
  reference = records.get('adamw')
  target = reference['valid_loss'][-1] if reference else None
  rows = []
  for name in config.optimizers:
    r = records[name]
    rows.append(dict(
        optimizer=name,
        learning_rate=r['learning_rate'],
        final_valid_loss=r['valid_loss'][-1],
        final_train_loss=r['train_loss'][-1],
        steps_to_adamw_final=(lm_training.steps_to_reach(r, target)
                              if target is not None else None),
        wall_clock_s=r['wall_clock'][-1],
        optimizer_step_share=r.get('optimizer_step_share'),
        tokens_per_second=r.get('tokens_per_second'),
        decompositions=(r['decompositions'][-1] if r.get('decompositions')
                        else None),
    ))
  return rows


def format_table(config: lm_config.Config, rows: list[dict],
                 has_adamw: bool) -> str:
  """The settings line and the table. Steps to AdamW's final loss: 'n/a'
  without an AdamW run, 'not reached' when the optimizer never got there."""
  lines = [' | '.join(HEADER), ' | '.join('---' for _ in HEADER)]
  for row in rows:
    share, reached = row['optimizer_step_share'], row['steps_to_adamw_final']
    if not has_adamw:
      reached_cell = 'n/a'
    else:
      reached_cell = 'not reached' if reached is None else str(reached)
    lines.append(' | '.join([
        row['optimizer'], f'{row["learning_rate"]:g}',
        f'{row["final_valid_loss"]:.4f}', f'{row["final_train_loss"]:.4f}',
        reached_cell, f'{row["wall_clock_s"]:.1f}',
        f'{share:.0%}' if share is not None else 'n/a',
        '–' if row['decompositions'] is None
        else f'{row["decompositions"]:.0f}']))
  settings = (f'schedule {config.schedule} (warmup {config.warmup_steps}); '
              'eigenbasis optimizers: precondition_frequency '
              f'{config.precondition_frequency}, b2 {config.soap_b2:g}, '
              f'parameters: {config.soap_params}'
              + (', one-sided' if config.one_sided else ''))
  return settings + '\n\n' + '\n'.join(lines)


def losses_figure(config: lm_config.Config, records: dict):
  """Validation loss against steps and against wall-clock."""
  plt = common.pyplot()
  fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
  for name in config.optimizers:
    r = records[name]
    label = f'{name} (lr={r["learning_rate"]:g})'
    by_step.plot(r['steps'], r['valid_loss'], label=label)
    by_time.plot(r['wall_clock'], r['valid_loss'], label=label)
  by_step.set_xlabel('step')
  by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
  by_time.set_xlabel('wall-clock (s)')
  for ax in (by_step, by_time):
    ax.set_ylabel('validation loss (nats/byte)')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f'byte-level LM, {config.num_layers} layers, d={config.d_model}'
               f', batch {config.batch_size}x{config.seq_len}')
  return fig


def diagnostics_figure(config: lm_config.Config, records: dict):
  """Staleness over training and the steps with refreshes, one panel per
  eigenbasis optimizer, integer steps on the x axis (None: no eigenbasis
  optimizer ran)."""
  names = [n for n in config.optimizers if records[n].get('staleness')]
  if not names:
    return None
  plt = common.pyplot()
  fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.6 * len(names)),
                           squeeze=False)
  for ax, name in zip(axes[:, 0], names):
    r = records[name]
    steps = range(1, len(r['staleness']) + 1)
    ax.plot(steps, r['staleness'], lw=0.9,
            label='largest factor staleness ‖B−diag B‖/‖B‖')
    previous = 0
    events = []
    for step, total in zip(steps, r['decompositions']):
      if total > previous:
        events.append(step)
      previous = total
    for k, step in enumerate(events):
      ax.axvline(step, color='tab:red', lw=0.6, alpha=0.5,
                 label='refresh' if k == 0 else None)
    ax.set_ylim(0, 1)
    ax.set_ylabel('staleness')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f'{name} (precondition_frequency='
                 f'{config.precondition_frequency}): '
                 f'{r["decompositions"][-1]:.0f} decompositions',
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='upper right')
  axes[-1, 0].set_xlabel('step')
  return fig


def run_machine() -> dict:
  """The machine results.json records: platform, JAX devices and version,
  Python, cores."""
  return dict(platform=sys.platform, devices=[str(d) for d in jax.devices()],
              jax=jax.__version__, python=sys.version.split()[0],
              cpu_count=os.cpu_count())


def report(config: lm_config.Config, records: dict, out_dir: pathlib.Path,
           total_seconds: float):
  """Writes results.json, losses.png and diagnostics.png; returns the table
  as text and the paths of the loss plot and the JSON."""
  rows = table_rows(config, records)
  table = format_table(config, rows, 'adamw' in records)
  plot_path = common.save_figure(losses_figure(config, records),
                                 out_dir / 'losses.png', dpi=110)
  diagnostics = diagnostics_figure(config, records)
  if diagnostics is not None:
    common.save_figure(diagnostics, out_dir / 'diagnostics.png', dpi=110)
  results = dict(config=dataclasses.asdict(config), table=rows,
                 records=records, total_seconds=total_seconds,
                 machine=run_machine())
  json_path = out_dir / 'results.json'
  json_path.write_text(json.dumps(results, indent=1))
  return table, plot_path, json_path
