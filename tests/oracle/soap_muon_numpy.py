"""A float64 NumPy reference of SOAP-Muon, written from the algorithm's description.

SOAP-Muon keeps Nesterov momentum in parameter space, an Adam-style second
moment in SOAP's rotated (eigen)basis, and orthogonalizes the whitened
direction (Muon).  Per 2-D parameter ``W`` (rows x cols) and gradient ``G``:

* first call: ``L = (1 - sb) G G^T``, ``R = (1 - sb) G^T G``, the bases are
  their ``eigh`` eigenvectors, and the update is zero (``t`` stays 0);
* later calls, in the bases from before the call::

    t += 1
    M <- mu M + (1 - mu) G;        U = (1 - mu) G + mu M      (Nesterov)
    Uh = QL^T U QR;                V <- b2 V + (1 - b2) Uh^2
    P = QL (Uh / sqrt(max(V, eps^2))) QR^T
    O = orth(P) * sqrt(max(1, rows / cols))
    L <- sb L + (1 - sb) G G^T;    R <- sb R + (1 - sb) G^T G
    if t % frequency == 0: refresh (SOAP's: sort by the estimated eigenvalues
      diag(Q^T F Q) descending, permute V along that axis, Q <- qr(F Q[:, order]).Q)

It shares no code with ``soap_optax``; plain NumPy only.
"""

import numpy as np

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def polar(x):
  """The exact orthogonal polar factor ``A B^T`` of the thin SVD ``x = A S B^T``."""
  x = np.asarray(x, np.float64)
  a, _, bt = np.linalg.svd(x, full_matrices=False)
  return a @ bt


def newton_schulz(x, coeffs=NS_COEFFS, steps=5, eps=1e-8):
  """Muon's quintic Newton-Schulz iteration towards the polar factor of ``x``.

  ``X = x / (||x||_F + eps)``, transposed when tall; then ``steps`` times
  ``X <- a X + (b A + c A A) X`` with ``A = X X^T``; transposed back.
  """
  a, b, c = coeffs
  x = np.asarray(x, np.float64)
  y = x / (np.linalg.norm(x) + eps)
  tall = x.shape[0] > x.shape[1]
  if tall:
    y = y.T
  for _ in range(steps):
    gram = y @ y.T
    y = a * y + (b * gram + c * gram @ gram) @ y
  return y.T if tall else y


class SoapMuonReference:
  """SOAP-Muon for a single 2-D parameter, float64, one ``step(grad)`` per call.

  For a batch of independent matrices, make one instance per matrix.
  """

  def __init__(self, shape, *, mu, b2, shampoo_beta, eps, frequency,
               orthogonalize='polar'):
    shape = tuple(shape)
    if len(shape) != 2:
      raise ValueError(f'SoapMuonReference needs a 2-D shape, got {shape}')
    if orthogonalize not in ('polar', 'newton_schulz'):
      raise ValueError(f'unknown orthogonalize={orthogonalize!r}')
    self.shape = shape
    self.rows, self.cols = shape
    self.mu, self.b2, self.eps = mu, b2, eps
    self.sb = b2 if shampoo_beta is None else shampoo_beta
    self.frequency = frequency
    self.orthogonalize = orthogonalize
    self.M = np.zeros(shape)
    self.V = np.zeros(shape)
    self.L = np.zeros((self.rows, self.rows))
    self.R = np.zeros((self.cols, self.cols))
    self.QL = None
    self.QR = None
    self.t = 0

  def _orth(self, p):
    if self.orthogonalize == 'polar':
      return polar(p)
    return newton_schulz(p)

  def _absorb(self, g):
    self.L = self.sb * self.L + (1 - self.sb) * (g @ g.T)
    self.R = self.sb * self.R + (1 - self.sb) * (g.T @ g)

  @staticmethod
  def _refreshed(factor, q):
    est = np.diag(q.T @ factor @ q)
    order = np.argsort(-est, kind='stable')
    return order, np.linalg.qr(factor @ q[:, order])[0]

  def step(self, grad):
    """Returns the update direction (before the learning rate) for ``grad``."""
    g = np.asarray(grad, np.float64).reshape(self.shape)
    if self.QL is None:
      self._absorb(g)  # from zero: (1 - sb) G G^T and (1 - sb) G^T G.
      self.QL = np.linalg.eigh(self.L)[1]
      self.QR = np.linalg.eigh(self.R)[1]
      return np.zeros(self.shape)

    self.t += 1
    self.M = self.mu * self.M + (1 - self.mu) * g
    u = (1 - self.mu) * g + self.mu * self.M
    uh = self.QL.T @ u @ self.QR
    self.V = self.b2 * self.V + (1 - self.b2) * uh**2
    p = self.QL @ (uh / np.sqrt(np.maximum(self.V, self.eps**2))) @ self.QR.T
    out = self._orth(p) * np.sqrt(max(1.0, self.rows / self.cols))

    self._absorb(g)
    if self.t % self.frequency == 0:
      order, self.QL = self._refreshed(self.L, self.QL)
      self.V = self.V[order, :]
      order, self.QR = self._refreshed(self.R, self.QR)
      self.V = self.V[:, order]
    return out
