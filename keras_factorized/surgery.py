"""`factorize`: replace the weight matrices of a trained Keras model by low-rank factors.

One call turns a trained model (Sequential, functional, subclassed functional
such as a KerasHub backbone, with layers nested inside layers) into a copy whose
`Dense`, `EinsumDense` and `Embedding` layers are `LowRankDense`,
`LowRankEinsumDense` and `FactorizedEmbedding` initialised from the trained
weights. The original model is left untouched.

How the copy is made: the model is deep-copied through its config
(`serialize_keras_object` / `deserialize_keras_object`) and its weights; every
layer reachable from it (through `model.layers` and through the attributes of
layers that hold layers, e.g. `TransformerEncoder -> MultiHeadAttention ->
EinsumDense`, which `keras.models.clone_model` does not reach) is walked, and
the selected ones are replaced: inside `Sequential`/functional graphs by
rebuilding the graph, inside other layers by replacing the attribute. Layers
that a parent rebuilds from its own config (a KerasHub `TransformerEncoder`
builds its attention layer from `num_heads`...) would come back dense when the
model is loaded, so the copy records those replacements in its config (the
model's class becomes a thin registered subclass of the original class, still
an instance of it); `keras.saving.load_model` re-applies them before loading
the weights.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import tempfile
from typing import Any, Sequence

import keras
import numpy as np

from keras_factorized import data_aware
from keras_factorized.decomposition import rank_for_energy, truncated_svd
from keras_factorized.layers.low_rank_einsum_dense import (
    EinsumFactorization,
    LowRankEinsumDense,
)

METHODS = ("svd", "whitened", "learned")
ALLOCATIONS = ("greedy", "uniform")

# Attributes of a layer that track its sub-layers (not owners of them).
_TRACKING_ATTRS = frozenset({
    "_layers", "_operations", "_tracker", "_inbound_nodes", "_outbound_nodes",
    "_functional", "_self_setattr_tracking", "_nodes_by_depth", "_input_layers",
    "_output_layers", "_trainable_variables", "_non_trainable_variables",
})


def _invalid(name, expected, value):
    return ValueError(
        f"Received an invalid value for `{name}`, expected {expected}. "
        f"Received: {name}={value!r}"
    )


# ---------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class LayerFactorization:
    """What `factorize` did to one layer.

    Attributes:
        path: the layer's `layer.path`, e.g.
            `"transformer_layer_0/self_attention_layer/query"`.
        layer_class: class name of the original layer.
        shape: `(m, n)` of the matricized weight (contracted x output features).
        rank: the rank kept, or `None` when the layer was left as it is.
        params_before: weights of the original layer (kernel and bias).
        params_after: weights of the layer in the new model.
        weight_error: relative Frobenius error `||W - A B|| / ||W||`.
        output_error: relative error of the layer's outputs on the calibration
            data, `||Y' - Y|| / ||Y||` (`None` without calibration data).
        replacement: class name of the new layer, or `None` when kept.
        note: why a layer was kept, or how it was factorized.
    """

    path: str
    layer_class: str
    shape: tuple
    rank: int | None
    params_before: int
    params_after: int
    weight_error: float = 0.0
    output_error: float | None = None
    replacement: str | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FactorizationReport:
    """The per-layer outcome of `factorize`, as a table (`str(report)`) or a dict.

    Attributes:
        method: the method used.
        layers: one `LayerFactorization` per selected layer.
        notes: model-wide notes (e.g. the distillation loss).
    """

    method: str
    layers: list
    notes: list = dataclasses.field(default_factory=list)

    @property
    def factorized(self) -> list:
        """The layers that were replaced."""
        return [r for r in self.layers if r.rank is not None]

    @property
    def params_before(self) -> int:
        """Weights of the selected layers before factorization."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        """Weights of the selected layers after factorization."""
        return sum(r.params_after for r in self.layers)

    @property
    def param_ratio(self) -> float:
        """`params_after / params_before` over the selected layers."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_ratio": self.param_ratio,
            "layers": [r.to_dict() for r in self.layers],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """The report as a Markdown table."""
        return self._table(markdown=True)

    def _table(self, markdown=False) -> str:
        headers = ["layer", "class", "shape", "rank", "params before", "params after",
                   "weight err", "output err", "note"]
        rows = []
        for r in self.layers:
            rows.append([
                r.path, r.layer_class, "x".join(str(d) for d in r.shape),
                "-" if r.rank is None else str(r.rank), f"{r.params_before:,}",
                f"{r.params_after:,}", f"{r.weight_error:.3f}",
                "-" if r.output_error is None else f"{r.output_error:.3f}", r.note,
            ])
        rows.append(["total", "", "", "", f"{self.params_before:,}",
                     f"{self.params_after:,}", "", "", f"ratio {self.param_ratio:.3f}"])
        if markdown:
            lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            lines = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
            lines += [fmt.format(*row) for row in rows]
        text = "\n".join(lines)
        if self.notes:
            text += "\n" + "\n".join(self.notes)
        return f"Factorization ({self.method}):\n{text}"

    def __str__(self) -> str:
        return self._table()


# ---------------------------------------------------------------------------
# Walking a model


def _children(layer):
    """`(step, child)` for the direct sub-layers of `layer`.

    A step is `("layer", name)` for a layer of a Sequential/functional graph,
    `("attr", name)` for an attribute and `("item", name, index)` for an element
    of a list attribute.
    """
    seen = set()
    if isinstance(layer, keras.Model) and _is_graph(layer):
        for child in layer.layers:
            seen.add(id(child))
            yield ("layer", child.name), child
    for name, value in list(vars(layer).items()):
        if name in _TRACKING_ATTRS:
            continue
        if isinstance(value, keras.layers.Layer):
            if id(value) not in seen:
                seen.add(id(value))
                yield ("attr", name), value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer) and id(item) not in seen:
                    seen.add(id(item))
                    yield ("item", name, i), item


def _is_graph(model) -> bool:
    """Whether `model` runs a graph of layers (Sequential or functional)."""
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def _is_plain_graph(model) -> bool:
    """A Sequential or a functional model whose config is its graph, so that a
    rebuilt graph keeps its class (a subclass such as a KerasHub backbone
    rebuilds its graph from its own arguments instead)."""
    from keras.src.models.functional import Functional

    return type(model) in (keras.Sequential, Functional, keras.Model)


def _walk(root):
    """`(parent, step, layer, path)` for every layer reachable from `root`, each
    once (a shared layer under its first owner), depth first in model order."""
    seen = {id(root)}

    def visit(parent, path):
        for step, child in list(_children(parent)):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = path + (step,)
            yield parent, step, child, child_path
            yield from visit(child, child_path)

    yield from visit(root, ())


def _navigate(root, path):
    layer = root
    for step in path:
        layer = _get_child(layer, step)
    return layer


def _get_child(parent, step):
    if step[0] == "layer":
        return parent.get_layer(step[1])
    if step[0] == "attr":
        return getattr(parent, step[1])
    return getattr(parent, step[1])[step[2]]


def _set_child(parent, step, new):
    """Replaces a sub-layer held by attribute (or list item) of `parent`."""
    old = _get_child(parent, step)
    tracker = getattr(parent, "_tracker", None)
    locked = bool(tracker is not None and tracker.locked)
    if locked:
        tracker.unlock()
    try:
        if step[0] == "attr":
            setattr(parent, step[1], new)
        else:
            getattr(parent, step[1])[step[2]] = new
        layers = getattr(parent, "_layers", None)
        if layers is not None:
            for i, layer in enumerate(list(layers)):
                if layer is old:
                    del layers[i]
                    break
            if not any(layer is new for layer in layers):
                layers.append(new)
    finally:
        if locked:
            tracker.lock()


def _copy_model(model):
    """A deep copy of `model` (config and weights); the original is not touched."""
    config = keras.saving.serialize_keras_object(model)
    copy = keras.saving.deserialize_keras_object(config)
    weights = model.get_weights()
    copy_weights = copy.weights
    if len(weights) != len(copy_weights) or any(
        tuple(w.shape) != tuple(v.shape) for w, v in zip(weights, copy_weights)
    ):
        raise _invalid(
            "model", "a model that can be rebuilt from its config with the same "
            "weights (a registered class with a complete `get_config`)", model.name)
    copy.set_weights(weights)
    _copy_assets(model, copy)
    return copy


def _copy_assets(model, copy):
    """Copies the state weights do not hold (a `TextVectorization`'s vocabulary).

    The same `save_assets`/`load_assets` pair the `.keras` format uses; without
    it a copied lookup table is empty ("Table not initialized").
    """
    pairs = zip(model._flatten_layers(include_self=False), copy._flatten_layers(include_self=False))
    for source, target in pairs:
        if type(source) is not type(target) or not hasattr(source, "save_assets"):
            continue
        with tempfile.TemporaryDirectory() as folder:
            source.save_assets(folder)
            if os.listdir(folder):
                target.load_assets(folder)


# ---------------------------------------------------------------------------
# Candidates


@dataclasses.dataclass
class _Target:
    path: tuple
    layer: Any  # the layer in the copy
    original: Any  # the same layer in the original model
    kind: str  # "dense", "einsum", "embedding"
    matrix: np.ndarray
    bias: np.ndarray | None
    factorization: EinsumFactorization | None = None
    stats: data_aware.ActivationStatistics | None = None
    spectrum: Any = None  # SVDResult or WhitenedSVD
    rank: int | None = None
    note: str = ""

    @property
    def shape(self):
        return tuple(self.matrix.shape)

    @property
    def max_useful_rank(self):
        m, n = self.shape
        # the largest k with (m + n) k < m n
        return min(m, n, (m * n - 1) // (m + n))


def _kind(layer):
    if type(layer) is keras.layers.Dense:
        return "dense"
    if type(layer) is keras.layers.EinsumDense:
        return "einsum"
    if type(layer) is keras.layers.Embedding:
        return "embedding"
    return None


def _matches(layer, patterns) -> bool:
    for p in patterns:
        if isinstance(p, type):
            if isinstance(layer, p):
                return True
        elif re.search(p, layer.path):
            return True
    return False


def _as_patterns(value, name):
    if value is None:
        return None
    if isinstance(value, (str, type)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        value = [value]
    value = list(value)
    for p in value:
        if not isinstance(p, (str, type)):
            raise TypeError(
                f"Received an invalid value for `{name}`, expected a regular "
                "expression on `layer.path`, a layer class, or a list of them. "
                f"Received: {name}={value!r}")
        if isinstance(p, str):
            try:
                re.compile(p)
            except re.error as e:
                raise _invalid(name, f"valid regular expressions ({e})", p) from None
    return value


def _to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _find_targets(copy, original, include, exclude, skipped):
    original_layers = {path: layer for _, _, layer, path in _walk(original)}
    targets = []
    for parent, step, layer, path in _walk(copy):
        kind = _kind(layer)
        if kind is None:
            continue
        if include is not None and not _matches(layer, include):
            continue
        if exclude is not None and _matches(layer, exclude):
            continue
        if step[0] == "layer" and not _is_plain_graph(parent):
            # Rebuilding the graph of e.g. a KerasHub backbone would turn it into
            # a plain functional model, losing its class.
            skipped.append((layer, f"kept: in the graph of a {type(parent).__name__}, "
                                   "which builds its graph itself"))
            continue
        if not layer.built:
            skipped.append((layer, "kept: not built"))
            continue
        if getattr(layer, "quantization_mode", None) is not None:
            skipped.append((layer, "kept: quantized"))
            continue
        if getattr(layer, "lora_enabled", False):
            skipped.append((layer, "kept: LoRA enabled"))
            continue
        factorization = None
        if kind == "dense":
            matrix = _to_numpy(layer.kernel)
            bias = _to_numpy(layer.bias) if layer.use_bias else None
        elif kind == "einsum":
            try:
                factorization = EinsumFactorization(layer.equation)
            except ValueError:
                skipped.append((layer, "kept: kernel is a batch of matrices"))
                continue
            matrix = factorization.to_matrix(_to_numpy(layer.kernel))
            bias = None if layer.bias is None else _to_numpy(layer.bias)
        else:
            matrix = _to_numpy(layer.embeddings)
            bias = None
        targets.append(_Target(path, layer, original_layers[path], kind,
                               matrix.astype(np.float32), bias, factorization))
    return targets


# ---------------------------------------------------------------------------
# Calibration


def _batches(data, batch_size):
    """Model inputs, batch by batch, from an array, a dict/list of arrays or a
    `tf.data.Dataset` (of `x` or `(x, y[, sample_weight])`)."""
    if data is None:
        return
    if hasattr(data, "as_numpy_iterator"):
        for element in data.as_numpy_iterator():
            if isinstance(element, tuple) and len(element) in (2, 3):
                element = element[0]
            yield element
        return
    if isinstance(data, (list, tuple)) and data and hasattr(data[0], "as_numpy_iterator"):
        raise _invalid("calibration_data", "one dataset, array or dict", type(data))
    flat = keras.tree.flatten(data)
    if not flat:
        raise _invalid("calibration_data", "a non-empty array, dict of arrays or "
                       "tf.data.Dataset", data)
    n = len(flat[0])
    for start in range(0, n, batch_size):
        yield keras.tree.map_structure(lambda a: a[start:start + batch_size], data)


def _collect_statistics(model, targets, data, batch_size):
    """Runs `model` on the calibration data and accumulates the input statistics
    of every target (in the original model) by wrapping its `call`."""
    wrapped = []
    cache = {}
    for t in targets:
        if t.kind == "embedding":
            continue
        t.stats = data_aware.ActivationStatistics(t.shape[0])
        layer = t.original
        original_call = layer.call

        def call(inputs, *args, _t=t, _call=original_call, **kwargs):
            key = (id(inputs), _t.shape[0], _t.factorization.equation
                   if _t.factorization else None)
            if key not in cache:
                x = _to_numpy(inputs)
                rows = (_t.factorization.input_rows(x) if _t.factorization
                        else x.reshape(-1, _t.shape[0])).astype(np.float32)
                cache[key] = (rows.T @ rows, rows.sum(0, dtype=np.float64), rows.shape[0])
            gram, total, count = cache[key]
            _t.stats.gram += gram
            _t.stats.sum += total
            _t.stats.count += count
            return _call(inputs, *args, **kwargs)

        layer.call = call
        wrapped.append(layer)
    seen = 0
    try:
        for batch in _batches(data, batch_size):
            cache.clear()
            model(batch, training=False)
            seen += 1
    finally:
        for layer in wrapped:
            del layer.call
        cache.clear()
    if seen == 0:
        raise _invalid("calibration_data", "at least one batch", data)


# ---------------------------------------------------------------------------
# Ranks


def _corrects_bias(t, bias_correction):
    return bool(bias_correction and t.bias is not None and t.bias.size == t.shape[1])


def _spectrum(t, method, damping, bias_correction):
    if method != "svd" and t.stats is not None:
        # With a bias to absorb the mean error, only the centred part of the
        # inputs needs the rank.
        return data_aware.whitened_svd(t.matrix, t.stats, damping=damping,
                                       center=_corrects_bias(t, bias_correction))
    return truncated_svd(t.matrix, min(t.shape), method="lapack")


def _choose_ranks(targets, rank, energy, param_ratio, allocation):
    usable = []
    for t in targets:
        if t.max_useful_rank < 1:
            t.note = "kept: factors would not save parameters"
            continue
        usable.append(t)
    if rank is not None:
        for t in usable:
            if rank > t.max_useful_rank:
                t.note = (f"kept: rank {rank} would not save parameters "
                          f"(at most {t.max_useful_rank})")
            else:
                t.rank = rank
    elif energy is not None:
        for t in usable:
            s = np.asarray(t.spectrum.s, np.float64)
            total = getattr(t.spectrum, "frobenius_norm_sq", None)
            k = min(rank_for_energy(s, energy, total), min(t.shape))
            if k > t.max_useful_rank:
                t.note = f"kept: energy {energy} needs rank {k}, which saves nothing"
            else:
                t.rank = k
    else:
        if not usable:
            return
        if allocation == "uniform":
            for t in usable:
                m, n = t.shape
                t.rank = max(1, min(t.max_useful_rank,
                                    int(math.floor(param_ratio * m * n / (m + n)))))
            return
        # The budget counts the biases, which factorization keeps as they are.
        biases = sum(0 if t.bias is None else t.bias.size for t in usable)
        budget = param_ratio * sum(t.shape[0] * t.shape[1] for t in usable) \
            - (1 - param_ratio) * biases
        gains = []
        for t in usable:
            sq = np.square(np.asarray(t.spectrum.s, np.float64))
            total = float(getattr(t.spectrum, "frobenius_norm_sq", 0.0) or sq.sum())
            # Relative squared error, so that layers of different scales compete
            # on equal terms.
            gains.append(sq / total if total > 0 else sq)
        ranks = data_aware.allocate_ranks(
            gains, [sum(t.shape) for t in usable], budget, min_rank=1,
            max_ranks=[t.max_useful_rank for t in usable])
        for t, k in zip(usable, ranks):
            t.rank = k


# ---------------------------------------------------------------------------
# Building the replacements


def _factors(t, split):
    if isinstance(t.spectrum, data_aware.WhitenedSVD):
        return t.spectrum.factors(t.rank, split)
    s = t.spectrum
    from keras_factorized.decomposition import split_singular_values

    return split_singular_values(s.u[:, :t.rank], s.s[:t.rank], s.vt[:t.rank], split)


def _replacement(t, a, b, bias):
    from keras_factorized.layers import FactorizedEmbedding, LowRankDense

    layer = t.layer
    if t.kind == "dense":
        new = LowRankDense(
            layer.units, t.rank, activation=layer.activation, use_bias=layer.use_bias,
            bias_initializer=layer.bias_initializer,
            bias_regularizer=layer.bias_regularizer,
            activity_regularizer=layer.activity_regularizer,
            bias_constraint=layer.bias_constraint, name=layer.name,
            dtype=layer.dtype_policy)
        new.build((None, t.shape[0]))
        new.set_factors(a, b, bias)
        return new
    if t.kind == "einsum":
        return LowRankEinsumDense.from_factors(
            layer.equation, layer.partial_output_shape, a, b, bias,
            kernel_shape=tuple(layer.kernel.shape), activation=layer.activation,
            bias_axes=layer.bias_axes, bias_initializer=layer.bias_initializer,
            bias_regularizer=layer.bias_regularizer,
            activity_regularizer=layer.activity_regularizer,
            bias_constraint=layer.bias_constraint, name=layer.name,
            dtype=layer.dtype_policy)
    new = FactorizedEmbedding(
        layer.input_dim, layer.output_dim, t.rank, mask_zero=layer.mask_zero,
        activity_regularizer=layer.activity_regularizer, name=layer.name,
        dtype=layer.dtype_policy)
    new.build()
    new.set_factors(a, b)
    return new


def _build_shape(layer):
    shapes = getattr(layer, "_build_shapes_dict", None)
    if shapes:
        return keras.tree.map_structure(lambda d: d, next(iter(shapes.values())))
    return None


# ---------------------------------------------------------------------------
# Replacing layers in the copy


def _apply_replacements(root, replacements):
    """Puts `replacements` (`{path: new_layer}`) into `root` (a model we own).

    Returns `(new_root, plan)`: `plan` lists the replacements made by attribute,
    which the model's config does not describe.
    """
    plan = []
    # Deepest first, so that a rebuilt graph already holds its new children.
    by_parent = {}
    for path, new in replacements.items():
        by_parent.setdefault(path[:-1], []).append((path[-1], new))
    for parent_path in sorted(by_parent, key=len, reverse=True):
        parent = _navigate(root, parent_path)
        graph_steps = {s[1]: new for s, new in by_parent[parent_path] if s[0] == "layer"}
        for step, new in by_parent[parent_path]:
            if step[0] != "layer":
                _set_child(parent, step, new)
                plan.append({
                    "path": [list(s) for s in parent_path + (step,)],
                    "layer": keras.saving.serialize_keras_object(new),
                })
        if graph_steps:
            rebuilt = _rebuild_graph(parent, graph_steps)
            if parent_path:
                replacements_up = {parent_path: rebuilt}
                if rebuilt is not parent:
                    # The parent itself changes in its own parent.
                    new_root, more = _apply_replacements(root, replacements_up)
                    root = new_root
                    plan.extend(more)
            else:
                root = rebuilt
    return root, plan


def _rebuild_graph(model, new_layers):
    """`model` (Sequential or functional) with the layers named in `new_layers`
    replaced, the other layers shared."""
    if isinstance(model, keras.Sequential):
        layers = model._layers
        for i, layer in enumerate(list(layers)):
            if layer.name in new_layers:
                layers[i] = new_layers[layer.name]
        model._maybe_rebuild()
        return model
    return keras.models.clone_model(
        model, clone_function=lambda layer: new_layers.get(layer.name, layer))


# Registered loader for models that carry a replacement plan -----------------

_PLAN_KEY = "keras_factorized_plan"
_DYNAMIC_CLASSES: dict = {}


def _factorized_class(base):
    """A subclass of `base` whose config also records the replacements."""
    if base in _DYNAMIC_CLASSES.values() or getattr(base, "_kf_base", None):
        base = base._kf_base
    if base in _DYNAMIC_CLASSES:
        return _DYNAMIC_CLASSES[base]

    def get_config(self):
        return {
            "base": _class_reference(base),
            "config": base.get_config(self),
            _PLAN_KEY: self._kf_plan,
        }

    cls = type(base.__name__, (base,), {
        "get_config": get_config,
        "from_config": classmethod(lambda c, config: FactorizedModelLoader.from_config(config)),
        "_kf_base": base,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    })
    from keras.src.saving import object_registration

    object_registration.GLOBAL_CUSTOM_NAMES[cls] = "keras_factorized>FactorizedModel"
    _DYNAMIC_CLASSES[base] = cls
    return cls


def _class_reference(cls):
    from keras.src.saving import object_registration

    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "registered_name": object_registration.get_registered_name(cls),
    }


@keras.saving.register_keras_serializable(package="keras_factorized",
                                          name="FactorizedModel")
class FactorizedModelLoader:
    """Rebuilds a model saved by `factorize` whose nested layers were replaced.

    Never instantiated: the saved config names it, and its `from_config` builds
    the original class from its own config, re-applies the recorded
    replacements, and returns the model (an instance of the original class).
    """

    def get_config(self):  # pragma: no cover - never instantiated
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        base_ref = config["base"]
        base = keras.saving.get_registered_object(base_ref["registered_name"])
        if base is None:
            import importlib

            base = getattr(importlib.import_module(base_ref["module"]),
                           base_ref["class_name"])
        model = base.from_config(config["config"])
        _reapply_plan(model, config[_PLAN_KEY])
        return model


def _reapply_plan(model, plan):
    for entry in plan:
        path = tuple(tuple(s) for s in entry["path"])
        parent = _navigate(model, path[:-1])
        new = keras.saving.deserialize_keras_object(entry["layer"])
        old = _get_child(parent, path[-1])
        shape = _build_shape(old)
        if not new.built:
            if isinstance(new, LowRankEinsumDense):
                new.build(new._factorization.input_shape(tuple(old.kernel.shape)))
            elif shape is not None:
                new.build(shape)
            elif hasattr(old, "kernel"):
                new.build((None, int(old.kernel.shape[0])))
            else:
                new.build()
        _set_child(parent, path[-1], new)
    _attach_plan(model, plan)


def _attach_plan(model, plan):
    if not plan:
        return
    model.__class__ = _factorized_class(type(model))
    existing = list(getattr(model, "_kf_plan", None) or [])
    object.__setattr__(model, "_kf_plan", existing + list(plan))


# ---------------------------------------------------------------------------
# Distillation (the end-to-end step of `method="learned"`)


def _select_outputs(outputs, selection):
    """The outputs to distil: all (flattened), or the given dict keys / indices."""
    if selection is None:
        return keras.tree.flatten(outputs)
    if isinstance(outputs, dict):
        return [outputs[k] for k in selection]
    flat = keras.tree.flatten(outputs)
    return [flat[i] for i in selection]


class _Distiller(keras.Model):
    def __init__(self, student, selection, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.selection = selection

    def call(self, inputs):
        return _select_outputs(self.student(inputs, training=False), self.selection)


def _distill(student, teacher, data, batch_size, epochs, learning_rate, trainable_paths,
             verbose, selection=None, loss="mse", train_all=False):
    """Trains the factor layers of `student` to reproduce `teacher`'s outputs."""
    batches = list(_batches(data, batch_size))
    targets = [[_to_numpy(y) for y in _select_outputs(teacher(x, training=False), selection)]
               for x in batches]
    layers = [layer for _, _, layer, _ in _walk(student)]
    saved = [(layer, layer.trainable) for layer in layers]
    trainable_ids = {id(layer) for layer in trainable_paths}
    try:
        for layer in [] if train_all else layers:
            if getattr(layer, "_layers", None):
                continue  # containers follow their leaves
            layer.trainable = id(layer) in trainable_ids
        distiller = _Distiller(student, selection, name="distiller")
        steps = max(1, epochs * len(batches))
        # Warm-up then cosine decay: a constant rate large enough to help later
        # first knocks the SVD-initialised factors off their good start.
        warmup = max(1, steps // 10)
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=max(1, steps - warmup), warmup_target=learning_rate,
            warmup_steps=warmup)
        distiller.compile(optimizer=keras.optimizers.Adam(schedule),
                          loss=[loss] * len(targets[0]))
        history = []
        progbar = keras.utils.Progbar(epochs * len(batches), verbose=verbose)
        rng = np.random.default_rng(0)
        for _ in range(epochs):
            losses = []
            for i in rng.permutation(len(batches)):
                x, y = batches[i], targets[i]
                out = distiller.train_on_batch(x, y)
                loss = float(np.ravel(out)[0])
                losses.append(loss)
                progbar.add(1, [("loss", loss)])
            history.append(float(np.mean(losses)))
    finally:
        for layer, trainable in saved:
            layer.trainable = trainable
    return history


# ---------------------------------------------------------------------------
# The public function


def factorize(
    model: keras.Model,
    rank: int | None = None,
    *,
    energy: float | None = None,
    param_ratio: float | None = None,
    method: str = "svd",
    calibration_data=None,
    include=None,
    exclude=None,
    allocation: str = "greedy",
    damping: float = 0.01,
    bias_correction: bool = False,
    split: str = "balanced",
    batch_size: int = 32,
    distillation_data=None,
    distillation_epochs: int = 2,
    distillation_outputs: Sequence | None = None,
    distillation_loss="mse",
    distillation_trainable: str = "factors",
    learning_rate: float = 1e-4,
    verbose: int = 0,
) -> keras.Model:
    """Replaces a trained model's weight matrices by low-rank factors.

    Returns a copy of `model` in which every selected `keras.layers.Dense`,
    `keras.layers.EinsumDense` and `keras.layers.Embedding` (at any depth:
    inside nested models and inside layers that hold layers, such as the
    attention projections of a KerasHub `TransformerEncoder`) is replaced by a
    `LowRankDense`, `LowRankEinsumDense` or `FactorizedEmbedding` initialised
    from its trained weights. The original model is left untouched. The copy is
    an ordinary model of the same class: it trains with `fit`, saves to
    `.keras` and loads back with `keras.saving.load_model`, and exports.

    The report of what was done is `new_model.factorization_report`
    (a `FactorizationReport`: `print` it for a table, `.to_dict()` for data).

    Layers directly in the graph of a model subclass that builds its own graph
    (e.g. a KerasHub backbone's `pooled_dense`) are kept, and the report says
    so: rebuilding that graph would turn the model into a plain functional one.

    Choose the ranks with exactly one of `rank`, `energy` or `param_ratio`.
    Layers whose factors at that rank would not hold fewer weights than the
    original are kept as they are (and the report says so).

    Methods:

    - `"svd"`: truncated SVD of each weight matrix (`min ||W - A B||`).
    - `"whitened"`: activation-aware SVD on `calibration_data`: minimises the
      error of each layer's outputs `||X W - X A B||` for the inputs `X` the layer
      sees (whiten by a Cholesky factor of `X^T X`, SVD, un-whiten; SVD-LLM).
      Embeddings use plain SVD.
    - `"learned"`: start from `"whitened"` (or `"svd"` without calibration data),
      then train the factors by gradient descent so that the whole model
      reproduces the original model's outputs (distillation on
      `distillation_data`, unlabelled, default `calibration_data`). Per layer,
      the whitened factors already minimise the layer's output error on the
      calibration inputs, so the end-to-end objective is where training helps.

    Args:
        model: a built Keras model (Sequential, functional, or a registered
            subclass with a complete `get_config`, e.g. a KerasHub backbone).
        rank: one rank for every selected layer.
        energy: keep, per layer, the fewest singular values whose squares reach
            this fraction of the total (of the whitened spectrum for
            `"whitened"`/`"learned"`), in `(0, 1]`.
        param_ratio: one parameter budget for all selected layers together, a
            fraction in `(0, 1]` of their weights; see `allocation`.
        method: `"svd"`, `"whitened"` or `"learned"`.
        calibration_data: inputs of the model (an array, a dict or list of
            arrays, or a `tf.data.Dataset` of batches of `x` or `(x, y)`);
            needed by `"whitened"`; with it the report also gives each layer's
            relative output error on these inputs.
        include: regular expression(s) on `layer.path` (e.g.
            `r"self_attention_layer/(query|key|value)$"`) or layer class(es);
            only matching layers are factorized. Default: all.
        exclude: regular expression(s) or class(es) of layers to leave alone.
        allocation: with `param_ratio`: `"greedy"` spends the budget across
            layers where it removes the most (relative, squared) error per
            parameter, using the singular values (whitened ones with
            calibration data); `"uniform"` gives every layer the same ratio.
        damping: added to the diagonal of `X^T X`, as a fraction of its mean.
        bias_correction: for `"whitened"`/`"learned"` layers with a bias, fit
            the factors to the centred inputs and move the mean output error
            into the bias (`b' = b + mean(X) (W - A B)`): the optimum of each
            layer's output error over factors and bias together. Off by
            default: on MiniLM it lowered the layer errors but made the
            end-to-end embeddings worse (cosine 0.949 -> 0.924 for Q/K/V).
        split: how singular values are shared between `A` and `B`.
        batch_size: batch size to run array calibration/distillation data.
        distillation_data: unlabelled model inputs for `"learned"`.
        distillation_epochs: passes over `distillation_data`.
        distillation_outputs: the outputs to reproduce (keys of a dict output,
            e.g. `["sequence_output"]`, or indices); default all of them.
        distillation_loss: the Keras loss between the new and the original
            outputs (`"mse"`, `"cosine_similarity"`, a `keras.losses.Loss`).
        distillation_trainable: `"factors"` trains only the new layers;
            `"all"` also the layers that were kept (normalizations, ...).
        learning_rate: peak Adam learning rate of the distillation (linear
            warm-up over the first 10% of the steps, then cosine decay).
        verbose: 1 shows the distillation progress.

    Returns:
        The factorized copy of `model`, with `factorization_report`.

    Example:

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64),
    ...                           keras.layers.Dense(2)])
    >>> small = factorize(model, rank=8)
    >>> [type(l).__name__ for l in small.layers]
    ['LowRankDense', 'Dense']
    >>> small.factorization_report.layers[1].note
    'kept: rank 8 would not save parameters (at most 1)'
    """
    from keras_factorized.decomposition import check_rank_arguments

    check_rank_arguments(rank, energy, param_ratio)
    if rank is not None and (not isinstance(rank, numbers.Integral)
                             or isinstance(rank, bool) or rank < 1):
        raise _invalid("rank", "an integer >= 1", rank)
    if energy is not None and (not isinstance(energy, numbers.Real) or not 0 < energy <= 1):
        raise _invalid("energy", "a number in (0, 1]", energy)
    if param_ratio is not None and (not isinstance(param_ratio, numbers.Real)
                                    or not 0 < param_ratio <= 1):
        raise _invalid("param_ratio", "a number in (0, 1]", param_ratio)
    if distillation_trainable not in ("factors", "all"):
        raise _invalid("distillation_trainable", "'factors' or 'all'",
                       distillation_trainable)
    if method not in METHODS:
        raise _invalid("method", f"one of {METHODS}", method)
    if allocation not in ALLOCATIONS:
        raise _invalid("allocation", f"one of {ALLOCATIONS}", allocation)
    if method == "whitened" and calibration_data is None:
        raise _invalid("calibration_data", "model inputs for method='whitened'", None)
    if method == "learned" and calibration_data is None and distillation_data is None:
        raise _invalid("distillation_data",
                       "model inputs (or `calibration_data`) for method='learned'", None)
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise _invalid("model", "a built Keras model (call it once or build it)", model)
    include = _as_patterns(include, "include")
    exclude = _as_patterns(exclude, "exclude")

    copy = _copy_model(model)
    skipped = []
    targets = _find_targets(copy, model, include, exclude, skipped)
    if calibration_data is not None:
        _collect_statistics(model, targets, calibration_data, batch_size)
    for t in targets:
        t.spectrum = _spectrum(t, method, damping, bias_correction)
    _choose_ranks(targets, rank, energy, param_ratio, allocation)

    replacements = {}
    rows = []
    for t in targets:
        params_before = t.shape[0] * t.shape[1] + (0 if t.bias is None else t.bias.size)
        row = LayerFactorization(
            path=t.layer.path, layer_class=type(t.layer).__name__, shape=t.shape,
            rank=t.rank, params_before=params_before, params_after=params_before,
            note=t.note)
        if t.rank is not None:
            a, b = _factors(t, split)
            approx = a.astype(np.float64) @ b.astype(np.float64)
            bias = t.bias
            if isinstance(t.spectrum, data_aware.WhitenedSVD) and _corrects_bias(
                    t, bias_correction):
                bias = data_aware.corrected_bias(
                    t.stats, t.matrix, approx, t.bias.reshape(-1)
                ).reshape(t.bias.shape).astype(t.bias.dtype)
            new = _replacement(t, a, b, bias)
            replacements[t.path] = new
            row.params_after = sum(int(np.prod(w.shape)) for w in new.weights)
            row.replacement = type(new).__name__
            norm = np.linalg.norm(t.matrix)
            row.weight_error = float(np.linalg.norm(t.matrix - approx) / norm) if norm else 0.0
            if t.stats is not None:
                row.output_error = data_aware.relative_output_error(
                    t.stats, t.matrix, approx, t.bias, bias)
            spectrum_kind = ("whitened" if isinstance(t.spectrum, data_aware.WhitenedSVD)
                             else "svd")
            row.note = spectrum_kind
        rows.append(row)
    for layer, why in skipped:
        shape = tuple(layer.kernel.shape) if hasattr(layer, "kernel") else ()
        n = sum(int(np.prod(w.shape)) for w in layer.weights)
        rows.append(LayerFactorization(layer.path, type(layer).__name__, shape, None,
                                       n, n, note=why))

    new_model, plan = _apply_replacements(copy, replacements)
    _attach_plan(new_model, plan)
    report = FactorizationReport(method=method, layers=rows)

    if method == "learned":
        data = distillation_data if distillation_data is not None else calibration_data
        new_layers = [_navigate(new_model, path) for path in replacements]
        history = _distill(new_model, model, data, batch_size, distillation_epochs,
                           learning_rate, new_layers, verbose, distillation_outputs,
                           distillation_loss, distillation_trainable == "all")
        report.notes.append(
            f"distillation loss ({distillation_loss} to the original outputs) per epoch: "
            + ", ".join(f"{h:.4g}" for h in history))
        if calibration_data is not None:
            _update_output_errors(report, targets, new_model, replacements)
    object.__setattr__(new_model, "factorization_report", report)
    return new_model


def _update_output_errors(report, targets, new_model, replacements):
    """Output and weight errors of the trained factors (on the original inputs)."""
    by_path = {r.path: r for r in report.layers}
    for t in targets:
        if t.path not in replacements or t.stats is None:
            continue
        layer = _navigate(new_model, t.path)
        kernel = _to_numpy(layer.kernel)
        if t.factorization is not None:
            kernel = t.factorization.to_matrix(kernel)
        bias = None if getattr(layer, "bias", None) is None else _to_numpy(layer.bias)
        row = by_path[t.layer.path]
        norm = np.linalg.norm(t.matrix)
        row.weight_error = float(np.linalg.norm(t.matrix - kernel) / norm) if norm else 0.0
        row.output_error = data_aware.relative_output_error(
            t.stats, t.matrix, kernel, t.bias, bias)
        row.note = "learned"
