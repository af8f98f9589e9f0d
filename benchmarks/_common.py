"""Timing helpers shared by the performance benchmarks.

Every speed figure is a ratio against a baseline timed in the same rounds:
`time_interleaved` runs the candidates round-robin, so a change of load on the
shared machine hits all of them alike, and reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable


def time_interleaved(
    functions: dict[str, Callable[[], object]],
    repeats: int = 5,
    min_seconds: float = 0.02,
    warmup: int = 1,
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin.

    Args:
        functions: name -> function of no argument (it must block until its
            result is computed).
        repeats: number of rounds; each round times every function once.
        min_seconds: each timed sample loops over the function until about
            this long, so that fast calls are not lost in the timer's noise.
        warmup: untimed calls of each function first (tracing, compilation,
            caches).

    Returns:
        name -> median seconds of one call.
    """
    loops = {}
    for name, fn in functions.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        loops[name] = max(1, min(1000, int(min_seconds / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            n = loops[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


def load_average() -> str:
    """The 1-minute load average, as text (the machine is shared)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def goal(met: bool) -> str:
    return "**met**" if met else "**missed**"


def fmt_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def folder_bytes(path: str) -> int:
    """Bytes of the files under `path` (a SavedModel folder, say)."""
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


def fmt_bytes(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def run_worker(module: str, cfg: dict, timeout: float) -> dict:
    """`python -m <module> --worker <cfg> --json <file>` in a fresh process on
    `cfg["backend"]`; its JSON result, or `cfg` with an `error` entry."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = {**os.environ, "KERAS_BACKEND": cfg["backend"], "TF_CPP_MIN_LOG_LEVEL": "2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, "--worker", json.dumps(cfg), "--json", out],
            env=env, cwd=root, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            return {**cfg, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        with open(out) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": [f"timed out after {timeout} s"]}
    finally:
        if os.path.exists(out):
            os.unlink(out)


def add_worker_arguments(parser) -> None:
    """The `--no-write`, `--json` and hidden `--worker` flags of a benchmark
    whose runs go through `run_worker`."""
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def serve_worker(args, measure: Callable[[dict], dict]) -> bool:
    """In a `run_worker` process: writes `measure(cfg)` to `--json`; True if it did."""
    if not args.worker:
        return False
    from keras_factorized.atomic_io import write_text

    write_text(args.json, json.dumps(measure(json.loads(args.worker))))
    return True


def memory_bytes(field: str) -> int:
    """A field of this process's `/proc/self/status` (`"VmRSS"`, `"VmHWM"`) in
    bytes; 0 where there is no such file (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_memory() -> bool:
    """Resets this process's resident high-water mark (Linux `clear_refs`);
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
