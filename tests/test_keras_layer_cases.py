"""Keras's own layer test cases, run against the factorized layers at full rank.

The cases of Keras's `layers/core/embedding_test.py`, `dense_test.py` and
`einsum_dense_test.py` that apply to a layer whose weight matrix is `A @ B`:
correctness, sparse and ragged inputs, masks, constraints, regularizers,
dtype policies, `.keras` save/load and config round trips, and the einsum
equations of `einsum_dense_test.py` whose kernel is a matrix (each kernel axis
contracted with the input or only in the output).

At full rank `A @ B` equals the counterpart's weight, so every factorized layer
is compared with the Keras layer holding the same merged weights: a drop-in
replacement must give the same outputs on every input Keras accepts.
"""

import inspect
import math
import os

import keras
import numpy as np
import pytest
from absl.testing import parameterized
from keras import ops

from keras_factorized import FactorizedEmbedding
from keras_factorized import LowRankDense
from keras_factorized import LowRankEinsumDense
from keras_factorized import _keras_compat

BACKEND = keras.backend.backend()

requires_tf = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="tf.RaggedTensor / tf.SparseTensor inputs exist only on the TensorFlow backend",
)
requires_sparse = pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"),
    reason="sparse tensors are supported by Keras on TensorFlow and JAX only",
)

LAYER_KINDS = ("embedding", "dense", "einsum_dense")


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# Pairs: a Keras layer with random weights and its full-rank factorized copy.


def _keras_layer(kind, dtype=None, **kwargs):
    """A built Keras layer with random weights, and an input for it."""
    rng = _rng(1)
    if kind == "embedding":
        layer = keras.layers.Embedding(10, 4, dtype=dtype, **kwargs)
        layer.build()
        x = rng.integers(0, 10, size=(3, 5)).astype("int32")
    elif kind == "dense":
        layer = keras.layers.Dense(5, activation="tanh", dtype=dtype, **kwargs)
        layer.build((None, 6))
        x = rng.normal(size=(3, 6)).astype("float32")
    else:
        layer = keras.layers.EinsumDense(
            "abc,cde->abde", (None, 2, 3), bias_axes="de", dtype=dtype, **kwargs
        )
        layer.build((None, 4, 5))
        x = rng.normal(size=(2, 4, 5)).astype("float32")
    for weight in layer.weights:
        value = rng.normal(scale=0.5, size=tuple(weight.shape))
        weight.assign(value.astype(weight.dtype))
    return layer, x


FULL_RANK = {"embedding": 4, "dense": 5, "einsum_dense": 5}


def _factorize(kind, layer, **kwargs):
    """The full-rank factorized copy, through the historical `from_*` names."""
    rank = FULL_RANK[kind]
    if kind == "embedding":
        return FactorizedEmbedding.from_embedding(layer, rank=rank, **kwargs)
    if kind == "dense":
        return LowRankDense.from_dense(layer, rank=rank, **kwargs)
    return LowRankEinsumDense.from_einsum_dense(layer, rank=rank, **kwargs)


def _pair(kind, dtype=None, **kwargs):
    keras_layer, x = _keras_layer(kind, dtype=dtype)
    return _factorize(kind, keras_layer, **kwargs), keras_layer, x


def _factor_variables(layer):
    names = {
        FactorizedEmbedding: ("embeddings_a", "embeddings_b"),
        LowRankDense: ("kernel_a", "kernel_b"),
        LowRankEinsumDense: ("kernel_a", "kernel_b"),
    }[type(layer)]
    return tuple(getattr(layer, name) for name in names)


def _fresh_layer(kind, **kwargs):
    """An unbuilt full-rank factorized layer, and an input for it."""
    rng = _rng(2)
    if kind == "embedding":
        layer = FactorizedEmbedding(10, 4, rank=4, **kwargs)
        x = rng.integers(0, 10, size=(3, 5)).astype("int32")
    elif kind == "dense":
        layer = LowRankDense(5, rank=5, **kwargs)
        x = rng.normal(size=(3, 6)).astype("float32")
    else:
        layer = LowRankEinsumDense("abc,cde->abde", (None, 2, 3), rank=5, bias_axes="de", **kwargs)
        x = rng.normal(size=(2, 4, 5)).astype("float32")
    return layer, x


def _model_around(layer, x):
    dtype = "int32" if x.dtype.kind == "i" else "float32"
    inputs = keras.Input(shape=x.shape[1:], dtype=dtype)
    return keras.Model(inputs, layer(inputs))


def _fit_one_step(model, x, learning_rate=0.5):
    y = _np(model(x))
    target = y + _rng(3).normal(size=y.shape).astype(y.dtype)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    model.fit(x, target, epochs=1, batch_size=len(x), verbose=0)


# ---------------------------------------------------------------------------
# run_layer_test: build, symbolic call, config round trip, a training step and
# the mixed_float16 dtype check of Keras's own tests.


class EmbeddingLayerCasesTest(_keras_compat.testing_test_case()):
    def test_embedding_basics(self):
        self.run_layer_test(
            FactorizedEmbedding,
            {"input_dim": 4, "output_dim": 3, "rank": 3},
            input_shape=(2,),
            input_dtype="int32",
            expected_output_shape=(2, 3),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=False,
        )
        self.run_layer_test(
            FactorizedEmbedding,
            {"input_dim": 5, "output_dim": 4, "rank": 4, "mask_zero": True},
            input_shape=(2, 3),
            input_dtype="int64",
            expected_output_shape=(2, 3, 4),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=True,
        )

    @requires_tf
    def test_sparse(self):
        self.run_layer_test(
            FactorizedEmbedding,
            {"input_dim": 5, "output_dim": 4, "rank": 4},
            input_shape=(2, 3),
            input_dtype="int32",
            input_sparse=True,
            expected_output_shape=(2, 3, 4),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=False,
        )

    @requires_tf
    def test_ragged(self):
        self.run_layer_test(
            FactorizedEmbedding,
            {"input_dim": 5, "output_dim": 4, "rank": 4},
            input_shape=(2, 3),
            input_dtype="int32",
            input_ragged=True,
            expected_output_shape=(2, None, 4),
            expected_output_ragged=True,
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=False,
        )


class DenseLayerCasesTest(_keras_compat.testing_test_case()):
    def test_dense_basics(self):
        self.run_layer_test(
            LowRankDense,
            init_kwargs={
                "units": 4,
                "rank": 3,
                "activation": "relu",
                "kernel_a_initializer": "random_uniform",
                "bias_initializer": "ones",
                "use_bias": False,
            },
            input_shape=(2, 3),
            expected_output_shape=(2, 4),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=True,
        )
        self.run_layer_test(
            LowRankDense,
            init_kwargs={
                "units": 5,
                "rank": 4,
                "activation": "sigmoid",
                "kernel_a_regularizer": "l2",
                "kernel_b_regularizer": "l2",
                "bias_regularizer": "l2",
            },
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 5),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=3,  # three regularizers: A, B and the bias.
            supports_masking=True,
        )

    @requires_sparse
    def test_dense_sparse(self):
        self.run_layer_test(
            LowRankDense,
            init_kwargs={"units": 4, "rank": 3},
            input_shape=(2, 3),
            input_sparse=True,
            expected_output_shape=(2, 4),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
        )


# Keras's `test_einsum_dense_basics` cases whose kernel is a matrix (`ab,b->a`,
# `i,d->id` and `...bc,bc->...b` are not: no output axis, no contracted axis,
# an axis shared by input, kernel and output), plus the attention output.
# (name, equation, bias_axes, input_shape, output_shape, kernel_shape,
#  bias_shape, full_output_shape)
EINSUM_CASES = [
    ("2d_middle_weight", "ab,bc->ac", None, (2, 32), (64,), (32, 64), None, (2, 64)),
    ("3d_bert", "abc,cde->abde", None, (2, 1, 2), (1, 3, 4), (2, 3, 4), None, (2, 1, 3, 4)),
    ("3d_3_bias", "abc,cde->abde", "e", (2, 1, 2), (1, 3, 4), (2, 3, 4), (4,), (2, 1, 3, 4)),
    ("3d_2_bias", "abc,cde->abde", "d", (2, 1, 2), (1, 3, 4), (2, 3, 4), (3, 1), (2, 1, 3, 4)),
    (
        "3d_1_3_bias",
        "abc,cde->abde",
        "be",
        (2, 7, 2),
        (7, 3, 4),
        (2, 3, 4),
        (7, 1, 4),
        (2, 7, 3, 4),
    ),
    ("3d_bert_projection", "BFNH,NHD->BFD", None, (2, 1, 2, 3), (1, 4), (2, 3, 4), None, (2, 1, 4)),
    ("attention_output", "abcd,cde->abe", "e", (2, 5, 2, 3), (5, 4), (2, 3, 4), (4,), (2, 5, 4)),
    ("2d_bert", "abc,cd->abd", None, (2, 1, 2), (1, 4), (2, 4), None, (2, 1, 4)),
    ("xlnet_lm", "ibd,nd->ibn", None, (2, 2, 1), (2, 2), (2, 1), None, (2, 2, 2)),
    ("2d_precast", "...b,bc->...c", None, (2, 32), (64,), (32, 64), None, (2, 64)),
    (
        "2d_precast_multiple_elided_dims",
        "...b,bc->...c",
        None,
        (2, 3, 32),
        (64,),
        (32, 64),
        None,
        (2, 3, 64),
    ),
    ("3d_precast", "...c,cde->...de", None, (2, 1, 2), (3, 4), (2, 3, 4), None, (2, 1, 3, 4)),
    ("3d_precast_3_bias", "...c,cde->...de", "e", (2, 1, 2), (3, 4), (2, 3, 4), (4,), (2, 1, 3, 4)),
    (
        "3d_precast_2_bias",
        "...c,cde->...de",
        "d",
        (2, 1, 2),
        (3, 4),
        (2, 3, 4),
        (3, 1),
        (2, 1, 3, 4),
    ),
    (
        "3d_precast_2_3_bias",
        "...c,cde->...de",
        "de",
        (2, 1, 2),
        (3, 4),
        (2, 3, 4),
        (3, 4),
        (2, 1, 3, 4),
    ),
    ("2d_postcast", "bc...,cd->bd...", None, (2, 1, 2, 3), (4,), (1, 4), None, (2, 4, 2, 3)),
    ("2d_postcast_ab", "ab...,bc->ac...", None, (2, 3, 4), (5,), (3, 5), None, (2, 5, 4)),
    ("3d_postcast", "bc...,cde->bde...", None, (2, 1, 2), (3, 4), (1, 3, 4), None, (2, 3, 4, 2)),
    (
        "3d_postcast_1_bias",
        "bc...,cde->bde...",
        "d",
        (2, 1, 2),
        (3, 4),
        (1, 3, 4),
        (3, 1, 1),
        (2, 3, 4, 2),
    ),
    (
        "3d_postcast_2_bias",
        "bc...,cde->bde...",
        "e",
        (2, 1, 2),
        (3, 4),
        (1, 3, 4),
        (4, 1),
        (2, 3, 4, 2),
    ),
    (
        "3d_postcast_1_2_bias",
        "bc...,cde->bde...",
        "de",
        (2, 1, 2),
        (3, 4),
        (1, 3, 4),
        (3, 4, 1),
        (2, 3, 4, 2),
    ),
]


def _einsum_full_rank(equation, kernel_shape):
    """`min(m, n)` of the kernel matricized as contracted x output axes."""
    inputs, rest = equation.replace("...", "").split(",")
    weights, _ = rest.split("->")
    contracted = [d for c, d in zip(weights, kernel_shape) if c in inputs]
    outputs = [d for c, d in zip(weights, kernel_shape) if c not in inputs]
    return min(math.prod(contracted), math.prod(outputs))


# `run_layer_test` (a training step and a mixed-precision pass each) on one
# case per equation form and bias layout, to keep the suite fast; the
# comparison with `EinsumDense` below runs on every case.
BASICS_CASES = [
    case
    for case in EINSUM_CASES
    if case[0]
    in {
        "2d_middle_weight",
        "3d_1_3_bias",
        "3d_bert_projection",
        "attention_output",
        "2d_bert",
        "xlnet_lm",
        "2d_precast_multiple_elided_dims",
        "3d_precast_2_3_bias",
        "2d_postcast",
        "2d_postcast_ab",
        "3d_postcast_1_2_bias",
    }
]


class EinsumDenseLayerCasesTest(_keras_compat.testing_test_case()):
    @parameterized.named_parameters(*BASICS_CASES)
    def test_einsum_dense_basics(
        self,
        equation,
        bias_axes,
        input_shape,
        output_shape,
        kernel_shape,
        bias_shape,
        full_output_shape,
    ):
        rank = _einsum_full_rank(equation, kernel_shape)
        init_kwargs = {
            "equation": equation,
            "output_shape": output_shape,
            "rank": rank,
            "bias_axes": bias_axes,
        }
        self.run_layer_test(
            LowRankEinsumDense,
            init_kwargs=init_kwargs,
            input_shape=input_shape,
            expected_output_shape=full_output_shape,
            expected_num_trainable_weights=3 if bias_shape is not None else 2,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
            supports_masking=False,
        )
        layer = LowRankEinsumDense(**init_kwargs)
        layer.build(input_shape)
        self.assertEqual(tuple(layer.kernel.shape), kernel_shape)
        if bias_shape is not None:
            self.assertEqual(tuple(layer.bias.shape), bias_shape)

    @parameterized.named_parameters(*EINSUM_CASES)
    def test_einsum_dense_matches_keras(
        self,
        equation,
        bias_axes,
        input_shape,
        output_shape,
        kernel_shape,
        bias_shape,
        full_output_shape,
    ):
        dense = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
        dense.build(input_shape)
        rng = _rng(4)
        for weight in dense.weights:
            weight.assign(rng.normal(size=tuple(weight.shape)).astype("float32"))
        x = rng.normal(size=input_shape).astype("float32")
        low = LowRankEinsumDense.from_einsum_dense(
            dense, rank=_einsum_full_rank(equation, kernel_shape)
        )
        self.assertAllClose(low(x), dense(x), atol=1e-4, rtol=1e-4)
        self.assertAllClose(low.kernel, dense.kernel, atol=1e-5, rtol=1e-5)
        merged = low.to_einsum_dense()
        self.assertAllClose(merged(x), dense(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Correctness (Keras's hand-computed expectations)


def test_embedding_correctness():
    layer = FactorizedEmbedding(input_dim=3, output_dim=2, rank=2)
    layer.set_factors(np.array([[0.0, 0.0], [2.0, 2.0], [3.0, 3.0]]), np.eye(2))
    out = layer(np.array([2, 1, 0]))
    np.testing.assert_allclose(_np(out), [[3.0, 3.0], [2.0, 2.0], [0.0, 0.0]])


@pytest.mark.parametrize(
    "activation,use_bias,expected",
    [("relu", True, [[10.0, 0.0]]), (None, False, [[5.0, -6.0]]), ("relu", False, [[5.0, 0.0]])],
)
def test_dense_correctness(activation, use_bias, expected):
    layer = LowRankDense(units=2, rank=2, activation=activation, use_bias=use_bias)
    layer.build((1, 2))
    bias = np.array([5.0, -6.0]) if use_bias else None
    layer.set_factors(np.array([[1.0, -2.0], [3.0, -4.0]]), np.eye(2), bias)
    if not use_bias:
        assert layer.bias is None
    np.testing.assert_allclose(_np(layer(np.array([[-1.0, 2.0]]))), expected, atol=1e-6)


def test_dense_without_activation_set():
    layer = LowRankDense(units=2, rank=2, use_bias=False, activation="relu")
    layer.build((1, 2))
    layer.set_factors(np.array([[1.0, -2.0], [3.0, -4.0]]), np.eye(2))
    layer.activation = None
    np.testing.assert_allclose(_np(layer(np.array([[-1.0, 2.0]]))), [[5.0, -6.0]])


def test_dense_errors():
    layer = LowRankDense(units=2, rank=2, activation="relu")
    layer(keras.KerasTensor((1, 2)))
    with pytest.raises(ValueError, match="incompatible with the layer"):
        layer(keras.KerasTensor((1, 3)))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_full_rank_matches_keras_counterpart(kind):
    low, dense, x = _pair(kind)
    np.testing.assert_allclose(_np(low(x)), _np(dense(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_gives_back_the_keras_weights(kind):
    low, dense, x = _pair(kind)
    merged = getattr(
        low,
        {"embedding": "to_embedding", "dense": "to_dense", "einsum_dense": "to_einsum_dense"}[kind],
    )()
    assert type(merged) is type(dense)
    for got, want in zip(merged.weights, dense.weights):
        np.testing.assert_allclose(_np(got), _np(want), atol=1e-5)
    np.testing.assert_allclose(_np(merged(x)), _np(dense(x)), atol=1e-5)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_from_layer_factors_and_merge(kind):
    """The shared API: `from_layer`, 2-D `factors()`, `set_factors`, `merge()`."""
    keras_layer, x = _keras_layer(kind)
    low = type(_factorize(kind, keras_layer)).from_layer(keras_layer, FULL_RANK[kind])
    a, b = low.factors()
    assert a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0] == low.rank
    merged = low.merge()
    assert type(merged) is type(keras_layer)
    np.testing.assert_allclose(_np(merged(x)), _np(keras_layer(x)), atol=1e-5)
    low.set_factors(a * 2.0, b)
    np.testing.assert_allclose(low.factors()[0], a * 2.0, rtol=1e-6)


def test_compute_output_shape_before_build():
    layer = LowRankEinsumDense("ab,bc->ac", output_shape=(7,), rank=3)
    assert tuple(layer.compute_output_shape((None, 5))) == (None, 7)
    layer.build((None, 5))
    assert tuple(layer.compute_output_shape((None, 5))) == (None, 7)
    layer = LowRankEinsumDense("abc,cd->abd", output_shape=(None, 4), rank=4, bias_axes="d")
    x = keras.Input(shape=(3, 8))
    assert tuple(layer.compute_output_shape((None, 3, 8))) == tuple(layer(x).shape)


@pytest.mark.parametrize("bad", [3.7, 4.0, "3", None, True, False, -1, 0])
@pytest.mark.parametrize("argument", ["input_dim", "output_dim"])
def test_embedding_invalid_dims(argument, bad):
    kwargs = {"input_dim": 10, "output_dim": 8, "rank": 2, argument: bad}
    with pytest.raises((ValueError, TypeError), match=f"`{argument}`"):
        FactorizedEmbedding(**kwargs)


@pytest.mark.parametrize("units", [0, -3, 2.5, None, "64"])
def test_dense_invalid_units_raises(units):
    with pytest.raises((ValueError, TypeError), match="`units`"):
        LowRankDense(units, rank=1)


# ---------------------------------------------------------------------------
# Sparse inputs


def _sparse(dense_array):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.sparse.from_dense(dense_array)
    import jax.experimental.sparse as jax_sparse

    return jax_sparse.BCOO.fromdense(dense_array)


@requires_sparse
def test_embedding_sparse_ids_match_keras():
    # Keras's test_correctness_sparse: missing entries give zero rows.
    low, dense, _ = _pair("embedding")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        ids = tf.SparseTensor([[0, 0], [1, 2]], [2, 1], (2, 3))
    else:
        import jax.experimental.sparse as jax_sparse

        ids = jax_sparse.BCOO(([2, 1], [[0, 0], [1, 2]]), shape=(2, 3))
    np.testing.assert_allclose(_np(low(ids)), _np(dense(ids)), atol=1e-5)


@requires_sparse
def test_sparse_inputs_match_keras():
    # `EinsumDense` itself does not accept sparse inputs: Dense only.
    low, dense, x = _pair("dense")
    x = np.where(np.abs(x) > 0.8, x, 0.0).astype("float32")
    sparse = _sparse(x)
    expected = _np(dense(x))
    np.testing.assert_allclose(_np(dense(sparse)), expected, atol=1e-5)
    np.testing.assert_allclose(_np(low(sparse)), expected, atol=1e-5)


# ---------------------------------------------------------------------------
# Ragged inputs (what TextVectorization(ragged=True) produces)


@requires_tf
def test_ragged_ids_give_a_ragged_output_like_embedding():
    import tensorflow as tf

    low, dense, _ = _pair("embedding")
    ids = tf.ragged.constant([[1, 2, 3], [4], [0, 2], []], dtype=tf.int32)
    expected = dense(ids)
    got = low(ids)
    assert isinstance(expected, tf.RaggedTensor)
    assert isinstance(got, tf.RaggedTensor)
    np.testing.assert_array_equal(got.row_splits.numpy(), expected.row_splits.numpy())
    np.testing.assert_allclose(got.flat_values.numpy(), expected.flat_values.numpy(), atol=1e-5)


@requires_tf
def test_text_vectorization_ragged_into_factorized_embedding():
    import tensorflow as tf

    texts = ["the cat sat", "a dog", "the dog sat on the mat"]
    vectorize = keras.layers.TextVectorization(max_tokens=12, ragged=True)
    vectorize.adapt(texts)
    ids = vectorize(tf.constant(texts))
    assert isinstance(ids, tf.RaggedTensor)
    embedding = keras.layers.Embedding(12, 4)
    expected = embedding(ids)
    low = FactorizedEmbedding.from_embedding(embedding, rank=4)
    got = low(ids)
    assert isinstance(got, tf.RaggedTensor)
    assert got.shape.as_list() == expected.shape.as_list()
    np.testing.assert_allclose(got.flat_values.numpy(), expected.flat_values.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------
# Masks


def test_embedding_compute_mask():
    layer = FactorizedEmbedding(input_dim=3, output_dim=2, rank=2, mask_zero=True)
    layer.build()
    np.testing.assert_array_equal(_np(layer.compute_mask(np.array([2, 1, 0]))), [True, True, False])
    assert layer.supports_masking


def test_embedding_compute_mask_no_masking():
    layer = FactorizedEmbedding(input_dim=3, output_dim=2, rank=2, mask_zero=False)
    assert layer.compute_mask(np.array([2, 1, 0])) is None


def _pooled_model(embedding, dense):
    inputs = keras.Input(shape=(6,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(dense(embedding(inputs)))
    return keras.Model(inputs, pooled)


def test_mask_zero_propagates_through_low_rank_dense():
    embedding, _ = _keras_layer("embedding", mask_zero=True)
    dense = keras.layers.Dense(5, activation="tanh")
    dense.build((None, 4))
    ids = np.array([[3, 1, 4, 0, 0, 0], [5, 9, 2, 6, 0, 0]], dtype="int32")
    expected = _np(_pooled_model(embedding, dense)(ids))
    low_embedding = FactorizedEmbedding.from_embedding(embedding, rank=4)
    low_dense = LowRankDense.from_dense(dense, rank=4)
    assert low_embedding.mask_zero and low_dense.supports_masking
    got = _np(_pooled_model(low_embedding, low_dense)(ids))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The mask matters: averaging over the padding too gives other numbers.
    unmasked = _np(low_dense(low_embedding(ids))).mean(axis=1)
    assert not np.allclose(got, unmasked, atol=1e-3)


# ---------------------------------------------------------------------------
# Constraints, regularizers, trainable factors


def _factor_option_kwargs(kind, option, value, bias=True):
    prefix = "embeddings" if kind == "embedding" else "kernel"
    kwargs = {f"{prefix}_a_{option}": value, f"{prefix}_b_{option}": value}
    if bias and kind != "embedding":
        kwargs[f"bias_{option}"] = value
    return kwargs


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_constraints_are_set_on_the_factors(kind):
    layer, x = _fresh_layer(kind, **_factor_option_kwargs(kind, "constraint", "non_neg"))
    layer(x)
    for variable in _factor_variables(layer):
        assert isinstance(variable.constraint, keras.constraints.NonNeg)
    if kind != "embedding":
        assert isinstance(layer.bias.constraint, keras.constraints.NonNeg)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_constraints_hold_after_a_fit_step(kind):
    layer, x = _fresh_layer(kind, **_factor_option_kwargs(kind, "constraint", "non_neg"))
    model = _model_around(layer, x)
    variables = _factor_variables(layer)
    for variable in variables:  # start from values the constraint must fix
        variable.assign(_rng(5).normal(size=tuple(variable.shape)).astype("float32"))
    _fit_one_step(model, x)
    for variable in variables:
        assert _np(variable).min() >= 0.0
    if kind != "embedding":
        assert _np(layer.bias).min() >= 0.0


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_regularizer_losses(kind):
    kwargs = _factor_option_kwargs(kind, "regularizer", "l2")
    layer, x = _fresh_layer(kind, **kwargs)
    layer(x)
    assert len(layer.losses) == len(kwargs)  # A, B (and the bias)
    regularized = list(_factor_variables(layer))
    if kind != "embedding":
        regularized.append(layer.bias)
    expected = sum(0.01 * float(np.sum(np.square(_np(v)))) for v in regularized)
    total = sum(float(_np(loss)) for loss in layer.losses)
    np.testing.assert_allclose(total, expected, rtol=1e-5)

    with_activity, x = _fresh_layer(kind, activity_regularizer="l2", **kwargs)
    with_activity(x)
    assert len(with_activity.losses) == len(kwargs) + 1


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("frozen", ["a", "b"])
def test_a_trainable_b_trainable(kind, frozen):
    layer, x = _fresh_layer(kind, **{f"{frozen}_trainable": False})
    model = _model_around(layer, x)
    a, b = _factor_variables(layer)
    frozen_var, trained_var = (a, b) if frozen == "a" else (b, a)
    assert not frozen_var.trainable and trained_var.trainable
    assert getattr(layer, f"{frozen}_trainable") is False
    assert all(v is not frozen_var for v in layer.trainable_weights)
    before_frozen, before_trained = _np(frozen_var).copy(), _np(trained_var).copy()
    _fit_one_step(model, x)
    np.testing.assert_array_equal(_np(frozen_var), before_frozen)
    assert not np.allclose(_np(trained_var), before_trained)
    # The flag can be flipped after build, and survives get_config.
    assert layer.get_config()[f"{frozen}_trainable"] is False
    setattr(layer, f"{frozen}_trainable", True)
    assert frozen_var.trainable


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_from_keras_layer_passes_trainable_flags(kind):
    keras_layer, x = _keras_layer(kind)
    low = _factorize(kind, keras_layer, a_trainable=False)
    a, b = _factor_variables(low)
    assert not a.trainable and b.trainable
    np.testing.assert_allclose(_np(low(x)), _np(keras_layer(x)), atol=1e-5)


# ---------------------------------------------------------------------------
# Dtype policies


POLICIES = {
    # policy: (compute dtype, factor dtype, atol against the Keras layer)
    # float64: the SVD of `from_*` runs in float32, so full rank is exact to
    # float32 precision only.
    "float64": ("float64", "float64", 1e-6),
    "float32": ("float32", "float32", 1e-5),
    "mixed_bfloat16": ("bfloat16", "float32", 5e-2),
    "mixed_float16": ("float16", "float32", 1e-2),
}


def _skip_without_float64(policy):
    if (
        policy == "float64"
        and keras.backend.standardize_dtype(ops.convert_to_tensor(np.zeros(1, "float64")).dtype)
        != "float64"
    ):
        pytest.skip(
            "float64 needs JAX's jax_enable_x64 (off: Keras's own layers get float32 variables too)"
        )


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_dtype_policies(kind, policy):
    _skip_without_float64(policy)
    compute_dtype, factor_dtype, atol = POLICIES[policy]
    low, dense, x = _pair(kind, dtype=policy)
    assert low.dtype_policy.name == policy
    variable_dtype = keras.DTypePolicy(policy).variable_dtype
    for variable in _factor_variables(low):
        assert keras.backend.standardize_dtype(variable.dtype) == factor_dtype
    if getattr(low, "bias", None) is not None:
        assert keras.backend.standardize_dtype(low.bias.dtype) == variable_dtype
    if x.dtype.kind == "f":
        x = x.astype(compute_dtype if policy == "float64" else "float32")
    got, expected = low(x), dense(x)
    assert keras.backend.standardize_dtype(got.dtype) == compute_dtype
    assert keras.backend.standardize_dtype(got.dtype) == keras.backend.standardize_dtype(
        expected.dtype
    )
    np.testing.assert_allclose(
        _np(got).astype("float64"), _np(expected).astype("float64"), atol=atol, rtol=atol
    )


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("policy", ["float64", "mixed_bfloat16"])
def test_global_dtype_policy_applies_to_fresh_layers(kind, policy):
    _skip_without_float64(policy)
    keras.mixed_precision.set_global_policy(policy)
    layer, x = _fresh_layer(kind)
    if x.dtype.kind == "f":
        x = x.astype("float64" if policy == "float64" else "float32")
    out = layer(x)
    compute_dtype, factor_dtype, _ = POLICIES[policy]
    assert keras.backend.standardize_dtype(out.dtype) == compute_dtype
    for variable in _factor_variables(layer):
        assert keras.backend.standardize_dtype(variable.dtype) == factor_dtype


# ---------------------------------------------------------------------------
# Serialization: get_config/from_config and the .keras format


NON_DEFAULT_OPTIONS = {
    "embedding": dict(
        embeddings_a_initializer="glorot_normal",
        embeddings_b_initializer="he_uniform",
        embeddings_a_regularizer="l2",
        embeddings_b_constraint="non_neg",
        mask_zero=True,
        a_trainable=False,
    ),
    "dense": dict(
        activation="relu",
        kernel_a_initializer="he_normal",
        bias_initializer="ones",
        kernel_b_regularizer="l1",
        bias_constraint="non_neg",
        b_trainable=False,
    ),
    "einsum_dense": dict(
        activation="gelu",
        kernel_a_initializer="he_normal",
        bias_initializer="ones",
        kernel_b_regularizer="l1",
        bias_constraint="non_neg",
        a_trainable=False,
    ),
}


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_get_config_lists_every_constructor_argument(kind):
    layer, _ = _fresh_layer(kind)
    config = layer.get_config()
    parameters = inspect.signature(type(layer).__init__).parameters
    missing = [
        name
        for name, p in parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in config
    ]
    assert not missing


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_get_config_from_config_round_trip(kind):
    layer, x = _fresh_layer(kind, **NON_DEFAULT_OPTIONS[kind])
    layer(x)
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    for name, value in NON_DEFAULT_OPTIONS[kind].items():
        if isinstance(value, bool):
            assert getattr(clone, name) is value
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(_np(clone(x)), _np(layer(x)), atol=1e-6)
    generic = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(generic) is type(layer)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_keras_save_load_round_trip(kind, tmp_path):
    low, _, x = _pair(kind)
    model = _model_around(low, x)
    expected = _np(model(x))
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = [layer for layer in loaded.layers if type(layer) is type(low)]
    assert len(restored) == 1
    assert restored[0].rank == low.rank
    np.testing.assert_allclose(_np(loaded(x)), expected, atol=1e-6)
    for got, want in zip(_factor_variables(restored[0]), _factor_variables(low)):
        np.testing.assert_array_equal(_np(got), _np(want))
