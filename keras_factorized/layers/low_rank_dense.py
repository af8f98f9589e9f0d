"""`LowRankDense`: a densely-connected layer whose kernel is two low-rank factors."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_factorized import validation
from keras_factorized.layers.base import LowRankLayer
from keras_factorized.layers.base import projection_options


@keras.saving.register_keras_serializable(package="keras_factorized")
class LowRankDense(LowRankLayer):
    """A `Dense` layer whose `m x n` kernel is kept as `A @ B` of rank `k`.

    `LowRankDense` computes `output = activation((inputs @ A) @ B + bias)`
    with `A` of shape `(input_dim, rank)` and `B` of shape `(rank, units)`.
    It stores `(m + n) k` kernel weights instead of `m n` and multiplies in
    `(m + n) k` instead of `m n` operations per row, so it is smaller and, for
    `k < m n / (m + n)`, faster than the `Dense` layer it replaces.

    Build one from scratch, or from a trained kernel or `Dense` layer with
    `from_kernel` / `from_dense`, which initialise the factors from the
    truncated SVD of the kernel (the best rank-`k` approximation).
    `to_dense()` merges the factors back into a plain `keras.layers.Dense`.

    As in `Dense`, inputs of rank > 2 are multiplied along their last axis.
    The factors are kept in float32 whenever the dtype policy asks for 16-bit
    variables (bfloat16 factors trained with Adam stop learning, keras-hub
    issue 2629); the products run in the policy's compute dtype.

    Args:
        units: Positive integer, dimensionality of the output space.
        rank: Integer in `[1, min(input_dim, units)]`, the rank of the kernel.
        activation: Activation function to use (`None`: linear).
        use_bias: Boolean, whether the layer uses a bias vector.
        kernel_a_initializer: Initializer for `A` (`input_dim x rank`).
            Defaults to `"glorot_uniform"`.
        kernel_b_initializer: Initializer for `B` (`rank x units`). Defaults
            to `"orthogonal"`, which keeps the scale of `inputs @ A`.
        bias_initializer: Initializer for the bias vector.
        kernel_a_regularizer: Regularizer function applied to `A`.
        kernel_b_regularizer: Regularizer function applied to `B`.
        bias_regularizer: Regularizer function applied to the bias vector.
        activity_regularizer: Regularizer function applied to the output.
        kernel_a_constraint: Constraint function applied to `A`.
        kernel_b_constraint: Constraint function applied to `B`.
        bias_constraint: Constraint function applied to the bias vector.
        a_trainable: Boolean, whether `A` is trained.
        b_trainable: Boolean, whether `B` is trained.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Example:

    >>> import numpy as np, keras
    >>> layer = LowRankDense(units=256, rank=16, activation="relu")
    >>> tuple(layer(np.ones((2, 512))).shape)
    (2, 256)
    >>> layer.count_params()  # 512*16 + 16*256 + 256
    12544
    >>> dense = keras.layers.Dense(64)
    >>> _ = dense(np.ones((1, 128)))
    >>> small = LowRankDense.from_dense(dense, rank=8)
    >>> tuple(small.kernel.shape)
    (128, 64)

    References:
        - [Sainath et al., 2013](https://doi.org/10.1109/ICASSP.2013.6638949):
          low-rank matrix factorization of final-layer weights.
        - [Denton et al., 2014](https://arxiv.org/abs/1404.0736): exploiting
          linear structure for efficient evaluation.
    """

    factor_names = ("kernel_a", "kernel_b")
    matrix_dim_names = ("input_dim", "units")
    dense_class = keras.layers.Dense

    def __init__(
        self,
        units,
        rank,
        activation=None,
        use_bias=True,
        kernel_a_initializer="glorot_uniform",
        kernel_b_initializer="orthogonal",
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
        self.units = validation.check_positive_int("units", units)
        rank = validation.check_rank(rank, (self.units, self.units))
        options = dict(
            kernel_a_initializer=kernel_a_initializer,
            kernel_b_initializer=kernel_b_initializer,
            kernel_a_regularizer=kernel_a_regularizer,
            kernel_b_regularizer=kernel_b_regularizer,
            kernel_a_constraint=kernel_a_constraint,
            kernel_b_constraint=kernel_b_constraint,
        )
        self._init_factors(rank, options, a_trainable, b_trainable)
        self.activation = keras.activations.get(activation)
        self.use_bias = validation.check_bool("use_bias", use_bias)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = keras.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise validation.invalid_value(
                "input_shape", "a defined last dimension", tuple(input_shape)
            )
        input_dim = int(input_dim)
        validation.check_rank(self.rank, (input_dim, self.units))
        self._add_factors((input_dim, self.rank), (self.rank, self.units))
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None
        self.input_spec = keras.InputSpec(min_ndim=2, axes={-1: input_dim})
        self.built = True

    @property
    def input_dim(self):
        return int(self.kernel_a.shape[0]) if self.built else None

    @property
    def kernel(self):
        """The merged `input_dim x units` kernel `A @ B` (a tensor)."""
        a, b = self._float_factors()
        return ops.matmul(a, b)

    def call(self, inputs):
        # (x @ A) @ B costs (m + n) k per row; x @ (A @ B) would cost m n.
        kernel_a, kernel_b = self._compute_factors()  # dequantized if quantized
        outputs = ops.matmul(ops.matmul(inputs, kernel_a), kernel_b)
        if self.use_bias:
            outputs = ops.add(outputs, ops.cast(self.bias, self.compute_dtype))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    # Conversions: `from_matrix`, `from_layer` and `merge` come from
    # `LowRankLayer`; these are their names in the vocabulary of `Dense`.

    @classmethod
    def from_kernel(cls, kernel, rank=None, *, bias=None, **kwargs):
        """Creates a layer whose factors are the truncated SVD of `kernel`.

        Same as `from_matrix`; the layer uses a bias when `bias` is given.

        Args:
            kernel: the `(input_dim, units)` kernel (NumPy array or tensor).
            rank: the rank; or `energy=`/`param_ratio=` (see `from_matrix`).
            bias: optional `(units,)` bias.
            **kwargs: `energy`, `param_ratio`, `split`, `svd_method`, and
                other constructor arguments (`activation`, `name`, ...).

        Returns:
            A built `LowRankDense`.
        """
        return cls.from_matrix(kernel, rank, bias=bias, **kwargs)

    @classmethod
    def from_dense(cls, layer, rank=None, **kwargs):
        """Creates a layer approximating a built `keras.layers.Dense`.

        The new layer keeps the dense layer's activation, bias (and its
        initializer, regularizer and constraint), name and dtype policy.

        Args:
            layer: a built `keras.layers.Dense`.
            rank: the rank; or `energy=`/`param_ratio=` (see `from_matrix`).
            **kwargs: `energy`, `param_ratio`, `split`, `svd_method`, and
                constructor arguments that override the copied ones.

        Returns:
            A built `LowRankDense`.
        """
        return cls.from_layer(layer, rank, **kwargs)

    def to_dense(self, **kwargs):
        """Merges the factors into a plain, built `keras.layers.Dense`.

        Same as `merge()`.

        Args:
            **kwargs: constructor arguments of `Dense` that override the copied
                ones.

        Returns:
            A built `keras.layers.Dense` with kernel `A @ B` and the same bias.
        """
        return self.merge(**kwargs)

    @classmethod
    def _shape_kwargs(cls, a, b, bias, kwargs):
        return {"units": b.shape[-1], "use_bias": bias is not None}

    def _build_shape(self, a_shape, b_shape):
        return (None, a_shape[0])

    @classmethod
    def matrix_of(cls, layer):
        return np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float32)

    @classmethod
    def _counterpart_kwargs(cls, layer):
        return dict(use_bias=layer.use_bias, **projection_options(layer))

    def _dense_kwargs(self):
        return dict(units=self.units, use_bias=self.use_bias, **projection_options(self))

    def _dense_build_shape(self):
        return (None, self.input_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                **self._factor_config(),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": keras.regularizers.serialize(
                    self.activity_regularizer
                ),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            }
        )
        return config
