"""Grafting: one transform's direction with another's magnitude, per unit,
and the momentum-free Adam that Shampoo grafts onto."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _kronecker
from soap_optax import _stacks


def in_state_dtype(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` with its state kept in float32 or wider.

  ``inner`` (an optax transform whose state is shaped like the parameters)
  is initialized on, and fed, float32 copies of float16/bfloat16 parameters
  and updates (float64 stays float64); its updates are returned in the
  incoming updates' dtypes.
  """
  def widen(tree):
    return jax.tree.map(
        lambda x: x.astype(_kronecker.state_dtype(x.dtype)), tree)

  def init_fn(params):
    return inner.init(widen(params))

  def update_fn(updates, state, params=None):
    new, state = inner.update(
        widen(updates), state, None if params is None else widen(params))
    return jax.tree.map(lambda n, u: n.astype(u.dtype), new, updates), state

  return optax.GradientTransformation(init_fn, update_fn)



class GraftingState(NamedTuple):
  """State of :func:`scale_by_grafting`: the two transforms' states.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = soap_optax.scale_by_grafting(optax.identity(),
    ...                                   soap_optax.scale_by_adam_graft())
    >>> state = tx.init({'w': jnp.ones((3, 4))})
    >>> type(state).__name__, type(state.magnitude).__name__
    ('GraftingState', 'AdamGraftState')
  """

  direction: optax.OptState
  magnitude: optax.OptState


def scale_by_grafting(
    direction: optax.GradientTransformation,
    magnitude: optax.GradientTransformation,
    eps: float = 1e-16,
    dimension_numbers: Any = None,
    block_size: int | None = None,
) -> optax.GradientTransformation:
  r"""Per unit, ``direction``'s update rescaled to ``magnitude``'s norm.

  .. math::

    U = U_{dir} \cdot \frac{\lVert U_{mag} \rVert}{\lVert U_{dir} \rVert}

  (Frobenius norms per unit: per parameter, or per slice along the batch axes
  of ``dimension_numbers`` and per block of ``block_size``, the units of the
  eigenbasis transforms; where :math:`\lVert U_{dir} \rVert \le
  \mathrm{eps}` the update is zero). Both
  transforms see the same incoming updates.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.scale_by_grafting(
    ...     direction=soap_optax.scale_by_shampoo_eigenbasis(),
    ...     magnitude=soap_optax.scale_by_adam_graft())
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> type(state).__name__
    'GraftingState'
    >>> grads = {'w': jnp.arange(1.0, 13.0).reshape(3, 4)}
    >>> updates, state = tx.update(grads, state, params)
    >>> # Shampoo's direction with the norm of Adam's first step, ~sqrt(12):
    >>> print(f"{jnp.linalg.norm(updates['w']):.4f}")
    3.4641

  References:
    Agarwal et al., `Disentangling Adaptive Gradient Methods from Learning
    Rates <https://arxiv.org/abs/2002.11803>`_, 2020; Anil et al., `Scalable
    Second Order Optimization for Deep Learning
    <https://arxiv.org/abs/2002.09018>`_, 2020.
  """

  def init_fn(params):
    return GraftingState(direction.init(params), magnitude.init(params))

  def update_fn(updates, state, params=None):
    dir_updates, dir_state = direction.update(updates, state.direction, params)
    mag_updates, mag_state = magnitude.update(updates, state.magnitude, params)

    dir_leaves, treedef = jax.tree.flatten(dir_updates)
    mag_leaves = treedef.flatten_up_to(mag_updates)
    plan = _stacks.plan_units(
        dir_leaves, dimension_numbers, updates, block_size)

    def graft(d, m):  # (U, ...) stacks: one norm per unit.
      axes = tuple(range(1, d.ndim))
      d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
      m_norm = jnp.sqrt(jnp.sum(jnp.square(m), axis=axes, keepdims=True))
      safe = d_norm > eps
      return d * jnp.where(safe, m_norm / jnp.where(safe, d_norm, 1.0), 0.0)

    grafted = _stacks.scatter(
        [graft(d, m) for d, m in zip(_stacks.gather(dir_leaves, plan),
                                     _stacks.gather(mag_leaves, plan))], plan)
    return treedef.unflatten([
        g.astype(d.dtype) for g, d in zip(grafted, dir_leaves)
    ]), GraftingState(dir_state, mag_state)

  return optax.GradientTransformation(init_fn, update_fn)


class AdamGraftState(NamedTuple):
  """State of :func:`scale_by_adam_graft`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> state = soap_optax.scale_by_adam_graft().init({'w': jnp.ones((3, 4))})
    >>> type(state).__name__
    'AdamGraftState'
    >>> print(int(state.count), state.nu['w'].shape)
    0 (3, 4)
  """

  count: jax.Array
  nu: optax.Updates


def scale_by_adam_graft(
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformation:
  r"""Adam without momentum, the magnitude of Shampoo's Adam grafting.

  .. math::

    v \leftarrow b_2 v + (1 - b_2)\, g^2, \qquad
    U = \frac{g}{\sqrt{v / (1 - b_2^t)} + \mathrm{eps}}

  This is ``optax.scale_by_adam(b1=0, b2=b2, eps=eps)``, except that
  :math:`v` is kept in float32 or wider, and that an element whose
  :math:`g^2` is not finite (a non-finite gradient, or a spike whose square
  overflows) leaves its :math:`v` unchanged and gets a zero update, so one
  bad step never poisons the statistics.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.scale_by_adam_graft(b2=0.999)
    >>> params = {'w': jnp.zeros((2, 2))}
    >>> state = tx.init(params)
    >>> type(state).__name__
    'AdamGraftState'
    >>> grads = {'w': jnp.array([[2.0, -0.5], [0.0, 4.0]])}
    >>> updates, state = tx.update(grads, state)
    >>> print(jnp.round(updates['w'], 3))  # Adam's first step: about sign(g)
    [[ 1. -1.]
     [ 0.  1.]]
  """
  def init_fn(params):
    return AdamGraftState(
        count=jnp.zeros([], jnp.int32),
        nu=jax.tree.map(lambda p: jnp.zeros(
            jnp.shape(p), _kronecker.state_dtype(jnp.result_type(p))), params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)

    def second_moment(g, nu):
      square = jnp.square(g.astype(nu.dtype))
      # 1 - b2 in v's dtype, a Python b2 as an injected one (see
      # _estimators.accumulate).
      decayed = b2 * nu + (1 - jnp.asarray(b2, nu.dtype)) * square
      return jnp.where(jnp.isfinite(square), decayed, nu)

    def direction(g, nu):
      g = g.astype(nu.dtype)
      correction = 1 - jnp.asarray(b2, nu.dtype)**count  # In v's dtype.
      u = g / (jnp.sqrt(nu / correction) + eps)
      return jnp.where(jnp.isfinite(jnp.square(g)), u, 0.0)

    nu = jax.tree.map(second_moment, updates, state.nu)
    return (jax.tree.map(direction, updates, nu),
            AdamGraftState(count=count, nu=nu))

  return optax.GradientTransformation(init_fn, update_fn)

