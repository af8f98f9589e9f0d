"""Smoke run of benchmarks/bert_task_benchmark.py on a tiny random BERT preset.

The benchmark's model (all-MiniLM-L6-v2) ships in an optional pip package and
takes minutes per seed; a tiny randomly initialised BERT saved as a KerasHub
preset and a handful of the fixture's reviews go through the same code path:
fine-tune a `BertTextClassifier`, factorize the whole encoder of the used task,
short epoch, speed, checkpoints, `--resume` and the BENCHMARKS.md section.
"""

import json
import os

import keras
import pytest

keras_hub = pytest.importorskip("keras_hub")

from benchmarks import bert_task_benchmark  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "imdb_fixture", "aclImdb_mini.tar.gz")
WORDS = "a the film movie plot story acting good bad great was is it this and of to".split()


@pytest.fixture
def tiny_preset(tmp_path):
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [".", ","]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=2,
        hidden_dim=32, intermediate_dim=64, max_sequence_length=16,
    )
    folder = str(tmp_path / "tiny_bert")
    backbone.save_to_preset(folder)
    tokenizer.save_to_preset(folder)
    return folder


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the benchmark runs on the TensorFlow backend (one smoke run is enough: "
    "its task-model code paths are tested on both backends in test_task_models)",
)
def test_benchmark_runs_resumes_and_writes_its_section(tiny_preset, tmp_path, monkeypatch):
    benchmarks_md = tmp_path / "BENCHMARKS.md"
    monkeypatch.setenv("KERAS_FACTORIZED_BENCHMARKS_MD", str(benchmarks_md))
    out = tmp_path / "out"
    argv = ["--data", FIXTURE, "--model-dir", tiny_preset, "--out", str(out),
            "--seeds", "0", "--ratios", "0.5", "--train", "12", "--test", "8",
            "--calibration", "8", "--recover", "8", "--sequence-length", "16",
            "--batch-size", "4", "--speed-batch", "4", "--speed-repeats", "1"]
    results = bert_task_benchmark.main(argv)
    assert len(results) == 1
    seed = json.loads((out / "seed_0.json").read_text())
    assert seed["done"] and 0.0 <= seed["control_accuracy"] <= 1.0
    (row,) = seed["compressed"]
    assert row["param_ratio"] <= 0.5 + 1e-3
    assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["recovered_accuracy"] <= 1.0
    assert set(seed["tokens_per_second"]) == {"original", "0.5"}
    text = benchmarks_md.read_text()
    assert "<!-- BEGIN bert-task -->" in text and "whitened 0.5, + one short epoch" in text
    assert "fine-tuned original + the same short epoch" in text
    # A resumed run keeps a finished seed as it is.
    again = bert_task_benchmark.main(argv + ["--resume"])
    assert again[0]["accuracy"] == seed["accuracy"]
