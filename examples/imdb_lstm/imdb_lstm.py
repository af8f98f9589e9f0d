"""IMDB sentiment with a factorized embedding: the running example of keras-factorized.

Keras's text-classification recipe (raw text -> `TextVectorization` ->
Embedding -> LSTM -> sigmoid), trained three ways on the same reviews:

1. `baseline`: a full `keras.layers.Embedding(vocab_size, embedding_dim)`;
2. `rank r`: a `FactorizedEmbedding` of each rank in `--ranks`, from scratch
   (`vocab_size * r + r * embedding_dim` parameters instead of
   `vocab_size * embedding_dim`);
3. `svd rank r`: the trained baseline's embedding compressed by truncated SVD
   (`FactorizedEmbedding.from_embedding`) to each rank in `--svd-ranks`, then
   fine-tuned for `--svd-epochs` epochs.

It prints a table (parameters, compression, test accuracy, `.keras` size)
and writes it to `OUTPUT_DIR/results.json`. Without `--data` it reads the
full dataset when it is cached or can be downloaded, and otherwise a sample
of 4,000 real reviews shipped with keras-factorized; it says which.

    python examples/imdb_lstm/imdb_lstm.py
    python examples/imdb_lstm/imdb_lstm.py --data aclImdb_v1.tar.gz --ranks 16,4 --epochs 3

Statistics over several seeds, tables and plots: `benchmarks/imdb_benchmark.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import keras

from keras_factorized import FactorizedEmbedding
from keras_factorized.atomic_io import write_text
from keras_factorized.datasets import imdb

DATA_SEED = 1337  # The train/validation split stays the same whatever --seed is.


def int_list(text: str) -> list[int]:
    """`"16,4,2"` -> `[16, 4, 2]`; `""` -> `[]`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = [0]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1, received {text!r}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train IMDB sentiment classifiers with a full, a factorized "
        "and an SVD-compressed embedding, and compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--data",
        metavar="PATH",
        help="aclImdb_v1.tar.gz or its extracted aclImdb/ folder "
        "(default: the full dataset, cached or downloaded, else the embedded sample)",
    )
    add("--max-samples", type=int, metavar="N", help="use only N train and N test reviews")
    add(
        "--vocab-size",
        type=int,
        default=20000,
        help="TextVectorization vocabulary (embedding rows)",
    )
    add("--sequence-length", type=int, default=200, help="tokens kept per review (the last ones)")
    add("--embedding-dim", type=int, default=128, help="embedding width")
    add("--lstm-units", type=int, default=64, help="LSTM units")
    add(
        "--ranks",
        type=int_list,
        default=[16, 4, 2],
        help="FactorizedEmbedding ranks trained from scratch",
    )
    add(
        "--svd-ranks",
        type=int_list,
        default=[4],
        help="ranks the trained baseline embedding is compressed to",
    )
    add(
        "--epochs",
        type=int,
        default=3,
        help="maximum epochs (early stopping on validation accuracy)",
    )
    add("--batch-size", type=int, default=64)
    add("--learning-rate", type=float, default=1e-3, help="Adam learning rate (clipnorm 1.0)")
    add("--svd-epochs", type=int, default=1, help="fine-tuning epochs after SVD compression")
    add("--svd-learning-rate", type=float, default=1e-4, help="learning rate of that fine-tuning")
    add("--seed", type=int, default=0, help="seed of the weights and of the shuffling")
    add(
        "--mixed-precision", action="store_true", help="mixed_float16 on GPU, mixed_bfloat16 on CPU"
    )
    add(
        "--strategy",
        choices=("default", "mirrored", "multiworker"),
        default="default",
        help="tf.distribute strategy (TensorFlow backend)",
    )
    add(
        "--lstm-unroll",
        action="store_true",
        help="unrolled LSTM (what TFLite builtin ops may need)",
    )
    add("--output-dir", default=os.path.join("runs", "imdb"), help="where results.json goes")
    add(
        "--export-dir",
        metavar="DIR",
        help="export the best factorized model, taking raw text, for TF Serving",
    )
    add("--tflite", metavar="PATH", help="also write the best factorized model as TFLite")
    add("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raises a `ValueError` naming the first flag with a value out of range."""
    positive = (
        "vocab_size",
        "sequence_length",
        "embedding_dim",
        "lstm_units",
        "epochs",
        "batch_size",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(
                f"Received an invalid value for `{name}`, expected an integer >= 1. "
                f"Received: {name}={getattr(args, name)!r}"
            )
    if args.max_samples is not None and args.max_samples < 4:
        raise ValueError(
            "Received an invalid value for `max_samples`, expected an integer >= 4. "
            f"Received: max_samples={args.max_samples!r}"
        )
    if args.learning_rate <= 0 or args.svd_learning_rate <= 0:
        raise ValueError(
            "Received an invalid value for `learning_rate`, expected a float > 0. "
            f"Received: learning_rate={args.learning_rate!r}"
        )
    for name in ("ranks", "svd_ranks"):
        if any(rank > args.embedding_dim for rank in getattr(args, name)):
            raise ValueError(
                f"Received an invalid value for `{name}`, expected ranks in "
                f"[1, {args.embedding_dim}] (the embedding dimension). "
                f"Received: {name}={getattr(args, name)!r}"
            )


def vectorize(data, vocab_size: int, sequence_length: int):
    """Adapts a `TextVectorization` on the training reviews; maps every split to ids.

    Long reviews keep their last `sequence_length` tokens (their conclusion,
    as `keras.utils.pad_sequences(truncating="pre")`); padding goes at the end.
    """
    vectorizer = keras.layers.TextVectorization(max_tokens=vocab_size, name="text_vectorization")
    vectorizer.adapt(data.train.texts.astype(str), batch_size=1024)

    def ids(texts):
        rows = []
        for start in range(0, len(texts), 1024):
            batch = keras.ops.convert_to_numpy(vectorizer(texts[start : start + 1024].astype(str)))
            rows += [row[row != 0] for row in batch]  # Id 0 is padding only.
        return keras.utils.pad_sequences(
            rows, maxlen=sequence_length, padding="post", truncating="pre", dtype="int32"
        )

    arrays = {
        name: (ids(split.texts), split.labels)
        for name, split in zip(("train", "validation", "test"), data)
    }
    return vectorizer, arrays


def build_model(
    vocab_size,
    sequence_length=None,
    embedding_dim=128,
    lstm_units=64,
    *,
    rank=None,
    embedding=None,
    mask_zero=True,
    lstm_unroll=False,
    name=None,
):
    """Token ids -> Embedding -> LSTM -> sigmoid, as a `keras.Sequential`.

    `rank=None` gives a full `keras.layers.Embedding`, an integer a
    `FactorizedEmbedding` of that rank; `embedding` (a ready layer, e.g. from
    `FactorizedEmbedding.from_embedding`) overrides both. `mask_zero` lets the
    LSTM skip the padding.
    """
    if embedding is None and rank is None:
        embedding = keras.layers.Embedding(
            vocab_size, embedding_dim, mask_zero=mask_zero, name="embedding"
        )
    elif embedding is None:
        embedding = FactorizedEmbedding(
            vocab_size, embedding_dim, rank=rank, mask_zero=mask_zero, name="embedding"
        )
    model = keras.Sequential(name=name)
    model.add(keras.Input(shape=(sequence_length,), dtype="int32", name="token_ids"))
    model.add(embedding)
    model.add(keras.layers.LSTM(lstm_units, unroll=lstm_unroll, name="lstm"))
    model.add(keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="classifier"))
    return model


def train(model, arrays, args, *, epochs, learning_rate, early_stopping=True) -> dict:
    """Compiles and fits `model`; returns the epochs, time and validation accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=1.0),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = []
    if early_stopping:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=1, restore_best_weights=True
            )
        )
    start = time.perf_counter()
    history = model.fit(
        *arrays["train"],
        validation_data=arrays["validation"],
        epochs=epochs,
        batch_size=args.batch_size,
        callbacks=callbacks,
        verbose=args.verbose,
    )
    val = [float(v) for v in history.history["val_accuracy"]]
    return {
        "epochs_trained": len(val),
        "time_per_epoch_s": (time.perf_counter() - start) / len(val),
        "val_accuracy": max(val),
        "val_accuracy_history": val,
    }


def accuracy(model, arrays, split="test") -> float:
    return float(model.evaluate(*arrays[split], batch_size=256, verbose=0)[1])


def saved_size(model) -> int:
    """Bytes of `model` saved as `.keras` without optimizer state (what a user ships)."""
    clone = model.__class__.from_config(model.get_config())  # Not compiled: no Adam moments.
    clone.set_weights(model.get_weights())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        clone.save(path)
        return os.path.getsize(path)


def has_gpu() -> bool:
    if keras.backend.backend() == "jax":
        import jax

        return jax.default_backend() == "gpu"
    if keras.backend.backend() == "torch":
        import torch

        return torch.cuda.is_available()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def train_all(arrays, vocab_size, args, seed):
    """Trains the baseline, each scratch rank and each SVD rank; yields `(row, model)`."""
    sizes = dict(
        vocab_size=vocab_size,
        sequence_length=args.sequence_length,
        embedding_dim=args.embedding_dim,
        lstm_units=args.lstm_units,
        lstm_unroll=args.lstm_unroll,
    )
    scope = contextlib.nullcontext
    if args.strategy != "default":
        from keras_factorized.distribute import get_strategy

        scope = get_strategy(args.strategy).scope

    def row(model, name, kind, rank, info, **extra):
        result = {
            "model": name,
            "kind": kind,
            "rank": rank,
            "seed": seed,
            "embedding_params": model.get_layer("embedding").count_params(),
            "total_params": model.count_params(),
            "test_accuracy": accuracy(model, arrays),
            "model_size_bytes": saved_size(model),
            **info,
            **extra,
        }
        print(f"==> {name}: test accuracy {100 * result['test_accuracy']:.2f}%")
        return result

    keras.utils.set_random_seed(seed)
    print(f"\n=== baseline: Embedding({vocab_size}, {args.embedding_dim})")
    with scope():
        baseline = build_model(**sizes, name="baseline")
        info = train(baseline, arrays, args, epochs=args.epochs, learning_rate=args.learning_rate)
    yield row(baseline, "baseline", "baseline", None, info), baseline

    for rank in args.ranks:
        keras.utils.set_random_seed(seed)
        print(f"\n=== FactorizedEmbedding rank {rank}, from scratch")
        with scope():
            model = build_model(**sizes, rank=rank, name=f"rank{rank}")
            info = train(model, arrays, args, epochs=args.epochs, learning_rate=args.learning_rate)
        yield row(model, f"rank {rank}", "scratch", rank, info), model

    for rank in args.svd_ranks:
        keras.utils.set_random_seed(seed)
        print(f"\n=== baseline embedding compressed by SVD to rank {rank}, then fine-tuned")
        with scope():
            embedding = FactorizedEmbedding.from_embedding(
                baseline.get_layer("embedding"), rank=rank, name="embedding"
            )
            model = build_model(**sizes, embedding=embedding, name=f"svd_rank{rank}")
            for name in ("lstm", "classifier"):  # Keep the trained LSTM and classifier.
                model.get_layer(name).set_weights(baseline.get_layer(name).get_weights())
            model.compile(loss="binary_crossentropy", metrics=["accuracy"])
            before = accuracy(model, arrays)
            if args.svd_epochs:
                info = train(
                    model,
                    arrays,
                    args,
                    epochs=args.svd_epochs,
                    learning_rate=args.svd_learning_rate,
                    early_stopping=False,
                )
            else:
                info = {
                    "epochs_trained": 0,
                    "time_per_epoch_s": 0.0,
                    "val_accuracy_history": [],
                    "val_accuracy": accuracy(model, arrays, "validation"),
                }
        yield (
            row(
                model,
                f"svd rank {rank}",
                "svd",
                rank,
                info,
                test_accuracy_before_fine_tuning=before,
            ),
            model,
        )


def format_table(rows) -> str:
    lines = [
        f"{'model':<12} {'emb. params':>12} {'total params':>13} {'compression':>11} "
        f"{'test acc.':>9} {'.keras size':>11}"
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<12} {r['embedding_params']:>12,} {r['total_params']:>13,} "
            f"{r['compression']:>10.1f}x {100 * r['test_accuracy']:>8.2f}% "
            f"{r['model_size_bytes'] / 1e6:>8.2f} MB"
        )
    return "\n".join(lines)


def export_best(rows_and_models, vectorizer, args):
    """Exports the factorized model with the best validation accuracy."""
    from keras_factorized import export

    candidates = [
        (row["val_accuracy"], model) for row, model in rows_and_models if row["kind"] != "baseline"
    ]
    if not candidates:
        print(
            "Nothing to export: no factorized model was trained (--ranks and --svd-ranks are empty)."
        )
        return
    model = max(candidates, key=lambda pair: pair[0])[1]
    if args.export_dir:
        version = export.export_for_serving(
            model, args.export_dir, text_vectorizer=vectorizer, truncate="pre"
        )
        print(f"SavedModel of {model.name} (takes raw text): {version}")
    if args.tflite:
        export.export_tflite(model, args.tflite)
        print(f"TFLite of {model.name}: {args.tflite}")


def run(args: argparse.Namespace) -> dict:
    """Loads the data, trains every model, prints and writes the table; returns the results."""
    check_args(args)
    data, source = imdb.load_imdb(args.data, seed=DATA_SEED, max_samples=args.max_samples)
    print(source.message)
    print(
        f"{len(data.train.texts):,} train, {len(data.validation.texts):,} validation "
        f"(from train), {len(data.test.texts):,} test reviews"
    )
    previous_policy = keras.mixed_precision.global_policy()
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16" if has_gpu() else "mixed_bfloat16")
    try:
        vectorizer, arrays = vectorize(data, args.vocab_size, args.sequence_length)
        vocab_size = vectorizer.vocabulary_size()
        trained = list(train_all(arrays, vocab_size, args, args.seed))
        if args.export_dir or args.tflite:
            export_best(trained, vectorizer, args)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    rows = [row for row, _ in trained]
    for row in rows:
        row["compression"] = rows[0]["embedding_params"] / row["embedding_params"]
    print("\n" + format_table(rows))
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    config = dict(
        {k: v for k, v in vars(args).items() if not callable(v)},
        vocab_size_actual=vocab_size,
        data_source=source.kind,
        policy="mixed" if args.mixed_precision else "float32",
        backend=keras.backend.backend(),
    )
    write_text(path, json.dumps({"config": config, "runs": rows}, indent=2))
    print(f"\nResults: {path}")
    split_sizes = tuple(len(split.texts) for split in data)
    return {
        "rows": rows,
        "source": source,
        "split_sizes": split_sizes,
        "results_json": path,
        "vectorizer": vectorizer,
        "models": {row["model"]: model for row, model in trained},
    }


def main(argv=None) -> int:
    """Parses `argv` (default: the command line), runs, returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
