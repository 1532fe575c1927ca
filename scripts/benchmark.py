"""Benchmarks: optimizer-step cost against the machine's limits, refresh cost,
compile time, memory, and a full training step.

Every number is measured in the same run, on the same machine, so the ratios
(achieved against attainable) do not depend on a datasheet. Each section is a
module of ``scripts/benchmark_sections/`` (its docstring says what it
measures and how):

* ``step``: the jitted ``update`` of AdamW and the SOAP family, regular and
  refresh calls apart, against plain ``jnp.dot`` FLOP/s on the same product
  shapes (SOAP family) and a measured read+write stream (AdamW).
* ``refresh``: one factor's ``eigh`` refresh against power iteration + QR per
  size; 8 same-size factors batched against one call per factor.
* ``compile``: trace+lower and compile time of the jitted ``update`` for 1, 12
  and 24 layers, separate and scanned; GPT-2 small's update and training step.
* ``memory``: optimizer-state bytes of every variant against closed-form
  formulas and against AdamW; GPT-2 small's layout variants.
* ``train_step``: a whole training step (forward + backward + update) with
  AdamW and with SOAP at frequency 10; GPT-2-small shapes and 262,144 tokens
  per step on a GPU, a small model on a CPU.
* ``versus_torch``: soap_optax side by side with the PyTorch SOAPs that are
  installed (``--torch-soap-file`` for the authors' ``soap.py``).
* ``sharded``: on 8 host devices (a subprocess), SOAP's calls with the work
  divided over the mesh (``mesh=``) against every device doing all of it.

Examples::

  python scripts/benchmark.py                   # everything (~20 min on 2 CPU cores)
  python scripts/benchmark.py --quick           # small sizes, under a minute (CI)
  python scripts/benchmark.py --sections step,memory --device gpu

Outputs under ``--out``: ``results.json`` (every measurement), ``tables.md``
(the tables of BENCHMARKS.md) and ``step_cost.png``, ``refresh_cost.png``,
``memory.png``.
"""

import argparse
import datetime
import importlib
import json
import os
import pathlib
import sys
import time
from typing import Any

import common
from benchmark_sections import FREQUENCY
from benchmark_sections import SECTIONS

SHARDED_WORKER_FLAG = '--sharded-worker'


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='small sizes and few repeats (proves the script '
                      'works; the numbers mean little)')
  parser.add_argument('--sections', default=','.join(SECTIONS),
                      help=f'comma-separated subset of {",".join(SECTIONS)}')
  parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'gpu'),
                      help='auto: the GPU when JAX sees one, else the CPU')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed update calls per optimizer and shape after '
                      'the first (refresh calls are every 10th; default 60, '
                      '20 with --quick)')
  parser.add_argument('--out', default=None,
                      help='output folder (default runs/benchmark-<time>)')
  parser.add_argument('--torch-soap-file', default=None,
                      help='versus_torch: a copy of the SOAP authors\' '
                      'PyTorch soap.py (class SOAP) to time as well; it is '
                      'not shipped here')
  args = parser.parse_args(argv)
  if args.torch_soap_file and not os.path.isfile(args.torch_soap_file):
    raise common.UsageError(f'--torch-soap-file: no such file: '
                            f'{args.torch_soap_file}')
  args.sections = common.comma_list('--sections', args.sections, SECTIONS)
  if args.steps is None:
    args.steps = 20 if args.quick else 60
  if args.steps < FREQUENCY:
    raise common.UsageError(f'--steps must be >= {FREQUENCY} (one refresh '
                            f'call), got {args.steps}')
  return args


def section_module(name: str):
  """``benchmark_sections.<name>``; imports JAX: call after select_device."""
  return importlib.import_module(f'benchmark_sections.{name}')


def run_section(name: str, args: argparse.Namespace) -> dict:
  """Runs one section with the arguments it takes."""
  module = section_module(name)
  if name in ('step', 'train_step'):
    return module.run(args.steps, args.quick)
  if name == 'versus_torch':
    return module.run(args.torch_soap_file, args.quick)
  if name == 'sharded':
    return module.run([sys.executable, __file__, SHARDED_WORKER_FLAG],
                      args.quick)
  return module.run(args.quick)


def header_line(info: dict, quick: bool) -> str:
  """The first line of tables.md: date, devices, CPU and versions."""
  return (f'{info["date"]}, {info["backend"]}: {", ".join(info["devices"])} '
          f'({info["cpu"]}, {info["cpu_count"]} cores), Python '
          f'{info["python"]}, jax {info["jax"]}, jaxlib {info["jaxlib"]}, '
          f'optax {info["optax"]}' + (' — QUICK sizes' if quick else ''))


def plot(results: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """The figures of the sections that have one and ran."""
  paths = []
  for name in SECTIONS:
    if name in results and hasattr(section_module(name), 'plot'):
      paths.append(section_module(name).plot(results[name], out_dir))
  return paths


def main(argv: list[str]) -> int:
  if argv and argv[0] == SHARDED_WORKER_FLAG:
    section_module('sharded').print_worker_result('--quick' in argv)
    return 0
  args = parse_args(argv)
  common.select_device(args.device)
  out_dir = pathlib.Path(args.out or os.path.join(
      'runs', 'benchmark-' + datetime.datetime.now().strftime('%Y%m%d-%H%M%S')))
  out_dir.mkdir(parents=True, exist_ok=True)
  info = common.machine_info()
  print(f'backend {info["backend"]} ({", ".join(info["devices"])}), jax '
        f'{info["jax"]}', flush=True)
  results: dict[str, Any] = dict(machine=info, quick=args.quick)
  started = time.perf_counter()
  for section in args.sections:
    print(f'{section}:', flush=True)
    tick = time.perf_counter()
    results[section] = run_section(section, args)
    results[section]['seconds'] = time.perf_counter() - tick
  results['total_seconds'] = time.perf_counter() - started
  text = [header_line(info, args.quick)]
  for section in args.sections:
    module = section_module(section)
    text += ['', f'### {module.TITLE}', '', module.table(results[section])]
  (out_dir / 'tables.md').write_text('\n'.join(text) + '\n')
  (out_dir / 'results.json').write_text(json.dumps(results, indent=1))
  plots = plot(results, out_dir)
  print('\n'.join(text))
  print(f'\nresults: {out_dir / "results.json"}\ntables:  '
        f'{out_dir / "tables.md"}\nplots:   ' +
        ', '.join(str(p) for p in plots))
  return 0


if __name__ == '__main__':
  common.exit_with_main(main)
