"""Imports the repository's example scripts (`examples/<name>/<name>.py`) as modules.

The examples are plain scripts, not a package, and the library never imports
them; the benchmarks measure exactly what they show by loading them from
their path (no `sys.path` changes).
"""

from __future__ import annotations

import importlib.util
import os
import sys

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def example_path(name: str) -> str:
    """The path of the example script `name` (e.g. `"imdb_lstm"`)."""
    return os.path.join(EXAMPLES_DIR, name, f"{name}.py")


def load_example(name: str):
    """The example script `name` as a module (imported once per process)."""
    module_name = f"keras_factorized_examples.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = example_path(name)
    if not os.path.isfile(path):
        raise ValueError(
            f"Received an invalid value for `name`, expected an example under "
            f"{EXAMPLES_DIR}. Received: name={name!r}"
        )
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
