"""SavedModel export for TF Serving (`keras_factorized.export`).

The exports are loaded back in a separate Python process in which neither
`keras_factorized` nor `keras` can be imported, as in `tensorflow_model_server`.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("SavedModel export needs the TensorFlow backend", allow_module_level=True)

import tensorflow as tf  # noqa: E402

from keras_factorized import FactorizedEmbedding  # noqa: E402
from keras_factorized import LowRankDense  # noqa: E402
from keras_factorized import export  # noqa: E402

SEQUENCE_LENGTH = 12
VOCAB = 60
TEXTS = [
    "a great movie, the acting was great and the story was fun",
    "a terrible film. it was bad, bad, bad and far too long for what it was",
    "good fun",
    "",
    "the story was long but the acting was good and the film was fun to watch "
    "even if the movie was too long and the end was bad and the acting too",
]

# Loads every export with only TensorFlow importable and calls its
# `serving_default` signature on the inputs the test process wrote.
LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["keras_factorized"] = None  # TF Serving has neither package.
    sys.modules["keras"] = None
    import json
    import numpy as np
    import tensorflow as tf

    try:
        import keras_factorized  # noqa: F401
        raise SystemExit("keras_factorized should not be importable here")
    except ImportError:
        pass
    results = {}
    for case in json.load(open(sys.argv[1])):
        signature = tf.saved_model.load(case["dir"]).signatures["serving_default"]
        if case["strings"]:
            inputs = tf.constant(case["inputs"], tf.string)
        else:
            inputs = tf.constant(np.load(case["inputs"]))
        outputs = signature(**{case["input_name"]: inputs})
        results[case["name"]] = {
            "inputs": sorted(signature.structured_input_signature[1]),
            "outputs": {k: v.numpy().tolist() for k, v in outputs.items()},
            "dtypes": {k: v.dtype.name for k, v in outputs.items()},
        }
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def both_layers_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SEQUENCE_LENGTH,), dtype="int32", name="token_ids")
    x = FactorizedEmbedding(VOCAB, 16, rank=4, mask_zero=True, name="embedding")(inputs)
    x = keras.layers.LSTM(8, name="lstm")(x)
    x = LowRankDense(8, rank=2, activation="relu", name="low_rank")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="classifier")(x)
    return keras.Model(inputs, outputs)


def token_ids(seed=1, batch=6):
    ids = np.random.default_rng(seed).integers(1, VOCAB, (batch, SEQUENCE_LENGTH))
    ids[0, 7:] = 0  # a padded row exercises the mask
    return ids.astype("int32")


def vectorizer(output_sequence_length=SEQUENCE_LENGTH):
    layer = keras.layers.TextVectorization(
        max_tokens=VOCAB, output_sequence_length=output_sequence_length
    )
    layer.adapt(TEXTS)
    return layer


def pre_truncated_ids(layer, texts):
    """What `truncate="pre"` must compute: the last tokens, padded at the end."""
    rows = []
    for text in texts:
        ids = [int(i) for i in layer([text])[0] if i != 0][-SEQUENCE_LENGTH:]
        rows.append(ids + [0] * (SEQUENCE_LENGTH - len(ids)))
    return np.array(rows, dtype="int32")


def mixed_bfloat16_model():
    """Both layers under mixed_bfloat16, trained a few steps on CPU."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = both_layers_model(seed=3)
    finally:
        keras.config.set_dtype_policy(previous)
    model.compile("adam", "binary_crossentropy")
    x = token_ids(seed=4, batch=32)
    y = (x[:, :2] < VOCAB // 2).all(axis=1).astype("float32")
    before = keras.ops.convert_to_numpy(model.get_layer("embedding").embeddings_a)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = keras.ops.convert_to_numpy(model.get_layer("embedding").embeddings_a)
    return model, history.history["loss"], before, after


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exports every case once and serves them all in one clean process."""
    root = tmp_path_factory.mktemp("exports")
    cases, expected, extra = [], {}, {}

    def add(name, path, inputs, want, input_name, strings=False):
        if strings:
            stored = list(inputs)
        else:
            stored = str(root / f"{name}.npy")
            np.save(stored, inputs)
        cases.append(
            dict(name=name, dir=path, inputs=stored, input_name=input_name, strings=strings)
        )
        expected[name] = np.asarray(want, dtype="float32")

    model = both_layers_model()
    ids = token_ids()
    want = model.predict(ids, verbose=0)
    add("factored", export.export_for_serving(model, root / "ids"), ids, want, "inputs")
    add(
        "merged",
        export.export_for_serving(model, root / "ids", merge_factors=True),
        ids,
        want,
        "inputs",
    )

    text_layer = vectorizer()
    text_model = both_layers_model(seed=1)
    add(
        "text",
        export.export_for_serving(text_model, root / "text", text_vectorizer=text_layer),
        TEXTS,
        text_model.predict(text_layer(TEXTS), verbose=0),
        "text",
        strings=True,
    )
    ragged_layer = vectorizer(output_sequence_length=None)
    add(
        "text_pre",
        export.export_for_serving(
            text_model,
            root / "text_pre",
            text_vectorizer=ragged_layer,
            truncate="pre",
            signature_input_name="review",
        ),
        TEXTS,
        text_model.predict(pre_truncated_ids(ragged_layer, TEXTS), verbose=0),
        "review",
        strings=True,
    )

    string_inputs = keras.Input((1,), dtype="string")
    pipeline = keras.Model(string_inputs, text_model(text_layer(string_inputs)))
    add(
        "text_in_model",
        export.export_for_serving(pipeline, root / "pipeline"),
        TEXTS,
        text_model.predict(text_layer(TEXTS), verbose=0),
        "text",
        strings=True,
    )

    mixed, losses, before, after = mixed_bfloat16_model()
    extra["mixed"] = dict(losses=losses, before=before, after=after)
    add(
        "mixed_bfloat16",
        export.export_for_serving(mixed, root / "mixed"),
        ids,
        keras.ops.convert_to_numpy(keras.ops.cast(mixed(ids), "float32")),
        "inputs",
    )

    cases_path, results_path = root / "cases.json", root / "results.json"
    cases_path.write_text(json.dumps(cases))
    script = root / "load_exports.py"
    script.write_text(LOADER)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""}
    completed = subprocess.run(
        [sys.executable, "-W", "ignore", str(script), str(cases_path), str(results_path)],
        cwd=root,  # not the repository: its folder must not be on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(results_path.read_text())
    return dict(
        root=root,
        cases={case["name"]: case for case in cases},
        expected=expected,
        results=results,
        extra=extra,
    )


@pytest.mark.parametrize(
    "name", ["factored", "merged", "text", "text_pre", "text_in_model", "mixed_bfloat16"]
)
def test_served_predictions_match_keras(exports, name):
    result = exports["results"][name]
    case = exports["cases"][name]
    # Stable, documented signature names; outputs always float32.
    assert result["inputs"] == [case["input_name"]]
    assert result["dtypes"] == {"predictions": "float32"}
    served = np.array(result["outputs"]["predictions"], dtype="float32")
    # bfloat16 keeps 8 significant bits: near 0.5 one rounding step is 2**-9,
    # and the served graph may round an intermediate differently from eager
    # Keras; a few such steps are allowed. float32 exports must match to 1e-5.
    atol = 4 * 2.0**-8 if name == "mixed_bfloat16" else 1e-5
    np.testing.assert_allclose(served, exports["expected"][name], atol=atol, rtol=0)


def test_predictions_are_not_trivial(exports):
    # A model whose outputs are all equal would match anything.
    for name in ("factored", "text", "text_pre"):
        assert np.ptp(exports["expected"][name]) > 1e-4, name
    # Truncating at the front changes the long review's ids, hence its score.
    assert not np.allclose(
        exports["expected"]["text"][-1], exports["expected"]["text_pre"][-1], atol=1e-6
    )


def test_only_standard_tensorflow_ops(exports):
    from tensorflow.python.framework import op_def_registry

    for name, case in exports["cases"].items():
        ops = export.saved_model_ops(case["dir"])
        assert ops, name
        assert not ops & export.PYTHON_OPS, (name, ops & export.PYTHON_OPS)
        # Every op is a registered TensorFlow op (no custom kernels).
        assert all(op_def_registry.get(op) is not None for op in ops), name
    text_ops = export.saved_model_ops(exports["cases"]["text"]["dir"])
    assert {"StringSplitV2", "LookupTableFindV2"} <= text_ops


def test_python_op_detection_works(tmp_path):
    # The op check above would pass vacuously if saved_model_ops missed the
    # function library, where PyFunc ops live.
    module = tf.Module()
    module.f = tf.function(
        lambda x: tf.py_function(lambda v: v * 2, [x], tf.float32),
        input_signature=[tf.TensorSpec([None], tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path), signatures=module.f)
    assert export.saved_model_ops(tmp_path) & export.PYTHON_OPS


def test_factored_export_is_smaller_than_merged(exports):
    def variables_bytes(path):
        folder = os.path.join(path, "variables")
        return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))

    factored = variables_bytes(exports["cases"]["factored"]["dir"])
    merged = variables_bytes(exports["cases"]["merged"]["dir"])
    assert factored < merged


def test_merge_leaves_the_model_unchanged():
    model = both_layers_model()
    merged = export.merge_factorized_layers(model)
    names = [type(layer).__name__ for layer in merged.layers]
    assert "FactorizedEmbedding" not in names and "LowRankDense" not in names
    assert isinstance(model.get_layer("embedding"), FactorizedEmbedding)
    ids = token_ids()
    np.testing.assert_allclose(merged.predict(ids, verbose=0), model.predict(ids, verbose=0), atol=1e-6)


def test_mixed_bfloat16_model_trains(exports):
    mixed = exports["extra"]["mixed"]
    assert np.all(np.isfinite(mixed["losses"]))
    assert not np.allclose(mixed["before"], mixed["after"])


def test_version_numbering(exports, tmp_path):
    model = both_layers_model()
    assert export.next_version(tmp_path / "missing") == 1
    (tmp_path / "notes").mkdir()  # TF Serving ignores non-integer folders; so do we.
    first = export.export_for_serving(model, tmp_path)
    assert first == str(tmp_path / "1")
    assert export.export_for_serving(model, tmp_path, version=7) == str(tmp_path / "7")
    assert export.export_for_serving(model, tmp_path) == str(tmp_path / "8")
    assert sorted(os.listdir(tmp_path)) == ["1", "7", "8", "notes"]
    # The IDs export of the shared fixture got versions 1 (factored) and 2 (merged).
    assert sorted(os.listdir(exports["root"] / "ids")) == ["1", "2"]


def test_existing_version_is_not_overwritten(tmp_path):
    model = both_layers_model()
    version_dir = export.export_for_serving(model, tmp_path, version=3)
    pb = os.path.join(version_dir, "saved_model.pb")
    original = open(pb, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_for_serving(model, tmp_path, version=3, merge_factors=True)
    assert open(pb, "rb").read() == original
    assert sorted(os.listdir(tmp_path)) == ["3"]

    assert export.export_for_serving(model, tmp_path, version=3, merge_factors=True, overwrite=True) == version_dir
    assert open(pb, "rb").read() != original
    assert sorted(os.listdir(tmp_path)) == ["3"]  # no temporary folder left behind


def test_failed_export_leaves_no_version_folder(tmp_path, monkeypatch):
    archive_class = type(keras.export.ExportArchive())

    def failing_write_out(self, filepath, options=None, verbose=True):
        os.makedirs(os.path.join(filepath, "variables"), exist_ok=True)
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(archive_class, "write_out", failing_write_out)
    with pytest.raises(OSError, match="disk full"):
        export.export_for_serving(both_layers_model(), tmp_path)
    assert os.listdir(tmp_path) == []
    assert export.next_version(tmp_path) == 1


@pytest.mark.parametrize("version", [0, -2, 2.5, "3", True])
def test_invalid_version(tmp_path, version):
    with pytest.raises(ValueError, match=r"`version`.*Received: version="):
        export.export_for_serving(both_layers_model(), tmp_path, version=version)


def test_invalid_arguments(tmp_path):
    model = both_layers_model()
    with pytest.raises(TypeError, match="text_vectorizer"):
        export.export_for_serving(model, tmp_path, text_vectorizer="lowercase")
    with pytest.raises(ValueError, match=r"Received: truncate='middle'"):
        export.export_for_serving(model, tmp_path, text_vectorizer=vectorizer(), truncate="middle")
    with pytest.raises(ValueError, match="output_sequence_length=5"):
        export.export_for_serving(model, tmp_path, text_vectorizer=vectorizer(5))
    with pytest.raises(ValueError, match="signature_input_name"):
        export.export_for_serving(model, tmp_path, signature_input_name="two words")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="export_dir"):
        export.export_for_serving(model, tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(export, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_other_backends_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(export.keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=tensorflow.*Received: backend=jax"):
        export.export_for_serving(both_layers_model(), tmp_path)
    with pytest.raises(RuntimeError, match="Received: backend=jax"):
        export.export_tflite(both_layers_model(), tmp_path / "m.tflite")
    assert os.listdir(tmp_path) == []
