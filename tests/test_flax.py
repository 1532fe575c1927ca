"""Tests of soap_optax._flax: scanned Flax models (NNX and Linen), serialization.

A scanned model keeps its L layers as one parameter with a leading "layers"
axis. With ``dimension_numbers_from_axis_names`` each layer must be optimized
exactly as if it were a separate model: the reference is one optimizer state
per layer, driven with that layer's gradients (float64).
"""

import flax
from flax import linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import soap_optax

NUM_LAYERS, WIDTH = 3, 8


def _soap(**kwargs):
  return soap_optax.soap(1e-2, precondition_frequency=2, **kwargs)


def _assert_matches_per_layer_runs(params, grads_stream, dims):
  """Stacked-with-dims updates equal one plain optimizer per layer."""
  stacked_tx, plain_tx = _soap(dimension_numbers=dims), _soap()
  stacked_state = stacked_tx.init(params)
  layer = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  layer_states = [plain_tx.init(layer(params, i)) for i in range(NUM_LAYERS)]
  stacked_update = jax.jit(stacked_tx.update)
  plain_update = jax.jit(plain_tx.update)
  for grads in grads_stream:
    got, stacked_state = stacked_update(grads, stacked_state, params)
    for i in range(NUM_LAYERS):
      want, layer_states[i] = plain_update(
          layer(grads, i), layer_states[i], layer(params, i))
      for a, b in zip(jax.tree.leaves(layer(got, i)), jax.tree.leaves(want)):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-300)
        assert float(jnp.max(jnp.abs(a - b))) / scale < 1e-12
  return stacked_state


def _assert_only_matrices_are_rotated(state):
  """Per-layer 1-D scales and biases get no factor (nothing mixes layers)."""
  stacks = {s.unit_shape: s for s in state[0].eigenbasis.plan.stacks}
  assert set(stacks) == {(WIDTH,), (WIDTH, WIDTH)}
  assert stacks[(WIDTH,)].layout.factored_axes == ()
  assert stacks[(WIDTH,)].size == 3 * NUM_LAYERS   # norm scale, bias; bias.
  assert stacks[(WIDTH, WIDTH)].size == NUM_LAYERS
  assert stacks[(WIDTH, WIDTH)].layout.factor_sizes == (WIDTH, WIDTH)


# ------------------------------------------------------------------------------
# Flax NNX: nnx.vmap-created layers, nnx.scan-ned forward pass.


class _NnxBlock(nnx.Module):

  def __init__(self, rngs):
    init = nnx.initializers
    self.norm = nnx.LayerNorm(
        WIDTH, param_dtype=jnp.float64, rngs=rngs,
        scale_init=nnx.with_partitioning(init.ones_init(), ('embed',)),
        bias_init=nnx.with_partitioning(init.zeros_init(), ('embed',)))
    self.linear = nnx.Linear(
        WIDTH, WIDTH, param_dtype=jnp.float64, rngs=rngs,
        kernel_init=nnx.with_partitioning(
            init.lecun_normal(), ('embed', 'mlp')),
        bias_init=nnx.with_partitioning(init.zeros_init(), ('mlp',)))

  def __call__(self, x):
    # The norm after the matrix: a LayerNorm output has zero mean over its
    # features, so a kernel fed by one gets a rank-deficient factor, whose
    # null-space round-off no two programs share.
    return x + self.norm(jnp.tanh(self.linear(x)))


class _NnxScanned(nnx.Module):

  def __init__(self, rngs):
    @nnx.split_rngs(splits=NUM_LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return _NnxBlock(rngs)

    self.blocks = make_blocks(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(block, x):
      return block(x)

    return run(self.blocks, x)


def _data(dtype, step):
  """A fresh minibatch per step. (With one fixed batch the second gradient
  equals the first, which is diagonal in its own eigenbasis: its rotated
  off-diagonal entries are pure round-off, which Adam normalizes to O(1).)"""
  x = jax.random.normal(jax.random.PRNGKey(step), (16, WIDTH), dtype)
  return x, jnp.sin(2.0 * x)


def test_nnx_scanned_model_trains_with_per_layer_soap(x64):
  del x64
  with nnx.use_eager_sharding(False):  # names only, no mesh needed.
    model = _NnxScanned(nnx.Rngs(0))
  dims = soap_optax.dimension_numbers_from_axis_names(
      nnx.state(model, nnx.Param))
  assert dims['blocks']['linear']['kernel'].batch_axes == (0,)
  assert dims['blocks']['norm']['scale'].batch_axes == (0,)

  optimizer = nnx.Optimizer(model, _soap(dimension_numbers=dims),
                            wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss, grads

  x_held_out, y_held_out = _data(jnp.float64, 1000)  # a batch no step saw.
  held_out_loss = lambda m: jnp.mean((m(x_held_out) - y_held_out) ** 2)
  initial_loss = float(held_out_loss(model))
  grads_stream = []
  params0 = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for step in range(12):
    _, grads = train_step(model, optimizer, *_data(jnp.float64, step))
    grads_stream.append(nnx.to_pure_dict(grads))
  assert float(held_out_loss(model)) < 0.8 * initial_loss
  # The same gradients through plain optax: one optimizer per layer agrees.
  state = _assert_matches_per_layer_runs(params0, grads_stream, dims)
  _assert_only_matrices_are_rotated(state)


# ------------------------------------------------------------------------------
# Linen: nn.scan over a block, boxed (nn.Partitioned) parameters.


class _LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    init = nn.initializers
    h = nn.Dense(
        WIDTH, param_dtype=self.param_dtype,
        kernel_init=nn.with_partitioning(
            init.lecun_normal(), ('embed', 'mlp')),
        bias_init=nn.with_partitioning(init.zeros_init(), ('mlp',)))(x)
    h = nn.LayerNorm(
        param_dtype=self.param_dtype,
        scale_init=nn.with_partitioning(init.ones_init(), ('embed',)),
        bias_init=nn.with_partitioning(init.zeros_init(), ('embed',)))(
            jnp.tanh(h))
    return x + h, None

  param_dtype: jnp.dtype = jnp.float32


class _LinenScanned(nn.Module):
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(
        _LinenBlock, variable_axes={'params': 0}, split_rngs={'params': True},
        length=NUM_LAYERS, metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = blocks(param_dtype=self.param_dtype, name='blocks')(x, None)
    return x


def _linen_setup(dtype):
  model = _LinenScanned(param_dtype=dtype)
  boxed = model.init(jax.random.PRNGKey(0), _data(dtype, 0)[0])['params']
  dims = soap_optax.dimension_numbers_from_axis_names(boxed)

  def loss_fn(p, step):
    x, y = _data(dtype, step)
    return jnp.mean((model.apply({'params': p}, x) - y) ** 2)

  return model, nn.unbox(boxed), dims, loss_fn


def test_linen_scanned_model_trains_with_per_layer_soap(x64):
  del x64
  _, params, dims, loss_fn = _linen_setup(jnp.float64)
  tx = _soap(dimension_numbers=dims)
  state = tx.init(params)
  # Jitted: one compile each instead of one per eager operation.
  grad_fn, update = jax.jit(jax.grad(loss_fn)), jax.jit(tx.update)
  grads_stream, p = [], params
  for step in range(12):
    grads = grad_fn(p, step)
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
    grads_stream.append(grads)
  held_out = 1000  # a batch no step saw.
  assert float(loss_fn(p, held_out)) < 0.8 * float(loss_fn(params, held_out))
  state = _assert_matches_per_layer_runs(params, grads_stream, dims)
  _assert_only_matrices_are_rotated(state)


def test_linen_train_state_round_trips_through_flax_serialization():
  model, params, dims, loss_fn = _linen_setup(jnp.float32)
  del model

  def create():
    return train_state.TrainState.create(
        apply_fn=None, params=params, tx=_soap(dimension_numbers=dims))

  @jax.jit
  def step(state):
    return state.apply_gradients(
        grads=jax.grad(loss_fn)(state.params, state.step))

  state = create()
  for _ in range(3):
    state = step(state)
  restored = flax.serialization.from_bytes(
      create(), flax.serialization.to_bytes(state))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for _ in range(3):  # a refresh (every 2 steps) included.
    state, restored = step(state), step(restored)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_axis_names_of_sharded_arrays_and_unnamed_leaves():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('layers',))
  spec = jax.sharding.PartitionSpec('layers', None)
  params = {
      'w': jax.ShapeDtypeStruct(
          (4, 8), jnp.float32,
          sharding=jax.sharding.NamedSharding(mesh, spec)),
      'b': jnp.zeros((8,)),
  }
  dims = soap_optax.dimension_numbers_from_axis_names(params, 'layers')
  assert dims == {'w': soap_optax.EigenbasisDimensionNumbers((0,)), 'b': None}
