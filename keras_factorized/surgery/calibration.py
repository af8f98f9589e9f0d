"""Activation statistics of chosen layers, collected while a model runs.

`recording_inputs` patches the `call` of each layer so that it adds its
inputs to an `ActivationStatistics` (`X^T X`, sum, count) before running,
and always restores the original `call`, even when the model raises (the
shape of Keras's `gptq_core.stream_hessians`). `collect_statistics` runs a
model over calibration data inside it.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from keras_factorized import data_aware
from keras_factorized.validation import invalid_value


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


class Batched(list):
    """Model inputs already in batches: `batches` yields them as they are
    (`batch_size` does not apply; a tuple batch is one multi-input batch,
    not `(x, y)`)."""


def is_batched(data) -> bool:
    """Whether `data` comes in batches of its own (a `tf.data.Dataset` or
    `Batched`) rather than as arrays that `batches` cuts."""
    return isinstance(data, Batched) or hasattr(data, "as_numpy_iterator")


def batches(data, batch_size, name="calibration_data"):
    """Model inputs, batch by batch, from an array, a dict/list of arrays, a
    `tf.data.Dataset` (of `x` or `(x, y[, sample_weight])`) or `Batched`.

    Example:

    >>> x = np.arange(10.0).reshape(5, 2)
    >>> [b.shape for b in batches(x, 2)]
    [(2, 2), (2, 2), (1, 2)]
    >>> len(list(batches(Batched([(x, x)]), 2))[0])
    2
    """
    if data is None:
        return
    if isinstance(data, Batched):
        yield from data
        return
    if hasattr(data, "as_numpy_iterator"):
        for element in data.as_numpy_iterator():
            if isinstance(element, tuple) and len(element) in (2, 3):
                element = element[0]
            yield element
        return
    if isinstance(data, (list, tuple)) and data and hasattr(data[0], "as_numpy_iterator"):
        raise invalid_value(name, "one dataset, array or dict", type(data))
    flat = keras.tree.flatten(data)
    if not flat:
        raise invalid_value(name, "a non-empty array, dict of arrays or tf.data.Dataset", data)
    n = len(flat[0])
    for start in range(0, n, batch_size):
        yield keras.tree.map_structure(lambda a, s=start: a[s : s + batch_size], data)


@contextlib.contextmanager
def wrapped_calls(layers_and_wrappers):
    """Within the block, each `layer.call` is `wrap(original_call)`, for each
    `(layer, wrap)`; every original `call` is restored afterwards, even when
    the block raises."""
    patched = []
    try:
        for layer, wrap in layers_and_wrappers:
            layer.call = wrap(layer.call)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.call


@contextlib.contextmanager
def recording_inputs(layers_and_statistics, input_rows):
    """Within the block, each layer adds its inputs to its statistics.

    Args:
        layers_and_statistics: `(layer, statistics, key)` triples; layers
            with equal `key` that receive the same input tensor (Q, K and V of
            one attention layer) share one computation of `X^T X`.
        input_rows: `(key, x) -> rows`, the inputs as rows of features.

    Yields:
        A function to call before each batch (it clears the shared cache).
    """
    cache = {}

    def recorder(statistics, key):
        def wrap(original_call):
            def call(inputs, *args, **kwargs):
                cache_key = (id(inputs), key)
                if cache_key not in cache or cache[cache_key][0] is not inputs:
                    rows = input_rows(key, to_numpy(inputs)).astype(np.float32)
                    # `inputs` is kept so that its id is not reused by a later
                    # tensor of the batch (it was: wrong, history-dependent
                    # statistics for attention outputs on JAX).
                    cache[cache_key] = (
                        inputs, rows.T @ rows, rows.sum(0, dtype=np.float64), rows.shape[0]
                    )
                _, gram, total, count = cache[cache_key]
                statistics.gram += gram
                statistics.sum += total
                statistics.count += count
                return original_call(inputs, *args, **kwargs)

            return call

        return wrap

    wrappers = [(layer, recorder(stats, key)) for layer, stats, key in layers_and_statistics]
    try:
        with wrapped_calls(wrappers):
            yield cache.clear
    finally:
        cache.clear()


def recording_ids(layers_and_counts):
    """Within the block, each embedding layer adds the ids it looks up to its
    `TokenCounts`; every original `call` is restored afterwards."""

    def counter(counts):
        def wrap(original_call):
            def call(inputs, *args, **kwargs):
                counts.update(to_numpy(inputs))
                return original_call(inputs, *args, **kwargs)

            return call

        return wrap

    return wrapped_calls([(layer, counter(counts)) for layer, counts in layers_and_counts])


def collect_statistics(model, targets, data, batch_size):
    """Sets `target.stats` of every target from the inputs its layer (in the
    original `model`) sees when `model` runs on `data`: `X^T X` and the mean
    for a projection, the `TokenCounts` of the ids for an embedding."""
    entries, by_key, id_entries = [], {}, []
    for t in targets:
        if t.kind == "embedding":
            t.token_counts = data_aware.TokenCounts(t.shape[0])
            id_entries.append((t.original, t.token_counts))
            continue
        t.stats = data_aware.ActivationStatistics(t.shape[0])
        key = (t.shape[0], t.factorization.equation if t.factorization else None)
        by_key[key] = t
        entries.append((t.original, t.stats, key))
    seen = 0
    recording = recording_inputs(entries, lambda key, x: by_key[key].input_rows(x))
    with recording as next_batch, recording_ids(id_entries):
        for batch in batches(data, batch_size):
            next_batch()
            model(batch, training=False)
            seen += 1
    if seen == 0:
        raise invalid_value("calibration_data", "at least one batch", data)
