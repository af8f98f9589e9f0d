"""`factorize` is deterministic: the same call gives the same ranks and factors
whatever ran before in the process (issue 11, item 8).

Between two identical calls, `_unrelated_work` does what a user's process
does: other models and layers are created (Keras auto-names such as
`dense_3` shift), another model is factorized, the global
Keras and NumPy random states advance, and tensors are created and freed
(Python reuses the ids of freed objects: the calibration statistics once
depended on that).
"""

import keras
import numpy as np
import pytest
from tiny_models import tiny_bert

from keras_factorized import data_aware
from keras_factorized import factorize
from keras_factorized.surgery import DistillationConfig
from keras_factorized.surgery import WhitenedConfig
from keras_factorized.surgery import blocks
from keras_factorized.surgery import calibration
from keras_factorized.surgery import copying
from keras_factorized.surgery import selection

keras_hub = pytest.importorskip("keras_hub")

VOCABULARY = 40
LENGTH = 12


def _bert(num_layers=2):
    """A tiny random BertBackbone (offline), with its default dropout."""
    return tiny_bert(VOCABULARY, num_layers, LENGTH, seed=7)


def _bert_inputs(n, seed):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, LENGTH), "int32")
    mask[: n // 2, LENGTH - 3 :] = 0
    return {
        "token_ids": rng.integers(1, VOCABULARY, (n, LENGTH)).astype("int32") * mask,
        "segment_ids": np.zeros((n, LENGTH), "int32"),
        "padding_mask": mask,
    }


def _functional():
    """A small functional model with auto-named layers, dropout and a residual."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu")(inputs)
    h = keras.layers.Dropout(0.3)(h)
    h = keras.layers.Add()([h, keras.layers.Dense(32)(h)])
    outputs = keras.layers.Dense(24)(h)
    return keras.Model(inputs, outputs)


def _functional_inputs(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 16)).astype("float32")


# name: (make, inputs, include, block-wise epochs of "learned"); the
# block-wise pass, the costliest to compile, only on the small model.
MODELS = {
    "bert": (_bert, _bert_inputs, r"transformer_layer", 0),
    "functional": (_functional, _functional_inputs, None, 1),
}

CASES = {
    "svd-greedy": dict(method="svd", allocation="greedy"),
    "whitened-greedy": dict(method="whitened", allocation="greedy"),
    "whitened-uniform": dict(method="whitened", allocation="uniform"),
    "whitened-sensitivity-sequential": dict(
        method="whitened", allocation="sensitivity", whitening=WhitenedConfig(sequential=True)
    ),
    "learned": dict(method="learned", distillation_data=True),
}


@pytest.fixture(scope="module")
def models():
    built = {}
    for name, (make, inputs, include, _) in MODELS.items():
        model = make()
        model(inputs(2, 0))
        built[name] = (model, inputs(16, 1), inputs(16, 2), include)
    return built


def _unrelated_work():
    """What else a process does between two calls (see the module docstring)."""
    for _ in range(7):
        keras.layers.Dense(3)
    keras.random.normal((4,))  # the global SeedGenerator advances
    np.random.seed(12345)
    np.random.rand(3)
    other = keras.Sequential([keras.Input((12,)), keras.layers.Dense(20), keras.layers.Dense(20)])
    x = np.random.default_rng(9).normal(size=(40, 12)).astype("float32")
    # Another factorize (whitened: it collects calibration statistics and runs
    # the sequential refit; a distillation here would only add compile time).
    factorize(other, param_ratio=0.4, method="whitened", calibration_data=x)
    # Tensors created and freed: their ids become free for reuse.
    garbage = [keras.ops.ones((8, LENGTH, 32)) * i for i in range(20)]
    del garbage[::2]


def _call(model, calibration_data, distillation_data, include, case, block_epochs=1):
    kwargs = dict(CASES[case])
    if kwargs.pop("distillation_data", False):
        kwargs["distillation"] = DistillationConfig(
            data=distillation_data, epochs=1, block_epochs=block_epochs, batch_size=8
        )
    return factorize(
        model, param_ratio=0.5, calibration_data=calibration_data, include=include,
        batch_size=8, **kwargs,
    )


def _snapshot(new_model):
    report = new_model.factorization_report
    ranks = [(r.path, r.rank) for r in report.layers]
    return ranks, [np.array(keras.ops.convert_to_numpy(w)) for w in new_model.weights], report


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_identical_calls_give_identical_models(models, model_name, case):
    model, calibration_data, distillation_data, include = models[model_name]
    args = (model, calibration_data, distillation_data, include, case, MODELS[model_name][3])
    before = [np.array(w) for w in model.get_weights()]
    first = _snapshot(_call(*args))
    _unrelated_work()
    second = _snapshot(_call(*args))
    assert first[0] == second[0]  # ranks, layer by layer
    assert any(rank is not None for _, rank in first[0])
    assert len(first[1]) == len(second[1])
    for a, b in zip(first[1], second[1]):
        np.testing.assert_array_equal(a, b)
    assert first[2].output_errors == second[2].output_errors
    for a, b in zip(before, model.get_weights()):  # the original is untouched
        np.testing.assert_array_equal(a, b)


def test_seed_orders_the_distillation_batches(models):
    model, calibration_data, distillation_data, include = models["functional"]
    kwargs = dict(method="learned", calibration_data=calibration_data, rank=4,
                  # Nothing held out: the last epoch's factors, whatever it scored.
                  distillation=DistillationConfig(epochs=2, batch_size=4, validation_split=0))
    one = _snapshot(factorize(model, seed=1, **kwargs))
    again = _snapshot(factorize(model, seed=1, **kwargs))
    other = _snapshot(factorize(model, seed=2, **kwargs))
    for a, b in zip(one[1], again[1]):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(one[1], other[1]))
    assert one[2].settings["seed"] == 1 and other[2].settings["seed"] == 2
    # `seed=` is `DistillationConfig(seed=...)`.
    kwargs["distillation"] = DistillationConfig(epochs=2, batch_size=4, validation_split=0, seed=2)
    via_config = _snapshot(factorize(model, **kwargs))
    for a, b in zip(other[1], via_config[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", [1.5, "0", True, -1])
def test_bad_seed(models, seed):
    model = models["functional"][0]
    with pytest.raises(ValueError, match=r"Received an invalid value for `seed`.*Received: seed="):
        factorize(model, rank=2, seed=seed)


def test_calibration_statistics_are_each_layers_own_inputs():
    """Oracle: each layer's `X^T X` is that of the inputs it really received.

    The statistics cache was keyed by `id(inputs)`; a freed tensor's id, reused
    by a later layer's input in the same batch, gave that layer (the attention
    output projections of layers 1-3 of this model, on JAX) the statistics of
    another, and which ones depended on what the process had allocated before.
    """
    bert = _bert(num_layers=4)
    data = _bert_inputs(16, 3)
    _unrelated_work()
    copy = copying.copy_model(bert)
    targets, _ = selection.find_targets(copy, bert, selection.selection(include="transformer"))
    calibration.collect_statistics(bert, targets, data, 8)
    with blocks.capture_calls([t.original for t in targets]) as records:
        for batch in calibration.batches(data, 8):
            bert(batch, training=False)
    assert len(targets) == 24
    for t in targets:
        rows = np.concatenate([t.input_rows(r[0]) for r in records[id(t.original)]])
        gram = rows.astype(np.float64).T @ rows.astype(np.float64)
        np.testing.assert_allclose(t.stats.gram, gram, rtol=1e-4, atol=1e-3 * np.abs(gram).max(),
                                   err_msg=t.layer.path)


def test_calibration_cache_never_confuses_two_tensors():
    """A tensor freed within a batch and a later one at the same address (the
    same `id`) are two inputs: each layer gets the statistics of its own."""
    first, second = keras.layers.Dense(4), keras.layers.Dense(4)
    first.build((None, 8))
    second.build((None, 8))
    s1, s2 = data_aware.ActivationStatistics(8), data_aware.ActivationStatistics(8)
    rng = np.random.default_rng(0)
    x1, x2 = (rng.normal(size=(5, 8)).astype("float32") for _ in range(2))
    entries = [(first, s1, "same input width"), (second, s2, "same input width")]
    with calibration.recording_inputs(entries, lambda key, x: x.reshape(-1, 8)) as next_batch:
        next_batch()
        for _ in range(3):
            # Temporaries, freed after each call: CPython reuses their ids.
            first(keras.ops.convert_to_tensor(x1))
            second(keras.ops.convert_to_tensor(x2))
    for stats, x in ((s1, x1), (s2, x2)):
        x = x.astype(np.float64)
        np.testing.assert_allclose(stats.gram, 3 * x.T @ x, rtol=1e-5, atol=1e-5)
        assert stats.count == 15


def test_factorize_leaves_global_state_alone(models):
    model, calibration_data, distillation_data, include = models["functional"]
    policy = keras.config.dtype_policy().name
    _call(model, calibration_data, distillation_data, include, "learned")
    assert keras.config.dtype_policy().name == policy
    assert all(layer.trainable for layer in model._flatten_layers())
