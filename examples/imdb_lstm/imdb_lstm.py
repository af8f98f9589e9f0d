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

With `--pretrained` (a GloVe/word2vec text file, or a BERT preset folder such
as all-MiniLM-L6-v2's) the reviews are tokenized the way the vectors expect
(words for GloVe, WordPiece for BERT) and the models are the full pretrained
table and its truncated SVD at each rank of `--ranks`
(`FactorizedEmbedding.from_matrix`), fine-tuned or, with
`--freeze-embedding`, frozen.

With `--quantize int8`, each trained model is also evaluated with its
embedding quantized to int8 (`layer.quantize("int8")`): the table gains a row
per model with the bytes of its embedding and of its `.keras` file (and, with
`--export-dir`/`--tflite`, of the exported files).

It prints a table (parameters, compression, test accuracy, `.keras` size),
picks the smallest rank whose validation accuracy is within
`--rank-tolerance` points of the best (choosing the rank by validation, never
by test), and writes both to `OUTPUT_DIR/results.json`. Without `--data` it reads the
full dataset when it is cached or can be downloaded, and otherwise a sample
of 4,000 real reviews shipped with keras-factorized; it says which.

    python examples/imdb_lstm/imdb_lstm.py
    python examples/imdb_lstm/imdb_lstm.py --data aclImdb_v1.tar.gz --ranks 16,4 --epochs 3
    python examples/imdb_lstm/imdb_lstm.py --pretrained glove.6B.100d.txt --ranks 8,32 --freeze-embedding
    python examples/imdb_lstm/imdb_lstm.py --ranks 4 --quantize int8 --tflite imdb.tflite

Statistics over several seeds, tables and plots: `benchmarks/imdb_benchmark.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time

import keras

from keras_factorized import FactorizedEmbedding
from keras_factorized import reporting
from keras_factorized.atomic_io import write_text
from keras_factorized.datasets import imdb
from keras_factorized.layers.factor_quantization import SUPPORTED_MODES as QUANTIZE_MODES
from keras_factorized.spectrum import stored_bytes
from keras_factorized.validation import invalid_value

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
    # fmt: off
    add("--data", metavar="PATH", help="aclImdb_v1.tar.gz or its extracted aclImdb/ folder "
        "(default: the full dataset, cached or downloaded, else the embedded sample)")
    add("--max-samples", type=int, metavar="N", help="use only N train and N test reviews")
    add("--vocab-size", type=int, default=20000, help="TextVectorization vocabulary size")
    add("--sequence-length", type=int, default=200, help="tokens kept per review (the last ones)")
    add("--embedding-dim", type=int, default=128, help="embedding width")
    add("--lstm-units", type=int, default=64, help="LSTM units")
    add("--ranks", type=int_list, default=[16, 4, 2], help="FactorizedEmbedding ranks")
    add("--svd-ranks", type=int_list, default=[4], help="SVD ranks of the trained baseline table")
    add("--epochs", type=int, default=3, help="at most (early stopping on validation accuracy)")
    add("--batch-size", type=int, default=64)
    add("--learning-rate", type=float, default=1e-3, help="Adam learning rate (clipnorm 1.0)")
    add("--svd-epochs", type=int, default=1, help="fine-tuning epochs after SVD compression")
    add("--svd-learning-rate", type=float, default=1e-4, help="learning rate of that fine-tuning")
    add("--seed", type=int, default=0, help="seed of the weights and of the shuffling")
    add("--pretrained", metavar="PATH", help="GloVe/word2vec text file, or a BERT preset folder "
        "(WordPiece tokens): start from these vectors, full and SVD-truncated at each of --ranks")
    add("--freeze-embedding", action="store_true", help="with --pretrained: a fixed table")
    add("--rank-tolerance", type=float, default=0.5,
        help="pick the smallest rank within this many points of the best validation accuracy")
    add("--mixed-precision", action="store_true", help="mixed_float16 (GPU), mixed_bfloat16 (CPU)")
    add("--strategy", choices=("default", "mirrored", "multiworker"), default="default",
        help="tf.distribute strategy (TensorFlow backend)")
    add("--lstm-unroll", action="store_true", help="unrolled LSTM (for TFLite builtin ops)")
    add("--output-dir", default=os.path.join("runs", "imdb"), help="where results.json goes")
    add("--export-dir", metavar="DIR", help="export the best factorized model for TF Serving")
    add("--tflite", metavar="PATH", help="also write the best factorized model as TFLite")
    add("--quantize", choices=QUANTIZE_MODES, metavar="MODE", help="also evaluate every trained "
        f"model with its embedding quantized to MODE ({', '.join(QUANTIZE_MODES)}; "
        "`layer.quantize`): the table gains a row per model with its test accuracy and the "
        "bytes of its embedding and .keras file; with --export-dir/--tflite the best "
        "factorized model is also exported quantized, next to the float one (DIR_MODE, "
        "NAME_MODE.tflite), and both files' sizes are shown")
    add("--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity")
    # fmt: on
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raises a `ValueError` naming the first flag with a value out of range."""
    limits = [(name, 1) for name in ("vocab_size", "sequence_length", "embedding_dim",
                                     "lstm_units", "epochs", "batch_size")]  # fmt: skip
    for name, low in limits + [("max_samples", 4)]:
        value = getattr(args, name)
        if value is not None and value < low:
            raise invalid_value(name, f"an integer >= {low}", value)
    for name in ("learning_rate", "svd_learning_rate"):
        if getattr(args, name) <= 0:
            raise invalid_value(name, "a float > 0", getattr(args, name))
    for name in () if args.pretrained else ("ranks", "svd_ranks"):
        if any(rank > args.embedding_dim for rank in getattr(args, name)):
            expected = f"ranks in [1, {args.embedding_dim}] (the embedding dimension)"
            raise invalid_value(name, expected, getattr(args, name))


def adapt_vectorizer(data, vocab_size: int):
    """A word-level `TextVectorization` adapted on the training reviews."""
    vectorizer = keras.layers.TextVectorization(max_tokens=vocab_size, name="text_vectorization")
    vectorizer.adapt(data.train.texts.astype(str), batch_size=1024)
    return vectorizer


def token_ids(tokenize, data, sequence_length: int) -> dict:
    """Maps every split to `(ids, labels)` with `tokenize` (texts -> token ids).

    Long reviews keep their last `sequence_length` tokens (their conclusion,
    as `keras.utils.pad_sequences(truncating="pre")`); padding (id 0) goes at
    the end.
    """

    def ids(texts):
        rows = []
        for start in range(0, len(texts), 1024):
            batch = tokenize(texts[start : start + 1024].astype(str))
            if hasattr(batch, "to_list"):  # A ragged tensor (WordPiece on TensorFlow).
                batch = batch.to_list()
            elif not isinstance(batch, list):  # Dense ids (TextVectorization).
                batch = keras.ops.convert_to_numpy(batch)
            rows += [[i for i in row if i != 0] for row in batch]  # Id 0 is padding only.
        return keras.utils.pad_sequences(
            rows, maxlen=sequence_length, padding="post", truncating="pre", dtype="int32"
        )

    return {
        name: (ids(split.texts), split.labels)
        for name, split in zip(("train", "validation", "test"), data)
    }


def vectorize(data, vocab_size: int, sequence_length: int):
    """`(vectorizer, arrays)`: word-level token ids of every split."""
    vectorizer = adapt_vectorizer(data, vocab_size)
    return vectorizer, token_ids(vectorizer, data, sequence_length)


def load_pretrained(path: str, data, vocab_size: int):
    """`(tokenize, matrix, vectorizer)` for `--pretrained PATH`.

    A folder is a BERT preset (KerasHub, or Hugging Face `config.json` +
    `model.safetensors` + `vocab.txt`): its WordPiece tokenizer and its token
    embedding table; `vectorizer` is then `None`. A file is GloVe/word2vec
    text: the vectors of a word-level `TextVectorization`'s vocabulary
    (missing words get zero rows).
    """
    if not os.path.exists(path):
        raise ValueError(
            "Received an invalid value for `pretrained`, expected a GloVe/word2vec "
            f"text file or a BERT preset folder. Received: pretrained={path!r}"
        )
    if os.path.isdir(path):
        import keras_hub

        tokenizer = keras_hub.models.BertTokenizer.from_preset(path)
        backbone = keras_hub.models.BertBackbone.from_preset(path)
        matrix = keras.ops.convert_to_numpy(backbone.token_embedding.embeddings)
        print(f"Pretrained: WordPiece table {matrix.shape[0]:,} x {matrix.shape[1]} from {path}")
        return lambda texts: tokenizer([re.sub(r"<br\s*/?>", " ", t) for t in texts]), matrix, None
    from keras_factorized.word_vectors import load_word_vectors

    vectorizer = adapt_vectorizer(data, vocab_size)
    vectors = load_word_vectors(path, vectorizer.get_vocabulary())
    print(f"Pretrained: {vectors.matrix.shape[1]}-d vectors from {path}; {vectors.summary(5)}")
    return vectorizer, vectors.matrix, vectorizer


def pretrained_embedding(matrix, rank=None, trainable=True):
    """The full pretrained table (`rank=None`), or its truncated SVD at `rank`."""
    if rank is None:
        vocab, dim = matrix.shape
        layer = keras.layers.Embedding(
            vocab, dim, mask_zero=True, trainable=trainable, name="embedding"
        )
        layer.build((None,))
        layer.set_weights([matrix])
        return layer
    return FactorizedEmbedding.from_matrix(
        matrix, rank=rank, mask_zero=True, trainable=trainable, name="embedding"
    )


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


def embedding_bytes(model) -> int:
    """Bytes of the variables of `model`'s embedding layer (an int8 entry is one byte)."""
    return stored_bytes(model.get_layer("embedding"))


def quantized_copy(model, mode: str):
    """A copy of the trained `model` whose embedding layer is quantized to `mode`.

    Only the embedding: the LSTM has no quantized mode, and the 65-weight
    classifier stays float so that the TFLite file keeps builtin ops.
    """
    copy = model.__class__.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    copy.get_layer("embedding").quantize(mode)
    copy.compile(loss="binary_crossentropy", metrics=["accuracy"])
    return copy


def with_quantized(trained, arrays, args) -> list:
    """`trained` with, after each `(row, model)`, the row of its `--quantize` copy."""
    result = []
    for row, model in trained:
        row.update(precision="float32", embedding_bytes=embedding_bytes(model))
        copy = quantized_copy(model, args.quantize)
        name = f"{row['model']} {args.quantize}"
        # Same parameters (entries of the weights), fewer bytes.
        same = ("kind", "rank", "seed", "embedding_params", "total_params")
        quantized = {key: row[key] for key in same}
        quantized.update(
            model=name,
            quantized_from=row["model"],
            precision=args.quantize,
            test_accuracy=accuracy(copy, arrays),
            model_size_bytes=saved_size(copy),
            embedding_bytes=embedding_bytes(copy),
        )
        print(f"==> {name}: test accuracy {100 * quantized['test_accuracy']:.2f}%")
        result += [(row, model), (quantized, copy)]
    return result


def has_gpu() -> bool:
    if keras.backend.backend() == "jax":
        import jax

        return jax.default_backend() == "gpu"
    if keras.backend.backend() == "torch":
        import torch

        return torch.cuda.is_available()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def strategy_scope(args):
    """The `scope` of the `--strategy` (a no-op context for `default`)."""
    if args.strategy == "default":
        return contextlib.nullcontext
    from keras_factorized.distribute import get_strategy

    return get_strategy(args.strategy).scope


def describe(model, arrays, name, kind, rank, seed, info, **extra) -> dict:
    """One result row: sizes, test accuracy and the training `info` of `model`."""
    row = {
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
    print(f"==> {name}: test accuracy {100 * row['test_accuracy']:.2f}%")
    return row


def train_all(arrays, vocab_size, args, seed):
    """Trains the baseline, each scratch rank and each SVD rank; yields `(row, model)`."""
    sizes = dict(
        vocab_size=vocab_size,
        sequence_length=args.sequence_length,
        embedding_dim=args.embedding_dim,
        lstm_units=args.lstm_units,
        lstm_unroll=args.lstm_unroll,
    )
    scope, fit = strategy_scope(args), dict(epochs=args.epochs, learning_rate=args.learning_rate)
    keras.utils.set_random_seed(seed)
    print(f"\n=== baseline: Embedding({vocab_size}, {args.embedding_dim})")
    with scope():
        baseline = build_model(**sizes, name="baseline")
        info = train(baseline, arrays, args, **fit)
    yield describe(baseline, arrays, "baseline", "baseline", None, seed, info), baseline

    for rank in args.ranks:
        keras.utils.set_random_seed(seed)
        print(f"\n=== FactorizedEmbedding rank {rank}, from scratch")
        with scope():
            model = build_model(**sizes, rank=rank, name=f"rank{rank}")
            info = train(model, arrays, args, **fit)
        yield describe(model, arrays, f"rank {rank}", "scratch", rank, seed, info), model

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
            epochs = dict(epochs=args.svd_epochs, learning_rate=args.svd_learning_rate)
            info = train(model, arrays, args, **epochs, early_stopping=False)
        name = f"svd rank {rank}"
        row = describe(
            model, arrays, name, "svd", rank, seed, info, test_accuracy_before_fine_tuning=before
        )
        yield row, model


def train_pretrained(arrays, matrix, args, seed):
    """Trains on the full pretrained table, then on its SVD at each rank; yields `(row, model)`."""
    trainable = not args.freeze_embedding
    suffix = "" if trainable else " (frozen)"
    vocab_size, dim = matrix.shape
    scope = strategy_scope(args)
    for rank in [None, *args.ranks]:
        keras.utils.set_random_seed(seed)
        name = ("pretrained" if rank is None else f"pretrained rank {rank}") + suffix
        print(
            f"\n=== {name}: {vocab_size:,} x {dim} table" + (f", SVD rank {rank}" if rank else "")
        )
        with scope():
            embedding = pretrained_embedding(matrix, rank, trainable)
            model = build_model(
                vocab_size, args.sequence_length, dim, args.lstm_units,
                embedding=embedding, lstm_unroll=args.lstm_unroll,
                name="pretrained" if rank is None else f"pretrained_rank{rank}",
            )  # fmt: skip
            info = train(model, arrays, args, epochs=args.epochs, learning_rate=args.learning_rate)
        kind = "pretrained" if rank is None else "pretrained_svd"
        yield describe(model, arrays, name, kind, rank, seed, info, frozen=not trainable), model


def select_rank(rows, tolerance_points: float):
    """The row of the smallest rank whose validation accuracy is within
    `tolerance_points` of the best validation accuracy of `rows` (the full
    table included), or `None` when no factorized row is that close."""
    best = max(row["val_accuracy"] for row in rows)
    close = [
        row for row in rows
        if row["rank"] is not None and row["val_accuracy"] >= best - tolerance_points / 100
    ]  # fmt: skip
    return min(close, key=lambda row: row["rank"]) if close else None


def format_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# Columns shown when a row has them (with --quantize): key, title.
BYTES_COLUMNS = (
    ("embedding_bytes", "emb. bytes"), ("saved_model_bytes", "SavedModel"), ("tflite_bytes", "TFLite")
)  # fmt: skip


def format_table(rows) -> str:
    """The results as a fixed-width table (`keras_factorized.reporting`)."""
    extra = [(key, title) for key, title in BYTES_COLUMNS if any(key in r for r in rows)]
    headers = ["model", "emb. params", "total params", "compression", "test acc.", ".keras size"]
    cells = [
        [r["model"], r["embedding_params"], r["total_params"], f"{r['compression']:.1f}x",
         f"{100 * r['test_accuracy']:.2f}%", format_bytes(r["model_size_bytes"])]
        + [format_bytes(r[key]) if key in r else "-" for key, _ in extra]
        for r in rows
    ]  # fmt: skip
    return reporting.format_table(headers + [title for _, title in extra], cells, left=[0])


def export_best(rows_and_models, vectorizer, args):
    """Exports the factorized model with the best validation accuracy (and,
    with `--quantize`, its quantized copy too, recording both files' sizes)."""
    candidates = [
        (row["val_accuracy"], row, model)
        for row, model in rows_and_models
        if row["rank"] is not None and "quantized_from" not in row
    ]
    if not candidates:
        print(
            "Nothing to export: no factorized model was trained (--ranks and --svd-ranks are empty)."
        )
        return
    _, best, model = max(candidates, key=lambda candidate: candidate[0])
    record = bool(args.quantize)
    export_model(model, best, vectorizer, args.export_dir, args.tflite, record)
    for row, copy in rows_and_models:
        if row.get("quantized_from") == best["model"]:
            paths = quantized_paths(args.export_dir, args.tflite, args.quantize)
            export_model(copy, row, vectorizer, *paths, record)


def quantized_paths(export_dir, tflite, mode: str):
    """Where the quantized copy goes: `DIR_int8` and `NAME_int8.tflite`."""
    if export_dir:
        export_dir = f"{os.path.normpath(export_dir)}_{mode}"
    if tflite:
        root, extension = os.path.splitext(tflite)
        tflite = f"{root}_{mode}{extension or '.tflite'}"
    return export_dir, tflite


def export_model(model, row, vectorizer, export_dir, tflite, record: bool) -> None:
    """Writes `model` for TF Serving and/or TFLite; with `record`, adds the
    files' sizes to `row`."""
    from keras_factorized import export

    if export_dir:
        # Raw text in, with the word-level vectorizer; token ids with WordPiece.
        text = {} if vectorizer is None else dict(text_vectorizer=vectorizer, truncate="pre")
        version = export.export_for_serving(model, export_dir, **text)
        print(f"SavedModel of {row['model']} ({model.name}): {version}")
        if record:
            row["saved_model_bytes"] = sum(
                os.path.getsize(os.path.join(folder, name))
                for folder, _, names in os.walk(version) for name in names
            )  # fmt: skip
    if tflite:
        export.export_tflite(model, tflite)
        print(f"TFLite of {row['model']} ({model.name}): {tflite}")
        if record:
            row["tflite_bytes"] = os.path.getsize(tflite)


def print_rank_choice(rows, tolerance_points: float):
    """Prints and returns the rank chosen by validation accuracy (see `select_rank`)."""
    chosen = select_rank(rows, tolerance_points)
    best = max(rows, key=lambda row: row["val_accuracy"])
    if chosen is None:
        print(
            f"\nRank by validation: no rank within {tolerance_points:g} points of {best['model']}."
        )
        return None
    choice = {
        "model": chosen["model"],
        "rank": chosen["rank"],
        "tolerance_points": tolerance_points,
        "val_accuracy": chosen["val_accuracy"],
        "best_model": best["model"],
        "best_val_accuracy": best["val_accuracy"],
        "test_accuracy": chosen["test_accuracy"],
        "compression": chosen["compression"],
    }
    print(
        f"\nRank by validation: {chosen['model']}, the smallest rank within {tolerance_points:g} "
        f"points of the best validation accuracy ({best['model']}, "
        f"{100 * best['val_accuracy']:.2f}%): validation {100 * chosen['val_accuracy']:.2f}%, "
        f"test {100 * chosen['test_accuracy']:.2f}%, {chosen['compression']:.1f}x fewer "
        "embedding parameters than the first row."
    )
    return choice


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
        if args.pretrained:
            tokenize, matrix, vectorizer = load_pretrained(args.pretrained, data, args.vocab_size)
            arrays = token_ids(tokenize, data, args.sequence_length)
            vocab_size = matrix.shape[0]
            trained = list(train_pretrained(arrays, matrix, args, args.seed))
        else:
            vectorizer, arrays = vectorize(data, args.vocab_size, args.sequence_length)
            vocab_size = vectorizer.vocabulary_size()
            trained = list(train_all(arrays, vocab_size, args, args.seed))
        if args.quantize:
            trained = with_quantized(trained, arrays, args)
        if args.export_dir or args.tflite:
            export_best(trained, vectorizer, args)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    rows = [row for row, _ in trained]
    for row in rows:
        row["compression"] = rows[0]["embedding_params"] / row["embedding_params"]
    print("\n" + format_table(rows))
    float_rows = [r for r in rows if r["kind"] != "svd" and "quantized_from" not in r]
    choice = print_rank_choice(float_rows, args.rank_tolerance)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    config = dict(
        {k: v for k, v in vars(args).items() if not callable(v)},
        vocab_size_actual=vocab_size,
        data_source=source.kind,
        policy="mixed" if args.mixed_precision else "float32",
        backend=keras.backend.backend(),
    )
    write_text(path, json.dumps({"config": config, "runs": rows, "rank_choice": choice}, indent=2))
    print(f"\nResults: {path}")
    return {
        "rows": rows,
        "rank_choice": choice,
        "source": source,
        "split_sizes": tuple(len(split.texts) for split in data),
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
