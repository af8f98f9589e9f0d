"""`keras-factorized compress`: replace layers by factorized ones and save the model."""

from __future__ import annotations

import argparse
from typing import Any

from keras_factorized.atomic_io import atomic_output
from keras_factorized.cli import _common
from keras_factorized.cli._common import PROG
from keras_factorized.cli._common import UsageError

NAME = "compress"

METHOD_HELP = {
    "svd": "truncated SVD of each weight matrix",
    "whitened": (
        "SVD weighted by the activations each layer sees on --calibration "
        "data (minimises each layer's output error)"
    ),
    "learned": (
        "starts from whitened, then trains the factors so that the whole "
        "model's outputs match the original model's on --calibration data "
        "(distillation, --distillation-epochs passes)"
    ),
}
ALLOCATION_HELP = {
    "auto": "sensitivity when --calibration data is given, greedy otherwise",
    "greedy": "spends the budget where it removes the most error per parameter",
    "uniform": "gives every layer the same ratio",
    "sensitivity": (
        "spends it where it removes the most error at the model's outputs, "
        "measured on --calibration data"
    ),
}
# Methods and allocations that read the model's inputs.
CALIBRATED_METHODS = ("whitened", "learned")
CALIBRATED_ALLOCATIONS = ("sensitivity",)


SPLIT_HELP = {
    "balanced": "A = U sqrt(S), B = sqrt(S) V^T",
    "left": "A = U S, B = V^T",
    "right": "A = U, B = S V^T",
}
TRAINABLE_HELP = {
    "factors": "only the new factorized layers",
    "all": "also the layers kept as they are (normalizations, ...)",
}

# Each option of `WhitenedConfig` and `DistillationConfig`: its flag and
# argparse keywords (the help is the option's description in the config's
# docstring); `None` where another flag sets it. A test checks that every
# option of the configs is here.
WHITENING_FLAGS = {
    "damping": ("--damping", dict(type=_common.non_negative_float, metavar="D")),
    "bias_correction": ("--bias-correction", dict(action=argparse.BooleanOptionalAction)),
    "sequential": ("--sequential", dict(action=argparse.BooleanOptionalAction)),
    "residual": ("--residual", dict(action=argparse.BooleanOptionalAction)),
}
DISTILLATION_FLAGS = {
    "data": (
        "--distillation-data",
        dict(metavar="DATA", help="unlabelled model inputs to distil on, a .npy array or an "
             ".npz with an array `x` (default: the --calibration data)"),
    ),
    "epochs": ("--distillation-epochs", dict(type=_common.non_negative_int, metavar="N")),
    "block_epochs": ("--block-epochs", dict(type=_common.non_negative_int, metavar="N")),
    "learning_rate": ("--learning-rate", dict(type=_common.positive_float, metavar="LR")),
    "batch_size": (
        "--distillation-batch-size", dict(type=_common.positive_int, metavar="B")
    ),
    "outputs": ("--distillation-outputs", dict(type=_common.key_list, metavar="KEY,...")),
    "loss": ("--distillation-loss", dict(metavar="LOSS")),
    "block_weight": ("--block-weight", dict(type=_common.non_negative_float, metavar="W")),
    "trainable": ("--distillation-trainable", {}),  # choices and help: _add_method_flags
    "seed": None,  # --seed
    "time_budget": ("--time-budget", dict(type=_common.positive_float, metavar="SECONDS")),
    "validation_split": (
        "--validation-split", dict(type=_common.split_fraction, metavar="FRACTION")
    ),
    "refit": ("--distillation-refit", dict(action=argparse.BooleanOptionalAction)),
    "use_calibration_data": (
        "--distil-on-calibration", dict(action=argparse.BooleanOptionalAction)
    ),
    "token_noise": ("--token-noise", dict(type=_common.auto_or_probability, metavar="RATE")),
    "dtype_policy": ("--distillation-dtype-policy", {}),  # choices: _add_method_flags
    "validation_data": (
        "--validation-data",
        dict(metavar="DATA", help="held-out model inputs to keep the best factors on, a .npy "
             "array or an .npz with an array `x`, instead of a split of the distillation data"),
    ),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = _common.add_command(
        subparsers,
        NAME,
        help="replace layers by low-rank factorized ones (keras_factorized.factorize)",
        description=_common.wrap(
            "Replaces the factorizable layers (those `inspect` lists with a rank) "
            "by their factorized versions (keras_factorized.factorize), prints "
            "its report and saves the new model. Choose the rank with exactly "
            "one of --rank, --energy or --param-ratio."
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
        "--param-ratio", type=_common.fraction, metavar="R",
        help="keep at most this fraction of the factorizable layers' parameters, in (0, 1]",
    )
    choice.add_argument(
        "--rank", type=_common.positive_int, metavar="K", help="the same rank K for every layer"
    )
    choice.add_argument(
        "--energy", type=_common.fraction, metavar="E",
        help="per layer, the smallest rank keeping this fraction of the spectral energy, in (0, 1]",
    )
    _add_method_flags(p)
    _common.add_quantize_flag(p, "the compressed model (after factorization)")
    _add_output_flags(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace the output file if it exists"
    )
    return p


def _add_method_flags(p) -> None:
    """--method and its options, with the choices and defaults of the library."""
    from keras_factorized import decomposition
    from keras_factorized import surgery

    p.add_argument(
        "--method", choices=surgery.METHODS, default=surgery.METHODS[0],
        help=_common.choices_help(METHOD_HELP, surgery.METHODS),
    )
    p.add_argument(
        "--calibration", metavar="DATA", default=None,
        help=(
            f"model inputs for --method {'/'.join(CALIBRATED_METHODS)} and --allocation "
            f"{'/'.join(CALIBRATED_ALLOCATIONS)}: a .npy array or an .npz with an array `x`; "
            "the report gives the model's output error on it"
        ),
    )
    _common.add_layer_filters(p)
    p.add_argument(
        "--allocation", choices=surgery.ALLOCATIONS, default=surgery.ALLOCATIONS[0],
        help="with --param-ratio: " + _common.choices_help(ALLOCATION_HELP, surgery.ALLOCATIONS),
    )
    p.add_argument(
        "--split", choices=decomposition.SPLITS, default=decomposition.SPLITS[0],
        help="how the singular values S are shared between the factors: "
        + _common.choices_help(SPLIT_HELP, decomposition.SPLITS),
    )
    p.add_argument(
        "--batch-size", type=_common.positive_int, metavar="B",
        default=_common.factorize_default("batch_size"),
        help="batch size to run the calibration data (statistics, sensitivities, the "
        "sequential refit, the report's output errors); the distillation trains in batches "
        "of --distillation-batch-size",
    )
    p.add_argument(
        "--seed", type=_common.non_negative_int, metavar="N", default=surgery.DistillationConfig().seed,
        help="seeds every random step (the order of the distillation batches): the same "
        "command on the same model and data writes the same model (unless a "
        "--time-budget cuts the training short)",
    )
    _common.add_config_flags(p, surgery.WhitenedConfig, WHITENING_FLAGS, "whitened/learned")
    choices = surgery.config.DISTILLATION_TRAINABLE
    flags = dict(DISTILLATION_FLAGS)
    flags["trainable"] = (
        flags["trainable"][0],
        dict(choices=choices, help=_common.choices_help(TRAINABLE_HELP, choices)),
    )
    flags["dtype_policy"] = (
        flags["dtype_policy"][0],
        dict(choices=surgery.config.DISTILLATION_DTYPE_POLICIES, metavar="POLICY"),
    )
    _common.add_config_flags(p, surgery.DistillationConfig, flags, "learned")


def _add_output_flags(p) -> None:
    from keras_factorized.surgery import report

    p.add_argument(
        "--report", metavar="FILE", default=None,
        help="also write the factorization report to FILE, in the format its suffix "
        "names: " + _common.choices_help(report.REPORT_FORMATS, tuple(report.REPORT_FORMATS)),
    )


def rank_choice(args) -> dict[str, Any]:
    """The one rank argument given: `{"rank": ...}`, `{"energy": ...}` or `{"param_ratio": ...}`."""
    for name in ("rank", "energy", "param_ratio"):
        if getattr(args, name, None) is not None:
            return {name: getattr(args, name)}
    raise UsageError("one of --rank, --energy or --param-ratio is required")


def _inputs(path, what):
    """Model inputs from a .npy file or an .npz file's `x` (or only) array."""
    data = _common.load_array_file(path, what)
    if isinstance(data, dict):
        for key in ("x", "x_train", "inputs"):
            if key in data:
                return data[key]
        if len(data) == 1:
            return next(iter(data.values()))
        raise UsageError(
            f"{what} {path} holds {sorted(data)}; expected an array named `x` (or a single array)"
        )
    return data


def _calibration(args):
    if args.calibration is None:
        if args.method in CALIBRATED_METHODS:
            raise UsageError(f"--method {args.method} needs --calibration DATA (.npy or .npz)")
        if args.allocation in CALIBRATED_ALLOCATIONS and args.param_ratio is not None:
            raise UsageError(
                f"--allocation {args.allocation} needs --calibration DATA (.npy or .npz)"
            )
        return None
    return _inputs(args.calibration, "calibration file")


def _configs(args):
    """`(whitening, distillation)` from the flags."""
    from keras_factorized import surgery

    whitening = _common.config_from_args(surgery.WhitenedConfig, WHITENING_FLAGS, args)
    data, validation = args.distillation_data, args.validation_data
    if data is not None:
        data = _inputs(data, "distillation data file")
    if validation is not None:
        validation = _inputs(validation, "validation data file")
    distillation = _common.config_from_args(
        surgery.DistillationConfig, DISTILLATION_FLAGS, args,
        data=data, validation_data=validation, seed=args.seed,
    )
    return whitening, distillation


def _print_sizes(model, new_model) -> None:
    from keras_factorized.spectrum import stored_bytes

    before, after = model.count_params(), new_model.count_params()
    print(f"Model parameters: {before:,} -> {after:,} ({after / max(before, 1):.1%})")
    before, after = stored_bytes(model), stored_bytes(new_model)
    print(f"Model bytes: {before:,} -> {after:,} ({after / max(before, 1):.1%})")


def run(args) -> int:
    from keras_factorized.surgery.report import REPORT_FORMATS

    _common.check_output_file(args.output, suffixes=(".keras",), overwrite=args.overwrite)
    if args.report is not None:
        _common.check_output_file(args.report, suffixes=tuple(REPORT_FORMATS))
    calibration = _calibration(args)
    whitening, distillation = _configs(args)
    model = _common.load_model(args.model)
    choice = rank_choice(args)
    (name, value), = choice.items()
    print(f"Factorizing {args.model} (method {args.method}, {name.replace('_', ' ')} {value})")
    new_model, report = _common.factorize(
        model,
        **choice,
        method=args.method,
        calibration_data=calibration,
        include=args.include,
        exclude=args.exclude,
        allocation=args.allocation,
        split=args.split,
        whitening=whitening,
        distillation=distillation,
        batch_size=args.batch_size,
        verbose=0 if args.quiet else 1,
    )
    if report is not None:
        print(report)
    if args.quantize:
        _common.print_quantized(args.quantize, *_common.quantize(new_model, args.quantize))
    if getattr(model, "compiled", False) and model.get_compile_config():
        # A fresh optimizer, built for the new (factorized, quantized)
        # variables: the copied one holds slots for the old ones (saved, it
        # would not load into the new model).
        new_model.compile_from_config(model.get_compile_config())
    _print_sizes(model, new_model)
    try:
        with atomic_output(args.output, overwrite=args.overwrite) as tmp:
            new_model.save(tmp)
    except FileExistsError:  # Created by someone else while we worked.
        raise UsageError(f"output file {args.output} exists; pass --overwrite to replace it")
    print(f"Wrote {args.output}")
    if report is not None and args.report is not None:
        report.write(args.report)
        print(f"Wrote {args.report}")
    return 0
