"""KL-Shampoo: Shampoo's factors estimated by KL minimization (a rule of the
skeleton, :mod:`soap_optax._skeleton`)."""

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

EIGENVALUE_MODES = ('running', 'refresh')


class ScaleByKLShampooState(NamedTuple):
  """State of :func:`scale_by_kl_shampoo`.

  Attributes:
    mu: the momentum in the rotated basis, one ``(U, *merged_shape)`` array
      per stack, in ``mu_dtype``.
    eigenvalues: ``λ_k`` for every (merged) axis of every stack, ``(U, d_k)``,
      flat (stacks in plan order, axes in order).
    eigenbasis: the engine's factors ``S_k`` and bases ``Q_k``;
      ``eigenbasis.count`` is the number of calls so far.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> state = soap_optax.scale_by_kl_shampoo().init({'w': jnp.ones((3, 4))})
    >>> type(state).__name__
    'ScaleByKLShampooState'
    >>> [x.shape for x in state.eigenvalues]
    [(1, 3), (1, 4)]
  """

  mu: tuple[jax.Array, ...]
  eigenvalues: tuple[jax.Array, ...]
  eigenbasis: _state.EigenbasisState


class _KLShampooStack(NamedTuple):
  mu: jax.Array


@dataclasses.dataclass(frozen=True)
class _KLShampooRule(_skeleton.Rule):
  """Momentum preconditioned by ``⊗ (Q_k Λ_k Q_k^T)^{-1/2}`` in the old
  bases (the KL estimator keeps the ``λ_k`` and updates them after)."""

  b1: Any
  eps: Any
  rounding_floor: bool
  mu_dtype: Any

  State = ScaleByKLShampooState
  carries_moments = True

  def init_stack(self, stack):
    shape = (stack.num_slots,) + stack.layout.merged_shape
    return _KLShampooStack(jnp.zeros(shape, self.mu_dtype or stack.dtype))

  def step(self, rotated, state, view):
    mu = self.b1 * state.mu.astype(rotated.dtype) + (1 - self.b1) * rotated
    values = view.estimates.eigenvalues
    if self.rounding_floor:
      values = _floors.with_separable_rounding_floor(values)
    whitening = _factored.outer_product([jnp.sqrt(v) for v in values])
    return (mu / (whitening + self.eps), 1,
            _KLShampooStack(mu.astype(state.mu.dtype)))

  def on_refresh(self, state, change):
    """``m`` carried exactly into the new bases."""
    return _KLShampooStack(change.tensor(state.mu))


def scale_by_kl_shampoo(
    b1: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    initial_eigenvalue: jax.typing.ArrayLike = (
        _estimators.KL_INITIAL_EIGENVALUE),
    eigenvalues: str = 'running',
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    one_sided: bool = False,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
    refresh: str = 'qr_unsorted',
) -> optax.GradientTransformation:
  r"""KL-Shampoo: Shampoo with its factors estimated by KL minimization.

  Lin et al. read Shampoo's factors as a Kronecker-structured covariance
  ``S = S_0 ⊗ ... ⊗ S_{N-1}`` of the gradient and fit all of them jointly by
  minimizing ``KL(E[g g^T], S)``. The fixed point couples the factors: each
  accumulates the gradient whitened by the others. For a unit of size ``n``
  (a parameter, a slice along its batch axes or a block: see
  :func:`scale_by_rotated_adam`) with (merged) axes ``k`` of length ``d_k``:

  .. math::

    S_k \leftarrow β S_k + (1 - β)\, \frac{d_k}{n}\,
        G_{(k)} \Big(\bigotimes_{j \neq k} S_j^{-1}\Big) G_{(k)}^T

  (for a matrix, ``S_L <- β S_L + (1 - β) G S_R^{-1} G^T / d_R`` and the same
  for ``S_R``), and the update preconditions the momentum by
  ``S^{-1/2} = ⊗ S_k^{-1/2}``. No Adam moments and no grafting.

  The practical algorithm (the authors', at SOAP's cost per step) keeps a
  basis ``Q_k`` per factor, refreshed every ``precondition_frequency`` calls
  by power iteration and QR warm-started from the current one, and
  eigenvalue estimates ``λ_k`` in it, ``S_k^{-1} ≈ Q_k diag(λ_k)^{-1}
  Q_k^T``. With ``G' = rotate(G)`` in the current bases:

  * first accepted call (initialization): ``S_k = (1 - β) d_k/n C_k(G)``,
    ``Q_k = eigh(S_k)``, ``λ_k = initial_eigenvalue``; the update is zero;
  * every later call ``t`` (the number of calls before it), all right-hand
    sides from before the call:

    .. math::

      m &\leftarrow b_1 m + (1 - b_1) G', \qquad
      U = unrotate\Big(\frac{m}{\bigotimes_k \sqrt{λ_k} + \epsilon}\Big) \\
      λ_k &\leftarrow \max\Big(β λ_k + (1 - β)\,
          \operatorname{mean}_{i_{j \neq k}} \frac{G'^2}{\prod_{j \neq k}
          λ_j},\ c_k^{-2}\Big)

    (the second term is ``diag(Q_k^T C_k Q_k)`` of the factor's increment
    ``C_k``), ``S_k`` absorbs ``C_k`` as above, and when
    ``t % precondition_frequency == 0`` the bases are refreshed by one
    power-iteration step and QR, ``Q_k <- qr(S_k Q_k).Q``, without a sort
    (``refresh="qr"`` sorts the columns by ``diag(Q_k^T S_k Q_k)`` first and
    permutes the estimates with them); ``m`` is carried exactly into the new
    bases. ``c_k = clip(d_k, 10, 4000)``: the authors' clamp of
    ``λ^{-1/2}``.

  With the defaults this is the authors' ``KLOpt`` (``yorkerlin/KL-Methods``,
  ``optim/kl_opt.py``) on matrices, to float64 rounding
  (``tests/test_kl_authors.py``). On 3-D parameters the library updates
  every factor and estimate from the values before the call (the paper's
  joint fixed point); the authors' code updates some of them in sequence
  (see the KL section of the docs' algorithm notes).

  An axis without a factor (longer than ``max_precond_dim``, 1-D without
  ``precondition_1d``, the longer ones with ``one_sided``) keeps the identity
  basis, and its ``λ_k`` is the exact diagonal factor. A 1-D parameter then
  gets ``m / (sqrt(λ) + eps)`` with ``λ`` the running average of ``g^2``
  (decay ``shampoo_beta``) from before the call, started at
  ``initial_eigenvalue``: Adam without bias corrections, its second moment
  one call behind.

  With ``eigenvalues="refresh"`` the factored axes' ``λ_k`` are instead the
  refresh's eigenvalues (or Rayleigh quotients after QR), floored as above
  and held between refreshes; with ``precondition_frequency=1, refresh="eigh"`` this is the
  idealized KL-Shampoo (exact ``S_k`` every call, preconditioning with the
  factors from before the call).

  State for an ``m x n`` matrix: ``m`` (``mn``), ``S`` and ``Q`` per rotated
  axis (``2m^2 + 2n^2``), ``λ`` (``m + n``) and the engine's tracked
  ``diag(Q^T S Q)`` (``m + n``): SOAP's less its ``v`` (``mn``), plus
  ``m + n``.

  Args:
    b1: decay of the momentum, in [0, 1).
    shampoo_beta: ``β``, the decay of the factors and of the estimates.
    eps: added to ``⊗ sqrt(λ_k)``, >= 0.
    initial_eigenvalue: the estimates' starting value, > 0 (the authors'
      ``init_factor``).
    eigenvalues: ``"running"`` (the practical algorithm) or ``"refresh"``
      (above).
    precondition_frequency: refresh the bases every this many calls, or
      ``"adaptive"`` / an :class:`soap_optax.AdaptiveRefresh`.
    max_precond_dim: axes longer than this keep the identity basis.
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor.
    one_sided: a factor only on the shortest axis of each unit.
    mu_dtype: dtype of the momentum; ``None`` keeps the statistics' dtype.
    dimension_numbers: batch axes per parameter.
    block_size: cut longer axes into blocks with their own factors.
    staggered_refresh: spread the refreshes over the ``precondition_frequency``
      calls.
    rounding_floor: ``λ_k + (κ ε)^2 sum(λ_k)`` in the update (the
      separable rounding-noise floor; see :doc:`/numerics`).
    mesh: a ``jax.sharding.Mesh`` to divide the state and work over.
    shard_axes: the mesh axes to divide over (``None``: all).
    refresh: ``"qr_unsorted"`` (the authors': ``qr(S_k Q_k)``, columns and
      estimates left in place), ``"qr"`` (SOAP's: the columns sorted by
      ``diag(Q_k^T S_k Q_k)`` and the estimates permuted with them) or
      ``"eigh"``.

  The engine options are described in full in
  :ref:`engine-options`.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = optax.chain(soap_optax.scale_by_kl_shampoo(b1=0.95),
    ...                  optax.scale_by_learning_rate(3e-3))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> type(state[0]).__name__
    'ScaleByKLShampooState'
    >>> grads = {'w': jnp.full((3, 4), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> print(bool(jnp.all(updates['w'] == 0)))  # the first call initializes
    True

  References:
    Lin, Lowe, Dangel, Eschenhagen, Xu and Grosse, `Understanding and
    Improving Shampoo and SOAP via Kullback-Leibler Minimization
    <https://arxiv.org/abs/2509.03378>`_, ICLR 2026.
  """
  config = _skeleton.EngineConfig.from_arguments(locals())
  _checks.check_arguments(
      locals(), betas=('b1', 'shampoo_beta'), nonnegative=('eps',),
      positive=('initial_eigenvalue',),
      choices={'eigenvalues': EIGENVALUE_MODES})
  rule = _KLShampooRule(
      b1=b1, eps=eps, rounding_floor=rounding_floor,
      mu_dtype=_checks.check_float_dtype('mu_dtype', mu_dtype))
  return _skeleton.eigenbasis_transform(rule, config, _estimators.KL(
      shampoo_beta, initial_eigenvalue, running=eigenvalues == 'running'))
