"""`LowRankEinsumDense`: an `EinsumDense` whose kernel is a rank-`k` product."""

from __future__ import annotations

import numbers

import keras
import numpy as np
from keras import activations
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from keras_factorized import validation
from keras_factorized.layers.base import LowRankLayer
from keras_factorized.layers.base import projection_options
from keras_factorized.layers.einsum_shapes import EinsumFactorization
from keras_factorized.layers.einsum_shapes import einsum_shapes

__all__ = ["EinsumFactorization", "LowRankEinsumDense"]


@keras.saving.register_keras_serializable(package="keras_factorized")
class LowRankEinsumDense(LowRankLayer):
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
        a_trainable: Boolean, whether `kernel_a` is trained.
        b_trainable: Boolean, whether `kernel_b` is trained.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    The factors have the policy's variable dtype, except under 16-bit
    policies, where they are float32 (as Keras does for LoRA factors:
    low-precision factors train poorly); the call casts them to the compute
    dtype.

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

    factor_names = ("kernel_a", "kernel_b")
    dense_class = keras.layers.EinsumDense

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
        a_trainable=True,
        b_trainable=True,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self._factorization = EinsumFactorization(equation)
        if bias_axes is not None:
            missing = [c for c in bias_axes if c not in self._factorization.output_spec]
            if missing:
                raise validation.invalid_value(
                    "bias_axes",
                    f"output axes of `equation` ({self._factorization.output_spec!r})",
                    bias_axes,
                )
        options = dict(
            kernel_a_initializer=kernel_a_initializer,
            kernel_b_initializer=kernel_b_initializer,
            kernel_a_regularizer=kernel_a_regularizer,
            kernel_b_regularizer=kernel_b_regularizer,
            kernel_a_constraint=kernel_a_constraint,
            kernel_b_constraint=kernel_b_constraint,
        )
        self._init_factors(rank, options, a_trainable, b_trainable)
        self.equation = equation
        if isinstance(output_shape, numbers.Integral):
            self.partial_output_shape = (int(output_shape),)
        else:
            self.partial_output_shape = tuple(output_shape)
        self.bias_axes = bias_axes
        self.activation = activations.get(activation)
        self.bias_initializer = initializers.get(bias_initializer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.bias_constraint = constraints.get(bias_constraint)

    def build(self, input_shape):
        kernel_shape, bias_shape, _ = einsum_shapes(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape
        )
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        contracted, outputs = self._factorization.split_shape(self.kernel_shape)
        validation.check_rank(self.rank, self._factorization.matrix_shape(self.kernel_shape))
        if "..." not in self.equation:
            self.input_spec = keras.layers.InputSpec(ndim=len(input_shape))
        self._add_factors(contracted + (self.rank,), (self.rank,) + outputs)
        if bias_shape is not None:
            self.bias = self.add_weight(
                name="bias",
                shape=tuple(bias_shape),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None
        self.built = True

    @property
    def kernel(self):
        """The merged kernel `A @ B`, in the layout of `EinsumDense`'s kernel."""
        if not self.built:
            raise AttributeError("You must build the layer before accessing `kernel`.")
        m, n = self.matrix_shape
        kernel_a, kernel_b = self._float_factors()
        product = ops.matmul(ops.reshape(kernel_a, (m, self.rank)),
                             ops.reshape(kernel_b, (self.rank, n)))
        contracted, outputs = self._factorization.split_shape(self.kernel_shape)
        product = ops.reshape(product, contracted + outputs)
        return ops.transpose(product, self._factorization.to_kernel_order)

    def compute_output_shape(self, input_shape):
        _, _, output_shape = einsum_shapes(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape
        )
        return tuple(output_shape)

    def call(self, inputs, training=None):
        kernel_a, kernel_b = self._compute_factors()  # dequantized if quantized
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
            "activation": activations.serialize(self.activation),
            "bias_axes": self.bias_axes,
            **self._factor_config(),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(self.activity_regularizer),
            "bias_constraint": constraints.serialize(self.bias_constraint),
        }
        return {**base_config, **config}

    # Conversions: `from_matrix`, `from_layer` and `merge` come from
    # `LowRankLayer`; these are their names in the vocabulary of `EinsumDense`.

    @classmethod
    def from_factors(cls, a, b, bias=None, *, equation, output_shape, kernel_shape=None,
                     **kwargs):
        """A built layer with the given factors and bias.

        Args:
            a: `(m, rank)`, or already shaped `contracted axes + (rank,)`.
            b: `(rank, n)`, or already shaped `(rank,) + output axes`.
            bias: the bias, when `bias_axes` is given.
            equation: the einsum equation.
            output_shape: as for `EinsumDense`.
            kernel_shape: the shape of the equivalent `EinsumDense` kernel;
                needed when `a` and `b` are 2-D.
            **kwargs: other constructor arguments.

        Returns:
            A built `LowRankEinsumDense`.
        """
        a, b = np.asarray(ops.convert_to_numpy(a)), np.asarray(ops.convert_to_numpy(b))
        factorization = EinsumFactorization(equation)
        if kernel_shape is None:
            kernel_shape = factorization.kernel_shape_of_factors(a.shape, b.shape)
        if kernel_shape is None:
            raise validation.invalid_value(
                "kernel_shape", "the shape of the `EinsumDense` kernel when `a` and "
                "`b` are 2-D", kernel_shape)
        layer = cls(equation, output_shape, int(a.shape[-1]), **kwargs)
        layer._build_holding(
            factorization.input_shape(tuple(kernel_shape), layer.partial_output_shape), a, b)
        if layer.bias is not None and bias is None:
            raise validation.invalid_value(
                "bias", f"a bias of shape {tuple(layer.bias.shape)} "
                f"(`bias_axes={layer.bias_axes!r}`)", bias)
        if bias is not None:
            layer._set_bias(np.reshape(bias, layer.bias.shape))
        return layer

    @classmethod
    def from_einsum_dense(cls, layer, rank=None, **kwargs):
        """Converts a built `keras.layers.EinsumDense` by truncated SVD of its
        matricized kernel.

        Args:
            layer: a built `EinsumDense` (not quantized, LoRA merged or off).
            rank: the rank; or `energy=`/`param_ratio=` (see `from_matrix`).
            **kwargs: `energy`, `param_ratio`, `split`, `svd_method`, and
                overrides of the new layer's arguments.

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
        return cls.from_layer(layer, rank, **kwargs)

    def to_einsum_dense(self, **kwargs):
        """A built `keras.layers.EinsumDense` with the merged kernel `A @ B`.

        Same as `merge()`.
        """
        return self.merge(**kwargs)

    def merge(self, **kwargs):
        dense = super().merge(**kwargs)
        if "..." in self.equation:
            # Built on one axis under "...": accept any number there again.
            dense.input_spec = None
        return dense

    merge.__doc__ = LowRankLayer.merge.__doc__

    @classmethod
    def matrix_of(cls, layer):
        kernel = np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float32)
        return EinsumFactorization(layer.equation).to_matrix(kernel)

    @classmethod
    def _counterpart_kwargs(cls, layer):
        return dict(
            equation=layer.equation,
            output_shape=layer.partial_output_shape,
            kernel_shape=tuple(layer.kernel.shape),
            bias_axes=layer.bias_axes,
            **projection_options(layer),
        )

    def _dense_kwargs(self):
        return dict(
            equation=self.equation,
            output_shape=self.partial_output_shape,
            bias_axes=self.bias_axes,
            **projection_options(self),
        )

    def _dense_build_shape(self):
        return self._factorization.input_shape(self.kernel_shape, self.partial_output_shape)

    def _kernel_from_matrix(self, matrix):
        return self._factorization.from_matrix(matrix, self.kernel_shape)
