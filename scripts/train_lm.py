"""Train a small byte-level language model with SOAP and other optimizers.

The main job of soap_optax: a decoder-only transformer written with
``flax.nnx`` learns to predict bytes of a text corpus, once per requested
optimizer, with the same initialization and the same batches for each. It
prints a progress bar per run and a final table, and writes a PNG (validation
loss against steps and against wall-clock), a PNG of the eigenbasis
optimizers' staleness and refreshes over training (``diagnostics.png``, from
``soap_optax.diagnostics``) and a JSON of every number, the diagnostics
included.

The default corpus is the source of the running Python's standard library
(its top-level ``*.py`` files in sorted order): present on every machine,
nothing downloaded. ``--text-file`` uses any other text.

This file is the command line and the loop over optimizers; the model, its
optimizers and steps are ``lm.py`` (its configuration and corpus
``lm_config.py``), one training run ``lm_training.py`` and the table, plots
and JSON ``lm_report.py``.

Examples::

  python scripts/train_lm.py                       # soap_muon, adamw, muon
  python scripts/train_lm.py --optimizers soap_h,kl_soap_h,muon_hyperball
  python scripts/train_lm.py --precondition-frequency adaptive
  python scripts/train_lm.py --soap-params matrices --schedule cosine
  python scripts/train_lm.py --optimizers soap,adamw,shampoo,factorized_soap
  python scripts/train_lm.py --checkpoint-every 100 --out runs/a
  python scripts/train_lm.py --resume runs/a       # continue an interrupted run
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time

import common
from common import UsageError
from lm_config import (ADAM_PART_LEARNING_RATE, Config, DEFAULT_LEARNING_RATES,
                       OPTIMIZERS, SCHEDULES, SOAP_PARAMS, TUNED_SOAP,
                       default_warmup_steps, load_corpus, split_corpus)


# ------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--optimizers', default='soap_muon,adamw,muon',
                      help=f'comma-separated, from {", ".join(OPTIMIZERS)}')
  parser.add_argument('--lr', default='',
                      help='learning rates, e.g. "soap=3e-3,adamw=1e-3"; '
                      'others use the built-in defaults')
  parser.add_argument('--lr-grid', default='',
                      help='comma-separated learning rates: run every '
                      'optimizer at each and keep its best (slower)')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--seq-len', type=int, default=64)
  parser.add_argument('--d-model', type=int, default=128)
  parser.add_argument('--num-layers', type=int, default=2)
  parser.add_argument('--num-heads', type=int, default=4)
  parser.add_argument('--eval-every', type=int, default=25)
  parser.add_argument('--eval-batches', type=int, default=8)
  parser.add_argument('--weight-decay', type=float, default=0.01)
  parser.add_argument('--precondition-frequency',
                      default=str(TUNED_SOAP['precondition_frequency']),
                      help='refresh interval of the eigenbasis optimizers '
                      '(an integer), or "adaptive" (soap_optax.'
                      'AdaptiveRefresh: refresh a stack when it is stale); '
                      'default %(default)s')
  parser.add_argument('--schedule', default='constant', choices=SCHEDULES,
                      help='learning-rate schedule of every optimizer: '
                      'constant, or cosine decay to a tenth of the peak')
  parser.add_argument('--warmup-steps', type=int, default=None,
                      help='linear warmup from 0 (default: 10%% of --steps '
                      'with --schedule cosine, none with constant)')
  parser.add_argument('--soap-b2', type=float, default=TUNED_SOAP['soap_b2'],
                      help='second-moment and Kronecker-factor decay of the '
                      'eigenbasis optimizers (soap: b2 = shampoo_beta); '
                      'default %(default)s')
  parser.add_argument('--soap-params', default=TUNED_SOAP['soap_params'],
                      choices=SOAP_PARAMS,
                      help='parameters the eigenbasis optimizers handle; the '
                      'rest get AdamW at '
                      f'{ADAM_PART_LEARNING_RATE:g}: all, matrices (vectors '
                      'to AdamW) or hidden (the blocks\' matrices only); '
                      'default %(default)s')
  parser.add_argument('--adam-lr', type=float,
                      default=ADAM_PART_LEARNING_RATE,
                      help='rate of muon\'s Adam part and of the AdamW part '
                      'of the eigenbasis optimizers (--soap-params matrices/'
                      'hidden); default %(default)g')
  parser.add_argument('--one-sided', action='store_true',
                      help='soap and factorized_soap rotate only the shorter '
                      'axis of each matrix')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--text-file', default=None,
                      help='train on this UTF-8/bytes file instead of the '
                      'standard library sources')
  parser.add_argument('--out', default=None,
                      help='output folder (default runs/<timestamp>/)')
  parser.add_argument('--checkpoint-every', type=int, default=0,
                      help='save model and optimizer state every N steps')
  parser.add_argument('--resume', default=None,
                      help='continue the run in this output folder')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny configuration that runs in seconds (CI)')
  parser.add_argument('--stop-after', type=int, default=0,
                      help=argparse.SUPPRESS)  # simulate an interruption.
  parser.add_argument('--no-progress', action='store_true',
                      help='no progress bars')
  args = parser.parse_args(argv)
  if args.quick:  # tiny sizes, for flags the user did not set.
    for name, value in QUICK_SIZES.items():
      if getattr(args, name) == parser.get_default(name):
        setattr(args, name, value)
  return args


QUICK_SIZES = dict(steps=20, batch_size=8, seq_len=32, d_model=32,
                   num_layers=1, num_heads=2, eval_every=10, eval_batches=2)


def build_config(args: argparse.Namespace) -> Config:
  """Validates the arguments; raises UsageError with a clear message."""
  optimizers = tuple(o.strip() for o in args.optimizers.split(',') if o.strip())
  unknown = [o for o in optimizers if o not in OPTIMIZERS]
  if not optimizers or unknown:
    raise UsageError(
        f'--optimizers: unknown {", ".join(unknown) or "(empty list)"}; '
        f'choose from {", ".join(OPTIMIZERS)}')
  if len(set(optimizers)) != len(optimizers):
    raise UsageError('--optimizers: each optimizer may appear once')
  frequency = args.precondition_frequency
  if frequency != 'adaptive':
    try:
      frequency = int(frequency)
    except ValueError:
      frequency = 0
    if frequency <= 0:
      raise UsageError('--precondition-frequency must be a positive integer '
                       f'or "adaptive", got {args.precondition_frequency}')
  args.precondition_frequency = frequency
  for name in ('steps', 'batch_size', 'seq_len', 'd_model', 'num_layers',
               'num_heads', 'eval_every', 'eval_batches'):
    if getattr(args, name) <= 0:
      raise UsageError(f'--{name.replace("_", "-")} must be a positive '
                       f'integer, got {getattr(args, name)}')
  for name in ('checkpoint_every', 'stop_after'):
    if getattr(args, name) < 0:
      raise UsageError(f'--{name.replace("_", "-")} must be >= 0')
  if args.d_model % args.num_heads:
    raise UsageError(f'--d-model ({args.d_model}) must be divisible by '
                     f'--num-heads ({args.num_heads})')
  if args.weight_decay < 0:
    raise UsageError('--weight-decay must be >= 0')
  if args.warmup_steps is None:
    args.warmup_steps = default_warmup_steps(args.schedule, args.steps)
  if not 0 <= args.warmup_steps < args.steps:
    raise UsageError('--warmup-steps must be >= 0 and below --steps '
                     f'({args.steps}), got {args.warmup_steps}')
  if not 0 <= args.soap_b2 < 1:
    raise UsageError(f'--soap-b2 must be in [0, 1), got {args.soap_b2}')
  if not args.adam_lr > 0:
    raise UsageError(f'--adam-lr must be > 0, got {args.adam_lr}')
  if args.one_sided and any(o.startswith('shampoo') for o in optimizers):
    raise UsageError('--one-sided: soap, factorized_soap, kl_shampoo and '
                     'kl_soap only (shampoo has no one-sided variant)')
  learning_rates = dict(DEFAULT_LEARNING_RATES)
  for item in filter(None, (s.strip() for s in args.lr.split(','))):
    name, _, value = item.partition('=')
    if name not in OPTIMIZERS:
      raise UsageError(f'--lr: unknown optimizer {name!r}; choose from '
                       f'{", ".join(OPTIMIZERS)}')
    learning_rates[name] = common.positive_float('--lr', value,
                                                 'learning rates')
  return Config(
      optimizers=optimizers,
      learning_rates=tuple(learning_rates[o] for o in optimizers),
      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      d_model=args.d_model, num_layers=args.num_layers,
      num_heads=args.num_heads, eval_every=args.eval_every,
      eval_batches=args.eval_batches, weight_decay=args.weight_decay,
      precondition_frequency=args.precondition_frequency, seed=args.seed,
      corpus=os.path.abspath(args.text_file) if args.text_file else 'stdlib',
      schedule=args.schedule, warmup_steps=args.warmup_steps,
      soap_b2=args.soap_b2, soap_params=args.soap_params,
      one_sided=args.one_sided, adam_lr=args.adam_lr)


def check_resume(out_dir: pathlib.Path, config: Config) -> None:
  config_path = out_dir / 'config.json'
  if not out_dir.is_dir() or not config_path.is_file():
    raise UsageError(f'--resume: {out_dir} is not the output folder of a run '
                     '(no config.json)')
  saved = json.loads(config_path.read_text())
  current = json.loads(json.dumps(dataclasses.asdict(config)))
  different = sorted(k for k in current if saved.get(k) != current[k])
  if different:
    details = ', '.join(f'{k}: {saved.get(k)} -> {current[k]}'
                        for k in different)
    raise UsageError(f'--resume: {out_dir} was run with a different '
                     f'configuration ({details})')


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  config = build_config(args)
  data = split_corpus(load_corpus(args.text_file), config.seq_len)
  if args.resume:
    out_dir = pathlib.Path(args.resume)
    check_resume(out_dir, config)
  else:
    out_dir = pathlib.Path(args.out or os.path.join(
        'runs', datetime.datetime.now().strftime('%Y%m%d-%H%M%S')))
    if (out_dir / 'config.json').exists():
      raise UsageError(f'--out: {out_dir} already holds a run; use --resume '
                       f'{out_dir} to continue it or choose another folder')
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'config.json').write_text(
        json.dumps(dataclasses.asdict(config), indent=1))

  progress = common.progress_bar_class(not args.no_progress)
  # JAX starts here, after the arguments and the corpus are checked.
  import jax  # pylint: disable=g-import-not-at-top
  import lm_report  # pylint: disable=g-import-not-at-top
  import lm_training  # pylint: disable=g-import-not-at-top
  print(f'corpus: {config.corpus} ({len(data[0]) + len(data[1])} bytes), '
        f'devices: {jax.devices()}', flush=True)

  grid = [common.positive_float('--lr-grid', x, 'learning rates')
          for x in args.lr_grid.split(',') if x.strip()]
  started = time.perf_counter()
  records = {}
  try:
    for name, lr in zip(config.optimizers, config.learning_rates):
      record_path = out_dir / f'record_{name}.json'
      if record_path.exists():
        records[name] = json.loads(record_path.read_text())
        continue
      candidates = grid or [lr]
      best = None
      for candidate in candidates:
        run_dir = out_dir if len(candidates) == 1 else (
            out_dir / f'lr_{candidate:g}')
        record = lm_training.train_one(
            config, name, candidate, data, run_dir,
            checkpoint_every=args.checkpoint_every,
            stop_after=args.stop_after, progress=progress)
        if best is None or record['valid_loss'][-1] < best['valid_loss'][-1]:
          best = record
      records[name] = best
      record_path.write_text(json.dumps(best))
  except lm_training.Interrupted as stop:
    print(f'stopped after step {stop.args[0]} (--stop-after); resume with '
          f'--resume {out_dir}', flush=True)
    return 0
  table, plot_path, json_path = lm_report.report(
      config, records, out_dir, time.perf_counter() - started)
  print('\n' + table + '\n')
  print(f'plot:    {plot_path}\nresults: {json_path}\noutputs: {out_dir}')
  return 0


if __name__ == '__main__':
  try:
    common.exit_with_main(main)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
