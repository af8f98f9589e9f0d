"""Smoke run of the performance suite (`python -m benchmarks --tiny`).

Toy sizes, seconds: checks that every benchmark runs end to end, returns the
keys the docs quote and writes its section into a copy of BENCHMARKS.md. No
timing is asserted (the figures of a toy run mean nothing).
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not installed
    sys.path.insert(0, REPO_ROOT)

from benchmarks import report  # noqa: E402

requires_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the suite times TensorFlow graphs, XLA and SavedModels",
)


@pytest.fixture
def benchmarks_md(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    shutil.copy(os.path.join(REPO_ROOT, "BENCHMARKS.md"), path)
    return path


@requires_tensorflow
def test_tiny_suite_writes_every_section(benchmarks_md, tmp_path, monkeypatch):
    from benchmarks.__main__ import run

    monkeypatch.delenv(report.BENCHMARKS_MD_ENV, raising=False)
    before = open(os.path.join(REPO_ROOT, "BENCHMARKS.md")).read()
    results = run(["--tiny", "--output", str(benchmarks_md),
                   "--json-dir", str(tmp_path / "json")])

    assert set(results) == {"svd", "dense", "embedding", "size"}
    text = benchmarks_md.read_text()
    for name in ("svd", "dense", "embedding", "size"):
        assert f"<!-- BEGIN {name} -->" in text and f"<!-- END {name} -->" in text
        assert (tmp_path / "json" / f"{name}.json").exists()
    assert text.count("Machine: ") >= 4
    # The repository's BENCHMARKS.md is untouched.
    assert open(os.path.join(REPO_ROOT, "BENCHMARKS.md")).read() == before

    svd = results["svd"]["runs"][0]
    assert set(svd["results"]) == {"ours", "sklearn", "numpy", "tensorflow"}
    for solver in svd["results"].values():
        assert solver["median_seconds"] > 0
        # Exact solvers sit at the optimum; randomized TruncatedSVD near it.
        assert abs(solver["error_above_optimum"]) < 1e-3
    assert "speed >= 5x TruncatedSVD" in results["svd"]["markdown"]

    dense = results["dense"]["grid"]
    assert {(r["m"], r["k"], r["batch"], r["mode"]) for r in dense} >= {
        (64, 4, 64, "forward"), (64, 16, 1, "forward+backward")}
    row = next(r for r in dense if r["k"] == 4)
    assert row["theoretical"] == pytest.approx(64 * 64 / (128 * 4))
    assert row["fraction"] == pytest.approx(row["speedup"] / row["theoretical"])
    assert "theoretical speedup at batch >= 64" in results["dense"]["markdown"]

    embedding = {r["model"]: r for r in results["embedding"]["rows"]}
    assert set(embedding) == {"Embedding", "rank 2", "rank 2, merged"}
    assert embedding["Embedding"]["train_ratio"] == 1.0
    assert embedding["rank 2, merged"]["train_ratio"] is None
    assert embedding["rank 2"]["embedding_params"] == 200 * 2 + 2 * 8

    size = {r["model"]: r for r in results["size"]["rows"]}
    full, small = size["IMDB, Embedding"], size["IMDB, FactorizedEmbedding rank 4"]
    assert small["params"] < full["params"]
    assert small["keras_bytes"] < full["keras_bytes"]
    assert small["savedmodel_bytes"] < full["savedmodel_bytes"]
    assert json.loads((tmp_path / "json" / "size.json").read_text())[0]["params"] > 0

    # The closing note a full run writes: one row per goal of issue 6.
    from benchmarks.__main__ import summary_markdown

    summary = summary_markdown(results, "python -m benchmarks")
    assert summary.count("**met**") + summary.count("**missed**") == 3 + 1 + 2
    assert "faster than TruncatedSVD" in summary and "merged inference" in summary


def test_update_section_replaces_only_its_section(tmp_path, monkeypatch):
    path = tmp_path / "B.md"
    path.write_text("# Title\n\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n")
    report.update_section("b", "new b", path=str(path))
    report.update_section("a", "new a", path=str(path))
    text = path.read_text()
    assert "new a" in text and "old a" not in text and "new b" in text
    assert text.startswith("# Title")
    # The environment variable redirects calls that name no path.
    other = tmp_path / "other.md"
    monkeypatch.setenv(report.BENCHMARKS_MD_ENV, str(other))
    report.update_section("c", "from env")
    assert "from env" in other.read_text()
    assert "from env" not in path.read_text()


def test_help_lists_the_separate_benchmarks_and_rejects_unknown_names():
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("imdb_benchmark", "bert_benchmark", "export_benchmark", "--quick", "--only"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "svd,nope"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Received: --only=svd,nope" in bad.stderr
