"""Truncated SVD and rank selection: the maths behind every factorized layer.

This module knows nothing of layers. It turns a matrix into rank-`k` factors
and chooses `k` from a rank, an energy fraction or a parameter budget. The
layers in `keras_factorized.layers` call it; it never calls them.

Methods of `truncated_svd`:

- `"gram"`: exact and fast for dense matrices with one small side. For a tall
  `m x n` matrix it forms the `n x n` Gram matrix `M^T M` (one pass over the
  data), takes its top-`k` eigenvectors with LAPACK's symmetric eigensolver,
  then makes a second pass `Y = M V_k` and a Rayleigh-Ritz step on `Y`
  (the eigen-decomposition of the small `Y^T Y` in float64), which gives
  orthonormal `U` and removes the accuracy lost by squaring the condition
  number in the Gram matrix. The result is at the Eckart-Young optimum.
- `"lapack"`: `scipy.linalg.svd` (divide and conquer), the reference.
- `"randomized"`: scikit-learn's `randomized_svd`, for huge or sparse inputs.
- `"arpack"`: scikit-learn `TruncatedSVD(algorithm="arpack")`, for sparse inputs
  when an exact answer is needed.
- `"tensorflow"`: `tf.linalg.svd`, which runs on the accelerator.
- `"keras"`: `keras.ops.svd` on whichever backend Keras runs (GPU with JAX or
  PyTorch too).
- `"auto"`: `"randomized"` for sparse input or when the small side is too large
  for a Gram matrix (> 8192), else `"gram"`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse

from keras_factorized.gram_svd import svd_gram as _svd_gram
from keras_factorized.validation import invalid_value

METHODS = ("auto", "gram", "lapack", "randomized", "arpack", "tensorflow", "keras")
SPLITS = ("balanced", "left", "right")

# Above this many columns (of the smaller side), an `n x n` Gram matrix and its
# eigen-decomposition cost more than a randomized sketch.
_GRAM_MAX_SIDE = 8192


class SVDResult(NamedTuple):
    """A truncated SVD `M ~= u @ diag(s) @ vt`.

    Attributes:
        u: `(m, k)` left singular vectors (orthonormal columns).
        s: `(k,)` singular values, in decreasing order.
        vt: `(k, n)` right singular vectors (orthonormal rows).
        frobenius_norm_sq: `||M||_F^2`, the sum of all squared singular values,
            so that the relative error of the truncation is
            `sqrt(1 - sum(s**2) / frobenius_norm_sq)` without the full spectrum.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    frobenius_norm_sq: float

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def relative_error(self) -> float:
        """Relative Frobenius error `||M - U S V^T|| / ||M||` of the truncation."""
        if self.frobenius_norm_sq == 0:
            return 0.0
        kept = float(np.sum(np.square(self.s, dtype=np.float64)))
        return math.sqrt(max(0.0, 1.0 - kept / self.frobenius_norm_sq))

    def factors(
        self, split: str = "balanced", *, overwrite_u: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The factors `(A, B)` with `A @ B ~= M`; see `split_singular_values`.

        `overwrite_u=True` scales `u` in place into `A` (this result's `u`
        then holds `A`): no second `m x k` array, for a result used once.
        """
        return split_singular_values(
            self.u, self.s, self.vt, split=split, overwrite_u=overwrite_u
        )




def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_rank(rank, shape) -> int:
    """Checks that `rank` is an integer in `[1, min(shape)]` and returns it."""
    max_rank = int(min(shape))
    if not _is_integer(rank) or not 1 <= rank <= max_rank:
        raise invalid_value("rank", f"an integer in [1, {max_rank}]", rank)
    return int(rank)


def factorized_param_count(shape, rank: int) -> int:
    """Number of weights of rank-`rank` factors of an `m x n` matrix: `(m + n) k`."""
    m, n = shape
    return (int(m) + int(n)) * int(rank)


def rank_for_param_ratio(shape, param_ratio: float) -> int:
    """The largest rank whose factors keep at most `param_ratio` of `m * n` weights.

    Args:
        shape: `(m, n)`, the shape of the dense matrix.
        param_ratio: fraction of the dense parameter count to keep, in `(0, 1]`.
            A ratio too small for rank 1 still gives rank 1.

    Returns:
        An integer rank in `[1, min(m, n)]`.

    Example:

    >>> rank_for_param_ratio((20000, 128), 0.125)
    15
    """
    if (
        not isinstance(param_ratio, numbers.Real)
        or isinstance(param_ratio, bool)
        or not 0 < param_ratio <= 1
    ):
        raise invalid_value("param_ratio", "a number in (0, 1]", param_ratio)
    m, n = (int(d) for d in shape)
    rank = int(math.floor(param_ratio * m * n / (m + n)))
    return max(1, min(rank, m, n))


def rank_for_energy(singular_values, energy: float, frobenius_norm_sq=None) -> int:
    """The smallest rank whose singular values keep `energy` of `sum(s**2)`.

    Args:
        singular_values: the singular values, in decreasing order (all of
            them, or the leading ones when `frobenius_norm_sq` is given).
        energy: fraction of the squared singular values to keep, in `(0, 1]`.
        frobenius_norm_sq: the total `sum(s**2)` over the full spectrum, when
            `singular_values` holds only its leading part.

    Returns:
        An integer rank `>= 1`, or `len(singular_values) + 1` when the given
        leading values do not reach `energy` (more are needed).

    Example:

    >>> rank_for_energy([3.0, 2.0, 1.0], 0.9)
    2
    """
    if (
        not isinstance(energy, numbers.Real)
        or isinstance(energy, bool)
        or not 0 < energy <= 1
    ):
        raise invalid_value("energy", "a number in (0, 1]", energy)
    sq = np.square(np.asarray(singular_values, dtype=np.float64))
    total = float(np.sum(sq)) if frobenius_norm_sq is None else float(frobenius_norm_sq)
    if total == 0:
        return 1
    cumulative = np.cumsum(sq) / total
    # A relative slack of 1e-12 keeps energy=1.0 reachable despite rounding.
    reached = np.nonzero(cumulative >= energy - 1e-12)[0]
    if reached.size == 0:
        return int(sq.shape[0]) + 1
    return int(reached[0]) + 1


def check_rank_arguments(rank=None, energy=None, param_ratio=None):
    """Checks that exactly one of `rank`, `energy`, `param_ratio` is given."""
    given = {
        k: v
        for k, v in (("rank", rank), ("energy", energy), ("param_ratio", param_ratio))
        if v is not None
    }
    if len(given) != 1:
        received = ", ".join(f"{k}={v!r}" for k, v in given.items()) or "none of them"
        raise ValueError(
            "Expected exactly one of `rank`, `energy` or `param_ratio` to choose "
            f"the rank. Received: {received}"
        )


def resolve_rank(
    shape, rank=None, energy=None, param_ratio=None, singular_values=None,
    frobenius_norm_sq=None,
) -> int:
    """Chooses a rank from exactly one of `rank`, `energy` or `param_ratio`.

    Args:
        shape: `(m, n)`, the matrix shape.
        rank: an integer in `[1, min(m, n)]`.
        energy: fraction of the squared singular values to keep, in `(0, 1]`;
            needs `singular_values` (the full spectrum, or the leading values
            plus `frobenius_norm_sq`).
        param_ratio: fraction of the `m * n` dense parameters to keep.
        singular_values: the singular values, decreasing, for `energy`.
        frobenius_norm_sq: `||M||_F^2` when `singular_values` is partial.

    Returns:
        The rank, an integer in `[1, min(m, n)]`.
    """
    check_rank_arguments(rank, energy, param_ratio)
    if len(shape) != 2:
        raise invalid_value("shape", "a 2-D shape (m, n)", tuple(shape))
    if rank is not None:
        return validate_rank(rank, shape)
    if param_ratio is not None:
        return rank_for_param_ratio(shape, param_ratio)
    if singular_values is None:
        raise ValueError("`energy` needs `singular_values` to choose the rank.")
    k = rank_for_energy(singular_values, energy, frobenius_norm_sq)
    return min(k, int(min(shape)))


def split_singular_values(u, s, vt, split: str = "balanced", *, overwrite_u=False):
    """Turns `U, s, V^T` into two factors `A @ B = U diag(s) V^T`.

    Args:
        u: `(m, k)` left singular vectors.
        s: `(k,)` singular values.
        vt: `(k, n)` right singular vectors.
        split: where the singular values go: `"balanced"` gives
            `A = U S^1/2, B = S^1/2 V^T` (both factors on the same scale,
            best for training both); `"left"` gives `A = U S, B = V^T`;
            `"right"` gives `A = U, B = S V^T` (orthonormal rows of `A`, e.g.
            to freeze `A` and train `B`).
        overwrite_u: scale `u` in place into `A` (no second `(m, k)` array)
            when it is a writeable array that owns its data; `u` is then
            changed. For callers that drop `u` afterwards.

    Returns:
        The tuple `(A, B)`.
    """
    if split not in SPLITS:
        raise invalid_value("split", f"one of {SPLITS}", split)
    if split == "right":
        return u, s[:, None] * vt
    root = np.sqrt(s) if split == "balanced" else s
    scale = root[None, :]
    in_place = (
        overwrite_u and isinstance(u, np.ndarray) and u.flags.writeable
        and u.flags.owndata and np.result_type(u, scale) == u.dtype
    )
    if in_place:
        u *= scale
        a = u
    else:
        a = u * scale
    return a, (vt if split == "left" else root[:, None] * vt)


def _check_matrix(matrix):
    """Returns a 2-D float numpy array or scipy sparse matrix, or raises."""
    if scipy.sparse.issparse(matrix):
        if matrix.ndim != 2:
            raise invalid_value("matrix", "a 2-D matrix", f"shape {matrix.shape}")
        data = matrix.data
        if not np.all(np.isfinite(data)):
            raise ValueError(
                "Received an invalid value for `matrix`, expected finite values. "
                "Received: a matrix containing NaN or Inf"
            )
        if not np.issubdtype(matrix.dtype, np.floating):
            matrix = matrix.astype(np.float64)
        return matrix
    if not isinstance(matrix, (np.ndarray, list, tuple)):
        # A backend tensor or a Keras variable (possibly on an accelerator).
        import keras

        matrix = keras.ops.convert_to_numpy(matrix)
    array = np.asarray(matrix)
    if array.ndim != 2:
        raise invalid_value("matrix", "a 2-D matrix", f"an array of shape {array.shape}")
    if array.size == 0:
        raise invalid_value("matrix", "a non-empty matrix", f"an array of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        if np.issubdtype(array.dtype, np.number):
            array = array.astype(np.float64)
        else:
            raise TypeError(
                "Received an invalid value for `matrix`, expected a real floating "
                f"point matrix. Received: dtype={array.dtype}"
            )
    elif array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32)
    # The sum is finite only if every entry is (NaN and Inf propagate): one
    # pass with no temporary; the exact test runs only if it is not (overflow).
    if not np.isfinite(array.sum()) and not np.all(np.isfinite(array)):
        raise ValueError(
            "Received an invalid value for `matrix`, expected finite values. "
            "Received: a matrix containing NaN or Inf"
        )
    return array


def _fix_signs(u, vt):
    """Makes the largest-magnitude entry of each column of `u` positive.

    The same convention as scikit-learn's `svd_flip(u_based_decision=True)`,
    so the same matrix always gives the same factors whatever the solver.
    """
    # Column maxima and minima are fast reductions over the rows; an argmax
    # down the columns of a tall C-ordered `u` took as long as the SVD's
    # second pass. Only exact ties |max| == |min| need the argmax.
    high, low = u.max(axis=0), u.min(axis=0)
    signs = np.where(high >= -low, 1.0, -1.0)
    for j in np.nonzero(high == -low)[0]:
        pivot = u[np.argmax(np.abs(u[:, j])), j]
        signs[j] = -1.0 if pivot < 0 else 1.0
    if np.all(signs > 0):
        return u, vt
    signs = signs.astype(u.dtype)
    if u.flags.writeable and u.flags.owndata:
        u *= signs[None, :]
    else:
        u = u * signs[None, :]
    return u, vt * signs[:, None].astype(vt.dtype)


def _frobenius_sq(matrix) -> float:
    if scipy.sparse.issparse(matrix):
        return float(np.sum(np.square(matrix.data, dtype=np.float64)))
    # Chunked so a float32 matrix is never copied whole into float64.
    total = 0.0
    flat = matrix.reshape(-1)
    step = 1 << 22
    for start in range(0, flat.shape[0], step):
        chunk = flat[start : start + step].astype(np.float64)
        total += float(chunk @ chunk)
    return total


def _svd_lapack(matrix, rank):
    u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, check_finite=False)
    return u[:, :rank], s[:rank], vt[:rank]


def _svd_randomized(matrix, rank, random_state):
    from sklearn.utils.extmath import randomized_svd

    u, s, vt = randomized_svd(
        matrix, rank, n_oversamples=10, n_iter="auto", random_state=random_state
    )
    return u, s, vt


def _svd_arpack(matrix, rank, random_state):
    from sklearn.decomposition import TruncatedSVD

    if rank >= min(matrix.shape):
        dense = matrix.toarray() if scipy.sparse.issparse(matrix) else matrix
        return _svd_lapack(np.asarray(dense), rank)
    svd = TruncatedSVD(rank, algorithm="arpack", random_state=random_state)
    us = svd.fit_transform(matrix)
    s = svd.singular_values_
    return us / np.where(s > 0, s, 1)[None, :], s, svd.components_


def _svd_tensorflow(matrix, rank):
    import tensorflow as tf

    s, u, v = tf.linalg.svd(tf.convert_to_tensor(matrix), full_matrices=False)
    return u.numpy()[:, :rank], s.numpy()[:rank], v.numpy()[:, :rank].T


def _svd_keras(matrix, rank):
    import keras

    u, s, vt = keras.ops.svd(keras.ops.convert_to_tensor(matrix), full_matrices=False)
    to_np = keras.ops.convert_to_numpy
    return to_np(u)[:, :rank], to_np(s)[:rank], to_np(vt)[:rank]


def _choose_method(matrix) -> str:
    if scipy.sparse.issparse(matrix) or min(matrix.shape) > _GRAM_MAX_SIDE:
        return "randomized"
    return "gram"


def truncated_svd(
    matrix,
    rank=None,
    *,
    energy=None,
    param_ratio=None,
    method: str = "auto",
    random_state=0,
) -> SVDResult:
    """Rank-`k` truncated SVD `M ~= U diag(s) V^T`, with `k` chosen for you.

    By Eckart-Young, `U diag(s) V^T` is the best rank-`k` approximation of
    `M` in the Frobenius norm, and its relative error is
    `sqrt(sum of discarded s_i^2 / sum of all s_i^2)`. Signs are fixed (the
    largest-magnitude entry of each left singular vector is positive), so the
    same matrix always gives the same factors.

    Args:
        matrix: a 2-D float array (NumPy, Keras/TF/JAX tensor or variable) or
            a scipy sparse matrix.
        rank: the rank `k`, an integer in `[1, min(m, n)]`.
        energy: instead of `rank`: keep the fewest components whose squared
            singular values reach this fraction of the total, in `(0, 1]`.
        param_ratio: instead of `rank`: the largest `k` whose factors keep at
            most this fraction of the `m * n` weights, in `(0, 1]`.
        method: one of `"auto"`, `"gram"`, `"lapack"`, `"randomized"`,
            `"arpack"`, `"tensorflow"`, `"keras"` (see the module docstring).
        random_state: seed of the randomized solvers.

    Returns:
        An `SVDResult(u, s, vt, frobenius_norm_sq)`; `u`, `s`, `vt` have the
        input's float dtype (float32 or float64).

    Example:

    >>> import numpy as np
    >>> m = np.random.default_rng(0).normal(size=(1000, 64))
    >>> res = truncated_svd(m, rank=8)
    >>> a, b = res.factors()   # A = U S^1/2, B = S^1/2 V^T
    >>> a.shape, b.shape
    ((1000, 8), (8, 64))
    >>> bool(np.isclose(np.linalg.norm(m - a @ b) / np.linalg.norm(m), res.relative_error()))
    True
    """
    if method not in METHODS:
        raise invalid_value("method", f"one of {METHODS}", method)
    check_rank_arguments(rank, energy, param_ratio)
    matrix = _check_matrix(matrix)
    shape = matrix.shape
    max_rank = int(min(shape))
    if method == "auto":
        method = _choose_method(matrix)
    if method in ("gram", "lapack", "tensorflow", "keras") and scipy.sparse.issparse(matrix):
        raise invalid_value(
            "method", "'auto', 'randomized' or 'arpack' for a sparse matrix", method
        )
    # The Gram path gets `||M||_F^2` for free from its Gram matrix.
    frob = None if method == "gram" else _frobenius_sq(matrix)

    if energy is not None:
        # Energy needs the spectrum: exact methods compute it all (cheap from the
        # Gram matrix); the iterative ones grow the rank until it is reached.
        if method == "gram":
            k = max_rank
        else:
            k = min(max_rank, 32)
        rank_for_energy(np.zeros(1), energy)  # validates `energy`
        while True:
            res = _run_method(matrix, k, method, random_state, frob)
            needed = rank_for_energy(res.s, energy, res.frobenius_norm_sq)
            if needed <= k or k == max_rank:
                k = min(needed, max_rank)
                return SVDResult(
                    res.u[:, :k], res.s[:k], res.vt[:k], res.frobenius_norm_sq
                )
            k = min(max_rank, max(2 * k, needed))
    k = resolve_rank(shape, rank=rank, param_ratio=param_ratio)
    return _run_method(matrix, k, method, random_state, frob)


def _run_method(matrix, k, method, random_state, frob) -> SVDResult:
    if method == "gram":
        *result, frob = _svd_gram(matrix, k)
    elif method == "lapack":
        result = _svd_lapack(matrix, k)
    elif method == "randomized":
        result = _svd_randomized(matrix, k, random_state)
    elif method == "arpack":
        result = _svd_arpack(matrix, k, random_state)
    elif method == "tensorflow":
        result = _svd_tensorflow(matrix, k)
    elif method == "keras":
        result = _svd_keras(matrix, k)
    u, s, vt = result
    dtype = matrix.dtype if matrix.dtype in (np.float32, np.float64) else np.float64
    u, vt = _fix_signs(np.asarray(u, dtype=dtype), np.asarray(vt, dtype=dtype))
    return SVDResult(u, np.asarray(s, dtype=dtype), vt, frob)


def low_rank_approximation(matrix, rank=None, **kwargs) -> np.ndarray:
    """The dense rank-`k` approximation `U_k S_k V_k^T` of `matrix`.

    Takes the same arguments as `truncated_svd`. Meant for analysis and tests:
    the layers keep the factors instead.
    """
    res = truncated_svd(matrix, rank, **kwargs)
    return (res.u * res.s[None, :]) @ res.vt
