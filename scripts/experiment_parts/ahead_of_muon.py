"""Part 'ahead_of_muon': the library's rules against the best Muon, over seeds.

On the main job's model at its default size (``LM_MAIN``):

* AdamW at 3e-3 on seeds 0-3: each seed's target is its final validation
  loss.
* The Muon variants: Muon routed as its users route it (the blocks'
  matrices, the attention kernels as matrices; Adam on the rest), its rate
  and its Adam part's rate over a grid; and Muon in Hyperball
  (``'muon_hyperball'``: the same routing, every Muon matrix on its
  initial-norm sphere, no weight decay on them).
* The library's candidates with the main job's tuned SOAP settings (b2 =
  shampoo_beta = 0.9, the blocks' matrices only, AdamW at 1e-2 on the
  rest): SOAP, KL-SOAP (its authors' defaults), SOAP-H, KL-SOAP-H and
  SOAP-Muon, each refreshed every call and every 2 calls.

Stage 1, seed 0: every configuration over three rungs of ``LR_LADDER`` (one
shared ladder; each optimizer's rungs start around its known scale), the
grid extended once while its best is at an edge; a configuration's score is
its steps to AdamW's final loss, then its final loss, among the
configurations of its optimizer that end within 0.01 nats of the best final
loss of the optimizer's grid (at a constant rate, a rate above the best can
reach the target early and then stall well above it). Stage 2: each
optimizer's best configuration (its refresh interval and rate) on seeds 1-3,
so that each is judged on four seeds. The significance rule (of the kind of
modded-nanogpt's optimizer track): a one-sided Welch t-test of the steps to
the target over the four seeds against the best Muon variant's, p < 0.05.
Then the training step's cost on CPU with a refresh every call and every
2 calls against every 10, measured alone (stage 1 and 2 may run two at a time with
``--workers 2``, which makes their wall-clock columns slower than a run
alone; the losses are unaffected).
"""

import math
import pathlib
import time
import warnings

import numpy as np

import lm_config
import optimizers

from experiment_parts.sweep import (LM_MAIN, LM_QUICK, LmSweep, next_rung,
                                    result_row, score, train_lm_run,
                                    tuned_options)

TITLE = 'Ahead of Muon: the library\'s rules against the best Muon, over seeds'

SEEDS = (0, 1, 2, 3)
ADAMW_RATE = 3e-3
# The Adam/AdamW part's rate: Muon's best of {3e-3, 1e-2} ('kl_vs_muon').
ADAM_PART = 1e-2
SIGNIFICANCE = 0.05
# A configuration is chosen by its steps to the target among those whose
# final loss is within this of the best of its optimizer's grid (nats).
FINAL_LOSS_SLACK = 0.01

# Seed-0 grids: three rungs of the shared ladder each, around the scale of
# each rule's step (Hyperball's rate is a step's length relative to the
# matrix's norm; Muon's and SOAP-Muon's are orthogonalized updates).
GRIDS = {
    'muon': (3e-3, 1e-2, 3e-2),
    'muon_hyperball': (1e-2, 3e-2, 1e-1),
    'soap': (1e-3, 3e-3, 1e-2),
    'kl_soap': (1e-3, 3e-3, 1e-2),
    'soap_h': (1e-2, 3e-2, 1e-1),
    'kl_soap_h': (1e-2, 3e-2, 1e-1),
    'soap_muon': (3e-3, 1e-2, 3e-2),
}
optimizers.check_names(GRIDS)
MUONS = ('muon', 'muon_hyperball')
REFRESHES = (1, 2)
# Muon's Adam part is tuned too (its best, ADAM_PART, and AdamW's rate);
# Muon in Hyperball takes Muon's best.
MUON_ADAM_PARTS = (ADAM_PART, ADAMW_RATE)
# The per-step cost: a refresh every call and every 2 against every 10.
COST_NAMES = ('adamw', 'muon', 'soap', 'soap_h', 'soap_muon')
COST_REFRESHES = (1, 2, 10)
COST_QUICK = ('soap',)


def configurations(name, quick):
  """(label, options) of ``name``'s configurations in stage 1."""
  if name in MUONS:
    parts = (MUON_ADAM_PARTS if name == 'muon' and not quick
             else MUON_ADAM_PARTS[:1])
    return [(f'{name} adam={a:g}', dict(adam_lr=a)) for a in parts]
  refreshes = REFRESHES[:1] if quick else REFRESHES
  return [(f'{name} f={f}', dict(tuned_options(name, ADAM_PART),
                                 precondition_frequency=f))
          for f in refreshes]


def run(quick: bool, out_dir: pathlib.Path, train=train_lm_run, cost=None):
  """Stage 1 (seed 0 grids), stage 2 (the best on seeds 1-3), the step
  cost; returns the section (rows, per-optimizer seeds and tests).
  ``train``: the function that makes a run's record (sweep.train_lm_run's
  arguments); ``cost``: the step-cost function (``step_cost`` by default;
  the tests give synthetic ones of both)."""
  sizes = LM_QUICK if quick else LM_MAIN
  sweep = LmSweep(sizes, out_dir / 'ahead_of_muon', train)
  seeds = SEEDS[:2] if quick else SEEDS
  extend = 0 if quick else 1
  sweep.prefetch([('adamw', ADAMW_RATE, seed, {}) for seed in seeds] + [
      (name, lr, 0, options) for name, rates in GRIDS.items()
      for _, options in configurations(name, quick)
      for lr in (rates[1:2] if quick else rates)])
  adamw = {seed: sweep.run('adamw', ADAMW_RATE, seed) for seed in seeds}
  targets = {seed: r['valid_loss'][-1] for seed, r in adamw.items()}

  if extend:  # The grids' extensions, two at a time too.
    sweep.prefetch([
        (name, rate, 0, options) for name, rates in GRIDS.items()
        for _, options in configurations(name, quick)
        for rate in [next_rung({lr: sweep.run(name, lr, **options)
                                for lr in rates})] if rate is not None])
  grid_rows, chosen = [], {}
  for name, rates in GRIDS.items():
    candidates = []
    for label, options in configurations(name, quick):
      grid = sweep.grid(name, rates[1:2] if quick else rates, extend=extend,
                        **options)
      for record in grid.values():
        row = result_row(record, targets[0], grid)
        row['configuration'] = label
        grid_rows.append(row)
        candidates.append((record, label, options))
    chosen[name] = best_configuration(candidates, targets[0])

  judged = list(chosen)
  if quick:  # Only the best Muon and the best candidate on seed 1.
    judged = [min(names, key=lambda n: score(chosen[n][0], targets[0]))
              for names in (MUONS, [n for n in GRIDS if n not in MUONS])]
  sweep.prefetch([(name, chosen[name][0]['learning_rate'], seed,
                   chosen[name][2]) for name in judged for seed in seeds[1:]])
  best = {'adamw': seed_summary([adamw[seed] for seed in seeds], targets,
                                'adamw')}
  for name, (record, label, options) in chosen.items():
    more = seeds[1:] if name in judged else ()
    records = [record] + [sweep.run(name, record['learning_rate'], seed,
                                    **options) for seed in more]
    best[name] = seed_summary(records, targets, label)
  # Among the optimizers judged on every seed (all but with quick).
  best_muon = min([n for n in MUONS if n in judged],
                  key=lambda n: mean_or_inf(best[n]['steps']))
  for name, summary in best.items():
    summary['against_best_muon'] = compare(summary, best[best_muon])
  candidates = [n for n in GRIDS if n not in MUONS and n in judged]
  leader = min(candidates, key=lambda n: (mean_or_inf(best[n]['steps']),
                                          best[n]['final_mean']))
  return dict(sizes=sizes, seeds=list(seeds),
              targets=[targets[s] for s in seeds], grid_rows=grid_rows,
              best=best, best_muon=best_muon, leader=leader,
              step_cost=(cost or step_cost)(sizes, quick))


def best_configuration(candidates, target):
  """The fewest steps to ``target`` (then the lower final loss) among the
  ``(record, label, options)`` candidates whose final loss is within
  FINAL_LOSS_SLACK of the best final loss among them: at a constant rate,
  a rate above the best can reach AdamW's final loss early and then stall
  well above the others (Hyperball's steps keep one length)."""
  best_final = min(c[0]['valid_loss'][-1] for c in candidates)
  eligible = [c for c in candidates
              if c[0]['valid_loss'][-1] <= best_final + FINAL_LOSS_SLACK]
  return min(eligible, key=lambda c: score(c[0], target))


def seed_summary(records, targets, label):
  """Steps to each seed's target and final losses over the seeds."""
  rows = [result_row(r, targets[r['seed']]) for r in records]
  steps = [r['steps_to_target'] for r in rows]
  finals = [r['final_valid_loss'] for r in rows]
  shares = [r['optimizer_step_share'] for r in rows
            if r['optimizer_step_share'] is not None]
  return dict(
      configuration=label, lr=records[0]['learning_rate'],
      options=records[0]['options'], steps=steps, finals=finals,
      steps_mean=mean_or_inf(steps), steps_se=standard_error(steps),
      final_mean=float(np.mean(finals)), final_se=standard_error(finals),
      optimizer_step_share=float(np.mean(shares)) if shares else None,
      state_bytes=records[0].get('state_bytes'))


def mean_or_inf(values):
  """The mean, or infinity if a seed never reached the target."""
  return (math.inf if any(v is None for v in values)
          else float(np.mean(values)))


def standard_error(values):
  if any(v is None for v in values) or len(values) < 2:
    return math.nan
  return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def compare(summary, muon):
  """Ratio of mean steps to the best Muon's, and the one-sided Welch test
  that this optimizer needs fewer steps (p) and has a lower final loss."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ratio = summary['steps_mean'] / muon['steps_mean']
  def p_less(a, b):
    if any(v is None for v in a + b) or min(len(a), len(b)) < 2 or (
        np.var(a) == 0 and np.var(b) == 0):
      return math.nan
    with warnings.catch_warnings():  # Nearly equal samples: p is still
      warnings.simplefilter('ignore', RuntimeWarning)  # defined.
      return float(stats.ttest_ind(a, b, equal_var=False,
                                   alternative='less').pvalue)
  p_steps = p_less(summary['steps'], muon['steps'])
  p_final = p_less(summary['finals'], muon['finals'])
  return dict(steps_ratio=ratio, p_steps=p_steps, p_final=p_final,
              significant=bool(p_steps < SIGNIFICANCE))


def step_cost(sizes, quick):
  """Milliseconds per training step (the mean over 20 steps, or 5 with
  quick; each after 3 untimed ones) on seed 0's model, per optimizer and
  refresh interval, measured alone in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import lm  # pylint: disable=g-import-not-at-top
  steps = 5 if quick else 20
  rows = []
  for name in COST_QUICK if quick else COST_NAMES:
    for refresh in COST_REFRESHES if name in optimizers.EIGENBASIS else (None,):
      options = dict(tuned_options(name, ADAM_PART))
      options.pop('precondition_frequency', None)
      config = lm_config.Config(
          optimizers=(name,), learning_rates=(GRIDS.get(name, (3e-3,))[0],),
          weight_decay=0.01, precondition_frequency=refresh or 1, seed=0,
          corpus='stdlib', **sizes, **options)
      model = lm.ByteTransformer(config, nnx.Rngs(0))
      optimizer = nnx.Optimizer(
          model, lm.make_optimizer(config, name, config.learning_rates[0]),
          wrt=nnx.Param)
      batch = jax.random.randint(jax.random.PRNGKey(0),
                                 (sizes['batch_size'], sizes['seq_len'] + 1),
                                 0, lm.VOCABULARY)
      for _ in range(3):
        jax.block_until_ready(lm.train_step(model, optimizer, batch))
      tick = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(lm.train_step(model, optimizer, batch))
      rows.append(dict(optimizer=name, refresh=refresh,
                       ms=1e3 * (time.perf_counter() - tick) / steps))
  return rows


def _steps_cell(summary):
  steps = summary['steps']
  per_seed = '/'.join('never' if s is None else str(s) for s in steps)
  if math.isinf(summary['steps_mean']):
    return f'never on some seeds ({per_seed})'
  se = summary['steps_se']
  return (f'{summary["steps_mean"]:.1f}' +
          ('' if math.isnan(se) else f' ± {se:.1f}') + f' ({per_seed})')


def mebibytes_cell(nbytes):
  return '–' if nbytes is None else f'{nbytes / 2**20:.1f}'


def tables(section) -> str:
  sizes = section['sizes']
  seeds = section['seeds']
  lines = [
      f'Main job (d {sizes["d_model"]}, {sizes["num_layers"]} layers, '
      f'{sizes["steps"]} steps, evaluated every {sizes["eval_every"]}), seeds '
      f'{", ".join(map(str, seeds))}; target: AdamW\'s final loss at '
      f'{ADAMW_RATE:g} per seed ('
      f'{", ".join(f"{t:.4f}" for t in section["targets"])}). Each '
      f'optimizer at its best configuration of seed 0\'s grid; mean ± '
      f'standard error over the seeds (each seed in brackets); p: one-sided '
      f'Welch t-test against the best Muon variant '
      f'({section["best_muon"]}), significant below {SIGNIFICANCE:g}.', '',
      '| optimizer | configuration | lr | steps to AdamW\'s final loss | '
      'final valid loss | × best Muon\'s steps | p (steps) | p (final loss) '
      '| opt-step share | state MiB |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  order = sorted(section['best'], key=lambda n: (
      section['best'][n]['steps_mean'], section['best'][n]['final_mean']))
  for name in order:
    s = section['best'][name]
    against = s['against_best_muon']
    share = s['optimizer_step_share']
    def p_cell(p):
      return '–' if math.isnan(p) else f'{p:.3f}'
    lines.append(
        f'| {name} | {s["configuration"]} | {s["lr"]:g} | {_steps_cell(s)} | '
        f'{s["final_mean"]:.4f} ± {s["final_se"]:.4f} | '
        f'{against["steps_ratio"]:.2f} | {p_cell(against["p_steps"])} | '
        f'{p_cell(against["p_final"])} | '
        f'{"–" if share is None else f"{100 * share:.0f}%"} | '
        f'{mebibytes_cell(s.get("state_bytes"))} |')
  lines += ['', 'Seed 0\'s grids (each configuration\'s rates; grids '
            'extended once while the best was at an edge):', '',
            '| configuration | lr | final valid loss | steps to AdamW\'s |',
            '| --- | --- | --- | --- |']
  lines += [f'| {r["configuration"]} | {r["lr"]:g} | '
            f'{r["final_valid_loss"]:.4f} | '
            f'{r["steps_to_target"] or "never"} |'
            for r in section['grid_rows']]
  lines += ['', 'A training step\'s cost on this CPU (ms, mean over steps '
            'that include the refreshes), measured alone:', '',
            '| optimizer | refresh every | ms per step |',
            '| --- | --- | --- |']
  lines += [f'| {r["optimizer"]} | {r["refresh"] or "–"} | {r["ms"]:.1f} |'
            for r in section['step_cost']]
  return '\n'.join(lines)
