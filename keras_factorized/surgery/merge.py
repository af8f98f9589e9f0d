"""`merge`: the inverse of `factorize`, every factorized layer back to a dense one."""

from __future__ import annotations

import keras

from keras_factorized import _keras_compat
from keras_factorized import registry
from keras_factorized.surgery import copying
from keras_factorized.surgery import replace
from keras_factorized.surgery import saving
from keras_factorized.surgery import walk
from keras_factorized.validation import invalid_value


def merge(model: keras.Model) -> keras.Model:
    """A copy of `model` with every factorized layer merged into a dense one.

    The inverse of `factorize`: each `LowRankDense`, `LowRankEinsumDense` and
    `FactorizedEmbedding` (at any depth, including the attention projections
    of a KerasHub `TransformerEncoder`) becomes the `Dense`, `EinsumDense` or
    `Embedding` with the merged weight `A @ B`, the same name and the same
    outputs. Use it to serve a model where one large matrix product is faster
    than two small ones. The original model is left untouched; a KerasHub
    backbone stays an instance of its class.

    Args:
        model: a built Keras model (Sequential, functional, or a registered
            subclass with a complete `get_config`).

    Returns:
        The merged copy of `model` (a copy even when nothing was factorized).

    Example:

    >>> import keras, numpy as np
    >>> from keras_factorized.surgery import factorize
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16)])
    >>> small = factorize(model, rank=4)
    >>> dense = merge(small)
    >>> type(dense.layers[0]).__name__
    'Dense'
    >>> x = np.ones((2, 16), "float32")
    >>> bool(np.allclose(dense(x), small(x), atol=1e-5))
    True
    """
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise invalid_value("model", "a built Keras model (call it once or build it)", model)
    copy = copying.copy_model(model)
    replacements = {}
    for parent, step, layer, path in walk.walk(copy):
        if not registry.is_factorized(layer):
            continue
        if step[0] == "layer" and not _keras_compat.is_plain_graph_model(parent):
            raise invalid_value(
                "model",
                "a model whose factorized layers can be replaced (this "
                f"layer is in the graph of a {type(parent).__name__}, which builds "
                "its graph itself)",
                layer.path,
            )
        replacements[path] = layer.merge()
    merged, _ = replace.apply_replacements(copy, replacements, record=False)
    # The merged layers are what their parents build from their own configs:
    # the plan no longer needs to restore them.
    saving.drop_plan_entries(merged, [p for p in replacements if p[-1][0] != "layer"])
    return merged
