"""Per-layer decomposition: each target's spectrum and its factors at a rank.

`"svd"` decomposes the weight matrix; `"whitened"` (and the start of
`"learned"`) decomposes it as seen through the layer's calibration inputs
(`data_aware.whitened_svd`; for an embedding, its rows weighted by how often
the calibration data used each id, `data_aware.frequency_weighted_svd`). The factors of a target at its chosen rank, and
the bias that goes with them, come from the same spectrum.
"""

from __future__ import annotations

import numpy as np

from keras_factorized import data_aware
from keras_factorized.decomposition import split_singular_values
from keras_factorized.decomposition import truncated_svd


def corrects_bias(target, whitening) -> bool:
    """Whether `target`'s bias absorbs the mean output error (see `WhitenedConfig`)."""
    return bool(
        whitening.bias_correction
        and target.bias is not None
        and target.bias.size == target.shape[1]
    )


def spectrum(target, method, whitening):
    """The `WhitenedSVD` of `target` (with statistics, not `"svd"`: its inputs'
    `X^T X`, or an embedding's token counts), else its SVD."""
    if method != "svd" and target.stats is not None:
        # With a bias to absorb the mean error, only the centred part of the
        # inputs needs the rank.
        return data_aware.whitened_svd(
            target.matrix,
            target.stats,
            damping=whitening.damping,
            center=corrects_bias(target, whitening),
        )
    if method != "svd" and target.token_counts is not None:
        return data_aware.frequency_weighted_svd(
            target.matrix, target.token_counts, damping=whitening.damping
        )
    return truncated_svd(target.matrix, min(target.shape), method="lapack")


def is_whitened(target) -> bool:
    return isinstance(target.spectrum, data_aware.WhitenedSVD)


def factors(target, split, whitening):
    """`(a, b, bias)`: the factors of `target` at `target.rank` and its bias."""
    s = target.spectrum
    if is_whitened(target):
        a, b = s.factors(target.rank, split)
    else:
        k = target.rank
        a, b = split_singular_values(s.u[:, :k], s.s[:k], s.vt[:k], split)
    bias = target.bias
    if is_whitened(target) and corrects_bias(target, whitening):
        approx = a.astype(np.float64) @ b.astype(np.float64)
        bias = (
            data_aware.corrected_bias(target.stats, target.matrix, approx, target.bias.reshape(-1))
            .reshape(target.bias.shape)
            .astype(target.bias.dtype)
        )
    return a, b, bias
