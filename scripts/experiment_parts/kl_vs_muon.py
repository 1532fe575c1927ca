"""Part 'kl_vs_muon': KL-Shampoo and KL-SOAP against tuned SOAP, the strong
Muon and AdamW on the main job.

Every eigenbasis optimizer with the main job's tuned SOAP settings (refresh
every 2, b2 = shampoo_beta = 0.9, the blocks' matrices only, AdamW on the
rest), Muon routed as its users route it; each over its rate grid and the
Adam part's grid on seed 0, the best again on seed 1; KL-Shampoo's factor
decay varied at its best rate; and the optimizer state of GPT-2 small
(124 M parameters) for each, computed without allocating it.
"""

import pathlib

import jax
import optax

import common
import optimizers
import soap_optax

from experiment_parts.sweep import (LM_MAIN, LM_QUICK, LmSweep, result_row,
                                    score, seconds_cell, steps_cell,
                                    tuned_options)

TITLE = 'KL-Shampoo against the strong Muon'

# The Adam/AdamW part's rate, tuned alike for Muon and the eigenbasis
# optimizers.
ADAM_PART_GRID = (3e-3, 1e-2)


# Rate grids (extended while the best is at an edge).
KL_GRIDS = {'adamw': (3e-3,), 'muon': (1e-2, 3e-2), 'soap': (3e-3,),
            'kl_shampoo': (1e-3, 3e-3, 1e-2), 'kl_soap': (3e-3,)}
optimizers.check_names(KL_GRIDS)


KL_SEEDS = (0, 1)


# KL-Shampoo's factor decay away from SOAP's tuned 0.9, at its best rate.
KL_VARIANTS = (dict(soap_b2=0.95), dict(soap_b2=0.99))


def run(quick: bool, out_dir: pathlib.Path):
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
      options = tuned_options(name, adam_lr)
      grid = sweep.grid(name, rates[:1] if quick else rates, extend=extend,
                        **options)
      runs += [(record, grid) for record in grid.values()]
    for record, grid in runs:
      rows.append(kl_row(record, targets[0]))
    chosen = min(runs, key=lambda r: score(r[0], targets[0]))[0]
    if name == 'kl_shampoo' and not quick:
      for variant in KL_VARIANTS:
        rows.append(kl_row(sweep.run(name, chosen['learning_rate'], **{
            **chosen['options'], **variant}), targets[0]))
    best[name] = [kl_row(chosen, targets[0])] + [
        kl_row(sweep.run(name, chosen['learning_rate'], seed,
                          **tuned_options(name, chosen['options'].get(
                              'adam_lr', 3e-3))), targets[seed])
        for seed in seeds[1:]]
  best['adamw'] = [kl_row(adamw[seed], targets[seed]) for seed in seeds]
  gpt2 = gpt2_state_bytes()
  return dict(sizes=sizes, targets=[targets[s] for s in seeds],
              seeds=list(seeds), adam_grid=list(adam_grid), rows=rows,
              best=best, gpt2_state=gpt2)


def kl_row(record, target):
  """A sweep row with the Adam part's rate and the state's bytes."""
  row = result_row(record, target)
  row.update(adam_lr=record['options'].get('adam_lr'),
             state_bytes=record.get('state_bytes'))
  return row


def gpt2_state_bytes():
  """Optimizer state of GPT-2 small (124 M parameters, no allocation): AdamW,
  SOAP, KL-Shampoo and KL-SOAP, every parameter to the optimizer."""
  params = {k: jax.ShapeDtypeStruct(shape, jax.numpy.float32) for k, shape in
            common.transformer_shapes(768, 12, 50257, 1024).items()}
  def eigenbasis(name, **layout):  # the aliases' default rate.
    return optimizers.make_eigenbasis_optimizer(name, 3e-3, **layout)

  txs = {'adamw': optax.adamw(1e-3)}
  for label, layout in (('', {}), (' one-sided', dict(one_sided=True)),
                        (' block_size=1024', dict(block_size=1024))):
    txs['soap' + label] = eigenbasis('soap', **layout)
    txs['kl_shampoo' + label] = eigenbasis('kl_shampoo', **layout)
  txs['kl_soap'] = eigenbasis('kl_soap')
  return {name: soap_optax.state_nbytes(jax.eval_shape(tx.init, params))
          for name, tx in txs.items()}


def tables(section) -> str:
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
            f'{r["seed"]} | {r["final_valid_loss"]:.4f} | {steps_cell(r)} | '
            f'{seconds_cell(r["seconds_to_target"])} | {r["seconds"]:.0f} | '
            f'{"–" if share is None else f"{100 * share:.0f}%"} | '
            f'{"–" if r["state_bytes"] is None else r["state_bytes"] // 1024} |')
  lines += [line(r) for name in KL_GRIDS
            for r in section['best'].get(name, [])]
  lines += ['', 'Every run on seed 0:', '',
            '| run | lr | Adam part | final valid loss | steps to '
            'AdamW\'s |', '| --- | --- | --- | --- | --- |']
  lines += [f'| {r["label"]} | {r["lr"]:g} | {r["adam_lr"]:g} | '
            f'{r["final_valid_loss"]:.4f} | {steps_cell(r)} |'
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
