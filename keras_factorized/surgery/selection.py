"""Which layers `factorize` replaces: `filters`, `include`/`exclude`, the registry.

A layer is a candidate when the registry has a rule for it. It is selected
when it passes the user's selection (`filters` and `include`, not `exclude`)
and can be replaced safely; a selected layer that cannot (not built,
quantized, LoRA-enabled, in the graph of a model that builds its own graph,
or skipped by the registry with a reason) is kept and gets a report row
saying why.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_factorized import _keras_compat
from keras_factorized import data_aware
from keras_factorized import registry
from keras_factorized.layers.einsum_shapes import EinsumFactorization
from keras_factorized.surgery import walk
from keras_factorized.validation import invalid_type
from keras_factorized.validation import invalid_value


@dataclasses.dataclass
class Target:
    """A selected layer and what `factorize` computes for it."""

    path: tuple  # steps from the model (see `walk`)
    layer: Any  # the layer in the copy
    original: Any  # the same layer in the original model
    rule: Any  # the registry's `Rule`
    matrix: np.ndarray  # (m, n) float32
    bias: np.ndarray | None
    factorization: EinsumFactorization | None = None
    stats: data_aware.ActivationStatistics | None = None
    token_counts: data_aware.TokenCounts | None = None  # embeddings
    spectrum: Any = None  # SVDResult or WhitenedSVD
    rank: int | None = None
    note: str = ""

    @property
    def kind(self) -> str:
        return self.rule.kind

    @property
    def shape(self) -> tuple:
        return tuple(self.matrix.shape)

    @property
    def max_useful_rank(self) -> int:
        m, n = self.shape
        # the largest k with (m + n) k < m n
        return min(m, n, (m * n - 1) // (m + n))

    def input_rows(self, x) -> np.ndarray:
        """The layer's inputs `x` as rows of the matricized weight's `m` features."""
        if self.factorization is not None:
            return self.factorization.input_rows(x)
        return np.asarray(x).reshape(-1, self.shape[0])


def as_filter(value, name) -> Callable | None:
    """`value` (a regular expression on `layer.path`, a layer class, a callable
    `layer -> bool`, or a list of them) as one predicate, or `None`."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    predicates = []
    for p in items:
        if isinstance(p, str):
            try:
                pattern = re.compile(p)
            except re.error as e:
                raise invalid_value(name, f"valid regular expressions ({e})", p) from None
            predicates.append(lambda layer, _p=pattern: bool(_p.search(layer.path or layer.name)))
        elif isinstance(p, type):
            predicates.append(lambda layer, _c=p: isinstance(layer, _c))
        elif callable(p):
            predicates.append(lambda layer, _f=p: bool(_f(layer)))
        else:
            raise invalid_type(
                name,
                "a regular expression on `layer.path`, a layer class, a "
                "callable `layer -> bool`, or a list of them",
                value,
            )
    return lambda layer: any(f(layer) for f in predicates)


def selection(filters=None, include=None, exclude=None) -> Callable:
    """One predicate for `factorize`'s `filters`, `include` and `exclude`."""
    keep = [
        f for f in (as_filter(filters, "filters"), as_filter(include, "include")) if f is not None
    ]
    drop = as_filter(exclude, "exclude")
    return lambda layer: all(f(layer) for f in keep) and not (drop and drop(layer))


def why_kept(parent, step, decision):
    """Why a candidate cannot be replaced, in the words of the report, or `None`.

    Args:
        parent: the layer holding it (see `walk.walk`).
        step: how `parent` holds it.
        decision: the registry's `Decision` for it.
    """
    if decision.rule is None:
        return decision.reason if decision.reason.startswith("kept") else f"kept: {decision.reason}"
    if step[0] == "layer" and not _keras_compat.is_plain_graph_model(parent):
        # Rebuilding the graph of e.g. a KerasHub backbone would turn it into
        # a plain functional model, losing its class.
        return f"kept: in the graph of a {type(parent).__name__}, which builds its graph itself"
    return None


_why_kept = why_kept  # the name `spectrum.kept_reason` used first


def find_targets(copy, original, selected):
    """`(targets, skipped)`: the layers of `copy` to factorize, and the
    `(layer, reason)` of selected candidates that are kept."""
    original_layers = {path: layer for _, _, layer, path in walk.walk(original)}
    targets, skipped = [], []
    for parent, step, layer, path in walk.walk(copy):
        decision = registry.lookup(layer)
        if (decision.rule is None and decision.reason is None) or not selected(layer):
            continue
        why = why_kept(parent, step, decision)
        if why is not None:
            skipped.append((layer, why))
            continue
        rule = decision.rule
        bias = rule.bias(layer)
        factorization = EinsumFactorization(layer.equation) if rule.kind == "einsum" else None
        targets.append(
            Target(
                path,
                layer,
                original_layers[path],
                rule,
                np.asarray(rule.matrix(layer), np.float32),
                None if bias is None else np.asarray(bias),
                factorization,
            )
        )
    return targets, skipped
