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
calibration data, then a few runs of each block: one of the original, one
of the compressed block per group of layers reading the same input, and one
for its output.
"""

from __future__ import annotations

import numpy as np

from keras_factorized import data_aware
from keras_factorized.surgery import blocks as blocks_lib
from keras_factorized.surgery import walk
from keras_factorized.surgery.calibration import batches
from keras_factorized.surgery.calibration import to_numpy


def sequential_update(
    model, new_model, targets, data, batch_size, damping, split, progbar=None, residual=True
):
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
        residual: layers whose output is added to a residual stream also
            absorb the difference between the original and the compressed
            residual (`residual_links`).
    """
    factorized = [t for t in targets if t.rank is not None]
    paths = list(dict.fromkeys(blocks_lib.block_path(t.path) for t in factorized))
    if not paths:
        return
    data_batches = list(batches(data, batch_size))
    teacher_blocks = [walk.navigate(model, p) for p in paths]
    teacher_calls = blocks_lib.block_calls(model, teacher_blocks, data_batches, True)
    student_calls = blocks_lib.block_calls(
        new_model, [walk.navigate(new_model, paths[0])], data_batches, stop=True
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
            residual,
        )
        if i + 1 == len(paths):
            break
        student_calls = blocks_lib.next_student_calls(
            new_model, paths, i, student_block, student_calls, teacher_calls, data_batches
        )


def _recorded_inputs(block, layers, sources, calls):
    """`(per_layer, per_source)`, from one run of `block` per recorded call:
    each layer's input rows (first call of the layer) and, per source path,
    the input of the layer there (`()`: the block's input)."""
    source_layers = {p: walk.navigate(block, p) for p in sources if p}
    captured = list({id(x): x for x in [*layers, *source_layers.values()]}.values())
    per_layer = {id(layer): [] for layer in layers}
    per_source = {p: [] for p in sources}
    for call in calls:
        records = blocks_lib.recorded_run(block, call, captured) if captured else {}
        for layer in layers:
            per_layer[id(layer)].append(records[id(layer)][0][0])
        for p in sources:
            per_source[p].append(call[0] if not p else records[id(source_layers[p])][0][0])
    return per_layer, per_source


def _is_norm(layer) -> bool:
    return not getattr(layer, "_layers", None) and "norm" in type(layer).__name__.lower()


def residual_links(block, targets, call):
    """Per target (by `id`), where the residual its output is added to comes
    from: `()` (the block's input) or the path, in the block, of the layer
    whose input it is; targets whose output feeds no residual sum are absent.

    Found on one recorded call of the original `block`: the output `y` of a
    target is added to a residual `r` when some normalization layer's input,
    or the block's output, equals `y + r`, `r` being the block's input or the
    input of a normalization layer or of a target (post- and pre-norm
    Transformer blocks alike).
    """
    norms = {path: layer for _, _, layer, path in walk.walk(block) if _is_norm(layer)}
    layers = [t.original for t in targets] + list(norms.values())
    with blocks_lib.capture_calls(layers, keep_outputs=True) as records:
        block_output = to_numpy(blocks_lib.run_block(block, call))
    first = {id(layer): records[id(layer)][0] for layer in layers if records[id(layer)]}
    sums = [first[id(n)][0] for n in norms.values() if id(n) in first] + [block_output]
    sources = [((), call[0])]
    sources += [
        (t.path[len(blocks_lib.block_path(t.path)) :], first[id(t.original)][0])
        for t in targets
        if id(t.original) in first
    ]
    sources += [(path, first[id(n)][0]) for path, n in norms.items() if id(n) in first]
    links = {}
    for t in targets:
        if id(t.original) not in first:
            continue
        y = first[id(t.original)][3]
        for z in sums:
            if np.shape(z) != np.shape(y):
                continue
            scale = float(np.max(np.abs(z))) or 1.0
            found = [
                path
                for path, r in sources
                if np.shape(r) == np.shape(y) and np.allclose(z - y, r, rtol=0, atol=1e-4 * scale)
            ]
            if found:
                links[id(t)] = found[0]
                break
    return links


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
    residual=True,
):
    links = residual_links(teacher_block, targets, teacher_calls[0]) if residual else {}
    teacher_x, teacher_r = _recorded_inputs(
        teacher_block, [t.original for t in targets], sorted(set(links.values())), teacher_calls
    )
    for group in _input_groups(targets, teacher_x):
        layers = [walk.navigate(new_model, t.path) for t in group]
        sources = sorted({links[id(t)] for t in group if id(t) in links})
        # The group's layers read one input: one of them is recorded.
        student_x, student_r = _recorded_inputs(student_block, layers[:1], sources, student_calls)
        inputs = student_x[id(layers[0])]
        shared = {}  # statistics without a residual shift, by `_rows_key`
        for t, layer in zip(group, layers):
            link = links.get(id(t))
            if link is None:
                key = _rows_key(t)
                if key not in shared:
                    shared[key] = _statistics(t, inputs, teacher_x[id(t.original)])
                statistics = shared[key]
            else:
                shifts = [r - r_s for r, r_s in zip(teacher_r[link], student_r[link])]
                statistics = _statistics(t, inputs, teacher_x[id(t.original)], shifts)
            _refit(t, layer, statistics, damping, split)
            if progbar is not None:
                progbar.add(1)


def _input_groups(targets, recorded):
    """`targets` in groups reading the same input (Q, K and V), in order:
    each group is refitted after the groups before it changed its input."""
    pending, groups = list(targets), []
    while pending:
        first = recorded[id(pending[0].original)]
        group = [
            t for t in pending
            if t is pending[0] or _same_inputs(first, recorded[id(t.original)])
        ]
        groups.append(group)
        pending = [t for t in pending if all(t is not g for g in group)]
    return groups


def _rows_key(t):
    """Targets of one group with equal keys turn the input into equal rows."""
    f = t.factorization
    return t.shape[0], None if f is None else (f.input_spec, f.contracted)


def _statistics(t, student_inputs, teacher_inputs, shifts=None):
    """`(X'^T X', X'^T X, sum of X', X'^T (R - R'))` of the rows of the
    recorded inputs; the last is zero without residual `shifts`."""
    m, n = t.shape
    gram = np.zeros((m, m))
    cross = np.zeros_like(gram)
    total = np.zeros(m)
    residual_cross = np.zeros((m, n))
    for i, (xs, x) in enumerate(zip(student_inputs, teacher_inputs)):
        rows_s = t.input_rows(xs).astype(np.float32)
        rows_t = t.input_rows(x).astype(np.float32)
        gram += rows_s.T @ rows_s
        cross += rows_s.T @ rows_t
        total += rows_s.sum(axis=0, dtype=np.float64)
        if shifts is not None:
            residual_cross += rows_s.T @ shifts[i].reshape(-1, n).astype(np.float32)
    return gram, cross, total, residual_cross


def _refit(t, layer, statistics, damping, split):
    """Refits one layer's factors; keeps its current ones when they fit better.

    The fit is to the original outputs `X W + b - b'` (`b'` the layer's
    bias now, plus the residual shift `R - R'` whose cross term
    `statistics` holds: `_statistics`, `residual_links`); the closed form
    minimises it with the
    damping term, so the undamped objective is checked before the new
    factors are set: the refit never increases the layer's calibration error.
    """
    n = t.shape[1]
    gram, cross, total, residual_cross = statistics
    # A bias moved by `bias_correction` (b' != b) is part of the fit too (a
    # new array: `statistics` may be shared by the layers of a group).
    bias = getattr(layer, "bias", None)
    if t.bias is not None and bias is not None and t.bias.size == n:
        shift = t.bias.reshape(-1).astype(np.float64) - to_numpy(bias).reshape(-1)
        residual_cross = residual_cross + np.outer(total, shift)
    a, b = data_aware.fitted_factors(
        t.matrix, gram, cross, t.rank, damping=damping, split=split, residual_cross=residual_cross
    )
    target_cross = cross @ t.matrix.astype(np.float64) + residual_cross
    old_a, old_b = layer.factors()
    old = np.asarray(old_a, np.float64) @ np.asarray(old_b, np.float64)
    new = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    if data_aware.fit_objective(new, gram, target_cross) <= data_aware.fit_objective(
        old, gram, target_cross
    ):
        layer.set_factors(a, b)


def _same_inputs(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b)
    )
