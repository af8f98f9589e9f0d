"""Accelerator benchmark: float32 against `mixed_float16`, one command, any backend.

Meant for a GPU machine with Keras on JAX (where TensorFlow may be absent: no
TensorFlow import is needed anywhere on this path), it also runs on CPU. For
the `float32` and `mixed_float16` dtype policies it measures:

- the IMDB LSTM example (`build_model` of examples/imdb_lstm/imdb_lstm.py)
  with a full `Embedding` and with `FactorizedEmbedding(rank=16)`: median
  training step and test accuracy after training (reviews tokenized here in
  plain Python, so `TextVectorization`, which needs TensorFlow, is not used);
- `LowRankDense` (rank m/8) against `Dense`: median training step of a
  stack of two m x m layers;
- the large-vocabulary step of `benchmarks.vocab_benchmark` (`lookup` model,
  1M x 128, rank 16, Adam) against `Embedding`.

Writes the `accelerator` section of BENCHMARKS.md and a JSON file. Without an
accelerator the section says so: its figures are CPU figures, and GPU figures
are not measured.

    KERAS_BACKEND=jax python -m benchmarks.accelerator
    python -m benchmarks.accelerator --data aclImdb_v1.tar.gz
    python -m benchmarks.accelerator --tiny --no-write   # seconds, on CPU
    python -m benchmarks.accelerator --render out/accelerator.json  # from a saved run
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import time

import numpy as np

from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
POLICIES = ("float32", "mixed_float16")
SIZES = {
    # reviews (train = test), epochs, vocabulary, tokens, embedding dim and
    # LSTM units of the IMDB model, Dense m, rows of the vocabulary step
    "full": dict(reviews=None, epochs=3, vocab=20000, length=200, dim=128, units=64,
                 dense=4096, rows=1_000_000, steps=20),
    "quick": dict(reviews=1000, epochs=1, vocab=10000, length=100, dim=128, units=64,
                  dense=1024, rows=200_000, steps=5),
    "tiny": dict(reviews=32, epochs=1, vocab=100, length=8, dim=16, units=4,
                 dense=32, rows=1000, steps=1),
}


def accelerator() -> dict:
    """The backend and its first device: `{"backend", "platform", "device"}`.

    `platform` is `"gpu"`, `"tpu"` or `"cpu"`. TensorFlow is imported only
    on the TensorFlow backend.
    """
    import keras

    backend = keras.backend.backend()
    platform, device = "cpu", "CPU"
    if backend == "jax":
        import jax

        first = jax.devices()[0]
        platform, device = first.platform, getattr(first, "device_kind", str(first))
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            platform, device = "gpu", gpus[0].name
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            platform, device = "gpu", torch.cuda.get_device_name(0)
    return {"backend": backend, "platform": platform, "device": device}


# ----------------------------------------------------------------------------
# IMDB without TensorFlow


def tokenize(text: str) -> list[str]:
    """Lower-cased words of a review, without HTML line breaks."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("<br />", " "))


def vectorize(train_texts, texts_by_split, vocab: int, length: int) -> dict:
    """Token ids: 0 pads, 1 is out of vocabulary, then words by frequency.

    The vocabulary comes from `train_texts` only; sequences are cut or padded
    at the end to `length` (the model masks the zeros).
    """
    counts = collections.Counter(w for text in train_texts for w in tokenize(text))
    index = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(vocab - 2))}
    out = {}
    for split, texts in texts_by_split.items():
        ids = np.zeros((len(texts), length), dtype="int32")
        for row, text in enumerate(texts):
            words = [index.get(w, 1) for w in tokenize(text)][:length]
            ids[row, : len(words)] = words
        out[split] = ids
    return out


def load_imdb_ids(path, reviews, vocab, length, seed=0) -> dict:
    """`{"train": (x, y), "test": (x, y)}` from `path` or the embedded sample."""
    from keras_factorized.datasets import imdb

    source = imdb.find_data(path, download_timeout=None)
    data = imdb.load_data(source.path, validation_split=0.0, seed=seed,
                          max_samples=reviews)
    ids = vectorize(data.train.texts, {"train": data.train.texts, "test": data.test.texts},
                    vocab, length)
    return {"source": source.kind,
            "train": (ids["train"], data.train.labels.astype("float32")),
            "test": (ids["test"], data.test.labels.astype("float32"))}


# ----------------------------------------------------------------------------
# Measurements


def step_seconds(model, x, y, steps: int) -> float:
    """Median seconds of `train_on_batch` after two warm-up steps.

    The batch is put on the device once, so that the step is timed without
    copying it there each time.
    """
    import keras

    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    for _ in range(2):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def imdb_rows(data, policy, size, batch=64, seed=0) -> list[dict]:
    """IMDB LSTM, `Embedding` and rank 16 (at most the embedding dimension):
    step time and test accuracy."""
    import keras

    from benchmarks.examples import load_example

    build_model = load_example("imdb_lstm").build_model
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    rows = []
    for rank in (None, 16):
        keras.utils.set_random_seed(seed)
        model = build_model(size["vocab"], size["length"], size["dim"], size["units"],
                            rank=rank if rank is None else min(rank, size["dim"]))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                      metrics=["accuracy"])
        step = step_seconds(model, x_train[:batch], y_train[:batch], size["steps"])
        keras.utils.set_random_seed(seed)
        model.fit(x_train, y_train, batch_size=batch, epochs=size["epochs"], verbose=0)
        _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
        rows.append({"what": "IMDB LSTM", "policy": policy,
                     "model": "Embedding" if rank is None
                     else f"FactorizedEmbedding rank {min(rank, size['dim'])}",
                     "step_seconds": step, "test_accuracy": float(accuracy),
                     "params": int(model.count_params())})
    return rows


def dense_rows(policy, size, seed=0) -> list[dict]:
    """Two m x m layers, `Dense` against `LowRankDense(rank=m/8)`."""
    import keras

    from keras_factorized import LowRankDense

    m, batch = size["dense"], size.get("dense_batch", 256)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, m)).astype("float32")
    y = rng.standard_normal((batch, m)).astype("float32")
    rows = []
    for rank in (None, m // 8):
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((m,))]
        for i in range(2):
            layers.append(keras.layers.Dense(m, activation="relu" if i == 0 else None)
                          if rank is None else
                          LowRankDense(m, rank=rank, activation="relu" if i == 0 else None))
        model = keras.Sequential(layers)
        model.compile(optimizer="adam", loss="mse")
        rows.append({"what": f"{m} x {m} layers, batch {batch}", "policy": policy,
                     "model": "Dense" if rank is None else f"LowRankDense rank {rank}",
                     "step_seconds": step_seconds(model, x, y, size["steps"]),
                     "params": int(model.count_params())})
    return rows


def vocab_rows(policy, size) -> list[dict]:
    """The large-vocabulary `lookup` step of `benchmarks.vocab_benchmark`."""
    import keras

    from benchmarks import vocab_benchmark

    rows = []
    for rank in (0, 16):
        cfg = vocab_benchmark.config(keras.backend.backend(), rows=size["rows"], rank=rank,
                                     steps=size["steps"],
                                     batch=8 if size["rows"] < 10_000 else 256)
        model, x, y = vocab_benchmark.build_model(cfg)
        rows.append({"what": f"{size['rows']:,} x 128 lookup, Adam", "policy": policy,
                     "model": "Embedding" if not rank else f"FactorizedEmbedding rank {rank}",
                     "step_seconds": step_seconds(model, x, y, size["steps"]),
                     "params": int(model.count_params())})
        del model
    return rows


def with_speedups(rows) -> list[dict]:
    """`rows`, each with its speed against the full layer under the same policy."""
    base = {(r["what"], r["policy"]): r["step_seconds"] for r in rows
            if r["model"] in ("Embedding", "Dense")}
    return [{**r, "speedup": base[(r["what"], r["policy"])] / r["step_seconds"]}
            for r in rows if (r["what"], r["policy"]) in base]


PARTS = ("imdb", "dense", "vocab")


def measure(size, data_path=None, policies=POLICIES, verbose=True,
            on_rows=None, parts=PARTS) -> list[dict]:
    """The rows of `parts` (of `PARTS`) under every policy.

    `on_rows(rows)`, when given, is called with the rows so far after each
    part, so that a run cut short by a time limit still leaves its figures.
    """
    import keras

    data = (load_imdb_ids(data_path, size["reviews"], size["vocab"], size["length"])
            if "imdb" in parts else {"source": None})
    makers = {"imdb": lambda p: imdb_rows(data, p, size),
              "dense": lambda p: dense_rows(p, size),
              "vocab": lambda p: vocab_rows(p, size)}
    rows = []
    previous = keras.config.dtype_policy()
    try:
        for policy in policies:
            keras.config.set_dtype_policy(policy)
            for part in parts:
                new = makers[part](policy)
                for row in new:
                    row["data"] = data["source"] if row["what"] == "IMDB LSTM" else None
                    if verbose:
                        print(f"  {policy}: {row['what']}, {row['model']}: "
                              f"{row['step_seconds'] * 1e3:.1f} ms/step"
                              + (f", accuracy {row['test_accuracy']:.3f}"
                                 if "test_accuracy" in row else ""), flush=True)
                rows += new
                if on_rows is not None:
                    on_rows(with_speedups(rows))
    finally:
        keras.config.set_dtype_policy(previous)
    return with_speedups(rows)


DATA = {"path": "the archive given with `--data`", "cache": "the full dataset (Keras cache)",
        "download": "the full dataset (downloaded)",
        "sample": "the embedded sample (1,000 reviews per split)"}


def markdown(results) -> str:
    """The section for one or more runs' results (each `run`'s JSON)."""
    lines = ["## Accelerators: float32 against `mixed_float16`", ""]
    for result in results:
        rows, device = result["rows"], result["device"]
        data = next((r["data"] for r in rows if r.get("data")), None)
        lines += [f"Command: `{result['command']}`  ",
                  f"Backend: {device['backend']}; sizes: `{result['size']}`"
                  + (f"; IMDB data: {DATA.get(data, data)}" if data else ""),
                  ""]
        if result.get("note"):
            lines += [result["note"], ""]
        if not result.get("complete", True):
            lines += ["This run stopped before its last part; the rows below are "
                      "those it measured.", ""]
        lines += [f"Measured on {device['device']} ({device['platform']})."
                  if device["platform"] in ("gpu", "tpu") else
                  "**GPU figures not measured**: no accelerator was available, so this "
                  f"run was on CPU ({device['device']}); its figures say nothing about a "
                  "GPU. Run the command on a GPU machine to fill this section.", "",
                  markdown_table(
                      ["what", "policy", "model", "step", "speedup", "test accuracy"],
                      [[r["what"], r["policy"], r["model"],
                        f"{r['step_seconds'] * 1e3:.1f} ms", f"{r['speedup']:.2f}x",
                        f"{r['test_accuracy']:.3f}" if "test_accuracy" in r else ""]
                       for r in rows]),
                  ""]
    lines += ["Median training step (`train_on_batch`) and, for the IMDB LSTM, test "
              "accuracy after training; speedup against the full layer (`Embedding`, "
              "`Dense`) under the same policy and run."]
    return "\n".join(lines)


def run(size_name="full", data_path=None, write=True, json_path=None, command=None,
        verbose=True, parts=PARTS, dense=None, dense_batch=None) -> dict:
    """Runs the benchmark; returns its rows and writes its section and JSON.

    `dense` and `dense_batch` replace the size's `LowRankDense` layer width
    and batch (large ones make a GPU step compute-bound).
    """
    size = dict(SIZES[size_name])
    size.update({k: v for k, v in (("dense", dense), ("dense_batch", dense_batch))
                 if v is not None})
    device = accelerator()
    if verbose:
        print(f"accelerator: {device}", flush=True)
    command = command or "python -m benchmarks.accelerator" + (
        f" --{size_name}" if size_name != "full" else "")
    if write:
        json_path = json_path or os.path.join(OUT_DIR, "accelerator.json")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)

    def result_of(rows, complete):
        return {"device": device, "size": size_name, "command": command,
                "complete": complete, "rows": rows}

    def save_partial(rows):
        if json_path:
            write_json(json_path, result_of(rows, False))

    rows = measure(size, data_path, verbose=verbose, on_rows=save_partial, parts=parts)
    result = result_of(rows, True)
    text = markdown([result])
    if write:
        update_section("accelerator", text)
    if json_path:
        write_json(json_path, result)
    return {**result, "markdown": text}


def render(json_paths, write=True) -> str:
    """The section from saved runs (made on a GPU machine, say), in order.

    A run cut short (`"complete": false`) is rendered with the rows it
    measured, and the section says so.
    """
    import json

    results = []
    for path in json_paths:
        with open(path) as f:
            results.append(json.load(f))
    text = markdown(results)
    if write:
        update_section("accelerator", text)
    return text


def command_line(args) -> str:
    """The command that `args` stand for, as the section names it."""
    import keras

    backend = keras.backend.backend()
    words = [] if backend == "tensorflow" else [f"KERAS_BACKEND={backend}"]
    words.append("python -m benchmarks.accelerator")
    words += ["--tiny"] if args.tiny else ["--quick"] if args.quick else []
    if args.data:
        words.append(f"--data {os.path.basename(os.path.normpath(args.data))}")
    if tuple(args.only) != PARTS:
        words.append("--only " + ",".join(args.only))
    words += [f"--{name.replace('_', '-')} {getattr(args, name)}"
              for name in ("dense", "dense_batch") if getattr(args, name) is not None]
    return " ".join(words)


def parts_argument(text) -> tuple:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(PARTS)}; received {text!r}")
    return parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accelerator", description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true",
                       help="1,000 reviews, 1 epoch, smaller layers")
    sizes.add_argument("--tiny", action="store_true",
                       help="toy sizes, seconds on CPU (figures meaningless)")
    parser.add_argument("--data", default=None,
                        help="aclImdb_v1.tar.gz or an aclImdb/ folder (default: the "
                             "cached full dataset, else the embedded sample)")
    parser.add_argument("--only", type=parts_argument, default=PARTS,
                        help=f"comma-separated parts to measure (default: {','.join(PARTS)})")
    parser.add_argument("--dense", type=int, default=None,
                        help="width m of the m x m layers (default: the size's)")
    parser.add_argument("--dense-batch", type=int, default=None,
                        help="batch of the m x m layers (default: 256)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the section instead of writing BENCHMARKS.md")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON",
                        help="measure nothing: write the section from saved runs' JSON")
    args = parser.parse_args(argv)
    if args.render:
        text = render(args.render, write=not args.no_write)
        if args.no_write:
            print(text)
        return 0
    size_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    result = run(size_name, args.data, write=not args.no_write, json_path=args.json,
                 command=command_line(args), parts=args.only, dense=args.dense,
                 dense_batch=args.dense_batch)
    if args.no_write:
        print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
