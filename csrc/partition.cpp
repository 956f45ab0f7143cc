// Exact padded partition (spec: _python/partition.py): f[k][j] = min_i f[k-1][i] + s[i] * (j - i) by
// divide and conquer over j, with the spec's smallest-argmin rule, INF convention and numpy's wrapping int64
// products.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "detail.hpp"
#include "packing.hpp"

namespace opensloth {
namespace {

constexpr int64_t kInf = int64_t{1} << 62;

struct Range {
    int64_t j_lo, j_hi, i_lo, i_hi;
};

#if defined(__SIZEOF_INT128__)
#define OPENSLOTH_HULL 1
// One DP row by a monotone lower envelope (valid only in the Monge, overflow-free case; see partition_impl).
// Line i (i in [k-1, n-1]) is y_i(x) = s[i] * x + c_i with c_i = prev[i] - s[i] * i, available from x = i + 1;
// slopes are non-increasing in i and the queries x = j increase. The hull keeps, in index order, the lines that are
// the smallest-index minimiser somewhere; where line p+1 crosses below line p increases along it, so the answer
// at x is found by advancing while the next hull line is strictly lower (a tie keeps the smaller index).
template <class Arg>
void hull_row(const int64_t* s, const int64_t* prev, int64_t n, int64_t k, int64_t* cur, Arg* arg, int64_t* line,
              int64_t* slope, int64_t* c) {
    using i128 = __int128;
    int64_t size = 0, p = 0;
    for (int64_t j = k; j <= n; ++j) {
        const int64_t i = j - 1;  // the line that becomes available at x = j
        const int64_t si = s[i];
        const int64_t ci = prev[i] - si * i;
        bool keep = true;
        while (size > 0) {
            const int64_t sb = slope[size - 1];
            if (sb == si) {
                // Parallel: the later line is never the smallest-index minimiser unless strictly lower.
                if (ci >= c[size - 1]) {
                    keep = false;
                    break;
                }
                --size;
                continue;
            }
            if (size < 2) break;
            // Drop b when it never lies strictly below a (earlier) while not above i: crossing(a, b) >= crossing(b, i).
            const i128 lhs = static_cast<i128>(c[size - 1] - c[size - 2]) * static_cast<i128>(sb - si);
            const i128 rhs = static_cast<i128>(ci - c[size - 1]) * static_cast<i128>(slope[size - 2] - sb);
            if (lhs < rhs) break;
            --size;
        }
        if (keep) {
            line[size] = i;
            slope[size] = si;
            c[size] = ci;
            ++size;
        }
        if (p >= size) p = size - 1;
        int64_t best = c[p] + slope[p] * j;
        while (p + 1 < size) {
            const int64_t next = c[p + 1] + slope[p + 1] * j;
            if (next >= best) break;
            best = next;
            ++p;
        }
        cur[j] = best;
        arg[j] = static_cast<Arg>(line[p]);
    }
}
#endif

// Memory: `rows` (0 or >= num_batches - 1: all) rows of argmins at once, in blocks as the spec does: a first pass
// saves f before every block and leaves the last block's argmins in the buffer; each earlier block is recomputed
// from its saved row, last first, and backtracked.
template <class Arg>
PartitionResult partition_impl(const int64_t* lengths, int64_t n, int64_t num_batches, int64_t cap, int64_t rows,
                               detail::MinMax range) {
    using detail::wrap_add;
    using detail::wrap_mul;
    PartitionResult out;
    Int64Array order(static_cast<size_t>(n));
    detail::descending_order<int64_t>(lengths, n, range.min, range.max, order.data());
    std::vector<int64_t> s(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) s[static_cast<size_t>(i)] = lengths[order[static_cast<size_t>(i)]];
    const int64_t cap_value = cap == 0 ? kInf : cap;
    const size_t width = static_cast<size_t>(n) + 1;

    std::vector<int64_t> prev(width, kInf), cur(width);
    for (int64_t j = 1; j <= n; ++j) {
        const int64_t single = wrap_mul(s[0], j);
        prev[static_cast<size_t>(j)] = single <= cap_value ? single : kInf;
    }
    const int64_t steps = num_batches - 1;  // rows k = 2 .. num_batches
    if (rows <= 0 || rows > steps) rows = steps;
    const int64_t blocks = steps > 0 ? (steps + rows - 1) / rows : 0;
    // block[(k - start) * width + j]: start of the last batch in the best split of the first j items into k batches,
    // for the rows k of one block. Row k writes every j in [k, n] and the backtrack reads only those, so the buffer
    // needs no initialisation.
    detail::Scratch<Arg> block(0, static_cast<size_t>(std::max<int64_t>(rows, 1)) * width);
    std::vector<int64_t> saved(blocks > 1 ? static_cast<size_t>(blocks) * width : 0);  // f before each block
    // Without a binding cap and with s[0] * n < INF, every cell is finite, no product wraps, and the matrix
    // f[k-1][i] + s[i] * (j - i) is Monge, so the smallest minimising i is non-decreasing in j and the spec's
    // divide and conquer finds exactly the global smallest argmin at every cell. The lines
    // y_i(x) = s[i] * x + (f[k-1][i] - s[i] * i) then give the same argmins in O(n) per row (monotone hull).
#if defined(OPENSLOTH_HULL)
    const bool monge = s[0] <= (kInf - 1) / n && (cap == 0 || cap / n >= s[0]);
#else
    const bool monge = false;
#endif
    std::vector<int64_t> hull_line, hull_slope, intercept;
    if (monge) {
        hull_line.resize(width);
        hull_slope.resize(width);
        intercept.resize(width);
    }
    const int64_t* sp = s.data();

    // Row k of the DP from prev into cur, its argmins into arg; then prev holds row k.
    auto step = [&](int64_t k, Arg* arg) {
        const int64_t* base = prev.data();
#if defined(OPENSLOTH_HULL)
        if (monge) {
            hull_row(sp, base, n, k, cur.data(), arg, hull_line.data(), hull_slope.data(), intercept.data());
            prev.swap(cur);
            return;
        }
#endif
        std::fill(cur.begin(), cur.end(), kInf);
        // Depth-first over j ranges; every pop pushes two halves, so the stack never holds more than
        // 2 * log2(n) + 2 < 130 entries.
        Range stack[130];
        int depth = 0;
        stack[depth++] = {k, n, k - 1, n - 1};
        while (depth > 0) {
            const Range r = stack[--depth];
            if (r.j_lo > r.j_hi) continue;
            const int64_t mid = (r.j_lo + r.j_hi) / 2;
            const int64_t top = std::min(r.i_hi, mid - 1);
            // numpy argmin: the first occurrence of the minimum (= the smallest i); cells that are not ok
            // (over the cap, or an infeasible prefix) count as INF.
            auto total_at = [&](int64_t i) {
                const int64_t batch = wrap_mul(sp[i], mid - i);
                const int64_t b = base[i];
                return (batch <= cap_value && b < kInf) ? wrap_add(b, batch) : kInf;
            };
            int64_t best = total_at(r.i_lo);
            int64_t best_i = r.i_lo;
            for (int64_t i = r.i_lo + 1; i <= top; ++i) {
                const int64_t total = total_at(i);
                const bool lower = total < best;
                best = lower ? total : best;
                best_i = lower ? i : best_i;
            }
            if (best >= kInf) {
                best_i = top;
                best = kInf;
            }
            cur[static_cast<size_t>(mid)] = best;
            arg[mid] = static_cast<Arg>(best_i);
            stack[depth++] = {mid + 1, r.j_hi, best_i, r.i_hi};
            stack[depth++] = {r.j_lo, mid - 1, r.i_lo, best_i};
        }
        prev.swap(cur);
    };

    for (int64_t k = 2; k <= num_batches; ++k) {
        const int64_t r = (k - 2) % rows;
        if (blocks > 1 && r == 0) {
            std::copy(prev.begin(), prev.end(), saved.begin() + static_cast<std::ptrdiff_t>(((k - 2) / rows) * width));
        }
        step(k, block.get() + static_cast<size_t>(r) * width);
    }

    if (prev[static_cast<size_t>(n)] >= kInf) return out;
    out.feasible = true;
    out.batch_ptr.assign(static_cast<size_t>(num_batches) + 1, 0);
    int64_t j = n;
    out.batch_ptr[static_cast<size_t>(num_batches)] = n;
    for (int64_t b = blocks - 1; b >= 0; --b) {
        const int64_t start = 2 + b * rows;
        const int64_t end = std::min(start + rows - 1, num_batches);
        if (b != blocks - 1) {  // the last block's argmins are still in `block` from the first pass
            const auto from = saved.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(b) * width);
            std::copy(from, from + static_cast<std::ptrdiff_t>(width), prev.begin());
            for (int64_t k = start; k <= end; ++k) step(k, block.get() + static_cast<size_t>(k - start) * width);
        }
        for (int64_t k = end; k >= start; --k) {
            j = static_cast<int64_t>(block[static_cast<size_t>(k - start) * width + static_cast<size_t>(j)]);
            out.batch_ptr[static_cast<size_t>(k - 1)] = j;
        }
    }
    out.items = std::move(order);
    return out;
}

}  // namespace

PartitionResult partition_padded(const int64_t* lengths, int64_t n, int64_t num_batches, int64_t cap, int64_t rows) {
    detail::require(n >= 1, "lengths is empty");
    detail::require(num_batches >= 1 && num_batches <= n, "num_batches must be in [1, number of items]");
    detail::require(cap >= 0, "cap must be >= 0 (0 = no cap)");
    detail::require(rows >= 0, "rows must be >= 0 (0 = all)");
    const auto range =
        detail::check_range(lengths, n, 1, cap == 0 ? std::numeric_limits<int64_t>::max() : cap, "lengths");
    // Split points as 4 bytes while n + 1 positions fit in int32, like the other backends (the memory bound the
    // Python layer checks assumes it).
    if (n < std::numeric_limits<int32_t>::max()) {
        return partition_impl<uint32_t>(lengths, n, num_batches, cap, rows, range);
    }
    return partition_impl<int64_t>(lengths, n, num_batches, cap, rows, range);
}

}  // namespace opensloth
