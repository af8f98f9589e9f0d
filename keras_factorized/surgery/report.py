"""What `factorize` did, layer by layer: `FactorizationReport` and its rows."""

from __future__ import annotations

import dataclasses

import numpy as np

from keras_factorized import data_aware
from keras_factorized import reporting


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
        weight_error: relative Frobenius error `||W - A B|| / ||W||`.
        output_error: relative error of the layer's outputs on the calibration
            data, `||Y' - Y|| / ||Y||` (`None` without calibration data).
        replacement: class name of the new layer, or `None` when kept.
        note: why a layer was kept, or how it was factorized.
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FactorizationReport:
    """The per-layer outcome of `factorize`, as a table (`str(report)`) or a dict.

    Attributes:
        method: the method used.
        layers: one `LayerFactorization` per selected layer.
        notes: model-wide notes (e.g. the distillation loss).
    """

    method: str
    layers: list
    notes: list = dataclasses.field(default_factory=list)

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
            "layers": [r.to_dict() for r in self.layers],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """The report as a Markdown table."""
        return self._table(markdown=True)

    def _table(self, markdown=False) -> str:
        headers = [
            "layer",
            "class",
            "shape",
            "rank",
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
                    f"{r.params_before:,}",
                    f"{r.params_after:,}",
                    f"{r.weight_error:.3f}",
                    "-" if r.output_error is None else f"{r.output_error:.3f}",
                    r.note,
                ]
            )
        footer = [
            "total",
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
            headers, rows, footer=footer, left=[0, 1, 2, 8], markdown=markdown
        )
        if self.notes:
            text += "\n" + "\n".join(self.notes)
        return f"Factorization ({self.method}):\n{text}"

    def __str__(self) -> str:
        return self._table()


def _params(layer) -> int:
    return sum(int(np.prod(w.shape)) for w in layer.weights)


def factorized_row(target, new_layer, approx, new_bias) -> LayerFactorization:
    """The row of a target replaced by `new_layer` (merged matrix `approx`)."""
    matrix = target.matrix
    params_before = matrix.size + (0 if target.bias is None else target.bias.size)
    norm = np.linalg.norm(matrix)
    output_error = None
    if target.stats is not None:
        output_error = data_aware.relative_output_error(
            target.stats, matrix, approx, target.bias, new_bias
        )
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
    )


def kept_layer_row(layer, note) -> LayerFactorization:
    """The row of a selected layer that could not be replaced, and why."""
    weight = getattr(layer, "kernel", None)
    if weight is None:
        weight = getattr(layer, "embeddings", None)
    shape = () if weight is None else tuple(weight.shape)
    params = _params(layer)
    return LayerFactorization(
        layer.path, type(layer).__name__, shape, None, params, params, note=note
    )
