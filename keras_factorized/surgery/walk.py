"""The one model walker: every layer reachable from a model, and how to reach it.

`keras.Model.layers` lists only a model's direct children and
`keras.models.clone_model` only rebuilds graphs; the layers a Transformer
block keeps in its attributes (`TransformerEncoder -> MultiHeadAttention ->
EinsumDense`) are reached by neither. `walk` reaches them all, each once.

A path is a tuple of steps from the root: `("layer", name)` for a layer of a
Sequential/functional graph, `("attr", name)` for an attribute and
`("item", name, index)` for an element of a list attribute. `navigate`,
`get_child` and `set_child` follow and edit such paths.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras

from keras_factorized import _keras_compat

# Attributes of a layer that track its sub-layers (not owners of them).
_TRACKING_ATTRS = frozenset(
    {
        "_layers",
        "_operations",
        "_tracker",
        "_inbound_nodes",
        "_outbound_nodes",
        "_functional",
        "_self_setattr_tracking",
        "_nodes_by_depth",
        "_input_layers",
        "_output_layers",
        "_trainable_variables",
        "_non_trainable_variables",
    }
)


def children(layer) -> Iterator[tuple]:
    """`(step, child)` for the direct sub-layers of `layer`, each once."""
    seen = set()
    if isinstance(layer, keras.Model) and _keras_compat.is_graph_model(layer):
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


def walk(root) -> Iterator[tuple]:
    """`(parent, step, layer, path)` for every layer reachable from `root`.

    Each layer comes once (a shared layer under its first owner), depth first
    in model order; `path` is the tuple of steps from `root` to `layer`.
    """
    seen = {id(root)}

    def visit(parent, path):
        for step, child in list(children(parent)):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = path + (step,)
            yield parent, step, child, child_path
            yield from visit(child, child_path)

    yield from visit(root, ())


def walk_layers(model) -> Iterator[tuple]:
    """`(path, layer)` for every layer reachable from `model`, each once.

    `path` is the layer's `layer.path` (what `factorize`'s `include`,
    `exclude` and `filters` match and its report lists); for a layer without
    one (Keras gives a path only to layers with weights: an `InputLayer`, a
    `Dropout`), its parent's path and its name. Unlike `model.layers`, this
    reaches layers held in attributes of other layers.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")],
    ...                          name="mlp")
    >>> [(path, type(layer).__name__) for path, layer in walk_layers(model)]
    [('mlp/d', 'Dense')]
    """
    paths = {}
    for parent, _, layer, _ in walk(model):
        path = layer.path
        if not path:
            prefix = paths.get(id(parent))
            path = f"{prefix}/{layer.name}" if prefix else layer.name
        paths[id(layer)] = path
        yield path, layer


def get_child(parent, step):
    """The sub-layer of `parent` at one `step`."""
    if step[0] == "layer":
        return parent.get_layer(step[1])
    if step[0] == "attr":
        return getattr(parent, step[1])
    return getattr(parent, step[1])[step[2]]


def navigate(root, path):
    """The layer at `path` (a tuple of steps) below `root`."""
    layer = root
    for step in path:
        layer = get_child(layer, step)
    return layer


def set_child(parent, step, new) -> None:
    """Replaces a sub-layer held by an attribute (or list item) of `parent`."""
    old = get_child(parent, step)
    if getattr(old, "path", None) is not None:
        _keras_compat.set_layer_path(new, old.path)  # unique paths, as if built there
    with _keras_compat.unlocked_tracker(parent):
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
