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
import numpy as np
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


# ----------------------------------------------------------------------------
# Issue 13: large vocabularies, accelerators, SVD initialisation overhead


def test_vocab_benchmark_tiny_runs_and_reports_memory(tmp_path):
    from benchmarks import vocab_benchmark

    result = vocab_benchmark.run(tiny=True, isolate=False, write=False,
                                 json_path=str(tmp_path / "vocab.json"), verbose=False)
    runs = {(r["model"], r["optimizer"], r["rank"]): r for r in result["results"]}
    assert set(runs) == {("lookup", "adam", 0), ("lookup", "adam", 4),
                         ("two_tower", "adam", 0), ("two_tower", "adam", 4),
                         ("lookup", "sgd", 4)}
    for r in runs.values():
        assert r["step_seconds"] > 0 and np.isfinite(r["loss"])
    assert runs[("lookup", "adam", 0)]["speedup"] == 1.0
    assert runs[("lookup", "adam", 4)]["speedup"] is not None
    assert runs[("lookup", "sgd", 4)]["speedup"] is None  # no SGD Embedding twin
    # The factorized table holds rank / dim of the full table's rows.
    assert runs[("lookup", "adam", 4)]["params"] < runs[("lookup", "adam", 0)]["params"]
    assert json.loads((tmp_path / "vocab.json").read_text())["results"]

    memory = {(m["dim"], m["rank"], m["optimizer"]): m for m in result["memory"]}
    assert memory[(128, 0, "adam")]["bytes_per_row"] == 128 * 4 * 3
    assert memory[(128, 16, "adam")]["bytes_per_row"] == 16 * 4 * 3
    assert memory[(300, 0, "sgd")]["bytes_per_row"] == 300 * 4
    assert memory[(300, 0, "adam")]["max_rows_24gib"] == 24 * 2**30 // 3600
    assert "does not fit" in result["markdown"]
    assert "| lookup |" in result["markdown"]


def test_vocab_is_selectable_but_not_in_the_default_suite():
    from benchmarks.__main__ import BENCHMARKS
    from benchmarks.__main__ import _parse

    assert _parse(["--only", "vocab", "--quick"]).only == ["vocab"]
    assert "vocab" not in BENCHMARKS
    from benchmarks import vocab_benchmark

    grid = vocab_benchmark.default_grid()
    assert {(g["backend"], g["rows"]) for g in grid if g["rank"] == 0} >= {
        ("tensorflow", 3_000_000), ("jax", 3_000_000)}
    assert {g["rank"] for g in grid} == {0, 8, 16, 32, 64}
    assert {g["optimizer"] for g in grid} == {"adam", "sgd"}
    assert {g["dim"] for g in grid} == {128, 300}


def test_svd_from_matrix_overhead_is_measured(tmp_path):
    from benchmarks import svd_benchmark

    matrix = svd_benchmark.decaying_matrix(500, 32)
    path = str(tmp_path / "m.npy")
    np.save(path, matrix)
    out = svd_benchmark.overhead_worker(path, 4, repeats=1)
    assert set(out["median_seconds"]) == {"truncated_svd", "from_matrix"}
    assert out["overhead"] == pytest.approx(
        out["median_seconds"]["from_matrix"] / out["median_seconds"]["truncated_svd"] - 1)
    run = {"label": "x", "shape": [500, 32], "matrix_bytes": matrix.nbytes, "rank": 4,
           "optimal_error": 0.5, "results": {}, "from_matrix": out}
    assert "`FactorizedEmbedding.from_matrix`" in svd_benchmark.markdown([run], [], "c", "1")


ACCELERATOR_WITHOUT_TF = """
import json, sys
sys.modules["tensorflow"] = None  # as on a GPU machine with JAX but no TensorFlow
from benchmarks.accelerator import main
main(["--tiny", "--no-write", "--json", sys.argv[1]])
loaded = [name for name, module in sys.modules.items()
          if module is not None and name.split(".")[0] == "tensorflow"]
assert not loaded, loaded
"""


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="a JAX subprocess whatever the suite's backend: the JAX suite runs it once",
)
def test_accelerator_runs_on_jax_without_tensorflow(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "accelerator.json"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "KERAS_BACKEND": "jax",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", ACCELERATOR_WITHOUT_TF, str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GPU figures not measured" in proc.stdout
    result = json.loads(out.read_text())
    assert result["device"]["backend"] == "jax"
    rows = result["rows"]
    assert {r["policy"] for r in rows} == {"float32", "mixed_float16"}
    assert {r["model"] for r in rows} >= {"Embedding", "Dense", "LowRankDense rank 4"}
    imdb = [r for r in rows if r["what"] == "IMDB LSTM"]
    assert len(imdb) == 4 and all(0 <= r["test_accuracy"] <= 1 for r in imdb)
    assert imdb[0]["data"] == "sample"


def test_accelerator_tokenizer_reserves_padding_and_oov():
    from benchmarks.accelerator import vectorize

    ids = vectorize(["a a b", "b c"], {"x": ["a b zzz", "c<br />c"]}, vocab=4, length=4)
    # 0 pads, 1 is out of vocabulary, then the most frequent words: "a", "b".
    assert ids["x"].tolist() == [[2, 3, 1, 0], [1, 1, 0, 0]]


def test_accelerator_renders_saved_runs_with_their_notes(tmp_path):
    from benchmarks import accelerator

    row = {"what": "8 x 8 layers", "policy": "float32", "model": "Dense",
           "step_seconds": 0.002, "speedup": 1.0}
    gpu = {"device": {"backend": "jax", "platform": "gpu", "device": "H100"},
           "size": "full", "command": "c1", "complete": False, "rows": [row],
           "note": "Timed with the batch copied."}
    cpu = {**gpu, "device": {"backend": "jax", "platform": "cpu", "device": "cpu"},
           "command": "c2", "complete": True, "note": None}
    paths = []
    for name, result in (("gpu.json", gpu), ("cpu.json", cpu)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(result))
    text = accelerator.render([str(p) for p in paths], write=False)
    assert text.index("`c1`") < text.index("Measured on H100") < text.index("`c2`")
    assert text.count("Timed with the batch copied.") == 1
    assert text.count("stopped before its last part") == 1
    assert "GPU figures not measured" in text.split("`c2`")[1]
    with pytest.raises(SystemExit):
        accelerator.main(["--only", "imdb,gpu"])


def test_bert_levers_render_carries_rows_without_their_json(tmp_path):
    from benchmarks import bert_levers
    from benchmarks.report import section_table
    from benchmarks.report import update_section

    row = {"index": 1, "selection": "Q/K/V", "method": "whitened", "allocation": "uniform",
           "sequential": False, "distillation": None, "param_ratio": 0.5, "cosine": 0.91234,
           "seconds": 12.3, "load_average": 2.1}
    carried = [[f"old {i}"] + ["x"] * 7 for i in range(3)]
    text = bert_levers.render([row], carried)
    lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert lines[0].startswith("| old 0 |") and lines[2].startswith("| old 2 |")
    assert lines[1] == "| Q/K/V | whitened | uniform | no | - | 0.500 | 0.9123 | 12 (load 2) |"
    path = str(tmp_path / "BENCHMARKS.md")
    update_section("bert-levers", text, path)
    assert section_table("bert-levers", path)[1] == lines[1].strip("| ").split(" | ")
    assert bert_levers.render([], section_table("bert-levers", path)) == text
    assert section_table("missing", path) == []


def test_timed_phases_time_each_step_and_restore_the_functions():
    import keras

    from benchmarks import bert_levers
    from benchmarks.phases import STEPS
    from benchmarks.phases import _owner_and_name
    from benchmarks.phases import timed_phases
    from keras_factorized import factorize

    originals = [_owner_and_name(m, a)[0].__dict__[_owner_and_name(m, a)[1]] for m, a, _ in STEPS]
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), keras.layers.Dense(4)])
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    with timed_phases() as steps:
        factorize(model, param_ratio=0.5, method="whitened", calibration_data=x)
    assert steps["whitened spectra"][1] == 2
    assert {"input statistics", "first factors", "sensitivity allocation"} <= set(steps)
    assert all(seconds >= 0 for seconds, _ in steps.values())
    restored = [_owner_and_name(m, a)[0].__dict__[_owner_and_name(m, a)[1]] for m, a, _ in STEPS]
    assert all(a is b for a, b in zip(originals, restored))
    row = {"index": 8, "selection": "all six", "method": "whitened", "allocation": "auto",
           "sequential": "default", "distillation": None, "param_ratio": 0.5, "cosine": 0.93,
           "seconds": 850.0, "load_average": 2.0,
           "phases": {"distillation": [600.0, 1], "held-out loss": [17.5, 19]}}
    text = bert_levers.render([row])
    assert "Row 8's call (850 s), step by step" in text
    assert "distillation 600.0 s, held-out loss 17.5 s (19 calls)." in text


def test_distill_variants_train_each_variant_from_the_same_factors():
    """Two equal variants score the same (each restarts from the snapshot,
    and distillation is deterministic); a batch-size variant re-cuts the
    batches and scores otherwise; `distill` is restored."""
    from benchmarks.distill_variants import render
    from benchmarks.distill_variants import run_variants
    from keras_factorized.surgery import DistillationConfig
    from keras_factorized.surgery import distillation

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(16)])
    rng = np.random.default_rng(0)
    calibration, data, probe = (rng.normal(size=(n, 16)).astype("float32") for n in (32, 32, 8))
    reference = keras.ops.convert_to_numpy(model(probe))
    real_distill, logged = distillation.distill, []

    def score(student):
        return float(np.mean(np.abs(keras.ops.convert_to_numpy(student(probe)) - reference)))

    # The calibration data joins the distillation data: batches, as on MiniLM.
    kwargs = dict(rank=6, method="learned", calibration_data=calibration,
                  distillation=DistillationConfig(data=data, epochs=2, batch_size=8,
                                                  learning_rate=1e-2, validation_split=0))
    variants = [{}, {"batch_size": 4}, {}]
    results = run_variants(model, kwargs, variants, score, log=logged.append)
    assert [r["changes"] for r in results] == variants
    scores = [r["score"] for r in results]
    assert scores[0] == scores[2] and scores[1] != scores[0]
    assert len(logged) == 3 and distillation.distill is real_distill
    table = render(results, scores[0]).splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| defaults | ")
    assert table[2].split(" | ")[2:4] == ["+0.00000", "-"]  # nothing held out
    assert table[3].startswith("| batch_size=4 | ")


@pytest.mark.parametrize(
    "text, changes",
    [("defaults", {}), ("seed=1", {"seed": 1}),
     ("batch_size=4, dtype_policy=mixed_bfloat16", {"batch_size": 4, "dtype_policy": "mixed_bfloat16"}),
     ("jit=1", None), ("epochs", None), ("data=1", None), ("refit=False", None),
     ("epochs=-1", None)],
)
def test_distill_variants_parse_config_fields_only(text, changes):
    from benchmarks.distill_variants import parse_variant

    if changes is None:
        with pytest.raises(ValueError, match="epochs|variant"):
            parse_variant(text)
    else:
        assert parse_variant(text) == changes
