"""`LazyAdam`: row-sparse Adam against a NumPy oracle, Adam, and round trips."""

import os

import keras
import numpy as np
import pytest

from keras_factorized import FactorizedEmbedding
from keras_factorized import LazyAdam

TENSORFLOW = keras.backend.backend() == "tensorflow"
tf_only = pytest.mark.skipif(
    not TENSORFLOW, reason="sparse (IndexedSlices) gradients exist on TensorFlow only"
)


def lazy_adam_oracle(var, steps, lr, beta_1, beta_2, epsilon, amsgrad=False, clip=None):
    """TF Addons' LazyAdam in NumPy, float64: only the touched rows change.

    `clip`: `(name, value)` of Keras's clipping, applied to the dense gradient.
    """
    var = var.astype(np.float64).copy()
    m, v, v_hat = (np.zeros_like(var) for _ in range(3))
    for t, (indices, values) in enumerate(steps, start=1):
        rows = np.unique(indices)
        grad = np.zeros_like(var)
        np.add.at(grad, indices, values)  # repeated ids add up
        if clip and clip[0] in ("clipnorm", "global_clipnorm"):
            grad *= min(1.0, clip[1] / np.linalg.norm(grad))
        elif clip:
            grad = np.clip(grad, -clip[1], clip[1])
        g = grad[rows]
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        m[rows] = beta_1 * m[rows] + (1 - beta_1) * g
        v[rows] = beta_2 * v[rows] + (1 - beta_2) * g**2
        second = v[rows]
        if amsgrad:
            v_hat[rows] = np.maximum(v_hat[rows], v[rows])
            second = v_hat[rows]
        var[rows] -= alpha * m[rows] / (np.sqrt(second) + epsilon)
    return var, m, v


def _random_steps(rng, rows, width, count=4, batch=6):
    steps = []
    for _ in range(count):
        indices = rng.integers(0, rows, size=batch)
        indices[1] = indices[0]  # a repeated id in every step
        steps.append((indices, rng.normal(size=(batch, width)).astype("float32")))
    return steps


@tf_only
@pytest.mark.parametrize("amsgrad,clip", [
    (False, None), (True, None), (False, ("clipnorm", 0.5)),
    (False, ("global_clipnorm", 0.5)), (False, ("clipvalue", 0.3)),
])
def test_sparse_steps_match_the_lazy_adam_oracle(amsgrad, clip):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    initial = rng.normal(size=(20, 3)).astype("float32")
    steps = _random_steps(rng, 20, 3)
    variable = keras.Variable(initial)
    optimizer = LazyAdam(learning_rate=0.05, beta_1=0.8, beta_2=0.95, epsilon=1e-3,
                         amsgrad=amsgrad, **dict([clip] if clip else []))
    for indices, values in steps:
        grad = tf.IndexedSlices(tf.constant(values), tf.constant(indices, dtype="int64"),
                                tf.constant([20, 3], dtype="int64"))
        optimizer.apply([grad], [variable])
    expected, m, v = lazy_adam_oracle(initial, steps, 0.05, 0.8, 0.95, 1e-3, amsgrad, clip)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), expected, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(optimizer._momentums[0]), m,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(optimizer._velocities[0]), v,
                               rtol=1e-5, atol=1e-7)
    untouched = np.setdiff1d(np.arange(20), np.concatenate([s[0] for s in steps]))
    assert untouched.size > 0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable)[untouched],
                                  initial[untouched])


@tf_only
def test_sparse_step_differs_from_adam_only_on_untouched_rows():
    """Adam keeps moving a row with old momentum; LazyAdam leaves it alone."""
    import tensorflow as tf

    initial = np.ones((4, 2), dtype="float32")
    lazy, dense = keras.Variable(initial), keras.Variable(initial)
    lazy_opt, dense_opt = LazyAdam(0.1), keras.optimizers.Adam(0.1)
    for rows in ([0, 1], [1, 2]):
        grad = tf.IndexedSlices(tf.ones((2, 2)), tf.constant(rows), tf.constant([4, 2]))
        lazy_opt.apply([grad], [lazy])
        dense_opt.apply([grad], [dense])
    lazy, dense = keras.ops.convert_to_numpy(lazy), keras.ops.convert_to_numpy(dense)
    np.testing.assert_allclose(lazy[1:3], dense[1:3], rtol=1e-5)  # touched at step 2
    np.testing.assert_array_equal(lazy[3], initial[3])  # never touched
    assert np.all(lazy[0] > dense[0])  # Adam moved row 0 again at step 2


@pytest.mark.parametrize("amsgrad", [False, True])
def test_dense_gradients_give_adam_exactly(amsgrad):
    rng = np.random.default_rng(1)
    initial = rng.normal(size=(6, 5)).astype("float32")
    lazy, dense = keras.Variable(initial), keras.Variable(initial)
    lazy_opt = LazyAdam(0.01, amsgrad=amsgrad)
    dense_opt = keras.optimizers.Adam(0.01, amsgrad=amsgrad)
    for _ in range(3):
        grad = rng.normal(size=(6, 5)).astype("float32")
        lazy_opt.apply([keras.ops.convert_to_tensor(grad)], [lazy])
        dense_opt.apply([keras.ops.convert_to_tensor(grad)], [dense])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(lazy),
                                  keras.ops.convert_to_numpy(dense))


def test_config_round_trip_keeps_every_argument():
    optimizer = LazyAdam(learning_rate=0.02, beta_1=0.7, beta_2=0.9, epsilon=1e-4,
                         amsgrad=True, clipnorm=2.0, name="lazy")
    config = keras.optimizers.serialize(optimizer)
    assert config["registered_name"] == "keras_factorized>LazyAdam"
    restored = keras.optimizers.deserialize(config)
    assert type(restored) is LazyAdam
    assert restored.get_config() == optimizer.get_config()
    expected = {"learning_rate": 0.02, "beta_1": 0.7, "beta_2": 0.9, "epsilon": 1e-4,
                "amsgrad": True, "clipnorm": 2.0, "name": "lazy"}
    assert {k: restored.get_config()[k] for k in expected} == pytest.approx(expected)


def _model(rows=500):
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        FactorizedEmbedding(rows, 8, rank=3, name="table"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(1),
    ])


def test_factorized_embedding_model_trains_and_saves(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(64, 6)).astype("int32")  # rows >= 50 never seen
    y = (x[:, :1] % 2).astype("float32")
    model = _model()
    model.compile(optimizer=LazyAdam(0.05), loss="mse")
    unseen = keras.ops.convert_to_numpy(model.get_layer("table").embeddings_a)[50:].copy()
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    after = keras.ops.convert_to_numpy(model.get_layer("table").embeddings_a)[50:]
    if TENSORFLOW:
        np.testing.assert_array_equal(after, unseen)  # lazy: untouched rows stay
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored.optimizer) is LazyAdam
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    restored.fit(x, y, epochs=1, batch_size=16, verbose=0)  # optimizer state restored


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_take_rows_matches_take_with_negative_ids(dtype):
    from keras_factorized.row_lookup import take_rows

    values = np.arange(40).reshape(10, 4).astype(dtype)
    table = keras.Variable(values, dtype=dtype, trainable=False)
    ids = np.array([[0, 9, -1], [3, -10, 5]], dtype="int32")
    got = keras.ops.convert_to_numpy(take_rows(table, ids))
    np.testing.assert_array_equal(got, np.take(values, ids, axis=0))
    assert got.dtype == values.dtype


@tf_only
def test_take_rows_gradient_stays_sparse():
    """The lookup reads only its rows: the gradient is `IndexedSlices`."""
    import tensorflow as tf

    from keras_factorized.row_lookup import take_rows

    table = keras.Variable(np.ones((1000, 3), dtype="float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(take_rows(table, tf.constant([1, 5, 5])))
    (grad,) = tape.gradient(loss, [table.value])
    assert isinstance(grad, tf.IndexedSlices)
    np.testing.assert_array_equal(tf.convert_to_tensor(grad).numpy()[[1, 5]], [[1] * 3, [2] * 3])
