"""Unit tests of benchmarks/pretrained_benchmark.py (plan, goals, rendering), without training."""

import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not installed
    sys.path.insert(0, REPO_ROOT)

from benchmarks import minilm_vectors  # noqa: E402
from benchmarks import pretrained_benchmark as bench  # noqa: E402


def test_plan_runs_the_goals_first_then_other_ranks_then_more_seeds():
    order = bench.plan([8, 32, 128], [0, 1])
    names = [(seed, name) for seed, name, _, _ in order]
    assert names[:5] == [
        (0, "full frozen"), (0, "full trainable"), (0, "svd 32 trainable"),
        (0, "scratch 32"), (0, "svd 32 frozen"),
    ]  # fmt: skip
    assert len(set(names)) == len(names)
    assert {n for s, n in names if s == 1} == {n for s, n in names if s == 0} - {
        "glove full frozen", "glove svd 32 trainable"
    }
    assert names.index((0, "svd 128 trainable")) < names.index((1, "full frozen"))
    assert not [n for _, n, _, _ in bench.plan([32], [0], with_glove=False) if "glove" in n]


def _row(model, kind, rank, seed, val, test, params):
    return {
        "model": model, "kind": kind, "rank": rank, "seed": seed, "val_accuracy": val,
        "test_accuracy": test, "embedding_params": params, "total_params": params + 10,
        "compression": 1000 / params, "time_per_epoch_s": 1.0, "epochs_trained": 2,
        "model_size_bytes": 4 * params,
    }  # fmt: skip


ROWS = [
    _row("full frozen", "full_frozen", None, 0, 0.80, 0.79, 1000),
    _row("full trainable", "full_trainable", None, 0, 0.86, 0.86, 1000),
    _row("svd 32 trainable", "svd_trainable", 32, 0, 0.855, 0.85, 100),
    _row("scratch 32", "scratch", 32, 0, 0.83, 0.84, 100),
    _row("svd 32 frozen", "svd_frozen", 32, 0, 0.70, 0.72, 100),
    _row("svd 128 frozen", "svd_frozen", 128, 0, 0.797, 0.78, 400),
]


def test_rank_choice_and_goals_follow_the_issue():
    summary = bench.seed_stats.summarize(ROWS)
    choices = bench.rank_choices(summary, 0.5)
    assert choices["frozen"]["model"] == "svd 128 frozen"  # 79.7 within 0.5 of 80
    assert choices["trainable"]["model"] == "svd 32 trainable"
    by = {r["model"]: r for r in summary}
    goals = {g[0]: g for g in bench.goals(by, choices, 0.5, ("baseline", 85.58))}
    within = goals["trainable SVD rank 32 within 0.5 points of the trainable full table"]
    assert within[1] == "85.00 vs 86.00 (-1.00)" and within[2] == "missed by 0.50"
    assert goals["trainable SVD rank 32 above rank 32 from scratch"][2] == "met"
    best = [g for k, g in goals.items() if k.startswith("best pretrained")][0]
    assert best[1].startswith("full trainable: 86.00") and best[2] == "met"


def test_markdown_marks_a_partial_run_and_lists_every_model(monkeypatch):
    monkeypatch.setattr(bench, "machine_description", lambda: "test machine")
    args = bench.build_parser().parse_args([])
    args.split_sizes = (20000, 5000, 25000)
    text = bench.build_markdown(ROWS, args, "python -m benchmarks.pretrained_benchmark", None, 20, 60)
    assert "**Partial: 6 of 20 planned trainings finished" in text
    for row in ROWS:
        assert f"| {row['model']} |" in text
    assert "### Goals of issue 15" in text and "Rank by validation (frozen group" in text


def test_imdb_section_best_reads_the_best_from_scratch_row(tmp_path, monkeypatch):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        "<!-- BEGIN imdb -->\n| model | x | acc |\n|---|---|---|\n"
        "| baseline | 1 | 85.58 ± 0.64 (84.92-86.21) |\n| rank 4 | 2 | 85.60 ± 1.0 (1-2) |\n"
        "| svd rank 4 | 2 | 86.47 ± 0.29 (1-2) |\n<!-- END imdb -->\n"
    )
    monkeypatch.setattr(bench, "BENCHMARKS_MD", str(path))
    assert bench.imdb_section_best() == ("rank 4", 85.60)


def test_write_glove_round_trips_through_load_word_vectors(tmp_path):
    from keras_factorized.word_vectors import load_word_vectors

    matrix = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    path = str(tmp_path / "v.txt")
    minilm_vectors.write_glove(path, ["[PAD]", "the", "##ing", "has space"], matrix)
    vectors = load_word_vectors(path, ["", "[UNK]", "the", "##ing", "missing"])
    np.testing.assert_allclose(vectors.matrix[2:4], matrix[1:3], atol=1e-6)
    assert vectors.oov == ["missing"]


@pytest.mark.parametrize("name", ["imdb_lstm", "bert_reparameterize"])
def test_benchmarks_load_the_example_scripts(name):
    from benchmarks.examples import load_example

    assert callable(load_example(name).main)
    with pytest.raises(ValueError, match="name='nope'"):
        load_example("nope")
