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
