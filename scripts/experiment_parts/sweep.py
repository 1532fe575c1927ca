"""What the experiments' language-model parts share: runs of the main job's
model (``train_lm_run``), kept as JSON and extended over a learning-rate
ladder (``LmSweep``), and the rows and cells their tables are made of.

Every run trains the main job's ByteTransformer (``scripts/lm.py``) with
``lm_training.train_one``, at the main job's default size (``LM_MAIN``) or
the tiny --quick size (``LM_QUICK``), with the main job's settings unless
an option says otherwise.
"""

import concurrent.futures
import functools
import json
import multiprocessing
import os
import pathlib

import lm_config
import lm_training
import optimizers

# Learning-rate grids of the 'muon' part; Muon's matrices take larger rates
# (its Adam part stays at AdamW's best).
MUON_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
MUON_OWN_GRID = (3e-3, 1e-2, 3e-2, 1e-1)

LM_MAIN = dict(steps=300, batch_size=32, seq_len=64, d_model=128, num_layers=2,
               num_heads=4, eval_every=10, eval_batches=8)


LM_QUICK = dict(steps=20, batch_size=8, seq_len=32, d_model=32, num_layers=1,
                num_heads=2, eval_every=10, eval_batches=2)

@functools.lru_cache(maxsize=1)
def corpus_split(seq_len: int):
  """The standard library corpus split for ``seq_len`` (the last one kept)."""
  return lm_config.split_corpus(lm_config.load_corpus(None), seq_len)


def train_lm_run(name, learning_rate, seed, sizes, out_dir,
                 precondition_frequency=10, **options):
  """One run of the main job's model on the standard library corpus;
  ``options``: other lm_config.Config fields (schedule, soap_b2, ...)."""
  config = lm_config.Config(
      optimizers=(name,), learning_rates=(learning_rate,), weight_decay=0.01,
      precondition_frequency=precondition_frequency, seed=seed,
      corpus='stdlib', **sizes, **options)
  return lm_training.train_one(config, name, learning_rate,
                               corpus_split(sizes['seq_len']), out_dir)


def schedule_name(schedule) -> str:
  return f'every {schedule}' if isinstance(schedule, int) else str(schedule)


# The learning-rate ladder every grid is cut from (half-decades).
LR_LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


# The main job's settings before this sweep (train_lm's defaults until then).
SOAP_BASE = dict(precondition_frequency=10, soap_b2=0.95, schedule='constant',
                 soap_params='all', one_sided=False)


def options_label(name, options):
  """'soap f=1 b2=0.9 hidden only one-sided warmup+cosine': the settings
  that differ from SOAP_BASE (the eigenbasis optimizers), or the schedule
  alone (AdamW, Muon)."""
  parts = [name]
  if name in optimizers.EIGENBASIS:
    if options['precondition_frequency'] != SOAP_BASE['precondition_frequency']:
      parts.append(f'f={options["precondition_frequency"]}')
    if options['soap_b2'] != SOAP_BASE['soap_b2']:
      parts.append(f'b2={options["soap_b2"]:g}')
    if options['soap_params'] != 'all':
      parts.append(f'{options["soap_params"]} only')
    if options['one_sided']:
      parts.append('one-sided')
  if options['schedule'] != 'constant':
    parts.append('warmup+cosine')
  if options.get('adam_lr', 3e-3) != 3e-3:
    parts.append(f'adam={options["adam_lr"]:g}')
  return ' '.join(parts)


class LmSweep:
  """Runs of the main job's model, each kept as JSON under ``directory`` so
  an interrupted sweep continues where it stopped. ``train``: the function
  that makes a run's record, with train_lm_run's arguments (the tests give
  a synthetic one)."""

  def __init__(self, sizes, directory: pathlib.Path, train=train_lm_run):
    self.sizes, self.directory, self.train = sizes, directory, train
    self.records = {}  # (name, lr, seed, options tuple) -> record
    directory.mkdir(parents=True, exist_ok=True)

  # Runs at a time in prefetch (experiments.py --workers).
  workers = 1

  def _normalized(self, name, lr, seed, options):
    """The run's options with SOAP_BASE's defaults, its key and its file."""
    options = {**SOAP_BASE, **options}
    options['warmup_steps'] = lm_config.default_warmup_steps(
        options['schedule'], self.sizes['steps'])
    key = (name, lr, seed, tuple(sorted(options.items())))
    label = options_label(name, options)
    path = self.directory / (
        f'{label.replace(" ", "_").replace("=", "")}_lr{lr:g}_seed{seed}'
        f'_b{self.sizes["batch_size"]}.json')
    return options, key, label, path

  def run(self, name, lr, seed=0, **options):
    options, key, label, path = self._normalized(name, lr, seed, options)
    if key in self.records:
      return self.records[key]
    if path.exists():
      record = json.loads(path.read_text())
    else:
      print(f'  {self.directory.name}: {label} lr={lr:g} seed={seed} batch '
            f'{self.sizes["batch_size"]}', flush=True)
      record = self.train(name, lr, seed, self.sizes,
                          self.directory / f'scratch-{os.getpid()}',
                          **options)
      record = {k: v for k, v in record.items() if k != 'diagnostics'}
      record.update(label=label, options=options, seed=seed)
      path.write_text(json.dumps(record))
    self.records[key] = record
    return record

  def prefetch(self, requests):
    """Makes the runs of ``requests`` ((name, lr, seed, options) each) that
    are not kept yet, ``workers`` at a time in fresh processes (in this one
    when ``workers`` is 1 or the training function is not the main job's);
    ``run`` then reads them back."""
    missing = {}
    for name, lr, seed, options in requests:
      path = self._normalized(name, lr, seed, options)[3]
      if not path.exists():
        missing[path] = (name, lr, seed, options)
    if self.workers <= 1 or self.train is not train_lm_run:
      for name, lr, seed, options in missing.values():
        self.run(name, lr, seed, **options)
      return
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(
        self.workers, mp_context=context) as pool:
      for future in [pool.submit(_run_in_worker, self.sizes, self.directory,
                                 *request) for request in missing.values()]:
        future.result()

  def grid(self, name, rates, extend=2, **options):
    """Runs ``rates``; while the best is at an edge, adds the next rung of
    LR_LADDER beyond it (at most ``extend`` times). Returns lr -> record."""
    rates = sorted(rates)
    runs = {lr: self.run(name, lr, **options) for lr in rates}
    for _ in range(extend):
      lr = next_rung(runs)
      if lr is None:
        break
      runs[lr] = self.run(name, lr, **options)
    return dict(sorted(runs.items()))


def _run_in_worker(sizes, directory, name, lr, seed, options):
  """One run of LmSweep.prefetch in a worker process (kept as its JSON)."""
  LmSweep(sizes, directory).run(name, lr, seed, **options)


def next_rung(runs):
  """The rate LmSweep.grid adds to ``runs`` (lr -> record) next: the rung
  of LR_LADDER beyond the best rate when it is at an edge (below a single
  rate), else None."""
  best = best_rate(runs)
  if best not in (min(runs), max(runs)):
    return None
  rung = LR_LADDER.index(best) + (-1 if best == min(runs) else 1)
  return LR_LADDER[rung] if 0 <= rung < len(LR_LADDER) else None


def best_rate(runs):
  """The rate of ``runs`` (lr -> record) with the lowest final loss."""
  return min(runs, key=lambda lr: runs[lr]['valid_loss'][-1])


def rungs_around(lr):
  """``lr`` and its neighbours on LR_LADDER (a grid to start from)."""
  rung = LR_LADDER.index(lr)
  return LR_LADDER[max(0, rung - 1):rung + 2]


def score(record, target):
  """Sort key: steps to the target (never: infinite), then final loss."""
  reached = lm_training.steps_to_reach(record, target)
  return (float('inf') if reached is None else reached,
          record['valid_loss'][-1])


def result_row(record, target, grid=None):
  """A table row of a sweep's run against ``target``, with its grid's final
  losses if given."""
  reached = lm_training.steps_to_reach(record, target)
  row = dict(
      label=record['label'], optimizer=record['optimizer'],
      options=record['options'], lr=record['learning_rate'],
      seed=record['seed'], final_valid_loss=record['valid_loss'][-1],
      steps_to_target=reached,
      seconds_to_target=(None if reached is None else
                         record['wall_clock'][record['steps'].index(reached)]),
      seconds=record['wall_clock'][-1],
      optimizer_step_share=record['optimizer_step_share'],
      decompositions=(record['decompositions'][-1]
                      if record['decompositions'] else None),
      curve_steps=record['steps'], curve=record['valid_loss'])
  if grid is not None:
    row['grid_final_losses'] = {f'{lr:g}': r['valid_loss'][-1]
                                for lr, r in grid.items()}
    row['interior'] = min(grid) < record['learning_rate'] < max(grid)
  return row


def steps_cell(row):
  return str(row['steps_to_target'] or 'never')


def seconds_cell(value):
  return '–' if value is None else f'{value:.0f}'


def tuned_options(name, adam_lr):
  """The main job's tuned SOAP settings for the eigenbasis optimizers (its
  refresh interval, b2 = shampoo_beta, the blocks' matrices only) and the
  Adam part's rate; AdamW alone has none."""
  if name == 'adamw':
    return {}
  if name == 'muon':
    return dict(adam_lr=adam_lr)
  return dict(lm_config.TUNED_SOAP, adam_lr=adam_lr)
