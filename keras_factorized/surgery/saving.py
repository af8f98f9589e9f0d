"""Saving and loading models whose nested layers `factorize` replaced.

Layers that a parent rebuilds from its own config (a KerasHub
`TransformerEncoder` builds its attention layer from `num_heads`...) would
come back dense when the model is loaded. So a model with attribute
replacements gets a thin registered subclass of its own class (still an
instance of it) whose config also holds the replacement *plan*;
`FactorizedModelLoader.from_config` rebuilds the original class from its
config and re-applies the plan before the weights are loaded.
"""

from __future__ import annotations

import importlib
import re

import keras

from keras_factorized import _keras_compat
from keras_factorized.surgery import walk

PLAN_KEY = "keras_factorized_plan"
_DYNAMIC_CLASSES: dict = {}


def factorized_class(base):
    """A subclass of `base` whose config also records the replacements."""
    base = getattr(base, "_kf_base", None) or base
    if base in _DYNAMIC_CLASSES:
        return _DYNAMIC_CLASSES[base]

    def get_config(self):
        return {
            "base": class_reference(base),
            "config": base.get_config(self),
            PLAN_KEY: current_plan(self),
        }

    cls = type(
        base.__name__,
        (base,),
        {
            "get_config": get_config,
            "from_config": classmethod(lambda c, config: FactorizedModelLoader.from_config(config)),
            "_kf_base": base,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
        },
    )
    _keras_compat.set_registered_name(cls, "keras_factorized>FactorizedModel")
    _DYNAMIC_CLASSES[base] = cls
    return cls


def class_reference(cls) -> dict:
    """What `_resolve_class` needs to find `cls` again when loading."""
    return {
        "module": cls.__module__,
        "class_name": cls.__name__,
        "registered_name": _keras_compat.registered_name(cls),
    }


# Packages whose modules Keras's own deserializer imports to find a class
# (`keras.src.saving.serialization_lib._retrieve_class_or_fn`, Keras 3.10 to
# 3.15); any other class must be registered (or passed in `custom_objects`).
_ALLOWED_PACKAGES = frozenset({"keras", "keras_hub", "keras_cv", "keras_nlp"})
_DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _refuse(base_ref, reason: str) -> ValueError:
    return ValueError(
        f"Cannot load the factorized model's class: {reason}. Only classes "
        "registered with `keras.saving.register_keras_serializable` (or passed "
        "in `custom_objects`) and Keras layers of the packages "
        f"{sorted(_ALLOWED_PACKAGES)} are loaded; no other module is imported, "
        f"whatever `safe_mode` says. Received: base={base_ref!r}"
    )


def _resolve_class(config):
    """The model class named by a saved `class_reference` (`config["base"]`).

    Resolved like Keras's own deserializer does, never by importing the
    module a file names: first through Keras's registry (which includes any
    `custom_objects` of the current `load_model` call), then in Keras's own
    packages only. The class must be a `keras.layers.Layer` subclass (models
    are); anything else is refused with a `ValueError` naming it.
    """
    base_ref = config.get("base") if isinstance(config, dict) else None
    if not isinstance(base_ref, dict) or not all(
        isinstance(base_ref.get(key), str) for key in ("module", "class_name", "registered_name")
    ):
        raise _refuse(base_ref, "the saved config has no valid `base` class reference")
    module, class_name = base_ref["module"], base_ref["class_name"]
    where = f"class `{class_name}` of module `{module}`"
    base = keras.saving.get_registered_object(base_ref["registered_name"])
    if base is None:
        if not _DOTTED_NAME.match(module) or not class_name.isidentifier():
            raise _refuse(base_ref, f"{where} is not a valid class reference")
        if module.split(".", 1)[0] not in _ALLOWED_PACKAGES:
            raise _refuse(base_ref, f"{where} is neither registered nor part of Keras")
        try:
            base = vars(importlib.import_module(module)).get(class_name)
        except ImportError as e:
            raise _refuse(base_ref, f"{where} cannot be imported ({e})") from e
    if not (isinstance(base, type) and issubclass(base, keras.layers.Layer)):
        raise _refuse(base_ref, f"{where} is not a Keras layer or model class")
    return base


@keras.saving.register_keras_serializable(package="keras_factorized", name="FactorizedModel")
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
        model = _resolve_class(config).from_config(config["config"])
        reapply_plan(model, config[PLAN_KEY])
        return model


def _build_like(new, old) -> None:
    """Builds `new` for the inputs `old` was built for."""
    from keras_factorized.layers import LowRankEinsumDense
    from keras_factorized.layers.einsum_shapes import EinsumFactorization

    shape = _keras_compat.build_input_shape(old)
    if isinstance(new, LowRankEinsumDense):
        new.build(EinsumFactorization(new.equation).input_shape(tuple(old.kernel.shape)))
    elif shape is not None:
        new.build(shape)
    elif hasattr(old, "kernel"):
        new.build((None, int(old.kernel.shape[0])))
    else:
        new.build()


def reapply_plan(model, plan) -> None:
    """Replaces the layers listed in `plan` in a freshly built `model`."""
    for entry in plan:
        path = tuple(tuple(s) for s in entry["path"])
        parent = walk.navigate(model, path[:-1])
        new = keras.saving.deserialize_keras_object(entry["layer"])
        if not new.built:
            _build_like(new, walk.get_child(parent, path[-1]))
        walk.set_child(parent, path[-1], new)
    attach_plan(model, plan)


def current_plan(model) -> list:
    """`model`'s plan with each layer's config as it is now (e.g. quantized
    since `factorize`), so that loading rebuilds the layers that are saved."""
    plan = []
    for entry in model._kf_plan:
        path = tuple(tuple(s) for s in entry["path"])
        layer = walk.get_child(walk.navigate(model, path[:-1]), path[-1])
        plan.append({**entry, "layer": keras.saving.serialize_keras_object(layer)})
    return plan


def attach_plan(model, plan) -> None:
    """Makes `model` save `plan` with its config (adds to any plan it has)."""
    if not plan:
        return
    model.__class__ = factorized_class(type(model))
    existing = list(getattr(model, "_kf_plan", None) or [])
    object.__setattr__(model, "_kf_plan", existing + list(plan))


def drop_plan_entries(model, paths) -> None:
    """Forgets the plan entries at `paths` (their layers were merged back);
    with none left, `model` is an instance of its original class again."""
    plan = getattr(model, "_kf_plan", None)
    if not plan:
        return
    paths = {tuple(tuple(s) for s in p) for p in paths}
    kept = [e for e in plan if tuple(tuple(s) for s in e["path"]) not in paths]
    object.__setattr__(model, "_kf_plan", kept)
    if not kept and getattr(type(model), "_kf_base", None) is not None:
        model.__class__ = type(model)._kf_base
        object.__delattr__(model, "_kf_plan")
