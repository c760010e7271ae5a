"""The min-norm point on the simplex (docs/algorithm.md §4.3) against brute force, KKT and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from marble.rl.gram import normalize_gram
from marble.rl.qp import MinNormSolver, two_reward_closed_form


def _random_gram(K: int, rng: np.random.Generator, dim: int = 12, conflict: float = 0.8) -> np.ndarray:
    """Normalised Gram of K random gradients sharing a common component (some pairs conflict)."""
    X = rng.normal(size=(K, dim)) + conflict * rng.normal(size=dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X @ X.T


def _obj(Q: np.ndarray, a: np.ndarray) -> float:
    return 0.5 * float(a @ Q @ a)


def _project(x: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex (written independently of the library's)."""
    u = np.sort(x)[::-1]
    cs = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, x.size + 1) > cs - 1)[0][-1]
    return np.maximum(x - (cs[rho] - 1) / (rho + 1), 0)


def _projected_gradient(Q: np.ndarray, x0: np.ndarray | None = None, iters: int = 20000) -> np.ndarray:
    """Accelerated projected gradient (FISTA), step 1/L with L = largest eigenvalue of Q."""
    K = Q.shape[0]
    L = max(np.linalg.eigvalsh(Q).max(), 1e-12)
    x = np.full(K, 1 / K) if x0 is None else x0.copy()
    y, tk = x.copy(), 1.0
    for _ in range(iters):
        x_new = _project(y - Q @ y / L)
        t_new = (1 + np.sqrt(1 + 4 * tk * tk)) / 2
        y = x_new + (tk - 1) / t_new * (x_new - x)
        x, tk = x_new, t_new
    return x


def _assert_simplex(a: np.ndarray, K: int):
    assert a.shape == (K,) and np.all(np.isfinite(a)) and a.min() >= 0 and abs(a.sum() - 1) < 1e-12


def _assert_kkt(Q: np.ndarray, a: np.ndarray, tol: float = 1e-8):
    # min ½aᵀQa on the simplex: with g = Qa and λ = aᵀQa, g_k >= λ everywhere and g_k = λ on the support
    g = Q @ a
    lam = a @ g
    assert g.min() >= lam - tol
    assert np.all(np.abs(g[a > tol] - lam) <= tol)


@pytest.mark.parametrize("seed", range(6))
def test_k3_matches_dense_grid(seed):
    rng = np.random.default_rng(seed)
    Q = _random_gram(3, rng)
    n = 300  # grid step 1/300 over the 2-simplex: ~45k points
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    grid = np.stack([i[keep], j[keep], n - i[keep] - j[keep]], 1) / n  # [M, 3]
    vals = 0.5 * np.einsum("mk,kl,ml->m", grid, Q, grid)
    best = grid[vals.argmin()]
    ref = _projected_gradient(Q, x0=best)  # polish the best grid point to full accuracy
    a = MinNormSolver().solve(Q).alpha
    _assert_simplex(a, 3)
    assert _obj(Q, a) <= vals.min() + 1e-12  # never worse than any grid point
    assert abs(_obj(Q, a) - _obj(Q, ref)) < 1e-7
    _assert_kkt(Q, a)


@pytest.mark.parametrize("K", [2, 3, 4, 5, 6, 7, 8])
def test_matches_projected_gradient_up_to_k8(K):
    rng = np.random.default_rng(100 + K)
    solver = MinNormSolver()
    for _ in range(2):
        Q = _random_gram(K, rng, conflict=rng.uniform(0, 1.5))
        a = solver.solve(Q).alpha
        ref = _projected_gradient(Q)
        _assert_simplex(a, K)
        assert abs(_obj(Q, a) - _obj(Q, ref)) < 1e-7
        _assert_kkt(Q, a)


def test_closed_form_two_rewards():
    # unit vectors at 120 degrees: the symmetric midpoint is optimal
    Q = np.array([[1.0, -0.5], [-0.5, 1.0]])
    assert two_reward_closed_form(Q).tolist() == [0.5, 0.5]
    # g2 = 0.5 g1 direction-wise aligned but shorter (unnormalised Q): all weight on the shorter one
    Q = np.array([[1.0, 0.5], [0.5, 0.25]])
    assert two_reward_closed_form(Q).tolist() == [0.0, 1.0]


def test_permutation_equivariance():
    rng = np.random.default_rng(7)
    for K in (3, 5, 8):
        Q = _random_gram(K, rng)
        perm = rng.permutation(K)
        a = MinNormSolver().solve(Q).alpha
        b = MinNormSolver().solve(Q[np.ix_(perm, perm)]).alpha
        np.testing.assert_allclose(b, a[perm], atol=1e-9)


def test_warm_start_history_does_not_change_alpha():
    """Bitwise: a solver that solved other problems before gives the same α as a fresh one (resume)."""
    rng = np.random.default_rng(3)
    warm = MinNormSolver()
    for _ in range(5):
        warm.solve(_random_gram(5, rng))
    Q = _random_gram(5, rng)
    assert warm.solve(Q).alpha.tobytes() == MinNormSolver().solve(Q).alpha.tobytes()


def test_one_valid_reward_is_one_hot():
    Q = _random_gram(4, np.random.default_rng(0))
    res = MinNormSolver().solve(Q, valid=np.array([False, False, True, False]))
    assert res.alpha.tolist() == [0.0, 0.0, 1.0, 0.0]


def test_zero_norm_gradient_gets_zero_weight():
    X = np.random.default_rng(1).normal(size=(4, 6))
    X[1] = 0.0
    ng = normalize_gram(X @ X.T)
    assert ng.valid.tolist() == [True, False, True, True]
    res = MinNormSolver().solve(ng.gram_hat, ng.valid)
    _assert_simplex(res.alpha, 4)
    assert res.alpha[1] == 0.0 and res.fallback_reason is None


def test_identical_gradients_rank_one():
    g = np.random.default_rng(2).normal(size=6)
    for K in (2, 3, 5):
        ng = normalize_gram(np.outer(np.ones(K), np.ones(K)) * (g @ g))
        res = MinNormSolver().solve(ng.gram_hat, ng.valid)
        _assert_simplex(res.alpha, K)
        assert abs(res.min_norm - 1.0) < 1e-9  # every convex combination of identical unit vectors has norm 1


def test_nan_entries_fall_back_to_last_good_else_uniform():
    Q = _random_gram(3, np.random.default_rng(4))
    Q[0, 2] = Q[2, 0] = np.nan
    res = MinNormSolver().solve(Q)
    assert res.method == "fallback" and res.fallback_reason == "nonfinite_gram"
    assert res.alpha.tolist() == pytest.approx([1 / 3] * 3)
    last = np.array([0.2, 0.0, 0.8])
    assert MinNormSolver().solve(Q, fallback=last).alpha.tolist() == last.tolist()


def test_k1_and_no_valid_reward():
    assert MinNormSolver().solve(np.array([[4.0]])).alpha.tolist() == [1.0]
    res = MinNormSolver().solve(np.zeros((3, 3)), valid=np.zeros(3, dtype=bool))
    assert res.fallback_reason == "no_valid_reward"
    _assert_simplex(res.alpha, 3)


def test_no_input_leaves_the_simplex():
    """Fuzz: garbage Grams (indefinite, inf, huge, tiny, NaN) never give off-simplex or non-finite α."""
    rng = np.random.default_rng(11)
    solver = MinNormSolver(max_iter=2000)
    for trial in range(60):
        K = int(rng.integers(1, 7))
        M = rng.normal(size=(K, K)) * 10.0 ** rng.integers(-300, 300)
        if trial % 3 == 0:
            with np.errstate(over="ignore"):
                M = M @ M.T
        if trial % 5 == 0:
            M[rng.integers(K), rng.integers(K)] = rng.choice([np.nan, np.inf, -np.inf])
        ng = normalize_gram(M)
        res = solver.solve(ng.gram_hat, ng.valid, fallback=None if trial % 2 else np.full(K, 1 / K))
        _assert_simplex(res.alpha, K)


def test_support_hint_gives_bitwise_the_osqp_answer():
    """Along slowly changing Grams (a step's running sum), the hinted support is taken without osqp
    most of the time, and every α is bit for bit the one of a solve without the hint."""
    rng = np.random.default_rng(11)
    used = 0
    hinted, plain = MinNormSolver(), MinNormSolver()
    for K in (3, 4, 5, 7):
        for _ in range(10):
            X = rng.normal(size=(K, 12))
            X[1:] += rng.uniform(0, 1.5) * X[0]  # some agreement: supports of every size occur
            prev = None
            for _ in range(20):
                X += 0.05 * rng.normal(size=X.shape)
                ng = normalize_gram(X @ X.T)
                a = hinted.solve(ng.gram_hat, ng.valid, support_hint=prev)
                b = plain.solve(ng.gram_hat, ng.valid)
                assert a.alpha.tobytes() == b.alpha.tobytes(), (a.alpha, b.alpha)
                used += a.method == "support"
                prev = a.alpha
    assert used > 400  # of 800 solves: the hint usually holds


def test_a_wrong_support_hint_falls_back_to_osqp():
    Q = _random_gram(5, np.random.default_rng(2))
    truth = MinNormSolver().solve(Q)
    assert truth.alpha.min() == 0.0 < truth.alpha.max()  # the optimum leaves a reward out
    for wrong in (np.ones(5), np.where(truth.alpha > 0, 0.0, 1.0) + np.eye(5)[0]):  # too wide; elsewhere
        res = MinNormSolver().solve(Q, support_hint=wrong)
        assert res.method == "osqp" and res.alpha.tobytes() == truth.alpha.tobytes()
