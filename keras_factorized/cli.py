"""The `keras-factorized` command line: inspect, compress, export, imdb, sweep.

Every command explains its flags with their defaults (`--help`), shows a
progress bar on anything slow, exits 0 on success and 2 with a one-line
message on a user error (bad argument, missing or unreadable file, a file that
is not a Keras model), and writes its outputs to a temporary path in the
destination folder that is renamed into place only once complete, so a
failure never leaves a half-written file.

Keras and TensorFlow are imported only once a command runs, so `--help` and
argument errors answer at once.

Example:

```
keras-factorized inspect model.keras --plot spectra.png
keras-factorized compress model.keras -o small.keras --param-ratio 0.5
keras-factorized sweep model.keras --data data.npz --ranks 4,8,16,32
keras-factorized export small.keras serving/ --version 1
```
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
import textwrap
import warnings
import zipfile
from typing import Any, Sequence

from keras_factorized.atomic_io import atomic_output
from keras_factorized.atomic_io import write_text

PROG = "keras-factorized"

_H5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class UsageError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and raise `UsageError`."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the line breaks of descriptions and epilogs."""


def _wrap(*paragraphs: str) -> str:
    """Paragraphs filled to 79 columns; those starting with spaces are indented items."""
    out = []
    for text in paragraphs:
        indent = text[: len(text) - len(text.lstrip())]
        out.append(
            textwrap.fill(
                " ".join(text.split()), 79, initial_indent=indent,
                subsequent_indent=indent + "  " if indent else "",
            )
        )
    return "\n\n".join(out)


# --------------------------------------------------------------------------
# Argument types: each raises a one-line message naming the value received.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, received {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], received {text!r}")
    return value


def _split_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), received {text!r}")
    return value


def _rank_list(text: str) -> list[int]:
    ranks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ranks.append(_positive_int(part))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive integers like 4,8,16, received {text!r}"
            )
    if not ranks:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 4,8,16, received {text!r}"
        )
    return sorted(set(ranks))


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {e}")
    return text


# --------------------------------------------------------------------------
# Files.


def _check_readable(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} is not readable (permission denied): {path}")


def _check_model_file(path: str) -> None:
    """Checks without Keras that `path` looks like a saved Keras model."""
    _check_readable(path, "model file")
    if os.path.isdir(path):
        raise UsageError(
            f"not a Keras model: {path} is a folder, expected a `.keras` file"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UsageError(f"cannot read model file {path}: {e.strerror or e}")
    if head == _H5_SIGNATURE:
        return  # Legacy Keras HDF5; load_model will tell if it is not a model.
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        names = None
    if not names or "config.json" not in names:
        raise UsageError(
            f"not a Keras model: {path} (expected a `.keras` archive saved by "
            "`model.save`)"
        )


def load_model(path: str):
    """Loads a `.keras` model (with the keras-factorized layers), or UsageError."""
    _check_model_file(path)
    keras = _import_keras()
    try:
        with warnings.catch_warnings():
            # Optimizer slots saved before the first training step do not load
            # into a built optimizer; no command here uses them.
            warnings.filterwarnings(
                "ignore", message="Skipping variable loading for optimizer"
            )
            return keras.saving.load_model(path)
    except Exception as e:  # Any failure to load is the file's problem here.
        raise UsageError(f"cannot load {path} as a Keras model: {_one_line(e, 300)}")


def _import_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import keras_factorized  # noqa: F401  (registers the layers for loading)

    for module in ("keras_factorized.layers", "keras_factorized.surgery"):
        with contextlib.suppress(ImportError):
            __import__(module)
    return keras


def _check_output_file(path: str, suffixes: Sequence[str] = (), overwrite=True) -> None:
    """Checks before any work that `path` can be written."""
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise UsageError(
            f"output file {path} must end with {' or '.join(suffixes)}"
        )
    if os.path.isdir(path):
        raise UsageError(f"output {path} is a folder, expected a file path")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"output file {path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder is not writable: {folder}")


def _write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    fields: list[str] = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _progbar(target: int, quiet: bool, unit_name: str = "step"):
    keras = _import_keras()
    return keras.utils.Progbar(target, verbose=0 if quiet else 1, unit_name=unit_name)


def _load_array_file(path: str, what: str):
    """Loads a `.npy` array or the arrays of a `.npz` file (a dict)."""
    import numpy as np

    _check_readable(path, what)
    if not path.lower().endswith((".npy", ".npz")):
        raise UsageError(f"{what} {path} must be a .npy or .npz file")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return data
        with data:
            return {key: data[key] for key in data.files}
    except Exception as e:
        raise UsageError(f"cannot read {what} {path}: {_one_line(e, 200)}")


# --------------------------------------------------------------------------
# inspect


def _cmd_inspect(args) -> int:
    for path in (args.plot, args.json):
        if path:
            _check_output_file(path)
    model = load_model(args.model)
    from keras_factorized import spectrum

    layers = list(spectrum.iter_matrix_layers(model))
    bar = _progbar(len(layers), args.quiet, unit_name="layer")
    rows = spectrum.inspect_model(
        model,
        energies=args.energy_levels,
        progress=lambda done, total, path: bar.update(done),
    )
    print(f"Model: {args.model} ({model.count_params():,} parameters)")
    print(spectrum.format_table(rows))
    if args.json:
        _write_json(args.json, spectrum.to_jsonable(rows))
        print(f"Wrote {args.json}")
    if args.plot:
        spectrum.plot_spectra(rows, args.plot, title=os.path.basename(args.model))
        print(f"Wrote {args.plot}")
    return 0


def _energy_levels(text: str) -> list[float]:
    try:
        return [_fraction(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers in (0, 1] like 0.9,0.95, received {text!r}"
        )


# --------------------------------------------------------------------------
# compress


def _rank_kwargs(args) -> dict[str, Any]:
    if args.rank is not None:
        return {"rank": args.rank}
    if args.energy is not None:
        return {"energy": args.energy}
    return {"param_ratio": args.param_ratio}


def _calibration(args):
    if args.calibration is None:
        if args.method in ("whitened", "learned"):
            raise UsageError(
                f"--method {args.method} needs --calibration DATA (.npy or .npz)"
            )
        return None
    data = _load_array_file(args.calibration, "calibration file")
    if isinstance(data, dict):
        for key in ("x", "x_train", "inputs"):
            if key in data:
                return data[key]
        if len(data) == 1:
            return next(iter(data.values()))
        raise UsageError(
            f"calibration file {args.calibration} holds {sorted(data)}; expected an "
            "array named `x` (or a single array)"
        )
    return data


def _factorize(model, **kwargs):
    """`keras_factorized.surgery.factorize`: `(new_model, report)`, or UsageError."""
    try:
        from keras_factorized.surgery import factorize
    except ImportError as e:
        raise UsageError(f"model surgery is not available: {_one_line(e)}")
    try:
        new_model = factorize(model, **kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(_one_line(e))
    return new_model, getattr(new_model, "factorization_report", None)


def _cmd_compress(args) -> int:
    _check_output_file(args.output, suffixes=(".keras",), overwrite=args.overwrite)
    calibration = _calibration(args)
    model = load_model(args.model)
    print(f"Factorizing {args.model} (method {args.method}, {_rank_text(args)})")
    new_model, report = _factorize(
        model,
        **_rank_kwargs(args),
        method=args.method,
        calibration_data=calibration,
        include=args.include,
        exclude=args.exclude,
        allocation=args.allocation,
        distillation_epochs=args.distillation_epochs,
        verbose=0 if args.quiet else 1,
    )
    if report is not None:
        print(report)
    if getattr(model, "compiled", False) and model.get_compile_config():
        # A fresh optimizer: the copied one holds slots for the old variables
        # (saved, it would not load into the factorized model).
        new_model.compile_from_config(model.get_compile_config())
    before, after = model.count_params(), new_model.count_params()
    print(f"Model parameters: {before:,} -> {after:,} ({after / max(before, 1):.1%})")
    with atomic_output(args.output) as tmp:
        new_model.save(tmp)
    print(f"Wrote {args.output}")
    return 0


def _rank_text(args) -> str:
    if args.rank is not None:
        return f"rank {args.rank}"
    if args.energy is not None:
        return f"energy {args.energy}"
    return f"param ratio {args.param_ratio}"


# --------------------------------------------------------------------------
# export


def _cmd_export(args) -> int:
    export_dir = os.path.abspath(args.export_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise UsageError(f"export path {args.export_dir} exists and is not a folder")
    # The folders that do not exist yet (created like `mkdir -p`, removed again
    # if the export fails).
    first_new, existing = None, export_dir
    while not os.path.exists(existing):
        first_new, existing = existing, os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UsageError(f"cannot create folders in {existing} (not a writable folder)")
    model = load_model(args.model)
    try:
        from keras_factorized.export import export_for_serving
    except ImportError as e:
        raise UsageError(f"export needs TensorFlow: {_one_line(e)}")
    print(f"Exporting {args.model} to {args.export_dir} (merge factors: {args.merge})")
    bar = _progbar(1, args.quiet, unit_name="model")
    try:
        version_dir = export_for_serving(
            model,
            args.export_dir,
            version=args.version,
            merge_factors=args.merge,
            overwrite=args.overwrite,
        )
    except BaseException as e:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        if isinstance(e, FileExistsError):
            raise UsageError(
                f"version {args.version} already exists in {args.export_dir}; pass "
                "--overwrite to replace it, or leave out --version for the next one"
            ) from e
        if isinstance(e, (ValueError, TypeError, RuntimeError)):
            raise UsageError(_one_line(e)) from e
        raise
    bar.update(1)
    print(f"Wrote SavedModel {version_dir}")
    return 0


# --------------------------------------------------------------------------
# sweep


def _load_sweep_data(args, model):
    """Returns `(x, y, x_val, y_val)` from an .npz file or the IMDB data."""
    import numpy as np

    path = args.data
    if path.lower().endswith(".npz"):
        data = _load_array_file(path, "data file")
        if isinstance(data, np.ndarray) or "x" not in data or "y" not in data:
            keys = [] if isinstance(data, np.ndarray) else sorted(data)
            raise UsageError(
                f"data file {path} must hold arrays `x` and `y` (and optionally "
                f"`x_val`, `y_val`); found {keys}"
            )
        x, y = data["x"], data["y"]
        if len(x) != len(y):
            raise UsageError(
                f"data file {path}: `x` has {len(x)} samples but `y` has {len(y)}"
            )
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
    _check_readable(path, "data path")
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
            path,
            validation_split=args.validation_split,
            max_samples=args.max_samples,
        )
    except (ValueError, OSError) as e:
        raise UsageError(f"cannot read IMDB data from {path}: {_one_line(e, 200)}")
    return train.texts, train.labels, val.texts, val.labels


def _takes_strings(model) -> bool:
    inputs = getattr(model, "inputs", None) or []
    return len(inputs) == 1 and "string" in str(inputs[0].dtype)


def _compile_for_sweep(model, original, loss: str) -> None:
    """Compiles `model` like `original`, or with a loss guessed from its output."""
    if loss == "auto" and getattr(original, "compiled", False):
        config = original.get_compile_config()
        if config:
            model.compile_from_config(config)
            return
    if loss == "auto":
        units = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
        last = model.layers[-1]
        activation = getattr(getattr(last, "activation", None), "__name__", "linear")
        from_logits = activation not in ("sigmoid", "softmax")
        import keras

        if units == 1:
            loss_obj = keras.losses.BinaryCrossentropy(from_logits=from_logits)
            metric = keras.metrics.BinaryAccuracy(
                name="accuracy", threshold=0.0 if from_logits else 0.5
            )
        else:
            loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
            metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        model.compile(optimizer="adam", loss=loss_obj, metrics=[metric])
        return
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])


def _evaluate(model, x, y, batch_size, quiet) -> dict[str, float]:
    results = model.evaluate(
        x, y, batch_size=batch_size, verbose=0 if quiet else 1, return_dict=True
    )
    return {k: float(v) for k, v in results.items()}


def _metric_name(results: dict[str, float]) -> str:
    names = [k for k in results if k != "loss"]
    return names[0] if names else "loss"


def _sweep_row(rank, model, base_params, results, tuned=None) -> dict[str, Any]:
    params = model.count_params()
    metric = _metric_name(results)
    row = {
        "rank": rank,
        "params": params,
        "param_fraction": round(params / base_params, 4) if base_params else None,
        "loss": round(results["loss"], 4),
        metric: round(results[metric], 4),
    }
    if tuned is not None:
        row[f"fine_tuned_{metric}"] = round(tuned[metric], 4)
        row["fine_tuned_loss"] = round(tuned["loss"], 4)
    return row


def _format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    headers = list(rows[0])
    for row in rows[1:]:
        headers += [k for k in row if k not in headers]
    cells = [[_cell(row.get(h)) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str, title: str | None = None) -> str:
    """Plots the sweep's metric against parameters into a PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metric = _metric_name({k: 0 for k in rows[0] if k not in ("rank", "params", "param_fraction") and not k.startswith("fine_tuned")})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        base = [r for r in rows if r["rank"] == "full"]
        cut = [r for r in rows if r["rank"] != "full"]
        ax.plot([r["params"] for r in cut], [r[metric] for r in cut], "o-", label="SVD, no training")
        tuned_key = f"fine_tuned_{metric}"
        if cut and tuned_key in cut[0]:
            ax.plot([r["params"] for r in cut], [r[tuned_key] for r in cut], "s-", label="after fine-tuning")
        for r in cut:
            ax.annotate(f"r={r['rank']}", (r["params"], r[metric]), textcoords="offset points", xytext=(4, -10), fontsize="small")
        if base:
            ax.axhline(base[0][metric], color="C0", linestyle="--", label="original model")
            if tuned_key in base[0]:
                ax.axhline(
                    base[0][tuned_key], color="C1", linestyle="--",
                    label="original, fine-tuned alike",
                )
            ax.axvline(base[0]["params"], color="gray", linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (whole model)")
        ax.set_ylabel(metric)
        ax.set_title(title or f"{metric} against parameters")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def _cmd_sweep(args) -> int:
    for path, suffixes in ((args.plot, (".png",)), (args.json, ()), (args.csv, ())):
        if path:
            _check_output_file(path, suffixes=suffixes)
    if not args.data.lower().endswith(".npz"):
        _check_readable(args.data, "data path")
    model = load_model(args.model)
    x, y, x_val, y_val = _load_sweep_data(args, model)
    base_params = model.count_params()

    _compile_for_sweep(model, model, args.loss)
    print(f"Evaluating the original model ({base_params:,} parameters) on {len(x_val):,} samples")
    base = _evaluate(model, x_val, y_val, args.batch_size, args.quiet)
    tuned = None
    if args.fine_tune_epochs:
        # The same extra training for the original, or the comparison flatters
        # the compressed models.
        print(f"Fine-tuning the original model for {args.fine_tune_epochs} epoch(s)")
        original = load_model(args.model)
        _compile_for_sweep(original, model, args.loss)
        original.fit(
            x, y, batch_size=args.batch_size, epochs=args.fine_tune_epochs,
            verbose=0 if args.quiet else 1,
        )
        tuned = _evaluate(original, x_val, y_val, args.batch_size, args.quiet)
        del original
    rows = [_sweep_row("full", model, base_params, base, tuned)]
    metric = _metric_name(base)
    for i, rank in enumerate(args.ranks, start=1):
        print(f"[{i}/{len(args.ranks)}] rank {rank}")
        small, _ = _factorize(
            model, rank=rank, method="svd", include=args.include, exclude=args.exclude
        )
        _compile_for_sweep(small, model, args.loss)
        results = _evaluate(small, x_val, y_val, args.batch_size, args.quiet)
        tuned = None
        if args.fine_tune_epochs:
            small.fit(
                x, y, batch_size=args.batch_size, epochs=args.fine_tune_epochs,
                verbose=0 if args.quiet else 1,
            )
            tuned = _evaluate(small, x_val, y_val, args.batch_size, args.quiet)
        rows.append(_sweep_row(rank, small, base_params, results, tuned))
    print(_format_sweep(rows))
    if args.json:
        _write_json(args.json, rows)
        print(f"Wrote {args.json}")
    if args.csv:
        _write_csv(args.csv, rows)
        print(f"Wrote {args.csv}")
    if args.plot:
        plot_sweep(rows, args.plot, title=f"{os.path.basename(args.model)}: {metric} vs parameters")
        print(f"Wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------
# imdb


def _cmd_imdb(args) -> int:
    from keras_factorized import imdb_classifier

    try:
        imdb_classifier.run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(_one_line(e))
    return 0


# --------------------------------------------------------------------------
# The parser.


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `keras-factorized` parser.

    Args:
        argv: the arguments about to be parsed; the `imdb` subcommand's flags
            (which need its module, and so Keras) are added only when the
            command is `imdb`, to keep everything else fast.
    """
    from keras_factorized.version import __version__

    parser = _ArgumentParser(
        prog=PROG,
        description=(
            "Inspect, compress, evaluate and export Keras models with low-rank "
            "factorized layers."
        ),
        epilog=f"Run `{PROG} COMMAND --help` for the flags of each command.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, print the full Python traceback instead of one line",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    sub.required = True

    common = _ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars"
    )

    # inspect
    p = sub.add_parser(
        "inspect",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="singular-value spectra of every Embedding/Dense/EinsumDense layer",
        description=_wrap(
            "Prints one row per Embedding, Dense and EinsumDense layer and per "
            "already-factorized layer (FactorizedEmbedding, LowRankDense, "
            "LowRankEinsumDense): its matrix shape, the parameters it stores, and "
            "the ranks that keep 90/95/99% of the spectral energy (sum of squared "
            "singular values), each with the parameter saving of factors of that "
            "rank against what the layer stores now (negative: the factors would "
            "be bigger). EinsumDense kernels are matricized as input axes x output "
            "axes; factorized layers are analysed through the product of their "
            "factors. The total line counts layers where factors do not pay as "
            "kept whole."
        ),
        epilog=f"Example:\n  {PROG} inspect model.keras --plot spectra.png --json spectra.json",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the saved Keras model")
    p.add_argument(
        "--plot", metavar="PNG", default=None,
        help="write the normalised singular-value spectra and cumulative energy curves to this PNG",
    )
    p.add_argument(
        "--json", metavar="FILE", default=None,
        help="write the table (with the full singular values) as JSON",
    )
    p.add_argument(
        "--energy-levels", type=_energy_levels, default="0.9,0.95,0.99",
        metavar="E1,E2,...", help="the energy fractions reported",
    )
    p.set_defaults(func=_cmd_inspect)

    # compress
    p = sub.add_parser(
        "compress",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="replace layers by low-rank factorized ones (keras_factorized.factorize)",
        description=_wrap(
            "Replaces Embedding, Dense and EinsumDense layers by their factorized "
            "versions (keras_factorized.factorize), prints its report and saves "
            "the new model. Choose the rank with exactly one of --rank, --energy "
            "or --param-ratio."
        ),
        epilog=(
            "Examples:\n"
            f"  {PROG} compress model.keras -o small.keras --param-ratio 0.5\n"
            f"  {PROG} compress model.keras -o small.keras --energy 0.95 --include 'dense'\n"
            f"  {PROG} compress model.keras -o small.keras --rank 16 --method whitened "
            "--calibration x_sample.npy"
        ),
    )
    p.add_argument("model", metavar="MODEL.keras", help="the saved Keras model")
    p.add_argument(
        "-o", "--output", required=True, metavar="SMALL.keras",
        help="where to save the compressed model (must end with .keras)",
    )
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--param-ratio", type=_fraction, metavar="R",
        help="keep at most this fraction of each layer's matrix parameters, in (0, 1]",
    )
    choice.add_argument(
        "--rank", type=_positive_int, metavar="K", help="the same rank K for every layer"
    )
    choice.add_argument(
        "--energy", type=_fraction, metavar="E",
        help="per layer, the smallest rank keeping this fraction of the spectral energy, in (0, 1]",
    )
    p.add_argument(
        "--method", choices=("svd", "whitened", "learned"), default="svd",
        help=(
            "svd: truncated SVD of the weights; whitened: SVD weighted by the "
            "activations of --calibration data; learned: factors fitted to "
            "reproduce the layer outputs on --calibration data"
        ),
    )
    p.add_argument(
        "--calibration", metavar="DATA", default=None,
        help="model inputs for --method whitened/learned: a .npy array or an .npz with an array `x`",
    )
    _add_layer_filters(p)
    p.add_argument(
        "--allocation", choices=("greedy", "uniform"), default="greedy",
        help=(
            "with --param-ratio: greedy spends the budget where it removes the "
            "most error per parameter; uniform gives every layer the same ratio"
        ),
    )
    p.add_argument(
        "--distillation-epochs", type=_positive_int, default=2, metavar="N",
        help="with --method learned: passes over the calibration data",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the output file if it exists"
    )
    p.set_defaults(func=_cmd_compress)

    # export
    p = sub.add_parser(
        "export",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="export a model for TF Serving (SavedModel, versioned folder)",
        description=_wrap(
            "Exports the model as a TensorFlow SavedModel under "
            "EXPORT_DIR/VERSION/ (the layout TF Serving watches), through "
            "keras_factorized.export.export_for_serving. Needs TensorFlow."
        ),
        epilog=f"Example:\n  {PROG} export small.keras serving/sentiment --version 1 --merge",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the saved Keras model")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="the model's serving folder")
    p.add_argument(
        "--version", type=_positive_int, default=None, metavar="N",
        help="version subfolder; default: one more than the highest already there (1 if none)",
    )
    p.add_argument(
        "--merge", action="store_true",
        help="multiply the factors back into dense matrices before exporting",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing version folder"
    )
    p.set_defaults(func=_cmd_export)

    # imdb
    p = sub.add_parser(
        "imdb",
        formatter_class=_HelpFormatter,
        help="the running example: IMDB sentiment with factorized embeddings",
        description=_wrap(
            "Trains and compares IMDB sentiment classifiers: a full embedding, "
            "factorized embeddings, and the baseline compressed by SVD."
        ),
    )
    if argv is not None and _command_of(argv) == "imdb":
        from keras_factorized import imdb_classifier

        imdb_classifier.add_arguments(p)
    p.set_defaults(func=_cmd_imdb)

    # sweep
    p = sub.add_parser(
        "sweep",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="accuracy against parameters over a list of ranks",
        description=_wrap(
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
        "--ranks", type=_rank_list, default="4,8,16,32", metavar="K1,K2,...",
        help="the ranks to try",
    )
    _add_layer_filters(p)
    p.add_argument(
        "--fine-tune-epochs", type=_non_negative_int, default=0, metavar="N",
        help="epochs of training on x/y after each compression (0: none)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, metavar="B", help="batch size")
    p.add_argument(
        "--validation-split", type=_split_fraction, default=0.2, metavar="F",
        help="fraction held out for validation when the data has no x_val/y_val",
    )
    p.add_argument(
        "--max-samples", type=_positive_int, default=None, metavar="N",
        help="use at most N training and N validation samples (quick runs)",
    )
    p.add_argument(
        "--loss", default="auto",
        help="a Keras loss name, or auto (the model's compiled loss, else guessed)",
    )
    p.add_argument("--plot", metavar="PNG", default=None, help="write metric vs parameters to this PNG")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON")
    p.add_argument("--csv", metavar="FILE", default=None, help="write the results as CSV")
    p.set_defaults(func=_cmd_sweep)
    return parser


def _add_layer_filters(parser) -> None:
    parser.add_argument(
        "--include", type=_regex, action="append", metavar="REGEX", default=None,
        help=(
            "only factorize layers whose path (as `inspect` prints it) matches "
            "this regular expression (re.search); repeatable"
        ),
    )
    parser.add_argument(
        "--exclude", type=_regex, action="append", metavar="REGEX", default=None,
        help="leave alone layers whose path matches this regular expression; repeatable",
    )


def _command_of(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `keras-factorized` command line.

    Args:
        argv: the arguments (without the program name); default `sys.argv[1:]`.

    Returns:
        The exit status: 0 on success, 2 on a user error (one line on
        stderr), 1 when writing an output fails (e.g. disk full).

    Example:

    >>> main(["--version"])  # doctest: +ELLIPSIS
    keras-factorized ...
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = False  # Argument errors are always one line.
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        show_traceback = args.traceback
        return int(args.func(args) or 0)
    except UsageError as e:
        if show_traceback:
            raise
        command = _command_of(argv)
        prog = f"{PROG} {command}" if command in _COMMANDS else PROG
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # Disk full, permissions changed mid-run...: not a usage error.
        if show_traceback:
            raise
        command = _command_of(argv)
        prog = f"{PROG} {command}" if command in _COMMANDS else PROG
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


_COMMANDS = ("inspect", "compress", "export", "imdb", "sweep")


if __name__ == "__main__":
    sys.exit(main())
