"""Smoke tests of the IMDB example (`keras-factorized imdb`, examples/imdb_lstm.py)."""

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_factorized import imdb_classifier

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "data", "imdb_fixture", "aclImdb_mini.tar.gz")

TINY = [
    "--vocab-size", "300", "--sequence-length", "24", "--embedding-dim", "8",
    "--lstm-units", "4", "--epochs", "1", "--batch-size", "32", "--verbose", "0",
]


def parse(argv):
    parser = argparse.ArgumentParser()
    imdb_classifier.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("imdb_out")
    args = parse(
        ["--data", FIXTURE, "--max-samples", "80", "--ranks", "2", "--svd-ranks", "2",
         "--output-dir", str(out)] + TINY
    )
    return imdb_classifier.run(args)


def test_every_model_is_trained_and_evaluated(results):
    names = [row["model"] for row in results["summary"]]
    assert names == ["baseline", "rank 2", "svd rank 2"]
    by_name = {row["model"]: row for row in results["summary"]}
    # Embedding parameter counts: 300*8 full, 300*r + r*8 factorized.
    assert by_name["baseline"]["embedding_params"] == 300 * 8
    assert by_name["rank 2"]["embedding_params"] == 300 * 2 + 2 * 8
    assert by_name["svd rank 2"]["embedding_params"] == 300 * 2 + 2 * 8
    assert by_name["rank 2"]["compression"] == pytest.approx(2400 / 616)
    for row in results["rows"]:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["epochs_trained"] == 1 and row["time_per_epoch_s"] > 0
        assert row["model_size_bytes"] > 0
    svd = [r for r in results["rows"] if r["kind"] == "svd"][0]
    assert "test_accuracy_before_fine_tuning" in svd


def test_outputs_are_written_and_consistent(results):
    files = results["files"]
    for key in ("json", "csv", "plot"):
        assert os.path.getsize(files[key]) > 0
    with open(files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(files["json"]))
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    with open(files["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == [r["model"] for r in results["summary"]]
    for row, expected in zip(table, results["summary"]):
        assert float(row["test_accuracy_mean"]) == pytest.approx(expected["test_accuracy_mean"])
        assert int(row["embedding_params"]) == expected["embedding_params"]
    assert "baseline" in results["table"] and "compression" in results["table"]
    assert not [n for n in os.listdir(results["output_dir"]) if n.startswith(".tmp")]


def test_build_classifier_shapes_and_names():
    import keras
    import numpy as np

    model = imdb_classifier.build_classifier(
        vocab_size=50, sequence_length=7, embedding_dim=6, lstm_units=3, rank=2,
        bidirectional=True, dropout=0.1,
    )
    assert [l.name for l in model.layers] == ["token_ids", "embedding", "lstm", "dropout", "classifier"]
    out = model(np.zeros((2, 7), dtype="int32"))
    assert tuple(out.shape) == (2, 1)
    assert model.get_layer("embedding").count_params() == 50 * 2 + 2 * 6
    assert isinstance(imdb_classifier.build_classifier(10, 5, 4, 2), keras.Model)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "`epochs`"),
        (["--ranks", "16", "--embedding-dim", "8"], "`ranks`"),
        (["--max-samples", "1"], "`max_samples`"),
        (["--learning-rate", "0"], "`learning_rate`"),
    ],
)
def test_bad_flags_are_clear_errors(argv, message, capsys):
    assert imdb_classifier.main(["--data", FIXTURE] + argv) == 2
    assert message in capsys.readouterr().err


def test_rank_list_parsing():
    assert parse(["--ranks", "16, 4,2", "--svd-ranks", ""]).ranks == [16, 4, 2]
    assert parse(["--svd-ranks", ""]).svd_ranks == []
    with pytest.raises(SystemExit):
        parse(["--ranks", "4,x"])


def test_example_script_runs(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "imdb_lstm.py"), "--data", FIXTURE,
         "--max-samples", "40", "--ranks", "", "--svd-ranks", "", "--output-dir", str(out)] + TINY,
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "baseline" in proc.stdout and str(out) in proc.stdout
    assert (out / "results.csv").exists()


@pytest.mark.parametrize("truncate", ["pre", "post"])
def test_truncate_keeps_the_last_or_first_tokens(truncate):
    from keras_factorized.datasets import imdb

    args = parse(["--truncate", truncate, "--sequence-length", "5", "--vocab-size", "50"])
    data = imdb.ImdbData(
        imdb.Split(np.array(["a b c d e f g h", "a b"], dtype=object), [0, 1]),
        imdb.Split(np.array(["a"], dtype=object), [0]),
        imdb.Split(np.array(["h g"], dtype=object), [1]),
    )
    vectorizer, arrays = imdb_classifier._vectorize(args, data)
    vocab = vectorizer.get_vocabulary()
    words = [[vocab[i] for i in row if i] for row in arrays["train"][0]]
    expected = ["d", "e", "f", "g", "h"] if truncate == "pre" else ["a", "b", "c", "d", "e"]
    assert words == [expected, ["a", "b"]]
    assert list(arrays["train"][0][1][2:]) == [0, 0, 0]  # padding stays at the end


@pytest.mark.skipif(
    __import__("keras").backend.backend() != "tensorflow",
    reason="SavedModel/TFLite export and tf.distribute are TensorFlow-only",
)
def test_export_and_strategy_flags_call_the_helpers(monkeypatch, tmp_path):
    from keras_factorized import distribute, export

    calls = {}
    monkeypatch.setattr(
        export, "export_for_serving",
        lambda model, export_dir, **kw: calls.update(serving=(model.name, export_dir, kw)),
    )
    monkeypatch.setattr(export, "export_tflite", lambda model, path: calls.update(tflite=(model.name, path)))
    real_get_strategy = distribute.get_strategy
    monkeypatch.setattr(
        distribute, "get_strategy",
        lambda name: calls.update(strategy=name) or real_get_strategy("default"),
    )
    args = parse(
        ["--data", FIXTURE, "--max-samples", "40", "--ranks", "2", "--svd-ranks", "",
         "--strategy", "mirrored", "--export-dir", str(tmp_path / "serving"),
         "--tflite", str(tmp_path / "m.tflite"), "--output-dir", str(tmp_path)] + TINY
    )
    results = imdb_classifier.run(args)
    assert calls["strategy"] == "mirrored"
    name, export_dir, kwargs = calls["serving"]
    assert name == "rank2" and export_dir == str(tmp_path / "serving")
    assert kwargs["truncate"] == "pre" and kwargs["text_vectorizer"].name == "text_vectorization"
    assert calls["tflite"] == ("rank2", str(tmp_path / "m.tflite"))
    assert results["files"]["tflite"] == str(tmp_path / "m.tflite")


def test_saved_size_excludes_optimizer_state():
    model = imdb_classifier.build_classifier(2000, 10, 32, 4, rank=None)
    imdb_classifier._compile(model, 1e-3, 1.0)
    model.fit(np.ones((8, 10), "int32"), np.ones(8), epochs=1, verbose=0)
    weights_bytes = 4 * model.count_params()
    # With Adam's two moments the file would be about 3x the weights.
    assert weights_bytes < imdb_classifier._saved_size(model) < 1.5 * weights_bytes
