"""What `factorize` did, layer by layer: `FactorizationReport` and its rows.

Per layer: the rank chosen and why (the allocation that chose it, or why the
layer was kept), its relative weight error and its output error on the
calibration data. For the model: its output error on the calibration data
after each step (`OutputErrorProbe`), so that the report says what the
sequential refit and distillation bought. The report prints as a table and
writes to JSON, Markdown, CSV or text (`FactorizationReport.write`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import keras
import numpy as np

from keras_factorized import data_aware
from keras_factorized import reporting
from keras_factorized.atomic_io import write_text
from keras_factorized.surgery.calibration import batches
from keras_factorized.surgery.calibration import to_numpy
from keras_factorized.validation import invalid_value

# Why a layer got its rank: `FactorizationReport`'s per-layer `allocation`.
ALLOCATION_REASONS = {
    "rank": "fixed rank",
    "energy": "energy: smallest rank keeping the fraction of the spectrum",
    "uniform": "uniform ratio",
    "greedy": "greedy: relative squared error removed per parameter",
    "sensitivity": "sensitivity: marginal output error per parameter",
    "kept": "kept: factorizing saves nothing",
    "not replaceable": "kept: cannot be replaced (see note)",
}
# The files `FactorizationReport.write` writes, by suffix.
REPORT_FORMATS = {
    ".json": "JSON: every field of every layer, the model's output errors and notes",
    ".md": "a Markdown table",
    ".csv": "one CSV row per layer",
    ".txt": "the table as printed",
}


@dataclasses.dataclass
class LayerFactorization:
    """What `factorize` did to one layer.

    Attributes:
        path: the layer's `layer.path`, e.g.
            `"transformer_layer_0/self_attention_layer/query"`.
        layer_class: class name of the original layer.
        shape: `(m, n)` of the matricized weight (contracted x output features).
        rank: the rank kept, or `None` when the layer was left as it is.
        params_before: weights of the original layer (kernel and bias).
        params_after: weights of the layer in the new model.
        weight_error: relative Frobenius error `||W - A B|| / ||W||` (0 for a
            layer kept; the text and Markdown tables show `-`).
        output_error: relative error of the layer's outputs on the calibration
            data, `||Y' - Y|| / ||Y||` (`None` without calibration data).
        replacement: class name of the new layer, or `None` when kept.
        note: why a layer was kept, or how it was factorized.
        allocation: why it has this rank (a value of `ALLOCATION_REASONS`).
        sensitivity: with the sensitivity allocation, the measured output
            error per unit of the layer's own output error (`None` otherwise).
    """

    path: str
    layer_class: str
    shape: tuple
    rank: int | None
    params_before: int
    params_after: int
    weight_error: float = 0.0
    output_error: float | None = None
    replacement: str | None = None
    note: str = ""
    allocation: str = ""
    sensitivity: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FactorizationReport:
    """The per-layer outcome of `factorize`, as a table (`str(report)`) or a dict.

    Attributes:
        method: the method used.
        layers: one `LayerFactorization` per selected layer.
        notes: model-wide notes (e.g. the distillation loss).
        output_errors: the model's relative output error on the calibration
            data, `||Y' - Y|| / ||Y||` over all its outputs, after each step
            (`{"factorized": ..., "sequential refit": ..., "distilled": ...}`,
            in order); empty without calibration data.
        settings: the options that chose the ranks and factors (rank
            argument, allocation, seed...).

    Example:

    >>> import keras
    >>> from keras_factorized import factorize
    >>> model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(32)])
    >>> report = factorize(model, rank=4).factorization_report
    >>> report.layers[0].allocation
    'fixed rank'
    >>> sorted(report.to_dict())[:3]
    ['layers', 'method', 'notes']
    """

    method: str
    layers: list
    notes: list = dataclasses.field(default_factory=list)
    output_errors: dict = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def factorized(self) -> list:
        """The layers that were replaced."""
        return [r for r in self.layers if r.rank is not None]

    @property
    def params_before(self) -> int:
        """Weights of the selected layers before factorization."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        """Weights of the selected layers after factorization."""
        return sum(r.params_after for r in self.layers)

    @property
    def param_ratio(self) -> float:
        """`params_after / params_before` over the selected layers."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_ratio": self.param_ratio,
            "settings": dict(self.settings),
            "output_errors": dict(self.output_errors),
            "layers": [r.to_dict() for r in self.layers],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """The report as a Markdown table."""
        return self._table(markdown=True)

    def to_csv(self) -> str:
        """One CSV row per layer (the fields of `LayerFactorization`)."""
        records = [r.to_dict() for r in self.layers]
        for record in records:
            record["shape"] = "x".join(str(d) for d in record["shape"])
        fields = [f.name for f in dataclasses.fields(LayerFactorization)]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()

    def write(self, path: str) -> None:
        """Writes the report to `path`, atomically, in the format its suffix
        names (`REPORT_FORMATS`)."""
        suffix = os.path.splitext(str(path))[1].lower()
        if suffix not in REPORT_FORMATS:
            raise invalid_value("path", f"a file name ending in one of {list(REPORT_FORMATS)}", path)
        if suffix == ".json":
            reporting.write_json(path, self.to_dict())
            return
        text = {".md": self.to_markdown, ".csv": self.to_csv, ".txt": self.__str__}[suffix]()
        write_text(path, text if text.endswith("\n") else text + "\n")

    def _table(self, markdown=False) -> str:
        headers = [
            "layer",
            "class",
            "shape",
            "rank",
            "allocation",
            "params before",
            "params after",
            "weight err",
            "output err",
            "note",
        ]
        rows = []
        for r in self.layers:
            rows.append(
                [
                    r.path,
                    r.layer_class,
                    "x".join(str(d) for d in r.shape),
                    "-" if r.rank is None else str(r.rank),
                    r.allocation,
                    f"{r.params_before:,}",
                    f"{r.params_after:,}",
                    "-" if r.rank is None else f"{r.weight_error:.3f}",
                    "-" if r.output_error is None else f"{r.output_error:.3f}",
                    r.note,
                ]
            )
        footer = [
            "total",
            "",
            "",
            "",
            "",
            f"{self.params_before:,}",
            f"{self.params_after:,}",
            "",
            "",
            f"ratio {self.param_ratio:.3f}",
        ]
        text = reporting.format_table(
            headers, rows, footer=footer, left=[0, 1, 2, 4, 9], markdown=markdown
        )
        if self.output_errors:
            text += "\n" + self.output_error_line()
        if self.notes:
            text += "\n" + "\n".join(self.notes)
        settings = "".join(f", {k} {v}" for k, v in self.settings.items())
        return f"Factorization ({self.method}{settings}):\n{text}"

    def output_error_line(self) -> str:
        """The model's output error after each step, on one line."""
        return "model output error on the calibration data (||Y' - Y|| / ||Y||): " + (
            " -> ".join(f"{step} {e:.4g}" for step, e in self.output_errors.items())
        )

    def __str__(self) -> str:
        return self._table()


def _params(layer) -> int:
    return sum(int(np.prod(w.shape)) for w in layer.weights)


def factorized_row(target, new_layer, approx, new_bias, allocation="") -> LayerFactorization:
    """The row of a target replaced by `new_layer` (merged matrix `approx`);
    `allocation` says why it has its rank."""
    matrix = target.matrix
    params_before = matrix.size + (0 if target.bias is None else target.bias.size)
    norm = np.linalg.norm(matrix)
    output_error = None
    if target.stats is not None:
        output_error = data_aware.relative_output_error(
            target.stats, matrix, approx, target.bias, new_bias
        )
    elif target.token_counts is not None:
        output_error = data_aware.weighted_relative_error(target.token_counts, matrix, approx)
    return LayerFactorization(
        path=target.layer.path,
        layer_class=type(target.layer).__name__,
        shape=target.shape,
        rank=target.rank,
        params_before=params_before,
        params_after=_params(new_layer),
        weight_error=float(np.linalg.norm(matrix - approx) / norm) if norm else 0.0,
        output_error=output_error,
        replacement=type(new_layer).__name__,
        note="whitened" if isinstance(target.spectrum, data_aware.WhitenedSVD) else "svd",
        allocation=allocation,
    )


def kept_target_row(target) -> LayerFactorization:
    """The row of a target left as it is (`target.note` says why)."""
    params = target.matrix.size + (0 if target.bias is None else target.bias.size)
    return LayerFactorization(
        target.layer.path,
        type(target.layer).__name__,
        target.shape,
        None,
        params,
        params,
        note=target.note,
        allocation=ALLOCATION_REASONS["kept"],
    )


def kept_layer_row(layer, note) -> LayerFactorization:
    """The row of a selected layer that could not be replaced, and why."""
    weight = getattr(layer, "kernel", None)
    if weight is None:
        weight = getattr(layer, "embeddings", None)
    shape = () if weight is None else tuple(weight.shape)
    params = _params(layer)
    return LayerFactorization(
        layer.path,
        type(layer).__name__,
        shape,
        None,
        params,
        params,
        note=note,
        allocation=ALLOCATION_REASONS["not replaceable"],
    )


def _flat_outputs(model, batch) -> list:
    return [
        to_numpy(y).astype(np.float64) for y in keras.tree.flatten(model(batch, training=False))
    ]


class OutputErrorProbe:
    """The relative error of a model's outputs to `model`'s on `data`.

    The reference outputs are computed once; each call runs the new model
    over the same batches: `||Y' - Y|| / ||Y||` over all outputs.
    """

    def __init__(self, model, data, batch_size):
        self.inputs = list(batches(data, batch_size))
        self.reference = [_flat_outputs(model, x) for x in self.inputs]
        self.norm_sq = sum(float(np.sum(np.square(y))) for ys in self.reference for y in ys)

    def __call__(self, new_model) -> float:
        error = 0.0
        for x, expected in zip(self.inputs, self.reference):
            for y, y0 in zip(_flat_outputs(new_model, x), expected):
                error += float(np.sum(np.square(y - y0)))
        return float(np.sqrt(error / self.norm_sq)) if self.norm_sq > 0 else float(np.sqrt(error))
