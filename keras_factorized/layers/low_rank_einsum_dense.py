"""`LowRankEinsumDense`: an `EinsumDense` whose kernel is a rank-`k` product."""

from __future__ import annotations

import math
import numbers
import re
import string

import keras
import numpy as np
from keras import activations, constraints, initializers, ops, regularizers

# The shape analysis of `EinsumDense` itself, so both layers always agree on
# kernel, bias and output shapes.
from keras.src.layers.core.einsum_dense import _analyze_einsum_string


def _invalid(name, expected, value):
    return ValueError(
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


class EinsumFactorization:
    """How an einsum kernel splits into contracted and output axes.

    For `equation = "abc,cde->abde"` the kernel axis `c` is contracted with the
    input and `d, e` are output axes, so the kernel is the matrix
    `c x (d*e)`. The low-rank layer computes `x -> einsum(x, A) -> einsum(., B)`
    with `A` of shape `(c, k)` and `B` of shape `(k, d, e)`.
    """

    def __init__(self, equation: str):
        if not isinstance(equation, str):
            raise _invalid("equation", "an einsum string such as 'abc,cde->abde'",
                           equation)
        compact = equation.replace(" ", "")
        # "..." becomes "0", as `EinsumDense` does, so it is one token.
        match = re.fullmatch(r"([a-zA-Z0]+),([a-zA-Z]+)->([a-zA-Z0]+)",
                             compact.replace("...", "0"))
        if match is None:
            raise _invalid(
                "equation", "an einsum string of the form 'ab,bc->ac', "
                "'...ab,bc->...ac' or 'ab...,bc->ac...'", equation)
        self.equation = equation
        self.input_spec, self.weight_spec, self.output_spec = match.groups()
        shared = [c for c in self.weight_spec
                  if c in self.input_spec and c in self.output_spec]
        if shared:
            raise _invalid(
                "equation", "a kernel whose axes are each either contracted with "
                "the input or only in the output (an axis in the input, the kernel "
                f"and the output, here {''.join(shared)!r}, makes the kernel a "
                "batch of matrices, which a single low-rank product cannot "
                "represent)", equation)
        self.contracted = "".join(c for c in self.weight_spec if c in self.input_spec)
        self.outputs = "".join(c for c in self.weight_spec if c in self.output_spec)
        if not self.contracted or not self.outputs:
            raise _invalid(
                "equation", "a kernel with at least one axis contracted with the "
                "input and one output axis", equation)
        used = set(compact)
        r = next(c for c in string.ascii_letters if c not in used)
        middle = "".join(c for c in self.input_spec if c in self.output_spec or c == "0")
        self.equation_a = self._dots(f"{self.input_spec},{self.contracted}{r}->{middle}{r}")
        self.equation_b = self._dots(f"{middle}{r},{r}{self.outputs}->{self.output_spec}")
        # kernel axes in (contracted..., outputs...) order -> weight-spec order.
        order = self.contracted + self.outputs
        self.to_kernel_order = [order.index(c) for c in self.weight_spec]
        self.from_kernel_order = [self.weight_spec.index(c) for c in order]

    @staticmethod
    def _dots(equation):
        return equation.replace("0", "...")

    def split_shape(self, kernel_shape):
        """`(contracted_shape, output_shape)` of a kernel of `kernel_shape`."""
        dims = dict(zip(self.weight_spec, kernel_shape))
        return (tuple(int(dims[c]) for c in self.contracted),
                tuple(int(dims[c]) for c in self.outputs))

    def matrix_shape(self, kernel_shape):
        """The `(m, n)` shape of the matricized kernel."""
        contracted, outputs = self.split_shape(kernel_shape)
        return math.prod(contracted), math.prod(outputs)

    def to_matrix(self, kernel):
        """The kernel as an `(m, n)` NumPy matrix (contracted x output axes)."""
        kernel = np.asarray(kernel)
        return np.transpose(kernel, self.from_kernel_order).reshape(
            self.matrix_shape(kernel.shape))

    def from_matrix(self, matrix, kernel_shape):
        """Inverse of `to_matrix`."""
        contracted, outputs = self.split_shape(kernel_shape)
        return np.transpose(np.asarray(matrix).reshape(contracted + outputs),
                            self.to_kernel_order)

    def input_shape(self, kernel_shape):
        """An input shape (batch axes `None`, one axis under `...`) that builds
        a layer with a kernel of `kernel_shape`."""
        dims = dict(zip(self.weight_spec, kernel_shape))
        return tuple(None if c not in dims else int(dims[c]) for c in self.input_spec)

    def input_rows(self, x):
        """The layer input `x` as rows of contracted features, `(-1, m)`: the
        `X` of `y = X W`."""
        x = np.asarray(x)
        spec = self.input_spec
        if "0" in spec:
            n_ellipsis = x.ndim - (len(spec) - 1)
            pos = spec.index("0")
            spec = spec[:pos] + "".join(chr(0x100 + i) for i in range(n_ellipsis)) \
                + spec[pos + 1:]
        batch_axes = [i for i, c in enumerate(spec) if c not in self.contracted]
        contracted_axes = [spec.index(c) for c in self.contracted]
        m = math.prod(x.shape[i] for i in contracted_axes)
        return np.transpose(x, batch_axes + contracted_axes).reshape(-1, m)


@keras.saving.register_keras_serializable(package="keras_factorized")
class LowRankEinsumDense(keras.layers.Layer):
    """An `EinsumDense` layer whose kernel is kept as a rank-`rank` product.

    `keras.layers.EinsumDense` contracts its input with one kernel; this layer
    splits the kernel's axes into those contracted with the input (`m` features
    in all) and the output axes (`n` features in all), and keeps the kernel as
    the product of `kernel_a` (contracted axes x `rank`) and `kernel_b`
    (`rank` x output axes): `m * n` weights become `(m + n) * rank`. The call
    computes `einsum(einsum(x, kernel_a), kernel_b)`, never the full kernel.

    For the query/key/value projections of a Transformer (`"abc,cde->abde"`,
    kernel `(hidden, heads, head_dim)`) the factorized matrix is
    `hidden x (heads * head_dim)`, a true rank-`k` factorization across all
    heads (Keras's LoRA factors only the last kernel axis). For the attention
    output (`"abcd,cde->abe"`, kernel `(heads, head_dim, hidden)`) it is
    `(heads * head_dim) x hidden`.

    Use `from_einsum_dense` to convert a trained `EinsumDense` (truncated SVD
    of its matricized kernel) and `to_einsum_dense` to merge it back.

    Args:
        equation: the einsum equation, as for `EinsumDense`, e.g.
            `"abc,cde->abde"`. Each kernel axis must be either contracted with
            the input or an output axis.
        output_shape: the expected output shape without the batch axis (and any
            axes covered by `...`), as for `EinsumDense`; `None` for unknown
            dimensions.
        rank: the rank `k` of the product, an integer in `[1, min(m, n)]`.
        activation: activation function, as for `EinsumDense`.
        bias_axes: the output axes that get a bias, as for `EinsumDense`.
        kernel_a_initializer: initializer for `kernel_a`.
        kernel_b_initializer: initializer for `kernel_b`.
        bias_initializer: initializer for the bias.
        kernel_a_regularizer: regularizer for `kernel_a`.
        kernel_b_regularizer: regularizer for `kernel_b`.
        bias_regularizer: regularizer for the bias.
        activity_regularizer: regularizer for the output.
        kernel_a_constraint: constraint for `kernel_a`.
        kernel_b_constraint: constraint for `kernel_b`.
        bias_constraint: constraint for the bias.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    The factors are float32 whatever the dtype policy (as Keras does for LoRA
    factors: low-precision factors train poorly); the call casts them to the
    compute dtype.

    Input shape:
        As for `EinsumDense` with the same equation.

    Output shape:
        As for `EinsumDense` with the same equation.

    Example:

    >>> import numpy as np
    >>> layer = LowRankEinsumDense("abc,cde->abde", output_shape=(None, 4, 8),
    ...                            rank=6, bias_axes="de")
    >>> tuple(layer(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 4, 8)
    >>> [tuple(w.shape) for w in layer.weights]
    [(16, 6), (6, 4, 8), (4, 8)]
    """

    def __init__(
        self,
        equation: str,
        output_shape,
        rank: int,
        activation=None,
        bias_axes: str | None = None,
        kernel_a_initializer="glorot_uniform",
        kernel_b_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_a_regularizer=None,
        kernel_b_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_a_constraint=None,
        kernel_b_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self._factorization = EinsumFactorization(equation)
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
            raise _invalid("rank", "an integer >= 1", rank)
        if bias_axes is not None:
            missing = [c for c in bias_axes if c not in self._factorization.output_spec]
            if missing:
                raise _invalid("bias_axes", "output axes of `equation` "
                               f"({self._factorization.output_spec!r})", bias_axes)
        self.equation = equation
        if isinstance(output_shape, numbers.Integral):
            self.partial_output_shape = (int(output_shape),)
        else:
            self.partial_output_shape = tuple(output_shape)
        self.rank = int(rank)
        self.bias_axes = bias_axes
        self.activation = activations.get(activation)
        self.kernel_a_initializer = initializers.get(kernel_a_initializer)
        self.kernel_b_initializer = initializers.get(kernel_b_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_a_regularizer = regularizers.get(kernel_a_regularizer)
        self.kernel_b_regularizer = regularizers.get(kernel_b_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_a_constraint = constraints.get(kernel_a_constraint)
        self.kernel_b_constraint = constraints.get(kernel_b_constraint)
        self.bias_constraint = constraints.get(bias_constraint)

    def build(self, input_shape):
        kernel_shape, bias_shape, _, _, _ = _analyze_einsum_string(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape)
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        contracted, outputs = self._factorization.split_shape(self.kernel_shape)
        max_rank = min(math.prod(contracted), math.prod(outputs))
        if self.rank > max_rank:
            raise _invalid(
                "rank", f"an integer in [1, {max_rank}] for a kernel of shape "
                f"{self.kernel_shape}", self.rank)
        if "..." not in self.equation:
            self.input_spec = keras.layers.InputSpec(ndim=len(input_shape))
        self.kernel_a = self.add_weight(
            name="kernel_a",
            shape=contracted + (self.rank,),
            initializer=self.kernel_a_initializer,
            regularizer=self.kernel_a_regularizer,
            constraint=self.kernel_a_constraint,
            dtype="float32",
        )
        self.kernel_b = self.add_weight(
            name="kernel_b",
            shape=(self.rank,) + outputs,
            initializer=self.kernel_b_initializer,
            regularizer=self.kernel_b_regularizer,
            constraint=self.kernel_b_constraint,
            dtype="float32",
        )
        if bias_shape is not None:
            self.bias = self.add_weight(
                name="bias",
                shape=tuple(bias_shape),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
                dtype=self.dtype,
            )
        else:
            self.bias = None

    @property
    def kernel(self):
        """The merged kernel `A @ B`, in the layout of `EinsumDense`'s kernel."""
        if not self.built:
            raise AttributeError("You must build the layer before accessing `kernel`.")
        m, n = self._factorization.matrix_shape(self.kernel_shape)
        product = ops.matmul(ops.reshape(self.kernel_a, (m, self.rank)),
                             ops.reshape(self.kernel_b, (self.rank, n)))
        contracted, outputs = self._factorization.split_shape(self.kernel_shape)
        product = ops.reshape(product, contracted + outputs)
        return ops.transpose(product, self._factorization.to_kernel_order)

    def compute_output_shape(self, input_shape):
        _, _, output_shape, _, _ = _analyze_einsum_string(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape)
        return tuple(output_shape)

    def call(self, inputs, training=None):
        kernel_a = ops.cast(self.kernel_a, self.compute_dtype)
        kernel_b = ops.cast(self.kernel_b, self.compute_dtype)
        x = ops.einsum(self._factorization.equation_a, inputs, kernel_a)
        x = ops.einsum(self._factorization.equation_b, x, kernel_b)
        if self.bias is not None:
            x = ops.add(x, ops.cast(self.bias, self.compute_dtype))
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        base_config = super().get_config()
        config = {
            "equation": self.equation,
            "output_shape": self.partial_output_shape,
            "rank": self.rank,
            "activation": activations.serialize(self.activation),
            "bias_axes": self.bias_axes,
            "kernel_a_initializer": initializers.serialize(self.kernel_a_initializer),
            "kernel_b_initializer": initializers.serialize(self.kernel_b_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_a_regularizer": regularizers.serialize(self.kernel_a_regularizer),
            "kernel_b_regularizer": regularizers.serialize(self.kernel_b_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(self.activity_regularizer),
            "kernel_a_constraint": constraints.serialize(self.kernel_a_constraint),
            "kernel_b_constraint": constraints.serialize(self.kernel_b_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
        }
        return {**base_config, **config}

    # Conversions -------------------------------------------------------------

    @classmethod
    def from_factors(cls, equation, output_shape, kernel_a, kernel_b, bias=None,
                     *, kernel_shape, **layer_kwargs):
        """A built layer with the given factors and bias.

        Args:
            equation: the einsum equation.
            output_shape: as for `EinsumDense`.
            kernel_a: `(m, k)` (or already shaped `contracted axes + (k,)`).
            kernel_b: `(k, n)` (or `(k,) + output axes`).
            bias: the bias, when `bias_axes` is given in `layer_kwargs`.
            kernel_shape: the shape of the equivalent `EinsumDense` kernel.
            **layer_kwargs: other constructor arguments.
        """
        kernel_a = np.asarray(kernel_a)
        kernel_b = np.asarray(kernel_b)
        rank = int(kernel_b.shape[0])
        layer = cls(equation, output_shape, rank, **layer_kwargs)
        layer.build(layer._factorization.input_shape(kernel_shape))
        layer.kernel_a.assign(kernel_a.reshape(layer.kernel_a.shape))
        layer.kernel_b.assign(kernel_b.reshape(layer.kernel_b.shape))
        if layer.bias is not None:
            if bias is None:
                raise _invalid("bias", f"a bias of shape {tuple(layer.bias.shape)} "
                               f"(`bias_axes={layer.bias_axes!r}`)", bias)
            layer.bias.assign(np.asarray(bias).reshape(layer.bias.shape))
        return layer

    @classmethod
    def from_einsum_dense(cls, layer, rank=None, *, energy=None, param_ratio=None,
                          split="balanced", svd_method="auto", **layer_kwargs):
        """Converts a built `keras.layers.EinsumDense` by truncated SVD of its
        matricized kernel.

        Args:
            layer: a built `EinsumDense` (not quantized, LoRA merged or off).
            rank: the rank; or `energy` / `param_ratio` to choose it (see
                `keras_factorized.decomposition.resolve_rank`).
            split: how singular values are shared between the factors.
            svd_method: the method of `truncated_svd`.
            **layer_kwargs: overrides of the new layer's arguments.

        Returns:
            A built `LowRankEinsumDense` computing the rank-`k` approximation.

        Example:

        >>> import keras, numpy as np
        >>> dense = keras.layers.EinsumDense("abc,cd->abd", (None, 8), bias_axes="d")
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 12)).astype("float32")
        >>> y = dense(x)
        >>> low = LowRankEinsumDense.from_einsum_dense(dense, rank=8)  # full rank
        >>> bool(np.allclose(low(x), y, atol=1e-5))
        True
        """
        from keras_factorized.decomposition import truncated_svd

        if not isinstance(layer, keras.layers.EinsumDense):
            raise TypeError("Received an invalid value for `layer`, expected a "
                            f"keras.layers.EinsumDense. Received: layer={layer!r}")
        if not layer.built:
            raise _invalid("layer", "a built EinsumDense (call it once first)", layer)
        if getattr(layer, "quantization_mode", None) is not None:
            raise _invalid("layer", "an EinsumDense that is not quantized", layer.name)
        factorization = EinsumFactorization(layer.equation)
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float32)
        matrix = factorization.to_matrix(kernel)
        res = truncated_svd(matrix, rank, energy=energy, param_ratio=param_ratio,
                            method=svd_method)
        a, b = res.factors(split)
        bias = None if layer.bias is None else keras.ops.convert_to_numpy(layer.bias)
        return cls.from_factors(layer.equation, layer.partial_output_shape, a, b,
                                bias, kernel_shape=tuple(layer.kernel.shape),
                                **{**_einsum_kwargs(layer), **layer_kwargs})

    def to_einsum_dense(self):
        """A built `keras.layers.EinsumDense` with the merged kernel `A @ B`."""
        if not self.built:
            raise ValueError("Cannot convert a layer that isn't yet built: call it once.")
        dense = keras.layers.EinsumDense(
            self.equation,
            self.partial_output_shape,
            activation=self.activation,
            bias_axes=self.bias_axes,
            bias_initializer=self.bias_initializer,
            bias_regularizer=self.bias_regularizer,
            activity_regularizer=self.activity_regularizer,
            bias_constraint=self.bias_constraint,
            name=self.name,
            dtype=self.dtype_policy,
        )
        dense.build(self._factorization.input_shape(self.kernel_shape))
        if "..." in self.equation:
            dense.input_spec = None
        dense.kernel.assign(keras.ops.cast(self.kernel, dense.kernel.dtype))
        if self.bias is not None:
            dense.bias.assign(self.bias)
        return dense


def _einsum_kwargs(layer):
    """The arguments of an `EinsumDense` that carry over to the low-rank layer."""
    return dict(
        activation=layer.activation,
        bias_axes=layer.bias_axes,
        bias_initializer=layer.bias_initializer,
        bias_regularizer=layer.bias_regularizer,
        activity_regularizer=layer.activity_regularizer,
        bias_constraint=layer.bias_constraint,
        name=layer.name,
        dtype=layer.dtype_policy,
    )
