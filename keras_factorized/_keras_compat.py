"""Every use of private Keras (`keras.src`) in the package, in one place.

Keras 3 has no public API for these needs. Each function says which private
name it reaches and the Keras versions it was checked on: 3.10.0 (the declared
floor, tested in CI) and 3.15.1 (the latest at the time of writing). When a
Keras upgrade breaks one of them, this module is the only place to change.
"""

from __future__ import annotations

import keras


def functional_class():
    """`keras.src.models.functional.Functional`, the class of functional models.

    Checked: Keras 3.10.0, 3.15.1 (same path; `keras.Model(inputs, outputs)`
    returns an instance of it, but the class itself is not exported).
    """
    from keras.src.models.functional import Functional

    return Functional


def is_graph_model(model) -> bool:
    """Whether `model` runs a graph of layers (Sequential or functional)."""
    return isinstance(model, (keras.Sequential, functional_class()))


def is_plain_graph_model(model) -> bool:
    """A Sequential or functional model whose config is its graph.

    A subclass (a KerasHub backbone) rebuilds its graph from its own
    arguments instead, so its graph cannot be edited through its config.
    """
    return type(model) in (keras.Sequential, functional_class(), keras.Model)


def rebuild_sequential(model) -> None:
    """Rebuilds a Sequential's graph after its `_layers` list was edited.

    Checked: Keras 3.10.0, 3.15.1 (`Sequential._maybe_rebuild`, private).
    """
    model._maybe_rebuild()


def symbolic_build(model, x, y) -> None:
    """Builds the state of a compiled `model` (its compiled loss's trackers,
    its optimizer's slots) from one batch `(x, y)`, without computing it.

    On TensorFlow without a distribution strategy, `train_on_batch` and
    `test_on_batch` leave this to the first trace of the step; TensorFlow
    then traces the step a second time, without the variable creation (see
    `tests/test_distillation.py::test_each_step_is_compiled_once_per_call`).

    Checked: Keras 3.10.0, 3.15.1 (`Trainer._symbolic_build(data_batch=...)`,
    private; what `fit` runs first).
    """
    model._symbolic_build(data_batch=(x, y))


def flatten_layers(layer, include_self=False, recursive=True):
    """Every sub-layer of `layer` tracked by Keras, each once.

    Checked: Keras 3.10.0, 3.15.1 (`Layer._flatten_layers`, private; the
    public `Model.layers` lists only direct children).
    """
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def unlocked_tracker(layer):
    """A context manager that lets attributes of a built layer be replaced.

    Keras locks a layer's attribute tracker once it is built (3.10.0,
    3.15.1: `Layer._tracker.locked`, `.unlock()`, `.lock()`, private).
    """
    import contextlib

    @contextlib.contextmanager
    def manager():
        tracker = getattr(layer, "_tracker", None)
        locked = bool(tracker is not None and tracker.locked)
        if locked:
            tracker.unlock()
        try:
            yield
        finally:
            if locked:
                tracker.lock()

    return manager()


def set_registered_name(cls, name: str) -> None:
    """Registers `cls` under `name` for `.keras` saving without the decorator.

    Used for classes made at run time (a factorized KerasHub backbone), whose
    registered name must differ from their Python name. Checked: Keras 3.10.0,
    3.15.1 (`keras.src.saving.object_registration.GLOBAL_CUSTOM_NAMES`).
    """
    from keras.src.saving import object_registration

    object_registration.GLOBAL_CUSTOM_NAMES[cls] = name


def registered_name(cls) -> str:
    """The name `cls` is saved under: `keras.saving.get_registered_name`
    (public since 3.0) wraps the same registry."""
    return keras.saving.get_registered_name(cls)


def testing_test_case():
    """`keras.src.testing.TestCase` (used by the test suite only).

    Checked: Keras 3.10.0, 3.15.1.
    """
    from keras.src import testing

    return testing.TestCase


def set_layer_path(layer, path) -> None:
    """Gives `layer` the `layer.path` of the layer it replaces in a parent.

    Keras sets a layer's path once, from the name scope it is built in; a
    layer built outside its parent (by `factorize`) would otherwise keep a
    bare path such as `"query"`, the same for every Transformer block. Paths
    must stay unique: KerasHub's `Backbone.get_config` keys the quantized
    dtype policies by path, and `model.quantize(filters=...)` matches them.
    Checked: Keras 3.10.0, 3.15.1 (`Layer._path`, private, read by the public
    `Layer.path`).
    """
    layer._path = path


def sequential_layers(model) -> list:
    """The editable list of a Sequential's layers (its `InputLayer` included).

    Replace items, then call `rebuild_sequential`. Checked: Keras 3.10.0,
    3.15.1 (`Sequential._layers`, private; `model.layers` is a copy).
    """
    return model._layers


def build_input_shape(layer):
    """The input shape `layer` was built for, or `None` when Keras did not record it.

    Checked: Keras 3.10.0, 3.15.1 (`Layer._build_shapes_dict`, private: the
    arguments of the `build` call, by name).
    """
    shapes = getattr(layer, "_build_shapes_dict", None)
    return next(iter(shapes.values())) if shapes else None


def load_keras_imdb_npz(path: str, **kwargs):
    """`keras.datasets.imdb.load_data(**kwargs)` reading a verified local `imdb.npz`.

    Keras's loader only accepts a file name inside its cache and downloads
    anything else; its download step is pointed at `path` for the call
    instead of copying 17 MB. The caller checks the file's SHA-256 first.
    Checked: Keras 3.10.0, 3.15.1 (`keras.src.datasets.imdb.get_file`, the
    module-level name the loader calls).
    """
    from keras.src.datasets import imdb as keras_imdb

    original = keras_imdb.get_file
    keras_imdb.get_file = lambda *args, **kw: path
    try:
        return keras_imdb.load_data(**kwargs)
    finally:
        keras_imdb.get_file = original
