"""Flax glue: batch axes from axis names, and ``flax.serialization`` support.

Scanned Flax models keep their layers as one parameter with a leading layer
axis, and name that axis in the parameter's metadata:

* Flax NNX: ``nnx.vmap``/``nnx.scan`` with
  ``transform_metadata={nnx.PARTITION_NAME: "layers"}`` insert ``"layers"``
  into the ``out_sharding`` metadata of every Variable that has one (for
  example those created with ``nnx.with_partitioning``);
* Linen: ``nn.scan``/``nn.vmap`` with
  ``metadata_params={nn.PARTITION_NAME: "layers"}`` insert it into the
  ``names`` of ``nn.Partitioned`` boxes (``nn.with_partitioning`` or
  ``nn.with_logical_partitioning`` initializers).

:func:`dimension_numbers_from_axis_names` turns those names into the
``dimension_numbers`` tree that the transforms take.
"""

from typing import Any, Iterable

import jax

from soap_optax import _dimension_numbers
from soap_optax import _stacks

try:  # flax is optional: the helper needs it only to recognise its boxes.
  from flax import serialization as _serialization
  from flax.core import meta as _linen_meta
  from flax import nnx as _nnx
except ImportError:  # pragma: no cover
  _serialization = _linen_meta = _nnx = None


def _is_box(x: Any) -> bool:
  if _nnx is not None and isinstance(x, _nnx.Variable):
    return True
  return _linen_meta is not None and isinstance(x, _linen_meta.AxisMetadata)


def _axis_names(x: Any) -> tuple[Any, ...] | None:
  """The per-axis names a parameter carries, or None."""
  if _nnx is not None and isinstance(x, _nnx.Variable):
    metadata = x.get_metadata()
    for key in ('out_sharding', 'sharding_names', 'sharding'):
      names = metadata.get(key)
      if isinstance(names, (tuple, list)):
        return tuple(names)
    return None
  if _linen_meta is not None and isinstance(x, _linen_meta.Partitioned):
    return tuple(x.names)
  sharding = getattr(x, 'sharding', None)
  spec = getattr(sharding, 'spec', None)
  return None if spec is None else tuple(spec)


def dimension_numbers_from_axis_names(
    params: Any, batch_axis_names: str | Iterable[str] = ('layers',)) -> Any:
  """``dimension_numbers`` that make every named layer axis a batch axis.

  Args:
    params: the parameters with their metadata: ``nnx.state(model,
      nnx.Param)`` for Flax NNX, the boxed ``params`` collection of a Linen
      model (``nn.Partitioned`` leaves), or arrays (or
      :class:`jax.ShapeDtypeStruct`) whose ``NamedSharding`` names mesh axes.
    batch_axis_names: the axis names that mark batch axes.

  Returns:
    A tree with the structure of ``params`` down to each parameter (a prefix
    of both the boxed and the unboxed parameters), holding an
    :class:`EigenbasisDimensionNumbers` for each parameter with a named batch
    axis and ``None`` for the others. Pass it as ``dimension_numbers``.

  Example (NNX)::

    dims = soap_optax.dimension_numbers_from_axis_names(
        nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(
        model, soap_optax.soap(3e-3, dimension_numbers=dims), wrt=nnx.Param)

  Examples:
    >>> import flax.linen as nn
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> params = {
    ...     'layers': nn.Partitioned(jnp.ones((2, 3, 4)),
    ...                              names=('layers', None, None)),
    ...     'head': jnp.ones((4, 5)),
    ... }
    >>> dims = soap_optax.dimension_numbers_from_axis_names(params)
    >>> dims['layers'].batch_axes
    (0,)
    >>> print(dims['head'])
    None
    >>> tx = soap_optax.soap(3e-3, dimension_numbers=dims)
    >>> state = tx.init(nn.unbox(params))
  """
  if isinstance(batch_axis_names, str):
    batch_axis_names = (batch_axis_names,)
  wanted = set(batch_axis_names)

  def is_batch(name):
    if isinstance(name, (tuple, list)):
      return any(n in wanted for n in name)
    return name in wanted

  def numbers(x):
    names = _axis_names(x) or ()
    axes = tuple(i for i, name in enumerate(names) if is_batch(name))
    return _dimension_numbers.EigenbasisDimensionNumbers(batch_axes=axes) if axes else None

  return jax.tree.map(numbers, params, is_leaf=_is_box)


if _serialization is not None:
  # The plan is static structure, not data: nothing to save, and a restore
  # keeps the target's plan.
  _serialization.register_serialization_state(
      _stacks.EigenbasisPlan, lambda plan: {}, lambda plan, state: plan,
      override=True)
