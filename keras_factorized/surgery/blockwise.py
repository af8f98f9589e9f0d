"""Block-wise distillation: train each block's factors to reproduce that block.

Block by block, in model order, the factor layers of a compressed block are
trained (Adam, mean squared error) so that the block, fed the inputs the
*compressed* model gives it, returns what the original block returned for the
original inputs (block reconstruction, as post-training quantization does
it). Each step is local and cheap: one block's forward and backward passes;
the original model runs once, its block inputs and outputs are cached.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_factorized import _keras_compat
from keras_factorized.surgery import blocks as blocks_lib
from keras_factorized.surgery import walk
from keras_factorized.surgery.calibration import batches
from keras_factorized.surgery.distillation import Deadline
from keras_factorized.surgery.distillation import _optimizer
from keras_factorized.surgery.distillation import only_trainable


class _BlockRunner(keras.Model):
    """One block as a model: inputs `{"x": ..., <array keyword arguments>}`."""

    def __init__(self, block, fixed_kwargs, **kwargs):
        super().__init__(**kwargs)
        self.block = block
        self.fixed_kwargs = fixed_kwargs

    def call(self, inputs):
        named = {k: v for k, v in inputs.items() if k != "x"}
        return self.block(inputs["x"], training=False, **named, **self.fixed_kwargs)


def _split_kwargs(record):
    """`(array kwargs, other kwargs)` of a recorded call (no positional extras)."""
    _, args, kwargs, _ = record
    if args:
        raise ValueError(
            "Received an invalid value for `model`, expected blocks called with "
            f"one positional input. Received: {len(args) + 1} positional inputs"
        )
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    others = {k: v for k, v in kwargs.items() if k not in arrays and k != "training"}
    return arrays, others


def _train_block(block, layers, student_calls, teacher_outputs, config, seed, progbar, deadline):
    _, fixed = _split_kwargs(student_calls[0])
    inputs = [dict(_split_kwargs(c)[0], x=c[0]) for c in student_calls]
    with only_trainable(block, layers):
        runner = _BlockRunner(block, fixed, name="block_runner")
        steps = max(1, config.block_epochs * len(inputs))
        runner.compile(optimizer=_optimizer(config.learning_rate, steps), loss="mse")
        _keras_compat.symbolic_build(runner, inputs[0], teacher_outputs[0])
        rng = np.random.default_rng(seed)
        losses = []
        for _ in range(config.block_epochs):
            epoch = []
            for i in rng.permutation(len(inputs)):
                out = runner.train_on_batch(inputs[i], teacher_outputs[i])
                epoch.append(float(np.ravel(out)[0]))
                if progbar is not None:
                    progbar.add(1, [("block loss", epoch[-1])])
                if deadline.expired():
                    break
            losses.append(float(np.mean(epoch)))
            if deadline.expired():
                break
    return losses


def blockwise_distill(model, new_model, targets, data, config, verbose=0):
    """Trains the factors of `new_model`, block by block; returns the last
    epoch's loss of each block."""
    factorized = [t for t in targets if t.rank is not None]
    paths = list(dict.fromkeys(blocks_lib.block_path(t.path) for t in factorized))
    if not paths or config.block_epochs == 0:
        return []
    data_batches = list(batches(data, config.batch_size, name="distillation_data"))
    teacher_blocks = [walk.navigate(model, p) for p in paths]
    teacher_calls = blocks_lib.block_calls(model, teacher_blocks, data_batches, True)
    student_calls = blocks_lib.block_calls(
        new_model, [walk.navigate(new_model, paths[0])], data_batches, stop=True
    )[0]
    progbar = keras.utils.Progbar(
        len(paths) * config.block_epochs * len(data_batches), verbose=verbose
    )
    final_losses = []
    # The blocks share the budget: each may use what the blocks before it left.
    deadline = Deadline(config.time_budget)
    for i, path in enumerate(paths):
        block = walk.navigate(new_model, path)
        layers = [
            walk.navigate(new_model, t.path)
            for t in factorized
            if blocks_lib.block_path(t.path) == path
        ]
        outputs = [c[3] for c in teacher_calls[i]]
        losses = _train_block(
            block, layers, student_calls, outputs, config, config.seed + i, progbar, deadline
        )
        final_losses.append(losses[-1])
        if i + 1 == len(paths):
            break
        student_calls = blocks_lib.next_student_calls(
            new_model, paths, i, block, student_calls, teacher_calls, data_batches
        )
    return final_losses
