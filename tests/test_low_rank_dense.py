import inspect
import os

import keras
import numpy as np
import pytest

from keras_factorized import LowRankDense
from keras_factorized import truncated_svd
from keras_factorized._keras_compat import testing_test_case


class LowRankDenseLayerTest(testing_test_case()):
    """Keras's own layer checks: config round trip, build, training, dtypes."""

    def test_run_layer_test(self):
        self.run_layer_test(
            LowRankDense,
            init_kwargs={"units": 4, "rank": 2, "activation": "relu"},
            input_shape=(2, 3, 6),
            expected_output_shape=(2, 3, 4),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=0,
            supports_masking=True,
        )

    def test_run_layer_test_no_bias_frozen_b(self):
        self.run_layer_test(
            LowRankDense,
            init_kwargs={"units": 5, "rank": 3, "use_bias": False, "b_trainable": False},
            input_shape=(2, 8),
            expected_output_shape=(2, 5),
            expected_num_trainable_weights=1,
            expected_num_non_trainable_weights=1,
        )


def test_parameter_count():
    layer = LowRankDense(256, rank=16)
    layer.build((None, 512))
    assert layer.count_params() == 512 * 16 + 16 * 256 + 256


def test_output_is_x_a_b_plus_bias():
    layer = LowRankDense(7, rank=3, activation="tanh", bias_initializer="ones")
    x = np.random.default_rng(0).normal(size=(4, 2, 9)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x))
    a = keras.ops.convert_to_numpy(layer.kernel_a)
    b = keras.ops.convert_to_numpy(layer.kernel_b)
    np.testing.assert_allclose(out, np.tanh(x @ a @ b + 1), rtol=1e-5, atol=1e-5)


def _dense(m=40, n=24, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    dense = keras.layers.Dense(n, **kwargs)
    dense.build((None, m))
    kernel = rng.normal(size=(m, 5)) @ rng.normal(size=(5, n)) + 0.05 * rng.normal(size=(m, n))
    dense.kernel.assign(kernel.astype("float32"))
    if dense.use_bias:
        dense.bias.assign(rng.normal(size=(n,)).astype("float32"))
    return dense


def test_from_kernel_is_the_eckart_young_approximation():
    kernel = np.random.default_rng(1).normal(size=(30, 20))
    s = np.linalg.svd(kernel, compute_uv=False)
    for k in (1, 5, 12):
        layer = LowRankDense.from_kernel(kernel, rank=k, dtype="float64")
        merged = keras.ops.convert_to_numpy(layer.kernel)
        error = np.linalg.norm(kernel - merged) / np.linalg.norm(kernel)
        assert error == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2)), abs=1e-5)
    full = LowRankDense.from_kernel(kernel, rank=20, dtype="float64")
    merged = keras.ops.convert_to_numpy(full.kernel)
    atol = 1e-10 if merged.dtype == np.float64 else 1e-5
    np.testing.assert_allclose(merged, kernel, atol=atol)
    assert not full.use_bias


def test_from_dense_to_dense_round_trip():
    dense = _dense(activation="relu", name="ffn")
    layer = LowRankDense.from_dense(dense, rank=5)
    assert layer.name == "ffn" and layer.use_bias
    assert keras.activations.serialize(layer.activation) == keras.activations.serialize(dense.activation)
    merged = layer.to_dense()
    assert isinstance(merged, keras.layers.Dense)
    kernel = keras.ops.convert_to_numpy(dense.kernel).astype("float64")
    expected = truncated_svd(kernel, 5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(merged.kernel), (expected.u * expected.s) @ expected.vt, atol=1e-4
    )
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(merged.bias), keras.ops.convert_to_numpy(dense.bias)
    )
    x = np.random.default_rng(2).normal(size=(6, 40)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(merged(x)), atol=1e-4
    )


def test_full_rank_from_dense_reproduces_outputs():
    dense = _dense(m=16, n=12, activation="gelu")
    layer = LowRankDense.from_dense(dense, rank=12)
    x = np.random.default_rng(3).normal(size=(5, 16)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(dense(x)), atol=1e-4
    )


def test_from_dense_rejects_unbuilt_and_wrong_layers():
    with pytest.raises(ValueError, match="built `Dense`.*Received: layer='d'"):
        LowRankDense.from_dense(keras.layers.Dense(3, name="d"), rank=1)
    with pytest.raises(TypeError, match="`keras.layers.Dense`"):
        LowRankDense.from_dense(keras.layers.Embedding(3, 3), rank=1)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(rank=0), ValueError, r"`rank`, expected an integer in \[1, 8\]. Received: rank=0"),
        (dict(rank=-3), ValueError, r"Received: rank=-3"),
        (dict(rank=2.5), ValueError, r"Received: rank=2.5"),
        (dict(rank="4"), ValueError, r"Received: rank='4'"),
        (dict(rank=9), ValueError, r"Received: rank=9"),
        (dict(rank=2, units=0), ValueError, r"`units`.*Received: units=0"),
        (dict(rank=2, use_bias="yes"), TypeError, r"`use_bias`"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    args = dict(units=8)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        LowRankDense(**args)


def test_rank_above_input_dim_fails_at_build():
    layer = LowRankDense(16, rank=8)
    with pytest.raises(ValueError, match=r"\[1, 4\]. Received: rank=8"):
        layer.build((None, 4))


def test_set_factors_checks_shapes():
    layer = LowRankDense(8, rank=2)
    layer.build((None, 10))
    with pytest.raises(ValueError, match=r"`b`, expected an array of shape \(2, 8\)"):
        layer.set_factors(np.zeros((10, 2)), np.zeros((3, 8)))
    with pytest.raises(ValueError, match=r"`bias`, expected an array of shape \(8,\)"):
        layer.set_factors(np.zeros((10, 2)), np.zeros((2, 8)), bias=np.zeros(7))


def test_trains_in_sequential_and_functional_models():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 20)).astype("float32")
    w = rng.normal(size=(20, 2)) @ rng.normal(size=(2, 10))
    y = (x @ w).astype("float32")
    model = keras.Sequential([keras.Input((20,)), LowRankDense(10, rank=2)])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    history = model.fit(x, y, epochs=40, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < 0.01 * history.history["loss"][0]

    inputs = keras.Input((20,))
    outputs = keras.layers.Dense(1)(LowRankDense(10, rank=2, activation="relu")(inputs))
    functional = keras.Model(inputs, outputs)
    functional.compile("adam", "mse")
    functional.fit(x, y[:, :1], epochs=1, verbose=0)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "bfloat16"])
def test_mixed_precision_keeps_float32_factors(policy):
    keras.mixed_precision.set_global_policy(policy)
    layer = LowRankDense(6, rank=2)
    out = layer(np.ones((3, 8), dtype="float32"))
    assert layer.kernel_a.dtype == "float32" and layer.kernel_b.dtype == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == keras.mixed_precision.global_policy().compute_dtype
    if policy.startswith("mixed"):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(256, 8)).astype("float32")
        y = (x @ rng.normal(size=(8, 1))).astype("float32")
        model = keras.Sequential(
            [keras.Input((8,)), LowRankDense(6, rank=2), keras.layers.Dense(1, dtype="float32")]
        )
        model.compile(keras.optimizers.Adam(0.02), "mse")
        history = model.fit(x, y, epochs=15, batch_size=32, verbose=0)
        assert history.history["loss"][-1] < 0.2 * history.history["loss"][0]


def test_get_config_is_complete_and_saves(tmp_path):
    layer = LowRankDense(
        6,
        rank=2,
        activation="relu",
        kernel_a_initializer="he_normal",
        kernel_b_regularizer="l2",
        bias_constraint="non_neg",
        a_trainable=False,
        name="lrd",
    )
    config = layer.get_config()
    params = set(inspect.signature(LowRankDense.__init__).parameters) - {"self", "kwargs"}
    assert params <= set(config), params - set(config)
    assert LowRankDense.from_config(config).get_config() == config

    model = keras.Sequential([keras.Input((5,)), layer, keras.layers.Dense(1)])
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(loaded(x))
    )
    assert isinstance(loaded.layers[0], LowRankDense)
    assert not loaded.layers[0].kernel_a.trainable
