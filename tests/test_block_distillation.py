"""`DistillationConfig(block_weight=...)`: the blocks' outputs distilled too."""

import keras
import numpy as np
import pytest
from tiny_models import bert_inputs
from tiny_models import tiny_bert

from keras_factorized import factorize
from keras_factorized.surgery import DistillationConfig
from keras_factorized.surgery.blocks import tapped_outputs
from keras_factorized.surgery.distillation import distill


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def test_tapped_outputs_gives_every_call_and_restores_the_layer():
    layer = keras.layers.Dense(3)
    x = np.ones((2, 4), "float32")
    layer(x)
    with tapped_outputs([layer]) as taps:
        first, second = layer(x), layer(2 * x)
    assert len(taps[id(layer)]) == 2
    np.testing.assert_allclose(_np(taps[id(layer)][0]), _np(first))
    np.testing.assert_allclose(_np(taps[id(layer)][1]), _np(second))
    assert "call" not in vars(layer)
    layer(x)
    assert len(taps[id(layer)]) == 2


def _history(block_weight):
    keras.utils.set_random_seed(3)
    teacher = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16, name="d1"), keras.layers.Dense(16, name="d2")]
    )
    student = factorize(teacher, rank=3, include="d2")
    x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    config = DistillationConfig(epochs=3, loss="mse", block_weight=block_weight)
    layers = [student.get_layer("d2")]
    return distill(student, teacher, config, layers, x, block_paths=[(("layer", "d2"),)]).history


def test_block_loss_is_added_with_its_weight():
    # The block `d2` is the model's output: with weight w its loss is the
    # output loss again, so the total is (1 + w) times it; Adam's steps do
    # not depend on the scale of the loss, so the whole history scales.
    plain, doubled, tripled = _history(0.0), _history(1.0), _history(2.0)
    assert plain[-1] < plain[0]
    np.testing.assert_allclose(doubled, 2 * np.asarray(plain), rtol=2e-3)
    np.testing.assert_allclose(tripled, 3 * np.asarray(plain), rtol=2e-3)


def test_learned_with_block_outputs_on_a_transformer():
    # Two identical calls giving identical models, block outputs included (the
    # default block_weight), is test_determinism's "bert-learned" case.
    bert = tiny_bert(num_layers=2, seed=0)
    data = bert_inputs(48, seed=1)
    config = DistillationConfig(epochs=2, block_weight=1.0, validation_split=0.25,
                                token_noise=0.0)
    small = factorize(
        bert, param_ratio=0.5, method="learned", calibration_data=data,
        distillation=config, include="transformer_layer",
    )
    notes = " ".join(small.factorization_report.notes)
    assert "held-out loss" in notes
    assert "to the outputs of 2 blocks with weight 1)" in notes


@pytest.mark.parametrize("value", [-0.5, True, "1", None])
def test_invalid_block_weight(value):
    with pytest.raises(ValueError, match="block_weight"):
        DistillationConfig(block_weight=value)
