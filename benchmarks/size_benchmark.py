"""Model size on disk: `.keras` files and SavedModels against parameter counts.

Saves the IMDB classifier (full `Embedding`, `FactorizedEmbedding` at ranks 16
and 4) and a 1024-4096-1024 MLP (`Dense` against `LowRankDense` at rank 256)
with `model.save(".keras")` and, on the TensorFlow backend, `model.export()`
(a SavedModel), and reports the bytes beside the parameter counts: at float32
the files should hold about 4 bytes per parameter plus a fixed overhead.
Writes the `size` section of BENCHMARKS.md.

    python -m benchmarks --only size
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile

from benchmarks import _common
from benchmarks.examples import load_example
from benchmarks.report import machine_description
from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json


def _mlp(rank=None, width=1024, hidden=4096):
    import keras

    from keras_factorized import LowRankDense

    def layer(units, name):
        if rank is None:
            return keras.layers.Dense(units, activation="relu", name=name)
        return LowRankDense(units, rank=rank, activation="relu", name=name)

    inputs = keras.Input((width,))
    x = layer(hidden, "up")(inputs)
    outputs = layer(width, "down")(x)
    return keras.Model(inputs, outputs, name="mlp" if rank is None else f"mlp_rank{rank}")


def models(small=False):
    """name -> model (uncompiled, built)."""
    build_classifier = load_example("imdb_lstm").build_model

    vocab, width, hidden = (2000, 256, 1024) if small else (20000, 1024, 4096)
    out = {"IMDB, Embedding": build_classifier(vocab, 200, 128, 64)}
    for rank in (16, 4):
        out[f"IMDB, FactorizedEmbedding rank {rank}"] = build_classifier(
            vocab, 200, 128, 64, rank=rank
        )
    out[f"MLP {width}-{hidden}-{width}, Dense"] = _mlp(None, width, hidden)
    out[f"MLP {width}-{hidden}-{width}, LowRankDense rank {width // 4}"] = _mlp(
        width // 4, width, hidden
    )
    return out


def run(quick=False, small=False, write=True, json_path=None, command=None,
        verbose=True) -> dict:
    """Saves each model and reports its bytes; writes the `size` section.

    Args:
        quick: same as the full run (it takes seconds); kept for symmetry.
        small: tiny models (for the smoke test).
        write: update the `size` section of BENCHMARKS.md.
        json_path: also write the raw results there.
        command: the command line quoted in BENCHMARKS.md.
    """
    import keras

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model) in enumerate(models(small).items()):
            params = model.count_params()
            keras_path = os.path.join(tmp, f"m{i}.keras")
            model.save(keras_path)
            row = {"model": name, "params": params,
                   "keras_bytes": os.path.getsize(keras_path), "savedmodel_bytes": None}
            if keras.backend.backend() == "tensorflow":
                folder = os.path.join(tmp, f"m{i}_savedmodel")
                with contextlib.redirect_stdout(io.StringIO()):
                    model.export(folder, verbose=False)
                row["savedmodel_bytes"] = _common.folder_bytes(folder)
            rows.append(row)
            if verbose:
                print(f"  size {name}: {params:,} params, .keras {row['keras_bytes']:,} B, "
                      f"SavedModel {row['savedmodel_bytes']}", flush=True)
    command = command or "python -m benchmarks --only size"
    text = markdown(rows, command)
    if write:
        update_section("size", text)
    result = {"rows": rows, "markdown": text}
    if json_path:
        write_json(json_path, rows)
    return result


def markdown(rows, command) -> str:
    def per_param(size, params):
        return f"{size / params:.2f}" if size else "-"

    table = []
    groups = {}
    for r in rows:
        group = r["model"].split(",")[0]
        groups.setdefault(group, r)
        base = groups[group]
        table.append([
            r["model"], f"{r['params']:,}", _common.fmt_bytes(r["keras_bytes"]),
            per_param(r["keras_bytes"], r["params"]),
            f"{r['keras_bytes'] / base['keras_bytes']:.2f}x",
            _common.fmt_bytes(r["savedmodel_bytes"]) if r["savedmodel_bytes"] else "-",
            per_param(r["savedmodel_bytes"], r["params"]),
            f"{r['savedmodel_bytes'] / base['savedmodel_bytes']:.2f}x"
            if r["savedmodel_bytes"] else "-",
            f"{r['params'] / base['params']:.2f}x",
        ])
    lines = [
        "## Model size: `.keras` and SavedModel bytes against parameters",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}",
        "",
        "`.keras` = `model.save(path)`; SavedModel = `model.export(path)` (the "
        "whole folder). Sizes follow the parameter count (float32: 4 bytes a "
        "parameter) plus a fixed overhead (config, graph), so a factorized model "
        "is as much smaller on disk as it has fewer parameters, once the "
        "parameters dominate.",
        "",
        markdown_table(
            ["model", "params", ".keras", "bytes/param", ".keras vs dense",
             "SavedModel", "bytes/param", "SavedModel vs dense", "params vs dense"],
            table,
        ),
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    run(write=not args.no_write, json_path=args.json)


if __name__ == "__main__":
    main()
