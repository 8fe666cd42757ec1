// Types shared by the per-ISA kernels, the dispatcher and the bindings (compiled with baseline flags everywhere).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace edgerec {

enum class Mode : int { F32 = 0, I8_F32Q = 1, I8_I8Q = 2, I8P_I8Q = 3 };

// Packed int8 layout (Mode::I8P_I8Q): tiles of 16 rows; in a tile, for each group of 4 dimensions, 16 rows x 4
// bytes (64 bytes). d is padded to a multiple of 4 and n to a multiple of 16 with zeros. One VNNI dpbusd of a tile
// group against the broadcast 4 query bytes scores 16 rows at once, with no horizontal sums.
constexpr int kTileRows = 16;
// Most side-by-side read streams a scan uses (ScanArgs::streams; topk_kernel-inl.h for_rounds).
constexpr int kMaxStreams = 8;
inline std::int64_t packed_groups(int d) { return (d + 3) / 4; }
inline std::int64_t packed_tile_bytes(int d) { return packed_groups(d) * 64; }

// Filters applied inside the scan: a packed allow bitset (bit i of byte i / 8, little bit order; nullptr = all
// allowed) and a sorted, de-duplicated list of excluded item indices.
struct Filters {
    const std::uint8_t* allow = nullptr;
    std::int64_t allow_bytes = 0;
    const std::int64_t* exclude = nullptr;
    std::int64_t n_exclude = 0;

    // Allow bits of items [base, base + count), base a multiple of 64.
    std::uint64_t allow_word(std::int64_t base, int count) const {
        std::uint64_t w = 0;
        const std::int64_t byte0 = base / 8;
        const int nbytes = (count + 7) / 8;
        for (int b = 0; b < nbytes && byte0 + b < allow_bytes; ++b)
            w |= static_cast<std::uint64_t>(allow[byte0 + b]) << (8 * b);
        return w;
    }
    // Binary search: only candidates that beat a heap threshold get here.
    bool excluded(std::int64_t idx) const {
        std::int64_t lo = 0, hi = n_exclude;
        while (lo < hi) {
            std::int64_t mid = (lo + hi) / 2;
            if (exclude[mid] < idx) lo = mid + 1; else hi = mid;
        }
        return lo < n_exclude && exclude[lo] == idx;
    }
};

struct ScanArgs {
    Mode mode = Mode::F32;
    const void* items = nullptr;         // float32 or int8 [n, d], rows contiguous
    const float* scales = nullptr;       // float32 [n] (int8 items)
    const void* queries = nullptr;       // float32 or int8 [nq, d]
    const float* query_scales = nullptr; // float32 [nq] (int8 queries)
    std::int64_t n = 0;
    int d = 0;
    int nq = 0;
    // Float queries: score each query as a call with it alone would (never the broadcast batch kernel, whose sums
    // run in another order), so a query's result does not depend on the batch it came in.
    bool per_query = false;
    Filters filters;
    // Per-query exclusions: nq Filters (the same allow bitset, each its own exclusion list), or nullptr: every query
    // uses filters. The daemon's shared scan of a batch, where each shopper excludes what they have seen.
    const Filters* query_filters = nullptr;
    const Filters& filters_of(int q) const { return query_filters ? query_filters[q] : filters; }
    // How the scans read memory (dispatch.h scan_plan(), chosen once per CPU); results do not depend on either.
    // Software prefetch ahead of the x86 float32-row scans, and of the int8 ones (rows and packed tiles).
    bool prefetch_f32 = true;
    bool prefetch_i8 = true;
    // Side-by-side read streams (topk_kernel-inl.h for_rounds): of the int8-query scans (rows, packed tiles),
    // 1..kMaxStreams, and of the float-query row scans, 1, 2, 4 or 8.
    int streams = 1;
    int row_streams = 1;
};

// Bounded top-k of (score, index): a binary heap whose top is the current worst entry (lowest score; among equal
// scores the highest index), so "better" = higher score, then lower index.
struct Heap {
    int k = 0;
    int size = 0;
    float threshold = -std::numeric_limits<float>::infinity();  // score of the worst kept entry once full
    std::vector<float> score;
    std::vector<std::int64_t> index;

    explicit Heap(int k_ = 0) : k(k_), score(k_), index(k_) {}

    static bool worse(float s1, std::int64_t i1, float s2, std::int64_t i2) {
        return s1 < s2 || (s1 == s2 && i1 > i2);
    }
    void push(float s, std::int64_t i) {
        if (size < k) {
            int c = size++;
            while (c > 0) {
                int p = (c - 1) / 2;
                if (!worse(s, i, score[p], index[p])) break;
                score[c] = score[p]; index[c] = index[p]; c = p;
            }
            score[c] = s; index[c] = i;
        } else {
            if (!worse(score[0], index[0], s, i)) return;
            int c = 0;
            for (;;) {
                int l = 2 * c + 1, r = l + 1, m = c;
                float ms = s; std::int64_t mi = i;
                if (l < size && worse(score[l], index[l], ms, mi)) { m = l; ms = score[l]; mi = index[l]; }
                if (r < size && worse(score[r], index[r], ms, mi)) { m = r; }
                if (m == c) break;
                score[c] = score[m]; index[c] = index[m]; c = m;
            }
            score[c] = s; index[c] = i;
        }
        if (size == k) threshold = score[0];
    }
};

}  // namespace edgerec
