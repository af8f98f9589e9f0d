"""Tables, JSON/CSV files and PNG plots: how results are shown and written.

One text-table renderer (`format_table`, also as Markdown), one cell format
(`format_cell`), atomic JSON/CSV writers, and one way to draw a figure
(`figure`, a context manager that writes the PNG atomically and always closes
the figure) with one way to draw series of points on its axes
(`draw_series`). `keras-factorized inspect` and `sweep`, the spectra plots and
the factorization report use them, so every table and plot of the package
reads the same.

Example:

>>> print(format_table(["layer", "params"], [["dense", 1024], ["out", 17]],
...                    footer=["total", 1041]))
layer  params
-----  ------
dense   1,024
out        17
-----  ------
total   1,041
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

from keras_factorized.atomic_io import atomic_output
from keras_factorized.atomic_io import write_text


def format_cell(value: Any) -> str:
    """One table cell: `""` for None, `1,234` for integers, 4 decimals for floats.

    Example:

    >>> [format_cell(v) for v in (None, 12345, 0.123456, "full", True)]
    ['', '12,345', '0.1235', 'full', 'True']
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    footer: Sequence[Any] | None = None,
    left: Sequence[int] | None = None,
    markdown: bool = False,
) -> str:
    """Rows of cells as a fixed-width text table (or a Markdown table).

    Cells that are not strings go through `format_cell`.

    Args:
        headers: the column names.
        rows: one sequence of cells per row.
        footer: an optional last row (a total), set off by a rule.
        left: indices of the left-aligned columns; default: the columns whose
            first row holds text (numbers are right-aligned).
        markdown: a Markdown table instead of fixed-width text.

    Returns:
        The table, without a trailing newline.
    """
    body = [list(row) for row in rows] + ([list(footer)] if footer is not None else [])
    if left is None:
        first = body[0] if body else []
        left = [i for i in range(len(headers)) if i >= len(first) or not _is_number(first[i])]
    cells = [[c if isinstance(c, str) else format_cell(c) for c in row] for row in body]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    left = set(left)

    def line(row):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()

    # A text column at the end (notes) is not padded; its rule spans its header.
    last = len(headers) - 1
    rules = [len(headers[i]) if i == last and i in left else w for i, w in enumerate(widths)]
    rule = "  ".join("-" * w for w in rules)
    out = [line(headers), rule] + [line(row) for row in cells[: len(rows)]]
    if footer is not None:
        out += [rule, line(cells[-1])]
    return "\n".join(out)


def format_records(records: Sequence[dict[str, Any]]) -> str:
    """Dicts as a table: the union of their keys (in first-seen order) as columns.

    Example:

    >>> print(format_records([{"rank": "full", "acc": 0.9}, {"rank": 4, "acc": 0.85}]))
    rank     acc
    ----  ------
    full  0.9000
       4  0.8500
    """
    headers = record_fields(records)
    rows = [[record.get(h) for h in headers] for record in records]
    numeric = [any(_is_number(row[i]) for row in rows) for i in range(len(headers))]
    return format_table(headers, rows, left=[i for i, n in enumerate(numeric) if not n])


def record_fields(records: Sequence[dict[str, Any]]) -> list[str]:
    """The keys of `records`, each once, in the order they first appear."""
    fields: list[str] = []
    for record in records:
        fields += [key for key in record if key not in fields]
    return fields


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str, records: Sequence[dict[str, Any]]) -> None:
    """Writes dicts as CSV (columns: the union of their keys), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=record_fields(records))
    writer.writeheader()
    writer.writerows(records)
    write_text(path, buffer.getvalue())


@contextlib.contextmanager
def figure(path: str, panels: int = 1, size: tuple[float, float] = (7, 4.5),
           title: str | None = None) -> Iterator[list]:
    """A Matplotlib figure of `panels` side-by-side axes, saved to a PNG on exit.

    The PNG is written to a temporary file in the destination folder and
    renamed into place (never half-written); the figure is closed whatever
    happens. Uses the `Agg` backend (no display needed).

    Args:
        path: where to write the PNG.
        panels: the number of axes, side by side.
        size: the figure size in inches.
        title: an optional title over the whole figure.

    Yields:
        The list of axes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    try:
        yield list(axes[0])
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def draw_series(
    ax,
    series: Sequence[dict[str, Any]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    xscale: str = "linear",
    yscale: str = "linear",
    hlines: Sequence[dict[str, Any]] = (),
    vlines: Sequence[dict[str, Any]] = (),
    legend: bool = True,
) -> None:
    """Draws series of points on one Matplotlib axes, with labels and a grid.

    Args:
        ax: the axes (from `figure`).
        series: one dict per line: `x`, `y`, and optionally `label`, `style`
            (a Matplotlib format such as `"o-"`), `color`, `yerr` (error bars)
            and `annotations` (one text per point).
        xlabel, ylabel, title: the axis labels and the panel title.
        xscale, yscale: `"linear"` or `"log"`.
        hlines, vlines: reference lines, dicts of `y` (or `x`) and optionally
            `label`, `color`, `linestyle`.
        legend: draw a legend of the labelled series and lines.
    """
    for s in series:
        style = s.get("style", "-")
        kwargs = {"label": s.get("label"), "color": s.get("color")}
        if s.get("yerr") is not None:
            ax.errorbar(s["x"], s["y"], yerr=s["yerr"], fmt=style, capsize=3, **kwargs)
        else:
            ax.plot(s["x"], s["y"], style, **kwargs)
        for text, x, y in zip(s.get("annotations") or (), s["x"], s["y"]):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, -10),
                        fontsize="small")
    for line in hlines:
        ax.axhline(line["y"], color=line.get("color", "gray"),
                   linestyle=line.get("linestyle", ":"), label=line.get("label"))
    for line in vlines:
        ax.axvline(line["x"], color=line.get("color", "gray"),
                   linestyle=line.get("linestyle", ":"), label=line.get("label"))
    ax.set_xscale(xscale)
    ax.set_yscale(yscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    labelled = [s for s in series if s.get("label")]
    labelled += [line for line in (*hlines, *vlines) if line.get("label")]
    if legend and labelled:
        ax.legend(fontsize="small")
