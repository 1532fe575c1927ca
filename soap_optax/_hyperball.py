"""Hyperball: each weight matrix kept on the sphere of its initial norm, every
step of one fixed length on it (Wen, Dang, Lyu, Ma and Liang).

A wrapper of any optimizer, not a rule of the skeleton: it sees the inner
optimizer's update and the parameters, nothing of how the update was made.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _kronecker
from soap_optax import _skeleton

class HyperballState(NamedTuple):
  """State of :func:`hyperball`.

  Attributes:
    count: the number of calls so far (int32): the step size's schedule is
      evaluated at it.
    radius: ``R = ||W_0||_F`` of every wrapped matrix, a scalar in float32
      (or the matrix's wider dtype), in the order of the parameters' leaves.
    inner_state: the wrapped optimizer's state.
  """

  count: jax.Array
  radius: tuple[jax.Array, ...]
  inner_state: Any


def _wrapped(params: Any, mask: Any) -> list[bool]:
  """Per leaf of ``params``: whether it is a matrix (2-D) that ``mask``
  (``None``: every leaf; a tree of booleans, or a function of the parameters
  returning one) selects."""
  leaves = jax.tree.leaves(params)
  if mask is None:
    selected = [True] * len(leaves)
  else:
    tree = mask(params) if callable(mask) else mask
    selected = jax.tree.structure(params).flatten_up_to(tree)
    for flag in selected:
      _checks.check_bool('mask (each of its leaves)', flag)
  return [flag and jnp.ndim(leaf) == 2 for flag, leaf in zip(selected, leaves)]


def _frobenius(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def hyperball(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  r"""Keeps every wrapped matrix on the sphere of its initial Frobenius norm.

  Hyperball (Wen et al.) replaces weight decay by a constraint: each weight
  matrix ``W`` stays on the sphere of radius ``R = ||W_0||_F`` (its norm at
  ``init``), and each step moves it by a fixed length ``η_t R`` before it is
  retracted onto the sphere. With ``u`` the ``inner`` optimizer's update of
  ``W`` (optax's convention: what ``optax.apply_updates`` adds) and
  ``N(x) = x / ||x||_F``:

  .. math::

    W_{t+1} = R\, N\big(W_t + η_t R\, N(u_t)\big)

  (the authors' ``R N(W - η R N(d))`` with ``d = -u`` the inner direction).
  The update returned is ``W_{t+1} - W_t``, so that ``optax.apply_updates``
  lands on the sphere (to float rounding); where ``u`` is exactly zero (the
  first call of ``soap``, a rejected gradient) it is exactly zero, and where
  ``u`` is not finite, so is the update. The size
  of ``u`` does not matter, only its direction: the inner optimizer's own
  learning rate acts only on the leaves that pass through.

  Leaves that are not matrices (not 2-D: vectors, scalars, stacked or
  scanned parameters) and matrices that ``mask`` excludes get ``inner``'s
  update unchanged. Norms are taken in float32 (or the parameter's wider
  dtype); the update comes out in the parameter's dtype.

  Args:
    inner: the optimizer whose updates are wrapped, in optax's update
      convention: an alias such as ``optax.adam(1e-3)``,
      ``optax.contrib.muon(1e-3)`` or ``soap_optax.soap(3e-3)``; a
      ``scale_by_*`` transform (whose output is a direction to subtract) is
      chained with a negative scale first (``optax.chain(
      soap_optax.scale_by_rotated_adam(), optax.scale(-1.0))``;
      :func:`soap_optax.soap_h` chains ``optax.scale_by_learning_rate``,
      which also sets the rate of the leaves that pass through).
    learning_rate: ``η_t``, a float or an ``optax`` schedule of the call
      count (0 on the first call): each wrapped matrix moves by ``η_t R``
      before the retraction.
    mask: which matrices to wrap: a tree of booleans matching the
      parameters (or a function of the parameters returning one); ``None``:
      every 2-D parameter.

  Returns:
    An ``optax.GradientTransformation``. ``init`` raises a ``ValueError``
    naming the leaf if a wrapped matrix is zero (no sphere to keep it on;
    under ``jax.jit(init)`` the values are not known, and such a matrix gets
    the inner update unchanged); ``update`` needs ``params``. The norms are
    of whole matrices: under a ``jax.sharding`` layout XLA reduces across
    devices, but inside a user's own ``shard_map`` each shard would keep a
    sphere of its own.

  References:
    Wen, Dang, Lyu, Ma and Liang, Hyperball optimization (arXiv 2606.16899)
    and their post "From Weight Decay to Hyperball Optimization" (2025).
  """

  def init_fn(params):
    if _skeleton.is_optax_params_placeholder(params):
      # optax.tree.map_params: no radius is shaped like the parameters.
      return HyperballState(jnp.zeros([], jnp.int32),
                            _skeleton.OUTSIDE_MAP_PARAMS, inner.init(params))
    wrapped = _wrapped(params, mask)
    radius = []
    paths = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), wraps in zip(paths, wrapped):
      if not wraps:
        continue
      leaf = jnp.asarray(leaf)
      norm = _frobenius(leaf.astype(_kronecker.state_dtype(leaf.dtype)))
      if not isinstance(norm, jax.core.Tracer) and not float(norm) > 0:
        raise ValueError(
            'hyperball cannot wrap a zero matrix: the parameter at '
            f'{jax.tree_util.keystr(path)} has Frobenius norm {float(norm)} '
            'at init, and Hyperball keeps each matrix on the sphere of its '
            'initial norm. Initialize it to nonzero values or leave it out '
            'with mask=.')
      radius.append(norm)
    return HyperballState(jnp.zeros([], jnp.int32), tuple(radius),
                          inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('hyperball needs params in update(updates, state, '
                       'params): its step depends on the weights.')
    inner_updates, inner_state = inner.update(updates, state.inner_state,
                                              params)
    eta = (learning_rate(state.count) if callable(learning_rate)
           else learning_rate)
    leaves, treedef = jax.tree.flatten(inner_updates)
    weights = treedef.flatten_up_to(params)
    radii = iter(state.radius)
    out = []
    for u, w, wraps in zip(leaves, weights, _wrapped(params, mask)):
      if not wraps:
        out.append(u)
        continue
      param_dtype, dtype = w.dtype, _kronecker.state_dtype(w.dtype)
      radius = next(radii).astype(dtype)
      w, u = w.astype(dtype), u.astype(dtype)
      size = _frobenius(u)
      moved = w + eta * radius * u / jnp.where(size == 0, 1, size)
      retracted = radius * moved / _frobenius(moved)
      # No step for a zero update; a zero matrix (R = 0: its init traced, so
      # not refused) gets the inner update; a non-finite one stays so.
      out.append(jnp.where(size == 0, 0, jnp.where(
          radius == 0, u, retracted - w)).astype(param_dtype))
    return treedef.unflatten(out), HyperballState(
        optax.safe_increment(state.count), state.radius, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
