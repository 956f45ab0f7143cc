"""The lower bound that benchmarks/bench_sampler.py reports next to the sampler's worst step must be a true bound."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _best_equal_count_split(work: np.ndarray, world: int) -> float:
    """Brute force: the smallest max/mean over every split of ``work`` into ``world`` parts of equal count."""
    k = len(work) // world
    total = work.sum()
    best = np.inf

    def search(remaining: tuple[int, ...], current_max: float) -> None:
        nonlocal best
        if current_max >= best:
            return
        if not remaining:
            best = current_max
            return
        first, rest = remaining[0], remaining[1:]
        for others in itertools.combinations(rest, k - 1):
            part = (first, *others)
            left = tuple(i for i in rest if i not in others)
            search(left, max(current_max, work[list(part)].sum()))

    search(tuple(range(len(work))), 0.0)
    return best / (total / world)


@pytest.mark.parametrize("world,k", [(2, 1), (2, 3), (2, 4), (3, 2), (4, 2)])
def test_step_bound_never_exceeds_the_best_split(world, k, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.bench_sampler import step_bound

    rng = np.random.default_rng(world * 10 + k)
    tight = 0
    for _ in range(25):
        work = rng.uniform(0.9, 1.1, size=world * k)
        work[rng.integers(len(work))] *= rng.uniform(0.05, 1.0)  # one partly filled row
        bound, best = step_bound(work, world), _best_equal_count_split(work, world)
        assert bound <= best + 1e-12
        tight += bound > 1.0 and bound >= best - 0.02
    assert tight > 0  # the bound is not vacuous: it often comes within 2% of the optimum
