"""Checkpoints written by earlier code restore into today's code (tree
structure and field order unchanged: the restored state is bitwise the saved
one) and continue as that code did.

The continuation is compared at a few float64 ulps, not bitwise: the same
per-unit arithmetic compiled inside another program is fused differently by
XLA (multiply-adds contracted or not), which moves the last bit of some
entries (measured: at most 2.2e-16 relative).

Each fixture set was written by ``tests/fixtures/make_checkpoints.py`` with
the soap_optax of the commit it names (its ``provenance.json`` records it;
rerunning the script at that commit reproduces the recorded updates and
states, the ``.npz`` files, bit for bit):
``v0_checkpoints`` by the code before the skeleton refactor, and
``v1_checkpoints`` by the code before the smaller rule interface, every rule
and alias default (grafted Shampoo, KL-SOAP, KL-Shampoo) included.
"""

import collections
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import soap_optax
from tests.fixtures import make_checkpoints as fixture

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'

# Basis columns whose sign the code has since changed, and the state leaves
# in that unit's rotated coordinates. factorized_soap refreshes the (5,)
# vector's rank-deficient 5 x 5 factor during the continuation, and its null
# column's sign is the canonical null-space basis's choice: v0 took eigh's;
# v1 (issue 21's basis) the sign of a second Householder QR; today's (issue
# 29: one QR, each column positive against its reference column) happens to
# agree with v0's and flips v1's: (leaf of the bases, leaves of the unit's
# rotated state (one (1, 5) unit), the flipped columns: the null one).
SIGN_CONVENTION_CHANGED = {
    ('v1_checkpoints', 'factorized_soap'): (16, (0,), [4])}

# The fields soap_optax 0.2.0 dropped (see soap_optax._upgrade), and the
# field order the fixtures' code flattened those states in.
DROPPED = {'ScaleByShampooEigenbasisState': 'rayleigh_quotients',
           'ScaleByAdafactorInEigenbasisState': 'axis_stats'}
SAVED_FIELDS = {
    'ScaleByShampooEigenbasisState': (
        'eigenbasis', 'diagonals', 'eigenvalues', 'rayleigh_quotients',
        'damping'),
    'ScaleByAdafactorInEigenbasisState': ('eigenbasis', 'axis_stats'),
}

CASES = [(name, optimizer) for name, spec in sorted(fixture.FIXTURE_SETS.items())
         for optimizer in spec['optimizers']]


def _assert_within_ulps(actual, desired, message):
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.dtype == desired.dtype and actual.shape == desired.shape
  if np.issubdtype(desired.dtype, np.floating):
    scale = np.max(np.abs(desired), initial=0.0)
    np.testing.assert_allclose(actual, desired, rtol=1e-14,
                               atol=1e-14 * scale, err_msg=message)
  else:
    np.testing.assert_array_equal(actual, desired, err_msg=message)


def _column_signs(actual, desired):
  """Per basis column, +1 or -1: the sign that maps ``desired`` to
  ``actual`` (columns along the last axis)."""
  return np.where(np.sum(actual * desired, axis=-2) < 0, -1.0, 1.0)


def _per_axis_as_saved(node, unfactored):
  """Every stack's per-axis vectors, axes in order: a factored axis's from
  the engine's tracked quotients (the numbers the dropped fields
  duplicated), the others' from ``unfactored`` (flat over stacks)."""
  tracked, rest, out = iter(node.eigenbasis.quotients), iter(unfactored), []
  for stack in node.eigenbasis.plan.stacks:
    layout = stack.layout
    out.extend(layout.interleave(
        [next(tracked) for _ in layout.factored_axes],
        [next(rest) for _ in layout.unfactored(layout.merged_shape)]))
  return tuple(out)


def _as_saved(state):
  """Today's state in the tree the fixture's code saved: each dropped field
  rebuilt from the numbers that replace it (for Shampoo's Rayleigh
  quotients of an axis without a factor, its running diagonal), so that
  every saved leaf is compared, the dropped ones included."""
  def rebuild(node):
    kind = type(node).__name__
    if kind not in SAVED_FIELDS:
      return node
    fields = node._asdict()
    if kind == 'ScaleByShampooEigenbasisState':
      fields['rayleigh_quotients'] = _per_axis_as_saved(node, node.diagonals)
    else:
      fields['axis_stats'] = _per_axis_as_saved(node, node.axis_stats)
    saved = collections.namedtuple(kind, SAVED_FIELDS[kind])
    return saved(**{name: fields[name] for name in SAVED_FIELDS[kind]})
  return jax.tree.map(rebuild, state,
                      is_leaf=lambda x: type(x).__name__ in SAVED_FIELDS)


@pytest.mark.parametrize('set_name', sorted(fixture.FIXTURE_SETS))
def test_fixture_set_names_the_commit_that_wrote_it(set_name):
  provenance = json.loads(
      (FIXTURES / set_name / 'provenance.json').read_text())
  spec = fixture.FIXTURE_SETS[set_name]
  assert provenance['commit'] == spec['commit']
  assert provenance['optimizers'] == list(spec['optimizers'])
  assert provenance['soap_optax_file'] == 'soap_optax/__init__.py'


@pytest.mark.parametrize('set_name, name', CASES)
def test_checkpoint_restores_and_continues(set_name, name, x64):
  del x64
  here = FIXTURES / set_name
  opt = fixture.optimizers([name])[name]
  params = fixture.params()
  target = jax.eval_shape(opt.init, params)
  changed = any(type(node).__name__ in DROPPED for node in jax.tree.leaves(
      target, is_leaf=lambda x: type(x).__name__ in DROPPED))
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.restore(here / name)  # The tree as saved.
    if not changed:  # Today's tree: a direct restore works too.
      direct = checkpointer.restore(here / name, target)
  # The documented conversion: the dropped fields' arrays left out, every
  # other array as saved, bit for bit.
  state = soap_optax.upgrade_state(saved, target)
  assert jax.tree.structure(state) == jax.tree.structure(target)
  saved_leaves = jax.tree.leaves(saved)
  assert len(jax.tree.leaves(_as_saved(state))) == len(saved_leaves)
  kept = {np.asarray(x).tobytes() for x in saved_leaves}
  for leaf in jax.tree.leaves(state):
    assert np.asarray(leaf).tobytes() in kept
  if not changed:
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(direct)):
      np.testing.assert_array_equal(a, b)
  expected = np.load(here / f'{name}.npz')
  update = jax.jit(opt.update)
  for step in range(3, 6):
    updates, state = update(fixture.gradients(step), state, params)
    for i, leaf in enumerate(jax.tree.leaves(updates)):
      _assert_within_ulps(leaf, expected[f'updates{step}_{i}'],
                          f'{name}: update {step}, leaf {i}')
  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(_as_saved(state))]
  assert len(leaves) == len([k for k in expected.files
                             if k.startswith('state_')])
  flipped = SIGN_CONVENTION_CHANGED.get((set_name, name))
  if flipped:
    # Exactly the null columns' signs changed, and the rotated state with
    # them: compare with those signs applied (signs included everywhere).
    basis, rotated, columns = flipped
    signs = _column_signs(leaves[basis], expected[f'state_{basis}'])
    assert np.flatnonzero(signs < 0).tolist() == columns, signs
    leaves[basis] = leaves[basis] * signs[..., None, :]
    for i in rotated:
      leaves[i] = leaves[i] * signs.reshape(leaves[i].shape)
  # Every saved leaf, a dropped field's included (rebuilt from the tracked
  # quotients and diagonals that replace it).
  for i, leaf in enumerate(leaves):
    _assert_within_ulps(leaf, expected[f'state_{i}'],
                        f'{name}: state leaf {i}')


def test_upgrade_state_names_what_does_not_fit(x64):
  del x64
  params = fixture.optimizers(['soap', 'adafactor'])
  target = jax.eval_shape(params['adafactor'].init, fixture.params())
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.restore(FIXTURES / 'v1_checkpoints' / 'soap')
  with pytest.raises(ValueError, match=r'state.*another optimizer'):
    soap_optax.upgrade_state(saved, target)


def test_upgrade_state_keeps_a_state_of_today(x64):
  del x64
  opt = fixture.optimizers(['shampoo'])['shampoo']
  state = opt.init(fixture.params())
  _, state = jax.jit(opt.update)(fixture.gradients(0), state,
                                 fixture.params())
  upgraded = soap_optax.upgrade_state(state, state)
  assert jax.tree.structure(upgraded) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(upgraded), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
