// Segment gather (see gather.hpp): one pass over the order, each segment checked and then copied with memcpy.
#include "gather.hpp"

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

namespace opensloth {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("gather_segments: " + what); }

std::string at(const char* name, int64_t i, int64_t value) {
    return std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(value);
}

// Where segment order[k] begins, when its indices are in range (else nullptr): only a prefetch hint.
inline const unsigned char* segment_begin(const GatherSource* sources, int64_t n_sources, const int64_t* chunks,
                                          const int64_t* starts, int64_t n_segments, const int64_t* order, int64_t k,
                                          int64_t itemsize) {
    const int64_t j = order != nullptr ? order[k] : k;
    if (j < 0 || j >= n_segments) return nullptr;
    const int64_t c = chunks != nullptr ? chunks[j] : 0;
    if (c < 0 || c >= n_sources) return nullptr;
    const int64_t s = starts[j];
    if (s < 0 || s >= sources[c].size) return nullptr;
    return sources[c].data + s * itemsize;
}

inline void prefetch(const unsigned char* p) {
#if defined(__GNUC__) || defined(__clang__)
    if (p != nullptr) {
        __builtin_prefetch(p);
        __builtin_prefetch(p + 64);
    }
#else
    (void)p;
#endif
}

// Segments are short (hundreds of tokens) and scattered over the sources: the start of each one is a cache (and
// TLB) miss unless it is asked for a few segments ahead.
constexpr int64_t kAhead = 16;

template <int64_t K>
int64_t run(const GatherSource* sources, int64_t n_sources, const int64_t* chunks, const int64_t* starts,
            const int64_t* lengths, int64_t n_segments, const int64_t* order, int64_t n_order, unsigned char* out,
            int64_t out_size) {
    int64_t pos = 0;
    for (int64_t k = 0; k < n_order; ++k) {
        if (k + kAhead < n_order)
            prefetch(segment_begin(sources, n_sources, chunks, starts, n_segments, order, k + kAhead, K));
        const int64_t j = order != nullptr ? order[k] : k;
        if (j < 0 || j >= n_segments) fail(at("order", k, j) + " is not a segment index in [0, " +
                                           std::to_string(n_segments) + ")");
        const int64_t c = chunks != nullptr ? chunks[j] : 0;
        if (c < 0 || c >= n_sources) fail(at("chunks", j, c) + " is not a source index in [0, " +
                                          std::to_string(n_sources) + ")");
        const GatherSource& src = sources[c];
        const int64_t s = starts[j];
        const int64_t n = lengths[j];
        if (n < 0) fail(at("lengths", j, n) + " is negative");
        if (s < 0 || s > src.size || n > src.size - s)
            fail("segment " + std::to_string(j) + " = [" + std::to_string(s) + ", " + std::to_string(s) + " + " +
                 std::to_string(n) + ") lies outside source " + std::to_string(c) + " of " +
                 std::to_string(src.size) + " elements");
        if (n > out_size - pos)
            fail("the segments hold more than the " + std::to_string(out_size) + " elements of the output");
        if (n != 0) std::memcpy(out + pos * K, src.data + s * K, static_cast<size_t>(n * K));
        pos += n;
    }
    return pos;
}

}  // namespace

int64_t gather_segments(const GatherSource* sources, int64_t n_sources, int64_t itemsize, const int64_t* chunks,
                        const int64_t* starts, const int64_t* lengths, int64_t n_segments, const int64_t* order,
                        int64_t n_order, unsigned char* out, int64_t out_size) {
    if (n_sources < 1) fail("needs at least one source array");
    if (n_segments < 0 || n_order < 0 || out_size < 0) fail("negative size");
    if (order == nullptr && n_order != n_segments)
        fail("without an order, n_order (" + std::to_string(n_order) + ") must equal the number of segments (" +
             std::to_string(n_segments) + ")");
    if (chunks == nullptr && n_sources != 1) fail("several sources need a chunk index per segment");
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8)
        fail("itemsize " + std::to_string(itemsize) + " is not 1, 2, 4 or 8");
    const std::less<const unsigned char*> before;  // a total order on pointers into different buffers
    for (int64_t c = 0; c < n_sources; ++c) {
        const GatherSource& src = sources[c];
        if (src.size < 0) fail("source " + std::to_string(c) + " has a negative size");
        if (src.size > 0 && out_size > 0) {
            const unsigned char* out_end = out + out_size * itemsize;
            const unsigned char* end = src.data + src.size * itemsize;
            if (before(src.data, out_end) && before(out, end))
                fail("source " + std::to_string(c) + " overlaps the output");
        }
    }
    auto* copy = itemsize == 1 ? &run<1> : itemsize == 2 ? &run<2> : itemsize == 4 ? &run<4> : &run<8>;
    const int64_t written = copy(sources, n_sources, chunks, starts, lengths, n_segments, order, n_order, out, out_size);
    if (written != out_size)
        fail("the segments hold " + std::to_string(written) + " elements but the output has " +
             std::to_string(out_size));
    return written;
}

}  // namespace opensloth
