"""Singular-value spectra of a model's weight matrices: look before you cut.

`inspect_model` walks a Keras model (nested models and layers included) and,
for every `Embedding`, `Dense` and `EinsumDense` layer and every layer that is
already factorized (`FactorizedEmbedding`, `LowRankDense`,
`LowRankEinsumDense`), computes the singular values of its weight matrix and
the ranks that keep 90/95/99% of the spectral energy (the sum of squared
singular values), with the parameters each rank would cost. `format_table`
prints that as the table of `keras-factorized inspect`; `plot_spectra` draws
the normalised spectra and cumulative energy curves into a PNG.

How each layer becomes a matrix:

- `Embedding`: the `input_dim x output_dim` table.
- `Dense`: the `input_dim x units` kernel.
- `EinsumDense`: the kernel matricized as (kernel axes contracted with the
  input) x (kernel axes that reach the output), the matrix that a
  `LowRankEinsumDense` factorizes. Kernels with an axis shared by input and
  output (a batch of matrices) are skipped.
- Factorized layers: the product `A @ B` of their factors. Its spectrum is
  computed from the factors without forming the product: with `A = Q_a R_a`
  and `B^T = Q_b R_b`, `A @ B = Q_a (R_a R_b^T) Q_b^T`, so the singular values
  are those of the small `r x r` matrix `R_a R_b^T`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

from keras_factorized import decomposition
from keras_factorized.atomic_io import atomic_output

ENERGY_LEVELS = (0.90, 0.95, 0.99)

_FACTOR_ATTRS = (("embeddings_a", "embeddings_b"), ("kernel_a", "kernel_b"))


def _numpy(variable) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)


def _einsum_split(equation: str, kernel_ndim: int):
    """Kernel axes contracted with the input, and kernel axes of the output.

    Returns `None` when some kernel axis is in both input and output (a batch
    of matrices, not one matrix).
    """
    lhs, output = equation.replace(" ", "").split("->")
    inputs, kernel = lhs.split(",")
    if len(kernel) != kernel_ndim:
        return None
    in_axes, out_axes = [], []
    for axis, letter in enumerate(kernel):
        in_input, in_output = letter in inputs, letter in output
        if in_input and in_output:
            return None
        (in_axes if in_input else out_axes).append(axis)
    if not in_axes or not out_axes:
        return None
    return in_axes, out_axes


def matricize_einsum_kernel(kernel: np.ndarray, equation: str) -> np.ndarray | None:
    """The `EinsumDense` kernel as an (input axes) x (output axes) matrix.

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
    split = _einsum_split(equation, kernel.ndim)
    if split is None:
        return None
    in_axes, out_axes = split
    moved = np.transpose(kernel, in_axes + out_axes)
    rows = int(np.prod([kernel.shape[a] for a in in_axes]))
    return moved.reshape(rows, -1)


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


def _layer_path(layer) -> str:
    return getattr(layer, "path", None) or layer.name


def _factors(layer):
    for attr_a, attr_b in _FACTOR_ATTRS:
        if hasattr(layer, attr_a) and hasattr(layer, attr_b):
            try:
                a, b = getattr(layer, attr_a), getattr(layer, attr_b)
            except (AttributeError, ValueError):
                return None
            if a is None or b is None:
                return None
            a, b = _numpy(a), _numpy(b)
            rank = a.shape[-1]
            # Einsum factors keep their axes: (input axes..., r), (r, output axes...).
            return a.reshape(-1, rank), b.reshape(rank, -1)
    return None


def layer_spectrum(layer) -> dict[str, Any] | None:
    """The matrix of one layer and its singular values, or `None` if it has none.

    Args:
        layer: a built Keras layer.

    Returns:
        A dict with `class_name`, `shape` (the `(m, n)` matrix shape),
        `rank` (the stored rank of a factorized layer, else `None`), `params`
        (weights the layer stores for that matrix) and `singular_values`
        (decreasing, float64), or `None` for a layer that is not an
        Embedding/Dense/EinsumDense or a factorized layer, or not built.
    """
    import keras

    if not layer.built:
        return None
    class_name = type(layer).__name__
    factors = _factors(layer)
    if factors is not None:
        a, b = factors
        s = factor_singular_values(a, b)
        return {
            "class_name": class_name,
            "shape": (int(a.shape[0]), int(b.shape[1])),
            "rank": int(a.shape[1]),
            "params": int(a.size + b.size),
            "singular_values": s,
        }
    if isinstance(layer, keras.layers.Embedding):
        matrix = _numpy(layer.embeddings)
    elif isinstance(layer, keras.layers.Dense):
        matrix = _numpy(layer.kernel)
    elif isinstance(layer, keras.layers.EinsumDense):
        matrix = matricize_einsum_kernel(_numpy(layer.kernel), layer.equation)
        if matrix is None:
            return None
    else:
        return None
    if matrix.ndim != 2 or min(matrix.shape) == 0:
        return None
    s = singular_values(matrix)
    return {
        "class_name": class_name,
        "shape": (int(matrix.shape[0]), int(matrix.shape[1])),
        "rank": None,
        "params": int(matrix.size),
        "singular_values": np.asarray(s, dtype=np.float64),
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


def iter_matrix_layers(model) -> Iterable:
    """Every layer of `model` (nested ones included), each once, in order."""
    return model._flatten_layers(include_self=False, recursive=True)


def model_layers(model) -> list:
    """The layers `inspect_model` looks at, in order (for a progress bar's length)."""
    return list(iter_matrix_layers(model))


def describe_factorizable() -> str:
    """Which layers `inspect_model` analyses, for help texts."""
    return "Embedding, Dense and EinsumDense layers"


def inspect_model(
    model,
    energies: Sequence[float] = ENERGY_LEVELS,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Spectral analysis of every factorizable or factorized layer of a model.

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
        for a factorized layer), `singular_values` (NumPy array, decreasing),
        `energy` (cumulative energy fraction at each rank) and `levels`: one
        dict per energy with `energy`, `rank` (the fewest singular values
        keeping it), `params` (`(m + n) * rank`, the cost of factors of that
        rank) and `saving` (`1 - params_at_rank / params`; negative when
        factors of that rank would be larger than what the layer stores).

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    >>> rows = inspect_model(model)
    >>> rows[0]["shape"], rows[0]["max_rank"], len(rows[0]["levels"])
    ((16, 8), 8, 3)
    """
    for energy in energies:
        decomposition.rank_for_energy(np.ones(1), energy)  # validates
    layers = list(iter_matrix_layers(model))
    rows = []
    for done, layer in enumerate(layers, start=1):
        info = layer_spectrum(layer)
        if info is not None:
            s = info["singular_values"]
            sq = np.square(s)
            total = float(np.sum(sq))
            info["energy"] = np.cumsum(sq) / total if total > 0 else np.ones_like(s)
            info["path"] = _layer_path(layer)
            info["max_rank"] = int(min(info["shape"]))
            info["levels"] = _levels(info["shape"], info["params"], s, energies)
            rows.append(
                {
                    key: info[key]
                    for key in (
                        "path", "class_name", "shape", "rank", "max_rank", "params",
                        "singular_values", "energy", "levels",
                    )
                }
            )
        if progress is not None:
            progress(done, len(layers), _layer_path(layer))
    return rows


def summary_levels(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Totals over `rows` when every layer is cut at each energy level.

    A layer whose factors at that level would be larger than what it stores is
    counted as kept as it is (nobody would factorize it).

    Returns:
        One dict per energy level: `energy`, `params` (total after cutting),
        `saving` (fraction of the total matrix parameters saved).
    """
    if not rows:
        return []
    total = sum(row["params"] for row in rows)
    out = []
    for i, level in enumerate(rows[0]["levels"]):
        kept = sum(min(row["levels"][i]["params"], row["params"]) for row in rows)
        out.append(
            {
                "energy": level["energy"],
                "params": int(kept),
                "saving": 1.0 - kept / total if total else 0.0,
            }
        )
    return out


def _shape_text(row) -> str:
    m, n = row["shape"]
    text = f"{m}x{n}"
    if row["rank"] is not None:
        text += f" r={row['rank']}"
    return text


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of `inspect_model` as a plain-text table with a total line.

    Each energy column shows the rank that keeps that energy and, in
    brackets, the parameter saving of factors of that rank against what the
    layer stores now.
    """
    if not rows:
        return "No Embedding, Dense, EinsumDense or factorized layer found."
    energies = [level["energy"] for level in rows[0]["levels"]]
    headers = ["layer", "type", "matrix", "params"] + [
        f"rank@{e:.0%} (saving)" for e in energies
    ]
    body = []
    for row in rows:
        body.append(
            [row["path"], row["class_name"], _shape_text(row), f"{row['params']:,}"]
            + [f"{lv['rank']} ({lv['saving']:+.0%})" for lv in row["levels"]]
        )
    totals = summary_levels(rows)
    body.append(
        ["total", "", "", f"{sum(r['params'] for r in rows):,}"]
        + [f"{t['params']:,} ({t['saving']:+.0%})" for t in totals]
    )
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    left = {0, 1, 2}

    def line(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(headers), rule] + [line(r) for r in body[:-1]] + [rule, line(body[-1])]
    return "\n".join(lines)


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


def _atomic_savefig(figure, path: str) -> None:
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_spectra(
    rows: Sequence[dict[str, Any]],
    path: str,
    title: str | None = None,
    max_legend: int = 20,
) -> str:
    """Draws normalised singular-value spectra and cumulative energy to a PNG.

    Left panel: `s_i / s_1` against `i` (log scale). Right panel: the fraction
    of spectral energy kept by the first `i` singular values, with the
    levels of the rows marked. The file is written to a temporary path in the
    same folder and renamed into place.

    Args:
        rows: the output of `inspect_model`.
        path: where to write the PNG.
        title: the figure title.
        max_legend: the legend lists at most this many layers.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(12, 4.8))
    try:
        cmap = plt.get_cmap("viridis" if len(rows) > 10 else "tab10")
        for i, row in enumerate(rows):
            color = cmap(i / max(1, len(rows) - 1)) if len(rows) > 10 else cmap(i)
            s = np.asarray(row["singular_values"], dtype=np.float64)
            ranks = np.arange(1, s.shape[0] + 1)
            top = s[0] if s.size and s[0] > 0 else 1.0
            label = f"{row['path']} ({_shape_text(row)})"
            marker = "o" if s.shape[0] < 3 else None
            ax_s.plot(ranks, np.maximum(s / top, 1e-12), color=color, label=label, marker=marker)
            ax_e.plot(ranks, row["energy"], color=color, marker=marker)
        ax_s.set_yscale("log")
        ax_s.set_xlabel("index i")
        ax_s.set_ylabel("s_i / s_1")
        ax_s.set_title("Normalised singular values")
        if rows:
            for level in rows[0]["levels"]:
                ax_e.axhline(level["energy"], color="gray", linestyle=":", linewidth=1)
        ax_e.set_xscale("log")
        ax_e.set_xlabel("rank k")
        ax_e.set_ylabel("energy kept (sum of s_i^2, i <= k)")
        ax_e.set_ylim(0, 1.02)
        ax_e.set_title("Cumulative spectral energy")
        for ax in (ax_s, ax_e):
            ax.grid(True, which="both", alpha=0.3)
        if 0 < len(rows) <= max_legend:
            fig.legend(
                loc="lower center", ncol=min(3, len(rows)), fontsize="small",
                bbox_to_anchor=(0.5, -0.02 - 0.045 * ((len(rows) + 2) // 3)),
            )
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        _atomic_savefig(fig, path)
    finally:
        plt.close(fig)
    return path
