"""Rank allocation: one rank per target from `rank`, `energy` or `param_ratio`.

With `param_ratio`, `allocation="greedy"` spends one parameter budget over all
targets where it removes the most relative squared error per parameter (from
each target's singular values); `"uniform"` gives every target the same ratio.
Targets whose factors would not save parameters keep `rank=None` and a note.
"""

from __future__ import annotations

import math

import numpy as np

from keras_factorized import data_aware
from keras_factorized.decomposition import rank_for_energy

ALLOCATIONS = ("greedy", "uniform")


def choose_ranks(targets, rank=None, energy=None, param_ratio=None, allocation="greedy"):
    """Sets `target.rank` (or `target.note` when it is kept) for every target."""
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
    elif usable:
        greedy_ranks(usable, param_ratio)


def uniform_ranks(targets, param_ratio):
    """The same parameter ratio for every target."""
    for t in targets:
        m, n = t.shape
        t.rank = max(1, min(t.max_useful_rank, int(math.floor(param_ratio * m * n / (m + n)))))


def budget(targets, param_ratio) -> float:
    """Parameters the factors of `targets` may hold: `param_ratio` of their
    weights and biases, less the biases (which factorization keeps)."""
    biases = sum(0 if t.bias is None else t.bias.size for t in targets)
    return param_ratio * sum(t.shape[0] * t.shape[1] for t in targets) - (1 - param_ratio) * biases


def greedy_ranks(targets, param_ratio):
    """One budget spent where it removes the most relative squared error."""
    gains = []
    for t in targets:
        sq = np.square(np.asarray(t.spectrum.s, np.float64))
        total = float(getattr(t.spectrum, "frobenius_norm_sq", 0.0) or sq.sum())
        # Relative squared error, so that layers of different scales compete
        # on equal terms.
        gains.append(sq / total if total > 0 else sq)
    ranks = data_aware.allocate_ranks(
        gains,
        [sum(t.shape) for t in targets],
        budget(targets, param_ratio),
        min_rank=1,
        max_ranks=[t.max_useful_rank for t in targets],
    )
    for t, k in zip(targets, ranks):
        t.rank = k
