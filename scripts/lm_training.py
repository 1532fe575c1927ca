"""One training run of the byte-level language model (``lm.py``).

``train_one`` trains one optimizer from the model's seeded initialization on
the seeded batches, evaluates it every ``eval_every`` steps on fixed
validation and training batches, logs ``soap_optax.diagnostics`` of the
eigenbasis optimizers, optionally checkpoints (and resumes from) model and
optimizer state with orbax, and returns the run's record: losses,
wall-clock, throughput, optimizer-state bytes and the share of a training
step spent in the optimizer. The main job (``train_lm.py``) and the
experiments' language-model parts use it.

It imports JAX: import it after choosing the device.
"""

import json
import pathlib
import time

import jax
import optax
import orbax.checkpoint as ocp
from flax import nnx

import common
import lm
import lm_config
import soap_optax


class Interrupted(Exception):
  """Raised by ``stop_after`` to simulate an interrupted run."""


def train_one(config: lm_config.Config, name: str, learning_rate: float,
              data, out_dir: pathlib.Path, *, checkpoint_every: int = 0,
              stop_after: int = 0, progress=common.SilentProgressBar,
              tx: optax.GradientTransformation | None = None) -> dict:
  """Trains one optimizer; returns its record (losses, timings).

  ``data``: the (train, validation) token arrays. ``tx``: the optimizer,
  by default ``lm.make_optimizer(config, name, learning_rate)``; ``name``
  labels the record and its checkpoints under ``out_dir/checkpoints``.
  ``progress``: a tqdm-like class. ``stop_after``: raise Interrupted after
  that step (checkpoints kept).
  """
  if tx is None:
    tx = lm.make_optimizer(config, name, learning_rate)
  train, valid = data
  train_dev, valid_dev = jax.numpy.asarray(train), jax.numpy.asarray(valid)
  data_key = jax.random.PRNGKey(config.seed + 1)
  eval_key = jax.random.PRNGKey(config.seed + 2)
  eval_batches = lm.sample_batches(valid_dev, eval_key, config.eval_batches,
                                   config.batch_size, config.seq_len)
  train_eval_batches = lm.sample_batches(
      train_dev, eval_key, config.eval_batches, config.batch_size,
      config.seq_len)

  model = lm.ByteTransformer(config, nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
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
  restored = restore_checkpoint(checkpoint_dir, model, optimizer)
  if restored is not None:
    start_step, record = restored
    elapsed_before = record['wall_clock'][-1] if record['wall_clock'] else 0.0

  def evaluate(step, elapsed):
    record['steps'].append(step)
    record['valid_loss'].append(float(lm.eval_loss(model, eval_batches)))
    record['train_loss'].append(
        float(lm.eval_loss(model, train_eval_batches)))
    record['wall_clock'].append(elapsed)

  if start_step == 0:
    evaluate(0, 0.0)
  tokens_per_step = config.batch_size * config.seq_len
  bar = progress(total=config.steps, initial=start_step, desc=name,
                 unit='step')
  clock_start = time.perf_counter()
  train_time = 0.0
  for step in range(start_step, config.steps):
    batch = lm.sample_batch(train_dev, jax.random.fold_in(data_key, step),
                            config.batch_size, config.seq_len)
    tick = time.perf_counter()
    loss, diagnostics = lm.train_step(model, optimizer, batch)
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
    tokens_per_second = (tokens_per_step * (done - start_step)
                         / max(train_time, 1e-9))
    bar.set_postfix(loss=f'{loss:.3f}',
                    valid=f'{record["valid_loss"][-1]:.3f}',
                    tok_s=f'{tokens_per_second:.0f}')
    if checkpoint_every and done % checkpoint_every == 0:
      save_checkpoint(checkpoint_dir, done, model, optimizer, record)
    if stop_after and done >= stop_after and done < config.steps:
      bar.close()
      raise Interrupted(done)
  bar.close()
  record['finished'] = True
  record['optimizer_step_share'] = optimizer_step_share(
      model, optimizer, train_dev, config)
  record['state_bytes'] = soap_optax.state_nbytes(
      lm.optimizer_state(optimizer))
  record['tokens_per_second'] = tokens_per_step * (
      config.steps - start_step) / max(train_time, 1e-9)
  return record


def optimizer_step_share(model, optimizer, tokens, config: lm_config.Config,
                         repeats: int = 20) -> float:
  """Fraction of a training step spent in the optimizer update.

  Measured after training, on copies of the state and one batch, as the
  training step's two parts, each a jitted function of the same style
  (pure parameters and state in, results out): the gradient (forward and
  backward) and the update (``tx.update`` + ``apply_updates``). They run in
  turns for ``repeats`` consecutive steps after a warm-up, the parameters
  and the optimizer state carried from step to step, so that the update's
  refresh calls come at the run's own rate (a state held fixed would time
  either only refresh calls or none) and a change of the machine's load
  hits both parts. The share is the update's mean over the sum of the two
  means: below 1 by construction. ``repeats`` = 20 is a whole number of
  refresh intervals for intervals 1, 2, 4, 5, 10 and 20.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer.tx
  batch = lm.sample_batch(jax.numpy.asarray(tokens), jax.random.PRNGKey(9),
                          config.batch_size, config.seq_len)
  # The same pure structures nnx.Optimizer.update hands to tx.update.
  params = nnx.as_pure(params)
  state = nnx.as_pure(optimizer.opt_state)

  @jax.jit
  def gradient(p):
    return jax.grad(lambda q: lm.loss_fn(nnx.merge(graphdef, q, rest),
                                         batch))(p)

  @jax.jit
  def update(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  def timed(fn, *args):
    tick = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - tick

  jax.block_until_ready(update(params, state, gradient(params)))  # compiles
  gradient_s = update_s = 0.0
  for _ in range(repeats):
    grads, seconds = timed(gradient, params)
    gradient_s += seconds
    (params, state), seconds = timed(update, params, state, grads)
    update_s += seconds
  return update_s / (gradient_s + update_s)


def steps_to_reach(record: dict, target: float) -> int | None:
  """The first evaluated step whose validation loss is at most ``target``
  (None: never)."""
  for step, loss in zip(record['steps'], record['valid_loss']):
    if loss <= target:
      return step
  return None


# ------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(directory: pathlib.Path, step: int, model, optimizer,
                    record: dict) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  path = (directory / f'step_{step:08d}').absolute()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {'model': nnx.state(model),
                           'optimizer': nnx.state(optimizer)}, force=True)
  checkpointer.wait_until_finished()
  (directory / f'step_{step:08d}.json').write_text(
      json.dumps(dict(step=step, record=record)))


def restore_checkpoint(directory: pathlib.Path, model, optimizer):
  """Restores the latest checkpoint in ``directory`` in place, if any;
  returns (its step, the record so far) or None."""
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
