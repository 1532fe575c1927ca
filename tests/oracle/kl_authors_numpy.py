"""Float64 NumPy transcription of the authors' KL-Shampoo / KL-SOAP step.

Source transcribed: the PyTorch optimizer ``KLOpt`` in the repository
``yorkerlin/KL-Methods``, file ``optim/kl_opt.py``, at commit
``4cb97e038432f2fe8992fca241d4857ce6eeada7``.  This module is an independent
re-statement of that file's algorithm in plain NumPy; it shares no code with
the library under test and does not import torch.

Settings fixed here (the configuration the oracle stands for):

* every computation in float64 (the source runs in ``cast_dtype``, bfloat16 by
  default, with eigh / QR in float32; all of those are widened to float64);
* ``lr = 1`` and ``weight_decay = 0``, so :meth:`AuthorsKLOpt.step` returns the
  source's ``norm_grad``: the amount subtracted from the parameter;
* ``normalize_grads = False``, ``using_damping = False`` (no damping inside
  the curvature learning), ``using_clamping = True``;
* ``shampoo_beta`` is taken explicitly (the source uses its ``shampoo_beta``
  when that is >= 0, else ``betas[1]``).

Behaviour reproduced on purpose, as the source does it:

* The first call only builds the state and returns zeros.  Factor ``k`` starts
  at ``(1 - shampoo_beta) * d_k / numel * G_(k) G_(k)^T`` (mode-k unfolding);
  its basis is ``eigh(GG_k + 1e-30 I)`` with the columns reversed so the
  eigenvalues run in descending order; every inverse-square-root estimate
  starts at ``1 / sqrt(init_factor)``.
* Later calls advance ``step`` (1, 2, ...), compute the update with the
  current bases and estimates, then update the factors and estimates; when
  ``step % frequency == 0`` the bases are refreshed by one power-iteration step
  ``QR(GG_k @ Q_k)`` with no column sorting.  For KL-SOAP the first moment
  (kept in the rotated space) is rotated back before the factor update and
  forward with the new bases after the refresh; the second moment is not
  touched at a refresh.
* An estimate update is ``D = (1 / s^2) -> nan_to_num(posinf=0)``,
  ``D <- beta D + (1 - beta) diag``, ``s = nan_to_num(1 / sqrt(D), posinf=0)``,
  then ``s = min(s, max(10, min(d, max_clamp)))``.  Note that a zero ``D``
  gives ``s = 0``, not the clamp value.
* The 3-D factor / estimate updates are partly sequential (see
  :meth:`AuthorsKLOpt._update_3d`): factor 3, factor 2 and estimate 3 use the
  old estimates; estimate 2 uses the *new* estimate 3; factor 1 and estimate 1
  use the *new* estimate 2 and the *old* estimate 3.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AuthorsKLOpt", "project", "project_back", "left_factor_formula_2d"]


def project(x: np.ndarray, bases) -> np.ndarray:
    """Rotate ``x`` into the eigenbases: ``x ×_0 Q_0^T ×_1 Q_1^T ...``."""
    out = np.asarray(x, dtype=np.float64)
    for k, q in enumerate(bases):
        # contract axis k of out with the row index of q; put the result back at axis k
        out = np.moveaxis(np.tensordot(out, q, axes=([k], [0])), -1, k)
    return out


def project_back(x: np.ndarray, bases) -> np.ndarray:
    """Rotate ``x`` back to the original space: ``x ×_0 Q_0 ×_1 Q_1 ...``."""
    out = np.asarray(x, dtype=np.float64)
    for k, q in enumerate(bases):
        out = np.moveaxis(np.tensordot(out, q, axes=([k], [1])), -1, k)
    return out


def _unfold_gram(g: np.ndarray, k: int) -> np.ndarray:
    """``G_(k) G_(k)^T``: contract ``g`` with itself over every axis but ``k``."""
    gk = np.moveaxis(g, k, 0).reshape(g.shape[k], -1)
    return gk @ gk.T


def left_factor_formula_2d(
    s_left: np.ndarray, grad: np.ndarray, q_right: np.ndarray, inv_sqrt_right: np.ndarray, beta: float
) -> np.ndarray:
    """Closed form of the 2-D left-factor update, written independently of the class.

    ``S_L <- beta S_L + (1 - beta) G S_R^{-1} G^T / d_R`` with
    ``S_R^{-1} = Q_R diag(inv_sqrt_R^2) Q_R^T`` (values at the time of the update).
    """
    s_r_inv = q_right @ np.diag(inv_sqrt_right**2) @ q_right.T
    return beta * s_left + (1.0 - beta) * grad @ s_r_inv @ grad.T / grad.shape[1]


class AuthorsKLOpt:
    """State and step of the authors' ``KLOpt`` for one 2-D or 3-D parameter (float64).

    Parameters
    ----------
    shape:
        Parameter shape.  Size-1 axes are squeezed as the source does; after
        squeezing the parameter must be 2-D or 3-D.
    klsoap:
        ``True`` for KL-SOAP, ``False`` for KL-Shampoo.
    b1, b2:
        The source's ``betas``.  ``b2`` only matters for KL-SOAP's second moment.
    shampoo_beta:
        Moving-average coefficient of the factors and of the estimates.
    eps:
        KL-Shampoo: damping of the product of inverse square roots,
        ``p / (1 + p * eps)``.  KL-SOAP: ``sqrt(v) + eps`` denominator.
    frequency:
        Basis refresh period (``precondition_frequency``).
    init_factor:
        Initial eigenvalue estimate; inverse square roots start at ``1/sqrt``.
    max_clamp:
        ``max_clamp_value``; the inverse square roots of a factor of size ``d``
        are capped at ``max(10, min(d, max_clamp))``.

    Attributes (inspectable, float64)
    ---------------------------------
    ``bases`` (list of Q_k), ``factors`` (list of GG_k), ``inv_sqrt`` (list of
    inverse-square-root estimates), ``exp_avg`` (original space for KL-Shampoo,
    rotated space for KL-SOAP), ``exp_avg_sq`` (KL-SOAP only, else ``None``),
    ``step_count`` (the source's ``state['step']``), ``initialized``.
    """

    def __init__(
        self,
        shape,
        *,
        klsoap: bool,
        b1: float,
        b2: float,
        shampoo_beta: float,
        eps: float,
        frequency: int,
        init_factor: float = 0.1,
        max_clamp: float = 4000,
    ):
        self.param_shape = tuple(int(d) for d in shape)
        self.shape = tuple(d for d in self.param_shape if d != 1)
        if len(self.shape) not in (2, 3):
            raise ValueError(f"only 2-D and 3-D parameters are transcribed, got {shape}")
        self.klsoap = bool(klsoap)
        self.b1 = float(b1)
        self.b2 = float(b2)
        self.shampoo_beta = float(shampoo_beta)
        self.eps = float(eps)
        self.frequency = int(frequency)
        self.init_factor = float(init_factor)
        self.max_clamp = max_clamp

        self.step_count = 0
        self.initialized = False
        self.exp_avg = np.zeros(self.shape)
        self.exp_avg_sq = np.zeros(self.shape) if self.klsoap else None
        self.factors = [np.zeros((d, d)) for d in self.shape]
        self.bases = None
        self.inv_sqrt = None

    # ------------------------------------------------------------------ helpers
    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def _accumulate_factor(self, k: int, mat: np.ndarray) -> None:
        """``GG_k <- beta GG_k + (1 - beta) * d_k / numel * mat`` (their ``update_S``)."""
        beta = self.shampoo_beta
        scale = (1.0 - beta) * self.shape[k] / self.numel
        self.factors[k] = beta * self.factors[k] + scale * mat

    def _update_estimate(self, k: int, diag: np.ndarray) -> None:
        """Their ``update_eigen_value`` without damping, with clamping."""
        beta = self.shampoo_beta
        with np.errstate(divide="ignore", invalid="ignore"):
            eig = np.nan_to_num(1.0 / self.inv_sqrt[k] ** 2, nan=0.0, posinf=0.0, neginf=0.0)
            eig = beta * eig + (1.0 - beta) * diag
            s = np.nan_to_num(1.0 / np.sqrt(eig), nan=0.0, posinf=0.0, neginf=0.0)
        cap = max(10, min(eig.shape[0], self.max_clamp))
        self.inv_sqrt[k] = np.minimum(s, cap)

    def _initialize(self, g: np.ndarray) -> None:
        for k in range(g.ndim):
            self._accumulate_factor(k, _unfold_gram(g, k))
        self.bases = []
        self.inv_sqrt = []
        for f in self.factors:
            d = f.shape[0]
            _, vecs = np.linalg.eigh(f + 1e-30 * np.eye(d))
            self.bases.append(vecs[:, ::-1].copy())  # descending eigenvalue order
            self.inv_sqrt.append(np.full(d, 1.0 / np.sqrt(self.init_factor)))
        self.initialized = True

    # ------------------------------------------------------------------ updates
    def _klshampoo_direction(self, g: np.ndarray) -> np.ndarray:
        self.exp_avg = self.b1 * self.exp_avg + (1.0 - self.b1) * g
        rotated = project(self.exp_avg, self.bases)
        scale = self.inv_sqrt[0]
        for s in self.inv_sqrt[1:]:
            scale = np.multiply.outer(scale, s)
        scale = scale / (1.0 + scale * self.eps)
        return project_back(rotated * scale, self.bases)

    def _klsoap_direction(self, g: np.ndarray) -> np.ndarray:
        rotated = project(g, self.bases)
        self.exp_avg = self.b1 * self.exp_avg + (1.0 - self.b1) * rotated
        self.exp_avg_sq = self.b2 * self.exp_avg_sq + (1.0 - self.b2) * rotated**2
        return project_back(self.exp_avg / (np.sqrt(self.exp_avg_sq) + self.eps), self.bases)

    def _update_2d(self, g: np.ndarray) -> None:
        q_l, q_r = self.bases
        s_l, s_r = self.inv_sqrt
        # left factor: G Q_R diag(s_R^2) Q_R^T G^T ; right: G^T Q_L diag(s_L^2) Q_L^T G
        half_l = (g @ q_r) * s_r[None, :]
        self._accumulate_factor(0, half_l @ half_l.T)
        ql_g = q_l.T @ g
        half_r = ql_g * s_l[:, None]
        self._accumulate_factor(1, half_r.T @ half_r)
        # both diagonals are formed from the old estimates before either is updated
        core = ql_g @ q_r  # Q_L^T G Q_R
        diag_l = np.mean((core * s_r[None, :]) ** 2, axis=1)
        diag_r = np.mean((core * s_l[:, None]) ** 2, axis=0)
        self._update_estimate(0, diag_l)
        self._update_estimate(1, diag_r)

    def _update_3d(self, g: np.ndarray) -> None:
        """Their 3-D path, keeping its order of reads and writes of the estimates.

        With axes (a, b, c) of sizes (d1, d2, d3), estimates s1, s2, s3 and
        ``W_k = Q_k diag(s_k)`` built from the estimates at entry:

        1. factor 3 from ``G x_1 W_1^T x_2 W_2^T`` (old s1, old s2);
        2. factor 2 from ``G x_1 W_1^T x_3 W_3^T`` (old s1, old s3);
        3. estimate 3 from ``G x_1 W_1^T x_2 W_2^T x_3 Q_3^T`` (old s1, s2);
        4. estimate 2 from ``G x_1 W_1^T x_2 Q_2^T x_3 (Q_3 diag s3)^T`` with the
           s3 just written in 3;
        5. factor 1 from ``G x_3 W_3^T x_2 (Q_2 diag s2)^T`` with the old s3 (from
           W_3) and the s2 just written in 4;
        6. estimate 1 from ``G x_1 Q_1^T x_2 (Q_2 diag s2)^T x_3 W_3^T``, same s2
           and s3 as in 5.
        """
        q1, q2, q3 = self.bases
        w1 = q1 * self.inv_sqrt[0][None, :]
        w3 = q3 * self.inv_sqrt[2][None, :]

        t1 = np.einsum("ijk,ip->pjk", g, w1)  # G x_1 W_1^T
        t1_q2 = np.einsum("pjk,jq->pqk", t1, q2)
        t1_q2_q3 = np.einsum("pqk,km->pqm", t1_q2, q3)

        # 1. factor 3
        h = t1_q2 * self.inv_sqrt[1][None, :, None]
        self._accumulate_factor(2, np.einsum("pqa,pqb->ab", h, h))
        # 2. factor 2
        h = np.einsum("pjk,km->pjm", t1, q3) * self.inv_sqrt[2][None, None, :]
        self._accumulate_factor(1, np.einsum("pam,pbm->ab", h, h))
        # 3. estimate 3 (old s2)
        diag3 = np.mean((t1_q2_q3 * self.inv_sqrt[1][None, :, None]) ** 2, axis=(0, 1))
        self._update_estimate(2, diag3)
        # 4. estimate 2 (new s3)
        diag2 = np.mean((t1_q2_q3 * self.inv_sqrt[2][None, None, :]) ** 2, axis=(0, 2))
        self._update_estimate(1, diag2)

        t3 = np.einsum("ijk,km->ijm", g, w3)  # G x_3 W_3^T (old s3)
        t3_q2 = np.einsum("ijm,jq->iqm", t3, q2)
        t3_q2_q1 = np.einsum("iqm,ip->pqm", t3_q2, q1)
        # 5. factor 1 (new s2)
        h = t3_q2 * self.inv_sqrt[1][None, :, None]
        self._accumulate_factor(0, np.einsum("aqm,bqm->ab", h, h))
        # 6. estimate 1 (new s2)
        diag1 = np.mean((t3_q2_q1 * self.inv_sqrt[1][None, :, None]) ** 2, axis=(1, 2))
        self._update_estimate(0, diag1)

    def _refresh_bases(self) -> None:
        """One power-iteration step then QR, per factor; no reordering of columns."""
        self.bases = [np.linalg.qr(f @ q)[0] for f, q in zip(self.factors, self.bases)]

    # ------------------------------------------------------------------ public
    def step(self, grad) -> np.ndarray:
        """Feed one gradient; return the direction subtracted from the parameter (lr=1)."""
        g = np.asarray(grad, dtype=np.float64).reshape(self.shape)
        if not self.initialized:
            self._initialize(g)
            return np.zeros(self.param_shape)

        self.step_count += 1
        if self.klsoap:
            direction = self._klsoap_direction(g)
        else:
            direction = self._klshampoo_direction(g)

        refresh = self.step_count % self.frequency == 0
        if self.klsoap and refresh:
            self.exp_avg = project_back(self.exp_avg, self.bases)
        if g.ndim == 2:
            self._update_2d(g)
        else:
            self._update_3d(g)
        if refresh:
            self._refresh_bases()
            if self.klsoap:
                self.exp_avg = project(self.exp_avg, self.bases)

        return direction.reshape(self.param_shape)
