"""`FactorizedEmbedding`: an embedding table kept as two low-rank factors."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_factorized import decomposition
from keras_factorized.layers import _factor_utils as fu


@keras.saving.register_keras_serializable(package="keras_factorized")
class FactorizedEmbedding(fu.TrainableFactorsMixin, keras.layers.Layer):
    """Turns positive integers (indexes) into dense vectors through a low-rank table.

    A drop-in replacement of `keras.layers.Embedding` whose `input_dim x
    output_dim` table `E` is kept as the product of two factors,
    `E = A @ B` with `A` of shape `(input_dim, rank)` and `B` of shape
    `(rank, output_dim)`. Only the factors are stored and trained: a
    `FactorizedEmbedding(20000, 128, rank=16)` has `20000*16 + 16*128 =
    322,048` weights where `Embedding(20000, 128)` has `2,560,000`. A lookup
    gathers the rows of `A` for the ids, then multiplies them by `B`, so the
    full table is never built.

    Build one from scratch (trained like any layer), or from an existing matrix
    or `Embedding` layer with `from_matrix` / `from_embedding`, which
    initialise the factors from its truncated SVD (the best rank-`k`
    approximation). `to_embedding()` merges the factors back into a plain
    `keras.layers.Embedding`.

    The factors are kept in float32 whenever the dtype policy asks for 16-bit
    variables (as Keras does for LoRA factors: bfloat16 factors trained with
    Adam stop learning, keras-hub issue 2629); the lookup runs in the policy's
    compute dtype and the output has that dtype.

    Out-of-vocabulary ids (`< 0` or `>= input_dim`) behave exactly as in
    `keras.layers.Embedding`, since the lookup is the same `ops.take`: the
    TensorFlow backend raises an `InvalidArgumentError` on CPU (and returns
    zeros on GPU); JAX returns NaN rows for ids `>= input_dim` (its `take`
    fills out-of-bounds gathers) and counts negative ids from the end. Map
    unknown words to an OOV index (as `TextVectorization` does) rather than
    relying on any of these.

    Args:
        input_dim: Integer. Size of the vocabulary, i.e. maximum integer
            index + 1.
        output_dim: Integer. Dimension of the dense embedding.
        rank: Integer in `[1, min(input_dim, output_dim)]`, the rank of the
            factorization.
        embeddings_a_initializer: Initializer for `A` (`input_dim x rank`).
            Defaults to `"uniform"` (as `Embedding`'s table).
        embeddings_b_initializer: Initializer for `B` (`rank x output_dim`).
            Defaults to `"orthogonal"`, so that `A @ B` starts with the
            scale of `A`.
        embeddings_a_regularizer: Regularizer function applied to `A`.
        embeddings_b_regularizer: Regularizer function applied to `B`.
        activity_regularizer: Regularizer function applied to the output.
        embeddings_a_constraint: Constraint function applied to `A`.
        embeddings_b_constraint: Constraint function applied to `B`.
        mask_zero: Boolean, whether the input value 0 is a special "padding"
            value that should be masked out, as in `Embedding`.
        a_trainable: Boolean, whether `A` is trained (e.g. `False` to keep a
            pretrained `A` frozen while `B` adapts).
        b_trainable: Boolean, whether `B` is trained.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: integer tensor of any shape.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_length)`.

    Output shape:
        (N+1)-D tensor with shape `(batch_size, ..., input_length, output_dim)`.

    Example:

    >>> import numpy as np, keras
    >>> layer = FactorizedEmbedding(input_dim=1000, output_dim=64, rank=8)
    >>> tuple(layer(np.array([[4, 20, 7]])).shape)
    (1, 3, 64)
    >>> layer.count_params()  # 1000*8 + 8*64
    8512
    >>> table = np.random.default_rng(0).normal(size=(1000, 64))
    >>> layer = FactorizedEmbedding.from_matrix(table, rank=16)
    >>> tuple(layer.embeddings.shape)
    (1000, 64)

    References:
        - [Eckart & Young, 1936](https://doi.org/10.1007/BF02288367): the
          truncated SVD is the best low-rank approximation.
        - [Lan et al., 2020 (ALBERT)](https://arxiv.org/abs/1909.11942):
          factorized embedding parameterization.
    """

    _factor_variable_names = ("embeddings_a", "embeddings_b")

    def __init__(
        self,
        input_dim,
        output_dim,
        rank,
        embeddings_a_initializer="uniform",
        embeddings_b_initializer="orthogonal",
        embeddings_a_regularizer=None,
        embeddings_b_regularizer=None,
        activity_regularizer=None,
        embeddings_a_constraint=None,
        embeddings_b_constraint=None,
        mask_zero=False,
        a_trainable=True,
        b_trainable=True,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.input_dim = fu.check_positive_int("input_dim", input_dim)
        self.output_dim = fu.check_positive_int("output_dim", output_dim)
        self.rank = decomposition.validate_rank(rank, (self.input_dim, self.output_dim))
        self.embeddings_a_initializer = keras.initializers.get(embeddings_a_initializer)
        self.embeddings_b_initializer = keras.initializers.get(embeddings_b_initializer)
        self.embeddings_a_regularizer = keras.regularizers.get(embeddings_a_regularizer)
        self.embeddings_b_regularizer = keras.regularizers.get(embeddings_b_regularizer)
        self.embeddings_a_constraint = keras.constraints.get(embeddings_a_constraint)
        self.embeddings_b_constraint = keras.constraints.get(embeddings_b_constraint)
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero
        self.autocast = False
        self._a_trainable = fu.check_bool("a_trainable", a_trainable)
        self._b_trainable = fu.check_bool("b_trainable", b_trainable)

    def build(self, input_shape=None):
        if self.built:
            return
        factor_dtype = fu.factor_dtype(self.dtype_policy)
        self.embeddings_a = self.add_weight(
            shape=(self.input_dim, self.rank),
            initializer=self.embeddings_a_initializer,
            name="embeddings_a",
            regularizer=self.embeddings_a_regularizer,
            constraint=self.embeddings_a_constraint,
            trainable=self._a_trainable,
            dtype=factor_dtype,
        )
        self.embeddings_b = self.add_weight(
            shape=(self.rank, self.output_dim),
            initializer=self.embeddings_b_initializer,
            name="embeddings_b",
            regularizer=self.embeddings_b_regularizer,
            constraint=self.embeddings_b_constraint,
            trainable=self._b_trainable,
            dtype=factor_dtype,
        )
        self.built = True

    @property
    def embeddings(self):
        """The merged `input_dim x output_dim` table `A @ B` (a tensor)."""
        return ops.matmul(self.embeddings_a, self.embeddings_b)

    def call(self, inputs):
        if inputs.dtype != "int32" and inputs.dtype != "int64":
            inputs = ops.cast(inputs, "int32")
        rows = ops.take(self.embeddings_a, inputs, axis=0)
        rows = ops.cast(rows, self.compute_dtype)
        return ops.matmul(rows, ops.cast(self.embeddings_b, self.compute_dtype))

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def compute_output_spec(self, inputs):
        output_shape = self.compute_output_shape(inputs.shape)
        return keras.KerasTensor(output_shape, dtype=self.compute_dtype)

    def set_factors(self, a, b):
        """Sets `A` and `B` from arrays, checking their shapes.

        Args:
            a: array of shape `(input_dim, rank)`.
            b: array of shape `(rank, output_dim)`.
        """
        if not self.built:
            self.build()
        fu.assign_factor(self.embeddings_a, a, "a", ("input_dim", "rank"))
        fu.assign_factor(self.embeddings_b, b, "b", ("rank", "output_dim"))

    @classmethod
    def from_matrix(
        cls,
        matrix,
        rank=None,
        energy=None,
        param_ratio=None,
        split="balanced",
        svd_method="auto",
        **kwargs,
    ):
        """Creates a layer whose factors are the truncated SVD of `matrix`.

        `A = U_k S_k^1/2` and `B = S_k^1/2 V_k^T` by default, so `A @ B` is
        the best rank-`k` approximation of `matrix` (Eckart-Young).

        Args:
            matrix: the `(input_dim, output_dim)` embedding table, e.g.
                pretrained GloVe vectors (NumPy array or tensor).
            rank: the rank `k`.
            energy: instead of `rank`: keep this fraction of the squared
                singular values, in `(0, 1]`.
            param_ratio: instead of `rank`: keep at most this fraction of
                the `input_dim * output_dim` weights, in `(0, 1]`.
            split: `"balanced"`, `"left"` (`A = U S, B = V^T`) or `"right"`
                (`A = U, B = S V^T`); see
                `keras_factorized.decomposition.split_singular_values`.
            svd_method: the `method` of `truncated_svd`.
            **kwargs: other constructor arguments (`mask_zero`, `name`,
                `a_trainable`, ...).

        Returns:
            A built `FactorizedEmbedding`.

        Example:

        >>> import numpy as np
        >>> table = np.random.default_rng(0).normal(size=(500, 32))
        >>> layer = FactorizedEmbedding.from_matrix(table, energy=0.5, mask_zero=True)
        >>> layer.rank < 32
        True
        """
        result = decomposition.truncated_svd(
            matrix, rank, energy=energy, param_ratio=param_ratio, method=svd_method
        )
        a, b = result.factors(split)
        layer = cls(input_dim=a.shape[0], output_dim=b.shape[1], rank=result.rank, **kwargs)
        layer.set_factors(a, b)
        return layer

    @classmethod
    def from_embedding(
        cls,
        layer,
        rank=None,
        energy=None,
        param_ratio=None,
        split="balanced",
        svd_method="auto",
        **kwargs,
    ):
        """Creates a layer approximating a built `keras.layers.Embedding`.

        The new layer keeps the embedding's `mask_zero`, name (unless given)
        and dtype policy, and its factors come from the truncated SVD of the
        embedding table (see `from_matrix`).

        Args:
            layer: a built `keras.layers.Embedding`.
            rank, energy, param_ratio, split, svd_method: as in `from_matrix`.
            **kwargs: constructor arguments that override the copied ones.

        Returns:
            A built `FactorizedEmbedding`.
        """
        if not isinstance(layer, keras.layers.Embedding):
            raise TypeError(
                "Received an invalid value for `layer`, expected a "
                f"`keras.layers.Embedding`. Received: layer={layer!r}"
            )
        if not layer.built:
            raise ValueError(
                "Received an invalid value for `layer`, expected a built "
                f"`Embedding` (call it on data or `build()` it first). "
                f"Received: layer={layer.name!r} (not built)"
            )
        options = dict(
            mask_zero=layer.mask_zero,
            name=layer.name,
            dtype=layer.dtype_policy,
        )
        options.update(kwargs)
        return cls.from_matrix(
            layer.embeddings,
            rank=rank,
            energy=energy,
            param_ratio=param_ratio,
            split=split,
            svd_method=svd_method,
            **options,
        )

    def to_embedding(self, **kwargs):
        """Merges the factors into a plain, built `keras.layers.Embedding`.

        Its table is `A @ B`, so it gives the same outputs, faster on large
        batches and larger on disk.

        Args:
            **kwargs: constructor arguments of `Embedding` that override the
                copied ones (`name`, `mask_zero`, `dtype`).

        Returns:
            A built `keras.layers.Embedding`.
        """
        if not self.built:
            self.build()
        options = dict(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            mask_zero=self.mask_zero,
            name=self.name,
            dtype=self.dtype_policy,
        )
        options.update(kwargs)
        embedding = keras.layers.Embedding(**options)
        embedding.build()
        merged = np.matmul(
            ops.convert_to_numpy(self.embeddings_a).astype(np.float64),
            ops.convert_to_numpy(self.embeddings_b).astype(np.float64),
        )
        embedding.embeddings.assign(merged.astype(embedding.embeddings.dtype))
        return embedding

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                "rank": self.rank,
                "embeddings_a_initializer": keras.initializers.serialize(
                    self.embeddings_a_initializer
                ),
                "embeddings_b_initializer": keras.initializers.serialize(
                    self.embeddings_b_initializer
                ),
                "embeddings_a_regularizer": keras.regularizers.serialize(
                    self.embeddings_a_regularizer
                ),
                "embeddings_b_regularizer": keras.regularizers.serialize(
                    self.embeddings_b_regularizer
                ),
                "activity_regularizer": keras.regularizers.serialize(
                    self.activity_regularizer
                ),
                "embeddings_a_constraint": keras.constraints.serialize(
                    self.embeddings_a_constraint
                ),
                "embeddings_b_constraint": keras.constraints.serialize(
                    self.embeddings_b_constraint
                ),
                "mask_zero": self.mask_zero,
                "a_trainable": self._a_trainable,
                "b_trainable": self._b_trainable,
            }
        )
        return config
