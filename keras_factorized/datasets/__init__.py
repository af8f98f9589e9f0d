"""Datasets for the examples: `keras_factorized.datasets.imdb`."""

from keras_factorized.datasets import imdb
from keras_factorized.datasets.imdb import load_imdb

__all__ = ["imdb", "load_imdb"]
