"""TFLite conversion of the IMDB classifier (`keras_factorized.export.export_tflite`).

Uses the committed fixture of real IMDB reviews (tests/data/imdb_fixture).
"""

import os
import re
import runpy
import tarfile
import warnings

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("TFLite conversion needs the TensorFlow backend", allow_module_level=True)

import tensorflow as tf  # noqa: E402

from keras_factorized import _keras_compat  # noqa: E402
from keras_factorized import export  # noqa: E402

# The classifier of the IMDB example (a script beside the library).
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "imdb_lstm", "imdb_lstm.py")
build_classifier = runpy.run_path(EXAMPLE)["build_model"]

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "imdb_fixture", "aclImdb_mini.tar.gz")
MEMBER = re.compile(r"aclImdb/(train|test)/(neg|pos)/[^/]+\.txt$")
VOCAB, LENGTH = 2000, 80
# Both sides compute in float32; TFLite's FULLY_CONNECTED kernels sum in a
# different order than TensorFlow's MatMul, and the LSTM carries those
# rounding differences through LENGTH steps. Observed differences are ~1e-7;
# 1e-5 is the bar TF Serving exports meet too, and a real conversion bug
# (a wrong gate order, a lost mask) moves probabilities by 1e-2 or more.
ATOL = 1e-5


def read_reviews():
    reviews = {"train": ([], []), "test": ([], [])}
    with tarfile.open(FIXTURE, "r:gz") as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            match = MEMBER.match(member.name)
            if match:
                split, label = match.groups()
                text = archive.extractfile(member).read().decode("utf-8")
                reviews[split][0].append(text.replace("<br />", " "))
                reviews[split][1].append(float(label == "pos"))
    return reviews


def interpret(path, ids):
    """Runs the TFLite model on each row (its batch size is 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner("serving_default")
    outputs = [runner(inputs=row[None])["predictions"] for row in ids]
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    return np.concatenate(outputs), ops


@pytest.fixture(scope="module")
def trained():
    """A FactorizedEmbedding classifier trained briefly on real reviews."""
    reviews = read_reviews()
    vectorizer = keras.layers.TextVectorization(max_tokens=VOCAB, output_sequence_length=LENGTH)
    vectorizer.adapt(reviews["train"][0])
    keras.utils.set_random_seed(0)
    model = build_classifier(VOCAB, LENGTH, embedding_dim=16, lstm_units=8, rank=4)
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    x = keras.ops.convert_to_numpy(vectorizer(reviews["train"][0])).astype("int32")
    model.fit(x, np.array(reviews["train"][1]), batch_size=32, epochs=2, verbose=0)
    test_texts = reviews["test"][0][:: max(1, len(reviews["test"][0]) // 8)][:8]
    test_ids = keras.ops.convert_to_numpy(vectorizer(test_texts)).astype("int32")
    return model, test_ids


def test_factorized_classifier_runs_on_builtin_ops(trained, tmp_path):
    model, ids = trained
    path = export.export_tflite(model, tmp_path / "imdb.tflite")
    assert path == str(tmp_path / "imdb.tflite")
    served, ops = interpret(path, ids)
    # Builtin ops only: no Flex (TF) ops, no custom ops; the LSTM is a WHILE.
    assert not any(op.startswith("Flex") or op == "CUSTOM" for op in ops), ops
    assert {"GATHER", "WHILE"} <= ops
    expected = model.predict(ids, verbose=0)
    assert np.ptp(expected) > 1e-3  # the reviews get different scores
    np.testing.assert_allclose(served, expected, atol=ATOL, rtol=0)
    assert [f for f in os.listdir(tmp_path) if f != "imdb.tflite"] == []


def test_merged_conversion_matches(trained, tmp_path):
    model, ids = trained
    path = export.export_tflite(model, tmp_path / "merged.tflite", merge_factors=True)
    served, _ = interpret(path, ids)
    np.testing.assert_allclose(served, model.predict(ids, verbose=0), atol=ATOL, rtol=0)


def test_dynamic_batch_with_unrolled_lstm(trained, tmp_path):
    model, ids = trained
    length = 12
    unrolled = build_classifier(VOCAB, length, embedding_dim=16, lstm_units=8, rank=4, lstm_unroll=True)
    unrolled.set_weights(model.get_weights())
    path = export.export_tflite(unrolled, tmp_path / "unrolled.tflite", batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    batch = ids[:, :length]
    served = runner(inputs=batch)["predictions"]
    assert served.shape == (len(batch), 1)
    np.testing.assert_allclose(served, unrolled.predict(batch, verbose=0), atol=ATOL, rtol=0)


def test_dynamic_batch_without_unroll_explains(trained, tmp_path):
    model, _ = trained
    with pytest.raises(ValueError, match="unroll=True"):
        export.export_tflite(model, tmp_path / "x.tflite", batch_size=None)
    assert os.listdir(tmp_path) == []


def test_invalid_models_and_arguments(tmp_path):
    text_in = keras.Input((1,), dtype="string")
    vectorizer = keras.layers.TextVectorization(max_tokens=10, output_sequence_length=4)
    vectorizer.adapt(["a b c"])
    ids_model = build_classifier(10, 4, embedding_dim=4, lstm_units=2, rank=2)
    string_model = keras.Model(text_in, ids_model(vectorizer(text_in)))
    with pytest.raises(ValueError, match="token ids"):
        export.export_tflite(string_model, tmp_path / "x.tflite")
    variable_length = build_classifier(10, None, embedding_dim=4, lstm_units=2, rank=2)
    with pytest.raises(ValueError, match="sequence_length"):
        export.export_tflite(variable_length, tmp_path / "x.tflite")
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        export.export_tflite(ids_model, tmp_path / "x.tflite", batch_size=0)
    (tmp_path / "x.tflite").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        export.export_tflite(ids_model, tmp_path / "x.tflite", overwrite=False)
    assert (tmp_path / "x.tflite").read_bytes() == b"keep me"


def test_mixed_precision_model_converts_through_a_float32_copy(tmp_path):
    # TFLite builtins have no bfloat16 matmul: the converter gets a float32 copy.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_classifier(200, 12, 8, 4, rank=2)
    keras.mixed_precision.set_global_policy("float32")
    ids = np.random.default_rng(0).integers(1, 200, size=(1, 12)).astype("int32")
    path = export.export_tflite(model, os.path.join(tmp_path, "m.tflite"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    got = runner(inputs=ids)["predictions"]
    expected = keras.ops.convert_to_numpy(model(ids)).astype("float32")
    # The Keras model computes in bfloat16 (8 bits of mantissa), TFLite in float32.
    np.testing.assert_allclose(got, expected, atol=2e-2)
    assert any(layer.compute_dtype == "bfloat16" for layer in _keras_compat.flatten_layers(model, include_self=True))


def test_quantized_mixed_precision_model_keeps_int8_factors(tmp_path):
    # A mixed_bfloat16 model quantized to int8 ("int8_from_mixed_bfloat16"):
    # the float32 copy is quantized too ("int8_from_float32"), so the TFLite
    # file holds the int8 factor A (gathered row by row), not float32 values.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_classifier(200, 12, 8, 4, rank=2)
    keras.mixed_precision.set_global_policy("float32")
    float_path = export.export_tflite(model, os.path.join(tmp_path, "float.tflite"))
    embedding = model.get_layer("embedding")
    embedding.quantize("int8")
    assert embedding.dtype_policy.name == "int8_from_mixed_bfloat16"
    ids = np.random.default_rng(0).integers(1, 200, size=(1, 12)).astype("int32")
    path = export.export_tflite(model, os.path.join(tmp_path, "int8.tflite"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=path)
    int8_shapes = [tuple(t["shape"]) for t in interpreter.get_tensor_details()
                   if t["dtype"] == np.int8]
    assert (200, 2) in int8_shapes
    got = interpreter.get_signature_runner()(inputs=ids)["predictions"]
    expected = keras.ops.convert_to_numpy(model(ids)).astype("float32")
    np.testing.assert_allclose(got, expected, atol=2e-2)  # bfloat16 Keras, float32 TFLite
    # 400 entries of A: 1,600 float32 bytes become 400 int8 bytes.
    assert os.path.getsize(path) <= os.path.getsize(float_path) - 1000
    assert embedding.dtype_policy.name == "int8_from_mixed_bfloat16"  # the model is unchanged
    version = export.export_for_serving(model, os.path.join(tmp_path, "serving"))
    served = tf.saved_model.load(version).signatures["serving_default"]
    np.testing.assert_allclose(served(inputs=tf.constant(ids))["predictions"].numpy(), expected,
                               atol=1e-2)
