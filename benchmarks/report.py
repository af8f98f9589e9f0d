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


def update_section(name, markdown, path=None):
    """Replaces the section `name` of BENCHMARKS.md (appends it when missing).

    `path` defaults to `$KERAS_FACTORIZED_BENCHMARKS_MD`, else the repository's
    BENCHMARKS.md.
    """
    path = path or os.environ.get(BENCHMARKS_MD_ENV) or BENCHMARKS_MD
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
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
    path = path or os.environ.get(BENCHMARKS_MD_ENV) or BENCHMARKS_MD
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    match = re.search(
        re.escape(f"<!-- BEGIN {name} -->") + r"(.*?)" + re.escape(f"<!-- END {name} -->"),
        text,
        re.DOTALL,
    )
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
