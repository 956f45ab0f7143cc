"""Rank balance of DDP batch samplers on the shared chat datasets, peers in the same run.

    python benchmarks/bench_sampler.py            # writes benchmarks/results/sampler.md

Samplers, each fed the same items at the same global batch (ranks x gradient accumulation x micro-batch); every
sampler but *ours, across steps* keeps each optimizer step's items, so all of them get the same steps (cut from one
seeded permutation) and differ only in how they split a step over the ranks and micro-batches:

- *round-robin*: what a Trainer does without a balancer: the permutation cut into micro-batches, micro-batch i
  to rank i % W (accelerate's ``BatchSamplerShard``).
- *Unsloth*: ``UNSLOTH_TOKEN_BALANCE=1`` of Unsloth 2026.10.x, its own ``balance_step_indices``
  (``unsloth/utils/token_budget.py``: Karmarkar-Karp on token sums over the ranks, then over each rank's micro-batches,
  one optimizer step at a time). Unsloth applies it to padding-free and packed batches
  only; for padded batches it keeps round-robin. Unsloth's package refuses to import without a GPU, but that module
  needs only torch: the bench loads the installed file on its own (``--unsloth-src DIR`` names the package folder if
  it is not installed here; ``--unsloth-import`` imports ``unsloth`` instead, on a GPU machine). Without either the
  Unsloth rows say "not run".
- *transformers*: ``TrainingArguments(train_sampling_strategy="batch_rebalance")`` of transformers 5.17, its own
  ``BatchRebalanceSampler._assign`` (per optimizer step: samples sorted by length, contiguous groups resized by hill
  climbing on a padded cost, groups dealt to ranks and micro-batches).
- *ours*: ``opensloth.sampler.BalancedBatchSampler`` (per optimizer step, `balance` on the work model over the
  ranks; for packed rows with ``row_capacity=4096``, since the rows are computed padded to it), with the window
  re-cut of ``patch_optimize_sft_trainer_batch_samples`` on padded batches (the two run together under
  ``ddp_patch``); *ours, across steps* is the opt-in ``balance_across_steps=True`` (which changes each step's samples
  with the world size).

Layouts: *unpacked padding-free* (8 samples end to end per micro-batch), *padded samples* (8 samples per
micro-batch, padded to the longest), *packed rows* (one row of 4096 per micro-batch, rows packed by
``pack_lengths(..., strategy="best")``); gradient accumulation 4; samples truncated to 4096 tokens.

Per optimizer step and rank: tokens (real), attention (sum of squared sample lengths), padded slots (token slots
computed, padding included), work (the `WorkModel`: tokens + attention / 53,248 for a Llama-3-8B-like layer, on the
slots computed: a padded micro-batch computes its width for every row, attention included; a packed row its
capacity, its padding tail being a segment of its own). Columns give
max/mean over the ranks (mean over the steps, and the worst step), and the step efficiency: the real work (the work
model on the real samples) over ranks x the slowest rank's computed work, summed over the epoch (1.0: no padding and
no rank waits). Plan time per window: the time to plan one optimizer step for every rank (ours: an epoch's plan over
its steps, native backend), median of 5 repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import machine_header, markdown_table, package_versions, write_result  # noqa: E402
from opensloth.packing import pack_lengths, partition_padded  # noqa: E402
from opensloth.sampler import BalancedBatchSampler, WorkModel  # noqa: E402

CAPACITY = 4096
GRAD_ACCUM = 4
WORLD_SIZES = (2, 4, 8)
SEED = 0
LAYOUTS = ("unpacked padding-free", "padded samples", "packed rows")
MICRO_BATCH = {"unpacked padding-free": 8, "padded samples": 8, "packed rows": 1}
SAMPLERS = ("round-robin", "Unsloth", "transformers", "ours", "ours, across steps")

# A step: per rank, a list of micro-batches, each an int64 array of dataset item indices.
Step = list[list[np.ndarray]]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Items:
    """One layout's dataset items: each item's sample lengths (one sample, or a packed row's segments)."""

    layout: str
    segments: list[np.ndarray]

    def __post_init__(self) -> None:
        self.tokens = np.asarray([int(s.sum()) for s in self.segments], dtype=np.int64)

    @property
    def micro_batch(self) -> int:
        return MICRO_BATCH[self.layout]


def layout_items(lengths: np.ndarray, layout: str) -> Items:
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), CAPACITY)
    if layout != "packed rows":
        return Items(layout, [lengths[i : i + 1] for i in range(len(lengths))])
    plan = pack_lengths(lengths, CAPACITY, strategy="best")
    return Items(layout, [lengths[b] for b in plan.bins()])


@dataclass(frozen=True)
class MicroBatch:
    """What one micro-batch computes: its real samples' lengths, and the rows x width it is laid out in."""

    lengths: np.ndarray
    rows: int
    width: int
    layout: str  # "flat" (padding-free, or packed rows attended per segment) or "padded" (dense per row)
    tails: np.ndarray  # packed rows: each row's padding tail (a segment of its own); empty otherwise

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def slots(self) -> int:
        return self.rows * self.width

    @property
    def attention(self) -> float:
        return float(np.square(self.lengths.astype(np.float64)).sum())

    def real_work(self, model: WorkModel) -> float:
        return model.batch_work(self.lengths)

    def computed_work(self, model: WorkModel) -> float:
        if self.layout == "padded":
            return self.rows * float(model.sample_work([self.width])[0])
        return model.batch_work(self.lengths) + model.batch_work(self.tails)


def micro_batch(items: Items, idx: np.ndarray) -> MicroBatch:
    segs = [items.segments[i] for i in idx]
    lengths = np.concatenate(segs) if segs else np.zeros(0, dtype=np.int64)
    none = np.zeros(0, dtype=np.int64)
    if items.layout == "padded samples":
        return MicroBatch(lengths, len(idx), int(lengths.max()) if len(lengths) else 0, "padded", none)
    if items.layout == "packed rows":
        tails = CAPACITY - np.asarray([int(s.sum()) for s in segs], dtype=np.int64)
        return MicroBatch(lengths, len(idx), CAPACITY, "flat", tails[tails > 0])
    return MicroBatch(lengths, 1, int(lengths.sum()), "flat", none)


# ---------------------------------------------------------------------------------------------------------------
# Samplers: each returns (steps, seconds to plan one step)
# ---------------------------------------------------------------------------------------------------------------


def _median_time(fn: Callable[[], object], repeat: int = 5) -> tuple[object, float]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def _permutation(n: int) -> np.ndarray:
    """The order every sampler's steps are cut from: BalancedBatchSampler's for epoch 0, so all samplers train the
    same items in each step (they are all per-step samplers, ours, across steps aside) and differ only in how they
    split a step over the ranks and micro-batches."""
    return np.random.default_rng([SEED, 0]).permutation(n)


def round_robin(items: Items, world: int) -> tuple[list[Step], float]:
    mb, per_step = items.micro_batch, items.micro_batch * GRAD_ACCUM * world

    def plan():
        order = _permutation(len(items.segments))
        steps = []
        for s in range(len(order) // per_step):
            batches = order[s * per_step : (s + 1) * per_step].reshape(GRAD_ACCUM * world, mb)
            steps.append([[batches[g * world + r] for g in range(GRAD_ACCUM)] for r in range(world)])
        return steps

    steps, seconds = _median_time(plan)
    return steps, seconds / max(1, len(steps))


def unsloth_module(src: str | None = None, use_import: bool = False):
    """Unsloth's ``unsloth/utils/token_budget.py`` as a module, or a string saying why it is not available."""
    if use_import:
        try:
            import unsloth  # noqa: F401  (needs a GPU)
            from unsloth.utils import token_budget

            return token_budget
        except Exception as exc:  # noqa: BLE001 - any failure: report it
            return f"`import unsloth` failed: {type(exc).__name__}: {exc}"
    if src is None:
        spec = importlib.util.find_spec("unsloth")  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            return "unsloth is not installed here (give --unsloth-src DIR, or run with --unsloth-import on a GPU)"
        src = spec.submodule_search_locations[0]
    path = Path(src) / "utils" / "token_budget.py"
    if not path.is_file():
        return f"{path} does not exist"
    spec = importlib.util.spec_from_file_location("unsloth_token_budget_standalone", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unsloth_version(module) -> str:
    dist = sorted(Path(module.__file__).resolve().parents[2].glob("unsloth-*.dist-info"))
    if dist:
        return dist[-1].name[len("unsloth-") : -len(".dist-info")]
    return package_versions(["unsloth"])["unsloth"]


def unsloth_balance(items: Items, world: int, module) -> tuple[list[Step], float]:
    mb, per_step = items.micro_batch, items.micro_batch * GRAD_ACCUM * world
    if items.layout == "padded samples":  # Unsloth does not balance padded batches (its _padded_batches check)
        return round_robin(items, world)
    lengths = items.tokens.tolist()  # Unsloth's _dataset_lengths: len(input_ids) per item
    order = _permutation(len(lengths)).tolist()
    windows = [order[s * per_step : (s + 1) * per_step] for s in range(len(order) // per_step)]

    def plan():
        return [module.balance_step_indices(w, lengths, mb, GRAD_ACCUM, world, True) for w in windows]

    flat, seconds = _median_time(plan)
    steps = []
    for out in flat:
        out = np.asarray(out, dtype=np.int64).reshape(GRAD_ACCUM * world, mb)  # global batch g * W + r
        steps.append([[out[g * world + r] for g in range(GRAD_ACCUM)] for r in range(world)])
    return steps, seconds / max(1, len(steps))


def transformers_rebalance(items: Items, world: int) -> tuple[list[Step], float]:
    import torch
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    lengths = items.tokens.tolist()
    per_step = items.micro_batch * GRAD_ACCUM * world
    sampler = BatchRebalanceSampler(lengths=lengths, effective_batch_size=per_step, dp_size=world,
                                    grad_accum=GRAD_ACCUM, shuffle=True, seed=SEED, rank=0, drop_last=True)
    order = _permutation(len(lengths)).tolist()  # the same steps as the other samplers (see _permutation)
    windows = [order[s * per_step : (s + 1) * per_step] for s in range(sampler.num_full_batches)]

    def plan():
        return [sampler._assign(w, [lengths[i] for i in w]) for w in windows]

    assigned, seconds = _median_time(plan, repeat=3)
    if windows:  # _assign is what iterating the sampler runs (its own permutation; rank 0, first step)
        g = torch.Generator()
        g.manual_seed(SEED + sampler.epoch)
        own = torch.randperm(len(lengths), generator=g).tolist()[:per_step]
        first = [list(b) for b, _ in zip(iter(sampler), range(GRAD_ACCUM))]
        assert first == [list(b) for b in sampler._assign(own, [lengths[i] for i in own])[0]], \
            "transformers' BatchRebalanceSampler no longer iterates _assign's plan"
    steps = [[[np.asarray(mb_, dtype=np.int64) for mb_ in rank] for rank in a] for a in assigned]
    return steps, seconds / max(1, len(steps))


def ours(items: Items, world: int, across_steps: bool = False,
         work_model: WorkModel | None = None) -> tuple[list[Step], float]:
    # Packed rows are collated padded to the capacity (one row of CAPACITY per micro-batch): row_capacity says so.
    source = dict(seq_lengths=items.segments, row_capacity=CAPACITY) if items.layout == "packed rows" else \
        dict(lengths=items.tokens)

    def plan():
        s = BalancedBatchSampler(batch_size=items.micro_batch, grad_accum=GRAD_ACCUM, world_size=world, seed=SEED,
                                 balance_across_steps=across_steps, work_model=work_model, **source)
        return s.plan(0)

    epoch_plan, seconds = _median_time(plan)
    steps = [[list(rank) for rank in step] for step in epoch_plan.full]
    if items.layout == "padded samples":
        steps = [[recut_padded(items, rank) for rank in step] for step in steps]
    return steps, seconds / max(1, len(steps))


def recut_padded(items: Items, rank: list[np.ndarray]) -> list[np.ndarray]:
    """The window re-cut on padded batches (opensloth.patching.batch_samples): the fewest padded slots for the same
    number of micro-batches, capped at the largest original micro-batch's slots."""
    idx = np.concatenate(rank)
    lengths = items.tokens[idx]
    cap = max(int(items.tokens[mb].max()) * len(mb) for mb in rank)
    before = sum(int(items.tokens[mb].max()) * len(mb) for mb in rank)
    groups = partition_padded(lengths, len(rank), max_tokens_per_batch=cap)
    after = sum(int(lengths[g].max()) * len(g) for g in groups)
    return [idx[np.sort(g)] for g in groups] if after < before else rank


def sampler_steps(name: str, items: Items, world: int, unsloth=None,
                  work_model: WorkModel | None = None) -> tuple[list[Step], float] | None:
    """One sampler's steps over ``items`` at ``world`` ranks, and its plan time per step; None when not available
    (Unsloth's module missing). ``work_model``: the one ours balances (the default work model without it)."""
    if name == "round-robin":
        return round_robin(items, world)
    if name == "Unsloth":
        return None if isinstance(unsloth, str) or unsloth is None else unsloth_balance(items, world, unsloth)
    if name == "transformers":
        return transformers_rebalance(items, world)
    if name == "ours":
        return ours(items, world, work_model=work_model)
    if name == "ours, across steps":
        return ours(items, world, across_steps=True, work_model=work_model)
    raise ValueError(f"unknown sampler {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    steps: int
    max_over_mean: dict[str, tuple[float, float]]  # measure -> (mean over steps, worst step)
    efficiency: float


def figures(items: Items, steps: list[Step], model: WorkModel) -> Figures:
    measures = {"tokens": [], "attention": [], "padded slots": [], "work": []}
    real_total, slowest_total = 0.0, 0.0
    for step in steps:
        per_rank = {k: [] for k in measures}
        real = 0.0
        for rank in step:
            mbs = [micro_batch(items, mb) for mb in rank]
            per_rank["tokens"].append(sum(m.tokens for m in mbs))
            per_rank["attention"].append(sum(m.attention for m in mbs))
            per_rank["padded slots"].append(sum(m.slots for m in mbs))
            per_rank["work"].append(sum(m.computed_work(model) for m in mbs))
            real += sum(m.real_work(model) for m in mbs)
        for k, values in per_rank.items():
            v = np.asarray(values, dtype=np.float64)
            measures[k].append(v.max() / v.mean() if v.mean() > 0 else 1.0)
        real_total += real
        slowest_total += len(step) * max(per_rank["work"])
    return Figures(
        steps=len(steps),
        max_over_mean={k: (float(np.mean(v)), float(np.max(v))) for k, v in measures.items()},
        efficiency=real_total / slowest_total if slowest_total else 1.0,
    )


def datasets() -> dict[str, np.ndarray]:
    from benchmarks.bench_packing import shared_lengths

    data = shared_lengths()
    return {"all (pooled)": np.concatenate(list(data.values())), **data}


def run(unsloth, names: list[str] | None = None) -> tuple[list[list[object]], list[list[object]]]:
    """(main table on the pooled data, per-dataset table at 8 ranks)."""
    model = WorkModel()
    main_rows, per_dataset = [], []
    for name, lengths in datasets().items():
        if names and name not in names:
            continue
        pooled = name == "all (pooled)"
        for layout in LAYOUTS:
            items = layout_items(lengths, layout)
            effs = {}
            for world in WORLD_SIZES if pooled else (8,):
                for sampler in SAMPLERS:
                    got = sampler_steps(sampler, items, world, unsloth)
                    if got is None:
                        if pooled:
                            main_rows.append([layout, world, sampler, "not run", "", "", "", "", "", ""])
                        effs[sampler] = "not run"
                        continue
                    steps, seconds = got
                    if not steps:
                        continue
                    f = figures(items, steps, model)
                    effs[sampler] = f"{f.efficiency:.4f}"
                    if pooled:
                        mm = f.max_over_mean
                        row = [layout, world, sampler, f.steps,
                               *(f"{mm[k][0]:.4f} / {mm[k][1]:.3f}" for k in ("tokens", "attention", "padded slots",
                                                                               "work")),
                               f"{f.efficiency:.4f}", f"{seconds * 1e3:.3f}"]
                        main_rows.append(row)
                        print(" | ".join(str(c) for c in row), flush=True)
            if not pooled and effs:
                per_dataset.append([name, layout, len(items.segments), *(effs.get(s, "") for s in SAMPLERS)])
                print(per_dataset[-1], flush=True)
    return main_rows, per_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unsloth-src", default=None,
                        help="the unsloth package folder whose utils/token_budget.py to load (default: the installed "
                             "package, found without importing it)")
    parser.add_argument("--unsloth-import", action="store_true",
                        help="import unsloth (needs a GPU) instead of loading its token_budget.py on its own")
    parser.add_argument("--datasets", nargs="*", default=None, help="only these datasets (names as in the table)")
    args = parser.parse_args(argv)
    unsloth = unsloth_module(args.unsloth_src, args.unsloth_import)
    if isinstance(unsloth, str):
        print(f"Unsloth's balancer not run here: {unsloth}", flush=True)
        unsloth_note = f"Unsloth's balancer was **not run** here: {unsloth}."
    else:
        how = "imported with unsloth" if args.unsloth_import else f"loaded on its own from {unsloth.__file__}"
        unsloth_note = f"Unsloth {unsloth_version(unsloth)}: `balance_step_indices` {how}."
    main_rows, per_dataset = run(unsloth, args.datasets)
    header = ["layout", "ranks", "sampler", "steps", "tokens max/mean (mean / worst)",
              "attention max/mean", "padded slots max/mean", "work max/mean", "step efficiency",
              "plan ms per window"]
    intro = (
        f"Global batch: ranks x {GRAD_ACCUM} micro-batches x (8 samples, or 1 packed row of {CAPACITY}); seed {SEED}, "
        "epoch 0, full steps only. max/mean: the busiest rank over the mean rank per optimizer step (mean over the "
        "steps / worst step; 1.0 = every rank does the same). *work*: tokens + attention / 53,248 on the slots "
        "computed. *step efficiency*: real work / (ranks x slowest rank's computed work) over the epoch. "
        "The module docstring of benchmarks/bench_sampler.py defines each sampler and figure. " + unsloth_note)
    sections = [("All shared datasets pooled", intro + "\n\n" + markdown_table(header, main_rows))]
    sections.append((
        "Step efficiency at 8 ranks, per dataset",
        markdown_table(["dataset", "layout", "items", *SAMPLERS], per_dataset),
    ))
    command = "python benchmarks/bench_sampler.py" + (" " + " ".join(argv) if argv else "")
    packages = ("numpy", "numba", "torch", "transformers", "trl", "accelerate")
    path = write_result("sampler", "Rank balance of DDP batch samplers, peers in the same run", sections,
                        header=machine_header(packages, command=command))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
