"""Float64 NumPy/SciPy references of Shampoo and of Adafactor in its eigenbasis.

Shampoo's preconditioner is computed as a matrix power with
``scipy.linalg.fractional_matrix_power`` (Schur-Pade, not an
eigendecomposition), independently of the library's eigenbasis route.
"""

import numpy as np
import scipy.linalg

from tests.oracle.soap_numpy import mode_product, unfold


def power_qr(stat, basis):
  """One power-iteration step from ``basis``, columns sorted by
  ``diag(Q^T GG Q)`` (descending), then QR; returns the new basis."""
  order = np.argsort(-np.diag(basis.T @ stat @ basis), kind='stable')
  return np.linalg.qr(stat @ basis[:, order])[0]


def _inverse_root(matrix, eps, exponent):
  root = scipy.linalg.fractional_matrix_power(
      matrix + eps * np.eye(matrix.shape[0]), -exponent)
  return np.real(root)


class ShampooReference:
  """Shampoo for one parameter with every axis factored (full-rank stats).

  Each call: ``GG_k <- beta GG_k + (1 - beta) G_(k) G_(k)^T``; on calls
  ``c % frequency == 0`` the preconditioners ``P_k = (GG_k + eps I)^-e`` and
  ``T = tr(GG_0)`` are recomputed; the update is
  ``G x_0 P_0 x_1 P_1 ... * T^((N-1) e)`` (the last factor only when
  ``trace_normalize``).
  """

  def __init__(self, shape, *, beta, exponent, eps, frequency,
               trace_normalize, refresh='eigh', phase=0, rayleigh_floor=False):
    """With ``refresh="qr"`` the preconditioner after the first call is
    ``Q diag(diag(Q^T GG Q) + eps)^-e Q^T`` with ``Q`` from :func:`power_qr`.
    ``phase``: besides the first call, refresh on calls
    ``c % frequency == phase``.

    ``rayleigh_floor``: on the calls between refreshes the preconditioner is
    ``Q diag(max(Λ, diag(Q^T GG Q)) + eps)^-e Q^T``, with ``Λ = diag(Q^T GG Q)``
    frozen at the last refresh and ``GG`` the current factor (both computed
    directly here), and ``T`` is the sum of the first axis's
    ``max(Λ, diag(Q^T GG Q))``. A caller may set ``Q`` (and then ``Λ`` by
    :meth:`share_bases`) after a refresh call."""
    self.refresh, self.phase = refresh, phase
    self.rayleigh_floor = rayleigh_floor
    self.frozen = None
    self.Q = None
    self.shape = tuple(shape)
    self.beta, self.exponent, self.eps = beta, exponent, eps
    self.frequency, self.trace_normalize = frequency, trace_normalize
    self.GG = [np.zeros((d, d)) for d in self.shape]
    self.P = None
    self.T = None
    self.calls = 0

  def step(self, grad):
    g = np.asarray(grad, np.float64)
    for k in range(g.ndim):
      gk = unfold(g, k)
      self.GG[k] = self.beta * self.GG[k] + (1 - self.beta) * gk @ gk.T
    if self.calls == 0 or self.calls % self.frequency == self.phase:
      if self.refresh == 'eigh' or self.calls == 0:
        self.P = [_inverse_root(m, self.eps, self.exponent) for m in self.GG]
        self.Q = [np.linalg.eigh(m)[1] for m in self.GG]
      else:
        self.Q = [power_qr(m, q) for m, q in zip(self.GG, self.Q)]
        self.P = [
            (q * (np.diag(q.T @ m @ q) + self.eps) ** -self.exponent) @ q.T
            for m, q in zip(self.GG, self.Q)]
      self.T = np.trace(self.GG[0])
      self.frozen = [np.diag(q.T @ m @ q) for m, q in zip(self.GG, self.Q)]
    elif self.rayleigh_floor:
      floors = [np.maximum(lam, np.diag(q.T @ m @ q))
                for lam, m, q in zip(self.frozen, self.GG, self.Q)]
      self.P = [(q * (f + self.eps) ** -self.exponent) @ q.T
                for f, q in zip(floors, self.Q)]
      self.T = np.sum(floors[0])
    self.calls += 1
    u = g
    for k, p in enumerate(self.P):
      u = mode_product(u, p, k)
    if self.trace_normalize:
      u = u * self.T ** ((g.ndim - 1) * self.exponent)
    return u


  def share_bases(self, bases):
    """Takes ``bases`` as the current ``Q`` (and re-derives ``Λ`` from them):
    for factors whose eigenvectors the decomposition does not determine."""
    self.Q = [np.asarray(q, np.float64) for q in bases]
    self.frozen = [np.diag(q.T @ m @ q) for m, q in zip(self.GG, self.Q)]


class AdafactorInEigenbasisReference:
  """Adafactor (no momentum) in the eigenbasis of every axis's factor.

  Each call: ``GG_k`` absorbs the gradient; on a refresh call the bases are
  the eigenvectors of ``GG_k`` (or :func:`power_qr` of the old ones) and
  ``s_k = diag(Q_k^T GG_k Q_k)`` (the eigenvalues after ``eigh``); otherwise
  ``s_k <- b2 s_k + (1 - b2) (row sums of G'^2 along k)``. The update is
  ``unrotate(G' / sqrt(prod_k s_k / sum(s_0)^(N-1) + eps))``.
  """

  def __init__(self, shape, *, b2, eps, frequency, refresh='eigh', phase=0):
    self.refresh, self.phase = refresh, phase
    self.shape = tuple(shape)
    self.b2, self.eps, self.frequency = b2, eps, frequency
    self.GG = [np.zeros((d, d)) for d in self.shape]
    self.Q = None
    self.s = None
    self.calls = 0

  def step(self, grad):
    g = np.asarray(grad, np.float64)
    n = g.ndim
    for k in range(n):
      gk = unfold(g, k)
      self.GG[k] = self.b2 * self.GG[k] + (1 - self.b2) * gk @ gk.T
    refresh = self.calls == 0 or self.calls % self.frequency == self.phase
    if refresh and (self.refresh == 'eigh' or self.calls == 0):
      self.Q = [np.linalg.eigh(m)[1] for m in self.GG]
    elif refresh:
      self.Q = [power_qr(m, q) for m, q in zip(self.GG, self.Q)]
    rotated = g
    for k in range(n):
      rotated = mode_product(rotated, self.Q[k].T, k)
    if refresh:
      self.s = [np.diag(q.T @ m @ q) for m, q in zip(self.GG, self.Q)]
    else:
      for k in range(n):
        sums = np.sum(unfold(rotated, k) ** 2, axis=1)
        self.s[k] = self.b2 * self.s[k] + (1 - self.b2) * sums
    v = np.ones(())
    for k in range(n):
      v = np.multiply.outer(v, self.s[k])
    v = v / np.sum(self.s[0]) ** (n - 1)
    u = rotated / np.sqrt(v + self.eps)
    for k in range(n):
      u = mode_product(u, self.Q[k], k)
    self.calls += 1
    return u
