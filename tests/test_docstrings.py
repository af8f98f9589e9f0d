"""Every public name documents itself with a runnable example.

The examples themselves run as doctests (`--doctest-modules`, configured in
pyproject.toml); this test fails when a public name has none to run.
"""

import keras
import pytest

import keras_factorized

PUBLIC_NAMES = [
    "FactorizedEmbedding",
    "LowRankDense",
    "LowRankEinsumDense",
    "truncated_svd",
    "factorize",
]
TENSORFLOW_ONLY_NAMES = ["export_for_serving", "export_tflite", "get_strategy"]


@pytest.mark.parametrize("name", PUBLIC_NAMES + TENSORFLOW_ONLY_NAMES)
def test_public_name_has_a_docstring_example(name):
    if name in TENSORFLOW_ONLY_NAMES and keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow-only helper; its example runs on the TensorFlow backend")
    doc = getattr(keras_factorized, name).__doc__ or ""
    assert ">>>" in doc, f"keras_factorized.{name} has no `>>>` example in its docstring"
