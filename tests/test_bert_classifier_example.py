"""Smoke run of examples/bert_classifier/bert_classifier.py on a tiny random BERT preset.

The example's default model (all-MiniLM-L6-v2) ships in an optional pip
package and takes many minutes to fine-tune on CPU; a tiny randomly
initialised BERT saved as a KerasHub preset and the fixture's reviews go
through the same code path, offline: fine-tune a `BertTextClassifier` on raw
strings, factorize its whole encoder, short epoch, speed, the table, the
`.keras` round trip, and `--finetuned` to start from the saved task.
"""

import json
import os

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from tiny_models import WORDS  # noqa: E402
from tiny_models import save_tiny_preset  # noqa: E402

from benchmarks.examples import load_example  # noqa: E402
from keras_factorized import LowRankEinsumDense  # noqa: E402
from keras_factorized import _keras_compat  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "imdb_fixture", "aclImdb_mini.tar.gz")

example = load_example("bert_classifier")
# One ratio (two ratios run the same code twice; `--finetuned` runs 0.5). On
# JAX every fit and factorize of a task costs a few times more than on
# TensorFlow: there the run skips the short epoch (test_task_models fits a
# factorized task on both backends).
ON_TENSORFLOW = keras.backend.backend() == "tensorflow"
RATIOS = ["0.3"]
RECOVER = "8" if ON_TENSORFLOW else "0"


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    return save_tiny_preset(tmp_path_factory.mktemp("preset") / "tiny_bert", 16,
                            WORDS + [".", ","])


def small_argv(preset, save_dir, *extra):
    return ["--data", FIXTURE, "--model-dir", preset, "--save-dir", str(save_dir),
            "--param-ratio", ",".join(RATIOS), "--train", "16", "--test", "8",
            "--calibration", "8", "--recover", RECOVER, "--sequence-length", "16",
            "--batch-size", "4",
            "--speed-batch", "4", "--speed-repeats", "1", *extra]


@pytest.fixture(scope="module", autouse=True)
def eager_fit():
    """The example's `fit`s run eagerly here: tracing a fresh train step for
    each of the few-batch epochs costs more than the steps themselves.
    (`test_bert_task_benchmark` runs the same functions traced.)"""
    compile_task = example.compile_task

    def compile_eagerly(task, learning_rate):
        compile_task(task, learning_rate)
        task.run_eagerly = True

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(example, "compile_task", compile_eagerly)
        yield


@pytest.fixture(scope="module")
def first_run(tiny_preset, tmp_path_factory):
    """One run of the example, shared by the tests that read its results."""
    save_dir = tmp_path_factory.mktemp("run")
    args = example.build_parser().parse_args(small_argv(tiny_preset, save_dir))
    return example.run(args), save_dir


def test_run_prints_the_table_and_writes_its_files(first_run, tiny_preset, capsys):
    results, save_dir = first_run
    models = [row["model"] for row in results["rows"]]
    expected = ["fine-tuned original"]
    for ratio in RATIOS:
        expected += [f"whitened {ratio}"] + [f"whitened {ratio} + short epoch"] * (RECOVER != "0")
    assert models == expected
    table = example.format_table(results["rows"])
    assert table.splitlines()[0].split()[:3] == ["model", "param", "ratio"]
    assert len(table.splitlines()) == 1 + len(models)
    assert "1.00x" in table.splitlines()[1]
    for name in ["finetuned.keras", "results.json"] + [f"compressed_{r}.keras" for r in RATIOS]:
        assert (save_dir / name).is_file(), name
    saved = json.loads((save_dir / "results.json").read_text())
    assert [row["model"] for row in saved["rows"]] == models
    assert saved["config"]["data_source"] == "path"


def test_param_ratio_within_budget_and_whole_encoder_factorized(first_run):
    rows = first_run[0]["rows"]
    original, compressed = rows[0], rows[1:]
    for row in compressed:
        assert 0.0 < row["param_ratio"] <= row["ratio"] + 1e-3, row
        assert row["encoder_params"] < original["encoder_params"]
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["gap_points"] == pytest.approx(100 * (original["accuracy"] - row["accuracy"]))
        assert row["tokens_per_second"] > 0 and row["speedup"] > 0
    small = first_run[0]["tasks"][f"whitened {RATIOS[0]}"]
    names = {layer.name for layer in _keras_compat.flatten_layers(small, include_self=True)
             if isinstance(layer, LowRankEinsumDense)}
    # All six kinds are selected; the allocation may keep a few whole.
    assert {"query", "key", "value"} & names
    assert len(small.factorization_report.layers) == 2 * 6


def test_saved_compressed_task_predicts_the_same_on_raw_strings(first_run):
    results, save_dir = first_run
    assert all(row["reload_matches"] for row in results["rows"][1:])
    small = results["tasks"]["whitened 0.3"]
    loaded = keras.saving.load_model(str(save_dir / "compressed_0.3.keras"))
    texts = ["a good film", "the plot was bad and the acting painful"]
    np.testing.assert_allclose(loaded.predict(texts, verbose=0), small.predict(texts, verbose=0),
                               atol=1e-5)
    assert isinstance(loaded, keras_hub.models.BertTextClassifier)


def test_main_starts_from_the_saved_finetuned_task(first_run, tiny_preset, tmp_path, capsys):
    results, save_dir = first_run
    argv = small_argv(tiny_preset, tmp_path, "--finetuned", str(save_dir / "finetuned.keras"),
                      "--param-ratio", "0.5", "--recover", "0")
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert "Fine-tuned task:" in out and "predicts the same on raw strings: True" in out
    assert "whitened 0.5 " in out and "short epoch" not in out
    saved = json.loads((tmp_path / "results.json").read_text())
    # The same fine-tuned task scores the same.
    assert saved["rows"][0]["accuracy"] == results["rows"][0]["accuracy"]
    assert not (tmp_path / "finetuned.keras").exists()


@pytest.mark.parametrize(
    "extra, message",
    [(["--train", "1"], "`train`"), (["--recover", "-1"], "`recover`"),
     (["--learning-rate", "0"], "`learning_rate`"),
     (["--finetuned", "missing.keras"], "`finetuned`")],
)
def test_bad_values_exit_2_naming_the_flag(extra, message, tiny_preset, tmp_path, capsys):
    assert example.main(small_argv(tiny_preset, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err


def test_bad_param_ratio_is_an_argparse_error():
    with pytest.raises(SystemExit):
        example.build_parser().parse_args(["--param-ratio", "1.5"])


def test_encoder_speed_counts_every_position(tiny_preset):
    task = example.build_classifier(8, tiny_preset, seed=0)
    speed = example.encoder_speed({"a": task, "b": task}, np.array(["a film", "bad"]), repeats=2)
    assert set(speed) == {"a", "b"} and all(v > 0 for v in speed.values())


def test_same_encoder_selection_as_the_reparameterize_example():
    assert example.ALL_SIX == load_example("bert_reparameterize").ALL_SIX
