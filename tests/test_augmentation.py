"""Token noise for distillation (`surgery.augmentation`, `DistillationConfig.token_noise`)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tiny_models import bert_inputs
from tiny_models import tiny_bert

from keras_factorized import factorize
from keras_factorized.surgery import DistillationConfig
from keras_factorized.surgery import augmentation
from keras_factorized.surgery import distillation


@st.composite
def padded_batches(draw):
    rows, length = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(0, length), min_size=rows, max_size=rows))
    ids = np.zeros((rows, length), dtype="int32")
    for row, n in enumerate(lengths):
        ids[row, :n] = draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    return ids


@settings(max_examples=60, deadline=None)
@given(ids=padded_batches(), rate=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_replaced_tokens_come_from_the_batch_and_spare_the_ends(ids, rate, seed):
    segments = np.ones_like(ids)
    inputs = {"token_ids": ids, "padding_mask": ids != 0, "segment_ids": segments}
    new = augmentation.replace_tokens(inputs, rate, np.random.default_rng(seed))
    assert new["segment_ids"] is segments and new["padding_mask"] is inputs["padding_mask"]
    out = new["token_ids"]
    assert out.shape == ids.shape and out.dtype == ids.dtype
    real = ids != 0
    np.testing.assert_array_equal(out[~real], ids[~real])
    for row in range(len(ids)):
        n = real[row].sum()
        if n:
            assert out[row, 0] == ids[row, 0] and out[row, n - 1] == ids[row, n - 1]
    inner_tokens = set(ids[:, 1:][real[:, 1:]].tolist())
    changed = out != ids
    assert set(out[changed].tolist()) <= inner_tokens
    if rate == 0:
        np.testing.assert_array_equal(out, ids)


def test_rate_one_redraws_every_inner_token_and_rate_follows_the_fraction():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 10_000, size=(64, 128)).astype("int32")
    redrawn = augmentation.replace_tokens(ids, 1.0, np.random.default_rng(1))
    # Drawn from 8,064 inner tokens, a kept token is rare.
    assert np.mean(redrawn[:, 1:-1] != ids[:, 1:-1]) > 0.99
    some = augmentation.replace_tokens(ids, 0.15, np.random.default_rng(1))
    assert 0.13 < np.mean(some[:, 1:-1] != ids[:, 1:-1]) < 0.17


def test_left_padding_keeps_the_first_and_last_real_tokens():
    ids = np.array([[0, 0, 2, 5, 6, 3]])
    out = augmentation.replace_tokens(ids, 1.0, np.random.default_rng(0))
    assert out[0, :3].tolist() == [0, 0, 2] and out[0, 5] == 3


@pytest.mark.parametrize("inputs", [
    np.zeros((2, 4), dtype="float32"),
    {"features": np.zeros((2, 4), dtype="int32")},
    [np.zeros((2, 4), dtype="int32")],
])
def test_inputs_without_token_ids_are_refused_naming_token_noise(inputs):
    with pytest.raises(ValueError, match="token_noise"):
        augmentation.replace_tokens(inputs, 0.1, np.random.default_rng(0))


def test_auto_noise_is_for_inputs_holding_token_ids():
    assert augmentation.noise_rate("auto", {"token_ids": np.ones((2, 3), "int32")}) == 0.15
    assert augmentation.noise_rate("auto", {"features": np.ones((2, 3))}) == 0.0
    assert augmentation.noise_rate(0.3, np.ones((2, 3))) == 0.3
    assert DistillationConfig().token_noise == "auto"


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.1", "Auto", None])
def test_invalid_token_noise(value):
    with pytest.raises(ValueError, match="token_noise"):
        DistillationConfig(token_noise=value)


def test_noisy_batches_pair_new_inputs_with_the_teachers_outputs_on_them():
    bert = tiny_bert(num_layers=2, seed=0)
    x = bert_inputs(8, seed=1)
    config = DistillationConfig(outputs=["sequence_output"])
    blocks = [bert.get_layer("transformer_layer_0")]
    noisy = distillation._NoisyBatches(bert, blocks, config, 0.3)
    new_x, targets = noisy.batch(x)
    assert np.mean(new_x["token_ids"] != x["token_ids"]) > 0.1
    expected, n_blocks = distillation._teacher_outputs(bert, [new_x], config.outputs, blocks)
    assert n_blocks == 1 and len(targets) == 2
    for got, want in zip(targets, expected[0]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_learned_with_token_noise_is_deterministic_and_differs_from_without():
    bert = tiny_bert(num_layers=1, seed=0)
    data = bert_inputs(16, seed=1)

    def run(noise):
        config = DistillationConfig(epochs=1, validation_split=0, token_noise=noise,
                                    refit=False, batch_size=8)
        small = factorize(bert, param_ratio=0.5, method="learned", calibration_data=data,
                          distillation=config, include="transformer_layer", batch_size=8)
        notes = " ".join(small.factorization_report.notes)
        return [np.asarray(w) for w in small.get_weights()], notes

    (first, notes), (again, _), (plain, plain_notes) = run("auto"), run(0.15), run(0.0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, plain))
    assert "15% of the tokens replaced at every step" in notes
    assert "tokens replaced" not in plain_notes
