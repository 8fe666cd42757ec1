// Exact maximum-inner-product top-k: one kernel source, compiled once per instruction set.
//
// Each per-ISA translation unit (topk_scalar.cpp, topk_avx2.cpp, topk_avx512.cpp, topk_neon.cpp) defines
// EDGEREC_NS (its namespace) and EDGEREC_W (SIMD width in floats: 1, 8, 16, 4), is compiled with that ISA's flags,
// and includes this file. Vector code uses GCC/Clang vector extensions, which the compiler lowers to the ISA the
// file is compiled for; the scalar build uses width 1 with auto-vectorization disabled.
//
// Semantics shared by every path (and by the Numba / NumPy fallbacks in edge_runtime/scoring/):
//   score(q, i) = <q, x_i>                       float32 items
//               = <q, x_i> * s_i                 int8 items, float32 query (float accumulation)
//               = ((float)<q8, x_i>) * qs * s_i  int8 items, int8 query with scale qs (exact int accumulation)
//   an item whose score is NaN, whose allow bit is 0, or whose index is in the exclusion set never enters a result;
//   ties are broken by the lower item index; results are sorted by score desc, then index asc.
//
// Structure: items are scanned in blocks of 64 (one word of the allow bitset; a zero word skips the block without
// computing anything); scores of a block go to a small buffer; only scores above the query's current k-th best
// (the heap top) are checked against the filters and pushed. Batches of queries use a transposed item block so each
// item is read once for the whole batch and no horizontal sums are needed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "topk_common.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && EDGEREC_W == 4
#include <arm_neon.h>
#endif

#ifndef EDGEREC_NS
#error "define EDGEREC_NS and EDGEREC_W before including topk_kernel-inl.h"
#endif

namespace edgerec {
namespace EDGEREC_NS {

constexpr int W = EDGEREC_W;
constexpr int BLOCK = 64;  // items per block: one 64-bit word of the allow bitset
// Batches this large use the broadcast kernel; smaller ones score query by query (a vector of W query lanes would
// be mostly padding).
constexpr int kBatchMin = W > 1 ? (W / 2 > 2 ? W / 2 : 2) : 1 << 30;

#if EDGEREC_W > 1
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef std::int8_t v8 __attribute__((vector_size(W)));
typedef std::int32_t vi __attribute__((vector_size(W * sizeof(std::int32_t))));

static inline vf loadf(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
static inline vf splat(float x) { return vf{} + x; }
// int8 -> float widening load and horizontal sum: the ISA's own instructions where the generic vector code would
// go through memory.
#if defined(__AVX512F__) && EDGEREC_W == 16
static inline vf load8f(const std::int8_t* p) {
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
static inline float hsum(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#elif defined(__AVX2__) && EDGEREC_W == 8
static inline vf load8f(const std::int8_t* p) {
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
static inline float hsum(vf v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#elif defined(__ARM_NEON) && EDGEREC_W == 4
static inline vf load8f(const std::int8_t* p) {
    std::int8_t tmp[8] = {p[0], p[1], p[2], p[3], 0, 0, 0, 0};
    int16x8_t w = vmovl_s8(vld1_s8(tmp));
    return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
}
static inline float hsum(vf v) { return vaddvq_f32((float32x4_t)v); }
#else
static inline vf load8f(const std::int8_t* p) {
    v8 v;
    std::memcpy(&v, p, sizeof(v));
    return __builtin_convertvector(v, vf);
}
static inline float hsum(vf v) {
    float lanes[W];
    std::memcpy(lanes, &v, sizeof(v));
    for (int w = W / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
    return lanes[0];
}
#endif
#endif

// ------------------------------------------------------------------------------------------------ dot products
#if EDGEREC_W > 1
static inline vf loadx(const float* p) { return loadf(p); }
static inline vf loadx(const std::int8_t* p) { return load8f(p); }
#endif

// <q, x> with float accumulation, for float32 or int8 items (widened to float lane by lane).
template <typename Item>
static inline float dot_f(const float* q, const Item* x, int d) {
    int j = 0;
    float s = 0.0f;
#if EDGEREC_W > 1
    vf a0 = vf{}, a1 = vf{};
    for (; j + 2 * W <= d; j += 2 * W) {
        a0 += loadf(q + j) * loadx(x + j);
        a1 += loadf(q + j + W) * loadx(x + j + W);
    }
    for (; j + W <= d; j += W) a0 += loadf(q + j) * loadx(x + j);
    s = hsum(a0 + a1);
#endif
    for (; j < d; ++j) s += q[j] * static_cast<float>(x[j]);
    return s;
}

// Exact integer dot of two int8 vectors (|result| <= 127 * 127 * d fits int32 for d < 133,000).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// VNNI's dpbusd multiplies unsigned by signed bytes. Flipping the sign bit of each item byte gives x + 128 as
// unsigned, so dpbusd(x ^ 0x80, q) = <x, q> + 128 * sum(q): the correction depends on the query only and is
// subtracted by the caller (qcorr = 128 * sum(q)).
static inline std::int32_t dot_i8i(const std::int8_t* q, const std::int8_t* x, int d) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512i acc = _mm512_setzero_si512();
    int j = 0;
    for (; j + 64 <= d; j += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(_mm512_loadu_si512(x + j), flip), _mm512_loadu_si512(q + j));
    if (j < d) {
        const __mmask64 m = (1ULL << (d - j)) - 1;
        // masked-off lanes: x byte 0 ^ 0x80 = 128 times q byte 0 = 0, so they add nothing
        acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, x + j), flip),
                                  _mm512_maskz_loadu_epi8(m, q + j));
    }
    return _mm512_reduce_add_epi32(acc);
}
#define EDGEREC_I8I_BIASED 1

// Horizontal sums of 16 vectors at once: a permute-add tree leaves row r's total in lane r (about 3 ops per row
// instead of a full reduction per row).
struct Reduce16 {
    __m512i lo[4], hi[4];
    Reduce16() {
        static const int idx[4][16] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                                       {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                                       {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
                                       {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
        const int shift[4] = {8, 4, 2, 1};
        for (int l = 0; l < 4; ++l) {
            lo[l] = _mm512_loadu_si512(idx[l]);
            hi[l] = _mm512_add_epi32(lo[l], _mm512_set1_epi32(shift[l]));
        }
    }
    inline __m512i operator()(__m512i* v) const {
        int n = 16;
        for (int level = 0; level < 4; ++level, n /= 2)
            for (int p = 0; p < n / 2; ++p)
                v[p] = _mm512_add_epi32(_mm512_permutex2var_epi32(v[2 * p], lo[level], v[2 * p + 1]),
                                        _mm512_permutex2var_epi32(v[2 * p], hi[level], v[2 * p + 1]));
        return v[0];
    }
};

#else
static inline std::int32_t dot_i8i(const std::int8_t* q, const std::int8_t* x, int d) {
    std::int32_t s = 0;
    for (int j = 0; j < d; ++j) s += static_cast<std::int32_t>(q[j]) * static_cast<std::int32_t>(x[j]);
    return s;
}
#define EDGEREC_I8I_BIASED 0
#endif

// ------------------------------------------------------------------------------------------------ selection
// Push every score of a block that beats the heap's threshold and passes the filters.
static inline void select_block(const float* scores, std::int64_t base, int count, std::uint64_t allow_word,
                                const Filters& f, Heap& h) {
#if defined(__AVX512F__) && EDGEREC_W == 16
    if (h.size == h.k) {  // full heap: one vector compare per 16 scores finds the (rare) candidates
        const __m512 thr = _mm512_set1_ps(h.threshold);
        for (int t0 = 0; t0 < count; t0 += 16) {
            const __mmask16 live = static_cast<__mmask16>((allow_word >> t0) & 0xFFFFu) &
                                   static_cast<__mmask16>(count - t0 >= 16 ? 0xFFFFu : ((1u << (count - t0)) - 1));
            __mmask16 m = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, scores + t0), thr, _CMP_GT_OQ);
            while (m) {
                const int t = t0 + __builtin_ctz(m);
                m &= m - 1;
                if (scores[t] > h.threshold && !f.excluded(base + t)) h.push(scores[t], base + t);
            }
        }
        return;
    }
#endif
    for (int t = 0; t < count; ++t) {
        const float s = scores[t];
        if (!(s > h.threshold) && !(h.size < h.k && s == s)) continue;  // NaN and below-threshold leave here
        if (!((allow_word >> t) & 1ULL)) continue;
        const std::int64_t idx = base + t;
        if (f.excluded(idx)) continue;
        h.push(s, idx);
    }
}

static inline std::uint64_t block_allow(const Filters& f, std::int64_t base, int count) {
    std::uint64_t full = count == 64 ? ~0ULL : ((1ULL << count) - 1);
    if (!f.allow) return full;
    return f.allow_word(base, count) & full;
}

#if EDGEREC_I8I_BIASED
// One int8 query against int8 items, 16 rows per step (see dot_i8i for the bias trick).
static void scan_i8i_1q(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap& h, const std::int8_t* q,
                        std::int32_t qcorr, float qs) {
    const int d = a.d;
    const std::int8_t* items = static_cast<const std::int8_t*>(a.items);
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const int chunks = (d + 63) / 64;
    const __mmask64 tail = (d % 64) ? ((1ULL << (d % 64)) - 1) : ~0ULL;
    __m512i qv[4];
    const bool small = chunks <= 4;
    if (small)
        for (int c = 0; c < chunks; ++c)
            qv[c] = _mm512_maskz_loadu_epi8(c == chunks - 1 ? tail : ~0ULL, q + 64 * c);
    alignas(64) float buf[BLOCK];
    __m512i acc[16];
    const Reduce16 reduce16;
    for (std::int64_t base = begin; base < end; base += BLOCK) {
        const int count = static_cast<int>(std::min<std::int64_t>(BLOCK, end - base));
        const std::uint64_t allow = block_allow(a.filters, base, count);
        if (!allow) continue;
        for (int g = 0; g < count; g += 16) {
            const int rows = std::min(16, count - g);
            const std::int8_t* x0 = items + (base + g) * d;
            // two blocks ahead: keeps enough lines in flight to stream from DRAM across page boundaries
            for (int pf = 0; pf < 16 * d; pf += 64)
                _mm_prefetch(reinterpret_cast<const char*>(x0 + 2 * BLOCK * d + pf), _MM_HINT_T0);
            for (int r = 0; r < 16; ++r) {
                __m512i s = _mm512_setzero_si512();
                if (r < rows) {
                    const std::int8_t* x = x0 + static_cast<std::int64_t>(r) * d;
                    for (int c = 0; c < chunks; ++c) {
                        const __mmask64 m = c == chunks - 1 ? tail : ~0ULL;
                        const __m512i qq = small ? qv[c] : _mm512_maskz_loadu_epi8(m, q + 64 * c);
                        s = _mm512_dpbusd_epi32(s, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, x + 64 * c), flip), qq);
                    }
                }
                acc[r] = s;
            }
            const __m512i dots = _mm512_sub_epi32(reduce16(acc), _mm512_set1_epi32(qcorr));
            const __mmask16 live = static_cast<__mmask16>(rows == 16 ? 0xFFFFu : ((1u << rows) - 1));
            const __m512 sc = _mm512_maskz_loadu_ps(live, a.scales + base + g);
            _mm512_storeu_ps(buf + g, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(qs)), sc));
        }
        select_block(buf, base, count, allow, a.filters, h);
    }
}
#endif

// Packed int8 tiles, one int8 query (see topk_common.h for the layout). begin is a multiple of 64.
static void scan_packed_1q(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap& h, const std::int8_t* q,
                           std::int32_t qsum, float qs) {
    const int d = a.d;
    const int groups = static_cast<int>(packed_groups(d));
    const std::int64_t tile_bytes = packed_tile_bytes(d);
    const std::uint8_t* packed = static_cast<const std::uint8_t*>(a.items);
    std::vector<std::int32_t> q4v(groups);
    std::vector<std::int8_t> qpv(static_cast<std::size_t>(groups) * 4);
    std::int32_t* q4 = q4v.data();
    std::int8_t* qp = qpv.data();
    for (int j = 0; j < groups * 4; ++j) qp[j] = j < d ? q[j] : 0;
    std::memcpy(q4, qp, groups * 4);
    alignas(64) float buf[BLOCK];
    for (std::int64_t base = begin; base < end; base += BLOCK) {
        const int count = static_cast<int>(std::min<std::int64_t>(BLOCK, end - base));
        const std::uint64_t allow = block_allow(a.filters, base, count);
        if (!allow) continue;
        for (int g0 = 0; g0 < count; g0 += kTileRows) {
            const std::uint8_t* tile = packed + ((base + g0) / kTileRows) * tile_bytes;
#if EDGEREC_I8I_BIASED
            _mm_prefetch(reinterpret_cast<const char*>(tile + 8 * tile_bytes), _MM_HINT_T0);
            const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
            __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
            int g = 0;
            for (; g + 2 <= groups; g += 2) {
                acc0 = _mm512_dpbusd_epi32(acc0, _mm512_xor_si512(_mm512_loadu_si512(tile + 64 * g), flip),
                                           _mm512_set1_epi32(q4[g]));
                acc1 = _mm512_dpbusd_epi32(acc1, _mm512_xor_si512(_mm512_loadu_si512(tile + 64 * g + 64), flip),
                                           _mm512_set1_epi32(q4[g + 1]));
            }
            if (g < groups)
                acc0 = _mm512_dpbusd_epi32(acc0, _mm512_xor_si512(_mm512_loadu_si512(tile + 64 * g), flip),
                                           _mm512_set1_epi32(q4[g]));
            const __m512i dots = _mm512_sub_epi32(_mm512_add_epi32(acc0, acc1), _mm512_set1_epi32(128 * qsum));
            const int rows = std::min(kTileRows, count - g0);
            const __mmask16 live = static_cast<__mmask16>(rows == 16 ? 0xFFFFu : ((1u << rows) - 1));
            const __m512 sc = _mm512_maskz_loadu_ps(live, a.scales + base + g0);
            _mm512_storeu_ps(buf + g0, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(qs)), sc));
#else
            (void)qsum;
            std::int32_t dots[kTileRows] = {0};
            for (int g = 0; g < groups; ++g) {
                const std::int8_t* grp = reinterpret_cast<const std::int8_t*>(tile + 64 * g);
                for (int r = 0; r < kTileRows; ++r)
                    for (int b = 0; b < 4; ++b)
                        dots[r] += static_cast<std::int32_t>(grp[4 * r + b]) * static_cast<std::int32_t>(qp[4 * g + b]);
            }
            const int rows = std::min(kTileRows, count - g0);
            for (int r = 0; r < rows; ++r)
                buf[g0 + r] = (static_cast<float>(dots[r]) * qs) * a.scales[base + g0 + r];
#endif
        }
        select_block(buf, base, count, allow, a.filters, h);
    }
}

// ------------------------------------------------------------------------------------------------ scans
// Scan items [begin, end) for queries [0, nq) into heaps[0..nq). begin is a multiple of 64.
template <typename Item, typename Score>
static void scan_rows(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap* heaps, Score score_row) {
    float buf[BLOCK];
    for (std::int64_t base = begin; base < end; base += BLOCK) {
        const int count = static_cast<int>(std::min<std::int64_t>(BLOCK, end - base));
        const std::uint64_t allow = block_allow(a.filters, base, count);
        if (!allow) continue;
        const Item* rows = static_cast<const Item*>(a.items) + base * a.d;
        for (int q = 0; q < a.nq; ++q) {
            for (int t = 0; t < count; ++t) buf[t] = score_row(q, rows + t * a.d, base + t);
            select_block(buf, base, count, allow, a.filters, heaps[q]);
        }
    }
}

#if EDGEREC_W > 1
// Batch of queries (nq >= W / 2): queries transposed once per call into qt[d][nqp] (nqp = nq rounded up to W,
// zero-padded); each item value is broadcast against W queries at a time, so every item is read once for the whole
// batch, nothing is transposed per item and no horizontal sums are needed. 4 rows x 2 query vectors = 8
// independent accumulators per step hide the FMA latency. int8 items are widened to float once per block.
template <typename Item>
static void scan_batch(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap* heaps, const float* qf,
                       const float* post_scale_q) {
    const int d = a.d, nq = a.nq;
    const int nv = (nq + W - 1) / W, nqp = nv * W;
    // Work buffers on the heap: their size grows with d and the batch (no stack-size limit to hit).
    std::vector<float> qtv(static_cast<std::size_t>(d) * nqp), scv(static_cast<std::size_t>(BLOCK) * nqp);
    std::vector<float> xfv(std::is_same<Item, float>::value ? 0 : static_cast<std::size_t>(BLOCK) * d);
    float* qt = qtv.data();
    for (int j = 0; j < d; ++j)
        for (int q = 0; q < nqp; ++q) qt[j * nqp + q] = q < nq ? qf[q * d + j] : 0.0f;
    float* sc = scv.data();  // [item][query]
    float* xf = xfv.data();
    float buf[BLOCK];
    const Item* items = static_cast<const Item*>(a.items);
    for (std::int64_t base = begin; base < end; base += BLOCK) {
        const int count = static_cast<int>(std::min<std::int64_t>(BLOCK, end - base));
        const std::uint64_t allow = block_allow(a.filters, base, count);
        if (!allow) continue;
        const float* x;
        if constexpr (std::is_same<Item, float>::value) {
            x = items + base * d;
        } else {
            const std::int8_t* src = items + base * d;
            const int total = count * d;
            int j = 0;
            for (; j + W <= total; j += W) {
                const vf v = load8f(src + j);
                std::memcpy(xf + j, &v, sizeof(v));
            }
            for (; j < total; ++j) xf[j] = static_cast<float>(src[j]);
            x = xf;
        }
        int t = 0;
        for (; t + 4 <= count; t += 4) {
            const float *x0 = x + t * d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
            int v = 0;
            for (; v + 2 <= nv; v += 2) {
                vf a00 = vf{}, a01 = vf{}, a10 = vf{}, a11 = vf{}, a20 = vf{}, a21 = vf{}, a30 = vf{}, a31 = vf{};
                const float* qp = qt + v * W;
                for (int j = 0; j < d; ++j, qp += nqp) {
                    const vf q0 = loadf(qp), q1 = loadf(qp + W);
                    const vf b0 = splat(x0[j]), b1 = splat(x1[j]), b2 = splat(x2[j]), b3 = splat(x3[j]);
                    a00 += b0 * q0; a01 += b0 * q1;
                    a10 += b1 * q0; a11 += b1 * q1;
                    a20 += b2 * q0; a21 += b2 * q1;
                    a30 += b3 * q0; a31 += b3 * q1;
                }
                float* o = sc + t * nqp + v * W;
                std::memcpy(o, &a00, sizeof(vf)); std::memcpy(o + W, &a01, sizeof(vf));
                std::memcpy(o + nqp, &a10, sizeof(vf)); std::memcpy(o + nqp + W, &a11, sizeof(vf));
                std::memcpy(o + 2 * nqp, &a20, sizeof(vf)); std::memcpy(o + 2 * nqp + W, &a21, sizeof(vf));
                std::memcpy(o + 3 * nqp, &a30, sizeof(vf)); std::memcpy(o + 3 * nqp + W, &a31, sizeof(vf));
            }
            for (; v < nv; ++v) {
                vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
                const float* qp = qt + v * W;
                for (int j = 0; j < d; ++j, qp += nqp) {
                    const vf q0 = loadf(qp);
                    a0 += splat(x0[j]) * q0; a1 += splat(x1[j]) * q0;
                    a2 += splat(x2[j]) * q0; a3 += splat(x3[j]) * q0;
                }
                float* o = sc + t * nqp + v * W;
                std::memcpy(o, &a0, sizeof(vf)); std::memcpy(o + nqp, &a1, sizeof(vf));
                std::memcpy(o + 2 * nqp, &a2, sizeof(vf)); std::memcpy(o + 3 * nqp, &a3, sizeof(vf));
            }
        }
        for (; t < count; ++t) {
            const float* xr = x + t * d;
            for (int v = 0; v < nv; ++v) {
                vf acc = vf{};
                const float* qp = qt + v * W;
                for (int j = 0; j < d; ++j, qp += nqp) acc += splat(xr[j]) * loadf(qp);
                std::memcpy(sc + t * nqp + v * W, &acc, sizeof(vf));
            }
        }
        for (int q = 0; q < nq; ++q) {
            for (int i = 0; i < count; ++i) {
                float val = sc[i * nqp + q];
                if (a.scales) val = (post_scale_q ? val * post_scale_q[q] : val) * a.scales[base + i];
                buf[i] = val;
            }
            select_block(buf, base, count, allow, a.filters, heaps[q]);
        }
    }
}
#endif

// Entry point of this ISA: dispatch on the item / query types. Items [begin, end) into heaps[0..nq).
void scan(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap* heaps) {
    const int d = a.d;
    switch (a.mode) {
    case Mode::F32: {
        const float* qs = static_cast<const float*>(a.queries);
#if EDGEREC_W > 1
        if (a.nq >= kBatchMin) { scan_batch<float>(a, begin, end, heaps, qs, nullptr); return; }
#endif
        scan_rows<float>(a, begin, end, heaps,
                         [&](int q, const float* x, std::int64_t) { return dot_f(qs + q * d, x, d); });
        return;
    }
    case Mode::I8_F32Q: {
        const float* qs = static_cast<const float*>(a.queries);
#if EDGEREC_W > 1
        if (a.nq >= kBatchMin) { scan_batch<std::int8_t>(a, begin, end, heaps, qs, nullptr); return; }
#endif
        scan_rows<std::int8_t>(a, begin, end, heaps, [&](int q, const std::int8_t* x, std::int64_t i) {
            return dot_f(qs + q * d, x, d) * a.scales[i];
        });
        return;
    }
    case Mode::I8P_I8Q: {
        const std::int8_t* q8 = static_cast<const std::int8_t*>(a.queries);
        for (int q = 0; q < a.nq; ++q) {
            std::int32_t sq = 0;
            for (int j = 0; j < d; ++j) sq += q8[q * d + j];
            scan_packed_1q(a, begin, end, heaps[q], q8 + q * d, sq, a.query_scales[q]);
        }
        return;
    }
    case Mode::I8_I8Q: {
        const std::int8_t* q8 = static_cast<const std::int8_t*>(a.queries);
#if EDGEREC_W > 1
        if (a.nq >= kBatchMin) {
            // Integer-valued floats: every partial sum is an integer of magnitude <= 128 * 128 * d < 2^24 (d <= 1024,
            // checked by the caller), so float accumulation is exact and equals the int32 dot.
            std::vector<float> qf(static_cast<std::size_t>(a.nq) * d);
            for (std::size_t i = 0; i < qf.size(); ++i) qf[i] = static_cast<float>(q8[i]);
            scan_batch<std::int8_t>(a, begin, end, heaps, qf.data(), a.query_scales);
            return;
        }
#endif
        std::vector<std::int32_t> qcorr(a.nq);
        for (int q = 0; q < a.nq; ++q) {
            std::int32_t sq = 0;
            for (int j = 0; j < d; ++j) sq += q8[q * d + j];
            qcorr[q] = EDGEREC_I8I_BIASED ? 128 * sq : 0;
        }
#if EDGEREC_I8I_BIASED
        if (a.nq == 1) { scan_i8i_1q(a, begin, end, heaps[0], q8, qcorr[0], a.query_scales[0]); return; }
#endif
        scan_rows<std::int8_t>(a, begin, end, heaps, [&](int q, const std::int8_t* x, std::int64_t i) {
            return (static_cast<float>(dot_i8i(q8 + q * d, x, d) - qcorr[q]) * a.query_scales[q]) * a.scales[i];
        });
        return;
    }
    }
}

// Sum of n floats (the memory-bandwidth probe of the benchmark: a pure streaming read).
double stream_sum(const float* p, std::int64_t n) {
    std::int64_t j = 0;
    double total = 0.0;
#if EDGEREC_W > 1
    vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
    for (; j + 4 * W <= n; j += 4 * W) {
        a0 += loadf(p + j);
        a1 += loadf(p + j + W);
        a2 += loadf(p + j + 2 * W);
        a3 += loadf(p + j + 3 * W);
    }
    total = hsum(a0 + a1 + a2 + a3);
#endif
    for (; j < n; ++j) total += p[j];
    return total;
}

}  // namespace EDGEREC_NS
}  // namespace edgerec
