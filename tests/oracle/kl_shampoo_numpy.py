"""Float64 NumPy/SciPy references of KL-Shampoo and KL-SOAP.

Written from the equations of Lin et al., "Understanding and Improving Shampoo
and SOAP via Kullback-Leibler Minimization" (arXiv 2509.03378), and the
authors' practical algorithm; no code is shared with ``soap_optax``.

* :class:`KLShampooReference`: the practical algorithm (per-axis factors
  ``S_k``, bases ``Q_k``, eigenvalue estimates ``lam_k``).
* :class:`IdealizedKLShampoo`: exact Kronecker-product matrices, the direction
  computed as a full ``n x n`` matrix square root and solve (SciPy).
* :class:`KLSoapReference`: the KL factors and bases with Adam in the
  eigenbasis (as SOAP) for the direction.

Conventions: call ``c = 0`` only initializes (its direction is zero); every
later call returns the direction ``U`` (the caller does ``W <- W - lr U``).
Vectors of a tensor are taken in C (row-major) order, so the Kronecker product
of the axis matrices is ``kron(A_0, ..., A_{N-1})``.
"""

import numpy as np
import scipy.linalg

from tests.oracle.soap_numpy import mode_product, unfold


def eigenvalue_floor(size):
  """``1 / c^2`` with ``c = max(10, min(size, 4000))``."""
  c = max(10, min(size, 4000))
  return 1.0 / c**2


def self_contraction(x, axis):
  """``C_k(X) = X_(k) X_(k)^T``: ``x`` contracted with itself over every axis
  but ``axis``."""
  xk = unfold(x, axis)
  return xk @ xk.T


def descending_eigh(matrix):
  """Eigenvalues and eigenvectors (columns) of a symmetric matrix, in
  decreasing eigenvalue order."""
  values, vectors = np.linalg.eigh(matrix)
  return values[::-1], vectors[:, ::-1]


def outer_product(vectors):
  """The N-way outer product: entry ``[i_0..i_{N-1}] = prod_k v_k[i_k]``."""
  out = np.ones(())
  for v in vectors:
    out = np.multiply.outer(out, v)
  return out


def rotate(x, bases):
  """``x x_k Q_k^T`` over the axes whose basis is not ``None``."""
  for axis, q in enumerate(bases):
    if q is not None:
      x = mode_product(x, q.T, axis)
  return x


def unrotate(x, bases):
  """``x x_k Q_k`` over the axes whose basis is not ``None``."""
  for axis, q in enumerate(bases):
    if q is not None:
      x = mode_product(x, q, axis)
  return x


def inverse_sqrt_factor(basis, lam):
  """``W^{1/2} = Q diag(lam^{-1/2}) Q^T`` (``diag(lam^{-1/2})`` when ``basis``
  is ``None``): the square root of ``S~^{-1}``."""
  if basis is None:
    return np.diag(lam**-0.5)
  return (basis * lam**-0.5) @ basis.T


def kl_factor_update(factor, grad, axis, bases, lams, beta):
  """Step 3: ``beta S_k + (1 - beta) (d_k / n) C_k(G x_{j != k} W_j^{1/2})``
  with ``W_j = S~_j^{-1}`` from the (old) bases and estimates."""
  whitened = grad
  for j, (q, lam) in enumerate(zip(bases, lams)):
    if j != axis:
      whitened = mode_product(whitened, inverse_sqrt_factor(q, lam), j)
  scale = grad.shape[axis] / grad.size
  return beta * factor + (1 - beta) * scale * self_contraction(whitened, axis)


def kl_eigenvalue_update(rotated, axis, lams, beta):
  """Step 4: ``max(beta lam_k + (1 - beta) (d_k / n) sum_{i != i_k}
  G'^2 / prod_{j != k} lam_j, floor_k)`` with the old ``lams``."""
  divisor = outer_product([
      np.ones_like(lam) if j == axis else lam for j, lam in enumerate(lams)])
  sums = np.sum(unfold(rotated**2 / divisor, axis), axis=1)
  size = rotated.shape[axis]
  new = beta * lams[axis] + (1 - beta) * (size / rotated.size) * sums
  return np.maximum(new, eigenvalue_floor(size))


def refreshed_basis(factor, basis, refresh):
  """Step 5: the new basis and the permutation ``order`` of the old columns.

  ``'qr'``: one power-iteration step from the old columns sorted by
  ``diag(Q^T S Q)`` (descending, stable); ``'qr_unsorted'``: the same step
  from the old columns as they are (``order`` is the identity); ``'eigh'``:
  the eigenvectors of ``factor`` in decreasing eigenvalue order (``order`` is
  the identity)."""
  if refresh in ('qr', 'qr_unsorted'):
    order = np.arange(factor.shape[0])
    if refresh == 'qr':
      estimates = np.diag(basis.T @ factor @ basis)
      order = np.argsort(-estimates, kind='stable')
    return np.linalg.qr(factor @ basis[:, order])[0], order
  if refresh == 'eigh':
    return descending_eigh(factor)[1], np.arange(factor.shape[0])
  raise ValueError(f'unknown refresh solver {refresh!r}')


class KLFactorState:
  """The KL factor state shared by KL-Shampoo and KL-SOAP (a base class).

  Attributes (lists indexed by axis; ``None`` for a diagonal axis's ``S`` and
  ``Q``): ``S`` the factors, ``Q`` the bases, ``lam`` the eigenvalue estimates.
  """

  def _init_factors(self, shape, *, beta, lam0, frequency, refresh,
                    eigenvalues, factored):
    self.shape = tuple(shape)
    if not self.shape:
      raise ValueError('a unit needs at least one axis')
    self.beta, self.lam0 = beta, lam0
    self.frequency, self.refresh = frequency, refresh
    if eigenvalues not in ('running', 'refresh'):
      raise ValueError(f'unknown eigenvalue mode {eigenvalues!r}')
    self.eigenvalues = eigenvalues
    if factored is None:
      factored = (True,) * len(self.shape)
    if len(factored) != len(self.shape):
      raise ValueError('factored needs one flag per axis')
    self.factored = tuple(bool(f) for f in factored)
    self.S = [None] * len(self.shape)
    self.Q = [None] * len(self.shape)
    self.lam = None

  def initialize_factors(self, grad):
    """Call 0: ``S_k = (1 - beta)(d_k / n) C_k(G)``, ``Q_k`` its eigenvectors
    (descending) and the first estimates ``lam_k``."""
    self.lam = []
    for axis, size in enumerate(self.shape):
      if not self.factored[axis]:
        self.lam.append(np.full(size, float(self.lam0)))
        continue
      scale = (1 - self.beta) * size / grad.size
      self.S[axis] = scale * self_contraction(grad, axis)
      values, self.Q[axis] = descending_eigh(self.S[axis])
      if self.eigenvalues == 'refresh':
        self.lam.append(np.maximum(values, eigenvalue_floor(size)))
      else:
        self.lam.append(np.full(size, float(self.lam0)))

  def update_factors(self, grad, rotated):
    """Steps 3 and 4 (old bases and estimates); ``rotated = rot(G)``."""
    new_s = [
        kl_factor_update(s, grad, axis, self.Q, self.lam, self.beta)
        if s is not None else None for axis, s in enumerate(self.S)]
    new_lam = list(self.lam)
    for axis in range(len(self.shape)):
      if not self.factored[axis] or self.eigenvalues == 'running':
        new_lam[axis] = kl_eigenvalue_update(rotated, axis, self.lam,
                                             self.beta)
    self.S, self.lam = new_s, new_lam

  def maybe_refresh(self, call):
    """Step 5 on calls ``call % frequency == 0``; returns the permutation of
    every axis's old columns (``None`` for diagonal axes), or ``None`` when
    there was no refresh."""
    if call % self.frequency != 0:
      return None
    orders = [None] * len(self.shape)
    for axis, factor in enumerate(self.S):
      if factor is None:
        continue
      new_q, order = refreshed_basis(factor, self.Q[axis], self.refresh)
      if self.eigenvalues == 'running':
        self.lam[axis] = self.lam[axis][order]
      else:
        self.lam[axis] = np.maximum(np.diag(new_q.T @ factor @ new_q),
                                    eigenvalue_floor(self.shape[axis]))
      self.Q[axis] = new_q
      orders[axis] = order
    return orders


class KLShampooReference(KLFactorState):
  """The practical KL-Shampoo for one parameter, float64.

  Call 0 initializes ``S``, ``Q``, ``lam`` and returns zero. Every later call:
  ``M <- b1 M + (1 - b1) G``; ``U = unrot(rot(M) / (outer_k sqrt(lam_k) +
  eps))``; then the KL factor update, the estimate update and (on calls
  ``c % frequency == 0``) the refresh, all from the state before the call.

  Attributes: ``S``, ``Q``, ``lam`` (lists by axis; ``S``/``Q`` are ``None``
  on diagonal axes), ``M`` (momentum, the grad's shape), ``calls``.
  """

  def __init__(self, shape, *, b1, beta, eps, lam0=0.1, frequency,
               refresh='qr_unsorted', eigenvalues='running', factored=None):
    """``eigenvalues``: ``'running'`` (estimates updated every call) or
    ``'refresh'`` (factored axes' estimates set from ``S_k`` at refreshes);
    ``factored``: one flag per axis (``None``: every axis factored)."""
    self.b1, self.eps = b1, eps
    self._init_factors(shape, beta=beta, lam0=lam0, frequency=frequency,
                       refresh=refresh, eigenvalues=eigenvalues,
                       factored=factored)
    self.M = np.zeros(self.shape)
    self.calls = 0

  def direction(self):
    """``unrot(rot(M) / (outer_k sqrt(lam_k) + eps))``."""
    scale = outer_product([np.sqrt(lam) for lam in self.lam]) + self.eps
    return unrotate(rotate(self.M, self.Q) / scale, self.Q)

  def step(self, grad):
    """Returns the direction for this gradient (zero on call 0)."""
    g = np.asarray(grad, np.float64).reshape(self.shape)
    call = self.calls
    self.calls += 1
    if call == 0:
      self.initialize_factors(g)
      return np.zeros(self.shape)
    self.M = self.b1 * self.M + (1 - self.b1) * g
    u = self.direction()
    self.update_factors(g, rotate(g, self.Q))
    self.maybe_refresh(call)
    return u


def floored_factor(factor):
  """``S~ = V max(Lambda, floor) V^T`` from an exact eigendecomposition."""
  values, vectors = scipy.linalg.eigh(factor)
  floored = np.maximum(values, eigenvalue_floor(factor.shape[0]))
  return (vectors * floored) @ vectors.T


def kron_all(matrices):
  """``kron(A_0, A_1, ...)`` (C-order vectorization)."""
  out = np.ones((1, 1))
  for m in matrices:
    out = np.kron(out, m)
  return out


class IdealizedKLShampoo:
  """The idealized KL-Shampoo: every axis factored, no bases carried.

  Each call ``c >= 1`` floors the current factors (``S~_k``), then
  ``M <- b1 M + (1 - b1) G``,
  ``vec(U) = ((kron_k S~_k)^{1/2} + eps I)^{-1} vec(M)`` (a full ``n x n``
  ``scipy.linalg.sqrtm`` and ``solve``), and
  ``S_k <- beta S_k + (1 - beta)(d_k / n) G_(k) (kron_{j != k} S~_j^{-1})
  G_(k)^T``.
  """

  def __init__(self, shape, *, b1, beta, eps):
    self.shape = tuple(shape)
    self.b1, self.beta, self.eps = b1, beta, eps
    self.S = None
    self.M = np.zeros(self.shape)
    self.calls = 0

  def direction(self, floored):
    root = np.real(scipy.linalg.sqrtm(kron_all(floored)))
    root = root + self.eps * np.eye(root.shape[0])
    return scipy.linalg.solve(root, self.M.reshape(-1)).reshape(self.shape)

  def factor_update(self, g, axis, floored):
    """``beta S_k + (1 - beta)(d_k / n) G_(k) (kron_{j != k} S~_j)^{-1}
    G_(k)^T`` (the other axes in their order, as in :func:`unfold`)."""
    gk = unfold(g, axis)
    others = kron_all([f for j, f in enumerate(floored) if j != axis])
    middle = scipy.linalg.solve(others, gk.T, assume_a='pos')
    scale = (1 - self.beta) * g.shape[axis] / g.size
    return self.beta * self.S[axis] + scale * gk @ middle

  def step(self, grad):
    """Returns the direction for this gradient (zero on call 0)."""
    g = np.asarray(grad, np.float64).reshape(self.shape)
    call = self.calls
    self.calls += 1
    if call == 0:
      self.S = [(1 - self.beta) * (d / g.size) * self_contraction(g, axis)
                for axis, d in enumerate(self.shape)]
      return np.zeros(self.shape)
    floored = [floored_factor(s) for s in self.S]
    self.M = self.b1 * self.M + (1 - self.b1) * g
    u = self.direction(floored)
    self.S = [self.factor_update(g, axis, floored)
              for axis in range(len(self.shape))]
    return u


class KLSoapReference(KLFactorState):
  """KL-SOAP: the KL-Shampoo factors, bases and running estimates (``lam``
  only whitens the factor updates) with Adam in the eigenbasis for the
  direction.

  Call 0 initializes and returns zero. Every later call ``c`` (``t = c``):
  ``G' = rot(G)``; ``m <- b1 m + (1 - b1) G'``; ``v <- b2 v + (1 - b2) G'^2``;
  ``U = unrot(m / (sqrt(v) + eps))``, times ``sqrt(1 - b2^t) / (1 - b1^t)``
  with ``bias_correction``; then the
  factor and estimate updates and, on calls ``c % frequency == 0``, the
  refresh, which moves ``m`` exactly to the new bases and permutes ``v``.

  Attributes: ``S``, ``Q``, ``lam`` (lists by axis), ``m``, ``v`` (rotated
  moments), ``calls``.
  """

  def __init__(self, shape, *, b1, b2, beta, eps, lam0=0.1, frequency,
               refresh='qr_unsorted', factored=None, bias_correction=False):
    self.b1, self.b2, self.eps = b1, b2, eps
    self.bias_correction = bias_correction
    self._init_factors(shape, beta=beta, lam0=lam0, frequency=frequency,
                       refresh=refresh, eigenvalues='running',
                       factored=factored)
    self.m = np.zeros(self.shape)
    self.v = np.zeros(self.shape)
    self.calls = 0

  def step(self, grad):
    """Returns the direction for this gradient (zero on call 0)."""
    g = np.asarray(grad, np.float64).reshape(self.shape)
    call = self.calls
    self.calls += 1
    if call == 0:
      self.initialize_factors(g)
      return np.zeros(self.shape)
    rotated = rotate(g, self.Q)
    self.m = self.b1 * self.m + (1 - self.b1) * rotated
    self.v = self.b2 * self.v + (1 - self.b2) * rotated**2
    t = call
    correction = (np.sqrt(1 - self.b2**t) / (1 - self.b1**t)
                  if self.bias_correction else 1.0)
    u = unrotate(self.m / (np.sqrt(self.v) + self.eps), self.Q) * correction
    self.update_factors(g, rotated)
    old_bases = list(self.Q)
    orders = self.maybe_refresh(call)
    if orders is not None:
      self.m = rotate(unrotate(self.m, old_bases), self.Q)
      for axis, order in enumerate(orders):
        if order is not None:
          self.v = np.take(self.v, order, axis=axis)
    return u
