"""The training step of `method="learned"`: distil the original model's outputs.

The factor layers of the new model (the *student*) are trained by Adam so
that its outputs reproduce those of the original model (the *teacher*) on
unlabelled inputs; every other layer is frozen unless
`DistillationConfig(trainable="all")`. With `block_weight`, the outputs of
the blocks holding the factors (each Transformer block's hidden states) are
reproduced too, tapped inside the train step (`blocks.tapped_outputs`). The
teacher's outputs are computed once, before training. `split_held_out` sets
aside the held-out inputs on which the best factors are kept: they must be
new to the start, or its closed-form fit to them makes every training step
look like a loss.
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import keras
import numpy as np

from keras_factorized import _keras_compat
from keras_factorized.surgery import augmentation
from keras_factorized.surgery import blocks as blocks_lib
from keras_factorized.surgery import walk
from keras_factorized.surgery.calibration import Batched
from keras_factorized.surgery.calibration import batches
from keras_factorized.surgery.calibration import is_batched
from keras_factorized.surgery.calibration import to_numpy


def select_outputs(outputs, selection):
    """The outputs to distil: all (flattened), or the given dict keys / indices."""
    if selection is None:
        return keras.tree.flatten(outputs)
    if isinstance(outputs, dict):
        return [outputs[k] for k in selection]
    flat = keras.tree.flatten(outputs)
    return [flat[i] for i in selection]


class _Distiller(keras.Model):
    """The student's selected outputs, then the outputs of `blocks` (layers of
    the student), as a model that `train_on_batch` can train."""

    def __init__(self, student, selection, blocks=(), **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.selection = selection
        self.blocks = list(blocks)

    def call(self, inputs):
        outputs, block_outputs = run_tapped(self.student, inputs, self.selection, self.blocks)
        return outputs + block_outputs


def run_tapped(model, inputs, selection, blocks):
    """`(outputs, block_outputs)`: `model`'s selected outputs on `inputs`,
    and the floating-point outputs of every call of each of `blocks`."""
    with blocks_lib.tapped_outputs(blocks) as taps:
        outputs = select_outputs(model(inputs, training=False), selection)
    block_outputs = [
        x
        for block in blocks
        for x in keras.tree.flatten(taps[id(block)])
        if "float" in keras.backend.standardize_dtype(x.dtype)
    ]
    return outputs, block_outputs


@contextlib.contextmanager
def only_trainable(model, layers, train_all=False):
    """Within the block, only `layers` of `model` train (all with `train_all`);
    every layer's `trainable` is restored afterwards."""
    all_layers = [layer for _, _, layer, _ in walk.walk(model)]
    saved = [(layer, layer.trainable) for layer in all_layers]
    ids = {id(layer) for layer in layers}
    try:
        for layer in [] if train_all else all_layers:
            if getattr(layer, "_layers", None):
                continue  # containers follow their leaves
            layer.trainable = id(layer) in ids
        yield
    finally:
        for layer, trainable in saved:
            layer.trainable = trainable


@contextlib.contextmanager
def computing_in(models, policy):
    """Within the block, every layer of `models` with a float dtype policy
    computes in `policy` (a name of `config.DISTILLATION_DTYPE_POLICIES`;
    `None`: nothing changes); the layers' own policies are restored afterwards.

    A built layer's variables keep their dtype: Keras casts them, and the
    layer's floating inputs, to the policy's compute dtype at each call.
    Layers with a quantized policy (or a `DTypePolicyMap`) are left as they
    are.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> with computing_in([model], "mixed_bfloat16"):
    ...     y = model(np.ones((1, 4)))
    ...     print(model.layers[0].compute_dtype, keras.backend.standardize_dtype(y.dtype))
    bfloat16 bfloat16
    >>> model.layers[0].compute_dtype
    'float32'
    """
    saved = []
    try:
        for model in models if policy is not None else ():
            for layer in [model] + [layer for _, _, layer, _ in walk.walk(model)]:
                current = layer.dtype_policy
                if isinstance(current, keras.dtype_policies.DTypePolicyMap) or (
                    current.quantization_mode is not None
                ):
                    continue
                saved.append((layer, current))
                layer.dtype_policy = policy
        yield
    finally:
        for layer, current in reversed(saved):
            layer.dtype_policy = current


class Deadline:
    """`expired()` once `seconds` have passed since it was made (never for `None`)."""

    def __init__(self, seconds):
        self.end = None if seconds is None else time.monotonic() + float(seconds)

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end


def _optimizer(learning_rate, steps):
    # Warm-up then cosine decay: a constant rate large enough to help later
    # first knocks the SVD-initialised factors off their good start.
    warmup = max(1, steps // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, steps - warmup), warmup_target=learning_rate, warmup_steps=warmup
    )
    return keras.optimizers.Adam(schedule)


def output_losses(loss, targets):
    """The loss of each output: `loss`, or for `"auto"`, `"cosine_similarity"`
    for outputs with a sequence axis (`(batch, steps, features)`: hidden
    states, token embeddings, whose direction is what later layers and
    poolings read) and `"mse"` for the others (logits, pooled vectors).

    Example:

    >>> output_losses("auto", [np.zeros((2, 5, 8)), np.zeros((2, 8))])
    ['cosine_similarity', 'mse']
    """
    if not (isinstance(loss, str) and loss == "auto"):
        return [loss] * len(targets)
    return ["cosine_similarity" if len(t.shape) >= 3 else "mse" for t in targets]


def loss_label(losses) -> str:
    """The losses of `output_losses`, each named once, for a report.

    Example:

    >>> loss_label(["cosine_similarity", "mse", "cosine_similarity"])
    'cosine_similarity + mse'
    """
    return " + ".join(dict.fromkeys(str(loss) for loss in losses))


class Distilled(NamedTuple):
    """What `distill` did.

    Attributes:
        history: the mean training loss of each epoch.
        held_out: the held-out loss before training and after each epoch
            (empty without validation data).
        token_noise: the fraction of the tokens replaced at every step
            (`config.token_noise` with `"auto"` resolved; 0: none).
        losses: the loss of each reproduced model output (`output_losses`
            with `"auto"` resolved), block outputs not included.
        kept: the index in `held_out` of the weights kept (0: the start;
            `None` without validation data: the last epoch's).
    """

    history: list
    held_out: list
    token_noise: float
    losses: list
    kept: int | None = None


def _mean_loss(distiller, inputs, targets):
    return float(
        np.mean([np.ravel(distiller.test_on_batch(x, y))[0] for x, y in zip(inputs, targets)])
    )


def _teacher_outputs(teacher, inputs, selection, blocks=()):
    """`(targets, n)`: per batch, the outputs then the block outputs of
    `teacher` as NumPy arrays; `n` block outputs per batch."""
    targets, n = [], 0
    for x in inputs:
        outputs, block_outputs = run_tapped(teacher, x, selection, blocks)
        targets.append([to_numpy(y) for y in outputs + block_outputs])
        n = len(block_outputs)
    return targets, n


def _loss_weights(config, targets, n_blocks):
    """Weight 1 for each selected output; `config.block_weight` shared by the
    block outputs (the last `n_blocks` of `targets`)."""
    n = len(targets) - n_blocks
    return [1.0] * n + [config.block_weight / n_blocks] * n_blocks


def split_held_out(data, config):
    """`(train, held_out, description)`: the inputs to distil on and those to
    keep the best factors on.

    `config.validation_data` if given; else a random fraction
    `config.validation_split` of `data`, seeded by `config.seed` (of the
    examples of array data, of the batches of a `tf.data.Dataset`), at least
    one example or batch; `held_out` is `None` when nothing is held out
    (`validation_split=0`, or fewer than two examples or batches).

    Example:

    >>> from keras_factorized.surgery import DistillationConfig
    >>> x = np.arange(16.0).reshape(8, 2)
    >>> train, held, why = split_held_out(x, DistillationConfig(validation_split=0.25))
    >>> train.shape, held.shape, why
    ((6, 2), (2, 2), '2 of 8 distillation examples held out')
    """
    if config.validation_data is not None:
        return data, config.validation_data, "`validation_data`"
    if config.validation_split == 0:
        return data, None, None
    is_dataset = is_batched(data)
    if is_dataset:
        items = Batched(batches(data, config.batch_size, "distillation_data"))
        n, what = len(items), "batches"
    else:
        flat = keras.tree.flatten(data)
        n, what = (len(flat[0]) if flat else 0), "examples"
    if n < 2:
        return data, None, None
    held = min(n - 1, max(1, int(round(config.validation_split * n))))
    order = np.random.default_rng([config.seed, 1]).permutation(n)  # not the batch order's
    parts = []
    for idx in (np.sort(order[held:]), np.sort(order[:held])):
        if is_dataset:
            parts.append(Batched(items[i] for i in idx))
        else:
            parts.append(keras.tree.map_structure(lambda a, i=idx: np.asarray(a)[i], data))
    return parts[0], parts[1], f"{held} of {n} distillation {what} held out"


def joined_batches(datas, batch_size):
    """The batches of each of `datas` (arrays, dicts of arrays or datasets),
    one after the other, as data that `calibration.batches` reads."""
    return Batched(b for data in datas for b in batches(data, batch_size))


def filled_batches(inputs):
    """`inputs` re-cut into batches of one size, the last one filled up with
    the first examples, when a batch is shorter than the others.

    Every training step then has the same shapes, so the train step (and the
    teacher's predict step, with token noise) is compiled once: a short batch
    compiled each a second time (on MiniLM, a retrace of the train step; on
    JAX, seconds per compile even for a tiny model). Each example is still
    seen once per epoch, and the few in the fill twice. Batches that do not
    join (different structures, or other shapes than the batch axis) are
    returned as they are.

    Example:

    >>> x = np.arange(10.0).reshape(5, 2)
    >>> [b[:, 0].tolist() for b in filled_batches([x[:2], x[2:4], x[4:]])]
    [[0.0, 2.0], [4.0, 6.0], [8.0, 0.0]]
    """
    sizes = [len(keras.tree.flatten(x)[0]) for x in inputs]
    if not sizes or min(sizes) == max(sizes):
        return inputs
    try:
        joined = keras.tree.map_structure(lambda *a: np.concatenate(a), *inputs)
    except (ValueError, TypeError):
        return inputs
    size, total = max(sizes), sum(sizes)
    steps = -(-total // size)
    order = np.concatenate([np.arange(total), np.arange(steps * size - total)])
    return [
        keras.tree.map_structure(lambda a, i=order[s * size : (s + 1) * size]: a[i], joined)
        for s in range(steps)
    ]


class HeldOutLoss:
    """The distillation loss of `student` to `teacher` on held-out inputs,
    measured as often as needed (`loss()`): the teacher's outputs are computed
    and the evaluation step is compiled once, when it is made.

    It computes in each layer's own dtype policy, whatever policy the
    training runs in, so that losses measured before, during and after a
    low-precision distillation compare.

    Args:
        student: the model whose loss is measured (its weights may change
            between two measurements).
        teacher: the original model.
        config: a `DistillationConfig` (its `outputs`, `loss`, `batch_size`).
        data: the held-out model inputs.
    """

    def __init__(self, student, teacher, config, data):
        self.student, self.data = student, data
        self.key = (config.outputs, config.loss, config.batch_size)
        inputs = list(batches(data, config.batch_size))
        targets, _ = _teacher_outputs(teacher, inputs, config.outputs)
        self.evaluator = _Distiller(student, config.outputs, name="held_out")
        self.evaluator.compile(loss=output_losses(config.loss, targets[0]))
        _keras_compat.symbolic_build(self.evaluator, inputs[0], targets[0])
        self.inputs, self.targets = inputs, targets

    def measures(self, student, config) -> bool:
        """Whether this measures `student`'s loss as `config` defines it."""
        return student is self.student and self.key == (
            config.outputs, config.loss, config.batch_size
        )

    def loss(self) -> float:
        return _mean_loss(self.evaluator, self.inputs, self.targets)


def distill(student, teacher, config, layers, data, verbose=0, validation=None, block_paths=()):
    """Trains `layers` of `student` to reproduce `teacher`'s outputs on `data`.

    With `config.block_weight`, the outputs of the blocks at `block_paths`
    are reproduced too (the loss on them weighted by it). With `validation`
    data, the loss on the model outputs there is measured before training and
    after each epoch, and `layers` end with the weights of the best of these
    points: distillation never returns factors worse, on that data, than
    those it started from. With `config.dtype_policy`, both models compute
    in that policy meanwhile (`computing_in`).

    Args:
        student: the factorized model (trained in place).
        teacher: the original model.
        config: a `DistillationConfig`.
        layers: the layers of `student` to train.
        data: the model inputs (`config.data` or the calibration data).
        verbose: 1 shows a progress bar.
        validation: held-out model inputs, a `HeldOutLoss` on them (reused
            when it measures `student` as `config` does), or `None`.
        block_paths: paths of the blocks (in both models) whose outputs are
            reproduced as well.

    Returns:
        A `Distilled`: the training and held-out losses, the token noise
        rate and the output losses used.
    """
    if isinstance(validation, HeldOutLoss) and not validation.measures(student, config):
        validation = validation.data
    if validation is not None and not isinstance(validation, HeldOutLoss):
        validation = HeldOutLoss(student, teacher, config, validation)
    # Measured (and so compiled) before the policy changes: in the layers' own.
    start = validation.loss() if validation is not None else None
    with computing_in([student, teacher], config.dtype_policy):
        return _distill(
            student, teacher, config, layers, data, verbose, (validation, start), block_paths
        )


def _distill(student, teacher, config, layers, data, verbose, held, block_paths):
    block_paths = list(block_paths) if config.block_weight else []
    inputs = filled_batches(list(batches(data, config.batch_size, name="distillation_data")))
    teacher_blocks = [walk.navigate(teacher, p) for p in block_paths]
    rate = augmentation.noise_rate(config.token_noise, inputs[0])
    # With token noise every step has new inputs: only the first batch's
    # targets are needed here, for the losses.
    cached = inputs[:1] if rate else inputs
    targets, n_blocks = _teacher_outputs(teacher, cached, config.outputs, teacher_blocks)
    noisy = _NoisyBatches(teacher, teacher_blocks, config, rate) if rate else None
    losses = output_losses(config.loss, targets[0])
    with only_trainable(student, layers, config.trainable == "all"):
        blocks = [walk.navigate(student, p) for p in block_paths]
        distiller = _Distiller(
            student, config.outputs, blocks, name="distiller", dtype=config.dtype_policy
        )
        distiller.compile(
            optimizer=_optimizer(config.learning_rate, max(1, config.epochs * len(inputs))),
            loss=losses,
            loss_weights=_loss_weights(config, targets[0], n_blocks) if n_blocks else None,
        )
        _keras_compat.symbolic_build(distiller, inputs[0], targets[0])
        history, held_out, kept = _train(distiller, inputs, targets, config, held, verbose, noisy)
    return Distilled(history, held_out, rate, losses[: len(losses) - n_blocks], kept)


class _NoisyBatches:
    """`batch(x)`: `x` with a fraction `rate` of its tokens replaced
    (`augmentation.replace_tokens`, seeded by `config.seed`) and the
    teacher's outputs on it, computed by a compiled predict step."""

    def __init__(self, teacher, teacher_blocks, config, rate):
        self.predictor = _Distiller(
            teacher, config.outputs, teacher_blocks, name="teacher", dtype=config.dtype_policy
        )
        self.rate = rate
        self.rng = np.random.default_rng([config.seed, 2])

    def batch(self, x):
        x = augmentation.replace_tokens(x, self.rate, self.rng)
        return x, [np.asarray(y) for y in self.predictor.predict_on_batch(x)]


def _train(distiller, inputs, targets, config, held, verbose, noisy=None):
    """The epochs of `distill`: `(history, held_out, kept)` as in
    `Distilled`; `held` is `(HeldOutLoss, its loss at the start)` or
    `(None, None)`; `noisy` a `_NoisyBatches` or `None`."""
    history, held_out, kept = [], [], None
    trained = distiller.trainable_weights
    held, start = held
    if held is not None:
        held_out.append(start)
        best, kept = [np.array(to_numpy(v)) for v in trained], 0
    progbar = keras.utils.Progbar(config.epochs * len(inputs), verbose=verbose)
    rng = np.random.default_rng(config.seed)
    deadline = Deadline(config.time_budget)
    for _ in range(config.epochs):
        losses = []
        for i in rng.permutation(len(inputs)):
            x, y = noisy.batch(inputs[i]) if noisy else (inputs[i], targets[i])
            loss = float(np.ravel(distiller.train_on_batch(x, y))[0])
            losses.append(loss)
            progbar.add(1, [("loss", loss)])
            if deadline.expired():
                break
        history.append(float(np.mean(losses)))
        if held is not None:
            held_out.append(held.loss())
            # A diverged epoch (nan) is never kept; a nan start always loses.
            if np.isfinite(held_out[-1]) and not held_out[-1] > held_out[kept]:
                best, kept = [np.array(to_numpy(v)) for v in trained], len(held_out) - 1
        if deadline.expired():
            break
    if held is not None:
        for variable, value in zip(trained, best):
            variable.assign(value)
    return history, held_out, kept
