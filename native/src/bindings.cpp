// pybind11 module edge_runtime.scoring._native: exact top-k with runtime SIMD dispatch. Arrays are checked strictly while
// holding the GIL (dtype, ndim, shape, C-contiguity: a std::invalid_argument becomes a Python ValueError saying how
// to fix the input); the scan itself runs with the GIL released, in num_threads threads over item ranges.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dispatch.h"

namespace py = pybind11;
using edgerec::Heap;
using edgerec::Mode;
using edgerec::ScanArgs;

namespace {

constexpr std::int64_t kMinItemsPerThread = 16384;  // below this a thread costs more than it saves

void require(bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument(msg);
}

// The messages are built only when a check fails: this runs on every scan call (several arrays each), and
// formatting a dtype name costs more than the checks themselves.
template <typename T>
void check_array(const py::array& a, const char* name, int ndim) {
    // an equivalent dtype (NumPy's PyArray_EquivTypes: int64 and longlong on LP64), native byte order; no conversion
    if (!py::isinstance<py::array_t<T>>(a))
        throw std::invalid_argument(std::string(name) + " has the wrong dtype (" + std::string(py::str(a.dtype())) +
                                    "); convert with np.ascontiguousarray(x, dtype=np." +
                                    std::string(py::str(py::dtype::of<T>())) + ")");
    if (a.ndim() != ndim)
        throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) +
                                    " dimension(s), got " + std::to_string(a.ndim()));
    if (!(a.flags() & py::array::c_style))
        throw std::invalid_argument(std::string(name) + " must be C-contiguous; pass np.ascontiguousarray(" +
                                    name + ")");
}

// exclude_offsets (int64 [B + 1]) given: exclude is B per-query lists one after the other, query q's being
// exclude[offsets[q] : offsets[q + 1]] (each sorted and unique), and the reply has a third element, the number of
// results of each row (int64 [B]; rows are padded to the longest with index -1 and score -inf).
py::tuple run_topk(py::array queries, py::array items, std::int64_t n_packed, int d_packed, std::int64_t k,
                   py::object item_scales, py::object query_scales, py::object allow, py::object exclude,
                   int num_threads, bool packed, bool per_query = false, py::object exclude_offsets = py::none()) {
    ScanArgs a;
    a.per_query = per_query;
    a.prefetch_f32 = edgerec::software_prefetch();
    const bool int8_items = packed || items.dtype().is(py::dtype::of<std::int8_t>());
    const bool int8_queries = queries.dtype().is(py::dtype::of<std::int8_t>());
    if (!packed) {
        if (int8_items) check_array<std::int8_t>(items, "items", 2); else check_array<float>(items, "items", 2);
    }
    if (int8_queries) check_array<std::int8_t>(queries, "queries", 2); else check_array<float>(queries, "queries", 2);
    require(k >= 1, "k must be >= 1");
    a.n = packed ? n_packed : items.shape(0);
    a.d = packed ? d_packed : static_cast<int>(items.shape(1));
    a.nq = static_cast<int>(queries.shape(0));
    require(queries.shape(1) == a.d, "queries and items must have the same dimension d");
    require(a.d >= 1 && a.d <= 16384, "d must be between 1 and 16384");
    require(a.nq <= 4096, "at most 4096 queries per call");
    // py::array, not py::array_t<T>: assigning to an array_t converts any dtype silently, and check_array would
    // only see the converted copy (float64 scales, int32 exclusions, float offsets went through)
    py::array iscales, qscales;
    if (int8_items) {
        require(!item_scales.is_none(), "int8 items need item_scales (float32 [N])");
        iscales = py::cast<py::array>(item_scales);
        check_array<float>(iscales, "item_scales", 1);
        require(iscales.shape(0) == a.n, "item_scales must have one scale per item row");
        a.scales = static_cast<const float*>(iscales.data());
        a.items = items.data();
        if (int8_queries) {
            require(!query_scales.is_none(), "int8 queries need query_scales (float32 [B])");
            qscales = py::cast<py::array>(query_scales);
            check_array<float>(qscales, "query_scales", 1);
            require(qscales.shape(0) == a.nq, "query_scales must have one scale per query");
            require(a.d <= 1024, "int8 queries support d <= 1024 (exact accumulation); use float32 queries");
            a.query_scales = static_cast<const float*>(qscales.data());
            a.mode = packed ? Mode::I8P_I8Q : Mode::I8_I8Q;
        } else {
            require(!packed, "packed int8 items need int8 queries (quantize_queries)");
            a.mode = Mode::I8_F32Q;
        }
    } else {
        require(!int8_queries, "int8 queries need int8 items");
        a.items = items.data();
        a.mode = Mode::F32;
    }
    a.queries = queries.data();
    py::array allow_arr;
    if (!allow.is_none()) {
        allow_arr = py::cast<py::array>(allow);
        check_array<std::uint8_t>(allow_arr, "allow", 1);
        require(allow_arr.shape(0) * 8 >= a.n, "allow must hold at least ceil(N / 8) bytes (pack_mask)");
        a.filters.allow = static_cast<const std::uint8_t*>(allow_arr.data());
        a.filters.allow_bytes = allow_arr.shape(0);
    }
    py::array excl_arr, off_arr;
    std::vector<edgerec::Filters> per_q;
    bool sized = false;   // per-query lists: rows keep their own lengths, and the reply has their sizes
    if (!exclude.is_none()) {
        excl_arr = py::cast<py::array>(exclude);
        check_array<std::int64_t>(excl_arr, "exclude", 1);
        const std::int64_t* ex = static_cast<const std::int64_t*>(excl_arr.data());
        const std::int64_t n_ex = excl_arr.shape(0);
        if (exclude_offsets.is_none()) {
            a.filters.exclude = ex;
            a.filters.n_exclude = n_ex;
            for (std::int64_t i = 1; i < n_ex; ++i)
                if (ex[i - 1] >= ex[i])  // message built only on failure
                    throw std::invalid_argument("exclude must be sorted and unique (np.unique)");
        } else {
            off_arr = py::cast<py::array>(exclude_offsets);
            check_array<std::int64_t>(off_arr, "exclude_offsets", 1);
            require(off_arr.shape(0) == a.nq + 1, "exclude_offsets must hold B + 1 offsets");
            const std::int64_t* off = static_cast<const std::int64_t*>(off_arr.data());
            require(off[0] == 0 && off[a.nq] == n_ex,
                    "exclude_offsets must start at 0 and end at len(exclude)");
            for (int q = 0; q < a.nq; ++q)   // so every list lies inside exclude before any is read
                require(off[q] <= off[q + 1], "exclude_offsets must not decrease");
            per_q.assign(a.nq, a.filters);
            for (int q = 0; q < a.nq; ++q) {
                for (std::int64_t i = off[q] + 1; i < off[q + 1]; ++i)
                    if (ex[i - 1] >= ex[i])
                        throw std::invalid_argument("each query's exclude list must be sorted and unique");
                per_q[q].exclude = ex + off[q];
                per_q[q].n_exclude = off[q + 1] - off[q];
            }
            a.query_filters = per_q.data();
            sized = true;
        }
    } else {
        require(exclude_offsets.is_none(), "exclude_offsets needs exclude");
    }
    const int kk = static_cast<int>(std::min<std::int64_t>(k, std::max<std::int64_t>(a.n, 1)));
    const edgerec::Impl& impl = edgerec::active();

    std::vector<Heap> merged;
    {
        py::gil_scoped_release nogil;
        int threads = std::max(1, num_threads);
        threads = static_cast<int>(std::min<std::int64_t>(threads, std::max<std::int64_t>(1, a.n / kMinItemsPerThread)));
        std::vector<std::vector<Heap>> parts(threads, std::vector<Heap>(a.nq, Heap(kk)));
        if (threads == 1) {
            impl.scan(a, 0, a.n, parts[0].data());
        } else {
            // contiguous ranges aligned to 64 items (one allow-bitset word)
            std::int64_t per = ((a.n + threads - 1) / threads + 63) / 64 * 64;  // multiple of 64 (and of 16)
            std::vector<std::thread> pool;
            for (int t = 1; t < threads; ++t) {
                std::int64_t b = t * per, e = std::min<std::int64_t>(a.n, b + per);
                if (b >= e) break;
                pool.emplace_back([&, t, b, e] { impl.scan(a, b, e, parts[t].data()); });
            }
            impl.scan(a, 0, std::min<std::int64_t>(a.n, per), parts[0].data());  // the calling thread takes a share
            for (auto& th : pool) th.join();
        }
        merged = std::move(parts[0]);
        for (int t = 1; t < threads; ++t)
            for (int q = 0; q < a.nq; ++q)
                for (int j = 0; j < parts[t][q].size; ++j) merged[q].push(parts[t][q].score[j], parts[t][q].index[j]);
    }
    int width = sized ? 0 : kk;
    for (const Heap& h : merged) width = sized ? std::max(width, h.size) : std::min(width, h.size);
    if (a.nq == 0) width = 0;
    py::array_t<std::int64_t> ids({static_cast<py::ssize_t>(a.nq), static_cast<py::ssize_t>(width)});
    py::array_t<float> scores({static_cast<py::ssize_t>(a.nq), static_cast<py::ssize_t>(width)});
    py::array_t<std::int64_t> sizes(static_cast<py::ssize_t>(a.nq));
    auto I = ids.mutable_unchecked<2>();
    auto S = scores.mutable_unchecked<2>();
    for (int q = 0; q < a.nq; ++q) {
        const Heap& h = merged[q];
        std::vector<int> order(h.size);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int x, int y) {
            return Heap::worse(h.score[y], h.index[y], h.score[x], h.index[x]);
        });
        const int len = std::min(width, h.size);
        for (int j = 0; j < len; ++j) {
            I(q, j) = h.index[order[j]];
            S(q, j) = h.score[order[j]];
        }
        for (int j = len; j < width; ++j) {
            I(q, j) = -1;
            S(q, j) = -std::numeric_limits<float>::infinity();
        }
        sizes.mutable_data()[q] = len;
    }
    if (sized) return py::make_tuple(ids, scores, sizes);
    return py::make_tuple(ids, scores);
}

// Row-major int8 [n, d] -> packed tiles (topk_common.h), uint8 [ceil(n / 16) * tile_bytes].
py::array_t<std::uint8_t> pack_i8(py::array items) {
    check_array<std::int8_t>(items, "items", 2);
    const std::int64_t n = items.shape(0);
    const int d = static_cast<int>(items.shape(1));
    require(d >= 1 && d <= 16384, "d must be between 1 and 16384");
    const std::int64_t tiles = (n + edgerec::kTileRows - 1) / edgerec::kTileRows;
    const std::int64_t tb = edgerec::packed_tile_bytes(d);
    py::array_t<std::uint8_t> out(tiles * tb);
    std::uint8_t* o = out.mutable_data();
    const std::int8_t* x = static_cast<const std::int8_t*>(items.data());
    {
        py::gil_scoped_release nogil;
        edgerec::pack_i8_rows(x, n, d, o);
    }
    return out;
}

py::tuple topk_packed(py::array queries, py::array packed, std::int64_t n, int d, std::int64_t k,
                      py::array item_scales, py::array query_scales, py::object allow, py::object exclude,
                      int num_threads) {
    check_array<std::uint8_t>(packed, "packed", 1);
    require(d >= 1 && d <= 1024 && n >= 0, "packed int8 items need 1 <= d <= 1024");
    require(packed.shape(0) == ((n + edgerec::kTileRows - 1) / edgerec::kTileRows) * edgerec::packed_tile_bytes(d),
            "packed buffer size does not match n and d; build it with pack_i8");
    // Same checks and scan as topk, with n and d given explicitly (the packed buffer is 1-D).
    return run_topk(queries, packed, n, d, k, item_scales, query_scales, allow, exclude, num_threads, true);
}

py::tuple topk(py::array queries, py::array items, std::int64_t k, py::object item_scales, py::object query_scales,
               py::object allow, py::object exclude, int num_threads, bool per_query, py::object exclude_offsets) {
    return run_topk(queries, items, 0, 0, k, item_scales, query_scales, allow, exclude, num_threads, false,
                    per_query, exclude_offsets);
}

double stream_sum(py::array_t<float, py::array::c_style> a) {
    const float* p = a.data();
    const std::int64_t n = a.size();
    py::gil_scoped_release nogil;
    return edgerec::active().stream_sum(p, n);
}

// The session encoder (encoder-inl.h) over weights given once as NumPy arrays (checked here, kept alive by the
// object); encode calls release the GIL.
class SessionEncoder {
   public:
    SessionEncoder(py::dict arrays, int d, int heads, int max_len, int blocks, bool causal, bool sasrec_style,
                   std::int64_t mask_token, double eps, const std::string& level) {
        require(d >= 1 && heads >= 1 && d % heads == 0, "d must be a positive multiple of heads");
        require(max_len >= 1 && max_len <= 4096, "max_len must be 1 to 4096");
        require(blocks >= 1 && blocks <= 64, "blocks must be 1 to 64");
        require(eps > 0 && std::isfinite(eps), "eps must be a positive finite number");
        impl_ = level.empty() ? &edgerec::active() : edgerec::find_impl(level);
        require(impl_ != nullptr, "level " + level + " is not compiled into this build");
        if (!level.empty()) {
            const auto ok = edgerec::available_levels();
            require(std::find(ok.begin(), ok.end(), level) != ok.end(), "level " + level + " is not supported here");
        }
        w_.d = d; w_.heads = heads; w_.max_len = max_len; w_.causal = causal; w_.sasrec_style = sasrec_style;
        w_.eps = static_cast<float>(eps);
        py::array table = take(arrays, "table");
        check_array<std::int8_t>(table, "table", 2);
        require(table.shape(1) == d && table.shape(0) >= 1, "table must be int8 [rows, d]");
        w_.rows = table.shape(0);
        w_.table = static_cast<const std::int8_t*>(table.data());
        require(mask_token < w_.rows && mask_token >= -1, "mask_token must be -1 or a row of the table");
        w_.mask_token = mask_token;
        w_.table_scale = vec(arrays, "table_scale", w_.rows);
        w_.pos = mat(arrays, "pos", max_len, d);
        w_.lno_w = vec(arrays, "ln_out_w", d);
        w_.lno_b = vec(arrays, "ln_out_b", d);
        for (int b = 0; b < blocks; ++b) {
            const std::string p = "b" + std::to_string(b) + "_";
            edgerec::EncoderBlock blk{};
            blk.ln1_w = vec(arrays, p + "ln1_w", d); blk.ln1_b = vec(arrays, p + "ln1_b", d);
            blk.wq = mat(arrays, p + "wq", d, d); blk.bq = vec(arrays, p + "bq", d);
            blk.wk = mat(arrays, p + "wk", d, d); blk.bk = vec(arrays, p + "bk", d);
            blk.wv = mat(arrays, p + "wv", d, d); blk.bv = vec(arrays, p + "bv", d);
            blk.wo = mat(arrays, p + "wo", d, d); blk.bo = vec(arrays, p + "bo", d);
            blk.ln2_w = vec(arrays, p + "ln2_w", d); blk.ln2_b = vec(arrays, p + "ln2_b", d);
            blk.f1 = mat(arrays, p + "f1", d, d); blk.f1b = vec(arrays, p + "f1b", d);
            blk.f2 = mat(arrays, p + "f2", d, d); blk.f2b = vec(arrays, p + "f2b", d);
            w_.blocks.push_back(blk);
        }
    }

    // tokens int64 [T], offsets int64 [B + 1] (offsets[0] = 0, non-decreasing, offsets[B] = T) -> float32 [B, d]
    py::array_t<float> encode(py::array tokens, py::array offsets) const {
        check_array<std::int64_t>(tokens, "tokens", 1);
        check_array<std::int64_t>(offsets, "offsets", 1);
        require(offsets.shape(0) >= 1, "offsets must hold B + 1 values");
        // copies, checked: another thread may write the caller's arrays once the GIL is released
        const auto* tp = static_cast<const std::int64_t*>(tokens.data());
        const auto* op = static_cast<const std::int64_t*>(offsets.data());
        const std::vector<std::int64_t> t(tp, tp + tokens.shape(0)), o(op, op + offsets.shape(0));
        const std::int64_t B = offsets.shape(0) - 1, T = tokens.shape(0);
        require(o[0] == 0 && o[B] == T, "offsets must start at 0 and end at len(tokens)");
        for (std::int64_t b = 0; b < B; ++b) require(o[b] <= o[b + 1], "offsets must be non-decreasing");
        check_tokens(t.data(), T);
        return run(t, o);
    }

    // tokens int64 [B, W], 1 <= W <= max_len, left-padded with 0 (the ONNX encoder's input) -> float32 [B, d]
    py::array_t<float> encode_padded(py::array tokens) const {
        check_array<std::int64_t>(tokens, "item_seq", 2);
        const std::int64_t B = tokens.shape(0), W = tokens.shape(1);
        require(W >= 1 && W <= w_.max_len, "item_seq must have 1 to max_len = " + std::to_string(w_.max_len) +
                                               " columns, got " + std::to_string(W));
        const auto* t = static_cast<const std::int64_t*>(tokens.data());
        // each row without its leading padding (positions count from the right: the same vector), copied before
        // the check (another thread may write the caller's array once the GIL is released)
        std::vector<std::int64_t> flat;
        flat.reserve(static_cast<std::size_t>(B * W));
        std::vector<std::int64_t> off(static_cast<std::size_t>(B + 1), 0);
        for (std::int64_t b = 0; b < B; ++b) {
            std::int64_t j = 0;
            while (j < W && t[b * W + j] == 0) ++j;
            flat.insert(flat.end(), t + b * W + j, t + (b + 1) * W);
            off[static_cast<std::size_t>(b + 1)] = static_cast<std::int64_t>(flat.size());
        }
        check_tokens(flat.data(), static_cast<std::int64_t>(flat.size()));
        return run(flat, off);
    }

    std::string level() const { return impl_->name; }
    int dim() const { return w_.d; }
    std::int64_t rows() const { return w_.rows; }
    int max_len() const { return w_.max_len; }

   private:
    // checked tokens and offsets (this object's own copies) -> float32 [B, d], the GIL released meanwhile
    py::array_t<float> run(const std::vector<std::int64_t>& tokens, const std::vector<std::int64_t>& offsets) const {
        const std::int64_t B = static_cast<std::int64_t>(offsets.size()) - 1;
        py::array_t<float> out({B, static_cast<std::int64_t>(w_.d)});
        float* dst = out.mutable_data();
        py::gil_scoped_release release;
        impl_->encode(w_, tokens.data(), offsets.data(), B, dst);
        return out;
    }
    py::array take(py::dict& arrays, const std::string& name) {
        require(arrays.contains(name.c_str()), "encoder weights: no array " + name);
        py::array a = py::reinterpret_borrow<py::object>(arrays[name.c_str()]);
        keep_.push_back(a);
        return a;
    }
    const float* vec(py::dict& arrays, const std::string& name, std::int64_t n) {
        py::array a = take(arrays, name);
        check_array<float>(a, name.c_str(), 1);
        require(a.shape(0) == n, name + " must be float32 [" + std::to_string(n) + "]");
        return static_cast<const float*>(a.data());
    }
    const float* mat(py::dict& arrays, const std::string& name, std::int64_t r, std::int64_t c) {
        py::array a = take(arrays, name);
        check_array<float>(a, name.c_str(), 2);
        require(a.shape(0) == r && a.shape(1) == c,
                name + " must be float32 [" + std::to_string(r) + ", " + std::to_string(c) + "]");
        return static_cast<const float*>(a.data());
    }
    void check_tokens(const std::int64_t* t, std::int64_t n) const {
        for (std::int64_t i = 0; i < n; ++i)
            if (t[i] < 0 || t[i] >= w_.rows)
                throw std::invalid_argument("token " + std::to_string(t[i]) + " is outside the table (0 to " +
                                            std::to_string(w_.rows - 1) + ")");
    }

    edgerec::EncoderWeights w_;
    const edgerec::Impl* impl_ = nullptr;
    std::vector<py::array> keep_;
};

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "edgerec native exact top-k (MIPS) kernel with runtime SIMD dispatch";
    m.def("simd_level", [] { return std::string(edgerec::active().name); },
          "Name of the SIMD level in use: avx512_vnni, avx512, avx2, neon_dotprod, neon or scalar.");
    m.def("software_prefetch", [] { std::string why; const bool on = edgerec::software_prefetch(&why);
              return py::make_tuple(on, why); },
          "(on, why): whether the x86 float32-row scan issues software prefetches (EDGEREC_PREFETCH=1 / 0 forces it).");
    m.def("simd_note", [] { std::string n; edgerec::active(&n); return n; },
          "Why an EDGEREC_SIMD request was not honoured ('' if it was, or none was made).");
    m.def("available_levels", &edgerec::available_levels, "Levels this build has and this CPU/OS supports.");
    m.def("compiled_levels", &edgerec::compiled_levels, "Levels compiled into this build.");
    m.def("topk", &topk, py::arg("queries"), py::arg("items"), py::arg("k"), py::arg("item_scales") = py::none(),
          py::arg("query_scales") = py::none(), py::arg("allow") = py::none(), py::arg("exclude") = py::none(),
          py::arg("num_threads") = 1, py::arg("per_query") = false, py::arg("exclude_offsets") = py::none(),
          "Exact top-k; see edge_runtime.scoring.topk for the contract (per_query: each float query scored as "
          "alone). Returns (ids int64 [B, k'], scores float32 [B, k']). exclude_offsets (int64 [B + 1]): exclude "
          "holds one sorted unique list per query, query q's at exclude[offsets[q]:offsets[q + 1]]; then rows keep "
          "their own lengths (padded with -1 / -inf) and a third array, int64 [B], gives each row's length.");
    m.def("pack_i8", &pack_i8, "Row-major int8 [N, d] -> packed 16-row tiles (uint8) for topk_packed.");
    m.def("topk_packed", &topk_packed, py::arg("queries"), py::arg("packed"), py::arg("n"), py::arg("d"),
          py::arg("k"), py::arg("item_scales"), py::arg("query_scales"), py::arg("allow") = py::none(),
          py::arg("exclude") = py::none(), py::arg("num_threads") = 1,
          "Exact top-k of int8 queries against packed int8 items (see pack_i8).");
    m.def("stream_sum", &stream_sum, "Sum of a float32 array with the active SIMD level (bandwidth probe).");
    py::class_<SessionEncoder>(m, "SessionEncoder",
                               "The native session encoder (SASRec / BERT4Rec serving form, native/src/encoder-inl.h) "
                               "over weights given once; see edge_runtime.serving.encoder.NativeEncoder.")
        .def(py::init<py::dict, int, int, int, int, bool, bool, std::int64_t, double, const std::string&>(),
             py::arg("arrays"), py::arg("d"), py::arg("heads"), py::arg("max_len"), py::arg("blocks"),
             py::arg("causal"), py::arg("sasrec_style"), py::arg("mask_token"), py::arg("eps"),
             py::arg("level") = std::string())
        .def("encode", &SessionEncoder::encode, py::arg("tokens"), py::arg("offsets"),
             "Sessions tokens[offsets[b]:offsets[b + 1]] (int64, 0 pads) -> user vectors float32 [B, d].")
        .def("encode_padded", &SessionEncoder::encode_padded, py::arg("item_seq"),
             "item_seq int64 [B, W] (left-padded, 1 <= W <= max_len) -> user vectors float32 [B, d].")
        .def_property_readonly("level", &SessionEncoder::level)
        .def_property_readonly("dim", &SessionEncoder::dim)
        .def_property_readonly("rows", &SessionEncoder::rows)
        .def_property_readonly("max_len", &SessionEncoder::max_len);
}
