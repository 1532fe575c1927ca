"""soap_optax inside the tools people already use: Flax NNX, optax wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import soap_optax


class _MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def _data():
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 8))
  y = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
  return x, y


def test_nnx_optimizer_trains_and_matches_plain_optax():
  x, y = _data()
  tx = soap_optax.soap(1e-2, precondition_frequency=2)
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  graphdef, params = nnx.split(_MLP(nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(params)
  state = tx.init(params)

  @jax.jit
  def optax_step(params, state):
    def loss_fn(p):
      model = nnx.merge(graphdef, nnx.State(p))
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  nnx_losses, optax_losses = [], []
  for _ in range(8):
    nnx_losses.append(float(nnx_step(model, optimizer)))
    params, state, loss = optax_step(params, state)
    optax_losses.append(float(loss))
  np.testing.assert_allclose(nnx_losses, optax_losses, rtol=1e-5)
  assert nnx_losses[1] == nnx_losses[0]  # the first call moves nothing.
  assert nnx_losses[-1] < 0.9 * nnx_losses[0]


STRUCTURAL = ('precondition_frequency', 'max_precond_dim', 'bucket_padding')


@pytest.mark.parametrize('static_args, jit_init', [
    (STRUCTURAL, True),   # the optax convention for integer hyperparameters.
    ((), False),          # plain inject_hyperparams, eager init.
])
def test_inject_hyperparams_changes_floats_without_recompiling(
    x64, static_args, jit_init):
  """Injected and plain soap agree to float64 precision, one compilation."""
  del x64
  params = {'w': jnp.ones((6, 6), jnp.float64),
            'b': jnp.ones((6,), jnp.float64)}
  # Square weights and fresh full-rank gradients at every step. (A rank-deficient factor has no
  # unique eigenbasis, and a repeated gradient is diagonal in its own basis up
  # to round-off: two different programs could then disagree.)
  grads_at = lambda step: jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(step), p.shape), params)
  # Learning rates exact in float32 at every step, (64 - 7k) / 2**13: the
  # schedule runs in float32 (an int32 count), and how XLA rounds 1e-2 - 9e-4 k
  # (a multiply-add fused or not) would otherwise decide the last float32 bit.
  schedule = optax.linear_schedule(2.0**-7, 2.0**-10, 8)
  opt = optax.inject_hyperparams(soap_optax.soap, static_args=static_args)(
      learning_rate=schedule, b1=0.9, precondition_frequency=2)
  state = (jax.jit(opt.init) if jit_init else opt.init)(params)
  if static_args:
    assert not set(STRUCTURAL) & set(state.hyperparams)
  reference = soap_optax.soap(schedule, b1=0.9, precondition_frequency=2)
  ref_state = reference.init(params)
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(1)
    return opt.update(grads, state, params)

  for step in range(6):
    if step == 3:  # change float hyperparameters between steps.
      for name, value in dict(b1=0.8, b2=0.9, eps=1e-6,
                              weight_decay=0.1).items():
        old = state.hyperparams[name]
        state.hyperparams[name] = jnp.asarray(value, old.dtype)
      reference = soap_optax.soap(schedule, b1=0.8, b2=0.9, eps=1e-6,
                                  weight_decay=0.1, precondition_frequency=2)
    grads = grads_at(step)
    updates, state = update(grads, state, params)
    ref_updates, ref_state = jax.jit(reference.update)(
        grads, ref_state, params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10)
  assert len(traces) == 1


def test_inject_hyperparams_with_traced_max_precond_dim_says_what_to_do():
  opt = optax.inject_hyperparams(soap_optax.soap)(learning_rate=1e-3)
  with pytest.raises(ValueError, match='static_args'):
    jax.jit(opt.init)({'w': jnp.ones((4, 6))})


def test_orbax_round_trip_continues_identically(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.ones((4, 6)), 'b': jnp.ones((6,))}
  opt = soap_optax.soap(1e-2, precondition_frequency=2)
  state = opt.init(params)
  update = jax.jit(opt.update)
  grads = lambda k: jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(k), p.shape), params)
  for k in range(3):
    _, state = update(grads(k), state, params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
      tmp_path / 'state', jax.eval_shape(opt.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for k in range(3, 6):
    expected, state = update(grads(k), state, params)
    got, restored = update(grads(k), restored, params)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _random_grads(params, seed):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape), params)


def test_multisteps_accumulates_then_applies_soap():
  params = {'w': jnp.ones((4, 4))}
  k = 3
  accumulated = optax.MultiSteps(soap_optax.soap(1e-2), every_k_schedule=k)
  plain = soap_optax.soap(1e-2)
  acc_state, plain_state = accumulated.init(params), plain.init(params)
  for outer in range(3):
    grads = [_random_grads(params, 10 * outer + i) for i in range(k)]
    for i, g in enumerate(grads):
      updates, acc_state = accumulated.update(g, acc_state, params)
      if i < k - 1:
        np.testing.assert_array_equal(np.asarray(updates['w']), 0.0)
    mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
    expected, plain_state = plain.update(mean, plain_state, params)
    np.testing.assert_allclose(np.asarray(updates['w']),
                               np.asarray(expected['w']), rtol=1e-5, atol=1e-7)


def test_partition_soap_for_matrices_adamw_for_the_rest(x64):
  # In float64: the routed leaf's update equals SOAP's alone to rounding,
  # whatever XLA fuses differently in the two programs.
  del x64
  params = {'embed': jnp.ones((50, 8)), 'dense': jnp.ones((8, 8)),
            'bias': jnp.ones((8,))}
  labels = {'embed': 'adamw', 'dense': 'soap', 'bias': 'adamw'}
  opt = optax.partition(
      {'soap': soap_optax.soap(1e-2), 'adamw': optax.adamw(1e-3)}, labels)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for i in range(3):
    updates, state = update(_random_grads(params, i), state, params)
  soap_only = soap_optax.soap(1e-2)
  s = soap_only.init({'dense': params['dense']})
  for i in range(3):
    expected, s = jax.jit(soap_only.update)(
        {'dense': _random_grads(params, i)['dense']}, s,
        {'dense': params['dense']})
  assert updates['dense'].dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(updates['dense']),
                             np.asarray(expected['dense']), rtol=1e-12)


def test_masked_soap_leaves_other_parameters_alone():
  params = {'w': jnp.ones((4, 4)), 'b': jnp.ones((4,))}
  opt = optax.masked(soap_optax.soap(1e-2), {'w': True, 'b': False})
  state = opt.init(params)
  grads = _random_grads(params, 0)
  for _ in range(2):
    updates, state = opt.update(grads, state, params)
  np.testing.assert_array_equal(np.asarray(updates['b']),
                                np.asarray(grads['b']))
  assert float(jnp.max(jnp.abs(updates['w']))) > 0


def test_apply_if_finite_skips_nan_gradients_without_touching_state():
  params = {'w': jnp.ones((4, 4))}
  opt = optax.apply_if_finite(soap_optax.soap(1e-2), max_consecutive_errors=5)
  state = opt.init(params)
  for i in range(2):
    _, state = opt.update(_random_grads(params, i), state, params)
  before = state.inner_state
  bad = {'w': jnp.full((4, 4), jnp.nan)}
  updates, state = opt.update(bad, state, params)
  np.testing.assert_array_equal(np.asarray(updates['w']), 0.0)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.notfinite_count) == 1


def test_linen_train_state_trains_with_soap():
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  model = nn.Dense(4)
  x, y = _data()
  variables = model.init(jax.random.PRNGKey(0), x)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      tx=soap_optax.soap(3e-2, precondition_frequency=2))

  @jax.jit
  def step(state):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2))(
            state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(10):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0]


def test_inject_hyperparams_with_traced_bucket_padding_says_what_to_do():
  opt = optax.inject_hyperparams(soap_optax.soap, static_args=(
      'precondition_frequency', 'max_precond_dim'))(learning_rate=1e-3)
  with pytest.raises(ValueError, match='bucket_padding'):
    jax.jit(opt.init)({'w': jnp.ones((4, 6))})


def test_map_params_maps_optax_trees_and_hands_ours_over_whole():
  """optax.tree.map_params on the shampoo alias: the trees optax's own links
  keep (the momentum, the Adam graft's second moment) are mapped like the
  parameters; the eigenbasis transform's state, which holds no
  parameter-shaped tree, reaches transform_non_params once, whole."""
  params = {'w': jnp.ones((3, 4)), 'b': jnp.ones((4,))}
  tx = soap_optax.shampoo(1e-3)
  state = tx.init(params)
  handed = []

  def non_params(value):
    handed.append(value)
    return value

  mapped = optax.tree.map_params(tx, lambda p: p + 1.0, state,
                                 transform_non_params=non_params)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  graft, momentum = mapped[0].magnitude.nu, mapped[1].ema
  for tree in (graft, momentum):
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    assert all(np.all(np.asarray(x) == 1.0) for x in jax.tree.leaves(tree))
  eigenbasis_states = [h for h in handed if hasattr(h, 'eigenbasis')]
  assert len(eigenbasis_states) == 1
  assert eigenbasis_states[0] is state[0].direction
