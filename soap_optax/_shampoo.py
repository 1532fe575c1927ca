"""Shampoo, computed through the eigenbasis of its Kronecker factors (a rule of
the skeleton, :mod:`soap_optax._skeleton`)."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _estimators
from soap_optax import _factored
from soap_optax import _floors
from soap_optax import _refresh
from soap_optax import _skeleton
from soap_optax import _state


class ScaleByShampooEigenbasisState(NamedTuple):
  r"""State of :func:`scale_by_shampoo_eigenbasis`.

  Attributes:
    eigenbasis: the engine's factors :math:`GG_k` and bases :math:`Q_k`;
      ``eigenbasis.count`` is the number of calls so far.
    diagonals: running :math:`\operatorname{diag}(GG_k)` for every axis
      without a Kronecker factor, ``(U, d_k)`` per stack and axis, flat
      (stacks in plan order, axes in order).
    eigenvalues: :math:`\Lambda_k` for every (merged) axis of every stack,
      ``(U, d_k)``, flat, from the last refresh (held fixed between
      refreshes).
    damping: with ``precondition_frequency=FoamRefresh(...)``, FOAM's
      damping :math:`\varepsilon` of every factor, ``(U,)`` per stack and
      factored axis, flat like the engine's factors (``eps`` after a
      refresh); otherwise empty.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.scale_by_shampoo_eigenbasis()
    >>> state = tx.init({'w': jnp.ones((3, 4))})
    >>> type(state).__name__
    'ScaleByShampooEigenbasisState'
    >>> [x.shape for x in state.eigenvalues]
    [(1, 3), (1, 4)]
  """

  eigenbasis: _state.EigenbasisState
  diagonals: tuple[jax.Array, ...]
  eigenvalues: tuple[jax.Array, ...]
  damping: tuple[jax.Array, ...] = ()


class _ShampooStack(NamedTuple):
  diagonals: tuple[jax.Array, ...]
  eigenvalues: tuple[jax.Array, ...]
  damping: tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class _ShampooRule(_skeleton.Rule):
  """Refresh, then ``G ×_k P_k`` in the unit's (new) bases."""

  beta: Any
  exponent: Any
  eps: Any
  trace_normalize: bool
  rounding_floor: bool
  rayleigh_floor: bool
  foam: bool

  State = ScaleByShampooEigenbasisState

  def init_stack(self, stack):
    layout, units = stack.layout, stack.num_slots
    per_axis = tuple(jnp.zeros((units, d), stack.dtype)
                     for d in layout.merged_shape)
    return _ShampooStack(
        diagonals=layout.unfactored(per_axis), eigenvalues=per_axis,
        damping=tuple(jnp.full((units,), self.eps, stack.dtype)
                      for _ in layout.factored_axes) if self.foam else ())

  def step(self, rotated, state, view):
    beta, layout, due = self.beta, view.layout, view.due
    diagonals = tuple(beta * d + (1 - beta) * new for d, new in zip(
        state.diagonals,
        layout.unfactored(_factored.axis_sums_of_squares(rotated))))
    values = tuple(jnp.where(due, new, old) for new, old in zip(
        layout.interleave(view.values, diagonals), state.eigenvalues))
    damping = tuple(jnp.where(due, jnp.asarray(self.eps, d.dtype), d)
                    for d in state.damping)
    floored = values
    if self.rayleigh_floor:  # The current factors' Rayleigh quotients.
      floored = tuple(jnp.maximum(v, r) for v, r in zip(
          floored, layout.interleave(view.quotients, diagonals)))
    if self.rounding_floor:
      floored = _floors.with_separable_rounding_floor(floored)
    shifts = layout.interleave(damping or (self.eps,) * len(view.values),
                               (self.eps,) * len(diagonals))
    scaled = rotated * _factored.outer_product([
        _factored.inverse_power(v + shift, self.exponent)
        for v, shift in zip(floored, shifts)])
    trace = jnp.maximum(jnp.sum(floored[0]), 0.0)
    scale = (trace ** ((len(floored) - 1) * self.exponent)
             if self.trace_normalize else 1)
    return scaled, scale, _ShampooStack(diagonals, values, damping)


def scale_by_shampoo_eigenbasis(
    shampoo_beta: jax.typing.ArrayLike = 0.95,
    exponent: jax.typing.ArrayLike = 0.5,
    eps: jax.typing.ArrayLike = 1e-12,
    precondition_frequency: Any = 1,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    trace_normalize: bool = True,
    refresh: str = 'eigh',
    dimension_numbers: Any = None,
    block_size: int | None = None,
    bucket_padding: float | None = 0.1,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    rayleigh_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Shampoo, computed through the eigenbasis of its Kronecker factors.

  For each unit (a parameter, a slice along its batch axes or a block; see
  :func:`scale_by_rotated_adam`) with (merged) axes :math:`k = 0, \dots,
  N-1`, factors :math:`GG_k \leftarrow \beta\, GG_k + (1 - \beta)\, C_k(G)`,
  bases :math:`Q_k` and eigenvalue estimates :math:`\Lambda_k` from the last
  refresh:

  .. math::

    U = G \times_0 P_0 \times_1 P_1 \cdots \times_{N-1} P_{N-1}
        \cdot T^{(N-1)\,e}, \qquad
    P_k = Q_k\,(\Lambda_k + \epsilon)^{-e}\,Q_k^\top

  with :math:`e` = ``exponent`` and, when ``trace_normalize``,
  :math:`T = \sum \Lambda_0` (:math:`= \operatorname{tr} GG_k` at the
  refresh, the same for every :math:`k`); without it the :math:`T` factor
  is 1. For a matrix with ``exponent=0.5`` this is

  .. math::

    U = Q_L (\Lambda_L + \epsilon)^{-1/2} Q_L^\top\, G\, Q_R
        (\Lambda_R + \epsilon)^{-1/2} Q_R^\top \sqrt{\operatorname{tr} GG_L},

  i.e. :math:`H^{-1/2} g` with
  :math:`H = (GG_L \otimes GG_R) / \operatorname{tr}(GG_L)`: the SOAP
  paper's :math:`\text{Shampoo}^{1/2}`. ``exponent=0.25`` without
  normalization is classic Shampoo. Non-positive :math:`\Lambda + \epsilon`
  is given a zero inverse power (a pseudo-inverse).

  An axis without a Kronecker factor (longer than ``max_precond_dim``, 1-D
  without ``precondition_1d``, a scalar seen as ``(1,)``) uses the identity
  basis with :math:`\Lambda_k = \operatorname{diag}(GG_k)`, the running sum
  of :math:`G^2` over the other axes, so every axis is preconditioned.

  Two safeguards, on by default and negligible where Shampoo is well posed:

  * ``rayleigh_floor``: between refreshes each :math:`\Lambda_k` is used as
    :math:`\max(\Lambda_k, R_k)` with
    :math:`R_k = \operatorname{diag}(Q_k^\top GG_k\, Q_k)`, the Rayleigh
    quotients of the *current* factor in the current basis (the engine's
    tracked ``eigenbasis.quotients``, kept exactly at no extra product as
    :math:`R_k \leftarrow \beta R_k + (1 - \beta) \sum_{\text{other axes}}
    G'^2`, :math:`R_k = \Lambda_k` on a refresh call; on an axis without a
    factor, its running diagonal). Frozen eigenvalues of a factor that was
    rank-deficient at its last refresh are otherwise near zero in directions
    the new gradients do reach, and the update explodes until the next
    refresh.
  * ``rounding_floor``: :math:`\Lambda_k + (\kappa \varepsilon)^2 \sum
    \Lambda_k`, the separable form of :func:`scale_by_rotated_adam`'s
    rounding-noise floor (see :doc:`/numerics`).

  Order within a call (the rule shared with
  :func:`scale_by_adafactor_in_eigenbasis`): the statistics absorb the current
  gradient first; then, on a refresh call (the call index :math:`c`,
  0-based, satisfies ``c % precondition_frequency == 0``; a unit's first
  accepted call always, with ``eigh``), :math:`Q_k` and :math:`\Lambda_k`
  are recomputed from them; then the gradient is preconditioned.

  Args:
    shampoo_beta: decay of the factors, in :math:`[0, 1)`.
    exponent: the inverse power :math:`e` (0.5: :math:`\text{Shampoo}^{1/2}`;
      0.25: classic).
    eps: added to the eigenvalues, :math:`\ge 0`.
    precondition_frequency: an integer, ``"adaptive"`` /
      :class:`soap_optax.AdaptiveRefresh`, or a
      :class:`soap_optax.FoamRefresh`: FOAM's rule, every ``check_interval``
      calls a damping :math:`\varepsilon_k` per factor, used instead of
      ``eps`` (which is its base value :math:`\varepsilon_0`), is raised
      with the measured staleness, and a stack is decomposed afresh when one
      of its :math:`\varepsilon_k` passes ``max_damping``; its
      :math:`\varepsilon_k` then go back to ``eps``.
    max_precond_dim: axes longer than this get a diagonal preconditioner.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a full factor.
    trace_normalize: multiply by :math:`T^{(N-1) e}` (see above).
    refresh: ``"eigh"`` or ``"qr"`` (power iteration + QR warm-started from
      the current basis, with
      :math:`\Lambda = \operatorname{diag}(Q^\top GG\, Q)`).
    dimension_numbers: batch axes per parameter.
    block_size: cut longer axes into blocks.
    bucket_padding: let units of different shapes share one stack, and so
      one compiled program, padded with zeros, when padding adds at most
      this fraction of a unit's work (``None`` or 0: one stack per shape);
      it also bounds the refresh work added by solving factors of several
      sizes at one padded solver size (one solver program each); no number
      changes (see :ref:`engine-options`).
    staggered_refresh: spread the refreshes over the ``precondition_frequency``
      calls.
    rounding_floor: add the rounding-noise floor to the eigenvalues (above).
    rayleigh_floor: never use an eigenvalue below its current Rayleigh
      quotient (above); ``False`` is classic Shampoo.
    mesh: divide the state and the work over this :class:`jax.sharding.Mesh`.
    shard_axes: the mesh axis (or axes) to divide over; ``None``: all.

  The engine options are described in full in
  :ref:`engine-options`.

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> def loss(params):
    ...   return jnp.sum((params['w'] - jnp.eye(3, 4))**2)
    >>> tx = optax.chain(
    ...     soap_optax.scale_by_shampoo_eigenbasis(exponent=0.25),
    ...     optax.scale_by_learning_rate(1e-3))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
    >>> new_params = optax.apply_updates(params, updates)
    >>> print(bool(loss(new_params) < loss(params)))
    True

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018; Vyas et al., `SOAP
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Section 3).
  """
  config = _skeleton.EngineConfig.from_arguments(locals(), foam_allowed=True)
  _checks.check_arguments(
      locals(), betas=('shampoo_beta',), nonnegative=('exponent', 'eps'),
      bools=('trace_normalize', 'rayleigh_floor'))
  foam = (config.schedule
          if isinstance(config.schedule, _refresh.FoamRefresh) else None)
  rule = _ShampooRule(
      beta=shampoo_beta, exponent=exponent, eps=eps,
      trace_normalize=trace_normalize, rounding_floor=rounding_floor,
      rayleigh_floor=rayleigh_floor, foam=foam is not None)
  return _skeleton.eigenbasis_transform(
      rule, config, _estimators.Frobenius(shampoo_beta),
      # FOAM's norms count the padded eigenvalues; the trace is axis 0's
      # (another axis for a reordered unit) and sums the padding's floor.
      pads_exactly=foam is None and not trace_normalize,
      decide=None if foam is None else _refresh.foam_decision(
          foam, exponent=exponent, base_damping=eps))
