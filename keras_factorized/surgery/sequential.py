"""Sequential closed-form updates: each layer's factors fitted to what the
compressed model really feeds it.

Whitened factors minimise each layer's output error for the inputs `X` it saw
in the *original* model. Once earlier layers are factorized, it sees other
inputs `X'`. Block by block, in model order, and layer by layer inside a
block, this refits each layer's factors so that `X' A B` matches the original
`X W` (`data_aware.fitted_factors`, closed form), so that later layers
correct the errors of earlier ones (SVD-LLM, Dobi-SVD). Layers that read the
same input (Q, K and V) are refitted together.

Cost: one run of the original and of the compressed model over the
calibration data, then a few runs of each block (one per group of layers
reading the same input, plus one for its output).
"""

from __future__ import annotations

import numpy as np

from keras_factorized import data_aware
from keras_factorized.surgery import blocks as blocks_lib
from keras_factorized.surgery import walk
from keras_factorized.surgery.calibration import batches


def sequential_update(model, new_model, targets, data, batch_size, damping, split, progbar=None):
    """Refits the factors of every factorized target of `new_model` in place.

    Args:
        model: the original model.
        new_model: the factorized copy, holding the targets' new layers.
        targets: the `selection.Target`s (those with a rank are refitted).
        data: the calibration data.
        batch_size: batch size for array data.
        damping: as in `WhitenedConfig`.
        split: how singular values are shared between `A` and `B`.
        progbar: an optional `keras.utils.Progbar`, advanced once per layer.
    """
    factorized = [t for t in targets if t.rank is not None]
    paths = list(dict.fromkeys(blocks_lib.block_path(t.path) for t in factorized))
    if not paths:
        return
    data_batches = list(batches(data, batch_size))
    teacher_blocks = [walk.navigate(model, p) for p in paths]
    teacher_calls = blocks_lib.block_calls(model, teacher_blocks, data_batches, True)
    student_calls = blocks_lib.block_calls(
        new_model, [walk.navigate(new_model, paths[0])], data_batches
    )[0]
    for i, path in enumerate(paths):
        student_block = walk.navigate(new_model, path)
        in_block = [t for t in factorized if blocks_lib.block_path(t.path) == path]
        _update_block(
            teacher_blocks[i],
            teacher_calls[i],
            student_block,
            student_calls,
            in_block,
            new_model,
            damping,
            split,
            progbar,
        )
        if i + 1 == len(paths):
            break
        student_calls = blocks_lib.next_student_calls(
            new_model, paths, i, student_block, student_calls, teacher_calls, data_batches
        )


def _layer_inputs(block, layers, calls):
    """Per layer, its input rows of each recorded block call (first call only)."""
    per_layer = {id(layer): [] for layer in layers}
    for call in calls:
        with blocks_lib.capture_calls(layers) as records:
            blocks_lib.run_block(block, call)
        for layer in layers:
            per_layer[id(layer)].append(records[id(layer)][0][0])
    return per_layer


def _update_block(
    teacher_block,
    teacher_calls,
    student_block,
    student_calls,
    targets,
    new_model,
    damping,
    split,
    progbar,
):
    teacher_x = _layer_inputs(teacher_block, [t.original for t in targets], teacher_calls)
    pending = list(targets)
    while pending:
        layers = [walk.navigate(new_model, t.path) for t in pending]
        student_x = _layer_inputs(student_block, layers, student_calls)
        first = student_x[id(layers[0])]
        group = [
            (t, layer)
            for t, layer in zip(pending, layers)
            if t is pending[0] or _same_inputs(first, student_x[id(layer)])
        ]
        for t, layer in group:
            gram = np.zeros((t.shape[0], t.shape[0]))
            cross = np.zeros_like(gram)
            for xs, x in zip(student_x[id(layer)], teacher_x[id(t.original)]):
                rows_s = t.input_rows(xs).astype(np.float32)
                rows_t = t.input_rows(x).astype(np.float32)
                gram += rows_s.T @ rows_s
                cross += rows_s.T @ rows_t
            a, b = data_aware.fitted_factors(
                t.matrix, gram, cross, t.rank, damping=damping, split=split
            )
            layer.set_factors(a, b)
            if progbar is not None:
                progbar.add(1)
        done = {id(t) for t, _ in group}
        pending = [t for t in pending if id(t) not in done]


def _same_inputs(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b)
    )
