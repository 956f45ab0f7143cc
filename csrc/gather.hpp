// Segment gather for the packed-dataset builder: plain C++17, no Python. Copies slices of one or more flat source
// arrays (the values of an arrow list column, chunk by chunk) back to back into one output, in a given order.
#pragma once

#include <cstdint>

namespace opensloth {

// One flat source array: `size` elements starting at `data`.
struct GatherSource {
    const unsigned char* data;
    int64_t size;
};

// For k = 0 .. n_order - 1, with j = order[k] (order == nullptr: j = k and n_order must equal n_segments), appends
// elements [starts[j], starts[j] + lengths[j]) of sources[chunks[j]] (chunks == nullptr: sources[0]) to `out`.
// Elements are `itemsize` bytes (1, 2, 4 or 8); the copy does not look at their type. Returns the elements written,
// which must be exactly out_size.
//
// Every index and slice is checked before it is used: a bad one throws std::invalid_argument naming it (out may then
// be partly written), so no input makes this read or write outside the buffers described. Sources must not overlap
// the output (checked).
int64_t gather_segments(const GatherSource* sources, int64_t n_sources, int64_t itemsize, const int64_t* chunks,
                        const int64_t* starts, const int64_t* lengths, int64_t n_segments, const int64_t* order,
                        int64_t n_order, unsigned char* out, int64_t out_size);

}  // namespace opensloth
