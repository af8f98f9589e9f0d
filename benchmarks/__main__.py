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

Each benchmark rewrites its own section of BENCHMARKS.md (or of the file named
by $KERAS_FACTORIZED_BENCHMARKS_MD). The whole suite takes about 10 minutes on
2 cores; `--quick` about 3. Speed figures are ratios against a baseline timed
in the same run, so that they hold on a shared machine; run it on an idle one
(and with `nice`) for the best figures:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE nice -n 10 python -m benchmarks

Heavier benchmarks are separate commands (they train models or need the data
in ../shared):

  python -m benchmarks.imdb_benchmark --data ../shared/data/aclImdb_v1.tar.gz
  python -m benchmarks.bert_benchmark
  python -m benchmarks.export_benchmark
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCHMARKS = ("svd", "dense", "embedding", "size")


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer repeats (about 3 minutes)")
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
    unknown = [name for name in only if name not in BENCHMARKS]
    if unknown or not only:
        parser.error(
            f"Received an invalid value for `--only`, expected names among "
            f"{','.join(BENCHMARKS)}. Received: --only={args.only}"
        )
    args.only = only
    return args


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
    command = "python -m benchmarks" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:]) else ""
    )
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
        if not write:
            print(results[name]["markdown"])
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)
    return results


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
