"""When to refresh the eigenbases: on a fixed interval, or when measured
staleness says so.

A transform's ``precondition_frequency`` is one of

* an integer ``f``: every basis is refreshed every ``f`` steps (the published
  SOAP and Shampoo schedule);
* :class:`AdaptiveRefresh` (or the string ``"adaptive"``, its defaults): a
  stack of same-shape units is refreshed when the basis of one of its factors
  no longer diagonalizes the factor well, the rule of "Purifying Shampoo";
* :class:`FoamRefresh` (Shampoo only): FOAM's rule, which damps a stale
  preconditioner and refreshes only when the damping it needed grew too large.

Staleness of a factor ``GG`` with basis ``Q``, ``B = Q^T GG Q``:

.. math::

  s = \\frac{\\lVert B - \\operatorname{diag} B \\rVert_F}{\\lVert B \\rVert_F}
    = \\sqrt{1 - \\frac{\\lVert \\operatorname{diag} B \\rVert^2}
                      {\\lVert GG \\rVert_F^2}}

(``B`` and ``GG`` have the same Frobenius norm). ``s`` is 0 when ``Q``
diagonalizes ``GG`` and at most 1. The engine keeps ``diag B`` current at no
extra cost (see :func:`soap_optax._engine.staleness`).
"""

import dataclasses
from typing import Any

import numpy as np


def _check_number(owner: str, name: str, value: Any, low: float,
                  low_inclusive: bool, high: float = np.inf) -> None:
  ok = (isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool) and np.isfinite(value)
        and (value >= low if low_inclusive else value > low) and value <= high)
  if not ok:
    bound = f'{">=" if low_inclusive else ">"} {low:g}'
    if np.isfinite(high):
      bound += f' and <= {high:g}'
    raise ValueError(f'{owner}: {name} must be a finite number {bound}, '
                     f'got {value!r}.')


def _check_interval(owner: str, name: str, value: Any, minimum: int) -> None:
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
      or value < minimum):
    raise ValueError(f'{owner}: {name} must be an integer >= {minimum}, '
                     f'got {value!r}.')


@dataclasses.dataclass(frozen=True)
class AdaptiveRefresh:
  """Refresh a stack when its bases have gone stale (Purifying Shampoo's rule).

  Before each step, every factor's staleness ``s`` (module docstring) is read
  from the state; a stack of same-shape units is refreshed, all its units in
  one batched decomposition, when

  * some factor of some unit has ``s > tolerance`` and the stack was last
    refreshed at least ``min_interval`` steps ago, or
  * it was last refreshed ``max_interval`` steps ago.

  The first step always decomposes every factor. With ``tolerance=1`` (``s``
  never exceeds 1) this is the fixed interval ``max_interval``.

  The defaults come from ``scripts/experiments.py --parts refresh`` (README,
  "Adaptive refresh"): after SOAP's power-iteration + QR refresh a basis is
  not exact (``s`` of 0.1 to 0.3 right after it), and minibatch noise alone
  raises ``s`` to about 0.15 (Kronecker problem) or 0.4 (the main job's
  model) within 10 steps, so a tolerance below about 0.3 refreshes at every
  ``min_interval``; ``min_interval=10`` keeps the stale stacks on the usual
  interval and lets the fresh ones wait up to ``max_interval``.

  Attributes:
    tolerance: staleness above which a stack is refreshed, in (0, 1].
    min_interval: fewest steps between two refreshes of a stack (>= 1).
    max_interval: most steps between two refreshes of a stack
      (>= ``min_interval``).

  References:
    Eschenhagen et al., "Purifying Shampoo: Investigating Shampoo's
    Heuristics by Decomposing its Preconditioner", NeurIPS 2025 (the
    relative off-diagonal criterion).
  """

  tolerance: float = 0.3
  min_interval: int = 10
  max_interval: int = 100

  def __post_init__(self):
    _check_number('AdaptiveRefresh', 'tolerance', self.tolerance, 0.0, False,
                  1.0)
    _check_interval('AdaptiveRefresh', 'min_interval', self.min_interval, 1)
    _check_interval('AdaptiveRefresh', 'max_interval', self.max_interval,
                    self.min_interval)


@dataclasses.dataclass(frozen=True)
class FoamRefresh:
  """FOAM's damping and refresh rule, for :func:`scale_by_shampoo_eigenbasis`.

  Every ``check_interval`` steps, per factor ``A`` with basis ``Q`` and
  eigenvalues ``D`` from its last decomposition, ``B = Q^T A Q``, Shampoo
  exponent ``e = 1/p`` and current damping ``ε``:

  .. math::

    RC &= \\lVert (D + ε)^{-1/2} (B - D) (D + ε)^{-1/2} \\rVert_F, \\qquad
    α = \\frac{\\max \\tilde λ}{\\lVert \\tilde λ \\rVert_2}, \\quad
    \\tilde λ = (D + ε)^{-1/p} \\\\
    h &= RC \\cdot α / p, \\qquad ε \\leftarrow \\max(ε_0, ε\\, h / τ)

  and the preconditioner uses ``(D + ε)^{-e}`` for that factor. A stack one
  of whose factors has ``ε > max_damping`` is decomposed afresh, and its
  factors' damping goes back to ``ε_0``, the transform's ``eps``. Entries of
  ``D + ε`` that are not positive count as zero in the inverse powers.

  Attributes:
    check_interval: ``f``, steps between two checks (>= 1).
    tau: ``τ``, the target level of the proxy ``h`` (> 0).
    max_damping: ``ε_max``, the damping beyond which the factor is
      decomposed afresh (> 0).
    max_interval: refresh a stack at the latest this many steps after its
      last refresh; ``None``: only when the damping says so.

  Published settings ``(f, τ, ε_max, ε_0)``: ``(20, 0.75, 3e-7, 1e-9)`` for
  ViT-S on ImageNet and ``(50, 0.4, 1e-7, 1e-9)`` for a Conformer on
  LibriSpeech. ``ε`` is in the units of the factors' eigenvalues (squared
  gradients), so these values depend on the scale of the gradients.

  References:
    Nam and Ahn, FOAM (ICML 2026, arXiv 2606.02365).
  """

  check_interval: int = 20
  tau: float = 0.75
  max_damping: float = 3e-7
  max_interval: int | None = None

  def __post_init__(self):
    _check_interval('FoamRefresh', 'check_interval', self.check_interval, 1)
    _check_number('FoamRefresh', 'tau', self.tau, 0.0, False)
    _check_number('FoamRefresh', 'max_damping', self.max_damping, 0.0, False)
    if self.max_interval is not None:
      _check_interval('FoamRefresh', 'max_interval', self.max_interval, 1)


def resolve(precondition_frequency: Any, *, foam_allowed: bool,
            staggered_refresh: bool = False) -> Any:
  """``precondition_frequency`` checked: an integer, an :class:`AdaptiveRefresh`
  (``"adaptive"`` gives the defaults) or, where allowed, a
  :class:`FoamRefresh`. Raises a ValueError naming the accepted values."""
  if isinstance(precondition_frequency, str):
    if precondition_frequency != 'adaptive':
      raise ValueError(
          'precondition_frequency must be an integer >= 1, "adaptive", or a '
          'soap_optax.AdaptiveRefresh' + (
              ' or soap_optax.FoamRefresh' if foam_allowed else '') +
          f', got {precondition_frequency!r}.')
    precondition_frequency = AdaptiveRefresh()
  if isinstance(precondition_frequency, FoamRefresh) and not foam_allowed:
    raise ValueError(
        'precondition_frequency=FoamRefresh(...) is Shampoo\'s rule (it damps '
        'Shampoo\'s eigenvalues); use an integer, "adaptive" or '
        'soap_optax.AdaptiveRefresh here.')
  if isinstance(precondition_frequency, (AdaptiveRefresh, FoamRefresh)):
    if staggered_refresh:
      raise ValueError(
          'staggered_refresh=True needs an integer precondition_frequency '
          '(it spreads a fixed interval); an adaptive policy decides per '
          'stack already.')
    return precondition_frequency
  from soap_optax import _checks  # pylint: disable=g-import-not-at-top
  _checks.check_int('precondition_frequency', precondition_frequency, 1)
  return precondition_frequency


def is_policy(precondition_frequency: Any) -> bool:
  return isinstance(precondition_frequency, (AdaptiveRefresh, FoamRefresh))
