"""`keras-factorized sweep`: the model's metric against its parameters over ranks."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from keras_factorized.cli import _common
from keras_factorized.cli._common import PROG
from keras_factorized.cli._common import UsageError

NAME = "sweep"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = _common.add_command(
        subparsers,
        NAME,
        help="accuracy against parameters over a list of ranks",
        description=_common.wrap(
            "Compresses the model at each rank (truncated SVD of every "
            "factorizable layer, or those chosen by --include/--exclude), "
            "optionally fine-tunes each compressed model for a few epochs, "
            "evaluates it on validation data, and prints (and plots) the metric "
            "against the number of parameters, with the original model as the "
            "first row.",
            "--data is either:",
            "  * an .npz file with arrays `x` and `y` (inputs as the model takes "
            "them, e.g. token ids) and optionally `x_val`, `y_val`; without them "
            "the last --validation-split of `x`/`y` is held out; or",
            "  * the IMDB reviews (an extracted aclImdb/ folder or "
            "aclImdb_v1.tar.gz), for models that take raw strings (a "
            "TextVectorization layer inside the model); validation is "
            "--validation-split of the training reviews.",
            "Loss and metric: those the model was compiled with when saved; "
            "otherwise binary (1 output unit) or sparse categorical cross-entropy "
            "with accuracy, from logits unless the last layer ends in a "
            "sigmoid/softmax.",
        ),
        epilog=(
            "Examples:\n"
            f"  {PROG} sweep model.keras --data data.npz --ranks 4,8,16,32 --plot sweep.png\n"
            f"  {PROG} sweep text_model.keras --data aclImdb_v1.tar.gz --ranks 8,16 "
            "--include embedding --fine-tune-epochs 1 --max-samples 2000"
        ),
    )
    p.add_argument("model", metavar="MODEL.keras", help="the saved Keras model")
    p.add_argument(
        "--data", required=True, metavar="DATA",
        help="an .npz with x, y (and optionally x_val, y_val), or the IMDB folder/archive",
    )
    p.add_argument(
        "--ranks", type=_common.rank_list, default="4,8,16,32", metavar="K1,K2,...",
        help="the ranks to try",
    )
    _common.add_layer_filters(p)
    p.add_argument(
        "--fine-tune-epochs", type=_common.non_negative_int, default=0, metavar="N",
        help="epochs of training on x/y after each compression (0: none)",
    )
    p.add_argument(
        "--batch-size", type=_common.positive_int, default=64, metavar="B", help="batch size"
    )
    p.add_argument(
        "--validation-split", type=_common.split_fraction, default=0.2, metavar="F",
        help="fraction held out for validation when the data has no x_val/y_val",
    )
    p.add_argument(
        "--max-samples", type=_common.positive_int, default=None, metavar="N",
        help="use at most N training and N validation samples (quick runs)",
    )
    p.add_argument(
        "--loss", default="auto",
        help="a Keras loss name, or auto (the model's compiled loss, else guessed)",
    )
    _common.add_quantize_flag(
        p, "each model (after its fine-tuning)",
        then="; its bytes and metric go to extra columns MODE_bytes, MODE_METRIC",
    )
    p.add_argument("--plot", metavar="PNG", default=None, help="write metric vs parameters to this PNG")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    p.add_argument("--csv", metavar="FILE", default=None, help="write the results as CSV")
    return p


# --------------------------------------------------------------------------
# Data


def _load_npz(args):
    """`(x, y, x_val, y_val)` from an .npz with `x`, `y` (and `x_val`, `y_val`)."""
    import numpy as np

    path = args.data
    data = _common.load_array_file(path, "data file")
    if isinstance(data, np.ndarray) or "x" not in data or "y" not in data:
        keys = [] if isinstance(data, np.ndarray) else sorted(data)
        raise UsageError(
            f"data file {path} must hold arrays `x` and `y` (and optionally "
            f"`x_val`, `y_val`); found {keys}"
        )
    x, y = data["x"], data["y"]
    if len(x) != len(y):
        raise UsageError(f"data file {path}: `x` has {len(x)} samples but `y` has {len(y)}")
    if "x_val" in data and "y_val" in data:
        x_val, y_val = data["x_val"], data["y_val"]
    else:
        n_val = max(1, int(round(len(x) * args.validation_split)))
        if n_val >= len(x) and args.fine_tune_epochs:
            raise UsageError(
                f"--validation-split {args.validation_split} leaves no training "
                f"samples out of {len(x)}"
            )
        x, x_val = x[: len(x) - n_val], x[len(x) - n_val :]
        y, y_val = y[: len(y) - n_val], y[len(y) - n_val :]
    if args.max_samples:
        x, y = x[: args.max_samples], y[: args.max_samples]
        x_val, y_val = x_val[: args.max_samples], y_val[: args.max_samples]
    return x, y, x_val, y_val


def _load_imdb(args, model):
    """`(texts, labels, val_texts, val_labels)` of the IMDB reviews, for a string model."""
    path = args.data
    _common.check_readable(path, "data path")
    if not _takes_strings(model):
        raise UsageError(
            f"--data {path} is IMDB text, but the model does not take strings; "
            "give an .npz with `x`/`y` already vectorized for this model"
        )
    if not args.validation_split:
        raise UsageError("--validation-split must be > 0 with IMDB data")
    from keras_factorized.datasets import imdb

    try:
        train, val, _ = imdb.load_data(
            path, validation_split=args.validation_split, max_samples=args.max_samples
        )
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot read IMDB data from {path}: {_common.one_line(e, 200)}")
    return train.texts, train.labels, val.texts, val.labels


def _takes_strings(model) -> bool:
    inputs = getattr(model, "inputs", None) or []
    return len(inputs) == 1 and "string" in str(inputs[0].dtype)


# --------------------------------------------------------------------------
# Training and evaluation


def _compile(model, original, loss: str) -> None:
    """Compiles `model` like `original`, or with a loss guessed from its output."""
    keras = _common.import_keras()
    if loss == "auto" and getattr(original, "compiled", False):
        config = original.get_compile_config()
        if config:
            model.compile_from_config(config)
            return
    if loss != "auto":
        model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
        return
    units = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    activation = getattr(getattr(model.layers[-1], "activation", None), "__name__", "linear")
    from_logits = activation not in ("sigmoid", "softmax")
    if units == 1:
        loss_obj = keras.losses.BinaryCrossentropy(from_logits=from_logits)
        metric = keras.metrics.BinaryAccuracy(
            name="accuracy", threshold=0.0 if from_logits else 0.5
        )
    else:
        loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer="adam", loss=loss_obj, metrics=[metric])


def _evaluate(model, x, y, args) -> dict[str, float]:
    results = model.evaluate(
        x, y, batch_size=args.batch_size, verbose=0 if args.quiet else 1, return_dict=True
    )
    return {k: float(v) for k, v in results.items()}


def _fine_tune(model, x, y, args) -> None:
    model.fit(
        x, y, batch_size=args.batch_size, epochs=args.fine_tune_epochs,
        verbose=0 if args.quiet else 1,
    )


def metric_name(results: dict[str, Any]) -> str:
    """The first metric of an evaluation result that is not the loss."""
    names = [k for k in results if k != "loss"]
    return names[0] if names else "loss"


_ROW_KEYS = ("rank", "params", "param_fraction", "bytes", "loss")


def _row_metric(row: dict[str, Any]) -> str:
    """The metric of a sweep row (the first column that is not bookkeeping)."""
    return next(k for k in row if k not in _ROW_KEYS)


def _row(rank, model, base_params, results, tuned=None) -> dict[str, Any]:
    from keras_factorized.spectrum import stored_bytes

    params = model.count_params()
    metric = metric_name(results)
    row = {
        "rank": rank,
        "params": params,
        "param_fraction": round(params / base_params, 4) if base_params else None,
        "bytes": stored_bytes(model),
        "loss": round(results["loss"], 4),
        metric: round(results[metric], 4),
    }
    if tuned is not None:
        row[f"fine_tuned_{metric}"] = round(tuned[metric], 4)
        row["fine_tuned_loss"] = round(tuned["loss"], 4)
    return row


def _quantized_columns(model, data, args) -> dict[str, Any]:
    """With --quantize: quantizes `model` (in place) and measures it again."""
    if not args.quantize:
        return {}
    from keras_factorized.spectrum import stored_bytes

    _, _, x_val, y_val = data
    _common.quantize(model, args.quantize)
    results = _evaluate(model, x_val, y_val, args)
    metric = metric_name(results)
    return {
        f"{args.quantize}_bytes": stored_bytes(model),
        f"{args.quantize}_{metric}": round(results[metric], 4),
    }


def _quantized_mode(row: dict[str, Any]) -> str | None:
    """The `--quantize` mode of a row with quantized columns (`int8_bytes`...), or None."""
    return next((k[: -len("_bytes")] for k in row if k.endswith("_bytes")), None)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str, title: str | None = None) -> str:
    """Plots the sweep's metric against the model's size into a PNG (atomic write).

    The size is the number of parameters, or the bytes when the rows have
    quantized columns (`--quantize`), which then get their own line.
    """
    from keras_factorized import reporting

    metric, mode = _row_metric(rows[0]), _quantized_mode(rows[0])
    x_key = "bytes" if mode else "params"
    base = [r for r in rows if r["rank"] == "full"]
    cut = [r for r in rows if r["rank"] != "full"]
    lines = [(x_key, metric, "SVD, no training", "o-", "original model")]
    if f"fine_tuned_{metric}" in rows[0]:
        lines.append((x_key, f"fine_tuned_{metric}", "after fine-tuning", "s-",
                      "original, fine-tuned alike"))
    if mode:
        lines.append((f"{mode}_bytes", f"{mode}_{metric}", f"then {mode}", "^-",
                      f"original, {mode} alike"))
    series, hlines = [], []
    for i, (x, y, label, style, base_label) in enumerate(lines):
        series.append({"x": [r[x] for r in cut], "y": [r[y] for r in cut], "style": style,
                       "label": label, "color": f"C{i}",
                       "annotations": [f"r={r['rank']}" for r in cut] if i == 0 else None})
        if base:
            hlines.append({"y": base[0][y], "color": f"C{i}", "linestyle": "--",
                           "label": base_label})
    size = "bytes" if mode else "parameters"
    with reporting.figure(path) as (ax,):
        reporting.draw_series(
            ax, series, xlabel=f"{size} (whole model)", ylabel=metric,
            title=title or f"{metric} against {size}", xscale="log",
            hlines=hlines, vlines=[{"x": base[0][x_key]}] if base else (),
        )
    return path


# --------------------------------------------------------------------------
# The command


def _check_outputs(args) -> None:
    for path, suffixes in ((args.plot, (".png",)), (args.json, ()), (args.csv, ())):
        if path:
            _common.check_output_file(path, suffixes=suffixes)
    if not args.data.lower().endswith(".npz"):
        _common.check_readable(args.data, "data path")


def _baseline_row(model, data, args) -> dict[str, Any]:
    """The original model's row; a copy gets the same fine-tuning and quantization."""
    x, y, x_val, y_val = data
    base_params = model.count_params()
    _compile(model, model, args.loss)
    print(f"Evaluating the original model ({base_params:,} parameters) on {len(x_val):,} samples")
    base = _evaluate(model, x_val, y_val, args)
    tuned, final = None, None
    if args.fine_tune_epochs or args.quantize:
        # The same extra training (and quantization) for the original, or the
        # comparison flatters the compressed models.
        final = _common.load_model(args.model)
        _compile(final, model, args.loss)
    if args.fine_tune_epochs:
        print(f"Fine-tuning the original model for {args.fine_tune_epochs} epoch(s)")
        _fine_tune(final, x, y, args)
        tuned = _evaluate(final, x_val, y_val, args)
    row = _row("full", model, base_params, base, tuned)
    return {**row, **_quantized_columns(final, data, args)} if final else row


def _rank_row(model, rank, data, args) -> dict[str, Any]:
    x, y, x_val, y_val = data
    small, _ = _common.factorize(
        model, rank=rank, method="svd", include=args.include, exclude=args.exclude
    )
    _compile(small, model, args.loss)
    results = _evaluate(small, x_val, y_val, args)
    tuned = None
    if args.fine_tune_epochs:
        _fine_tune(small, x, y, args)
        tuned = _evaluate(small, x_val, y_val, args)
    row = _row(rank, small, model.count_params(), results, tuned)
    return {**row, **_quantized_columns(small, data, args)}


def run(args) -> int:
    _check_outputs(args)
    model = _common.load_model(args.model)
    if args.data.lower().endswith(".npz"):
        data = _load_npz(args)
    else:
        data = _load_imdb(args, model)
    rows = [_baseline_row(model, data, args)]
    for i, rank in enumerate(args.ranks, start=1):
        print(f"[{i}/{len(args.ranks)}] rank {rank}")
        rows.append(_rank_row(model, rank, data, args))
    from keras_factorized import reporting

    print(reporting.format_records(rows))
    if args.json:
        reporting.write_json(args.json, rows)
        print(f"Wrote {args.json}")
    if args.csv:
        reporting.write_csv(args.csv, rows)
        print(f"Wrote {args.csv}")
    if args.plot:
        size = "bytes" if args.quantize else "parameters"
        title = f"{os.path.basename(args.model)}: {_row_metric(rows[0])} vs {size}"
        plot_sweep(rows, args.plot, title=title)
        print(f"Wrote {args.plot}")
    return 0
