"""`LowRankDense` against `keras.layers.Dense`: forward and forward+backward speed.

For m = n in {1024, 2048, 4096}, ranks m/16, m/8, m/4 and batches 1 to 1024,
times one call of each layer (and one gradient of the sum of its outputs with
respect to its inputs and weights), round-robin in the same rounds, and
reports the measured speedup beside the theoretical one `m n / ((m + n) k)`.
Also compares, on one shape, the ways of running the layer: eager, inside a
`tf.function` (what `fit`/`predict` do), with XLA (`jit_compile=True`), and the
order of the products (`(x A) B` against `x (A B)`). TensorFlow backend.
Writes the `dense` section of BENCHMARKS.md.

    python -m benchmarks --only dense
    python -m benchmarks.dense_benchmark --quick --no-write
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks import _common
from benchmarks.report import machine_description
from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json

SPEEDUP_GOAL = 0.75  # of the theoretical speedup, at batch >= GOAL_BATCH
GOAL_BATCH = 64
VARIANTS = ("eager", "graph", "xla")


def theoretical_speedup(m: int, n: int, k: int) -> float:
    """Multiply-adds of `Dense` over those of `LowRankDense`: `m n / ((m + n) k)`."""
    return m * n / ((m + n) * k)


def _layers(m, n, ranks, seed=0):
    import keras

    from keras_factorized import LowRankDense

    keras.utils.set_random_seed(seed)
    layers = {"dense": keras.layers.Dense(n)}
    layers["dense"].build((None, m))
    for k in ranks:
        layer = LowRankDense(n, rank=k)
        layer.build((None, m))
        layers[k] = layer
    return layers


def _runner(layer, x, mode: str, variant: str, call=None, depth=1):
    """A function of no argument running `layer` on `x` the given way.

    With `depth > 1` the layer is applied `depth` times in a row (m = n), as
    in a stack of layers: one function call then runs `depth` layers, so the
    fixed cost of calling a `tf.function` from Python (paid once per step by a
    whole model) is not charged to each layer. Divide the time by `depth`.
    """
    import tensorflow as tf

    layer_call = call or layer

    def call(inputs):
        for _ in range(depth):
            inputs = layer_call(inputs)
        return inputs

    def forward(inputs):
        return call(inputs)

    def forward_backward(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.reduce_sum(call(inputs))
        return tape.gradient(loss, [inputs] + list(layer.trainable_variables))

    fn = forward if mode == "forward" else forward_backward
    if variant == "graph":
        fn = tf.function(fn)
    elif variant == "xla":
        fn = tf.function(fn, jit_compile=True)
    return lambda: fn(x)


def time_grid(sizes, rank_divisors, batches, modes, variant="graph", repeats=5,
              min_seconds=0.02, depth=4, verbose=True) -> list[dict]:
    """Dense and its low-rank versions at every size, batch and mode.

    Times are per layer, in a stack of `depth` layers run by one call.
    """
    import tensorflow as tf

    rows = []
    for m in sizes:
        ranks = [m // d for d in rank_divisors]
        layers = _layers(m, m, ranks)
        for batch in batches:
            x = tf.random.stateless_normal((batch, m), seed=(1, batch))
            for mode in modes:
                fns = {key: _runner(layer, x, mode, variant, depth=depth)
                       for key, layer in layers.items()}
                times = _common.time_interleaved(fns, repeats=repeats, min_seconds=min_seconds)
                times = {key: t / depth for key, t in times.items()}
                for k in ranks:
                    theory = theoretical_speedup(m, m, k)
                    speedup = times["dense"] / times[k]
                    rows.append({
                        "m": m, "n": m, "k": k, "batch": batch, "mode": mode,
                        "variant": variant, "depth": depth,
                        "dense_seconds": times["dense"],
                        "low_rank_seconds": times[k], "speedup": speedup,
                        "theoretical": theory, "fraction": speedup / theory,
                    })
                if verbose:
                    print(f"  dense m={m} batch={batch} {mode}: " + ", ".join(
                        f"k={r['k']} {r['speedup']:.2f}x/{r['theoretical']:.1f}x"
                        for r in rows[-len(ranks):]), flush=True)
    return rows


def compare_variants(m=2048, k=128, batch=256, repeats=5, min_seconds=0.02,
                     verbose=True) -> list[dict]:
    """One shape, every way of running it, as ratios to eager `Dense`."""
    import tensorflow as tf
    from keras import ops

    layers = _layers(m, m, [k])
    dense, low = layers["dense"], layers[k]
    x = tf.random.stateless_normal((batch, m), seed=(2, batch))

    def merged_first(inputs):
        # The other order: x (A B) costs m n per row (plus m n k once).
        return ops.add(ops.matmul(inputs, ops.matmul(low.kernel_a, low.kernel_b)), low.bias)

    out = []
    for mode in ("forward", "forward+backward"):
        fns = {}
        for variant in VARIANTS:
            fns[("Dense", variant)] = _runner(dense, x, mode, variant)
            fns[("LowRankDense (x A) B", variant)] = _runner(low, x, mode, variant)
        fns[("LowRankDense x (A B)", "graph")] = _runner(low, x, mode, "graph", merged_first)
        for name, layer in (("Dense", dense), ("LowRankDense (x A) B", low)):
            fns[(name, "graph, stack of 4")] = _runner(layer, x, mode, "graph", depth=4)
        times = _common.time_interleaved(fns, repeats=repeats, min_seconds=min_seconds)
        for key in times:
            if key[1].endswith("stack of 4"):
                times[key] /= 4
        base = times[("Dense", "eager")]
        for (name, variant), seconds in times.items():
            same = times.get(("Dense", variant), times[("Dense", "graph")])
            out.append({"layer": name, "variant": variant, "mode": mode,
                        "seconds": seconds, "vs_dense_eager": base / seconds,
                        "vs_dense_same_variant": same / seconds})
        if verbose:
            print(f"  variants {mode}: " + ", ".join(
                f"{n}/{v} {s * 1e3:.2f} ms" for (n, v), s in times.items()), flush=True)
    return out


def markdown(grid, variants, command, load, variant) -> str:
    goal_rows = [r for r in grid if r["batch"] >= GOAL_BATCH]
    met = [r for r in goal_rows if r["fraction"] >= SPEEDUP_GOAL]
    lines = [
        "## `LowRankDense` against `Dense`: forward and forward+backward",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}; load average {load} at the start "
        "(shared machine: compare the ratios, not the milliseconds)",
        "",
        "Speedup = median time of `Dense(m)` over that of `LowRankDense(m, rank=k)` "
        "on the same input, timed round-robin in the same rounds; theory = "
        "`m n / ((m + n) k)`, the ratio of multiply-adds (the same for the "
        "backward pass); fraction = speedup / theory. Forward+backward is the "
        "gradient of the sum of the outputs with respect to the inputs and all "
        f"weights. Layers run inside a `tf.function` ({variant!r}, as in `fit` and "
        f"`predict`), {grid[0]['depth'] if grid else 1} of them in a row per call "
        "(a stack of layers, m = n), and times are per layer: the fixed cost of "
        "calling a graph from Python, which a model pays once per step, is not "
        "charged to each layer (the table of ways below shows it).",
        "",
        f"Goal (issue 6): >= {SPEEDUP_GOAL:.0%} of the theoretical speedup at batch "
        f">= {GOAL_BATCH}: {_common.goal(len(met) == len(goal_rows))}, reached in "
        f"{len(met)} of {len(goal_rows)} shapes (median fraction "
        f"{statistics.median(r['fraction'] for r in goal_rows):.0%}, lowest "
        f"{min(r['fraction'] for r in goal_rows):.0%})." if goal_rows else "",
        "",
    ]
    headers = ["m = n", "rank k", "batch", "mode", "Dense", "LowRankDense",
               "speedup", "theory", "fraction", f">= {SPEEDUP_GOAL:.0%}"]
    lines.append(markdown_table(headers, [
        [r["m"], r["k"], r["batch"], r["mode"], _common.fmt_seconds(r["dense_seconds"]),
         _common.fmt_seconds(r["low_rank_seconds"]), f"{r['speedup']:.2f}x",
         f"{r['theoretical']:.1f}x", f"{r['fraction']:.0%}",
         ("yes" if r["fraction"] >= SPEEDUP_GOAL else "no") if r["batch"] >= GOAL_BATCH
         else "(batch < 64)"]
        for r in grid
    ]))
    # Scaling: how the low-rank time grows with k and batch at the largest m.
    if grid:
        m_max = max(r["m"] for r in grid)
        fwd = [r for r in grid if r["mode"] == "forward"]
        lines += [
            "",
            "Scaling (forward): time per multiply-add of `LowRankDense`, "
            "`t / (batch (m + n) k)`; it settles once the batch amortises the "
            "per-call overhead, i.e. the cost grows as batch x (m + n) x k.",
            "",
            markdown_table(
                ["m = n", "rank k", "batch", "LowRankDense", "ps per multiply-add",
                 "Dense ps per multiply-add"],
                [[r["m"], r["k"], r["batch"], _common.fmt_seconds(r["low_rank_seconds"]),
                  f"{r['low_rank_seconds'] / (r['batch'] * 2 * r['m'] * r['k']) * 1e12:.1f}",
                  f"{r['dense_seconds'] / (r['batch'] * r['m'] ** 2) * 1e12:.1f}"]
                 for r in fwd if r["m"] == m_max or r["batch"] == max(x["batch"] for x in fwd)],
            ),
        ]
    if variants:
        v0 = variants[0]
        lines += [
            "",
            "Ways of running one shape (m = n = 2048, rank 128, batch 256, theory "
            f"{theoretical_speedup(2048, 2048, 128):.1f}x): time, speedup over eager "
            "`Dense`, and over `Dense` run the same way.",
            "",
            markdown_table(
                ["layer", "run as", "mode", "time", "vs eager Dense", "vs Dense, same way"],
                [[v["layer"], v["variant"], v["mode"], _common.fmt_seconds(v["seconds"]),
                  f"{v['vs_dense_eager']:.2f}x", f"{v['vs_dense_same_variant']:.2f}x"]
                 for v in variants],
            ),
        ]
        del v0
    return "\n".join(line for line in lines if line is not None)


def run(quick=False, sizes=None, batches=None, rank_divisors=(16, 8, 4),
        modes=("forward", "forward+backward"), variant="graph", variants=True,
        repeats=None, depth=4, write=True, json_path=None, command=None,
        verbose=True) -> dict:
    """Runs the dense benchmark; returns its results and writes its section.

    Args:
        quick: sizes 1024 and 2048, batches 1, 64, 256, 3 repeats.
        sizes, batches, rank_divisors, modes: the grid.
        variant: how the grid runs the layers: `"graph"` (`tf.function`),
            `"xla"` or `"eager"`.
        variants: also compare the ways of running one shape.
        repeats: rounds per timing (medians).
        depth: the grid times stacks of this many layers per call (per-layer
            times reported); see `_runner`.
        write: update the `dense` section of BENCHMARKS.md.
        json_path: also write the raw results there.
        command: the command line quoted in BENCHMARKS.md.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "The dense benchmark times TensorFlow graphs and XLA; run it with "
            f"KERAS_BACKEND=tensorflow. Received: backend={keras.backend.backend()}"
        )
    load = _common.load_average()
    sizes = sizes or ((1024, 2048) if quick else (1024, 2048, 4096))
    batches = batches or ((1, 64, 256) if quick else (1, 64, 256, 1024))
    repeats = repeats or (3 if quick else 5)
    grid = time_grid(sizes, rank_divisors, batches, modes, variant, repeats,
                     depth=depth, verbose=verbose)
    compared = compare_variants(repeats=repeats, verbose=verbose) if variants else []
    command = command or "python -m benchmarks --only dense" + (" --quick" if quick else "")
    text = markdown(grid, compared, command, load, variant)
    if write:
        update_section("dense", text)
    result = {"grid": grid, "variants": compared, "load_average": load, "markdown": text}
    if json_path:
        write_json(json_path, {k: v for k, v in result.items() if k != "markdown"})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None, help="comma-separated m (= n)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--variant", default="graph", choices=VARIANTS)
    parser.add_argument("--no-variants", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ints = lambda text: tuple(int(v) for v in text.split(",")) if text else None  # noqa: E731
    run(quick=args.quick, sizes=ints(args.sizes), batches=ints(args.batches),
        variant=args.variant, variants=not args.no_variants, write=not args.no_write,
        json_path=args.json)


if __name__ == "__main__":
    main()
