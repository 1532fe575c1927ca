"""The SOAP paper's claims, checked at small scale.

Each part lives in a module of ``scripts/experiment_parts/`` (its docstring
says what it runs):

* ``kronecker``: SOAP against AdamW and Shampoo, robustness to the
  preconditioning frequency (1, 10, 30, 100), one-sided and factorized SOAP,
  on the ill-conditioned Kronecker problem (``soap_optax.problems``);
* ``lm``: the same comparisons on the main job's byte-level language model
  (``scripts/lm.py``) at a smaller size;
* ``muon``: AdamW, SOAP and optax's Muon on the main job's model at its
  default size, each over a learning-rate grid;
* ``refresh``: fixed refresh intervals against the adaptive policies
  (soap_optax.AdaptiveRefresh, and FoamRefresh for Shampoo) on both problems;
* ``soap_vs_muon``: SOAP tuned against Muon on the main job's model, every
  setting alone and combined, the best on two seeds and at a 4x larger batch
  (docs/choosing_and_tuning.md);
* ``kl_vs_muon``: KL-Shampoo and KL-SOAP against tuned SOAP, the strong Muon
  and AdamW, and GPT-2 small's optimizer state;
* ``chinchilla``: the ranking against tokens per parameter (1x, 4x, 8x);
* ``ahead_of_muon``: the library's rules (SOAP, KL-SOAP, SOAP-H, KL-SOAP-H,
  SOAP-Muon; a refresh every call and every 2) against Muon and Muon in
  Hyperball, each at its best rate, judged over four seeds (the README's
  main table).

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
  python scripts/experiments.py --parts ahead_of_muon --workers 2  # ~1 h

Outputs under ``--out``: ``results.json``, ``tables.md``, ``kronecker.png``,
``frequency.png``, ``lm.png``, ``muon.png``, ``refresh.png``,
``soap_vs_muon.png`` and ``chinchilla.png``; the 'soap_vs_muon',
'kl_vs_muon', 'chinchilla' and 'ahead_of_muon' parts keep each run as JSON
under a folder of their name there and read it back when run again.
"""

import argparse
import datetime
import json
import os
import pathlib
import time

import common

PARTS = ('kronecker', 'lm', 'muon', 'refresh', 'soap_vs_muon', 'kl_vs_muon',
         'chinchilla', 'ahead_of_muon')
# The order the plots are drawn in (and their paths printed).
PLOT_ORDER = ('kronecker', 'chinchilla', 'lm', 'muon', 'soap_vs_muon',
              'refresh')


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--parts', default=','.join(PARTS),
                      help=f'comma-separated subset of {",".join(PARTS)}')
  parser.add_argument('--out', default=None,
                      help='output folder (default runs/experiments-<time>)')
  parser.add_argument('--workers', type=int, default=1,
                      help='language-model runs at a time (ahead_of_muon), '
                      'each in a process of its own')
  args = parser.parse_args(argv)
  if args.workers < 1:
    raise common.UsageError(f'--workers must be >= 1, got {args.workers}')
  args.parts = common.comma_list('--parts', args.parts, PARTS)
  return args


def main(argv) -> int:
  args = parse_args(argv)
  # The parts import JAX: after the arguments are checked.
  from experiment_parts import (  # pylint: disable=g-import-not-at-top
      ahead_of_muon, chinchilla, kl_vs_muon, kronecker, language_model, muon,
      refresh, soap_vs_muon, sweep)
  modules = dict(kronecker=kronecker, lm=language_model, muon=muon,
                 refresh=refresh, soap_vs_muon=soap_vs_muon,
                 kl_vs_muon=kl_vs_muon, chinchilla=chinchilla,
                 ahead_of_muon=ahead_of_muon)
  sweep.LmSweep.workers = args.workers
  out_dir = pathlib.Path(args.out or os.path.join(
      'runs', 'experiments-' + datetime.datetime.now().strftime('%Y%m%d-%H%M%S')))
  out_dir.mkdir(parents=True, exist_ok=True)
  info = common.machine_info()
  results = dict(machine=info, quick=args.quick)
  text = [f'{info["date"]}, {info["backend"]} ({info["cpu"]}, '
          f'{info["cpu_count"]} cores), jax {info["jax"]}, optax '
          f'{info["optax"]}' + (' — QUICK sizes' if args.quick else '')]
  for part in args.parts:
    print(f'{part}:', flush=True)
    tick = time.perf_counter()
    module = modules[part]
    if part == 'refresh':
      # SOAP's rate on the main job, and its run every 10 steps: the 'muon'
      # part's, if it ran.
      soap_lr, every_10 = 3e-3, None
      if 'muon' in results:
        every_10 = results['muon'].pop('soap_best_record')
        soap_lr = every_10['learning_rate']
      results[part] = refresh.run(args.quick, out_dir, soap_lr, every_10)
    else:
      results[part] = module.run(args.quick, out_dir)
    text += ['', f'### {module.TITLE}', '', module.tables(results[part])]
    results[part]['seconds'] = time.perf_counter() - tick
  (out_dir / 'tables.md').write_text('\n'.join(text) + '\n')
  (out_dir / 'results.json').write_text(json.dumps(results, indent=1))
  paths = []
  for part in PLOT_ORDER:
    if part in results:
      paths += modules[part].plot(results[part], out_dir)
  print('\n'.join(text))
  print(f'\nresults: {out_dir / "results.json"}\nplots:   ' +
        ', '.join(str(p) for p in paths))
  return 0


if __name__ == '__main__':
  common.exit_with_main(main)
