// Best-fit decreasing and first-fit decreasing bin packing (spec: pack_bfd / pack_ffd in _python/pack.py).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <memory>
#include <utility>
#include <vector>

#include "detail.hpp"
#include "packing.hpp"

namespace opensloth {
namespace {

using detail::HierBitset;

// Open bins with free space > 0, by free-space value: a bitset over the values says which are held, and each held
// value has a FIFO of bins (an intrusive singly linked list through next[]; a bin is in at most one queue).
template <class Idx>
class DenseFreeSpace {
public:
    DenseFreeSpace(int64_t capacity, Idx* next)
        : bits_(static_cast<uint64_t>(capacity)),
          // Free space 0 and capacity are never queued: values [1, capacity) need capacity slots. head_ and tail_
          // are read only where the bitset says the value is held, so they need no initialisation.
          head_(new Idx[static_cast<size_t>(capacity)]),
          tail_(new Idx[static_cast<size_t>(capacity)]),
          next_(next) {}

    // Smallest held free space >= size, or -1.
    int64_t find(int64_t size) { return bits_.find_next(static_cast<uint64_t>(size)); }

    Idx pop(int64_t space) {
        const Idx b = head_[space];
        if (b == tail_[space]) {
            bits_.clear(static_cast<uint64_t>(space));
        } else {
            head_[space] = next_[b];
        }
        return b;
    }

    void push(int64_t space, Idx b) {
        if (bits_.test(static_cast<uint64_t>(space))) {
            next_[tail_[space]] = b;
        } else {
            head_[space] = b;
            bits_.set(static_cast<uint64_t>(space));
        }
        tail_[space] = b;
    }

    // Calls f(space, bin) for every queued bin.
    template <class F>
    void for_each(F&& f) const {
        bits_.for_each([&](uint64_t space) {
            for (Idx b = head_[space];; b = next_[b]) {
                f(static_cast<int64_t>(space), b);
                if (b == tail_[space]) break;
            }
        });
    }

private:
    HierBitset bits_;
    std::unique_ptr<Idx[]> head_;
    std::unique_ptr<Idx[]> tail_;
    Idx* next_;
};

// The same structure for capacities too large for per-value arrays: an ordered map over the held values.
template <class Idx>
class SparseFreeSpace {
public:
    explicit SparseFreeSpace(Idx* next) : next_(next) {}

    int64_t find(int64_t size) {
        found_ = queues_.lower_bound(size);
        return found_ == queues_.end() ? -1 : found_->first;
    }

    // Must follow the find() that returned `space`.
    Idx pop(int64_t /*space*/) {
        auto& q = found_->second;
        const Idx b = q.first;
        if (b == q.second) {
            queues_.erase(found_);
        } else {
            q.first = next_[b];
        }
        return b;
    }

    void push(int64_t space, Idx b) {
        auto it = queues_.lower_bound(space);
        if (it != queues_.end() && it->first == space) {
            next_[it->second.second] = b;
            it->second.second = b;
        } else {
            queues_.emplace_hint(it, space, std::make_pair(b, b));
        }
    }

    template <class F>
    void for_each(F&& f) const {
        for (const auto& q : queues_) {
            for (Idx b = q.second.first;; b = next_[b]) {
                f(q.first, b);
                if (b == q.second.second) break;
            }
        }
    }

private:
    std::map<int64_t, std::pair<Idx, Idx>> queues_;  // free space -> (head, tail)
    typename std::map<int64_t, std::pair<Idx, Idx>>::iterator found_;
    Idx* next_;
};

// CSR arrays from the bin of each placed item (placement order), keeping placement order inside every bin.
template <class Idx>
PackResult make_plan(const Idx* order, const Idx* bin_of_step, int64_t n, Int64Array&& bin_lengths) {
    PackResult out;
    const size_t n_bins = bin_lengths.size();
    auto& ptr = out.bin_ptr;
    ptr.assign(n_bins + 1, 0);
    for (int64_t t = 0; t < n; ++t) ++ptr[static_cast<size_t>(bin_of_step[t]) + 1];
    for (size_t b = 0; b < n_bins; ++b) ptr[b + 1] += ptr[b];
    // ptr[b] serves as bin b's write cursor; afterwards it holds bin b's end, so shift back by one.
    out.items.resize(static_cast<size_t>(n));
    int64_t* items = out.items.data();
    for (int64_t t = 0; t < n; ++t) items[ptr[static_cast<size_t>(bin_of_step[t])]++] = order[t];
    for (size_t b = n_bins; b > 0; --b) ptr[b] = ptr[b - 1];
    ptr[0] = 0;
    out.bin_lengths = std::move(bin_lengths);
    return out;
}

// Walks the items in placement order as runs of equal length; bin_of_step[t] receives the bin of the t-th item.
// Bin lengths are not tracked per item: at the end a bin is full unless it sits in a free-space queue.
template <class Idx, class FreeSpace>
Int64Array bfd_loop(const detail::Runs& runs, int64_t capacity, FreeSpace& free_space, Idx* bin_of_step) {
    Idx n_bins = 0;
    Idx* step = bin_of_step;
    for (const auto& run : runs) {
        const int64_t size = run.first;
        for (int64_t c = 0; c < run.second; ++c) {
            const int64_t found = free_space.find(size);
            Idx b;
            int64_t left;
            if (found < 0) {
                b = n_bins++;
                left = capacity - size;
            } else {
                b = free_space.pop(found);
                left = found - size;
            }
            *step++ = b;
            if (left > 0) free_space.push(left, b);
        }
    }
    Int64Array bin_lengths(static_cast<size_t>(n_bins), capacity);
    free_space.for_each([&](int64_t space, Idx b) { bin_lengths[static_cast<size_t>(b)] = capacity - space; });
    return bin_lengths;
}

template <class Idx>
PackResult pack_bfd_impl(const int64_t* lengths, int64_t n, int64_t capacity, detail::MinMax range) {
    const size_t size = static_cast<size_t>(n);
    detail::Scratch<Idx> order(0, size), bin_of_step(1, size), next(2, size);  // next: queue links, one per bin
    detail::Runs runs;
    detail::descending_order<Idx>(lengths, n, range.min, range.max, order.get(), &runs);
    Int64Array bin_lengths;
    if (detail::dense_range(capacity, n)) {
        DenseFreeSpace<Idx> free_space(capacity, next.get());
        bin_lengths = bfd_loop(runs, capacity, free_space, bin_of_step.get());
    } else {
        SparseFreeSpace<Idx> free_space(next.get());
        bin_lengths = bfd_loop(runs, capacity, free_space, bin_of_step.get());
    }
    return make_plan(order.get(), bin_of_step.get(), n, std::move(bin_lengths));
}

template <class Idx, class Value>
PackResult pack_ffd_impl(const int64_t* lengths, int64_t n, int64_t capacity, detail::MinMax range) {
    const size_t size = static_cast<size_t>(n);
    detail::Scratch<Idx> order(0, size), bin_of_step(1, size);
    detail::Runs runs;
    detail::descending_order<Idx>(lengths, n, range.min, range.max, order.get(), &runs);
    // First fit never opens a bin while an open one fits the item, so at most one bin ends at most half full:
    // n_bins <= floor(2 * sum / capacity) + 1. A tree over that many slots finds the same leftmost bins.
    uint64_t sum = 0;
    for (const auto& run : runs) {
        const uint64_t part = static_cast<uint64_t>(run.first) * static_cast<uint64_t>(run.second);
        sum = (run.second > 0 && part / static_cast<uint64_t>(run.second) != static_cast<uint64_t>(run.first)) ||
                      sum + part < sum
                  ? std::numeric_limits<uint64_t>::max()
                  : sum + part;
    }
    size_t max_bins = size;
    if (sum <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / 2) {
        max_bins = std::min<size_t>(size, static_cast<size_t>(2 * sum / static_cast<uint64_t>(capacity)) + 1);
    }
    size_t leaves = 1;
    while (leaves < max_bins) leaves *= 2;
    // Max free space per subtree; slots not yet opened hold the capacity, so the leftmost slot that fits is an
    // open bin or the next new one.
    detail::Scratch<Value> tree(2, 2 * leaves);
    std::fill(tree.get(), tree.get() + 2 * leaves, static_cast<Value>(capacity));
    Idx n_bins = 0;
    Idx* step = bin_of_step.get();
    for (const auto& run : runs) {
        const Value length = static_cast<Value>(run.first);
        for (int64_t c = 0; c < run.second; ++c) {
            if (tree[1] < length) throw std::logic_error("pack_ffd: no slot fits (internal error)");
            size_t node = 1;
            while (node < leaves) node = tree[2 * node] >= length ? 2 * node : 2 * node + 1;
            const Idx b = static_cast<Idx>(node - leaves);
            if (b == n_bins) ++n_bins;
            *step++ = b;
            tree[node] -= length;
            for (node >>= 1; node != 0; node >>= 1) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
        }
    }
    Int64Array bin_lengths(static_cast<size_t>(n_bins));
    for (Idx b = 0; b < n_bins; ++b) bin_lengths[static_cast<size_t>(b)] = capacity - tree[leaves + b];
    return make_plan(order.get(), bin_of_step.get(), n, std::move(bin_lengths));
}

// Exact fit over the distinct lengths as ranks, longest first: a bitset of the ranks that still have items answers
// "longest remaining length <= limit" (the first set rank at or after the first rank whose length is <= limit);
// the shortest remaining length only grows, so a pointer tracks it. Items of one length go out in index order.
template <class Idx>
PackResult pack_exact_fit_impl(const int64_t* lengths, int64_t n, int64_t capacity, detail::MinMax range) {
    const size_t size = static_cast<size_t>(n);
    detail::Scratch<Idx> order(0, size);
    detail::Runs runs;
    detail::descending_order<Idx>(lengths, n, range.min, range.max, order.get(), &runs);
    const int64_t d = static_cast<int64_t>(runs.size());
    std::vector<int64_t> value(runs.size()), next_pos(runs.size()), remaining(runs.size());
    int64_t start = 0;
    for (size_t r = 0; r < runs.size(); ++r) {
        value[r] = runs[r].first;
        remaining[r] = runs[r].second;
        next_pos[r] = start;
        start += runs[r].second;
    }
    // rank_at_most(v): the first rank whose length is <= v (d when none): a table for small capacities, else a
    // binary search over the descending distinct lengths.
    std::vector<int32_t> table;
    if (detail::dense_range(capacity, n)) {
        table.resize(static_cast<size_t>(capacity) + 1);
        int64_t r = 0;
        for (int64_t v = capacity; v >= 0; --v) {
            while (r < d && value[static_cast<size_t>(r)] > v) ++r;
            table[static_cast<size_t>(v)] = static_cast<int32_t>(r);
        }
    }
    auto rank_at_most = [&](int64_t v) -> int64_t {
        if (v < 0) return d;
        if (!table.empty()) return table[static_cast<size_t>(v)];
        return std::partition_point(value.begin(), value.end(), [v](int64_t x) { return x > v; }) - value.begin();
    };
    HierBitset held(static_cast<uint64_t>(d));
    for (int64_t r = 0; r < d; ++r) held.set(static_cast<uint64_t>(r));
    // First rank at or after r0 that still has items, or -1.
    auto longest_from = [&](int64_t r0) -> int64_t {
        return r0 < d ? held.find_next(static_cast<uint64_t>(r0)) : -1;
    };

    PackResult out;
    out.items.resize(size);
    out.bin_ptr.push_back(0);
    int64_t placed = 0;
    int64_t shortest = d - 1;  // rank of the shortest remaining length; -1 once every item is placed
    while (shortest >= 0) {
        int64_t r = held.find_next(0);
        int64_t gap = capacity;
        for (;;) {
            const size_t ru = static_cast<size_t>(r);
            out.items[static_cast<size_t>(placed++)] = order[static_cast<size_t>(next_pos[ru]++)];
            if (--remaining[ru] == 0) {
                held.clear(static_cast<uint64_t>(r));
                while (shortest >= 0 && remaining[static_cast<size_t>(shortest)] == 0) --shortest;
            }
            gap -= value[ru];
            if (gap <= 0 || shortest < 0) break;
            r = rank_at_most(gap);
            if (r < d && value[static_cast<size_t>(r)] == gap && remaining[static_cast<size_t>(r)] > 0) continue;
            r = longest_from(rank_at_most(gap - value[static_cast<size_t>(shortest)]));
            if (r < 0) r = longest_from(rank_at_most(gap));
            if (r < 0) break;
        }
        out.bin_lengths.push_back(capacity - gap);
        out.bin_ptr.push_back(placed);
    }
    return out;
}

detail::MinMax check_pack_input(const int64_t* lengths, int64_t n, int64_t capacity) {
    detail::require(n >= 1, "lengths is empty");
    detail::require(capacity >= 1, "capacity must be >= 1");
    return detail::check_range(lengths, n, 1, capacity, "lengths");
}

}  // namespace

PackResult pack_bfd(const int64_t* lengths, int64_t n, int64_t capacity) {
    const auto range = check_pack_input(lengths, n, capacity);
    if (n < std::numeric_limits<int32_t>::max()) return pack_bfd_impl<int32_t>(lengths, n, capacity, range);
    return pack_bfd_impl<int64_t>(lengths, n, capacity, range);
}

PackResult pack_ffd(const int64_t* lengths, int64_t n, int64_t capacity) {
    const auto range = check_pack_input(lengths, n, capacity);
    const bool small_index = n < std::numeric_limits<int32_t>::max();
    if (capacity <= std::numeric_limits<int32_t>::max()) {
        return small_index ? pack_ffd_impl<int32_t, int32_t>(lengths, n, capacity, range)
                           : pack_ffd_impl<int64_t, int32_t>(lengths, n, capacity, range);
    }
    return small_index ? pack_ffd_impl<int32_t, int64_t>(lengths, n, capacity, range)
                       : pack_ffd_impl<int64_t, int64_t>(lengths, n, capacity, range);
}

PackResult pack_exact_fit(const int64_t* lengths, int64_t n, int64_t capacity) {
    const auto range = check_pack_input(lengths, n, capacity);
    if (n < std::numeric_limits<int32_t>::max()) return pack_exact_fit_impl<int32_t>(lengths, n, capacity, range);
    return pack_exact_fit_impl<int64_t>(lengths, n, capacity, range);
}

}  // namespace opensloth
