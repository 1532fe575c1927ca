"""Adafactor (no first moment) in the eigenbasis of Shampoo's factors (a rule
of the skeleton, :mod:`soap_optax._skeleton`)."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _estimators
from soap_optax import _factored
from soap_optax import _floors
from soap_optax import _skeleton
from soap_optax import _state


class ScaleByAdafactorInEigenbasisState(NamedTuple):
  r"""State of :func:`scale_by_adafactor_in_eigenbasis`.

  Attributes:
    eigenbasis: the engine's factors :math:`GG_k` and bases :math:`Q_k`;
      ``eigenbasis.count`` is the number of calls so far.
    axis_stats: Adafactor's statistic :math:`s_k` for every (merged) axis
      without a Kronecker factor of every stack, ``(U, d_k)``, flat (a
      factored axis's :math:`s_k` is the engine's tracked
      ``eigenbasis.quotients``, the same numbers).

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.scale_by_adafactor_in_eigenbasis()
    >>> state = tx.init({'w': jnp.ones((3, 4)), 'b': jnp.ones(4)})
    >>> type(state).__name__
    'ScaleByAdafactorInEigenbasisState'
    >>> [x.shape for x in state.axis_stats]  # b's axis has no factor
    [(1, 4)]
  """

  eigenbasis: _state.EigenbasisState
  axis_stats: tuple[jax.Array, ...]


class _AdafactorStack(NamedTuple):
  axis_stats: tuple[jax.Array, ...]  # The axes without a factor.


@dataclasses.dataclass(frozen=True)
class _AdafactorRule(_skeleton.Rule):
  """Refresh, then Adafactor's step in the unit's (new) bases: a factored
  axis's statistic is the engine's tracked ``diag(Q_k^T GG_k Q_k)``."""

  b2: Any
  eps: Any
  rounding_floor: bool

  State = ScaleByAdafactorInEigenbasisState

  def init_stack(self, stack):
    return _AdafactorStack(tuple(
        jnp.zeros((stack.num_slots, d), stack.dtype)
        for d in stack.layout.unfactored(stack.layout.merged_shape)))

  def step(self, rotated, state, view):
    # A statistic of an axis without a factor does not depend on the other
    # axes' rotation; the others are re-estimated at every refresh.
    unfactored = tuple(self.b2 * s + (1 - self.b2) * new for s, new in zip(
        state.axis_stats, view.layout.unfactored(
            _factored.axis_sums_of_squares(rotated))))
    stats = view.layout.interleave(view.quotients, unfactored)
    if self.rounding_floor:
      stats = _floors.with_separable_rounding_floor(stats)
    second_moment = _factored.factored_second_moment(stats)
    return (rotated * _factored.inverse_power(second_moment + self.eps, 0.5),
            1, _AdafactorStack(unfactored))


def scale_by_adafactor_in_eigenbasis(
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-30,
    precondition_frequency: Any = 1,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    refresh: str = 'eigh',
    dimension_numbers: Any = None,
    block_size: int | None = None,
    bucket_padding: float | None = 0.1,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Adafactor (no first moment) run in the eigenbasis of Shampoo's factors.

  Per unit (a parameter, a slice along its batch axes or a block; see
  :func:`scale_by_rotated_adam`), with :math:`G' = \operatorname{rotate}(G)`
  in the current bases, per (merged) axis :math:`k`:

  .. math::

    s_k \leftarrow b_2 s_k + (1 - b_2) \sum_{\text{other axes}} G'^2, \qquad
    V = \frac{s_0 \otimes \cdots \otimes s_{N-1}}{(\sum s_0)^{N-1}}, \qquad
    U = \operatorname{unrotate}\big(G' \,(V + \epsilon)^{-1/2}\big)

  (for a matrix :math:`V = r c^\top / \sum r`; with ``rounding_floor`` each
  :math:`s_k` enters :math:`V` as :math:`s_k + (\kappa \varepsilon)^2 \sum
  s_k`, the separable rounding-noise floor, the same as
  :func:`scale_by_shampoo_eigenbasis`'s). The factors :math:`GG_k` use the
  same ``b2``. On a refresh (same schedule and order as
  :func:`scale_by_shampoo_eigenbasis`: statistics absorb the gradient, then
  the refresh, then the preconditioning) the statistic of each rotated axis
  is re-estimated in the new basis,
  :math:`s_k = \operatorname{diag}(Q_k^\top GG_k\, Q_k)`: after an ``eigh``
  refresh that is :math:`\Lambda_k`. Between refreshes the basis is fixed
  and the running average keeps
  :math:`s_k = \operatorname{diag}(Q_k^\top GG_k\, Q_k)` exactly, now with
  the *current* :math:`GG_k`, while Shampoo's :math:`\Lambda_k` stay frozen.

  Hence the identity: with ``precondition_frequency=1``, ``refresh="eigh"``,
  ``b2`` equal to Shampoo's ``shampoo_beta`` and ``eps=0``, the update equals
  ``scale_by_shampoo_eigenbasis(exponent=0.5, trace_normalize=True, eps=0)``:

  .. math::

    G'_{ij} \Big/ \sqrt{\Lambda_{L,i} \Lambda_{R,j} / \operatorname{tr} GG_L}

  is :math:`\text{Shampoo}^{1/2}` written in its eigenbasis. Axes without a
  Kronecker factor keep the identity basis (their :math:`s_k` is Shampoo's
  diagonal :math:`\Lambda_k`). :math:`V + \epsilon \le 0` gives a zero
  update for that entry.

  Args:
    b2: decay of the statistics and of the factors, in :math:`[0, 1)`.
    eps: added to :math:`V` inside the square root, :math:`\ge 0`.
    precondition_frequency: an integer, ``"adaptive"`` or an
      :class:`soap_optax.AdaptiveRefresh`.
    max_precond_dim: axes longer than this keep the identity basis.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor.
    refresh: ``"eigh"`` or ``"qr"``.
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
    rounding_floor: floor each statistic at the rotation's rounding level
      (above); the same rule as :func:`scale_by_shampoo_eigenbasis`'s, so the
      identity holds with it on.
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
    ...     soap_optax.scale_by_adafactor_in_eigenbasis(b2=0.95),
    ...     optax.scale_by_learning_rate(1e-3))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
    >>> new_params = optax.apply_updates(params, updates)
    >>> print(bool(loss(new_params) < loss(params)))
    True

  References:
    Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, 2024 (Section 3,
    the Shampoo–Adafactor identity); Shazeer and Stern, `Adafactor
    <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  config = _skeleton.EngineConfig.from_arguments(locals())
  _checks.check_arguments(locals(), betas=('b2',), nonnegative=('eps',))
  return _skeleton.eigenbasis_transform(
      _AdafactorRule(b2=b2, eps=eps, rounding_floor=rounding_floor), config,
      _estimators.Frobenius(b2),
      # The factored moment's total sums axis 0's floored statistics: the
      # floor added to padded (or, reordered, other) entries changes it.
      pads_exactly=not rounding_floor)
