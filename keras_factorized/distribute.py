"""Distributed training with `tf.distribute` (TensorFlow backend only).

Factorized layers are ordinary Keras layers, so they train under any
`tf.distribute` strategy: build and compile the model inside
`strategy.scope()` and call `fit` as usual.

```python
from keras_factorized.distribute import get_strategy

strategy = get_strategy("mirrored")      # all local GPUs (or the CPU)
with strategy.scope():
    model = build_classifier(...)
    model.compile(...)
model.fit(dataset)                        # global batch, split across replicas
```

On several machines, use `"multiworker"` (`MultiWorkerMirroredStrategy`):
start the SAME script on every machine, each with a `TF_CONFIG` environment
variable that lists all workers and says which one this process is:

```bash
# machine 0 (the chief: it writes checkpoints and exports)
TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
            "task": {"type": "worker", "index": 0}}' \\
    keras-factorized imdb --strategy multiworker ...
# machine 1: same cluster, "index": 1
```

`make_tf_config` writes those strings. The strategy must be created at the
start of the program, before any other TensorFlow op runs (collective ops are
configured when the TensorFlow runtime starts). Every worker must see the same
number of steps (shard or repeat the dataset), and only the chief
(`is_chief()`) should write files shared by all workers.

Known limitation (Keras 3.15): when `fit`/`evaluate` first builds the model it
averages the first batch across workers, which fails ("Shape mismatch in the
collective instance") if that batch splits unevenly between them, i.e. when
the whole dataset is smaller than one global batch and not divisible by the
number of workers. Real training sets always fill the first batch.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Sequence

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker")


def _parse_tf_config(tf_config: str | None = None) -> dict:
    """Parses and checks `TF_CONFIG` (the environment's when not given)."""
    if tf_config is None:
        tf_config = os.environ.get("TF_CONFIG", "")
    if not tf_config:
        return {}
    try:
        config = json.loads(tf_config)
    except json.JSONDecodeError as e:
        raise ValueError(
            "Received an invalid value for `TF_CONFIG`, expected JSON like "
            '{"cluster": {"worker": ["host0:port", ...]}, "task": {"type": '
            f'"worker", "index": 0}}}}. Received: TF_CONFIG={tf_config!r} ({e})'
        ) from e
    workers = config.get("cluster", {}).get("worker")
    task = config.get("task", {})
    if not isinstance(workers, list) or not workers:
        raise ValueError(
            "Received an invalid value for `TF_CONFIG`, expected a non-empty "
            '"cluster": {"worker": [...]} list of host:port addresses. '
            f"Received: TF_CONFIG={tf_config!r}"
        )
    index = task.get("index")
    if task.get("type") not in ("worker", "chief") or not isinstance(index, int):
        raise ValueError(
            "Received an invalid value for `TF_CONFIG`, expected a "
            '"task": {"type": "worker", "index": i} entry. '
            f"Received: TF_CONFIG={tf_config!r}"
        )
    if task["type"] == "worker" and not 0 <= index < len(workers):
        raise ValueError(
            "Received an invalid value for `TF_CONFIG`, expected the task "
            f"index to be in [0, {len(workers) - 1}] (one per worker). "
            f"Received: TF_CONFIG={tf_config!r}"
        )
    return config


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` with a `reduce` that Keras 3's `fit` can use.

    Keras 3 (up to 3.15 at least) calls `strategy.reduce` in two ways that
    `MultiWorkerMirroredStrategy` rejects (keras-team/keras issue 20585): on
    a whole nested (x, y) batch when it builds the model ("Attempt to convert
    a value (PerReplica...) to a Tensor"), and with `axis=0` on the scalar
    loss and metrics of every step ("Invalid reduction dimension 0 for input
    with 0 dimensions"). This reduces each tensor on its own and scalars
    across replicas only, which is what `MirroredStrategy` does.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def reduce_one(v):
            local = self.experimental_local_results(v)
            if axis is not None and local and local[0].shape.rank == 0:
                return parent.reduce(reduce_op, v, axis=None)
            return parent.reduce(reduce_op, v, axis)

        return tf.nest.map_structure(reduce_one, value)


def get_strategy(name: str = "default") -> tf.distribute.Strategy:
    """Returns the `tf.distribute` strategy called `name`.

    Args:
        name: One of
            - `"default"`: no distribution (the default strategy, one device).
            - `"mirrored"`: `tf.distribute.MirroredStrategy`, synchronous
              data parallelism over all local GPUs (or the CPU when none).
            - `"multiworker"`: `tf.distribute.MultiWorkerMirroredStrategy`,
              synchronous data parallelism over several machines, configured
              by the `TF_CONFIG` environment variable (see
              `make_tf_config`). Without `TF_CONFIG` it runs as a single
              worker and warns. Create it at the start of the program.
            Case-insensitive; `"multi_worker"`/`"multi-worker"` are accepted.

    Returns:
        A `tf.distribute.Strategy`; build and compile the model in its
        `scope()`.

    Example:

    >>> strategy = get_strategy("default")
    >>> strategy.num_replicas_in_sync
    1
    """
    if not isinstance(name, str):
        raise TypeError(
            "Expected `name` to be a string, one of "
            f"{', '.join(STRATEGIES)}. Received: name={name!r}"
        )
    key = name.strip().lower().replace("_", "").replace("-", "")
    if key == "default":
        return tf.distribute.get_strategy()
    if key == "mirrored":
        return tf.distribute.MirroredStrategy()
    if key == "multiworker":
        config = _parse_tf_config()
        if not config:
            warnings.warn(
                "TF_CONFIG is not set: MultiWorkerMirroredStrategy runs as a "
                "single worker. Set TF_CONFIG on every machine (see "
                "keras_factorized.distribute.make_tf_config).",
                stacklevel=2,
            )
        return _MultiWorkerMirroredStrategy()
    raise ValueError(
        "Received an invalid value for `name`, expected one of "
        f"{', '.join(repr(s) for s in STRATEGIES)}. Received: name={name!r}"
    )


def make_tf_config(workers: Sequence[str], index: int) -> str:
    """The `TF_CONFIG` value for worker `index` of a cluster of `workers`.

    Args:
        workers: The `host:port` address of every worker, in the same order
            on every machine. Worker 0 is the chief.
        index: This process's position in `workers`.

    Returns:
        A JSON string to put in the `TF_CONFIG` environment variable.

    Example:

    >>> make_tf_config(["host0:12345", "host1:12345"], 1)
    '{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 1}}'
    """
    workers = list(workers)
    if not workers or not all(isinstance(w, str) and ":" in w for w in workers):
        raise ValueError(
            "Received an invalid value for `workers`, expected a non-empty "
            f"list of 'host:port' strings. Received: workers={workers!r}"
        )
    if isinstance(index, bool) or not isinstance(index, int) or not (
        0 <= index < len(workers)
    ):
        raise ValueError(
            "Received an invalid value for `index`, expected an integer in "
            f"[0, {len(workers) - 1}]. Received: index={index!r}"
        )
    return json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )


def free_local_ports(count: int) -> list[int]:
    """`count` TCP ports that are free on 127.0.0.1 right now.

    For trying multi-worker training on one machine (one process per
    worker, all on localhost). The ports are released before returning, so
    another program could take one in between: start the workers promptly.

    Args:
        count: How many ports.

    Returns:
        A list of distinct port numbers.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_tf_configs(num_workers: int) -> list[str]:
    """`TF_CONFIG` values for `num_workers` processes on this machine.

    Args:
        num_workers: Number of worker processes.

    Returns:
        One `TF_CONFIG` string per worker (start worker i with the i-th).

    Example:

    ```python
    import os, subprocess, sys
    for config in local_tf_configs(2):
        subprocess.Popen([sys.executable, "train.py", "--strategy",
                          "multiworker"], env={**os.environ, "TF_CONFIG": config})
    ```
    """
    workers = [f"127.0.0.1:{port}" for port in free_local_ports(num_workers)]
    return [make_tf_config(workers, i) for i in range(num_workers)]


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process is the chief (the one that writes files).

    In multi-worker training every worker runs the same script; only the
    chief should save checkpoints, exports and reports (the others may write
    to temporary folders they delete).

    Args:
        strategy: The strategy in use. Defaults to the current one.

    Returns:
        `True` for worker 0 (or a `"chief"` task), and for single-process
        strategies.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (
        task_type == "worker" and task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )
