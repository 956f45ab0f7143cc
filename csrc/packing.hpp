// Packing core of OpenSloth: plain C++17, no Python, one file per algorithm. The pure-Python backend
// (opensloth/packing/_python/, one module per algorithm like these files) is the specification; every function here
// returns exactly what it returns, tie-breaks included. Inputs are validated by the Python layer; the functions
// below re-check what memory safety depends on and throw std::invalid_argument otherwise.
#pragma once

#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace opensloth {

// An allocator whose value-less construct leaves the element uninitialised, so resize() on an output buffer that
// is about to be overwritten costs no zero fill.
template <class T>
struct UninitAllocator : std::allocator<T> {
    using value_type = T;
    template <class U>
    struct rebind {
        using other = UninitAllocator<U>;
    };
    UninitAllocator() = default;
    template <class U>
    UninitAllocator(const UninitAllocator<U>&) noexcept {}
    template <class U>
    void construct(U* p) noexcept(std::is_nothrow_default_constructible<U>::value) {
        ::new (static_cast<void*>(p)) U;
    }
    template <class U, class... Args>
    void construct(U* p, Args&&... args) {
        ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
};

using Int64Array = std::vector<int64_t, UninitAllocator<int64_t>>;

struct PackResult {
    Int64Array bin_ptr;      // n_bins + 1
    Int64Array items;        // n, grouped by bin, placement order inside a bin
    Int64Array bin_lengths;  // n_bins
};

struct PartitionResult {
    bool feasible = false;
    Int64Array batch_ptr;  // num_batches + 1
    Int64Array items;      // n, length descending then index ascending
};

struct BalanceResult {
    Int64Array part_ptr;  // num_parts + 1
    Int64Array items;     // n, each part's indices ascending
};

// Best-fit decreasing with FIFO ties among bins of equal free space. lengths[i] in [1, capacity].
PackResult pack_bfd(const int64_t* lengths, int64_t n, int64_t capacity);

// First-fit decreasing (leftmost bin that fits, by a max segment tree over bin slots).
PackResult pack_ffd(const int64_t* lengths, int64_t n, int64_t capacity);

// Exact fit: one bin at a time, opened with the longest remaining item, then an exact fit for the gap, else the
// longest item that leaves a gap the shortest remaining item can fill, else the longest that fits.
PackResult pack_exact_fit(const int64_t* lengths, int64_t n, int64_t capacity);

// Exact minimum of sum over batches of (longest x size); cap == 0 means no cap on longest x size. At most `rows`
// rows of split points are held at once (0: all); fewer rows recompute blocks of the DP, with the same result.
PartitionResult partition_padded(const int64_t* lengths, int64_t n, int64_t num_batches, int64_t cap,
                                 int64_t rows = 0);

// The better of LPT and k-way Karmarkar-Karp (LPT on a tie), then swap refinement. costs[i] >= 0.
BalanceResult balance(const int64_t* costs, int64_t n, int64_t num_parts, bool equal_count);

}  // namespace opensloth
