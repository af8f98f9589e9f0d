import os

import keras
import numpy as np
import pytest
from tiny_models import Block
from tiny_models import bert_inputs
from tiny_models import tiny_bert

from keras_factorized import FactorizedEmbedding
from keras_factorized import LowRankDense
from keras_factorized import LowRankEinsumDense
from keras_factorized import _keras_compat
from keras_factorized import factorize
from keras_factorized.layers.low_rank_einsum_dense import EinsumFactorization

RNG = np.random.default_rng(0)

requires_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="SavedModel export is TF-only"
)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _make_low_rank(model, rank, seed=0):
    """Gives every Dense/EinsumDense kernel of `model` an exact rank of `rank`,
    so that a rank-`rank` factorization must reproduce the outputs."""
    rng = np.random.default_rng(seed)
    for layer in _keras_compat.flatten_layers(model):
        if type(layer) is keras.layers.Dense:
            m, n = layer.kernel.shape
            layer.kernel.assign(
                rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) / np.sqrt(m * rank)
            )
        elif type(layer) is keras.layers.EinsumDense:
            f = EinsumFactorization(layer.equation)
            shape = tuple(layer.kernel.shape)
            m, n = f.matrix_shape(shape)
            w = rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) / np.sqrt(m * rank)
            layer.kernel.assign(f.from_matrix(w, shape))
    return model


def _mlp():
    return keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(32, activation="relu", name="d1"),
            keras.layers.Dense(16, name="d2"),
            keras.layers.Dense(1, name="head"),
        ]
    )


def _correlated_inputs(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * np.linspace(0.05, 2.0, dim)[None, :]
    return (rng.normal(size=(n, dim)) @ mixing).astype("float32")


def test_sequential_full_rank_reproduces_outputs_and_original_is_untouched():
    model = _make_low_rank(_mlp(), 4)
    x = _correlated_inputs(16, 24)
    before = _weights(model)
    config = model.get_config()
    small = factorize(model, rank=4)
    assert [type(layer) for layer in small.layers] == [
        LowRankDense,
        LowRankDense,
        keras.layers.Dense,
    ]
    np.testing.assert_allclose(_np(small(x)), _np(model(x)), atol=1e-4)
    # The original model keeps its layers, weights and config.
    assert [type(layer) for layer in model.layers] == [keras.layers.Dense] * 3
    for a, b in zip(before, _weights(model)):
        np.testing.assert_array_equal(a, b)
    assert model.get_config() == config


def test_report_lists_every_selected_layer():
    small = factorize(_mlp(), rank=4)
    report = small.factorization_report
    rows = {r.path: r for r in report.layers}
    assert rows["d1"].rank == 4 and rows["d1"].params_after == (24 + 32) * 4 + 32
    assert rows["d1"].params_before == 24 * 32 + 32
    assert 0 < rows["d1"].weight_error < 1
    assert rows["head"].rank is None and "would not save" in rows["head"].note
    text = str(report)
    assert "d1" in text and "kept" in text
    # A kept layer has no factors, so no weight error: "-", not "0.000".
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    column = lines["layer"].index("weight err")
    weight_err = {k: lines[k][column : column + len("weight err")].strip() for k in rows}
    assert weight_err == {"d1": f"{rows['d1'].weight_error:.3f}",
                          "d2": f"{rows['d2'].weight_error:.3f}", "head": "-"}
    as_dict = report.to_dict()
    assert as_dict["params_before"] == report.params_before
    assert len(as_dict["layers"]) == 3
    assert "| d1 |" in report.to_markdown()


def test_functional_model_with_embedding_and_include_exclude():
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(50, 16, name="emb")(inputs)
    h = keras.layers.Dense(16, name="dense_a")(h)
    outputs = keras.layers.Dense(16, name="dense_b")(h)
    model = _make_low_rank(keras.Model(inputs, outputs), 4)
    x = RNG.integers(0, 50, size=(4, 6))
    small = factorize(model, rank=4, exclude="dense_b")
    kinds = {layer.name: type(layer) for layer in small.layers}
    assert kinds["emb"] is FactorizedEmbedding
    assert kinds["dense_a"] is LowRankDense
    assert kinds["dense_b"] is keras.layers.Dense
    only = factorize(model, rank=4, include=[keras.layers.Embedding])
    assert {type(layer) for layer in only.layers[1:]} == {FactorizedEmbedding, keras.layers.Dense}
    exact = factorize(model, rank=4, include="dense")
    np.testing.assert_allclose(_np(exact(x)), _np(model(x)), atol=1e-4)


def test_nested_model_and_layer_holding_layers(tmp_path):
    inner = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16, name="inner_d")], name="inner"
    )
    inputs = keras.Input((16,))
    h = Block(16, name="block")(inputs)
    outputs = inner(h)
    model = _make_low_rank(keras.Model(inputs, outputs), 3)
    x = _correlated_inputs(8, 16)
    small = factorize(model, rank=3)  # the kernels' exact rank: same outputs
    np.testing.assert_allclose(_np(small(x)), _np(model(x)), atol=1e-4)
    block = small.get_layer("block")
    assert isinstance(block.inner, LowRankDense)
    assert isinstance(block.project, LowRankEinsumDense)
    assert isinstance(small.get_layer("inner").layers[0], LowRankDense)
    assert isinstance(model.get_layer("block").inner, keras.layers.Dense)
    # Nested replacements survive saving and loading.
    path = os.path.join(tmp_path, "nested.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("block").project, LowRankEinsumDense)
    np.testing.assert_allclose(_np(loaded(x)), _np(small(x)), atol=1e-6)


def test_keras_hub_bert_full_rank_save_load_and_original_unchanged(tmp_path):
    pytest.importorskip("keras_hub")
    import keras_hub

    bert = _make_low_rank(tiny_bert(), 8)
    x = bert_inputs(8, padded=3)
    before = _weights(bert)
    expected = _np(bert(x)["sequence_output"])
    small = factorize(bert, rank=8, include=r"self_attention_layer/(query|key|value)$")
    assert isinstance(small, keras_hub.models.BertBackbone)
    attention = small.get_layer("transformer_layer_0")._self_attention_layer
    assert isinstance(attention._query_dense, LowRankEinsumDense)
    assert tuple(attention._query_dense.kernel_a.shape) == (32, 8)
    assert isinstance(attention._output_dense, keras.layers.EinsumDense)
    assert small.count_params() == bert.count_params() - 6 * (32 * 32 - 64 * 8)
    np.testing.assert_allclose(_np(small(x)["sequence_output"]), expected, atol=1e-4)
    everything = factorize(bert, rank=8)
    assert isinstance(everything, keras_hub.models.BertBackbone)
    kept = {r.path: r.note for r in everything.factorization_report.layers}
    assert "builds its graph itself" in kept["pooled_dense"]
    np.testing.assert_allclose(_np(everything(x)["sequence_output"]), expected, atol=1e-4)
    for a, b in zip(before, _weights(bert)):
        np.testing.assert_array_equal(a, b)
    path = os.path.join(tmp_path, "bert.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, keras_hub.models.BertBackbone)
    assert isinstance(
        loaded.get_layer("transformer_layer_1")._self_attention_layer._value_dense,
        LowRankEinsumDense,
    )
    np.testing.assert_allclose(
        _np(loaded(x)["sequence_output"]), _np(small(x)["sequence_output"]), atol=1e-6
    )


def test_whitened_beats_svd_on_output_error():
    model = _mlp()
    x = _correlated_inputs(256, 24)
    kwargs = dict(rank=4, include="d1", calibration_data=x)
    svd = factorize(model, method="svd", **kwargs).factorization_report.layers[0]
    white = factorize(model, method="whitened", **kwargs).factorization_report.layers[0]
    assert white.output_error < svd.output_error * 0.9
    assert white.weight_error >= svd.weight_error  # it trades weight error away


def test_whitened_never_worse_than_svd_on_bert_calibration_data():
    pytest.importorskip("keras_hub")
    bert = tiny_bert()
    x = bert_inputs(16, padded=3)
    kwargs = dict(rank=8, calibration_data=x, include=r"self_attention_layer")
    svd = factorize(bert, method="svd", **kwargs).factorization_report
    white = factorize(bert, method="whitened", **kwargs).factorization_report
    for s, w in zip(svd.layers, white.layers):
        assert s.path == w.path
        assert w.output_error <= s.output_error + 1e-6, s.path


def test_param_ratio_budget_is_met_with_greedy_allocation():
    model = _mlp()
    x = _correlated_inputs(128, 24)
    small = factorize(
        model, param_ratio=0.5, method="whitened", calibration_data=x, include="d1|d2"
    )
    report = small.factorization_report
    assert report.param_ratio <= 0.5
    assert report.param_ratio > 0.4  # the budget is spent, not wasted
    uniform = factorize(model, param_ratio=0.5, allocation="uniform", include="d1|d2")
    assert uniform.factorization_report.param_ratio <= 0.5


def test_calibration_data_as_dataset():
    tf = pytest.importorskip("tensorflow")
    model = _mlp()
    x = _correlated_inputs(64, 24)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(64))).batch(16)
    from_ds = factorize(
        model, rank=4, method="whitened", calibration_data=ds, include="d1"
    ).factorization_report.layers[0]
    from_array = factorize(
        model, rank=4, method="whitened", calibration_data=x, include="d1"
    ).factorization_report.layers[0]
    np.testing.assert_allclose(from_ds.output_error, from_array.output_error, rtol=1e-4)


def test_learned_reduces_the_end_to_end_error():
    model = _mlp()
    x = _correlated_inputs(256, 24)
    kwargs = dict(rank=3, calibration_data=x, include="d1|d2")
    white = factorize(model, method="whitened", **kwargs)
    learned = factorize(
        model, method="learned", distillation_epochs=20, learning_rate=3e-3, **kwargs
    )
    target = _np(model(x))
    err_white = np.linalg.norm(_np(white(x)) - target)
    err_learned = np.linalg.norm(_np(learned(x)) - target)
    assert err_learned < err_white
    assert "distillation loss" in learned.factorization_report.notes[0]


def test_factorized_model_trains_with_fit():
    small = factorize(_mlp(), rank=4)
    small.compile("adam", "mse")
    x = _correlated_inputs(32, 24)
    history = small.fit(x, np.zeros((32, 1)), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


@requires_tensorflow
def test_factorized_bert_exports_saved_model(tmp_path):
    pytest.importorskip("keras_hub")
    import tensorflow as tf

    bert = tiny_bert()
    small = factorize(bert, rank=8, include=r"self_attention_layer")
    x = bert_inputs(2, padded=3)
    path = os.path.join(tmp_path, "saved")
    small.export(path, format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(path)
    out = served.serve({k: tf.constant(v) for k, v in x.items()})
    np.testing.assert_allclose(
        out["sequence_output"].numpy(), _np(small(x)["sequence_output"]), atol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "`rank`"),
        (dict(rank=2.5), "`rank`"),
        (dict(param_ratio=1.5), "`param_ratio`"),
        (dict(energy=0.0), "`energy`"),
        (dict(rank=2, method="qr"), "`method`"),
        (dict(rank=2, method="whitened"), "`calibration_data`"),
        (dict(param_ratio=0.5, allocation="best"), "`allocation`"),
        (dict(rank=2, include="("), "`include`"),
        (dict(rank=2, method="learned"), "`distillation_data`"),
        (dict(rank=2, distillation_trainable="some"), "`distillation_trainable`"),
        (dict(), "exactly one of"),
        (dict(rank=2, energy=0.5), "exactly one of"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        factorize(_mlp(), **kwargs)


def test_include_must_be_a_pattern_or_class():
    with pytest.raises(TypeError, match="`include`"):
        factorize(_mlp(), rank=2, include=3)


def test_bias_correction_lowers_the_layer_output_error():
    inputs = keras.Input((16,))
    outputs = keras.layers.Dense(16, bias_initializer="ones", name="d")(inputs)
    model = keras.Model(inputs, outputs)
    x = _correlated_inputs(256, 16) + 3.0  # inputs with a large mean
    kwargs = dict(rank=3, method="whitened", calibration_data=x)
    plain = factorize(model, **kwargs).factorization_report.layers[0]
    corrected = factorize(model, bias_correction=True, **kwargs).factorization_report
    assert corrected.layers[0].output_error < plain.output_error


@requires_tensorflow
def test_text_vectorization_vocabulary_survives_the_copy():
    from keras_factorized.decomposition import low_rank_approximation

    texts = np.array(["a good film", "a bad film", "good good", "bad plot"])
    vectorizer = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=4)
    vectorizer.adapt(texts)
    inputs = keras.Input((), dtype="string")
    hidden = keras.layers.Embedding(20, 16, name="embedding")(vectorizer(inputs))
    outputs = keras.layers.Dense(1, name="head")(keras.layers.GlobalAveragePooling1D()(hidden))
    model = keras.Model(inputs, outputs)
    small = factorize(model, rank=2, include="embedding")
    assert isinstance(small.get_layer("embedding"), FactorizedEmbedding)
    # The copy looks words up in the same vocabulary ("Table not initialized" before).
    ids = keras.ops.convert_to_numpy(vectorizer(texts))
    table = low_rank_approximation(
        keras.ops.convert_to_numpy(model.get_layer("embedding").embeddings).astype("float64"), 2
    )
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.get_layer("head").weights)
    expected = table[ids].mean(axis=1) @ kernel + bias
    np.testing.assert_allclose(keras.ops.convert_to_numpy(small(texts)), expected, atol=1e-5)


@pytest.mark.parametrize(
    "filters",
    [
        "d1",
        ["d1"],
        [r"d1$", keras.layers.Embedding],
        lambda layer: layer.name == "d1",
    ],
)
def test_filters_select_layers_by_regex_list_or_callable(filters):
    small = factorize(_mlp(), rank=4, filters=filters)
    assert [type(layer) for layer in small.layers] == [
        LowRankDense,
        keras.layers.Dense,
        keras.layers.Dense,
    ]


def test_filters_combine_with_include_and_exclude():
    small = factorize(_mlp(), rank=4, filters=keras.layers.Dense, include="d", exclude="d2")
    assert [type(layer) for layer in small.layers] == [
        LowRankDense,
        keras.layers.Dense,
        keras.layers.Dense,
    ]


def test_config_objects_match_the_legacy_keyword_arguments():
    from keras_factorized.surgery import WhitenedConfig

    model = _mlp()
    x = _correlated_inputs(128, 24)
    kwargs = dict(rank=3, method="whitened", calibration_data=x, include="d1")
    legacy = factorize(model, damping=0.1, bias_correction=True, **kwargs)
    config = factorize(model, whitening=WhitenedConfig(damping=0.1, bias_correction=True), **kwargs)
    for a, b in zip(_weights(legacy), _weights(config)):
        np.testing.assert_array_equal(a, b)


def test_distillation_config_trains_like_the_legacy_arguments():
    from keras_factorized.surgery import DistillationConfig

    model = _mlp()
    x = _correlated_inputs(64, 24)
    kwargs = dict(rank=3, method="learned", include="d1|d2")
    legacy = factorize(
        model, distillation_data=x, distillation_epochs=2, learning_rate=1e-3, **kwargs
    )
    # The legacy arguments distil at `factorize`'s `batch_size` (32).
    config = DistillationConfig(data=x, epochs=2, learning_rate=1e-3, batch_size=32)
    config = factorize(model, distillation=config, **kwargs)
    np.testing.assert_allclose(_np(legacy(x)), _np(config(x)), atol=1e-5)


def test_learned_without_a_config_distils_like_the_default_config():
    """No `distillation` and no legacy argument: `DistillationConfig()`,
    batch size included (not `factorize`'s `batch_size`)."""
    from keras_factorized.surgery import DistillationConfig

    model = _mlp()
    x = _correlated_inputs(64, 24)
    kwargs = dict(rank=3, method="learned", calibration_data=x, include="d1|d2", batch_size=32)
    implicit = factorize(model, **kwargs)
    explicit = factorize(model, distillation=DistillationConfig(), **kwargs)
    at_32 = factorize(model, distillation=DistillationConfig(batch_size=32), **kwargs)
    for a, b in zip(_weights(implicit), _weights(explicit)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(implicit), _weights(at_32)))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(damping=0.1, whitening="strong"), TypeError, "`whitening`"),
        (dict(damping=-1.0), ValueError, "`damping`"),
        (dict(distillation_epochs=-1), ValueError, "`distillation_epochs`"),
        (dict(learning_rate=0.0), ValueError, "`learning_rate`"),
        (dict(unknown_option=1), TypeError, "unknown_option"),
        (dict(filters=3), TypeError, "`filters`"),
    ],
)
def test_invalid_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        factorize(_mlp(), rank=2, **kwargs)


def test_legacy_argument_and_config_object_together_are_rejected():
    from keras_factorized.surgery import WhitenedConfig

    with pytest.raises(ValueError, match="`damping`.*WhitenedConfig"):
        factorize(_mlp(), rank=2, damping=0.1, whitening=WhitenedConfig())


def test_calibration_restores_the_layer_calls_when_the_model_fails():
    from keras_factorized.surgery import calibration
    from keras_factorized.surgery import selection

    model = _mlp()
    targets, _ = selection.find_targets(model, model, selection.selection())
    with pytest.raises(ValueError):
        calibration.collect_statistics(model, targets, np.ones((4, 7), "float32"), 4)
    assert all("call" not in vars(layer) for layer in model.layers)


def test_walk_layers_reaches_layers_held_in_attributes():
    from keras_factorized.surgery import walk_layers

    inputs = keras.Input((16,))
    model = keras.Model(inputs, Block(16, name="block")(inputs))
    paths = [path for path, _ in walk_layers(model)]
    assert len(paths) == len(set(paths)) == 4  # input, block, inner, project
    assert any(path.endswith("block") for path in paths)
    assert sum("block/" in path for path in paths) == 2


def test_reversible_embedding_is_kept_with_a_reason():
    pytest.importorskip("keras_hub")
    bert = tiny_bert()
    report = factorize(bert, rank=4).factorization_report
    rows = {r.path: r for r in report.layers}
    token = [r for path, r in rows.items() if path.endswith("token_embedding")]
    assert len(token) == 1 and token[0].rank is None
    assert "output projection" in token[0].note


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(rank=4), "fixed rank"),
        (dict(energy=0.5), "energy 0.5: smallest rank keeping this fraction of the spectrum"),
        (dict(param_ratio=0.5, allocation="uniform"), "uniform ratio"),
        (dict(param_ratio=0.5, allocation="greedy"),
         "greedy: relative squared error removed per parameter"),
        (dict(param_ratio=0.5), "sensitivity: marginal output error per parameter"),
    ],
)
def test_report_says_why_each_layer_has_its_rank(kwargs, reason):
    x = _correlated_inputs(64, 24)
    small = factorize(_mlp(), calibration_data=x, **kwargs)
    rows = {r.path: r for r in small.factorization_report.layers}
    assert rows["d1"].rank is not None and rows["d1"].allocation == reason
    assert rows["head"].rank is None
    assert rows["head"].allocation == "kept: factorizing saves nothing"
    assert reason in str(small.factorization_report)
    sensitivity = "allocation" not in kwargs and "param_ratio" in kwargs
    assert (rows["d1"].sensitivity is not None) == sensitivity


def test_report_gives_the_model_output_error_after_each_step():
    """Oracle: the report's model output error is `||Y' - Y|| / ||Y||` on the
    calibration data; for `learned`, before and after distillation."""
    model = _mlp()
    x = _correlated_inputs(64, 24)
    from keras_factorized.surgery import DistillationConfig
    from keras_factorized.surgery import WhitenedConfig

    small = factorize(model, rank=3, method="whitened", calibration_data=x,
                      whitening=WhitenedConfig(sequential=False))
    errors = small.factorization_report.output_errors
    expected = np.linalg.norm(_np(small(x)) - _np(model(x))) / np.linalg.norm(_np(model(x)))
    assert list(errors) == ["factorized"]
    np.testing.assert_allclose(errors["factorized"], expected, rtol=1e-4)
    learned = factorize(model, rank=3, method="learned", calibration_data=x,
                        whitening=WhitenedConfig(sequential=False),
                        distillation=DistillationConfig(epochs=2, learning_rate=1e-3))
    report = learned.factorization_report
    assert list(report.output_errors) == ["factorized", "distilled"]
    np.testing.assert_allclose(report.output_errors["factorized"], expected, rtol=1e-4)
    after = np.linalg.norm(_np(learned(x)) - _np(model(x))) / np.linalg.norm(_np(model(x)))
    np.testing.assert_allclose(report.output_errors["distilled"], after, rtol=1e-4)
    assert "factorized" in report.output_error_line() and "distilled" in str(report)
    assert factorize(model, rank=3).factorization_report.output_errors == {}


def test_report_writes_json_markdown_csv_and_text(tmp_path):
    import csv
    import json

    report = factorize(_mlp(), rank=4, calibration_data=_correlated_inputs(32, 24))
    report = report.factorization_report
    for suffix in (".json", ".md", ".csv", ".txt"):
        report.write(tmp_path / f"report{suffix}")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["layers"][0]["allocation"] == "fixed rank"
    assert data["settings"] == {"rank": 4} and "factorized" in data["output_errors"]
    assert "| d1 |" in (tmp_path / "report.md").read_text()
    with open(tmp_path / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["d1", "d2", "head"]
    assert rows[0]["shape"] == "24x32" and rows[0]["rank"] == "4"
    assert (tmp_path / "report.txt").read_text() == str(report) + "\n"
    with pytest.raises(ValueError, match=r"`path`.*\.json.*Received: path="):
        report.write(tmp_path / "report.html")
    assert sorted(os.listdir(tmp_path)) == [f"report{s}" for s in (".csv", ".json", ".md", ".txt")]


def test_sequential_refit_leaves_embeddings_to_their_svd():
    """A model with an `Embedding` factorizes with the sequential refit (its
    inputs are ids, not features: only the layers after it are refitted)."""
    from keras_factorized.surgery import WhitenedConfig

    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(50, 16, name="emb"),
        keras.layers.Flatten(),
        keras.layers.Dense(24, name="dense"),
    ])
    x = np.random.default_rng(0).integers(0, 50, (32, 6)).astype("int32")
    small = factorize(model, rank=4, method="whitened", calibration_data=x,
                      whitening=WhitenedConfig(sequential=True))
    rows = {r.path: r for r in small.factorization_report.layers}
    assert rows["emb"].rank == 4 and rows["dense"].rank == 4
    assert "sequential refit" in small.factorization_report.output_errors
