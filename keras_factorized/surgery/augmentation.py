"""Input noise for distillation: new inputs each step, the original's outputs as targets.

A few hundred unlabelled examples are few for a whole Transformer's factors
to generalise from: the training loss keeps falling while the held-out loss
stalls. Distillation needs no labels, so any input is a training example once
the original model (the teacher) has seen it. `replace_tokens` makes such
inputs from the real ones, TinyBERT's data augmentation without its word
lists: a fraction of each sequence's tokens replaced by tokens drawn from the
same batch, so that the new tokens follow the data's own distribution.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_factorized.validation import invalid_value

TOKEN_KEY = "token_ids"
MASK_KEY = "padding_mask"
# `DistillationConfig(token_noise="auto")` on inputs holding token ids. On
# all-MiniLM-L6-v2 at half its projection weights, 12 epochs (benchmarks.bert_levers):
# 0 -> 0.9183, 0.15 -> 0.9209, 0.3 -> 0.9181.
AUTO_TOKEN_NOISE = 0.15


def token_positions(inputs):
    """`(ids, real)`: the token ids of a batch of `inputs` and a boolean mask
    of the real tokens, or `None` for inputs that hold no token ids.

    Token ids are a KerasHub-style dict's `"token_ids"` (real where its
    `"padding_mask"` is, else where non-zero) or an integer array (real where
    non-zero, Keras's `mask_zero` convention).

    Example:

    >>> ids, real = token_positions({"token_ids": np.array([[5, 6, 0]]),
    ...                              "padding_mask": np.array([[1, 1, 0]])})
    >>> ids.tolist(), real.tolist()
    ([[5, 6, 0]], [[True, True, False]])
    >>> token_positions(np.zeros((2, 3), dtype="float32")) is None
    True
    """
    if isinstance(inputs, dict):
        if TOKEN_KEY not in inputs:
            return None
        ids = np.asarray(inputs[TOKEN_KEY])
        mask = inputs.get(MASK_KEY)
        real = ids != 0 if mask is None else np.asarray(mask).astype(bool)
        return ids, real
    if isinstance(inputs, (list, tuple)) or not hasattr(inputs, "dtype"):
        return None
    ids = np.asarray(inputs)
    if "int" not in keras.backend.standardize_dtype(ids.dtype) or ids.ndim != 2:
        return None
    return ids, ids != 0


def noise_rate(token_noise, batch) -> float:
    """The fraction of tokens `DistillationConfig(token_noise=...)` replaces
    in inputs like `batch`: a number as it is; `"auto"`: `AUTO_TOKEN_NOISE`
    for inputs holding token ids (`token_positions`), else 0.

    Example:

    >>> noise_rate("auto", np.array([[5, 6, 0]])), noise_rate("auto", np.ones((1, 3)))
    (0.15, 0.0)
    """
    if not (isinstance(token_noise, str) and token_noise == "auto"):
        return float(token_noise)
    return AUTO_TOKEN_NOISE if token_positions(batch) is not None else 0.0


def replace_tokens(inputs, rate, rng):
    """A copy of the batch `inputs` with a fraction `rate` of its tokens
    replaced by tokens drawn at random from the batch's real tokens.

    The first and last real token of each sequence are kept (where
    BERT-style tokenizers put `[CLS]` and `[SEP]`), and so are the padding
    and every other input (masks, segment ids).

    Args:
        inputs: a batch of model inputs holding token ids (`token_positions`).
        rate: the probability in `[0, 1]` that a token is replaced.
        rng: a `numpy.random.Generator`.

    Returns:
        The new batch, in the structure of `inputs`.

    Example:

    >>> x = np.array([[2, 7, 8, 9, 3, 0]])
    >>> replace_tokens(x, 1.0, np.random.default_rng(0))[0, [0, 4, 5]].tolist()
    [2, 3, 0]
    """
    found = token_positions(inputs)
    if found is None:
        raise invalid_value(
            "token_noise",
            "0 for inputs without token ids (an integer array, or a dict with "
            f'"{TOKEN_KEY}")',
            rate,
        )
    ids, real = found
    inner = real.copy()
    rows = np.flatnonzero(real.any(axis=1))
    inner[rows, np.argmax(real[rows], axis=1)] = False
    inner[rows, real.shape[1] - 1 - np.argmax(real[rows, ::-1], axis=1)] = False
    pool = ids[inner]
    chosen = inner & (rng.random(ids.shape) < rate)
    new_ids = ids.copy()
    if pool.size and chosen.any():
        new_ids[chosen] = rng.choice(pool, size=int(chosen.sum()))
    if isinstance(inputs, dict):
        return {**inputs, TOKEN_KEY: new_ids}
    return new_ids
