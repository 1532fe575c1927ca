"""Test problems with known structure, for tests, notebooks and benchmarks.

:func:`kronecker_quadratic` is the problem SOAP is built for: a quadratic whose
Hessian is a Kronecker product with random (not axis-aligned) eigenbases, and
stochastic gradients whose noise covariance has the same Kronecker structure.
:func:`~soap_optax.problems.dead_feature_regression` is a float32 hazard:
weights whose gradient is exactly zero, which rotation noise must not move.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soap_optax import _aliases


class KroneckerQuadratic(NamedTuple):
  r""":math:`L(P) = \frac{1}{2} \mathrm{tr}((P - P^*)^\top A (P - P^*) B)`.

  Its Hessian is :math:`B \otimes A`.

  Attributes:
    left: :math:`A` (:math:`m \times m`, symmetric positive definite).
    right: :math:`B` (:math:`n \times n`, symmetric positive definite).
    optimum: :math:`P^*`.
    init: the starting point.
    noise_scale: :math:`\sigma` in the stochastic gradient below.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from soap_optax import problems
    >>> problem = problems.kronecker_quadratic(jax.random.key(0), m=4, n=3)
    >>> print(float(problem.loss(problem.optimum)))
    0.0
    >>> print(bool(jnp.all(problem.gradient(problem.optimum) == 0)))
    True
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
    r""":math:`A (P - P^*) B + \sigma A^{1/2} Z B^{1/2}`, with :math:`Z`
    standard normal.

    The noise has covariance :math:`\sigma^2 (B \otimes A)`: the same
    Kronecker structure as the Hessian.
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

  Examples:
    >>> import jax
    >>> from soap_optax import problems
    >>> problem = problems.kronecker_quadratic(jax.random.key(0), m=4, n=3)
    >>> print(problem.init.shape, problem.left.shape, problem.right.shape)
    (4, 3) (4, 4) (3, 3)
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
    return_state: bool = False,
) -> Any:
  """Runs ``optimizer`` on stochastic gradients; returns the exact loss curve.

  The whole run is one ``lax.scan`` under ``jit``. Entry :math:`k` of the
  result is the (noise-free) loss after :math:`k` updates; entry 0 is the
  initial loss.
  With ``return_state``, returns ``(curve, final optimizer state)``.

  Examples:
    >>> import jax
    >>> import soap_optax
    >>> from soap_optax import problems
    >>> problem = problems.kronecker_quadratic(jax.random.key(0), m=4, n=3)
    >>> curve = problems.run_optimizer(problem, soap_optax.soap(1e-2),
    ...                                num_steps=20, key=jax.random.key(1))
    >>> curve.shape
    (21,)
    >>> print(bool(curve[-1] < curve[0]))
    True
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
    (_, state), losses = jax.lax.scan(
        step, (problem.init, optimizer.init(problem.init)), keys)
    curve = jnp.concatenate([problem.loss(problem.init)[None], losses])
    return (curve, state) if return_state else curve

  return run(key)


def steps_to_reach(losses: jax.Array, target: float) -> int | None:
  """First index at which ``losses <= target``; None if never reached.

  Examples:
    >>> import jax.numpy as jnp
    >>> from soap_optax import problems
    >>> losses = jnp.array([4.0, 2.0, 1.0, 0.5])
    >>> problems.steps_to_reach(losses, target=1.0)
    2
    >>> print(problems.steps_to_reach(losses, target=0.1))
    None
  """
  below = jnp.nonzero(losses <= target, size=1, fill_value=-1)[0][0]
  below = int(below)
  return None if below < 0 else below


# Input features of dead_feature_regression that are always zero.
DEAD_FEATURES = (3, 7, 11, 19, 22, 28)


class DeadFeatureRun(NamedTuple):
  """What :func:`~soap_optax.problems.dead_feature_regression` returns.

  Examples:
    >>> from soap_optax import problems
    >>> problems.DeadFeatureRun._fields
    ('init', 'final', 'state', 'losses')
  """

  init: jax.Array
  final: jax.Array
  state: Any
  losses: jax.Array


def dead_feature_regression(
    steps: int, *, rounding_floor: bool = True, dtype: Any = jnp.float32
) -> DeadFeatureRun:
  r"""Linear regression whose dead input features give exactly zero gradient.

  A :math:`64 \times 32` weight, batches of 16 inputs (fixed, seed 0) whose
  features ``DEAD_FEATURES`` (the module's constant) are always zero, so
  those weight columns get exactly zero gradient; ``steps`` steps of default
  ``soap`` (refresh every 10, no weight decay), in one ``lax.scan``.

  Returns:
    The weight at the start and at the end, the final optimizer state and the
    loss before each step.

  Examples:
    >>> from soap_optax import problems
    >>> run = problems.dead_feature_regression(steps=12)
    >>> print(run.init.shape, run.final.shape, run.losses.shape)
    (64, 32) (64, 32) (12,)
    >>> # The dead columns stay put (rounding_floor=False lets them drift):
    >>> print(problems.dead_weight_movement(run) < 1e-3)
    True
  """
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(16, 32))
  inputs[:, list(DEAD_FEATURES)] = 0.0
  target = rng.normal(size=(64, 32)) @ inputs.T
  inputs, target = (jnp.asarray(a, dtype) for a in (inputs, target))
  init = jnp.asarray(rng.normal(size=(64, 32)) / 8, dtype)
  tx = _aliases.soap(weight_decay=0.0, rounding_floor=rounding_floor)
  loss = lambda w: 0.5 * jnp.mean((w @ inputs.T - target)**2)

  @jax.jit
  def run(w):
    def step(carry, _):
      w, state = carry
      updates, state = tx.update(jax.grad(loss)(w), state, w)
      return (w + updates, state), loss(w)
    (w, state), losses = jax.lax.scan(step, (w, tx.init(w)), None, steps)
    return w, state, losses

  return DeadFeatureRun(init, *run(init))


def dead_weight_movement(run: DeadFeatureRun) -> float:
  """How far the dead columns moved, relative to their initial norm.

  Examples:
    >>> import jax.numpy as jnp
    >>> from soap_optax import problems
    >>> init = jnp.ones((64, 32))
    >>> final = init.at[:, 3].add(1.0)  # one of the six dead columns moved
    >>> run = problems.DeadFeatureRun(init, final, None, jnp.zeros(1))
    >>> print(f'{problems.dead_weight_movement(run):.4f}')  # 1 / sqrt(6)
    0.4082
  """
  dead = list(DEAD_FEATURES)
  return float(jnp.linalg.norm(run.final[:, dead] - run.init[:, dead])
               / jnp.linalg.norm(run.init[:, dead]))
