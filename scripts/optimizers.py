"""The optimizers the scripts compare, by name: one table and one list.

:data:`EIGENBASIS` maps each eigenbasis optimizer's name to the
``soap_optax`` alias it is and the keywords that make it that variant;
:func:`make_eigenbasis_optimizer` builds one from a learning rate and the
options every script sets alike (the second-moment decay, one-sidedness, and
any other keyword of the alias). :data:`OPTIMIZERS` is every name a script
may use: AdamW, the main job's routings of optax's Muon (built in ``lm.py``)
and the table's names. The main job, the benchmark and the experiments each
choose a selection of these names, checked with :func:`check_names`.

This module imports neither JAX nor soap_optax at import time: the main job
checks its arguments against the names before it selects its device. The
builder imports soap_optax when called.
"""

import dataclasses
import inspect
from typing import Any, Iterable

ADAMW = 'adamw'
# optax's Muon as the main job routes it (see lm.make_optimizer).
MUON_ROUTINGS = ('muon', 'muon_all_matrices', 'muon_shared_lr',
                 'muon_hyperball')


@dataclasses.dataclass(frozen=True)
class EigenbasisVariant:
  """A ``soap_optax`` alias (its name) and the keywords that define the
  variant."""

  alias: str
  keywords: dict[str, Any] = dataclasses.field(default_factory=dict)


EIGENBASIS = {
    'soap': EigenbasisVariant('soap'),
    'shampoo': EigenbasisVariant('shampoo'),
    'factorized_soap': EigenbasisVariant('factorized_soap'),
    'kl_shampoo': EigenbasisVariant('kl_shampoo'),
    'kl_soap': EigenbasisVariant('soap', dict(factor_estimator='kl')),
    'soap_one_sided': EigenbasisVariant('soap', dict(one_sided=True)),
    # The leaders' compositions (issue 'ahead of Muon'):
    'soap_h': EigenbasisVariant('soap_h'),
    'kl_soap_h': EigenbasisVariant('kl_soap_h'),
    'soap_muon': EigenbasisVariant('soap_muon'),
    # For the numerics comparisons (BENCHMARKS.md section 7):
    'soap_no_floor': EigenbasisVariant('soap', dict(rounding_floor=False)),
    'shampoo_ungrafted': EigenbasisVariant('shampoo', dict(grafting='none')),
}

OPTIMIZERS = (ADAMW, *MUON_ROUTINGS, *EIGENBASIS)


def check_names(names: Iterable[str]) -> tuple[str, ...]:
  """``names`` as a tuple; ValueError unless each is one of OPTIMIZERS."""
  names = tuple(names)
  unknown = [name for name in names if name not in OPTIMIZERS]
  if unknown:
    raise ValueError(f'unknown optimizer {", ".join(unknown)}; choose from '
                     f'{", ".join(OPTIMIZERS)}')
  return names


def eigenbasis_alias(name: str):
  """The ``soap_optax`` alias of the eigenbasis optimizer ``name``."""
  if name not in EIGENBASIS:
    raise ValueError(f'{name!r} is not an eigenbasis optimizer; choose from '
                     f'{", ".join(EIGENBASIS)}')
  import soap_optax  # pylint: disable=g-import-not-at-top
  return getattr(soap_optax, EIGENBASIS[name].alias)


def takes_option(name: str, option: str) -> bool:
  """Whether the alias of the eigenbasis optimizer ``name`` has a keyword
  ``option``."""
  return option in inspect.signature(eigenbasis_alias(name)).parameters


def second_moment_keyword(name: str) -> str:
  """The keyword of ``name``'s alias for the decay of its second moment and
  Kronecker factors: ``b2`` (soap, factorized_soap; their ``shampoo_beta``
  follows it) or ``shampoo_beta`` (shampoo, kl_shampoo)."""
  return 'b2' if takes_option(name, 'b2') else 'shampoo_beta'


def make_eigenbasis_optimizer(name: str, learning_rate, *,
                              second_moment_decay: float | None = None,
                              one_sided: bool = False, **options):
  """The eigenbasis optimizer ``name`` (a key of EIGENBASIS).

  Args:
    name: the optimizer's name.
    learning_rate: its learning rate (a number or a schedule).
    second_moment_decay: passed as ``b2`` or ``shampoo_beta``, whichever the
      alias takes (second_moment_keyword); None: the alias's default.
    one_sided: True rotates one axis of each parameter; False leaves the
      variant as it is (one-sided for 'soap_one_sided').
    **options: other keywords of the alias (weight_decay,
      precondition_frequency, layout...).

  Returns:
    The optax GradientTransformation.

  Raises:
    ValueError: an unknown name, a keyword the alias does not take (one_sided
      included), or one that contradicts the variant's own.
  """
  alias = eigenbasis_alias(name)
  if second_moment_decay is not None:
    options[second_moment_keyword(name)] = second_moment_decay
  if one_sided:
    options['one_sided'] = True
  accepted = inspect.signature(alias).parameters
  variant = EIGENBASIS[name].keywords
  for option, value in options.items():
    if option not in accepted:
      raise ValueError(f'{option}: {name} (soap_optax.{alias.__name__}) '
                       f'takes no {option}')
    if option in variant and variant[option] != value:
      raise ValueError(f'{option}={value!r}: {name} is {option}='
                       f'{variant[option]!r}')
  return alias(learning_rate, **{**variant, **options})
