"""Where the JAX training step of a large factorized table spends its time.

Times, round-robin in one process (`_common.time_interleaved`), the Keras
`train_on_batch` step of the `vocab` benchmark's `lookup` model (1M x 128,
`FactorizedEmbedding(rank=16)`, Adam) and its parts written in plain JAX with
the same shapes:

- `forward`: the loss (gather of 256 x 64 rows of `A`, `@ B`, mean, `Dense(1)`);
- `forward + gradient`: `jax.value_and_grad` of it; the gradient of `A` is a
  dense `rows x rank` array (a scatter-add into zeros);
- `Adam update`: Adam's update of `A` and its two moments from a dense
  gradient (everything `rows x rank`), with and without donating the buffers
  (without, XLA writes each new array to fresh memory);
- `whole step, plain JAX`: gradient and update in one `jax.jit`, donated.

Runs on the JAX backend only (it sets `KERAS_BACKEND=jax` when started as a
command). Writes the `vocab-jax-profile` section of BENCHMARKS.md.

    python -m benchmarks.vocab_jax_profile
    python -m benchmarks.vocab_jax_profile --rows 2000 --no-write
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

from benchmarks import _common  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.report import update_section  # noqa: E402


def _parts(rows, dim, rank, batch=256, length=64, seed=0):
    """name -> function of no argument for each timed part, plain JAX."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(rows, rank)).astype("float32") * 0.05)
    b = jnp.asarray(rng.normal(size=(rank, dim)).astype("float32") * 0.05)
    w = jnp.asarray(rng.normal(size=(dim, 1)).astype("float32") * 0.05)
    ids = jnp.asarray(rng.integers(0, rows, size=(batch, length)).astype("int32"))
    y = jnp.asarray(rng.integers(0, 2, size=(batch, 1)).astype("float32"))

    def loss(a, b, w):
        pooled = jnp.mean(jnp.take(a, ids, axis=0) @ b, axis=1)
        logits = pooled @ w
        return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)

    def adam(a, m, v, g, step=1.0, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        alpha = lr * jnp.sqrt(1 - b2**step) / (1 - b1**step)
        return a - m * alpha / (jnp.sqrt(v) + eps), m, v

    forward = jax.jit(loss)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    update = jax.jit(adam)
    update_donated = jax.jit(adam, donate_argnums=(0, 1, 2))

    def step(a, m, v, b, w):
        _, (ga, _, _) = jax.value_and_grad(loss, argnums=(0, 1, 2))(a, b, w)
        return adam(a, m, v, ga)

    whole = jax.jit(step, donate_argnums=(0, 1, 2))
    g = jnp.ones_like(a) * 1e-3
    state = {"donated": (a + 0, jnp.zeros_like(a), jnp.zeros_like(a)),
             "whole": (a + 0, jnp.zeros_like(a), jnp.zeros_like(a))}

    def run_donated():
        state["donated"] = update_donated(*state["donated"], g)
        state["donated"][0].block_until_ready()

    def run_whole():
        state["whole"] = whole(*state["whole"], b, w)
        state["whole"][0].block_until_ready()

    m0, v0 = jnp.zeros_like(a), jnp.zeros_like(a)
    return {
        "forward": lambda: forward(a, b, w).block_until_ready(),
        "forward + gradient": lambda: grad(a, b, w)[1][0].block_until_ready(),
        "Adam update of A, m, v (not donated)": lambda: update(a, m0, v0, g)[0]
        .block_until_ready(),
        "Adam update of A, m, v (donated)": run_donated,
        "whole step, plain JAX (donated)": run_whole,
    }


def _keras_step(rows, dim, rank):
    from benchmarks.vocab_benchmark import build_model
    from benchmarks.vocab_benchmark import config

    model, x, y = build_model(config("jax", rows, dim=dim, rank=rank))
    return lambda: model.train_on_batch(x, y)


def run(rows=1_000_000, dim=128, rank=16, repeats=7, write=True, command=None) -> dict:
    import keras

    if keras.backend.backend() != "jax":
        raise ValueError("Received an invalid value for the Keras backend, expected 'jax'. "
                         f"Received: {keras.backend.backend()!r}")
    load = _common.load_average()
    functions = {"Keras `train_on_batch` (FactorizedEmbedding, Adam)":
                 _keras_step(rows, dim, rank), **_parts(rows, dim, rank)}
    seconds = _common.time_interleaved(functions, repeats=repeats, warmup=2)
    keras_step = next(iter(seconds.values()))
    table = [[name, f"{s * 1e3:.1f} ms", f"{s / keras_step:.2f}"]
             for name, s in seconds.items()]
    command = command or "python -m benchmarks.vocab_jax_profile"
    text = "\n".join([
        "## Large vocabularies: where the JAX step spends its time",
        "",
        f"Command: `{command}`  ",
        f"{rows:,} x {dim}, rank {rank}, batch 256 x 64 ids, the `lookup` model; load "
        f"average {load} at the start (2 shared cores). Median of {repeats} round-robin "
        "rounds in one process; the parts are plain JAX with the same shapes (see the "
        "module docstring).",
        "",
        markdown_table(["what", "median", "of the Keras step"], table),
    ])
    if write:
        update_section("vocab-jax-profile", text)
    return {"seconds": seconds, "load_average": load, "markdown": text}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    for name in ("rows", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"Received an invalid value for `--{name}`, expected an integer "
                         f">= 1. Received: {getattr(args, name)}")
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    result = run(rows=args.rows, repeats=args.repeats, write=not args.no_write,
                 command=f"python -m benchmarks.vocab_jax_profile {argv_text}".strip())
    print(result["markdown"])


if __name__ == "__main__":
    main()
