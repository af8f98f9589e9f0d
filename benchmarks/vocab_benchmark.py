"""Large vocabularies: `FactorizedEmbedding` against `Embedding` at 100k-10M rows.

Trains one model per process (so that the process's peak resident memory is
that model's) on random ids, on the TensorFlow and on the JAX backend (each run
in its own subprocess with `KERAS_BACKEND` set), and records the median time of
a training step (`train_on_batch`) and the peak RSS. Two models:

- `lookup`: ids (batch 256 x 64) -> embedding -> mean over the ids ->
  `Dense(1)`, binary cross-entropy: the cost of the table itself;
- `two_tower`: a retrieval model: a user tower (mean of the embeddings of 64
  items of the user's history, then `Dense(128, relu)`, `Dense(64)`) and an item
  tower (the embedding of one candidate item, then `Dense(64)`) sharing the
  item table, trained with the in-batch softmax (each user's positive item
  against the batch's other items).

Besides the measured runs, a memory table gives the bytes per row of weights
plus optimizer state (Adam keeps two moments per weight, plain SGD none) and
the largest vocabulary whose table fits in 24 GiB, and a factorized table too
large for a full `Embedding` with Adam in 24 GiB (10M x 300) is trained.
Writes the `vocab` section of BENCHMARKS.md, `benchmarks/out/vocab.json` and
the plot `benchmarks/out/vocab_scaling.png`.

    python -m benchmarks --only vocab
    python -m benchmarks.vocab_benchmark --quick --no-write
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

from benchmarks import _common
from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
BACKENDS = ("tensorflow", "jax")
MODELS = ("lookup", "two_tower")
OPTIMIZERS = ("adam", "sgd", "lazy_adam")
GIB = 2**30
MEMORY_BUDGET = 24 * GIB  # the memory of a large consumer GPU
# Issue 13: 1M x 128, rank 16, Adam, training step vs Embedding's.
SPEED_GOALS = {"tensorflow": 7.0, "jax": 6.0}
MEMORY_GOAL = 4.0  # peak training memory, times lower
# Optimizer slots per weight: Adam's two moments; SGD without momentum none.
OPTIMIZER_SLOTS = {"adam": 2, "sgd": 0, "lazy_adam": 2}


def config(backend="tensorflow", rows=1_000_000, dim=128, rank=16, optimizer="adam",
           model="lookup", batch=256, length=64, steps=8, seed=0) -> dict:
    """One measured run; `rank=0` is the full `Embedding`."""
    return dict(backend=backend, rows=rows, dim=dim, rank=rank, optimizer=optimizer,
                model=model, batch=batch, length=length, steps=steps, seed=seed)


def default_grid(quick=False) -> list[dict]:
    """The runs of `python -m benchmarks --only vocab` (both tables of the doc)."""
    steps = 5 if quick else 8
    rows_list = (100_000, 1_000_000) if quick else (100_000, 1_000_000, 3_000_000)
    grid = []
    for backend in BACKENDS:
        # Scaling: Embedding and rank 16, Adam, dim 128.
        for rows in rows_list:
            for rank in (0, 16):
                grid.append(config(backend, rows, rank=rank, steps=steps))
        if quick:
            continue
        # Ranks, dimension 300, SGD and the two-tower model at 1M rows.
        grid += [config(backend, rank=rank, steps=steps) for rank in (8, 32, 64)]
        grid += [config(backend, dim=300, rank=rank, steps=steps) for rank in (0, 16)]
        grid += [config(backend, optimizer="sgd", rank=rank, steps=steps) for rank in (0, 16)]
        grid += [config(backend, model="two_tower", rank=rank, steps=steps) for rank in (0, 16)]
    if not quick:
        # Too large for an Embedding with Adam in 24 GiB; the factorized one trains.
        grid.append(config("tensorflow", rows=10_000_000, dim=300, rank=16, steps=5))
    return grid


def scaling_grid(steps=8) -> list[dict]:
    """100k/1M/3M rows x 128, Adam, `Embedding` and rank 16 on both backends,
    plus `LazyAdam` at rank 16 on TensorFlow (`--scaling`)."""
    rows_list = (100_000, 1_000_000, 3_000_000)
    grid = [config(backend, rows, rank=rank, steps=steps)
            for backend in BACKENDS for rows in rows_list for rank in (0, 16)]
    return grid + [config("tensorflow", rows, rank=16, optimizer="lazy_adam", steps=steps)
                   for rows in rows_list]


def tiny_grid(backend) -> list[dict]:
    """Toy sizes for the smoke tests (seconds, figures meaningless)."""
    return [config(backend, rows=2000, dim=16, rank=rank, optimizer=opt, model=model,
                   batch=8, length=4, steps=2)
            for model in MODELS for opt in ("adam",) for rank in (0, 4)] + [
        config(backend, rows=2000, dim=16, rank=4, optimizer="sgd", batch=8, length=4,
               steps=2)]


# ----------------------------------------------------------------------------
# Memory, from the shapes


def state_bytes_per_row(dim, rank, optimizer) -> int:
    """Bytes per vocabulary row of float32 weights plus optimizer state.

    A full table row holds `dim` weights, a factorized one `rank` (the `rank x
    dim` factor `B` is shared by all rows); each weight has
    `OPTIMIZER_SLOTS[optimizer]` float32 slots besides itself.
    """
    width = rank if rank else dim
    return 4 * width * (1 + OPTIMIZER_SLOTS[optimizer])


def training_bytes(rows, dim, rank, optimizer) -> int:
    """Weights + optimizer state + one dense gradient of the table (Keras 3's
    optimizers densify the embedding's gradient), float32."""
    width = rank if rank else dim
    shared = 0 if not rank else 4 * rank * dim * (2 + OPTIMIZER_SLOTS[optimizer])
    return rows * (state_bytes_per_row(dim, rank, optimizer) + 4 * width) + shared


def memory_rows(dims=(128, 300), ranks=(16, 32), optimizers=("adam", "sgd")) -> list[dict]:
    """The memory table: bytes per row and the largest table in 24 GiB."""
    out = []
    for dim in dims:
        for optimizer in optimizers:
            for rank in (0, *ranks):
                per_row = state_bytes_per_row(dim, rank, optimizer)
                out.append({
                    "dim": dim, "rank": rank, "optimizer": optimizer,
                    "bytes_per_row": per_row,
                    "max_rows_24gib": int(MEMORY_BUDGET // per_row),
                    "bytes_10m_rows": 10_000_000 * per_row,
                })
    return out


# ----------------------------------------------------------------------------
# One run (in its own process)


def _embedding_layer(rows, dim, rank, name="items"):
    import keras

    from keras_factorized import FactorizedEmbedding

    if rank:
        return FactorizedEmbedding(rows, dim, rank, name=name)
    return keras.layers.Embedding(rows, dim, name=name)


def build_model(cfg):
    """The Keras model of one run, and a batch `(x, y)` for it."""
    import keras
    from keras import ops

    keras.utils.set_random_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    batch, length, rows = cfg["batch"], cfg["length"], cfg["rows"]
    table = _embedding_layer(rows, cfg["dim"], cfg["rank"])
    history = keras.Input((length,), dtype="int32", name="ids")
    ids = rng.integers(0, rows, size=(batch, length)).astype("int32")
    pooled = keras.layers.GlobalAveragePooling1D()(table(history))
    if cfg["model"] == "lookup":
        outputs = keras.layers.Dense(1, name="score")(pooled)
        model = keras.Model(history, outputs, name="lookup")
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        x, y = ids, rng.integers(0, 2, size=(batch, 1)).astype("float32")
    elif cfg["model"] == "two_tower":
        item = keras.Input((1,), dtype="int32", name="item")
        user = keras.layers.Dense(128, activation="relu")(pooled)
        user = keras.layers.Dense(64, name="user_vector")(user)
        item_vector = keras.layers.Dense(64, name="item_vector")(
            keras.layers.Flatten()(table(item)))
        # In-batch softmax: row i's positive is column i.
        logits = ops.matmul(user, ops.transpose(item_vector))
        model = keras.Model([history, item], logits, name="two_tower")
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        x = (ids, rng.integers(0, rows, size=(batch, 1)).astype("int32"))
        y = np.arange(batch, dtype="int32")
    else:
        raise ValueError(
            f"Received an invalid value for `model`, expected one of {MODELS}. "
            f"Received: model={cfg['model']!r}"
        )
    model.compile(optimizer=make_optimizer(cfg["optimizer"]), loss=loss)
    return model, x, y


def make_optimizer(name):
    """The optimizer of a run: Adam 1e-3, LazyAdam 1e-3 or SGD 1e-2."""
    import keras

    from keras_factorized import LazyAdam

    if name not in OPTIMIZERS:
        raise ValueError(f"Received an invalid value for `optimizer`, expected one of "
                         f"{OPTIMIZERS}. Received: optimizer={name!r}")
    return {"adam": lambda: keras.optimizers.Adam(1e-3), "lazy_adam": lambda: LazyAdam(1e-3),
            "sgd": lambda: keras.optimizers.SGD(1e-2)}[name]()


def measure(cfg) -> dict:
    """Builds and trains the run's model; step times and peak memory."""
    import keras

    import keras_factorized  # noqa: F401 (its imports count in the baseline)

    if keras.backend.backend() != cfg["backend"]:
        raise ValueError(
            f"Received an invalid value for `backend`, expected the running Keras "
            f"backend {keras.backend.backend()!r}. Received: backend={cfg['backend']!r}"
        )
    # Start the backend's runtime (JAX creates its CPU client on the first
    # array) so that the baseline holds it and the peak above it is the model's.
    keras.ops.convert_to_numpy(keras.ops.add(keras.ops.ones((4,)), 1.0))
    gc.collect()
    baseline = _common.memory_bytes("VmRSS")
    warm = _warm_baseline(cfg)
    reset = _common.reset_peak_memory()
    start = time.perf_counter()
    model, x, y = build_model(cfg)
    build_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model.train_on_batch(x, y)  # tracing and compilation
    first_step = time.perf_counter() - start
    model.train_on_batch(x, y)
    seconds = []
    for _ in range(cfg["steps"]):
        start = time.perf_counter()
        loss = model.train_on_batch(x, y)
        seconds.append(time.perf_counter() - start)
    peak = _common.memory_bytes("VmHWM") if reset else 0
    return {
        **cfg,
        "step_seconds": float(np.median(seconds)),
        "seconds": seconds,
        "first_step_seconds": first_step,
        "build_seconds": build_seconds,
        "loss": float(np.asarray(loss)),
        "params": int(model.count_params()),
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_extra_bytes": max(0, peak - baseline) if peak else None,
        "warm_baseline_rss_bytes": warm,
        "peak_above_warm_bytes": max(0, peak - warm) if peak and warm else None,
        "estimated_training_bytes": training_bytes(
            cfg["rows"], cfg["dim"], cfg["rank"], cfg["optimizer"]),
    }


def _warm_baseline(cfg, rows=1000, steps=3):
    """RSS after training a `rows`-row twin of the run's model in this process.

    What the backend's runtime holds once it has compiled and run a training
    step of this architecture (thread pools, XLA's compiler and caches on
    JAX), without the table: the peak above it is what the vocabulary adds.
    """
    model, x, y = build_model({**cfg, "rows": min(rows, cfg["rows"])})
    for _ in range(steps):
        model.train_on_batch(x, y)
    del model, x, y
    gc.collect()
    return _common.memory_bytes("VmRSS")


def run_isolated(cfg, timeout=1800) -> dict:
    """`measure(cfg)` in a fresh Python process on `cfg["backend"]`."""
    return _common.run_worker("benchmarks.vocab_benchmark", cfg, timeout)


# ----------------------------------------------------------------------------
# Tables, plot, report


def _key(r, **changes):
    keys = ("backend", "rows", "dim", "rank", "optimizer", "model")
    return tuple(changes.get(k, r[k]) for k in keys)


def with_ratios(results) -> list[dict]:
    """Adds each run's speed and memory ratios to its `Embedding` twin."""
    by_key = {_key(r): r for r in results}
    out = []
    for r in results:
        r = dict(r)
        # LazyAdam rows against the `Embedding` trained with Adam when its
        # LazyAdam twin was not run (the comparison that matters to a user).
        base = by_key.get(_key(r, rank=0))
        if base is None and r["optimizer"] == "lazy_adam":
            base = by_key.get(_key(r, rank=0, optimizer="adam"))
        ok = base is not None and "error" not in base and "error" not in r
        r["speedup"] = base["step_seconds"] / r["step_seconds"] if ok else None
        r["memory_ratio"] = (base["peak_extra_bytes"] / r["peak_extra_bytes"]
                             if ok and r.get("peak_extra_bytes") else None)
        r["rss_ratio"] = (base["peak_rss_bytes"] / r["peak_rss_bytes"]
                          if ok and r.get("peak_rss_bytes") else None)
        r["warm_memory_ratio"] = (
            base["peak_above_warm_bytes"] / r["peak_above_warm_bytes"]
            if ok and r.get("peak_above_warm_bytes") and base.get("peak_above_warm_bytes")
            else None)
        out.append(r)
    return out


def _fmt_ratio(value):
    return "" if value is None else f"{value:.1f}x"


def _label(r):
    return "`Embedding`" if not r["rank"] else f"rank {r['rank']}"


def results_table(results) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["backend"], f"{r['rows']:,}", r["dim"], _label(r), r["optimizer"],
                         r["model"], "failed: " + " ".join(r["error"]), "", "", "", "", "",
                         ""])
            continue
        rows.append([
            r["backend"], f"{r['rows']:,}", r["dim"], _label(r), r["optimizer"], r["model"],
            f"{r['step_seconds'] * 1e3:.1f} ms", _fmt_ratio(r["speedup"]),
            _common.fmt_bytes(r["peak_rss_bytes"]),
            _common.fmt_bytes(r["peak_extra_bytes"] or 0), _fmt_ratio(r["memory_ratio"]),
            (_common.fmt_bytes(r["peak_above_warm_bytes"])
             if r.get("peak_above_warm_bytes") is not None else "not measured"),
            _fmt_ratio(r.get("warm_memory_ratio")),
        ])
    return markdown_table(
        ["backend", "rows", "dim", "table", "optimizer", "model", "step", "speedup",
         "peak RSS", "peak above imports", "memory ratio", "peak above warmed process",
         "ratio (warmed)"], rows)


def memory_table() -> str:
    rows = []
    for m in memory_rows():
        fits = m["bytes_10m_rows"] <= MEMORY_BUDGET
        rows.append([
            m["dim"], "`Embedding`" if not m["rank"] else f"rank {m['rank']}",
            m["optimizer"], f"{m['bytes_per_row']:,} B",
            f"{m['max_rows_24gib'] / 1e6:,.1f}M",
            f"{m['bytes_10m_rows'] / GIB:.1f} GiB" + ("" if fits else " (does not fit)"),
        ])
    return markdown_table(
        ["dim", "table", "optimizer", "weights + state per row", "rows in 24 GiB",
         "10M rows"], rows)


def goals(results) -> list[list[str]]:
    """The goals of issue 13 at 1M x 128, rank 16, Adam, `lookup`."""
    out = []
    for r in results:
        if (r["rows"], r["dim"], r["rank"], r["optimizer"], r["model"]) != (
                1_000_000, 128, 16, "adam", "lookup") or r.get("speedup") is None:
            continue
        goal = SPEED_GOALS[r["backend"]]
        out.append([f"{r['backend']}: step vs `Embedding`", f">= {goal:g}x",
                    f"{r['speedup']:.2f}x", _common.goal(r["speedup"] >= goal)])
        if r["memory_ratio"] is not None:
            out.append([f"{r['backend']}: peak training memory (above imports)",
                        f">= {MEMORY_GOAL:g}x lower", f"{r['memory_ratio']:.1f}x",
                        _common.goal(r["memory_ratio"] >= MEMORY_GOAL)])
            out.append([f"{r['backend']}: peak process RSS (raw)", "(for reference)",
                        f"{r['rss_ratio']:.1f}x", ""])
        if r.get("warm_memory_ratio") is not None:
            out.append([f"{r['backend']}: peak above a warmed-up process (1,000-row twin "
                        "trained first)", "(for reference)",
                        f"{r['warm_memory_ratio']:.1f}x", ""])
    return out


def plot(results, path) -> str | None:
    """Step time against rows, log-log, per backend; returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    from keras_factorized.atomic_io import write_bytes

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in BACKENDS:
        for rank, style in ((0, "o-"), (16, "s--")):
            pts = sorted((r["rows"], r["step_seconds"] * 1e3) for r in results
                         if r["backend"] == backend and r["rank"] == rank
                         and (r["dim"], r["optimizer"], r["model"]) == (128, "adam", "lookup")
                         and "error" not in r)
            if pts:
                name = "Embedding" if not rank else f"FactorizedEmbedding rank {rank}"
                ax.plot(*zip(*pts), style, label=f"{name} ({backend})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary rows")
    ax.set_ylabel("training step (ms)")
    ax.set_title("Adam, dim 128, batch 256 x 64 ids")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_bytes(path, buffer.getvalue())
    return path


def markdown(results, command, load, plot_path=None) -> str:
    lines = [
        "## Large vocabularies: `FactorizedEmbedding` against `Embedding`",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; load average {load} at the start (shared machine: "
        "each run is a separate process, so the ratios move with the load between runs)",
        "",
        "Median training step (`train_on_batch`, batch 256 x 64 ids) and peak "
        "memory of one model per process: peak RSS, and the peak above the RSS after "
        "importing Keras and the backend (what the model and its training add), "
        "and the peak above the RSS of the same process after it trained a "
        "1,000-row twin of the model (the backend's runtime warmed up, XLA's "
        "compiler loaded on JAX: what the vocabulary adds; the raw figures stay). "
        "`lazy_adam` is `keras_factorized.LazyAdam` (row-sparse updates on "
        "TensorFlow, Adam on JAX). `lookup` is embedding -> mean -> `Dense(1)`; `two_tower` a retrieval model "
        "with an in-batch softmax (see the module docstring). Speedup and memory "
        "ratio are against the `Embedding` run of the same row (for `lazy_adam` rows, "
        "the `Embedding` trained with Adam when no `Embedding` ran with `LazyAdam`).",
        "",
    ]
    goal_rows = goals(results)
    if goal_rows:
        lines += ["Goals (issue 13), 1M x 128, rank 16, Adam:", "",
                  markdown_table(["what", "goal", "measured", "status"], goal_rows), ""]
    lines += [results_table(results), ""]
    if plot_path:
        root = os.path.dirname(os.path.dirname(OUT_DIR))
        lines += [f"Plot of the scaling rows: `{os.path.relpath(plot_path, root)}` (written "
                  "by the command, not kept in the repository).", ""]
    lines += [
        "Weights and optimizer state per vocabulary row (float32; Adam keeps two "
        "moments per weight; training also holds one dense gradient of the table, "
        "since Keras 3's optimizers densify an embedding's gradient). A full "
        "`Embedding` with Adam stops fitting in 24 GiB at the rows shown; the "
        "factorized table of the same vocabulary needs rank / dim of it.",
        "",
        memory_table(),
    ]
    return "\n".join(lines)


def _machine():
    import platform

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, backends in subprocesses")


# ----------------------------------------------------------------------------
# Entry points


def merged(previous, new) -> list[dict]:
    """`previous` results with those of `new` replacing the runs they repeat."""
    keys = {_key(r) for r in new}
    return [r for r in previous if _key(r) not in keys] + list(new)


def run(quick=False, tiny=False, grid=None, isolate=True, write=True, json_path=None,
        plot_path=None, command=None, verbose=True, backends=BACKENDS,
        merge=False) -> dict:
    """Runs the benchmark; returns its results and writes its section.

    Args:
        quick: 100k and 1M rows, Adam, dim 128 only (the scaling table).
        tiny: toy sizes on the running backend, in this process (smoke tests).
        grid: a list of `config(...)` dicts, instead of the default runs.
        isolate: run each config in its own process (needed for peak memory
            and for the other backend).
        write: update the `vocab` section of BENCHMARKS.md.
        json_path: also write the raw results there.
        plot_path: where to write the plot (default `benchmarks/out/`).
        command: the command line quoted in BENCHMARKS.md.
        backends: run only the configs of these backends.
        merge: keep the other runs of the existing JSON (`json_path`, default
            `benchmarks/out/vocab.json`) and replace those run again; the
            section then quotes both commands.
    """
    import keras

    load = _common.load_average()
    if grid is None:
        grid = tiny_grid(keras.backend.backend()) if tiny else default_grid(quick)
        grid = [cfg for cfg in grid if cfg["backend"] in backends]
    results = []
    for cfg in grid:
        start = time.perf_counter()
        result = run_isolated(cfg) if isolate else measure(cfg)
        results.append(result)
        if verbose:
            status = ("failed: " + " ".join(result["error"]) if "error" in result
                      else f"{result['step_seconds'] * 1e3:.1f} ms/step, peak "
                           f"{_common.fmt_bytes(result['peak_rss_bytes'])}")
            print(f"  vocab {cfg['backend']} {cfg['rows']:,} x {cfg['dim']} "
                  f"rank {cfg['rank']} {cfg['optimizer']} {cfg['model']}: {status} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if json_path is None and write and not tiny:
        json_path = os.path.join(OUT_DIR, "vocab.json")
    previous_command = None
    if merge and json_path and os.path.exists(json_path):
        with open(json_path) as f:
            previous = json.load(f)
        results = merged(previous["results"], results)
        previous_command = previous.get("command")
        if not grid:  # --report-only: the runs, commands and load of the JSON
            command, previous_command = previous_command, None
            load = previous.get("load_average", load)
    results = with_ratios(results)
    if plot_path is None and write and not tiny:
        plot_path = os.path.join(OUT_DIR, "vocab_scaling.png")
    if plot_path:
        plot_path = plot(results, plot_path)
    command = command or "python -m benchmarks --only vocab" + (" --quick" if quick else "")
    if previous_command:
        command = f"{previous_command}`, then `{command}"
    text = markdown(results, command, load, plot_path)
    if write:
        update_section("vocab", text)
    result = {"results": results, "memory": memory_rows(), "load_average": load,
              "command": command, "markdown": text}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        write_json(json_path,
                   {k: v for k, v in result.items() if k != "markdown"})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scaling rows only")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, in-process")
    parser.add_argument("--scaling", action="store_true",
                        help="100k/1M/3M rows, Adam (and LazyAdam on TensorFlow), dim 128")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated subset of " + ",".join(BACKENDS))
    parser.add_argument("--merge", action="store_true",
                        help="replace only these runs in the existing JSON and section")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="with --scaling: only the runs with this optimizer")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the section from the existing JSON, running nothing")
    _common.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if _common.serve_worker(args, measure):
        return
    backends = tuple(b for b in args.backends.split(",") if b)
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"Received an invalid value for `--backends`, expected names among "
                     f"{','.join(BACKENDS)}. Received: --backends={args.backends}")
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    grid = None
    if args.report_only:
        grid = []  # the section quotes the commands that ran, from the JSON
    elif args.scaling:
        grid = [cfg for cfg in scaling_grid() if cfg["backend"] in backends
                and args.optimizer in (None, cfg["optimizer"])]
    run(quick=args.quick, tiny=args.tiny, isolate=not args.tiny, grid=grid,
        write=not args.no_write, json_path=args.json, backends=backends,
        merge=args.merge or args.report_only,
        command=f"python -m benchmarks.vocab_benchmark {argv_text}".strip())


if __name__ == "__main__":
    main()
