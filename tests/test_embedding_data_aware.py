"""Data-aware factorization of embeddings: token-frequency-weighted SVD (issue 11, item 4).

An embedding's inputs are one-hot rows, so `X^T X` is the diagonal of the
token counts: the whitened objective becomes `sum_i c_i ||E_i - (A B)_i||^2`,
solved exactly by Eckart-Young on the row-scaled table.
"""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_factorized import FactorizedEmbedding
from keras_factorized import factorize
from keras_factorized.data_aware import TokenCounts
from keras_factorized.data_aware import frequency_weighted_svd
from keras_factorized.data_aware import weighted_relative_error
from keras_factorized.data_aware import whitened_svd


def _problem(seed, vocabulary, dim, zipf=1.2):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(vocabulary, dim))
    counts = np.floor(1000.0 / np.arange(1, vocabulary + 1) ** zipf)
    return table, counts[rng.permutation(vocabulary)]


def _weighted_error(counts, table, approx):
    return float(np.sum(counts[:, None] * np.square(table - approx)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), vocabulary=st.integers(4, 30), dim=st.integers(2, 8),
       damping=st.sampled_from([0.0, 0.01, 0.5]), data=st.data())
def test_it_is_the_whitened_svd_of_one_hot_inputs(seed, vocabulary, dim, damping, data):
    table, counts = _problem(seed, vocabulary, dim)
    counts = counts + 1.0  # every id seen: the undamped scatter is invertible
    rank = data.draw(st.integers(1, min(vocabulary, dim)))
    a, b = frequency_weighted_svd(table, counts, damping=damping).factors(rank)
    a2, b2 = whitened_svd(table, np.diag(counts), damping=damping).factors(rank)
    np.testing.assert_allclose(a @ b, a2 @ b2, rtol=1e-7, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), vocabulary=st.integers(4, 40), dim=st.integers(2, 10),
       data=st.data())
def test_it_reaches_the_eckart_young_optimum_of_the_weighted_error(seed, vocabulary, dim, data):
    table, counts = _problem(seed, vocabulary, dim)
    counts = counts + 1.0
    rank = data.draw(st.integers(1, min(vocabulary, dim) - 1 if min(vocabulary, dim) > 1 else 1))
    result = frequency_weighted_svd(table, counts, damping=0.0)
    a, b = result.factors(rank)
    # The optimum, independently: the singular values the scaled table drops.
    s = np.linalg.svd(np.sqrt(counts)[:, None] * table, compute_uv=False)
    optimum = float(np.sum(np.square(s[rank:])))
    assert _weighted_error(counts, table, a @ b) == pytest.approx(optimum, rel=1e-7, abs=1e-9)
    u, s_plain, vt = np.linalg.svd(table, full_matrices=False)
    plain = (u[:, :rank] * s_plain[:rank]) @ vt[:rank]
    assert _weighted_error(counts, table, a @ b) <= _weighted_error(counts, table, plain) + 1e-9


def test_full_rank_reproduces_the_table():
    table, counts = _problem(0, 20, 6)  # most ids never seen: damping keeps them
    a, b = frequency_weighted_svd(table, counts).factors(6)
    np.testing.assert_allclose(a @ b, table, atol=1e-9)


def test_token_counts_ignore_ids_outside_the_table():
    counts = TokenCounts(4)
    counts.update(np.array([[0, 3, 3], [-1, 4, 2]]))
    assert counts.counts.tolist() == [1.0, 0.0, 1.0, 2.0]
    assert counts.count == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(counts=np.ones(3)), "counts"), (dict(counts=-np.ones(5)), "counts"),
     (dict(counts=np.ones(5), damping=-1.0), "damping")],
)
def test_invalid_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        frequency_weighted_svd(np.ones((5, 2)), **kwargs)


def _zipf_ids(rng, rows, length, vocabulary):
    weights = 1.0 / np.arange(1, vocabulary) ** 1.3
    ids = rng.choice(np.arange(1, vocabulary), size=(rows, length), p=weights / weights.sum())
    return ids.astype("int32")


def _model(vocabulary=200, dim=16):
    inputs = keras.Input((12,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, dim, name="embedding")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_factorize_weights_an_embedding_by_its_calibration_ids():
    rng = np.random.default_rng(0)
    model = _model()
    calibration, held_out = _zipf_ids(rng, 64, 12, 200), _zipf_ids(rng, 64, 12, 200)
    kwargs = dict(rank=4, include="embedding", calibration_data=calibration)
    weighted = factorize(model, method="whitened", **kwargs)
    plain = factorize(model, method="svd", **kwargs)
    assert isinstance(weighted.get_layer("embedding"), FactorizedEmbedding)

    def embedding_error(small, ids):
        table = keras.ops.convert_to_numpy(model.get_layer("embedding").embeddings)
        approx = keras.ops.convert_to_numpy(small.get_layer("embedding").embeddings)
        return float(np.linalg.norm(table[ids] - approx[ids]))

    # On new ids from the same distribution, not only on the calibration ids.
    assert embedding_error(weighted, held_out) < 0.8 * embedding_error(plain, held_out)
    # The report's output error is the count-weighted error, computed directly.
    (row,) = weighted.factorization_report.factorized
    counts = TokenCounts(200)
    counts.update(calibration)
    table = keras.ops.convert_to_numpy(model.get_layer("embedding").embeddings)
    approx = keras.ops.convert_to_numpy(weighted.get_layer("embedding").embeddings)
    direct = np.sqrt(_weighted_error(counts.counts, table, approx)
                     / _weighted_error(counts.counts, table, 0 * table))
    assert row.output_error == pytest.approx(direct, rel=1e-5)
    assert row.output_error == pytest.approx(
        weighted_relative_error(counts, table, approx), rel=1e-6)


def test_factorize_at_full_rank_reproduces_the_model():
    rng = np.random.default_rng(1)
    model = _model(vocabulary=40, dim=8)
    ids = _zipf_ids(rng, 16, 12, 40)
    small = factorize(model, method="whitened", rank=8, include="embedding",
                      calibration_data=ids)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(small(ids)), keras.ops.convert_to_numpy(model(ids)),
        atol=1e-5)


def test_the_benchmark_compares_both_approximations_and_renders_them():
    from benchmarks import embedding_frequency

    table, counts = _problem(3, 60, 8)
    approx = embedding_frequency.approximations(table, counts, 3)
    assert set(approx) == {"svd", "frequency-weighted"}
    assert (_weighted_error(counts, table, approx["frequency-weighted"])
            < _weighted_error(counts, table, approx["svd"]))
    assert (np.linalg.norm(table - approx["svd"])
            <= np.linalg.norm(table - approx["frequency-weighted"]))
    rows = [dict(rank=3, method=m, cosine=c, test_token_error=e)
            for m, c, e in (("svd", 0.5, 0.8), ("frequency-weighted", 0.9, 0.6))]
    text = embedding_frequency.render(dict(
        rows=rows, vocabulary=60, dim=8, calibration_tokens=100, distinct_ids=20,
        test_tokens_seen=0.75, load_average=1.0))
    assert "| 3 | 0.425 | 0.5000 | 0.9000 | 0.800 | 0.600 |" in text
    assert "75.0%" in text
