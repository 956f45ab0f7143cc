"""BalancedBatchSampler: one plan on every rank, every item once per epoch, equal micro-batch counts, the same samples
in every optimizer step at every world size, balanced rank work (each step within 0.1% of the best split of its items
on packed rows of the shared data), exact resume, and the accelerate/Trainer plumbing."""

from __future__ import annotations

import numpy as np
import pytest

from opensloth.sampler import BalancedBatchSampler, WorkModel


def _lengths(n=203, seed=0, high=500):
    return np.random.default_rng(seed).integers(1, high, n)


def _make(lengths, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("grad_accum", 3)
    kw.setdefault("world_size", 4)
    kw.setdefault("seed", 7)
    return BalancedBatchSampler(lengths, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Structure of a plan
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [True, False])
def test_every_item_once_per_epoch_and_equal_micro_batches(drop_last):
    lengths = _lengths()
    s = _make(lengths, drop_last=drop_last)
    plan = s.plan()
    world, grad_accum, size = 4, 3, 2
    per_step = world * grad_accum * size
    items = np.concatenate([mb for step in plan.steps for rank in step for mb in rank])
    counts = np.bincount(items, minlength=len(lengths))
    if drop_last:
        assert counts.max() == 1
        assert len(lengths) - counts.sum() == len(lengths) % per_step  # only the partial step is dropped
        assert plan.num_steps == len(lengths) // per_step
    else:
        # 203 = 8 x 24 + 11: the last step holds the 11 remaining items, no repeats (each rank 2 or 3 of them)
        assert counts.min() == counts.max() == 1
        assert plan.num_steps == len(lengths) // per_step + 1
    for s_i, step in enumerate(plan.steps):
        assert len(step) == world
        n_batches = {len(rank) for rank in step}
        assert len(n_batches) == 1  # every rank the same number of micro-batches
        last = s_i == plan.num_steps - 1
        assert n_batches.pop() == grad_accum or (last and not drop_last)
        if last and not drop_last:  # 11 items over 4 ranks: 2 micro-batches of 1-2 items per rank
            assert sorted(len(mb) for rank in step for mb in rank) == [1] * 5 + [2] * 3
        else:
            assert all(len(mb) == size for rank in step for mb in rank)
    assert len(s) == world * s.batches_per_rank() == sum(len(r) for st in plan.steps for r in st)


def test_plan_is_the_same_for_every_rank_and_deterministic():
    lengths = _lengths()
    plans = [_make(lengths, rank=r) for r in range(4)] + [_make(lengths)]
    reference = plans[-1].plan()
    for s in plans:
        p = s.plan()
        assert [[[mb.tolist() for mb in r] for r in st] for st in p.steps] == \
            [[[mb.tolist() for mb in r] for r in st] for st in reference.steps]
    for r in range(4):
        assert [b for b in plans[r]] == [mb.tolist() for mb in reference.rank_batches(r)]
    # Global mode interleaves step by step, micro-batch by micro-batch, rank by rank (what BatchSamplerShard deals).
    flat = list(plans[-1])
    for r in range(4):
        assert flat[r::4] == [mb.tolist() for mb in reference.rank_batches(r)]


def test_set_epoch_changes_the_plan_and_the_seed_is_respected():
    lengths = _lengths()
    s = _make(lengths)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(0)
    assert list(s) == e0 and e1 != e0
    assert list(_make(lengths, seed=8)) != e0


def test_exact_resume_from_a_step():
    lengths = _lengths()
    full = _make(lengths, rank=1)
    full.set_epoch(2)
    uninterrupted = list(full)
    steps = full.num_steps
    for k in (0, 1, steps // 2, steps):
        resumed = _make(lengths, rank=1)
        resumed.load_state_dict({"epoch": 2, "start_step": k, "seed": 7})
        assert list(resumed) == uninterrupted[k * 3 :]
        assert list(resumed) == uninterrupted  # the start step applies to one iteration only
    glob = _make(lengths)
    glob.set_epoch(2)
    everything = list(glob)
    glob.set_start_step(3)
    assert list(glob) == everything[3 * 3 * 4 :]


def test_validation_errors_name_the_value():
    with pytest.raises(ValueError, match="batch_size = 0"):
        BalancedBatchSampler([1, 2], batch_size=0)
    with pytest.raises(ValueError, match=r"rank = 4 .*world_size=4"):
        BalancedBatchSampler([1] * 8, batch_size=1, world_size=4, rank=4)
    with pytest.raises(ValueError, match="needs world_size x grad_accum x batch_size = 2 x 2 x 2 = 8"):
        BalancedBatchSampler([1] * 5, batch_size=2, grad_accum=2, world_size=2)
    with pytest.raises(ValueError, match=r"lengths\[1\] = -3"):
        BalancedBatchSampler([1, -3], batch_size=1)
    with pytest.raises(ValueError, match="step = 99"):
        _make(_lengths()).set_start_step(99)
    assert BalancedBatchSampler([1] * 5, batch_size=2, grad_accum=2, world_size=2, drop_last=False).num_steps == 1


# ---------------------------------------------------------------------------------------------------------------
# The same samples in every optimizer step at every world size (one loss curve on 1 and N GPUs)
# ---------------------------------------------------------------------------------------------------------------

# (world_size, grad_accum, batch_size) with the same global batch of 16 items per optimizer step.
_LAYOUTS_16 = [(1, 16, 1), (1, 8, 2), (1, 4, 4), (2, 8, 1), (2, 4, 2), (4, 2, 2), (4, 4, 1), (8, 2, 1), (8, 1, 2)]


def _step_sets(plan):
    return [plan.step_items(k).tolist() for k in range(plan.num_steps)]


def _synthetic_rows(n, seed=0, capacity=512):
    """Packed rows: per-row sample lengths that nearly fill ``capacity``, with some partly filled rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        budget = int(capacity * rng.uniform(0.3, 1.0)) if rng.random() < 0.2 else capacity
        row = []
        while budget > 8:
            length = int(min(budget, rng.integers(8, 200)))
            row.append(length)
            budget -= length
        rows.append(row or [8])
    return rows


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("kind", ["samples", "rows"])
def test_every_step_trains_the_same_samples_at_every_world_size(kind, drop_last):
    # Nine full steps and 8 items left: every layout's last step can hold exactly those 8 (with one item per
    # micro-batch the ranks must divide the remainder; test_last_step_repeats_items_only_when... covers the rest).
    n = 16 * 9 + 8
    source = dict(lengths=_lengths(n, seed=4, high=2000)) if kind == "samples" else \
        dict(seq_lengths=_synthetic_rows(n, seed=4))
    reference = None
    for world, grad_accum, batch in _LAYOUTS_16:
        for epoch in (0, 1):
            s = BalancedBatchSampler(batch_size=batch, grad_accum=grad_accum, world_size=world, seed=5,
                                     drop_last=drop_last, **source)
            plan = s.plan(epoch)
            assert plan.num_steps == 9 + (not drop_last)
            sets = _step_sets(plan)
            if reference is None:
                reference = {}
            if epoch in reference:
                assert sets == reference[epoch], (world, grad_accum, batch, epoch)
            else:
                reference[epoch] = sets
            # the step's items are the permutation's consecutive chunk: never a repeat, all items once per epoch
            everything = np.concatenate([plan.step_items(k) for k in range(plan.num_steps)])
            assert len(np.unique(everything)) == len(everything) == (n - 8 if drop_last else n)
    assert reference[0] != reference[1]


def test_balancing_across_steps_is_an_opt_in_that_changes_the_steps(monkeypatch):
    lengths = _lengths(16 * 20, seed=6, high=3000)
    per_step = [_step_sets(BalancedBatchSampler(lengths, batch_size=2, grad_accum=8 // w, world_size=w, seed=1).plan())
                for w in (1, 2, 4, 8)]
    assert all(p == per_step[0] for p in per_step)
    mixed = [_step_sets(BalancedBatchSampler(lengths, batch_size=2, grad_accum=8 // w, world_size=w, seed=1,
                                             balance_across_steps=True).plan()) for w in (2, 4, 8)]
    assert all(m != per_step[0] for m in mixed)  # the opt-in trains other samples per step
    monkeypatch.setenv("OPENSLOTH_BALANCE_ACROSS_STEPS", "1")
    from_env = BalancedBatchSampler(lengths, batch_size=2, grad_accum=4, world_size=2, seed=1)
    assert from_env.balance_across_steps and _step_sets(from_env.plan()) == mixed[0]


def test_last_step_repeats_items_only_when_a_rank_would_get_none():
    # 16 items per step, 3 left: 4 ranks x 1 micro-batch need 4 items, so one item of the permutation's start repeats
    s = BalancedBatchSampler(_lengths(19), batch_size=2, grad_accum=2, world_size=4, seed=0, drop_last=False)
    last = s.plan().steps[-1]
    assert [len(rank) for rank in last] == [1] * 4 and all(len(mb) == 1 for rank in last for mb in rank)
    first_step = set(s.plan().step_items(0).tolist())
    repeated = s.plan().step_items(1)
    assert len(repeated) == 4 and len(set(repeated.tolist()) & first_step) == 1
    # the same 3 items at world size 1 (one micro-batch of 2 and one of 1), with no repeat
    s1 = BalancedBatchSampler(_lengths(19), batch_size=2, grad_accum=8, world_size=1, seed=0, drop_last=False)
    assert [len(mb) for mb in s1.plan().steps[-1][0]] == [2, 1]
    assert set(s1.plan().step_items(1).tolist()) < set(repeated.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Balance
# ---------------------------------------------------------------------------------------------------------------


def test_work_model():
    wm = WorkModel(attn_tokens=100)
    assert wm.sample_work([10, 100]).tolist() == [11.0, 200.0]
    assert wm.row_work([[10, 100], [5]]).tolist() == [211.0, 5.25]
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16)
    derived = WorkModel.for_config(config)
    assert WorkModel.for_config(SimpleNamespace()) == WorkModel()
    # hidden 64, intermediate 128, 4 heads x 16, 2 kv heads: linear 2 (64*64 + 2*64*32 + 64*64 + 3*64*128) per
    # token, attention 2 * 64 per token per unit length.
    assert derived.attn_tokens == pytest.approx(2 * (4096 + 4096 + 4096 + 24576) / 128)


def test_row_capacity_counts_the_padding_tail_as_work():
    rows = [[100, 200, 700], [1000], [50], [300, 300]]  # capacity 1000: one full, one 5% full
    wm = WorkModel(attn_tokens=1000)
    s = BalancedBatchSampler(seq_lengths=rows, batch_size=1, world_size=2, row_capacity=1000, work_model=wm)
    # a row's work: its segments, plus its tail as a segment of its own (computed by the padded collation)
    expected = [wm.batch_work(r) for r in ([100, 200, 700], [1000], [50, 950], [300, 300, 400])]
    assert s.work.tolist() == pytest.approx(expected)
    assert s.work[2] > 0.9 * s.work[1] > BalancedBatchSampler(seq_lengths=rows, batch_size=1, work_model=wm).work[2]
    with pytest.raises(ValueError, match=r"seq_lengths\[0\] sums to 1000 tokens, above row_capacity = 999"):
        BalancedBatchSampler(seq_lengths=rows, batch_size=1, row_capacity=999)
    with pytest.raises(ValueError, match="row_capacity applies to packed rows"):
        BalancedBatchSampler([5, 6], batch_size=1, row_capacity=10)


def _packed_rows(lengths, capacity):
    from opensloth.packing import pack_lengths

    lengths = np.minimum(lengths, capacity)
    plan = pack_lengths(lengths, capacity)
    return [lengths[b] for b in plan.bins()]


def _best_equal_count_split(work: np.ndarray, world: int) -> float:
    """Brute force: the smallest max/mean over every split of ``work`` into ``world`` parts of equal count."""
    import itertools

    k = len(work) // world
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
            left = tuple(i for i in rest if i not in others)
            search(left, max(current_max, work[[first, *others]].sum()))

    search(tuple(range(len(work))), 0.0)
    return best / (work.sum() / world)


@pytest.mark.parametrize("capacity", [2048, 4096])
@pytest.mark.parametrize("world,grad_accum,batch", [(2, 2, 2), (2, 1, 1), (4, 1, 2)])
def test_rank_work_near_the_best_split_of_each_step_on_packed_shared_data(shared_token_lengths, capacity, world,
                                                                        grad_accum, batch):
    """A step's items are fixed (the same at every world size), so the best a sampler can do is the best
    equal-count split of those items over the ranks: every step of the plan comes within 0.1% of it (brute force),
    on rows packed from each shared dataset."""
    for name, lengths in shared_token_lengths.items():
        rows = _packed_rows(lengths, capacity)
        if len(rows) < world * grad_accum * batch * 2:
            continue
        s = BalancedBatchSampler(seq_lengths=rows, batch_size=batch, grad_accum=grad_accum, world_size=world, seed=0)
        for epoch in (0, 1):
            plan = s.plan(epoch)
            ratio = plan.max_over_mean()
            # Independent recomputation of the rank work from the rows.
            wm = WorkModel()
            for k, step in enumerate(plan.steps):
                work = [sum(wm.batch_work(rows[i]) for mb in rank for i in mb) for rank in step]
                assert max(work) / np.mean(work) == pytest.approx(ratio[k], rel=1e-9)
                best = _best_equal_count_split(s.work[plan.step_items(k)], world)
                assert best - 1e-12 <= ratio[k] <= best + 1e-3, (name, capacity, epoch, k, ratio[k], best)


def test_unpacked_samples_are_balanced_as_far_as_lengths_allow(shared_token_lengths):
    for name, lengths in shared_token_lengths.items():
        s = BalancedBatchSampler(lengths, batch_size=4, grad_accum=2, world_size=2, seed=0)
        ratio = s.plan().max_over_mean()
        assert ratio.mean() <= 1.01, (name, ratio.mean())
        # Against a plain random split of the same steps, the balanced plan is never worse on average.
        rng = np.random.default_rng(0)
        order = rng.permutation(len(lengths))[: s.num_steps * 16].reshape(s.num_steps, 2, 8)
        work = s.work[order].sum(-1)
        assert ratio.mean() <= (work.max(1) / work.mean(1)).mean()


# ---------------------------------------------------------------------------------------------------------------
# Plumbing: accelerate's sharding, set_epoch and skip_first_batches (checkpoint resume)
# ---------------------------------------------------------------------------------------------------------------


def _prepared(sampler, rank, world):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(sampler.num_items)), batch_sampler=sampler, collate_fn=list)
    loader = prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False)
    if world > 1:
        loader.batch_sampler.sampler = sampler  # what use_balanced_sampler does after accelerator.prepare
    return loader


@pytest.mark.parametrize("world", [1, 2])
def test_accelerate_sharding_gives_each_rank_its_plan(world):
    lengths = _lengths(61)
    for rank in range(world):
        s = BalancedBatchSampler(lengths, batch_size=2, grad_accum=2, world_size=world, seed=3, drop_last=False)
        loader = _prepared(s, rank, world)
        assert len(loader) == s.batches_per_rank()
        assert list(loader) == [mb.tolist() for mb in s.plan().rank_batches(rank)]
        # set_epoch through the DataLoaderShard reaches the sampler, also after skip_first_batches.
        from accelerate.data_loader import skip_first_batches

        loader.set_epoch(1)
        assert s.epoch == 1
        skipped = skip_first_batches(loader, 2)
        skipped.set_epoch(4)
        assert s.epoch == 4
        assert list(skipped) == [mb.tolist() for mb in s.plan(4).rank_batches(rank)][2:]


def test_trainer_plumbing_single_process(tmp_path):
    """use_balanced_sampler on a real Trainer: its train dataloader yields the plan's batches, and the Trainer
    counts the plan's steps."""
    from transformers import Trainer, TrainingArguments

    from opensloth.patching.dataloader import use_balanced_sampler
    from tests._models import tiny_qwen3

    rng = np.random.default_rng(0)
    data = [{"input_ids": rng.integers(1, 200, int(n)).tolist(), "idx": i}
            for i, n in enumerate(rng.integers(2, 30, 37))]
    seen = []

    def collate(features):
        seen.append([f["idx"] for f in features])
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": (ids != 0).long()}

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, remove_unused_columns=False, seed=5, num_train_epochs=1,
                             dataloader_drop_last=True)
    trainer = Trainer(model=tiny_qwen3(), args=args, train_dataset=data, data_collator=collate)
    sampler = use_balanced_sampler(trainer)
    assert [len(f["input_ids"]) for f in data] == sampler.lengths.astype(int).tolist()
    loader = trainer.get_train_dataloader()
    list(loader)
    assert seen == [mb.tolist() for mb in sampler.plan().rank_batches(0)]
    assert len(loader) == sampler.batches_per_rank() == (37 // 6) * 2
