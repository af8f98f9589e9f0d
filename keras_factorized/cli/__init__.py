"""The `keras-factorized` command line: inspect, compress, export, sweep, imdb.

One module per command (`inspect_command`, `compress_command`, ...), each with
`add_parser(subparsers)` and `run(args) -> int`; `_common` holds what they
share. Every command explains its flags with their defaults (`--help`), shows
a progress bar on anything slow, exits 0 on success and 2 with a one-line
message on a user error (bad argument, missing or unreadable file, a file that
is not a Keras model), and writes its outputs to a temporary path in the
destination folder that is renamed into place only once complete, so a
failure never leaves a half-written file.

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
import os  # noqa: F401  (tests fake `os.access` through `cli.os`)
import sys
from collections.abc import Sequence

from keras_factorized.cli import compress_command
from keras_factorized.cli import export_command
from keras_factorized.cli import imdb_command
from keras_factorized.cli import inspect_command
from keras_factorized.cli import sweep_command
from keras_factorized.cli._common import PROG
from keras_factorized.cli._common import ArgumentParser
from keras_factorized.cli._common import HelpFormatter
from keras_factorized.cli._common import UsageError
from keras_factorized.cli._common import load_model
from keras_factorized.cli._common import one_line

__all__ = ["COMMANDS", "PROG", "UsageError", "build_parser", "load_model", "main"]

# The commands, in the order `--help` lists them.
COMMANDS = {
    module.NAME: module
    for module in (
        inspect_command, compress_command, export_command, imdb_command, sweep_command
    )
}


def build_parser() -> argparse.ArgumentParser:
    """The `keras-factorized` parser, one subparser per module of `COMMANDS`."""
    from keras_factorized.version import __version__

    parser = ArgumentParser(
        prog=PROG,
        description=(
            "Inspect, compress, evaluate and export Keras models with low-rank "
            "factorized layers."
        ),
        epilog=f"Run `{PROG} COMMAND --help` for the flags of each command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, print the full Python traceback instead of one line",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=ArgumentParser
    )
    subparsers.required = True
    for module in COMMANDS.values():
        module.add_parser(subparsers).set_defaults(run=module.run)
    return parser


def _parse(parser, argv: Sequence[str]) -> argparse.Namespace:
    """Parses `argv`; only a command that forwards its arguments takes unknown ones."""
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "forward_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_arguments = extra
    return args


def _command_of(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def _error(argv: Sequence[str], error: BaseException) -> None:
    command = _command_of(argv)
    prog = f"{PROG} {command}" if command else PROG
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)


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
        args = _parse(build_parser(), argv)
        show_traceback = args.traceback
        return int(args.run(args) or 0)
    except UsageError as e:
        if show_traceback:
            raise
        _error(argv, e)
        return 2
    except OSError as e:  # Disk full, permissions changed mid-run...: not a usage error.
        if show_traceback:
            raise
        _error(argv, e)
        return 1
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
