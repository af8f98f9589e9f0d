"""Tests of keras_factorized.word_vectors (GloVe / word2vec text loading, SVD embedding)."""

import numpy as np
import pytest

from keras_factorized import word_vectors
from keras_factorized.word_vectors import factorized_embedding_from_word_vectors
from keras_factorized.word_vectors import load_word_vectors

VOCAB = ["", "[UNK]", "good", "bad", "movie", "zzz"]


def write(path, rows, header=False):
    with open(path, "w", encoding="utf-8") as f:
        if header:
            f.write(f"{len(rows)} {len(rows[0][1])}\n")
        for word, vector in rows:
            f.write(word + " " + " ".join(f"{v:.6f}" for v in vector) + "\n")
    return str(path)


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    words = ["the", "good", "bad", "movie", "café", "good"]  # second "good" ignored
    return [(w, rng.normal(size=4).astype(np.float32)) for w in words]


@pytest.mark.parametrize("header", [False, True], ids=["glove", "word2vec"])
def test_rows_align_with_vocabulary_and_oov_is_reported(tmp_path, rows, header):
    path = write(tmp_path / "v.txt", rows, header=header)
    vectors = load_word_vectors(path, VOCAB + ["café"])
    assert vectors.matrix.shape == (7, 4) and vectors.matrix.dtype == np.float32
    np.testing.assert_allclose(vectors.matrix[2], rows[1][1], atol=1e-6)  # first "good"
    np.testing.assert_allclose(vectors.matrix[3], rows[2][1], atol=1e-6)
    np.testing.assert_allclose(vectors.matrix[6], rows[4][1], atol=1e-6)  # utf-8 word
    assert vectors.oov == ["zzz"]  # "" and "[UNK]" are special, not reported
    assert not vectors.matrix[0].any() and not vectors.matrix[5].any()
    assert list(vectors.found) == [False, False, True, True, True, False, True]
    assert "Found vectors for 4 of 5 words" in vectors.summary()


def test_normal_oov_initializer_fills_missing_rows_but_not_padding(tmp_path, rows):
    path = write(tmp_path / "v.txt", rows)
    vectors = load_word_vectors(path, VOCAB, oov_initializer="normal", seed=1)
    assert vectors.matrix[5].any() and vectors.matrix[1].any()
    assert not vectors.matrix[0].any()


def test_errors_name_the_problem(tmp_path, rows):
    with pytest.raises(ValueError, match="no file exists"):
        load_word_vectors(str(tmp_path / "missing.txt"), VOCAB)
    path = write(tmp_path / "v.txt", rows)
    with pytest.raises(ValueError, match="`oov_initializer`"):
        load_word_vectors(path, VOCAB, oov_initializer="uniform")
    with pytest.raises(ValueError, match="No word of the vocabulary"):
        load_word_vectors(path, ["", "nothing", "here"])
    with open(path, "a") as f:
        f.write("zzz 1.0 2.0\n")
    with pytest.raises(ValueError, match="has 2 numbers, but the file's vectors have 4"):
        load_word_vectors(path, VOCAB)


def test_lines_of_other_words_are_not_parsed(tmp_path, rows):
    # A malformed line of a word outside the vocabulary must not cost anything
    # nor raise: only the vocabulary's lines are parsed.
    path = write(tmp_path / "v.txt", rows)
    with open(path, "a") as f:
        f.write("unused not numbers at all\n")
    assert load_word_vectors(path, VOCAB).oov == ["zzz"]


def test_factorized_embedding_from_word_vectors_is_the_best_low_rank_fit(tmp_path):
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(0)
    vocab = ["", "[UNK]"] + [f"w{i}" for i in range(60)]
    matrix = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 12))  # rank 3
    path = write(tmp_path / "v.txt", [(f"w{i}", matrix[i]) for i in range(60)])
    layer = factorized_embedding_from_word_vectors(
        path, vocab, rank=3, trainable=False, mask_zero=True
    )
    assert layer.rank == 3 and not layer.trainable and layer.mask_zero
    assert not layer.trainable_weights
    merged = keras.ops.convert_to_numpy(layer.embeddings)
    np.testing.assert_allclose(merged[2:], matrix, atol=1e-4)
    np.testing.assert_allclose(merged[0], 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="`vocabulary` is required"):
        factorized_embedding_from_word_vectors(path, rank=2)
    trainable = factorized_embedding_from_word_vectors(
        word_vectors.load_word_vectors(path, vocab), rank=2
    )
    assert trainable.trainable and len(trainable.trainable_weights) == 2
