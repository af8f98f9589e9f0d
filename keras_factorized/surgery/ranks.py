"""Rank allocation: one rank per target from `rank`, `energy` or `param_ratio`.

With `param_ratio`, `allocation="auto"` (the default) is `"sensitivity"`
when there is calibration data and `"greedy"` otherwise; `"greedy"` spends one parameter budget over all
targets where it removes the most relative squared error per parameter (from
each target's singular values); `"uniform"` gives every target the same ratio;
`"sensitivity"` spends it where it removes the most error at the model's
outputs, measured on calibration data (`sensitivity.output_gains`).
Targets whose factors would not save parameters keep `rank=None` and a note.
"""

from __future__ import annotations

import math

import numpy as np

from keras_factorized import data_aware
from keras_factorized.decomposition import rank_for_energy

ALLOCATIONS = ("auto", "greedy", "uniform", "sensitivity")


def resolve_allocation(allocation, calibration_data) -> str:
    """The allocation `"auto"` stands for: `"sensitivity"` with calibration
    data (on MiniLM it beat a uniform ratio, which beat `"greedy"`), else
    `"greedy"`."""
    if allocation != "auto":
        return allocation
    return "greedy" if calibration_data is None else "sensitivity"


def choose_ranks(
    targets, rank=None, energy=None, param_ratio=None, allocation="greedy", gains=None
):
    """Sets `target.rank` (or `target.note` when it is kept) for every target.

    `gains` (with `allocation="sensitivity"`): per target, the output error
    per unit of its own output error (`sensitivity.output_gains`).
    """
    usable = []
    for t in targets:
        if t.max_useful_rank < 1:
            t.note = "kept: factors would not save parameters"
        else:
            usable.append(t)
    if rank is not None:
        for t in usable:
            if rank > t.max_useful_rank:
                t.note = (
                    f"kept: rank {rank} would not save parameters (at most {t.max_useful_rank})"
                )
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
    elif usable and allocation == "uniform":
        uniform_ranks(usable, param_ratio)
    elif usable and allocation == "sensitivity":
        weights = {id(t): g for t, g in zip(targets, gains)}
        greedy_ranks(usable, param_ratio, [weights[id(t)] for t in usable], keep_whole=True)
    elif usable:
        greedy_ranks(usable, param_ratio)


def uniform_rank(target, param_ratio) -> int:
    """The rank giving `target` the parameter ratio `param_ratio`."""
    m, n = target.shape
    return max(1, min(target.max_useful_rank, int(math.floor(param_ratio * m * n / (m + n)))))


def uniform_ranks(targets, param_ratio):
    """The same parameter ratio for every target."""
    for t in targets:
        t.rank = uniform_rank(t, param_ratio)


def budget(targets, param_ratio) -> float:
    """Parameters the factors of `targets` may hold: `param_ratio` of their
    weights and biases, less the biases (which factorization keeps)."""
    biases = sum(0 if t.bias is None else t.bias.size for t in targets)
    return param_ratio * sum(t.shape[0] * t.shape[1] for t in targets) - (1 - param_ratio) * biases


def greedy_ranks(targets, param_ratio, weights=None, keep_whole=False):
    """One budget spent where it removes the most error per parameter.

    Without `weights`, each layer's relative squared error (so that layers of
    different scales compete on equal terms); with them, `weights[i]` times
    its squared singular values (an estimate of the error at the outputs).
    With `keep_whole`, a layer that reaches the largest rank that saves
    parameters may be kept unfactorized (its whole error removed for the
    last few parameters), the budget spent on the others.
    """
    gains = []
    for i, t in enumerate(targets):
        sq = np.square(np.asarray(t.spectrum.s, np.float64))
        if weights is not None:
            gains.append(weights[i] * sq)
            continue
        total = float(getattr(t.spectrum, "frobenius_norm_sq", 0.0) or sq.sum())
        gains.append(sq / total if total > 0 else sq)
    ranks = data_aware.allocate_ranks(
        gains,
        [sum(t.shape) for t in targets],
        budget(targets, param_ratio),
        min_rank=1,
        max_ranks=[t.max_useful_rank for t in targets],
        whole_costs=[t.shape[0] * t.shape[1] if keep_whole else None for t in targets],
    )
    for t, k in zip(targets, ranks):
        t.rank = k
        if k is None:
            t.note = "kept: the allocation keeps it whole (its factors would save nothing)"
