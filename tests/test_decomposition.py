import keras
import numpy as np
import pytest
import scipy.sparse

from keras_factorized import decomposition
from keras_factorized import gram_svd
from keras_factorized.decomposition import truncated_svd

EXACT_METHODS = ["gram", "lapack", "tensorflow", "keras"]


def _matrix(m=120, n=40, seed=0, decay=0.9, dtype=np.float64):
    """A random matrix with a known, decaying spectrum."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, min(m, n))))
    v, _ = np.linalg.qr(rng.normal(size=(n, min(m, n))))
    s = decay ** np.arange(min(m, n)) * 10
    return ((u * s) @ v.T).astype(dtype), s


def _eckart_young_error(s, k):
    return np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))


@pytest.mark.parametrize("method", EXACT_METHODS + ["arpack"])
@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
@pytest.mark.parametrize("k", [1, 7, 20])
def test_eckart_young_error_is_reached(method, shape, k):
    matrix, s = _matrix(*shape)
    res = truncated_svd(matrix, k, method=method)
    a, b = res.factors()
    error = np.linalg.norm(matrix - a @ b) / np.linalg.norm(matrix)
    expected = _eckart_young_error(s, k)
    assert error == pytest.approx(expected, abs=1e-5)
    assert res.relative_error() == pytest.approx(expected, abs=1e-5)
    # JAX without x64 computes `keras.ops.svd` of float64 input in float32.
    float32_only = method == "keras" and keras.backend.backend() == "jax"
    rtol, atol = (1e-5, 1e-5) if float32_only else (1e-6, 1e-8)
    np.testing.assert_allclose(res.s, s[:k], rtol=rtol)
    np.testing.assert_allclose(res.u.T @ res.u, np.eye(k), atol=atol)
    np.testing.assert_allclose(res.vt @ res.vt.T, np.eye(k), atol=atol)


def test_randomized_is_close_to_the_optimum():
    matrix, s = _matrix(300, 60, decay=0.8)
    res = truncated_svd(matrix, 10, method="randomized")
    a, b = res.factors()
    error = np.linalg.norm(matrix - a @ b) / np.linalg.norm(matrix)
    assert error == pytest.approx(_eckart_young_error(s, 10), abs=1e-4)


@pytest.mark.parametrize("method", ["gram", "lapack", "auto"])
def test_full_rank_reproduces_the_matrix(method):
    matrix = np.random.default_rng(3).normal(size=(50, 30))
    a, b = truncated_svd(matrix, 30, method=method).factors()
    np.testing.assert_allclose(a @ b, matrix, atol=1e-10)


def test_gram_handles_rank_deficient_matrices():
    rng = np.random.default_rng(4)
    matrix = rng.normal(size=(80, 3)) @ rng.normal(size=(3, 20))
    res = truncated_svd(matrix, 10, method="gram")
    a, b = res.factors()
    np.testing.assert_allclose(a @ b, matrix, atol=1e-9)
    np.testing.assert_allclose(res.u.T @ res.u, np.eye(10), atol=1e-8)
    assert np.all(res.s[3:] < 1e-6)


def test_float32_gram_path_is_at_the_optimum():
    matrix, s = _matrix(4000, 96, decay=0.97, dtype=np.float32)
    res = truncated_svd(matrix, 32, method="gram")
    assert res.u.dtype == np.float32 and res.vt.dtype == np.float32
    a, b = res.factors()
    m64 = matrix.astype(np.float64)
    error = np.linalg.norm(m64 - a.astype(np.float64) @ b) / np.linalg.norm(m64)
    assert error == pytest.approx(_eckart_young_error(s, 32), abs=1e-5)


@pytest.mark.parametrize("method", ["gram", "lapack", "randomized"])
def test_signs_are_deterministic(method):
    matrix, _ = _matrix(60, 20)
    first = truncated_svd(matrix, 5, method=method)
    again = truncated_svd(matrix.copy(), 5, method=method)
    np.testing.assert_array_equal(first.u, again.u)
    # The convention: largest-magnitude entry of each left vector is positive.
    idx = np.argmax(np.abs(first.u), axis=0)
    assert np.all(first.u[idx, np.arange(5)] > 0)
    # Solvers agree once signs are fixed.
    reference = truncated_svd(matrix, 5, method="lapack")
    # (randomized_svd is approximate: its vectors agree to its accuracy.)
    atol = 1e-4 if method == "randomized" else 1e-8
    np.testing.assert_allclose(first.u, reference.u, atol=atol)


def test_sparse_matrices_use_the_randomized_path():
    dense, s = _matrix(200, 50, decay=0.7)
    dense[np.abs(dense) < 0.05] = 0
    sparse = scipy.sparse.csr_matrix(dense)
    res = truncated_svd(sparse, 5)
    reference = truncated_svd(dense, 5, method="lapack")
    np.testing.assert_allclose(res.s, reference.s, rtol=1e-4)
    with pytest.raises(ValueError, match="`method`.*sparse"):
        truncated_svd(sparse, 5, method="gram")


def test_energy_and_param_ratio_choose_the_rank():
    matrix, s = _matrix(100, 40, decay=0.8)
    energy = np.cumsum(s**2) / np.sum(s**2)
    res = truncated_svd(matrix, energy=0.9)
    assert res.rank == int(np.argmax(energy >= 0.9)) + 1
    assert 1 - res.relative_error() ** 2 >= 0.9
    # The iterative solvers grow their rank until the energy is reached.
    res_rand = truncated_svd(matrix, energy=0.999, method="randomized")
    assert res_rand.rank == int(np.argmax(energy >= 0.999)) + 1
    res = truncated_svd(matrix, param_ratio=0.25)
    assert res.rank == int(0.25 * 100 * 40 / 140)
    assert decomposition.factorized_param_count((100, 40), res.rank) <= 0.25 * 4000
    assert truncated_svd(matrix, energy=1.0).rank == 40


def test_rank_helpers():
    assert decomposition.rank_for_param_ratio((20000, 128), 0.125) == 15
    assert decomposition.rank_for_param_ratio((10, 10), 1e-6) == 1
    assert decomposition.rank_for_energy([3.0, 2.0, 1.0], 0.9) == 2
    assert decomposition.rank_for_energy([3.0, 2.0, 1.0], 1.0) == 3
    # Partial spectrum not reaching the energy: one more is needed.
    assert decomposition.rank_for_energy([3.0], 0.99, frobenius_norm_sq=14.0) == 2
    assert decomposition.resolve_rank((5, 8), rank=3) == 3


def test_splits():
    matrix, _ = _matrix(30, 10)
    res = truncated_svd(matrix, 4)
    for split in ("balanced", "left", "right"):
        a, b = res.factors(split)
        np.testing.assert_allclose(a @ b, (res.u * res.s) @ res.vt, atol=1e-10)
    a, _ = res.factors("right")
    np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-10)
    a, b = res.factors("balanced")
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), r"`rank`, expected an integer in \[1, 10\]. Received: rank=0"),
        (dict(rank=-3), r"Received: rank=-3"),
        (dict(rank=2.5), r"Received: rank=2.5"),
        (dict(rank=11), r"\[1, 10\]. Received: rank=11"),
        (dict(rank=True), r"Received: rank=True"),
        (dict(rank=2, energy=0.5), r"exactly one of .*Received: rank=2, energy=0.5"),
        (dict(), r"exactly one of .*Received: none of them"),
        (dict(energy=0.0), r"`energy`, expected a number in \(0, 1\]. Received: energy=0.0"),
        (dict(energy=1.5), r"Received: energy=1.5"),
        (dict(param_ratio=0), r"`param_ratio`.*Received: param_ratio=0"),
        (dict(rank=2, method="qr"), r"`method`.*Received: method='qr'"),
        (dict(rank=2, split="middle"), r"`split`.*Received: split='middle'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    matrix = np.ones((20, 10))
    split = kwargs.pop("split", None)
    with pytest.raises(ValueError, match=message):
        res = truncated_svd(matrix, **kwargs)
        if split:
            res.factors(split)


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.ones(5), r"expected a 2-D matrix. Received: matrix=.*shape \(5,\)"),
        (np.ones((2, 3, 4)), r"2-D matrix"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), r"finite values"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), r"finite values"),
        (np.zeros((0, 3)), r"non-empty"),
    ],
)
def test_bad_matrices_are_rejected(matrix, message):
    with pytest.raises(ValueError, match=message):
        truncated_svd(matrix, 1)


def test_non_numeric_matrix_is_a_type_error():
    with pytest.raises(TypeError, match="`matrix`"):
        truncated_svd(np.array([["a", "b"], ["c", "d"]]), 1)


def test_accepts_backend_tensors():
    import keras

    matrix, s = _matrix(30, 10, dtype=np.float32)
    res = truncated_svd(keras.ops.convert_to_tensor(matrix), 3)
    np.testing.assert_allclose(res.s, s[:3], rtol=1e-5)
    res = truncated_svd(keras.Variable(matrix), 3)
    np.testing.assert_allclose(res.s, s[:3], rtol=1e-5)


def test_low_rank_approximation():
    matrix, s = _matrix(40, 20)
    approx = decomposition.low_rank_approximation(matrix, 5)
    assert np.linalg.matrix_rank(approx) == 5
    np.testing.assert_allclose(
        np.linalg.norm(matrix - approx) / np.linalg.norm(matrix),
        _eckart_young_error(s, 5),
        atol=1e-10,
    )


@pytest.mark.parametrize("split", ["balanced", "left", "right"])
def test_overwrite_u_gives_the_same_factors_without_a_copy(split):
    m = np.random.default_rng(3).normal(size=(300, 20)).astype("float32")
    expected = truncated_svd(m, 5).factors(split)
    res = truncated_svd(m, 5)
    a, b = res.factors(split, overwrite_u=True)
    np.testing.assert_array_equal(a, expected[0])
    np.testing.assert_array_equal(b, expected[1])
    assert a.dtype == np.float32
    if split != "right":
        assert a is res.u  # scaled in place


def test_overwrite_u_keeps_the_promoted_dtype_of_a_copy():
    u = np.ones((4, 2), dtype="float32")
    s = np.array([4.0, 1.0])  # float64: the product is float64, so no in place
    a, _ = decomposition.split_singular_values(u, s, np.ones((2, 3)), "left", overwrite_u=True)
    assert a.dtype == np.float64 and u[0, 0] == 1.0


def test_gram_path_limits_blas_threads_only_around_the_small_steps(monkeypatch):
    calls = []
    real = gram_svd._one_blas_thread

    def spy():
        calls.append("one thread")
        return real()

    monkeypatch.setattr(gram_svd, "_one_blas_thread", spy)
    m = np.random.default_rng(4).normal(size=(400, 30))
    res = truncated_svd(m, 6, method="gram")
    assert calls == ["one thread", "one thread"]  # eigh; Rayleigh-Ritz step
    np.testing.assert_allclose(
        res.relative_error(),
        np.sqrt(np.sum(np.linalg.svd(m, compute_uv=False)[6:] ** 2) / np.sum(m**2)),
        rtol=1e-6,
    )
