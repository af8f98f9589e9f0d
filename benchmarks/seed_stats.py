"""Multi-seed statistics, tables and plots of the IMDB example's results.

The example (`examples/imdb_lstm/imdb_lstm.py`) returns one row per trained
model; the benchmarks run it over seeds and aggregate here: `summarize`
(mean, spread, min/max per model), `format_table` (fixed-width text),
`write_outputs` (results.json, results.csv, accuracy_vs_params.png).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics

from keras_factorized.atomic_io import atomic_output
from keras_factorized.atomic_io import write_text

# kind -> (marker, legend label) of the accuracy-vs-parameters plot.
PLOT_KINDS = {
    "baseline": ("s", "full Embedding"),
    "scratch": ("o", "FactorizedEmbedding (scratch)"),
    "svd": ("^", "SVD of baseline + fine-tuning"),
}


def summarize(rows: list[dict]) -> list[dict]:
    """Aggregates per-seed rows into one row per model (mean and spread over seeds)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["model"], []).append(row)
    summary = []
    for name, group in groups.items():
        accuracies = [r["test_accuracy"] for r in group]
        first = group[0]
        summary.append(
            {
                "model": name,
                "kind": first["kind"],
                "rank": first["rank"],
                "embedding_params": first["embedding_params"],
                "total_params": first["total_params"],
                "compression": first.get("compression", 1.0),
                "seeds": len(group),
                "test_accuracy_mean": statistics.mean(accuracies),
                "test_accuracy_std": statistics.stdev(accuracies) if len(group) > 1 else 0.0,
                "test_accuracy_min": min(accuracies),
                "test_accuracy_max": max(accuracies),
                "val_accuracy_mean": statistics.mean(r["val_accuracy"] for r in group),
                "time_per_epoch_s": statistics.mean(r["time_per_epoch_s"] for r in group),
                "epochs_trained_mean": statistics.mean(r["epochs_trained"] for r in group),
                "model_size_bytes": first["model_size_bytes"],
            }
        )
    return summary


def format_table(summary: list[dict]) -> str:
    """The summary as a fixed-width text table."""
    headers = (
        "model",
        "emb. params",
        "total params",
        "compression",
        "test acc. (%)",
        "s/epoch",
        "epochs",
        ".keras size",
    )
    lines = []
    for row in summary:
        acc = f"{100 * row['test_accuracy_mean']:.2f}"
        if row["seeds"] > 1:
            acc += f" ± {100 * row['test_accuracy_std']:.2f}"
        lines.append(
            (
                row["model"],
                f"{row['embedding_params']:,}",
                f"{row['total_params']:,}",
                f"{row['compression']:.1f}x",
                acc,
                f"{row['time_per_epoch_s']:.1f}",
                f"{row['epochs_trained_mean']:.1f}",
                f"{row['model_size_bytes'] / 1e6:.2f} MB",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths)),
        "  ".join("-" * w for w in widths),
    ]
    out.extend("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)
    return "\n".join(out)


def write_outputs(
    output_dir: str,
    rows: list[dict],
    summary: list[dict],
    config: dict,
    plot_kinds: dict | None = None,
) -> dict:
    """Writes results.json, results.csv and accuracy_vs_params.png; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        name: os.path.join(output_dir, file)
        for name, file in (
            ("json", "results.json"),
            ("csv", "results.csv"),
            ("plot", "accuracy_vs_params.png"),
        )
    }
    write_text(
        paths["json"], json.dumps({"config": config, "summary": summary, "runs": rows}, indent=2)
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(summary[0]))
    writer.writeheader()
    writer.writerows(summary)
    write_text(paths["csv"], buffer.getvalue())
    plot_accuracy(summary, paths["plot"], plot_kinds or PLOT_KINDS)
    return paths


def plot_accuracy(
    summary: list[dict],
    path: str,
    kinds: dict | None = None,
    title: str = "IMDB sentiment: accuracy vs embedding size",
    extra_series: tuple = (),
) -> None:
    """Plots test accuracy (mean ± std) against embedding parameters (log x) into a PNG.

    `summary` rows are plotted by `kind` as `kinds` says (marker, label);
    `extra_series` adds `(label, marker, rows)` series of rows of the same form.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series = [
        (label, marker, [r for r in summary if r["kind"] == kind])
        for kind, (marker, label) in (kinds or PLOT_KINDS).items()
    ]
    for label, marker, rows in series + list(extra_series):
        if not rows:
            continue
        ax.errorbar(
            [r["embedding_params"] for r in rows],
            [100 * r["test_accuracy_mean"] for r in rows],
            yerr=[100 * r["test_accuracy_std"] for r in rows],
            fmt=marker,
            capsize=3,
            label=label,
        )
        for r in rows:
            ax.annotate(
                r["model"],
                (r["embedding_params"], 100 * r["test_accuracy_mean"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
