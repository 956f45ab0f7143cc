// pybind11 glue for opensloth._native: numpy int64 arrays in without copies, the GIL released while the C++ core
// works, and its result vectors handed to numpy without copies (each array owns its vector through a capsule).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>
#include <string>
#include <vector>

#include "gather.hpp"
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

py::tuple partition_padded(const InArray& lengths, int64_t num_batches, int64_t cap, int64_t rows) {
    int64_t n;
    const int64_t* data = input(lengths, "lengths", n);
    opensloth::PartitionResult r;
    {
        py::gil_scoped_release release;
        r = opensloth::partition_padded(data, n, num_batches, cap, rows);
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

// An optional index array (None or a C-contiguous int64 array, never converted); n = -1 for None.
const int64_t* optional_input(const py::object& obj, const char* name, int64_t& n) {
    if (obj.is_none()) {
        n = -1;
        return nullptr;
    }
    if (!py::isinstance<InArray>(obj))
        throw py::type_error(std::string(name) + " must be None or a C-contiguous int64 numpy array");
    return input(py::reinterpret_borrow<InArray>(obj), name, n);  // obj keeps the data alive for the call
}

void check_values(const py::array& a, const std::string& name, const py::dtype* like) {
    if (a.ndim() != 1) throw py::value_error(name + " must be 1-D");
    if (!(a.flags() & py::array::c_style)) throw py::type_error(name + " must be C-contiguous");
    const py::dtype dt = a.dtype();
    const char kind = dt.kind();
    const py::ssize_t size = dt.itemsize();
    if ((kind != 'i' && kind != 'u' && kind != 'b') || (size != 1 && size != 2 && size != 4 && size != 8))
        throw py::type_error(name + " must hold integers or booleans of 1, 2, 4 or 8 bytes");
    if (like != nullptr && (kind != like->kind() || size != like->itemsize() ||
                            dt.attr("isnative").cast<bool>() != like->attr("isnative").cast<bool>()))
        throw py::type_error(name + " has another dtype than out (kind, width or byte order)");
}

int64_t gather_segments(const py::sequence& sources, const py::object& chunks, const InArray& starts,
                        const InArray& lengths, const py::object& order, py::array out) {
    check_values(out, "out", nullptr);
    const py::dtype dt = out.dtype();
    std::vector<py::array> keep;  // references held while the GIL is released
    std::vector<opensloth::GatherSource> srcs;
    for (const py::handle item : sources) {
        const std::string name = "sources[" + std::to_string(keep.size()) + "]";
        if (!py::isinstance<py::array>(item)) throw py::type_error(name + " must be a numpy array");
        keep.push_back(py::reinterpret_borrow<py::array>(item));
        check_values(keep.back(), name, &dt);
        srcs.push_back({static_cast<const unsigned char*>(keep.back().data()),
                        static_cast<int64_t>(keep.back().shape(0))});
    }
    int64_t n, n_len, n_chunks, n_order;
    const int64_t* s = input(starts, "starts", n);
    const int64_t* l = input(lengths, "lengths", n_len);
    const int64_t* c = optional_input(chunks, "chunks", n_chunks);
    const int64_t* o = optional_input(order, "order", n_order);
    if (n_len != n || (c != nullptr && n_chunks != n))
        throw py::value_error("starts, lengths and chunks must have one entry per segment");
    auto* dst = static_cast<unsigned char*>(out.mutable_data());  // raises if out is read-only
    const auto out_size = static_cast<int64_t>(out.shape(0));
    py::gil_scoped_release release;
    return opensloth::gather_segments(srcs.data(), static_cast<int64_t>(srcs.size()), dt.itemsize(), c, s, l, n, o,
                                      o != nullptr ? n_order : n, dst, out_size);
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
          py::arg("cap"), py::arg("rows") = 0,
          "Exact padded partition: (batch_ptr, items), or (None, None) when no split meets cap (0 = no cap); at "
          "most `rows` rows of split points held at once (0 = all).");
    m.def("balance", &balance, py::arg("costs").noconvert(), py::arg("num_parts"), py::arg("equal_count"),
          "LPT / Karmarkar-Karp balance with swap refinement: (part_ptr, items), int64 arrays.");
    m.def("gather_segments", &gather_segments, py::arg("sources"), py::arg("chunks"), py::arg("starts").noconvert(),
          py::arg("lengths").noconvert(), py::arg("order"), py::arg("out"),
          "Copy sources[chunks[j]][starts[j]:starts[j]+lengths[j]] for j in order back to back into out; returns "
          "the elements written (= len(out)).");
}
