"""Property-based tests: random shapes, layouts, dtypes and hyperparameters.

For every drawn configuration, three jitted ``update`` calls must keep the
updates shaped and typed like the gradients and finite, keep the state's
structure, shapes and dtypes (so ``jit`` never retraces), and keep every basis
orthonormal to 1e-5 in float32.
"""

import jax
import jax.numpy as jnp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np

import soap_optax
from soap_optax import _state

LENGTHS = (1, 2, 3, 5, 9)  # 5 and 9 exceed max_precond_dim=4 when drawn.
BETAS = st.floats(0.0, 0.99)


@st.composite
def configurations(draw):
  """(transform, params, dimension_numbers-free description) triples."""
  kind = draw(st.sampled_from(
      ('rotated_adam', 'factored_rotated_adam', 'shampoo', 'adafactor')))
  shapes = {name: tuple(draw(st.lists(st.sampled_from(LENGTHS), max_size=4)))
            for name in ('a', 'b')}
  dtype = draw(st.sampled_from((jnp.float32, jnp.bfloat16)))
  batched = {name: len(s) >= 2 and draw(st.booleans())
             for name, s in shapes.items()}
  numbers = {name: soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
             if batched[name] else None for name in shapes}
  layout = dict(
      max_precond_dim=draw(st.sampled_from((4, 10000))),
      merge_dims=draw(st.booleans()),
      precondition_1d=draw(st.booleans()),
      block_size=draw(st.sampled_from((None, 2, 4))),
      precondition_frequency=draw(st.integers(1, 3)),
      dimension_numbers=numbers)
  eps = draw(st.sampled_from((0.0, 1e-12, 1e-8, 1e-6)))
  if kind in ('rotated_adam', 'factored_rotated_adam'):
    tx = soap_optax.scale_by_rotated_adam(
        b1=draw(BETAS), b2=draw(BETAS), eps=eps,
        normalize_grads=draw(st.booleans()), one_sided=draw(st.booleans()),
        factored=kind == 'factored_rotated_adam', **layout)
  elif kind == 'shampoo':
    tx = soap_optax.scale_by_shampoo_eigenbasis(
        shampoo_beta=draw(BETAS), exponent=draw(st.sampled_from((0.25, 0.5))),
        eps=eps, refresh=draw(st.sampled_from(('eigh', 'qr'))), **layout)
  else:
    tx = soap_optax.scale_by_adafactor_in_eigenbasis(
        b2=draw(BETAS), eps=eps, refresh=draw(st.sampled_from(('eigh', 'qr'))),
        **layout)
  params = {name: jnp.zeros(s, dtype) for name, s in shapes.items()}
  return tx, params, draw(st.integers(0, 2**31 - 1))


def _signature(tree):
  return (jax.tree.structure(tree),
          [(x.shape, x.dtype) for x in jax.tree.leaves(tree)])


@settings(max_examples=15, deadline=None, derandomize=True)
@given(configurations())
def test_updates_state_and_bases_keep_their_invariants(configuration):
  tx, params, seed = configuration
  state = tx.init(params)
  signature = _signature(state)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(seed)
  for _ in range(3):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, state = update(grads, state, params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      assert u.shape == g.shape and u.dtype == g.dtype
      assert bool(jnp.all(jnp.isfinite(u)))
    assert _signature(state) == signature
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.floating))
  assert update._cache_size() == 1  # pylint: disable=protected-access
  eigenbasis = [x for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, _state.EigenbasisState))
                if isinstance(x, _state.EigenbasisState)][0]
  for bases in eigenbasis.bases:
    q = np.asarray(bases, np.float64)
    gram = np.einsum('uij,uik->ujk', q, q)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(q.shape[-1]),
                                                     gram.shape), atol=1e-5)
