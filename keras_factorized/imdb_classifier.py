"""IMDB sentiment classifier with a factorized embedding, end to end.

The running example of keras-factorized (`keras-factorized imdb`,
`examples/imdb_lstm.py`). It follows Keras's text-classification workflow (raw
text -> `TextVectorization` -> Embedding -> LSTM -> Dense) and trains, in one
run and on the same data:

1. the full-rank `keras.layers.Embedding` baseline;
2. a `FactorizedEmbedding` trained from scratch at each rank of `--ranks`;
3. the baseline's trained embedding compressed by SVD to each rank of
   `--svd-ranks` (`FactorizedEmbedding.from_embedding`), then fine-tuned for
   `--svd-epochs` epochs.

It prints a table (embedding parameters, total parameters, compression, test
accuracy, time per epoch, saved `.keras` size) and writes it as
`results.json`/`results.csv` into `--output-dir`, with a plot of test accuracy
against embedding parameters (`accuracy_vs_params.png`).

The training recipe is the one that made single runs stable in our
measurements (BENCHMARKS.md, section imdb): `mask_zero=True` so the LSTM
skips the padding that `TextVectorization` appends, Adam with gradient
clipping (`clipnorm=1.0`), and early stopping on validation accuracy with the
best weights restored. The validation reviews come from the training split;
the test split is only used for the final evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from keras_factorized.atomic_io import atomic_output
from keras_factorized.atomic_io import write_text

DEFAULT_RANKS = (16, 4, 2)
DEFAULT_SVD_RANKS = (4,)


def _int_list(text: str, minimum: int = 1) -> list[int]:
    """Parses `"16,4,2"` (or `""` for none) into integers >= `minimum`."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers >= {minimum}, received {text!r}"
            )
        values.append(value)
    return values


def _seed_list(text: str) -> list[int]:
    return _int_list(text, minimum=0)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the example's flags to `parser` (used by `keras-factorized imdb`)."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="aclImdb/ folder or aclImdb_v1.tar.gz; default: download Stanford's "
        "archive into the Keras cache (~/.keras/datasets).",
    )
    data.add_argument(
        "--max-samples",
        type=int,
        default=None,
        metavar="N",
        help="Use only N training (incl. validation) and N test reviews: a quick run.",
    )
    data.add_argument("--validation-split", type=float, default=0.2, help="Fraction of the training reviews held out for validation (never from test).")
    data.add_argument("--data-seed", type=int, default=1337, help="Seed of the train/validation split.")

    model = parser.add_argument_group("model")
    model.add_argument("--vocab-size", type=int, default=20000, help="TextVectorization vocabulary size (embedding rows).")
    model.add_argument("--sequence-length", type=int, default=200, help="Tokens kept per review.")
    model.add_argument("--embedding-dim", type=int, default=128, help="Embedding width (columns of the table).")
    model.add_argument("--lstm-units", type=int, default=64, help="Units of the LSTM.")
    model.add_argument(
        "--truncate",
        choices=("pre", "post"),
        default="pre",
        help="Keep the first ('post', TextVectorization's behaviour) or the last "
        "('pre', Keras's pad_sequences) SEQUENCE_LENGTH tokens of long reviews.",
    )
    model.add_argument(
        "--mask-zero",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Mask the padding so the LSTM skips it (default: on).",
    )
    model.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Wrap the LSTM in keras.layers.Bidirectional.",
    )
    model.add_argument("--dropout", type=float, default=0.0, help="Dropout before the classifier.")
    model.add_argument(
        "--lstm-unroll",
        action="store_true",
        help="Build the LSTM with unroll=True (static graph, what TFLite builtin ops may need).",
    )
    model.add_argument(
        "--ranks",
        type=_int_list,
        default=list(DEFAULT_RANKS),
        help="Ranks of the FactorizedEmbedding trained from scratch (default: 16,4,2; '' for none).",
    )
    model.add_argument(
        "--svd-ranks",
        type=_int_list,
        default=list(DEFAULT_SVD_RANKS),
        help="Ranks the trained baseline embedding is compressed to by SVD (default: 4; '' for none).",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=3, help="Maximum epochs (early stopping may stop sooner).")
    train.add_argument("--batch-size", type=int, default=64, help="Training batch size.")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate.")
    train.add_argument("--clipnorm", type=float, default=1.0, help="Gradient clipping norm (0: off).")
    train.add_argument(
        "--patience",
        type=int,
        default=1,
        help="EarlyStopping patience on validation accuracy (best weights restored; -1: off).",
    )
    train.add_argument("--svd-epochs", type=int, default=1, help="Fine-tuning epochs after SVD compression.")
    train.add_argument(
        "--svd-learning-rate",
        type=float,
        default=1e-4,
        help="Learning rate of the SVD fine-tuning (default: 1e-4; at the training "
        "rate, 1e-3, one more epoch over-fits the trained LSTM, see BENCHMARKS.md).",
    )
    train.add_argument("--seeds", type=_seed_list, default=[0], help="Comma-separated seeds, one run each.")
    train.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity.")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--output-dir", default=os.path.join("runs", "imdb"), help="Where results, plot and models go (default: runs/imdb).")
    run_group.add_argument(
        "--save-models",
        action="store_true",
        help="Keep every trained model as .keras in OUTPUT_DIR/models (sizes are always measured).",
    )
    run_group.add_argument(
        "--mixed-precision",
        action="store_true",
        help="mixed_float16 on GPU, mixed_bfloat16 on CPU.",
    )
    run_group.add_argument(
        "--strategy",
        choices=("default", "mirrored", "multiworker"),
        default="default",
        help="tf.distribute strategy to build and train under.",
    )
    run_group.add_argument(
        "--export-dir",
        default=None,
        help="Export the best factorized model (by validation accuracy), with its "
        "TextVectorization, as a SavedModel for TF Serving.",
    )
    run_group.add_argument("--tflite", default=None, metavar="PATH", help="Also write that model as TFLite.")
    return parser


def build_classifier(
    vocab_size: int = 20000,
    sequence_length: int | None = 200,
    embedding_dim: int = 128,
    lstm_units: int = 64,
    *,
    rank: int | None = None,
    embedding=None,
    mask_zero: bool = True,
    bidirectional: bool = False,
    dropout: float = 0.0,
    lstm_unroll: bool = False,
    name: str | None = None,
):
    """The example's classifier: token ids -> Embedding -> LSTM -> sigmoid.

    Args:
        vocab_size: Rows of the embedding (the `TextVectorization` vocabulary).
        sequence_length: Tokens per review (`None` for variable length;
            `lstm_unroll=True` needs a fixed length).
        embedding_dim: Columns of the embedding.
        lstm_units: Units of the LSTM (per direction if bidirectional).
        rank: `None` for the full-rank `keras.layers.Embedding`, else the rank
            of a `FactorizedEmbedding`.
        embedding: A ready embedding layer (e.g. from
            `FactorizedEmbedding.from_embedding`); overrides `rank`.
        mask_zero: Mask token 0 (padding) so the LSTM skips it.
        bidirectional: Wrap the LSTM in `keras.layers.Bidirectional`.
        dropout: Dropout rate before the output layer.
        lstm_unroll: Build the LSTM with `unroll=True`.
        name: Model name.

    Returns:
        An uncompiled functional `keras.Model` with layers named `embedding`,
        `lstm`, (`dropout`) and `classifier`; its output is float32 whatever
        the dtype policy.

    Example:

    >>> model = build_classifier(vocab_size=1000, sequence_length=20,
    ...                          embedding_dim=16, lstm_units=8, rank=4)
    >>> model.get_layer("embedding").count_params()
    4064
    """
    import keras

    if embedding is None:
        if rank is None:
            embedding = keras.layers.Embedding(
                vocab_size, embedding_dim, mask_zero=mask_zero, name="embedding"
            )
        else:
            from keras_factorized import FactorizedEmbedding

            embedding = FactorizedEmbedding(
                vocab_size, embedding_dim, rank=rank, mask_zero=mask_zero, name="embedding"
            )
    inputs = keras.Input(shape=(sequence_length,), dtype="int32", name="token_ids")
    x = embedding(inputs)
    lstm = keras.layers.LSTM(lstm_units, unroll=lstm_unroll, name="lstm")
    if bidirectional:
        lstm = keras.layers.Bidirectional(lstm, name="lstm")
    x = lstm(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)


def _compile(model, learning_rate, clipnorm):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=clipnorm or None),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )


def _has_gpu() -> bool:
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return jax.default_backend() == "gpu"
        if backend == "torch":
            import torch

            return torch.cuda.is_available()
    except Exception:  # A backend that cannot even list devices has no GPU for us.
        return False
    return False


def _epoch_timer():
    """A Keras callback whose `times` lists the wall time of each training epoch."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    return EpochTimer()


def _saved_size(model, path=None) -> int:
    """Bytes of the model saved as `.keras` without optimizer state.

    A fresh uncompiled clone is saved so the size is what a user ships, not
    the Adam moments. When `path` is given the file is kept there (written to
    a temporary name in the same folder, then renamed into place).
    """
    # `clone_model` would copy the compiled optimizer (its Adam moments triple
    # the file); a model rebuilt from its config is not compiled.
    clone = model.__class__.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".keras", prefix=".tmp-")
    os.close(fd)
    try:
        clone.save(tmp)
        size = os.path.getsize(tmp)
        if path:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return size


def _set_precision(enabled: bool) -> str:
    import keras

    if enabled:
        keras.mixed_precision.set_global_policy(
            "mixed_float16" if _has_gpu() else "mixed_bfloat16"
        )
    return keras.mixed_precision.global_policy().name


def _validate(args):
    checks = [
        ("max_samples", args.max_samples, args.max_samples is None or args.max_samples >= 4, "None or an integer >= 4"),
        ("vocab_size", args.vocab_size, args.vocab_size >= 3, "an integer >= 3"),
        ("sequence_length", args.sequence_length, args.sequence_length >= 1, "an integer >= 1"),
        ("embedding_dim", args.embedding_dim, args.embedding_dim >= 1, "an integer >= 1"),
        ("lstm_units", args.lstm_units, args.lstm_units >= 1, "an integer >= 1"),
        ("epochs", args.epochs, args.epochs >= 1, "an integer >= 1"),
        ("svd_epochs", args.svd_epochs, args.svd_epochs >= 0, "an integer >= 0"),
        ("batch_size", args.batch_size, args.batch_size >= 1, "an integer >= 1"),
        ("learning_rate", args.learning_rate, args.learning_rate > 0, "a float > 0"),
        ("dropout", args.dropout, 0 <= args.dropout < 1, "a float in [0, 1)"),
        ("validation_split", args.validation_split, 0 < args.validation_split < 1, "a float in (0, 1)"),
        ("seeds", args.seeds, len(args.seeds) >= 1, "at least one seed"),
    ]
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected {expected}. "
                f"Received: {name}={value!r}"
            )
    for name in ("ranks", "svd_ranks"):
        for rank in getattr(args, name):
            if rank > args.embedding_dim:
                raise ValueError(
                    f"Received an invalid value for `{name}`, expected ranks in "
                    f"[1, {args.embedding_dim}] (the embedding dimension). "
                    f"Received: {name}={getattr(args, name)!r}"
                )


def _vectorize(args, data):
    """Adapts `TextVectorization` on the training texts and maps every split to ids."""
    import keras

    vectorizer = keras.layers.TextVectorization(
        max_tokens=args.vocab_size,
        output_mode="int",
        output_sequence_length=args.sequence_length,
        name="text_vectorization",
    )
    vectorizer.adapt(data.train.texts.astype(str), batch_size=1024)
    length = args.sequence_length

    def last_tokens(batch):
        # Keeps the last `length` tokens of each review (Keras's
        # `pad_sequences(truncating="pre")`); padding stays at the end.
        batch = np.asarray(batch)
        out = np.zeros((len(batch), length), dtype="int32")
        for row, ids in enumerate(batch):
            ids = ids[ids != 0][-length:]
            out[row, : len(ids)] = ids
        return out

    if args.truncate == "pre":
        # Same vocabulary, no fixed length: batches come padded to their longest review.
        full_length = keras.layers.TextVectorization(
            output_mode="int", vocabulary=vectorizer.get_vocabulary()
        )

    def ids(texts):
        # Batches keep memory flat; ids are computed once, not every epoch.
        chunks = []
        for i in range(0, len(texts), 1024):
            batch = texts[i : i + 1024].astype(str)
            if args.truncate == "pre":
                chunks.append(last_tokens(full_length(batch)))
            else:
                chunks.append(np.asarray(vectorizer(batch)))
        return np.concatenate(chunks).astype("int32")

    arrays = {
        split: (ids(getattr(data, split).texts), getattr(data, split).labels)
        for split in ("train", "validation", "test")
    }
    return vectorizer, arrays


def _fit(model, arrays, args, *, epochs, learning_rate, early_stopping):
    import keras

    _compile(model, learning_rate, args.clipnorm)
    timer = _epoch_timer()
    callbacks = [timer]
    if early_stopping and args.patience >= 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy",
                patience=args.patience,
                restore_best_weights=True,
            )
        )
    history = model.fit(
        *arrays["train"],
        validation_data=arrays["validation"],
        epochs=epochs,
        batch_size=args.batch_size,
        callbacks=callbacks,
        verbose=args.verbose,
    )
    val = history.history.get("val_accuracy", [float("nan")])
    return {
        "epochs_trained": len(timer.times),
        "time_per_epoch_s": statistics.mean(timer.times) if timer.times else 0.0,
        "val_accuracy": max(val),
        "val_accuracy_history": [float(v) for v in val],
    }


def _evaluate(model, arrays, args) -> float:
    _, accuracy = model.evaluate(
        *arrays["test"], batch_size=max(args.batch_size, 256), verbose=0
    )
    return float(accuracy)


def _embedding_params(model) -> int:
    return int(model.get_layer("embedding").count_params())


def summarize(rows: list[dict]) -> list[dict]:
    """Aggregates per-seed rows into one row per model (mean and spread over seeds)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["model"], []).append(row)
    summary = []
    for name, group in groups.items():
        accuracies = [r["test_accuracy"] for r in group]
        first = group[0]
        summary.append(
            {
                "model": name,
                "kind": first["kind"],
                "rank": first["rank"],
                "embedding_params": first["embedding_params"],
                "total_params": first["total_params"],
                "compression": first["compression"],
                "seeds": len(group),
                "test_accuracy_mean": statistics.mean(accuracies),
                "test_accuracy_std": statistics.stdev(accuracies) if len(group) > 1 else 0.0,
                "test_accuracy_min": min(accuracies),
                "test_accuracy_max": max(accuracies),
                "time_per_epoch_s": statistics.mean(r["time_per_epoch_s"] for r in group),
                "epochs_trained_mean": statistics.mean(r["epochs_trained"] for r in group),
                "model_size_bytes": first["model_size_bytes"],
            }
        )
    return summary


def format_table(summary: list[dict]) -> str:
    """The summary as a fixed-width text table."""
    headers = (
        "model", "emb. params", "total params", "compression",
        "test acc. (%)", "s/epoch", "epochs", ".keras size",
    )
    lines = []
    for row in summary:
        accuracy = f"{100 * row['test_accuracy_mean']:.2f}"
        if row["seeds"] > 1:
            accuracy += f" ± {100 * row['test_accuracy_std']:.2f}"
        lines.append(
            (
                row["model"],
                f"{row['embedding_params']:,}",
                f"{row['total_params']:,}",
                f"{row['compression']:.1f}x",
                accuracy,
                f"{row['time_per_epoch_s']:.1f}",
                f"{row['epochs_trained_mean']:.1f}",
                f"{row['model_size_bytes'] / 1e6:.2f} MB",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)
    return "\n".join(out)


def write_outputs(output_dir: str, rows: list[dict], summary: list[dict], config: dict) -> dict:
    """Writes results.json, results.csv and accuracy_vs_params.png; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(output_dir, "results.json"),
        "csv": os.path.join(output_dir, "results.csv"),
        "plot": os.path.join(output_dir, "accuracy_vs_params.png"),
    }
    write_text(paths["json"], json.dumps({"config": config, "summary": summary, "runs": rows}, indent=2))
    buffer = io.StringIO()
    fields = [k for k in summary[0] if k != "val_accuracy_history"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(summary)
    write_text(paths["csv"], buffer.getvalue())
    plot_accuracy(summary, paths["plot"])
    return paths


def plot_accuracy(summary: list[dict], path: str) -> None:
    """Plots test accuracy against embedding parameters (log x) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"baseline": "s", "scratch": "o", "svd": "^"}
    labels = {"baseline": "full Embedding", "scratch": "FactorizedEmbedding (scratch)", "svd": "SVD of baseline + fine-tuning"}
    for kind in ("baseline", "scratch", "svd"):
        rows = [r for r in summary if r["kind"] == kind]
        if not rows:
            continue
        ax.errorbar(
            [r["embedding_params"] for r in rows],
            [100 * r["test_accuracy_mean"] for r in rows],
            yerr=[100 * r["test_accuracy_std"] for r in rows],
            fmt=markers[kind],
            capsize=3,
            label=labels[kind],
        )
        for r in rows:
            ax.annotate(
                r["model"], (r["embedding_params"], 100 * r["test_accuracy_mean"]),
                textcoords="offset points", xytext=(5, 5), fontsize=8,
            )
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("IMDB sentiment: accuracy vs embedding size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """Trains and evaluates every model asked for; returns the results.

    Args:
        args: The namespace from a parser set up by `add_arguments`.

    Returns:
        A dict with `rows` (one per model and seed), `summary` (one per
        model, mean and spread over seeds), `table` (the printed text),
        `files` (paths of the JSON, CSV and PNG) and `output_dir`.

    Example:

    >>> import argparse
    >>> parser = add_arguments(argparse.ArgumentParser())
    >>> args = parser.parse_args(["--data", "tests/data/imdb_fixture/aclImdb_mini.tar.gz",
    ...     "--max-samples", "64", "--vocab-size", "200", "--sequence-length", "16",
    ...     "--embedding-dim", "8", "--lstm-units", "4", "--ranks", "2", "--svd-ranks", "2",
    ...     "--epochs", "1", "--verbose", "0", "--output-dir", "/tmp/imdb_doctest"])
    >>> results = run(args)  # doctest: +SKIP
    >>> [row["model"] for row in results["summary"]]  # doctest: +SKIP
    ['baseline', 'rank 2', 'svd rank 2']
    """
    import keras

    from keras_factorized.datasets import imdb

    _validate(args)
    policy = _set_precision(args.mixed_precision)
    if args.strategy == "default":
        strategy_scope = contextlib.nullcontext
    else:
        from keras_factorized.distribute import get_strategy

        strategy = get_strategy(args.strategy)
        strategy_scope = strategy.scope

    started = time.perf_counter()
    data = imdb.load_data(
        args.data,
        validation_split=args.validation_split,
        seed=args.data_seed,
        max_samples=args.max_samples,
    )
    print(
        f"IMDB: {len(data.train.texts):,} train, {len(data.validation.texts):,} "
        f"validation, {len(data.test.texts):,} test reviews "
        f"(loaded in {time.perf_counter() - started:.1f} s)"
    )
    vectorizer, arrays = _vectorize(args, data)
    vocab_size = len(vectorizer.get_vocabulary())
    sizes = dict(
        vocab_size=vocab_size,
        sequence_length=args.sequence_length,
        embedding_dim=args.embedding_dim,
        lstm_units=args.lstm_units,
        mask_zero=args.mask_zero,
        bidirectional=args.bidirectional,
        dropout=args.dropout,
        lstm_unroll=args.lstm_unroll,
    )
    models_dir = os.path.join(args.output_dir, "models")
    rows: list[dict] = []
    best = None  # (val_accuracy, model) of the best factorized model.

    def record(model, name, kind, rank, seed, fit_info, extra=None):
        nonlocal best
        accuracy = _evaluate(model, arrays, args)
        model_path = os.path.join(models_dir, f"{name.replace(' ', '_')}_seed{seed}.keras") if args.save_models else None
        row = {
            "model": name,
            "kind": kind,
            "rank": rank,
            "seed": seed,
            "embedding_params": _embedding_params(model),
            "total_params": int(model.count_params()),
            "test_accuracy": accuracy,
            "model_size_bytes": _saved_size(model, model_path),
            **fit_info,
            **(extra or {}),
        }
        rows.append(row)
        print(f"==> {name} (seed {seed}): test accuracy {100 * accuracy:.2f}%")
        if kind != "baseline" and (best is None or row["val_accuracy"] > best[0]):
            best = (row["val_accuracy"], model)
        return row

    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        with strategy_scope():
            baseline = build_classifier(**sizes, name="baseline")
        print(f"\n=== baseline: full Embedding({vocab_size}, {args.embedding_dim}), seed {seed}")
        with strategy_scope():
            info = _fit(baseline, arrays, args, epochs=args.epochs, learning_rate=args.learning_rate, early_stopping=True)
        record(baseline, "baseline", "baseline", None, seed, info)

        for rank in args.ranks:
            keras.utils.set_random_seed(seed)
            print(f"\n=== FactorizedEmbedding rank {rank} from scratch, seed {seed}")
            with strategy_scope():
                model = build_classifier(**sizes, rank=rank, name=f"rank{rank}")
                info = _fit(model, arrays, args, epochs=args.epochs, learning_rate=args.learning_rate, early_stopping=True)
            record(model, f"rank {rank}", "scratch", rank, seed, info)

        for rank in args.svd_ranks:
            from keras_factorized import FactorizedEmbedding

            keras.utils.set_random_seed(seed)
            print(f"\n=== baseline embedding compressed by SVD to rank {rank}, fine-tuned {args.svd_epochs} epoch(s), seed {seed}")
            with strategy_scope():
                embedding = FactorizedEmbedding.from_embedding(
                    baseline.get_layer("embedding"), rank=rank, name="embedding"
                )
                model = build_classifier(**sizes, embedding=embedding, name=f"svd_rank{rank}")
                for layer in baseline.layers:
                    if layer.name not in ("embedding", "token_ids") and layer.weights:
                        model.get_layer(layer.name).set_weights(layer.get_weights())
            _compile(model, args.learning_rate, args.clipnorm)
            before = _evaluate(model, arrays, args)
            if args.svd_epochs:
                with strategy_scope():
                    info = _fit(
                        model, arrays, args,
                        epochs=args.svd_epochs,
                        learning_rate=args.svd_learning_rate or args.learning_rate,
                        early_stopping=False,
                    )
            else:
                _, val = model.evaluate(*arrays["validation"], batch_size=256, verbose=0)
                info = {"epochs_trained": 0, "time_per_epoch_s": 0.0, "val_accuracy": float(val), "val_accuracy_history": []}
            record(model, f"svd rank {rank}", "svd", rank, seed, info, {"test_accuracy_before_fine_tuning": before})

    baseline_params = next(r["embedding_params"] for r in rows if r["kind"] == "baseline")
    for row in rows:
        row["compression"] = baseline_params / row["embedding_params"]
    summary = summarize(rows)
    table = format_table(summary)
    config = {k: v for k, v in vars(args).items() if not callable(v)}
    config.update(policy=policy, backend=keras.backend.backend(), vocab_size_actual=vocab_size)
    files = write_outputs(args.output_dir, rows, summary, config)
    print("\n" + table)
    print(f"\nResults: {files['json']}, {files['csv']}\nPlot:    {files['plot']}")
    if args.save_models:
        print(f"Models:  {models_dir}")

    if (args.export_dir or args.tflite) and best is not None:
        from keras_factorized import export

        model = best[1]
        if args.export_dir:
            export.export_for_serving(
                model, args.export_dir, text_vectorizer=vectorizer, truncate=args.truncate
            )
            files["export_dir"] = args.export_dir
            print(f"SavedModel ({model.name}, with TextVectorization): {args.export_dir}")
        if args.tflite:
            export.export_tflite(model, args.tflite)
            files["tflite"] = args.tflite
            print(f"TFLite ({model.name}): {args.tflite}")
    return {
        "rows": rows,
        "summary": summary,
        "table": table,
        "files": files,
        "output_dir": args.output_dir,
        "split_sizes": tuple(len(getattr(data, s).texts) for s in ("train", "validation", "test")),
        "elapsed_s": time.perf_counter() - started,
    }


def main(argv=None) -> int:
    """Command-line entry point: parses `argv`, runs, returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="imdb_lstm",
        description="Train and compare IMDB sentiment classifiers with full, "
        "factorized and SVD-compressed embeddings.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
