"""Tests of soap_optax._grafting, and of the shampoo alias composed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import soap_optax


def _gradients(shapes, seed):
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=shape) for name, shape in shapes.items()}


def test_adam_graft_is_momentum_free_adam_in_float64(x64):
  """``scale_by_adam_graft`` equals ``optax.scale_by_adam(b1=0)`` at 1e-12
  in float64, and a NumPy transcription of ``v <- b2 v + (1 - b2) g^2``,
  ``u = g / (sqrt(v / (1 - b2^t)) + eps)``."""
  del x64
  shapes = {'w': (5, 3), 'b': (3,)}
  b2, eps = 0.99, 1e-8
  graft = soap_optax.scale_by_adam_graft(b2=b2, eps=eps)
  adam = optax.scale_by_adam(b1=0.0, b2=b2, eps=eps)
  params = {k: jnp.zeros(s, jnp.float64) for k, s in shapes.items()}
  graft_state, adam_state = graft.init(params), adam.init(params)
  v = {k: np.zeros(s) for k, s in shapes.items()}
  for t in range(1, 6):
    grads = _gradients(shapes, t)
    got, graft_state = graft.update(
        jax.tree.map(jnp.asarray, grads), graft_state)
    expected, adam_state = adam.update(
        jax.tree.map(jnp.asarray, grads), adam_state)
    for k, g in grads.items():
      v[k] = b2 * v[k] + (1 - b2) * g**2
      oracle = g / (np.sqrt(v[k] / (1 - b2**t)) + eps)
      assert got[k].dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(got[k]), oracle, rtol=1e-12)
      np.testing.assert_allclose(np.asarray(got[k]),
                                 np.asarray(expected[k]), rtol=1e-12)


def test_shampoo_alias_is_graft_momentum_and_decay_composed_by_hand(x64):
  """``shampoo(...)``: per parameter, Shampoo's direction ``P`` rescaled to
  the norm of momentum-free Adam's update ``A``, then the momentum
  ``M <- b1 M + (1 - b1) U`` and the step ``-lr (M + wd p)``, written here
  in NumPy around the library's (separately oracle-tested) Shampoo
  direction."""
  del x64
  shapes = {'w': (6, 4), 'b': (4,)}
  lr, b1, wd, graft_b2, graft_eps = 0.1, 0.9, 0.01, 0.999, 1e-8
  alias = soap_optax.shampoo(lr, b1=b1, weight_decay=wd, graft_b2=graft_b2,
                             graft_eps=graft_eps, precondition_frequency=2)
  direction = soap_optax.scale_by_shampoo_eigenbasis(
      precondition_frequency=2)
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s) for k, s in shapes.items()}
  jparams = jax.tree.map(jnp.asarray, params)
  alias_state, direction_state = alias.init(jparams), direction.init(jparams)
  v = {k: np.zeros(s) for k, s in shapes.items()}
  m = {k: np.zeros(s) for k, s in shapes.items()}
  for t in range(1, 6):
    grads = _gradients(shapes, 10 + t)
    jgrads = jax.tree.map(jnp.asarray, grads)
    got, alias_state = alias.update(jgrads, alias_state, jparams)
    p_dir, direction_state = direction.update(jgrads, direction_state)
    for k, g in grads.items():
      v[k] = graft_b2 * v[k] + (1 - graft_b2) * g**2
      adam = g / (np.sqrt(v[k] / (1 - graft_b2**t)) + graft_eps)
      p = np.asarray(p_dir[k])
      grafted = p * np.linalg.norm(adam) / np.linalg.norm(p)
      m[k] = b1 * m[k] + (1 - b1) * grafted
      expected = -lr * (m[k] + wd * params[k])
      np.testing.assert_allclose(np.asarray(got[k]), expected, rtol=1e-11,
                                 atol=1e-15)
