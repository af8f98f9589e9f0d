"""TFLite conversion with builtin ops only (TensorFlow backend).

`export_tflite` writes the model as a SavedModel with a fixed input signature
(the same archive `export_for_serving` writes), then converts it with
`tf.lite.TFLiteConverter` restricted to builtin ops, so the file runs with
the stock TFLite runtime (no Flex delegate).
"""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_factorized import _keras_compat
from keras_factorized.atomic_io import write_bytes
from keras_factorized.export import DEFAULT_INPUT_NAME
from keras_factorized.export import OUTPUT_NAME
from keras_factorized.export import SERVING_SIGNATURE_KEY
from keras_factorized.export import _check_backend
from keras_factorized.export import _named_outputs
from keras_factorized.export import _single_input
from keras_factorized.export import merge_factorized_layers


def _file_exists(path: str, overwrite: bool) -> FileExistsError:
    return FileExistsError(
        f"{path!r} already exists; pass overwrite=True to replace it. "
        f"Received: overwrite={overwrite}"
    )


def _float32_policy(layer):
    """`"float32"`, or `"<mode>_from_float32"` for a quantized layer."""
    mode = getattr(layer, "quantization_mode", None)
    return "float32" if mode is None else f"{mode}_from_float32"


def _float32_copy(model):
    """`model` itself, or a float32 copy when a layer computes in 16 bits.

    TFLite builtin ops have no bfloat16 matrix products, so a model trained
    under a `mixed_bfloat16`/`mixed_float16` policy is converted from a copy
    whose layers compute in float32 (its variables are float32 already). A
    quantized layer (`"int8_from_mixed_bfloat16"`) is copied under
    `"int8_from_float32"`, so its int8 variables stay int8. Variables are
    copied by path, so their order inside a layer does not matter.
    """
    low = ("float16", "bfloat16")
    layers = _keras_compat.flatten_layers(model, include_self=True)
    if not any(layer.compute_dtype in low for layer in layers):
        return model

    def clone_layer(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = _float32_policy(layer)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone_layer)
    _copy_variables(model, copy)
    return copy


def _own_variables(layer) -> dict:
    """The variables `layer` itself holds (not its sub-layers'), by name."""
    inner = {id(v) for sub in _keras_compat.flatten_layers(layer) for v in sub.weights}
    return {v.name: v for v in layer.weights if id(v) not in inner}


def _copy_variables(source, target) -> None:
    """Assigns the variables of `source` to those of its clone `target`, layer
    by layer and by name (their order inside a layer may differ: a layer
    quantized in place adds its int8 variables after its bias), each in
    `target`'s dtype (float32 values stay float32, int8 int8)."""
    pairs = zip(_keras_compat.flatten_layers(source, include_self=True),
                _keras_compat.flatten_layers(target, include_self=True))
    for layer, clone in pairs:
        values, variables = _own_variables(layer), _own_variables(clone)
        if set(values) != set(variables):
            raise ValueError(
                "Cannot make the float32 copy of the model for TFLite: layer "
                f"{layer.name!r} holds the variables {sorted(values)}, its float32 "
                f"copy {sorted(variables)}."
            )
        for name, variable in variables.items():
            value = np.asarray(keras.ops.convert_to_numpy(values[name]))
            variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def _keras_int8_dense_layers(model) -> list[str]:
    """Names of Keras's own `Dense`/`EinsumDense` layers that are quantized."""
    return [
        layer.name for layer in _keras_compat.flatten_layers(model)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
        and getattr(layer, "quantization_mode", None) is not None
    ]  # fmt: skip


def export_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    batch_size: int | None = 1,
    sequence_length: int | None = None,
    merge_factors: bool = False,
    optimize: bool = False,
    overwrite: bool = True,
) -> str:
    """Converts `model` to a TFLite flatbuffer using builtin ops only.

    The model is first written as a SavedModel with a fixed input signature
    (`keras.export.ExportArchive`), then converted by
    `tf.lite.TFLiteConverter.from_saved_model` with
    `supported_ops=[TFLITE_BUILTINS]`: no Flex delegate (`SELECT_TF_OPS`) is
    needed, so the file runs in the stock TFLite/LiteRT interpreters.

    Which Keras 3 LSTM configurations reach builtin ops (TF 2.21, checked
    with `Embedding`/`FactorizedEmbedding` + `LSTM` + `Dense`):

    - `LSTM(unroll=False)` (the default) converts when the batch size AND the
      sequence length are fixed: the loop becomes a builtin `WHILE` with
      `FULLY_CONNECTED` cells. This is the default here (`batch_size=1`, the
      sequence length from the model's input), and gives the smallest file
      and fastest conversion.
    - A dynamic batch (`batch_size=None`) fails for non-unrolled LSTMs
      (`tf.TensorListReserve` needs a static element shape); it works with
      `LSTM(unroll=True)` at the cost of a larger file and a much slower
      conversion (seconds per hundred steps).
    - Converting from a concrete function
      (`TFLiteConverter.from_concrete_functions`) instead of a SavedModel
      fails at run time for non-unrolled LSTMs (`READ_VARIABLE` on a
      missing variable), which is why this function goes through a
      SavedModel.

    A `TextVectorization` layer cannot become TFLite builtin ops (string
    splitting and hash-table lookups are Flex ops): the TFLite model takes
    token ids, so vectorize on the device (or export the model without its
    vectorization layer). Models with a string input raise a `ValueError`.

    Args:
        model: A built, single-input Keras model.
        path: Where to write the `.tflite` file.
        batch_size: Fixed batch size of the TFLite model's input. Defaults to
            1 (what a phone runs). `None` makes it dynamic, which needs
            `unroll=True` on the model's LSTMs.
        sequence_length: Sequence length to fix when the model's input has
            `None` there. Defaults to the model's own.
        merge_factors: Whether to merge factorized layers into plain ones
            first (see `merge_factorized_layers`). Defaults to `False`.
        optimize: Whether to apply `tf.lite.Optimize.DEFAULT` (dynamic-range
            int8 weight quantization: about 4x smaller, less exact).
            Defaults to `False`.
        overwrite: Whether to replace an existing file (atomically, like
            `model.save`). Defaults to `True`.

    Returns:
        `path`, as a string.

    Example:

    >>> import os, tempfile, warnings, keras, numpy as np
    >>> from keras_factorized import FactorizedEmbedding
    >>> model = keras.Sequential([
    ...     keras.Input((20,), dtype="int32"),
    ...     FactorizedEmbedding(1000, 32, rank=4, mask_zero=True),
    ...     keras.layers.LSTM(8),
    ...     keras.layers.Dense(1, activation="sigmoid"),
    ... ])
    >>> path = export_tflite(model, os.path.join(tempfile.mkdtemp(), "m.tflite"))
    >>> with warnings.catch_warnings():  # tf.lite.Interpreter is deprecated
    ...     warnings.simplefilter("ignore")
    ...     runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    >>> token_ids = np.arange(1, 21, dtype="int32")
    >>> runner(inputs=token_ids[None])["predictions"].shape  # batch 1
    (1, 1)
    """
    _check_backend("export_tflite")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            "Received an invalid value for `batch_size`, expected a positive "
            f"integer or None. Received: batch_size={batch_size!r}"
        )
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise _file_exists(path, overwrite)
    model_input = _single_input(model)
    if tf.as_dtype(model_input.dtype) == tf.string:
        raise ValueError(
            "TFLite builtin ops cannot run text vectorization (string "
            "splitting, hash-table lookups): export the model that takes token "
            "ids and vectorize on the device. Received: a model whose input "
            f"dtype is {model_input.dtype}"
        )
    shape = list(model_input.shape)
    shape[0] = batch_size
    for axis in range(1, len(shape)):
        if shape[axis] is None:
            if sequence_length is None or axis != 1:
                raise ValueError(
                    "TFLite needs a fixed input shape: pass `sequence_length` "
                    "(or build the model with a fixed-length keras.Input). "
                    f"Received: model input shape={tuple(model_input.shape)}, "
                    f"sequence_length={sequence_length}"
                )
            shape[axis] = sequence_length

    if merge_factors:
        model = merge_factorized_layers(model)
    model = _float32_copy(model)
    spec = tf.TensorSpec(shape, model_input.dtype, name=DEFAULT_INPUT_NAME)

    def serve(inputs):
        return _named_outputs(model, model(inputs, training=False), OUTPUT_NAME)

    with tempfile.TemporaryDirectory() as saved_model_dir:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            SERVING_SIGNATURE_KEY,
            tf.function(serve, input_signature=[spec], autograph=False),
        )
        archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if optimize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        try:
            flatbuffer = converter.convert()
        except Exception as e:
            int8_dense = _keras_int8_dense_layers(model)
            if int8_dense:
                raise ValueError(
                    "TFLite builtin ops cannot run Keras's own quantized `Dense`/"
                    "`EinsumDense` layers (their int8 matrix product takes int8 "
                    "inputs). Quantize only the factorized layers "
                    "(`layer.quantize(\"int8\")`, or `model.quantize(\"int8\", "
                    "filters=...)`), and pass `optimize=True` for TFLite's own int8 "
                    f"weights. Received: quantized Keras layers {int8_dense}"
                ) from e
            raise ValueError(
                "The model does not convert to TFLite builtin ops. For LSTMs, "
                "keep a fixed batch size (`batch_size=1`) and sequence length, "
                "or build them with `unroll=True` for a dynamic batch. "
                f"Received: batch_size={batch_size}, input shape={tuple(shape)}."
                f" Converter error: {str(e).splitlines()[0] if str(e) else e!r}"
            ) from e
    try:
        # With overwrite=False the rename itself refuses an existing file, so
        # a file that appeared during the conversion is not replaced either.
        write_bytes(path, flatbuffer, overwrite=overwrite)
    except FileExistsError as e:
        raise _file_exists(path, overwrite) from e
    return path
