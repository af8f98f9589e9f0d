"""Smoke runs of `benchmarks.vocab_paired` and the LazyAdam rows of `vocab_benchmark`."""

import json

import pytest


def test_vocab_paired_tiny_runs_and_reports_ratios(tmp_path):
    from benchmarks import vocab_paired

    result = vocab_paired.run(tiny=True, isolate=False, write=False,
                              json_path=str(tmp_path / "paired.json"), verbose=False)
    (group,) = result["groups"]
    assert [r["name"] for r in group["ratios"]] == ["speedup, Adam",
                                                    "rows 4000 lazy / 2000 Adam"]
    for ratio in group["ratios"]:
        assert ratio["low"] <= ratio["median"] <= ratio["high"]
        assert ratio["median"] > 0
    assert all(len(m["seconds"]) == group["rounds"] for m in group["models"])
    assert "interleaved step-time ratios" in result["markdown"]
    assert json.loads((tmp_path / "paired.json").read_text())["groups"]


def test_default_groups_hold_the_issue_goals():
    from benchmarks import vocab_paired

    groups = {g["name"]: g for g in vocab_paired.default_groups()}
    assert set(groups) == {"speed-tensorflow", "speed-jax", "lazy-tensorflow"}
    lazy = groups["lazy-tensorflow"]
    name, a, b = lazy["ratios"][0]
    assert name == "1M / 100k rows, LazyAdam"
    assert (lazy["models"][a]["rows"], lazy["models"][b]["rows"]) == (1_000_000, 100_000)


def test_vocab_paired_refuses_bad_arguments(capsys):
    from benchmarks import vocab_paired

    with pytest.raises(SystemExit):
        vocab_paired.main(["--rounds", "0"])
    assert "--rounds=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vocab_paired.main(["--only", "nope"])
    assert "--only=nope" in capsys.readouterr().err


def test_vocab_benchmark_builds_lazy_adam_and_refuses_unknown_optimizers():
    from benchmarks import vocab_benchmark
    from keras_factorized import LazyAdam

    assert isinstance(vocab_benchmark.make_optimizer("lazy_adam"), LazyAdam)
    with pytest.raises(ValueError, match="`optimizer`, expected one of"):
        vocab_benchmark.make_optimizer("adagrad")
    grid = vocab_benchmark.scaling_grid()
    assert {c["rows"] for c in grid} == {100_000, 1_000_000, 3_000_000}
    assert {c["optimizer"] for c in grid if c["backend"] == "jax"} == {"adam"}


def test_lazy_adam_imdb_trains_both_optimizers_on_toy_arrays():
    import numpy as np

    from benchmarks import lazy_adam_imdb
    from benchmarks.examples import load_example

    args = lazy_adam_imdb.build_parser().parse_args(
        ["--sequence-length", "6", "--embedding-dim", "4", "--lstm-units", "2",
         "--epochs", "1", "--rank", "2"])
    rng = np.random.default_rng(0)
    arrays = {split: (rng.integers(1, 50, size=(16, 6)).astype("int32"),
                      rng.integers(0, 2, size=(16,)).astype("float32"))
              for split in ("train", "validation", "test")}
    example = load_example("imdb_lstm")
    rows = [lazy_adam_imdb.train_one(example, arrays, 50, 2, name, args)
            for name in lazy_adam_imdb.OPTIMIZERS]
    assert [r["optimizer"] for r in rows] == ["adam", "lazy_adam"]
    assert all(0 <= r["test_accuracy"] <= 1 and r["epochs_trained"] == 1 for r in rows)
    info = {"backend": "tensorflow", "seed": 0, "vocab_size": 50, "data": "toy",
            "embedding_dim": 4, "lstm_units": 2, "learning_rate": 1e-3, "epochs": 1}
    text = lazy_adam_imdb.markdown(rows, "cmd", "1.0", info)
    assert "| rank 2 | lazy_adam |" in text


def test_lazy_adam_imdb_refuses_bad_arguments(capsys):
    from benchmarks import lazy_adam_imdb

    with pytest.raises(SystemExit):
        lazy_adam_imdb.main(["--epochs", "0"])
    assert "`--epochs`, expected an integer >= 1. Received: 0" in capsys.readouterr().err


def test_vocab_jax_profile_tiny_runs_on_jax():
    import keras

    from benchmarks import vocab_jax_profile

    if keras.backend.backend() != "jax":
        with pytest.raises(ValueError, match="expected 'jax'"):
            vocab_jax_profile.run(rows=100, repeats=1, write=False)
        return
    result = vocab_jax_profile.run(rows=500, repeats=1, write=False)
    assert len(result["seconds"]) == 6 and all(s > 0 for s in result["seconds"].values())
    assert "where the JAX step spends its time" in result["markdown"]
