"""Data-aware low-rank factorization and rank allocation: the maths of `factorize`.

This module knows nothing of layers or models. It works on matrices `W`
(`m x n`, the layer computes `y = x @ W + b`) and on statistics of the inputs
`x` a layer saw on calibration data:

- `ActivationStatistics` accumulates `X^T X`, the sum and the count of the
  inputs, batch after batch, so calibration never holds all activations.
- `whitened_svd` finds the rank-`k` factors `A @ B` that minimise the error
  of the layer's *outputs* `||X W - X A B||_F` rather than of the weights
  `||W - A B||_F`: whiten by a square root `L` of `X^T X` (`X^T X = L L^T`),
  take the SVD of `L^T W`, truncate and un-whiten (`A = L^-T U_k S_k^1/2`). This
  is the closed form behind SVD-LLM (arXiv 2403.07378) and the exact optimum of
  the activation-aware objective of ASVD (arXiv 2312.05821).
- `fitted_factors` refits the factors of a layer to the inputs `X'` a
  compressed model feeds it, against the original outputs `X W` (the
  sequential update of SVD-LLM / Dobi-SVD), in closed form.
- `TokenCounts` and `frequency_weighted_svd` are the same for an embedding,
  whose inputs are token ids (one-hot rows): its rows weighted by how often
  the calibration data used them.
- `allocate_ranks` spends one global parameter budget over many matrices,
  one rank at a time where it removes the most error per parameter.
- `relative_output_error` measures `||X (W - W') + 1 (b - b')|| / ||X W + 1 b||`
  exactly from the statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg

from keras_factorized.decomposition import split_singular_values
from keras_factorized.validation import invalid_value
from keras_factorized.validation import is_real


class ActivationStatistics:
    """Running second moment `X^T X`, sum and count of a layer's input rows.

    Args:
        dim: the number of input features (rows of the layer's `W`).

    Example:

    >>> import numpy as np
    >>> stats = ActivationStatistics(3)
    >>> stats.update(np.ones((2, 5, 3)))   # any leading shape: rows of 3
    >>> stats.count, float(stats.gram[0, 0])
    (10, 10.0)
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.gram = np.zeros((self.dim, self.dim), dtype=np.float64)
        self.sum = np.zeros((self.dim,), dtype=np.float64)
        self.count = 0

    def update(self, x) -> None:
        """Adds the rows of `x` (any array whose last axis has `dim` features)."""
        x = np.asarray(x)
        if x.shape[-1] != self.dim:
            raise invalid_value(
                "x",
                f"an array whose last axis has {self.dim} features",
                f"an array of shape {x.shape}",
            )
        rows = x.reshape(-1, self.dim)
        if rows.dtype != np.float64:
            rows = rows.astype(np.float32)
        # float32 BLAS for the big product, accumulated in float64.
        self.gram += (rows.T @ rows).astype(np.float64)
        self.sum += rows.sum(axis=0, dtype=np.float64)
        self.count += rows.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def scatter(self, center: bool = False) -> np.ndarray:
        """`X^T X`, or with `center=True` the centred `(X - mean)^T (X - mean)`."""
        if not center:
            return self.gram
        mean = self.mean
        return self.gram - self.count * np.outer(mean, mean)


class WhitenedSVD(NamedTuple):
    """The SVD of a weight seen through its inputs: `L^T W = U S V^T`.

    `left = L^-T U` (so that `W = left @ diag(s) @ vt` exactly, up to damping)
    and the squared output error of the rank-`k` truncation is
    `sum(s[k:] ** 2)`.

    Attributes:
        left: `(m, r)` un-whitened left singular vectors `L^-T U`.
        s: `(r,)` singular values of `L^T W`, decreasing.
        vt: `(r, n)` right singular vectors.
    """

    left: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    def factors(self, rank: int, split: str = "balanced"):
        """The factors `(A, B)`, `A @ B` the best rank-`rank` approximation of `W`
        for the output error on the calibration inputs."""
        k = int(rank)
        return split_singular_values(self.left[:, :k], self.s[:k], self.vt[:k], split)

    def relative_error(self, rank: int) -> float:
        """`||X (W - A B)|| / ||X W||` at `rank` (with the damped statistics)."""
        sq = np.square(self.s.astype(np.float64))
        total = float(sq.sum())
        return math.sqrt(float(sq[int(rank) :].sum()) / total) if total > 0 else 0.0


def whitening_factor(scatter: np.ndarray, damping: float = 0.01) -> np.ndarray:
    """A square root `L` of `scatter + damping * mean(diag) * I` (`L L^T`).

    Cholesky when the damped matrix is well conditioned; else (rank-deficient
    statistics without damping: fewer calibration rows than features, dead
    features) a symmetric eigenvalue square root whose eigenvalues are
    floored at `damping * mean(diag)` and at `1e-10` of the largest, so the
    root is always invertible (SVD-LLM v2, COALA: no Cholesky failure).
    """
    if not is_real(damping) or damping < 0:
        raise invalid_value("damping", "a number >= 0", damping)
    scatter = np.asarray(scatter, dtype=np.float64)
    diag_mean = float(np.mean(np.diag(scatter)))
    reg = damping * diag_mean if diag_mean > 0 else 1.0
    damped = scatter + reg * np.eye(scatter.shape[0])
    try:
        root = scipy.linalg.cholesky(damped, lower=True, check_finite=False)
        pivots = np.square(np.diag(root))
        if pivots.min() > _RELATIVE_FLOOR * pivots.max():
            return root
    except np.linalg.LinAlgError:
        pass
    vals, vecs = scipy.linalg.eigh(damped, check_finite=False)
    floor = max(reg, _RELATIVE_FLOOR * max(float(vals.max()), 0.0))
    vals = np.clip(vals, floor if floor > 0 else 1.0, None)
    return vecs * np.sqrt(vals)[None, :]


# Eigenvalues of a whitening root below this fraction of the largest are raised to it.
_RELATIVE_FLOOR = 1e-10


def whitened_svd(
    kernel,
    statistics: ActivationStatistics | np.ndarray,
    *,
    damping: float = 0.01,
    center: bool = False,
) -> WhitenedSVD:
    """Activation-aware SVD of `kernel` (`m x n`) for inputs with `statistics`.

    Minimises `||X (W - A B)||_F` over rank-`k` products `A B` for every `k`
    at once: with `X^T X = L L^T`, `||X D||_F = ||L^T D||_F`, so the best
    rank-`k` `A B` is `L^-T` times the truncated SVD of `L^T W` (Eckart-Young
    in the whitened space).

    Args:
        kernel: the `(m, n)` weight matrix.
        statistics: an `ActivationStatistics` of the inputs, or directly an
            `(m, m)` positive semi-definite matrix `X^T X`.
        damping: added to the diagonal, as a fraction of its mean, so that
            directions the calibration data never visited keep a little weight
            (and the factor `L` is invertible).
        center: whiten by the centred scatter `(X - mean)^T (X - mean)`:
            the right objective when the bias is corrected afterwards by
            `corrected_bias` (the mean error then goes into the bias).

    Returns:
        A `WhitenedSVD`.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 16)) * np.linspace(0.1, 3, 16)
    >>> w = rng.normal(size=(16, 8))
    >>> stats = ActivationStatistics(16); stats.update(x)
    >>> a, b = whitened_svd(w, stats, damping=0.0).factors(2)
    >>> u, s, vt = np.linalg.svd(w, full_matrices=False)
    >>> plain = (u[:, :2] * s[:2]) @ vt[:2]
    >>> bool(np.linalg.norm(x @ (w - a @ b)) < np.linalg.norm(x @ (w - plain)))
    True
    """
    w = np.asarray(kernel, dtype=np.float64)
    if w.ndim != 2:
        raise invalid_value("kernel", "a 2-D matrix", f"an array of shape {w.shape}")
    if isinstance(statistics, ActivationStatistics):
        if statistics.count == 0:
            raise invalid_value("statistics", "statistics of at least one input row", "empty statistics")
        scatter = statistics.scatter(center=center)
    else:
        scatter = np.asarray(statistics, dtype=np.float64)
    if scatter.shape != (w.shape[0], w.shape[0]):
        raise invalid_value(
            "statistics", f"a ({w.shape[0]}, {w.shape[0]}) second moment", f"shape {scatter.shape}"
        )
    root = whitening_factor(scatter, damping)
    u, s, vt = scipy.linalg.svd(
        root.T @ w, full_matrices=False, check_finite=False, lapack_driver="gesvd"
    )
    # left = L^-T U, by a triangular (or general) solve rather than an inverse.
    if np.allclose(root, np.tril(root)):
        left = scipy.linalg.solve_triangular(root.T, u, lower=False, check_finite=False)
    else:
        left = np.linalg.solve(root.T, u)
    return WhitenedSVD(left, s, vt)


class TokenCounts:
    """How often each token id reached an embedding layer on calibration data.

    For an embedding, the inputs are one-hot rows, so `X^T X` is the diagonal
    of these counts: `frequency_weighted_svd` is `whitened_svd` for that case,
    without ever forming the `(vocabulary, vocabulary)` matrix.

    Args:
        vocabulary_size: the number of rows of the embedding table.

    Example:

    >>> counts = TokenCounts(5)
    >>> counts.update(np.array([[1, 1, 4], [0, 1, 9]]))  # 9 is out of range
    >>> counts.counts.tolist(), counts.count
    ([1.0, 3.0, 0.0, 0.0, 1.0], 5)
    """

    def __init__(self, vocabulary_size: int):
        self.counts = np.zeros((int(vocabulary_size),), dtype=np.float64)
        self.count = 0

    def update(self, ids) -> None:
        """Adds the ids of `ids` (any shape); ids outside the table are not
        counted (an `Embedding` would fail or clip on them)."""
        ids = np.asarray(ids).reshape(-1).astype(np.int64)
        ids = ids[(ids >= 0) & (ids < self.counts.size)]
        self.counts += np.bincount(ids, minlength=self.counts.size)
        self.count += int(ids.size)


def frequency_weighted_svd(table, counts: TokenCounts | np.ndarray, *, damping: float = 0.01):
    """Token-frequency-aware SVD of an embedding `table` (`vocabulary x dim`).

    Minimises `sum_i c_i ||E_i - (A B)_i||^2`, the squared error of the
    embedding's outputs over the calibration tokens (`c_i`: how often id `i`
    occurred), for every rank at once: the rows of `E` are scaled by
    `sqrt(c_i + damping * mean(c))`, the scaled table's SVD is truncated
    (Eckart-Young) and the scaling undone in `A`. The `damping` term is the
    one of `whitened_svd` (here `X^T X = diag(c)`): ids the calibration data
    never showed keep a little weight.

    Args:
        table: the `(vocabulary, dim)` embedding matrix.
        counts: a `TokenCounts`, or the `(vocabulary,)` counts.
        damping: added to every count, as a fraction of their mean.

    Returns:
        A `WhitenedSVD`.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> table = rng.normal(size=(50, 8))
    >>> counts = np.zeros(50); counts[:10] = 100.0  # ten frequent ids
    >>> a, b = frequency_weighted_svd(table, counts).factors(4)
    >>> u, s, vt = np.linalg.svd(table, full_matrices=False)
    >>> plain = (u[:, :4] * s[:4]) @ vt[:4]
    >>> def weighted(approx):
    ...     return float(np.sum(counts[:, None] * (table - approx) ** 2))
    >>> bool(weighted(a @ b) < weighted(plain))
    True
    """
    e = np.asarray(table, dtype=np.float64)
    if e.ndim != 2:
        raise invalid_value("table", "a 2-D matrix", f"an array of shape {e.shape}")
    c = np.asarray(counts.counts if isinstance(counts, TokenCounts) else counts, np.float64)
    if c.shape != (e.shape[0],) or not np.all(c >= 0):
        raise invalid_value(
            "counts", f"{e.shape[0]} counts >= 0 (one per row of the table)", f"shape {c.shape}"
        )
    if not is_real(damping) or damping < 0:
        raise invalid_value("damping", "a number >= 0", damping)
    mean = float(c.mean())
    weights = np.sqrt(c + (damping * mean if mean > 0 else 1.0))
    weights = np.maximum(weights, _RELATIVE_FLOOR * float(weights.max()))
    u, s, vt = scipy.linalg.svd(
        e * weights[:, None], full_matrices=False, check_finite=False, lapack_driver="gesdd"
    )
    return WhitenedSVD(u / weights[:, None], s, vt)


def weighted_relative_error(counts: TokenCounts, table, approx_table) -> float:
    """`sqrt(sum_i c_i ||E_i - E'_i||^2 / sum_i c_i ||E_i||^2)`: an embedding's
    relative output error over the calibration tokens."""
    c = counts.counts
    e = np.asarray(table, np.float64)
    denominator = float(c @ np.sum(e * e, axis=1))
    if denominator <= 0:
        return 0.0
    delta = e - np.asarray(approx_table, np.float64)
    return math.sqrt(float(c @ np.sum(delta * delta, axis=1)) / denominator)


def _solve_root(root, rhs, transpose=False):
    """`L^-1 rhs` (or `L^-T rhs`), by a triangular solve when `L` is lower triangular."""
    matrix = root.T if transpose else root
    if np.allclose(root, np.tril(root)):
        return scipy.linalg.solve_triangular(matrix, rhs, lower=not transpose, check_finite=False)
    return np.linalg.solve(matrix, rhs)


def fitted_factors(
    kernel,
    input_gram,
    cross,
    rank: int,
    *,
    damping: float = 0.01,
    split: str = "balanced",
    residual_cross=None,
):
    """Rank-`rank` factors fitted to the inputs a compressed model really feeds.

    The layer saw inputs `X` in the original model, where it computed `X W`;
    in the compressed model (earlier layers already factorized) it sees `X'`.
    This finds the rank-`k` product `A B` minimising `||X' A B - X W||_F`,
    in closed form: with `X'^T X' = L L^T`, the best product is
    `L^-T [L^-1 X'^T X W]_k` (`[.]_k` the truncated SVD); the damping adds
    `reg ||A B - W||^2` to the objective, as in `whitened_svd`. Later layers thus
    correct the errors of earlier ones (the sequential update of SVD-LLM and
    Dobi-SVD). With `X' = X` it is `whitened_svd`'s optimum.

    When the layer's output is added to a residual stream (`X W + R`, as the
    attention output and the second feed-forward projection of a Transformer
    block), the compressed model's residual `R'` differs from the original's
    `R`; with `residual_cross = X'^T (R - R')` the factors also absorb the
    part of that difference they can predict from `X'`: they minimise
    `||X' A B + R' - (X W + R)||_F`.

    Args:
        kernel: the original `(m, n)` weight `W`.
        input_gram: `X'^T X'`, `(m, m)`.
        cross: `X'^T X`, `(m, m)`.
        rank: the rank `k`.
        damping: `reg` as a fraction of the mean of the diagonal of `X'^T X'`.
        split: how the singular values are shared between `A` and `B`.
        residual_cross: optional `X'^T (R - R')`, `(m, n)`.

    Returns:
        `(A, B)`, `(m, k)` and `(k, n)`.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(400, 12))
    >>> x_student = x + 0.3 * rng.normal(size=x.shape)   # what the layer now sees
    >>> w = rng.normal(size=(12, 6))
    >>> a, b = fitted_factors(w, x_student.T @ x_student, x_student.T @ x, 3, damping=0)
    >>> a0, b0 = whitened_svd(w, x.T @ x, damping=0).factors(3)
    >>> fitted = np.linalg.norm(x_student @ a @ b - x @ w)
    >>> bool(fitted < np.linalg.norm(x_student @ a0 @ b0 - x @ w))
    True
    """
    w = np.asarray(kernel, dtype=np.float64)
    if w.ndim != 2:
        raise invalid_value("kernel", "a 2-D matrix", f"an array of shape {w.shape}")
    m = w.shape[0]
    for name, value in (("input_gram", input_gram), ("cross", cross)):
        if np.shape(value) != (m, m):
            raise invalid_value(name, f"a ({m}, {m}) matrix", f"shape {np.shape(value)}")
    k = int(rank)
    if not 1 <= k <= min(w.shape):
        raise invalid_value("rank", f"an integer in [1, {min(w.shape)}]", rank)
    gram = np.asarray(input_gram, np.float64)
    root = whitening_factor(gram, damping)
    # The damping pulls the product towards `W` (not towards 0, as a ridge
    # would): `+ reg ||A B - W||^2`, the same regularisation as `whitened_svd`.
    diag_mean = float(np.mean(np.diag(gram)))
    reg = damping * diag_mean if diag_mean > 0 else 1.0
    product = (np.asarray(cross, np.float64) + reg * np.eye(m)) @ w
    if residual_cross is not None:
        if np.shape(residual_cross) != w.shape:
            raise invalid_value(
                "residual_cross", f"a {w.shape} matrix", f"shape {np.shape(residual_cross)}"
            )
        product = product + np.asarray(residual_cross, np.float64)
    target = _solve_root(root, product)
    u, s, vt = scipy.linalg.svd(
        target, full_matrices=False, check_finite=False, lapack_driver="gesvd"
    )
    left = _solve_root(root, u[:, :k], transpose=True)
    return split_singular_values(left, s[:k], vt[:k], split)


def fit_objective(product, input_gram, target_cross) -> float:
    """`||X' P - Y||_F^2 - ||Y||_F^2` for the product `P = A B`, from
    `X'^T X'` and `X'^T Y`: which of two products fits `Y` better, exactly,
    without the activations.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 3))
    >>> p = rng.normal(size=(4, 3))
    >>> exact = np.sum((x @ p - y) ** 2) - np.sum(y ** 2)
    >>> bool(np.isclose(fit_objective(p, x.T @ x, x.T @ y), exact))
    True
    """
    p = np.asarray(product, np.float64)
    gram = np.asarray(input_gram, np.float64)
    return float(np.sum(p * (gram @ p)) - 2.0 * np.sum(p * np.asarray(target_cross, np.float64)))


def corrected_bias(statistics: ActivationStatistics, kernel, approx_kernel, bias=None):
    """The bias that best absorbs the mean output error of `approx_kernel`:
    `b + mean(X) (W - W')`."""
    delta = np.asarray(kernel, np.float64) - np.asarray(approx_kernel, np.float64)
    shift = statistics.mean @ delta
    return shift if bias is None else np.asarray(bias, np.float64) + shift


def relative_output_error(
    statistics: ActivationStatistics, kernel, approx_kernel, bias=None, approx_bias=None
) -> float:
    """`||X W' + b' - (X W + b)||_F / ||X W + b||_F` over the calibration rows,
    computed exactly from the statistics (no activations kept)."""
    g, total, n = statistics.gram, statistics.sum, statistics.count
    w = np.asarray(kernel, np.float64)
    delta = w - np.asarray(approx_kernel, np.float64)
    b = np.zeros(w.shape[1]) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    b2 = b if approx_bias is None else np.asarray(approx_bias, np.float64).reshape(-1)
    db = b - b2

    def sq_norm(m, v):
        return float(np.sum(m * (g @ m)) + 2.0 * (total @ m) @ v + n * (v @ v))

    denominator = sq_norm(w, b)
    if denominator <= 0:
        return 0.0
    return math.sqrt(max(0.0, sq_norm(delta, db)) / denominator)


def allocate_ranks(
    gains: Sequence[np.ndarray],
    costs: Sequence[int],
    budget: float,
    *,
    min_rank: int = 1,
    max_ranks: Sequence[int] | None = None,
    whole_costs: Sequence[int | None] | None = None,
) -> list[int | None]:
    """Spends a parameter budget over matrices, one rank at a time, greedily.

    Each matrix `i` costs `costs[i]` parameters per unit of rank (`m + n`) and
    its error falls by `gains[i][k]` when its rank grows from `k` to `k + 1`
    (for an SVD, `gains[i] = s_i ** 2`, decreasing). Starting from `min_rank`
    everywhere, it repeatedly adds the rank with the largest error reduction per
    parameter that still fits the budget. With decreasing gains this greedy
    choice is optimal up to the last, partly-fitting step (a fractional
    knapsack over concave error curves).

    With `whole_costs`, a matrix that reaches its largest rank may also be
    kept whole (unfactorized, no error) for `whole_costs[i]` parameters in
    all: its whole remaining error goes for the few parameters between its
    largest useful rank and the dense matrix, taken as soon as it fits.

    Args:
        gains: per matrix, the error reductions of ranks 1, 2, ... (decreasing).
        costs: per matrix, parameters per unit of rank.
        budget: total parameters allowed for all factors.
        min_rank: the rank every matrix gets first.
        max_ranks: per matrix, the largest rank allowed (default `len(gains[i])`).
        whole_costs: per matrix, the parameters of keeping it whole, or
            `None` (default: no matrix may be kept whole).

    Returns:
        The list of ranks (`None` for a matrix kept whole).

    Example:

    >>> allocate_ranks([np.array([9.0, 4.0, 1.0]), np.array([5.0, 0.1, 0.0])],
    ...                costs=[10, 10], budget=50)
    [3, 2]
    """
    n = len(gains)
    if len(costs) != n:
        raise invalid_value("costs", f"a sequence of {n} costs (one per matrix)", list(costs))
    max_ranks = [len(g) for g in gains] if max_ranks is None else list(max_ranks)
    ranks = [min(min_rank, mr) for mr in max_ranks]
    spent = float(sum(c * r for c, r in zip(costs, ranks)))
    if spent > budget:
        raise invalid_value(
            "budget",
            f"at least {int(spent)} parameters (rank {min_rank} everywhere)",
            budget,
        )
    candidates = []
    for i, (g, c) in enumerate(zip(gains, costs)):
        g = np.asarray(g, dtype=np.float64)
        for k in range(ranks[i], min(max_ranks[i], len(g))):
            candidates.append((-g[k] / c, i, k))
    candidates.sort()
    whole_costs = [None] * n if whole_costs is None else list(whole_costs)
    closed = [False] * n
    whole = [False] * n

    def keep_whole_if_it_fits(i):
        nonlocal spent
        extra = None if whole_costs[i] is None else whole_costs[i] - costs[i] * ranks[i]
        if ranks[i] >= max_ranks[i] and extra is not None and spent + extra <= budget:
            whole[i], closed[i] = True, True
            spent += extra

    for i in range(n):
        keep_whole_if_it_fits(i)
    for _, i, k in candidates:
        if closed[i] or k != ranks[i]:
            continue
        if spent + costs[i] > budget:
            closed[i] = True
            continue
        ranks[i] += 1
        spent += costs[i]
        keep_whole_if_it_fits(i)
    return [None if w else r for r, w in zip(ranks, whole)]
