"""One program per factor size: a function mapped over every stacked factor.

The refresh (:mod:`soap_optax._refresh`) runs a solver over every factor of
the same size and dtype across the whole parameter tree in one batched call
(:func:`map_by_size`), so that a tree compiles one solver program per
distinct factor size, not one per parameter.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def map_items(fn: Callable[..., Any], stacked: Sequence[jax.Array]):
  """``fn`` over the leading axis of ``stacked`` as one :func:`jax.lax.map`."""
  return jax.lax.map(lambda args: fn(*args), tuple(stacked))


def vmap_items(fn: Callable[..., Any], stacked: Sequence[jax.Array]):
  """``fn`` over the leading axis of ``stacked`` as one :func:`jax.vmap`."""
  return jax.vmap(fn)(*stacked)


def _map_stacked(fn: Callable[..., Any], stacked: Sequence[jax.Array]):
  """``fn`` over the leading axis of ``stacked``: one call for the whole stack.

  On accelerators this is :func:`jax.vmap` (one batched solver launch). On CPU it
  is :func:`jax.lax.map`: jaxlib's batched LAPACK kernels (``syevd``) share XLA's
  CPU thread pool, and with a batch inside a larger program they can wait for
  pool threads that are themselves waiting, so the step never finishes
  (observed with jax 0.10.2 on 2 cores, in about 1 run of 3; never with
  ``lax.map``). It is still one primitive per stack in the program.
  """
  if jax.default_backend() == 'cpu':
    return map_items(fn, stacked)
  return vmap_items(fn, stacked)


def map_by_size(fn: Callable[..., Any], *arg_lists: Sequence[jax.Array],
                batched_call: Callable[..., Any] = _map_stacked):
  """Applies ``fn`` to every item of every stack, batched by item shape.

  Each argument list holds stacks: arrays whose leading axis counts items
  (``(U_k, ...)``). Stacks whose first argument shares item shape and dtype
  are concatenated and sent through one batched call
  (``batched_call(fn, joined_args)``, by default :func:`_map_stacked`), so
  the number of linear-algebra primitives is the number of distinct
  (item shape, dtype) pairs, not the number of stacks or items.

  Returns:
    A list with ``fn``'s stacked output for each stack, in the input order.
  """
  groups: dict[tuple[Any, ...], list[int]] = {}
  for k, first in enumerate(arg_lists[0]):
    groups.setdefault((first.shape[1:], first.dtype), []).append(k)
  results: list[Any] = [None] * len(arg_lists[0])
  for members in groups.values():
    joined = [args[members[0]] if len(members) == 1 else
              jnp.concatenate([args[k] for k in members])
              for args in arg_lists]
    batched = batched_call(fn, joined)
    start = 0
    for k in members:
      size = arg_lists[0][k].shape[0]
      results[k] = jax.tree.map(
          lambda out, start=start, size=size: out[start:start + size],
          batched)
      start += size
  return results
