"""Which layers can be factorized, into what, and why a layer is kept.

One table answers the question for the whole package: `factorize` asks it
which layers to replace, `inspect` which spectra to show, `merge` (and the
export with `merge_factors=True`) which layers to turn back. Like TFMOT's
`prune_registry`, it maps a layer class to what can be done with it.

The policy for subclasses: a rule applies to its exact source class only.
A subclass may compute something else with the same weights (KerasHub's
`ReversibleEmbedding` also serves as the language-model head, reading the
table transposed; a subclass may override `call`), so it is kept, and the
decision carries a reason that the factorization report and `inspect` show.
A user who knows that a subclass computes exactly its parent's product
registers it with `register_factorization(MyDense, LowRankDense)`.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_factorized import validation
from keras_factorized.layers import FactorizedEmbedding
from keras_factorized.layers import LowRankDense
from keras_factorized.layers import LowRankEinsumDense
from keras_factorized.layers.base import LowRankLayer
from keras_factorized.layers.einsum_shapes import EinsumFactorization


@dataclasses.dataclass(frozen=True)
class Rule:
    """How layers of class `source` become `target` layers and back.

    Attributes:
        source: the Keras layer class (e.g. `keras.layers.Dense`).
        target: the factorized class (a `LowRankLayer` subclass).
        kind: a short name for reports: `"dense"`, `"einsum"`, `"embedding"`.
    """

    source: type
    target: type
    kind: str

    def matrix(self, layer) -> np.ndarray:
        """The `(m, n)` float32 weight matrix of a `source` layer."""
        return self.target.matrix_of(layer)

    def bias(self, layer):
        """The bias of a `source` layer as a NumPy array, or `None`."""
        return self.target.bias_of(layer)

    def build(self, layer, a, b, bias=None) -> LowRankLayer:
        """A built `target` layer replacing `layer`, with factors `a`, `b`.

        It keeps the name, dtype policy and options (activation, bias axes,
        `mask_zero`...) of `layer`.
        """
        kwargs = self.target._counterpart_kwargs(layer)
        return self.target.from_factors(a, b, bias, **kwargs)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The registry's answer for one layer.

    Attributes:
        rule: the `Rule` that factorizes it, or `None`.
        reason: why a layer that holds a weight matrix is kept (`None` for
            a factorizable layer and for layers without a weight matrix).
    """

    rule: Rule | None
    reason: str | None = None

    @property
    def factorizable(self) -> bool:
        return self.rule is not None


_RULES: dict[type, Rule] = {}

# Subclasses of registered classes known to compute something else, and why.
_KNOWN_SUBCLASS_REASONS = {
    "ReversibleEmbedding": (
        "kept: ReversibleEmbedding also serves as the output projection "
        "(its table is read transposed for logits), which a factorized "
        "embedding does not reproduce"
    ),
}


def register_factorization(source, target, kind=None) -> Rule:
    """Declares that layers of exact class `source` become `target` layers.

    Use it for your own subclass of `Dense`, `EinsumDense` or `Embedding`
    that computes exactly its parent's product (same `call`).

    Args:
        source: a `keras.layers.Layer` subclass.
        target: `LowRankDense`, `LowRankEinsumDense` or `FactorizedEmbedding`
            (or another `LowRankLayer` subclass whose `dense_class` is a base
            of `source`).
        kind: the name shown in reports; defaults to the target's.

    Returns:
        The registered `Rule`.

    Example:

    >>> import keras
    >>> class MyDense(keras.layers.Dense):
    ...     pass
    >>> rule = register_factorization(MyDense, LowRankDense)
    >>> layer = MyDense(4)
    >>> layer.build((None, 8))
    >>> lookup(layer).rule is rule
    True
    >>> unregister_factorization(MyDense)
    """
    if not (isinstance(source, type) and issubclass(source, keras.layers.Layer)):
        raise validation.invalid_type("source", "a Keras layer class", source)
    if not (isinstance(target, type) and issubclass(target, LowRankLayer)):
        raise validation.invalid_type("target", "a `LowRankLayer` subclass", target)
    if not issubclass(source, target.dense_class):
        raise validation.invalid_value(
            "source", f"a subclass of `{target.dense_class.__name__}` for target "
            f"`{target.__name__}`", source)
    if kind is None:
        kind = next((r.kind for r in _RULES.values() if r.target is target), target.__name__)
    rule = Rule(source, target, kind)
    _RULES[source] = rule
    return rule


def unregister_factorization(source) -> None:
    """Removes the rule of `source` (registered with `register_factorization`)."""
    _RULES.pop(source, None)


register_factorization(keras.layers.Dense, LowRankDense, "dense")
register_factorization(keras.layers.EinsumDense, LowRankEinsumDense, "einsum")
register_factorization(keras.layers.Embedding, FactorizedEmbedding, "embedding")


def rules() -> tuple:
    """All registered rules."""
    return tuple(_RULES.values())


def is_factorized(layer) -> bool:
    """Whether `layer` keeps a weight matrix as factors (a `LowRankLayer`)."""
    return isinstance(layer, LowRankLayer)


def lookup(layer) -> Decision:
    """Whether and how `layer` can be factorized.

    Args:
        layer: any Keras layer.

    Returns:
        A `Decision`: its `rule` when the layer can be replaced now, else
        `None` with a `reason` when the layer holds a weight matrix that is
        kept (a subclass, not built, quantized, LoRA enabled, an einsum kernel
        that is a batch of matrices, already factorized).

    Example:

    >>> import keras
    >>> lookup(keras.layers.Dense(4)).reason
    'kept: not built'
    >>> dense = keras.layers.Dense(4)
    >>> dense.build((None, 8))
    >>> lookup(dense).rule.kind
    'dense'
    """
    if is_factorized(layer):
        return Decision(None, "already factorized")
    rule = _RULES.get(type(layer))
    if rule is None:
        return Decision(None, _subclass_reason(layer))
    reason = _state_reason(layer, rule)
    return Decision(None, reason) if reason else Decision(rule)


def _subclass_reason(layer):
    for source in _RULES:
        if isinstance(layer, source):
            known = _KNOWN_SUBCLASS_REASONS.get(type(layer).__name__)
            return known or (
                f"kept: {type(layer).__name__} subclasses {source.__name__} and may "
                "compute something else; register it with "
                "`keras_factorized.register_factorization` if it does not"
            )
    return None


def _state_reason(layer, rule):
    if not layer.built:
        return "kept: not built"
    if getattr(layer, "quantization_mode", None) is not None:
        return "kept: quantized"
    if getattr(layer, "lora_enabled", False):
        return "kept: LoRA enabled"
    if rule.kind == "einsum":
        try:
            EinsumFactorization(layer.equation)
        except ValueError:
            return "kept: kernel is a batch of matrices"
    return None
