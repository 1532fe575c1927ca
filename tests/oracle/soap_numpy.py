"""A float64 NumPy reference of SOAP, written from the algorithm's description.

It shares no code with ``soap_optax``: tensors are handled through mode-i
unfoldings (``X_(i)``, the axis-i fibres as columns) rather than tensordot, the
axis rules are re-derived here, and every step is the literal formula.
"""

import numpy as np


def unfold(x, axis):
  """Mode-``axis`` unfolding: a ``(d_axis, prod(other dims))`` matrix."""
  return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def fold(matrix, axis, shape):
  """Inverse of :func:`unfold` for a tensor of the given shape."""
  moved = (shape[axis],) + tuple(s for a, s in enumerate(shape) if a != axis)
  return np.moveaxis(matrix.reshape(moved), 0, axis)


def mode_product(x, matrix, axis):
  """``x ×_axis matrix``: multiplies every axis-``axis`` fibre by ``matrix``."""
  shape = list(x.shape)
  shape[axis] = matrix.shape[0]
  return fold(matrix @ unfold(x, axis), axis, tuple(shape))


def merged_shape(shape, limit):
  """Greedy left-to-right merge of consecutive axes while the product <= limit."""
  out = []
  running = None
  for size in shape:
    if running is None:
      running = size
    elif running * size <= limit:
      running = running * size
    else:
      out.append(running)
      running = size
  if running is not None:
    out.append(running)
  return tuple(out)


class SoapReference:
  """SOAP for a single parameter, float64, one ``step(grad)`` per update call."""

  def __init__(self, shape, *, b1, b2, shampoo_beta, eps, frequency,
               max_dim, merge_dims, precondition_1d, normalize_grads=False,
               initial_bases=None, one_sided=False, factored=False, phase=0,
               bias_correction=True):
    """``factored``: ``v`` is rebuilt from per-axis sums (Adafactor);
    ``one_sided``: only the shortest factored axis keeps its factor;
    ``phase``: refresh on Adam steps ``t % frequency == phase``;
    ``bias_correction``: Adam's ``sqrt(1 - b2^t) / (1 - b1^t)``, or 1."""
    self.phase = phase
    self.bias_correction = bias_correction
    self.shape = tuple(shape)
    self.b1, self.b2, self.eps = b1, b2, eps
    self.sb = b2 if shampoo_beta is None else shampoo_beta
    self.frequency = frequency
    self.normalize_grads = normalize_grads
    if len(self.shape) == 0:
      self.work_shape, self.axes = (), []
    elif len(self.shape) == 1:
      self.work_shape = self.shape
      self.axes = [0] if (precondition_1d and self.shape[0] <= max_dim) else []
    else:
      self.work_shape = (merged_shape(self.shape, max_dim) if merge_dims
                         else self.shape)
      self.axes = [a for a, d in enumerate(self.work_shape) if d <= max_dim]
      if one_sided and len(self.axes) > 1:
        self.axes = [min(self.axes, key=lambda a: (self.work_shape[a], a))]
    self.GG = {a: np.zeros((self.work_shape[a],) * 2) for a in self.axes}
    self.Q = None
    self.initial_bases = initial_bases
    self.factored = factored
    self.m = np.zeros(self.work_shape)
    self.v = np.zeros(self.work_shape)
    # Factored: one running vector per axis (scalars are seen as (1,)).
    axes_shape = self.work_shape if self.work_shape else (1,)
    self.axis_sums = [np.zeros(d) for d in axes_shape]
    self.t = 0

  def rotate(self, x):
    for a in self.axes:
      x = mode_product(x, self.Q[a].T, a)
    return x

  def unrotate(self, x):
    for a in self.axes:
      x = mode_product(x, self.Q[a], a)
    return x

  def _update_statistics(self, g):
    for a in self.axes:
      ga = unfold(g, a)
      self.GG[a] = self.sb * self.GG[a] + (1 - self.sb) * (ga @ ga.T)

  def step(self, grad):
    """Returns the update (before any learning rate) for this gradient."""
    g = np.asarray(grad, np.float64).reshape(self.work_shape)
    if self.Q is None:
      self._update_statistics(g)
      if self.initial_bases is not None:
        self.Q = {a: np.array(q, np.float64)
                  for a, q in zip(self.axes, self.initial_bases)}
      else:
        self.Q = {a: np.linalg.eigh(self.GG[a])[1] for a in self.axes}
      return np.zeros(self.shape)
    gp = self.rotate(g)
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * gp
    if self.factored:
      squares = np.reshape(gp**2, [len(x) for x in self.axis_sums])
      for k in range(squares.ndim):
        sums = np.sum(unfold(squares, k), axis=1)
        self.axis_sums[k] = self.b2 * self.axis_sums[k] + (1 - self.b2) * sums
      v = np.ones(())
      for x in self.axis_sums:
        v = np.multiply.outer(v, x)
      total = np.sum(self.axis_sums[0])
      v = v / total ** (len(self.axis_sums) - 1) if total > 0 else 0 * v
      v = v.reshape(self.work_shape)
    else:
      self.v = self.b2 * self.v + (1 - self.b2) * gp**2
      v = self.v
    u = self.unrotate(self.m / (np.sqrt(v) + self.eps))
    if self.normalize_grads:  # the authors' order: normalize, then correct.
      u = u / (1e-30 + np.sqrt(np.mean(u**2)))
    if self.bias_correction:
      u = u * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
    self._update_statistics(g)
    if self.t % self.frequency == self.phase:
      m_param_space = self.unrotate(self.m)
      for a in self.axes:
        q = self.Q[a]
        est = np.diag(q.T @ self.GG[a] @ q)
        order = np.argsort(-est, kind='stable')
        self.v = np.take(self.v, order, axis=a)
        self.axis_sums[a] = self.axis_sums[a][order]
        self.Q[a] = np.linalg.qr(self.GG[a] @ q[:, order])[0]
      self.m = self.rotate(m_param_space)
    return u.reshape(self.shape)
