"""Argument validation shared by the transforms and aliases.

Every check runs at construction (or at ``init`` for parameter dtypes) and
raises a ``ValueError`` that names the argument and the accepted values.
Hyperparameters that arrive as tracers (:func:`optax.inject_hyperparams` passes
them that way inside ``jit``) cannot be inspected and are let through.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_float(name: str, value: Any, accepted: str) -> float | None:
  """Returns ``value`` as a Python float, or None when it is traced.

  Raises a ValueError naming ``name`` and the ``accepted`` values when
  ``value`` is not a real scalar (``None``, a string, an array...).
  """
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
    ok = (array.shape == () and not isinstance(value, (bool, np.bool_))
          and (np.issubdtype(array.dtype, np.floating)
               or np.issubdtype(array.dtype, np.integer)))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f'{name} must be {accepted}, got {value!r}.')
  return float(array)


def check_beta(name: str, value: Any) -> None:
  """Checks that a decay rate lies in [0, 1)."""
  accepted = 'a number in [0, 1)'
  x = _concrete_float(name, value, accepted)
  if x is not None and not 0.0 <= x < 1.0:
    raise ValueError(f'{name} must be {accepted}, got {value!r}.')


def check_nonnegative(name: str, value: Any) -> None:
  """Checks that a scalar is finite and >= 0."""
  accepted = 'a finite number >= 0'
  x = _concrete_float(name, value, accepted)
  if x is not None and not (np.isfinite(x) and x >= 0.0):
    raise ValueError(f'{name} must be {accepted}, got {value!r}.')


def check_positive(name: str, value: Any) -> None:
  """Checks that a scalar is finite and > 0."""
  accepted = 'a finite number > 0'
  x = _concrete_float(name, value, accepted)
  if x is not None and not (np.isfinite(x) and x > 0.0):
    raise ValueError(f'{name} must be {accepted}, got {value!r}.')


def check_bool(name: str, value: Any) -> None:
  """Checks that a switch is ``True`` or ``False`` (not ``"no"``, not 0)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{name} must be True or False, got {value!r}.')


def check_int(name: str, value: Any, minimum: int) -> None:
  """Checks that a structural argument is an integer >= ``minimum``."""
  if isinstance(value, jax.core.Tracer):
    return
  array = np.asarray(value)
  is_int = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            ) or (array.shape == () and jnp.issubdtype(array.dtype, jnp.integer))
  if not is_int or int(array) < minimum:
    raise ValueError(
        f'{name} must be an integer >= {minimum}, got {value!r}.')


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Checks that a string option is one of ``choices``."""
  if value not in choices:
    raise ValueError(f'{name} must be one of {choices}, got {value!r}.')


def check_arguments(
    arguments: dict[str, Any], *, betas: tuple[str, ...] = (),
    nonnegative: tuple[str, ...] = (), positive: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
    optional: tuple[str, ...] = ()) -> None:
  """A transform's hyperparameters checked by kind, from its keyword
  ``arguments`` (its ``locals()``): each name listed under a kind gets that
  kind's check above; a name in ``optional`` may also be ``None``."""
  kinds = ((betas, check_beta), (nonnegative, check_nonnegative),
           (positive, check_positive), (bools, check_bool))
  for names, check in kinds:
    for name in names:
      if not (name in optional and arguments[name] is None):
        check(name, arguments[name])
  for name, accepted in (choices or {}).items():
    check_choice(name, arguments[name], accepted)


def check_float_params(params: Any) -> None:
  """Checks that every parameter is a real floating-point array."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          'params must be real floating-point arrays (float16, bfloat16, '
          f'float32 or float64); the leaf at {jax.tree_util.keystr(path)} '
          f'has dtype {dtype}.')


def check_float_dtype(name: str, dtype: Any) -> jnp.dtype | None:
  """Checks an optional dtype argument: ``None`` or a floating-point dtype."""
  if dtype is None:
    return None
  try:
    canonical = jnp.dtype(dtype)
  except TypeError:
    canonical = None
  if canonical is None or not jnp.issubdtype(canonical, jnp.floating):
    raise ValueError(
        f'{name} must be None or a floating-point dtype (e.g. jnp.bfloat16, '
        f'jnp.float32), got {dtype!r}.')
  return canonical
