"""Running a model block by block: the inputs each block receives, and replays.

Sequential closed-form updates and block-wise distillation work on one block
at a time (a Transformer block; a top-level layer of a plain model): they need
the inputs the block received in the original model and in the compressed
one, and to run the block again on them. `capture_calls` records the inputs
(and outputs) of chosen layers while a model runs, always restoring their
`call`; `run_block` replays a block on recorded inputs.

A block is the innermost layer of a model's graph that holds a target (a
top-level layer of the model, or of a model nested in it); `block_path`
gives its path.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from keras_factorized.surgery import walk
from keras_factorized.surgery.calibration import to_numpy
from keras_factorized.surgery.calibration import wrapped_calls


def block_path(target_path) -> tuple:
    """The path of the block holding the layer at `target_path`: up to its
    last graph step (`("layer", name)`), so that a block inside a nested
    model (a Transformer block of the backbone of a KerasHub task) is that
    block, not the whole nested model."""
    steps = tuple(target_path)
    last = max((i for i, step in enumerate(steps) if step[0] == "layer"), default=0)
    return steps[: last + 1]


def _to_numpy_tree(value):
    def convert(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        try:
            return to_numpy(x)
        except (TypeError, ValueError):
            return x

    return keras.tree.map_structure(convert, value)


class _AllRecorded(Exception):
    """Stops a block's run once every layer `recorded_run` waits for ran."""


@contextlib.contextmanager
def capture_calls(layers, keep_outputs=False, stop_when_recorded=False):
    """Within the block, every call of `layers` is recorded.

    Args:
        layers: the layers whose calls are recorded.
        keep_outputs: whether outputs are recorded too.
        stop_when_recorded: raise `_AllRecorded` as soon as each of `layers`
            has been called as often as the one called last (once per run:
            `recorded_run`, `block_calls(stop=True)`); without
            `keep_outputs`, before that last call runs.

    Yields:
        A dict `id(layer) -> list` of `(inputs, args, kwargs, output)` per
        call, NumPy arrays (`output` is `None` unless `keep_outputs`).
    """
    records = {id(layer): [] for layer in layers}
    # Q, K and V receive one tensor: it is converted once. The reference held
    # here keeps another tensor from taking its `id` while it is compared.
    last = [None, None]

    def converted(x):
        if last[0] is not x:
            last[:] = [x, to_numpy(x)]
        return last[1]

    def all_recorded(layer) -> bool:
        count = len(records[id(layer)])
        return stop_when_recorded and all(len(r) >= count for r in records.values())

    def recorder(layer):
        def wrap(original_call):
            def call(inputs, *args, **kwargs):
                record = (converted(inputs), _to_numpy_tree(args), _to_numpy_tree(kwargs))
                if not keep_outputs:
                    records[id(layer)].append(record + (None,))
                    if all_recorded(layer):
                        raise _AllRecorded
                    return original_call(inputs, *args, **kwargs)
                output = original_call(inputs, *args, **kwargs)
                records[id(layer)].append(record + (to_numpy(output),))
                if all_recorded(layer):
                    raise _AllRecorded
                return output

            return call

        return wrap

    with wrapped_calls([(layer, recorder(layer)) for layer in layers]):
        yield records


@contextlib.contextmanager
def tapped_outputs(layers):
    """Within the block, the outputs of every call of `layers`, as tensors.

    Unlike `capture_calls`, nothing is converted: the tapped outputs may be
    returned from inside a traced function (a train step), so that a loss
    can be put on them.

    Yields:
        A dict `id(layer) -> list` of the outputs of its calls.
    """
    taps = {id(layer): [] for layer in layers}

    def tap(layer):
        def wrap(original_call):
            def call(*args, **kwargs):
                output = original_call(*args, **kwargs)
                taps[id(layer)].append(output)
                return output

            return call

        return wrap

    with wrapped_calls([(layer, tap(layer)) for layer in layers]):
        yield taps


def run_block(block, record, inputs=None):
    """Runs `block` on a recorded call (with other `inputs` in place of its own)."""
    recorded_inputs, args, kwargs, _ = record
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    x = recorded_inputs if inputs is None else inputs
    return block(x, *args, training=False, **kwargs)


def recorded_run(block, record, layers):
    """Runs `block` on a recorded call until each of `layers` has been called
    once, and returns their records (as `capture_calls`' first call each).

    The rest of the block does not run: refitting the first layers of a
    Transformer block needs only the start of it (its attention, not its
    feed-forward layers and their GELU).
    """
    with capture_calls(layers, stop_when_recorded=True) as records:
        try:
            run_block(block, record)
        except _AllRecorded:
            pass
    return records


def block_calls(model, blocks, data_batches, keep_outputs=False, stop=False):
    """Per block, the recorded calls when `model` runs on `data_batches`
    (one per batch: a block called several times per batch is not supported).

    With `stop`, each run of `model` ends once every block has been called
    (before the last one runs, without `keep_outputs`): the first block's
    inputs need only the embeddings.
    """
    with capture_calls(blocks, keep_outputs, stop_when_recorded=stop) as records:
        for batch in data_batches:
            try:
                model(batch, training=False)
            except _AllRecorded:
                pass
    calls = [records[id(block)] for block in blocks]
    for block, recorded in zip(blocks, calls):
        if len(recorded) != len(data_batches):
            raise ValueError(
                f"Received an invalid value for `model`, expected each block to run "
                f"once per batch. Received: block {block.name!r} ran {len(recorded)} "
                f"times for {len(data_batches)} batches"
            )
    return calls


def chained(calls_before, calls_after) -> bool:
    """Whether each recorded input of a block is the previous block's output."""
    return all(
        before[3] is not None and np.array_equal(before[3], after[0])
        for before, after in zip(calls_before, calls_after)
    )


def next_student_calls(new_model, paths, i, block, student_calls, teacher_calls, data_batches):
    """The calls of block `i + 1` of the compressed `new_model`: block `i`'s
    outputs when the blocks are chained, else recorded from a run of the model."""
    if chained(teacher_calls[i], teacher_calls[i + 1]):
        return [
            (to_numpy(run_block(block, call)),) + tuple(nxt[1:3]) + (None,)
            for call, nxt in zip(student_calls, teacher_calls[i + 1])
        ]
    return block_calls(
        new_model, [walk.navigate(new_model, paths[i + 1])], data_batches, stop=True
    )[0]
