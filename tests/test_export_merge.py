"""`merge_factors=True` leaves no factor in the SavedModel, for all three layers."""

import os

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("SavedModel export needs the TensorFlow backend", allow_module_level=True)

import tensorflow as tf  # noqa: E402

from keras_factorized import FactorizedEmbedding  # noqa: E402
from keras_factorized import LowRankDense  # noqa: E402
from keras_factorized import LowRankEinsumDense  # noqa: E402
from keras_factorized.export import export_for_serving  # noqa: E402


def _model():
    inputs = keras.Input((6,), dtype="int32")
    x = FactorizedEmbedding(50, 12, rank=3, name="embed")(inputs)
    x = LowRankEinsumDense("abc,cde->abde", (None, 2, 4), rank=3, bias_axes="de",
                           name="qkv")(x)
    x = keras.layers.Reshape((6, 8))(x)
    outputs = LowRankDense(5, rank=2, name="head")(x)
    return keras.Model(inputs, outputs)


def _variable_names(path):
    return [v.name for v in tf.saved_model.load(path).variables]


@pytest.mark.parametrize("merge", [False, True])
def test_merged_export_has_no_factor_variables(tmp_path, merge):
    model = _model()
    ids = np.random.default_rng(0).integers(1, 50, size=(3, 6)).astype("int32")
    expected = keras.ops.convert_to_numpy(model(ids))
    path = export_for_serving(model, os.fspath(tmp_path / "serving"), version=1,
                              merge_factors=merge)
    names = _variable_names(path)
    factor_names = [n for n in names if "_a" in n.split("/")[-1] or "_b:" in n or
                    n.split("/")[-1].split(":")[0].endswith("_b")]
    if merge:
        assert factor_names == [], names
    else:
        assert len(factor_names) == 6, names
    served = tf.saved_model.load(path).signatures["serving_default"]
    out = next(iter(served(inputs=tf.constant(ids)).values())).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4)
