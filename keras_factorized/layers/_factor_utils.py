"""Argument checks and weight helpers shared by the factorized layers."""

from __future__ import annotations

import numbers

import keras
import numpy as np

_LOW_PRECISION = ("float16", "bfloat16")


def check_positive_int(name, value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer. Received: {name}={value!r}"
        )
    return int(value)


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Received an invalid value for `{name}`, expected a boolean. "
            f"Received: {name}={value!r}"
        )
    return bool(value)


def factor_dtype(dtype_policy):
    """The dtype of the factor variables: the policy's, but never 16-bit.

    Keras forces LoRA factors to float32 for the same reason: bfloat16 factors
    trained with Adam stop learning (keras-hub issue 2629).
    """
    variable_dtype = dtype_policy.variable_dtype
    return "float32" if variable_dtype in _LOW_PRECISION else variable_dtype


def assign_factor(variable, value, factor_name, dim_names):
    """Assigns `value` to a factor variable after checking its shape."""
    value = keras.ops.convert_to_numpy(value) if not isinstance(value, np.ndarray) else value
    expected = tuple(variable.shape)
    if tuple(value.shape) != expected:
        dims = ", ".join(f"{n}={d}" for n, d in zip(dim_names, expected))
        raise ValueError(
            f"Received an invalid value for `{factor_name}`, expected an array of "
            f"shape {expected} ({dims}). Received: {factor_name}.shape="
            f"{tuple(value.shape)}"
        )
    if not np.all(np.isfinite(value)):
        raise ValueError(
            f"Received an invalid value for `{factor_name}`, expected finite "
            "values. Received: an array containing NaN or Inf"
        )
    variable.assign(value.astype(variable.dtype))


class TrainableFactorsMixin:
    """`a_trainable` / `b_trainable`: freeze or train each factor on its own.

    A layer using it sets `_a_trainable`, `_b_trainable` in `__init__` and
    names its two factor variables in `_factor_variable_names`; the flags are
    applied to the variables when set after `build()`.
    """

    _factor_variable_names = ("a", "b")

    def _set_factor_trainable(self, index, value):
        name = ("a_trainable", "b_trainable")[index]
        value = check_bool(name, value)
        setattr(self, f"_{name}", value)
        if self.built:
            getattr(self, self._factor_variable_names[index]).trainable = value

    @property
    def a_trainable(self):
        return self._a_trainable

    @a_trainable.setter
    def a_trainable(self, value):
        self._set_factor_trainable(0, value)

    @property
    def b_trainable(self):
        return self._b_trainable

    @b_trainable.setter
    def b_trainable(self, value):
        self._set_factor_trainable(1, value)
