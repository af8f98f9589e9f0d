"""Model surgery: `factorize` a trained model into low-rank factors, `merge` it back.

`factorize` (in `surgery.factorize`) is a short orchestration of one module
per step: `walk` (the model walker), `copying`, `selection`, `calibration`,
`decompose`, `ranks`, `replace`, `saving`, `distillation` and `report`.
"""

from keras_factorized.surgery.config import DistillationConfig
from keras_factorized.surgery.config import WhitenedConfig
from keras_factorized.surgery.factorize import METHODS
from keras_factorized.surgery.factorize import factorize
from keras_factorized.surgery.merge import merge
from keras_factorized.surgery.ranks import ALLOCATIONS
from keras_factorized.surgery.report import FactorizationReport
from keras_factorized.surgery.report import LayerFactorization
from keras_factorized.surgery.saving import FactorizedModelLoader
from keras_factorized.surgery.walk import walk_layers

__all__ = [
    "ALLOCATIONS",
    "METHODS",
    "DistillationConfig",
    "FactorizationReport",
    "FactorizedModelLoader",
    "LayerFactorization",
    "WhitenedConfig",
    "factorize",
    "merge",
    "walk_layers",
]
