"""pytest configuration for the docstring examples (`--doctest-modules`).

`pyproject.toml` runs the `>>>` examples of every module in `keras_factorized/`
next to the suite in `tests/`. This file (at the repository root, so that it
applies to the package as well as to `tests/`) leaves out the modules whose
examples need the TensorFlow backend when another backend is selected, and
gives every docstring example the same fresh Keras state as the tests get.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
from _pytest.doctest import DoctestItem

# TensorFlow-only modules (SavedModel/TF Serving/TFLite export, tf.distribute):
# their examples run on the TensorFlow backend only.
TENSORFLOW_ONLY_MODULES = [
    "keras_factorized/export.py",
    "keras_factorized/distribute.py",
    "keras_factorized/tflite.py",
]

# Never collected: `python -m keras_factorized` entry point.
collect_ignore = ["keras_factorized/__main__.py", "setup.py", "site"]
if keras.backend.backend() != "tensorflow":
    collect_ignore += TENSORFLOW_ONLY_MODULES


@pytest.fixture(autouse=True)
def _doctest_keras_state(request, doctest_namespace):
    """Docstring examples start with the float32 policy and a fixed seed."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    doctest_namespace.setdefault("np", np)
    doctest_namespace.setdefault("keras", keras)
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
