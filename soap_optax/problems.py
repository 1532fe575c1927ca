"""Test problems with known structure, for tests, notebooks and benchmarks.

:func:`kronecker_quadratic` is the problem SOAP is built for: a quadratic whose
Hessian is a Kronecker product with random (not axis-aligned) eigenbases, and
stochastic gradients whose noise covariance has the same Kronecker structure.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class KroneckerQuadratic(NamedTuple):
  """``L(P) = 1/2 tr((P - P*)^T A (P - P*) B)``, Hessian ``B ⊗ A``.

  Attributes:
    left: ``A`` (m x m, symmetric positive definite).
    right: ``B`` (n x n, symmetric positive definite).
    optimum: ``P*``.
    init: the starting point.
    noise_scale: ``sigma`` in the stochastic gradient below.
  """

  left: jax.Array
  right: jax.Array
  optimum: jax.Array
  init: jax.Array
  noise_scale: float

  def loss(self, p: jax.Array) -> jax.Array:
    d = p - self.optimum
    return 0.5 * jnp.sum(d * (self.left @ d @ self.right))

  def gradient(self, p: jax.Array) -> jax.Array:
    return self.left @ (p - self.optimum) @ self.right

  def stochastic_gradient(self, p: jax.Array, key: jax.Array) -> jax.Array:
    """``A (P - P*) B + sigma A^{1/2} Z B^{1/2}``, ``Z`` standard normal.

    The noise has covariance ``sigma^2 (B ⊗ A)``: the same Kronecker structure
    as the Hessian.
    """
    z = jax.random.normal(key, p.shape, p.dtype)
    return self.gradient(p) + self.noise_scale * (
        _sqrtm(self.left) @ z @ _sqrtm(self.right))


def _sqrtm(a: jax.Array) -> jax.Array:
  w, v = jnp.linalg.eigh(a)
  return (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T


def _random_spd(key: jax.Array, n: int, condition: float) -> jax.Array:
  """A symmetric matrix with eigenvalues log-spaced in [1/condition, 1]."""
  q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
  eigenvalues = jnp.logspace(0.0, -jnp.log10(condition), n)
  return (q * eigenvalues) @ q.T


def kronecker_quadratic(
    key: jax.Array,
    m: int = 16,
    n: int = 16,
    condition: float = 100.0,
    noise_scale: float = 0.1,
) -> KroneckerQuadratic:
  """An ill-conditioned quadratic with Kronecker Hessian and gradient noise.

  Args:
    key: a PRNG key.
    m: rows of the parameter.
    n: columns of the parameter.
    condition: condition number of each factor (the Hessian's is its square).
    noise_scale: standard deviation scale of the gradient noise.

  Returns:
    A :class:`KroneckerQuadratic`.
  """
  k_left, k_right, k_opt, k_init = jax.random.split(key, 4)
  return KroneckerQuadratic(
      left=_random_spd(k_left, m, condition),
      right=_random_spd(k_right, n, condition),
      optimum=jax.random.normal(k_opt, (m, n)),
      init=jax.random.normal(k_init, (m, n)),
      noise_scale=noise_scale,
  )


def run_optimizer(
    problem: KroneckerQuadratic,
    optimizer,
    num_steps: int,
    key: jax.Array,
) -> jax.Array:
  """Runs ``optimizer`` on stochastic gradients; returns the exact loss curve.

  The whole run is one ``lax.scan`` under ``jit``. Entry ``k`` of the result is
  the (noise-free) loss after ``k`` updates; entry 0 is the initial loss.
  """

  def step(carry, step_key):
    params, state = carry
    grads = problem.stochastic_gradient(params, step_key)
    updates, state = optimizer.update(grads, state, params)
    params = params + updates
    return (params, state), problem.loss(params)

  @jax.jit
  def run(key):
    keys = jax.random.split(key, num_steps)
    _, losses = jax.lax.scan(
        step, (problem.init, optimizer.init(problem.init)), keys)
    return jnp.concatenate([problem.loss(problem.init)[None], losses])

  return run(key)


def steps_to_reach(losses: jax.Array, target: float) -> int | None:
  """First index at which ``losses <= target``; None if never reached."""
  below = jnp.nonzero(losses <= target, size=1, fill_value=-1)[0][0]
  below = int(below)
  return None if below < 0 else below
