"""Measurements that explain the pretrained benchmark's results (issue 15).

`benchmarks/pretrained_benchmark.py` trains; this module measures what its
write-up needs besides accuracies, without training:

- `spectrum_energy`: the fraction of the table's squared singular values each
  rank keeps (the MiniLM token table's spectrum is flat);
- `token_coverage`: how much of a review fits in the first `sequence_length`
  tokens with the WordPiece tokenizer and with the word-level one;
- `imdb_scratch_points` and `plot_with_scratch`: the from-scratch models of
  BENCHMARKS.md's `imdb` section beside the pretrained ones in one plot;
- `load_or_measure`: the first two, measured once and cached as JSON;
- `accuracy_text` and `findings`: the write-up's sentences from those numbers.
"""

from __future__ import annotations

import json
import os
import re
import statistics

import numpy as np

from benchmarks.seed_stats import plot_accuracy
from keras_factorized.atomic_io import write_text

# Keras `TextVectorization`'s default standardization strips these.
_PUNCTUATION = re.compile(r"[!\"#$%&()\*\+,\-\./:;<=>?@\[\\\]^_`{|}~']")
_BREAK = re.compile(r"<br\s*/?>")


def spectrum_energy(matrix, ranks) -> dict:
    """`{rank: fraction}` of the squared singular values kept at each rank.

    >>> m = np.diag([3.0, 1.0, 0.0])
    >>> spectrum_energy(m, [1, 2])
    {1: 0.9, 2: 1.0}
    """
    s = np.linalg.svd(np.asarray(matrix, dtype="float64"), compute_uv=False)
    kept = np.cumsum(s**2) / np.sum(s**2)
    return {int(r): round(float(kept[min(r, len(s)) - 1]), 6) for r in ranks}


def init_scale(matrix, rank: int, seed: int = 0) -> dict:
    """Scales at initialisation: the rank-`rank` SVD factors of `matrix`
    (`FactorizedEmbedding.from_matrix`), a from-scratch `FactorizedEmbedding`
    of the same shape (its default initializers, seeded by `seed`) and the
    full table: entry std of `A` and `B`, mean norm of the embedding rows.

    >>> s = init_scale(np.diag([3.0, 2.0, 1.0]).astype("float32"), 2)
    >>> s["full"]["row_norm"], s["svd"]["row_norm"]
    (2.0, 1.667)
    """
    import keras

    from keras_factorized import FactorizedEmbedding

    keras.utils.set_random_seed(seed)
    scratch = FactorizedEmbedding(*matrix.shape, rank=rank)
    scratch.build()
    layers = {"svd": FactorizedEmbedding.from_matrix(matrix, rank=rank), "scratch": scratch}

    def norm(table):
        return round(float(np.linalg.norm(table, axis=1).mean()), 3)

    out = {"full": {"row_norm": norm(np.asarray(matrix, "float64"))}}
    for name, layer in layers.items():
        a = keras.ops.convert_to_numpy(layer.embeddings_a).astype("float64")
        b = keras.ops.convert_to_numpy(layer.embeddings_b).astype("float64")
        out[name] = {
            "a_std": round(float(a.std()), 4),
            "b_std": round(float(b.std()), 4),
            "row_norm": norm(a @ b),
        }
    return out


def word_count(text: str) -> int:
    """Tokens of a word-level `TextVectorization` (lowercase, punctuation stripped).

    >>> word_count("A <br />great film, isn't it?")
    5
    """
    return len(_PUNCTUATION.sub("", _BREAK.sub(" ", text).lower()).split())


def token_coverage(texts, sequence_length: int, wordpiece_counts) -> dict:
    """Mean token counts and the share of reviews that fit in `sequence_length`.

    `wordpiece_counts` holds the WordPiece token count of each of `texts`.

    >>> token_coverage(["good film", "bad"], 2, [3, 1])["wordpiece_fit"]
    0.5
    """
    words = [word_count(t) for t in texts]
    pieces = [int(c) for c in wordpiece_counts]
    return {
        "reviews": len(words),
        "words_mean": statistics.mean(words),
        "wordpiece_mean": statistics.mean(pieces),
        "words_fit": sum(w <= sequence_length for w in words) / len(words),
        "wordpiece_fit": sum(p <= sequence_length for p in pieces) / len(pieces),
    }


def wordpiece_counts(folder: str, texts) -> list[int]:
    """WordPiece token counts of `texts` with the BERT preset in `folder`."""
    import keras_hub

    tokenizer = keras_hub.models.BertTokenizer.from_preset(folder)
    ids = tokenizer([_BREAK.sub(" ", t) for t in texts])
    return [len(row) for row in (ids.to_list() if hasattr(ids, "to_list") else ids)]


def imdb_scratch_points(markdown: str) -> list[dict]:
    """The from-scratch rows (`baseline`, `rank N`) of the `imdb` section.

    >>> text = ("<!-- BEGIN imdb -->\\n| baseline | 2,560,000 | 2 | 1.0x | 85.58 ± 0.64 (1-2) |\\n"
    ...         "| svd rank 4 | 80,512 | 9 | 1x | 83.73 ± 2.11 (1-2) |\\n<!-- END imdb -->")
    >>> imdb_scratch_points(text)
    [{'model': 'baseline', 'embedding_params': 2560000, 'mean': 85.58, 'std': 0.64}]
    """
    match = re.search(r"<!-- BEGIN imdb -->(.*?)<!-- END imdb -->", markdown, re.DOTALL)
    rows = re.findall(
        r"^\| (baseline|rank \d+) \| ([\d,]+) \|[^\n]*?\| ([\d.]+) ± ([\d.]+)",
        match.group(1) if match else "",
        re.M,
    )
    return [
        {"model": m, "embedding_params": int(p.replace(",", "")), "mean": float(a), "std": float(s)}
        for m, p, a, s in rows
    ]


def plot_with_scratch(summary, kinds: dict, scratch_points, path: str) -> None:
    """Test accuracy against embedding parameters: the pretrained benchmark's
    rows (`summary`, plotted by `kind` as in `kinds`) and the `imdb` section's
    from-scratch models (`scratch_points`), into a PNG."""
    scratch = [
        {"model": p["model"], "embedding_params": p["embedding_params"],
         "test_accuracy_mean": p["mean"] / 100, "test_accuracy_std": p["std"] / 100}
        for p in scratch_points
    ]  # fmt: skip
    plot_accuracy(
        summary, path, kinds,
        title="IMDB sentiment: pretrained MiniLM table (SVD) vs from scratch",
        extra_series=[("from scratch, word-level (imdb section)", "*", scratch)],
    )  # fmt: skip


def accuracy_text(row):
    """`mean ± std (n seeds)` of a summary row; one seed has no spread and says so.

    >>> accuracy_text({"test_accuracy_mean": 0.8354, "test_accuracy_std": 0.0, "seeds": 1})
    '83.54 (1 seed)'
    """
    text = f"{100 * row['test_accuracy_mean']:.2f}"
    if row["seeds"] > 1:
        return text + f" ± {100 * row['test_accuracy_std']:.2f} ({row['seeds']} seeds)"
    return text + " (1 seed)"


def findings(by, choices, args, analysis):
    """The flat spectrum, the rank chosen by validation and the token coverage, as text."""
    lines = []
    energy = analysis.get("energy", {})
    if energy:
        kept = ", ".join(f"rank {r}: {100 * e:.1f}%" for r, e in energy.items())
        text = (
            "Spectrum: share of the MiniLM token table's energy (squared singular values) each "
            f"rank keeps: {kept}."
        )
        frozen = [by[m] for m in by if by[m]["kind"] in ("full_frozen", "svd_frozen")]
        if "full frozen" in by and len(frozen) > 1:
            full = by["full frozen"]
            gaps = "; ".join(
                f"rank {r['rank']}: {accuracy_text(r)}, "
                f"{100 * (r['test_accuracy_mean'] - full['test_accuracy_mean']):+.2f}"
                for r in sorted(frozen, key=lambda r: r["rank"] or 0)
                if r["rank"] is not None
            )
            text += (
                f" A frozen low-rank copy of it loses points against the frozen full table "
                f"({accuracy_text(full)}): {gaps}."
            )
        lines += [text, ""]
    for group, chosen in choices.items():
        rows = [by[m] for m in by if by[m]["kind"] in (f"full_{group}", f"svd_{group}")]
        best = max(rows, key=lambda r: r["val_accuracy_mean"])
        close = max(
            (r for r in rows if r["rank"] is not None), key=lambda r: r["val_accuracy_mean"]
        )
        verdict = (
            f"picks {chosen['model']} ({chosen['compression']:.1f}x fewer embedding parameters, "
            f"test {accuracy_text(chosen)})"
            if chosen
            else "picks no rank: the full table is kept"
        )
        lines += [
            f"Rank by validation ({group} group; the smallest rank whose mean validation accuracy "
            f"is within {args.rank_tolerance:g} points of the best, {best['model']} at "
            f"{100 * best['val_accuracy_mean']:.2f}): {verdict}. Best factorized row by validation: "
            f"{close['model']} at {100 * close['val_accuracy_mean']:.2f}.",
            "",
        ]
    scale = analysis.get("init_scale")
    if scale:
        svd, scratch, full = scale["svd"], scale["scratch"], scale["full"]
        lines += [
            f"Scale at initialisation (rank {scale['rank']}): the SVD factors have entries of std "
            f"{svd['a_std']:.3f} (`A`) and {svd['b_std']:.3f} (`B`) and give embedding rows of mean "
            f"norm {svd['row_norm']:.2f} (full table: {full['row_norm']:.2f}); a from-scratch "
            f"`FactorizedEmbedding` (uniform `A`, orthogonal `B`, seed 0): {scratch['a_std']:.3f}, "
            f"{scratch['b_std']:.3f} and {scratch['row_norm']:.2f}. Both train with the same Adam "
            "learning rate, whose steps are about the same size for every entry whatever its "
            "scale, so the SVD's larger `B` moves less, relative to its size, than the "
            "from-scratch one.",
            "",
        ]
    coverage = analysis.get("coverage")
    if coverage:
        c = coverage
        lines += [
            f"Tokens ({c['reviews']:,} test reviews): a review has {c['wordpiece_mean']:.0f} "
            f"WordPiece tokens on average against {c['words_mean']:.0f} words; "
            f"{100 * c['wordpiece_fit']:.0f}% of reviews fit whole in {args.sequence_length} WordPiece "
            f"tokens, {100 * c['words_fit']:.0f}% in {args.sequence_length} words (the imdb section's "
            "and the glove rows' tokens)"
            + (
                ": at the same sequence length the WordPiece rows see less of each review."
                if c["wordpiece_fit"] < c["words_fit"]
                else "."
            ),
            "",
        ]
    return lines


def load_or_measure(path, inputs, ranks, sequence_length, key_rank=32, sample=2000):
    """The spectrum energy and the token coverage, measured once and cached at `path`."""
    saved = json.load(open(path)) if os.path.exists(path) else {}
    if saved.get("ranks") == ranks and saved.get("sequence_length") == sequence_length:
        if "init_scale" in saved:
            return saved
    from benchmarks.minilm_vectors import minilm_folder
    from benchmarks.minilm_vectors import minilm_table

    _, matrix = minilm_table()
    texts = list(inputs.load_data().test.texts)
    texts = texts[:: max(1, len(texts) // sample)][:sample]
    analysis = {
        "ranks": ranks,
        "sequence_length": sequence_length,
        "energy": {str(r): e for r, e in spectrum_energy(matrix, ranks).items()},
        "init_scale": {"rank": key_rank, **init_scale(matrix, key_rank)},
        "coverage": token_coverage(
            texts, sequence_length, wordpiece_counts(minilm_folder(), texts)
        ),
    }
    write_text(path, json.dumps(analysis, indent=2))
    return analysis


def shortfall_note(best, scratch_best, glove_info, coverage, sequence_length) -> str:
    """Why the best pretrained row (`best`, a summary row) trails the best
    from-scratch model (`scratch_best`, an `imdb_scratch_points` entry), from
    the measured numbers; `""` when it does not trail.

    >>> best = {"model": "g", "kind": "glove_svd_trainable", "seeds": 2,
    ...         "test_accuracy_mean": 0.8556, "test_accuracy_std": 0.0036}
    >>> shortfall_note(best, {"model": "baseline", "mean": 85.58, "std": 0.64},
    ...                {"rows_found": 13051, "vocabulary": 20000}, None, 200)[:60]
    'Shortfall: g trails baseline by 0.02 points, less than the s'
    """
    gap = 100 * best["test_accuracy_mean"] - scratch_best["mean"]
    if gap > 0:
        return ""
    text = f"Shortfall: {best['model']} trails {scratch_best['model']} by {-gap:.2f} points"
    spread = max(100 * best["test_accuracy_std"], scratch_best["std"])
    if best["seeds"] > 1 and -gap < spread:
        text += (
            f", less than the spread over seeds (std {100 * best['test_accuracy_std']:.2f} and "
            f"{scratch_best['std']:.2f}): these seeds do not tell the two apart"
        )
    if best["kind"].startswith("glove") and glove_info:
        text += (
            f". Its table has vectors for {glove_info['rows_found']:,} of the "
            f"{glove_info['vocabulary']:,} words (the whole-word tokens of MiniLM's WordPiece "
            "table); the other rows start at zero"
        )
    elif coverage:
        text += (
            f". It reads {sequence_length} WordPiece tokens, a whole review for "
            f"{100 * coverage['wordpiece_fit']:.0f}% of reviews against "
            f"{100 * coverage['words_fit']:.0f}% for {sequence_length} words"
        )
    return text + (
        ". MiniLM's token table is the input of a Transformer, trained to be mixed by "
        "attention, not a word-vector model such as GloVe."
    )


def glove_paragraph(g) -> str:
    """What the GloVe-file path read (`g`: the benchmark's `glove` record)."""
    return (
        f"GloVe path: the MiniLM table written as a GloVe text file ({g['words_in_file']:,} lines, "
        f"{g['file_bytes'] / 1e6:.0f} MB) and read by `load_word_vectors` for the example's "
        f"word-level vocabulary of {g['vocabulary']:,} entries: {g['rows_found']:,} rows found "
        f"(whole-word WordPiece tokens; the rest are zeros), {g['load_s']:.1f} s including "
        "adapting the TextVectorization (under the load of the run). The `glove` rows above "
        "train on those word-level tokens."
    )
