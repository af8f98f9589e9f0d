"""Singular-value spectra of a model's weight matrices: look before you cut.

`inspect_model` walks a Keras model with the walker `factorize` uses (nested
models and layers held in attributes included) and asks the registry
(`keras_factorized.registry`) about every layer. For each layer `factorize`
would replace and each layer already factorized, it computes the singular
values of its weight matrix and the ranks that keep 90/95/99% of the spectral
energy (the sum of squared singular values), with the parameters each rank
would cost; a layer holding a weight matrix that `factorize` would keep gets a
row with the reason its report gives. `format_table` prints that as the table
of `keras-factorized inspect`; `plot_spectra` draws the normalised spectra and
cumulative energy curves into a PNG (both through `keras_factorized.reporting`).

How each layer becomes a matrix (the registry rule's `matrix`):

- `Embedding`: the `input_dim x output_dim` table.
- `Dense`: the `input_dim x units` kernel.
- `EinsumDense`: the kernel matricized as (kernel axes contracted with the
  input) x (kernel axes that reach the output), the matrix that a
  `LowRankEinsumDense` factorizes. Kernels with an axis shared by input and
  output (a batch of matrices) are kept.
- Factorized layers: the product `A @ B` of their factors (`layer.factors()`).
  Its spectrum is computed from the factors without forming the product: with
  `A = Q_a R_a` and `B^T = Q_b R_b`, `A @ B = Q_a (R_a R_b^T) Q_b^T`, so the
  singular values are those of the small `r x r` matrix `R_a R_b^T`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_factorized import decomposition

ENERGY_LEVELS = (0.90, 0.95, 0.99)


def matricize_einsum_kernel(kernel: np.ndarray, equation: str) -> np.ndarray | None:
    """The `EinsumDense` kernel as an (input axes) x (output axes) matrix.

    The matrix that a `LowRankEinsumDense` factorizes (its
    `EinsumFactorization`).

    Args:
        kernel: the kernel, a NumPy array.
        equation: the layer's einsum equation, e.g. `"abc,cde->abde"`.

    Returns:
        A 2-D array, or `None` when the kernel is not one matrix (an axis is
        shared by input and output).

    Example:

    >>> k = np.zeros((8, 2, 4))
    >>> matricize_einsum_kernel(k, "abc,cde->abde").shape
    (8, 8)
    """
    from keras_factorized.layers.einsum_shapes import EinsumFactorization

    try:
        factorization = EinsumFactorization(equation)
    except ValueError:
        return None
    return factorization.to_matrix(np.asarray(kernel))


def factor_singular_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Singular values of `a @ b` from the factors, without forming the product.

    Args:
        a: `(m, r)` left factor.
        b: `(r, n)` right factor.

    Returns:
        The `min(m, n, r)` largest singular values of `a @ b`, decreasing (the
        others are zero).

    Example:

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(50, 4)), rng.normal(size=(4, 30))
    >>> bool(np.allclose(factor_singular_values(a, b),
    ...                  np.linalg.svd(a @ b, compute_uv=False)[:4]))
    True
    """
    _, r_a = np.linalg.qr(np.asarray(a, dtype=np.float64))
    _, r_b = np.linalg.qr(np.asarray(b, dtype=np.float64).T)
    s = np.linalg.svd(r_a @ r_b.T, compute_uv=False)
    return s[: min(a.shape[0], b.shape[1], a.shape[1])]


def singular_values(matrix) -> np.ndarray:
    """All singular values of a matrix, decreasing, without singular vectors.

    Computed as the square roots of the eigenvalues of the Gram matrix of the
    smaller side, in float64 (`scipy.linalg.eigvalsh`): several times faster
    than an SVD, and exact to about `1e-13 * s_1`, far below what energies and
    plots resolve.

    Args:
        matrix: a 2-D array.

    Returns:
        A float64 array of the `min(m, n)` singular values.

    Example:

    >>> m = np.random.default_rng(0).normal(size=(200, 30))
    >>> bool(np.allclose(singular_values(m), np.linalg.svd(m, compute_uv=False)))
    True
    """
    import scipy.linalg

    m = np.asarray(matrix, dtype=np.float64)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    eigenvalues = scipy.linalg.eigvalsh(gram, overwrite_a=True, check_finite=False)
    return np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))


def model_layers(model) -> list[tuple]:
    """`(parent, step, layer, path)` for every layer reachable from `model`.

    The walker `factorize` uses (`keras_factorized.surgery.walk`): it also
    reaches layers held in attributes of other layers (the attention
    projections of a KerasHub `TransformerEncoder`).
    """
    from keras_factorized.surgery import walk

    return list(walk.walk(model))


def describe_factorizable() -> str:
    """The layer classes the registry factorizes, for help texts.

    Example:

    >>> describe_factorizable()
    'Dense, EinsumDense and Embedding layers'
    """
    from keras_factorized import registry

    names = sorted({rule.source.__name__ for rule in registry.rules()})
    text = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
    return f"{text} layers"


def _itemsize(dtype) -> int:
    """Bytes per element of a variable dtype (`"int8"`: 1, `"bfloat16"`: 2...)."""
    name = str(getattr(dtype, "name", dtype))
    try:
        return np.dtype(name).itemsize
    except TypeError:  # bfloat16, float8_* without ml_dtypes registered
        bits = "".join(ch for ch in name.split("_")[0] if ch.isdigit())
        return max(1, int(bits) // 8) if bits else 4


def stored_bytes(layer) -> int:
    """Bytes of the variables a layer or model stores, each at its own dtype.

    Counts every variable once (weights, biases, quantization scales,
    non-trainable state such as normalization statistics): an int8 kernel
    counts 1 byte per entry, a float32 one 4, a bfloat16 one 2.

    Example:

    >>> import keras
    >>> dense = keras.layers.Dense(4)
    >>> dense.build((None, 8))
    >>> stored_bytes(dense)  # (8 * 4 + 4) float32 values
    144
    """
    seen, total = set(), 0
    for variable in layer.weights:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        total += int(np.prod(variable.shape)) * _itemsize(variable.dtype)
    return total


def kept_reason(parent, step, layer) -> str | None:
    """Why `factorize` would keep `layer`, in the words of its report, or None.

    `None` for a layer `factorize` would replace, for an already factorized
    layer and for a layer without a weight matrix.
    """
    from keras_factorized import registry
    from keras_factorized.surgery import selection

    if registry.is_factorized(layer):
        return None
    decision = registry.lookup(layer)
    if decision.rule is None and decision.reason is None:
        return None
    return selection.why_kept(parent, step, decision)


def _spectrum_row(layer) -> dict[str, Any] | None:
    """Shape, stored rank, matrix parameters and singular values of one layer."""
    from keras_factorized import registry

    if registry.is_factorized(layer):
        a, b = (np.asarray(f, np.float64) for f in layer.factors())
        return {
            "shape": (int(a.shape[0]), int(b.shape[1])),
            "rank": int(a.shape[1]),
            "params": int(a.size + b.size),
            "singular_values": factor_singular_values(a, b),
        }
    rule = registry.lookup(layer).rule
    if rule is None:
        return None
    matrix = np.asarray(rule.matrix(layer), np.float64)
    if matrix.ndim != 2 or min(matrix.shape) == 0:
        return None
    return {
        "shape": (int(matrix.shape[0]), int(matrix.shape[1])),
        "rank": None,
        "params": int(matrix.size),
        "singular_values": singular_values(matrix),
    }


def _kept_row(layer, reason: str) -> dict[str, Any]:
    weight = getattr(layer, "kernel", None)
    if weight is None:
        weight = getattr(layer, "embeddings", None)
    shape = () if weight is None else tuple(int(d) for d in weight.shape)
    return {
        "shape": shape, "rank": None, "max_rank": None,
        "params": int(np.prod(shape)) if shape else 0,
        "singular_values": np.zeros(0), "energy": np.zeros(0), "levels": [],
        "note": reason,
    }


def _levels(shape, params, singular_values, energies):
    levels = []
    for energy in energies:
        rank = min(
            decomposition.rank_for_energy(singular_values, energy), int(min(shape))
        )
        cost = decomposition.factorized_param_count(shape, rank)
        levels.append(
            {
                "energy": float(energy),
                "rank": int(rank),
                "params": int(cost),
                "saving": 1.0 - cost / params if params else 0.0,
            }
        )
    return levels


def _analysed_row(info, energies) -> dict[str, Any]:
    s = info["singular_values"]
    sq = np.square(s)
    total = float(np.sum(sq))
    return {
        **info,
        "max_rank": int(min(info["shape"])),
        "energy": np.cumsum(sq) / total if total > 0 else np.ones_like(s),
        "levels": _levels(info["shape"], info["params"], s, energies),
        "note": None,
    }


_ROW_KEYS = (
    "path", "class_name", "shape", "rank", "max_rank", "params", "bytes",
    "singular_values", "energy", "levels", "note",
)


def inspect_model(
    model,
    energies: Sequence[float] = ENERGY_LEVELS,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Spectral analysis of every factorizable or factorized layer of a model.

    The layers are those of the registry (`keras_factorized.registry`), found
    by the walker `factorize` uses: a layer that `factorize` would replace is
    analysed through its weight matrix, an already factorized layer through
    the product of its factors, and a layer holding a weight matrix that
    `factorize` would keep (a `ReversibleEmbedding`, a quantized layer...)
    gets a row with no spectrum and the reason `factorize`'s report gives.

    Args:
        model: a built Keras model (a layer with sublayers works too).
        energies: the energy fractions, each in `(0, 1]`, at which to report
            the rank that keeps them.
        progress: optional callback `progress(done, total, path)` called after
            each layer (the CLI passes a progress bar).

    Returns:
        A list of dicts, one per layer, in the order of `model`'s layers:
        `path`, `class_name`, `shape` (the `(m, n)` matrix), `rank` (stored rank
        of a factorized layer, else `None`), `max_rank` (`min(m, n)`),
        `params` (weights stored for the matrix: `m * n`, or `(m + n) * rank`
        for a factorized layer), `bytes` (of all the layer's variables, bias
        and quantization scales included, each at its dtype: see
        `stored_bytes`), `singular_values` (NumPy array, decreasing),
        `energy` (cumulative energy fraction at each rank), `levels`: one
        dict per energy with `energy`, `rank` (the fewest singular values
        keeping it), `params` (`(m + n) * rank`, the cost of factors of that
        rank) and `saving` (`1 - params_at_rank / params`; negative when
        factors of that rank would be larger than what the layer stores), and
        `note`: `None`, or why `factorize` keeps the layer (then `levels` is
        empty and `shape` is that of the stored weight).

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    >>> rows = inspect_model(model)
    >>> rows[0]["shape"], rows[0]["max_rank"], len(rows[0]["levels"])
    ((16, 8), 8, 3)
    """
    for energy in energies:
        decomposition.rank_for_energy(np.ones(1), energy)  # validates
    layers = model_layers(model)
    rows = []
    for done, (parent, step, layer, _) in enumerate(layers, start=1):
        reason = kept_reason(parent, step, layer)
        if reason is not None:
            row = _kept_row(layer, reason)
        else:
            info = _spectrum_row(layer)
            row = None if info is None else _analysed_row(info, energies)
        if row is not None:
            row.update(
                path=layer.path or layer.name,
                class_name=type(layer).__name__,
                bytes=stored_bytes(layer),
            )
            rows.append({key: row[key] for key in _ROW_KEYS})
        if progress is not None:
            progress(done, len(layers), layer.path or layer.name)
    return rows


def summary_levels(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Totals over `rows` when every layer is cut at each energy level.

    A layer whose factors at that level would be larger than what it stores,
    and a layer `factorize` keeps (a row with a `note`), is counted as kept as
    it is.

    Returns:
        One dict per energy level: `energy`, `params` (total after cutting),
        `saving` (fraction of the total matrix parameters saved).
    """
    analysed = [row for row in rows if row["levels"]]
    if not analysed:
        return []
    total = sum(row["params"] for row in rows)
    out = []
    for i, level in enumerate(analysed[0]["levels"]):
        kept = sum(
            min(row["levels"][i]["params"], row["params"]) if row["levels"] else row["params"]
            for row in rows
        )
        out.append(
            {
                "energy": level["energy"],
                "params": int(kept),
                "saving": 1.0 - kept / total if total else 0.0,
            }
        )
    return out


def _shape_text(row) -> str:
    text = "x".join(str(d) for d in row["shape"])
    if row["rank"] is not None:
        text += f" r={row['rank']}"
    return text


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of `inspect_model` as a plain-text table with a total line.

    Each energy column shows the rank that keeps that energy and, in
    brackets, the parameter saving of factors of that rank against what the
    layer stores now. Layers `factorize` would keep show why instead, and
    count as kept whole in the total.
    """
    from keras_factorized import reporting

    if not rows:
        return "No factorizable or factorized layer found."
    totals = summary_levels(rows)
    headers = ["layer", "type", "matrix", "params", "bytes"] + [
        f"rank@{t['energy']:.0%} (saving)" for t in totals
    ]
    body = []
    for row in rows:
        cells = [row["path"], row["class_name"], _shape_text(row), row["params"], row["bytes"]]
        if row["levels"]:
            cells += [f"{lv['rank']} ({lv['saving']:+.0%})" for lv in row["levels"]]
        else:
            cells += ["-"] * len(totals)
        body.append(cells)
    left = [0, 1, 2]
    if any(row["note"] for row in rows):
        headers.append("note")
        left.append(len(headers) - 1)
        for cells, row in zip(body, rows):
            cells.append(row["note"] or "")
    footer = ["total", "", "", sum(r["params"] for r in rows), sum(r["bytes"] for r in rows)]
    footer += [f"{t['params']:,} ({t['saving']:+.0%})" for t in totals]
    footer += [""] * (len(headers) - len(footer))
    return reporting.format_table(headers, body, footer=footer, left=left)


def to_jsonable(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`inspect_model` rows with NumPy arrays turned into lists (for JSON)."""
    out = []
    for row in rows:
        item = dict(row)
        item["shape"] = list(row["shape"])
        item["singular_values"] = [float(v) for v in row["singular_values"]]
        item["energy"] = [float(v) for v in row["energy"]]
        out.append(item)
    return out


def plot_spectra(
    rows: Sequence[dict[str, Any]],
    path: str,
    title: str | None = None,
    max_legend: int = 20,
) -> str:
    """Draws normalised singular-value spectra and cumulative energy to a PNG.

    Left panel: `s_i / s_1` against `i` (log scale). Right panel: the fraction
    of spectral energy kept by the first `i` singular values, with the
    levels of the rows marked. Rows of kept layers (no spectrum) are left
    out. The file is written to a temporary path in the same folder and
    renamed into place.

    Args:
        rows: the output of `inspect_model`.
        path: where to write the PNG.
        title: the figure title.
        max_legend: the legend lists at most this many layers.

    Returns:
        `path`.
    """
    from matplotlib import colormaps

    from keras_factorized import reporting

    rows = [row for row in rows if row["levels"]]
    cmap = colormaps["viridis" if len(rows) > 10 else "tab10"]
    spectra, energies = [], []
    for i, row in enumerate(rows):
        color = cmap(i / max(1, len(rows) - 1)) if len(rows) > 10 else cmap(i)
        s = np.asarray(row["singular_values"], dtype=np.float64)
        ranks = np.arange(1, s.shape[0] + 1)
        top = s[0] if s.size and s[0] > 0 else 1.0
        style = "o-" if s.shape[0] < 3 else "-"
        spectra.append({"x": ranks, "y": np.maximum(s / top, 1e-12), "style": style,
                        "color": color, "label": f"{row['path']} ({_shape_text(row)})"})
        energies.append({"x": ranks, "y": row["energy"], "style": style, "color": color})
    levels = [{"y": lv["energy"]} for lv in rows[0]["levels"]] if rows else []
    with reporting.figure(path, panels=2, size=(12, 4.8), title=title) as (ax_s, ax_e):
        reporting.draw_series(
            ax_s, spectra, xlabel="index i", ylabel="s_i / s_1",
            title="Normalised singular values", yscale="log",
            legend=len(rows) <= max_legend,
        )
        reporting.draw_series(
            ax_e, energies, xlabel="rank k", ylabel="energy kept (sum of s_i^2, i <= k)",
            title="Cumulative spectral energy", xscale="log", hlines=levels,
        )
        ax_e.set_ylim(0, 1.02)
    return path
