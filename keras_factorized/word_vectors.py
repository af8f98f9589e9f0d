"""Pretrained word vectors (GloVe, word2vec text format) for a given vocabulary.

`load_word_vectors` reads a text file of `word v1 v2 ... vd` lines (GloVe; the
word2vec text format adds a `count dim` header line, detected and skipped) and
keeps only the words of a vocabulary, such as
`TextVectorization.get_vocabulary()`. It is fast because it parses numbers only
for the words it keeps: every other line costs one byte search and a dict
lookup, so a 400,000-word 300-d GloVe file (about 1 GB) takes seconds, not
minutes. Words of the vocabulary that the file lacks are reported.

`factorized_embedding_from_word_vectors` turns the vectors into a
`FactorizedEmbedding` by truncated SVD, optionally frozen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import field

import numpy as np

from keras_factorized.validation import invalid_value


@dataclass
class WordVectors:
    """Vectors aligned with a vocabulary.

    Attributes:
        matrix: `(len(vocabulary), dim)` float32 array; row `i` is the vector of
            `vocabulary[i]`. Rows of missing words hold the OOV initialisation.
        found: Boolean array, True where the file had the word.
        oov: The vocabulary words the file lacks (padding/`[UNK]` excluded).
        vocabulary: The vocabulary, as given.
    """

    matrix: np.ndarray
    found: np.ndarray
    oov: list = field(default_factory=list)
    vocabulary: list = field(default_factory=list)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def coverage(self) -> float:
        """Fraction of the (non-special) vocabulary found in the file."""
        total = int(self.found.sum()) + len(self.oov)
        return float(self.found.sum()) / total if total else 0.0

    def summary(self, max_examples: int = 10) -> str:
        """One line: how many words were found, and a few that were not."""
        n_found = int(self.found.sum())
        text = (
            f"Found vectors for {n_found:,} of {n_found + len(self.oov):,} words "
            f"({100 * self.coverage:.1f}%); {len(self.oov):,} out of vocabulary"
        )
        if self.oov:
            examples = ", ".join(repr(w) for w in self.oov[:max_examples])
            text += f", e.g. {examples}"
        return text




def _split_word(line: bytes):
    """`(word, rest)` of a `word v1 ... vd` line (space or tab separated)."""
    stripped = line.rstrip(b"\r\n")
    cut = stripped.find(b" ")
    if cut <= 0:
        cut = stripped.find(b"\t")
    if cut <= 0:
        # A line holding one token: a word without numbers (or a blank line).
        token = stripped.strip()
        return (token or None), b""
    return stripped[:cut], stripped[cut + 1 :]


def _parse_vector(text: bytes, dim, line_number: int, path: str, word: str) -> np.ndarray:
    """The numbers of one line, or a ValueError naming the line and the word."""
    where = f"Line {line_number} of {path!r} (word {word!r})"
    try:
        vector = np.array(text.split(), dtype=np.float32)
    except ValueError as e:
        raise ValueError(f"{where} could not be parsed as numbers: {e}") from e
    if vector.shape[0] == 0:
        raise ValueError(f"{where} has no numbers after the word.")
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(
            f"{where} has {vector.shape[0]} numbers, but the file's vectors have {dim}."
        )
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"{where} holds NaN or Inf (or a number too large for float32).")
    return vector


def load_word_vectors(
    path: str,
    vocabulary,
    *,
    special_tokens=("", "[UNK]"),
    oov_initializer: str = "zeros",
    seed: int | None = 0,
    encoding: str = "utf-8",
) -> WordVectors:
    """Loads the vectors of `vocabulary`'s words from a GloVe / word2vec text file.

    Args:
        path: The text file, one `word v1 ... vd` line per word, separated by
            spaces; a word2vec `count dim` first line is skipped.
        vocabulary: Sequence of words; row `i` of the result belongs to
            `vocabulary[i]` (pass `TextVectorization.get_vocabulary()`).
        special_tokens: Words that are not expected in the file (padding and
            the OOV token of `TextVectorization`); they are not reported as
            missing, and the padding row `""` stays zero.
        oov_initializer: `"zeros"`, or `"normal"` to draw missing rows from a
            normal distribution with the found vectors' mean and standard
            deviation (so missing words remain distinguishable when trained).
        seed: Seed of the `"normal"` initialisation.
        encoding: Text encoding of the file.

    Returns:
        A `WordVectors`; `summary()` reports the out-of-vocabulary words.

    Raises:
        ValueError: naming the line and word, when a line of a vocabulary
            word has no numbers, text that is not a number, NaN/Inf, or a
            length other than the file's; or when no word of the vocabulary
            is in the file (an empty file, another casing). Lines of other
            words are never parsed, so they cannot fail.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "vectors.txt")
    >>> with open(path, "w") as f:
    ...     _ = f.write("the 0.1 0.2\\ngood 1.0 -1.0\\nbad -1.0 1.0\\n")
    >>> vectors = load_word_vectors(path, ["", "[UNK]", "good", "bad", "meh"])
    >>> vectors.matrix.shape, vectors.oov
    ((5, 2), ['meh'])
    """
    if oov_initializer not in ("zeros", "normal"):
        raise invalid_value("oov_initializer", 'one of "zeros", "normal"', oov_initializer)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            "Received an invalid value for `path`, expected a GloVe or word2vec "
            f"text file, but no file exists there. Received: path={path!r}"
        )
    vocabulary = [str(w) for w in vocabulary]
    if not vocabulary:
        raise invalid_value("vocabulary", "a non-empty sequence of words", vocabulary)
    # Keys are bytes so that lines of words we skip are never decoded.
    wanted = {}
    for index, word in enumerate(vocabulary):
        wanted.setdefault(word.encode(encoding), index)

    rows = {}
    dim = None
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            word, rest = _split_word(line)
            if word is None:
                continue
            if line_number == 1 and word.isdigit():
                header = line.split()
                if len(header) == 2 and header[1].isdigit():
                    dim = int(header[1])
                    continue
            index = wanted.get(word)
            if index is None or index in rows:
                continue
            vector = _parse_vector(rest, dim, line_number, path, word.decode(encoding, "replace"))
            dim = vector.shape[0]
            rows[index] = vector
    if dim is None or not rows:
        raise ValueError(
            f"No word of the vocabulary was found in {path!r} (is it a GloVe or "
            f"word2vec text file, with the same casing?). Received: path={path!r}"
        )

    found = np.zeros(len(vocabulary), dtype=bool)
    indices = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
    found[indices] = True
    stacked = np.stack(list(rows.values()))
    if oov_initializer == "normal":
        rng = np.random.default_rng(seed)
        matrix = rng.normal(
            stacked.mean(), stacked.std(), size=(len(vocabulary), dim)
        ).astype(np.float32)
    else:
        matrix = np.zeros((len(vocabulary), dim), dtype=np.float32)
    matrix[indices] = stacked
    special = set(special_tokens)
    for index, word in enumerate(vocabulary):
        if word == "" and word in special:
            matrix[index] = 0.0
    oov = [
        w for w, hit in zip(vocabulary, found) if not hit and w not in special
    ]
    return WordVectors(matrix=matrix, found=found, oov=oov, vocabulary=vocabulary)


def factorized_embedding_from_word_vectors(
    vectors,
    vocabulary=None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    param_ratio: float | None = None,
    trainable: bool = True,
    mask_zero: bool = False,
    **kwargs,
):
    """Builds a `FactorizedEmbedding` from pretrained word vectors by truncated SVD.

    Args:
        vectors: A `WordVectors`, a `(vocab, dim)` matrix, or the path of a
            GloVe / word2vec text file (then `vocabulary` is required).
        vocabulary: The vocabulary, when `vectors` is a path.
        rank: The rank of the factors. Give exactly one of `rank`, `energy`
            and `param_ratio`, as in `FactorizedEmbedding.from_matrix`.
        energy: The fraction of the squared singular values to keep.
        param_ratio: The fraction of the table's parameters to keep.
        trainable: `False` freezes the embedding (both factors).
        mask_zero: Passed to the layer.
        **kwargs: Other `FactorizedEmbedding` arguments (e.g. `name`), or
            `load_word_vectors` arguments when `vectors` is a path.

    Returns:
        A `FactorizedEmbedding` whose merged matrix is the best rank-`rank`
        approximation of the vectors.

    Example:

    >>> import numpy as np
    >>> matrix = np.random.default_rng(0).normal(size=(100, 16))
    >>> layer = factorized_embedding_from_word_vectors(matrix, rank=4, trainable=False)
    >>> layer.rank, layer.trainable
    (4, False)
    """
    from keras_factorized import FactorizedEmbedding

    if isinstance(vectors, (str, os.PathLike)):
        if vocabulary is None:
            raise ValueError(
                "`vocabulary` is required when `vectors` is a file path. "
                f"Received: vectors={vectors!r}, vocabulary=None"
            )
        load_kwargs = {
            k: kwargs.pop(k)
            for k in ("special_tokens", "oov_initializer", "seed", "encoding")
            if k in kwargs
        }
        vectors = load_word_vectors(vectors, vocabulary, **load_kwargs)
    matrix = vectors.matrix if isinstance(vectors, WordVectors) else np.asarray(vectors)
    return FactorizedEmbedding.from_matrix(
        matrix,
        rank=rank,
        energy=energy,
        param_ratio=param_ratio,
        mask_zero=mask_zero,
        trainable=trainable,
        **kwargs,
    )
