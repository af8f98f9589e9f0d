"""A deep copy of a model (config, weights and assets) that surgery may edit."""

from __future__ import annotations

import os
import tempfile

import keras

from keras_factorized.surgery import walk
from keras_factorized.validation import invalid_value


def copy_model(model):
    """A deep copy of `model` (config, weights and assets); `model` is not touched."""
    config = keras.saving.serialize_keras_object(model)
    copy = keras.saving.deserialize_keras_object(config)
    weights = model.get_weights()
    copy_weights = copy.weights
    if len(weights) != len(copy_weights) or any(
        tuple(w.shape) != tuple(v.shape) for w, v in zip(weights, copy_weights)
    ):
        raise invalid_value(
            "model",
            "a model that can be rebuilt from its config with the same "
            "weights (a registered class with a complete `get_config`)",
            model.name,
        )
    copy.set_weights(weights)
    copy_assets(model, copy)
    return copy


def copy_assets(model, copy) -> None:
    """Copies the state weights do not hold (tokenizer vocabularies, lookup tables).

    The same `save_assets`/`load_assets` pair the `.keras` format uses; without
    it a copied lookup table is empty ("Table not initialized"). Layers are
    paired by their path from the root (attribute and layer names, as the
    `.keras` format pairs them), not by their position in Keras's list of
    sub-layers: a layer that has been called may have created sub-layers its
    fresh copy lacks (a KerasHub preprocessor builds its packer on first use),
    which shifts every position after it.
    """
    targets = {path: layer for _, _, layer, path in walk.walk(copy)}
    targets[()] = copy
    sources = [((), model)] + [(path, layer) for _, _, layer, path in walk.walk(model)]
    for path, source in sources:
        target = targets.get(path)
        if target is None or type(source) is not type(target):
            continue
        if not hasattr(source, "save_assets"):
            continue
        with tempfile.TemporaryDirectory() as folder:
            source.save_assets(folder)
            if os.listdir(folder):
                target.load_assets(folder)
