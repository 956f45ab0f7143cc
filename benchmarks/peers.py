"""Thin adapters to the peers the packing benchmarks compare against, and our own implementations of the baseline
algorithms where a peer is an algorithm rather than a package.

Packing peers (each returns a list of bins, a bin being a list of item indices):

- LightBinPack (``pip install lightbinpack``): ``obfd`` and ``ogbfd`` (C++, pybind11; they take a Python list).
- TRL: ``trl_bfd_loop`` runs the bin-assignment part of ``trl.data_utils._pack_bfd`` on the lengths alone (the pyarrow
  sort, then TRL's own ``_SegmentTree`` with a FIFO of bins per free space; over numpy scalars as TRL does, or over
  Python ints), and ``trl_pack_dataset`` runs
  ``trl.data_utils.pack_dataset(strategy="bfd")`` on a ``datasets.Dataset`` built by ``token_dataset``.
- Axolotl (``pip install --no-deps axolotl``): ``axolotl_pack`` runs ``axolotl.utils.samplers.multipack.pack_group``
  as Axolotl's ``MultipackBatchSampler`` does by default (first fit in the order given, groups of 100,000 samples,
  at most 200 samples per bin, safe mode), one group after another in this process (one core).

Batch-partition baselines (each returns a list of ``num_batches`` index arrays):

- ``sort_then_chunk``: sort by length descending, cut into equal-count chunks.
- ``random_batches``: shuffle, cut into equal-count chunks.
- ``padded_partition_dp``: the exact minimum of sum over batches of (longest x size), by the textbook O(K W^2)
  dynamic programme over the length-descending order, vectorised with numpy.
- ``lpt``: longest processing time first (each item, largest first, to the currently lightest part).
- ``karmarkar_karp``: multiway largest differencing as verl describes it for sequence balancing (each item starts
  as a K-way partial partition; the two partial partitions with the largest spread are merged, heaviest part with
  lightest part, until one remains; ``equal_size`` seeds it with groups of K consecutive sorted items so every part
  gets the same count). Written here from the description, not copied.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Packing peers
# ---------------------------------------------------------------------------------------------------------------


def lightbinpack_obfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """LightBinPack's optimised BFD (C++). ``lengths`` as a Python list (pybind11 reads a list fastest)."""
    from lightbinpack import obfd

    return obfd(lengths, capacity)


def lightbinpack_ogbfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """LightBinPack's grouped BFD with one bin per group (its default), flattened to a list of bins."""
    from lightbinpack import ogbfd

    return [b for group in ogbfd(lengths, capacity) for b in group]


def trl_bfd_loop(lengths: np.ndarray, capacity: int, python_ints: bool = False) -> list[list[int]]:
    """The bin assignment of ``trl.data_utils._pack_bfd`` on the lengths alone.

    Same steps as TRL: sort (length, id) structs descending with pyarrow, then for each item ask TRL's
    ``_SegmentTree`` for the smallest free space that fits, take the oldest bin with that free space from a FIFO per
    free-space value (a new bin when the answer is the full capacity), and re-file the bin under its new free space.
    Only the table handling around it (filtering, truncation, the final ``take``) is left out. Like TRL, the loop
    runs over numpy scalars (``to_numpy()``); ``python_ints=True`` converts them to Python ints first (``tolist()``),
    a variant that runs the same loop faster.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from trl.data_utils import _SegmentTree

    lens = pa.array(lengths)
    ids = np.arange(len(lengths))
    order = pc.make_struct(lens, ids).sort("descending", by=0)
    tree = _SegmentTree(capacity)
    tree.add(capacity)
    by_space: dict[int, deque] = defaultdict(deque)
    bins: list[dict] = []
    sizes, ids = order.field(0).to_numpy(), order.field(1).to_numpy()
    if python_ints:
        sizes, ids = sizes.tolist(), ids.tolist()
    for length, idx in zip(sizes, ids):
        space = tree.search(length)
        if space < capacity:
            b = by_space[space].popleft()
            if not by_space[space]:
                tree.remove(space)
        else:
            b = {"ids": [], "length": 0}
            bins.append(b)
        b["ids"].append(idx)
        b["length"] += length
        space -= length
        by_space[space].append(b)
        if space > 0:
            tree.add(space)
    return [b["ids"] for b in bins]


def token_dataset(lengths: np.ndarray):
    """A ``datasets.Dataset`` with an ``input_ids`` column of the given lengths (token ids are zeros), built from
    arrow arrays without Python lists, so building it is cheap and not part of any timing."""
    import datasets
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int32))
    if offsets[-1] < 2**31:
        column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    else:
        column = pa.LargeListArray.from_arrays(pa.array(offsets), values)
    return datasets.Dataset(pa.table({"input_ids": column}))


def trl_pack_dataset(dataset, capacity: int, batch_size: int | None = 1000):
    """``trl.data_utils.pack_dataset(dataset, capacity, strategy="bfd")``; ``batch_size`` is the map batch (TRL's
    default 1000 rows packs each 1000-row chunk on its own; ``None`` packs the whole dataset in one batch)."""
    from trl.data_utils import pack_dataset

    kwargs = {} if batch_size == 1000 else {"map_kwargs": {"batch_size": batch_size}}
    return pack_dataset(dataset, capacity, strategy="bfd", **kwargs)


def axolotl_pack(lengths: np.ndarray, capacity: int, group_size: int = 100_000,
                 bin_size: int = 200) -> list[list[int]]:
    """Axolotl's default multipack packing: ``pack_group`` (numba first fit, in the given order) per group of
    ``group_size`` samples, at most ``bin_size`` samples per bin, safe mode (Axolotl's defaults)."""
    from axolotl.utils.samplers.multipack import pack_group

    bins: list[list[int]] = []
    for start in range(0, len(lengths), group_size):
        group = lengths[start : start + group_size]
        bins.extend(pack_group(group, start, capacity, len(group), bin_size, True))
    return bins


def axolotl_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("axolotl")
    except metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------------------------------
# Batch-partition and balancing baselines
# ---------------------------------------------------------------------------------------------------------------


def _descending(lengths: np.ndarray) -> np.ndarray:
    return np.argsort(-lengths, kind="stable")


def sort_then_chunk(lengths: np.ndarray, num_batches: int) -> list[np.ndarray]:
    """Sort by length descending, then cut into ``num_batches`` chunks of (nearly) equal count."""
    return np.array_split(_descending(lengths), num_batches)


def random_batches(lengths: np.ndarray, num_batches: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_batches`` chunks of (nearly) equal count."""
    return np.array_split(np.random.default_rng(seed).permutation(len(lengths)), num_batches)


def padded_partition_dp(lengths: np.ndarray, num_batches: int) -> list[np.ndarray]:
    """Exact minimum of sum over batches of (longest x size) by the plain O(K W^2) dynamic programme.

    With items sorted descending (s[0] >= s[1] >= ...), an optimal split is contiguous, and a batch holding sorted
    items i..j-1 costs s[i] * (j - i). dp[k][j] = min over i of dp[k-1][i] + s[i] * (j - i); each layer is one
    W x W numpy minimum. Batches come back longest first.
    """
    order = _descending(lengths)
    s = lengths[order].astype(np.int64)
    w, k_total = len(s), num_batches
    inf = np.int64(1) << np.int64(62)
    i_idx = np.arange(w + 1)[:, None]
    j_idx = np.arange(w + 1)[None, :]
    width = j_idx - i_idx
    s_ext = np.append(s, 0)[:, None]
    valid = width > 0
    cost = np.where(valid, s_ext * width, inf)
    prev = np.full(w + 1, inf, dtype=np.int64)
    prev[0] = 0
    choices = np.empty((k_total, w + 1), dtype=np.int64)
    for k in range(k_total):
        total = np.where(valid & (prev[:, None] < inf), prev[:, None] + cost, inf)
        choices[k] = np.argmin(total, axis=0)
        prev = total[choices[k], np.arange(w + 1)]
    cuts = [w]
    for k in range(k_total - 1, -1, -1):
        cuts.append(int(choices[k][cuts[-1]]))
    cuts.reverse()
    return [order[cuts[b] : cuts[b + 1]] for b in range(k_total)]


def lpt(costs: np.ndarray, num_parts: int) -> list[np.ndarray]:
    """Longest processing time first: items by cost descending, each to the part with the smallest total so far."""
    heap = [(0, p) for p in range(num_parts)]
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for i in _descending(costs).tolist():
        total, p = heapq.heappop(heap)
        parts[p].append(i)
        heapq.heappush(heap, (total + int(costs[i]), p))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def karmarkar_karp(costs: np.ndarray, num_parts: int, equal_size: bool = False) -> list[np.ndarray]:
    """Multiway Karmarkar-Karp (largest differencing method), in the form verl uses to balance sequence lengths.

    A state is a K-way partial partition: K (sum, items) parts kept sorted by sum. Every item (or, with
    ``equal_size``, every group of K consecutive items in sorted order, one item per part) starts as a state. The two
    states with the largest spread (max sum - min sum) are popped and merged part by part, the heaviest part of one
    with the lightest of the other, which cancels as much of both spreads as possible; the merged state goes back on
    the heap. The last state is the answer. With ``equal_size`` the item count must be a multiple of K.
    """
    n, k = len(costs), num_parts
    if equal_size and n % k:
        raise ValueError(f"equal_size needs the item count ({n}) to be a multiple of num_parts ({k})")
    order = np.argsort(costs, kind="stable").tolist()
    vals = costs.tolist()
    heap: list = []
    counter = 0

    def push(parts: list[tuple[int, list[int]]]) -> None:
        nonlocal counter
        parts.sort(key=lambda p: p[0])
        # heapq is a min-heap: key on minus the spread; the counter keeps ties deterministic (and avoids comparing
        # part lists).
        heapq.heappush(heap, (-(parts[-1][0] - parts[0][0]), counter, parts))
        counter += 1

    if equal_size:
        for g in range(0, n, k):
            push([(vals[i], [i]) for i in order[g : g + k]])
    else:
        for i in order:
            push([(vals[i], [i])] + [(0, []) for _ in range(k - 1)])
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # a and b are sorted ascending by sum: pair a's lightest with b's heaviest, and so on.
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        push(merged)
    parts = heap[0][2]
    return [np.sort(np.asarray(items, dtype=np.int64)) for _, items in parts]
