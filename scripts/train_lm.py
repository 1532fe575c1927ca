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

Examples::

  python scripts/train_lm.py                       # soap, adamw, muon
  python scripts/train_lm.py --precondition-frequency adaptive
  python scripts/train_lm.py --soap-params matrices --schedule cosine
  python scripts/train_lm.py --optimizers soap,adamw,shampoo,factorized_soap
  python scripts/train_lm.py --checkpoint-every 100 --out runs/a
  python scripts/train_lm.py --resume runs/a       # continue an interrupted run
"""

import argparse
import dataclasses
import datetime
import glob
import json
import os
import pathlib
import sys
import sysconfig
import time
from typing import Any, Callable

OPTIMIZERS = ('soap', 'adamw', 'muon', 'muon_all_matrices', 'muon_shared_lr',
              'shampoo', 'factorized_soap', 'kl_shampoo', 'kl_soap',
              # For the numerics comparisons (BENCHMARKS.md section 7):
              'soap_no_floor', 'shampoo_ungrafted')

# Learning rates used when none is given: 3e-3, SOAP's default, for every
# optimizer but Muon; for adamw, soap and muon_shared_lr it is also the best
# of the grid {1e-3, 3e-3, 1e-2, 3e-2} on the default model, and 3e-2 is
# muon's best of {3e-3, 1e-2, 3e-2, 1e-1} (README). --lr-grid sweeps a grid
# instead.
DEFAULT_LEARNING_RATES = {
    'adamw': 3e-3,
    'muon': 1e-2,
    'muon_all_matrices': 3e-2,
    'muon_shared_lr': 3e-3,
    'kl_shampoo': 3e-3,
    'kl_soap': 3e-3,
    'soap': 3e-3,
    'shampoo': 3e-3,
    'factorized_soap': 3e-3,
    'soap_no_floor': 3e-3,
    'shampoo_ungrafted': 3e-3,
}


# The rate of the Adam part of 'muon', and of the AdamW part of the
# eigenbasis optimizers under --soap-params matrices/hidden: the best of
# {3e-3, 1e-2} for muon and kl_shampoo, level for soap and kl_soap
# (`python scripts/experiments.py --parts kl_vs_muon`), a rung above AdamW's
# own best rate.
ADAM_PART_LEARNING_RATE = 1e-2

SCHEDULES = ('constant', 'cosine')
# Which parameters the eigenbasis optimizers (soap, factorized_soap, shampoo)
# handle; the others go to AdamW (optax.partition):
#   all      -- every parameter (vectors get the transforms' unrotated Adam);
#   matrices -- every weight matrix (or 3-D attention kernel), the vectors
#               (biases, norm scales) to AdamW;
#   hidden   -- the matrices of the transformer blocks only; the embedding,
#               the position table, the output head and the vectors to AdamW.
SOAP_PARAMS = ('all', 'matrices', 'hidden')
# The main job's defaults for the eigenbasis optimizers: the best SOAP
# configuration of `python scripts/experiments.py --parts soap_vs_muon` on
# this model (README "Choosing and tuning"): a refresh every 2 steps,
# b2 = shampoo_beta = 0.9, SOAP on the blocks' matrices and AdamW on the
# rest, constant rate 3e-3. (Config's own defaults are the library's.)
TUNED_SOAP = dict(precondition_frequency=2, soap_b2=0.9, soap_params='hidden')
EIGENBASIS_OPTIMIZERS = ('soap', 'factorized_soap', 'shampoo', 'soap_no_floor',
                         'shampoo_ungrafted', 'kl_shampoo', 'kl_soap')


class UsageError(Exception):
  """Bad input: reported as one line on stderr, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines the losses of a run (resume checks it)."""

  optimizers: tuple[str, ...]
  learning_rates: tuple[float, ...]
  steps: int
  batch_size: int
  seq_len: int
  d_model: int
  num_layers: int
  num_heads: int
  eval_every: int
  eval_batches: int
  weight_decay: float
  precondition_frequency: int | str
  seed: int
  corpus: str
  # Learning-rate schedule of every optimizer: 'constant' (after a linear
  # warmup of warmup_steps from 0) or 'cosine' (the same warmup, then a
  # cosine decay to a tenth of the peak at the last step).
  schedule: str = 'constant'
  warmup_steps: int = 0
  # Decay of the second moment and of the Kronecker factors of the
  # eigenbasis optimizers (soap's b2 = shampoo_beta; shampoo's shampoo_beta).
  soap_b2: float = 0.95
  soap_params: str = 'all'
  one_sided: bool = False
  # The rate of Muon's Adam part and of the eigenbasis optimizers' AdamW part
  # (soap_params 'matrices'/'hidden').
  adam_lr: float = ADAM_PART_LEARNING_RATE


# ------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--optimizers', default='soap,adamw,muon',
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
    learning_rates[name] = _positive_float('--lr', value)
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


def default_warmup_steps(schedule: str, steps: int) -> int:
  """--warmup-steps when not given: 10% of the steps for 'cosine', none for
  'constant'."""
  return steps // 10 if schedule == 'cosine' else 0


def _positive_float(flag: str, text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise UsageError(f'{flag}: {text!r} is not a number') from None
  if not value > 0:
    raise UsageError(f'{flag}: learning rates must be > 0, got {text}')
  return value


# ------------------------------------------------------------------------------
# Data.


def load_corpus(text_file: str | None) -> bytes:
  """The training bytes: ``text_file``, or the standard library's sources."""
  if text_file is None:
    stdlib = sysconfig.get_paths()['stdlib']
    files = sorted(glob.glob(os.path.join(stdlib, '*.py')))
    data = b''.join(pathlib.Path(f).read_bytes() for f in files)
    if not data:
      raise UsageError(f'no Python sources found under {stdlib}; '
                       'use --text-file')
    return data
  path = pathlib.Path(text_file)
  if not path.exists():
    raise UsageError(f'--text-file: {text_file} does not exist')
  if not path.is_file():
    raise UsageError(f'--text-file: {text_file} is not a file')
  try:
    data = path.read_bytes()
  except OSError as e:
    raise UsageError(f'--text-file: cannot read {text_file}: '
                     f'{e.strerror}') from None
  if not data:
    raise UsageError(f'--text-file: {text_file} is empty')
  return data


def split_corpus(data: bytes, seq_len: int):
  """90% / 10% train / validation split, as uint8 arrays."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens = np.frombuffer(data, dtype=np.uint8)
  split = int(0.9 * len(tokens))
  train, valid = tokens[:split], tokens[split:]
  if min(len(train), len(valid)) <= seq_len + 1:
    raise UsageError(
        f'the corpus ({len(tokens)} bytes) is too small for --seq-len '
        f'{seq_len}: each split needs more than {seq_len + 1} bytes')
  return train, valid


# ------------------------------------------------------------------------------
# Model, optimizers, training.


def build(config: Config):
  """Imports JAX lazily (argument errors stay fast) and defines the model."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import soap_optax  # pylint: disable=g-import-not-at-top

  class Block(nnx.Module):

    def __init__(self, d, heads, rngs):
      self.norm1 = nnx.LayerNorm(d, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(
          num_heads=heads, in_features=d, decode=False, rngs=rngs)
      self.norm2 = nnx.LayerNorm(d, rngs=rngs)
      self.up = nnx.Linear(d, 4 * d, rngs=rngs)
      self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, mask):
      x = x + self.attention(self.norm1(x), mask=mask)
      return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

  class ByteTransformer(nnx.Module):
    """Decoder-only transformer over bytes (vocabulary 256)."""

    def __init__(self, rngs):
      d = config.d_model
      self.embed = nnx.Embed(256, d, rngs=rngs)
      self.position = nnx.Param(
          0.02 * jax.random.normal(rngs.params(), (config.seq_len, d)))
      self.blocks = nnx.List([Block(d, config.num_heads, rngs)
                              for _ in range(config.num_layers)])
      self.norm = nnx.LayerNorm(d, rngs=rngs)
      self.head = nnx.Linear(d, 256, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + self.position[: tokens.shape[1]]
      mask = nnx.make_causal_mask(tokens)
      for block in self.blocks:
        x = block(x, mask)
      return self.head(self.norm(x))

  def schedule(peak: float):
    """The learning rate of every optimizer (see Config.schedule)."""
    warmup = config.warmup_steps
    if config.schedule == 'cosine':
      return optax.warmup_cosine_decay_schedule(
          0.0, peak, warmup_steps=warmup, decay_steps=config.steps,
          end_value=0.1 * peak)
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, peak, warmup),
           optax.constant_schedule(peak)], [warmup])
    return peak

  def adamw(learning_rate):
    return optax.adamw(schedule(learning_rate), b1=0.9, b2=0.95,
                       weight_decay=config.weight_decay)

  def soap_labels(params):
    """'eigenbasis' or 'adamw' per parameter (Config.soap_params)."""
    def label(path, leaf):
      names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
      # Vectors: biases (the attention's are (heads, head_dim)) and norm
      # scales.
      vector = leaf.ndim < 2 or 'bias' in names or 'scale' in names
      if config.soap_params == 'all' or not vector and (
          config.soap_params == 'matrices' or names[0] == 'blocks'):
        return 'eigenbasis'
      return 'adamw'
    return jax.tree_util.tree_map_with_path(label, params)

  def muon_dimension_numbers(params):
    """Muon as its users route it: the blocks' matrices only, the 3-D
    attention kernels as matrices (query/key/value ``(d, heads, head_dim)``
    reduce over ``d``; the output ``(heads, head_dim, d)`` over its first
    two axes); ``None`` (Adam) for the embedding, the position table, the
    head and the vectors."""
    muon = optax.contrib.MuonDimensionNumbers
    def spec(path, leaf):
      names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
      if names[0] != 'blocks' or 'kernel' not in names:
        return None
      if jnp.ndim(leaf) == 2:
        return muon()
      if 'out' in names:
        return muon(reduction_axis=(0, 1), output_axis=2)
      return muon(reduction_axis=0, output_axis=(1, 2))
    # One spec per parameter, in place of its nnx.Variable (a prefix of the
    # parameters' tree).
    return jax.tree_util.tree_map_with_path(
        spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def make_optimizer(name: str, learning_rate: float):
    wd = config.weight_decay
    freq = config.precondition_frequency
    lr = schedule(learning_rate)
    b2 = config.soap_b2
    factories: dict[str, Callable[[], Any]] = {
        'adamw': lambda: adamw(learning_rate),
        # optax's Muon: Newton-Schulz-orthogonalized momentum on matrices,
        # Adam on the rest, the same decoupled weight decay. 'muon' is routed
        # as Muon's users route it (muon_dimension_numbers), its Adam part at
        # --adam-lr; 'muon_all_matrices' is optax's default routing (every
        # 2-D leaf, the embedding and head included; the 3-D attention
        # kernels to Adam) with the Adam part at --adam-lr;
        # 'muon_shared_lr' is optax's default routing and one rate for both.
        'muon': lambda: optax.contrib.muon(
            lr, weight_decay=wd, adam_weight_decay=wd,
            adam_learning_rate=schedule(config.adam_lr),
            muon_weight_dimension_numbers=muon_dimension_numbers),
        'muon_all_matrices': lambda: optax.contrib.muon(
            lr, weight_decay=wd, adam_weight_decay=wd,
            adam_learning_rate=schedule(config.adam_lr)),
        'muon_shared_lr': lambda: optax.contrib.muon(
            lr, weight_decay=wd, adam_weight_decay=wd),
        'soap': lambda: soap_optax.soap(
            lr, b2=b2, weight_decay=wd, precondition_frequency=freq,
            one_sided=config.one_sided),
        'factorized_soap': lambda: soap_optax.factorized_soap(
            lr, b2=b2, weight_decay=wd, precondition_frequency=freq,
            one_sided=config.one_sided),
        'shampoo': lambda: soap_optax.shampoo(
            lr, shampoo_beta=b2, weight_decay=wd,
            precondition_frequency=freq),
        'soap_no_floor': lambda: soap_optax.soap(
            lr, b2=b2, weight_decay=wd, precondition_frequency=freq,
            one_sided=config.one_sided, rounding_floor=False),
        'shampoo_ungrafted': lambda: soap_optax.shampoo(
            lr, shampoo_beta=b2, weight_decay=wd,
            precondition_frequency=freq, grafting='none'),
        'kl_shampoo': lambda: soap_optax.kl_shampoo(
            lr, shampoo_beta=b2, weight_decay=wd,
            precondition_frequency=freq, one_sided=config.one_sided),
        'kl_soap': lambda: soap_optax.soap(
            lr, b2=b2, weight_decay=wd, precondition_frequency=freq,
            one_sided=config.one_sided, factor_estimator='kl'),
    }
    tx = factories[name]()
    if name in EIGENBASIS_OPTIMIZERS and config.soap_params != 'all':
      tx = optax.partition(
          {'eigenbasis': tx, 'adamw': adamw(config.adam_lr)},
          soap_labels)
    return tx

  def loss_fn(model, batch):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[:, 1:]).mean()

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss, soap_optax.diagnostics(optimizer_state(optimizer))

  @nnx.jit
  def eval_loss(model, batches):
    return jnp.mean(jax.vmap(lambda b: loss_fn(model, b))(batches))

  def optimizer_state(optimizer):
    """The optax state inside an ``nnx.Optimizer``, its variables unboxed."""
    return jax.tree.map(
        lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
        optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))

  return dict(jax=jax, jnp=jnp, nnx=nnx, optax=optax,
              ByteTransformer=ByteTransformer, make_optimizer=make_optimizer,
              soap_labels=soap_labels, schedule=schedule,
              muon_dimension_numbers=muon_dimension_numbers,
              optimizer_state=optimizer_state,
              loss_fn=loss_fn, train_step=train_step, eval_loss=eval_loss)


def sample_batch(jax, tokens, key, batch_size, seq_len):
  """``batch_size`` random windows of ``seq_len + 1`` bytes (device array)."""
  starts = jax.random.randint(key, (batch_size,), 0, len(tokens) - seq_len - 1)
  index = starts[:, None] + jax.numpy.arange(seq_len + 1)[None, :]
  return jax.numpy.asarray(tokens)[index].astype(jax.numpy.int32)


def train_one(lib, config, name, learning_rate, data, out_dir, args, progress):
  """Trains one optimizer; returns its record (losses, timings)."""
  jax, nnx = lib['jax'], lib['nnx']
  train, valid = data
  train_dev, valid_dev = jax.numpy.asarray(train), jax.numpy.asarray(valid)
  data_key = jax.random.PRNGKey(config.seed + 1)
  eval_key = jax.random.PRNGKey(config.seed + 2)
  eval_batches = jax.vmap(lambda k: sample_batch(
      jax, valid_dev, k, config.batch_size, config.seq_len))(
          jax.random.split(eval_key, config.eval_batches))
  train_eval_batches = jax.vmap(lambda k: sample_batch(
      jax, train_dev, k, config.batch_size, config.seq_len))(
          jax.random.split(eval_key, config.eval_batches))

  model = lib['ByteTransformer'](nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(
      model, lib['make_optimizer'](name, learning_rate), wrt=nnx.Param)
  # staleness: per step, the largest staleness of any factor (read before
  # the next step decides on its refresh); decompositions: per step, the
  # factor decompositions done so far; diagnostics: soap_optax.diagnostics
  # at every evaluation. Empty for optimizers without an eigenbasis.
  record = dict(optimizer=name, learning_rate=learning_rate, steps=[],
                train_loss=[], valid_loss=[], wall_clock=[],
                batch_loss=[], staleness=[], decompositions=[],
                diagnostics=[], finished=False)
  start_step, elapsed_before = 0, 0.0
  checkpoint_dir = out_dir / 'checkpoints' / name
  restored = restore_checkpoint(lib, checkpoint_dir, model, optimizer)
  if restored is not None:
    start_step, record = restored
    elapsed_before = record['wall_clock'][-1] if record['wall_clock'] else 0.0

  def evaluate(step, elapsed):
    record['steps'].append(step)
    record['valid_loss'].append(float(lib['eval_loss'](model, eval_batches)))
    record['train_loss'].append(
        float(lib['eval_loss'](model, train_eval_batches)))
    record['wall_clock'].append(elapsed)

  if start_step == 0:
    evaluate(0, 0.0)
  tokens_per_step = config.batch_size * config.seq_len
  bar = progress(total=config.steps, initial=start_step, desc=name,
                 unit='step')
  clock_start = time.perf_counter()
  train_time = 0.0
  for step in range(start_step, config.steps):
    batch = sample_batch(jax, train_dev, jax.random.fold_in(data_key, step),
                         config.batch_size, config.seq_len)
    tick = time.perf_counter()
    loss, diagnostics = lib['train_step'](model, optimizer, batch)
    loss = float(loss)
    train_time += time.perf_counter() - tick
    record['batch_loss'].append(loss)
    if diagnostics:
      diagnostics = {k: float(v) for k, v in diagnostics.items()}
      record['staleness'].append(max(
          [v for k, v in diagnostics.items() if k.startswith('staleness/')],
          default=0.0))
      record['decompositions'].append(diagnostics['decompositions'])
    done = step + 1
    elapsed = elapsed_before + time.perf_counter() - clock_start
    if done % config.eval_every == 0 or done == config.steps:
      evaluate(done, elapsed)
      if diagnostics:
        record['diagnostics'].append(dict(step=done, **diagnostics))
    bar.update(1)
    bar.set_postfix(loss=f'{loss:.3f}',
                    valid=f'{record["valid_loss"][-1]:.3f}',
                    tok_s=f'{tokens_per_step * (done - start_step) / max(train_time, 1e-9):.0f}')
    if args.checkpoint_every and done % args.checkpoint_every == 0:
      save_checkpoint(lib, checkpoint_dir, done, model, optimizer, record)
    if args.stop_after and done >= args.stop_after and done < config.steps:
      bar.close()
      raise Interrupted(done)
  bar.close()
  record['finished'] = True
  record['optimizer_step_share'] = optimizer_step_share(
      lib, model, optimizer, train_dev, config)
  record['state_bytes'] = sum(
      leaf.nbytes for leaf in jax.tree.leaves(
          lib['optimizer_state'](optimizer)) if hasattr(leaf, 'nbytes'))
  record['tokens_per_second'] = tokens_per_step * (
      config.steps - start_step) / max(train_time, 1e-9)
  return record


class Interrupted(Exception):
  """Raised by --stop-after to simulate an interrupted run."""


def optimizer_step_share(lib, model, optimizer, tokens, config, repeats=10):
  """Fraction of a training step spent in the optimizer update.

  Measured after training on copies of the state: the median time of a jitted
  ``tx.update`` + ``apply_updates`` against the median time of the whole jitted
  step (forward, backward and update) on the same batch.
  """
  jax, nnx, optax = lib['jax'], lib['nnx'], lib['optax']
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer.tx
  batch = sample_batch(jax, jax.numpy.asarray(tokens), jax.random.PRNGKey(9),
                       config.batch_size, config.seq_len)
  # The same pure structures nnx.Optimizer.update hands to tx.update.
  pure_params = nnx.as_pure(params)
  pure_state = nnx.as_pure(optimizer.opt_state)

  def loss_of(p):
    return lib['loss_fn'](nnx.merge(graphdef, p, rest), batch)

  grads = jax.grad(loss_of)(pure_params)

  @jax.jit
  def update_only(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  @jax.jit
  def full_step(p, s):
    g = jax.grad(loss_of)(p)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  def median_time(fn, *a):
    jax.block_until_ready(fn(*a))
    times = []
    for _ in range(repeats):
      tick = time.perf_counter()
      jax.block_until_ready(fn(*a))
      times.append(time.perf_counter() - tick)
    return sorted(times)[len(times) // 2]

  update_time = median_time(update_only, pure_params, pure_state, grads)
  step_time = median_time(full_step, pure_params, pure_state)
  return update_time / step_time


# ------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(lib, directory, step, model, optimizer, record):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  nnx = lib['nnx']
  directory.mkdir(parents=True, exist_ok=True)
  path = (directory / f'step_{step:08d}').absolute()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {'model': nnx.state(model),
                           'optimizer': nnx.state(optimizer)}, force=True)
  checkpointer.wait_until_finished()
  (directory / f'step_{step:08d}.json').write_text(
      json.dumps(dict(step=step, record=record)))


def restore_checkpoint(lib, directory, model, optimizer):
  """Restores the latest checkpoint in ``directory`` in place, if any."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  nnx = lib['nnx']
  if not directory.is_dir():
    return None
  steps = sorted(p for p in directory.glob('step_*.json'))
  if not steps:
    return None
  meta = json.loads(steps[-1].read_text())
  target = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer)}
  restored = ocp.StandardCheckpointer().restore(
      (directory / steps[-1].stem).absolute(), target)
  nnx.update(model, restored['model'])
  nnx.update(optimizer, restored['optimizer'])
  return meta['step'], meta['record']


# ------------------------------------------------------------------------------
# Report.


def steps_to_reach(record, target):
  for step, loss in zip(record['steps'], record['valid_loss']):
    if loss <= target:
      return step
  return None


def report(config, records, out_dir, total_seconds):
  """Writes results.json and losses.png; returns the table as text."""
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
        steps_to_adamw_final=(steps_to_reach(r, target)
                              if target is not None else None),
        wall_clock_s=r['wall_clock'][-1],
        optimizer_step_share=r.get('optimizer_step_share'),
        tokens_per_second=r.get('tokens_per_second'),
        decompositions=(r['decompositions'][-1] if r.get('decompositions')
                        else None),
    ))
  header = ('optimizer', 'lr', 'valid loss', 'train loss',
            'steps to AdamW final', 'wall-clock s', 'opt-step share',
            'decompositions')
  lines = [' | '.join(header), ' | '.join('---' for _ in header)]
  for row in rows:
    share = row['optimizer_step_share']
    lines.append(' | '.join([
        row['optimizer'], f'{row["learning_rate"]:g}',
        f'{row["final_valid_loss"]:.4f}', f'{row["final_train_loss"]:.4f}',
        str(row['steps_to_adamw_final']) if target is not None else 'n/a',
        f'{row["wall_clock_s"]:.1f}',
        f'{share:.0%}' if share is not None else 'n/a',
        '–' if row['decompositions'] is None
        else f'{row["decompositions"]:.0f}']))
  settings = (f'schedule {config.schedule} (warmup {config.warmup_steps}); '
              'eigenbasis optimizers: precondition_frequency '
              f'{config.precondition_frequency}, b2 {config.soap_b2:g}, '
              f'parameters: {config.soap_params}'
              + (', one-sided' if config.one_sided else ''))
  table = settings + '\n\n' + '\n'.join(lines)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
  for name in config.optimizers:
    r = records[name]
    label = f'{name} (lr={r["learning_rate"]:g})'
    by_step.plot(r['steps'], r['valid_loss'], label=label)
    by_time.plot(r['wall_clock'], r['valid_loss'], label=label)
  by_step.set_xlabel('step')
  by_time.set_xlabel('wall-clock (s)')
  for ax in (by_step, by_time):
    ax.set_ylabel('validation loss (nats/byte)')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f'byte-level LM, {config.num_layers} layers, d={config.d_model}'
               f', batch {config.batch_size}x{config.seq_len}')
  fig.tight_layout()
  plot_path = out_dir / 'losses.png'
  fig.savefig(plot_path, dpi=110)
  plt.close(fig)
  plot_diagnostics(plt, config, records, out_dir / 'diagnostics.png')

  import jax  # pylint: disable=g-import-not-at-top
  results = dict(config=dataclasses.asdict(config), table=rows,
                 records=records, total_seconds=total_seconds,
                 machine=dict(platform=sys.platform,
                              devices=[str(d) for d in jax.devices()],
                              jax=jax.__version__, python=sys.version.split()[0],
                              cpu_count=os.cpu_count()))
  json_path = out_dir / 'results.json'
  json_path.write_text(json.dumps(results, indent=1))
  return table, plot_path, json_path


def plot_diagnostics(plt, config, records, path):
  """Staleness over training and the steps with refreshes, one panel per
  eigenbasis optimizer (none: no file)."""
  names = [n for n in config.optimizers if records[n].get('staleness')]
  if not names:
    return None
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
    ax.set_title(f'{name} (precondition_frequency='
                 f'{config.precondition_frequency}): '
                 f'{r["decompositions"][-1]:.0f} decompositions',
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='upper right')
  axes[-1, 0].set_xlabel('step')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ------------------------------------------------------------------------------
# Main.


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

  if args.no_progress:
    progress = _SilentBar
  else:
    from tqdm import tqdm as progress  # pylint: disable=g-import-not-at-top
  lib = build(config)
  print(f'corpus: {config.corpus} ({len(data[0]) + len(data[1])} bytes), '
        f'devices: {lib["jax"].devices()}', flush=True)

  grid = [_positive_float('--lr-grid', x) for x in args.lr_grid.split(',')
          if x.strip()]
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
        record = train_one(lib, config, name, candidate, data, run_dir, args,
                           progress)
        if best is None or record['valid_loss'][-1] < best['valid_loss'][-1]:
          best = record
      records[name] = best
      record_path.write_text(json.dumps(best))
  except Interrupted as stop:
    print(f'stopped after step {stop.args[0]} (--stop-after); resume with '
          f'--resume {out_dir}', flush=True)
    return 0
  table, plot_path, json_path = report(
      config, records, out_dir, time.perf_counter() - started)
  print('\n' + table + '\n')
  print(f'plot:    {plot_path}\nresults: {json_path}\noutputs: {out_dir}')
  return 0


class _SilentBar:

  def __init__(self, **kwargs):
    del kwargs

  def update(self, n):
    del n

  def set_postfix(self, **kwargs):
    del kwargs

  def close(self):
    pass


if __name__ == '__main__':
  try:
    sys.exit(main(sys.argv[1:]))
  except UsageError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)
