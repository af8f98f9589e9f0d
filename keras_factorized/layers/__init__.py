"""Keras layers that keep their weight matrices as low-rank factors."""

from keras_factorized.layers.base import LowRankLayer
from keras_factorized.layers.factorized_embedding import FactorizedEmbedding
from keras_factorized.layers.low_rank_dense import LowRankDense
from keras_factorized.layers.low_rank_einsum_dense import LowRankEinsumDense

__all__ = ["FactorizedEmbedding", "LowRankDense", "LowRankEinsumDense", "LowRankLayer"]
