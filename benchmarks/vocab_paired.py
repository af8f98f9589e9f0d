"""Large vocabularies: step-time ratios from interleaved steps in one process.

`vocab_benchmark` trains each model in its own process (needed for its peak
memory), so on a shared machine its speed ratios also hold the change of load
between two processes. Here each group of models (built by
`vocab_benchmark.build_model`) lives in one process and their training steps
run round-robin (A, B, C, A, B, C, ...): a change of load hits them alike, and
each ratio is the median over rounds of that round's ratio. Groups:

- `speed`, per backend: `Embedding` and `FactorizedEmbedding(rank=16)`, 1M x
  128, Adam (the goals of issue 13: >= 7x on TensorFlow, >= 6x on JAX), and
  the same two with `LazyAdam` on TensorFlow;
- `lazy`, TensorFlow: rank 16 with `LazyAdam` at 100k, 1M and 3M rows (goal:
  the 1M-row step within 1.5x of the 100k-row step), and with Adam at 1M.

Writes the `vocab-paired` section of BENCHMARKS.md and
`benchmarks/out/vocab_paired.json`.

    python -m benchmarks.vocab_paired
    python -m benchmarks.vocab_paired --tiny --no-write
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchmarks import _common
from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json
from benchmarks.vocab_benchmark import SPEED_GOALS
from benchmarks.vocab_benchmark import config

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
LAZY_GOAL = 1.5  # 1M-row LazyAdam step / 100k-row step, at most


def _label(cfg) -> str:
    table = "Embedding" if not cfg["rank"] else f"rank {cfg['rank']}"
    return f"{table} {cfg['rows'] // 1000:,}k {cfg['optimizer']}"


def default_groups(rounds=15) -> list[dict]:
    """The groups of `python -m benchmarks.vocab_paired`, with their ratios."""
    def c(backend, rows, rank, optimizer):
        return config(backend, rows, rank=rank, optimizer=optimizer)

    groups = []
    for backend in ("tensorflow", "jax"):
        models = [c(backend, 1_000_000, 0, "adam"), c(backend, 1_000_000, 16, "adam")]
        ratios = [("speedup, Adam", 0, 1)]
        if backend == "tensorflow":
            models += [c(backend, 1_000_000, 0, "lazy_adam"),
                       c(backend, 1_000_000, 16, "lazy_adam")]
            ratios += [("speedup, LazyAdam", 2, 3), ("Embedding: Adam / LazyAdam", 0, 2),
                       ("rank 16: Adam / LazyAdam", 1, 3),
                       ("Embedding Adam / rank 16 LazyAdam", 0, 3)]
        groups.append({"name": f"speed-{backend}", "backend": backend, "models": models,
                       "ratios": ratios, "rounds": rounds})
    lazy = [c("tensorflow", rows, 16, "lazy_adam") for rows in (100_000, 1_000_000, 3_000_000)]
    lazy.append(c("tensorflow", 1_000_000, 16, "adam"))
    groups.append({"name": "lazy-tensorflow", "backend": "tensorflow", "models": lazy,
                   "ratios": [("1M / 100k rows, LazyAdam", 1, 0),
                              ("3M / 100k rows, LazyAdam", 2, 0),
                              ("1M rows: Adam / LazyAdam", 3, 1)],
                   "rounds": rounds})
    return groups


def tiny_groups(backend) -> list[dict]:
    """Toy sizes for the smoke test (seconds; figures meaningless)."""
    def c(rows, rank, optimizer):
        return config(backend, rows, dim=16, rank=rank, optimizer=optimizer, batch=8,
                      length=4)

    return [{"name": f"tiny-{backend}", "backend": backend,
             "models": [c(2000, 0, "adam"), c(2000, 4, "adam"), c(4000, 4, "lazy_adam")],
             "ratios": [("speedup, Adam", 0, 1), ("rows 4000 lazy / 2000 Adam", 2, 1)],
             "rounds": 3}]


def measure_group(group) -> dict:
    """Builds the group's models in this process and times them round-robin."""
    import keras

    from benchmarks.vocab_benchmark import build_model

    if keras.backend.backend() != group["backend"]:
        raise ValueError(
            f"Received an invalid value for `backend`, expected the running Keras "
            f"backend {keras.backend.backend()!r}. Received: backend={group['backend']!r}"
        )
    built = []
    for cfg in group["models"]:
        model, x, y = build_model(cfg)
        for _ in range(2):  # tracing, compilation, first-touch of the tables
            model.train_on_batch(x, y)
        built.append((model, x, y))
    seconds = [[] for _ in built]
    for _ in range(group["rounds"]):
        for i, (model, x, y) in enumerate(built):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            seconds[i].append(time.perf_counter() - start)
    ratios = []
    for name, a, b in group["ratios"]:
        per_round = [ta / tb for ta, tb in zip(seconds[a], seconds[b])]
        ratios.append({"name": name, "numerator": _label(group["models"][a]),
                       "denominator": _label(group["models"][b]),
                       "median": statistics.median(per_round),
                       "low": min(per_round), "high": max(per_round)})
    return {**group, "ratios": ratios, "load_average": _common.load_average(),
            "models": [{**cfg, "step_seconds": statistics.median(s), "seconds": s}
                       for cfg, s in zip(group["models"], seconds)]}


def run_isolated(group, timeout=3600) -> dict:
    """`measure_group(group)` in a fresh process on the group's backend."""
    return _common.run_worker("benchmarks.vocab_paired", group, timeout)


def goals(groups) -> list[list[str]]:
    out = []
    for g in groups:
        for r in g.get("ratios", []):
            if not isinstance(r, dict):
                continue
            if r["name"] == "speedup, Adam" and g["name"].startswith("speed-"):
                goal = SPEED_GOALS[g["backend"]]
                out.append([f"{g['backend']}: 1M x 128 rank 16 step vs `Embedding`, Adam",
                            f">= {goal:g}x", f"{r['median']:.1f}x",
                            _common.goal(r["median"] >= goal)])
            if r["name"] == "1M / 100k rows, LazyAdam":
                out.append(["tensorflow: `LazyAdam` rank 16, 1M-row step / 100k-row step",
                            f"<= {LAZY_GOAL:g}x", f"{r['median']:.2f}x",
                            _common.goal(r["median"] <= LAZY_GOAL)])
    return out


def markdown(groups, command, load) -> str:
    lines = [
        "## Large vocabularies: interleaved step-time ratios",
        "",
        f"Command: `{command}`  ",
        f"Load average {load} at the start (2 shared cores). Each group's models are "
        "built in one process and their `train_on_batch` steps run round-robin; a "
        "ratio is the median over rounds of that round's ratio (min-max across rounds "
        "beside it), so the load between processes does not enter it. Batch 256 x 64 "
        "ids, dim 128, the `lookup` model of the `vocab` section. `lazy_adam` is "
        "`keras_factorized.LazyAdam` (row-sparse updates of the `IndexedSlices` "
        "gradient on TensorFlow).",
        "",
    ]
    goal_rows = goals(groups)
    if goal_rows:
        lines += [markdown_table(["what", "goal", "measured", "status"], goal_rows), ""]
    rows = []
    for g in groups:
        if "error" in g:
            rows.append([g["name"], "failed: " + " ".join(g["error"]), "", "", ""])
            continue
        for r in g["ratios"]:
            rows.append([g["name"], r["name"], f"{r['numerator']} / {r['denominator']}",
                         f"{r['median']:.2f}x", f"{r['low']:.2f}-{r['high']:.2f}x"])
    lines += [markdown_table(["group", "ratio", "steps", "median", "range"], rows), ""]
    step_rows = [[g["name"], _label(m), f"{m['step_seconds'] * 1e3:.1f} ms"]
                 for g in groups if "error" not in g for m in g["models"]]
    lines += ["Median step of each model in its group:", "",
              markdown_table(["group", "model", "step"], step_rows)]
    return "\n".join(lines)


def run(groups=None, tiny=False, isolate=True, write=True, json_path=None, command=None,
        verbose=True) -> dict:
    """Runs the groups (default: `default_groups()`); returns and writes the results."""
    import keras

    load = _common.load_average()
    if groups is None:
        groups = tiny_groups(keras.backend.backend()) if tiny else default_groups()
    results = []
    for group in groups:
        start = time.perf_counter()
        result = run_isolated(group) if isolate else measure_group(group)
        results.append(result)
        if verbose:
            done = ("failed: " + " ".join(result["error"]) if "error" in result else
                    ", ".join(f"{r['name']} {r['median']:.2f}x" for r in result["ratios"]))
            print(f"  {group['name']}: {done} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    command = command or "python -m benchmarks.vocab_paired"
    text = markdown(results, command, load)
    if write:
        update_section("vocab-paired", text)
        json_path = json_path or os.path.join(OUT_DIR, "vocab_paired.json")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        write_json(json_path, {"groups": results, "load_average": load, "command": command})
    return {"groups": results, "load_average": load, "command": command, "markdown": text}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes, in-process")
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds per group")
    parser.add_argument("--only", default=None,
                        help="comma-separated group names (speed-tensorflow, speed-jax, "
                             "lazy-tensorflow)")
    _common.add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if _common.serve_worker(args, measure_group):
        return
    if args.rounds < 1:
        parser.error(f"Received an invalid value for `--rounds`, expected an integer >= 1. "
                     f"Received: --rounds={args.rounds}")
    groups = None if args.tiny else default_groups(args.rounds)
    if args.only and groups is not None:
        names = set(args.only.split(","))
        unknown = names - {g["name"] for g in groups}
        if unknown:
            parser.error(f"Received an invalid value for `--only`, expected names among "
                         f"{','.join(g['name'] for g in groups)}. Received: --only={args.only}")
        groups = [g for g in groups if g["name"] in names]
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    result = run(groups=groups, tiny=args.tiny, isolate=not args.tiny,
                 write=not args.no_write, json_path=args.json,
                 command=f"python -m benchmarks.vocab_paired {argv_text}".strip())
    if args.no_write:
        print(result["markdown"])


if __name__ == "__main__":
    main()
