"""Section ``train_step``: a whole training step, AdamW against SOAP.

Forward + backward (gradients accumulated over micro-batches in a
``lax.scan``) + update of the main job's language model (``ByteTransformer``
of ``scripts/lm.py``, its loss ``lm.loss_fn``), with AdamW and with SOAP at
frequency 10, on the main job's data (one step's micro-batches drawn from
the standard library's sources, ``lm.sample_batches``): GPT-2-small sizes (d 768, 12
layers, 12 heads, sequence 1024; the byte vocabulary, 256) and 262,144
tokens per step on a GPU (rematerialized, bfloat16 compute), a small model on
a CPU. SOAP runs first and its first call is timed in three parts before
anything else: trace and lower, compile, and the compiled program's first
run. Then the regular and refresh steps apart, their means and the tokens
per second.

The step is functional (``nnx.split`` once; the parameters are an
``nnx.State``), so that :mod:`benchmark_sections.compile` can lower the same
step on abstract shapes: :func:`abstract_params`, :func:`init_params`,
:func:`make_train_step`.
"""

import functools
import time

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import lm
import lm_config
import optimizers
from benchmark_sections import shared

TITLE = 'Whole training step'
# SOAP's compile first (the GPU question).
OPTIMIZERS = optimizers.check_names(('soap', 'adamw'))


def compile_config(quick: bool) -> dict:
  """GPT-2-small sizes (a small model with ``quick``) with 2 x 4 sequences
  per step: the compile section's model."""
  config = (dict(d=32, layers=2, heads=2, vocab=lm.VOCABULARY, seq=32)
            if quick else dict(d=768, layers=12, heads=12,
                               vocab=lm.VOCABULARY, seq=1024))
  config.update(micro_batch=4, accumulation=2, remat=False)
  return config


def run_config(quick: bool, on_gpu: bool) -> dict:
  """The model and batch this section times."""
  if quick:
    return dict(d=32, layers=2, heads=2, vocab=lm.VOCABULARY, seq=32,
                micro_batch=4, accumulation=2, remat=False)
  if on_gpu:  # GPT-2-small sizes, 256 x 1024 = 262,144 tokens per step.
    return dict(d=768, layers=12, heads=12, vocab=lm.VOCABULARY, seq=1024,
                micro_batch=32, accumulation=8, remat=True)
  return dict(d=256, layers=4, heads=4, vocab=lm.VOCABULARY, seq=256,
              micro_batch=16, accumulation=2, remat=False)


def model_config(config) -> lm_config.Config:
  """The main job's ``Config`` with this section's model sizes (only the
  sizes are read: the optimizers are this section's own)."""
  return lm_config.Config(
      optimizers=OPTIMIZERS, learning_rates=(1e-3, 1e-3), steps=0,
      batch_size=config['micro_batch'], seq_len=config['seq'],
      d_model=config['d'], num_layers=config['layers'],
      num_heads=config['heads'], eval_every=1, eval_batches=0,
      weight_decay=0.0, precondition_frequency=shared.FREQUENCY, seed=0,
      corpus='stdlib')


def split_model(config, abstract: bool = False):
  """``(graphdef, params)`` of the ``ByteTransformer`` of ``config``'s sizes
  (its initialization of seed 0); ``abstract``: shapes only, nothing
  allocated."""
  def create():
    return lm.ByteTransformer(model_config(config), nnx.Rngs(0))
  return nnx.split(nnx.eval_shape(create) if abstract else create(),
                   nnx.Param)


def abstract_params(config):
  return split_model(config, abstract=True)[1]


def init_params(config):
  return split_model(config)[1]


def batch_shape(config) -> tuple[int, int, int]:
  """(micro-batches, sequences per micro-batch, sequence + 1 tokens)."""
  return (config['accumulation'], config['micro_batch'], config['seq'] + 1)


def abstract_batch(config):
  return jax.ShapeDtypeStruct(batch_shape(config), jnp.int32)


def corpus_batch(config):
  """One step's micro-batches (``batch_shape``) of the main job's training
  bytes."""
  train, _ = lm_config.split_corpus(lm_config.load_corpus(None),
                                    config['seq'])
  return lm.sample_batches(train, jax.random.PRNGKey(0),
                           config['accumulation'], config['micro_batch'],
                           config['seq'])


def make_loss_fn(config, graphdef):
  """``(params, tokens) -> lm.loss_fn`` of the merged model; the parameters
  cast to bfloat16 for the compute on a GPU, rematerialized when
  ``config['remat']``."""
  compute = jnp.bfloat16 if jax.default_backend() == 'gpu' else jnp.float32

  def loss_fn(params, tokens):
    params = jax.tree.map(lambda x: x.astype(compute), params)
    return lm.loss_fn(nnx.merge(graphdef, params), tokens)

  return jax.checkpoint(loss_fn) if config['remat'] else loss_fn


def accumulated_step(loss_fn, tx, params, state, batch):
  """Forward + backward (gradients accumulated over micro-batches) +
  update."""
  def accumulate(total, micro):
    loss, grads = jax.value_and_grad(loss_fn)(params, micro)
    return jax.tree.map(jnp.add, total, (loss, grads)), None
  zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros([]), params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, batch)
  grads = jax.tree.map(lambda g: g / batch.shape[0], grads)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss / batch.shape[0]


def make_train_step(config, tx):
  """``(params, state, batch) -> (params, state, mean loss)``, not jitted."""
  graphdef = split_model(config, abstract=True)[0]
  return functools.partial(accumulated_step, make_loss_fn(config, graphdef),
                           tx)


def run(steps: int, quick: bool) -> dict:
  """SOAP's then AdamW's step: the first call in three timed parts, then
  ``steps`` calls (10 with ``quick``, 30 on a CPU)."""
  on_gpu = jax.default_backend() == 'gpu'
  config = run_config(quick, on_gpu)
  tokens_per_step = config['micro_batch'] * config['accumulation'] * config['seq']
  batch = corpus_batch(config)
  # On a CPU a step of the small model takes seconds: 30 calls (3 refreshes).
  steps = shared.FREQUENCY if quick else (steps if on_gpu else
                                          3 * shared.FREQUENCY)
  rows = []
  for name in OPTIMIZERS:
    print(f'  train step: {name}', flush=True)
    tx = shared.make_optimizer(name)
    params = init_params(config)
    state = tx.init(params)
    tick = time.perf_counter()
    lowered = jax.jit(make_train_step(config, tx),
                      donate_argnums=(0, 1)).lower(params, state, batch)
    lower_s = time.perf_counter() - tick
    print(f'  trace + lower {lower_s:.1f} s', flush=True)
    tick = time.perf_counter()
    step = lowered.compile()
    compile_s = time.perf_counter() - tick
    print(f'  compile {compile_s:.1f} s', flush=True)
    tick = time.perf_counter()
    params, state, loss = jax.block_until_ready(step(params, state, batch))
    first_run_s = time.perf_counter() - tick
    print(f'  first run {first_run_s:.1f} s', flush=True)
    seconds = []
    for k in range(1, steps + 1):
      tick = time.perf_counter()
      params, state, loss = jax.block_until_ready(step(params, state, batch))
      seconds.append(time.perf_counter() - tick)
      print(f'  step {k}: {1e3 * seconds[-1]:.1f} ms', flush=True)
    summary = shared.summarize_calls(name, seconds)
    rows.append(dict(optimizer=name, **summary,
                     first_call_s=lower_s + compile_s + first_run_s,
                     lower_s=lower_s, compile_s=compile_s,
                     first_run_s=first_run_s, final_loss=float(loss),
                     tokens_per_s=tokens_per_step / summary['regular_s']))
  adamw = next(r for r in rows if r['optimizer'] == 'adamw')
  for r in rows:
    r['regular_over_adamw'] = r['regular_s'] / adamw['regular_s']
    r['mean_over_adamw'] = r['mean_s'] / adamw['mean_s']
    r['refresh_over_regular'] = (r['refresh_s'] / r['regular_s']
                                 if r['refresh_s'] else None)
  return dict(config=config, tokens_per_step=tokens_per_step,
              num_params=lm.parameter_count(model_config(config)), rows=rows)


def table(section) -> str:
  c = section['config']
  lines = [f'Model: d={c["d"]}, {c["layers"]} layers, vocab {c["vocab"]}, '
           f'sequence {c["seq"]}, {section["num_params"] / 1e6:.1f} M '
           f'parameters, {section["tokens_per_step"]:,} tokens per step '
           f'({c["accumulation"]} micro-batches of {c["micro_batch"]}).', '',
           '| optimizer | lower s | compile s | first run s | '
           'regular step ms (n) | refresh step ms (n) | '
           'mean ms at f=10 | mean / AdamW | refresh / regular | tokens/s |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in section['rows']:
    refresh = (f'{1e3 * r["refresh_s"]:.1f} ({r["refresh_n"]})'
               if r['refresh_s'] else '–')
    spike = (f'{r["refresh_over_regular"]:.2f}'
             if r['refresh_over_regular'] else '–')
    lines.append(
        f'| {r["optimizer"]} | {r["lower_s"]:.1f} | {r["compile_s"]:.1f} | '
        f'{r["first_run_s"]:.1f} | {1e3 * r["regular_s"]:.1f} ({r["regular_n"]}) '
        f'| {refresh} | {1e3 * r["mean_s"]:.1f} | {r["mean_over_adamw"]:.3f} '
        f'| {spike} | {r["tokens_per_s"]:,.0f} |')
  return '\n'.join(lines)
