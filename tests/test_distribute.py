"""Distributed training with `keras_factorized.distribute` (TensorFlow only).

Each strategy runs in its own Python process: logical devices and collective
ops must be configured before TensorFlow starts, which the test process has
already done.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute needs the TensorFlow backend", allow_module_level=True)

from keras_factorized import distribute  # noqa: E402

TIMEOUT = 180

# A model with both factorized layers, trained with `fit` under the strategy
# named on the command line; writes its weights before and after to argv[2].
TRAIN = textwrap.dedent(
    """
    import json, os, sys
    import tensorflow as tf

    strategy_name, out = sys.argv[1], sys.argv[2]
    if strategy_name == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    from keras_factorized.distribute import get_strategy, is_chief

    strategy = get_strategy(strategy_name)  # first: before any other TF op

    import keras
    import numpy as np
    from keras_factorized import FactorizedEmbedding, LowRankDense

    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    # Different initial weights on each worker: identical final weights then
    # show that the strategy synchronised both the start and every update.
    keras.utils.set_random_seed(10 + task.get("index", 0))
    rng = np.random.default_rng(0)
    x = rng.integers(1, 50, (64, 10)).astype("int32")
    y = (x[:, :3] < 15).any(axis=1).astype("float32")
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((10,), dtype="int32"),
            FactorizedEmbedding(50, 8, rank=3, mask_zero=True),
            keras.layers.GlobalAveragePooling1D(),
            LowRankDense(6, rank=2, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ])
        model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    before = [np.array(w) for w in model.get_weights()]
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    after = [np.array(w) for w in model.get_weights()]
    np.savez(out + ".npz", *before, *after)
    factor = model.layers[0].embeddings_a
    json.dump({
        "replicas": strategy.num_replicas_in_sync,
        "chief": is_chief(strategy),
        "loss": history.history["loss"],
        "distributed_variable": type(getattr(factor, "value", factor)).__name__,
        "weights": len(after),
    }, open(out + ".json", "w"))
    """
)


def start(script, strategy, out, tf_config=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    env.pop("TF_CONFIG", None)
    if tf_config:
        env["TF_CONFIG"] = tf_config
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", str(script), strategy, str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes):
    """Waits for every process (bounded); kills the rest if one fails."""
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def load(out):
    arrays = np.load(f"{out}.npz")
    weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    info = json.load(open(f"{out}.json"))
    half = len(weights) // 2
    return info, weights[:half], weights[half:]


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    finish([start(script, "mirrored", tmp_path / "mirrored")])
    info, before, after = load(tmp_path / "mirrored")
    assert info["replicas"] == 2
    assert info["chief"] is True
    # The factors were created in the strategy's scope, as mirrored variables.
    assert "Mirrored" in info["distributed_variable"]
    assert all(np.isfinite(info["loss"])) and info["loss"][-1] < info["loss"][0]
    assert all(not np.allclose(b, a) for b, a in zip(before, after))


def test_multiworker_workers_end_with_identical_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    configs = distribute.local_tf_configs(2)
    outs = [tmp_path / f"worker{i}" for i in range(2)]
    finish([start(script, "multiworker", out, config) for out, config in zip(outs, configs)])
    (info0, before0, after0), (info1, before1, after1) = load(outs[0]), load(outs[1])
    assert info0["replicas"] == info1["replicas"] == 2
    assert (info0["chief"], info1["chief"]) == (True, False)
    # The workers started from the chief's initial weights, not their own
    # seeds, and every update was all-reduced.
    for b0, b1 in zip(before0, before1):
        np.testing.assert_array_equal(b0, b1)
    for a0, a1 in zip(after0, after1):
        np.testing.assert_array_equal(a0, a1)
    assert any(not np.allclose(b, a) for b, a in zip(before0, after0))
    assert info0["loss"] == info1["loss"]


def test_default_strategy():
    strategy = distribute.get_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert distribute.is_chief(strategy)


@pytest.mark.parametrize("name", ["mirorred", "tpu", "", "horovod"])
def test_unknown_strategy(name):
    with pytest.raises(ValueError, match=r"expected one of 'default', 'mirrored', 'multiworker'"):
        distribute.get_strategy(name)


def test_strategy_name_type():
    with pytest.raises(TypeError, match="Received: name=2"):
        distribute.get_strategy(2)


@pytest.mark.parametrize(
    "tf_config, message",
    [
        ("{not json", "expected JSON"),
        ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', "worker"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', r"\[0, 0\]"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "task"),
    ],
)
def test_invalid_tf_config(monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=message):
        distribute.get_strategy("multiworker")


def test_make_tf_config():
    config = json.loads(distribute.make_tf_config(["h0:1", "h1:2"], 1))
    assert config == {"cluster": {"worker": ["h0:1", "h1:2"]}, "task": {"type": "worker", "index": 1}}
    with pytest.raises(ValueError, match="Received: index=2"):
        distribute.make_tf_config(["h0:1", "h1:2"], 2)
    with pytest.raises(ValueError, match="workers"):
        distribute.make_tf_config(["h0"], 0)
    configs = [json.loads(c) for c in distribute.local_tf_configs(2)]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 2 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"]["index"] for c in configs] == [0, 1]


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(distribute, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
