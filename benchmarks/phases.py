"""Where a `factorize` call spends its time: seconds per step, by wrapping the
functions that do each step of `keras_factorized.surgery.factorize`.

Used by `python -m benchmarks.bert_levers --phases`: the lever's JSON then
holds `phases`, `{step: [seconds, calls]}`. Steps nest (`distillation`
holds `held-out loss`; `sequential refit` runs inside the keep-if-better
step that undoes it when it does not pay), so the seconds do not add up to
the call's.
"""

from __future__ import annotations

import contextlib
import importlib
import time

# (module of keras_factorized.surgery, function or Class.method, step name)
STEPS = [
    ("calibration", "collect_statistics", "input statistics"),
    ("decompose", "spectrum", "whitened spectra"),
    ("sensitivity", "output_gains", "sensitivity allocation"),
    ("factorize", "_build_replacements", "first factors"),
    ("report", "OutputErrorProbe.__init__", "output error probe (reference)"),
    ("report", "OutputErrorProbe.__call__", "output error probe"),
    ("distillation", "HeldOutLoss.__init__", "held-out loss (teacher, compile)"),
    ("distillation", "HeldOutLoss.loss", "held-out loss"),
    ("factorize", "_sequential_refit", "sequential refit"),
    ("blockwise", "blockwise_distill", "block-wise distillation"),
    ("distillation", "distill", "distillation"),
    ("factorize", "_refresh_rows", "report rows"),
]


def _owner_and_name(module, attribute):
    owner = importlib.import_module(f"keras_factorized.surgery.{module}")
    *classes, name = attribute.split(".")
    for cls in classes:
        owner = getattr(owner, cls)
    return owner, name


@contextlib.contextmanager
def timed_phases():
    """Within the block, the steps of `STEPS` are timed.

    Yields:
        A dict `{step: [seconds, calls]}`, filled as the steps run.
    """
    totals = {}
    patched = []

    def wrap(function, step):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                entry = totals.setdefault(step, [0.0, 0])
                entry[0] += time.perf_counter() - start
                entry[1] += 1

        return timed

    for module, attribute, step in STEPS:
        owner, name = _owner_and_name(module, attribute)
        original = owner.__dict__[name]
        patched.append((owner, name, original))
        setattr(owner, name, wrap(original, step))
    try:
        yield totals
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
