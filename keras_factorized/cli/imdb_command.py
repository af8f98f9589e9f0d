"""`keras-factorized imdb`: runs the IMDB example script of a source checkout.

The running example (IMDB sentiment with full, factorized and SVD-compressed
embeddings) is a plain script beside the library,
`examples/imdb_lstm/imdb_lstm.py`; the library never imports it. From a clone
of the repository, `keras-factorized imdb ARGS...` loads that script from its
path and calls its `main(ARGS)`; an installed package has no script, and the
command says where to get it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from collections.abc import Sequence

from keras_factorized.cli import _common
from keras_factorized.cli._common import PROG
from keras_factorized.cli._common import UsageError

NAME = "imdb"

# The example, relative to the folder that holds the `keras_factorized` package.
EXAMPLE_SCRIPT = os.path.join("examples", "imdb_lstm", "imdb_lstm.py")

_MODULE_NAME = "imdb_lstm"


def add_parser(subparsers) -> argparse.ArgumentParser:
    # No flags of its own: every argument (--help included) goes to the script.
    p = subparsers.add_parser(
        NAME,
        add_help=False,
        formatter_class=_common.HelpFormatter,
        help="the running example: IMDB sentiment with factorized embeddings "
        f"(runs {EXAMPLE_SCRIPT} of a source checkout; `{PROG} imdb --help` for its flags)",
    )
    p.set_defaults(forward_arguments=True)
    return p


def example_script() -> str | None:
    """The path of the IMDB example when running from a source checkout, else None."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(os.path.dirname(package_dir), EXAMPLE_SCRIPT)
    return path if os.path.isfile(path) else None


def run(args) -> int:
    argv = list(getattr(args, "extra_arguments", None) or [])
    script = example_script()
    if script is None:
        raise UsageError(
            f"the IMDB example ships with the source repository ({EXAMPLE_SCRIPT}), "
            "not with the installed package; clone the repository and run "
            f"`{PROG} imdb` (or `python {EXAMPLE_SCRIPT}`) there"
        )
    return run_script(script, argv)


@contextlib.contextmanager
def _as_command(script: str) -> Iterator[None]:
    """Runs code as `keras-factorized imdb`: its usage line, one-line errors.

    While inside: `sys.argv[0]` (argparse's default `prog`) is the command,
    argparse errors raise `UsageError` (printed as one line, exit 2) instead
    of printing the usage, and the script's folder is first on `sys.path` as
    when it runs as a script. All three are restored on exit.
    """

    def one_line_error(parser, message):
        raise UsageError(f"{message} (see `{parser.prog} --help`)")

    saved_argv0, saved_error = sys.argv[0] if sys.argv else None, argparse.ArgumentParser.error
    folder = os.path.dirname(os.path.abspath(script))
    if sys.argv:
        sys.argv[0] = f"{PROG} {NAME}"
    argparse.ArgumentParser.error = one_line_error
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved_error
        if saved_argv0 is not None:
            sys.argv[0] = saved_argv0
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def run_script(script: str, argv: Sequence[str]) -> int:
    """Loads `script` from its path and returns `main(argv)` as an exit status."""
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, script)
    module = importlib.util.module_from_spec(spec)
    with _as_command(script):
        sys.modules[_MODULE_NAME] = module
        spec.loader.exec_module(module)
        if not callable(getattr(module, "main", None)):
            raise UsageError(f"{script} has no `main(argv)` function")
        try:
            code = module.main(list(argv))
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise UsageError(_common.one_line(e)) from e
        except SystemExit as e:  # --help, or a script that exits itself
            code = e.code
    if code is None or isinstance(code, int):
        return int(code or 0)
    print(f"{PROG} {NAME}: error: {_common.one_line(code)}", file=sys.stderr)
    return 2
