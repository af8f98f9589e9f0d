"""Deployment: TensorFlow SavedModels for TF Serving, and TFLite models.

TensorFlow-only module (the layers themselves stay backend-agnostic). Both
exports contain only standard TensorFlow ops, so the artifacts load where
`keras_factorized` (and Keras) is not installed: in the stock
`tensorflow_model_server`, with `tf.saved_model.load`, or in the TFLite
interpreter on a phone.

The `serving_default` signature written by `export_for_serving` has stable
names:

- input `text` (`tf.string`, shape `[batch]`) when the model takes raw text
  (its pipeline starts with a `TextVectorization` layer, inside the model or
  passed as `text_vectorizer=`); otherwise input `inputs` with the model's
  input shape and dtype (e.g. `int32` token ids of shape `[batch, 200]`).
- output `predictions` (`tf.float32`, the model's output shape). Outputs are
  cast to `float32` whatever the model's dtype policy (a `mixed_bfloat16`
  model still answers in `float32`, which JSON clients can read).
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import keras
import tensorflow as tf

from keras_factorized.atomic_io import publish_directory
from keras_factorized.atomic_io import remove_stale_parts
from keras_factorized.atomic_io import rename_no_replace
from keras_factorized.atomic_io import temporary_directory

SERVING_SIGNATURE_KEY = "serving_default"
TEXT_INPUT_NAME = "text"
DEFAULT_INPUT_NAME = "inputs"
OUTPUT_NAME = "predictions"

# Ops that call back into the Python interpreter: TF Serving cannot run them.
PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})

_VERSION_DIR = re.compile(r"^[0-9]+$")
# Working folders are named `.export.<host>-<pid>-<random>.part` (hidden; TF
# Serving only loads integer-named folders).
_PART_NAME = "export"


def _check_backend(function_name: str) -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"`{function_name}` writes TensorFlow artifacts and needs the "
            "TensorFlow backend (set KERAS_BACKEND=tensorflow before importing "
            f"keras). Received: backend={backend}"
        )


def merge_factorized_layers(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with factorized layers merged into plain ones.

    The export's name for `keras_factorized.merge`: every layer that the
    registry knows as factorized (`FactorizedEmbedding`, `LowRankDense`,
    `LowRankEinsumDense`, at any depth) becomes the `Embedding`, `Dense` or
    `EinsumDense` holding `A @ B`; `model` is left unchanged. Merged models
    compute one large product instead of two small ones, at the cost of
    storing the full matrices.

    Args:
        model: A built Keras model.

    Returns:
        The merged copy.

    Example:

    >>> import keras, numpy as np
    >>> from keras_factorized import FactorizedEmbedding
    >>> from keras_factorized.export import merge_factorized_layers
    >>> model = keras.Sequential([keras.Input((5,), dtype="int32"),
    ...                           FactorizedEmbedding(100, 8, rank=2)])
    >>> merged = merge_factorized_layers(model)
    >>> [type(layer).__name__ for layer in merged.layers]
    ['Embedding']
    """
    from keras_factorized.surgery import merge

    if not isinstance(model, keras.Model):
        raise TypeError(
            "Received an invalid value for `model`, expected a keras.Model. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    return merge(model)


def next_version(export_dir: str | os.PathLike) -> int:
    """The next TF Serving version number in `export_dir` (1 when empty).

    Args:
        export_dir: The model's base folder (`/models/imdb`), which holds one
            integer-named folder per version.

    Returns:
        One more than the largest integer-named subfolder, or 1.

    Example:

    >>> import tempfile
    >>> next_version(tempfile.mkdtemp())
    1
    """
    if not os.path.isdir(export_dir):
        return 1
    versions = [
        int(name)
        for name in os.listdir(export_dir)
        if _VERSION_DIR.match(name)
        and os.path.isdir(os.path.join(export_dir, name))
    ]
    return max(versions, default=0) + 1


def _version_exists(export_dir: str, version: int, overwrite: bool) -> FileExistsError:
    return FileExistsError(
        f"Version {version} already exists in {export_dir!r}; pass "
        "overwrite=True to replace it, or version=None for the next one. "
        f"Received: version={version}, overwrite={overwrite}"
    )


def _publish_version(tmp_dir: str, export_dir: str, version: int | None,
                     overwrite: bool) -> int:
    """Renames the finished `tmp_dir` to a version folder; returns the version.

    Safe across processes and threads: the rename itself fails if the version
    exists, so with `version=None` each writer claims a distinct number
    (retrying with the next free one when another writer got there first),
    and with `overwrite=False` nothing is ever replaced.
    """
    if version is not None:
        try:
            publish_directory(tmp_dir, os.path.join(export_dir, str(version)),
                              overwrite=overwrite)
        except FileExistsError as e:
            raise _version_exists(export_dir, version, overwrite) from e
        return version
    candidate = next_version(export_dir)
    while True:
        try:
            rename_no_replace(tmp_dir, os.path.join(export_dir, str(candidate)))
            return candidate
        except FileExistsError:
            # Another writer published this number (or a file has the name).
            candidate = max(candidate + 1, next_version(export_dir))


def _single_input(model: keras.Model) -> Any:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            "The model has no defined inputs: build it with a `keras.Input` "
            "(or call it once on data) before exporting. "
            f"Received: model={model.name}"
        )
    if len(inputs) != 1:
        raise ValueError(
            "Only single-input models can be exported by this function (use "
            "`keras.export.ExportArchive` directly for several inputs). "
            f"Received: model={model.name} with {len(inputs)} inputs"
        )
    return inputs[0]


def _sequence_length(text_vectorizer) -> int | None:
    return text_vectorizer.get_config().get("output_sequence_length")


def _fit_length(token_ids, length: int):
    """Truncates or zero-pads `[batch, n]` token ids to `[batch, length]`."""
    token_ids = token_ids[:, :length]
    padding = length - tf.shape(token_ids)[1]
    return tf.pad(token_ids, [[0, 0], [0, padding]])


def _ragged_copy(text_vectorizer):
    """The same vectorizer (vocabulary, standardization) with ragged output."""
    config = text_vectorizer.get_config()
    config.update(
        output_sequence_length=None,
        ragged=True,
        vocabulary=text_vectorizer.get_vocabulary(),
        idf_weights=None,
        name=f"{text_vectorizer.name}_ragged",
    )
    config.pop("vocabulary_size", None)
    copy = keras.layers.TextVectorization.from_config(config)
    copy.build((None,))
    return copy


def _keep_last_tokens(ragged_ids, length: int):
    """The last `length` ids of each row, zero-padded at the end."""
    starts = tf.maximum(ragged_ids.row_lengths() - length, 0)
    values = tf.ragged.range(starts, ragged_ids.row_lengths())
    kept = tf.gather(ragged_ids, values, batch_dims=1)
    return kept.to_tensor(default_value=0, shape=[None, length])


def _named_outputs(model: keras.Model, outputs, output_name: str) -> dict:
    if isinstance(outputs, dict):
        named = dict(outputs)
    elif isinstance(outputs, (list, tuple)):
        if len(outputs) == 1:
            named = {output_name: outputs[0]}
        else:
            named = dict(zip(model.output_names, outputs))
    else:
        named = {output_name: outputs}
    return {
        name: tf.cast(value, tf.float32) if value.dtype.is_floating else value
        for name, value in named.items()
    }


def _serving_function(
    model: keras.Model,
    text_vectorizer=None,
    input_name: str | None = None,
    output_name: str = OUTPUT_NAME,
    truncate: str = "post",
):
    """The `tf.function` TF Serving will expose, and the layers to track."""
    if input_name is not None and not (
        isinstance(input_name, str) and input_name.isidentifier()
    ):
        raise ValueError(
            "Received an invalid value for `signature_input_name`, expected an "
            "identifier such as 'text'. Received: "
            f"signature_input_name={input_name!r}"
        )
    model_input = _single_input(model)
    input_shape = tuple(model_input.shape)
    input_dtype = tf.as_dtype(model_input.dtype)

    if text_vectorizer is not None:
        if input_dtype == tf.string:
            raise ValueError(
                "`text_vectorizer` is for models that take token ids, but "
                "this model already takes strings (its pipeline includes the "
                "vectorization). Pass text_vectorizer=None. Received: "
                f"text_vectorizer={text_vectorizer.name}, model input "
                f"dtype={model_input.dtype}"
            )
        length = input_shape[1] if len(input_shape) == 2 else None
        vectorizer_length = _sequence_length(text_vectorizer)
        if length and vectorizer_length and vectorizer_length != length:
            raise ValueError(
                "The `text_vectorizer` pads or truncates to a different length "
                "than the model expects. Received: text_vectorizer with "
                f"output_sequence_length={vectorizer_length}, model input "
                f"shape={input_shape}"
            )
        if not text_vectorizer.built:
            text_vectorizer.build((None,))
        resources = [text_vectorizer]
        if truncate == "pre":
            if not length:
                raise ValueError(
                    "`truncate='pre'` keeps the last tokens of each text and "
                    "needs a model with a fixed sequence length. Received: "
                    f"model input shape={input_shape}"
                )
            ragged_vectorizer = _ragged_copy(text_vectorizer)
            resources.append(ragged_vectorizer)
        spec = tf.TensorSpec([None], tf.string, name=input_name or TEXT_INPUT_NAME)

        def serve(text):
            if truncate == "pre":
                token_ids = _keep_last_tokens(ragged_vectorizer(text), length)
            else:
                token_ids = text_vectorizer(text)
                if length and not vectorizer_length:
                    token_ids = _fit_length(token_ids, length)
            outputs = model(tf.cast(token_ids, input_dtype), training=False)
            return _named_outputs(model, outputs, output_name)

    elif input_dtype == tf.string:
        resources = []
        # Raw text in: `{"instances": ["review text", ...]}` on the REST API.
        spec = tf.TensorSpec([None], tf.string, name=input_name or TEXT_INPUT_NAME)

        def serve(text):
            if len(input_shape) == 2:
                text = tf.expand_dims(text, -1)
            outputs = model(text, training=False)
            return _named_outputs(model, outputs, output_name)

    else:
        resources = []
        spec = tf.TensorSpec(
            input_shape, input_dtype, name=input_name or DEFAULT_INPUT_NAME
        )

        def serve(inputs):
            outputs = model(inputs, training=False)
            return _named_outputs(model, outputs, output_name)

    serve = tf.function(serve, input_signature=[spec], autograph=False)
    return serve, resources


def _check_version(version) -> None:
    if version is None:
        return
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            "Received an invalid value for `version`, expected None (next "
            "version) or a positive integer (TF Serving only loads "
            f"integer-named folders). Received: version={version!r}"
        )


def export_for_serving(
    model: keras.Model,
    export_dir: str | os.PathLike,
    version: int | None = None,
    *,
    merge_factors: bool = False,
    overwrite: bool = False,
    text_vectorizer: keras.layers.TextVectorization | None = None,
    signature_input_name: str | None = None,
    signature_output_name: str = OUTPUT_NAME,
    truncate: str = "post",
    verbose: bool = False,
) -> str:
    """Exports `model` as a SavedModel version that TF Serving can load.

    Writes `<export_dir>/<version>/` (the layout `tensorflow_model_server
    --model_base_path=<export_dir>` watches) holding a TensorFlow SavedModel
    whose `serving_default` signature runs the model's forward pass
    (inference mode). The SavedModel contains only standard TensorFlow ops
    (no `tf.py_function`), so neither Keras nor `keras_factorized` is needed
    to serve it.

    Signature names (stable):

    - input `text` (`tf.string`, shape `[batch]`) when `text_vectorizer` is
      given or the model's own input is a string (its first layer is a
      `TextVectorization`); else `inputs`, with the model's input shape and
      dtype. `signature_input_name` renames it.
    - output `predictions`, always `float32` (mixed-precision models are cast).
      A model with several outputs uses its `output_names`.

    The write is atomic, also across processes: the SavedModel is written
    into a hidden working folder inside `export_dir` (TF Serving ignores
    names that are not integers), flushed to disk, and renamed to the version
    folder only once complete, so a server never sees a half-written version.
    The rename fails if the version exists, so concurrent exports with
    `version=None` each get their own number (a writer that loses the race
    takes the next one), and an existing version is never replaced unless
    `overwrite=True`, which swaps the new folder in with one rename.
    Folders and files get the permissions a plain write would (the umask's),
    so a server running as another user can read them. Working folders left
    by a killed process are removed by the next export.

    Args:
        model: A built, single-input Keras model (Functional or Sequential;
            subclassed models work when `merge_factors=False`).
        export_dir: The model's base folder; created if missing.
        version: Positive integer version number. Defaults to `None`: the
            next integer after the largest existing version (1 when none).
        merge_factors: If `True`, every `FactorizedEmbedding`/`LowRankDense`
            (any layer with a `to_embedding`/`to_dense`/`merge` method) is
            replaced by the plain layer holding the product of its factors
            (one gather per token instead of a gather and a small matmul: a
            larger file, usually faster lookups). Defaults to `False`: the
            factors are exported as they are (the smaller file).
        overwrite: Whether to replace an existing version folder. Defaults to
            `False`: an existing version raises `FileExistsError`.
        text_vectorizer: Optional adapted `keras.layers.TextVectorization`
            that maps raw strings to the model's token ids. When given, the
            signature takes raw strings. If its `output_sequence_length` is
            `None`, ids are truncated/zero-padded to the model's sequence
            length inside the graph.
        signature_input_name: Name of the signature's input. Defaults to
            `"text"` for string inputs, `"inputs"` otherwise.
        signature_output_name: Name of the signature's (single) output.
            Defaults to `"predictions"`.
        truncate: How the signature cuts texts longer than the model's
            sequence length, to match the training pipeline: `"post"` keeps
            the first tokens (what `TextVectorization(output_sequence_length=)`
            does), `"pre"` keeps the last ones (`pad_sequences`'s default).
            Padding is always at the end. Only used with `text_vectorizer`.
        verbose: Whether to print what was written.

    Returns:
        The path of the version folder that was written.

    Example:

    >>> import os, tempfile, keras
    >>> from keras_factorized import FactorizedEmbedding, LowRankDense
    >>> model = keras.Sequential([
    ...     keras.Input((20,), dtype="int32"),
    ...     FactorizedEmbedding(1000, 32, rank=4),
    ...     keras.layers.GlobalAveragePooling1D(),
    ...     LowRankDense(1, rank=1, activation="sigmoid"),
    ... ])
    >>> base = tempfile.mkdtemp()
    >>> os.path.basename(export_for_serving(model, base))
    '1'
    >>> os.path.basename(export_for_serving(model, base, merge_factors=True))
    '2'

    Then serve `base` with `docker run -p 8501:8501 --mount
    type=bind,source=$base,target=/models/imdb -e MODEL_NAME=imdb
    tensorflow/serving` and POST `{"instances": [[3, 1, 4, ...]]}` (here:
    token ids; raw strings for a text signature) to
    `http://localhost:8501/v1/models/imdb:predict`.
    """
    _check_backend("export_for_serving")
    _check_version(version)
    if truncate not in ("post", "pre"):
        raise ValueError(
            "Received an invalid value for `truncate`, expected 'post' or "
            f"'pre'. Received: truncate={truncate!r}"
        )
    if text_vectorizer is not None and not isinstance(
        text_vectorizer, keras.layers.TextVectorization
    ):
        raise TypeError(
            "Expected `text_vectorizer` to be an adapted "
            "keras.layers.TextVectorization or None. Received: "
            f"text_vectorizer={text_vectorizer!r}"
        )
    export_dir = os.fspath(export_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError(
            "Received an invalid value for `export_dir`, expected a folder "
            f"(the model's base path). Received: export_dir={export_dir!r} "
            "is a file"
        )
    os.makedirs(export_dir, exist_ok=True)
    if version is not None and not overwrite:
        # Fails early; the publishing rename checks again, atomically.
        if os.path.lexists(os.path.join(export_dir, str(version))):
            raise _version_exists(export_dir, version, overwrite)

    if merge_factors:
        model = merge_factorized_layers(model)
    serve, resources = _serving_function(
        model, text_vectorizer, signature_input_name, signature_output_name,
        truncate,
    )
    archive = keras.export.ExportArchive()
    archive.track(model)
    for resource in resources:
        # Vectorizers' lookup tables must be saved with the variables.
        archive.track(resource)
    archive.add_endpoint(SERVING_SIGNATURE_KEY, serve)

    remove_stale_parts(export_dir, _PART_NAME)
    tmp_dir = temporary_directory(export_dir, _PART_NAME)
    try:
        archive.write_out(tmp_dir, verbose=False)
        version = _publish_version(tmp_dir, export_dir, version, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    version_dir = os.path.join(export_dir, str(version))
    if verbose:
        keras.utils.io_utils.print_msg(
            f"Exported SavedModel version {version} to {version_dir!r} "
            f"(signature {SERVING_SIGNATURE_KEY!r})."
        )
    return version_dir


def saved_model_ops(saved_model_dir: str | os.PathLike) -> set[str]:
    """All op types in a SavedModel's graph, its function library included.

    Args:
        saved_model_dir: A SavedModel folder (e.g. a version folder).

    Returns:
        The set of op type names (`"MatMul"`, `"GatherV2"`, ...). A SavedModel
        that TF Serving can run contains none of `PYTHON_OPS`.

    Example:

    >>> import tempfile, keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> ops = saved_model_ops(export_for_serving(model, tempfile.mkdtemp()))
    >>> "MatMul" in ops, sorted(ops & PYTHON_OPS)
    (True, [])
    """
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    ops = set()
    for meta_graph in saved_model.meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def __getattr__(name):
    # `export_tflite` lives in `keras_factorized.tflite`; it stays reachable
    # here, where earlier versions defined it.
    if name == "export_tflite":
        from keras_factorized.tflite import export_tflite

        return export_tflite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
