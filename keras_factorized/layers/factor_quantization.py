"""Int8 factors: Keras's quantization API (`layer.quantize("int8")`,
`model.quantize("int8")`) for the layers that keep `W = A @ B`.

Two parts, kept apart:

- the maths, on NumPy arrays and knowing nothing of layers:
  `quantize_factors` / `dequantize_factors`;
- `FactorQuantization`, the mixin of `LowRankLayer` that follows Keras's
  guide "Writing quantization-compatible layers" (`quantize`,
  `quantized_build`, a mode-aware build through `LowRankLayer._add_factors`,
  `_int8_call`, mode-aware `save_own_variables` / `load_own_variables`), once
  for `FactorizedEmbedding`, `LowRankDense` and `LowRankEinsumDense`.

Scale layout. Keras's `Embedding` keeps one float32 scale per row of its
table; for a factor `A` of rank 4 that scale costs as much as the int8 row
itself, and at rank 2 twice as much. Here `A` (`m x rank`) gets one scale per
*column*, and that scale is folded into `B` before `B` is quantized with one
scale per *output column*:

    A ~= A_q / s_a            (s_a: rank scales, one per column of A)
    W = A @ B ~= A_q @ (B / s_a[:, None])  =  A_q @ (B_q / s_b)

so only `s_b` (`n` float32 values) is stored: `m * rank + rank * n` int8
bytes and `4 n` scale bytes. The lookup stays a gather of int8 rows of `A_q`,
cast to the compute dtype, times the dequantized `B_q / s_b` (`rank x n`, made
at each call). The price: a row of `A` much smaller than its column's largest
entry keeps few significant bits (a per-row scale would not have this
problem). `docs/quantization.md` gives the measured errors of both layouts.

Only `"int8"` is implemented (weight-only: inputs are not quantized). Other
modes raise `UnsupportedQuantizationModeError`, a `ValueError` that is also a
`NotImplementedError`, so that `model.quantize("float8")` warns and goes on
with the other layers, as Keras does for layers without that mode.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
from keras import ops

#: The `quantize()` modes the factorized layers implement.
SUPPORTED_MODES = ("int8",)
_INT8_MAX = 127.0
_EPSILON = 1e-12


class UnsupportedQuantizationModeError(ValueError, NotImplementedError):
    """A quantization mode the factorized layers do not implement.

    Both a `ValueError` (a bad argument) and a `NotImplementedError`, which
    is what `keras.Model.quantize` catches to skip a layer with a warning.
    """


class QuantizedFactors(NamedTuple):
    """The int8 factors of `W = A @ B`: `W ~= a @ b / b_scale`.

    Attributes:
        a: int8 array, `A` in its own shape (scales folded into `b`).
        b: int8 array, `B` in its own shape.
        b_scale: float32 array of shape `b.shape[1:]`: one scale per output
            column of `B` (the value is `b / b_scale`).
    """

    a: np.ndarray
    b: np.ndarray
    b_scale: np.ndarray


def _abs_max_scale(x: np.ndarray, axis) -> np.ndarray:
    """`127 / max|x|` along `axis` (kept), so that `x * scale` fits int8."""
    peak = np.max(np.abs(x), axis=axis, keepdims=True)
    return (_INT8_MAX / np.maximum(peak, _EPSILON)).astype(np.float32)


def _to_int8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)


def quantize_factors(a, b) -> QuantizedFactors:
    """Quantizes the factors `A` (`(..., rank)`) and `B` (`(rank, ...)`) to int8.

    `A` is scaled per column (its last axis), that scale is folded into the
    rows of `B`, and `B` is then scaled per output column (every axis after
    the first), so that one float32 scale per output column is all that is
    kept (see the module docstring).

    Args:
        a: array of shape `(..., rank)`, e.g. `(m, rank)`.
        b: array of shape `(rank, ...)`, e.g. `(rank, n)`.

    Returns:
        A `QuantizedFactors` with `a @ (b / b_scale) ~= A @ B`.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(100, 4)), rng.normal(size=(4, 8))
    >>> q = quantize_factors(a, b)
    >>> q.a.dtype, q.b.dtype, q.b_scale.shape
    (dtype('int8'), dtype('int8'), (8,))
    >>> w, w_q = a @ b, dequantize_factors(q)[0] @ dequantize_factors(q)[1]
    >>> bool(np.linalg.norm(w - w_q) / np.linalg.norm(w) < 0.02)
    True
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    rank = a.shape[-1]
    if b.shape[0] != rank:
        raise ValueError(
            "Received an invalid value for `b`, expected an array whose first "
            f"axis is the rank of `a` ({rank}). Received: b.shape={b.shape}"
        )
    a_axes = tuple(range(a.ndim - 1))
    a_scale = _abs_max_scale(a, a_axes).astype(np.float64)  # (1, ..., rank)
    a_q = _to_int8(a, a_scale)
    folded = b / a_scale.reshape((rank,) + (1,) * (b.ndim - 1))
    b_scale = _abs_max_scale(folded, 0)  # (1, ...)
    b_q = _to_int8(folded, b_scale)
    return QuantizedFactors(a_q, b_q, b_scale.reshape(b.shape[1:]))


def dequantize_factors(quantized: QuantizedFactors):
    """Float32 factors `(A, B)` whose product is the quantized `W`.

    `A` is the int8 `a` as float (its scale lives in `B`), `B` is
    `b / b_scale`.
    """
    a = quantized.a.astype(np.float32)
    b = quantized.b.astype(np.float32) / quantized.b_scale.astype(np.float32)
    return a, b


def unsupported_mode_error(mode) -> UnsupportedQuantizationModeError:
    return UnsupportedQuantizationModeError(
        "Received an invalid value for `mode`, expected one of "
        f"{SUPPORTED_MODES} (the modes the factorized layers implement; "
        "`int4`, `float8`, `gptq` and `awq` are not implemented for factors). "
        f"Received: mode={mode!r}"
    )


def _check_config(config) -> None:
    """Keras >= 3.11 passes a `QuantizationConfig`; a custom weight quantizer
    cannot apply to the factor layout."""
    if config is None or isinstance(config, str):
        return
    if getattr(config, "weight_quantizer", None) is not None:
        raise ValueError(
            "Received an invalid value for `config`, expected a quantization "
            "config without `weight_quantizer`: the factors use their own "
            "layout (one scale per column of A, folded into B, and one per "
            "output column of B). Received: "
            f"config.weight_quantizer={config.weight_quantizer!r}"
        )


def _float_policy_name(policy) -> str:
    """`"float32"` for `"int8_from_float32"`, the policy itself otherwise."""
    name = policy.name
    return name.split("_from_", 1)[1] if "_from_" in name else name


class FactorQuantization:
    """Mixin of `LowRankLayer`: int8 factors through Keras's quantization API.

    Quantized, the layer holds `A` and `B` as non-trainable int8 variables
    under the factors' own names, plus `<B name>_scale` (float32, one per
    output column); its dtype policy becomes `"int8_from_<policy>"`, which
    `get_config` saves, so that loading builds the int8 variables directly.
    A bias stays float and trainable. `factors()` and `merge()` dequantize.
    """

    # ------------------------------------------------------------------
    # Keras's quantization API

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the factors in place (`mode="int8"`).

        Args:
            mode: `"int8"`. Other modes raise a
                `UnsupportedQuantizationModeError`.
            type_check: Whether to refuse subclasses of the three layers
                (their extra state would be left unquantized), as Keras does.
            config: Optional `keras.quantizers.Int8QuantizationConfig`
                (Keras >= 3.11); its `weight_quantizer` must be `None`, and
                inputs are not quantized whatever its `activation_quantizer`.

        Example:

        >>> import numpy as np
        >>> from keras_factorized import FactorizedEmbedding
        >>> layer = FactorizedEmbedding(1000, 64, rank=8)
        >>> layer.build()
        >>> layer.quantize("int8")
        >>> layer.dtype_policy.name, str(layer.embeddings_a.dtype)
        ('int8_from_float32', 'int8')
        >>> tuple(layer(np.array([[1, 2, 3]])).shape)
        (1, 3, 64)
        """
        if type_check and not self._is_quantizable_class():
            raise self._not_implemented_error(self.quantize)
        if mode not in SUPPORTED_MODES:
            raise unsupported_mode_error(mode)
        _check_config(config)
        a_variable, b_variable = self._factor_variables()
        shapes = (tuple(a_variable.shape), tuple(b_variable.shape))
        quantized = quantize_factors(_numpy(a_variable), _numpy(b_variable))
        for name in self.factor_names:
            delattr(self, name)
        self.quantized_build(shapes, mode, config)
        a_q, b_q, b_scale = self._quantized_variables()
        a_q.assign(quantized.a)
        b_q.assign(quantized.b)
        b_scale.assign(quantized.b_scale)
        if self.dtype_policy.quantization_mode is None:
            self.dtype_policy = keras.dtype_policies.get(
                f"{mode}_from_{self.dtype_policy.name}"
            )

    def quantized_build(self, factor_shapes, mode, config=None):
        """Creates the quantized variables for factors of `factor_shapes`.

        Args:
            factor_shapes: `(a_shape, b_shape)`, the shapes of the factor
                variables.
            mode: `"int8"`.
            config: unused (accepted for Keras's signature).
        """
        if mode not in SUPPORTED_MODES:
            raise unsupported_mode_error(mode)
        a_shape, b_shape = (tuple(int(d) for d in shape) for shape in factor_shapes)
        for name, shape in zip(self.factor_names, (a_shape, b_shape)):
            variable = self.add_weight(
                name=name, shape=shape, initializer="zeros", dtype="int8", trainable=False
            )
            setattr(self, name, variable)
        scale = self.add_weight(
            name=self._scale_name, shape=b_shape[1:], initializer="ones",
            dtype="float32", trainable=False,
        )
        setattr(self, self._scale_name, scale)
        self._is_quantized = True

    def _int8_call(self, *args, **kwargs):
        # `call` reads the factors through `_compute_factors`, which
        # dequantizes `B` (and casts the int8 `A`): one call for both modes.
        return self.call(*args, **kwargs)

    # ------------------------------------------------------------------
    # Factors as the call and the conversions see them

    @property
    def _scale_name(self) -> str:
        return f"{self.factor_names[1]}_scale"

    def _quantized_variables(self):
        return (*self._factor_variables(), getattr(self, self._scale_name))

    def _compute_factors(self):
        """`(A, B)` in the compute dtype, dequantized when quantized.

        `A` stays int8-valued (its scale is folded into `B`), so a layer may
        also gather rows of the stored `A` first and cast them.
        """
        a_variable, _ = self._factor_variables()
        return ops.cast(a_variable, self.compute_dtype), self._compute_b()

    def _compute_b(self):
        """`B` in the compute dtype (`b / b_scale` when quantized)."""
        _, b_variable = self._factor_variables()
        if self.quantization_mode is None:
            return ops.cast(b_variable, self.compute_dtype)
        b = ops.divide(ops.cast(b_variable, "float32"), getattr(self, self._scale_name))
        return ops.cast(b, self.compute_dtype)

    def _float_factors(self):
        """`(A, B)` as float tensors in the variables' shapes."""
        a_variable, b_variable = self._factor_variables()
        if self.quantization_mode is None:
            return a_variable, b_variable
        b = ops.divide(ops.cast(b_variable, "float32"), getattr(self, self._scale_name))
        return ops.cast(a_variable, "float32"), b

    def _factor_arrays(self):
        """`(A, B)` as float NumPy arrays in the variables' shapes."""
        a_variable, b_variable = self._factor_variables()
        if self.quantization_mode is None:
            return _numpy(a_variable), _numpy(b_variable)
        a_q, b_q, b_scale = (_numpy(v) for v in self._quantized_variables())
        return dequantize_factors(QuantizedFactors(a_q, b_q, b_scale))

    def _float_dtype_policy(self):
        """The layer's dtype policy without its quantization (for `merge`)."""
        return keras.dtype_policies.get(_float_policy_name(self.dtype_policy))

    def _check_not_quantized(self, what: str) -> None:
        if self.quantization_mode is not None:
            raise ValueError(
                f"Cannot use `{what}` on layer {self.name!r}, which is quantized "
                f"(dtype_policy={self.dtype_policy.name!r}): set the factors "
                "before `quantize()`, or `merge()` it into its float counterpart."
            )

    def _is_quantizable_class(self) -> bool:
        from keras_factorized.layers import FactorizedEmbedding
        from keras_factorized.layers import LowRankDense
        from keras_factorized.layers import LowRankEinsumDense

        return type(self) in (FactorizedEmbedding, LowRankDense, LowRankEinsumDense)

    # ------------------------------------------------------------------
    # Saving

    def _quantized_variable_names(self):
        names = [*self.factor_names, self._scale_name]
        if getattr(self, "bias", None) is not None:
            names.append("bias")
        return names

    def save_own_variables(self, store):
        """Saves the variables; quantized, in a fixed order (`A`, `B`, scale, bias)."""
        if not self.built or self.quantization_mode is None:
            return super().save_own_variables(store)
        for index, name in enumerate(self._quantized_variable_names()):
            store[str(index)] = getattr(self, name)

    def load_own_variables(self, store):
        """Loads what `save_own_variables` saved (the layer is built quantized
        from its saved `int8_from_...` dtype policy first)."""
        if not self.built or self.quantization_mode is None:
            return super().load_own_variables(store)
        names = self._quantized_variable_names()
        if len(store.keys()) != len(names):
            raise ValueError(
                f"Layer {self.name!r} expected {len(names)} variables ({names}) for "
                f"its {self.quantization_mode} weights, but the file lists "
                f"{len(store.keys())}."
            )
        for index, name in enumerate(names):
            getattr(self, name).assign(store[str(index)])


def _numpy(value) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(value))
