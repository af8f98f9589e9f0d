"""Mathematical oracles for `keras_factorized.data_aware`.

Every claim of the module is checked against an independent computation on
small problems: the whitened SVD against the Eckart-Young optimum of the
outputs `X W` (and against random rank-`k` candidates), the error from
statistics against the directly computed error, the greedy rank allocation
against exhaustive search over all allocations, damping and the bias
correction against their closed forms.
"""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_factorized.data_aware import ActivationStatistics
from keras_factorized.data_aware import allocate_ranks
from keras_factorized.data_aware import corrected_bias
from keras_factorized.data_aware import relative_output_error
from keras_factorized.data_aware import whitened_svd
from keras_factorized.data_aware import whitening_factor

FAST = settings(max_examples=25, deadline=None)
SEEDS = st.integers(0, 2**31 - 1)


def _problem(seed, m, n, rows=None):
    """Inputs `X` (`rows x m`, anisotropic, full column rank) and a `W` (`m x n`)."""
    rng = np.random.default_rng(seed)
    rows = rows or 3 * m + 5
    x = rng.normal(size=(rows, m)) * rng.uniform(0.2, 3.0, size=m)
    x = x @ rng.normal(size=(m, m))  # correlated features
    w = rng.normal(size=(m, n))
    return x, w


def _stats(x, batches=3):
    stats = ActivationStatistics(x.shape[-1])
    for chunk in np.array_split(x, batches):
        stats.update(chunk)
    return stats


def _output_optimum(x, w, k):
    """Independent oracle: the best rank-`k` outputs `X W_k` and their error.

    `X W_k` ranges over all matrices of rank <= `k` in the column space of `X`,
    and the truncated SVD of `X W` lies in it, so Eckart-Young on `Y = X W`
    gives the optimum; `W_k = X^+ Y_k` (X of full column rank).
    """
    y = x @ w
    u, s, vt = np.linalg.svd(y, full_matrices=False)
    y_k = (u[:, :k] * s[:k]) @ vt[:k]
    return y_k, math.sqrt(float(np.sum(s[k:] ** 2))), np.linalg.pinv(x) @ y_k


dims = st.integers(2, 6)


# ---------------------------------------------------------------------------
# ActivationStatistics


@FAST
@given(seed=SEEDS, m=dims, batches=st.integers(1, 4))
def test_statistics_match_the_direct_moments(seed, m, batches):
    x, _ = _problem(seed, m, 2)
    stats = _stats(x.reshape(-1, 1, m), batches)  # any leading shape
    np.testing.assert_allclose(stats.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.sum, x.sum(axis=0), rtol=1e-5, atol=1e-5)
    assert stats.count == x.shape[0]
    centred = x - x.mean(axis=0)
    np.testing.assert_allclose(
        stats.scatter(center=True), centred.T @ centred, rtol=1e-4, atol=1e-4
    )


def test_statistics_reject_a_wrong_feature_count():
    with pytest.raises(ValueError, match="`x`"):
        ActivationStatistics(3).update(np.ones((2, 4)))


def test_whitened_svd_rejects_empty_statistics():
    with pytest.raises(ValueError, match="`statistics`"):
        whitened_svd(np.ones((3, 2)), ActivationStatistics(3))


# ---------------------------------------------------------------------------
# The whitened SVD is the output-error optimum


@FAST
@given(seed=SEEDS, m=dims, n=dims, data=st.data())
def test_whitened_svd_reaches_the_output_optimum(seed, m, n, data):
    k = data.draw(st.integers(1, min(m, n)), label="rank")
    x, w = _problem(seed, m, n)
    result = whitened_svd(w, _stats(x), damping=0.0)
    a, b = result.factors(k)
    assert a.shape == (m, k) and b.shape == (k, n)
    y_k, optimum, w_k = _output_optimum(x, w, k)
    scale = np.linalg.norm(x @ w)
    error = np.linalg.norm(x @ (w - a @ b))
    np.testing.assert_allclose(error, optimum, atol=1e-7 * scale, rtol=1e-6)
    # Same optimum, same outputs (unique when s_k > s_k+1, true a.s.).
    np.testing.assert_allclose(x @ a @ b, y_k, atol=1e-6 * scale)
    np.testing.assert_allclose(a @ b, w_k, atol=1e-6 * np.linalg.norm(w_k) + 1e-9)
    # `s` are the singular values of the outputs, and `relative_error` is exact.
    np.testing.assert_allclose(
        result.s,
        np.linalg.svd(x @ w, compute_uv=False)[: len(result.s)],
        rtol=1e-6,
        atol=1e-9 * scale,
    )
    np.testing.assert_allclose(result.relative_error(k), error / scale, atol=1e-7)


@FAST
@given(seed=SEEDS, m=dims, n=dims, data=st.data())
def test_no_random_rank_k_candidate_beats_the_whitened_svd(seed, m, n, data):
    k = data.draw(st.integers(1, min(m, n)), label="rank")
    x, w = _problem(seed, m, n)
    a, b = whitened_svd(w, _stats(x), damping=0.0).factors(k)
    best = np.linalg.norm(x @ (w - a @ b))
    rng = np.random.default_rng(seed + 1)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    candidates = [(u[:, :k] * s[:k]) @ vt[:k]]  # the weight-space optimum
    for scale in (1e-3, 1e-1, 1.0):  # perturbations of the optimum, and far away
        candidates += [
            (a + scale * rng.normal(size=a.shape)) @ (b + scale * rng.normal(size=b.shape))
            for _ in range(10)
        ]
    candidates += [rng.normal(size=(m, k)) @ rng.normal(size=(k, n)) for _ in range(10)]
    for candidate in candidates:
        assert np.linalg.matrix_rank(candidate) <= k
        assert np.linalg.norm(x @ (w - candidate)) >= best * (1 - 1e-9) - 1e-12


def test_whitened_beats_plain_svd_on_anisotropic_inputs():
    x, w = _problem(7, 6, 5)
    x[:, 0] *= 50.0  # one feature dominates the outputs
    a, b = whitened_svd(w, _stats(x), damping=0.0).factors(2)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    plain = (u[:, :2] * s[:2]) @ vt[:2]
    assert np.linalg.norm(x @ (w - a @ b)) < 0.9 * np.linalg.norm(x @ (w - plain))


@FAST
@given(seed=SEEDS, m=dims, n=dims)
def test_full_rank_whitened_svd_reconstructs_the_kernel(seed, m, n):
    x, w = _problem(seed, m, n)
    result = whitened_svd(w, _stats(x), damping=0.0)
    np.testing.assert_allclose((result.left * result.s) @ result.vt, w, atol=1e-7)
    for split in ("balanced", "left", "right"):
        a, b = result.factors(min(m, n), split)
        np.testing.assert_allclose(a @ b, w, atol=1e-7)


@FAST
@given(seed=SEEDS, m=dims, n=dims, data=st.data())
def test_whitened_svd_accepts_a_second_moment_matrix(seed, m, n, data):
    k = data.draw(st.integers(1, min(m, n)), label="rank")
    x, w = _problem(seed, m, n)
    from_stats = whitened_svd(w, _stats(x), damping=0.01).factors(k)
    from_gram = whitened_svd(w, x.T @ x, damping=0.01).factors(k)
    np.testing.assert_allclose(
        from_stats[0] @ from_stats[1], from_gram[0] @ from_gram[1], atol=1e-6
    )


# ---------------------------------------------------------------------------
# Damping


@FAST
@given(seed=SEEDS, m=dims, damping=st.floats(0.0, 10.0))
def test_whitening_factor_is_a_root_of_the_damped_scatter(seed, m, damping):
    x, _ = _problem(seed, m, 2)
    scatter = x.T @ x
    root = whitening_factor(scatter, damping)
    damped = scatter + damping * np.mean(np.diag(scatter)) * np.eye(m)
    np.testing.assert_allclose(root @ root.T, damped, rtol=1e-9, atol=1e-9 * np.abs(damped).max())


def test_damping_makes_a_singular_scatter_invertible():
    # Fewer rows than features: X^T X is singular. Without damping the factor
    # is still a root of X^T X up to a floor of 1e-10 of its largest
    # eigenvalue (Cholesky fails or is ill conditioned; the eigenvalue root
    # floors the rest), so it stays invertible; any damping > 0 does the
    # same, and the whitened SVD then fits the seen outputs exactly once the
    # rank reaches rank(X).
    x, w = _problem(3, 6, 4, rows=2)
    scatter = x.T @ x
    root = whitening_factor(scatter, damping=0.0)
    np.testing.assert_allclose(root @ root.T, scatter, atol=1e-9 * np.abs(scatter).max())
    assert np.linalg.matrix_rank(root) == 6
    root = whitening_factor(scatter, damping=1e-6)
    assert np.linalg.matrix_rank(root) == 6
    for damping in (0.0, 1e-6):
        a, b = whitened_svd(w, scatter, damping=damping).factors(2)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        assert np.linalg.norm(x @ (w - a @ b)) < 1e-4 * np.linalg.norm(x @ w)


@pytest.mark.parametrize("dead", [1, 5, 12])
def test_whitening_without_damping_survives_rank_deficient_statistics(dead):
    # Dead features (always 0) and duplicated ones: X^T X is singular, no
    # damping. The whitened SVD is finite and reaches the output optimum of
    # every rank, the truncated SVD of X W (Eckart-Young: X A B can be any
    # rank-k matrix in the column space of X, where X W lies).
    rng = np.random.default_rng(dead)
    x = rng.normal(size=(200, 16))
    x[:, :dead] = 0.0
    x[:, -1] = x[:, -2]
    w = rng.normal(size=(16, 10))
    svd = whitened_svd(w, x.T @ x, damping=0.0)
    s = np.linalg.svd(x @ w, compute_uv=False)
    for k in (1, 3, 6):
        a, b = svd.factors(k)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
        np.testing.assert_allclose(
            np.linalg.norm(x @ (w - a @ b)),
            np.sqrt(np.sum(s[k:] ** 2)),
            rtol=1e-5,
            atol=1e-7 * s[0],
        )


@pytest.mark.parametrize("damping", [-0.1, True, "0.01", None])
def test_invalid_damping(damping):
    with pytest.raises(ValueError, match="`damping`"):
        whitening_factor(np.eye(3), damping)


@FAST
@given(seed=SEEDS, m=dims, n=dims, data=st.data())
def test_damping_trades_output_error_for_weight_error(seed, m, n, data):
    """No damping is the optimum on the calibration data; heavy damping
    tends to the plain (weight-space) truncated SVD."""
    k = data.draw(st.integers(1, min(m, n)), label="rank")
    x, w = _problem(seed, m, n)
    stats = _stats(x)

    def output_error(damping):
        a, b = whitened_svd(w, stats, damping=damping).factors(k)
        return np.linalg.norm(x @ (w - a @ b))

    undamped = output_error(0.0)
    for damping in (0.01, 1.0, 100.0):
        assert output_error(damping) >= undamped * (1 - 1e-9) - 1e-12
    a, b = whitened_svd(w, stats, damping=1e9).factors(k)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    plain = (u[:, :k] * s[:k]) @ vt[:k]
    if k == min(m, n) or s[k - 1] - s[k] > 1e-3 * s[0]:  # a unique optimum
        np.testing.assert_allclose(a @ b, plain, atol=1e-4 * s[0])


def test_zero_statistics_give_the_plain_truncated_svd():
    _, w = _problem(0, 5, 4)
    a, b = whitened_svd(w, np.zeros((5, 5)), damping=0.01).factors(2)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(a @ b, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-10)


@FAST
@given(seed=SEEDS, m=dims, n=dims, scale=st.floats(1e-3, 1e3))
def test_whitened_svd_is_invariant_to_the_input_scale(seed, m, n, scale):
    # The damping is relative to the mean diagonal, so scaling X changes nothing.
    x, w = _problem(seed, m, n)
    k = max(1, min(m, n) - 1)
    a1, b1 = whitened_svd(w, x.T @ x, damping=0.05).factors(k)
    a2, b2 = whitened_svd(w, scale**2 * (x.T @ x), damping=0.05).factors(k)
    np.testing.assert_allclose(a1 @ b1, a2 @ b2, atol=1e-6 * np.abs(w).max())


# ---------------------------------------------------------------------------
# Output error from statistics, bias correction


def _direct_error(x, w, w2, b, b2):
    reference = x @ w + b
    return np.linalg.norm(x @ w2 + b2 - reference) / np.linalg.norm(reference)


@FAST
@given(seed=SEEDS, m=dims, n=dims, with_bias=st.booleans())
def test_relative_output_error_equals_the_direct_error(seed, m, n, with_bias):
    x, w = _problem(seed, m, n)
    rng = np.random.default_rng(seed + 2)
    w2 = w + 0.3 * rng.normal(size=w.shape)
    b = rng.normal(size=n) if with_bias else None
    b2 = rng.normal(size=n) if with_bias else None
    got = relative_output_error(_stats(x), w, w2, b, b2)
    zeros = np.zeros(n)
    expected = _direct_error(x, w, w2, zeros if b is None else b, zeros if b2 is None else b2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_relative_output_error_of_the_exact_kernel_is_zero():
    x, w = _problem(1, 4, 3)
    assert relative_output_error(_stats(x), w, w) == 0.0
    assert relative_output_error(_stats(x), np.zeros((4, 3)), np.ones((4, 3))) == 0.0


@FAST
@given(seed=SEEDS, m=dims, n=dims, with_bias=st.booleans())
def test_corrected_bias_is_the_least_squares_bias(seed, m, n, with_bias):
    x, w = _problem(seed, m, n)
    x = x + np.random.default_rng(seed).normal(size=m) * 3  # non-zero mean
    rng = np.random.default_rng(seed + 3)
    w2 = w + 0.5 * rng.normal(size=w.shape)
    b = rng.normal(size=n) if with_bias else np.zeros(n)
    stats = _stats(x)
    got = corrected_bias(stats, w, w2, b if with_bias else None)
    # Oracle: argmin_c ||X W2 + 1 c - (X W + 1 b)|| is the mean residual.
    expected = np.mean(x @ w + b - x @ w2, axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
    best = _direct_error(x, w, w2, b, got)
    np.testing.assert_allclose(
        relative_output_error(stats, w, w2, b, got), best, rtol=1e-6, atol=1e-9
    )
    assert best <= _direct_error(x, w, w2, b, b) + 1e-12
    for _ in range(10):
        other = got + rng.normal(size=n)
        assert best <= _direct_error(x, w, w2, b, other) + 1e-12


@FAST
@given(seed=SEEDS, m=dims, n=dims, data=st.data())
def test_centred_whitening_plus_bias_correction_is_the_affine_optimum(seed, m, n, data):
    """With `center=True` and `corrected_bias`, the rank-`k` kernel and the bias
    together minimise the output error over all rank-`k` kernels and all biases:
    the optimum is Eckart-Young on the centred outputs `(X - mean) W`."""
    k = data.draw(st.integers(1, min(m, n)), label="rank")
    x, w = _problem(seed, m, n)
    x = x + np.random.default_rng(seed).normal(size=m) * 3
    b = np.random.default_rng(seed + 4).normal(size=n)
    stats = _stats(x)
    a, bb = whitened_svd(w, stats, damping=0.0, center=True).factors(k)
    w_k = a @ bb
    bias = corrected_bias(stats, w, w_k, b)
    error = np.linalg.norm(x @ w_k + bias - (x @ w + b))
    centred = (x - x.mean(axis=0)) @ w
    s = np.linalg.svd(centred, compute_uv=False)
    optimum = math.sqrt(float(np.sum(s[k:] ** 2)))
    np.testing.assert_allclose(error, optimum, rtol=1e-5, atol=1e-7 * np.linalg.norm(centred))
    # Not centring (and correcting the bias afterwards) can only be worse.
    a0, b0 = whitened_svd(w, stats, damping=0.0).factors(k)
    uncentred = np.linalg.norm(x @ (a0 @ b0) + corrected_bias(stats, w, a0 @ b0, b) - (x @ w + b))
    assert uncentred >= error * (1 - 1e-9) - 1e-12


# ---------------------------------------------------------------------------
# Rank allocation against exhaustive search


def _exhaustive(gains, costs, budget, min_rank, max_ranks):
    """The largest total gain over every feasible allocation (brute force)."""
    best = -1.0
    ranges = [range(min(min_rank, mr), mr + 1) for mr in max_ranks]
    for ranks in itertools.product(*ranges):
        if sum(c * r for c, r in zip(costs, ranks)) <= budget:
            best = max(best, _total_gain(gains, ranks))
    return best


def _total_gain(gains, ranks):
    return float(sum(np.sum(g[:r]) for g, r in zip(gains, ranks)))


@st.composite
def allocation_problems(draw, equal_costs=False):
    count = draw(st.integers(1, 4))
    gains, costs = [], []
    cost = draw(st.integers(1, 6))
    for _ in range(count):
        length = draw(st.integers(1, 4))
        values = draw(st.lists(st.floats(0.0, 100.0), min_size=length, max_size=length))
        gains.append(np.array(sorted(values, reverse=True)))
        costs.append(cost if equal_costs else draw(st.integers(1, 6)))
    min_rank = draw(st.integers(0, 1))
    floor = sum(c * min(min_rank, len(g)) for c, g in zip(costs, gains))
    ceiling = sum(c * len(g) for c, g in zip(costs, gains))
    budget = draw(st.integers(floor, ceiling + 3))
    return gains, costs, budget, min_rank


def _check_feasible_and_maximal(gains, costs, budget, min_rank, ranks):
    spent = sum(c * r for c, r in zip(costs, ranks))
    assert spent <= budget
    for g, c, r in zip(gains, costs, ranks):
        assert min(min_rank, len(g)) <= r <= len(g)
        # Maximal: no matrix could take one more rank within the budget.
        assert r == len(g) or spent + c > budget


@FAST
@given(problem=allocation_problems(equal_costs=True))
def test_greedy_allocation_is_optimal_with_equal_costs(problem):
    gains, costs, budget, min_rank = problem
    ranks = allocate_ranks(gains, costs, budget, min_rank=min_rank)
    _check_feasible_and_maximal(gains, costs, budget, min_rank, ranks)
    best = _exhaustive(gains, costs, budget, min_rank, [len(g) for g in gains])
    np.testing.assert_allclose(_total_gain(gains, ranks), best, rtol=1e-12, atol=1e-9)


@FAST
@given(problem=allocation_problems())
def test_greedy_allocation_is_within_one_step_of_optimal(problem):
    """With unequal costs the greedy is a knapsack heuristic: its gain is at
    least the optimum minus the gain of one rank step (the largest step gain
    beyond `min_rank`), the classic bound of greedy-by-ratio on concave curves
    (the fractional relaxation exceeds the greedy by at most its critical
    item). It is not always optimal: see the next test."""
    gains, costs, budget, min_rank = problem
    ranks = allocate_ranks(gains, costs, budget, min_rank=min_rank)
    _check_feasible_and_maximal(gains, costs, budget, min_rank, ranks)
    best = _exhaustive(gains, costs, budget, min_rank, [len(g) for g in gains])
    steps = [g[k] for g in gains for k in range(min(min_rank, len(g)), len(g))]
    largest_step = max(steps, default=0.0)
    got = _total_gain(gains, ranks)
    assert got <= best + 1e-9
    assert got >= best - largest_step - 1e-9


def test_greedy_allocation_can_miss_the_optimum_with_unequal_costs():
    # Best ratio first (10/6) leaves no room for the two 7/5 steps (14 in all).
    gains = [np.array([10.0]), np.array([7.0]), np.array([7.0])]
    costs = [6, 5, 5]
    ranks = allocate_ranks(gains, costs, budget=10, min_rank=0)
    assert ranks == [1, 0, 0]
    assert _exhaustive(gains, costs, 10, 0, [1, 1, 1]) == 14.0


@FAST
@given(problem=allocation_problems(), data=st.data())
def test_allocation_respects_max_ranks(problem, data):
    gains, costs, budget, min_rank = problem
    max_ranks = [data.draw(st.integers(min(min_rank, len(g)), len(g))) for g in gains]
    ranks = allocate_ranks(gains, costs, budget, min_rank=min_rank, max_ranks=max_ranks)
    assert all(r <= mr for r, mr in zip(ranks, max_ranks))
    assert sum(c * r for c, r in zip(costs, ranks)) <= budget


def test_allocation_rejects_a_budget_below_the_minimum():
    with pytest.raises(ValueError, match="`budget`"):
        allocate_ranks([np.ones(3), np.ones(3)], costs=[10, 10], budget=19)


def test_allocation_rejects_mismatched_costs():
    with pytest.raises(ValueError, match="`costs`"):
        allocate_ranks([np.ones(3), np.ones(3)], costs=[10], budget=100)


def test_allocation_of_singular_values_minimises_the_total_error():
    """End to end: gains = s**2 of real matrices; equal `m + n` costs."""
    rng = np.random.default_rng(0)
    matrices = [rng.normal(size=(4, 4)) * scale for scale in (1.0, 3.0, 0.2)]
    gains = [np.linalg.svd(w, compute_uv=False) ** 2 for w in matrices]
    ranks = allocate_ranks(gains, costs=[8, 8, 8], budget=8 * 7)
    errors = []
    for w, r in zip(matrices, ranks):
        u, s, vt = np.linalg.svd(w)
        errors.append(np.linalg.norm(w - (u[:, :r] * s[:r]) @ vt[:r]) ** 2)
    best = min(
        sum(float(np.sum(g[r:])) for g, r in zip(gains, combo))
        for combo in itertools.product(range(1, 5), repeat=3)
        if sum(combo) <= 7
    )
    np.testing.assert_allclose(sum(errors), best, rtol=1e-9)


def test_keeping_a_matrix_whole_when_its_error_is_worth_it():
    # Matrix 0's tail holds most of the error: once it reaches its largest
    # rank (2), keeping it whole (cost 9 in all, 1 more than rank 2) is the
    # best use of the budget; the budget is met exactly (nothing else fits).
    gains = [np.array([5.0, 4.0, 100.0]), np.array([3.0, 1.0, 0.5])]
    ranks = allocate_ranks(
        gains, costs=[4, 4], budget=17, max_ranks=[2, 2], whole_costs=[9, None]
    )
    assert ranks == [None, 2]
    # Too small a budget: the matrix stays factorized.
    assert allocate_ranks(
        gains, costs=[4, 4], budget=12, max_ranks=[2, 2], whole_costs=[9, None]
    ) == [2, 1]


@FAST
@given(problem=allocation_problems(), data=st.data())
def test_allocation_with_whole_matrices_meets_the_budget(problem, data):
    gains, costs, budget, min_rank = problem
    max_ranks = [data.draw(st.integers(min(min_rank, len(g)), len(g))) for g in gains]
    whole = [
        data.draw(st.one_of(st.none(), st.integers(c * mr, c * mr + c)))
        for c, mr in zip(costs, max_ranks)
    ]
    ranks = allocate_ranks(
        gains, costs, budget, min_rank=min_rank, max_ranks=max_ranks, whole_costs=whole
    )
    spent = sum(w if r is None else c * r for r, c, w in zip(ranks, costs, whole))
    assert spent <= budget
    for r, c, mr, w in zip(ranks, costs, max_ranks, whole):
        if r is None:
            assert w is not None
        else:  # maximal: one more rank (or keeping it whole) would not fit
            assert r <= mr
            assert r == mr or spent + c > budget
            assert r < mr or w is None or spent + w - c * r > budget
