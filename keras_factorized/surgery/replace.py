"""Putting new layers into a model: graphs are rebuilt, attributes replaced.

A layer of a Sequential/functional graph is replaced by rebuilding that
graph (`keras.models.clone_model` with the other layers shared); a layer held
by an attribute of another layer (an attention projection) is replaced in
place. The attribute replacements are returned as a *plan*, because the
model's config does not describe them (`saving` records and re-applies it).
"""

from __future__ import annotations

import keras

from keras_factorized import _keras_compat
from keras_factorized.surgery import walk


def apply_replacements(root, replacements, record=True):
    """Puts `replacements` (`{path: new_layer}`) into `root` (a model we own).

    Returns `(new_root, plan)`: `plan` lists the replacements made by
    attribute (empty with `record=False`).
    """
    plan = []
    # Deepest first, so that a rebuilt graph already holds its new children.
    by_parent = {}
    for path, new in replacements.items():
        by_parent.setdefault(path[:-1], []).append((path[-1], new))
    for parent_path in sorted(by_parent, key=len, reverse=True):
        parent = walk.navigate(root, parent_path)
        graph_steps = {s[1]: new for s, new in by_parent[parent_path] if s[0] == "layer"}
        for step, new in by_parent[parent_path]:
            if step[0] != "layer":
                walk.set_child(parent, step, new)
                if record:
                    plan.append(
                        {
                            "path": [list(s) for s in parent_path + (step,)],
                            "layer": keras.saving.serialize_keras_object(new),
                        }
                    )
        if not graph_steps:
            continue
        rebuilt = rebuild_graph(parent, graph_steps)
        if not parent_path:
            root = rebuilt
        elif rebuilt is not parent:
            # The parent itself changes in its own parent.
            root, more = apply_replacements(root, {parent_path: rebuilt}, record)
            plan.extend(more)
    return root, plan


def rebuild_graph(model, new_layers):
    """`model` (Sequential or functional) with the layers named in `new_layers`
    replaced, the other layers shared."""
    if isinstance(model, keras.Sequential):
        layers = _keras_compat.sequential_layers(model)
        for i, layer in enumerate(list(layers)):
            if layer.name in new_layers:
                layers[i] = new_layers[layer.name]
        _keras_compat.rebuild_sequential(model)
        return model
    return keras.models.clone_model(
        model, clone_function=lambda layer: new_layers.get(layer.name, layer)
    )
