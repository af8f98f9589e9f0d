"""The registry: which layers are factorized, into what, and why others are kept."""

import keras
import numpy as np
import pytest

from keras_factorized import registry
from keras_factorized.layers import FactorizedEmbedding
from keras_factorized.layers import LowRankDense
from keras_factorized.layers import LowRankEinsumDense


def _built(layer, shape):
    layer.build(shape)
    return layer


@pytest.mark.parametrize(
    "layer, shape, target",
    [
        (keras.layers.Dense(4), (None, 8), LowRankDense),
        (keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3)), (None, 5, 8), LowRankEinsumDense),
        (keras.layers.Embedding(30, 8), None, FactorizedEmbedding),
    ],
)
def test_exact_classes_have_a_rule_that_round_trips(layer, shape, target):
    layer = _built(layer, shape)
    decision = registry.lookup(layer)
    assert decision.factorizable and decision.reason is None
    assert decision.rule.target is target
    matrix = decision.rule.matrix(layer)
    m, n = matrix.shape
    k = min(m, n)
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    new = decision.rule.build(layer, u[:, :k] * s[:k], vt[:k], decision.rule.bias(layer))
    assert type(new) is target and new.name == layer.name
    a, b = new.factors()
    np.testing.assert_allclose(a @ b, matrix, atol=1e-5)
    merged = new.merge()
    assert type(merged) is type(layer)
    np.testing.assert_allclose(decision.rule.matrix(merged), matrix, atol=1e-5)


def test_reversible_embedding_is_kept_with_a_reason():
    keras_hub = pytest.importorskip("keras_hub")
    layer = keras_hub.layers.ReversibleEmbedding(30, 8)
    layer.build((None, 4))
    decision = registry.lookup(layer)
    assert decision.rule is None
    assert "ReversibleEmbedding" in decision.reason and decision.reason.startswith("kept")


def test_unknown_subclass_is_kept_until_registered():
    class MyDense(keras.layers.Dense):
        pass

    layer = _built(MyDense(3), (None, 6))
    assert registry.lookup(layer).rule is None
    assert "register_factorization" in registry.lookup(layer).reason
    rule = registry.register_factorization(MyDense, LowRankDense)
    try:
        assert registry.lookup(layer).rule is rule and rule.kind == "dense"
    finally:
        registry.unregister_factorization(MyDense)
    assert registry.lookup(layer).rule is None


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: keras.layers.Dense(3), "not built"),
        (lambda: LowRankDense(3, rank=2), "already factorized"),
        (lambda: _built(keras.layers.EinsumDense("abc,acd->abd", (None, 4)), (3, 5, 6)),
         "batch of matrices"),
    ],
)
def test_kept_layers_say_why(make, reason):
    decision = registry.lookup(make())
    assert decision.rule is None and reason in decision.reason


def test_layers_without_a_matrix_have_no_reason():
    assert registry.lookup(keras.layers.ReLU()) == registry.Decision(None, None)


@pytest.mark.parametrize(
    "source, target, error",
    [
        ("Dense", LowRankDense, TypeError),
        (keras.layers.Dense, keras.layers.Dense, TypeError),
        (keras.layers.Embedding, LowRankDense, ValueError),
    ],
)
def test_register_rejects_bad_arguments(source, target, error):
    with pytest.raises(error, match="Received an invalid value for `(source|target)`"):
        registry.register_factorization(source, target)
