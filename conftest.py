"""pytest configuration for the docstring examples (`--doctest-modules`).

`pyproject.toml` runs the `>>>` examples of every module in `keras_factorized/`
next to the suite in `tests/`. This file (at the repository root, so that it
applies to the package as well as to `tests/`) leaves out the modules whose
examples need the TensorFlow backend when another backend is selected, and
gives every docstring example the same fresh Keras state as the tests get.
On JAX it also shares compiled XLA programs between the tests of a run
(`pytest_configure`).
"""

import os
import shutil
import tempfile

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


_JAX_CACHE = "KERAS_FACTORIZED_TEST_JAX_CACHE"


def pytest_configure(config):
    """On JAX, XLA programs compiled by one test are reused by the others.

    Many tests compile the same small models (the tiny BERT's train step,
    the same `factorize` twice in the determinism tests); JAX's persistent
    compilation cache, keyed by the program itself, skips compiling one a
    second time, in this process or another worker's. It changes no result:
    a cached program is the one XLA compiled.
    """
    if keras.backend.backend() != "jax":
        return
    import jax

    if not hasattr(config, "workerinput"):
        # The controller (or a run without xdist): one folder for the run,
        # which the pytest-xdist workers it starts inherit.
        os.environ[_JAX_CACHE] = tempfile.mkdtemp(prefix="keras-factorized-jax-cache-")
    jax.config.update("jax_compilation_cache_dir", os.environ[_JAX_CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    if keras.backend.backend() == "jax" and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.pop(_JAX_CACHE, ""), ignore_errors=True)
