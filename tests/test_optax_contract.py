"""optax's own contract suite for contributed optimizers, on every alias.

The installed optax's ``optax/contrib/_common_test.py`` is run as optax would
run it on accepting these optimizers as a contribution: its code unchanged
except its optimizer list, its factory lookup and its list of
hyperparameters that ``optax.inject_hyperparams`` cannot inject (ours decide
shapes or the number of compiled programs, as Muon's ``ns_steps`` does in
optax's list). It checks convergence on four small problems (30,000 steps
each), ``optax.tree.map_params`` on the state, extra arguments to ``update``
without a recompile, ``inject_hyperparams`` against the plain alias,
``dtype`` preservation, ``optax.MultiSteps``, state stability under
``lax.cond`` in four dtypes, and learning-rate schedules.
"""

import importlib.util
import pathlib
import re

import pytest

import soap_optax

# The optimizers under test: every alias, and the options that change which
# rule runs (KL-SOAP's factor estimator; 1-D parameters rotated).
_OURS = (
    {'opt_name': 'soap', 'opt_kwargs': {'learning_rate': 1e-2}},
    {'opt_name': 'soap', 'opt_kwargs': {'learning_rate': 1e-2,
                                        'precondition_1d': True}},
    {'opt_name': 'soap', 'opt_kwargs': {'learning_rate': 1e-2,
                                        'factor_estimator': 'kl'}},
    {'opt_name': 'factorized_soap', 'opt_kwargs': {'learning_rate': 1e-2}},
    # At 1e-2 Shampoo^(1/2) meets the matrix parabola's near-rank-1
    # gradients late: it scales each singular direction by sigma_1 / sigma_i
    # (exactly, not by rounding), so the smallest one, whose sign flips from
    # step to step, fills the grafted step, the momentum averages it away
    # and the weight decay (0.01) drifts the weights; at 3e-2 the run ends
    # within 1e-4 (weight_decay=0 or exponent=0.25 converge at 1e-2 too).
    {'opt_name': 'shampoo', 'opt_kwargs': {'learning_rate': 3e-2}},
    {'opt_name': 'kl_shampoo', 'opt_kwargs': {'learning_rate': 1e-2}},
)
_OURS = tuple(dict(o, wrapper_name=None, wrapper_kwargs=None) for o in _OURS)

# Arguments that decide shapes or programs; injected as arrays they would be
# traced (soap_optax raises a ValueError naming them at init).
_NOT_INJECTABLE = ('precondition_frequency', 'max_precond_dim', 'block_size',
                   'bucket_padding')


def _get_opt_factory(opt_name):
  return getattr(soap_optax, opt_name)


def _load_optax_suite():
  """optax's suite, with the three adaptations above, as a namespace."""
  spec = importlib.util.find_spec('optax.contrib._common_test')
  if spec is None:
    pytest.skip('this optax installation ships no contrib/_common_test.py',
                allow_module_level=True)
  origin = spec.origin
  source = pathlib.Path(origin).read_text()
  head, marker, body = source.partition('\nclass ContribTest(')
  if not marker:
    raise RuntimeError(f'{origin} no longer defines ContribTest')
  body, count = re.subn(
      r'(for uninjectable_hparam in \[)',
      lambda m: m.group(1) + ', '.join(map(repr, _NOT_INJECTABLE)) + ', ',
      body)
  if count != 1:
    raise RuntimeError(f'{origin}: its list of hyperparameters that cannot '
                       'be injected was not found')
  namespace = {'__name__': __name__, '__file__': origin}
  exec(compile(head, origin, 'exec'), namespace)  # pylint: disable=exec-used
  namespace['_MAIN_OPTIMIZERS_UNDER_TEST'] = _OURS
  namespace['_ALL_OPTIMIZERS_UNDER_TEST'] = _OURS
  namespace['_get_opt_factory'] = _get_opt_factory
  # Padded so that tracebacks name the lines of optax's file.
  body = '\n' * head.count('\n') + marker + body
  exec(compile(body, origin, 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


ContribTest = _load_optax_suite()['ContribTest']
