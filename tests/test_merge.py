"""`merge`: the inverse of `factorize`, on every kind of model it walks."""

import os

import keras
import numpy as np
import pytest
from tiny_models import Block
from tiny_models import bert_inputs
from tiny_models import tiny_bert

from keras_factorized import FactorizedEmbedding
from keras_factorized import LowRankDense
from keras_factorized import LowRankEinsumDense
from keras_factorized import registry
from keras_factorized.surgery import factorize
from keras_factorized.surgery import merge
from keras_factorized.surgery import walk_layers


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _factorized_layers(model):
    return [path for path, layer in walk_layers(model) if registry.is_factorized(layer)]


def _factor_variables(model):
    return [
        v.path
        for v in model.weights
        if "kernel_a" in v.path
        or "kernel_b" in v.path
        or "embeddings_a" in v.path
        or "embeddings_b" in v.path
    ]


def _check_merge(small, x, output=lambda y: y):
    weights = [np.array(w) for w in small.get_weights()]
    merged = merge(small)
    assert _factorized_layers(merged) == []
    assert _factor_variables(merged) == []
    np.testing.assert_allclose(_np(output(merged(x))), _np(output(small(x))), atol=1e-4)
    # The factorized model is untouched.
    assert _factorized_layers(small)
    for a, b in zip(weights, small.get_weights()):
        np.testing.assert_array_equal(a, b)
    return merged


def test_merge_sequential_gives_dense_layers_with_the_same_outputs():
    model = keras.Sequential(
        [keras.Input((24,)), keras.layers.Dense(32, name="d1"), keras.layers.Dense(16, name="d2")]
    )
    small = factorize(model, rank=4)
    x = np.random.default_rng(0).normal(size=(8, 24)).astype("float32")
    merged = _check_merge(small, x)
    assert [type(layer) for layer in merged.layers] == [keras.layers.Dense] * 2
    assert [layer.name for layer in merged.layers] == ["d1", "d2"]


def test_merge_functional_with_embedding():
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(50, 16, name="emb")(inputs)
    outputs = keras.layers.Dense(8, name="dense")(h)
    small = factorize(keras.Model(inputs, outputs), rank=4)
    assert isinstance(small.get_layer("emb"), FactorizedEmbedding)
    x = np.random.default_rng(0).integers(0, 50, size=(4, 6))
    merged = _check_merge(small, x)
    assert type(merged.get_layer("emb")) is keras.layers.Embedding
    assert type(merged.get_layer("dense")) is keras.layers.Dense


def test_merge_nested_model_and_layer_holding_layers(tmp_path):
    inner = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16, name="inner_d")], name="inner"
    )
    inputs = keras.Input((16,))
    outputs = inner(Block(16, name="block")(inputs))
    small = factorize(keras.Model(inputs, outputs), rank=3)
    assert isinstance(small.get_layer("block").project, LowRankEinsumDense)
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    merged = _check_merge(small, x)
    block = merged.get_layer("block")
    assert type(block.inner) is keras.layers.Dense
    assert type(block.project) is keras.layers.EinsumDense
    assert type(merged.get_layer("inner").layers[0]) is keras.layers.Dense
    path = os.path.join(tmp_path, "merged.keras")
    merged.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("block").project) is keras.layers.EinsumDense
    np.testing.assert_allclose(_np(loaded(x)), _np(merged(x)), atol=1e-6)


def test_merge_of_an_unfactorized_model_is_a_copy():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    merged = merge(model)
    assert merged is not model
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(_np(merged(x)), _np(model(x)))


def test_merge_keras_hub_bert_backbone(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    bert = tiny_bert()
    x = bert_inputs(4)
    small = factorize(bert, rank=8)
    attention = small.get_layer("transformer_layer_0")._self_attention_layer
    assert isinstance(attention._query_dense, LowRankEinsumDense)
    assert isinstance(
        small.get_layer("transformer_layer_0")._feedforward_output_dense, LowRankDense
    )
    merged = _check_merge(small, x, output=lambda y: y["sequence_output"])
    assert type(merged) is keras_hub.models.BertBackbone
    assert merged.count_params() == bert.count_params()
    attention = merged.get_layer("transformer_layer_1")._self_attention_layer
    assert type(attention._value_dense) is keras.layers.EinsumDense
    path = os.path.join(tmp_path, "merged_bert.keras")
    merged.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is keras_hub.models.BertBackbone
    np.testing.assert_allclose(
        _np(loaded(x)["sequence_output"]), _np(merged(x)["sequence_output"]), atol=1e-6
    )


@pytest.mark.parametrize("model", [None, "model", 3])
def test_merge_rejects_what_is_not_a_built_model(model):
    with pytest.raises(ValueError, match="`model`"):
        merge(model)
