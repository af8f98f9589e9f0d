"""keras-factorized: Keras 3 layers with low-rank factorized weights.

The core API: `FactorizedEmbedding`, `LowRankDense` and `LowRankEinsumDense`
(layers whose weight matrix is kept as two factors `A @ B`, on one base class
`LowRankLayer`), `truncated_svd` with the rank helpers that initialise them,
`factorize` / `merge` for whole models, and `register_factorization` to
declare which layer classes they may replace.
"""

from keras_factorized.decomposition import SVDResult
from keras_factorized.decomposition import factorized_param_count
from keras_factorized.decomposition import low_rank_approximation
from keras_factorized.decomposition import rank_for_energy
from keras_factorized.decomposition import rank_for_param_ratio
from keras_factorized.decomposition import resolve_rank
from keras_factorized.decomposition import split_singular_values
from keras_factorized.decomposition import truncated_svd
from keras_factorized.layers import FactorizedEmbedding
from keras_factorized.layers import LowRankDense
from keras_factorized.layers import LowRankEinsumDense
from keras_factorized.layers import LowRankLayer
from keras_factorized.optimizers import LazyAdam
from keras_factorized.registry import register_factorization
from keras_factorized.surgery import DistillationConfig
from keras_factorized.surgery import FactorizationReport
from keras_factorized.surgery import WhitenedConfig
from keras_factorized.surgery import factorize
from keras_factorized.surgery import merge
from keras_factorized.version import __version__

__all__ = [
    "DistillationConfig",
    "FactorizationReport",
    "FactorizedEmbedding",
    "LazyAdam",
    "LowRankDense",
    "LowRankEinsumDense",
    "LowRankLayer",
    "SVDResult",
    "WhitenedConfig",
    "__version__",
    "export_for_serving",
    "export_tflite",
    "factorize",
    "factorized_param_count",
    "get_strategy",
    "low_rank_approximation",
    "merge",
    "rank_for_energy",
    "rank_for_param_ratio",
    "register_factorization",
    "resolve_rank",
    "split_singular_values",
    "truncated_svd",
]

# TensorFlow-only deployment helpers (keras_factorized.export/.distribute),
# imported on first use so that the package imports without TensorFlow work
# on the JAX and torch backends.
_TENSORFLOW_ONLY = {
    "export_for_serving": "keras_factorized.export",
    "export_tflite": "keras_factorized.tflite",
    "get_strategy": "keras_factorized.distribute",
}


def __getattr__(name):
    if name in _TENSORFLOW_ONLY:
        import importlib

        return getattr(importlib.import_module(_TENSORFLOW_ONLY[name]), name)
    raise AttributeError(f"module 'keras_factorized' has no attribute {name!r}")
