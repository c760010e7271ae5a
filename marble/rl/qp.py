"""The MGDA min-norm point on the simplex (docs/algorithm.md §4.3), solved with osqp 1.x.

`α* = argmin ½ αᵀ Ĝ α  s.t. α ≥ 0, Σ α = 1` (Désidéri 2012; Sener & Koltun 2018; MARBLE arXiv
2605.06507 §3.2). The solver sees only the K x K normalised Gram.

- K_valid = 1: the one-hot. K_valid = 2: the closed form of Sener & Koltun (Alg. 1).
- K_valid >= 3: osqp, warm-started: one solver object per problem size is kept and only its matrix
  values are updated (`update(Px=...)`), with tight tolerances and polishing. The osqp answer then
  fixes the support S, and α is recomputed exactly from the KKT system on S
  (`[Ĝ_SS 1; 1ᵀ 0] [α_S; -λ] = [0; 1]`) when that solution is feasible and optimal. This makes α
  independent of the warm-start history (bitwise resume gives bitwise the same α) and accurate to
  rounding. Finally clip at 0 and renormalise.
- With a support hint (the balancer passes its previous α: within a step it re-solves on a sum that
  changes little), the KKT system on that support is tried first and taken when its margins make it
  certainly THE optimum (Q_SS positive definite, strict complementarity): the osqp solve would give
  that support and this same α, bit for bit (tested), at a fraction of the cost.
- Invalid rewards (norm 0 or not finite) get weight 0; a non-finite Gram or a failed solve falls back
  to the caller's last good α, else uniform over the valid rewards; the reason is returned.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import osqp
import scipy.sparse as sp  # osqp's own dependency; its 1.x API takes scipy CSC matrices

log = logging.getLogger(__name__)

_SUPPORT_TOL = 1e-9  # α entries above this (after osqp) form the support of the exact refinement
_CERTAIN_MARGIN = 1e-6  # margins under which a hinted support is not trusted without osqp


class QPResult(NamedTuple):
    alpha: np.ndarray  # [K] float64 on the simplex, 0 on invalid rewards
    method: str  # "one_hot" | "closed_form" | "support" | "osqp" | "fallback"
    fallback_reason: str | None  # why the fallback was used (None if it was not)
    solve_ms: float  # wall time of this solve in milliseconds
    min_norm: float  # |Σ α ĝ| = sqrt(αᵀ Ĝ α) (NaN when the Gram is not finite)


def project_to_simplex(x: np.ndarray) -> np.ndarray:
    """Clip at 0 and renormalise; uniform if nothing positive and finite remains."""
    x = np.where(np.isfinite(x), np.clip(x, 0.0, None), 0.0)
    s = x.sum()
    if not s > 0:
        return np.full(x.shape, 1.0 / x.size)
    return x / s


def two_reward_closed_form(Q: np.ndarray) -> np.ndarray:
    """min over the segment of |α ĝ1 + (1-α) ĝ2|²: α = clip((Q22 - Q12) / |ĝ1 - ĝ2|², 0, 1)."""
    denom = Q[0, 0] + Q[1, 1] - 2 * Q[0, 1]
    if not denom > 1e-15:  # identical directions: every point of the segment is optimal
        return np.array([0.5, 0.5])
    a = float(np.clip((Q[1, 1] - Q[0, 1]) / denom, 0.0, 1.0))
    return np.array([a, 1.0 - a])


def _kkt_on_support(Q: np.ndarray, S: np.ndarray) -> np.ndarray | None:
    """The minimiser on the face of the simplex spanned by `S` (indices), from the equality-constrained
    KKT system `[Q_SS 1; 1ᵀ 0] [α_S; -λ] = [0; 1]`; None if it is not finite or not non-negative."""
    m, s = Q.shape[0], S.size
    kkt = np.zeros((s + 1, s + 1))
    kkt[:s, :s] = Q[np.ix_(S, S)]
    kkt[:s, s] = 1.0
    kkt[s, :s] = 1.0
    rhs = np.zeros(s + 1)
    rhs[s] = 1.0
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    cand = np.zeros(m)
    cand[S] = sol[:s]
    if not np.all(np.isfinite(cand)) or cand.min() < -1e-10:
        return None
    return project_to_simplex(cand)


def _kkt_refine(Q: np.ndarray, alpha: np.ndarray) -> np.ndarray | None:
    """Exact α on the support of `alpha` from the equality-constrained KKT system, or None if the
    result is not feasible and optimal (then the caller keeps the iterative answer)."""
    S = np.flatnonzero(alpha > _SUPPORT_TOL)
    if S.size == 0:
        return None
    cand = _kkt_on_support(Q, S)
    if cand is None:
        return None
    grad = Q @ cand  # [m]
    lam = cand @ grad
    tol = 1e-9 * max(1.0, float(np.abs(Q).max()))
    if grad.min() < lam - tol or lam > alpha @ Q @ alpha + tol:
        return None
    return cand


def _certain_on_support(Q: np.ndarray, S: np.ndarray) -> np.ndarray | None:
    """The minimiser when it lies on the face `S` with margins that make it THE minimiser: Q_SS
    positive definite, every α_S clearly positive, every other reward's gradient clearly above the
    multiplier (strict complementarity). Then the optimum is unique and supported exactly on S, so
    the iterative solve would find this support and its refinement this same α. None otherwise."""
    if S.size < 2:
        return None
    if np.linalg.eigvalsh(Q[np.ix_(S, S)]).min() <= _CERTAIN_MARGIN:
        return None
    cand = _kkt_on_support(Q, S)
    if cand is None or cand[S].min() <= _CERTAIN_MARGIN:
        return None
    grad = Q @ cand  # [m]
    lam = cand @ grad
    others = np.ones(Q.shape[0], dtype=bool)
    others[S] = False
    if others.any() and grad[others].min() <= lam + _CERTAIN_MARGIN * max(1.0, float(np.abs(Q).max())):
        return None
    return cand


class MinNormSolver:
    """Min-norm point on the simplex with warm-started osqp solvers (one per problem size)."""

    def __init__(self, eps: float = 1e-9, max_iter: int = 20000, warm_start: bool = True):
        self.eps = eps
        self.max_iter = max_iter
        self.warm_start = warm_start
        self._solvers: dict[int, osqp.OSQP] = {}

    # ----------------------------------------------------------------------------------- osqp
    @staticmethod
    def _triu_index(m: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the dense upper triangle in CSC (column-major) order."""
        rows = np.concatenate([np.arange(j + 1) for j in range(m)])
        cols = np.concatenate([np.full(j + 1, j) for j in range(m)])
        return rows, cols

    @staticmethod
    def _pattern(m: int) -> sp.csc_matrix:
        """Dense upper-triangular pattern: explicit zeros are kept so `update(Px=...)` always fits."""
        indices, _ = MinNormSolver._triu_index(m)
        indptr = np.concatenate([[0], np.cumsum(np.arange(1, m + 1))])
        return sp.csc_matrix((np.ones(indices.size), indices, indptr), shape=(m, m))

    def _osqp(self, Q: np.ndarray) -> tuple[np.ndarray | None, str]:
        m = Q.shape[0]
        rows, cols = self._triu_index(m)
        Px = np.ascontiguousarray(Q[rows, cols], dtype=np.float64)
        solver = self._solvers.get(m) if self.warm_start else None
        if solver is None:
            P = self._pattern(m)
            P.data = Px.copy()
            A = sp.csc_matrix(np.vstack([np.ones((1, m)), np.eye(m)]))
            lower = np.concatenate([[1.0], np.zeros(m)])
            upper = np.concatenate([[1.0], np.ones(m)])
            solver = osqp.OSQP()
            solver.setup(
                P, np.zeros(m), A, lower, upper,
                eps_abs=self.eps, eps_rel=self.eps, max_iter=self.max_iter,
                polishing=True, verbose=False,
            )  # fmt: skip
            if self.warm_start:
                self._solvers[m] = solver
        else:
            solver.update(Px=Px)
        res = solver.solve(raise_error=False)
        status = str(res.info.status)
        if status not in ("solved", "solved inaccurate") or res.x is None:
            return None, status
        return np.asarray(res.x, dtype=np.float64), status

    # ------------------------------------------------------------------------------------ api
    def solve(
        self,
        gram_hat: np.ndarray,
        valid: np.ndarray | None = None,
        fallback: np.ndarray | None = None,
        support_hint: np.ndarray | None = None,
    ) -> QPResult:
        """Min-norm α for a normalised Gram `[K, K]`; `valid [K]` masks rewards out (weight 0).

        `fallback` is the last good α `[K]` (used, after projection, when the Gram is not finite or
        the solver fails; uniform over the valid rewards otherwise). `support_hint` (`[K]`, e.g. the
        previous α of a slowly changing Gram): its support is tried first, and its KKT solution is
        taken without osqp when it is certainly the optimum (`_certain_on_support`; method
        "support"). Never returns off-simplex or non-finite weights.
        """
        t0 = time.perf_counter()
        Q_full = np.asarray(gram_hat, dtype=np.float64)
        K = Q_full.shape[0]
        valid = np.ones(K, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        idx = np.flatnonzero(valid)
        Q = Q_full[np.ix_(idx, idx)]
        Q = (Q + Q.T) / 2

        reason: str | None = None
        method = "osqp"
        sub: np.ndarray | None = None
        if idx.size == 0:
            reason = "no_valid_reward"
        elif not np.all(np.isfinite(Q)):
            reason = "nonfinite_gram"
        elif idx.size == 1:
            sub, method = np.ones(1), "one_hot"
        elif idx.size == 2:
            sub, method = two_reward_closed_form(Q), "closed_form"
        elif (hinted := self._from_hint(Q, idx, support_hint)) is not None:
            sub, method = hinted, "support"
        else:
            x, status = self._osqp(Q)
            if x is None or not np.all(np.isfinite(x)):
                reason = f"osqp_{status.replace(' ', '_')}"
            else:
                x = project_to_simplex(x)
                refined = _kkt_refine(Q, x)
                sub = x if refined is None else refined

        if reason is not None:
            alpha = self._fallback(K, valid, fallback)
            method = "fallback"
            log.warning("min-norm QP fell back (%s); alpha=%s", reason, np.round(alpha, 4).tolist())
        else:
            alpha = np.zeros(K)
            alpha[idx] = project_to_simplex(sub)
        a_sub = alpha[idx]  # [K_valid]; invalid rewards carry no weight in the min-norm value
        mn = float(np.sqrt(max(a_sub @ Q @ a_sub, 0.0))) if np.all(np.isfinite(Q)) else float("nan")
        return QPResult(alpha, method, reason, (time.perf_counter() - t0) * 1e3, mn)

    @staticmethod
    def _from_hint(Q: np.ndarray, idx: np.ndarray, hint: np.ndarray | None) -> np.ndarray | None:
        """α on the valid rewards `idx` from the hinted support, when certain (see `solve`)."""
        if hint is None:
            return None
        h = np.asarray(hint, dtype=np.float64)[idx]
        if not np.all(np.isfinite(h)):
            return None
        return _certain_on_support(Q, np.flatnonzero(h > _SUPPORT_TOL))

    @staticmethod
    def _fallback(K: int, valid: np.ndarray, last_good: np.ndarray | None) -> np.ndarray:
        if last_good is not None:
            lg = np.asarray(last_good, dtype=np.float64)
            if lg.shape == (K,) and np.all(np.isfinite(lg)) and lg.min() >= 0 and lg.sum() > 0:
                return lg / lg.sum()
        if valid.any():
            return valid / valid.sum()
        return np.full(K, 1.0 / K)
