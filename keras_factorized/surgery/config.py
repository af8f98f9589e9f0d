"""Options of `factorize`'s methods as config objects (as `Model.quantize(config=...)`).

`WhitenedConfig` holds the options of the activation-aware SVD (`"whitened"`,
and the start of `"learned"`); `DistillationConfig` those of the training of
`"learned"`. Each checks its values when it is made, so a wrong option fails
before any work. The keyword arguments `factorize` took before these objects
(`damping=`, `distillation_epochs=`, ...) still work: `from_legacy_kwargs`
turns them into the config objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from keras_factorized.validation import invalid_type
from keras_factorized.validation import invalid_value
from keras_factorized.validation import is_integer
from keras_factorized.validation import is_real

DISTILLATION_TRAINABLE = ("factors", "all")
# Keras's mixed precision: float32 variables, low-precision computations.
DISTILLATION_DTYPE_POLICIES = ("mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class WhitenedConfig:
    """Options of the activation-aware SVD of `factorize(method="whitened")`.

    Args:
        damping: added to the diagonal of `X^T X`, as a fraction of its mean,
            so that directions the calibration data never visited keep a
            little weight.
        bias_correction: for layers with a bias, fit the factors to the
            centred inputs and move the mean output error into the bias
            (`b' = b + mean(X) (W - A B)`). Off by default: on MiniLM it lowered
            the layer errors but made the end-to-end embeddings worse.
        sequential: after the whitened factors, refit each layer's factors,
            block by block in model order, to the inputs the compressed
            model really feeds it (closed form; see `surgery.sequential`).
            A refit is kept only where it lowers the layer's error on the
            calibration data, so it never makes a layer fit worse.
        residual: in the sequential refit, a layer whose output is added
            to a residual stream (a Transformer block's attention output and
            second feed-forward projection) also absorbs the difference
            between the original and the compressed residual, as far as its
            inputs predict it (`sequential.residual_links`).

    Example:

    >>> WhitenedConfig(damping=0.05).damping
    0.05
    """

    damping: float = 0.01
    bias_correction: bool = False
    sequential: bool = True
    residual: bool = True

    def __post_init__(self):
        if not is_real(self.damping) or self.damping < 0:
            raise invalid_value("damping", "a number >= 0", self.damping)
        for name in ("bias_correction", "sequential", "residual"):
            if not isinstance(getattr(self, name), bool):
                raise invalid_type(name, "a boolean", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
    """Options of the training step of `factorize(method="learned")`.

    Args:
        data: unlabelled model inputs to distil on (an array, a dict of arrays
            or a `tf.data.Dataset`); default: `factorize`'s `calibration_data`.
        epochs: end-to-end passes over `data` (0: none). On MiniLM, 16
            rather than 14 raise the cosine of `benchmarks.bert_levers` from
            0.9291 to 0.9308; the call takes 842 s instead of 776 s on 2
            CPU cores.
        block_epochs: block-wise passes over `data` before the end-to-end
            ones: each block's factors trained to reproduce that block's
            original outputs from the compressed model's inputs
            (`surgery.blockwise`).
        learning_rate: peak Adam learning rate (linear warm-up over the first
            10% of the steps, then cosine decay).
        batch_size: batch size for array `data`. Training batches all have
            one size: a short one is filled up with the first examples
            (`distillation.filled_batches`), so the train step compiles once.
            Small batches take more steps per epoch, which generalise better
            from a few hundred examples (on MiniLM, with block outputs
            weighted 8, batches of 8 rather than 16 raise the cosine of
            `benchmarks.bert_levers` from 0.9268 to 0.9284).
        outputs: the outputs to reproduce (keys of a dict output, e.g.
            `["sequence_output"]`, or indices); default all of them.
        loss: the Keras loss between the new and the original outputs
            (`"mse"`, `"cosine_similarity"`, a `keras.losses.Loss`), or
            `"auto"`: `"cosine_similarity"` for outputs with a sequence axis
            (`(batch, steps, features)`, e.g. a Transformer's hidden states,
            whose direction is what poolings and later layers read) and
            `"mse"` for the others (logits, pooled vectors).
        block_weight: the weight, beside the model outputs' 1, of a loss on
            the outputs of the blocks holding the factorized layers (each
            Transformer block's hidden states; `loss`'s rule for each),
            shared by the blocks: the compressed model is kept close to the
            original all along its depth, not only at its outputs, which
            generalises better from a few examples (TinyBERT's intermediate
            distillation; on MiniLM, weight 32 rather than 8 raises the
            cosine of `benchmarks.bert_levers` from 0.9284 to 0.9291).
            `0`: the model outputs only. The original block outputs are
            kept in memory for all of `data`.
        trainable: `"all"` trains the new layers and the layers that were
            kept (normalizations, embeddings, layers left whole), so that
            they absorb part of the factors' error; `"factors"` trains only
            the new layers. Layers the model holds frozen
            (`layer.trainable = False`) stay frozen either way.
        seed: seeds the order of the batches and the held-out split.
        time_budget: seconds each training phase (block-wise, end-to-end)
            may take; it stops after the step that crosses it (the
            factors kept are then those of the best held-out loss seen, the
            start included). `None`: no limit. A budget makes the result
            depend on the machine's speed.
        validation_split: the fraction in `[0, 1)` of `data` held out of
            training (drawn at random, seeded by `seed`; whole batches of a
            `tf.data.Dataset`) to keep the best factors: the held-out loss is
            measured before training, after the block-wise phase and after
            each end-to-end epoch, and the factors returned are those of the
            lowest, so distillation never returns factors worse on it than
            those it started from. The held-out examples should be new to
            the start: when `data` is left to the calibration data, they
            were also fitted by the whitened factors, which favours keeping
            the start. `0`: nothing held out, the factors of the last epoch
            are kept.
        validation_data: held-out model inputs to keep the best factors on,
            in the forms of `data`, instead of a split of `data` (then
            `validation_split` is not used).
        refit: when `data` is not the calibration data, the sequential
            refit of `WhitenedConfig` (closed form, no training) runs on the
            calibration data and `data` (less its held-out part) together,
            instead of on the calibration data alone: a closed-form fit to a
            few calibration examples carries over less well to new inputs
            than a fit to more. Kept only if it lowers the held-out loss
            (else the whitened factors stay); needs
            `WhitenedConfig(sequential=True)`; costs a sequential refit over
            all that data (on MiniLM, 128 + 448 reviews: about 3 minutes, a
            fifth of the call).
        use_calibration_data: when `data` is given, the training passes
            also train on `factorize`'s calibration data (the held-out part
            is drawn from `data` only): more examples to generalise from.
        token_noise: the fraction in `[0, 1]` of the tokens of each training
            batch replaced, at every step, by tokens drawn from the batch
            (`surgery.augmentation.replace_tokens`; inputs must hold token
            ids: an integer array, or a dict with `"token_ids"`), with the
            original model's outputs on the new batch as its targets: new
            examples at every step, which generalise better from a few
            hundred, for the cost of running the original model on them.
            `"auto"`: 0.15 for inputs holding token ids, else 0. `0`: the
            inputs as they are, the original's outputs computed once.
        dtype_policy: a Keras mixed-precision policy, `"mixed_bfloat16"` or
            `"mixed_float16"`, that the new and the original model compute
            in during the end-to-end epochs (their variables stay float32,
            and each layer's own policy is restored afterwards; the held-out
            losses are measured in the layers' own policies), or `None`:
            each layer's own. For speed where the hardware computes in 16
            bits natively (GPUs; CPUs with AVX512-BF16 or AMX for bfloat16);
            where it does not, it can be slower. `"mixed_float16"` scales
            the loss (`keras.optimizers.LossScaleOptimizer`).

    Example:

    >>> DistillationConfig(epochs=4, learning_rate=3e-4).epochs
    4
    """

    data: Any = None
    epochs: int = 16
    block_epochs: int = 0
    learning_rate: float = 1e-4
    batch_size: int = 8
    outputs: Sequence | None = None
    loss: Any = "auto"
    block_weight: float = 32.0
    trainable: str = "all"
    seed: int = 0
    time_budget: float | None = None
    validation_split: float = 0.125
    validation_data: Any = None
    refit: bool = True
    use_calibration_data: bool = True
    token_noise: Any = "auto"
    dtype_policy: str | None = None

    def __post_init__(self):
        for name, low in (("epochs", 0), ("block_epochs", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not is_integer(value) or value < low:
                raise invalid_value(name, f"an integer >= {low}", value)
        if not is_real(self.learning_rate) or not self.learning_rate > 0:
            raise invalid_value("learning_rate", "a number > 0", self.learning_rate)
        if self.trainable not in DISTILLATION_TRAINABLE:
            raise invalid_value("trainable", f"one of {DISTILLATION_TRAINABLE}", self.trainable)
        if not is_integer(self.seed):
            raise invalid_value("seed", "an integer", self.seed)
        if self.time_budget is not None and (
            not is_real(self.time_budget) or not self.time_budget > 0
        ):
            raise invalid_value("time_budget", "a number of seconds > 0, or None", self.time_budget)
        if not is_real(self.block_weight) or not self.block_weight >= 0:
            raise invalid_value("block_weight", "a number >= 0", self.block_weight)
        for name in ("refit", "use_calibration_data"):
            if not isinstance(getattr(self, name), bool):
                raise invalid_type(name, "a boolean", getattr(self, name))
        if not (isinstance(self.token_noise, str) and self.token_noise == "auto") and not (
            is_real(self.token_noise) and 0 <= self.token_noise <= 1
        ):
            raise invalid_value("token_noise", '"auto" or a number in [0, 1]', self.token_noise)
        if not is_real(self.validation_split) or not 0 <= self.validation_split < 1:
            raise invalid_value("validation_split", "a number in [0, 1)", self.validation_split)
        if self.dtype_policy is not None and self.dtype_policy not in DISTILLATION_DTYPE_POLICIES:
            raise invalid_value(
                "dtype_policy", f"None or one of {DISTILLATION_DTYPE_POLICIES}", self.dtype_policy
            )


# factorize's keyword arguments before the config objects: name -> (config, field).
LEGACY_KWARGS = {
    "damping": (WhitenedConfig, "damping"),
    "bias_correction": (WhitenedConfig, "bias_correction"),
    "distillation_data": (DistillationConfig, "data"),
    "distillation_epochs": (DistillationConfig, "epochs"),
    "distillation_outputs": (DistillationConfig, "outputs"),
    "distillation_loss": (DistillationConfig, "loss"),
    "distillation_trainable": (DistillationConfig, "trainable"),
    "learning_rate": (DistillationConfig, "learning_rate"),
}


def from_legacy_kwargs(whitening, distillation, batch_size, kwargs):
    """`(whitening, distillation)` configs from `factorize`'s keyword arguments.

    The old keyword arguments (`LEGACY_KWARGS`) update the given configs (or
    the defaults); naming both `damping=` and `whitening=` is an error. With
    an old distillation argument, the distillation batch size is
    `factorize`'s `batch_size`, as it was before `DistillationConfig`.
    """
    unknown = sorted(set(kwargs) - set(LEGACY_KWARGS))
    if unknown:
        raise TypeError(f"factorize() got an unexpected keyword argument {unknown[0]!r}")
    configs = {WhitenedConfig: whitening, DistillationConfig: distillation}
    for cls, config in configs.items():
        if config is not None and not isinstance(config, cls):
            name = "whitening" if cls is WhitenedConfig else "distillation"
            raise invalid_type(name, f"a `{cls.__name__}` or None", config)
    # An old-style call distils at `batch_size`, as it did before the configs;
    # any other at `DistillationConfig`'s own batch size.
    old_style = any(LEGACY_KWARGS[name][0] is DistillationConfig for name in kwargs)
    updates = {WhitenedConfig: {}, DistillationConfig: {"batch_size": batch_size} if old_style else {}}
    for name, value in kwargs.items():
        cls, field = LEGACY_KWARGS[name]
        if configs[cls] is not None:
            raise invalid_value(
                name, f"to be left out when a `{cls.__name__}` is given (set its `{field}`)", value
            )
        updates[cls][field] = value
    result = []
    for cls, config in configs.items():
        if config is None:
            result.append(_make(cls, updates[cls]))
        else:
            result.append(config)
    return tuple(result)


def _make(cls, values):
    """`cls(**values)`, its errors naming the legacy keyword arguments."""
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        message = str(e)
        for legacy, (owner, field) in LEGACY_KWARGS.items():
            if owner is cls and field in values and legacy != field:
                message = message.replace(f"`{field}`", f"`{legacy}`").replace(
                    f"Received: {field}=", f"Received: {legacy}="
                )
        raise type(e)(message) from None
