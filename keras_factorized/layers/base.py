"""`LowRankLayer`: what every factorized layer shares.

A factorized layer keeps one weight matrix `W` (`m x n`) as two factors,
`W = A @ B` with `A` of shape `(m, rank)` and `B` of shape `(rank, n)`. The
three layers of the package differ only in the shape of their inputs and in
how `W` is laid out in their dense counterpart (`Embedding`'s table, `Dense`'s
kernel, `EinsumDense`'s multi-axis kernel); everything about the factors
lives here, once:

- creation of the factor variables, and their dtype rule: the variable dtype
  of the policy, except that 16-bit policies get float32 factors (as Keras
  does for LoRA factors: bfloat16 factors trained with Adam stop learning,
  keras-hub issue 2629);
- `a_trainable` / `b_trainable`, and a per-factor initializer, regularizer
  and constraint;
- `factors()` / `set_factors()` / `from_factors()` with 2-D `A` and `B`;
- conversions with one signature convention: `from_matrix(matrix, rank, ...)`
  (truncated SVD of a matrix), `from_layer(layer, rank, ...)` (of a built
  dense counterpart), and their inverse `merge()`;
- the factor entries of `get_config`.

A subclass names its factors (`factor_names`), its dense counterpart
(`dense_class`) and implements the shape hooks at the bottom of the class.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_factorized import decomposition
from keras_factorized import validation
from keras_factorized.layers.factor_quantization import FactorQuantization

_LOW_PRECISION = ("float16", "bfloat16")
_FACTOR_OPTIONS = ("initializer", "regularizer", "constraint")
_OPTION_MODULES = {
    "initializer": keras.initializers,
    "regularizer": keras.regularizers,
    "constraint": keras.constraints,
}


def factor_dtype(dtype_policy) -> str:
    """The dtype of the factor variables under `dtype_policy`.

    The policy's variable dtype, but never 16-bit: `"mixed_bfloat16"` and
    `"bfloat16"` policies get float32 factors, `"float64"` gets float64.

    Example:

    >>> import keras
    >>> factor_dtype(keras.DTypePolicy("mixed_bfloat16"))
    'float32'
    >>> factor_dtype(keras.DTypePolicy("float64"))
    'float64'
    """
    variable_dtype = dtype_policy.variable_dtype
    return "float32" if variable_dtype in _LOW_PRECISION else variable_dtype


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return np.asarray(ops.convert_to_numpy(value))


class LowRankLayer(FactorQuantization, keras.layers.Layer):
    """Base class of the layers that keep a weight matrix as `A @ B`.

    Not used directly: see `FactorizedEmbedding`, `LowRankDense` and
    `LowRankEinsumDense`. Subclasses set `factor_names` and `dense_class`,
    call `_init_factors` in `__init__` and `_add_factors` in `build`, and
    implement the hooks `_shape_kwargs`, `_build_shape`, `_dense_kwargs`,
    `_counterpart_kwargs`, `matrix_of` and `_kernel_from_matrix`.

    `quantize("int8")` (and `model.quantize("int8")`) comes from
    `FactorQuantization`: int8 factors, one scale per output column.
    """

    #: Names of the two factor variables (and prefixes of their options).
    factor_names = ("kernel_a", "kernel_b")
    #: The Keras layer whose weight matrix this layer factorizes.
    dense_class = None
    #: Names of `m` and `n` in error messages.
    matrix_dim_names = ("m", "n")

    # ------------------------------------------------------------------
    # Construction

    def _init_factors(self, rank, options, a_trainable, b_trainable):
        """Stores `rank` and the per-factor options (`options` maps
        `"<factor>_<option>"` to a value, e.g. `"kernel_a_initializer"`)."""
        if not validation.is_integer(rank) or rank < 1:
            raise validation.invalid_value("rank", "a positive integer", rank)
        self.rank = int(rank)
        for factor in self.factor_names:
            for option in _FACTOR_OPTIONS:
                key = f"{factor}_{option}"
                setattr(self, key, _OPTION_MODULES[option].get(options.get(key)))
        self._a_trainable = validation.check_bool("a_trainable", a_trainable)
        self._b_trainable = validation.check_bool("b_trainable", b_trainable)

    @property
    def factor_dtype(self) -> str:
        """The dtype of `A` and `B` (see `factor_dtype`)."""
        return factor_dtype(self.dtype_policy)

    def _add_factors(self, a_shape, b_shape):
        """Creates the two factor variables (call from `build`).

        Under a quantized dtype policy (a layer loaded after `quantize()`),
        creates the quantized variables instead.
        """
        if self.quantization_mode is not None:
            self.quantized_build((a_shape, b_shape), self.quantization_mode)
            return
        for factor, shape, trainable in zip(
            self.factor_names, (a_shape, b_shape), (self._a_trainable, self._b_trainable)
        ):
            variable = self.add_weight(
                name=factor,
                shape=tuple(int(d) for d in shape),
                initializer=getattr(self, f"{factor}_initializer"),
                regularizer=getattr(self, f"{factor}_regularizer"),
                constraint=getattr(self, f"{factor}_constraint"),
                trainable=trainable,
                dtype=self.factor_dtype,
            )
            setattr(self, factor, variable)

    def _factor_variables(self):
        return tuple(getattr(self, name) for name in self.factor_names)

    def _factor_config(self) -> dict:
        """The factor entries of `get_config`."""
        config = {"rank": self.rank}
        for factor in self.factor_names:
            for option in _FACTOR_OPTIONS:
                key = f"{factor}_{option}"
                config[key] = _OPTION_MODULES[option].serialize(getattr(self, key))
        config["a_trainable"] = self._a_trainable
        config["b_trainable"] = self._b_trainable
        return config

    # ------------------------------------------------------------------
    # Trainable flags

    def _set_factor_trainable(self, index, value):
        name = ("a_trainable", "b_trainable")[index]
        value = validation.check_bool(name, value)
        setattr(self, f"_{name}", value)
        if self.built and self.quantization_mode is None:
            self._factor_variables()[index].trainable = value

    @property
    def a_trainable(self) -> bool:
        """Whether `A` is trained (e.g. `False` keeps a pretrained `A` frozen)."""
        return self._a_trainable

    @a_trainable.setter
    def a_trainable(self, value):
        self._set_factor_trainable(0, value)

    @property
    def b_trainable(self) -> bool:
        """Whether `B` is trained."""
        return self._b_trainable

    @b_trainable.setter
    def b_trainable(self, value):
        self._set_factor_trainable(1, value)

    # ------------------------------------------------------------------
    # Factors as matrices

    @property
    def matrix_shape(self) -> tuple:
        """`(m, n)`, the shape of the factorized matrix `A @ B`."""
        self._require_built("matrix_shape")
        a, b = self._factor_variables()
        return (int(np.prod(a.shape[:-1])), int(np.prod(b.shape[1:])))

    def factors(self):
        """The factors as 2-D NumPy arrays: `A` `(m, rank)` and `B` `(rank, n)`.

        Of a quantized layer: the dequantized factors (float32; the scales of
        `A` are folded into `B`), whose product is the quantized `W`.
        """
        self._require_built("factors")
        a, b = self._factor_arrays()
        m, n = self.matrix_shape
        return (
            np.asarray(a).reshape(m, self.rank),
            np.asarray(b).reshape(self.rank, n),
        )

    def set_factors(self, a, b, bias=None):
        """Sets `A`, `B` (and the bias, for layers that have one).

        Args:
            a: array of shape `(m, rank)`, or already in the variable's shape.
            b: array of shape `(rank, n)`, or already in the variable's shape.
            bias: optional array of the bias's shape.
        """
        self._check_not_quantized("set_factors")
        if not self.built:
            self.build(self._build_shape(np.shape(a), np.shape(b)))
        m, n = self.matrix_shape
        m_name, n_name = self.matrix_dim_names
        expected = (
            ((m, self.rank), f"{m_name}={m}, rank={self.rank}"),
            ((self.rank, n), f"rank={self.rank}, {n_name}={n}"),
        )
        for name, value, variable, (shape, dims) in zip(
            ("a", "b"), (a, b), self._factor_variables(), expected
        ):
            _assign(variable, value, name, shape, dims)
        if bias is not None:
            self._set_bias(bias)

    def _set_bias(self, bias):
        if getattr(self, "bias", None) is None:
            raise validation.invalid_value(
                "bias", "None for a layer built without a bias", "an array"
            )
        _assign(self.bias, bias, "bias", tuple(self.bias.shape), "the bias")

    @classmethod
    def from_factors(cls, a, b, bias=None, **kwargs):
        """A built layer with the given factors (and bias).

        Args:
            a: `(m, rank)` array (or in the shape of the `A` variable).
            b: `(rank, n)` array (or in the shape of the `B` variable).
            bias: optional bias.
            **kwargs: constructor arguments (sizes are taken from `a`, `b`).

        Returns:
            A built layer of this class.
        """
        a, b = _as_numpy(a), _as_numpy(b)
        rank = int(a.shape[-1])
        kwargs = {**cls._shape_kwargs(a, b, bias, kwargs), **kwargs, "rank": rank}
        layer = cls(**kwargs)
        layer._build_holding(layer._build_shape(a.shape, b.shape), a, b)
        if bias is not None:
            layer._set_bias(bias)
        return layer

    def _build_holding(self, input_shape, a, b):
        """Builds the layer with its factor variables created holding `a`
        and `b` (for `from_factors`).

        No random initial values are drawn and then overwritten by a second
        full copy: `set_factors` after a plain `build` cost 20-30% on top of
        the SVD of a 250,000 x 768 matrix (issue 13), and on JAX a random
        initializer compiles one kernel per factor shape (about 0.3 s for
        each new rank). The checks are `set_factors`'s.
        """
        with _initial_values(self, a, b) as given:
            self.build(input_shape)
        if not all(initializer.used for initializer in given):
            # `build` did not create the factors from their initializers
            # (e.g. a quantized dtype policy): assign them the usual way.
            self.set_factors(a, b)

    @classmethod
    def from_matrix(
        cls,
        matrix,
        rank=None,
        *,
        energy=None,
        param_ratio=None,
        split="balanced",
        svd_method="auto",
        bias=None,
        **kwargs,
    ):
        """A built layer whose factors are the truncated SVD of `matrix`.

        `A = U_k S_k^1/2` and `B = S_k^1/2 V_k^T` by default, so `A @ B` is
        the best rank-`k` approximation of `matrix` (Eckart-Young).

        Args:
            matrix: the `(m, n)` matrix (NumPy array, tensor or variable).
            rank: the rank `k`.
            energy: instead of `rank`: keep this fraction of the squared
                singular values, in `(0, 1]`.
            param_ratio: instead of `rank`: keep at most this fraction of the
                `m * n` weights, in `(0, 1]`.
            split: `"balanced"`, `"left"` (`A = U S, B = V^T`) or `"right"`
                (`A = U, B = S V^T`).
            svd_method: the `method` of `keras_factorized.truncated_svd`.
            bias: optional bias of the layer.
            **kwargs: other constructor arguments (`name`, `a_trainable`, ...).

        Returns:
            A built layer of this class.
        """
        result = decomposition.truncated_svd(
            matrix, rank, energy=energy, param_ratio=param_ratio, method=svd_method
        )
        # `result` is dropped here: its `u` becomes `A` in place (no copy).
        a, b = result.factors(split, overwrite_u=True)
        return cls.from_factors(a, b, bias, **kwargs)

    @classmethod
    def from_layer(
        cls,
        layer,
        rank=None,
        *,
        energy=None,
        param_ratio=None,
        split="balanced",
        svd_method="auto",
        **kwargs,
    ):
        """A built layer approximating `layer`, a built `dense_class` layer.

        The new layer keeps the original's name, dtype policy and options
        (activation, bias, mask...); its factors come from the truncated SVD
        of the original's weight matrix (see `from_matrix`).

        Args:
            layer: a built instance of `dense_class` (not quantized).
            rank: as in `from_matrix`.
            energy: as in `from_matrix`.
            param_ratio: as in `from_matrix`.
            split: as in `from_matrix`.
            svd_method: as in `from_matrix`.
            **kwargs: constructor arguments that override the copied ones.

        Returns:
            A built layer of this class.
        """
        cls._check_counterpart(layer)
        bias = cls.bias_of(layer)
        return cls.from_matrix(
            cls.matrix_of(layer),
            rank,
            energy=energy,
            param_ratio=param_ratio,
            split=split,
            svd_method=svd_method,
            bias=bias,
            **{**cls._counterpart_kwargs(layer), **kwargs},
        )

    def merge(self, **kwargs):
        """The dense counterpart holding `A @ B`: same outputs, no factors.

        A quantized layer merges into a float counterpart (under the policy
        it was quantized from) holding the dequantized product, so the
        outputs stay the same; call `quantize()` on the result to get
        Keras's own int8 layer.

        Args:
            **kwargs: constructor arguments of the counterpart that override
                the copied ones.

        Returns:
            A built instance of `dense_class` (`Embedding`, `Dense` or
            `EinsumDense`).
        """
        self._require_built("merge")
        a, b = self.factors()
        merged = np.matmul(a.astype(np.float64), b.astype(np.float64))
        dense_kwargs = self._dense_kwargs()
        if self.quantization_mode is not None:
            dense_kwargs["dtype"] = self._float_dtype_policy()
        dense = self.dense_class(**{**dense_kwargs, **kwargs})
        dense.build(self._dense_build_shape())
        weight = self._dense_weight(dense)
        weight.assign(self._kernel_from_matrix(merged).astype(weight.dtype))
        if getattr(self, "bias", None) is not None:
            dense.bias.assign(_as_numpy(self.bias))
        return dense

    # ------------------------------------------------------------------
    # Helpers

    @classmethod
    def _check_counterpart(cls, layer):
        if not isinstance(layer, cls.dense_class):
            raise validation.invalid_type(
                "layer", f"a built `keras.layers.{cls.dense_class.__name__}`", layer
            )
        if not layer.built:
            raise ValueError(
                "Received an invalid value for `layer`, expected a built "
                f"`{cls.dense_class.__name__}` (call it on data or `build()` it "
                f"first). Received: layer={layer.name!r} (not built)"
            )
        if getattr(layer, "quantization_mode", None) is not None:
            raise validation.invalid_value(
                "layer", "a layer that is not quantized", layer.name
            )

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"Cannot use `{what}` on layer {self.name!r}, which isn't built "
                "yet: call it on data or `build()` it first."
            )

    # ------------------------------------------------------------------
    # Hooks of the subclasses

    @classmethod
    def _shape_kwargs(cls, a, b, bias, kwargs) -> dict:
        """Constructor size arguments implied by factors `a`, `b`."""
        raise NotImplementedError

    def _build_shape(self, a_shape, b_shape):
        """An input shape that builds factors of these shapes."""
        raise NotImplementedError

    @classmethod
    def matrix_of(cls, layer) -> np.ndarray:
        """The `(m, n)` weight matrix of a `dense_class` layer, float32."""
        raise NotImplementedError

    @classmethod
    def bias_of(cls, layer):
        """The bias of a `dense_class` layer as a NumPy array, or `None`."""
        bias = getattr(layer, "bias", None)
        return None if bias is None else _as_numpy(bias)

    @classmethod
    def _counterpart_kwargs(cls, layer) -> dict:
        """Constructor arguments copied from a `dense_class` layer."""
        raise NotImplementedError

    def _dense_kwargs(self) -> dict:
        """Constructor arguments of the merged `dense_class` layer."""
        raise NotImplementedError

    def _dense_build_shape(self):
        """The input shape that builds the merged layer."""
        raise NotImplementedError

    def _dense_weight(self, dense):
        """The variable of the merged layer that holds the matrix."""
        return dense.kernel

    def _kernel_from_matrix(self, matrix):
        """`matrix` `(m, n)` in the layout of the counterpart's weight."""
        return matrix


class _GivenValue(keras.initializers.Initializer):
    """Initial value of one factor variable in `from_factors`: the given array.

    Checks it as `set_factors` does (2-D or the variable's shape, finite) and
    returns it in the variable's shape and dtype, without a copy when it
    already has them (the backend copies it once into the variable).
    """

    def __init__(self, value, name, shape_2d, dims):
        self.value, self.name, self.shape_2d, self.dims = value, name, shape_2d, dims
        self.used = False

    def __call__(self, shape, dtype=None):
        self.used = True
        value = _checked(self.value, self.name, self.shape_2d, shape, self.dims)
        return np.asarray(value, dtype=dtype).reshape(tuple(shape))


class _initial_values:
    """While building `layer`, its factor initializers return `a` and `b`.

    Restores the layer's own initializers afterwards (its config is
    unchanged), also when `build` raises.
    """

    def __init__(self, layer, a, b):
        self.layer = layer
        m, rank, n = int(np.prod(a.shape[:-1])), layer.rank, int(np.prod(b.shape[1:]))
        m_name, n_name = layer.matrix_dim_names
        self.given = {
            f"{layer.factor_names[0]}_initializer": _GivenValue(
                a, "a", (m, rank), f"{m_name}={m}, rank={rank}"),
            f"{layer.factor_names[1]}_initializer": _GivenValue(
                b, "b", (rank, n), f"rank={rank}, {n_name}={n}"),
        }

    def __enter__(self):
        self.saved = {key: getattr(self.layer, key) for key in self.given}
        for key, initializer in self.given.items():
            setattr(self.layer, key, initializer)
        return tuple(self.given.values())

    def __exit__(self, *exc):
        for key, initializer in self.saved.items():
            setattr(self.layer, key, initializer)
        return False


def projection_options(layer) -> dict:
    """The options a projection layer and its factorized form share, read off either.

    `Dense`/`LowRankDense` and `EinsumDense`/`LowRankEinsumDense` name their
    activation, bias options, name and dtype policy alike, so one reader
    serves both directions (factorize and merge).
    """
    return dict(
        activation=layer.activation,
        bias_initializer=layer.bias_initializer,
        bias_regularizer=layer.bias_regularizer,
        bias_constraint=layer.bias_constraint,
        activity_regularizer=layer.activity_regularizer,
        name=layer.name,
        dtype=layer.dtype_policy,
    )


def _checked(value, name, shape, variable_shape, dims):
    """`value` as a NumPy array, checked: shape `shape` or `variable_shape`, finite."""
    value = _as_numpy(value)
    if tuple(value.shape) not in (tuple(shape), tuple(variable_shape)):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected an array of shape "
            f"{tuple(shape)} ({dims}). Received: {name}.shape={tuple(value.shape)}"
        )
    # The sum is finite only if every entry is (NaN and Inf propagate): one
    # pass without a temporary array; the exact test only if it is not.
    if not np.isfinite(value.sum()) and not np.isfinite(value).all():
        raise validation.invalid_value(
            name, "finite values", "an array containing NaN or Inf"
        )
    return value


def _assign(variable, value, name, shape, dims):
    """Assigns `value` (2-D or in the variable's shape) to `variable`.

    Reshapes and casts without a copy when `value` already has the
    variable's dtype and a contiguous layout.
    """
    value = _checked(value, name, shape, variable.shape, dims)
    value = np.asarray(value, dtype=variable.dtype).reshape(tuple(variable.shape))
    variable.assign(value)
