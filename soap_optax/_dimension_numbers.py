"""Dimension numbers: which axes of a parameter are batch axes, and how the
others are read as a matrix.

A batch axis gets no Kronecker factor; each slice along the batch axes is
optimized exactly as if it were a parameter of its own (see
:mod:`soap_optax._stacks`, which cuts parameters into units). Dimension numbers
are given per parameter, as a tree prefix of the parameters or a callable of
them, and matched by key path.
"""

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class EigenbasisDimensionNumbers:
  r"""Which axes of a parameter are batch axes, and how to read it as a matrix.

  Like :class:`optax.contrib.MuonDimensionNumbers`: a batch axis gets no Kronecker
  factor, and each slice along the batch axes is optimized exactly as if it
  were a parameter of its own.

  Attributes:
    batch_axes: axes whose slices are independent (negative values count from
      the end), e.g. ``(0,)`` for the layer axis of a scanned ``[L, d, 4d]``
      weight.
    reduction_axes: optional; with ``output_axes``, the non-batch axes are
      grouped into one :math:`(\prod \mathrm{reduction}, \prod \mathrm{output})`
      matrix before factoring (instead of ``merge_dims``). When only one of
      the two is given, the other is every remaining non-batch axis.
    output_axes: optional; see ``reduction_axes``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> # Two scanned layers: each slice along axis 0 is a 3 x 4 unit.
    >>> params = {'layers': jnp.ones((2, 3, 4)), 'head': jnp.ones((4, 5))}
    >>> layers = soap_optax.EigenbasisDimensionNumbers(batch_axes=(0,))
    >>> dims = {'layers': layers, 'head': None}
    >>> state = soap_optax.soap(dimension_numbers=dims).init(params)
    >>> soap_optax.stack_names(state)
    {'stack0_4x5': ("['head']",), 'stack1_3x4': ("['layers']",)}
    >>> # An attention kernel (d, heads, head_dim) read as one d x 6 matrix:
    >>> kernel = {'qkv': jnp.ones((4, 2, 3))}
    >>> dims = soap_optax.EigenbasisDimensionNumbers(reduction_axes=(0,))
    >>> state = soap_optax.soap(dimension_numbers=dims).init(kernel)
    >>> soap_optax.stack_names(state)
    {'stack0_4x6': ("['qkv']",)}
  """

  batch_axes: tuple[int, ...] = ()
  reduction_axes: tuple[int, ...] | None = None
  output_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ('batch_axes', 'reduction_axes', 'output_axes'):
      value = getattr(self, name)
      if value is None and name != 'batch_axes':
        continue
      if isinstance(value, (int, np.integer)):
        value = (value,)
      try:
        value = tuple(value)
      except TypeError:
        raise ValueError(
            f'EigenbasisDimensionNumbers.{name} must be a tuple of integers, '
            f'got {value!r}.') from None
      if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                 for a in value):
        raise ValueError(
            f'EigenbasisDimensionNumbers.{name} must be a tuple of integers, '
            f'got {value!r}.')
      object.__setattr__(self, name, tuple(int(a) for a in value))


def _is_dimension_leaf(x: Any) -> bool:
  return x is None or isinstance(x, EigenbasisDimensionNumbers)


def key_path(path: Sequence[Any]) -> tuple[Any, ...]:
  """A key path with the container types dropped (dict, State, dataclass)."""
  names = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        names.append(getattr(key, attribute))
        break
    else:
      names.append(str(key))
  return tuple(names)


def resolve_dimension_numbers(
    dimension_numbers: Any, params: Any
) -> list[EigenbasisDimensionNumbers | None]:
  """One entry per leaf of ``params``, from a prefix tree (or a callable).

  Entries are matched by key path, so a tree built from :class:`flax.nnx.State`
  (or from boxed Linen parameters) also serves the pure-array dictionaries
  that ``nnx.Optimizer`` and ``nn.unbox`` give the optimizer.

  Args:
    dimension_numbers: ``None`` (no batch axes anywhere), one
      :class:`EigenbasisDimensionNumbers` for every parameter, a tree whose
      key paths are prefixes of the parameters' with such leaves (or
      ``None``), or a callable of ``params`` returning one of these (like
      optax's masks).
    params: the parameter (or gradient) tree.

  Returns:
    A list in ``jax.tree.leaves(params)`` order.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if dimension_numbers is None:
    return [None] * len(leaves)
  if callable(dimension_numbers) and not isinstance(
      dimension_numbers, EigenbasisDimensionNumbers):
    dimension_numbers = dimension_numbers(params)
  table = {}
  for path, numbers in jax.tree_util.tree_flatten_with_path(
      dimension_numbers, is_leaf=_is_dimension_leaf)[0]:
    if not _is_dimension_leaf(numbers):
      raise ValueError(
          'dimension_numbers must hold EigenbasisDimensionNumbers or None at '
          f'its leaves, got {numbers!r} at {jax.tree_util.keystr(path)}.')
    table[key_path(path)] = numbers
  resolved = []
  for path, _ in leaves:
    key = key_path(path)
    prefixes = [key[:k] for k in range(len(key) + 1) if key[:k] in table]
    if not prefixes:
      raise ValueError(
          'dimension_numbers must be a tree prefix of the parameters (or a '
          'callable returning one), but it has no entry for the parameter at '
          f'{jax.tree_util.keystr(path)}.')
    resolved.append(table[prefixes[-1]])
  return resolved


def normalize_axes(axes: Sequence[int], ndim: int, what: str,
                    shape: tuple[int, ...]) -> tuple[int, ...]:
  normalized = []
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
          f'dimension_numbers: {what} {tuple(axes)} out of range for a '
          f'parameter of shape {shape}.')
    normalized.append(axis % ndim)
  if len(set(normalized)) != len(normalized):
    raise ValueError(
        f'dimension_numbers: {what} {tuple(axes)} repeat an axis of a '
        f'parameter of shape {shape}.')
  return tuple(normalized)



def leaf_paths(tree: Any) -> tuple[str, ...]:
  """Each leaf's key path, without the ``.value`` of boxes (Flax variables,
  ``nn.Partitioned``), which parameters carry and gradients may not."""
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = tuple(k for k in path if not (
        isinstance(k, jax.tree_util.GetAttrKey) and k.name == 'value'))
    paths.append(jax.tree_util.keystr(path))
  return tuple(paths)



def placement_axes(shape, numbers):
  """The transpose and grouped shape for one parameter (validated)."""
  ndim = len(shape)
  if numbers is None:
    numbers = EigenbasisDimensionNumbers()
  batch = normalize_axes(numbers.batch_axes, ndim, 'batch_axes', shape)
  rest = [a for a in range(ndim) if a not in batch]
  reduction, output = numbers.reduction_axes, numbers.output_axes
  if reduction is None and output is None:
    return batch + tuple(rest), len(batch), tuple(shape[a] for a in rest)
  given = {}
  for name, axes in (('reduction_axes', reduction), ('output_axes', output)):
    if axes is not None:
      given[name] = normalize_axes(axes, ndim, name, shape)
      if set(given[name]) & set(batch):
        raise ValueError(
            f'dimension_numbers: {name} {axes} overlap batch_axes '
            f'{numbers.batch_axes} for a parameter of shape {shape}.')
  if reduction is None:
    given['reduction_axes'] = tuple(
        a for a in rest if a not in given['output_axes'])
  if output is None:
    given['output_axes'] = tuple(
        a for a in rest if a not in given['reduction_axes'])
  reduction, output = given['reduction_axes'], given['output_axes']
  if set(reduction) & set(output) or sorted(reduction + output) != rest:
    raise ValueError(
        'dimension_numbers: reduction_axes and output_axes must split the '
        f'non-batch axes {tuple(rest)} of a parameter of shape {shape} '
        f'between them, got {reduction} and {output}.')
  grouped = (math.prod(shape[a] for a in reduction),
             math.prod(shape[a] for a in output))
  return batch + reduction + output, len(batch), grouped

