"""Tiny offline models shared by the tests.

A randomly initialised KerasHub BERT (the shape every surgery test uses), its
inputs, the same BERT saved as a preset folder with a word vocabulary (for the
examples and benchmarks that load presets), and a subclassed layer holding
layers (as a Transformer block does).
"""

import keras
import numpy as np
import pytest

# A review-like vocabulary for presets fed raw strings.
WORDS = "a the film movie plot story acting good bad great was is it this and of to".split()
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert(vocabulary_size=100, num_layers=2, max_sequence_length=16, seed=None,
              hidden_dim=32, intermediate_dim=64):
    """A random `BertBackbone` with 2 heads; `seed` (if given) seeds Keras first."""
    keras_hub = pytest.importorskip("keras_hub")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        max_sequence_length=max_sequence_length,
    )


def bert_inputs(rows, length=16, seed=0, vocabulary_size=100, padded=0):
    """Random token ids for `tiny_bert`; the last `padded` positions of every
    row are masked out."""
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, length), "int32")
    if padded:
        mask[:, length - padded :] = 0
    return {
        "token_ids": rng.integers(1, vocabulary_size, size=(rows, length)).astype("int32"),
        "segment_ids": np.zeros((rows, length), "int32"),
        "padding_mask": mask,
    }


def save_tiny_preset(folder, max_sequence_length=16, words=WORDS, **bert_kwargs):
    """A `tiny_bert` and its WordPiece tokenizer saved as a KerasHub preset in `folder`."""
    keras_hub = pytest.importorskip("keras_hub")
    vocabulary = SPECIAL_TOKENS + list(words)
    backbone = tiny_bert(len(vocabulary), max_sequence_length=max_sequence_length, **bert_kwargs)
    backbone.save_to_preset(str(folder))
    keras_hub.models.BertTokenizer(vocabulary=vocabulary).save_to_preset(str(folder))
    return str(folder)


@keras.saving.register_keras_serializable(package="keras_factorized_tests")
class Block(keras.layers.Layer):
    """A subclassed layer holding a Dense and an EinsumDense, with a residual."""

    def __init__(self, units=16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="relu")
        self.project = keras.layers.EinsumDense("ab,bc->ac", units, bias_axes="c")

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.project.build((None, self.units))

    def call(self, x):
        return self.project(self.inner(x)) + x

    def get_config(self):
        return {**super().get_config(), "units": self.units}
