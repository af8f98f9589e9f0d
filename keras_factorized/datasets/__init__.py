"""Datasets for the examples: `keras_factorized.datasets.imdb`."""

from keras_factorized.datasets import imdb

__all__ = ["imdb"]
