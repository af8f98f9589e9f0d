"""The sequential refit's residual-stream correction and its guarantee, with
oracles on small models (issue 11, items 1-2)."""

import types

import keras
import numpy as np
import pytest
from tiny_models import Block
from tiny_models import bert_inputs  # noqa: E402
from tiny_models import tiny_bert  # noqa: E402

from keras_factorized import factorize
from keras_factorized.data_aware import fit_objective
from keras_factorized.data_aware import fitted_factors
from keras_factorized.data_aware import whitened_svd
from keras_factorized.layers import LowRankDense
from keras_factorized.surgery import WhitenedConfig
from keras_factorized.surgery import blocks
from keras_factorized.surgery import sequential


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_fitted_factors_with_a_residual_shift_are_the_least_squares_optimum():
    # ||X' A B + R' - (X W + R)||: the optimum of a rank-k fit of the
    # target X W + R - R', found independently (projection + Eckart-Young).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 10)) * np.linspace(0.2, 2, 10)
    x_student = x + 0.3 * rng.normal(size=x.shape)
    w = rng.normal(size=(10, 7))
    shift = rng.normal(size=(300, 7))  # R - R'
    a, b = fitted_factors(
        w,
        x_student.T @ x_student,
        x_student.T @ x,
        3,
        damping=0.0,
        residual_cross=x_student.T @ shift,
    )
    target = x @ w + shift
    q, _ = np.linalg.qr(x_student)
    u, s, vt = np.linalg.svd(q.T @ target, full_matrices=False)
    oracle = np.linalg.norm(q @ (u[:, :3] * s[:3]) @ vt[:3] - target)
    np.testing.assert_allclose(np.linalg.norm(x_student @ a @ b - target), oracle, rtol=1e-6)


def test_fitted_factors_reject_a_residual_cross_of_the_wrong_shape():
    with pytest.raises(ValueError, match="`residual_cross`"):
        fitted_factors(np.ones((8, 4)), np.eye(8), np.eye(8), 2, residual_cross=np.ones((8, 8)))


def test_residual_links_of_a_post_norm_transformer_block():
    bert = tiny_bert(seed=0)
    from keras_factorized.surgery import blocks
    from keras_factorized.surgery import copying
    from keras_factorized.surgery import selection

    copy = copying.copy_model(bert)
    targets, _ = selection.find_targets(
        copy, bert, selection.selection(include="transformer_layer_0")
    )
    block = bert.get_layer("transformer_layer_0")
    call = blocks.block_calls(bert, [block], [bert_inputs(4)], True)[0][0]
    links = sequential.residual_links(block, targets, call)
    named = {t.path[-1][1]: links.get(id(t)) for t in targets}
    # The attention output is added to the block's input, the second
    # feed-forward projection to the first one's input; Q, K, V and the
    # first feed-forward projection feed no residual sum.
    assert named["_output_dense"] == ()
    assert named["_feedforward_output_dense"] == (("attr", "_feedforward_intermediate_dense"),)
    for name in ("_query_dense", "_key_dense", "_value_dense", "_feedforward_intermediate_dense"):
        assert named[name] is None


def test_recorded_run_stops_once_its_layers_ran():
    """The refit's runs of a block stop at the layers they record: what comes
    after them does not run, the records are those of a whole run, and every
    layer's `call` is restored."""
    block = Block(units=8)
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    record = (x, (), {}, None)
    with blocks.capture_calls([block.inner, block.project]) as whole:
        blocks.run_block(block, record)
    with blocks.capture_calls([block.project]) as after:
        records = blocks.recorded_run(block, record, [block.inner])
    assert after[id(block.project)] == []
    np.testing.assert_array_equal(records[id(block.inner)][0][0], whole[id(block.inner)][0][0])
    assert all("call" not in layer.__dict__ for layer in (block, block.inner, block.project))
    # Waiting for the last layer runs the block to it.
    records = blocks.recorded_run(block, record, [block.project])
    np.testing.assert_array_equal(records[id(block.project)][0][0], whole[id(block.project)][0][0])


def test_block_calls_with_stop_record_the_same_inputs_and_run_no_block():
    # `stop=True` records what a whole run records for the first block, on
    # every batch, and no block runs (its inputs need only the embeddings).
    bert = tiny_bert(seed=0)
    first = bert.get_layer("transformer_layer_0")
    second = bert.get_layer("transformer_layer_1")
    data = [bert_inputs(4, seed=1), bert_inputs(4, seed=2)]
    whole = blocks.block_calls(bert, [first], data)[0]
    with blocks.capture_calls([first._self_attention_layer, second]) as ran:
        stopped = blocks.block_calls(bert, [first], data, stop=True)[0]
    assert ran[id(first._self_attention_layer)] == [] and ran[id(second)] == []
    assert len(stopped) == len(whole) == 2
    for a, b in zip(stopped, whole):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[2].keys() == b[2].keys()
    # Two blocks: each run goes on to the second block's call.
    both = blocks.block_calls(bert, [first, second], data, stop=True)
    assert [len(calls) for calls in both] == [2, 2]
    np.testing.assert_array_equal(
        both[1][1][0], blocks.block_calls(bert, [second], data)[0][1][0]
    )


def test_residual_refit_at_the_exact_rank_reproduces_the_model():
    # Every projection of rank 3: the factors at rank 3 are exact, the
    # residual shifts are 0, and the refit must keep the model as it was
    # (with the default damping: without it, the refit amplifies round-off
    # in the directions the inputs barely visit).
    bert = tiny_bert(seed=0)
    rng = np.random.default_rng(1)
    x = bert_inputs(32)
    for block in ("transformer_layer_0", "transformer_layer_1"):
        encoder = bert.get_layer(block)
        for dense in (
            encoder._self_attention_layer._output_dense,
            encoder._feedforward_intermediate_dense,
            encoder._feedforward_output_dense,
        ):
            shape = tuple(dense.kernel.shape)
            m = shape[0] if len(shape) == 2 else shape[0] * shape[1]
            n = int(np.prod(shape)) // m
            low = rng.normal(size=(m, 3)) @ rng.normal(size=(3, n)) / 4
            dense.kernel.assign(low.reshape(shape).astype("float32"))
    include = r"(attention_output|feedforward_\w+_dense)$"
    small = factorize(
        bert,
        rank=3,
        method="whitened",
        include=include,
        calibration_data=x,
        whitening=WhitenedConfig(sequential=True, residual=True),
    )
    np.testing.assert_allclose(
        _np(small(x)["sequence_output"]), _np(bert(x)["sequence_output"]), atol=2e-3
    )


def _refit_case(seed=0, m=12, n=8, rank=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, m)) * np.linspace(0.2, 2, m)
    x_student = x + 0.4 * rng.normal(size=x.shape)
    w = rng.normal(size=(m, n))
    target = types.SimpleNamespace(
        shape=(m, n),
        matrix=w.astype("float32"),
        bias=None,
        rank=rank,
        input_rows=lambda v: np.asarray(v).reshape(-1, m),
    )
    layer = LowRankDense(n, rank)
    layer.build((None, m))
    return rng, x, x_student, w, target, layer


def _objective(layer, x, x_student, w, shift=None):
    a, b = layer.factors()
    y = x @ w + (0 if shift is None else shift)
    return fit_objective(np.asarray(a, np.float64) @ b, x_student.T @ x_student, x_student.T @ y)


@pytest.mark.parametrize("damping", [0.0, 0.01, 10.0])
@pytest.mark.parametrize("with_shift", [False, True])
def test_refit_never_increases_the_calibration_error(damping, with_shift):
    rng, x, x_student, w, target, layer = _refit_case()
    shift = rng.normal(size=(400, 8)) if with_shift else None
    # Start from the undamped optimum: a damped refit may only fit worse,
    # so the guard must keep the factors as they are.
    a, b = fitted_factors(
        w,
        x_student.T @ x_student,
        x_student.T @ x,
        3,
        damping=0.0,
        residual_cross=None if shift is None else x_student.T @ shift,
    )
    layer.set_factors(a, b)
    before = _objective(layer, x, x_student, w, shift)
    sequential._refit(
        target, layer,
        sequential._statistics(target, [x_student], [x], None if shift is None else [shift]),
        damping, "balanced",
    )
    assert _objective(layer, x, x_student, w, shift) <= before + 1e-9 * abs(before)
    # From the whitened factors of the original inputs, the refit fits better.
    a0, b0 = whitened_svd(w, x.T @ x, damping=0.01).factors(3)
    layer.set_factors(a0, b0)
    before = _objective(layer, x, x_student, w, shift)
    sequential._refit(
        target, layer,
        sequential._statistics(target, [x_student], [x], None if shift is None else [shift]),
        damping, "balanced",
    )
    after = _objective(layer, x, x_student, w, shift)
    assert after <= before
    if damping < 1:
        assert after < before


def test_residual_refit_on_a_keras_hub_backbone_keeps_its_class():
    keras_hub = pytest.importorskip("keras_hub")
    bert = tiny_bert(seed=0)
    x = bert_inputs(32)
    expected = _np(bert(x)["sequence_output"])
    kwargs = dict(param_ratio=0.5, method="whitened", calibration_data=x, allocation="uniform")
    plain = factorize(bert, whitening=WhitenedConfig(sequential=False), **kwargs)
    refit = factorize(bert, whitening=WhitenedConfig(sequential=True, residual=True), **kwargs)
    assert isinstance(refit, keras_hub.models.BertBackbone)
    err_plain = np.linalg.norm(_np(plain(x)["sequence_output"]) - expected)
    err_refit = np.linalg.norm(_np(refit(x)["sequence_output"]) - expected)
    assert err_refit < err_plain
