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
#include <chrono>
#include <numeric>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "dispatch.h"
#include "frames.h"

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
    edgerec::scan_plan().apply(a);
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

    // One session's tokens [n] (1 <= n <= max_len, each checked in 1 .. rows - 1 by the caller) -> out [d], as
    // encode gives it; the caller holds or has released the GIL as it needs (this reads only the weights).
    void encode_one(const std::int64_t* tokens, std::int64_t n, float* out) const {
        const std::int64_t off[2] = {0, n};
        impl_->encode(w_, tokens, off, 1, out);
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

// The daemon's fast path for a plain recommend frame (edge_runtime/serving/fastpath.py): the bytes of one
// MessagePack-RPC request [0, msgid, "recommend", [{history, k, exclude_seen}]] -> the bytes of its reply, with
// the encoder and the exact scan in between, and no Python object per id or score. It takes only frames whose
// every part the general path would accept and answer from the model alone: history a non-empty array of at most
// max_history known item ids (str), k an integer in 1 .. max_k, exclude_seen a bool, no other key, no key twice,
// k + the exclusions at most max_fetch (a light request), nothing after the frame. For any other frame it returns
// None and changes nothing, and the caller runs the general path (which gives every error its message). The reply
// is byte for byte what the general path sends: the same encoder call (encode_one), the same single-threaded
// scan and sort as topk, the same MessagePack encodings (frames.h). Items: int8 rows with float32 scales (the
// native encoder serves int8 bundles only).
class RecommendFrames {
   public:
    RecommendFrames(py::object encoder, py::array items, py::object item_scales, py::list item_ids,
                    const std::string& model_version, int max_len, int max_k, int max_history, int max_fetch,
                    int max_id_chars, std::int64_t max_msgid)
        : encoder_obj_(encoder), items_(items), version_(model_version), max_len_(max_len), max_k_(max_k),
          max_history_(max_history), max_fetch_(max_fetch), max_msgid_(max_msgid) {
        enc_ = &encoder.cast<const SessionEncoder&>();
        check_array<std::int8_t>(items, "items", 2);   // the native encoder serves int8 bundles only
        n_ = items.shape(0);
        d_ = static_cast<int>(items.shape(1));
        require(n_ >= 1 && d_ == enc_->dim(), "items must be [N >= 1, d] with the encoder's d");
        require(enc_->rows() >= n_ + 1, "the encoder's table must hold a row per item (row r is token r + 1)");
        require(max_len >= 1 && max_len <= enc_->max_len(), "max_len must be 1 to the encoder's window");
        require(static_cast<std::int64_t>(py::len(item_ids)) == n_, "item_ids must hold one id per item row");
        require(n_ < (std::int64_t{1} << 31), "at most 2^31 - 1 items");
        require(!item_scales.is_none(), "int8 items need item_scales (float32 [N])");
        scales_ = py::cast<py::array>(item_scales);
        check_array<float>(scales_, "item_scales", 1);
        require(scales_.shape(0) == n_, "item_scales must have one scale per item row");
        // The ids are views of the Python strings' UTF-8 (kept alive by ids_obj_, a tuple of them): no copy.
        ids_obj_ = py::tuple(item_ids);
        ids_.reserve(static_cast<std::size_t>(n_));
        for (py::handle h : ids_obj_) {
            require(PyUnicode_Check(h.ptr()), "item_ids must be strings");
            Py_ssize_t size = 0;
            const char* u = PyUnicode_AsUTF8AndSize(h.ptr(), &size);
            if (u == nullptr) throw py::error_already_set();
            ids_.emplace_back(u, static_cast<std::size_t>(size));
        }
        // open addressing, linear probing, at most half full: a row per slot (-1: empty)
        std::size_t cap = 16;
        while (cap < 2 * static_cast<std::size_t>(n_)) cap *= 2;
        slots_.assign(cap, -1);
        for (std::int64_t r = 0; r < n_; ++r) {
            const std::string_view s = ids_[static_cast<std::size_t>(r)];
            std::int64_t chars = 0;   // code points, as Python's len(): UTF-8 bytes that are not continuations
            for (unsigned char c : s) chars += (c & 0xc0) != 0x80;
            if (chars < 1 || chars > max_id_chars) continue;   // not an id as_id accepts: never looked up
            std::size_t i = slot_of(s);
            while (slots_[i] >= 0 && ids_[static_cast<std::size_t>(slots_[i])] != s) i = (i + 1) & (cap - 1);
            slots_[i] = static_cast<std::int32_t>(r);   // an id twice: the last row, as the Python index
        }
    }

    RecommendFrames(const RecommendFrames&) = delete;
    RecommendFrames& operator=(const RecommendFrames&) = delete;

    // frame: one whole request frame -> (reply bytes, encoder s, scan s), or None (take the general path).
    py::object call(py::bytes frame) const {
        char* buf = nullptr;
        py::ssize_t len = 0;
        PYBIND11_BYTES_AS_STRING_AND_SIZE(frame.ptr(), &buf, &len);
        std::int64_t msgid = 0, k = 10;
        bool exclude_seen = true;
        std::vector<std::int64_t> rows;
        if (!parse(reinterpret_cast<const std::uint8_t*>(buf), static_cast<std::size_t>(len), msgid, k,
                   exclude_seen, rows))
            return py::none();
        const std::int64_t excl_n = exclude_seen ? static_cast<std::int64_t>(rows.size()) : 0;
        if (k + excl_n > max_fetch_) return py::none();   // heavy: the general path sends it to a thread
        const std::size_t w = std::min<std::size_t>(rows.size(), static_cast<std::size_t>(max_len_));
        std::vector<std::int64_t> tokens(rows.end() - static_cast<std::ptrdiff_t>(w), rows.end());
        for (auto& t : tokens) t += 1;   // row r is the encoder's token r + 1 (0 pads)
        std::vector<std::int64_t> excl;
        if (exclude_seen) {
            excl = rows;
            std::sort(excl.begin(), excl.end());
            excl.erase(std::unique(excl.begin(), excl.end()), excl.end());
        }
        const int kk = static_cast<int>(std::min<std::int64_t>(k, n_));
        std::vector<float> u(static_cast<std::size_t>(d_));
        Heap h(kk);
        ScanArgs a;
        edgerec::scan_plan().apply(a);
        a.mode = Mode::I8_F32Q;   // int8 rows, the float32 user vector: topk's path for these arguments
        a.n = n_;
        a.d = d_;
        a.nq = 1;
        a.items = items_.data();
        a.scales = static_cast<const float*>(scales_.data());
        a.queries = u.data();
        a.filters.exclude = excl.empty() ? nullptr : excl.data();
        a.filters.n_exclude = static_cast<std::int64_t>(excl.size());
        double enc_s, scan_s;
        {
            py::gil_scoped_release nogil;
            const auto t0 = std::chrono::steady_clock::now();
            enc_->encode_one(tokens.data(), static_cast<std::int64_t>(tokens.size()), u.data());
            const auto t1 = std::chrono::steady_clock::now();
            edgerec::active().scan(a, 0, a.n, &h);
            const auto t2 = std::chrono::steady_clock::now();
            enc_s = std::chrono::duration<double>(t1 - t0).count();
            scan_s = std::chrono::duration<double>(t2 - t1).count();
        }
        std::vector<int> order(h.size);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int x, int y) {
            return Heap::worse(h.score[y], h.index[y], h.score[x], h.index[x]);
        });
        edgerec::frames::Writer wr;
        wr.out.reserve(64 + order.size() * 24 + version_.size());
        wr.array(4);
        wr.uint(1);   // RESPONSE
        wr.uint(static_cast<std::uint64_t>(msgid));
        wr.nil();
        wr.map(5);
        wr.str("items");
        wr.array(order.size());
        for (int j : order) wr.str(ids_[static_cast<std::size_t>(h.index[j])]);
        wr.str("scores");
        wr.array(order.size());
        for (int j : order) wr.float64(static_cast<double>(h.score[j]));
        wr.str("model_version");
        wr.str(version_);
        wr.str("ignored");
        wr.array(0);
        wr.str("source");
        wr.str("model");
        return py::make_tuple(py::bytes(wr.out), enc_s, scan_s);
    }

   private:
    bool parse(const std::uint8_t* p, std::size_t len, std::int64_t& msgid, std::int64_t& k, bool& exclude_seen,
               std::vector<std::int64_t>& rows) const {
        edgerec::frames::Reader r{p, p + len};
        std::uint32_t n = 0;
        std::int64_t kind = -1;
        std::string_view s;
        if (!r.array(n) || n != 4 || !r.integer(kind) || kind != 0) return false;
        if (!r.integer(msgid) || msgid < 0 || msgid > max_msgid_) return false;
        if (!r.str(s) || s != "recommend") return false;
        if (r.need(1) && (*r.p & 0xf0) == 0x90) {   // [params]: exactly one map
            if (!r.array(n) || n != 1) return false;
        }
        if (!r.map(n)) return false;
        bool seen_history = false, seen_k = false, seen_excl = false;
        for (std::uint32_t i = 0; i < n; ++i) {
            if (!r.str(s)) return false;
            if (s == "history" && !seen_history) {
                seen_history = true;
                std::uint32_t h = 0;
                if (!r.array(h) || h == 0 || h > static_cast<std::uint32_t>(max_history_)) return false;
                rows.reserve(h);
                for (std::uint32_t j = 0; j < h; ++j) {
                    if (!r.str(s)) return false;
                    const std::int64_t row = find(s);
                    if (row < 0) return false;   // unknown (an ignored id), or not an id as_id takes
                    rows.push_back(row);
                }
            } else if (s == "k" && !seen_k) {
                seen_k = true;
                if (!r.integer(k) || k < 1 || k > max_k_) return false;
            } else if (s == "exclude_seen" && !seen_excl) {
                seen_excl = true;
                if (!r.boolean(exclude_seen)) return false;
            } else {
                return false;   // another key (user, filters, ...), or one given twice
            }
        }
        return seen_history && r.p == r.end;
    }

    std::size_t slot_of(std::string_view s) const {
        std::uint64_t h = 1469598103934665603ULL;   // FNV-1a, 64-bit
        for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
        return static_cast<std::size_t>(h ^ (h >> 29)) & (slots_.size() - 1);
    }
    std::int64_t find(std::string_view s) const {
        for (std::size_t i = slot_of(s);; i = (i + 1) & (slots_.size() - 1)) {
            const std::int32_t r = slots_[i];
            if (r < 0) return -1;
            if (ids_[static_cast<std::size_t>(r)] == s) return r;
        }
    }

    py::object encoder_obj_;   // keeps the encoder (and its weights) alive
    const SessionEncoder* enc_ = nullptr;
    py::array items_, scales_;   // int8 [N, d], float32 [N]
    std::int64_t n_ = 0;
    int d_ = 0;
    py::tuple ids_obj_;
    std::vector<std::string_view> ids_;   // row -> id (UTF-8 of ids_obj_'s strings)
    std::vector<std::int32_t> slots_;     // id -> row: the open-addressing table of find
    std::string version_;
    int max_len_, max_k_, max_history_, max_fetch_;
    std::int64_t max_msgid_;
};

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "edgerec native exact top-k (MIPS) kernel with runtime SIMD dispatch";
    m.def("simd_level", [] { return std::string(edgerec::active().name); },
          "Name of the SIMD level in use: avx512_vnni, avx512, avx2, neon_dotprod, neon or scalar.");
    m.def("scan_plan", [] { const edgerec::ScanPlan& p = edgerec::scan_plan();
              py::dict out;
              out["prefetch_f32"] = p.prefetch_f32;
              out["prefetch_i8"] = p.prefetch_i8;
              out["streams"] = p.streams;
              out["row_streams"] = p.row_streams;
              out["why"] = p.why;
              out["note"] = p.note;
              return out; },
          "How the scans read memory, chosen once per CPU: {prefetch_f32, prefetch_i8 (software prefetch of float32 "
          "/ int8 items), streams (side-by-side read streams of the int8-query scans, 1-8), row_streams (of the "
          "float-query row scans: 1, 2, 4 or 8), why (the choice in words), note (ignored settings, '' if none)}. "
          "EDGEREC_PREFETCH=0 / 1 and EDGEREC_SCAN_STREAMS=1..8 force them; results never depend on the plan.");
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
    py::class_<RecommendFrames>(m, "RecommendFrames",
                                "The recommend fast path: one request frame's bytes -> (reply bytes, encoder s, scan "
                                "s), or None for the general path; see edge_runtime.serving.fastpath.")
        .def(py::init<py::object, py::array, py::object, py::list, const std::string&, int, int, int, int, int,
                      std::int64_t>(),
             py::arg("encoder"), py::arg("items"), py::arg("item_scales"), py::arg("item_ids"),
             py::arg("model_version"), py::arg("max_len"), py::arg("max_k"), py::arg("max_history"),
             py::arg("max_fetch"), py::arg("max_id_chars"), py::arg("max_msgid"))
        .def("__call__", &RecommendFrames::call, py::arg("frame"));
}
