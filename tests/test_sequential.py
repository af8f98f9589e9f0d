"""Propagation-aware factorization: sequential closed-form updates and the
sensitivity rank allocation, with oracles on small models."""

import keras
import numpy as np
import pytest

from keras_factorized import factorize
from keras_factorized.data_aware import fitted_factors
from keras_factorized.data_aware import whitened_svd
from keras_factorized.surgery import WhitenedConfig


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _inputs(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * np.linspace(0.05, 2.0, dim)[None, :]
    return (rng.normal(size=(n, dim)) @ mixing).astype("float32")


def _linear_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((24,)),
            keras.layers.Dense(24, name="d1"),
            keras.layers.Dense(24, name="d2"),
            keras.layers.Dense(24, name="d3"),
        ]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitted_factors_are_the_least_squares_optimum(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 10)) * np.linspace(0.2, 2, 10)
    x_student = x + 0.5 * rng.normal(size=x.shape)
    w = rng.normal(size=(10, 7))
    a, b = fitted_factors(w, x_student.T @ x_student, x_student.T @ x, 3, damping=0.0)
    best = np.linalg.norm(x_student @ a @ b - x @ w)
    # The optimum by an independent route: project the targets onto the
    # column space of X', then Eckart-Young on the projection.
    q, _ = np.linalg.qr(x_student)
    u, s, vt = np.linalg.svd(q.T @ (x @ w), full_matrices=False)
    projected = q @ (u[:, :3] * s[:3]) @ vt[:3]
    oracle = np.linalg.norm(projected - x @ w)
    np.testing.assert_allclose(best, oracle, rtol=1e-6)
    for _ in range(20):  # and no random rank-3 product does better
        a_r, b_r = rng.normal(size=(10, 3)), rng.normal(size=(3, 7))
        assert np.linalg.norm(x_student @ a_r @ b_r - x @ w) >= best


def test_fitted_factors_on_the_original_inputs_are_the_whitened_factors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)) * np.linspace(0.2, 2, 8)
    w = rng.normal(size=(8, 6))
    a, b = fitted_factors(w, x.T @ x, x.T @ x, 2, damping=0.01)
    a0, b0 = whitened_svd(w, x.T @ x, damping=0.01).factors(2)
    np.testing.assert_allclose(a @ b, a0 @ b0, atol=1e-8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "`rank`"),
        (dict(rank=9), "`rank`"),
        (dict(input_gram=np.eye(3)), "`input_gram`"),
        (dict(cross=np.eye(3)), "`cross`"),
    ],
)
def test_fitted_factors_invalid_arguments(kwargs, match):
    args = dict(kernel=np.ones((8, 8)), input_gram=np.eye(8), cross=np.eye(8), rank=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fitted_factors(args.pop("kernel"), args.pop("input_gram"), args.pop("cross"), **args)


def test_sequential_update_never_increases_the_error_of_a_linear_model():
    # A linear chain: each refit layer is the least-squares optimum for what
    # the compressed layers before it feed it, so the last layer's output, the
    # model's output, can only get closer to the original.
    model = _linear_mlp()
    x = _inputs(512, 24)
    expected = _np(model(x))
    kwargs = dict(rank=4, method="whitened", calibration_data=x)
    plain = factorize(model, whitening=WhitenedConfig(damping=1e-6, sequential=False), **kwargs)
    refit = factorize(model, whitening=WhitenedConfig(damping=1e-6, sequential=True), **kwargs)
    err_plain = np.linalg.norm(_np(plain(x)) - expected)
    err_refit = np.linalg.norm(_np(refit(x)) - expected)
    assert err_refit <= err_plain * (1 + 1e-5)
    # and on this chain, clearly better (4.5% on JAX, more on TensorFlow: the
    # initial weights differ by backend)
    assert err_refit < 0.98 * err_plain
    notes = {r.note for r in refit.factorization_report.factorized}
    assert notes == {"whitened, sequential"}


def test_sequential_update_at_the_exact_rank_reproduces_the_model():
    model = _linear_mlp()
    rng = np.random.default_rng(1)
    for layer in model.layers:
        layer.kernel.assign(rng.normal(size=(24, 3)) @ rng.normal(size=(3, 24)) / 8)
    x = _inputs(128, 24)
    small = factorize(
        model,
        rank=3,
        method="whitened",
        calibration_data=x,
        whitening=WhitenedConfig(sequential=True),
    )
    np.testing.assert_allclose(_np(small(x)), _np(model(x)), atol=1e-3)


def test_sequential_update_on_a_keras_hub_backbone():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    bert = keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 100, size=(32, 16)).astype("int32"),
        "segment_ids": np.zeros((32, 16), "int32"),
        "padding_mask": np.ones((32, 16), "int32"),
    }
    expected = _np(bert(x)["sequence_output"])
    kwargs = dict(param_ratio=0.5, method="whitened", calibration_data=x, allocation="uniform")
    plain = factorize(bert, whitening=WhitenedConfig(sequential=False), **kwargs)
    refit = factorize(bert, whitening=WhitenedConfig(sequential=True), **kwargs)
    assert isinstance(refit, keras_hub.models.BertBackbone)
    err_plain = np.linalg.norm(_np(plain(x)["sequence_output"]) - expected)
    err_refit = np.linalg.norm(_np(refit(x)["sequence_output"]) - expected)
    assert err_refit < err_plain


def test_sensitivity_allocation_meets_the_budget_and_beats_uniform_on_a_chain():
    # The middle layer's errors are amplified by a large last layer: the
    # sensitivity allocation must see it, the per-layer greedy cannot.
    model = _linear_mlp()
    model.get_layer("d3").kernel.assign(_np(model.get_layer("d3").kernel) * 10.0)
    x = _inputs(256, 24)
    expected = _np(model(x))
    # (the allocation alone: without the sequential refit, which on this
    # chain repairs most of what the uniform ratio gets wrong)
    kwargs = dict(
        param_ratio=0.4,
        method="whitened",
        calibration_data=x,
        whitening=WhitenedConfig(sequential=False),
    )
    errors, ratios = {}, {}
    for allocation in ("uniform", "greedy", "sensitivity"):
        small = factorize(model, allocation=allocation, **kwargs)
        errors[allocation] = np.linalg.norm(_np(small(x)) - expected)
        ratios[allocation] = small.factorization_report.param_ratio
    # The budget is met: not exceeded, and less than one rank step (48 of
    # the 1,728 weights) left unspent.
    assert 0.4 - 48 / 1728 < ratios["sensitivity"] <= 0.4
    assert errors["sensitivity"] < errors["uniform"]


def test_sensitivity_allocation_needs_calibration_data():
    with pytest.raises(ValueError, match="`calibration_data`"):
        factorize(_linear_mlp(), param_ratio=0.5, allocation="sensitivity")


def test_identical_calls_give_identical_models():
    model = _linear_mlp()
    x = _inputs(128, 24)
    kwargs = dict(
        param_ratio=0.5,
        method="whitened",
        calibration_data=x,
        allocation="sensitivity",
        whitening=WhitenedConfig(sequential=True),
    )
    first = factorize(model, **kwargs)
    factorize(_linear_mlp(seed=3), rank=2)  # something else in between
    second = factorize(model, **kwargs)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_learned_never_returns_worse_than_its_start_on_held_out_data():
    from keras_factorized.surgery import DistillationConfig

    model = _linear_mlp()
    x, held_out = _inputs(128, 24, seed=0), _inputs(128, 24, seed=1)
    kwargs = dict(rank=3, calibration_data=held_out)
    start = factorize(model, method="whitened", **kwargs)
    # A learning rate that wrecks the factors: the start must come back.
    wrecked = factorize(
        model,
        method="learned",
        # refit=False: the start is then the whitened factors.
        distillation=DistillationConfig(data=x, epochs=2, learning_rate=5.0, refit=False),
        **kwargs,
    )
    expected = _np(model(held_out))
    err_start = np.linalg.norm(_np(start(held_out)) - expected)
    err_wrecked = np.linalg.norm(_np(wrecked(held_out)) - expected)
    assert err_wrecked <= err_start * (1 + 1e-5)
    assert "kept the factors of the start" in wrecked.factorization_report.notes[-1]


def test_blockwise_distillation_lowers_each_block_error():
    keras_hub = pytest.importorskip("keras_hub")
    from keras_factorized.surgery import DistillationConfig

    keras.utils.set_random_seed(0)
    bert = keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 100, size=(64, 16)).astype("int32"),
        "segment_ids": np.zeros((64, 16), "int32"),
        "padding_mask": np.ones((64, 16), "int32"),
    }
    expected = _np(bert(x)["sequence_output"])
    kwargs = dict(rank=4, calibration_data=x, include="transformer_layer")
    start = factorize(bert, method="whitened", **kwargs)
    config = DistillationConfig(epochs=0, block_epochs=20, learning_rate=1e-2, batch_size=16)
    trained = factorize(bert, method="learned", distillation=config, **kwargs)
    assert isinstance(trained, keras_hub.models.BertBackbone)
    assert "block-wise distillation" in trained.factorization_report.notes[0]
    err_start = np.linalg.norm(_np(start(x)["sequence_output"]) - expected)
    err_trained = np.linalg.norm(_np(trained(x)["sequence_output"]) - expected)
    assert err_trained < err_start


def test_blockwise_distillation_is_undone_when_it_hurts_held_out_data():
    from keras_factorized.surgery import DistillationConfig

    model = _linear_mlp()
    x, held_out = _inputs(128, 24, seed=0), _inputs(128, 24, seed=1)
    kwargs = dict(rank=3, calibration_data=held_out)
    start = factorize(model, method="whitened", **kwargs)
    config = DistillationConfig(
        data=x, epochs=0, block_epochs=2, learning_rate=5.0, refit=False
    )
    wrecked = factorize(model, method="learned", distillation=config, **kwargs)
    for a, b in zip(start.get_weights(), wrecked.get_weights()):
        np.testing.assert_allclose(a, b)
    assert wrecked.factorization_report.notes[-1].endswith("undone")


def test_sequential_refit_is_the_default():
    # The refit only ever lowers each layer's calibration error (it keeps a
    # layer's factors where the refit would fit worse), so it is on by default.
    assert WhitenedConfig().sequential and WhitenedConfig().residual
    model = _linear_mlp()
    x = _inputs(256, 24)
    small = factorize(model, rank=4, method="whitened", calibration_data=x)
    notes = {r.note for r in small.factorization_report.factorized}
    assert notes == {"whitened, sequential"}


def test_distillation_time_budget_stops_training():
    from keras_factorized.surgery import DistillationConfig

    model = _linear_mlp()
    x, held_out = _inputs(256, 24, seed=0), _inputs(64, 24, seed=1)
    config = DistillationConfig(data=x, epochs=50, batch_size=8, time_budget=1e-6)
    small = factorize(
        model, rank=3, method="learned", calibration_data=held_out, distillation=config
    )
    # One step, then the budget is spent: one epoch recorded of the 50.
    history = [n for n in small.factorization_report.notes if n.startswith("distillation loss")]
    assert len(history[0].split(":")[1].split(",")) == 1


@pytest.mark.parametrize("budget", [0, -1.0, True, "10"])
def test_invalid_time_budget(budget):
    from keras_factorized.surgery import DistillationConfig

    with pytest.raises(ValueError, match="`time_budget`"):
        DistillationConfig(time_budget=budget)
