"""Complete optimizers: the transforms chained with weight decay and a step size.

Each alias reads like :func:`optax.adamw`: a preconditioning transform, decoupled
weight decay, then the (possibly scheduled) learning rate.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _estimators
from soap_optax import _grafting
from soap_optax import _hyperball
from soap_optax import _kl_shampoo
from soap_optax import _rotated_adam
from soap_optax import _shampoo
from soap_optax import _soap_muon


class DecayAfterFirstCallState(NamedTuple):
  """State of the aliases' weight decay: the calls seen, the decay's state."""

  count: jax.Array
  decay: optax.OptState


def _decayed_weights_after_first_call(
    weight_decay: Any, mask: Any) -> optax.GradientTransformation:
  """:func:`optax.add_decayed_weights`, skipped on the first call.

  The first call of the eigenbasis transforms only initializes the
  preconditioner and returns a zero update; weight decay must not move the
  parameters on that call either. Both outcomes are computed and selected
  with ``where`` (not ``cond``), so the updates' dtype is whatever
  ``add_decayed_weights`` gives (the promotion of the updates' and the
  parameters' dtypes, as in :func:`optax.adamw`) on every call.
  """
  decay = optax.add_decayed_weights(weight_decay, mask)

  def init_fn(params):
    return DecayAfterFirstCallState(
        count=jnp.zeros([], jnp.int32), decay=decay.init(params))

  def update_fn(updates, state, params=None):
    decayed, decay_state = decay.update(updates, state.decay, params)
    after_first = state.count > 0
    updates = jax.tree.map(
        lambda new, old: jnp.where(after_first, new, old.astype(new.dtype)),
        decayed, updates)
    return updates, DecayAfterFirstCallState(
        count=optax.safe_increment(state.count), decay=decay_state)

  return optax.GradientTransformation(init_fn, update_fn)


def _initializing_chain(
    transform: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    weight_decay_mask: Any,
) -> optax.GradientTransformation:
  """A transform whose first call only initializes, decoupled weight decay
  (skipped on that call), the learning rate."""
  return optax.chain(
      transform,
      _decayed_weights_after_first_call(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def _rotated_adam_chain(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    weight_decay_mask: Any,
    **transform_kwargs,
) -> optax.GradientTransformation:
  """``scale_by_rotated_adam``, decoupled weight decay, the learning rate."""
  return _initializing_chain(
      _rotated_adam.scale_by_rotated_adam(**transform_kwargs),
      learning_rate, weight_decay, weight_decay_mask)


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.01,
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    one_sided: bool = False,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    bucket_padding: float | None = 0.1,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
    factor_estimator: str = 'frobenius',
    bias_correction: bool | None = None,
    initial_eigenvalue: jax.typing.ArrayLike | None = None,
    refresh: str | None = None,
) -> optax.GradientTransformation:
  """SOAP: Adam in the eigenbasis of Shampoo's preconditioner, with AdamW decay.

  .. math::

    p \\leftarrow p - \\eta_k \\big(U_k + \\lambda\\,p\\big)

  where :math:`U_k` is :func:`soap_optax.scale_by_rotated_adam`'s update and
  :math:`\\lambda` is ``weight_decay`` (applied to the leaves selected by
  ``weight_decay_mask``). The first call only initializes the preconditioner:
  its update is exactly zero, weight decay included. The learning-rate
  schedule, like :func:`optax.adamw`'s, counts every call, the first included.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    shampoo_beta: decay of the Kronecker factors (``None``: ``b2``).
    eps: added to :math:`\\sqrt{v}` (uncorrected), as in the authors' code.
    weight_decay: decoupled weight decay, multiplied by the learning rate.
    precondition_frequency: refresh the eigenbases every this many steps;
      or ``"adaptive"`` / :class:`soap_optax.AdaptiveRefresh`: refresh a stack
      when its bases have gone stale.
    max_precond_dim: axes longer than this are not rotated.
    merge_dims: merge consecutive small axes before factoring.
    precondition_1d: rotate 1-D parameters too.
    normalize_grads: divide each parameter's update by its RMS.
    weight_decay_mask: a tree of booleans, or a function of the parameters
      returning one, that selects the leaves to decay.
    one_sided: rotate only the shorter axis of each matrix (the paper's
      memory-saving variant).
    mu_dtype: dtype of the first moment (``None``: the statistics' dtype).
    dimension_numbers: which axes of each parameter are batch axes (the layer
      axis of a scanned model), as a tree prefix of the parameters (or a
      callable of them) with :class:`soap_optax.EigenbasisDimensionNumbers`
      or ``None`` leaves; each slice along them is optimized on its own.
    block_size: cut every non-batch axis longer than this into blocks with
      their own factors and moments (``None``: no blocking).
    bucket_padding: let units of different shapes share one stack, and so
      one compiled program, padded with zeros, when padding adds at most
      this fraction of a unit's work (``None`` or 0: one stack per shape);
      it also bounds the refresh work added by solving factors of several
      sizes at one padded solver size (one solver program each); no number
      changes (see :ref:`engine-options`).
    staggered_refresh: spread the eigenbasis refreshes evenly over the
      ``precondition_frequency`` steps (each unit still refreshes every
      ``precondition_frequency`` steps) to flatten the refresh spike.
    rounding_floor: keep rotated coordinates that hold only float rounding
      noise from being normalized up to full-size updates (see
      :func:`soap_optax.scale_by_rotated_adam`); ``False`` reproduces the
      reference implementation's float32 behaviour.
    mesh: a :class:`jax.sharding.Mesh` to divide the optimizer's state and work
      over (``None``: single device); see
      :func:`soap_optax.scale_by_rotated_adam` and
      :func:`soap_optax.state_shardings`.
    shard_axes: the mesh axis (or axes) to divide over; ``None``: all.
    factor_estimator: ``"frobenius"`` (Shampoo's factors, the paper's SOAP)
      or ``"kl"`` (KL-SOAP: the factors estimated by the KL rule of
      :func:`soap_optax.scale_by_kl_shampoo`; by default as its authors run
      it: unsorted QR refreshes, no bias correction).
    bias_correction: Adam's bias correction; ``None``: the authors' choice
      (on for SOAP, off for KL-SOAP). See
      :func:`soap_optax.scale_by_rotated_adam`.
    initial_eigenvalue: KL-SOAP's starting eigenvalue estimate (``None``:
      0.1, the authors'); only with ``factor_estimator="kl"``.
    refresh: the refresh solver: ``"qr"``, ``"qr_unsorted"`` or ``"eigh"``;
      ``None``: the authors' choice (``"qr"`` for SOAP, ``"qr_unsorted"``
      for KL-SOAP). See :func:`soap_optax.scale_by_rotated_adam`.

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> def loss(params):
    ...   return jnp.sum((params['w'] - 0.5)**2) + jnp.sum(params['b']**2)
    >>> params = {'w': jnp.ones((3, 4)), 'b': jnp.ones(4)}
    >>> tx = soap_optax.soap(learning_rate=3e-3)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> new_params, state = step(params, state)  # only initializes
    >>> print(jax.tree.all(jax.tree.map(jnp.array_equal, new_params, params)))
    True
    >>> for _ in range(5):
    ...   new_params, state = step(new_params, state)
    >>> print(bool(loss(new_params) < loss(params)))
    True

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024; Lin et al.,
    `KL-SOAP <https://arxiv.org/abs/2509.03378>`_, 2025.
  """
  return _rotated_adam_chain(
      learning_rate, weight_decay, weight_decay_mask,
      b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
      precondition_frequency=precondition_frequency,
      max_precond_dim=max_precond_dim, merge_dims=merge_dims,
      precondition_1d=precondition_1d, normalize_grads=normalize_grads,
      one_sided=one_sided, mu_dtype=mu_dtype,
      dimension_numbers=dimension_numbers, block_size=block_size,
      bucket_padding=bucket_padding, staggered_refresh=staggered_refresh,
      rounding_floor=rounding_floor,
      mesh=mesh, shard_axes=shard_axes, factor_estimator=factor_estimator,
      bias_correction=bias_correction, initial_eigenvalue=initial_eigenvalue,
      refresh=refresh)


def factorized_soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.01,
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    one_sided: bool = False,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    bucket_padding: float | None = 0.1,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
) -> optax.GradientTransformation:
  r"""SOAP with Adafactor's factored second moment: the memory-saving variant.

  Exactly :func:`soap` (same first call, step counting, eps placement, refresh
  and momentum carry-over), except that the per-element second moment
  :math:`v` is replaced by one running statistic per axis of the rotated
  squared gradient (row and column averages for a matrix) and rebuilt as
  :math:`v = r c^\top / \sum r`. For an :math:`m \times n` layer the
  optimizer state is :math:`2m^2 + 2n^2 + mn + m + n` numbers, or
  :math:`2 \min(m, n)^2 + mn + m + n` with ``one_sided=True`` (less than
  AdamW's :math:`2mn` for a :math:`d \times 4d` layer), plus the engine's
  tracked :math:`\operatorname{diag}(Q^\top GG\, Q)` (:math:`m + n`;
  one-sided :math:`\min(m, n)`) and two counters per unit.

  Args: as :func:`soap` (``one_sided``, ``mu_dtype``, ``dimension_numbers``,
    ``block_size``, ``bucket_padding``, ``staggered_refresh``,
    ``rounding_floor``, ``mesh`` and ``shard_axes`` included).

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {'w': jnp.ones((3, 4))}
    >>> tx = soap_optax.factorized_soap(learning_rate=3e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((3, 4), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> print(bool(jnp.all(updates['w'] == 0)))  # the first call initializes
    True
    >>> params = optax.apply_updates(params, updates)
    >>> # Row and column statistics (3 + 4 numbers) in place of SOAP's v (12):
    >>> full = soap_optax.soap().init(params)
    >>> print(soap_optax.state_size(full) - soap_optax.state_size(state))
    5

  References:
    Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, 2024 (Section 7,
    "improving space usage").
  """
  return _rotated_adam_chain(
      learning_rate, weight_decay, weight_decay_mask,
      b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
      precondition_frequency=precondition_frequency,
      max_precond_dim=max_precond_dim, merge_dims=merge_dims,
      precondition_1d=precondition_1d, normalize_grads=normalize_grads,
      one_sided=one_sided, mu_dtype=mu_dtype,
      dimension_numbers=dimension_numbers, block_size=block_size,
      bucket_padding=bucket_padding, staggered_refresh=staggered_refresh,
      factored=True,
      rounding_floor=rounding_floor, mesh=mesh, shard_axes=shard_axes)


GRAFTING = ('adam', 'none')


def shampoo(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.9,
    shampoo_beta: jax.typing.ArrayLike = 0.95,
    exponent: jax.typing.ArrayLike = 0.5,
    eps: jax.typing.ArrayLike = 1e-12,
    weight_decay: jax.typing.ArrayLike = 0.01,
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    trace_normalize: bool = True,
    refresh: str = 'eigh',
    grafting: str = 'adam',
    graft_b2: jax.typing.ArrayLike = 0.999,
    graft_eps: jax.typing.ArrayLike = 1e-8,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    bucket_padding: float | None = 0.1,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    rayleigh_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
) -> optax.GradientTransformation:
  r"""Shampoo with momentum, optional Adam grafting and decoupled weight decay.

  .. math::

    U_k = \operatorname{graft}(P_k(g_k)), \quad
    M_k = b_1 M_{k-1} + (1 - b_1) U_k, \quad
    p \leftarrow p - \eta_k (M_k + \lambda p)

  where :math:`P_k` is :func:`soap_optax.scale_by_shampoo_eigenbasis` and,
  with ``grafting="adam"``, :math:`\operatorname{graft}` rescales each
  parameter's Shampoo update to the norm of the :func:`scale_by_adam_graft`
  update (Adam without momentum, ``b2=graft_b2``, ``eps=graft_eps``) of the
  same gradient (the magnitude of Adam, the direction of Shampoo, as in
  DistributedShampoo); ``grafting="none"`` leaves it as is. The momentum
  :math:`M` is an exponential moving average of the preconditioned updates
  (no bias correction).

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: momentum decay, in :math:`[0, 1)`.
    shampoo_beta: decay of the Kronecker factors.
    exponent: inverse power of the preconditioner (0.5:
      :math:`\text{Shampoo}^{1/2}`, the SOAP paper's baseline; 0.25: classic
      Shampoo).
    eps: added to the eigenvalues.
    weight_decay: decoupled weight decay, multiplied by the learning rate.
    precondition_frequency: refresh the factors' eigenbases every this many
      steps; ``"adaptive"`` / :class:`soap_optax.AdaptiveRefresh` (refresh a
      stack when its bases have gone stale); or
      :class:`soap_optax.FoamRefresh` (FOAM's adaptive damping, with ``eps``
      as the base damping).
    max_precond_dim: axes longer than this get a diagonal preconditioner.
    merge_dims: merge consecutive small axes before factoring.
    precondition_1d: give 1-D parameters a full factor.
    trace_normalize: see :func:`scale_by_shampoo_eigenbasis`.
    refresh: ``"eigh"`` or ``"qr"``.
    grafting: ``"adam"`` or ``"none"``.
    graft_b2: second-moment decay of the Adam graft.
    graft_eps: eps of the Adam graft.
    weight_decay_mask: which leaves to decay.
    dimension_numbers: batch axes per parameter (see :func:`soap`); the
      grafting norms are taken per slice too.
    block_size: cut longer axes into blocks (see :func:`soap`); the grafting
      norms are taken per block too.
    bucket_padding: let units of different shapes share one stack, and so
      one compiled program, padded with zeros, when padding adds at most
      this fraction of a unit's work (``None`` or 0: one stack per shape);
      it also bounds the refresh work added by solving factors of several
      sizes at one padded solver size (one solver program each); no number
      changes (see :ref:`engine-options`).
    staggered_refresh: spread the refreshes over the
      ``precondition_frequency`` steps (see :func:`soap`).
    rounding_floor: the rounding-noise floor on the eigenvalues (see
      :func:`soap_optax.scale_by_shampoo_eigenbasis`).
    rayleigh_floor: never precondition with an eigenvalue below its current
      Rayleigh quotient (see :func:`soap_optax.scale_by_shampoo_eigenbasis`);
      this is what keeps ``grafting="none"`` from exploding between the
      first refreshes. ``False``: classic Shampoo.
    mesh: a :class:`jax.sharding.Mesh` to divide the optimizer's state and work
      over (``None``: single device); see
      :func:`soap_optax.scale_by_rotated_adam` and
      :func:`soap_optax.state_shardings`.
    shard_axes: the mesh axis (or axes) to divide over; ``None``: all.

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> def loss(params):
    ...   return jnp.sum((params['w'] - jnp.eye(3, 4))**2)
    >>> params = {'w': jnp.ones((3, 4))}
    >>> tx = soap_optax.shampoo(learning_rate=3e-3, exponent=0.25)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> new_params = optax.apply_updates(params, updates)
    >>> print(new_params['w'].shape, new_params['w'].dtype)
    (3, 4) float32
    >>> print(bool(loss(new_params) < loss(params)))
    True

  References:
    Gupta et al., `Shampoo <https://arxiv.org/abs/1802.09568>`_, 2018;
    Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  _checks.check_choice('grafting', grafting, GRAFTING)
  _checks.check_beta('b1', b1)
  _checks.check_beta('graft_b2', graft_b2)
  _checks.check_nonnegative('graft_eps', graft_eps)
  preconditioner = _shampoo.scale_by_shampoo_eigenbasis(
      shampoo_beta=shampoo_beta,
      exponent=exponent,
      eps=eps,
      precondition_frequency=precondition_frequency,
      max_precond_dim=max_precond_dim,
      merge_dims=merge_dims,
      precondition_1d=precondition_1d,
      trace_normalize=trace_normalize,
      refresh=refresh,
      dimension_numbers=dimension_numbers,
      block_size=block_size,
      bucket_padding=bucket_padding,
      staggered_refresh=staggered_refresh,
      rounding_floor=rounding_floor,
      rayleigh_floor=rayleigh_floor,
      mesh=mesh,
      shard_axes=shard_axes,
  )
  if grafting == 'adam':
    # Grafted in the statistics' dtype: Shampoo's direction may exceed the
    # range of a float16 gradient before it is rescaled.
    preconditioner = _grafting.in_state_dtype(_grafting.scale_by_grafting(
        preconditioner, _grafting.scale_by_adam_graft(b2=graft_b2, eps=graft_eps),
        dimension_numbers=dimension_numbers, block_size=block_size))
  return optax.chain(
      preconditioner,
      _grafting.in_state_dtype(optax.ema(b1, debias=False)),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def kl_shampoo(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.01,
    initial_eigenvalue: jax.typing.ArrayLike = (
        _estimators.KL_INITIAL_EIGENVALUE),
    eigenvalues: str = 'running',
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
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
  r"""KL-Shampoo with decoupled weight decay: no grafting, no Adam moments.

  .. math::

    p \leftarrow p - \eta_k \big(U_k + w\,p\big)

  where :math:`U_k` is :func:`soap_optax.scale_by_kl_shampoo`'s update (the
  momentum preconditioned by :math:`S^{-1/2}`, :math:`S` the KL-estimated
  Kronecker covariance) and :math:`w` is ``weight_decay``. As with
  :func:`soap`, the first call only initializes: its update is zero, weight
  decay included.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1, shampoo_beta, eps, initial_eigenvalue, eigenvalues: see
      :func:`soap_optax.scale_by_kl_shampoo`.
    weight_decay: decoupled weight decay, multiplied by the learning rate.
    weight_decay_mask: which leaves to decay.
    precondition_frequency: as in :func:`soap`; so are ``max_precond_dim``,
      ``merge_dims``, ``precondition_1d``, ``one_sided``, ``mu_dtype``,
      ``dimension_numbers``, ``block_size``, ``staggered_refresh``,
      ``rounding_floor``, ``mesh``, ``shard_axes`` and ``refresh``.

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {'w': jnp.ones((3, 4))}
    >>> tx = soap_optax.kl_shampoo(learning_rate=3e-3)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((3, 4), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> print(bool(jnp.all(updates['w'] == 0)))  # the first call initializes
    True
    >>> params = optax.apply_updates(params, updates)

  References:
    Lin et al., `Understanding and Improving Shampoo and SOAP via
    Kullback-Leibler Minimization <https://arxiv.org/abs/2509.03378>`_, 2025.
  """
  return _initializing_chain(
      _kl_shampoo.scale_by_kl_shampoo(
          b1=b1, shampoo_beta=shampoo_beta, eps=eps,
          initial_eigenvalue=initial_eigenvalue, eigenvalues=eigenvalues,
          precondition_frequency=precondition_frequency,
          max_precond_dim=max_precond_dim, merge_dims=merge_dims,
          precondition_1d=precondition_1d, one_sided=one_sided,
          mu_dtype=mu_dtype, dimension_numbers=dimension_numbers,
          block_size=block_size, staggered_refresh=staggered_refresh,
          rounding_floor=rounding_floor, mesh=mesh, shard_axes=shard_axes,
          refresh=refresh),
      learning_rate, weight_decay, weight_decay_mask)


def _hyperball_chain(learning_rate: optax.ScalarOrSchedule, mask: Any,
                     **transform_kwargs) -> optax.GradientTransformation:
  """``scale_by_rotated_adam`` and the learning rate, in Hyperball."""
  inner = optax.chain(_rotated_adam.scale_by_rotated_adam(**transform_kwargs),
                      optax.scale_by_learning_rate(learning_rate))
  return _hyperball.hyperball(
      inner, learning_rate, mask,
      dimension_numbers=transform_kwargs['dimension_numbers'])


def soap_h(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.9,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    precondition_frequency: Any = 1,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    one_sided: bool = False,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    bucket_padding: float | None = 0.1,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  r"""SOAP-H: SOAP's direction, each matrix kept on its initial-norm sphere.

  :func:`soap_optax.hyperball` around SOAP (:func:`scale_by_rotated_adam`
  and the learning rate): every matrix :math:`W` the mask selects moves by
  :math:`\eta_t \lVert W_0 \rVert_F` along SOAP's update and is retracted
  onto the sphere of radius :math:`\lVert W_0 \rVert_F`; no weight decay
  (the sphere takes its place). The defaults are the settings reported for
  SOAP-H on the modded-nanogpt optimizer track: a refresh every call by one
  power-iteration step and QR, ``b1 = 0.95``, ``b2 = 0.9``, no bias
  correction. The other parameters (vectors, stacked or scanned leaves,
  matrices the mask leaves out) get SOAP's update times the learning rate;
  route them to AdamW with :func:`optax.partition` as the leaders do. The first
  call only initializes: its update is zero.

  Args:
    learning_rate: :math:`\eta_t` (a float or an ``optax`` schedule): the length
      of each wrapped matrix's step relative to its radius, and the other
      parameters' learning rate.
    b1, b2, shampoo_beta, eps: SOAP's (see :func:`soap`).
    precondition_frequency: refresh the bases every this many calls; as in
      :func:`soap` are ``max_precond_dim``, ``merge_dims``,
      ``precondition_1d``, ``one_sided``, ``mu_dtype``,
      ``block_size``, ``bucket_padding``, ``staggered_refresh``,
      ``rounding_floor``, ``mesh`` and ``shard_axes``.
    dimension_numbers: as in :func:`soap`, and they say Hyperball's matrices
      too (an attention kernel ``(d, heads, head_dim)`` read as a
      :math:`d \times (\mathrm{heads} \cdot \mathrm{head\_dim})` matrix keeps
      one sphere; a stack keeps one per slice; see :func:`hyperball`).
    mask: which matrices Hyperball wraps (see :func:`hyperball`).

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> def loss(params):
    ...   return jnp.sum((params['w'] - 1.0)**2)
    >>> params = {'w': jnp.arange(12.0).reshape(3, 4) / 10}
    >>> tx = soap_optax.soap_h(learning_rate=0.05)
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> new_params = params
    >>> for _ in range(3):
    ...   new_params, state = step(new_params, state)
    >>> print(bool(loss(new_params) < loss(params)))
    True
    >>> # The matrix has moved on the sphere of its initial norm:
    >>> print(f"{jnp.linalg.norm(params['w']):.4f}")
    2.2494
    >>> print(f"{jnp.linalg.norm(new_params['w']):.4f}")
    2.2494

  References:
    Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, 2024; Wen et
    al., Hyperball optimization (arXiv 2606.16899).
  """
  return _hyperball_chain(
      learning_rate, mask, b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
      precondition_frequency=precondition_frequency,
      max_precond_dim=max_precond_dim, merge_dims=merge_dims,
      precondition_1d=precondition_1d, one_sided=one_sided,
      mu_dtype=mu_dtype, dimension_numbers=dimension_numbers,
      block_size=block_size, bucket_padding=bucket_padding,
      staggered_refresh=staggered_refresh, rounding_floor=rounding_floor,
      mesh=mesh, shard_axes=shard_axes, bias_correction=False)


def kl_soap_h(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.9,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    initial_eigenvalue: jax.typing.ArrayLike | None = None,
    precondition_frequency: Any = 1,
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
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  """KL-SOAP-H: :func:`soap_h` with the factors estimated by the KL rule.

  KL-SOAP (``scale_by_rotated_adam(factor_estimator="kl")``, as its authors
  run it: unsorted QR refreshes, no bias correction) in
  :func:`soap_optax.hyperball`, with SOAP-H's defaults (a refresh every
  call, ``b1 = 0.95``, ``b2 = 0.9``).

  Args:
    learning_rate: as in :func:`soap_h`, and so are every other argument
      but ``initial_eigenvalue``.
    initial_eigenvalue: the KL estimates' prior (``None``: 0.1).

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {'w': jnp.arange(12.0).reshape(3, 4) / 10}
    >>> tx = soap_optax.kl_soap_h(learning_rate=0.05)
    >>> state = tx.init(params)
    >>> print(f'{float(state.radius[0]):.4f}')  # the radius: ||w||_F at init
    2.2494
    >>> grads = {'w': jnp.full((3, 4), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> print(bool(jnp.all(updates['w'] == 0)))  # the first call initializes
    True
    >>> params = optax.apply_updates(params, updates)

  References:
    Lin et al., `KL-SOAP <https://arxiv.org/abs/2509.03378>`_, 2025; Wen et
    al., Hyperball optimization (arXiv 2606.16899).
  """
  return _hyperball_chain(
      learning_rate, mask, b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
      precondition_frequency=precondition_frequency,
      max_precond_dim=max_precond_dim, merge_dims=merge_dims,
      precondition_1d=precondition_1d, one_sided=one_sided,
      mu_dtype=mu_dtype, dimension_numbers=dimension_numbers,
      block_size=block_size, staggered_refresh=staggered_refresh,
      rounding_floor=rounding_floor, mesh=mesh, shard_axes=shard_axes,
      factor_estimator='kl', initial_eigenvalue=initial_eigenvalue)


def soap_muon(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.01,
    ns_coeffs: tuple[float, float, float] = _soap_muon.MUON_NS_COEFFS,
    ns_steps: int = _soap_muon.MUON_NS_STEPS,
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    one_sided: bool = False,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
) -> optax.GradientTransformation:
  r"""SOAP-Muon with decoupled weight decay.

  .. math::

    p \leftarrow p - \eta_k \big(O_k + w\,p\big)

  where :math:`O_k` is :func:`soap_optax.scale_by_soap_muon`'s update (Muon's
  Nesterov momentum whitened by the second moment in SOAP's eigenbasis,
  then orthogonalized by Newton-Schulz) and :math:`w` is ``weight_decay``. As
  with :func:`soap`, the first call only initializes: its update is zero,
  weight decay included. Meant for the hidden matrices (the record runs a
  refresh every step, ``precondition_frequency=1``); route vectors,
  embeddings and heads to AdamW (:func:`optax.partition`).

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1, b2, shampoo_beta, eps, ns_coeffs, ns_steps: see
      :func:`soap_optax.scale_by_soap_muon`.
    weight_decay: decoupled weight decay, multiplied by the learning rate.
    weight_decay_mask: which leaves to decay.
    precondition_frequency: as in :func:`soap`; so are ``max_precond_dim``,
      ``merge_dims``, ``one_sided``, ``mu_dtype``, ``dimension_numbers``,
      ``block_size``, ``staggered_refresh``, ``rounding_floor``, ``mesh``
      and ``shard_axes``.

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {'w': jnp.ones((3, 4))}
    >>> tx = soap_optax.soap_muon(learning_rate=0.02, precondition_frequency=1)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.full((3, 4), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> print(bool(jnp.all(updates['w'] == 0)))  # the first call initializes
    True
    >>> params = optax.apply_updates(params, updates)
  """
  return _initializing_chain(
      _soap_muon.scale_by_soap_muon(
          b1=b1, b2=b2, shampoo_beta=shampoo_beta, eps=eps,
          ns_coeffs=ns_coeffs, ns_steps=ns_steps,
          precondition_frequency=precondition_frequency,
          max_precond_dim=max_precond_dim, merge_dims=merge_dims,
          one_sided=one_sided, mu_dtype=mu_dtype,
          dimension_numbers=dimension_numbers, block_size=block_size,
          staggered_refresh=staggered_refresh, rounding_floor=rounding_floor,
          mesh=mesh, shard_axes=shard_axes),
      learning_rate, weight_decay, weight_decay_mask)
