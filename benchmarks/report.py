"""Writes benchmark results into BENCHMARKS.md, one marked section per benchmark.

Each benchmark owns the text between `<!-- BEGIN name -->` and `<!-- END name -->`
in BENCHMARKS.md and rewrites only that, so benchmarks run separately never
clobber each other's numbers. Writes go to a temporary file renamed into place.
"""

import json
import os
import platform
import re

from keras_factorized.atomic_io import write_text

BENCHMARKS_MD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md"
)
# Set to write the sections into another file (the smoke tests use a copy).
BENCHMARKS_MD_ENV = "KERAS_FACTORIZED_BENCHMARKS_MD"


def _read_section(name, path):
    """`(path, text, pattern)`: the BENCHMARKS.md to use (`path`, else
    `$KERAS_FACTORIZED_BENCHMARKS_MD`, else the repository's), its text (`""`
    when missing) and the pattern of the section `name` in it, BEGIN and END
    markers included, its body as group 1."""
    path = path or os.environ.get(BENCHMARKS_MD_ENV) or BENCHMARKS_MD
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    return path, text, re.compile(re.escape(begin) + r"(.*?)" + re.escape(end), re.DOTALL)


def update_section(name, markdown, path=None):
    """Replaces the section `name` of BENCHMARKS.md (appends it when missing).

    `path` defaults to `$KERAS_FACTORIZED_BENCHMARKS_MD`, else the repository's
    BENCHMARKS.md.
    """
    path, text, pattern = _read_section(name, path)
    block = f"<!-- BEGIN {name} -->\n{markdown.strip()}\n<!-- END {name} -->"
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, text)


def section_table(name, path=None):
    """The body rows of the first Markdown table in the section `name` of
    BENCHMARKS.md, as lists of cells (`[]` when the section or table is missing).

    The section's rows whose raw results are not at hand (measured on
    another machine, their JSON not kept) are carried from here when it is
    rendered again.
    """
    _, text, pattern = _read_section(name, path)
    match = pattern.search(text)
    lines = [line for line in (match.group(1) if match else "").splitlines()
             if line.startswith("|")]  # fmt: skip
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines[2:]]


def machine_description():
    """One line naming the machine, backend and library versions."""
    import keras
    import numpy as np

    parts = [
        f"{platform.machine()}",
        f"{os.cpu_count()} cores",
        f"Python {platform.python_version()}",
        f"Keras {keras.__version__} ({keras.backend.backend()} backend)",
        f"NumPy {np.__version__}",
    ]
    try:
        import tensorflow as tf

        parts.append(f"TensorFlow {tf.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def blas_description():
    """The BLAS NumPy/SciPy run on: library, CPU kernel and threads (threadpoolctl)."""
    try:
        import numpy  # noqa: F401
        import scipy.linalg  # noqa: F401
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS unknown"
    seen = []
    for info in threadpool_info():
        if info.get("user_api") != "blas":
            continue
        text = (
            f"{info.get('internal_api')} {info.get('version')} "
            f"({info.get('architecture')} kernel, {info.get('num_threads')} threads)"
        )
        if text not in seen:
            seen.append(text)
    return "BLAS: " + ("; ".join(seen) or "unknown")


def markdown_table(headers, rows):
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path, obj):
    """Writes `obj` as indented JSON to `path`, atomically."""
    write_text(path, json.dumps(obj, indent=1))
