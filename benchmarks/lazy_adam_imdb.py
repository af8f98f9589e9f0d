"""IMDB accuracy with `LazyAdam` against `Adam` (the IMDB example's model).

Trains the model of `examples/imdb_lstm` (token ids -> embedding -> LSTM ->
sigmoid) with a full `Embedding` and with `FactorizedEmbedding(rank=16)`, each
with the example's optimizer (`Adam`, learning rate 1e-3, `clipnorm=1.0`) and
with `keras_factorized.LazyAdam` under the same settings, from the same seed,
with the example's early stopping on validation accuracy; reports the test
accuracy and the time per epoch. On TensorFlow `LazyAdam` updates only the
rows of the table a batch touched; on JAX it is `Adam`.

Writes the `lazy-adam-imdb` section of BENCHMARKS.md and
`benchmarks/out/lazy_adam_imdb.json`.

    python -m benchmarks.lazy_adam_imdb --data ../shared/data/aclImdb_v1.tar.gz --max-samples 5000
    python -m benchmarks.lazy_adam_imdb --tiny --no-write
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import _common
from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
OPTIMIZERS = ("adam", "lazy_adam")


def _optimizer(name, learning_rate):
    import keras

    from keras_factorized import LazyAdam

    cls = LazyAdam if name == "lazy_adam" else keras.optimizers.Adam
    return cls(learning_rate, clipnorm=1.0)  # as in the example


def train_one(example, arrays, vocab_size, rank, optimizer, args) -> dict:
    """One model of the example, trained with `optimizer`; its accuracy and speed."""
    import keras

    keras.utils.set_random_seed(args.seed)
    model = example.build_model(vocab_size, args.sequence_length, args.embedding_dim,
                                args.lstm_units, rank=rank)
    model.compile(optimizer=_optimizer(optimizer, args.learning_rate),
                  loss="binary_crossentropy", metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=1,
                                         restore_best_weights=True)
    start = time.perf_counter()
    history = model.fit(*arrays["train"], validation_data=arrays["validation"],
                        epochs=args.epochs, batch_size=args.batch_size, callbacks=[stop],
                        verbose=0)
    val = [float(v) for v in history.history["val_accuracy"]]
    return {
        "table": "Embedding" if rank is None else f"rank {rank}",
        "optimizer": optimizer,
        "epochs_trained": len(val),
        "time_per_epoch_s": (time.perf_counter() - start) / len(val),
        "val_accuracy": max(val),
        "test_accuracy": example.accuracy(model, arrays),
    }


def markdown(rows, command, load, info) -> str:
    table = [[r["table"], r["optimizer"], f"{100 * r['test_accuracy']:.2f}%",
              f"{100 * r['val_accuracy']:.2f}%", r["epochs_trained"],
              f"{r['time_per_epoch_s']:.1f} s"] for r in rows]
    return "\n".join([
        "## IMDB accuracy with `LazyAdam` against `Adam`",
        "",
        f"Command: `{command}`  ",
        f"Backend {info['backend']}; {info['data']}; seed {info['seed']} (one seed: "
        f"differences under about a point are within seed noise); load average {load} "
        "at the start (2 shared cores). The model of `examples/imdb_lstm` (vocabulary "
        f"{info['vocab_size']:,}, dim {info['embedding_dim']}, LSTM {info['lstm_units']}), "
        "Adam and `LazyAdam` both with learning rate "
        f"{info['learning_rate']:g} and `clipnorm=1.0` as in the example, at most "
        f"{info['epochs']} epochs with early stopping on validation accuracy.",
        "",
        markdown_table(["table", "optimizer", "test accuracy", "best validation accuracy",
                        "epochs", "time per epoch"], table),
    ])


def run(args, command=None) -> dict:
    import keras

    from benchmarks.examples import load_example
    from keras_factorized.datasets import imdb

    example = load_example("imdb_lstm")
    load = _common.load_average()
    data, source = imdb.load_imdb(args.data, seed=example.DATA_SEED,
                                  max_samples=args.max_samples)
    vectorizer, arrays = example.vectorize(data, args.vocab_size, args.sequence_length)
    vocab_size = vectorizer.vocabulary_size()
    rows = []
    for rank in (None, args.rank):
        for optimizer in OPTIMIZERS:
            row = train_one(example, arrays, vocab_size, rank, optimizer, args)
            rows.append(row)
            print(f"  {row['table']} {optimizer}: test {100 * row['test_accuracy']:.2f}%, "
                  f"{row['epochs_trained']} epochs, {row['time_per_epoch_s']:.1f} s/epoch",
                  flush=True)
    info = {"backend": keras.backend.backend(), "seed": args.seed, "vocab_size": vocab_size,
            "data": (f"{source.kind} data, {len(data.train.texts):,} train / "
                     f"{len(data.validation.texts):,} validation / {len(data.test.texts):,} "
                     "test reviews"),
            **{k: getattr(args, k) for k in ("embedding_dim", "lstm_units", "learning_rate",
                                             "epochs")}}
    command = command or "python -m benchmarks.lazy_adam_imdb"
    text = markdown(rows, command, load, info)
    if not args.no_write:
        update_section("lazy-adam-imdb", text)
    json_path = args.json or (None if args.no_write else
                              os.path.join(OUT_DIR, "lazy_adam_imdb.json"))
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        write_json(json_path, {"rows": rows, "info": info, "load_average": load,
                               "command": command})
    return {"rows": rows, "info": info, "markdown": text}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", default=None, help="aclImdb_v1.tar.gz or its folder (default: the "
        "example's choice: the full dataset when cached, else the embedded sample)")
    add("--max-samples", type=int, default=None, help="N train and N test reviews")
    add("--rank", type=int, default=16)
    add("--vocab-size", type=int, default=20000)
    add("--sequence-length", type=int, default=200)
    add("--embedding-dim", type=int, default=128)
    add("--lstm-units", type=int, default=64)
    add("--epochs", type=int, default=3)
    add("--batch-size", type=int, default=64)
    add("--learning-rate", type=float, default=1e-3)
    add("--seed", type=int, default=0)
    add("--tiny", action="store_true", help="toy sizes on the embedded sample (smoke test)")
    add("--no-write", action="store_true")
    add("--json", default=None)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        args.max_samples, args.vocab_size, args.sequence_length = 40, 300, 16
        args.embedding_dim, args.lstm_units, args.epochs, args.rank = 8, 4, 1, 2
    for name in ("max_samples", "rank", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"Received an invalid value for `--{name.replace('_', '-')}`, "
                         f"expected an integer >= 1. Received: {value}")
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    result = run(args, command=f"python -m benchmarks.lazy_adam_imdb {argv_text}".strip())
    if args.no_write:
        print(result["markdown"])


if __name__ == "__main__":
    main()
