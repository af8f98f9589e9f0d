import os

import keras
import numpy as np
import pytest

from keras_factorized import LowRankEinsumDense
from keras_factorized._keras_compat import testing_test_case
from keras_factorized.layers.low_rank_einsum_dense import EinsumFactorization

# (equation, output_shape, bias_axes, input shape): Transformer Q/K/V, attention
# output, ellipses on either side, a transposed kernel, no bias.
EQUATIONS = [
    ("abc,cde->abde", (None, 4, 8), "de", (2, 5, 16)),
    ("abcd,cde->abe", (None, 16), "e", (2, 5, 4, 8)),
    ("...b,bc->...c", (6,), "c", (2, 3, 5)),
    ("ab...,bc->ac...", (6, None), "c", (2, 5, 3)),
    ("ab,cb->ac", (6,), "c", (3, 5)),
    ("abc,dc->abd", (None, 7), None, (2, 3, 9)),
]


class LowRankEinsumDenseLayerTest(testing_test_case()):
    def test_run_layer_test(self):
        self.run_layer_test(
            LowRankEinsumDense,
            init_kwargs={"equation": "abc,cde->abde", "output_shape": (5, 2, 4),
                         "rank": 3, "bias_axes": "de"},
            input_shape=(2, 5, 6),
            expected_output_shape=(2, 5, 2, 4),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=0,
        )


@pytest.mark.parametrize("equation,output_shape,bias_axes,input_shape", EQUATIONS)
def test_full_rank_conversion_reproduces_einsum_dense(equation, output_shape, bias_axes,
                                                      input_shape):
    dense = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes,
                                     bias_initializer="random_normal")
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    expected = keras.ops.convert_to_numpy(dense(x))
    m, n = EinsumFactorization(equation).matrix_shape(tuple(dense.kernel.shape))
    low = LowRankEinsumDense.from_einsum_dense(dense, rank=min(m, n))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(low(x)), expected, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(low.kernel),
                               keras.ops.convert_to_numpy(dense.kernel), atol=1e-5)
    merged = low.to_einsum_dense()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(merged(x)), expected, atol=1e-5)


def test_qkv_kernel_is_factorized_across_heads():
    # (hidden, heads, head_dim) -> a hidden x (heads * head_dim) matrix.
    dense = keras.layers.EinsumDense("abc,cde->abde", (None, 4, 8), bias_axes="de")
    dense.build((None, None, 32))
    low = LowRankEinsumDense.from_einsum_dense(dense, rank=5)
    assert tuple(low.kernel_a.shape) == (32, 5)
    assert tuple(low.kernel_b.shape) == (5, 4, 8)
    # The truncation is the Eckart-Young optimum of the 32 x 32 matrix.
    w = keras.ops.convert_to_numpy(dense.kernel).reshape(32, 32)
    s = np.linalg.svd(w, compute_uv=False)
    err = np.linalg.norm(w - keras.ops.convert_to_numpy(low.kernel).reshape(32, 32))
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[5:] ** 2)), rtol=1e-4)
    assert low.count_params() == 32 * 5 + 5 * 32 + 32


def test_attention_output_kernel_is_factorized_as_heads_times_head_dim():
    dense = keras.layers.EinsumDense("abcd,cde->abe", (None, 16), bias_axes="e")
    dense.build((None, None, 4, 8))
    low = LowRankEinsumDense.from_einsum_dense(dense, param_ratio=0.5)
    assert tuple(low.kernel_a.shape) == (4, 8, low.rank)
    assert tuple(low.kernel_b.shape) == (low.rank, 16)
    assert low.rank == 5  # floor(0.5 * 32 * 16 / 48)


def test_get_config_round_trip_keeps_every_argument():
    layer = LowRankEinsumDense(
        "abc,cd->abd", (None, 8), rank=3, activation="relu", bias_axes="d",
        kernel_a_initializer="ones", kernel_b_initializer="zeros",
        kernel_a_regularizer="l2", bias_constraint="non_neg", name="low")
    config = layer.get_config()
    clone = LowRankEinsumDense.from_config(config)
    assert clone.get_config() == config
    for key in ("equation", "output_shape", "rank", "activation", "bias_axes",
                "kernel_a_initializer", "kernel_b_initializer", "kernel_a_regularizer",
                "kernel_b_regularizer", "bias_constraint"):
        assert key in config


def test_save_and_load_keras_file(tmp_path):
    inputs = keras.Input((5, 16))
    outputs = LowRankEinsumDense("abc,cde->abde", (None, 4, 8), rank=6,
                                 bias_axes="de")(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).normal(size=(2, 5, 16)).astype("float32")
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: registered
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), atol=1e-6)


def test_factors_are_float32_under_mixed_precision():
    layer = LowRankEinsumDense("abc,cd->abd", (None, 8), rank=2, bias_axes="d",
                               dtype="mixed_bfloat16")
    y = layer(np.ones((2, 3, 4), "float32"))
    assert layer.kernel_a.dtype == "float32" and layer.kernel_b.dtype == "float32"
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"


def test_trains_with_fit():
    model = keras.Sequential([keras.Input((3, 8)),
                              LowRankEinsumDense("abc,cd->abd", (None, 4), rank=2,
                                                 bias_axes="d")])
    model.compile("adam", "mse")
    x = np.random.default_rng(2).normal(size=(16, 3, 8)).astype("float32")
    before = keras.ops.convert_to_numpy(model.layers[0].kernel_a).copy()
    model.fit(x, np.zeros((16, 3, 4)), epochs=1, verbose=0)
    assert not np.allclose(before, keras.ops.convert_to_numpy(model.layers[0].kernel_a))


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "4"])
def test_invalid_rank(rank):
    with pytest.raises(ValueError, match="`rank`.*Received: rank="):
        LowRankEinsumDense("abc,cd->abd", (None, 4), rank=rank)


def test_rank_above_matrix_rank_is_rejected_at_build():
    layer = LowRankEinsumDense("abc,cd->abd", (None, 4), rank=5)
    with pytest.raises(ValueError, match=r"expected an integer in \[1, 4\]"):
        layer.build((None, 3, 8))


@pytest.mark.parametrize("equation", ["abc,bcd->abd", "not an equation", "ab,ab->ab"])
def test_invalid_equation(equation):
    with pytest.raises(ValueError, match="`equation`"):
        LowRankEinsumDense(equation, (None, 4), rank=1)


def test_invalid_bias_axes():
    with pytest.raises(ValueError, match="`bias_axes`"):
        LowRankEinsumDense("abc,cd->abd", (None, 4), rank=1, bias_axes="z")


def test_from_einsum_dense_rejects_other_layers():
    with pytest.raises(TypeError, match="EinsumDense"):
        LowRankEinsumDense.from_einsum_dense(keras.layers.Dense(3), rank=1)
