// pybind11 glue for opensloth._native: numpy int64 arrays in without copies, the GIL released while the C++ core
// works, and its result vectors handed to numpy without copies (each array owns its vector through a capsule).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>
#include <string>
#include <vector>

#include "packing.hpp"

#ifndef OPENSLOTH_VERSION
#error "OPENSLOTH_VERSION must be defined by the build (setup.py)"
#endif

namespace py = pybind11;

namespace {

// C-contiguous int64 only; with .noconvert() below pybind11 rejects anything else instead of copying it.
using InArray = py::array_t<int64_t, py::array::c_style>;

py::array_t<int64_t> to_numpy(opensloth::Int64Array&& values) {
    auto* owned = new opensloth::Int64Array(std::move(values));
    py::capsule owner(owned, [](void* p) { delete static_cast<opensloth::Int64Array*>(p); });
    return py::array_t<int64_t>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(int64_t))},
                                owned->data(), owner);
}

const int64_t* input(const InArray& a, const char* name, int64_t& n) {
    if (a.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D");
    n = static_cast<int64_t>(a.shape(0));
    return a.data();
}

py::tuple pack(opensloth::PackResult (*fn)(const int64_t*, int64_t, int64_t), const InArray& lengths,
               int64_t capacity) {
    int64_t n;
    const int64_t* data = input(lengths, "lengths", n);
    opensloth::PackResult r;
    {
        py::gil_scoped_release release;
        r = fn(data, n, capacity);
    }
    return py::make_tuple(to_numpy(std::move(r.bin_ptr)), to_numpy(std::move(r.items)),
                          to_numpy(std::move(r.bin_lengths)));
}

py::tuple pack_bfd(const InArray& lengths, int64_t capacity) { return pack(opensloth::pack_bfd, lengths, capacity); }
py::tuple pack_ffd(const InArray& lengths, int64_t capacity) { return pack(opensloth::pack_ffd, lengths, capacity); }

py::tuple pack_exact_fit(const InArray& lengths, int64_t capacity) {
    return pack(opensloth::pack_exact_fit, lengths, capacity);
}

py::tuple partition_padded(const InArray& lengths, int64_t num_batches, int64_t cap) {
    int64_t n;
    const int64_t* data = input(lengths, "lengths", n);
    opensloth::PartitionResult r;
    {
        py::gil_scoped_release release;
        r = opensloth::partition_padded(data, n, num_batches, cap);
    }
    if (!r.feasible) return py::make_tuple(py::none(), py::none());
    return py::make_tuple(to_numpy(std::move(r.batch_ptr)), to_numpy(std::move(r.items)));
}

py::tuple balance(const InArray& costs, int64_t num_parts, bool equal_count) {
    int64_t n;
    const int64_t* data = input(costs, "costs", n);
    opensloth::BalanceResult r;
    {
        py::gil_scoped_release release;
        r = opensloth::balance(data, n, num_parts, equal_count);
    }
    return py::make_tuple(to_numpy(std::move(r.part_ptr)), to_numpy(std::move(r.items)));
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "OpenSloth packing core in C++17 (the native backend of opensloth.packing).";
    m.attr("__version__") = OPENSLOTH_VERSION;
    m.def("pack_bfd", &pack_bfd, py::arg("lengths").noconvert(), py::arg("capacity"),
          "Best-fit decreasing: (bin_ptr, items, bin_lengths), int64 arrays.");
    m.def("pack_ffd", &pack_ffd, py::arg("lengths").noconvert(), py::arg("capacity"),
          "First-fit decreasing: (bin_ptr, items, bin_lengths), int64 arrays.");
    m.def("pack_exact_fit", &pack_exact_fit, py::arg("lengths").noconvert(), py::arg("capacity"),
          "Exact fit (one bin at a time, closing gaps exactly): (bin_ptr, items, bin_lengths), int64 arrays.");
    m.def("partition_padded", &partition_padded, py::arg("lengths").noconvert(), py::arg("num_batches"),
          py::arg("cap"),
          "Exact padded partition: (batch_ptr, items), or (None, None) when no split meets cap (0 = no cap).");
    m.def("balance", &balance, py::arg("costs").noconvert(), py::arg("num_parts"), py::arg("equal_count"),
          "LPT / Karmarkar-Karp balance with swap refinement: (part_ptr, items), int64 arrays.");
}
