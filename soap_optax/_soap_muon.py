"""SOAP-Muon: Muon's Nesterov momentum whitened in SOAP's eigenbasis, then
orthogonalized (a rule of the skeleton, :mod:`soap_optax._skeleton`)."""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax import _estimators
from soap_optax import _floors
from soap_optax import _kronecker
from soap_optax import _skeleton
from soap_optax import _state

# optax.contrib.muon's defaults: the quintic's coefficients and its steps.
MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)
MUON_NS_STEPS = 5


def newton_schulz(x: jax.Array, coeffs: Any = MUON_NS_COEFFS,
                  steps: int = MUON_NS_STEPS, eps: float = 1e-8) -> jax.Array:
  """:func:`optax.contrib.muon`'s orthogonalization of one matrix (its default,
  Frobenius-normalized iteration), every product at ``HIGHEST`` precision:
  ``X = x / (||x||_F + eps)`` (transposed when taller than wide), then
  ``steps`` times ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``."""
  transposed = x.shape[0] > x.shape[1]
  x = x.T if transposed else x
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x))) + eps)
  a, b, c = (jnp.asarray(k, x.dtype) for k in coeffs)
  def quintic(_, x):
    gram = jnp.matmul(x, x.T, precision=_kronecker.HIGHEST)
    return a * x + jnp.matmul(
        b * gram + c * jnp.matmul(gram, gram, precision=_kronecker.HIGHEST),
        x, precision=_kronecker.HIGHEST)
  x = jax.lax.fori_loop(0, steps, quintic, x)  # steps may be traced.
  return x.T if transposed else x


class ScaleBySoapMuonState(NamedTuple):
  r"""State of :func:`scale_by_soap_muon`.

  Attributes:
    mu: the momentum :math:`M`, rotated into the unit's bases (carried
      exactly into new ones at a refresh), one ``(U, *merged_shape)`` array
      per stack, in ``mu_dtype``.
    nu: the second moment :math:`V` of the rotated Nesterov momentum, shaped
      like ``mu`` (permuted with the columns at a refresh).
    eigenbasis: the engine's factors and bases.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> state = soap_optax.scale_by_soap_muon().init({'w': jnp.ones((3, 4))})
    >>> type(state).__name__
    'ScaleBySoapMuonState'
    >>> state.mu[0].shape
    (1, 3, 4)
  """

  mu: tuple[jax.Array, ...]
  nu: tuple[jax.Array, ...]
  eigenbasis: _state.EigenbasisState


class _SoapMuonStack(NamedTuple):
  mu: jax.Array
  nu: jax.Array


@dataclasses.dataclass(frozen=True)
class _SoapMuonRule(_skeleton.Rule):
  """Nesterov momentum over the rotated second moment, orthogonalized in the
  parameters' space; a refresh carries ``M`` and permutes ``V``."""

  b1: Any
  b2: Any
  eps: Any
  ns_coeffs: Any
  ns_steps: int
  rounding_floor: bool
  mu_dtype: Any

  State = ScaleBySoapMuonState
  carries_moments = True

  def init_stack(self, stack):
    shape = (stack.num_slots, *stack.layout.merged_shape)
    return _SoapMuonStack(jnp.zeros(shape, self.mu_dtype or stack.dtype),
                          jnp.zeros(shape, stack.dtype))

  def step(self, rotated, state, view):
    mu = self.b1 * state.mu.astype(rotated.dtype) + (1 - self.b1) * rotated
    nesterov = (1 - self.b1) * rotated + self.b1 * mu
    nu = self.b2 * state.nu + (1 - self.b2) * jnp.square(nesterov)
    second_moment = nu + (_floors.rounding_floor_squared(
        nu, view.layout, view.extent) if self.rounding_floor else 0)
    whitened = nesterov / jnp.sqrt(jnp.maximum(second_moment,
                                               jnp.square(self.eps)))
    if whitened.ndim == 2:  # A matrix: orthogonalized where it lives.
      rows, cols = whitened.shape
      polar = newton_schulz(_kronecker.unrotate(whitened, view.factors),
                            self.ns_coeffs, self.ns_steps)
      whitened = _kronecker.rotate(polar, view.factors) * jnp.sqrt(
          max(1.0, rows / cols)).astype(rotated.dtype)
    return whitened, 1, _SoapMuonStack(mu.astype(state.mu.dtype), nu)

  def on_refresh(self, state, change):
    """``M`` carried exactly into the new bases; ``V`` permuted with the
    columns."""
    return _SoapMuonStack(change.tensor(state.mu), change.permuted(state.nu))


def scale_by_soap_muon(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike = 1e-8,
    ns_coeffs: tuple[float, float, float] = MUON_NS_COEFFS,
    ns_steps: int = MUON_NS_STEPS,
    precondition_frequency: Any = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    one_sided: bool = False,
    mu_dtype: Any | None = None,
    dimension_numbers: Any = None,
    block_size: int | None = None,
    staggered_refresh: bool = False,
    rounding_floor: bool = True,
    mesh: Any = None,
    shard_axes: Any = None,
    refresh: str = 'qr',
) -> optax.GradientTransformation:
  r"""SOAP-Muon: Muon's momentum whitened in SOAP's eigenbasis, then
  orthogonalized.

  Per unit (a parameter, a slice along its batch axes or a block) with
  gradient :math:`G` and SOAP's factors :math:`GG_i` (EMAs of
  :math:`C_i(G)`, decay :math:`\beta`: ``shampoo_beta``) and bases
  :math:`Q_i`:

  * first accepted call (initialization):
    :math:`GG_i = (1 - \beta)\, C_i(G)`,
    :math:`Q_i = \operatorname{eigh}(GG_i)`; the update is zero;
  * every later call, in the bases from before it:

    .. math::

      M &\leftarrow b_1 M + (1 - b_1) G, \qquad U = (1 - b_1) G + b_1 M \\
      \hat U &= \operatorname{rotate}(U), \qquad
      V \leftarrow b_2 V + (1 - b_2) \hat U^2, \qquad
      P = \operatorname{unrotate}\big(\hat U / \sqrt{\max(V, \epsilon^2)}
        \big) \\
      O &= \operatorname{NS}(P) \cdot
        \sqrt{\max(1, \mathrm{rows} / \mathrm{cols})}

    (:math:`V + f^2` in place of :math:`V` with ``rounding_floor``, the
    floor of :func:`soap_optax.scale_by_rotated_adam`); then the factors
    absorb :math:`C_i(G)` and, every ``precondition_frequency`` calls, the
    bases are refreshed as SOAP's (:math:`V` permuted with the columns).
    :math:`\operatorname{NS}` is :func:`optax.contrib.muon`'s default
    Newton-Schulz iteration: the matrix divided by its Frobenius norm (plus
    :math:`10^{-8}`), then ``ns_steps = 5`` quintic steps
    :math:`X \leftarrow a X + (b A + c A^2) X`, :math:`A = X X^\top`, with
    :math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`;
    :math:`\mathrm{rows} \times \mathrm{cols}` is the unit's shape as
    stored. No bias correction. A unit that is not a matrix (a vector, a
    3-D unit) gets :math:`P` unorthogonalized: route those parameters to
    AdamW.

  The momentum is kept rotated (:math:`\operatorname{rotate}` is linear: the
  same :math:`\hat U`), carried exactly into new bases at a refresh. Units
  of different shapes are not padded into shared stacks
  (:math:`\mathrm{rows} / \mathrm{cols}` is the unit's own). State per
  :math:`m \times n` matrix: SOAP's (:math:`m`, :math:`v`, factors and
  bases).

  Args:
    b1: :math:`\mu`, the momentum's decay, in :math:`[0, 1)`.
    b2: the second moment's decay, in :math:`[0, 1)`.
    shampoo_beta: the factors' decay (``None``: ``b2``).
    eps: :math:`\epsilon`, the floor of :math:`\sqrt{V}`, :math:`> 0` (a
      zero :math:`V` would give :math:`0/0`).
    ns_coeffs: the Newton-Schulz quintic's :math:`(a, b, c)`.
    ns_steps: its number of steps, :math:`\ge 0`.
    precondition_frequency: refresh the bases every this many calls (the
      record runs 1), or ``"adaptive"`` / :class:`soap_optax.AdaptiveRefresh`;
      ``max_precond_dim``, ``merge_dims``, ``one_sided``, ``mu_dtype``,
      ``dimension_numbers``, ``block_size``, ``staggered_refresh``,
      ``rounding_floor``, ``mesh``, ``shard_axes`` and ``refresh`` are the
      engine options of :func:`soap_optax.scale_by_rotated_adam`.

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = optax.chain(
    ...     soap_optax.scale_by_soap_muon(precondition_frequency=1),
    ...     optax.scale_by_learning_rate(0.02))
    >>> params = {'w': jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> type(state[0]).__name__
    'ScaleBySoapMuonState'
    >>> grads = {'w': jnp.full((3, 4), 0.1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> print(bool(jnp.all(updates['w'] == 0)))  # the first call initializes
    True

  References:
    Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, 2024; Jordan
    et al., Muon (2024), as :func:`optax.contrib.muon` implements it.
  """
  config = _skeleton.EngineConfig.from_arguments(locals())
  _checks.check_arguments(
      locals(), betas=('b1', 'b2', 'shampoo_beta'), positive=('eps',),
      optional=('shampoo_beta',))
  _checks.check_int('ns_steps', ns_steps, 0)
  if len(ns_coeffs) != 3 or any(jnp.ndim(k) for k in ns_coeffs):
    raise ValueError('ns_coeffs must be three numbers (a, b, c) of the '
                     f'quintic a X + b A X + c A^2 X; got {ns_coeffs!r}.')
  rule = _SoapMuonRule(
      b1=b1, b2=b2, eps=eps, ns_coeffs=tuple(ns_coeffs), ns_steps=ns_steps,
      rounding_floor=rounding_floor,
      mu_dtype=_checks.check_float_dtype('mu_dtype', mu_dtype))
  return _skeleton.eigenbasis_transform(
      rule, config, _estimators.Frobenius(
          b2 if shampoo_beta is None else shampoo_beta), pads_exactly=False)
