"""Argument checks shared by the whole package, with Keras's error wording.

Every message names the argument in backticks, says what is accepted and
ends with the value received, as Keras's own layers do:

    Received an invalid value for `rank`, expected an integer in [1, 128].
    Received: rank=0
"""

from __future__ import annotations

import numbers

import numpy as np


def invalid_value(name: str, expected: str, value) -> ValueError:
    """The `ValueError` for argument `name` holding `value`.

    Example:

    >>> str(invalid_value("rank", "an integer >= 1", 0))
    'Received an invalid value for `rank`, expected an integer >= 1. Received: rank=0'
    """
    return ValueError(
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


def invalid_type(name: str, expected: str, value) -> TypeError:
    """The `TypeError` for argument `name` holding `value` of a wrong type."""
    return TypeError(
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r} of type {type(value).__name__}"
    )


def is_integer(value) -> bool:
    """An integer that is not a boolean (NumPy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A real number that is not a boolean (NumPy numbers included).

    Example:

    >>> is_real(np.float32(0.5)), is_real(True), is_real("1")
    (True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_positive_int(name: str, value) -> int:
    """`value` as an `int` if it is an integer >= 1, else a `ValueError`.

    Example:

    >>> check_positive_int("units", np.int64(3))
    3
    """
    if not is_integer(value) or value < 1:
        raise invalid_value(name, "a positive integer", value)
    return int(value)


def check_bool(name: str, value) -> bool:
    """`value` as a `bool` if it is one (NumPy booleans included), else a `TypeError`."""
    if not isinstance(value, (bool, np.bool_)):
        raise invalid_type(name, "a boolean", value)
    return bool(value)


def check_fraction(name: str, value) -> float:
    """`value` as a `float` if it is a real number in `(0, 1]`."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not 0.0 < float(value) <= 1.0
    ):
        raise invalid_value(name, "a number in (0, 1]", value)
    return float(value)


def check_choice(name: str, value, choices) -> str:
    """`value` if it is one of `choices`, else a `ValueError` listing them.

    Example:

    >>> check_choice("split", "left", ("balanced", "left", "right"))
    'left'
    """
    if not isinstance(value, str) or value not in choices:
        raise invalid_value(name, f"one of {tuple(choices)}", value)
    return value


def check_rank(rank, shape) -> int:
    """`rank` as an `int` if it is an integer in `[1, min(shape)]`.

    Example:

    >>> check_rank(16, (20000, 128))
    16
    """
    max_rank = int(min(shape))
    if not is_integer(rank) or not 1 <= rank <= max_rank:
        raise invalid_value("rank", f"an integer in [1, {max_rank}]", rank)
    return int(rank)
