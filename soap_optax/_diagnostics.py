"""Inspecting optimizer states."""

from typing import Any

import jax
import numpy as np


def state_size(state: Any) -> int:
  """Number of array elements in an optimizer state, scalars (counters,
  injected hyperparameters) excluded."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)
             if np.ndim(x) > 0)


def state_nbytes(state: Any) -> int:
  """Bytes held by an optimizer state's arrays, scalars included."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(state))


def state_nbytes_per_device(state: Any) -> dict[Any, int]:
  """Bytes of an optimizer state's arrays held by each device (the
  addressable shards of each array, replicas counted on every device that
  holds one)."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = (
          per_device.get(shard.device, 0) + shard.data.nbytes)
  return per_device
