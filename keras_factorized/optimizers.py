"""`LazyAdam`: Adam that updates only the embedding rows a batch touched.

Keras 3's `Adam` turns an embedding's row-sparse gradient into a dense one
and, every step, decays both moments of every row and moves every row of the
table: a training step costs `O(rows x width)` whatever the batch. Keras 2
users had TF Addons' `LazyAdam` for this; this module gives it back for Keras 3.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_factorized")
class LazyAdam(keras.optimizers.Adam):
    """Adam with row-sparse ("lazy") updates of embedding tables.

    On the TensorFlow backend, the gradient of a table looked up with
    `ops.take` (`keras.layers.Embedding`, the factor `A` of
    `FactorizedEmbedding`) arrives as a `tf.IndexedSlices`. `LazyAdam` then
    updates only the rows in it: it sums the gradients of repeated ids, reads
    those rows of both moments, applies Adam's update to them, and writes them
    and the variable's rows back with scatter updates (Keras's TensorFlow
    optimizer turns an `IndexedSlices` value of `assign`/`assign_sub` into a
    scatter). The cost of a step then grows with the batch's distinct ids,
    not with the vocabulary. Every other gradient (dense layers, the factor `B`)
    gets `Adam`'s update unchanged.

    How it differs from `Adam` (the semantics of TF Addons' `LazyAdam`):

    - Rows that a batch did not touch keep their moments: they do not decay by
      `beta_1`/`beta_2` that step, and the row does not move. `Adam` decays
      every row's moments and keeps moving untouched rows with their old
      momentum `m / (sqrt(v) + epsilon)`, which only this makes cheap to skip.
    - The bias correction uses the global step (`iterations + 1`), not a
      per-row count of updates, exactly as `Adam` and TF Addons do; a row
      first touched at step 1000 has its first update scaled by
      `sqrt(1 - beta_2**1000) / (1 - beta_1**1000)`, about 1, instead of the
      `sqrt(1 - beta_2) / (1 - beta_1)` of its own first step.
    - With a dense gradient (every backend other than TensorFlow, or one
      densified by gradient accumulation) the update is `Adam`'s, bit for bit.
      `clipnorm`, `global_clipnorm` and `clipvalue` keep the gradient sparse
      and clip it as `Adam` clips the dense one (norms over the gradient with
      repeated ids summed).
    - On JAX and PyTorch gradients are dense arrays, so `LazyAdam` is `Adam`
      there: same results, same cost. `weight_decay`, when set, is applied by
      the base optimizer to every row (dense) on every backend.

    The arguments are `keras.optimizers.Adam`'s; `amsgrad=True` keeps the
    running maximum of the second moment for the touched rows only.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_factorized import FactorizedEmbedding, LazyAdam
    >>> model = keras.Sequential([
    ...     keras.Input((4,), dtype="int32"),
    ...     FactorizedEmbedding(1000, 16, rank=4),
    ...     keras.layers.GlobalAveragePooling1D(),
    ...     keras.layers.Dense(1),
    ... ])
    >>> model.compile(optimizer=LazyAdam(1e-3), loss="mse")
    >>> x = np.random.default_rng(0).integers(0, 1000, size=(8, 4))
    >>> float(model.train_on_batch(x, np.zeros((8, 1)))) >= 0
    True

    References:
        - [Kingma and Ba, 2014](https://arxiv.org/abs/1412.6980) (Adam).
        - TF Addons, `tfa.optimizers.LazyAdam` (Keras 2).
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, name="lazy_adam", **kwargs):
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, amsgrad=amsgrad, name=name, **kwargs)

    def _clip_gradients(self, grads):
        """`Adam`'s clipping, without densifying `IndexedSlices` gradients."""
        if not any(_is_indexed_slices(g) for g in grads):
            return super()._clip_gradients(grads)
        import tensorflow as tf

        grads = [_summed_slices(g) if _is_indexed_slices(g) else g for g in grads]
        if self.clipnorm and self.clipnorm > 0:
            return [None if g is None else tf.clip_by_norm(g, self.clipnorm) for g in grads]
        if self.global_clipnorm and self.global_clipnorm > 0:
            clipped, _ = tf.clip_by_global_norm(grads, self.global_clipnorm)
            return clipped
        if self.clipvalue and self.clipvalue > 0:
            return [None if g is None else _map_values(g, lambda x: tf.clip_by_value(
                x, -self.clipvalue, self.clipvalue)) for g in grads]
        return grads

    def update_step(self, gradient, variable, learning_rate):
        """Adam's update; only the gradient's rows for an `IndexedSlices`."""
        if _is_indexed_slices(gradient):
            self._sparse_update_step(gradient, variable, learning_rate)
        else:
            super().update_step(gradient, variable, learning_rate)

    def _sparse_update_step(self, gradient, variable, learning_rate):
        """The TensorFlow row-sparse update (see the class docstring)."""
        import tensorflow as tf

        dtype = variable.dtype
        gradient = _summed_slices(gradient)
        rows, values = gradient.indices, tf.cast(gradient.values, dtype)
        lr = ops.cast(learning_rate, dtype)
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        alpha = lr * ops.sqrt(1 - ops.power(beta_2, local_step)) / (
            1 - ops.power(beta_1, local_step))
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        m_rows = beta_1 * tf.gather(m.value, rows) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v.value, rows) + (1 - beta_2) * tf.square(values)
        self.assign(m, tf.IndexedSlices(m_rows, rows, tf.shape(m.value, out_type=rows.dtype)))
        self.assign(v, tf.IndexedSlices(v_rows, rows, tf.shape(v.value, out_type=rows.dtype)))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            v_rows = tf.maximum(tf.gather(v_hat.value, rows), v_rows)
            self.assign(v_hat, tf.IndexedSlices(
                v_rows, rows, tf.shape(v_hat.value, out_type=rows.dtype)))
        step = m_rows * alpha / (tf.sqrt(v_rows) + ops.cast(self.epsilon, dtype))
        self.assign_sub(variable, tf.IndexedSlices(
            step, rows, tf.shape(variable, out_type=rows.dtype)))


def _is_indexed_slices(value) -> bool:
    """Whether `value` is a `tf.IndexedSlices` (without importing TensorFlow)."""
    return keras.backend.backend() == "tensorflow" and type(value).__name__ == "IndexedSlices"


def _summed_slices(gradient):
    """The `IndexedSlices` with repeated ids summed (what a dense gradient holds).

    Keras 2's optimizers did the same before a sparse update; a no-op on
    slices already summed but for the cost of `tf.unique`.
    """
    import tensorflow as tf

    rows, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(rows)[0])
    return tf.IndexedSlices(values, rows, gradient.dense_shape)


def _map_values(value, fn):
    """`fn` over a dense tensor, or over the values of `IndexedSlices`."""
    if _is_indexed_slices(value):
        import tensorflow as tf

        return tf.IndexedSlices(fn(value.values), value.indices, value.dense_shape)
    return fn(value)
