"""`FactorizedEmbedding`: an embedding table kept as two low-rank factors."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_factorized import validation
from keras_factorized.layers.base import LowRankLayer
from keras_factorized.row_lookup import take_rows


@keras.saving.register_keras_serializable(package="keras_factorized")
class FactorizedEmbedding(LowRankLayer):
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

    factor_names = ("embeddings_a", "embeddings_b")
    matrix_dim_names = ("input_dim", "output_dim")
    dense_class = keras.layers.Embedding

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
        self.input_dim = validation.check_positive_int("input_dim", input_dim)
        self.output_dim = validation.check_positive_int("output_dim", output_dim)
        rank = validation.check_rank(rank, (self.input_dim, self.output_dim))
        options = dict(
            embeddings_a_initializer=embeddings_a_initializer,
            embeddings_b_initializer=embeddings_b_initializer,
            embeddings_a_regularizer=embeddings_a_regularizer,
            embeddings_b_regularizer=embeddings_b_regularizer,
            embeddings_a_constraint=embeddings_a_constraint,
            embeddings_b_constraint=embeddings_b_constraint,
        )
        self._init_factors(rank, options, a_trainable, b_trainable)
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero
        self.autocast = False

    def build(self, input_shape=None):
        if self.built:
            return
        self._add_factors((self.input_dim, self.rank), (self.rank, self.output_dim))
        self.built = True

    @property
    def embeddings(self):
        """The merged `input_dim x output_dim` table `A @ B` (a tensor)."""
        a, b = self._float_factors()
        return ops.matmul(a, b)

    def call(self, inputs):
        # A ragged batch (TensorFlow, e.g. `TextVectorization(ragged=True)`)
        # is looked up through its flat values, so the output is ragged too,
        # as with `keras.layers.Embedding`.
        flat = getattr(inputs, "flat_values", None)
        ids = inputs if flat is None else flat
        if ids.dtype != "int32" and ids.dtype != "int64":
            ids = ops.cast(ids, "int32")
        # Gather the stored rows of A (int8 rows once quantized, whose scales
        # live in B), then cast: the lookup stays a gather.
        rows = ops.cast(take_rows(self.embeddings_a, ids), self.compute_dtype)
        outputs = ops.matmul(rows, self._compute_b())
        return outputs if flat is None else inputs.with_flat_values(outputs)

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def compute_output_spec(self, inputs):
        output_shape = self.compute_output_shape(inputs.shape)
        ragged = getattr(inputs, "ragged", False)
        return keras.KerasTensor(output_shape, dtype=self.compute_dtype, ragged=ragged)

    # Conversions: `from_matrix`, `from_layer` and `merge` come from
    # `LowRankLayer`; these are their names in the vocabulary of `Embedding`.

    @classmethod
    def from_embedding(cls, layer, rank=None, **kwargs):
        """Creates a layer approximating a built `keras.layers.Embedding`.

        The new layer keeps the embedding's `mask_zero`, name (unless given)
        and dtype policy; its factors come from the truncated SVD of the
        table (see `from_matrix`).

        Args:
            layer: a built `keras.layers.Embedding`.
            rank: the rank; or `energy=`/`param_ratio=` (see `from_matrix`).
            **kwargs: `energy`, `param_ratio`, `split`, `svd_method`, and
                constructor arguments that override the copied ones.

        Returns:
            A built `FactorizedEmbedding`.
        """
        return cls.from_layer(layer, rank, **kwargs)

    def to_embedding(self, **kwargs):
        """Merges the factors into a plain, built `keras.layers.Embedding`.

        Its table is `A @ B`, so it gives the same outputs, faster on large
        batches and larger on disk. Same as `merge()`.

        Args:
            **kwargs: constructor arguments of `Embedding` that override the
                copied ones (`name`, `mask_zero`, `dtype`).

        Returns:
            A built `keras.layers.Embedding`.
        """
        if not self.built:
            self.build()
        return self.merge(**kwargs)

    @classmethod
    def _shape_kwargs(cls, a, b, bias, kwargs):
        if bias is not None:
            raise validation.invalid_value("bias", "None (an embedding has no bias)", "an array")
        return {"input_dim": a.shape[0], "output_dim": b.shape[-1]}

    def _build_shape(self, a_shape, b_shape):
        return None

    @classmethod
    def matrix_of(cls, layer):
        return np.asarray(ops.convert_to_numpy(layer.embeddings), dtype=np.float32)

    @classmethod
    def bias_of(cls, layer):
        return None

    @classmethod
    def _counterpart_kwargs(cls, layer):
        return {"mask_zero": layer.mask_zero, "name": layer.name, "dtype": layer.dtype_policy}

    def _dense_kwargs(self):
        return {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "mask_zero": self.mask_zero,
            "name": self.name,
            "dtype": self.dtype_policy,
        }

    def _dense_build_shape(self):
        return None

    def _dense_weight(self, dense):
        return dense.embeddings

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "input_dim": self.input_dim,
                "output_dim": self.output_dim,
                **self._factor_config(),
                "activity_regularizer": keras.regularizers.serialize(
                    self.activity_regularizer
                ),
                "mask_zero": self.mask_zero,
            }
        )
        return config
