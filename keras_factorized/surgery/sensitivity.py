"""How much each layer's truncation error moves the model's outputs.

The greedy allocation of `ranks` compares layers by their own relative
error; a layer whose error the residual stream and the later layers amplify
(or damp) is mis-priced. Here each target is truncated alone, at the rank a
uniform ratio would give it, on a few calibration samples, and the error this
causes at the model's outputs is divided by the layer's own output error
energy (the tail of its whitened spectrum). The result, a gain per layer,
turns each layer's spectrum into an estimate of the output error per rank
(`ranks.greedy_ranks(weights=...)`).

Cost: one run of the model on the samples per target, plus one for the
reference outputs.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from keras_factorized.surgery import decompose
from keras_factorized.surgery import ranks
from keras_factorized.surgery.calibration import batches
from keras_factorized.surgery.calibration import to_numpy


def first_rows(data, n, batch_size):
    """The first batches of `data` holding `n` rows in all (fewer when it is short)."""
    taken, count = [], 0
    for batch in batches(data, batch_size):
        rows = len(keras.tree.flatten(batch)[0])
        if count + rows > n:
            rows = n - count
            batch = keras.tree.map_structure(lambda a, r=rows: a[:r], batch)
        taken.append(batch)
        count += rows
        if count >= n:
            break
    return taken


@contextlib.contextmanager
def delegating(layer, replacement):
    """Within the block, calls of `layer` compute `replacement` instead."""

    def call(inputs, *args, **kwargs):
        return replacement(inputs)

    layer.call = call
    try:
        yield
    finally:
        del layer.call


def _outputs(model, batch):
    return [
        to_numpy(y).astype(np.float64) for y in keras.tree.flatten(model(batch, training=False))
    ]


def output_gains(model, targets, data, batch_size, param_ratio, split, whitening, samples=16):
    """Per target, `||outputs error||^2 / ||layer output error||^2` at the
    uniform-ratio rank, measured on the first `samples` rows of `data`.

    Args:
        model: the original model (its layers are patched, then restored).
        targets: the `selection.Target`s, with their spectra.
        data: calibration data.
        batch_size: batch size for array data.
        param_ratio: the uniform ratio that sets each layer's probe rank.
        split: how singular values are shared between `A` and `B`.
        whitening: a `WhitenedConfig`.
        samples: how many rows of `data` to run.

    Returns:
        The list of gains (0 for targets whose probe removes no error).
    """
    data_batches = first_rows(data, samples, batch_size)
    reference = [_outputs(model, batch) for batch in data_batches]
    gains = []
    for t in targets:
        probe = min(ranks.uniform_rank(t, param_ratio), min(t.shape))
        sq = np.square(np.asarray(t.spectrum.s, np.float64))
        tail = float(sq[probe:].sum())
        if tail <= 0:
            gains.append(0.0)
            continue
        saved_rank, t.rank = t.rank, probe
        try:
            a, b, bias = decompose.factors(t, split, whitening)
        finally:
            t.rank = saved_rank
        replacement = t.rule.build(t.original, a, b, bias)
        error = 0.0
        with delegating(t.original, replacement):
            for batch, expected in zip(data_batches, reference):
                for y, y0 in zip(_outputs(model, batch), expected):
                    error += float(np.sum(np.square(y - y0)))
        gains.append(error / tail)
    return gains
