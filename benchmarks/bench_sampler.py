"""Rank balance of the DDP batch sampler on the shared chat datasets: max/mean rank work per optimizer step.

    python benchmarks/bench_sampler.py            # writes benchmarks/results/sampler.md

For each shared dataset (and all of them pooled), as packed rows (capacity 4096, strategy "best") and as unpacked
samples, at world sizes 2, 4 and 8: the per-step ratio of the busiest rank's work to the mean rank work under
opensloth.sampler.BalancedBatchSampler, against the default a Trainer gets without it (a shuffled order cut into
micro-batches and dealt round-robin to the ranks, as accelerate's BatchSamplerShard does). Work is the sampler's
work model (tokens plus the attention term). No timing: the figures are exact properties of the plans.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import markdown_table, write_result  # noqa: E402
from benchmarks.bench_packing import shared_lengths  # noqa: E402
from opensloth.packing import pack_lengths  # noqa: E402
from opensloth.sampler import BalancedBatchSampler, WorkModel  # noqa: E402

CAPACITY = 4096
GRAD_ACCUM = 4
WORLD_SIZES = (2, 4, 8)
SEED = 0


def packed_rows(lengths: np.ndarray) -> list[np.ndarray]:
    lengths = np.minimum(lengths, CAPACITY)
    plan = pack_lengths(lengths, CAPACITY, strategy="best")
    return [lengths[b] for b in plan.bins()]


def default_rank_work(work: np.ndarray, batch_size: int, world: int) -> np.ndarray:
    """(steps, world) work when a shuffled order is cut into micro-batches dealt round-robin (batch i to rank i % W)."""
    order = np.random.default_rng(SEED).permutation(len(work))
    per_step = batch_size * GRAD_ACCUM * world
    steps = len(work) // per_step
    w = work[order[: steps * per_step]].reshape(steps, GRAD_ACCUM, world, batch_size)
    return w.sum(axis=(1, 3))


def step_bound(step_work: np.ndarray, world: int) -> float:
    """A lower bound on max/mean rank work for any split of one step's items into ``world`` equal-count parts.

    The part holding the lightest item L takes at most L plus the k - 1 heaviest of the others (k items per part),
    so the other world - 1 parts share at least the rest, and the busiest of them carries at least its average.
    """
    w = np.sort(step_work.ravel())
    k = len(w) // world
    if world == 1 or k == 0:
        return 1.0
    rest = w.sum() - w[0] - w[len(w) - (k - 1):].sum()
    return max(1.0, (rest / (world - 1)) / (w.sum() / world))


def ratios(rank_work: np.ndarray) -> np.ndarray:
    mean = rank_work.mean(axis=1)
    return rank_work.max(axis=1) / np.where(mean > 0, mean, 1.0)


def run() -> list[list[object]]:
    model = WorkModel()
    data = shared_lengths()
    data = {**data, "all (pooled)": np.concatenate(list(data.values()))}
    table = []
    for name, lengths in data.items():
        rows = packed_rows(lengths)
        layouts = {
            "packed rows": (dict(seq_lengths=rows), model.row_work(rows), 1),
            "unpacked samples": (dict(lengths=lengths), model.sample_work(lengths), 8),
        }
        for layout, (source, work, batch_size) in layouts.items():
            for world in WORLD_SIZES:
                sampler = BalancedBatchSampler(batch_size=batch_size, grad_accum=GRAD_ACCUM, world_size=world,
                                               seed=SEED, **source)
                plan = sampler.plan(0)
                ours = plan.max_over_mean()
                if len(ours) == 0:
                    continue
                worst = int(np.argmax(ours))
                bound = step_bound(work[plan.full[worst]], world)
                default = ratios(default_rank_work(work, batch_size, world))
                table.append([
                    name, layout, len(work), world, f"{batch_size} x {GRAD_ACCUM}", len(ours),
                    f"{ours.mean():.4f}", f"{np.median(ours):.4f}", f"{ours.max():.4f}", f"{bound:.4f}",
                    f"{(ours <= 1.01).mean():.1%}", int((ours > 1.01).sum()),
                    f"{default.mean():.3f}", f"{default.max():.3f}",
                ])
                print(" | ".join(str(c) for c in table[-1]), flush=True)
    return table


def main() -> None:
    table = run()
    header = ["dataset", "layout", "items", "ranks", "micro-batch x accum", "steps", "ours mean", "ours median",
              "ours worst", "bound for that step", "steps within 1%", "steps over 1%", "default mean", "default worst"]
    body = "\n\n".join([
        f"Max/mean rank work per optimizer step (1.0 = every rank does the same work). Packed rows: capacity "
        f"{CAPACITY}, `pack_lengths(..., strategy='best')`, one row per micro-batch; unpacked samples: 8 per "
        f"micro-batch; gradient accumulation {GRAD_ACCUM}; seed {SEED}, epoch 0, drop_last. *default*: the same items "
        "shuffled, cut into micro-batches and dealt round-robin to the ranks (what accelerate does without "
        "OpenSloth's sampler). *bound for that step*: a lower bound on max/mean for any equal-count split of the "
        "items of our worst step over the ranks (the part holding the lightest item takes at most it plus the "
        "heaviest others; the other parts share the rest); where ours equals it, no sampler could balance that step "
        "better. Each shared dataset packs into nearly full rows plus one partly filled row (11% to 88% of the "
        "median row's work), and the step that holds it (unless drop_last drops it) cannot do much better than "
        "8 / (7 + p) at 2 ranks and 4 rows per rank, for a row of relative work p.",
        markdown_table(header, table),
    ])
    path = write_result("sampler", "Rank balance of the DDP batch sampler", [("Max/mean rank work per step", body)])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
