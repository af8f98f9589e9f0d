"""The held-out data of `method="learned"`: split, kept-best factors, options."""

import dataclasses

import keras
import numpy as np
import pytest
from tiny_models import bert_inputs
from tiny_models import tiny_bert

from keras_factorized import factorize
from keras_factorized.surgery import DistillationConfig
from keras_factorized.surgery import WhitenedConfig
from keras_factorized.surgery.calibration import batches
from keras_factorized.surgery.distillation import filled_batches
from keras_factorized.surgery.distillation import joined_batches
from keras_factorized.surgery.distillation import split_held_out


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _linear_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16, name="d1"), keras.layers.Dense(16, name="d2")]
    )


def _rows(x):
    return {tuple(np.ravel(r)) for r in x}


@pytest.mark.parametrize("fraction, held", [(0.125, 5), (0.5, 20), (0.01, 1), (0.999, 39)])
def test_split_is_disjoint_complete_and_deterministic(fraction, held):
    x = np.arange(40 * 3, dtype="float32").reshape(40, 3)
    config = DistillationConfig(validation_split=fraction, seed=4)
    train, held_out, description = split_held_out(x, config)
    assert held_out.shape == (held, 3) and train.shape == (40 - held, 3)
    assert not _rows(train) & _rows(held_out)
    assert _rows(train) | _rows(held_out) == _rows(x)
    assert description == f"{held} of 40 distillation examples held out"
    again = split_held_out(x, config)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], held_out)


def test_split_follows_the_seed_and_keeps_dict_inputs_aligned():
    ids = np.arange(64).reshape(32, 2)
    data = {"token_ids": ids, "padding_mask": ids * 10}
    first = split_held_out(data, DistillationConfig(seed=0))[1]
    other = split_held_out(data, DistillationConfig(seed=1))[1]
    assert len(first["token_ids"]) == 4  # 0.125 of 32
    assert _rows(first["token_ids"]) != _rows(other["token_ids"])
    np.testing.assert_array_equal(first["padding_mask"], first["token_ids"] * 10)


def test_split_of_a_dataset_holds_out_whole_batches():
    tf = pytest.importorskip("tensorflow")
    x = np.arange(64 * 2, dtype="float32").reshape(64, 2)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(8)
    config = DistillationConfig(validation_split=0.25)
    train, held_out, description = split_held_out(dataset, config)
    assert description == "2 of 8 distillation batches held out"
    train_rows = np.concatenate(list(batches(train, 8)))
    held_rows = np.concatenate(list(batches(held_out, 8)))
    assert len(held_rows) == 16 and not _rows(train_rows) & _rows(held_rows)
    assert _rows(train_rows) | _rows(held_rows) == _rows(x)


def test_joined_batches_keep_a_two_input_batch_whole():
    # A two-input model's batch is a tuple: only a `tf.data.Dataset`'s
    # `(x, y)` elements are cut to `x`, never a tuple of inputs.
    a, b = np.zeros((5, 2)), np.ones((5, 3))
    joined = joined_batches([(a, b), (a[:2], b[:2])], 4)
    shapes = [tuple(x.shape for x in batch) for batch in batches(joined, 4)]
    assert shapes == [((4, 2), (4, 3)), ((1, 2), (1, 3)), ((2, 2), (2, 3))]


def test_filled_batches_have_one_size_and_hold_every_example():
    ids = np.arange(23 * 2).reshape(23, 2)
    data = {"token_ids": ids, "padding_mask": ids * 10}
    # A short batch in the middle, as joined calibration and distillation
    # data have when the calibration size is not a multiple of the batch size.
    cut = list(batches(data, 4))[:2] + list(batches(
        keras.tree.map_structure(lambda a: a[8:], data), 6))
    filled = filled_batches(cut)
    assert [len(b["token_ids"]) for b in filled] == [6, 6, 6, 6]
    rows = np.concatenate([b["token_ids"] for b in filled])
    np.testing.assert_array_equal(rows[:23], ids)  # every example, in order,
    np.testing.assert_array_equal(rows[23:], ids[:1])  # then the first again
    for b in filled:
        np.testing.assert_array_equal(b["padding_mask"], b["token_ids"] * 10)
    even = list(batches(ids, 4))[:5]
    assert filled_batches(even) is even
    # Batches that do not join (another sequence length) stay as they are.
    ragged = [np.zeros((4, 3)), np.zeros((2, 5))]
    assert filled_batches(ragged) is ragged


def test_training_steps_all_have_the_batch_size(monkeypatch):
    model = _linear_mlp()
    x = np.random.default_rng(3).normal(size=(21, 16)).astype("float32")
    sizes = []
    train_on_batch = keras.Model.train_on_batch

    def recorded(self, x, *args, **kwargs):
        sizes.append(len(x))
        return train_on_batch(self, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "train_on_batch", recorded)
    config = DistillationConfig(epochs=2, batch_size=8, validation_split=0, refit=False)
    factorize(model, rank=4, method="learned", calibration_data=x, distillation=config)
    assert sizes == [8] * 6


def test_nothing_held_out_without_a_split_or_with_one_example():
    x = np.ones((8, 2), "float32")
    assert split_held_out(x, DistillationConfig(validation_split=0.0)) == (x, None, None)
    assert split_held_out(x[:1], DistillationConfig())[1] is None


def test_validation_data_replaces_the_split():
    x, v = np.ones((8, 2), "float32"), np.zeros((3, 2), "float32")
    train, held_out, description = split_held_out(x, DistillationConfig(validation_data=v))
    assert train is x and held_out is v and description == "`validation_data`"


@pytest.mark.parametrize("value", [-0.1, 1, 1.5, float("nan"), True, "0.1", None])
def test_invalid_validation_split(value):
    with pytest.raises(ValueError) as info:
        DistillationConfig(validation_split=value)
    assert "`validation_split`, expected a number in [0, 1)" in str(info.value)
    assert f"Received: validation_split={value!r}" in str(info.value)


def _shifted_data(seed):
    """Calibration inputs in an 8-dimensional subspace; distillation inputs in
    all 16 dimensions: the whitened start fits only the subspace, so training
    on the distillation data has a clearly better solution to find."""
    rng = np.random.default_rng(seed)
    calibration = np.zeros((64, 16), "float32")
    calibration[:, :8] = rng.normal(size=(64, 8))
    distillation = rng.normal(size=(256, 16)).astype("float32")
    return calibration, distillation


def _held_out_error(model, small, x):
    return float(np.mean((_np(small(x)) - _np(model(x))) ** 2))


def test_distillation_improves_the_held_out_loss_it_reports():
    """Oracle: the held-out loss before and after, recomputed on the split
    that `split_held_out` gives; the split is new to the start."""
    model = _linear_mlp()
    calibration, data = _shifted_data(0)
    config = DistillationConfig(data=data, epochs=8, learning_rate=1e-2, batch_size=16)
    kwargs = dict(rank=6, calibration_data=calibration, whitening=WhitenedConfig(sequential=False))
    start = factorize(model, method="whitened", **kwargs)
    learned = factorize(model, method="learned", distillation=config, **kwargs)
    _, held_out, _ = split_held_out(data, config)
    assert not _rows(held_out) & _rows(calibration)
    before = _held_out_error(model, start, held_out)
    after = _held_out_error(model, learned, held_out)
    assert after < 0.8 * before
    note = learned.factorization_report.notes[-1]
    assert note.startswith("held-out loss (32 of 256 distillation examples held out)")
    reported = [float(v) for v in note.split(": ")[1].split(";")[0].split(", ")]
    np.testing.assert_allclose(reported[0], before, rtol=1e-3)
    np.testing.assert_allclose(min(reported), after, rtol=1e-3)
    assert "kept the factors of the start" not in note


@pytest.mark.parametrize("block_epochs", [0, 1])
def test_learned_never_returns_worse_than_its_start_on_validation_data(block_epochs):
    """A learning rate that wrecks the factors: the start comes back, measured
    on the given `validation_data`."""
    model = _linear_mlp()
    calibration, data = _shifted_data(1)
    validation = np.random.default_rng(7).normal(size=(32, 16)).astype("float32")
    config = DistillationConfig(
        data=data, epochs=1, block_epochs=block_epochs, learning_rate=5.0,
        validation_data=validation, refit=False,  # the start: the whitened factors
    )
    kwargs = dict(rank=4, calibration_data=calibration)
    start = factorize(model, method="whitened", **kwargs)
    wrecked = factorize(model, method="learned", distillation=config, **kwargs)
    assert _held_out_error(model, wrecked, validation) <= _held_out_error(
        model, start, validation
    ) * (1 + 1e-5)
    for a, b in zip(start.get_weights(), wrecked.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert "kept the factors of the start" in wrecked.factorization_report.notes[-1]


def test_without_held_out_data_the_last_epoch_is_kept():
    model = _linear_mlp()
    calibration, data = _shifted_data(2)
    config = DistillationConfig(data=data, epochs=1, learning_rate=5.0, validation_split=0.0)
    kwargs = dict(rank=4, calibration_data=calibration)
    start = factorize(model, method="whitened", **kwargs)
    wrecked = factorize(model, method="learned", distillation=config, **kwargs)
    assert not any("held-out" in n for n in wrecked.factorization_report.notes)
    assert _held_out_error(model, wrecked, data) > _held_out_error(model, start, data)


def test_compress_flags_reach_the_held_out_split(tmp_path, capsys):
    from keras_factorized import cli

    model = _linear_mlp()
    model.save(tmp_path / "m.keras")
    calibration, data = _shifted_data(3)
    np.save(tmp_path / "c.npy", calibration)
    np.save(tmp_path / "d.npy", data[:64])
    np.save(tmp_path / "v.npy", data[64:72])
    common = [
        "compress", tmp_path / "m.keras", "--rank", "4", "--method", "learned",
        "--calibration", tmp_path / "c.npy", "--distillation-data", tmp_path / "d.npy",
        "--distillation-epochs", "1", "-q", "--report", tmp_path / "r.json", "--overwrite",
    ]
    for extra, expected in [
        (["--validation-split", "0.25"], "16 of 64 distillation examples held out"),
        (["--validation-data", tmp_path / "v.npy"], "`validation_data`"),
    ]:
        out = tmp_path / "small.keras"
        code = cli.main([str(a) for a in [*common, *extra, "-o", out]])
        assert code == 0, capsys.readouterr().err
        assert expected in (tmp_path / "r.json").read_text()
    code = cli.main([str(a) for a in [*common, "--validation-split", "1", "-o", out]])
    assert code != 0
    assert "--validation-split" in capsys.readouterr().err


def test_refit_on_the_distillation_data_fits_what_calibration_missed():
    """Oracle: the calibration inputs span 8 of 16 dimensions, so the start
    knows nothing of the other 8; the closed-form refit on the distillation
    data too lowers the held-out error below the start's, without training."""
    model = _linear_mlp()
    calibration, data = _shifted_data(4)
    config = DistillationConfig(data=data, epochs=0, refit=True)
    kwargs = dict(rank=6, calibration_data=calibration)
    start = factorize(model, method="whitened", **kwargs)
    refit = factorize(model, method="learned", distillation=config, **kwargs)
    _, held_out, _ = split_held_out(data, config)
    assert _held_out_error(model, refit, held_out) < 0.95 * _held_out_error(model, start, held_out)
    note = refit.factorization_report.notes[-1]
    assert note.startswith("sequential refit on the calibration and distillation data held-out")
    assert note.endswith("kept")
    with pytest.raises(TypeError, match="`refit`"):
        DistillationConfig(refit=1)


@pytest.mark.parametrize("refit", [True, False])
def test_sequential_refit_runs_once(monkeypatch, refit):
    """With distillation data to refit on, the refit runs on the calibration
    and distillation rows together, and not first on the calibration rows
    alone (each layer would be fitted twice); with `refit=False`, on the
    calibration rows only."""
    from keras_factorized.surgery import sequential

    rows = []
    update = sequential.sequential_update

    def counted(model, new_model, targets, data, *args, **kwargs):
        rows.append(sum(len(b) for b in batches(data, 8)))
        return update(model, new_model, targets, data, *args, **kwargs)

    monkeypatch.setattr(sequential, "sequential_update", counted)
    calibration, data = _shifted_data(4)
    config = DistillationConfig(data=data, epochs=0, refit=refit)
    small = factorize(_linear_mlp(), rank=6, method="learned", calibration_data=calibration,
                      distillation=config)
    train, _, _ = split_held_out(data, config)
    assert rows == ([len(calibration) + len(train)] if refit else [len(calibration)])
    assert "sequential refit" in small.factorization_report.output_errors


def test_each_step_is_compiled_once_per_call(monkeypatch):
    """One `learned` call with a held-out split, a refit and block-wise
    epochs measures the held-out loss before and after the refit, the
    block-wise pass and every epoch with one compiled evaluation step (the
    teacher's held-out outputs computed once), and trains with one compiled
    train step, and one per block: each traced once. (On TensorFlow, state
    created inside the first trace made it trace twice.)"""
    from keras_factorized.surgery import blockwise
    from keras_factorized.surgery import distillation

    traced = {"train_step": 0, "test_step": 0, "block train_step": 0}

    def counting(name, key):
        real = getattr(keras.Model, name)

        def step(self, *args, **kwargs):
            traced[key] += 1
            return real(self, *args, **kwargs)

        return step

    for name in ("train_step", "test_step"):
        monkeypatch.setattr(distillation._Distiller, name, counting(name, name), raising=False)
    monkeypatch.setattr(blockwise._BlockRunner, "train_step",
                        counting("train_step", "block train_step"), raising=False)
    calibration, data = _shifted_data(6)
    config = DistillationConfig(data=data, epochs=2, block_epochs=1, batch_size=16)
    small = factorize(_linear_mlp(), rank=6, method="learned", calibration_data=calibration,
                      distillation=config)
    notes = " ".join(small.factorization_report.notes)
    assert "sequential refit on the calibration and distillation data held-out" in notes
    assert "block-wise held-out loss" in notes and "before and after each epoch" in notes
    assert traced == {"train_step": 1, "test_step": 1, "block train_step": 2}


def test_calibration_data_joins_the_training_data():
    # Batches of the calibration data, then of `data`: the same batches as
    # `data` holding both (both sizes are multiples of the batch size).
    model = _linear_mlp()
    rng = np.random.default_rng(5)
    calibration = rng.normal(size=(32, 16)).astype("float32")
    data = rng.normal(size=(48, 16)).astype("float32")
    common = dict(epochs=1, validation_split=0, refit=False, batch_size=16)

    def learned(distil_on, use_calibration_data):
        config = DistillationConfig(
            data=distil_on, use_calibration_data=use_calibration_data, **common
        )
        return factorize(
            model, rank=4, method="learned", calibration_data=calibration, distillation=config
        ).get_weights()

    joined = learned(data, True)
    both = learned(np.concatenate([calibration, data]), False)
    alone = learned(data, False)
    for a, b in zip(joined, both):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(joined, alone))


def _float_policies(model):
    from keras_factorized.surgery import walk

    return [layer.dtype_policy.name for _, _, layer, _ in walk.walk(model)]


def _held_out_losses(model):
    (note,) = [n for n in model.factorization_report.notes if "before and after each" in n]
    return note.split(": ")[1].split(";")[0].split(", ")


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_dtype_policy_trains_in_low_precision_and_restores_the_policies(monkeypatch, policy):
    """Both models compute in the policy during the epochs (the train step's
    outputs are 16-bit, float16 with a loss-scaling optimizer); afterwards
    every layer is back to float32, the variables never left it, and the
    factors learned what float32 training learns."""
    from keras_factorized.surgery import distillation

    seen = {}
    real_train = distillation._train

    def recording_train(distiller, inputs, targets, *args, **kwargs):
        y = distiller(inputs[0])[0]
        seen["output"] = keras.backend.standardize_dtype(y.dtype)
        seen["optimizer"] = type(distiller.optimizer).__name__
        return real_train(distiller, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(distillation, "_train", recording_train)
    model = _linear_mlp()
    calibration, data = _shifted_data(3)
    kwargs = dict(rank=6, calibration_data=calibration, whitening=WhitenedConfig(sequential=False))
    config = DistillationConfig(data=data, epochs=4, learning_rate=1e-2, batch_size=16)
    start = factorize(model, method="whitened", **kwargs)
    full = factorize(model, method="learned", distillation=config, **kwargs)
    assert seen == {"output": "float32", "optimizer": "Adam"}
    low = factorize(
        model, method="learned", distillation=dataclasses.replace(config, dtype_policy=policy),
        **kwargs,
    )
    assert seen["output"] == policy.split("_")[1]
    assert f"; computed in {policy})" in " ".join(low.factorization_report.notes)
    # The held-out losses are measured in float32 (comparable with each
    # other and with a float32 run's): the same start, the same number.
    assert _held_out_losses(low)[0] == _held_out_losses(full)[0]
    assert "computed in" not in " ".join(full.factorization_report.notes)
    assert seen["optimizer"] == ("LossScaleOptimizer" if policy == "mixed_float16" else "Adam")
    for m in (model, low):
        assert set(_float_policies(m)) == {"float32"}
        assert {v.dtype for v in m.weights} == {"float32"}
    _, held_out, _ = split_held_out(data, config)
    err_start, err_full, err_low = (_held_out_error(model, m, held_out) for m in (start, full, low))
    assert err_low < 0.8 * err_start
    assert err_low < 1.25 * err_full


def test_dtype_policies_come_back_when_training_fails(monkeypatch):
    from keras_factorized.surgery import distillation

    def failing_train(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(distillation, "_train", failing_train)
    model = _linear_mlp()
    calibration, data = _shifted_data(4)
    config = DistillationConfig(data=data, epochs=1, dtype_policy="mixed_bfloat16")
    with pytest.raises(RuntimeError, match="out of memory"):
        factorize(model, rank=4, method="learned", calibration_data=calibration,
                  distillation=config)
    assert set(_float_policies(model)) == {"float32"} and model.dtype_policy.name == "float32"


def test_computing_in_leaves_quantized_layers_alone():
    from keras_factorized.surgery.distillation import computing_in

    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, name="q"), keras.layers.Dense(4, name="f")]
    )
    model.get_layer("q").quantize("int8")
    before = _float_policies(model)
    with computing_in([model], "mixed_bfloat16"):
        assert model.get_layer("q").dtype_policy.name == before[0]
        assert model.get_layer("f").compute_dtype == "bfloat16"
        assert keras.backend.standardize_dtype(model(np.ones((2, 8))).dtype) == "bfloat16"
    assert _float_policies(model) == before


@pytest.mark.parametrize("value", ["float16", "bfloat16", "int8", 16])
def test_invalid_dtype_policy(value):
    with pytest.raises(ValueError, match="`dtype_policy`.*mixed_bfloat16"):
        DistillationConfig(dtype_policy=value)


def test_dtype_policy_with_token_noise_on_a_tiny_bert():
    """Token ids stay integers, the original's outputs on the noisy batches
    are computed in the policy too; the result computes in float32 again."""
    backbone = tiny_bert(seed=0)
    x = bert_inputs(48, seed=1)
    config = DistillationConfig(epochs=1, batch_size=8, dtype_policy="mixed_bfloat16")
    small = factorize(backbone, param_ratio=0.5, method="learned", calibration_data=x,
                      distillation=config, include="transformer_layer")
    assert "15% of the tokens replaced" in " ".join(small.factorization_report.notes)
    assert set(_float_policies(small)) == {"float32"}
    out = small(x)["sequence_output"]
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.all(np.isfinite(_np(out)))


@pytest.mark.parametrize(
    "losses, kept",
    [
        ([1.0, float("nan"), 0.5, float("nan")], 2),  # a diverged epoch is never kept
        ([1.0, float("nan"), float("nan"), float("nan")], 0),  # nor compared as a minimum
        ([float("nan"), 2.0, 3.0, 2.0], 3),  # a nan start loses to any number; ties: later
        ([1.0, 1.5, 0.7, 0.9], 2),
    ],
)
def test_the_kept_epoch_is_the_lowest_finite_held_out_loss(monkeypatch, losses, kept):
    """What `distill` keeps and what the report says it kept are one epoch,
    whatever the held-out losses (`np.argmin` would pick a nan)."""
    from keras_factorized.surgery import distillation

    queue = list(losses)
    monkeypatch.setattr(distillation, "_mean_loss", lambda *a: queue.pop(0))
    after_epoch = []  # one step per epoch: the weights after each
    real_train = distillation._train

    def recording_train(distiller, *args, **kwargs):
        real_step = distiller.train_on_batch

        def step(*a, **k):
            out = real_step(*a, **k)
            after_epoch.append([np.array(_np(v)) for v in distiller.student.trainable_weights])
            return out

        distiller.train_on_batch = step
        return real_train(distiller, *args, **kwargs)

    monkeypatch.setattr(distillation, "_train", recording_train)
    model = _linear_mlp()
    calibration, data = _shifted_data(5)
    config = DistillationConfig(data=data, epochs=3, batch_size=256, refit=False,
                                use_calibration_data=False, validation_data=calibration[:8])
    kwargs = dict(rank=4, calibration_data=calibration)
    start = factorize(model, method="whitened", **kwargs)
    small = factorize(model, method="learned", distillation=config, **kwargs)
    assert not queue and len(after_epoch) == 3
    note = small.factorization_report.notes[-1]
    assert note.endswith("the start" if kept == 0 else f"epoch {kept}")
    expected = (
        [_np(v) for v in start.trainable_weights] if kept == 0 else after_epoch[kept - 1]
    )
    for a, b in zip(expected, small.trainable_weights, strict=True):
        np.testing.assert_array_equal(a, _np(b))
