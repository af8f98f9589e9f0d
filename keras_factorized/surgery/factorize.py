"""`factorize`: replace the weight matrices of a trained Keras model by low-rank factors.

One call turns a trained model (Sequential, functional, subclassed functional
such as a KerasHub backbone, with layers nested inside layers) into a copy whose
`Dense`, `EinsumDense` and `Embedding` layers are `LowRankDense`,
`LowRankEinsumDense` and `FactorizedEmbedding` initialised from the trained
weights; `merge` is its inverse. The steps, each in its own module:
`copying` (a deep copy), `selection` (which layers, through the registry),
`calibration` (their input statistics), `decompose` (spectra and factors),
`ranks` (rank allocation), `replace` (putting the new layers in),
`saving` (so that the copy loads back), `distillation` (`"learned"`) and
`report`.

Methods: `"svd"` truncates the SVD of each weight (`min ||W - A B||`);
`"whitened"` minimises each layer's output error `||X W - X A B||` for the
inputs `X` it sees on the calibration data (whiten by a square root of
`X^T X`, SVD, un-whiten: SVD-LLM; an embedding's rows are weighted by how
often the calibration data used each id); `"learned"`
starts from `"whitened"` (or `"svd"` without calibration data) and trains the
factors so that the whole model reproduces the original outputs. Layers kept
as they are get a report row saying why: directly in the graph of a model
that builds its own graph (a KerasHub backbone's `pooled_dense`), factors
that would not save parameters, or a reason from the registry (KerasHub's
`ReversibleEmbedding` is tied to the output projection).

Conventions, and why:

- **Method options are config objects** (`whitening=WhitenedConfig(...)`,
  `distillation=DistillationConfig(...)`), as `keras.Model.quantize(mode,
  config=...)` takes one: the options of a method live and are checked in one
  place, and `factorize`'s signature stays short as methods gain options.
  There are two arguments rather than Keras's one `config` because
  `"learned"` uses both (it starts from the whitened factors). The keyword
  arguments of earlier versions (`damping=`, `bias_correction=`,
  `distillation_data=`, `distillation_epochs=`, `distillation_outputs=`,
  `distillation_loss=`, `distillation_trainable=`, `learning_rate=`) still
  work and fill the same objects; giving both forms of one option is an error.
- **Layers are selected by `filters`**, as in `Model.quantize(filters=...)`:
  a regular expression on `layer.path`, a layer class, a callable
  `layer -> bool`, or a list of them (any may match). `include` (same
  forms, combined with `filters`: both must match) and `exclude` (none may
  match) stay, because a blacklist reads better than a negated regex.
- The rank arguments (`rank`, `energy`, `param_ratio` with `allocation`)
  stay plain arguments: they apply to every method.
- **Deterministic**: the same call on the same model and data gives the same
  ranks and factors whatever ran before in the process. Every random step
  (the order of the distillation batches) is seeded from `seed`; the model
  runs with `training=False` (no dropout); nothing depends on layer names,
  on object ids that Python may reuse, or on global Keras state. A
  `tf.data.Dataset` given as data must not shuffle without a seed of its own,
  and a distillation time budget, once reached, makes the result depend on
  the machine's speed.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_factorized import data_aware
from keras_factorized.decomposition import check_rank_arguments
from keras_factorized.surgery import blocks as blocks_lib
from keras_factorized.surgery import blockwise
from keras_factorized.surgery import calibration
from keras_factorized.surgery import config as config_lib
from keras_factorized.surgery import copying
from keras_factorized.surgery import decompose
from keras_factorized.surgery import distillation as distillation_lib
from keras_factorized.surgery import ranks
from keras_factorized.surgery import replace
from keras_factorized.surgery import report as report_lib
from keras_factorized.surgery import saving
from keras_factorized.surgery import selection
from keras_factorized.surgery import sensitivity
from keras_factorized.surgery import sequential
from keras_factorized.surgery import walk
from keras_factorized.validation import check_choice
from keras_factorized.validation import check_fraction
from keras_factorized.validation import check_positive_int
from keras_factorized.validation import invalid_value
from keras_factorized.validation import is_integer

METHODS = ("svd", "whitened", "learned")


def factorize(
    model: keras.Model,
    rank: int | None = None,
    *,
    energy: float | None = None,
    param_ratio: float | None = None,
    method: str = "svd",
    calibration_data=None,
    filters=None,
    include=None,
    exclude=None,
    allocation: str = "auto",
    split: str = "balanced",
    whitening: config_lib.WhitenedConfig | None = None,
    distillation: config_lib.DistillationConfig | None = None,
    batch_size: int = 32,
    seed: int | None = None,
    verbose: int = 0,
    **legacy_kwargs,
) -> keras.Model:
    """Replaces a trained model's weight matrices by low-rank factors.

    Returns a copy of `model` in which every selected `Dense`, `EinsumDense`
    and `Embedding`, at any depth (inside nested models and inside layers that
    hold layers, as a KerasHub `TransformerEncoder`), is a `LowRankDense`,
    `LowRankEinsumDense` or `FactorizedEmbedding` initialised from its trained
    weights; `model` is untouched. The copy trains, saves, loads and exports
    like the original; `merge` undoes it. `new_model.factorization_report` (a
    `FactorizationReport`) gives every selected layer's rank and why (the
    allocation, or why it was kept), its weight and output errors, and the
    model's output error on `calibration_data` after each step. Methods: `"svd"` (truncated SVD of each weight),
    `"whitened"` (minimises each layer's output error on `calibration_data`,
    SVD-LLM), `"learned"` (whitened, then distilled end to end).

    Args:
        model: a built Keras model (Sequential, functional, or a registered
            subclass with a complete `get_config`, e.g. a KerasHub backbone).
        rank: one rank for every selected layer. Give exactly one of `rank`,
            `energy` (per layer, the fraction in `(0, 1]` of the squared
            singular values kept) and `param_ratio` (one budget, a fraction in
            `(0, 1]` of the selected weights, spread by `allocation`).
        method: one of `METHODS`.
        calibration_data: model inputs (arrays, a dict of arrays or a
            `tf.data.Dataset`); needed by `"whitened"`; gives output errors.
        filters: which layers to factorize: a regular expression on
            `layer.path`, a layer class, a callable `layer -> bool` or a list
            of them. A layer must match `filters` and `include`, and not
            `exclude`. Default: all.
        include: like `filters` (both must match).
        exclude: layers to leave out, in the same forms.
        allocation: one of `ALLOCATIONS`: `"auto"` is `"sensitivity"` (ranks
            priced by the error each layer causes at the outputs) with
            calibration data, else `"greedy"` (see `ranks`).
        split: how singular values are shared between `A` and `B`.
        whitening: a `WhitenedConfig` (options of `"whitened"`/`"learned"`).
        distillation: a `DistillationConfig` (options of `"learned"`).
        batch_size: batch size to run array calibration data (the
            distillation trains in batches of `distillation.batch_size`).
        seed: seeds every random step (the order of the distillation
            batches); overrides `distillation.seed`. Default: that seed (0).
        verbose: 1 shows progress bars.
        **legacy_kwargs: the options of earlier versions (module docstring).

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64),
    ...                           keras.layers.Dense(2)])
    >>> small = factorize(model, rank=8)
    >>> [type(l).__name__ for l in small.layers]
    ['LowRankDense', 'Dense']
    >>> small.factorization_report.layers[1].note
    'kept: rank 8 would not save parameters (at most 1)'
    >>> small.factorization_report.layers[0].allocation
    'fixed rank'
    """
    whitening, distillation = config_lib.from_legacy_kwargs(
        whitening, distillation, batch_size, legacy_kwargs
    )
    if seed is not None:
        if not is_integer(seed) or seed < 0:
            raise invalid_value("seed", "an integer >= 0 or None", seed)
        distillation = dataclasses.replace(distillation, seed=int(seed))
    _check_arguments(
        model, rank, energy, param_ratio, method, allocation, calibration_data, distillation
    )
    call = _Call(model, method, calibration_data, batch_size, split, whitening, distillation)
    copy = copying.copy_model(model)
    selected = selection.selection(filters, include, exclude)
    targets, skipped = selection.find_targets(copy, model, selected)
    if calibration_data is not None:
        calibration.collect_statistics(model, targets, calibration_data, batch_size)
    for t in targets:
        t.spectrum = decompose.spectrum(t, method, whitening)
    chosen = _choose_ranks(call, targets, rank, energy, param_ratio, allocation)
    replacements, rows = _build_replacements(targets, split, whitening, *chosen)
    rows += [report_lib.kept_layer_row(layer, why) for layer, why in skipped]
    new_model, plan = replace.apply_replacements(copy, replacements)
    saving.attach_plan(new_model, plan)
    report = report_lib.FactorizationReport(
        method=method, layers=rows, settings=_settings(rank, energy, param_ratio, chosen, call)
    )
    _refine(call, new_model, targets, report, verbose)
    object.__setattr__(new_model, "factorization_report", report)
    return new_model


def _settings(rank, energy, param_ratio, chosen, call) -> dict:
    """What chose the ranks and factors, for the report's title."""
    settings = {}
    for name, value in (("rank", rank), ("energy", energy), ("param_ratio", param_ratio)):
        if value is not None:
            settings[name] = value
    if param_ratio is not None:
        settings["allocation"] = chosen[0]
    if call.method != "svd" and call.whitening.sequential:
        settings["sequential"] = True
    if call.method == "learned":
        settings["seed"] = call.distillation.seed
    return settings


@dataclasses.dataclass(frozen=True)
class _Call:
    """The arguments of one `factorize` call that its steps share."""

    model: keras.Model
    method: str
    calibration_data: object
    batch_size: int
    split: str
    whitening: config_lib.WhitenedConfig
    distillation: config_lib.DistillationConfig


def _choose_ranks(call, targets, rank, energy, param_ratio, allocation):
    """Ranks for `targets`, measuring the output sensitivities when needed.

    Returns `(allocation, reason, gains)`: the allocation used (`"auto"`
    resolved; `"rank"`/`"energy"` without `param_ratio`), the report's reason
    for the ranks it gave, and the sensitivity gains (or `None`).
    """
    gains, allocation = None, ranks.resolve_allocation(allocation, call.calibration_data)
    if param_ratio is not None and allocation == "sensitivity":
        gains = sensitivity.output_gains(
            call.model,
            targets,
            call.calibration_data,
            call.batch_size,
            param_ratio,
            call.split,
            call.whitening,
        )
    ranks.choose_ranks(targets, rank, energy, param_ratio, allocation, gains)
    if param_ratio is None:
        allocation = "rank" if rank is not None else "energy"
    reason = report_lib.ALLOCATION_REASONS[allocation]
    if allocation == "energy":
        reason = f"energy {energy}: smallest rank keeping this fraction of the spectrum"
    return allocation, reason, gains


def _refine(call, new_model, targets, report, verbose):
    """The steps after the first factors: sequential refit, then distillation.

    With calibration data, the model's output error on it after each step
    goes into `report.output_errors`.
    """
    data = call.calibration_data
    probe = None
    if data is not None:
        probe = report_lib.OutputErrorProbe(call.model, data, call.batch_size)
        report.output_errors["factorized"] = probe(new_model)
    sequential_refit = call.whitening.sequential and call.method != "svd" and data is not None
    distillation = call.distillation if call.method == "learned" else None
    if distillation is not None:
        # Held out of the training data, and new to the whitened start (which
        # was fitted to the calibration data in closed form).
        train, held, description = distillation_lib.split_held_out(
            data if distillation.data is None else distillation.data, distillation
        )
        # One measure of the held-out loss for every step that keeps the best.
        if held is not None:
            held = distillation_lib.HeldOutLoss(new_model, call.model, distillation, held)
        held_out = [held, description]
    if sequential_refit:
        # With distillation data, the refit runs once, on both data: a refit
        # on the calibration data alone first would have each layer fitted
        # again on a superset of its rows (on MiniLM, a minute of the call).
        if distillation is not None and distillation.refit and distillation.data is not None:
            both = distillation_lib.joined_batches([data, train], call.batch_size)
            _keep_if_better(
                lambda: _sequential_refit(call, new_model, targets, both),
                "sequential refit on the calibration and distillation data",
                new_model, call.model, targets, distillation, held_out, report,
            )
        else:
            _sequential_refit(call, new_model, targets, data)
        _refresh_rows(new_model, targets, report, "whitened, sequential")
        report.output_errors["sequential refit"] = probe(new_model)
    if distillation is None:
        return
    if distillation.use_calibration_data and distillation.data is not None and data is not None:
        train = distillation_lib.joined_batches([data, train], distillation.batch_size)
    _learn(new_model, call.model, targets, report, distillation, train, held_out, verbose)
    if probe is not None:
        report.output_errors["distilled"] = probe(new_model)


def _sequential_refit(call, new_model, targets, data):
    sequential.sequential_update(
        call.model,
        new_model,
        # Only layers with input statistics: an embedding's input is ids.
        [t for t in targets if t.stats is not None],
        data,
        call.batch_size,
        call.whitening.damping,
        call.split,
        residual=call.whitening.residual,
    )


def _build_replacements(targets, split, whitening, allocation, reason, gains):
    """`({path: new_layer}, rows)`: the new layers and every target's report
    row (with `reason` for its rank and its sensitivity gain, if any)."""
    replacements, rows = {}, []
    for i, t in enumerate(targets):
        if t.rank is None:
            row = report_lib.kept_target_row(t)
        else:
            a, b, bias = decompose.factors(t, split, whitening)
            replacements[t.path] = t.rule.build(t.layer, a, b, bias)
            approx = a.astype(np.float64) @ b.astype(np.float64)
            row = report_lib.factorized_row(t, replacements[t.path], approx, bias, reason)
        if gains is not None:
            row.sensitivity = float(gains[i])
        rows.append(row)
    return replacements, rows


def _check_arguments(
    model, rank, energy, param_ratio, method, allocation, calibration_data, distillation
):
    check_rank_arguments(rank, energy, param_ratio)
    if rank is not None:
        check_positive_int("rank", rank)
    if energy is not None:
        check_fraction("energy", energy)
    if param_ratio is not None:
        check_fraction("param_ratio", param_ratio)
    check_choice("method", method, METHODS)
    check_choice("allocation", allocation, ranks.ALLOCATIONS)
    if allocation == "sensitivity" and calibration_data is None:
        raise invalid_value("calibration_data", "model inputs for allocation='sensitivity'", None)
    if method == "whitened" and calibration_data is None:
        raise invalid_value("calibration_data", "model inputs for method='whitened'", None)
    if method == "learned" and calibration_data is None and distillation.data is None:
        raise invalid_value(
            "distillation_data", "model inputs (or `calibration_data`) for method='learned'", None
        )
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise invalid_value("model", "a built Keras model (call it once or build it)", model)


def _learn(new_model, model, targets, report, distillation, data, held_out, verbose):
    """Distils the factors of `new_model`; updates the report's rows.

    `held_out` is `[HeldOutLoss, description]` (`[None, None]`: nothing held
    out).
    """
    factorized = [t for t in targets if t.rank is not None]
    layers = [walk.navigate(new_model, t.path) for t in factorized]
    if distillation.block_epochs:
        _blockwise(new_model, model, targets, report, distillation, data, held_out, verbose)
    if distillation.epochs == 0:
        _refresh_rows(new_model, targets, report, "learned")
        return
    block_paths = dict.fromkeys(blocks_lib.block_path(t.path) for t in factorized)
    distilled = distillation_lib.distill(
        new_model, model, distillation, layers, data, verbose, held_out[0], block_paths
    )
    blocks = (
        f" and to the outputs of {len(block_paths)} block{'s' * (len(block_paths) > 1)} "
        f"with weight {distillation.block_weight:g}"
        if distillation.block_weight
        else ""
    )
    rate = distilled.token_noise
    noise = f"; {rate:.0%} of the tokens replaced at every step" if rate else ""
    policy = distillation.dtype_policy
    precision = f"; computed in {policy}" if policy else ""
    report.notes.append(
        f"distillation loss ({distillation_lib.loss_label(distilled.losses)} to the original "
        f"outputs{blocks}{noise}{precision}) per epoch: "
        + ", ".join(f"{h:.4g}" for h in distilled.history)
    )
    if distilled.held_out:
        kept = distilled.kept
        report.notes.append(
            f"held-out loss ({held_out[1]}) before and after each epoch: "
            + ", ".join(f"{h:.4g}" for h in distilled.held_out)
            + f"; kept the factors of {'the start' if kept == 0 else f'epoch {kept}'}"
        )
    _refresh_rows(new_model, targets, report, "learned")


def _blockwise(new_model, model, targets, report, distillation, data, held_out, verbose):
    """Block-wise distillation, undone when it raises the held-out loss."""
    losses = []

    def step():
        losses.extend(
            blockwise.blockwise_distill(model, new_model, targets, data, distillation, verbose)
        )
        report.notes.append(
            "block-wise distillation loss (mse to each original block's outputs), last "
            "epoch per block: " + ", ".join(f"{h:.4g}" for h in losses)
        )

    _keep_if_better(step, "block-wise", new_model, model, targets, distillation, held_out, report)


def _keep_if_better(step, label, new_model, model, targets, distillation, held_out, report):
    """Runs `step()` (which changes the factors of `new_model`) and undoes it
    when it raises the held-out loss `held_out[0]` (a `HeldOutLoss`)."""
    validation, held = held_out
    layers = [walk.navigate(new_model, t.path) for t in targets if t.rank is not None]
    saved = [[np.array(calibration.to_numpy(v)) for v in layer.weights] for layer in layers]
    before = None
    if validation is not None:
        before = validation.loss()
    step()
    if before is None:
        return
    after = validation.loss()
    kept = after <= before
    if not kept:
        for layer, values in zip(layers, saved):
            for variable, value in zip(layer.weights, values):
                variable.assign(value)
    report.notes.append(
        f"{label} held-out loss ({held}): {before:.4g} -> {after:.4g}; "
        + ("kept" if kept else "undone")
    )


def _refresh_rows(new_model, targets, report, note):
    """Weight and output errors of the factors `new_model` now holds."""
    rows = {r.path: r for r in report.layers}
    for t in targets:
        if t.rank is None or t.stats is None:
            continue
        layer = walk.navigate(new_model, t.path)
        row = rows[t.layer.path]
        a, b = layer.factors()
        kernel = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        bias = None if getattr(layer, "bias", None) is None else calibration.to_numpy(layer.bias)
        norm = np.linalg.norm(t.matrix)
        row.weight_error = float(np.linalg.norm(t.matrix - kernel) / norm) if norm else 0.0
        row.output_error = data_aware.relative_output_error(t.stats, t.matrix, kernel, t.bias, bias)
        row.note = note
