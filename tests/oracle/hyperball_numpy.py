"""A float64 NumPy reference of the Hyperball wrapper, written from the paper.

Wen, Dang, Lyu, Ma, Liang, "Hyperball optimization": with ``Norm(x) = x/||x||_F``
and ``R = ||W_0||_F`` (the matrix's Frobenius norm at initialization),

    W_{t+1} = Norm(W_t - eta_t * Norm(d_t) * R) * R,

where ``d_t`` is the base optimizer's direction (the thing that is subtracted).

The wrapper receives the inner optimizer's output ``u`` in optax's convention,
i.e. the update that ``optax.apply_updates`` *adds* (``u = -c * d`` with
``c > 0``, so ``Norm(u) = -Norm(d)``).  Hence, per wrapped matrix,

    W_new = R * Norm(W + eta_t * R * Norm(u)),     returned update = W_new - W.

Rules:
  * ``||u||_F == 0``  ->  the update is exactly zero (no step).
  * leaves that are not 2-D, or that the boolean mask excludes, get ``u`` as is.
  * ``R`` is computed once, from the parameters seen at init.
  * ``eta_t`` is a float or a schedule evaluated at the call count
    ``t = 0, 1, 2, ...``; the count increments on every call.

Not fixed by the specification (the oracle's choice, documented here): if the
point ``W + eta R Norm(u)`` has zero norm (only possible in degenerate cases
such as ``R == 0`` with ``W == 0``), the new matrix is taken to be zero.

No code is shared with ``soap_optax``; plain NumPy only.
"""

import numpy as np


def frobenius(x):
  """Frobenius norm of ``x`` in float64."""
  return float(np.sqrt(np.sum(np.square(np.asarray(x, dtype=np.float64)))))


def hyperball_update(w, u, radius, eta):
  """The wrapper's update for one matrix ``w`` given the inner update ``u``.

  Args:
    w: current matrix ``W_t`` (2-D).
    u: inner optimizer's update in optax's convention (added to params).
    radius: ``R = ||W_0||_F``.
    eta: the step size ``eta_t`` for this call (a float).

  Returns:
    ``R * Norm(w + eta * R * Norm(u)) - w`` as float64, or exactly zeros when
    ``||u||_F == 0``.
  """
  w = np.asarray(w, dtype=np.float64)
  u = np.asarray(u, dtype=np.float64)
  if w.shape != u.shape:
    raise ValueError(f"shape mismatch: {w.shape} vs {u.shape}")
  radius = float(radius)
  eta = float(eta)
  u_norm = frobenius(u)
  if u_norm == 0.0:
    return np.zeros_like(w)
  moved = w + eta * radius * (u / u_norm)
  moved_norm = frobenius(moved)
  if moved_norm == 0.0:
    w_new = np.zeros_like(w)
  else:
    w_new = radius * (moved / moved_norm)
  return w_new - w


class HyperballReference:
  """Stateful reference of the wrapper over a flat ``dict`` of parameters.

  Attributes:
    radius: ``dict`` name -> ``R`` (float) for the wrapped leaves only.
    count: number of ``step`` calls made so far (the schedule's argument).
  """

  def __init__(self, params, learning_rate, mask=None):
    """Records the radii.

    Args:
      params: ``dict[str, array]`` -- the parameters at init (``W_0``).
      learning_rate: a float, or a callable ``count -> float``.
      mask: optional ``dict[str, bool]``; ``False`` excludes a leaf (its inner
        update passes through).  When given it must name every leaf.
    """
    self.learning_rate = learning_rate
    self.mask = None if mask is None else dict(mask)
    self.count = 0
    self.radius = {}
    for name, p in params.items():
      if self._wrapped(name, p):
        self.radius[name] = frobenius(p)

  def _wrapped(self, name, p):
    if np.ndim(p) != 2:
      return False
    if self.mask is not None and not bool(self.mask[name]):
      return False
    return True

  def eta(self, count=None):
    """The step size at ``count`` (default: the current call count)."""
    t = self.count if count is None else count
    if callable(self.learning_rate):
      return float(self.learning_rate(t))
    return float(self.learning_rate)

  def step(self, params, inner_updates):
    """The wrapper's updates for this call; advances the count by one.

    Args:
      params: ``dict`` name -> current parameters ``W_t``.
      inner_updates: ``dict`` name -> the inner optimizer's update ``u``.

    Returns:
      ``dict`` name -> update (float64); wrapped matrices get
      :func:`hyperball_update`, all other leaves get ``u`` unchanged.
    """
    eta = self.eta()
    out = {}
    for name, u in inner_updates.items():
      if name in self.radius:
        out[name] = hyperball_update(params[name], u, self.radius[name], eta)
      else:
        out[name] = np.array(u, dtype=np.float64, copy=True)
    self.count += 1
    return out
