"""Load and fault test of `export_for_serving` into one TF Serving base path.

Three phases on a tiny model (LowRankDense + Dense), every exported model
with its own output bias so that each version can be matched to its call:

1. `--sequential` calls (default 1,000) one after the other;
2. `--processes` processes (default 8) exporting `--per-process` models each
   (default 25) at the same time;
3. `--kills` rounds (default 10): a process exporting in a loop is killed
   with SIGKILL at a seeded random moment, then the base path is checked.

Then every version folder is loaded with `tf.saved_model.load` and served:
each call must have got a distinct version, each version must serve the
model of its call, and no integer-named folder may be incomplete. The
figures (calls, versions, seconds, failures) are written as JSON:

    python -m benchmarks.export_load --output benchmarks/out/export_load.json

The test suite (tests/test_reliability.py) runs the same checks at a smaller
scale (100 sequential calls, 8 concurrent processes, 2 kills).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

X = [[-1.0, -0.6, -0.2, 0.2, 0.6, 1.0]]


def tiny_model(bias: float):
    import keras
    import numpy as np

    from keras_factorized import LowRankDense

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), LowRankDense(4, rank=2), keras.layers.Dense(1)]
    )
    weights = model.get_weights()
    weights[-1] = np.full_like(weights[-1], bias)
    model.set_weights(weights)
    return model


def export_many(base: str, biases, log_path: str | None = None) -> dict:
    """Exports one model per bias; returns {version folder: bias}."""
    from keras_factorized.export import export_for_serving

    model = tiny_model(0.0)
    weights = model.get_weights()
    published = {}
    log = open(log_path, "a", buffering=1) if log_path else None
    for bias in biases:
        weights[-1][:] = bias
        model.set_weights(weights)
        path = export_for_serving(model, base)
        published[path] = bias
        if log:
            log.write(json.dumps([path, bias]) + "\n")
    return published


def served_outputs(base: str) -> dict:
    """{version folder: served output} for every integer-named folder."""
    import tensorflow as tf

    outputs = {}
    for name in sorted((n for n in os.listdir(base) if n.isdigit()), key=int):
        path = os.path.join(base, name)
        signature = tf.saved_model.load(path).signatures["serving_default"]
        outputs[path] = float(signature(inputs=tf.constant(X))["predictions"][0, 0])
    return outputs


def check(base: str, published, reference: float, complete: bool = True) -> dict:
    """Compares what each call published with what each version serves.

    `published` holds one `(version folder, bias)` pair per call.
    """
    published = list(published.items()) if isinstance(published, dict) else list(published)
    served = served_outputs(base)
    wrong = [p for p, bias in published
             if abs(served.get(p, 1e9) - reference - bias) > 1e-3 + 1e-6 * abs(bias)]
    unknown = sorted(set(served) - {p for p, _ in published})
    return {
        "calls": len(published),
        "versions_on_disk": len(served),
        "distinct_versions": len({p for p, _ in published}) == len(published),
        "serving_the_wrong_model": len(wrong),
        "versions_without_a_call": len(unknown) if complete else None,
        "leftover_working_folders": len([n for n in os.listdir(base) if n.startswith(".")]),
    }


def reference_output() -> float:
    import numpy as np

    return float(tiny_model(0.0).predict(np.array(X, dtype="float32"), verbose=0)[0, 0])


def run_child(args) -> None:
    start = args.child_index * 1000
    biases = range(start, start + args.per_process) if args.per_process else range(start, 10**9)
    export_many(args.base, (float(b) for b in biases), args.log)


def start_child(base: str, index: int, per_process: int, log: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmarks.export_load", "--child-index", str(index),
               "--base", base, "--per-process", str(per_process), "--log", log]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_log(path: str) -> list:
    """The `(version folder, bias)` pairs a child logged (complete lines)."""
    published = []
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            if line.endswith("\n"):
                published.append(tuple(json.loads(line)))
    return published


def concurrent_phase(work: str, processes: int, per_process: int, reference: float) -> dict:
    base = os.path.join(work, "concurrent")
    logs = [os.path.join(work, f"concurrent-{i}.log") for i in range(processes)]
    start = time.perf_counter()
    children = [start_child(base, i, per_process, logs[i]) for i in range(processes)]
    errors = [c.communicate()[1].decode()[-2000:] for c in children if c.wait() != 0]
    seconds = time.perf_counter() - start
    published = [pair for log in logs for pair in read_log(log)]
    result = check(base, published, reference)
    result.update(processes=processes, seconds=round(seconds, 1), failed_processes=len(errors))
    return result


def kill_phase(work: str, kills: int, seed: int, reference: float) -> dict:
    import numpy as np

    from keras_factorized.export import export_for_serving

    rng = np.random.default_rng(seed)
    base = os.path.join(work, "killed")
    published, incomplete = [], 0
    for round_index in range(kills):
        log = os.path.join(work, f"killed-{round_index}.log")
        child = start_child(base, 10 + round_index, 0, log)
        while not read_log(log) and child.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        published.extend(read_log(log))
        for name in (n for n in os.listdir(base) if n.isdigit()):
            if not os.path.exists(os.path.join(base, name, "saved_model.pb")):
                incomplete += 1
    # The next export after the kills works and clears the leftovers.
    after = export_for_serving(tiny_model(0.5), base)
    published.append((after, 0.5))
    result = check(base, published, reference, complete=False)
    result.update(kills=kills, incomplete_version_folders=incomplete)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file for the figures")
    parser.add_argument("--child-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_index is not None:
        run_child(args)
        return 0

    reference = reference_output()
    results = {}
    with tempfile.TemporaryDirectory(prefix="export-load-") as work:
        base = os.path.join(work, "sequential")
        start = time.perf_counter()
        published = export_many(base, [float(i) for i in range(args.sequential)])
        seconds = time.perf_counter() - start
        results["sequential"] = check(base, published, reference)
        results["sequential"].update(seconds=round(seconds, 1),
                                     seconds_per_call=round(seconds / max(args.sequential, 1), 4))
        results["concurrent"] = concurrent_phase(work, args.processes, args.per_process, reference)
        results["killed"] = kill_phase(work, args.kills, args.seed, reference)
    results["load_average"] = round(os.getloadavg()[0], 1)
    results["command"] = "python -m benchmarks.export_load " + " ".join(argv or sys.argv[1:])
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        from keras_factorized.atomic_io import write_text

        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        write_text(args.output, text + "\n")
    ok = all(
        phase["distinct_versions"] and phase["serving_the_wrong_model"] == 0
        for phase in (results["sequential"], results["concurrent"], results["killed"])
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
