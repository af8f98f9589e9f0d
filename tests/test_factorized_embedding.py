import os

import keras
import numpy as np
import pytest

from keras_factorized import FactorizedEmbedding
from keras_factorized import truncated_svd
from keras_factorized._keras_compat import testing_test_case


class FactorizedEmbeddingLayerTest(testing_test_case()):
    """Keras's own layer checks: config round trip, build, training, dtypes."""

    def test_run_layer_test(self):
        self.run_layer_test(
            FactorizedEmbedding,
            init_kwargs={"input_dim": 10, "output_dim": 6, "rank": 2},
            input_data=np.array([[1, 2, 3], [4, 5, 0]], dtype="int32"),
            expected_output_shape=(2, 3, 6),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
            supports_masking=False,
        )

    def test_run_layer_test_masked_and_frozen_a(self):
        self.run_layer_test(
            FactorizedEmbedding,
            init_kwargs={
                "input_dim": 10,
                "output_dim": 6,
                "rank": 3,
                "mask_zero": True,
                "a_trainable": False,
            },
            input_data=np.array([[1, 2, 0]], dtype="int32"),
            expected_output_shape=(1, 3, 6),
            expected_num_trainable_weights=1,
            expected_num_non_trainable_weights=1,
            supports_masking=True,
        )


def test_stores_only_the_factors():
    layer = FactorizedEmbedding(20000, 128, rank=16)
    layer.build()
    assert layer.count_params() == 20000 * 16 + 16 * 128
    assert [tuple(w.shape) for w in layer.weights] == [(20000, 16), (16, 128)]


def test_lookup_is_rows_of_a_times_b():
    layer = FactorizedEmbedding(50, 8, rank=3)
    ids = np.array([[0, 7, 49], [3, 3, 1]])
    out = keras.ops.convert_to_numpy(layer(ids))
    a = keras.ops.convert_to_numpy(layer.embeddings_a)
    b = keras.ops.convert_to_numpy(layer.embeddings_b)
    np.testing.assert_allclose(out, a[ids] @ b, rtol=1e-5, atol=1e-6)


def _table(v=300, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(v, 6)) @ rng.normal(size=(6, d)) + 0.1 * rng.normal(size=(v, d))).astype(
        "float32"
    )


def test_from_matrix_is_the_eckart_young_approximation():
    table = _table().astype("float64")
    s = np.linalg.svd(table, compute_uv=False)
    for k in (1, 4, 6, 10):
        layer = FactorizedEmbedding.from_matrix(table, rank=k, dtype="float64")
        merged = keras.ops.convert_to_numpy(layer.embeddings)
        error = np.linalg.norm(table - merged) / np.linalg.norm(table)
        assert error == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)), abs=1e-5)
    full = FactorizedEmbedding.from_matrix(table, rank=24, dtype="float64")
    # JAX without x64 keeps float64 variables in float32.
    merged = keras.ops.convert_to_numpy(full.embeddings)
    atol = 1e-10 if merged.dtype == np.float64 else 1e-5
    np.testing.assert_allclose(merged, table, atol=atol)


def test_default_split_is_balanced_and_others_are_offered():
    table = _table()
    res = truncated_svd(table, 5)
    layer = FactorizedEmbedding.from_matrix(table, rank=5)
    a = keras.ops.convert_to_numpy(layer.embeddings_a)
    np.testing.assert_allclose(a, res.u * np.sqrt(res.s), rtol=1e-5, atol=1e-6)
    right = FactorizedEmbedding.from_matrix(table, rank=5, split="right")
    a = keras.ops.convert_to_numpy(right.embeddings_a)
    np.testing.assert_allclose(a.T @ a, np.eye(5), atol=1e-5)


def test_energy_and_param_ratio():
    table = _table()
    layer = FactorizedEmbedding.from_matrix(table, energy=0.95)
    assert 1 <= layer.rank <= 7
    layer = FactorizedEmbedding.from_matrix(table, param_ratio=0.25)
    assert layer.count_params() <= 0.25 * table.size
    assert layer.rank == int(0.25 * 300 * 24 / 324)


def test_from_embedding_to_embedding_round_trip():
    embedding = keras.layers.Embedding(300, 24, mask_zero=True, name="emb")
    embedding.build()
    embedding.embeddings.assign(_table())
    layer = FactorizedEmbedding.from_embedding(embedding, rank=4)
    assert layer.mask_zero and layer.name == "emb"
    merged = layer.to_embedding()
    assert isinstance(merged, keras.layers.Embedding) and merged.mask_zero
    expected = truncated_svd(_table().astype("float64"), 4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(merged.embeddings),
        (expected.u * expected.s) @ expected.vt,
        atol=1e-4,
    )
    ids = np.array([[0, 5, 299, 17]])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(ids)),
        keras.ops.convert_to_numpy(merged(ids)),
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.compute_mask(ids)),
        keras.ops.convert_to_numpy(merged.compute_mask(ids)),
    )


def test_from_embedding_rejects_unbuilt_and_wrong_layers():
    with pytest.raises(ValueError, match="built `Embedding`.*Received: layer='e'"):
        FactorizedEmbedding.from_embedding(keras.layers.Embedding(10, 4, name="e"), rank=2)
    with pytest.raises(TypeError, match="`keras.layers.Embedding`"):
        FactorizedEmbedding.from_embedding(keras.layers.Dense(3), rank=2)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rank=0), ValueError, r"`rank`, expected an integer in \[1, 8\]. Received: rank=0"),
        (dict(rank=-3), ValueError, r"Received: rank=-3"),
        (dict(rank=2.5), ValueError, r"Received: rank=2.5"),
        (dict(rank=9), ValueError, r"\[1, 8\]. Received: rank=9"),
        (dict(rank=2, input_dim=0), ValueError, r"`input_dim`.*Received: input_dim=0"),
        (dict(rank=2, mask_zero=True, a_trainable="no"), TypeError, r"`a_trainable`"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    args = dict(input_dim=100, output_dim=8)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        FactorizedEmbedding(**args)


def test_set_factors_checks_shapes():
    layer = FactorizedEmbedding(100, 8, rank=2)
    with pytest.raises(ValueError, match=r"`a`, expected an array of shape \(100, 2\) \(input_dim=100"):
        layer.set_factors(np.zeros((99, 2)), np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"finite"):
        layer.set_factors(np.full((100, 2), np.nan), np.zeros((2, 8)))


def test_from_matrix_rejects_bad_matrices():
    with pytest.raises(ValueError, match="2-D matrix"):
        FactorizedEmbedding.from_matrix(np.ones(10), rank=1)
    with pytest.raises(ValueError, match="finite"):
        FactorizedEmbedding.from_matrix(np.array([[np.nan, 1.0], [1.0, 1.0]]), rank=1)
    with pytest.raises(ValueError, match="exactly one of"):
        FactorizedEmbedding.from_matrix(np.ones((4, 4)), rank=1, energy=0.5)


def test_out_of_vocabulary_ids_behave_as_embedding():
    layer = FactorizedEmbedding.from_matrix(_table(), rank=3)
    merged = layer.to_embedding()
    ids = np.array([[1, 300, -1]])
    try:
        expected = keras.ops.convert_to_numpy(merged(ids))
    except Exception as embedding_error:  # TF on CPU raises
        with pytest.raises(type(embedding_error)):
            layer(ids)
    else:
        got = keras.ops.convert_to_numpy(layer(ids))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        finite = ~np.isnan(expected)
        np.testing.assert_allclose(got[finite], expected[finite], atol=1e-5)


def test_masking_feeds_an_lstm_exactly_as_embedding():
    table = _table(50, 8)
    embedding = keras.layers.Embedding(50, 8, mask_zero=True)
    embedding.build()
    embedding.embeddings.assign(table)
    factorized = FactorizedEmbedding.from_embedding(embedding, rank=8)
    lstm = keras.layers.LSTM(5)
    ids = np.array([[3, 7, 9, 0, 0], [4, 0, 0, 0, 0]])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(lstm(factorized(ids))),
        keras.ops.convert_to_numpy(lstm(embedding(ids))),
        atol=1e-5,
    )
    # The mask really is applied: padding changes nothing.
    longer = np.array([[3, 7, 9, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(lstm(factorized(longer))),
        keras.ops.convert_to_numpy(lstm(factorized(ids))),
        atol=1e-5,
    )


def _classifier_data(n=256, length=12, vocab=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, size=(n, length))
    y = (np.mean(x < vocab // 2, axis=1) > 0.5).astype("float32")
    return x, y


def _fit_and_check(model, x, y, epochs=12):
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]
    return model


def test_sequential_add_trains():
    x, y = _classifier_data()
    model = keras.Sequential()
    model.add(keras.Input(shape=(12,), dtype="int32"))
    model.add(FactorizedEmbedding(60, 16, rank=4, mask_zero=True))
    model.add(keras.layers.GlobalAveragePooling1D())
    model.add(keras.layers.Dense(1, activation="sigmoid"))
    _fit_and_check(model, x, y)


def test_functional_and_subclassed_models_train():
    x, y = _classifier_data()
    inputs = keras.Input(shape=(12,), dtype="int32")
    hidden = FactorizedEmbedding(60, 16, rank=4)(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.GlobalAveragePooling1D()(hidden)
    )
    _fit_and_check(keras.Model(inputs, outputs), x, y)

    class Classifier(keras.Model):
        def __init__(self):
            super().__init__()
            self.embedding = FactorizedEmbedding(60, 16, rank=4)
            self.pool = keras.layers.GlobalAveragePooling1D()
            self.head = keras.layers.Dense(1, activation="sigmoid")

        def call(self, inputs):
            return self.head(self.pool(self.embedding(inputs)))

    _fit_and_check(Classifier(), x, y)


def test_frozen_a_is_not_trained_but_b_is():
    x, y = _classifier_data(n=64)
    layer = FactorizedEmbedding(60, 8, rank=2, a_trainable=False)
    model = keras.Sequential(
        [keras.Input((12,), dtype="int32"), layer, keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)]
    )
    a0 = keras.ops.convert_to_numpy(layer.embeddings_a).copy()
    b0 = keras.ops.convert_to_numpy(layer.embeddings_b).copy()
    model.compile("adam", "mse")
    model.fit(x, y, epochs=2, verbose=0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.embeddings_a), a0)
    assert not np.allclose(keras.ops.convert_to_numpy(layer.embeddings_b), b0)
    layer.a_trainable = True
    assert len(layer.trainable_weights) == 2


def test_regularizers_and_constraints_apply_per_factor():
    layer = FactorizedEmbedding(
        20,
        4,
        rank=2,
        embeddings_a_regularizer="l2",
        embeddings_b_constraint=keras.constraints.NonNeg(),
    )
    layer(np.array([[1, 2]]))
    assert len(layer.losses) == 1
    assert layer.embeddings_b.constraint is not None
    assert layer.embeddings_a.constraint is None


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "bfloat16"])
def test_mixed_precision_keeps_float32_factors(policy):
    keras.mixed_precision.set_global_policy(policy)
    x, y = _classifier_data()
    layer = FactorizedEmbedding(60, 16, rank=4)
    out = layer(x[:2])
    assert layer.embeddings_a.dtype == "float32" and layer.embeddings_b.dtype == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == keras.mixed_precision.global_policy().compute_dtype
    if policy.startswith("mixed"):
        model = keras.Sequential(
            [
                keras.Input((12,), dtype="int32"),
                layer,
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1, activation="sigmoid", dtype="float32"),
            ]
        )
        _fit_and_check(model, x, y)


def test_get_config_is_complete_and_saves(tmp_path):
    layer = FactorizedEmbedding(
        30,
        5,
        rank=2,
        embeddings_a_initializer="he_normal",
        embeddings_b_regularizer="l1",
        embeddings_a_constraint="non_neg",
        mask_zero=True,
        a_trainable=False,
        name="fe",
    )
    config = layer.get_config()
    import inspect

    params = set(inspect.signature(FactorizedEmbedding.__init__).parameters) - {"self", "kwargs"}
    assert params <= set(config), params - set(config)
    clone = FactorizedEmbedding.from_config(config)
    assert clone.get_config() == config

    model = keras.Sequential([keras.Input((4,), dtype="int32"), layer, keras.layers.LSTM(3)])
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects needed
    ids = np.array([[1, 2, 0, 0], [5, 6, 7, 8]])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(ids)), keras.ops.convert_to_numpy(loaded(ids))
    )
    restored = loaded.layers[0]
    assert isinstance(restored, FactorizedEmbedding)
    assert restored.a_trainable is False and not restored.embeddings_a.trainable
