// Balance items over parts (spec: _python/balance.py): LPT and k-way Karmarkar-Karp, the better one (LPT on a
// tie), then swap refinement between the heaviest and the lightest part.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <queue>
#include <stdexcept>
#include <utility>
#include <vector>

#include "detail.hpp"
#include "packing.hpp"

namespace opensloth {
namespace {

using Parts = std::vector<std::vector<int64_t>>;

// Longest processing time first: each item (descending cost) to the lightest eligible part, lowest index on a tie.
// With equal_count a part holds at most q = n / k items, or q + 1 for the first r = n % k parts to reach q + 1.
Parts lpt(const int64_t* costs, const std::vector<int64_t>& order, int64_t k, bool equal_count) {
    const int64_t n = static_cast<int64_t>(order.size());
    const int64_t q = n / k;
    const int64_t r = n % k;
    Parts parts(static_cast<size_t>(k));
    using Entry = std::pair<int64_t, int64_t>;  // (load, part): lightest first, lowest index on a tie
    std::vector<Entry> init(static_cast<size_t>(k));
    for (int64_t p = 0; p < k; ++p) init[static_cast<size_t>(p)] = {0, p};
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap(std::greater<Entry>(), std::move(init));
    int64_t big = 0;  // parts holding q + 1 items
    for (const int64_t idx : order) {
        Entry e;
        for (;;) {
            if (heap.empty()) throw std::logic_error("balance: LPT ran out of parts (internal error)");
            e = heap.top();
            heap.pop();
            const int64_t count = static_cast<int64_t>(parts[static_cast<size_t>(e.second)].size());
            if (!equal_count || count < q || (count == q && big < r)) break;
            // A part with q items once r parts hold q + 1 can never take another: it leaves the heap for good.
        }
        auto& part = parts[static_cast<size_t>(e.second)];
        part.push_back(idx);
        const int64_t size = static_cast<int64_t>(part.size());
        if (size == q + 1) ++big;
        if (!equal_count || size <= q) heap.push({e.first + costs[idx], e.second});
    }
    return parts;
}

// Largest differencing method, k-way. A state is k subsets sorted by sum descending (stable). Initial states are
// implicit (one item, or with equal_count one group of k items of the descending order); merged states live in
// reusable slots of k sums and k (head, tail) item lists linked through next_item.
class KarmarkarKarp {
public:
    KarmarkarKarp(const int64_t* costs, const std::vector<int64_t>& order, int64_t k, bool equal_count)
        : costs_(costs), order_(order), k_(k), equal_count_(equal_count),
          n_(static_cast<int64_t>(order.size())), next_item_(order.size(), -1) {
        n_init_ = equal_count ? (n_ + k - 1) / k : n_;
    }

    Parts run() {
        const size_t k = static_cast<size_t>(k_);
        // Without equal_count the initial states (one item each, spread = its cost, or 0 when k == 1) already come
        // in heap order, s ascending: they stay in that stream and the heap holds only merged states, which are
        // created later and so lose every tie to them.
        const bool stream = !equal_count_;
        std::vector<HeapEntry> init(stream ? 0 : static_cast<size_t>(n_init_));
        for (size_t s = 0; s < init.size(); ++s) {
            const auto seq = static_cast<int64_t>(s);
            init[s] = {sum(seq, 0) - sum(seq, k_ - 1), seq};
        }
        std::priority_queue<HeapEntry> heap(std::less<HeapEntry>(), std::move(init));
        int64_t next_init = stream ? 0 : n_init_;
        auto pop = [&]() {
            if (next_init < n_init_) {
                const HeapEntry first{sum(next_init, 0) - sum(next_init, k_ - 1), next_init};
                if (heap.empty() || heap.top() < first) return next_init++;
            }
            const int64_t s = heap.top().seq;
            heap.pop();
            return s;
        };
        int64_t serial = n_init_;
        std::vector<int64_t> sums(k), heads(k), tails(k), rank(k);
        while (static_cast<int64_t>(heap.size()) + (n_init_ - next_init) > 1) {
            const int64_t a = pop();
            const int64_t b = pop();
            for (size_t i = 0; i < k; ++i) {
                const int64_t j = k_ - 1 - static_cast<int64_t>(i);
                sums[i] = sum(a, static_cast<int64_t>(i)) + sum(b, j);
                int64_t ha, ta, hb, tb;
                list(a, static_cast<int64_t>(i), ha, ta);
                list(b, j, hb, tb);
                if (ha < 0) {
                    ha = hb;
                    ta = tb;
                } else if (hb >= 0) {
                    next_item_[static_cast<size_t>(ta)] = hb;
                    ta = tb;
                }
                heads[i] = ha;
                tails[i] = ta;
            }
            for (size_t i = 0; i < k; ++i) rank[i] = static_cast<int64_t>(i);
            auto heavier = [&sums](int64_t x, int64_t y) {
                return sums[static_cast<size_t>(x)] > sums[static_cast<size_t>(y)];
            };
            if (k <= 64) {  // insertion sort (stable) for the usual few parts: std::stable_sort allocates per call
                for (size_t i = 1; i < k; ++i) {
                    const int64_t x = rank[i];
                    size_t j = i;
                    for (; j > 0 && heavier(x, rank[j - 1]); --j) rank[j] = rank[j - 1];
                    rank[j] = x;
                }
            } else {
                std::stable_sort(rank.begin(), rank.end(), heavier);
            }
            release(a);
            release(b);
            const size_t slot = acquire();
            int64_t* out_sums = &slot_sums_[slot * k];
            int64_t* out_heads = &slot_heads_[slot * k];
            int64_t* out_tails = &slot_tails_[slot * k];
            for (size_t i = 0; i < k; ++i) {
                const size_t from = static_cast<size_t>(rank[i]);
                out_sums[i] = sums[from];
                out_heads[i] = heads[from];
                out_tails[i] = tails[from];
            }
            slot_of_.push_back(static_cast<int64_t>(slot));
            heap.push({out_sums[0] - out_sums[k - 1], serial++});
        }
        const int64_t last = heap.empty() ? next_init : heap.top().seq;
        Parts parts(k);
        for (size_t i = 0; i < k; ++i) {
            int64_t head, tail;
            list(last, static_cast<int64_t>(i), head, tail);
            if (head < 0) continue;
            for (int64_t v = head;; v = next_item_[static_cast<size_t>(v)]) {
                parts[i].push_back(v);
                if (v == tail) break;
            }
        }
        return parts;
    }

private:
    struct HeapEntry {
        int64_t spread;
        int64_t seq;
        // priority_queue pops the largest: the largest spread, then the state created first.
        bool operator<(const HeapEntry& o) const { return spread < o.spread || (spread == o.spread && seq > o.seq); }
    };

    int64_t initial_item(int64_t s, int64_t i) const {
        if (equal_count_) {
            const int64_t pos = s * k_ + i;
            return pos < n_ ? order_[static_cast<size_t>(pos)] : -1;
        }
        return i == 0 ? order_[static_cast<size_t>(s)] : -1;
    }

    int64_t sum(int64_t s, int64_t i) const {
        if (s < n_init_) {
            const int64_t item = initial_item(s, i);
            return item >= 0 ? costs_[item] : 0;
        }
        return slot_sums_[static_cast<size_t>(slot_of_[static_cast<size_t>(s - n_init_)]) * static_cast<size_t>(k_) +
                          static_cast<size_t>(i)];
    }

    void list(int64_t s, int64_t i, int64_t& head, int64_t& tail) const {
        if (s < n_init_) {
            head = tail = initial_item(s, i);
            return;
        }
        const size_t at = static_cast<size_t>(slot_of_[static_cast<size_t>(s - n_init_)]) * static_cast<size_t>(k_) +
                          static_cast<size_t>(i);
        head = slot_heads_[at];
        tail = slot_tails_[at];
    }

    size_t acquire() {
        if (!free_slots_.empty()) {
            const size_t slot = free_slots_.back();
            free_slots_.pop_back();
            return slot;
        }
        const size_t slot = slot_sums_.size() / static_cast<size_t>(k_);
        slot_sums_.resize(slot_sums_.size() + static_cast<size_t>(k_));
        slot_heads_.resize(slot_heads_.size() + static_cast<size_t>(k_));
        slot_tails_.resize(slot_tails_.size() + static_cast<size_t>(k_));
        return slot;
    }

    void release(int64_t s) {
        if (s >= n_init_) free_slots_.push_back(static_cast<size_t>(slot_of_[static_cast<size_t>(s - n_init_)]));
    }

    const int64_t* costs_;
    const std::vector<int64_t>& order_;
    int64_t k_;
    bool equal_count_;
    int64_t n_;
    int64_t n_init_;
    std::vector<int64_t> next_item_;
    std::vector<int64_t> slot_of_;  // merged state (serial - n_init) -> slot
    std::vector<int64_t> slot_sums_, slot_heads_, slot_tails_;
    std::vector<size_t> free_slots_;
};

int64_t max_load(const int64_t* costs, const Parts& parts) {
    int64_t best = 0;
    for (const auto& p : parts) {
        int64_t load = 0;
        for (const int64_t i : p) load += costs[i];
        best = std::max(best, load);
    }
    return best;
}

void sorted_remove(std::vector<int64_t>& v, int64_t x) { v.erase(std::lower_bound(v.begin(), v.end(), x)); }
void sorted_insert(std::vector<int64_t>& v, int64_t x) { v.insert(std::lower_bound(v.begin(), v.end(), x), x); }

// Swap refinement (spec: _refine). Each round takes, over a in H (ascending) and b in L (-1 = a plain move, first,
// then ascending), the first candidate with the smallest |2d - g|, where d = c[a] - c[b] must satisfy 0 < d < g.
// For a fixed a the best b has c[b] nearest c[a] - g/2, so a sorted copy of L's costs replaces the spec's scan over
// all pairs, with the same result.
void refine(const int64_t* costs, int64_t n, Parts& parts, bool equal_count) {
    const size_t k = parts.size();
    std::vector<int64_t> loads(k, 0);
    for (size_t p = 0; p < k; ++p) {
        std::sort(parts[p].begin(), parts[p].end());
        for (const int64_t i : parts[p]) loads[p] += costs[i];
    }
    std::vector<std::pair<int64_t, int64_t>> light_items;  // (cost, index), -1 for the move
    std::vector<int64_t> values, first_index;               // distinct costs of L, smallest index holding each
    for (int64_t round = 0; round < n; ++round) {
        size_t heavy = 0, light = 0;
        for (size_t p = 1; p < k; ++p) {
            if (loads[p] > loads[heavy]) heavy = p;
            if (loads[p] < loads[light]) light = p;
        }
        const int64_t gap = loads[heavy] - loads[light];
        if (gap <= 1) break;
        const auto& h_items = parts[heavy];
        light_items.clear();
        if (!equal_count) light_items.push_back({0, -1});
        for (const int64_t i : parts[light]) light_items.push_back({costs[i], i});
        if (h_items.empty() || light_items.empty()) break;
        std::sort(light_items.begin(), light_items.end());
        values.clear();
        first_index.clear();
        for (const auto& e : light_items) {
            if (values.empty() || values.back() != e.first) {
                values.push_back(e.first);
                first_index.push_back(e.second);
            }
        }
        const int64_t half_up = gap - gap / 2;
        int64_t best_score = -1, best_a = -1, best_b = -1, best_moved = 0;
        for (const int64_t a : h_items) {
            const int64_t ca = costs[a];
            int64_t score = -1, b = -1, moved = 0;
            auto consider = [&](size_t pos) {
                const int64_t d = ca - values[pos];
                if (d <= 0 || d >= gap) return;
                // |2d - g| without overflow: the true value lies in (-g, g).
                int64_t s = detail::wrap_sub(detail::wrap_add(d, d), gap);
                if (s < 0) s = -s;
                if (score < 0 || s < score || (s == score && first_index[pos] < b)) {
                    score = s;
                    b = first_index[pos];
                    moved = d;
                }
            };
            // Largest c[b] <= c[a] - ceil(g/2) (d >= g/2) and smallest c[b] >= c[a] - floor(g/2) (d <= g/2).
            const auto lo = std::upper_bound(values.begin(), values.end(), ca - half_up);
            if (lo != values.begin()) consider(static_cast<size_t>(lo - values.begin()) - 1);
            const auto hi = std::lower_bound(values.begin(), values.end(), ca - gap / 2);
            if (hi != values.end()) consider(static_cast<size_t>(hi - values.begin()));
            if (score >= 0 && (best_score < 0 || score < best_score)) {
                best_score = score;
                best_a = a;
                best_b = b;
                best_moved = moved;
            }
        }
        if (best_score < 0) break;
        sorted_remove(parts[heavy], best_a);
        sorted_insert(parts[light], best_a);
        if (best_b >= 0) {
            sorted_remove(parts[light], best_b);
            sorted_insert(parts[heavy], best_b);
        }
        loads[heavy] -= best_moved;
        loads[light] += best_moved;
    }
}

}  // namespace

BalanceResult balance(const int64_t* costs, int64_t n, int64_t num_parts, bool equal_count) {
    detail::require(n >= 1, "costs is empty");
    detail::require(num_parts >= 1, "num_parts must be >= 1");
    // Every sum of costs must fit in int64.
    const auto range = detail::check_range(costs, n, 0, std::numeric_limits<int64_t>::max() / n, "costs");
    std::vector<int64_t> order(static_cast<size_t>(n));
    detail::descending_order<int64_t>(costs, n, range.min, range.max, order.data());

    Parts lpt_parts = lpt(costs, order, num_parts, equal_count);
    Parts kk_parts = KarmarkarKarp(costs, order, num_parts, equal_count).run();
    Parts parts = max_load(costs, lpt_parts) <= max_load(costs, kk_parts) ? std::move(lpt_parts) : std::move(kk_parts);
    refine(costs, n, parts, equal_count);

    BalanceResult out;
    out.part_ptr.assign(parts.size() + 1, 0);
    out.items.reserve(static_cast<size_t>(n));
    for (size_t p = 0; p < parts.size(); ++p) {
        out.part_ptr[p + 1] = out.part_ptr[p] + static_cast<int64_t>(parts[p].size());
        out.items.insert(out.items.end(), parts[p].begin(), parts[p].end());
    }
    return out;
}

}  // namespace opensloth
