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
    assert {n for s, n in names if s == 1} == {n for s, n in names if s == 0}
    assert names.index((0, "svd 128 trainable")) < names.index((1, "full frozen"))
    assert names.index((1, "svd 8 frozen")) < names.index((1, "glove svd 32 trainable"))
    assert not [n for _, n, _, _ in bench.plan([32], [0], with_glove=False) if "glove" in n]


def test_select_runs_the_named_models_seed_by_seed_in_the_given_order():
    order = bench.plan([8, 32], [1, 2])
    chosen = bench.select(order, ["glove svd 32 trainable", "full trainable"])
    assert [(s, n) for s, n, _, _ in chosen] == [
        (1, "glove svd 32 trainable"), (1, "full trainable"),
        (2, "glove svd 32 trainable"), (2, "full trainable"),
    ]  # fmt: skip
    assert chosen[0] == (1, "glove svd 32 trainable", "glove_svd_trainable", 32)
    assert bench.select(order, []) == order
    with pytest.raises(ValueError, match=r"`--only`.*Received: only=\['svd 7 frozen'\]"):
        bench.select(order, ["full frozen", "svd 7 frozen"])


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
    assert within[1] == "85.00 vs 86.00 (-1.00; 1 seed)" and within[2] == "missed by 0.50"
    assert goals["trainable SVD rank 32 above rank 32 from scratch"][2] == "met"
    best = [g for k, g in goals.items() if k.startswith("best pretrained")][0]
    assert best[1].startswith("full trainable: 86.00") and best[2] == "met"


ANALYSIS = {
    "energy": {"32": 0.285, "128": 0.661},
    "init_scale": {"rank": 32, "full": {"row_norm": 1.07},
                   "svd": {"a_std": 0.024, "b_std": 0.215, "row_norm": 0.57},
                   "scratch": {"a_std": 0.029, "b_std": 0.051, "row_norm": 0.16}},
    "coverage": {"reviews": 10, "words_mean": 227.0, "wordpiece_mean": 291.0,
                 "words_fit": 0.6, "wordpiece_fit": 0.45},
}  # fmt: skip


def test_markdown_marks_a_partial_run_and_lists_every_model(monkeypatch):
    monkeypatch.setattr(bench, "machine_description", lambda: "test machine")
    args = bench.build_parser().parse_args([])
    args.split_sizes = (20000, 5000, 25000)
    commands = ["python -m benchmarks.pretrained_benchmark", "python -m x --only 'scratch 32'"]
    text = bench.build_markdown(ROWS, args, commands, None, 20, 60, ANALYSIS)
    assert "**Partial: 6 of 20 planned trainings finished" in text
    assert "`python -m x --only 'scratch 32'`" in text  # every command that added runs
    for row in ROWS:
        assert f"| {row['model']} |" in text
    assert "### Goals of issue 15" in text and "Rank by validation (frozen group" in text
    # Seed counts are plain: per row, in the goals, and the rows under 3 seeds named.
    assert "| svd 32 frozen | 1 | 100 | 10.0x | 28.5% | 70.00 | 72.00 (1 seed) |" in text
    assert "Fewer than 3 seeds" in text and "72.00 vs 79.00 (-7.00; 1 seed)" in text
    # The flat spectrum and what a frozen low-rank copy loses, the token coverage.
    assert "rank 32: 28.5%, rank 128: 66.1%" in text and "rank 32: 72.00 (1 seed), -7.00" in text
    assert "45% of reviews fit whole in 200 WordPiece tokens, 60% in 200 words" in text
    assert "std 0.024 (`A`) and 0.215 (`B`) and give embedding rows of mean norm 0.57" in text


def test_markdown_shows_the_spread_over_seeds():
    rows = ROWS + [
        dict(ROWS[3], seed=1, test_accuracy=0.86),
        dict(ROWS[3], seed=2, test_accuracy=0.85),
    ]
    by = {r["model"]: r for r in bench.seed_stats.summarize(rows)}
    assert bench.pa.accuracy_text(by["scratch 32"]) == "85.00 ± 1.00 (3 seeds)"
    goals = {g[0]: g for g in bench.goals(by, {}, 0.5, None)}
    above = goals["trainable SVD rank 32 above rank 32 from scratch"]
    assert above[1] == "85.00 vs 85.00 (+0.00; 1/3 seeds)" and above[2] == "missed by 0.00"


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


@pytest.mark.parametrize("name", ["imdb_lstm", "bert_reparameterize", "bert_classifier"])
def test_benchmarks_load_the_example_scripts(name):
    from benchmarks.examples import load_example

    assert callable(load_example(name).main)
    with pytest.raises(ValueError, match="name='nope'"):
        load_example("nope")


def test_analysis_doctests_and_combined_plot(tmp_path):
    import doctest

    from benchmarks import pretrained_analysis

    assert doctest.testmod(pretrained_analysis).failed == 0
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "plot.png")
    scratch = [{"model": "baseline", "embedding_params": 2560000, "mean": 85.58, "std": 0.64}]
    summary = bench.seed_stats.summarize(ROWS)
    pretrained_analysis.plot_with_scratch(summary, bench.PLOT_KINDS, scratch, path)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_token_coverage_counts_words_like_text_vectorization():
    import keras

    from benchmarks.pretrained_analysis import word_count

    texts = ["A <br />great film, isn't it?", "Bad... very bad!"]
    layer = keras.layers.TextVectorization(output_mode="int")
    layer.adapt(texts)
    ids = keras.ops.convert_to_numpy(layer([t.replace("<br />", " ") for t in texts]))
    assert [word_count(t) for t in texts] == [int((row != 0).sum()) for row in ids]


def test_add_runs_merges_a_parallel_output_folder(tmp_path):
    import json

    main = tmp_path / "main.json"
    other = tmp_path / "other.json"
    main.write_text(json.dumps({"runs": ROWS[:2], "glove": None, "commands": ["cmd a"]}))
    other.write_text(json.dumps({"runs": ROWS[1:4], "glove": {"x": 1}, "commands": ["cmd b"]}))
    args = bench.build_parser().parse_args(["--render-only", "--add-runs", str(other)])
    rows, glove, commands = bench.load_runs(str(main), args, "cmd render")
    assert [r["model"] for r in rows] == [r["model"] for r in ROWS[:4]]  # no duplicate
    assert glove == {"x": 1} and commands == ["cmd a", "cmd b"]
    assert len(json.loads(main.read_text())["runs"]) == 4  # saved back
