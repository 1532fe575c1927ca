"""Complete optimizers: the transforms chained with weight decay and a step size.

Each alias reads like ``optax.adamw``: a preconditioning transform, decoupled
weight decay, then the (possibly scheduled) learning rate.
"""

from typing import Any, Callable

import jax
import optax

from soap_optax import _transforms


def _is_after_first_call(step: jax.Array) -> jax.Array:
  return step > 0


def _decayed_weights_after_first_call(
    weight_decay: Any, mask: Any) -> optax.GradientTransformation:
  """``optax.add_decayed_weights``, skipped on the first call.

  The first call of the eigenbasis transforms only initializes the
  preconditioner and returns a zero update; weight decay must not move the
  parameters on that call either.
  """
  return optax.transforms.conditionally_transform(
      optax.add_decayed_weights(weight_decay, mask), _is_after_first_call)


def soap(
    learning_rate: optax.ScalarOrSchedule = 3e-3,
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
  """SOAP: Adam in the eigenbasis of Shampoo's preconditioner, with AdamW decay.

  .. math::

    p \\leftarrow p - \\eta_k \\big(U_k + \\lambda\\,p\\big)

  where ``U_k`` is :func:`soap_optax.scale_by_rotated_adam`'s update and
  ``lambda`` is ``weight_decay`` (applied to the leaves selected by
  ``weight_decay_mask``). The first call only initializes the preconditioner:
  its update is exactly zero, weight decay included. The learning-rate
  schedule, like ``optax.adamw``'s, counts every call, the first included.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    shampoo_beta: decay of the Kronecker factors (``None``: ``b2``).
    eps: added to ``sqrt(v)`` (uncorrected), as in the authors' code.
    weight_decay: decoupled weight decay, multiplied by the learning rate.
    precondition_frequency: refresh the eigenbases every this many steps.
    max_precond_dim: axes longer than this are not rotated.
    merge_dims: merge consecutive small axes before factoring.
    precondition_1d: rotate 1-D parameters too.
    normalize_grads: divide each parameter's update by its RMS.
    weight_decay_mask: a tree of booleans, or a function of the parameters
      returning one, that selects the leaves to decay.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  return optax.chain(
      _transforms.scale_by_rotated_adam(
          b1=b1,
          b2=b2,
          shampoo_beta=shampoo_beta,
          eps=eps,
          precondition_frequency=precondition_frequency,
          max_precond_dim=max_precond_dim,
          merge_dims=merge_dims,
          precondition_1d=precondition_1d,
          normalize_grads=normalize_grads,
      ),
      _decayed_weights_after_first_call(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
