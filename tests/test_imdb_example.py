"""Smoke tests of the IMDB example, examples/imdb_lstm/imdb_lstm.py, at tiny sizes."""

import json
import os
import runpy
import subprocess
import sys
import types
import urllib.error
import urllib.request

import keras
import numpy as np
import pytest

from keras_factorized.datasets import imdb

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "data", "imdb_fixture", "aclImdb_mini.tar.gz")
SCRIPT = os.path.join(ROOT, "examples", "imdb_lstm", "imdb_lstm.py")
example = types.SimpleNamespace(**runpy.run_path(SCRIPT))

TINY = [
    "--vocab-size", "300", "--sequence-length", "24", "--embedding-dim", "8",
    "--lstm-units", "4", "--epochs", "1", "--batch-size", "32", "--verbose", "0",
]  # fmt: skip


def parse(argv):
    return example.build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("imdb_out")
    args = parse(
        ["--data", FIXTURE, "--max-samples", "80", "--ranks", "2", "--svd-ranks", "2",
         "--output-dir", str(out)] + TINY
    )  # fmt: skip
    return example.run(args)


def test_every_model_is_trained_and_evaluated(results):
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["baseline", "rank 2", "svd rank 2"]
    # Embedding parameters: 300*8 full, 300*r + r*8 factorized.
    assert rows["baseline"]["embedding_params"] == 300 * 8
    assert rows["rank 2"]["embedding_params"] == rows["svd rank 2"]["embedding_params"] == 616
    assert rows["rank 2"]["compression"] == pytest.approx(2400 / 616)
    for row in rows.values():
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["model_size_bytes"] > 0
        assert row["epochs_trained"] == 1 and row["time_per_epoch_s"] > 0
    assert "test_accuracy_before_fine_tuning" in rows["svd rank 2"]
    assert results["split_sizes"] == (64, 16, 80)
    assert results["source"].kind == "path"


def test_results_json_holds_the_rows_and_the_data_source(results):
    saved = json.load(open(results["results_json"]))
    assert [r["model"] for r in saved["runs"]] == ["baseline", "rank 2", "svd rank 2"]
    assert saved["config"]["data_source"] == "path" and saved["config"]["data"] == FIXTURE


def test_build_model_is_a_sequential_lstm_classifier():
    model = example.build_model(50, 7, 6, 3, rank=2)
    assert isinstance(model, keras.Sequential)
    assert [layer.name for layer in model.layers] == ["embedding", "lstm", "classifier"]
    assert tuple(model(np.zeros((2, 7), dtype="int32")).shape) == (2, 1)
    assert model.get_layer("embedding").count_params() == 50 * 2 + 2 * 6
    assert type(example.build_model(50, 7, 6, 3).get_layer("embedding")) is keras.layers.Embedding


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
    assert example.main(["--data", FIXTURE] + argv) == 2
    assert message in capsys.readouterr().err


def test_rank_list_parsing():
    assert parse(["--ranks", "16, 4,2", "--svd-ranks", ""]).ranks == [16, 4, 2]
    assert parse(["--svd-ranks", ""]).svd_ranks == []
    for bad in ("4,x", "0"):
        with pytest.raises(SystemExit):
            parse(["--ranks", bad])


def test_long_reviews_keep_their_last_tokens():
    data = imdb.ImdbData(
        imdb.Split(np.array(["a b c d e f g h", "a b"], dtype=object), np.array([0, 1])),
        imdb.Split(np.array(["a"], dtype=object), np.array([0])),
        imdb.Split(np.array(["h g"], dtype=object), np.array([1])),
    )
    vectorizer, arrays = example.vectorize(data, vocab_size=50, sequence_length=5)
    vocab = vectorizer.get_vocabulary()
    words = [[vocab[i] for i in row if i] for row in arrays["train"][0]]
    assert words == [["d", "e", "f", "g", "h"], ["a", "b"]]
    assert list(arrays["train"][0][1][2:]) == [0, 0, 0]  # padding at the end


def test_without_data_or_network_it_trains_on_the_embedded_sample(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled by the test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_cache"))
    argv = ["--max-samples", "40", "--ranks", "2", "--svd-ranks", "",
            "--output-dir", str(tmp_path)] + TINY  # fmt: skip
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert "embedded sample" in out and "--data PATH" in out and imdb.IMDB_URL in out
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["config"]["data_source"] == "sample"
    assert [r["model"] for r in saved["runs"]] == ["baseline", "rank 2"]


def test_script_runs_from_the_command_line(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    argv = ["--data", FIXTURE, "--max-samples", "40", "--ranks", "", "--svd-ranks", "",
            "--output-dir", str(tmp_path)] + TINY  # fmt: skip
    proc = subprocess.run(
        [sys.executable, SCRIPT] + argv, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "baseline" in proc.stdout and (tmp_path / "results.json").exists()


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="SavedModel/TFLite export and tf.distribute are TensorFlow-only",
)
def test_export_strategy_and_mixed_precision_flags(monkeypatch, tmp_path):
    from keras_factorized import distribute
    from keras_factorized import export

    calls = {}
    monkeypatch.setattr(
        export, "export_for_serving",
        lambda model, export_dir, **kw: calls.update(serving=(model.name, export_dir, kw)),
    )  # fmt: skip
    monkeypatch.setattr(
        export, "export_tflite", lambda model, path: calls.update(tflite=(model.name, path))
    )
    real_get_strategy = distribute.get_strategy
    monkeypatch.setattr(
        distribute, "get_strategy",
        lambda name: calls.update(strategy=name) or real_get_strategy("default"),
    )  # fmt: skip
    args = parse(
        ["--data", FIXTURE, "--max-samples", "40", "--ranks", "2", "--svd-ranks", "",
         "--strategy", "mirrored", "--mixed-precision", "--export-dir", str(tmp_path / "serving"),
         "--tflite", str(tmp_path / "m.tflite"), "--output-dir", str(tmp_path)] + TINY
    )  # fmt: skip
    results = example.run(args)
    assert calls["strategy"] == "mirrored"
    name, export_dir, kwargs = calls["serving"]
    assert name == "rank2" and export_dir == str(tmp_path / "serving")
    assert kwargs["truncate"] == "pre" and kwargs["text_vectorizer"].name == "text_vectorization"
    assert calls["tflite"] == ("rank2", str(tmp_path / "m.tflite"))
    assert results["models"]["rank 2"].get_layer("lstm").dtype_policy.name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored


def test_quantize_adds_int8_rows_with_smaller_embeddings(monkeypatch, tmp_path, capsys):
    from keras_factorized import export

    def fake_serving(model, export_dir, **kwargs):
        version = os.path.join(export_dir, "1")
        os.makedirs(version)
        with open(os.path.join(version, "saved_model.pb"), "wb") as f:
            f.write(b"x" * (100 + model.get_layer("embedding").count_params()))
        return version

    def fake_tflite(model, path):
        with open(path, "wb") as f:
            f.write(b"x" * example.embedding_bytes(model))

    monkeypatch.setattr(export, "export_for_serving", fake_serving)
    monkeypatch.setattr(export, "export_tflite", fake_tflite)
    args = parse(
        ["--data", FIXTURE, "--max-samples", "40", "--ranks", "2", "--svd-ranks", "",
         "--quantize", "int8", "--export-dir", str(tmp_path / "serving"),
         "--tflite", str(tmp_path / "m.tflite"), "--output-dir", str(tmp_path)] + TINY
    )  # fmt: skip
    results = example.run(args)
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["baseline", "baseline int8", "rank 2", "rank 2 int8"]
    # Float32: 4 bytes an entry. Int8: 1 byte an entry, plus float32 scales:
    # one per row of the table (Keras's Embedding), one per column of B (ours).
    assert rows["baseline"]["embedding_bytes"] == 4 * 300 * 8
    assert rows["baseline int8"]["embedding_bytes"] == 300 * 8 + 4 * 300
    assert rows["rank 2"]["embedding_bytes"] == 4 * 616
    assert rows["rank 2 int8"]["embedding_bytes"] == 616 + 4 * 8
    for name in ("baseline", "rank 2"):
        row = rows[f"{name} int8"]
        assert row["precision"] == "int8" and row["quantized_from"] == name
        assert rows[name]["precision"] == "float32"
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["model_size_bytes"] > 0
        assert row["total_params"] == rows[name]["total_params"]
    assert results["models"]["rank 2 int8"].get_layer("embedding").quantization_mode == "int8"
    assert results["models"]["rank 2"].get_layer("embedding").quantization_mode is None
    # The best factorized model is exported float and int8, side by side.
    assert (tmp_path / "serving" / "1").is_dir() and (tmp_path / "serving_int8" / "1").is_dir()
    assert rows["rank 2 int8"]["tflite_bytes"] == os.path.getsize(tmp_path / "m_int8.tflite")
    assert rows["rank 2 int8"]["tflite_bytes"] < rows["rank 2"]["tflite_bytes"]
    assert rows["rank 2"]["saved_model_bytes"] == 100 + 616
    assert "tflite_bytes" not in rows["baseline"]
    assert results["rank_choice"]["model"] == "rank 2"  # int8 rows are not candidates
    out = capsys.readouterr().out
    assert "emb. bytes" in out and "TFLite" in out
    assert [r["model"] for r in json.load(open(results["results_json"]))["runs"]] == list(rows)
    with pytest.raises(SystemExit):
        parse(["--quantize", "int4"])


def test_saved_size_excludes_optimizer_state():
    model = example.build_model(2000, 10, 32, 4)
    example.train(
        model, {"train": (np.ones((8, 10), "int32"), np.ones(8)),
                "validation": (np.ones((2, 10), "int32"), np.ones(2))},
        parse(["--verbose", "0"]), epochs=1, learning_rate=1e-3,
    )  # fmt: skip
    weights_bytes = 4 * model.count_params()
    # With Adam's two moments the file would be about 3x the weights.
    assert weights_bytes < example.saved_size(model) < 1.5 * weights_bytes


# ---------------------------------------------------------------- --pretrained

GLOVE = os.path.join(HERE, "data", "minilm_glove_mini.txt")  # 200 real MiniLM rows


def test_pretrained_glove_file_frozen_full_table_and_svd_ranks(tmp_path):
    args = parse(
        ["--data", FIXTURE, "--max-samples", "40", "--pretrained", GLOVE, "--ranks", "2,8",
         "--freeze-embedding", "--output-dir", str(tmp_path)] + TINY
    )  # fmt: skip
    results = example.run(args)
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == [
        "pretrained (frozen)",
        "pretrained rank 2 (frozen)",
        "pretrained rank 8 (frozen)",
    ]
    vocab = results["vectorizer"].get_vocabulary()
    assert rows["pretrained (frozen)"]["embedding_params"] == len(vocab) * 384
    assert rows["pretrained rank 8 (frozen)"]["embedding_params"] == len(vocab) * 8 + 8 * 384
    full = results["models"]["pretrained (frozen)"].get_layer("embedding")
    low = results["models"]["pretrained rank 8 (frozen)"].get_layer("embedding")
    assert not full.trainable and not low.trainable
    # The table holds the file's vector for a word of the fixture, and the
    # rank-8 factors are its best rank-8 approximation (SVD).
    table = keras.ops.convert_to_numpy(full.embeddings)
    with open(GLOVE) as f:
        word, *values = f.readline().split()
    np.testing.assert_allclose(table[vocab.index(word)], np.array(values, "float32"), atol=1e-6)
    approx = keras.ops.convert_to_numpy(low.embeddings)
    s = np.linalg.svd(table, compute_uv=False)
    assert np.linalg.norm(table - approx) == pytest.approx(np.sqrt((s[8:] ** 2).sum()), rel=1e-3)
    choice = results["rank_choice"]
    assert choice is None or choice["rank"] in (2, 8)


def test_pretrained_bert_preset_uses_wordpiece_and_trains_the_table(tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "good", "bad", "##s", "a"]
    folder = str(tmp_path / "tiny_bert")
    keras_hub.models.BertBackbone(
        vocabulary_size=len(words), num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=32,
    ).save_to_preset(folder)  # fmt: skip
    keras_hub.models.BertTokenizer(vocabulary=words).save_to_preset(folder)
    args = parse(
        ["--data", FIXTURE, "--max-samples", "40", "--pretrained", folder, "--ranks", "4",
         "--output-dir", str(tmp_path)] + TINY
    )  # fmt: skip
    results = example.run(args)
    assert [row["model"] for row in results["rows"]] == ["pretrained", "pretrained rank 4"]
    assert results["rows"][0]["embedding_params"] == len(words) * 16
    assert results["models"]["pretrained rank 4"].get_layer("embedding").trainable
    assert results["vectorizer"] is None  # WordPiece ids, no TextVectorization


def test_bad_pretrained_path_is_a_clear_error(capsys):
    assert example.main(["--data", FIXTURE, "--pretrained", "/nonexistent/glove.txt"]) == 2
    assert "`pretrained`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "vals, tolerance, expected",
    [
        ({None: 0.80, 2: 0.70, 8: 0.806, 32: 0.81}, 0.5, 8),  # 80.6 is within 0.5 of 81
        ({None: 0.80, 2: 0.70, 8: 0.79, 32: 0.81}, 0.5, 32),
        ({None: 0.90, 2: 0.70}, 0.5, None),  # no rank close enough
        ({None: 0.80, 2: 0.70, 8: 0.79}, 15.0, 2),
    ],
)
def test_select_rank_takes_the_smallest_rank_within_the_tolerance(vals, tolerance, expected):
    rows = [{"model": f"m{r}", "rank": r, "val_accuracy": v} for r, v in vals.items()]
    chosen = example.select_rank(rows, tolerance)
    assert (chosen and chosen["rank"]) == expected
