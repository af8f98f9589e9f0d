"""Property-based tests (Hypothesis) of the layers over random configurations.

For drawn sizes, ranks, options and dtype policies, each layer must survive
`get_config`/`from_config` and a `.keras` save/load unchanged (config and
outputs), propagate the padding mask, and compute in its policy's dtype.
Example counts are bounded so the suite stays fast.
"""

import os

import keras
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from keras_factorized import FactorizedEmbedding  # noqa: E402
from keras_factorized import LowRankDense  # noqa: E402
from keras_factorized import LowRankEinsumDense  # noqa: E402

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
POLICIES = ["float32", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16"]


@st.composite
def embedding_configs(draw):
    input_dim = draw(st.integers(2, 50))
    output_dim = draw(st.integers(1, 12))
    return dict(
        input_dim=input_dim,
        output_dim=output_dim,
        rank=draw(st.integers(1, min(input_dim, output_dim))),
        mask_zero=draw(st.booleans()),
        a_trainable=draw(st.booleans()),
        b_trainable=draw(st.booleans()),
        embeddings_a_initializer=draw(st.sampled_from(["uniform", "glorot_normal"])),
    )


@st.composite
def dense_configs(draw):
    units = draw(st.integers(1, 12))
    input_dim = draw(st.integers(1, 12))
    config = dict(
        units=units,
        rank=draw(st.integers(1, min(units, input_dim))),
        activation=draw(st.sampled_from([None, "relu", "tanh"])),
        use_bias=draw(st.booleans()),
        a_trainable=draw(st.booleans()),
    )
    return config, input_dim


@st.composite
def einsum_configs(draw):
    input_dim = draw(st.integers(1, 10))
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 6))
    config = dict(
        equation="abc,cde->abde",
        output_shape=(None, heads, head_dim),
        rank=draw(st.integers(1, min(input_dim, heads * head_dim))),
        bias_axes=draw(st.sampled_from([None, "de"])),
    )
    return config, input_dim


def assert_same_config(layer, clone):
    assert clone.get_config() == layer.get_config()


def round_trip(model, tmp_path, name):
    path = os.path.join(tmp_path, f"{name}.keras")
    model.save(path)
    return keras.saving.load_model(path)


def outputs(model, x):
    # A direct call, not `predict`: `predict` compiles a function for each
    # new model, which is most of an example's time (on JAX, seconds).
    return keras.ops.convert_to_numpy(model(x))


@settings(max_examples=20, **SETTINGS)
@given(config=embedding_configs(), seed=st.integers(0, 1000))
def test_embedding_round_trips_and_masks(tmp_path, config, seed):
    layer = FactorizedEmbedding(**config)
    clone = FactorizedEmbedding.from_config(layer.get_config())
    assert_same_config(layer, clone)
    ids = np.random.default_rng(seed).integers(0, config["input_dim"], (3, 7)).astype("int32")
    ids[0, -2:] = 0
    model = keras.Sequential([keras.Input((7,), dtype="int32"), layer])
    loaded = round_trip(model, tmp_path, f"embedding{seed}")
    assert_same_config(layer, loaded.layers[0])
    np.testing.assert_allclose(outputs(loaded, ids), outputs(model, ids))
    mask = layer.compute_mask(ids)
    if config["mask_zero"]:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), ids != 0)
    else:
        assert mask is None


@settings(max_examples=15, **SETTINGS)
@given(data=dense_configs(), seed=st.integers(0, 1000))
def test_low_rank_dense_round_trips(tmp_path, data, seed):
    config, input_dim = data
    layer = LowRankDense(**config)
    assert_same_config(layer, LowRankDense.from_config(layer.get_config()))
    model = keras.Sequential([keras.Input((input_dim,)), layer])
    x = np.random.default_rng(seed).normal(size=(4, input_dim)).astype("float32")
    loaded = round_trip(model, tmp_path, f"dense{seed}")
    assert_same_config(layer, loaded.layers[0])
    np.testing.assert_allclose(outputs(loaded, x), outputs(model, x), atol=1e-6)


@settings(max_examples=15, **SETTINGS)
@given(data=einsum_configs(), seed=st.integers(0, 1000))
def test_low_rank_einsum_dense_round_trips(tmp_path, data, seed):
    config, input_dim = data
    layer = LowRankEinsumDense(**config)
    assert_same_config(layer, LowRankEinsumDense.from_config(layer.get_config()))
    model = keras.Sequential([keras.Input((5, input_dim)), layer])
    x = np.random.default_rng(seed).normal(size=(2, 5, input_dim)).astype("float32")
    loaded = round_trip(model, tmp_path, f"einsum{seed}")
    assert_same_config(layer, loaded.layers[0])
    np.testing.assert_allclose(outputs(loaded, x), outputs(model, x), atol=1e-5)


@settings(max_examples=20, **SETTINGS)
@given(
    policy=st.sampled_from(POLICIES),
    which=st.sampled_from(["embedding", "dense", "einsum"]),
    rank=st.integers(1, 4),
)
def test_outputs_have_the_policy_compute_dtype_and_mask_passes_through(policy, which, rank):
    ids = np.array([[3, 1, 0, 0], [5, 6, 7, 2]], dtype="int32")
    embedding = FactorizedEmbedding(10, 8, rank=rank, mask_zero=True, dtype=policy)
    x = embedding(ids)
    assert keras.backend.standardize_dtype(x.dtype) == embedding.compute_dtype
    if which == "dense":
        layer = LowRankDense(6, rank=rank, dtype=policy)
    elif which == "einsum":
        layer = LowRankEinsumDense("abc,cd->abd", (None, 6), rank=rank, dtype=policy)
    else:
        layer = embedding
    y = x if layer is embedding else layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))))
    # The padding mask reaches the next layer (Keras attaches it to outputs).
    inputs = keras.Input((4,), dtype="int32")
    hidden = FactorizedEmbedding(10, 8, rank=rank, mask_zero=True)(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(
        LowRankDense(6, rank=rank)(hidden) if which == "dense" else hidden
    )
    model = keras.Model(inputs, pooled)
    out = outputs(model, ids[:1])
    # Averaging over the 2 unmasked steps only: equals the mean of steps 0, 1.
    steps = outputs(keras.Model(inputs, model.layers[-2].output), ids[:1])
    np.testing.assert_allclose(out[0], steps[0, :2].mean(axis=0), atol=1e-5)
