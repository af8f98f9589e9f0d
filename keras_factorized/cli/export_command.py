"""`keras-factorized export`: a versioned SavedModel folder for TF Serving."""

from __future__ import annotations

import argparse
import os
import shutil

from keras_factorized.cli import _common
from keras_factorized.cli._common import PROG
from keras_factorized.cli._common import UsageError

NAME = "export"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = _common.add_command(
        subparsers,
        NAME,
        help="export a model for TF Serving (SavedModel, versioned folder)",
        description=_common.wrap(
            "Exports the model as a TensorFlow SavedModel under "
            "EXPORT_DIR/VERSION/ (the layout TF Serving watches), through "
            "keras_factorized.export.export_for_serving. Needs TensorFlow."
        ),
        epilog=f"Example:\n  {PROG} export small.keras serving/sentiment --version 1 --merge",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the saved Keras model")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="the model's serving folder")
    p.add_argument(
        "--version", type=_common.positive_int, default=None, metavar="N",
        help="version subfolder; default: one more than the highest already there (1 if none)",
    )
    p.add_argument(
        "--merge", action="store_true",
        help="multiply the factors back into dense matrices before exporting",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    return p


def _first_new_folder(args) -> str | None:
    """The outermost folder of EXPORT_DIR that does not exist yet (or None).

    Export creates the missing folders like `mkdir -p`; on failure they are
    removed again.
    """
    export_dir = os.path.abspath(args.export_dir)
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise UsageError(f"export path {args.export_dir} exists and is not a folder")
    first_new, existing = None, export_dir
    while not os.path.exists(existing):
        first_new, existing = existing, os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UsageError(f"cannot create folders in {existing} (not a writable folder)")
    return first_new


def run(args) -> int:
    first_new = _first_new_folder(args)
    model = _common.load_model(args.model)
    try:
        from keras_factorized.export import export_for_serving
    except ImportError as e:
        raise UsageError(f"export needs TensorFlow: {_common.one_line(e)}")
    print(f"Exporting {args.model} to {args.export_dir} (merge factors: {args.merge})")
    bar = _common.progbar(1, args.quiet, unit_name="model")
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
            _remove_unless_published(first_new)
        if isinstance(e, FileExistsError):
            raise UsageError(
                f"version {args.version} already exists in {args.export_dir}; pass "
                "--overwrite to replace it, or leave out --version for the next one"
            ) from e
        if isinstance(e, (ValueError, TypeError, RuntimeError)):
            raise UsageError(_common.one_line(e)) from e
        raise
    bar.update(1)
    print(f"Wrote SavedModel {version_dir}")
    return 0


def _remove_unless_published(folder: str) -> None:
    """Removes the folders this call created, unless a concurrent export has
    meanwhile published a version (a numbered folder) inside them."""
    for _, names, _ in os.walk(folder):
        if any(name.isdigit() for name in names):
            return
    shutil.rmtree(folder, ignore_errors=True)
