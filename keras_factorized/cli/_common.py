"""What every `keras-factorized` command shares.

The one-line `UsageError`, the argument parser and help formatter, argument
types that name the value they received, file checks done before any work,
model and array loading that turn every failure into a `UsageError`, the
progress bar and the `--include`/`--exclude` layer filters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import textwrap
import warnings
import zipfile
from collections.abc import Sequence

PROG = "keras-factorized"

_H5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class UsageError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def one_line(text, limit: int = 400) -> str:
    """`text` on one line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and raise `UsageError`."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class HelpFormatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Shows defaults and keeps the line breaks of descriptions and epilogs."""


def wrap(*paragraphs: str) -> str:
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


def add_command(subparsers, name: str, **kwargs) -> ArgumentParser:
    """A command's parser with the shared formatter and the `-q/--quiet` flag."""
    parser = subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def choices_help(descriptions: dict[str, str], choices: Sequence[str]) -> str:
    """`"a: ...; b: ..."` for every choice (a choice without a description: its name)."""
    return "; ".join(
        f"{c}: {descriptions[c]}" if c in descriptions else str(c) for c in choices
    )


# --------------------------------------------------------------------------
# Argument types: each raises a one-line message naming the value received.


def number_type(parse, accepted: str, check):
    """An argparse `type`: `parse(text)` if `check` accepts it, else one line
    naming what is accepted and the text received."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"expected {accepted}, received {text!r}")
        return value

    return convert


positive_int = number_type(int, "a positive integer", lambda v: v >= 1)
non_negative_int = number_type(int, "an integer >= 0", lambda v: v >= 0)
fraction = number_type(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
split_fraction = number_type(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
auto_or_probability = number_type(
    lambda text: text if text == "auto" else float(text),
    '"auto" or a number in [0, 1]',
    lambda v: v == "auto" or 0 <= v <= 1,
)
non_negative_float = number_type(float, "a number >= 0", lambda v: v >= 0)
positive_float = number_type(float, "a number > 0", lambda v: v > 0)


def key_list(text: str) -> list:
    """Comma-separated output names or indices (`sequence_output` or `0,1`)."""
    keys = [part.strip() for part in text.split(",") if part.strip()]
    if not keys:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated output names or indices, received {text!r}"
        )
    return [int(k) if k.isdigit() else k for k in keys]


def comma_list(item_type, what: str):
    """An argument type for comma-separated values of `item_type` (`what` they are)."""

    def parse(text: str) -> list:
        try:
            values = [item_type(part.strip()) for part in text.split(",") if part.strip()]
        except argparse.ArgumentTypeError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, received {text!r}"
            )
        return values

    return parse


def rank_list(text: str) -> list[int]:
    """Comma-separated positive integers, sorted, each once."""
    return sorted(set(comma_list(positive_int, "positive integers like 4,8,16")(text)))


def regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {e}")
    return text


def add_layer_filters(parser) -> None:
    """`--include`/`--exclude` regular expressions on layer paths."""
    parser.add_argument(
        "--include", type=regex, action="append", metavar="REGEX", default=None,
        help=(
            "only factorize layers whose path (as `inspect` prints it) matches "
            "this regular expression (re.search); repeatable"
        ),
    )
    parser.add_argument(
        "--exclude", type=regex, action="append", metavar="REGEX", default=None,
        help="leave alone layers whose path matches this regular expression; repeatable",
    )


# --------------------------------------------------------------------------
# Flags for the options of the library's config objects.


def field_help(cls, name: str) -> str:
    """The description of argument `name` in the `Args:` section of `cls`'s
    docstring, on one line (the library documents each option once)."""
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Args:", 1)[-1]
    match = re.search(
        rf"^([ \t]+){re.escape(name)}: (.*?)(?=^\1\S|^\S|^\s*$|\Z)",
        section,
        re.MULTILINE | re.DOTALL,
    )
    return " ".join(match.group(2).split()) if match else name.replace("_", " ")


def add_config_flags(parser, cls, flags: dict, methods: str) -> None:
    """One flag per option of the config class `cls`.

    Args:
        parser: the command's parser.
        cls: a config dataclass (`WhitenedConfig`, `DistillationConfig`).
        flags: `{field: (flag, argparse keywords)}`; `None` for a field that
            another flag sets. Without `help` in the keywords, the help is
            the field's description in `cls`'s docstring.
        methods: the `--method` values the options apply to.
    """
    defaults = cls()
    for field, spec in _present(cls, flags).items():
        if spec is None:
            continue
        flag, kwargs = spec
        kwargs = dict(kwargs)
        text = kwargs.pop("help", None) or field_help(cls, field).replace("%", "%%")
        for other, other_spec in flags.items():  # `data` -> --distillation-data
            if other_spec is not None:
                text = text.replace(f"`{other}`", other_spec[0])
        parser.add_argument(
            flag, default=getattr(defaults, field), help=f"with --method {methods}: {text}",
            **kwargs,
        )


def _present(cls, flags: dict) -> dict:
    """The entries of `flags` for fields `cls` has (an option of a newer
    library version is left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {field: spec for field, spec in flags.items() if field in names}


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def config_from_args(cls, flags: dict, args, **values):
    """`cls(...)` from the parsed flags (and `values` for the fields set by
    other flags); a bad value is a `UsageError` naming the flag."""
    for field, spec in _present(cls, flags).items():
        if spec is not None and field not in values:
            values[field] = getattr(args, flag_dest(spec[0]))
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        message = str(e)
        for field, spec in flags.items():
            if spec is not None:
                message = message.replace(f"`{field}`", spec[0])
        raise UsageError(one_line(message))


def factorize_default(name: str):
    """The default of `keras_factorized.factorize`'s argument `name`."""
    from keras_factorized.surgery import factorize as factorize_model

    return inspect.signature(factorize_model).parameters[name].default


# --------------------------------------------------------------------------
# Files.


def check_readable(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{what} not found: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} is not readable (permission denied): {path}")


def check_model_file(path: str) -> None:
    """Checks without Keras that `path` looks like a saved Keras model."""
    check_readable(path, "model file")
    if os.path.isdir(path):
        raise UsageError(f"not a Keras model: {path} is a folder, expected a `.keras` file")
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
            f"not a Keras model: {path} (expected a `.keras` archive saved by `model.save`)"
        )


def check_output_file(path: str, suffixes: Sequence[str] = (), overwrite=True) -> None:
    """Checks before any work that `path` can be written."""
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise UsageError(f"output file {path} must end with {' or '.join(suffixes)}")
    if os.path.isdir(path):
        raise UsageError(f"output {path} is a folder, expected a file path")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"output file {path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder is not writable: {folder}")


def import_keras():
    """Keras, with the keras-factorized layers registered for loading."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import keras_factorized  # noqa: F401  (registers the layers for loading)

    for module in ("keras_factorized.layers", "keras_factorized.surgery"):
        with contextlib.suppress(ImportError):
            __import__(module)
    return keras


def load_model(path: str):
    """Loads a `.keras` model (with the keras-factorized layers), or UsageError."""
    check_model_file(path)
    keras = import_keras()
    try:
        with warnings.catch_warnings():
            # Optimizer slots saved before the first training step do not load
            # into a built optimizer; no command here uses them.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return keras.saving.load_model(path)
    except Exception as e:  # Any failure to load is the file's problem here.
        raise UsageError(f"cannot load {path} as a Keras model: {one_line(e, 300)}")


def load_array_file(path: str, what: str):
    """Loads a `.npy` array or the arrays of a `.npz` file (a dict)."""
    import numpy as np

    check_readable(path, what)
    if not path.lower().endswith((".npy", ".npz")):
        raise UsageError(f"{what} {path} must be a .npy or .npz file")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return data
        with data:
            return {key: data[key] for key in data.files}
    except Exception as e:
        raise UsageError(f"cannot read {what} {path}: {one_line(e, 200)}")


def progbar(target: int, quiet: bool, unit_name: str = "step"):
    """A Keras progress bar, silent with `--quiet`."""
    keras = import_keras()
    return keras.utils.Progbar(target, verbose=0 if quiet else 1, unit_name=unit_name)


def factorize(model, **kwargs):
    """`keras_factorized.factorize`: `(new_model, report)`, or UsageError."""
    from keras_factorized.surgery import factorize as factorize_model

    try:
        new_model = factorize_model(model, **kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(one_line(e))
    return new_model, getattr(new_model, "factorization_report", None)


# --------------------------------------------------------------------------
# Quantization.


def quantization_modes() -> tuple[str, ...]:
    """The modes of `--quantize`: those the factorized layers implement."""
    from keras_factorized.layers.factor_quantization import SUPPORTED_MODES

    return tuple(SUPPORTED_MODES)


def add_quantize_flag(parser, what: str, then: str = "") -> None:
    """`--quantize MODE`: `model.quantize(MODE)` on `what`, then `then`."""
    modes = quantization_modes()
    parser.add_argument(
        "--quantize", choices=modes, default=None, metavar="MODE",
        help=(
            f"quantize the weights of {what} with `model.quantize(MODE)`, MODE one "
            f"of {', '.join(modes)} (weight-only int8: 1 byte per weight plus "
            f"float32 scales){then}"
        ),
    )


def quantize(model, mode: str) -> tuple[list[str], list[str]]:
    """`model.quantize(mode)` in place: `(quantized, left_float)` layer paths.

    Only layers holding a weight matrix (those of the registry's rules and
    the factorized layers) are listed. Keras's warnings during `quantize` (one
    per layer without a `quantize` method: inputs, pooling...) are silenced:
    the lists say what happened to each weight matrix.
    """
    from keras_factorized import registry
    from keras_factorized.surgery.walk import walk_layers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.quantize(mode)
        except (ValueError, TypeError) as e:
            raise UsageError(f"cannot quantize the model to {mode}: {one_line(e, 300)}")
    matrix_classes = tuple(rule.source for rule in registry.rules())
    quantized, left = [], []
    for path, layer in walk_layers(model):
        if registry.is_factorized(layer) or isinstance(layer, matrix_classes):
            (quantized if layer.quantization_mode == mode else left).append(path)
    return quantized, left


def print_quantized(mode: str, quantized: Sequence[str], left: Sequence[str]) -> None:
    print(f"Quantized to {mode}: {len(quantized)} layer(s)")
    if left:
        print(f"Left in float (model.quantize skipped them): {', '.join(left)}")
