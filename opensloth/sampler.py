"""Rank-balanced, deterministic, resumable batch plans for DDP, and the work model they balance.

Every rank computes the same plan from the dataset's lengths and the epoch seed, without talking to the others:
the permutation comes from a seeded numpy generator and the balancing from `opensloth.packing.balance`, whose
backends all return identical arrays. For each optimizer step every rank gets the same number of micro-batches,
and the ranks' total work for that step is as equal as the step's items allow.

How a plan is built, per epoch (the default, ``balance_across_steps=False``):

1. Permute the items with ``numpy.random.default_rng([seed, epoch])`` (the world size plays no part).
2. Cut the permutation into steps of ``G = world_size x grad_accum x batch_size`` items: step s trains items
   ``G s .. G (s + 1) - 1`` of the permutation. For a fixed global batch G, every optimizer step therefore trains the
   same samples at every world size, so one GPU (gradient accumulation) and N GPUs follow the same loss curve.
3. Inside each step, `balance` splits the step's items into ``world_size`` equal-count parts of near-equal work
   (one part per rank). Inside a rank's part, items are sorted by length (longest first, ties by index) and cut into
   ``grad_accum`` micro-batches of ``batch_size`` items (the least padding for padded collation).
4. The remainder (fewer than G items) is dropped (``drop_last=True``) or becomes one shorter last step
   (``drop_last=False``) that holds exactly those items, split over the ranks and cut into the same number of
   micro-batches on every rank (at most ``batch_size`` items each, sizes within one). Only when the remainder has
   fewer items than ``world_size`` x (micro-batches needed) are a few items of the permutation's start repeated, as
   accelerate does, so that every rank gets a non-empty micro-batch.

``balance_across_steps=True`` (opt-in; or ``OPENSLOTH_BALANCE_ACROSS_STEPS=1``) balances over windows of
``window_steps`` steps instead: the items of a window are split into equal-count slots of near-equal work, the
epoch's slots are sorted by work and grouped ``world_size`` at a time into steps, and the steps are shuffled. Ranks
are then balanced a little better (a step can take any of the window's items; benchmarks/results/sampler.md measures
by how much), but **each optimizer step trains other samples than at another world size, so the loss curve changes
with the world size**.

Under the HF Trainer, accelerate shards a batch sampler by handing batch ``i`` to rank ``i % world_size``
(``BatchSamplerShard``). With ``rank=None`` this sampler yields the global plan interleaved in exactly that order
(step by step, micro-batch by micro-batch, rank by rank), so accelerate's sharding gives each rank its own plan.
`opensloth.patching.dataloader.use_balanced_sampler` installs it on a trainer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

__all__ = [
    "BALANCE_ACROSS_STEPS_ENV",
    "DEFAULT_ATTN_TOKENS",
    "BalancedBatchSampler",
    "EpochPlan",
    "WorkModel",
]

# The sample length at which the attention term equals the linear (token) term, for a Llama-3-8B-like layer:
# linear FLOPs per token ~ 2 (4 h^2 + 3 h I) with GQA and I = 3.5 h, attention ~ 2 h l per token (causal).
DEFAULT_ATTN_TOKENS = 53_248
_COST_SCALE = 16  # balance() takes integer costs: work units of 1/16 token
# Opt-in to balancing over windows of steps (changes each step's samples with the world size).
BALANCE_ACROSS_STEPS_ENV = "OPENSLOTH_BALANCE_ACROSS_STEPS"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class WorkModel:
    """Relative compute of a forward+backward pass: ``work(l) = l + l^2 / attn_tokens`` per sample of length l.

    The first term is the linear layers (proportional to tokens), the second the causal attention (proportional to
    the sum of squared sample lengths; packed samples do not attend to each other, so a packed row's work is the sum
    over its samples). ``attn_tokens`` is the sample length at which both terms are equal; use `for_config` to
    derive it from a model config.
    """

    attn_tokens: float = DEFAULT_ATTN_TOKENS

    def __post_init__(self) -> None:
        if not (isinstance(self.attn_tokens, (int, float)) and np.isfinite(self.attn_tokens) and self.attn_tokens > 0):
            raise ValueError(f"attn_tokens = {self.attn_tokens!r} must be a positive finite number")

    @classmethod
    def for_config(cls, config: Any) -> WorkModel:
        """A work model from a transformers config (hidden, intermediate, attention heads); the default if unknown."""
        h = getattr(config, "hidden_size", None)
        inter = getattr(config, "intermediate_size", None)
        n_q = getattr(config, "num_attention_heads", None)
        if not all(isinstance(v, Integral) and v > 0 for v in (h, inter, n_q)):
            return cls()
        n_kv = getattr(config, "num_key_value_heads", None) or n_q
        head_dim = getattr(config, "head_dim", None) or h // n_q
        q_dim, kv_dim = n_q * head_dim, n_kv * head_dim
        linear = 2 * (h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter)
        attention_per_length = 2 * q_dim  # causal: half of (QK^T + AV) = 2 * 2 * q_dim * l / 2
        return cls(attn_tokens=float(linear) / attention_per_length)

    def sample_work(self, lengths: Any) -> np.ndarray:
        """Work of each sample (float64 array) from its length."""
        arr = np.asarray(lengths, dtype=np.float64)
        return arr + arr * arr / self.attn_tokens

    def batch_work(self, lengths: Any) -> float:
        """Total work of a batch of samples (padding excluded: padded slots are masked, not attended)."""
        return float(self.sample_work(lengths).sum()) if len(lengths) else 0.0

    def row_work(self, seq_lengths: Sequence[Sequence[int]]) -> np.ndarray:
        """Work of each packed row from its per-sample lengths."""
        return np.asarray([self.batch_work(np.asarray(s, dtype=np.float64)) for s in seq_lengths], dtype=np.float64)

    @staticmethod
    def costs(work: Any) -> np.ndarray:
        """Integer costs for `opensloth.packing.balance` (work in units of 1/16 token, at least 1)."""
        arr = np.asarray(work, dtype=np.float64)
        return np.maximum(np.rint(arr * _COST_SCALE), 1).astype(np.int64)


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One epoch's plan as index arrays.

    ``full[s, r, g]`` is the g-th micro-batch (``batch_size`` dataset indices) of rank r at optimizer step s, for the
    full steps; ``last[r][g]`` is the same for the shorter last step (None without one; its micro-batches may hold
    fewer items, see `BalancedBatchSampler`). ``rank_work[s, r]`` is the work of rank r at step s under the sampler's
    work model (the last step included).
    """

    epoch: int
    full: np.ndarray  # (steps, world, grad_accum, batch_size) int64
    last: list[list[np.ndarray]] | None  # [world][m] int64 arrays of 1..batch_size items
    rank_work: np.ndarray  # (num_steps, world) float64

    @property
    def num_steps(self) -> int:
        return self.full.shape[0] + (self.last is not None)

    @property
    def world_size(self) -> int:
        return self.full.shape[1]

    @property
    def steps(self) -> list[list[list[np.ndarray]]]:
        """``steps[s][r]``: rank r's micro-batches (index arrays) at step s."""
        out = [[list(rank) for rank in step] for step in self.full]
        if self.last is not None:
            out.append([list(rank) for rank in self.last])
        return out

    def step_items(self, step: int) -> np.ndarray:
        """The dataset indices step ``step`` trains, over all ranks, sorted (the step's sample set)."""
        if step < self.full.shape[0]:
            return np.sort(self.full[step].reshape(-1))
        if self.last is not None and step == self.full.shape[0]:
            return np.sort(np.concatenate([mb for rank in self.last for mb in rank]))
        raise IndexError(f"step {step} is out of range: the plan has {self.num_steps} steps")

    def rank_batches(self, rank: int, start_step: int = 0) -> list[np.ndarray]:
        """Rank ``rank``'s micro-batches in order, from optimizer step ``start_step``."""
        out = list(self.full[start_step:, rank].reshape(-1, self.full.shape[-1]))
        if self.last is not None and start_step <= self.full.shape[0]:
            out.extend(self.last[rank])
        return out

    def global_batches(self, start_step: int = 0) -> list[np.ndarray]:
        """All micro-batches interleaved the way accelerate's BatchSamplerShard deals them (batch i to rank i % W):
        step by step, micro-batch by micro-batch, rank by rank."""
        full = self.full[start_step:]
        out = list(full.transpose(0, 2, 1, 3).reshape(-1, full.shape[-1]))
        if self.last is not None and start_step <= self.full.shape[0]:
            out.extend(rank[g] for g in range(len(self.last[0])) for rank in self.last)
        return out

    def max_over_mean(self) -> np.ndarray:
        """Per step: the busiest rank's work over the mean rank work (1.0 = perfectly balanced)."""
        if self.num_steps == 0:
            return np.zeros(0)
        mean = self.rank_work.mean(axis=1)
        return np.where(mean > 0, self.rank_work.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)


def _as_lengths(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must hold finite numbers (dtype {arr.dtype})")
    if (arr < 0).any():
        i = int(np.argmax(arr < 0))
        raise ValueError(f"{name}[{i}] = {arr[i]} is negative; lengths and work are >= 0")
    return arr


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} = {value!r} must be a positive integer")
    return int(value)


class BalancedBatchSampler:
    """A batch sampler for DDP whose plan is identical on every rank and balanced across ranks per optimizer step.

    Give the dataset's per-item ``lengths`` (tokens), and optionally ``seq_lengths`` (per-item lists of packed
    sample lengths, for packed rows) or an explicit per-item ``work``; the work model turns lengths into work when
    no ``work`` is given. ``row_capacity`` (with ``seq_lengths``): the rows are collated padded to that many tokens
    (opensloth.collate's rows layout, Unsloth's static rows), so each row's padding tail is computed and counts as
    work (a segment of its own); leave it None when rows run without padding (a flat micro-batch).
    ``rank=None`` yields the global plan interleaved for accelerate's sharding (what the HF Trainer needs);
    ``rank=r`` yields only rank r's micro-batches (for a plain per-rank DataLoader).

    ``set_epoch(e)`` selects the epoch's permutation; ``set_start_step(k)`` makes the next iteration start at
    optimizer step k of the current epoch (exact resume: the same remaining batches as an uninterrupted run).
    ``drop_last=True`` drops the items that do not fill a whole step; ``drop_last=False`` adds one shorter last step
    with the same number of micro-batches on every rank (see the module docstring).

    Each optimizer step trains the same items whatever the world size (for a fixed world_size x grad_accum x
    batch_size): only their split over ranks and micro-batches changes. ``balance_across_steps=True`` (or, when the
    argument is left None, ``OPENSLOTH_BALANCE_ACROSS_STEPS=1`` in the environment) is the opt-in that balances over
    windows of ``window_steps`` steps instead, which changes which items each step trains, and so the loss curve,
    with the world size.
    """

    def __init__(
        self,
        lengths: Any = None,
        *,
        batch_size: int,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        seq_lengths: Sequence[Sequence[int]] | None = None,
        work: Any = None,
        work_model: WorkModel | None = None,
        window_steps: int = 32,
        shuffle: bool = True,
        balance_across_steps: bool | None = None,
        row_capacity: int | None = None,
    ) -> None:
        self.micro_batch_size = _positive_int(batch_size, "batch_size")
        self.grad_accum = _positive_int(grad_accum, "grad_accum")
        self.world_size = _positive_int(world_size, "world_size")
        self.window_steps = _positive_int(window_steps, "window_steps")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, Integral)
                                 or not 0 <= rank < self.world_size):
            raise ValueError(f"rank = {rank!r} must be None or an integer in [0, world_size={self.world_size})")
        self.rank = None if rank is None else int(rank)
        if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
            raise ValueError(f"seed = {seed!r} must be a non-negative integer")
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        if balance_across_steps is None:
            balance_across_steps = os.environ.get(BALANCE_ACROSS_STEPS_ENV, "0").strip().lower() in _TRUE
        self.balance_across_steps = bool(balance_across_steps)
        self.work_model = work_model or WorkModel()

        if row_capacity is not None and seq_lengths is None:
            raise ValueError("row_capacity applies to packed rows: give seq_lengths (per-row sample lengths) too")
        if seq_lengths is not None:
            rows = [np.asarray(s, dtype=np.int64) for s in seq_lengths]
            if not rows:
                raise ValueError("seq_lengths is empty; pass one list of sample lengths per dataset item")
            row_tokens = np.asarray([int(r.sum()) for r in rows], dtype=np.int64)
            if lengths is not None:
                lengths = _as_lengths(lengths, "lengths")
                if len(lengths) != len(rows):
                    raise ValueError(f"lengths has {len(lengths)} items but seq_lengths has {len(rows)}")
            else:
                lengths = row_tokens
            default_work = self.work_model.row_work(rows)
            if row_capacity is not None:
                # Rows collated to a fixed capacity compute their padding tail too (a segment of its own).
                capacity = _positive_int(row_capacity, "row_capacity")
                if row_tokens.max() > capacity:
                    i = int(np.argmax(row_tokens > capacity))
                    raise ValueError(f"seq_lengths[{i}] sums to {int(row_tokens[i])} tokens, above row_capacity = "
                                     f"{capacity}; give the capacity the rows were packed to")
                default_work = default_work + self.work_model.sample_work(capacity - row_tokens)
        elif lengths is not None:
            lengths = _as_lengths(lengths, "lengths")
            default_work = self.work_model.sample_work(lengths)
        elif work is not None:
            default_work = None
        else:
            raise ValueError("pass lengths, seq_lengths or work: the sampler balances the dataset's per-item work")
        if work is not None:
            work = _as_lengths(work, "work").astype(np.float64)
            if lengths is None:
                lengths = work
            elif len(work) != len(lengths):
                raise ValueError(f"work has {len(work)} items but lengths has {len(lengths)}")
        else:
            work = default_work
        self.lengths = np.asarray(lengths, dtype=np.float64)
        self.work = np.asarray(work, dtype=np.float64)
        self._costs = WorkModel.costs(self.work)
        self.num_items = len(self.work)
        per_step = self.items_per_step
        if self.drop_last and self.num_items < per_step:
            raise ValueError(
                f"the dataset has {self.num_items} items but one optimizer step needs world_size x grad_accum x "
                f"batch_size = {self.world_size} x {self.grad_accum} x {self.micro_batch_size} = {per_step}; "
                "use a smaller batch or gradient accumulation, or drop_last=False"
            )
        self.epoch = 0
        self._start_step = 0
        self._cache: EpochPlan | None = None

    # -- sizes --------------------------------------------------------------------------------------------------

    @property
    def items_per_step(self) -> int:
        return self.world_size * self.grad_accum * self.micro_batch_size

    def _last_step_batches(self) -> int:
        """Micro-batches per rank in the shorter last step (0 when there is none)."""
        rest = self.num_items % self.items_per_step
        if self.drop_last or rest == 0:
            return 0
        per_batch_round = self.world_size * self.micro_batch_size
        return -(-rest // per_batch_round)

    @property
    def num_steps(self) -> int:
        """Optimizer steps per epoch (the same on every rank)."""
        return self.num_items // self.items_per_step + (1 if self._last_step_batches() else 0)

    def batches_per_rank(self) -> int:
        """Micro-batches each rank gets per epoch."""
        return (self.num_items // self.items_per_step) * self.grad_accum + self._last_step_batches()

    def __len__(self) -> int:
        per_rank = self.batches_per_rank()
        return per_rank if self.rank is not None else per_rank * self.world_size

    # -- epoch and resume ---------------------------------------------------------------------------------------

    @property
    def sampler(self) -> BalancedBatchSampler:
        """Itself: accelerate's ``DataLoaderShard.set_epoch`` reaches a batch sampler through ``.sampler`` (also
        after ``skip_first_batches`` on resume), so this makes ``set_epoch`` arrive here in every wrapping."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses (call before each epoch, as the Trainer does)."""
        if isinstance(epoch, bool) or not isinstance(epoch, Integral) or epoch < 0:
            raise ValueError(f"epoch = {epoch!r} must be a non-negative integer")
        self.epoch = int(epoch)

    def set_start_step(self, step: int) -> None:
        """Make the next iteration start at optimizer step ``step`` of the current epoch (one iteration only)."""
        if isinstance(step, bool) or not isinstance(step, Integral) or not 0 <= step <= self.num_steps:
            raise ValueError(f"step = {step!r} must be an integer in [0, {self.num_steps}] (steps in this epoch)")
        self._start_step = int(step)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self._start_step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"checkpoint seed {state['seed']} differs from this sampler's seed {self.seed}")
        self.set_epoch(int(state["epoch"]))
        self.set_start_step(int(state.get("start_step", 0)))

    # -- the plan -----------------------------------------------------------------------------------------------

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The whole plan of an epoch (the current one by default); cached for the current epoch."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache.epoch == epoch:
            return self._cache
        plan = self._build(epoch)
        if epoch == self.epoch:
            self._cache = plan
        return plan

    def _build(self, epoch: int) -> EpochPlan:
        from opensloth.packing import balance

        rng = np.random.default_rng([self.seed, epoch])
        n, world, per_step = self.num_items, self.world_size, self.items_per_step
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        full_steps = n // per_step
        if self.balance_across_steps:
            full = self._mixed_steps(order, full_steps, rng, balance)
        else:
            full = np.empty((full_steps, world, self.grad_accum * self.micro_batch_size), dtype=np.int64)
            for s in range(full_steps):
                full[s] = self._slots(order[s * per_step : (s + 1) * per_step], world, balance)
            full = self._longest_first(full)
        full = full.reshape(full_steps, world, self.grad_accum, self.micro_batch_size)
        last = self._last_step(order, full_steps * per_step, balance)
        rank_work = self.work[full].sum(axis=(2, 3))
        if last is not None:
            last_work = [sum(float(self.work[mb].sum()) for mb in rank) for rank in last]
            rank_work = np.concatenate([rank_work, np.asarray([last_work], dtype=np.float64)])
        return EpochPlan(epoch=epoch, full=full, last=last, rank_work=rank_work)

    def _last_step(self, order: np.ndarray, start: int, balance) -> list[list[np.ndarray]] | None:
        """The shorter last step (drop_last=False): exactly the remaining items when each rank can get ``batches``
        non-empty micro-batches of them, else topped up from the permutation's start; None without a last step."""
        batches = self._last_step_batches()
        if not batches:
            return None
        world = self.world_size
        items = order[start:]
        if len(items) < world * batches:
            items = np.concatenate([items, np.resize(order, world * batches - len(items))])
        parts = [np.arange(len(items))] if world == 1 else \
            balance(self._costs[items], world, equal_count=True)
        last = []
        for part in parts:
            rank_items = items[part]
            rank_items = rank_items[np.lexsort((rank_items, -self.lengths[rank_items]))]
            last.append(np.array_split(rank_items, batches))
        return last

    def _mixed_steps(self, order: np.ndarray, full_steps: int, rng, balance) -> np.ndarray:
        """balance_across_steps: (steps, world, per_slot) slots balanced over windows of steps (changes which items
        each step trains)."""
        world, per_step = self.world_size, self.items_per_step
        per_slot = self.grad_accum * self.micro_batch_size
        # Slots: one rank's items for one step, of near-equal work inside each window of steps.
        slots = np.empty((full_steps * world, per_slot), dtype=np.int64)
        for start in range(0, full_steps, self.window_steps):
            m = min(self.window_steps, full_steps - start)
            items = order[start * per_step : (start + m) * per_step]
            slots[start * world : (start + m) * world] = self._slots(items, m * world, balance)
        # Steps: the slots sorted by work, W at a time, so the ranks of a step get slots of almost equal work
        # (this also pairs the few light slots, e.g. a packing's last, partly filled row, with each other).
        by_work = np.argsort(self._costs[slots].sum(axis=1), kind="stable")
        steps = slots[by_work].reshape(full_steps, world, per_slot)
        if self.shuffle:
            steps = steps[rng.permutation(steps.shape[0])]
            ranks = np.argsort(rng.random(steps.shape[:2]), axis=1)
            steps = np.take_along_axis(steps, ranks[:, :, None], axis=1)
        return self._longest_first(steps)

    def _slots(self, items: np.ndarray, n_slots: int, balance) -> np.ndarray:
        """(n_slots, len(items) // n_slots) equal-count groups of near-equal work."""
        if n_slots == 1:
            return items[None]
        if n_slots == len(items):
            return items[:, None]
        return np.stack([items[part] for part in balance(self._costs[items], n_slots, equal_count=True)])

    def _longest_first(self, slots: np.ndarray) -> np.ndarray:
        """Each slot's items longest first (ties by index), so that cutting a slot into consecutive micro-batches
        pads the least."""
        within = np.lexsort((slots, -self.lengths[slots]), axis=-1)
        return np.take_along_axis(slots, within, axis=-1)

    # -- iteration ----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan()
        start, self._start_step = self._start_step, 0
        batches = plan.global_batches(start) if self.rank is None else plan.rank_batches(self.rank, start)
        for batch in batches:
            yield batch.tolist()

    def __repr__(self) -> str:
        return (f"BalancedBatchSampler(items={self.num_items}, batch_size={self.micro_batch_size}, "
                f"grad_accum={self.grad_accum}, world_size={self.world_size}, rank={self.rank}, "
                f"steps={self.num_steps}, drop_last={self.drop_last}, "
                f"balance_across_steps={self.balance_across_steps})")
