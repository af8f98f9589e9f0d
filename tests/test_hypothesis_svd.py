"""Property-based tests (Hypothesis) of `truncated_svd` and rank selection.

Instead of a few hand-picked matrices, Hypothesis draws shapes, dtypes, ranks
and matrices (random, rank-deficient, badly scaled, all zero) and checks the
properties that must hold for every one of them: the Eckart-Young error, the
factor shapes, determinism, and a clear error for every invalid input.
Example counts are bounded (`max_examples` <= 20) so the suite stays fast.
"""

import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import assume  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from keras_factorized import decomposition  # noqa: E402
from keras_factorized import gram_svd  # noqa: E402
from keras_factorized.decomposition import truncated_svd  # noqa: E402

BOUNDED = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,  # The same examples on every run: CI failures reproduce.
    database=None,  # Nothing written into the working tree (.hypothesis/).
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
EXACT_METHODS = ("auto", "gram", "lapack")


@st.composite
def matrices(draw, max_side=24):
    """A matrix with a drawn shape, dtype, true rank and scaling."""
    m = draw(st.integers(1, max_side))
    n = draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["random", "rank_deficient", "badly_scaled", "zero"]))
    rng = np.random.default_rng(seed)
    if kind == "zero":
        matrix = np.zeros((m, n))
    elif kind == "rank_deficient":
        true_rank = draw(st.integers(1, min(m, n)))
        matrix = rng.normal(size=(m, true_rank)) @ rng.normal(size=(true_rank, n))
    else:
        matrix = rng.normal(size=(m, n))
        if kind == "badly_scaled":
            # Rows and columns scaled over 8 orders of magnitude, and the whole
            # matrix by a power of ten that float32 can still hold.
            matrix *= 10.0 ** rng.uniform(-4, 4, size=(m, 1))
            matrix *= 10.0 ** rng.uniform(-4, 4, size=(1, n))
            # float32 within 1e-36..1e36 overall (the Gram path scales
            # what it cannot square; see the float32 tests at the end).
            low, high = (-20, 20) if dtype == np.float32 else (-100, 100)
            matrix *= 10.0 ** draw(st.integers(low, high))
    return matrix.astype(dtype), kind


def optimal_error(matrix, rank):
    """Eckart-Young: the least Frobenius error of any rank-`rank` matrix."""
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return math.sqrt(float(np.sum(s[rank:] ** 2)))


def tolerance(matrix):
    """Error allowed for a solver: a few ulps of ||M||_F per entry."""
    eps = np.finfo(matrix.dtype).eps
    norm = float(np.linalg.norm(matrix.astype(np.float64)))
    # The Gram path squares the singular values, so float32 inputs lose about
    # half their digits in the smallest ones: sqrt(eps) relative to ||M||.
    return max(norm * 10 * math.sqrt(eps) * (1 if matrix.dtype == np.float32 else 1e-2),
               np.finfo(np.float64).tiny)


@BOUNDED
@given(data=matrices(), method=st.sampled_from(EXACT_METHODS), fraction=st.floats(0, 1))
def test_error_is_the_eckart_young_optimum(data, method, fraction):
    matrix, kind = data
    rank = 1 + int(fraction * (min(matrix.shape) - 1))
    result = truncated_svd(matrix, rank=rank, method=method)
    m, n = matrix.shape
    assert result.u.shape == (m, rank)
    assert result.s.shape == (rank,)
    assert result.vt.shape == (rank, n)
    assert result.u.dtype == result.s.dtype == result.vt.dtype == matrix.dtype
    assert np.all(np.isfinite(result.u)) and np.all(np.isfinite(result.vt))
    assert np.all(np.diff(result.s.astype(np.float64)) <= 1e-6 * max(result.s.max(), 1e-300))
    approx = (result.u.astype(np.float64) * result.s.astype(np.float64)) @ result.vt.astype(
        np.float64
    )
    error = float(np.linalg.norm(matrix.astype(np.float64) - approx))
    assert error == pytest.approx(optimal_error(matrix, rank), abs=tolerance(matrix)), kind
    a, b = result.factors()
    assert a.shape == (m, rank) and b.shape == (rank, n)


@BOUNDED
@given(data=matrices(), fraction=st.floats(0, 1))
def test_same_matrix_same_factors(data, fraction):
    matrix, _ = data
    rank = 1 + int(fraction * (min(matrix.shape) - 1))
    first = truncated_svd(matrix, rank=rank)
    second = truncated_svd(matrix.copy(), rank=rank)
    for x, y in zip(first[:3], second[:3]):
        np.testing.assert_array_equal(x, y)


@BOUNDED
@given(data=matrices(), energy=st.floats(0.01, 1.0))
def test_energy_keeps_the_fewest_components_that_reach_it(data, energy):
    matrix, _ = data
    result = truncated_svd(matrix, energy=energy, method="lapack")
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    total = float(np.sum(s**2))
    k = result.rank
    assert 1 <= k <= min(matrix.shape)
    if total > 0:
        kept = np.cumsum(s**2) / total
        assert kept[k - 1] >= energy - 1e-5
        if k > 1:  # One component fewer would not reach it.
            assert kept[k - 2] < energy + 1e-5


@BOUNDED
@given(
    m=st.integers(1, 100_000),
    n=st.integers(1, 4096),
    ratio=st.floats(1e-6, 1.0, exclude_min=False),
)
def test_param_ratio_gives_the_largest_rank_within_budget(m, n, ratio):
    k = decomposition.rank_for_param_ratio((m, n), ratio)
    assert 1 <= k <= min(m, n)
    if k > 1:
        assert (m + n) * k <= ratio * m * n + 1e-6 * m * n
    if k < min(m, n):
        assert (m + n) * (k + 1) > ratio * m * n


@BOUNDED
@given(values=st.lists(st.floats(0, 1e6), min_size=1, max_size=30), energy=st.floats(0.001, 1.0))
def test_rank_for_energy_on_any_spectrum(values, energy):
    s = np.sort(np.asarray(values))[::-1]
    k = decomposition.rank_for_energy(s, energy)
    total = float(np.sum(s**2))
    assert 1 <= k <= len(s)
    if total > 0:
        assert np.sum(s[:k] ** 2) / total >= energy - 1e-9


INVALID_RANKS = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=25),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=3),
)


@BOUNDED
@given(rank=INVALID_RANKS)
def test_invalid_rank_is_a_clear_error(rank):
    matrix = np.ones((24, 30))
    with pytest.raises(ValueError, match=r"`rank`, expected an integer in \[1, 24\]\. Received: rank="):
        truncated_svd(matrix, rank=rank)


@BOUNDED
@given(
    name=st.sampled_from(["energy", "param_ratio"]),
    value=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                    st.just(float("nan")), st.booleans()),
)
def test_invalid_energy_or_ratio_is_a_clear_error(name, value):
    with pytest.raises(ValueError, match=rf"`{name}`, expected a number in \(0, 1\]\. Received: {name}="):
        truncated_svd(np.ones((5, 6)), **{name: value})


@BOUNDED
@given(
    shape=st.sampled_from([(0, 3), (3, 0), (4,), (2, 3, 4), ()]),
    poison=st.sampled_from([None, np.nan, np.inf, -np.inf]),
)
def test_invalid_matrix_is_a_clear_error(shape, poison):
    if poison is None:
        matrix = np.ones(shape)
        expected = r"`matrix`, expected a (non-empty|2-D) matrix"
    else:
        matrix = np.ones((4, 5))
        matrix[1, 2] = poison
        expected = r"`matrix`, expected finite values"
    with pytest.raises(ValueError, match=expected):
        truncated_svd(matrix, rank=1)


def test_two_ways_of_choosing_the_rank_are_refused():
    with pytest.raises(ValueError, match="exactly one of `rank`, `energy` or `param_ratio`"):
        truncated_svd(np.ones((3, 3)), rank=1, energy=0.5)


# Found by `test_error_is_the_eckart_young_optimum` with a wider scale range:
# the Gram path (the default up to 8,192 columns) squared float32 entries in
# float32, so entries above ~1e19 overflowed (an IndexError instead of a
# result) and entries below ~1e-20 underflowed (an error well above the
# optimum). It now scales such a matrix by a power of two; the oracle is
# LAPACK's SVD of the same entries in float64.
@BOUNDED
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    exponent=st.one_of(st.integers(-44, -15), st.integers(15, 37)),
    fraction=st.floats(0, 1),
)
def test_float32_gram_path_at_any_scale_matches_the_float64_oracle(
    seed, shape, exponent, fraction
):
    rng = np.random.default_rng(seed)
    matrix = (rng.uniform(-1, 1, size=shape) * 10.0**exponent).astype(np.float32)
    assume(np.any(matrix))  # Below ~1e-45 every entry rounds to zero.
    rank = 1 + int(fraction * (min(shape) - 1))
    result = truncated_svd(matrix, rank=rank, method="gram")
    assert result.s.dtype == np.float32
    assert np.all(np.isfinite(result.u)) and np.all(np.isfinite(result.vt))
    exact = matrix.astype(np.float64)
    oracle = np.linalg.svd(exact, compute_uv=False)
    norm = float(np.linalg.norm(oracle))
    # Relative to ||M||: float32 keeps ~7 digits, the Gram path about half of
    # them for the smallest singular values (as in `tolerance`); subnormal
    # inputs (exponent < -38) are exact in float64 too, so the same holds.
    np.testing.assert_allclose(
        result.s.astype(np.float64), oracle[:rank], rtol=0, atol=1e-2 * norm
    )
    assert result.frobenius_norm_sq == pytest.approx(norm**2, rel=1e-5)
    approx = (result.u.astype(np.float64) * result.s.astype(np.float64)) @ result.vt.astype(
        np.float64
    )
    error = float(np.linalg.norm(exact - approx))
    assert error == pytest.approx(optimal_error(matrix, rank), abs=tolerance(matrix))


def test_float32_gram_path_with_huge_entries():
    matrix = (np.random.default_rng(0).normal(size=(20, 10)) * 1e20).astype(np.float32)
    result = truncated_svd(matrix, rank=3, method="gram")
    approx = (result.u.astype(np.float64) * result.s) @ result.vt.astype(np.float64)
    error = np.linalg.norm(matrix - approx)
    assert error == pytest.approx(optimal_error(matrix, 3), rel=1e-4, abs=0)


def test_float32_gram_path_with_tiny_entries():
    matrix = (np.random.default_rng(0).normal(size=(20, 10)) * 1e-30).astype(np.float32)
    result = truncated_svd(matrix, rank=3, method="gram")
    approx = (result.u.astype(np.float64) * result.s) @ result.vt.astype(np.float64)
    error = np.linalg.norm(matrix - approx)
    assert error == pytest.approx(optimal_error(matrix, 3), rel=1e-2, abs=0)


def test_gram_path_leaves_a_matrix_within_range_unscaled(monkeypatch):
    """The scaled passes run only when the trace says the Gram went out of range."""
    calls = []
    real = gram_svd._scaled_gram

    def spy(m, scale):
        calls.append(scale)
        return real(m, scale)

    monkeypatch.setattr(gram_svd, "_scaled_gram", spy)
    rng = np.random.default_rng(1)
    truncated_svd(rng.normal(size=(50, 8)).astype(np.float32), rank=2, method="gram")
    assert calls == []
    truncated_svd((rng.normal(size=(50, 8)) * 1e25).astype(np.float32), rank=2, method="gram")
    assert len(calls) == 1 and math.frexp(calls[0])[0] == 0.5  # a power of two
