"""int8 factors through Keras's quantization API (`quantize("int8")`).

quantize -> predict -> save -> load -> export, for each layer and for
Sequential, functional and KerasHub models (issue 12).
"""

import os
import warnings

import keras
import numpy as np
import pytest
from tiny_models import tiny_bert

from keras_factorized import FactorizedEmbedding
from keras_factorized import LowRankDense
from keras_factorized import LowRankEinsumDense
from keras_factorized.layers import factor_quantization as fq

requires_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="SavedModel/TFLite export is TF-only")

RNG = np.random.default_rng(0)
# Issue 12's goals: int8 factor bytes <= 0.35 of float32, outputs within 3%.
MAX_BYTES_RATIO = 0.35
MAX_RELATIVE_ERROR = 0.03


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _bytes_of(variable):
    return int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize


def _relative_error(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _embedding():
    layer = FactorizedEmbedding(500, 32, rank=8, name="layer")
    layer.build()
    inputs = RNG.integers(0, 500, size=(4, 10)).astype("int32")
    return layer, inputs


def _dense():
    layer = LowRankDense(24, rank=6, activation="relu", name="layer")
    inputs = RNG.normal(size=(4, 40)).astype("float32")
    layer.build(inputs.shape)
    return layer, inputs


def _einsum():
    layer = LowRankEinsumDense("abc,cde->abde", (None, 4, 8), rank=6, bias_axes="de", name="layer")
    inputs = RNG.normal(size=(3, 5, 48)).astype("float32")
    layer.build(inputs.shape)
    return layer, inputs


LAYERS = {"embedding": _embedding, "dense": _dense, "einsum": _einsum}


def _set_random_bias(layer):
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias.assign(RNG.normal(size=bias.shape).astype("float32"))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_quantize_predict_save_load(name, tmp_path):
    layer, inputs = LAYERS[name]()
    _set_random_bias(layer)
    want = _np(layer(inputs))
    float_bytes = sum(_bytes_of(v) for v in layer._factor_variables())
    layer.quantize("int8")
    assert layer.quantization_mode == "int8"
    assert layer.dtype_policy.name == "int8_from_float32"
    a, b = layer._factor_variables()
    assert str(a.dtype) == "int8" and str(b.dtype) == "int8"
    assert not a.trainable and not b.trainable
    scale = getattr(layer, layer._scale_name)
    assert tuple(scale.shape) == tuple(b.shape[1:])  # one scale per output column
    factor_bytes = sum(_bytes_of(v) for v in layer._quantized_variables())
    assert factor_bytes <= MAX_BYTES_RATIO * float_bytes
    got = _np(layer(inputs))
    assert _relative_error(got, want) < MAX_RELATIVE_ERROR

    model = keras.Sequential([keras.Input(inputs.shape[1:], dtype=inputs.dtype), layer])
    path = os.path.join(tmp_path, "quantized.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].quantization_mode == "int8"
    np.testing.assert_array_equal(_np(loaded(inputs)), got)
    for saved, restored in zip(model.weights, loaded.weights):
        assert saved.path == restored.path and str(saved.dtype) == str(restored.dtype)
        np.testing.assert_array_equal(_np(saved), _np(restored))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_merge_of_a_quantized_layer_dequantizes(name):
    layer, inputs = LAYERS[name]()
    _set_random_bias(layer)
    layer.quantize("int8")
    expected = _np(layer(inputs))
    merged = layer.merge()
    assert merged.quantization_mode is None
    assert merged.dtype_policy.name == "float32"
    np.testing.assert_allclose(_np(merged(inputs)), expected, rtol=1e-5, atol=1e-5)
    a, b = layer.factors()
    assert a.dtype == np.float32
    kernel = _np(merged.embeddings if name == "embedding" else merged.kernel)
    np.testing.assert_allclose(layer._kernel_from_matrix(a @ b), kernel, rtol=1e-5, atol=1e-6)


def test_quantize_factors_layout_and_error():
    a = RNG.normal(size=(300, 4)) * np.exp(RNG.normal(size=(300, 1)) * 0.3)
    b = RNG.normal(size=(4, 20))
    q = fq.quantize_factors(a, b)
    assert q.a.dtype == np.int8 and q.b.dtype == np.int8
    assert q.a.shape == (300, 4) and q.b.shape == (4, 20) and q.b_scale.shape == (20,)
    assert np.abs(q.a).max() == 127 and np.abs(q.b).max() == 127
    a_d, b_d = fq.dequantize_factors(q)
    error = np.linalg.norm(a_d @ b_d - a @ b) / np.linalg.norm(a @ b)
    assert 0 < error < 0.02
    # Multi-axis B (EinsumDense): one scale per output position.
    q3 = fq.quantize_factors(a, RNG.normal(size=(4, 5, 6)))
    assert q3.b_scale.shape == (5, 6)
    with pytest.raises(ValueError, match="`b`"):
        fq.quantize_factors(a, b[:3])


def test_zero_factor_quantizes_to_zero():
    q = fq.quantize_factors(np.zeros((5, 2)), np.zeros((2, 3)))
    a, b = fq.dequantize_factors(q)
    assert np.all(a @ b == 0) and np.all(np.isfinite(b))


@pytest.mark.parametrize("mode", ["float8", "int4"])
def test_unsupported_modes_name_the_supported_ones(mode):
    layer, _ = _dense()
    # Keras 3.10 knows no "int4" and refuses it first, naming its own modes.
    with pytest.raises(ValueError, match=r"'int8'.*Received: mode='?" + mode):
        layer.quantize(mode)
    assert layer.quantization_mode is None and str(layer.kernel_a.dtype) == "float32"


def test_unsupported_mode_is_skipped_by_model_quantize():
    model = keras.Sequential([keras.Input((8,)), LowRankDense(4, rank=2, name="low")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.quantize("float8")
    assert any("'int8'" in str(w.message) for w in caught)
    assert model.get_layer("low").quantization_mode is None


def test_quantize_errors():
    layer, _ = _dense()
    layer.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        layer.quantize("int8")
    with pytest.raises(ValueError, match="quantized"):
        layer.set_factors(np.ones((40, 6)), np.ones((6, 24)))
    with pytest.raises(ValueError, match="isn't yet built"):
        LowRankDense(4, rank=2).quantize("int8")


def test_subclasses_are_refused_unless_type_check_is_off():
    class MyDense(LowRankDense):
        pass

    layer = MyDense(4, rank=2)
    layer.build((None, 8))
    with pytest.raises(NotImplementedError, match="quantize"):
        layer.quantize("int8")
    layer.quantize("int8", type_check=False)
    assert layer.quantization_mode == "int8"


def test_custom_weight_quantizer_is_refused():
    config_class = getattr(keras.quantizers, "Int8QuantizationConfig", None)
    if config_class is None:
        pytest.skip("QuantizationConfig needs Keras >= 3.11")
    layer, _ = _dense()
    config = config_class(weight_quantizer=keras.quantizers.AbsMaxQuantizer(axis=0))
    with pytest.raises(ValueError, match="`config`"):
        layer.quantize("int8", config=config)


def _imdb_like(rank=4):
    return keras.Sequential([
        keras.Input((12,), dtype="int32"),
        FactorizedEmbedding(300, 16, rank=rank, mask_zero=True, name="embedding"),
        keras.layers.LSTM(8, name="lstm"),
        keras.layers.Dense(1, activation="sigmoid", name="classifier"),
    ])


def test_sequential_model_quantize_fit_save_load(tmp_path):
    model = _imdb_like()
    ids = RNG.integers(1, 300, size=(16, 12)).astype("int32")
    want = _np(model(ids))
    model.quantize("int8")
    embedding = model.get_layer("embedding")
    assert embedding.quantization_mode == "int8"
    assert model.get_layer("classifier").quantization_mode == "int8"  # Keras's own
    got = _np(model.predict(ids, verbose=0))
    assert _relative_error(got, want) < MAX_RELATIVE_ERROR
    model.compile("adam", "binary_crossentropy")
    history = model.fit(ids, np.ones((16, 1)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    got = _np(model.predict(ids, verbose=0))
    path = os.path.join(tmp_path, "imdb.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(_np(loaded.predict(ids, verbose=0)), got)


def test_functional_model_and_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    inputs = keras.Input((6, 20))
    x = LowRankDense(16, rank=4, name="low")(inputs)
    x = LowRankEinsumDense("abc,cd->abd", (6, 8), rank=4, bias_axes="d", name="ein")(x)
    model = keras.Model(inputs, x)
    data = RNG.normal(size=(2, 6, 20)).astype("float32")
    want = _np(keras.ops.cast(model(data), "float32"))
    model.quantize("int8")
    layer = model.get_layer("ein")
    assert layer.dtype_policy.name == "int8_from_mixed_bfloat16"
    output = model(data)
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    got = _np(keras.ops.cast(output, "float32"))
    assert _relative_error(got, want) < 0.05  # bfloat16 outputs: 8 bits of mantissa


def _bert_inputs(n=4, seq=16):
    mask = np.ones((n, seq), "int32")
    mask[:, seq - 3:] = 0
    return {"token_ids": RNG.integers(1, 100, size=(n, seq)).astype("int32"),
            "segment_ids": np.zeros((n, seq), "int32"), "padding_mask": mask}


def test_factorized_keras_hub_backbone_quantize_save_load(tmp_path):
    pytest.importorskip("keras_hub")
    from keras_factorized import factorize

    small = factorize(tiny_bert(), rank=8, include=r"self_attention_layer/(query|key|value)$")
    x = _bert_inputs()
    want = _np(small(x)["sequence_output"])
    small.quantize("int8")
    attention = small.get_layer("transformer_layer_0")._self_attention_layer
    assert isinstance(attention._query_dense, LowRankEinsumDense)
    assert attention._query_dense.quantization_mode == "int8"
    got = _np(small(x)["sequence_output"])
    # Layer norms keep the outputs' scale; Keras's int8 Dense layers (with
    # quantized activations) add most of this error.
    assert _relative_error(got, want) < 0.1
    path = os.path.join(tmp_path, "bert.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    query = loaded.get_layer("transformer_layer_1")._self_attention_layer._query_dense
    assert isinstance(query, LowRankEinsumDense) and query.quantization_mode == "int8"
    np.testing.assert_array_equal(_np(loaded(x)["sequence_output"]), got)


@requires_tensorflow
def test_quantized_model_exports_for_serving(tmp_path):
    import tensorflow as tf

    from keras_factorized import export

    model = _imdb_like(rank=4)
    ids = RNG.integers(1, 300, size=(2, 12)).astype("int32")
    model.quantize("int8")
    want = _np(model(ids))
    version_dir = export.export_for_serving(model, os.path.join(tmp_path, "serving"))
    served = tf.saved_model.load(version_dir).signatures["serving_default"]
    np.testing.assert_allclose(served(inputs=tf.constant(ids))["predictions"].numpy(), want,
                               atol=1e-6)
    merged = export.export_for_serving(model, os.path.join(tmp_path, "merged"),
                                       merge_factors=True)
    served = tf.saved_model.load(merged).signatures["serving_default"]
    np.testing.assert_allclose(served(inputs=tf.constant(ids))["predictions"].numpy(), want,
                               atol=1e-5)


@requires_tensorflow
def test_quantized_factors_export_to_tflite(tmp_path):
    import tensorflow as tf

    from keras_factorized import export

    model = _imdb_like(rank=4)
    ids = RNG.integers(1, 300, size=(1, 12)).astype("int32")
    float_path = export.export_tflite(model, os.path.join(tmp_path, "float.tflite"))
    # Only the factors: Keras's own int8 `Dense` multiplies int8 inputs, which
    # TFLite builtin ops refuse (see docs/quantization.md).
    model.get_layer("embedding").quantize("int8")
    want = _np(model(ids))
    path = export.export_tflite(model, os.path.join(tmp_path, "int8.tflite"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
    np.testing.assert_allclose(runner(inputs=ids)["predictions"], want, atol=1e-5)
    # 300 x 4 factor entries: 4800 float32 bytes become 1200 int8 bytes.
    assert os.path.getsize(path) <= os.path.getsize(float_path) - 3000


@requires_tensorflow
def test_tflite_of_keras_int8_dense_names_the_layers(tmp_path):
    from keras_factorized import export

    model = keras.Sequential([keras.Input((8,)), LowRankDense(16, rank=2, name="low"),
                              keras.layers.Dense(4, name="head")])
    model.quantize("int8")
    with pytest.raises(ValueError, match=r"quantized Keras layers \['head'\]"):
        export.export_tflite(model, os.path.join(tmp_path, "m.tflite"))
    assert os.listdir(tmp_path) == []


def _tflite_runner(path):
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=path)
    tensors = [(tuple(t["shape"]), np.dtype(t["dtype"])) for t in interpreter.get_tensor_details()]
    return interpreter.get_signature_runner(), tensors


def _export_layer(name):
    """A layer whose factor `A` has 4,000+ entries: the TFLite converter folds
    smaller constants (2,048 entries or fewer in our checks, TF 2.21), casting
    an int8 factor into a float32 constant."""
    rng = np.random.default_rng(7)
    if name == "embedding":
        layer = FactorizedEmbedding(1000, 32, rank=4, name="layer")
        layer.build()
        return layer, rng.integers(0, 1000, size=(2, 10)).astype("int32")
    if name == "dense":
        layer = LowRankDense(512, rank=8, activation="relu", name="layer")
        inputs = rng.normal(size=(2, 512)).astype("float32")
    else:
        layer = LowRankEinsumDense("abc,cde->abde", (None, 8, 64), rank=8, bias_axes="de",
                                   name="layer")
        inputs = rng.normal(size=(2, 5, 512)).astype("float32")
    layer.build(inputs.shape)
    return layer, inputs


@requires_tensorflow
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_quantize_save_load_export(name, policy, tmp_path):
    """quantize -> predict -> save -> load -> SavedModel and TFLite, per layer.

    Under `mixed_bfloat16` the layer computes in bfloat16; its TFLite file is
    made from a float32 copy that keeps the int8 variables.
    """
    import tensorflow as tf

    from keras_factorized import export

    keras.mixed_precision.set_global_policy(policy)
    layer, inputs = _export_layer(name)
    keras.mixed_precision.set_global_policy("float32")
    _set_random_bias(layer)
    model = keras.Sequential([keras.Input(inputs.shape[1:], dtype=inputs.dtype), layer])
    float_tflite = export.export_tflite(model, os.path.join(tmp_path, "float.tflite"))
    model.quantize("int8")
    assert layer.dtype_policy.name == f"int8_from_{policy}"
    want = _np(keras.ops.cast(model(inputs[:1]), "float32"))
    predicted = _np(keras.ops.cast(model.predict(inputs[:1], verbose=0), "float32"))
    assert _relative_error(predicted, want) < (1e-5 if policy == "float32" else 0.02)
    path = os.path.join(tmp_path, "quantized.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(_np(keras.ops.cast(loaded(inputs[:1]), "float32")), want)

    version = export.export_for_serving(loaded, os.path.join(tmp_path, "serving"))
    served = tf.saved_model.load(version).signatures["serving_default"]
    got = served(inputs=tf.constant(inputs[:1]))["predictions"].numpy()
    # bfloat16: the traced graph may round differently from eager by one ulp.
    assert _relative_error(got, want) < (1e-5 if policy == "float32" else 0.02)

    tflite = export.export_tflite(loaded, os.path.join(tmp_path, "int8.tflite"))
    runner, tensors = _tflite_runner(tflite)
    got = runner(inputs=inputs[:1])["predictions"]
    # TFLite computes in float32: exact against a float32 model, within
    # bfloat16's rounding against a bfloat16 one.
    assert _relative_error(got, want) < (1e-5 if policy == "float32" else 0.05)
    a_shape = tuple(loaded.layers[0]._factor_variables()[0].shape)
    assert (a_shape, np.dtype("int8")) in tensors  # int8 in the file, not float32
    # Each int8 entry of A saves 3 bytes of the float32 file.
    assert os.path.getsize(tflite) <= os.path.getsize(float_tflite) - 2 * int(np.prod(a_shape))
    assert layer.dtype_policy.name == f"int8_from_{policy}"  # the model is left as it was
    assert str(layer._factor_variables()[0].dtype) == "int8"


def test_benchmark_renders_merged_runs(tmp_path):
    import json

    from benchmarks import quantize_benchmark as bench

    def run(model, seed, accuracy):
        sizes = {"embedding_bytes": 100, "keras": 200, "saved_model": 300, "tflite": 150}
        layouts = {"ours": {"bytes": 10, "error": 0.01, "row_error_median": 0.01,
                            "row_error_p99": 0.05}}
        return {"model": model, "seed": seed, "layouts": layouts,
                "float32": {**sizes, "test_accuracy": accuracy, "tflite_optimize": 50},
                "int8": {**sizes, "test_accuracy": accuracy - 0.001}}

    first = {"command": "first", "seeds": [0],
             "runs": [run("baseline", 0, 0.85), run("rank 4", 0, 0.84), run("baseline", 1, 0.86)]}
    second = {"command": "second", "seeds": [1], "runs": [run("baseline", 1, 0.5),
                                                           run("rank 4", 1, 0.86)]}
    paths = []
    for i, results in enumerate((first, second)):
        paths.append(os.path.join(tmp_path, f"{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(results, f)
    merged = bench.merged_results(paths)
    assert len(merged["runs"]) == 4  # (baseline, 1) kept once: the first
    markdown = bench.render_imdb(merged)
    assert "`first` (seeds finished: 0); `second` (seeds finished: 1)" in markdown
    assert "| baseline | float32 | 2 | 85.50 ± 0.71 |" in markdown
    assert "int8 test accuracy +0.10 points below float rank 4" in markdown
    assert "Trained by two of these runs, with different test accuracies" in markdown
    assert "counted once (the first run's): baseline seed 1." in markdown
