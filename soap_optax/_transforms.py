"""Gradient transformations that run in the eigenbasis of Shampoo's factors."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _engine


def _check_eigenbasis_args(
    precondition_frequency: Any, max_precond_dim: Any) -> None:
  _checks.check_int('precondition_frequency', precondition_frequency, 1)
  _checks.check_int('max_precond_dim', max_precond_dim, 0)


def _flatten_like(treedef: Any, *trees: Any) -> list[list[Any]]:
  """Per-parameter lists of each tree, following the gradients' structure."""
  return [treedef.flatten_up_to(tree) for tree in trees]


class ScaleByRotatedAdamState(NamedTuple):
  """State of :func:`scale_by_rotated_adam`.

  Attributes:
    mu: first moment, in the rotated basis, shaped like the parameters.
    nu: second moment, in the rotated basis, shaped like the parameters.
    eigenbasis: the engine's factors and bases. ``eigenbasis.count - 1`` is the
      Adam step ``t`` once the first call has initialized the preconditioner.
  """

  mu: optax.Updates
  nu: optax.Updates
  eigenbasis: _engine.EigenbasisState


def scale_by_rotated_adam(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
) -> optax.GradientTransformation:
  r"""Adam run in the eigenbasis of Shampoo's preconditioner (SOAP).

  Per parameter, with ``sb = shampoo_beta if shampoo_beta is not None else b2``
  and the Kronecker factors ``GG_i`` and bases ``Q_i`` of :mod:`._engine`:

  * first call (initialization): ``GG_i = (1 - sb) C_i(G)``,
    ``Q_i = eigh(GG_i)``; the update is zero and ``t`` stays 0;
  * every later call, with ``G' = rotate(G)`` in the current bases:

    .. math::

      t &\leftarrow t + 1 \\
      m &\leftarrow b_1 m + (1 - b_1) G', \qquad
      v \leftarrow b_2 v + (1 - b_2) G'^2 \\
      U &= \frac{\sqrt{1 - b_2^t}}{1 - b_1^t}\,
           unrotate\Big(\frac{m}{\sqrt{v} + \epsilon}\Big)

    then, if ``normalize_grads``, ``U <- U / (1e-30 + rms(U))``; then
    ``GG_i <- sb GG_i + (1 - sb) C_i(G)`` (a step's own gradient never shapes
    the basis it is preconditioned in); and when ``t % precondition_frequency
    == 0`` every basis is refreshed by power iteration + QR (columns sorted by
    ``diag(Q_i^T GG_i Q_i)``; ``v`` is permuted along with them, ``m`` is
    carried exactly into the new basis: ``m <- rotate_new(unrotate_old(m))``).

  ``eps`` is added to the *uncorrected* ``sqrt(v)``, as in the authors'
  implementation (``optax.scale_by_adam`` adds it to the corrected one).

  Axis rules (see :func:`soap_optax._engine.plan_layout`): axes longer than
  ``max_precond_dim`` are not rotated; 1-D parameters only with
  ``precondition_1d``; scalars never; ``merge_dims`` merges consecutive axes
  greedily up to ``max_precond_dim`` first.

  State: ``m`` and ``v`` (2 per parameter element) plus, per factored axis of
  length ``d``, ``GG`` and ``Q`` (``2 d^2``). Cost per step for an ``m x n``
  matrix: about ``6 m n (m + n)`` flops (4 rotations, 2 factor products); a
  refresh adds about ``14/3 (m^3 + n^3)`` every ``precondition_frequency``
  steps. Statistics, bases and moments are float32, or the parameter dtype
  where that is wider; updates come out in the gradient's dtype.

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    shampoo_beta: decay of the Kronecker factors, in [0, 1); ``None`` uses
      ``b2``.
    eps: added to ``sqrt(v)``, >= 0.
    precondition_frequency: refresh the bases every this many Adam steps
      (integer >= 1).
    max_precond_dim: axes longer than this keep the identity basis (>= 0).
    merge_dims: merge consecutive axes before factoring.
    precondition_1d: give 1-D parameters a factor too.
    normalize_grads: divide each parameter's update by its RMS.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithm 3).
  """
  _checks.check_beta('b1', b1)
  _checks.check_beta('b2', b2)
  if shampoo_beta is not None:
    _checks.check_beta('shampoo_beta', shampoo_beta)
  _checks.check_nonnegative('eps', eps)
  _check_eigenbasis_args(precondition_frequency, max_precond_dim)
  factor_beta = b2 if shampoo_beta is None else shampoo_beta

  def init_fn(params):
    _checks.check_float_params(params)
    zeros = lambda p: jnp.zeros(
        jnp.shape(p), _engine.state_dtype(jnp.result_type(p)))
    return ScaleByRotatedAdamState(
        mu=jax.tree.map(zeros, params),
        nu=jax.tree.map(zeros, params),
        eigenbasis=_engine.init_eigenbasis(
            params,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
        ),
    )

  def update_fn(updates, state, params=None):
    del params
    grads, treedef = jax.tree.flatten(updates)
    mus, nus = _flatten_like(treedef, state.mu, state.nu)
    factors = _engine.unpack(state.eigenbasis, len(grads))
    layouts = [f.layout for f in factors]
    merged_grads = [
        _engine.to_merged(g.astype(m.dtype), layout)
        for g, m, layout in zip(grads, mus, layouts)
    ]

    def absorb_gradients():
      return [_engine.accumulate(f, g, factor_beta)
              for f, g in zip(factors, merged_grads)]

    def initialize():
      new_factors, _ = _engine.refresh_eigh(absorb_gradients())
      directions = [jnp.zeros_like(g) for g in merged_grads]
      return directions, mus, nus, new_factors

    def adam_step():
      t = state.eigenbasis.count  # t after the increment (count counts init).
      directions, new_mus, new_nus = [], [], []
      for g, f, mu, nu in zip(merged_grads, factors, mus, nus):
        rotated = _engine.rotate(g, f)
        mu = b1 * _engine.to_merged(mu, f.layout) + (1 - b1) * rotated
        nu = b2 * _engine.to_merged(nu, f.layout) + (1 - b2) * rotated**2
        scale = (jnp.sqrt(1 - b2**t) / (1 - b1**t)).astype(mu.dtype)
        direction = scale * _engine.unrotate(mu / (jnp.sqrt(nu) + eps), f)
        if normalize_grads:
          direction = direction / (
              1e-30 + jnp.sqrt(jnp.mean(jnp.square(direction))))
        directions.append(direction)
        new_mus.append(mu)
        new_nus.append(nu)
      new_factors = absorb_gradients()

      def refresh(operands):
        old_factors, mus, nus = operands
        refreshed, orders = _engine.refresh_power_qr(old_factors)
        mus = [_engine.rotate(_engine.unrotate(mu, old), new)
               for mu, old, new in zip(mus, old_factors, refreshed)]
        nus = [_engine.permute_axes(nu, f.layout, order)
               for nu, f, order in zip(nus, refreshed, orders)]
        return refreshed, mus, nus

      operands = (new_factors, new_mus, new_nus)
      if any(layout.factored_axes for layout in layouts):
        operands = jax.lax.cond(
            t % precondition_frequency == 0, refresh, lambda x: x, operands)
      new_factors, new_mus, new_nus = operands
      new_mus = [_engine.from_merged(m, f.layout)
                 for m, f in zip(new_mus, new_factors)]
      new_nus = [_engine.from_merged(v, f.layout)
                 for v, f in zip(new_nus, new_factors)]
      return directions, new_mus, new_nus, new_factors

    directions, mus, nus, factors = jax.lax.cond(
        state.eigenbasis.count == 0, initialize, adam_step)
    new_updates = [
        _engine.from_merged(d, layout).astype(g.dtype)
        for d, layout, g in zip(directions, layouts, grads)
    ]
    new_state = ScaleByRotatedAdamState(
        mu=treedef.unflatten(mus),
        nu=treedef.unflatten(nus),
        eigenbasis=_engine.pack(
            factors, optax.safe_increment(state.eigenbasis.count)),
    )
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)
