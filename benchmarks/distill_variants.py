"""Distillation options compared from one start: every variant trains the same factors.

Run: `python -m benchmarks.distill_variants seed=1 block_weight=64
"batch_size=4,epochs=12"` (each argument one variant: `DistillationConfig`
fields changed from the defaults, comma-separated; `defaults` for none).

`bert_levers` measures one `factorize` call per row, so each row repeats the
whitened factorization and the closed-form refit (about four minutes on 2
cores) and compares options across processes. Here `factorize` runs once,
as `bert_levers` row 8 (the defaults: all six projections of
all-MiniLM-L6-v2 at `param_ratio=0.5`, `learned` on 512 other IMDB train
reviews); its call to `distillation.distill` is replaced by one that runs
the real `distill` once per variant, each from the same snapshot of the
factors, on the same training and held-out data, and scores each result as
`bert_levers` does (mean cosine of the mean-pooled sentence embeddings to
the original's, 256 IMDB test reviews). What `factorize` does before
`distill` (the held-out split, the refit, block-wise epochs) is the same for
every variant, so those options cannot vary, and a `seed=` variant changes
the order of the batches and the token noise only. Times are those of
`distill` alone and compare only within one run. Results go to
`benchmarks/out/distill_variants/<stamp>.json` and are printed as a table.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import os
import time
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import machine_description  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from keras_factorized.atomic_io import write_text  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "distill_variants")


# Options `factorize` applies before it calls `distill`: the same for every variant.
BEFORE_DISTILL = {"data", "refit", "use_calibration_data", "validation_split",
                  "validation_data", "block_epochs"}


class _Done(Exception):
    """Raised after the last variant: the rest of `factorize` is not needed."""


def parse_variant(text: str) -> dict:
    """The `DistillationConfig` fields of one variant argument.

    Example:

    >>> parse_variant("block_weight=64,dtype_policy=mixed_bfloat16")
    {'block_weight': 64, 'dtype_policy': 'mixed_bfloat16'}
    >>> parse_variant("defaults")
    {}
    """
    from keras_factorized.surgery import DistillationConfig

    if text.strip() == "defaults":
        return {}
    fields = {f.name for f in dataclasses.fields(DistillationConfig)} - BEFORE_DISTILL
    changes = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name not in fields:
            raise ValueError(
                f"Received an invalid value for `variant`, expected `field=value` pairs "
                f"of DistillationConfig fields {sorted(fields)} or `defaults`. "
                f"Received: variant={text!r}"
            )
        try:
            changes[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[name] = value  # a bare word: a string option
    DistillationConfig(**changes)  # the config's own checks, before any work
    return changes


def _variant_argument(text: str) -> dict:
    try:
        return parse_variant(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rebatched(data, config, batch_size):
    """`data` as arrays when it comes in batches of `config.batch_size` and a
    variant changes the batch size, so that `distill` cuts it anew."""
    from keras_factorized.surgery.calibration import is_batched

    if batch_size == config.batch_size or not is_batched(data):
        return data
    return keras.tree.map_structure(lambda *a: np.concatenate(a), *list(data))


def run_variants(model, factorize_kwargs, variants, score, log=print):
    """One result dict per variant: its changes, score, held-out losses and
    the seconds `distill` took, each from the same start.

    Args:
        model: the model to factorize.
        factorize_kwargs: `factorize`'s arguments (`method="learned"`).
        variants: `DistillationConfig` changes, one dict per variant.
        score: `student -> float`, applied after each variant.
        log: prints progress.
    """
    from keras_factorized import factorize
    from keras_factorized.surgery import distillation
    from keras_factorized.surgery.calibration import to_numpy

    real_distill, results = distillation.distill, []

    def each_variant(student, teacher, config, layers, data, verbose=0, validation=None,
                     block_paths=()):
        start = [np.array(to_numpy(v)) for v in student.weights]
        for changes in variants:
            for variable, value in zip(student.weights, start):
                variable.assign(value)
            variant = dataclasses.replace(config, **changes)
            batches = _rebatched(data, config, variant.batch_size)
            began = time.perf_counter()
            distilled = real_distill(student, teacher, variant, layers, batches, verbose,
                                     validation, block_paths)
            seconds = time.perf_counter() - began
            results.append(dict(changes=changes, score=float(score(student)), seconds=seconds,
                                held_out=distilled.held_out, kept=distilled.kept))
            log(f"{changes or 'defaults'}: {results[-1]['score']:.5f} ({seconds:.0f} s)")
        raise _Done

    with contextlib.suppress(_Done), mock.patch.object(distillation, "distill", each_variant):
        factorize(model, **factorize_kwargs)
    return results


def render(results, reference) -> str:
    rows = [
        [", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "defaults",
         f"{r['score']:.5f}", f"{r['score'] - reference:+.5f}", f"{r['held_out'][-1]:.4f}" if r["held_out"] else "-",
         f"{r['seconds']:.0f}"]
        for r in results
    ]
    return markdown_table(
        ["variant", "cosine", "vs first", "held-out loss, last epoch", "distill (s)"], rows
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=_variant_argument,
                        help='DistillationConfig changes, "field=value,..." or "defaults"')
    parser.add_argument("--data", default=None, help="the IMDB archive or folder")
    parser.add_argument("--out", default=OUT, help="folder of the JSON results")
    args = parser.parse_args(argv)
    from benchmarks import bert_levers
    from benchmarks.bert_benchmark import DEFAULT_DATA
    from benchmarks.bert_benchmark import mean_cosine
    from benchmarks.bert_benchmark import sentence_embeddings

    backbone, data = bert_levers.load_data(args.data or DEFAULT_DATA, print)

    def score(student):
        return mean_cosine(sentence_embeddings(student, data["evaluation"]), data["reference"])

    kwargs = bert_levers._factorize_kwargs(8, data)
    results = run_variants(backbone, kwargs, args.variants, score)
    table = render(results, results[0]["score"])
    print(table + f"\n\nMachine: {machine_description()}.")
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_text(os.path.join(args.out, f"{stamp}.json"), json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
