"""When and how the eigenbases are refreshed: the policies, the per-unit
decision and the one driver every transform uses.

A transform's ``precondition_frequency`` is one of

* an integer ``f``: every basis is refreshed every ``f`` calls (the published
  SOAP and Shampoo schedule), or with ``staggered_refresh`` each unit on its
  own phase of the ``f`` calls;
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
extra cost (see :func:`soap_optax._staleness.staleness`).

Whatever the policy, a unit is refreshed only on a call that accepted its
gradient (see :mod:`soap_optax._skeleton`): the first accepted call
initializes it (a full ``eigh``), and with an integer frequency a refresh that
fell due on a rejected call is done on the unit's next accepted call.
"""

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soap_optax import _batching
from soap_optax import _checks
from soap_optax import _kronecker
from soap_optax import _mesh
from soap_optax import _solvers
from soap_optax import _stacks
from soap_optax import _state


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


def foam_damping(
    stat: jax.Array, basis: jax.Array, eigenvalues: jax.Array,
    damping: jax.Array, *, exponent: float, tau: float, base_damping: float,
) -> jax.Array:
  r"""FOAM's damping update for one factor (see
  :class:`soap_optax.FoamRefresh`).

  With ``B = Q^T GG Q``, cached eigenvalues ``D``, ``p = 1/exponent`` and the
  current damping ``ε``:
  ``RC = ‖(D + ε)^{-1/2} (B - D) (D + ε)^{-1/2}‖_F``,
  ``α = max(λ̃) / ‖λ̃‖_2`` with ``λ̃ = (D + ε)^{-1/p}``,
  ``h = RC α / p``; returns ``max(ε_0, ε h / τ)``. Non-positive ``D + ε``
  count as zero in the inverse powers. Costs two ``d x d`` products.
  """
  highest = _kronecker.HIGHEST
  rotated = jnp.matmul(basis.T, jnp.matmul(stat, basis, precision=highest),
                       precision=highest)
  shifted = eigenvalues + damping
  positive = shifted > 0
  safe = jnp.where(positive, shifted, 1)
  scale = jnp.where(positive, safe ** -0.5, 0)
  residual = rotated - jnp.diag(eigenvalues)
  relative = jnp.sqrt(jnp.sum(jnp.square(
      scale[:, None] * residual * scale[None, :])))
  inverse_root = jnp.where(positive, safe ** -exponent, 0)
  norm = jnp.sqrt(jnp.sum(jnp.square(inverse_root)))
  alpha = jnp.where(norm > 0, jnp.max(inverse_root) / jnp.where(
      norm > 0, norm, 1), 0)
  proxy = relative * alpha * exponent
  return jnp.maximum(jnp.asarray(base_damping, damping.dtype),
                     (damping * proxy / tau).astype(damping.dtype))



@dataclasses.dataclass(frozen=True)
class AdaptiveRefresh:
  r"""Refresh a stack when its bases have gone stale (Purifying Shampoo's rule).

  Before each step, every factor's staleness :math:`s` (:term:`staleness`) is
  read from the state; a stack of same-shape units is refreshed, all its
  units in one batched decomposition, when

  * some factor of some unit has :math:`s >` ``tolerance`` and the stack was
    last refreshed at least ``min_interval`` steps ago, or
  * it was last refreshed ``max_interval`` steps ago.

  The first step always decomposes every factor. With ``tolerance=1``
  (:math:`s` never exceeds 1) this is the fixed interval ``max_interval``.

  The defaults come from ``scripts/experiments.py --parts refresh``
  (``docs/adaptive_refresh.md``, "Fixed intervals against the adaptive
  schedule"): after SOAP's power-iteration + QR refresh a basis is not
  exact (:math:`s` of 0.1 to 0.3 right after it), and minibatch noise alone
  raises :math:`s` to about 0.15 (Kronecker problem) or 0.4 (the main job's
  model) within 10 steps, so a tolerance below about 0.3 refreshes at every
  ``min_interval``; ``min_interval=10`` keeps the stale stacks on the usual
  interval and lets the fresh ones wait up to ``max_interval``.

  Attributes:
    tolerance: staleness above which a stack is refreshed, in
      :math:`(0, 1]`.
    min_interval: fewest steps between two refreshes of a stack
      (:math:`\ge 1`).
    max_interval: most steps between two refreshes of a stack
      (:math:`\ge` ``min_interval``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> policy = soap_optax.AdaptiveRefresh(tolerance=0.3, min_interval=5,
    ...                                     max_interval=50)
    >>> tx = soap_optax.soap(learning_rate=3e-3, precondition_frequency=policy)
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.full((3, 4), 0.1)}, state, params)
    >>> stats = soap_optax.diagnostics(state)
    >>> print(int(stats['refreshes/stack0_3x4']))  # the first call decomposes
    1

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
  r"""FOAM's damping and refresh rule, for :func:`scale_by_shampoo_eigenbasis`.

  Every ``check_interval`` steps, per factor :math:`A` with basis :math:`Q`
  and eigenvalues :math:`D` from its last decomposition,
  :math:`B = Q^\top A Q`, Shampoo exponent :math:`e = 1/p` and current
  damping :math:`\varepsilon`:

  .. math::

    \mathrm{RC} &= \lVert (D + \varepsilon)^{-1/2} (B - D)
      (D + \varepsilon)^{-1/2} \rVert_F, \qquad
    \alpha = \frac{\max \tilde\lambda}{\lVert \tilde\lambda \rVert_2}, \quad
    \tilde\lambda = (D + \varepsilon)^{-1/p} \\
    h &= \mathrm{RC} \cdot \alpha / p, \qquad
    \varepsilon \leftarrow \max(\varepsilon_0, \varepsilon\, h / \tau)

  and the preconditioner uses :math:`(D + \varepsilon)^{-e}` for that
  factor. A stack one of whose factors has :math:`\varepsilon >`
  ``max_damping`` is decomposed afresh, and its factors' damping goes back
  to :math:`\varepsilon_0`, the transform's ``eps``. Entries of
  :math:`D + \varepsilon` that are not positive count as zero in the
  inverse powers.

  Attributes:
    check_interval: :math:`f`, steps between two checks (:math:`\ge 1`).
    tau: :math:`\tau`, the target level of the proxy :math:`h`
      (:math:`> 0`).
    max_damping: :math:`\varepsilon_{\max}`, the damping beyond which the
      factor is decomposed afresh (:math:`> 0`).
    max_interval: refresh a stack at the latest this many steps after its
      last refresh; ``None``: only when the damping says so.

  Published settings :math:`(f, \tau, \varepsilon_{\max}, \varepsilon_0)`:
  ``(20, 0.75, 3e-7, 1e-9)`` for ViT-S on ImageNet and
  ``(50, 0.4, 1e-7, 1e-9)`` for a Conformer on LibriSpeech.
  :math:`\varepsilon` is in the units of the factors' eigenvalues (squared
  gradients), so these values depend on the scale of the gradients.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> policy = soap_optax.FoamRefresh(check_interval=20, tau=0.75,
    ...                                 max_damping=3e-7)
    >>> tx = soap_optax.shampoo(learning_rate=3e-3, eps=1e-9,
    ...                         precondition_frequency=policy)
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.full((3, 4), 0.1)}, state, params)
    >>> stats = soap_optax.diagnostics(state)
    >>> print(f"{stats['damping/stack0_3x4/axis0']:.1e}")  # eps after a refresh
    1.0e-09

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
  _checks.check_int('precondition_frequency', precondition_frequency, 1)
  return precondition_frequency


def is_policy(precondition_frequency: Any) -> bool:
  return isinstance(precondition_frequency, (AdaptiveRefresh, FoamRefresh))


# ------------------------------------------------------------------------------
# The decision: which units refresh on this call.


def due_stacks(eigenbasis: _state.EigenbasisState, over: Any,
               min_interval: int, max_interval: int | None
               ) -> list[jax.Array]:
  """Per stack, a policy's refresh decision: ``over(s)`` (a traced boolean)
  once the stack was refreshed ``min_interval`` calls ago, or in any case
  ``max_interval`` calls after (``None``: never). The interval counts calls
  since the stack's last refresh, ``age + 1`` if refreshed now; padding slots
  of a sharded stack do not count. A stack without a factor has nothing to
  decompose and is "refreshed" every call (Shampoo's axes without a factor
  then take their current diagonals as eigenvalues).
  """
  plan = eigenbasis.plan
  due = []
  for s, age in enumerate(eigenbasis.age):
    if not plan.stacks[s].layout.factored_axes:
      due.append(jnp.ones([], bool))
      continue
    interval = plan.largest_over_units(s, age) + 1
    decision = over(s) & (interval >= min_interval)
    if max_interval is not None:
      decision |= interval >= max_interval
    due.append(decision)
  return due


def stale_stacks(eigenbasis: _state.EigenbasisState,
                 policy: AdaptiveRefresh) -> list[jax.Array]:
  """Per stack, whether :class:`AdaptiveRefresh` refreshes it this call.

  Read from the state as the previous call left it: the staleness of every
  factor (:func:`soap_optax._staleness.staleness`) and the calls since the
  stack's last refresh.
  """
  plan = eigenbasis.plan
  stale = _state.staleness_per_stack(eigenbasis)
  return due_stacks(
      eigenbasis, lambda s: plan.largest_over_units(s, stale[s])
      > policy.tolerance, policy.min_interval, policy.max_interval)


def foam_decision(policy: FoamRefresh, *, exponent: Any,
                  base_damping: Any):
  """FOAM's refresh decision for a transform with these ``exponent`` and
  base damping ``ε_0`` (see :class:`FoamRefresh`), as the skeleton's
  ``decide``.

  The returned ``decide(count, factors, states, eigenbasis)`` reads, per
  stack, the transform's state fields ``eigenvalues`` (the cached ``Λ_k``,
  one per axis) and ``damping`` (``ε_k``, one ``(U,)`` array per factored
  axis). Every ``check_interval`` calls each factor's damping is updated by
  :func:`foam_damping`, and a stack is due when one of its factors' damping
  passed ``max_damping`` (or ``max_interval`` calls after its last
  refresh). It returns the states with their new damping and the per-stack
  decisions.

  Raises:
    ValueError: if ``base_damping`` (the transform's ``eps``) is not > 0.
  """
  if not isinstance(base_damping, jax.core.Tracer) and not (
      float(base_damping) > 0):
    raise ValueError(
        f'eps must be > 0 with precondition_frequency=FoamRefresh(...): it '
        f'is the damping FOAM starts from and multiplies, got '
        f'{base_damping!r}.')
  update = jax.vmap(functools.partial(
      foam_damping, exponent=exponent, tau=policy.tau,
      base_damping=base_damping))

  def decide(count, factors, states, eigenbasis):
    plan = eigenbasis.plan
    checked = (count > 0) & (count % policy.check_interval == 0)

    def check():
      return [tuple(update(stat, basis, st.eigenvalues[axis], d)
                    for stat, basis, axis, d in zip(
                        f.stats, f.bases, f.layout.factored_axes, st.damping))
              for f, st in zip(factors, states)]

    damping = jax.lax.cond(checked, check,
                           lambda: [st.damping for st in states])
    def over(s):
      return checked & functools.reduce(jnp.logical_or, [
          plan.largest_over_units(s, d) > policy.max_damping
          for d in damping[s]], jnp.zeros([], bool))
    return ([st._replace(damping=d) for st, d in zip(states, damping)],
            due_stacks(eigenbasis, over, 1, policy.max_interval))

  return decide


class Due(NamedTuple):
  """Per stack, ``(U,)`` boolean masks over the slots.

  Attributes:
    units: the units refreshed on this call.
    initializing: the units never refreshed before (their first refresh is
      always a full ``eigh``).
  """

  units: list[jax.Array]
  initializing: list[jax.Array]


def due_units(eigenbasis: _state.EigenbasisState, frequency: Any,
              accepted: Sequence[jax.Array],
              decided: Sequence[jax.Array] | None = None) -> Due:
  """The units to refresh on this call.

  A unit is due when its gradient was accepted, it holds a unit (not
  padding), and either it was never refreshed, or the schedule says so:
  with an integer ``frequency``, when ``count % frequency == 0`` (with
  staggering: when ``count % frequency`` is its phase) or when it missed a
  refresh on a rejected call (its age reached ``frequency``); with a policy,
  when its stack's entry of ``decided`` (or, for :class:`AdaptiveRefresh`,
  :func:`stale_stacks`) is true.
  """
  plan, count = eigenbasis.plan, eigenbasis.count
  if decided is None and isinstance(frequency, AdaptiveRefresh):
    decided = stale_stacks(eigenbasis, frequency)
  units, initializing = [], []
  for s, (ok, age, refreshes) in enumerate(
      zip(accepted, eigenbasis.age, eigenbasis.refreshes)):
    if decided is not None:
      scheduled = decided[s]
    else:
      if plan.refresh_phases is not None:
        phases = jnp.asarray(plan.per_slot(s, plan.refresh_phases[s], -1))
        scheduled = phases == count % plan.refresh_frequency
      else:
        scheduled = count % frequency == 0
      scheduled = scheduled | (age >= frequency)
    never = refreshes == 0
    live = ok & jnp.asarray(plan.real_slots(s))
    units.append(live & (scheduled | never))
    initializing.append(live & never)
  return Due(units, initializing)


# ------------------------------------------------------------------------------
# The driver: one refresh program per factor size.


class Refreshed(NamedTuple):
  """What :func:`refresh` returns, per stack.

  Attributes:
    factors: the factors with their new bases (the old ones where not due).
    values: per factored axis, ``(U, d)`` eigenvalue estimates matching the
      new bases' columns (zeros where not due).
    orders: per factored axis, ``(U, d)``: the old columns the new ones
      follow (see :class:`soap_optax._solvers.Solution`).
    failures: int32 scalar, the number of due factors whose result was not
      finite (they kept their old basis).
  """

  factors: list[_kronecker.KroneckerFactors]
  values: list[tuple[jax.Array, ...]]
  orders: list[tuple[jax.Array, ...]]
  failures: jax.Array


def _count_failures(solutions) -> jax.Array:
  return sum((jnp.sum(~solution.ok, dtype=jnp.int32)
              for solution in solutions), jnp.zeros([], jnp.int32))


def solver_sizes(stats: Sequence[jax.Array], max_padding: float | None
                 ) -> dict[tuple[int, Any], int]:
  """The size each factor size is solved at: ``{(d, dtype): D}``, ``D >= d``.

  Factors of several sizes padded to one size go through one solver program
  (one ``eigh``, one QR, one canonical null space), so that compile time
  grows with the number of solver sizes, not of distinct factor sizes. A
  factor ``GG`` of size ``d`` is solved as ``[[GG, 0], [0, 0]]`` of size
  ``D`` with the basis ``[[Q, 0], [0, 0]]``: its padding axes are dead axes,
  which every solver leaves alone and the canonical null space keeps as the
  last coordinate axes, so the top-left ``d x d`` block of the result is the
  unpadded solution (to rounding; ``tests/test_refresh.py`` compares in
  float64).

  The sizes, per dtype, sorted, are cut into the fewest runs, each padded to
  its largest size, such that the padding adds at most ``max_padding`` of
  the refresh's work (``d^3`` per factor, summed over the tree); among
  those, the cut with the least padding. ``None`` or 0: no padding.
  """
  counts: dict[Any, dict[int, int]] = {}
  for stat in stats:
    per_size = counts.setdefault(stat.dtype, {})
    per_size[stat.shape[-1]] = per_size.get(stat.shape[-1], 0) + stat.shape[0]
  result = {}
  for dtype, per_size in counts.items():
    sizes = sorted(per_size)
    result.update({(d, dtype): d for d in sizes})
    if not max_padding:
      continue
    budget = max_padding * sum(per_size[d] * d**3 for d in sizes)
    def extra(i, j):  # sizes[i..j] padded to sizes[j]
      return sum(per_size[d] * (sizes[j]**3 - d**3) for d in sizes[i:j + 1])
    k = len(sizes)
    # least[g][j]: (least padding, cut) of sizes[:j + 1] in g + 1 runs.
    least = [[(extra(0, j), (j,)) for j in range(k)]]
    while least[-1][k - 1][0] > budget and len(least) < k:
      previous = least[-1]
      least.append([min(((previous[i][0] + extra(i + 1, j),
                          previous[i][1] + (j,)) for i in range(j)),
                        default=(float('inf'), ()))
                    for j in range(k)])
    start = 0
    for end in least[-1][k - 1][1]:
      result.update({(d, dtype): sizes[end] for d in sizes[start:end + 1]})
      start = end + 1
  return result


def _padded_solver(fn, sizes):
  """``fn`` on every stack, each factor padded to its solver size (see
  :func:`solver_sizes`) and its solution cut back."""
  def padded(stats, bases, masks):
    real = [stat.shape[-1] for stat in stats]

    def pad(stat, basis):
      d = stat.shape[-1]
      extra = sizes[(d, stat.dtype)] - d
      if not extra:
        return stat, basis
      # The old basis's padding is never read back: the power step's
      # product is zero there and a QR leaves a zero column's axis alone.
      widths = ((0, 0), (0, extra), (0, extra))
      return jnp.pad(stat, widths), jnp.pad(basis, widths)
    stats, bases = zip(*map(pad, stats, bases)) if stats else ((), ())
    solutions = fn(list(stats), list(bases), masks)
    return [solution._replace(basis=solution.basis[:, :d, :d],
                              values=solution.values[:, :d],
                              order=solution.order[:, :d])
            for solution, d in zip(solutions, real)]
  return padded


def _solve_due(solver, stats, bases, masks, layout, *, skip: bool,
               batched: bool, sizes=None):
  """``solver`` on every due factor, batched by (padded) factor size; a
  factor not due keeps its basis (:func:`soap_optax._solvers.keep_basis`).

  With ``skip`` each factor's solve sits in a ``lax.cond``, so that a factor
  not due costs nothing (staggered schedules, a mesh's padding slots);
  otherwise every factor is solved and the result selected, a smaller
  program for calls where (almost) every unit is due. ``batched``: one
  ``vmap``-ed call per size (accelerators), else ``lax.map``. ``sizes``:
  the solver size of each factor size (:func:`solver_sizes`; None: none
  padded).
  """
  def conditional(stat, basis, due):
    return jax.lax.cond(due, solver, _solvers.keep_basis, stat, basis)

  def selected(stat, basis, due):
    return jax.tree.map(lambda new, old: jnp.where(due, new, old),
                        solver(stat, basis), _solvers.keep_basis(stat, basis))

  def local(fn, *lists):
    def by_size(*lists):
      return _batching.map_by_size(fn, *lists, batched_call=(
          _batching.vmap_items if batched else _batching.map_items))
    if sizes is not None:
      by_size = _padded_solver(by_size, sizes)
    solutions = by_size(*lists)
    return solutions, _count_failures(solutions)

  fn = conditional if skip else selected
  if layout is None:
    return local(fn, stats, bases, masks)
  return _mesh.divided_map(fn, layout, (stats, bases, masks), local)


def refresh(factors: Sequence[_kronecker.KroneckerFactors], due: Due,
            method: str, plan: _stacks.EigenbasisPlan,
            partial: bool = False) -> Refreshed:
  """Refreshes the bases of the due units; one program per solver size.

  Every factor of the same solver size (:func:`solver_sizes`) and dtype, from
  every stack, goes through one batched solver call, inside one ``lax.cond``
  that skips the whole refresh on calls where nothing is due. A call where
  some due unit initializes uses ``eigh`` for every due unit; other calls use
  ``method`` (a key of :data:`soap_optax._solvers.SOLVERS`). Where a call
  refreshes only some units (staggering, a policy's per-stack decision:
  ``partial``) and on a mesh, the solver runs per factor under ``lax.map`` and
  a ``lax.cond`` skips the factors not due (on a mesh inside one
  ``shard_map``, each device solving its own units); otherwise every factor of
  a due call is solved (one ``vmap``-ed call per size on accelerators,
  ``lax.map`` on CPU) and the results of the due ones are kept. The plan's
  ``solver_padding`` is the bound :func:`solver_sizes` plans the solver sizes
  with (None: each factor size its own).
  """
  active = [s for s, f in enumerate(factors) if f.layout.factored_axes]
  stats = [stat for s in active for stat in factors[s].stats]
  bases = [basis for s in active for basis in factors[s].bases]
  masks = [due.units[s] for s in active for _ in factors[s].stats]
  # Per factor skipped where most are not due (staggered, padding slots);
  # one vmap per size on accelerators (on CPU, batched LAPACK calls inside a
  # larger program can wedge XLA's thread pool: lax.map there).
  skip = (partial or plan.sharding is not None
          or plan.refresh_phases is not None)
  batched = not skip and jax.default_backend() != 'cpu'

  def keep():
    solutions = [jax.vmap(lambda b: _solvers.keep_basis(None, b))(b)
                 for b in bases]
    return solutions, jnp.zeros([], jnp.int32)

  if stats:
    any_due = functools.reduce(jnp.logical_or, [jnp.any(m) for m in masks])
    # Planned on the real units (a mesh's padding slots not counted), so
    # that every layout of the tree solves at the same sizes.
    sizes = solver_sizes([
        jax.ShapeDtypeStruct((plan.stacks[s].size,) + stat.shape[1:],
                             stat.dtype)
        for s in active for stat in factors[s].stats], plan.solver_padding)
    def solve(solver):
      return functools.partial(
          _solve_due, solver, stats, bases, masks,
          plan.sharding, skip=skip, batched=batched, sizes=sizes)
    if method == 'eigh':
      body = solve(_solvers.solve_eigh)
    else:
      # The other due units' bases came from QR: matched to eigh's columns
      # by rank (an unsorted QR's columns are not in eigenvalue order).
      initializing = functools.reduce(jnp.logical_or, [
          jnp.any(due.initializing[s]) for s in active])
      body = lambda: jax.lax.cond(
          initializing, solve(_solvers.solve_eigh_by_rank),
          solve(_solvers.SOLVERS[method]))
    solutions, failures = jax.lax.cond(any_due, body, keep)
  else:
    solutions, failures = [], jnp.zeros([], jnp.int32)
  new_factors, values, orders = list(factors), [()] * len(factors), [
      ()] * len(factors)
  start = 0
  for s in active:
    mine = solutions[start:start + len(factors[s].bases)]
    start += len(mine)
    new_factors[s] = factors[s]._replace(
        bases=tuple(solution.basis for solution in mine))
    values[s] = tuple(solution.values for solution in mine)
    orders[s] = tuple(solution.order for solution in mine)
  return Refreshed(new_factors, values, orders, failures)
