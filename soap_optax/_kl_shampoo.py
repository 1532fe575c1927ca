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
  r"""State of :func:`scale_by_kl_shampoo`.

  Attributes:
    mu: the momentum in the rotated basis, one ``(U, *merged_shape)`` array
      per stack, in ``mu_dtype``.
    eigenvalues: :math:`\lambda_k` for every (merged) axis of every stack,
      ``(U, d_k)``, flat (stacks in plan order, axes in order).
    eigenbasis: the engine's factors :math:`S_k` and bases :math:`Q_k`;
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
  :math:`S = S_0 \otimes \cdots \otimes S_{N-1}` of the gradient and fit all
  of them jointly by minimizing
  :math:`\operatorname{KL}(\mathbb{E}[g g^\top], S)`. The fixed point couples
  the factors: each accumulates the gradient whitened by the others. For a
  unit of size :math:`n` (a parameter, a slice along its batch axes or a
  block: see :func:`scale_by_rotated_adam`) with (merged) axes :math:`k` of
  length :math:`d_k`:

  .. math::

    S_k \leftarrow \beta S_k + (1 - \beta)\, \frac{d_k}{n}\,
        G_{(k)} \Big(\bigotimes_{j \neq k} S_j^{-1}\Big) G_{(k)}^\top

  (for a matrix, :math:`S_L \leftarrow \beta S_L + (1 - \beta)\, G S_R^{-1}
  G^\top / d_R` and the same for :math:`S_R`), and the update preconditions
  the momentum by :math:`S^{-1/2} = \bigotimes_k S_k^{-1/2}`. No Adam
  moments and no grafting.

  The practical algorithm (the authors', at SOAP's cost per step) keeps a
  basis :math:`Q_k` per factor, refreshed every ``precondition_frequency``
  calls by power iteration and QR warm-started from the current one, and
  eigenvalue estimates :math:`\lambda_k` in it,
  :math:`S_k^{-1} \approx Q_k \operatorname{diag}(\lambda_k)^{-1} Q_k^\top`.
  With :math:`G' = \operatorname{rotate}(G)` in the current bases:

  * first accepted call (initialization):
    :math:`S_k = (1 - \beta) \frac{d_k}{n} C_k(G)`,
    :math:`Q_k = \operatorname{eigh}(S_k)`, :math:`\lambda_k` =
    ``initial_eigenvalue``; the update is zero;
  * every later call :math:`t` (the number of calls before it), all
    right-hand sides from before the call:

    .. math::

      m &\leftarrow b_1 m + (1 - b_1) G', \qquad
      U = \operatorname{unrotate}\Big(\frac{m}{\bigotimes_k
        \sqrt{\lambda_k} + \epsilon}\Big) \\
      \lambda_k &\leftarrow \max\Big(\beta \lambda_k + (1 - \beta)\,
          \operatorname{mean}_{i_{j \neq k}} \frac{G'^2}{\prod_{j \neq k}
          \lambda_j},\ c_k^{-2}\Big)

    (the second term is :math:`\operatorname{diag}(Q_k^\top C_k Q_k)` of the
    factor's increment :math:`C_k`), :math:`S_k` absorbs :math:`C_k` as
    above, and when ``t % precondition_frequency == 0`` the bases are
    refreshed by one power-iteration step and QR, :math:`Q_k \leftarrow Q`
    from :math:`Q R = S_k Q_k`, without a sort (``refresh="qr"`` sorts the
    columns by :math:`\operatorname{diag}(Q_k^\top S_k Q_k)` first and
    permutes the estimates with them); :math:`m` is carried exactly into the
    new bases. :math:`c_k = \operatorname{clip}(d_k, 10, 4000)`: the
    authors' clamp of :math:`\lambda^{-1/2}`.

  With the defaults this is the authors' ``KLOpt`` (``yorkerlin/KL-Methods``,
  ``optim/kl_opt.py``) on matrices, to float64 rounding
  (``tests/test_kl_authors.py``). On 3-D parameters the library updates
  every factor and estimate from the values before the call (the paper's
  joint fixed point); the authors' code updates some of them in sequence
  (see the KL section of the docs' algorithm notes).

  An axis without a factor (longer than ``max_precond_dim``, 1-D without
  ``precondition_1d``, the longer ones with ``one_sided``) keeps the identity
  basis, and its :math:`\lambda_k` is the exact diagonal factor. A 1-D
  parameter then gets :math:`m / (\sqrt{\lambda} + \epsilon)` with
  :math:`\lambda` the running average of :math:`g^2` (decay
  ``shampoo_beta``) from before the call, started at
  ``initial_eigenvalue``: Adam without bias corrections, its second moment
  one call behind.

  With ``eigenvalues="refresh"`` the factored axes' :math:`\lambda_k` are
  instead the refresh's eigenvalues (or Rayleigh quotients after QR),
  floored as above and held between refreshes; with
  ``precondition_frequency=1, refresh="eigh"`` this is the idealized
  KL-Shampoo (exact :math:`S_k` every call, preconditioning with the
  factors from before the call).

  State for an :math:`m \times n` matrix: :math:`m` (:math:`mn`), :math:`S`
  and :math:`Q` per rotated axis (:math:`2m^2 + 2n^2`), :math:`\lambda`
  (:math:`m + n`) and the engine's tracked
  :math:`\operatorname{diag}(Q^\top S Q)` (:math:`m + n`): SOAP's less its
  :math:`v` (:math:`mn`), plus :math:`m + n`.

  Args:
    b1: decay of the momentum, in :math:`[0, 1)`.
    shampoo_beta: :math:`\beta`, the decay of the factors and of the
      estimates.
    eps: added to :math:`\bigotimes_k \sqrt{\lambda_k}`, :math:`\ge 0`.
    initial_eigenvalue: the estimates' starting value, :math:`> 0` (the
      authors' ``init_factor``).
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
    rounding_floor: :math:`\lambda_k + (\kappa \varepsilon)^2 \sum
      \lambda_k` in the update (the separable rounding-noise floor; see
      :doc:`/numerics`).
    mesh: a :class:`jax.sharding.Mesh` to divide the state and work over.
    shard_axes: the mesh axes to divide over (``None``: all).
    refresh: ``"qr_unsorted"`` (the authors':
      :math:`\operatorname{qr}(S_k Q_k)`, columns and estimates left in
      place), ``"qr"`` (SOAP's: the columns sorted by
      :math:`\operatorname{diag}(Q_k^\top S_k Q_k)` and the estimates
      permuted with them) or
      ``"eigh"``.

  The engine options are described in full in
  :ref:`engine-options`.

  Returns:
    An :class:`optax.GradientTransformation`.

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
