"""keras-factorized: Keras 3 layers with low-rank factorized weights."""

from keras_factorized.version import __version__
