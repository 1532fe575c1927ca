"""A checkpoint written by the code before the skeleton refactor restores into
today's code and continues bitwise (tree structure, field order, arithmetic).

The fixtures were written once by ``tests/fixtures/make_v0_checkpoints.py`` at
commit 29cfa33: Orbax checkpoints of float64 states after three updates, and
the next three updates and final state that code computed.
"""

import pathlib

import jax
import numpy as np
import pytest

from tests.fixtures import make_v0_checkpoints as fixture

ocp = pytest.importorskip('orbax.checkpoint')
HERE = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'v0_checkpoints'


@pytest.mark.parametrize('name', sorted(fixture.optimizers()))
def test_v0_checkpoint_restores_and_continues_bitwise(name, x64):
  del x64
  opt = fixture.optimizers()[name]
  params = fixture.params()
  target = jax.eval_shape(opt.init, params)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(HERE / name, target)
  assert jax.tree.structure(state) == jax.tree.structure(target)
  expected = np.load(HERE / f'{name}.npz')
  update = jax.jit(opt.update)
  for step in range(3, 6):
    updates, state = update(fixture.gradients(step), state, params)
    for i, leaf in enumerate(jax.tree.leaves(updates)):
      np.testing.assert_array_equal(
          np.asarray(leaf), expected[f'updates{step}_{i}'],
          err_msg=f'{name}: update {step}, leaf {i}')
  for i, leaf in enumerate(jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(leaf), expected[f'state_{i}'],
                                  err_msg=f'{name}: state leaf {i}')
