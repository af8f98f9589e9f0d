"""`FactorizedEmbedding` against `keras.layers.Embedding` in the IMDB LSTM.

The example's classifier (vocabulary 20,000, embedding 128, 200 tokens,
LSTM 64, batch 64; `build_model` of examples/imdb_lstm/imdb_lstm.py) with a
full `Embedding`, with `FactorizedEmbedding` at a few ranks, and with the
factors merged back into an `Embedding` (`export.merge_factorized_layers`,
i.e. `to_embedding()`), on random token ids: the median time of a training
step (`train_on_batch`, Adam) and of an inference batch (`predict_on_batch`),
each as a ratio to the full model timed in the same rounds. Also times the
embedding lookup alone, where the factorized layer's extra matmul is not
hidden behind the LSTM. Writes the `embedding` section of BENCHMARKS.md.

    python -m benchmarks --only embedding
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import _common
from benchmarks.examples import load_example
from benchmarks.report import machine_description
from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json

TRAIN_GOAL = 1.3  # training step, at most this times the Embedding's
MERGED_GOAL = 1.05  # merged inference "equal": within the timing noise


def _models(vocab, dim, length, units, ranks, seed=0):
    import keras

    from keras_factorized.export import merge_factorized_layers

    build_classifier = load_example("imdb_lstm").build_model

    keras.utils.set_random_seed(seed)
    models = {"Embedding": build_classifier(vocab, length, dim, units, name="full")}
    for rank in ranks:
        models[f"rank {rank}"] = build_classifier(
            vocab, length, dim, units, rank=rank, name=f"rank{rank}"
        )
    models[f"rank {ranks[0]}, merged"] = merge_factorized_layers(models[f"rank {ranks[0]}"])
    for model in models.values():
        model.compile(optimizer="adam", loss="binary_crossentropy")
    return models


def run(quick=False, vocab=20000, dim=128, length=200, units=64, batch=64,
        ranks=(16, 4), repeats=None, write=True, json_path=None, command=None,
        verbose=True) -> dict:
    """Runs the embedding benchmark; returns its results and writes its section.

    Args:
        quick: 3 rounds instead of 7.
        vocab, dim, length, units, batch: the IMDB model and batch.
        ranks: ranks of the factorized embeddings (the first is also merged).
        repeats: rounds per timing (medians).
        write: update the `embedding` section of BENCHMARKS.md.
        json_path: also write the raw results there.
        command: the command line quoted in BENCHMARKS.md.
    """
    import keras

    load = _common.load_average()
    repeats = repeats or (3 if quick else 7)
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocab, size=(batch, length)).astype("int32")
    x[:, : length // 4] = 0  # left padding, as `TextVectorization` + masking gives
    y = rng.integers(0, 2, size=(batch, 1)).astype("float32")
    models = _models(vocab, dim, length, units, list(ranks))
    params = {name: m.get_layer("embedding").count_params() for name, m in models.items()}

    train = _common.time_interleaved(
        {name: (lambda m=m: m.train_on_batch(x, y)) for name, m in models.items()
         if "merged" not in name},
        repeats=repeats, min_seconds=0.0, warmup=2,
    )
    infer = _common.time_interleaved(
        {name: (lambda m=m: m.predict_on_batch(x)) for name, m in models.items()},
        repeats=repeats, min_seconds=0.1, warmup=2,
    )
    if verbose:
        print("  embedding train: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in train.items()))
        print("  embedding infer: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in infer.items()),
              flush=True)

    # The lookup alone, in a tf.function / jit as the model runs it.
    ids = keras.ops.convert_to_tensor(x)
    lookups = {}
    for name, model in models.items():
        layer = model.get_layer("embedding")
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            fn = tf.function(layer.__call__)
            lookups[name] = lambda fn=fn: fn(ids)
        else:
            lookups[name] = lambda layer=layer: keras.ops.convert_to_numpy(layer(ids))
    lookup = _common.time_interleaved(lookups, repeats=repeats, min_seconds=0.02)

    rows = []
    for name in models:
        rows.append({
            "model": name, "embedding_params": params[name],
            "train_seconds": train.get(name),
            "train_ratio": train[name] / train["Embedding"] if name in train else None,
            "infer_seconds": infer[name], "infer_ratio": infer[name] / infer["Embedding"],
            "samples_per_second": batch / infer[name],
            "lookup_seconds": lookup[name], "lookup_ratio": lookup[name] / lookup["Embedding"],
        })
    command = command or "python -m benchmarks --only embedding" + (" --quick" if quick else "")
    text = markdown(rows, dict(vocab=vocab, dim=dim, length=length, units=units,
                               batch=batch), command, load)
    if write:
        update_section("embedding", text)
    result = {"rows": rows, "load_average": load, "markdown": text}
    if json_path:
        write_json(json_path, {k: v for k, v in result.items() if k != "markdown"})
    return result


def markdown(rows, config, command, load) -> str:
    trained = [r for r in rows if r["train_ratio"] is not None and r["model"] != "Embedding"]
    merged = [r for r in rows if "merged" in r["model"]]
    worst_train = max(r["train_ratio"] for r in trained) if trained else float("nan")
    merged_ratio = merged[0]["infer_ratio"] if merged else float("nan")
    lines = [
        "## `FactorizedEmbedding` against `Embedding` in the IMDB LSTM",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}; load average {load} at the start "
        "(shared machine: compare the ratios, not the milliseconds)",
        "",
        f"Model: token ids ({config['length']}) -> embedding ({config['vocab']:,} x "
        f"{config['dim']}, `mask_zero=True`) -> LSTM({config['units']}) -> sigmoid, "
        f"batch {config['batch']}, random ids (a quarter padding), Adam. Medians of "
        "rounds in which every model runs once; ratios are to the full `Embedding` "
        "model of the same round. `merged` = the factorized model after "
        "`merge_factorized_layers` (`to_embedding()`), as exported for serving.",
        "",
        markdown_table(
            ["goal", "measured", "status"],
            [
                [f"training step <= {TRAIN_GOAL:g}x the Embedding's", f"{worst_train:.2f}x "
                 "(slowest rank)", _common.goal(worst_train <= TRAIN_GOAL)],
                ["merged inference equal to the Embedding's (within 5%)",
                 f"{merged_ratio:.2f}x", _common.goal(merged_ratio <= MERGED_GOAL)],
            ],
        ),
        "",
        markdown_table(
            ["embedding", "params", "train step", "vs Embedding", "inference batch",
             "vs Embedding", "samples/s", "lookup alone", "vs Embedding"],
            [[r["model"], f"{r['embedding_params']:,}",
              _common.fmt_seconds(r["train_seconds"]) if r["train_seconds"] else "-",
              f"{r['train_ratio']:.2f}x" if r["train_ratio"] else "-",
              _common.fmt_seconds(r["infer_seconds"]), f"{r['infer_ratio']:.2f}x",
              f"{r['samples_per_second']:,.0f}", _common.fmt_seconds(r["lookup_seconds"]),
              f"{r['lookup_ratio']:.2f}x"] for r in rows],
        ),
        "",
        "The lookup alone costs a gather of `batch x length` rows of `A` plus a "
        "`(batch length) x rank x dim` matmul, i.e. it grows with batch x length "
        "x rank, while the full table's gather grows with batch x length x dim; "
        "both are small next to the LSTM's 200 sequential steps, which is why "
        "the whole-model ratios stay near 1.",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ranks", default="16,4")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    run(quick=args.quick, ranks=tuple(int(r) for r in args.ranks.split(",")),
        write=not args.no_write, json_path=args.json)


if __name__ == "__main__":
    main()
