"""The byte-level language model of the main job and of the experiments.

A decoder-only transformer written with ``flax.nnx`` (``ByteTransformer``)
predicts the next byte of a text corpus; its sizes and every setting that
determines a run's losses are a ``Config`` (``lm_config.py``, with the
corpus loading). This module builds the rest of a run: the
optimizers by name (``make_optimizer``, with the learning-rate schedule and
the routing of parameters between an eigenbasis optimizer or Muon and
AdamW), random batches of the corpus, the loss, the jitted training step and
the evaluation.

It imports JAX: import it after choosing the device.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import common
import optimizers
import soap_optax

from lm_config import Config

VOCABULARY = 256  # bytes.


# ------------------------------------------------------------------------------
# Model.


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP."""

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
  """Decoder-only transformer over bytes (vocabulary 256), of the sizes of
  ``config`` (d_model, num_layers, num_heads, seq_len)."""

  def __init__(self, config: Config, rngs: nnx.Rngs):
    d = config.d_model
    self.embed = nnx.Embed(VOCABULARY, d, rngs=rngs)
    self.position = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (config.seq_len, d)))
    self.blocks = nnx.List([Block(d, config.num_heads, rngs)
                            for _ in range(config.num_layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, VOCABULARY, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


def parameter_count(config: Config) -> int:
  """Every parameter of the ByteTransformer of ``config``'s sizes (counted on
  its shapes: nothing is allocated)."""
  model = nnx.eval_shape(lambda: ByteTransformer(config, nnx.Rngs(0)))
  return common.parameter_count(nnx.state(model, nnx.Param))


# ------------------------------------------------------------------------------
# Optimizers.


def learning_rate_schedule(config: Config, peak: float):
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


def adamw(config: Config, learning_rate: float):
  return optax.adamw(learning_rate_schedule(config, learning_rate), b1=0.9,
                     b2=0.95, weight_decay=config.weight_decay)


def soap_labels(config: Config, params):
  """'eigenbasis' or 'adamw' per parameter (Config.soap_params)."""
  def label(path, leaf):
    names = _names(path)
    # Vectors: biases (the attention's are (heads, head_dim)) and norm
    # scales.
    vector = leaf.ndim < 2 or 'bias' in names or 'scale' in names
    if config.soap_params == 'all' or not vector and (
        config.soap_params == 'matrices' or names[0] == 'blocks'):
      return 'eigenbasis'
    return 'adamw'
  return jax.tree_util.tree_map_with_path(label, params)


def _names(path):
  """A parameter's key path as names ('blocks', 0, 'attention', ...)."""
  return [getattr(k, 'key', getattr(k, 'name', None)) for k in path]


def _is_blocks_kernel(path):
  """Whether the parameter at ``path`` is a transformer block's kernel."""
  names = _names(path)
  return names[0] == 'blocks' and 'kernel' in names


def muon_dimension_numbers(params):
  """Muon as its users route it: the blocks' matrices only, the 3-D
  attention kernels as matrices (query/key/value ``(d, heads, head_dim)``
  reduce over ``d``; the output ``(heads, head_dim, d)`` over its first
  two axes); ``None`` (Adam) for the embedding, the position table, the
  head and the vectors."""
  muon = optax.contrib.MuonDimensionNumbers
  def spec(path, leaf):
    if not _is_blocks_kernel(path):
      return None
    names = _names(path)
    if jnp.ndim(leaf) == 2:
      return muon()
    if 'out' in names:
      return muon(reduction_axis=(0, 1), output_axis=2)
    return muon(reduction_axis=0, output_axis=(1, 2))
  # One spec per parameter, in place of its nnx.Variable (a prefix of the
  # parameters' tree).
  return jax.tree_util.tree_map_with_path(
      spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def muon_matrices(params):
  """True for the leaves muon_dimension_numbers gives to Muon (the blocks'
  kernels), False for the rest: what Hyperball wraps in 'muon_hyperball'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _is_blocks_kernel(path), params)


def matrix_dimension_numbers(params):
  """muon_dimension_numbers as soap_optax.EigenbasisDimensionNumbers: the
  attention kernels read as the matrices Muon sees (one Kronecker factor per
  side, one Hyperball sphere each), None for the rest."""
  def convert(spec):
    return None if spec is None else soap_optax.EigenbasisDimensionNumbers(
        reduction_axes=spec.reduction_axis, output_axes=spec.output_axis)
  return jax.tree.map(
      convert, muon_dimension_numbers(params),
      is_leaf=lambda x: x is None or isinstance(
          x, optax.contrib.MuonDimensionNumbers))


# The eigenbasis optimizers that read the attention kernels as matrices
# (matrix_dimension_numbers), as the leaders route them: Hyperball needs a
# matrix to keep on a sphere, and SOAP-Muon one to orthogonalize.
MATRIX_VIEW = ('soap_h', 'kl_soap_h', 'soap_muon')


def make_optimizer(config: Config, name: str, learning_rate: float):
  """The optimizer ``name`` (one of optimizers.OPTIMIZERS) at peak rate
  ``learning_rate``, with ``config``'s schedule and settings.

  optax's Muon: Newton-Schulz-orthogonalized momentum on matrices, Adam on
  the rest, the same decoupled weight decay. 'muon' is routed as Muon's users
  route it (muon_dimension_numbers), its Adam part at config.adam_lr;
  'muon_all_matrices' is optax's default routing (every 2-D leaf, the
  embedding and head included; the 3-D attention kernels to Adam) with the
  Adam part at config.adam_lr; 'muon_shared_lr' is optax's default routing
  and one rate for both. The eigenbasis optimizers (optimizers.EIGENBASIS)
  take config.soap_b2 as their second-moment decay and config.one_sided,
  and get AdamW at config.adam_lr on the parameters config.soap_params
  leaves out; those of MATRIX_VIEW read the attention kernels as matrices.
  'muon_hyperball' is 'muon' in soap_optax.hyperball (its matrices on their
  initial-norm spheres, moved by learning_rate times the radius each step;
  no weight decay on them), its Adam part as in 'muon'.
  """
  if name not in optimizers.OPTIMIZERS:
    raise ValueError(f'unknown optimizer {name!r}; choose from '
                     f'{optimizers.OPTIMIZERS}')
  wd = config.weight_decay
  lr = learning_rate_schedule(config, learning_rate)
  adam_part = learning_rate_schedule(config, config.adam_lr)
  if name == optimizers.ADAMW:
    return adamw(config, learning_rate)
  if name == 'muon':
    return optax.contrib.muon(
        lr, weight_decay=wd, adam_weight_decay=wd,
        adam_learning_rate=adam_part,
        muon_weight_dimension_numbers=muon_dimension_numbers)
  if name == 'muon_hyperball':
    inner = optax.contrib.muon(
        lr, weight_decay=0.0, adam_weight_decay=wd,
        adam_learning_rate=adam_part,
        muon_weight_dimension_numbers=muon_dimension_numbers)
    return soap_optax.hyperball(inner, lr, mask=muon_matrices,
                                dimension_numbers=matrix_dimension_numbers)
  if name == 'muon_all_matrices':
    return optax.contrib.muon(lr, weight_decay=wd, adam_weight_decay=wd,
                              adam_learning_rate=adam_part)
  if name == 'muon_shared_lr':
    return optax.contrib.muon(lr, weight_decay=wd, adam_weight_decay=wd)
  options = dict(precondition_frequency=config.precondition_frequency)
  if optimizers.takes_option(name, 'weight_decay'):  # Not the Hyperball's.
    options['weight_decay'] = wd
  if name in MATRIX_VIEW:
    options['dimension_numbers'] = matrix_dimension_numbers
  tx = optimizers.make_eigenbasis_optimizer(
      name, lr, second_moment_decay=config.soap_b2,
      one_sided=config.one_sided, **options)
  if config.soap_params != 'all':
    tx = optax.partition(
        {'eigenbasis': tx, 'adamw': adamw(config, config.adam_lr)},
        functools.partial(soap_labels, config))
  return tx


# ------------------------------------------------------------------------------
# Data, loss and steps.


def sample_batch(tokens, key, batch_size: int, seq_len: int):
  """``batch_size`` random windows of ``seq_len + 1`` bytes (device array)."""
  starts = jax.random.randint(key, (batch_size,), 0, len(tokens) - seq_len - 1)
  index = starts[:, None] + jnp.arange(seq_len + 1)[None, :]
  return jnp.asarray(tokens)[index].astype(jnp.int32)


def sample_batches(tokens, key, count: int, batch_size: int, seq_len: int):
  """``count`` batches stacked on a leading axis, from ``count`` keys split
  from ``key`` (the evaluation sets)."""
  return jax.vmap(lambda k: sample_batch(tokens, k, batch_size, seq_len))(
      jax.random.split(key, count))


def loss_fn(model, batch):
  """Mean next-byte cross-entropy (nats per byte) of ``batch``'s windows."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]).mean()


def optimizer_state(optimizer: nnx.Optimizer):
  """The optax state inside an ``nnx.Optimizer``, its variables unboxed."""
  return jax.tree.map(
      lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
      optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@nnx.jit
def train_step(model, optimizer, batch):
  """One step in place; returns the batch loss and soap_optax.diagnostics of
  the optimizer's state (empty for optimizers without an eigenbasis)."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss, soap_optax.diagnostics(optimizer_state(optimizer))


@nnx.jit
def eval_loss(model, batches):
  """Mean loss over a stack of batches."""
  return jnp.mean(jax.vmap(lambda b: loss_fn(model, b))(batches))
