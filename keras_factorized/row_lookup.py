"""`take_rows`: an embedding lookup that keeps sparse updates sparse on TensorFlow.

`keras.ops.take(variable, ids)` first reads the whole variable as a dense
tensor. Once an optimizer has updated that variable with a scatter (as
`keras_factorized.LazyAdam` does), TensorFlow keeps it in "copy on read"
mode, and every such dense read copies the whole table: a cost that grows
with the vocabulary. Gathering from the variable itself (one
`ResourceGather`) reads only the looked-up rows. Other backends use
`keras.ops.take` unchanged.
"""

from __future__ import annotations

import keras
from keras import ops


def take_rows(table, ids):
    """The rows `table[ids]` of a 2-D table, as `keras.ops.take(table, ids, axis=0)`.

    Negative ids count from the end, as with `keras.ops.take`; ids at or
    beyond the number of rows raise on TensorFlow (CPU) as they do there. On
    TensorFlow, a Keras variable is gathered from directly by dense ids,
    without reading the whole table; anything else (sparse or ragged ids,
    other backends) goes through `keras.ops.take`.

    Args:
        table: a `(rows, width)` Keras variable or tensor.
        ids: an integer tensor of row ids, any shape.

    Returns:
        A tensor of shape `ids.shape + (width,)`, of `table`'s dtype.

    Example:

    >>> import keras, numpy as np
    >>> table = keras.Variable(np.arange(6.0).reshape(3, 2), dtype="float32")
    >>> keras.ops.convert_to_numpy(take_rows(table, np.array([2, -3])))
    array([[4., 5.],
           [0., 1.]], dtype=float32)
    """
    if keras.backend.backend() != "tensorflow" or not isinstance(table, keras.Variable):
        return ops.take(table, ids, axis=0)
    import tensorflow as tf

    if isinstance(ids, (tf.SparseTensor, tf.RaggedTensor)):
        return ops.take(table, ids, axis=0)  # Keras's sparse and ragged lookups
    variable = table.value  # the tf.Variable (or its autocast, a tensor)
    ids = tf.convert_to_tensor(ids)
    rows = tf.cast(tf.shape(variable, out_type=ids.dtype)[0], ids.dtype)
    return tf.gather(variable, tf.where(ids < 0, ids + rows, ids))
