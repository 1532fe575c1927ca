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
from soap_optax import _dimension_numbers
from soap_optax import _kronecker
from soap_optax import _skeleton

class HyperballState(NamedTuple):
  r"""State of :func:`hyperball`.

  Attributes:
    count: the number of calls so far (int32): the step size's schedule is
      evaluated at it.
    radius: :math:`R = \lVert W_0 \rVert_F` of every wrapped leaf, in float32
      (or the leaf's wider dtype), in the order of the parameters' leaves: a
      scalar, or one per slice along the leaf's batch axes (the matrix axes
      kept with size 1).
    inner_state: the wrapped optimizer's state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = soap_optax.hyperball(optax.adam(1e-3), learning_rate=0.05)
    >>> state = tx.init({'w': jnp.full((3, 4), 0.5), 'b': jnp.zeros(4)})
    >>> type(state).__name__
    'HyperballState'
    >>> len(state.radius)  # one radius per matrix: w's
    1
    >>> print(f'{float(state.radius[0]):.4f}')  # ||w||_F = sqrt(3)
    1.7321
  """

  count: jax.Array
  radius: tuple[jax.Array, ...]
  inner_state: Any


def _matrix_axes(params: Any, mask: Any,
                 dimension_numbers: Any) -> list[tuple[int, ...] | None]:
  """Per leaf of ``params``: the axes of the matrices it holds (the
  non-batch axes; each slice along the others keeps a sphere of its own), or
  ``None`` if it passes through. A leaf is wrapped when ``mask`` (``None``:
  every leaf; a tree of booleans, or a function of the parameters returning
  one) selects it and it is 2-D, or its ``dimension_numbers`` leave at least
  two non-batch axes."""
  leaves = jax.tree.leaves(params)
  if mask is None:
    selected = [True] * len(leaves)
  else:
    tree = mask(params) if callable(mask) else mask
    selected = jax.tree.structure(params).flatten_up_to(tree)
    for flag in selected:
      _checks.check_bool('mask (each of its leaves)', flag)
  numbers = _dimension_numbers.resolve_dimension_numbers(dimension_numbers,
                                                         params)
  axes = []
  for flag, leaf, number in zip(selected, leaves, numbers):
    ndim = jnp.ndim(leaf)
    if number is None:
      matrix = tuple(range(ndim)) if ndim == 2 else ()
    else:
      batch = _dimension_numbers.normalize_axes(
          number.batch_axes, ndim, 'batch_axes', jnp.shape(leaf))
      matrix = tuple(a for a in range(ndim) if a not in batch)
    axes.append(matrix if flag and len(matrix) >= 2 else None)
  return axes


def _frobenius(x: jax.Array, axes: tuple[int, ...] | None = None
               ) -> jax.Array:
  """The Frobenius norm over ``axes``: a scalar where they are all of ``x``'s
  (or ``None``), else kept as size-1 axes (one norm per batch slice)."""
  if axes is None or len(axes) == x.ndim:
    return jnp.sqrt(jnp.sum(jnp.square(x)))
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def hyperball(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
  r"""Keeps every wrapped matrix on the sphere of its initial Frobenius norm.

  Hyperball (Wen et al.) replaces weight decay by a constraint: each weight
  matrix :math:`W` stays on the sphere of radius
  :math:`R = \lVert W_0 \rVert_F` (its norm at ``init``), and each step
  moves it by a fixed length :math:`\eta_t R` before it is retracted onto
  the sphere. With :math:`u` the ``inner`` optimizer's update of :math:`W`
  (optax's convention: what :func:`optax.apply_updates` adds) and
  :math:`N(x) = x / \lVert x \rVert_F`:

  .. math::

    W_{t+1} = R\, N\big(W_t + \eta_t R\, N(u_t)\big)

  (the authors' :math:`R\, N\big(W - \eta R\, N(d)\big)` with :math:`d = -u`
  the inner direction). The update returned is :math:`W_{t+1} - W_t`, so
  that :func:`optax.apply_updates` lands on the sphere (to float rounding);
  where :math:`u` is exactly zero (the first call of ``soap``, a rejected
  gradient) it is exactly zero, and where :math:`u` is not finite, so is the
  update. The size of :math:`u` does not matter, only its direction: the
  inner optimizer's own learning rate acts only on the leaves that pass
  through.

  Leaves that are not matrices (vectors, scalars, and leaves of more than two
  axes that ``dimension_numbers`` does not describe) and matrices that
  ``mask`` excludes get ``inner``'s update unchanged. ``dimension_numbers``
  makes matrices of other leaves: a stacked or scanned weight (batch axes:
  each slice keeps a sphere of its own) or an attention kernel such as
  ``(d, heads, head_dim)`` (no batch axes: one sphere; the norm of a tensor
  is that of any matrix it is reshaped into). Norms are taken in float32
  (or the parameter's wider dtype); the update comes out in the parameter's
  dtype.

  Args:
    inner: the optimizer whose updates are wrapped, in optax's update
      convention: an alias such as ``optax.adam(1e-3)``,
      ``optax.contrib.muon(1e-3)`` or ``soap_optax.soap(3e-3)``; a
      ``scale_by_*`` transform (whose output is a direction to subtract) is
      chained with a negative scale first (``optax.chain(
      soap_optax.scale_by_rotated_adam(), optax.scale(-1.0))``;
      :func:`soap_optax.soap_h` chains :func:`optax.scale_by_learning_rate`,
      which also sets the rate of the leaves that pass through).
    learning_rate: :math:`\eta_t`, a float or an ``optax`` schedule of the
      call count (0 on the first call): each wrapped matrix moves by
      :math:`\eta_t R` before the retraction.
    mask: which matrices to wrap: a tree of booleans matching the
      parameters (or a function of the parameters returning one); ``None``:
      every matrix.
    dimension_numbers: as in :func:`soap_optax.scale_by_rotated_adam`
      (``None``, one :class:`soap_optax.EigenbasisDimensionNumbers`, a tree
      prefix of the parameters with such leaves or ``None``, or a callable
      of the parameters returning one): a leaf with an entry is a matrix
      when it has at least two axes besides its ``batch_axes``, and each
      slice along those keeps a sphere of its own; a leaf without one is a
      matrix when it is 2-D.

  Returns:
    An :class:`optax.GradientTransformation`. ``init`` raises a ``ValueError``
    naming the leaf if a wrapped matrix is zero (no sphere to keep it on;
    under ``jax.jit(init)`` the values are not known, and such a matrix gets
    the inner update unchanged); ``update`` needs ``params``. The norms are
    of whole matrices: under a :mod:`jax.sharding` layout XLA reduces across
    devices, but inside a user's own ``shard_map`` each shard would keep a
    sphere of its own.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {'w': jnp.arange(12.0).reshape(3, 4) / 10, 'b': jnp.zeros(4)}
    >>> tx = soap_optax.hyperball(optax.adam(1e-3), learning_rate=0.05)
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.ones((3, 4)), 'b': jnp.ones(4)}
    >>> updates, state = tx.update(grads, state, params)
    >>> new_params = optax.apply_updates(params, updates)
    >>> print(bool(jnp.any(new_params['w'] != params['w'])))
    True
    >>> # w moved on the sphere of its initial norm:
    >>> print(f"{jnp.linalg.norm(params['w']):.4f}")
    2.2494
    >>> print(f"{jnp.linalg.norm(new_params['w']):.4f}")
    2.2494
    >>> print(jnp.round(updates['b'], 4))  # a vector gets Adam's update
    [-0.001 -0.001 -0.001 -0.001]

  References:
    Wen, Dang, Lyu, Ma and Liang, Hyperball optimization (arXiv 2606.16899)
    and their post "From Weight Decay to Hyperball Optimization" (2025).
  """

  def init_fn(params):
    if _skeleton.is_optax_params_placeholder(params):
      # optax.tree.map_params: no radius is shaped like the parameters.
      return HyperballState(jnp.zeros([], jnp.int32),
                            _skeleton.OUTSIDE_MAP_PARAMS, inner.init(params))
    matrix_axes = _matrix_axes(params, mask, dimension_numbers)
    radius = []
    paths = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), axes in zip(paths, matrix_axes):
      if axes is None:
        continue
      leaf = jnp.asarray(leaf)
      norm = _frobenius(leaf.astype(_kronecker.state_dtype(leaf.dtype)),
                        axes)
      if not isinstance(norm, jax.core.Tracer) and not bool(
          jnp.all(norm > 0)):
        raise ValueError(
            'hyperball cannot wrap a zero matrix: the parameter at '
            f'{jax.tree_util.keystr(path)} has (a matrix of) Frobenius norm '
            f'{float(jnp.min(norm))} at init, and Hyperball keeps each '
            'matrix on the sphere of its initial norm. Initialize it to '
            'nonzero values or leave it out with mask=.')
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
    for u, w, axes in zip(leaves, weights,
                          _matrix_axes(params, mask, dimension_numbers)):
      if axes is None:
        out.append(u)
        continue
      param_dtype, dtype = w.dtype, _kronecker.state_dtype(w.dtype)
      radius = next(radii).astype(dtype)
      w, u = w.astype(dtype), u.astype(dtype)
      size = _frobenius(u, axes)
      moved = w + eta * radius * u / jnp.where(size == 0, 1, size)
      retracted = radius * moved / _frobenius(moved, axes)
      # No step for a zero update; a zero matrix (R = 0: its init traced, so
      # not refused) gets the inner update; a non-finite one stays so.
      out.append(jnp.where(size == 0, 0, jnp.where(
          radius == 0, u, retracted - w)).astype(param_dtype))
    return treedef.unflatten(out), HyperballState(
        optax.safe_increment(state.count), state.radius, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
