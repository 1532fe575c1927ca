"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner (a rule of the
skeleton, :mod:`soap_optax._skeleton`)."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _factored
from soap_optax import _floors
from soap_optax import _kronecker
from soap_optax import _skeleton
from soap_optax import _state



class ScaleByRotatedAdamState(NamedTuple):
  """State of :func:`scale_by_rotated_adam`.

  Every array is stacked: one entry per :term:`stack` of same-shape
  :term:`units <unit>`, with a leading unit axis ``U``.

  Attributes:
    mu: first moment in the rotated basis, one ``(U, *merged_shape)`` array
      per stack, in ``mu_dtype``.
    nu: second moment in the rotated basis, shaped like ``mu``; with
      ``factored=True`` instead one ``(U, d_k)`` array per (merged) axis of
      each stack (Adafactor's row and column statistics).
    eigenbasis: the engine's factors and bases. ``eigenbasis.count - 1`` is the
      Adam step :math:`t` once the first call has initialized the
      preconditioner.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> state = soap_optax.scale_by_rotated_adam().init({'w': jnp.ones((3, 4))})
    >>> type(state).__name__
    'ScaleByRotatedAdamState'
    >>> state.mu[0].shape  # one stack, holding one 3 x 4 unit
    (1, 3, 4)
  """

  mu: tuple[jax.Array, ...]
  nu: tuple[jax.Array, ...]
  eigenbasis: _state.EigenbasisState


class ScaleByRotatedAdamKLState(NamedTuple):
  r"""State of :func:`scale_by_rotated_adam` with ``factor_estimator="kl"``
  (KL-SOAP): the fields of :class:`ScaleByRotatedAdamState` (``mu``, ``nu``,
  ``eigenbasis``), then the KL estimator's own.

  Attributes:
    eigenvalues: the KL estimator's eigenvalue estimates :math:`\lambda_k`
      (the same estimator as KL-Shampoo's), ``(U, d_k)`` per stack and
      (merged) axis, flat (see :func:`soap_optax.scale_by_kl_shampoo`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.scale_by_rotated_adam(factor_estimator='kl')
    >>> state = tx.init({'w': jnp.ones((3, 4))})
    >>> type(state).__name__
    'ScaleByRotatedAdamKLState'
    >>> [x.shape for x in state.eigenvalues]
    [(1, 3), (1, 4)]
  """

  mu: tuple[jax.Array, ...]
  nu: tuple[jax.Array, ...]
  eigenbasis: _state.EigenbasisState
  eigenvalues: tuple[jax.Array, ...]


class _RotatedAdamStack(NamedTuple):
  mu: jax.Array
  nu: tuple[jax.Array, ...]  # (v,), or (s_0, ..., s_{N-1}) when factored.


@dataclasses.dataclass(frozen=True)
class _RotatedAdamRule(_skeleton.Rule):
  """Adam's step in the unit's current bases; a refresh carries ``m`` into
  the new bases and permutes ``v`` with their columns."""

  b1: Any
  b2: Any
  eps: Any
  normalize_grads: bool
  factored: bool
  rounding_floor: bool
  mu_dtype: Any
  bias_correction: bool = True
  State: type = ScaleByRotatedAdamState

  carries_moments = True

  def init_stack(self, stack):
    units, shape = stack.num_slots, stack.layout.merged_shape
    nu = [(units, d) for d in shape] if self.factored else [(units, *shape)]
    return _RotatedAdamStack(
        mu=jnp.zeros((units, *shape), self.mu_dtype or stack.dtype),
        nu=tuple(jnp.zeros(s, stack.dtype) for s in nu))

  def step(self, rotated, state, view):
    b1, b2 = self.b1, self.b2
    mu = b1 * state.mu.astype(rotated.dtype) + (1 - b1) * rotated
    squares = (_factored.axis_sums_of_squares(rotated) if self.factored
               else (rotated**2,))
    nu = tuple(b2 * s + (1 - b2) * new for s, new in zip(state.nu, squares))
    second_moment = (_factored.factored_second_moment(nu) if self.factored
                     else nu[0])
    if self.rounding_floor:
      second_moment = second_moment + _floors.rounding_floor_squared(
          second_moment, view.layout, view.extent)
    direction = mu / (jnp.sqrt(second_moment) + self.eps)
    # The first call initialized: count - 1 earlier steps. t = inf: 1.
    t = view.count if self.bias_correction else jnp.inf
    scale = (jnp.sqrt(1 - b2**t) / (1 - b1**t)).astype(rotated.dtype)
    if self.normalize_grads:  # Normalized first, bias-corrected after.
      scale = scale / (1e-30 + jnp.sqrt(
          _kronecker.unit_mean(jnp.square(direction), view.extent)))
    return direction, scale, _RotatedAdamStack(mu.astype(state.mu.dtype), nu)

  def on_refresh(self, state, change):
    """``m`` carried exactly into the new bases; ``v`` (or each factored
    axis's statistic) permuted with the columns, not rotated."""
    nu = (change.per_axis(state.nu) if self.factored
          else (change.permuted(state.nu[0]),))
    return _RotatedAdamStack(mu=change.tensor(state.mu), nu=nu)


def scale_by_rotated_adam(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    one_sided: bool = False,
    factored: bool = False,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    bucket_padding: float | None = 0.1,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
    refresh: str | None = None,
    factor_estimator: str = 'frobenius',
    bias_correction: bool | None = None,
    initial_eigenvalue: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformation:
  r"""Adam run in the eigenbasis of Shampoo's preconditioner (SOAP).

  Per unit (a parameter, or one slice along its batch axes or one block of it:
  see ``dimension_numbers`` and ``block_size``), with :math:`\beta` the
  factors' decay (``shampoo_beta``, or ``b2`` when it is ``None``) and the
  Kronecker factors :math:`GG_i` and bases :math:`Q_i` (see :term:`factor`,
  :term:`basis`):

  * first accepted call (initialization): :math:`GG_i = (1 - \beta)\,
    C_i(G)`, :math:`Q_i = \operatorname{eigh}(GG_i)`; the update is zero;
  * every later call, with :math:`G' = \operatorname{rotate}(G)` in the
    current bases and :math:`t` the number of calls before this one:

    .. math::

      m &\leftarrow b_1 m + (1 - b_1) G', \qquad
      v \leftarrow b_2 v + (1 - b_2) G'^2 \\
      D &= \operatorname{unrotate}\Big(\frac{m}{\sqrt{v + f^2} + \epsilon}
        \Big), \qquad
      U = \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}\, D

    (:math:`U = D` without ``bias_correction``, KL-SOAP's default) where, if
    ``normalize_grads``, :math:`D \leftarrow D / (10^{-30} +
    \operatorname{rms}(D))` first (the authors' order: normalized, then
    bias-corrected), and :math:`f^2` is the rounding-noise floor
    (:doc:`/numerics`) (``rounding_floor=True``; 0 otherwise); then
    :math:`GG_i \leftarrow \beta\, GG_i + (1 - \beta)\, C_i(G)` (a step's
    own gradient never shapes the basis it is preconditioned in); and when
    ``t % precondition_frequency == 0`` every basis is refreshed
    (``refresh="qr"``: power iteration + QR, columns sorted by
    :math:`\operatorname{diag}(Q_i^\top GG_i\, Q_i)`; ``"qr_unsorted"``:
    without the sort; ``"eigh"``: eigenvectors by decreasing eigenvalue);
    :math:`v` is permuted with the columns (unsorted: left in place),
    :math:`m` is carried exactly into the new basis:
    :math:`m \leftarrow \operatorname{rotate}_{\text{new}}\big(
    \operatorname{unrotate}_{\text{old}}(m)\big)`.

  ``eps`` is added to the *uncorrected* :math:`\sqrt{v}`, as in the authors'
  implementation (:func:`optax.scale_by_adam` adds it to the corrected one).

  With ``factored=True`` (factorized SOAP) :math:`v` is replaced by
  Adafactor's estimate built from one running statistic per (merged) axis,
  :math:`s_k \leftarrow b_2 s_k + (1 - b_2) \sum_{\text{other axes}} G'^2`
  (for a matrix the row and column averages),
  :math:`v = (s_0 \otimes \cdots \otimes s_{N-1}) / (\sum s_0)^{N-1}`; at a
  refresh each :math:`s_k` is permuted with its basis, as :math:`v` would be.

  State for an :math:`m \times n` matrix: :math:`m` and :math:`v`
  (:math:`2mn`; :math:`mn + m + n` when factored) plus :math:`GG` and
  :math:`Q` for each rotated axis (:math:`2m^2 + 2n^2`; only
  :math:`2 \min(m, n)^2` one-sided), plus the engine's tracked
  :math:`\operatorname{diag}(Q^\top GG\, Q)` (:math:`m + n`) and two
  counters per unit. Cost per step: about :math:`6 m n (m + n)` flops
  (4 rotations, 2 factor products); a refresh adds about
  :math:`\tfrac{14}{3} (m^3 + n^3)` every ``precondition_frequency`` steps.
  Statistics, bases and moments are float32, or the parameter dtype where
  that is wider; updates come out in the gradient's dtype.

  Args:
    b1: decay of the first moment, in :math:`[0, 1)`.
    b2: decay of the second moment, in :math:`[0, 1)`.
    shampoo_beta: decay of the Kronecker factors, in :math:`[0, 1)`;
      ``None`` uses ``b2``.
    eps: added to :math:`\sqrt{v}`, :math:`\ge 0`.
    precondition_frequency: the refresh schedule: an integer, ``"adaptive"``
      or an :class:`soap_optax.AdaptiveRefresh`.
    max_precond_dim: axes longer than this keep the identity basis.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor.
    normalize_grads: divide each unit's update by its RMS.
    one_sided: rotate only the shortest axis of each unit.
    factored: keep Adafactor's factored second moment instead of ``v``.
    mu_dtype: dtype of the first moment (e.g. ``jnp.bfloat16``); ``None``
      keeps the statistics' dtype. The arithmetic is done in the statistics'
      dtype, as in :func:`optax.scale_by_adam`.
    dimension_numbers: batch axes (and matrix axes) per parameter.
    block_size: cut longer axes into blocks with their own factors.
    bucket_padding: let units of different shapes share one stack, and so
      one compiled program, padded with zeros, when padding adds at most
      this fraction of a unit's work (``None`` or 0: one stack per shape);
      it also bounds the refresh work added by solving factors of several
      sizes at one padded solver size (one solver program each); no number
      changes (see :ref:`engine-options`).
    staggered_refresh: spread the refreshes over ``precondition_frequency``
      calls.
    rounding_floor: divide by :math:`\sqrt{v + f^2}` (above); ``False``
      reproduces the reference's float32 behaviour.
    mesh: a :class:`jax.sharding.Mesh` to divide the state and work over.
    shard_axes: the mesh axes to divide over (``None``: all).
    refresh: the solver of later refreshes: ``"qr"`` (power iteration + QR,
      columns sorted: the SOAP authors'), ``"qr_unsorted"`` (the same
      without the sort: the KL-SOAP authors') or ``"eigh"``; ``None``: the
      authors' choice for ``factor_estimator`` (``"qr"`` for
      ``"frobenius"``, ``"qr_unsorted"`` for ``"kl"``).
    factor_estimator: ``"frobenius"``: the factors above (the paper's
      SOAP); ``"kl"``: KL-SOAP, the factors estimated by the KL rule of
      :func:`soap_optax.scale_by_kl_shampoo` (each absorbs
      :math:`\frac{d_k}{n} C_k\big(G \times_{j \neq k} \Lambda_j^{-1/2}
      Q_j^\top\big)`, with the running eigenvalue estimates
      :math:`\lambda_j`, started at ``initial_eigenvalue``, kept in
      ``state.eigenvalues``), Adam's step unchanged. With the defaults this
      is the authors' KL-SOAP (Lin et al.'s ``KLOpt(using_klsoap=True)``):
      unsorted QR refreshes and no bias correction.
    bias_correction: multiply by :math:`\sqrt{1 - b_2^t} / (1 - b_1^t)`
      (above); ``None``: the authors' choice, ``True`` for SOAP, ``False``
      for KL-SOAP (whose authors' first update is then
      :math:`(1 - b_1) / \sqrt{1 - b_2}` of the corrected one's size: 0.22
      at :math:`b_1 = b_2 = 0.95`).
    initial_eigenvalue: KL-SOAP's (``factor_estimator="kl"``) starting
      eigenvalue estimate, :math:`> 0` (``None``: 0.1, the authors'
      ``init_factor``);
      an error with ``"frobenius"``, which keeps no estimates.

  The engine options (``precondition_frequency`` to ``shard_axes``, and
  ``refresh``) are described in full in
  :ref:`engine-options`.

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = optax.chain(
    ...     soap_optax.scale_by_rotated_adam(b1=0.95, b2=0.95),
    ...     optax.scale_by_learning_rate(3e-3))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> type(state[0]).__name__
    'ScaleByRotatedAdamState'
    >>> grads = {'w': jnp.full((3, 4), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> print(bool(jnp.all(updates['w'] == 0)))  # the first call initializes
    True

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithm 3; one-sided and
    factorized variants: Section 7); Lin et al., `Understanding and Improving
    Shampoo and SOAP via Kullback-Leibler Minimization
    <https://arxiv.org/abs/2509.03378>`_, 2025 (KL-SOAP).
  """
  _checks.check_arguments(
      locals(), betas=('b1', 'b2', 'shampoo_beta'), nonnegative=('eps',),
      bools=('normalize_grads', 'factored'), optional=('shampoo_beta',))
  estimator, refresh, bias_correction = _skeleton.estimator_of(locals())
  config = _skeleton.EngineConfig.from_arguments(locals())
  rule = _RotatedAdamRule(
      b1=b1, b2=b2, eps=eps, factored=factored, bias_correction=bias_correction,
      normalize_grads=normalize_grads, rounding_floor=rounding_floor,
      mu_dtype=_checks.check_float_dtype('mu_dtype', mu_dtype),
      State=(ScaleByRotatedAdamKLState if factor_estimator == 'kl'
             else ScaleByRotatedAdamState))
  return _skeleton.eigenbasis_transform(rule, config, estimator)
