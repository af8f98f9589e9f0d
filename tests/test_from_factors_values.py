"""`from_factors` / `from_matrix` build the factor variables from the given arrays.

No random initial values are drawn and overwritten (issue 13: that cost
20-30% on top of the SVD); the checks and the layer's config stay as with
`set_factors`.
"""

import keras
import numpy as np
import pytest

from keras_factorized import FactorizedEmbedding
from keras_factorized import LowRankDense
from keras_factorized import LowRankEinsumDense


def test_from_factors_holds_the_arrays_and_keeps_the_config():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)).astype("float32"), rng.normal(size=(4, 8)).astype("float32")
    layer = FactorizedEmbedding.from_factors(a, b)
    got_a, got_b = layer.factors()
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b)
    config = layer.get_config()
    default = FactorizedEmbedding(50, 8, 4).get_config()
    for key in ("embeddings_a_initializer", "embeddings_b_initializer"):
        assert config[key] == default[key]


@pytest.mark.parametrize("make", [
    lambda a, b: FactorizedEmbedding.from_factors(a, b),
    lambda a, b: LowRankDense.from_factors(a, b),
    lambda a, b: LowRankEinsumDense.from_factors(
        a, b, equation="abc,cd->abd", output_shape=(None, 8), kernel_shape=(10, 8)),
], ids=["embedding", "dense", "einsum"])
def test_from_factors_draws_no_random_values(make, monkeypatch):
    # On JAX a random initializer compiles a kernel per shape (a new rank, a
    # new shape): the einsum layer once drew both factors, 0.3 s each.
    def no_random(self, *args, **kwargs):
        raise AssertionError("a random initializer ran")

    for initializer in (keras.initializers.GlorotUniform, keras.initializers.Orthogonal,
                        keras.initializers.RandomUniform):
        monkeypatch.setattr(initializer, "__call__", no_random)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 3)).astype("float32"), rng.normal(size=(3, 8)).astype("float32")
    got_a, got_b = make(a, b).factors()
    np.testing.assert_allclose(np.reshape(got_a, (10, 3)), a)
    np.testing.assert_allclose(np.reshape(got_b, (3, 8)), b)


def test_from_factors_with_bias_and_float64_input():
    rng = np.random.default_rng(1)
    a, b, bias = rng.normal(size=(6, 2)), rng.normal(size=(2, 3)), rng.normal(size=(3,))
    layer = LowRankDense.from_factors(a, b, bias)
    assert layer.kernel_a.dtype == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.bias), bias, rtol=1e-6)
    x = rng.normal(size=(5, 6)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), x @ (a @ b) + bias, rtol=1e-4, atol=1e-5)


def test_from_factors_rejects_non_finite_values():
    a = np.ones((5, 2), dtype="float32")
    a[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"`a`, expected finite values"):
        FactorizedEmbedding.from_factors(a, np.ones((2, 4)))


def test_from_matrix_matches_the_svd_factors():
    from keras_factorized.decomposition import truncated_svd

    m = np.random.default_rng(2).normal(size=(40, 12)).astype("float32")
    a, b = truncated_svd(m, 3).factors("balanced")
    layer = FactorizedEmbedding.from_matrix(m, 3)
    got_a, got_b = layer.factors()
    np.testing.assert_allclose(got_a, a, rtol=1e-6)
    np.testing.assert_allclose(got_b, b, rtol=1e-6)
