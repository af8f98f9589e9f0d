"""`LowRankDense`: a densely-connected layer whose kernel is two low-rank factors."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_factorized import decomposition
from keras_factorized.layers import _factor_utils as fu


@keras.saving.register_keras_serializable(package="keras_factorized")
class LowRankDense(fu.TrainableFactorsMixin, keras.layers.Layer):
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

    _factor_variable_names = ("kernel_a", "kernel_b")

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
        self.units = fu.check_positive_int("units", units)
        self.rank = decomposition.validate_rank(rank, (self.units, self.units))
        self.activation = keras.activations.get(activation)
        self.use_bias = fu.check_bool("use_bias", use_bias)
        self.kernel_a_initializer = keras.initializers.get(kernel_a_initializer)
        self.kernel_b_initializer = keras.initializers.get(kernel_b_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_a_regularizer = keras.regularizers.get(kernel_a_regularizer)
        self.kernel_b_regularizer = keras.regularizers.get(kernel_b_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_a_constraint = keras.constraints.get(kernel_a_constraint)
        self.kernel_b_constraint = keras.constraints.get(kernel_b_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self._a_trainable = fu.check_bool("a_trainable", a_trainable)
        self._b_trainable = fu.check_bool("b_trainable", b_trainable)
        self.input_spec = keras.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "Received an invalid value for `input_shape`, expected a defined "
                f"last dimension. Received: input_shape={tuple(input_shape)}"
            )
        input_dim = int(input_dim)
        decomposition.validate_rank(self.rank, (input_dim, self.units))
        factor_dtype = fu.factor_dtype(self.dtype_policy)
        self.kernel_a = self.add_weight(
            name="kernel_a",
            shape=(input_dim, self.rank),
            initializer=self.kernel_a_initializer,
            regularizer=self.kernel_a_regularizer,
            constraint=self.kernel_a_constraint,
            trainable=self._a_trainable,
            dtype=factor_dtype,
        )
        self.kernel_b = self.add_weight(
            name="kernel_b",
            shape=(self.rank, self.units),
            initializer=self.kernel_b_initializer,
            regularizer=self.kernel_b_regularizer,
            constraint=self.kernel_b_constraint,
            trainable=self._b_trainable,
            dtype=factor_dtype,
        )
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
        return ops.matmul(self.kernel_a, self.kernel_b)

    def call(self, inputs):
        # (x @ A) @ B costs (m + n) k per row; x @ (A @ B) would cost m n.
        hidden = ops.matmul(inputs, ops.cast(self.kernel_a, self.compute_dtype))
        outputs = ops.matmul(hidden, ops.cast(self.kernel_b, self.compute_dtype))
        if self.use_bias:
            outputs = ops.add(outputs, ops.cast(self.bias, self.compute_dtype))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def set_factors(self, a, b, bias=None):
        """Sets `A`, `B` (and the bias) from arrays, checking their shapes.

        Args:
            a: array of shape `(input_dim, rank)`.
            b: array of shape `(rank, units)`.
            bias: optional array of shape `(units,)`.
        """
        if not self.built:
            self.build((None, np.shape(a)[0]))
        fu.assign_factor(self.kernel_a, a, "a", ("input_dim", "rank"))
        fu.assign_factor(self.kernel_b, b, "b", ("rank", "units"))
        if bias is not None:
            if not self.use_bias:
                raise ValueError(
                    "Received an invalid value for `bias`, expected None for a "
                    "layer built with `use_bias=False`. Received: an array"
                )
            fu.assign_factor(self.bias, bias, "bias", ("units",))

    @classmethod
    def from_kernel(
        cls,
        kernel,
        bias=None,
        rank=None,
        energy=None,
        param_ratio=None,
        split="balanced",
        svd_method="auto",
        **kwargs,
    ):
        """Creates a layer whose factors are the truncated SVD of `kernel`.

        Args:
            kernel: the `(input_dim, units)` kernel (NumPy array or tensor).
            bias: optional `(units,)` bias; when given the layer uses a bias.
            rank: the rank `k`.
            energy: instead of `rank`: keep this fraction of the squared
                singular values, in `(0, 1]`.
            param_ratio: instead of `rank`: keep at most this fraction of
                the `input_dim * units` kernel weights, in `(0, 1]`.
            split: `"balanced"` (`A = U S^1/2, B = S^1/2 V^T`), `"left"` or
                `"right"`; see `decomposition.split_singular_values`.
            svd_method: the `method` of `truncated_svd`.
            **kwargs: other constructor arguments (`activation`, `name`, ...).

        Returns:
            A built `LowRankDense`.
        """
        result = decomposition.truncated_svd(
            kernel, rank, energy=energy, param_ratio=param_ratio, method=svd_method
        )
        a, b = result.factors(split)
        kwargs.setdefault("use_bias", bias is not None)
        layer = cls(units=b.shape[1], rank=result.rank, **kwargs)
        layer.build((None, a.shape[0]))
        layer.set_factors(a, b, bias)
        return layer

    @classmethod
    def from_dense(
        cls,
        layer,
        rank=None,
        energy=None,
        param_ratio=None,
        split="balanced",
        svd_method="auto",
        **kwargs,
    ):
        """Creates a layer approximating a built `keras.layers.Dense`.

        The new layer keeps the dense layer's activation, bias (and its
        initializer, regularizer and constraint), name and dtype policy.

        Args:
            layer: a built `keras.layers.Dense`.
            rank, energy, param_ratio, split, svd_method: as in `from_kernel`.
            **kwargs: constructor arguments that override the copied ones.

        Returns:
            A built `LowRankDense`.
        """
        if not isinstance(layer, keras.layers.Dense):
            raise TypeError(
                "Received an invalid value for `layer`, expected a "
                f"`keras.layers.Dense`. Received: layer={layer!r}"
            )
        if not layer.built:
            raise ValueError(
                "Received an invalid value for `layer`, expected a built `Dense` "
                "(call it on data or `build()` it first). "
                f"Received: layer={layer.name!r} (not built)"
            )
        options = dict(
            activation=layer.activation,
            use_bias=layer.use_bias,
            bias_initializer=layer.bias_initializer,
            bias_regularizer=layer.bias_regularizer,
            bias_constraint=layer.bias_constraint,
            activity_regularizer=layer.activity_regularizer,
            name=layer.name,
            dtype=layer.dtype_policy,
        )
        options.update(kwargs)
        return cls.from_kernel(
            layer.kernel,
            bias=layer.bias if layer.use_bias else None,
            rank=rank,
            energy=energy,
            param_ratio=param_ratio,
            split=split,
            svd_method=svd_method,
            **options,
        )

    def to_dense(self, **kwargs):
        """Merges the factors into a plain, built `keras.layers.Dense`.

        Args:
            **kwargs: constructor arguments of `Dense` that override the copied
                ones.

        Returns:
            A built `keras.layers.Dense` with kernel `A @ B` and the same bias.
        """
        if not self.built:
            raise ValueError(
                "Received an invalid value for `self`, expected a built "
                f"`LowRankDense`. Received: layer={self.name!r} (not built)"
            )
        options = dict(
            units=self.units,
            activation=self.activation,
            use_bias=self.use_bias,
            bias_initializer=self.bias_initializer,
            bias_regularizer=self.bias_regularizer,
            bias_constraint=self.bias_constraint,
            activity_regularizer=self.activity_regularizer,
            name=self.name,
            dtype=self.dtype_policy,
        )
        options.update(kwargs)
        dense = keras.layers.Dense(**options)
        dense.build((None, self.input_dim))
        merged = np.matmul(
            ops.convert_to_numpy(self.kernel_a).astype(np.float64),
            ops.convert_to_numpy(self.kernel_b).astype(np.float64),
        )
        dense.kernel.assign(merged.astype(dense.kernel.dtype))
        if self.use_bias:
            dense.bias.assign(ops.convert_to_numpy(self.bias))
        return dense

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "rank": self.rank,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_a_initializer": keras.initializers.serialize(
                    self.kernel_a_initializer
                ),
                "kernel_b_initializer": keras.initializers.serialize(
                    self.kernel_b_initializer
                ),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_a_regularizer": keras.regularizers.serialize(
                    self.kernel_a_regularizer
                ),
                "kernel_b_regularizer": keras.regularizers.serialize(
                    self.kernel_b_regularizer
                ),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": keras.regularizers.serialize(
                    self.activity_regularizer
                ),
                "kernel_a_constraint": keras.constraints.serialize(
                    self.kernel_a_constraint
                ),
                "kernel_b_constraint": keras.constraints.serialize(
                    self.kernel_b_constraint
                ),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "a_trainable": self._a_trainable,
                "b_trainable": self._b_trainable,
            }
        )
        return config
