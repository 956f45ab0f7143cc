// Internal helpers shared by the packing algorithms: bit scans, a hierarchical bitset, int64 arithmetic that
// wraps like numpy's, and the one sort order (length descending, index ascending).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "packing.hpp"

#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace opensloth {
namespace detail {

inline int ctz64(uint64_t x) {
#if defined(_MSC_VER)
    unsigned long i;
    _BitScanForward64(&i, x);
    return static_cast<int>(i);
#else
    return __builtin_ctzll(x);
#endif
}

// numpy int64 arithmetic wraps modulo 2^64; the spec computes some products with numpy, so do the same here
// (through unsigned arithmetic, which is defined behaviour in C++).
inline int64_t wrap_mul(int64_t a, int64_t b) {
    return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b));
}
inline int64_t wrap_add(int64_t a, int64_t b) {
    return static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
}
inline int64_t wrap_sub(int64_t a, int64_t b) {
    return static_cast<int64_t>(static_cast<uint64_t>(a) - static_cast<uint64_t>(b));
}

// Set of integers in [0, size) as a tree of 64-bit words: bit i of a word at level l+1 says whether word i of
// level l is non-zero. find_next is O(levels) = O(log_64 size); size < 2^36 (at most 6 levels).
class HierBitset {
public:
    static constexpr int kMaxLevels = 6;

    explicit HierBitset(uint64_t size) {
        uint64_t bits = size == 0 ? 1 : size;
        size_t offsets[kMaxLevels];
        size_t total = 0;
        levels_ = 0;
        do {
            if (levels_ == kMaxLevels) throw std::length_error("HierBitset: size too large");
            const uint64_t words = (bits + 63) / 64;
            offsets[levels_] = total;
            words_[levels_] = words;
            ++levels_;
            total += words;
            bits = words;
        } while (bits > 1);
        data_.assign(total, 0);
        for (int l = 0; l < levels_; ++l) level_[l] = data_.data() + offsets[l];
    }

    HierBitset(const HierBitset&) = delete;
    HierBitset& operator=(const HierBitset&) = delete;

    bool test(uint64_t x) const { return (level_[0][x >> 6] >> (x & 63)) & 1u; }

    void set(uint64_t x) {
        for (int l = 0; l < levels_; ++l) {
            uint64_t& w = level_[l][x >> 6];
            const uint64_t was = w;
            w = was | (uint64_t{1} << (x & 63));
            if (was != 0) return;
            x >>= 6;
        }
    }

    void clear(uint64_t x) {
        for (int l = 0; l < levels_; ++l) {
            uint64_t& w = level_[l][x >> 6];
            w &= ~(uint64_t{1} << (x & 63));
            if (w != 0) return;
            x >>= 6;
        }
    }

    // Smallest member >= x, or -1 when there is none.
    int64_t find_next(uint64_t x) const {
        int l = 0;
        for (;;) {
            const uint64_t w = x >> 6;
            if (w >= words_[l]) return -1;
            const uint64_t m = level_[l][w] & (~uint64_t{0} << (x & 63));
            if (m != 0) {
                x = (w << 6) | static_cast<uint64_t>(ctz64(m));
                break;
            }
            if (++l == levels_) return -1;
            x = w + 1;  // a word index at level l-1 is a bit index at level l
        }
        while (l > 0) {
            --l;
            x = (x << 6) | static_cast<uint64_t>(ctz64(level_[l][x]));
        }
        return static_cast<int64_t>(x);
    }

    // Calls f(x) for every member, ascending.
    template <class F>
    void for_each(F&& f) const {
        for (uint64_t w = 0; w < words_[0]; ++w) {
            for (uint64_t m = level_[0][w]; m != 0; m &= m - 1) f((w << 6) | static_cast<uint64_t>(ctz64(m)));
        }
    }

private:
    std::vector<uint64_t> data_;
    uint64_t* level_[kMaxLevels] = {};
    uint64_t words_[kMaxLevels] = {};
    int levels_ = 0;
};

// Value ranges up to this use counting sorts and dense per-value arrays (O(range) memory); larger ones use
// comparison sorts and ordered maps, with identical results.
inline bool dense_range(int64_t range, int64_t n) {
    const int64_t limit = std::max<int64_t>(int64_t{1} << 16, 2 * n);
    return range <= limit && range < std::numeric_limits<int32_t>::max();
}

// Temporary array of n elements from a per-thread cache reused across calls, so that a call does not pay page
// faults for fresh temporaries each time. Each call site uses its own slot (no two live Scratch share one).
// Arrays above kMaxCached elements are allocated for the call and freed after it.
template <class T>
class Scratch {
public:
    static constexpr size_t kSlots = 4;
    static constexpr size_t kMaxCached = size_t{1} << 20;

    Scratch(size_t slot, size_t n) {
        if (n <= kMaxCached && slot < kSlots) {
            auto& v = cache()[slot];
            if (v.size() < n) {
                v.clear();
                v.shrink_to_fit();
                v.resize(n);
            }
            ptr_ = v.data();
        } else {
            owned_.reset(new T[n == 0 ? 1 : n]);
            ptr_ = owned_.get();
        }
    }

    T* get() const { return ptr_; }
    T& operator[](size_t i) const { return ptr_[i]; }

private:
    static std::vector<T, UninitAllocator<T>>* cache() {
        thread_local std::vector<T, UninitAllocator<T>> slots[kSlots];
        return slots;
    }

    T* ptr_ = nullptr;
    std::unique_ptr<T[]> owned_;
};

// (value, count) for each distinct value, value descending.
using Runs = std::vector<std::pair<int64_t, int64_t>>;

// Indices sorted by value descending, ties by index ascending. Values must lie in [lo, hi]. When runs is given it
// receives the distinct values with their counts, so callers can walk the sorted values without gathering them.
template <class Idx>
void descending_order(const int64_t* values, int64_t n, int64_t lo, int64_t hi, Idx* order, Runs* runs = nullptr) {
    if (runs != nullptr) runs->clear();
    if (n == 0) return;
    const int64_t range = hi - lo;  // hi >= lo >= 0: no overflow
    if (dense_range(range, n)) {
        // Counting sort: the position of value v starts after every item with a larger value.
        Scratch<Idx> start(3, static_cast<size_t>(range) + 1);
        std::fill(start.get(), start.get() + range + 1, Idx{0});
        for (int64_t i = 0; i < n; ++i) ++start[static_cast<size_t>(values[i] - lo)];
        Idx acc = 0;
        for (int64_t v = range; v >= 0; --v) {
            const Idx c = start[static_cast<size_t>(v)];
            if (c != 0 && runs != nullptr) runs->emplace_back(v + lo, static_cast<int64_t>(c));
            start[static_cast<size_t>(v)] = acc;
            acc += c;
        }
        for (int64_t i = 0; i < n; ++i) order[start[static_cast<size_t>(values[i] - lo)]++] = static_cast<Idx>(i);
    } else {
        for (int64_t i = 0; i < n; ++i) order[i] = static_cast<Idx>(i);
        std::sort(order, order + n, [values](Idx a, Idx b) {
            return values[a] > values[b] || (values[a] == values[b] && a < b);
        });
        if (runs != nullptr) {
            for (int64_t t = 0; t < n; ++t) {
                const int64_t v = values[order[t]];
                if (runs->empty() || runs->back().first != v) {
                    runs->emplace_back(v, 1);
                } else {
                    ++runs->back().second;
                }
            }
        }
    }
}

inline void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

struct MinMax {
    int64_t min;
    int64_t max;
};

// Checks every value is in [lo, hi] (memory safety of the counting sorts depends on it); returns their range.
inline MinMax check_range(const int64_t* values, int64_t n, int64_t lo, int64_t hi, const char* name) {
    int64_t mx = std::numeric_limits<int64_t>::min();
    int64_t mn = std::numeric_limits<int64_t>::max();
    for (int64_t i = 0; i < n; ++i) {
        mx = std::max(mx, values[i]);
        mn = std::min(mn, values[i]);
    }
    if (mn < lo || mx > hi) {
        for (int64_t i = 0; i < n; ++i) {
            if (values[i] < lo || values[i] > hi) {
                throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) + "] = " +
                                            std::to_string(values[i]) + " is outside [" + std::to_string(lo) +
                                            ", " + std::to_string(hi) + "]");
            }
        }
    }
    return {mn, mx};
}

}  // namespace detail
}  // namespace opensloth
