"""Runs the `Example:` sections of the public docstrings as written."""

import doctest
import importlib

import pytest

MODULES = [
    "keras_factorized.atomic_io",
    "keras_factorized.decomposition",
    "keras_factorized.layers.factorized_embedding",
    "keras_factorized.layers.low_rank_dense",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module_name} has no docstring example"
    assert result.failed == 0
