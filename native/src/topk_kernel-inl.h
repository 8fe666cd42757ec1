// Exact maximum-inner-product top-k: one kernel source, compiled once per instruction set.
//
// Each per-ISA translation unit (topk_scalar.cpp, topk_avx2.cpp, topk_avx512.cpp, topk_avx512_vnni.cpp,
// topk_neon.cpp, topk_neon_dotprod.cpp) defines EDGEREC_NS (its namespace) and EDGEREC_W (SIMD width in floats: 1,
// 8, 16, 16, 4, 4), is compiled with that ISA's flags, and includes this file. Vector code uses GCC/Clang vector
// extensions, which the compiler lowers to the ISA the file is compiled for, and intrinsics where the hot loops need
// an instruction the generic code would not produce; the scalar build uses width 1 with auto-vectorization disabled.
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
//
// int8 x int8 dot products per level (all exact integer sums, so every level returns the scalar build's bits):
//   avx512_vnni   vpdpbusd (unsigned x signed bytes) with the sign-bit flip and a per-query correction
//   avx2, avx512  vpmaddubsw + vpmaddwd with the abs / sign trick, or vpmovsxbw + vpmaddwd for queries holding -128
//                 (256-bit; the avx512 build, AVX-512 without VNNI, runs the same code)
//   neon_dotprod  sdot (vdotq_s32, signed x signed)
//   neon          vmull_s8 + vpadalq_s16
//   scalar        plain C++
// and the packed 16-row tiles (topk_common.h) let every SIMD level score 16 rows per tile group with no horizontal
// sums. The float single-query scan (float32 or int8 items, float32 query, also the per_query batches) takes 8 rows
// per step with software prefetch: 256-bit FMAs in the avx2 build, 512-bit ones (16 columns each) in the AVX-512
// builds, the generic vector code elsewhere.
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
// x in every lane. Not "vf{} + x": without -ffast-math the compiler must keep that add (0 + -0 is +0), which cost
// the batch kernel an add and a register shuffle per broadcast instead of one broadcast load (~1.3x slower).
static inline vf splat(float x) {
#if defined(__AVX512F__) && EDGEREC_W == 16
    return (vf)_mm512_set1_ps(x);
#elif defined(__AVX2__) && EDGEREC_W == 8
    return (vf)_mm256_set1_ps(x);
#elif defined(__ARM_NEON) && EDGEREC_W == 4
    return (vf)vdupq_n_f32(x);
#else
    vf v;
    for (int l = 0; l < W; ++l) v[l] = x;
    return v;
#endif
}
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

// ------------------------------------------------------------------------------------------------ AVX2 helpers
// (the avx2 build and, for the float single-query scan's 8-row loop, the AVX-512 builds too)
#if defined(__AVX2__) && EDGEREC_W >= 8
#define EDGEREC_AVX2_HELPERS 1
static inline __m256i loadi(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
static inline std::int32_t hsum_i32(__m256i v) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 1));
    return _mm_cvtsi128_si32(x);
}
// Lane r of the result = sum of the 8 lanes of v[r] (int32 or float), for 8 rows at once.
static inline __m256i hsum8(const __m256i* v) {
    const __m256i t0 = _mm256_hadd_epi32(v[0], v[1]), t1 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i t2 = _mm256_hadd_epi32(v[4], v[5]), t3 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}
static inline __m256 hsum8(const __m256* v) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
// Software prefetch of [p, p + bytes), one hint per 64-byte line (the hardware prefetchers alone leave the scans
// 15-25 % short of the bandwidth they reach with it). Hints past the end of an array are harmless.
static inline void prefetch_lines(const void* p, std::int64_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (std::int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}
#else
#define EDGEREC_AVX2_HELPERS 0
#endif

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

#elif defined(__AVX2__) && EDGEREC_W >= 8  // the avx2 build, and the avx512 build (AVX-512 without VNNI)
// AVX2 has no int8 dot-product instruction (that is VNNI's vpdpbusd); two exact ways through 16-bit multiplies:
//  * "sign" (kSign): vpmaddubsw multiplies unsigned by signed bytes and adds adjacent pairs into int16, saturating.
//    With u = |x| (vpabsb; -128 gives 0x80, which is 128 read as unsigned: still right) and s = q * sign(x)
//    (vpsignb), u * s = x * q, and a pair sum is at most 2 * 128 * 127 = 32512 < 32767, so it never saturates -
//    provided the query holds no -128 (vpsignb cannot negate -128: it stays -128). vpmaddwd against 1s then adds
//    pairs of int16 into int32. 5 ops per 32 bytes.
//  * "widen": vpmovsxbw sign-extends 16 bytes to int16 and vpmaddwd multiplies and adds pairs into int32: exact for
//    every byte value, 3 ops per 16 bytes. Used for queries that hold -128, for tails, and by dot_i8i.
// Both are exact integer sums, so which one runs never changes a result.
#define EDGEREC_I8I_AVX2 1
static inline __m256i cvt16(const void* p) {  // 16 bytes -> 16 x int16
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
static inline __m256i cvt16_8(const void* p) {  // 8 bytes -> 8 x int16 in the low half, zeros above
    return _mm256_cvtepi8_epi16(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
}
// 32 products x * q, summed in groups of 4 into 8 int32 lanes (the "sign" way; q must hold no -128).
static inline __m256i madd_sign(__m256i x, __m256i q, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(q, x)), ones);
}
// The "widen" way for the bytes [j, d) that a 32-byte step left: 16, then 8 bytes at a time, then scalar.
static inline std::int32_t dot_i8i_from(const std::int8_t* q, const std::int8_t* x, int j, int d) {
    __m256i acc = _mm256_setzero_si256();
    for (; j + 16 <= d; j += 16) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(cvt16(x + j), cvt16(q + j)));
    for (; j + 8 <= d; j += 8) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(cvt16_8(x + j), cvt16_8(q + j)));
    std::int32_t s = hsum_i32(acc);
    for (; j < d; ++j) s += static_cast<std::int32_t>(q[j]) * static_cast<std::int32_t>(x[j]);
    return s;
}
static inline std::int32_t dot_i8i(const std::int8_t* q, const std::int8_t* x, int d) {
    return dot_i8i_from(q, x, 0, d);
}
static inline bool holds_m128(const std::int8_t* q, int d) {
    for (int j = 0; j < d; ++j)
        if (q[j] == -128) return true;
    return false;
}
#define EDGEREC_I8I_BIASED 0
#elif defined(__ARM_NEON) && EDGEREC_W == 4
// AArch64. The neon_dotprod build (ARMv8.2 dot-product extension, topk_neon_dotprod.cpp) has SDOT (vdotq_s32):
// 4 signed byte products summed into each int32 lane, exact for every byte value, no bias trick needed. Plain NEON
// (Cortex-A72: Raspberry Pi 4) multiplies 8 bytes into exact int16 products (vmull_s8; |x * q| <= 16384) and adds
// them in pairs into int32 lanes (vpadalq_s16): also exact, about 3x the instructions.
#define EDGEREC_I8I_NEON 1
#if defined(__ARM_FEATURE_DOTPROD)
static inline int32x4_t dot16(int32x4_t acc, int8x16_t x, int8x16_t q) { return vdotq_s32(acc, x, q); }
#else
static inline int32x4_t dot16(int32x4_t acc, int8x16_t x, int8x16_t q) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(x), vget_low_s8(q)));
    return vpadalq_s16(acc, vmull_high_s8(x, q));
}
#endif
// <q, x> over [j, d): 16 bytes, then 8, then scalar.
static inline std::int32_t dot_i8i_from(const std::int8_t* q, const std::int8_t* x, int j, int d) {
    int32x4_t a0 = vdupq_n_s32(0), a1 = vdupq_n_s32(0);
    for (; j + 32 <= d; j += 32) {
        a0 = dot16(a0, vld1q_s8(x + j), vld1q_s8(q + j));
        a1 = dot16(a1, vld1q_s8(x + j + 16), vld1q_s8(q + j + 16));
    }
    for (; j + 16 <= d; j += 16) a0 = dot16(a0, vld1q_s8(x + j), vld1q_s8(q + j));
    for (; j + 8 <= d; j += 8) a1 = vpadalq_s16(a1, vmull_s8(vld1_s8(x + j), vld1_s8(q + j)));
    std::int32_t s = vaddvq_s32(vaddq_s32(a0, a1));
    for (; j < d; ++j) s += static_cast<std::int32_t>(q[j]) * static_cast<std::int32_t>(x[j]);
    return s;
}
static inline std::int32_t dot_i8i(const std::int8_t* q, const std::int8_t* x, int d) {
    return dot_i8i_from(q, x, 0, d);
}
#define EDGEREC_I8I_BIASED 0
#else
static inline std::int32_t dot_i8i(const std::int8_t* q, const std::int8_t* x, int d) {
    std::int32_t s = 0;
    for (int j = 0; j < d; ++j) s += static_cast<std::int32_t>(q[j]) * static_cast<std::int32_t>(x[j]);
    return s;
}
#define EDGEREC_I8I_BIASED 0
#endif
#ifndef EDGEREC_I8I_AVX2
#define EDGEREC_I8I_AVX2 0
#endif
#ifndef EDGEREC_I8I_NEON
#define EDGEREC_I8I_NEON 0
#endif

// One int8 query, prepared once per call for the packed scans: its 4 bytes of each tile group (zero past d), the
// same 4 values as int16 (the AVX2 "widen" way), its sum (the VNNI bias correction), its scale, and whether it holds
// no -128 (the AVX2 sign trick).
struct PackedQuery {
    std::vector<std::int32_t> q4;
    std::vector<std::int64_t> qw4;
    std::int32_t qsum = 0;
    float qs = 1.0f;
    bool sign_ok = true;
    PackedQuery() = default;
    PackedQuery(const std::int8_t* q, int d, float scale) : q4(packed_groups(d)), qw4(packed_groups(d)), qs(scale) {
        for (std::size_t g = 0; g < q4.size(); ++g) {
            std::int8_t b[4];
            std::int16_t w[4];
            for (int k = 0; k < 4; ++k) {
                const int j = static_cast<int>(4 * g) + k;
                w[k] = b[k] = j < d ? q[j] : 0;
                qsum += b[k];
                sign_ok = sign_ok && b[k] != -128;
            }
            std::memcpy(&q4[g], b, 4);
            std::memcpy(&qw4[g], w, 8);
        }
    }
};

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
            __mmask16 m = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, scores + t0), thr, _CMP_GE_OQ);
            while (m) {
                const int t = t0 + __builtin_ctz(m);
                m &= m - 1;
                if (scores[t] >= h.threshold && !f.excluded(base + t)) h.push(scores[t], base + t);
            }
        }
        return;
    }
#elif defined(__AVX2__) && EDGEREC_W == 8
    if (h.size == h.k) {  // the same with 8 scores per compare
        const __m256 thr = _mm256_set1_ps(h.threshold);
        int t0 = 0;
        for (; t0 + 8 <= count; t0 += 8) {
            unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + t0), thr,
                                                                                _CMP_GE_OQ))) &
                         static_cast<unsigned>((allow_word >> t0) & 0xFFu);
            while (m) {
                const int t = t0 + __builtin_ctz(m);
                m &= m - 1;
                if (scores[t] >= h.threshold && !f.excluded(base + t)) h.push(scores[t], base + t);
            }
        }
        for (int t = t0; t < count; ++t)
            if (scores[t] >= h.threshold && ((allow_word >> t) & 1ULL) && !f.excluded(base + t))
                h.push(scores[t], base + t);
        return;
    }
#elif defined(__ARM_NEON) && EDGEREC_W == 4
    if (h.size == h.k) {  // 4 scores per compare; a group with no candidate costs one compare and one max
        int t0 = 0;
        for (; t0 + 4 <= count; t0 += 4) {
            if (vmaxvq_u32(vcgeq_f32(vld1q_f32(scores + t0), vdupq_n_f32(h.threshold))) == 0) continue;
            for (int t = t0; t < t0 + 4; ++t)
                if (scores[t] >= h.threshold && ((allow_word >> t) & 1ULL) && !f.excluded(base + t))
                    h.push(scores[t], base + t);
        }
        for (int t = t0; t < count; ++t)
            if (scores[t] >= h.threshold && ((allow_word >> t) & 1ULL) && !f.excluded(base + t))
                h.push(scores[t], base + t);
        return;
    }
#endif
    for (int t = 0; t < count; ++t) {
        const float s = scores[t];
        if (!(s >= h.threshold) && !(h.size < h.k && s == s)) continue;  // NaN and below-threshold leave here
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

// ------------------------------------------------------------------------------------------------ streams
// The scans of row-major items and of packed tiles can read [begin, end) as several side-by-side streams: the range
// is cut into that many runs of whole blocks, and each round takes the next block of every run and interleaves their
// steps (8 rows or one tile: 0.5-2 KB each), so that several sequential reads are in flight at once instead of one.
// On Zen 3 that reads memory faster (a plain 256 MB sum: 18-20 GB/s as one stream, 21-22 as four interleaved 1 KB at
// a time; the scans' figures and the choice per CPU: dispatch.h scan_plan). Each block's own rows or tiles are still
// read in order: visiting a block's tiles in a rotated order per stream ran 2x slower. Results do not depend on the
// streams: a block's scores are the same whenever it is scanned, and the heap keeps the k best under a total order
// (score, then lower index) whatever the order of the pushes; select_block lets a score equal to a full heap's
// threshold through to that order, since a later block may hold an earlier index.
struct Round {
    int live = 0;  // blocks in this round with at least one allowed item (at most kMaxStreams)
    std::int64_t base[kMaxStreams];
    int count[kMaxStreams];
    std::uint64_t allow[kMaxStreams];
};
template <typename Fn>
static inline void for_rounds(const ScanArgs& a, std::int64_t begin, std::int64_t end, int streams, Fn fn) {
    streams = std::max(1, std::min(kMaxStreams, streams));
    const std::int64_t blocks = (end - begin + BLOCK - 1) / BLOCK;
    const std::int64_t per = (blocks + streams - 1) / streams;  // blocks per run; the last run may be shorter
    Round r;
    for (std::int64_t b = 0; b < per; ++b) {
        r.live = 0;
        for (int s = 0; s < streams; ++s) {
            const std::int64_t bi = s * per + b;
            if (bi >= blocks) break;
            const std::int64_t base = begin + bi * BLOCK;
            const int count = static_cast<int>(std::min<std::int64_t>(BLOCK, end - base));
            const std::uint64_t allow = block_allow(a.filters, base, count);
            if (!allow) continue;
            r.base[r.live] = base;
            r.count[r.live] = count;
            r.allow[r.live] = allow;
            ++r.live;
        }
        if (r.live) fn(r);
    }
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
        select_block(buf, base, count, allow, a.filters_of(0), h);
    }
}
#endif

#if EDGEREC_I8I_AVX2
// A few int8 queries (nq < kBatchMin) against row-major int8 items on AVX2, block by block (each block is read from
// memory once for all of them). 8 rows per step, one int32 accumulator per row (8 lanes of partial sums), reduced
// together (hsum8) so that lane r holds row r's dot. kSign: see madd_sign (the query holds no -128); otherwise
// the "widen" way throughout, with the query widened to int16 once (qw).
template <bool kSign>
static inline void i8i_block_avx2(const std::int8_t* q, const std::int16_t* qw, const std::int8_t* x0, int count,
                                  int d, float qs, const float* scales, float* buf, bool prefetch) {
    const int step = kSign ? 32 : 16;
    const int dv = d / step * step;  // bytes done by the main loop; dot_i8i_from does the rest
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256 vqs = _mm256_set1_ps(qs);
    alignas(32) std::int32_t rest[8];
    int t = 0;
    for (; t + 8 <= count; t += 8) {
        const std::int8_t* xr = x0 + static_cast<std::int64_t>(t) * d;
        if (prefetch) prefetch_lines(xr + 32 * d, 8 * d);  // 4 steps ahead, spread over the block
        __m256i acc[8];
        for (int r = 0; r < 8; ++r) {
            const std::int8_t* x = xr + static_cast<std::int64_t>(r) * d;
            __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
            int j = 0;
            if (kSign) {
                for (; j + 64 <= dv; j += 64) {
                    s0 = _mm256_add_epi32(s0, madd_sign(loadi(x + j), loadi(q + j), ones));
                    s1 = _mm256_add_epi32(s1, madd_sign(loadi(x + j + 32), loadi(q + j + 32), ones));
                }
                if (j < dv) s0 = _mm256_add_epi32(s0, madd_sign(loadi(x + j), loadi(q + j), ones));
            } else {
                for (; j + 32 <= dv; j += 32) {
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(cvt16(x + j), loadi(qw + j)));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(cvt16(x + j + 16), loadi(qw + j + 16)));
                }
                if (j < dv) s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(cvt16(x + j), loadi(qw + j)));
            }
            acc[r] = _mm256_add_epi32(s0, s1);
            if (dv < d) rest[r] = dot_i8i_from(q, x, dv, d);
        }
        __m256i dots = hsum8(acc);
        if (dv < d) dots = _mm256_add_epi32(dots, _mm256_load_si256(reinterpret_cast<const __m256i*>(rest)));
        // (float(dot) * qs) * s_i, in that order, as the scalar build computes it
        _mm256_storeu_ps(buf + t,
                         _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dots), vqs), _mm256_loadu_ps(scales + t)));
    }
    for (; t < count; ++t)
        buf[t] = (static_cast<float>(dot_i8i(q, x0 + static_cast<std::int64_t>(t) * d, d)) * qs) * scales[t];
}

static void scan_i8i_avx2(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap* heaps) {
    const int d = a.d, nq = a.nq;
    const std::int8_t* q8 = static_cast<const std::int8_t*>(a.queries);
    const std::int8_t* items = static_cast<const std::int8_t*>(a.items);
    std::vector<char> sign_ok(nq);
    std::vector<std::int16_t> qw(static_cast<std::size_t>(nq) * d);
    for (int q = 0; q < nq; ++q) {
        sign_ok[q] = !holds_m128(q8 + q * d, d);
        for (int j = 0; j < d; ++j) qw[static_cast<std::size_t>(q) * d + j] = q8[q * d + j];
    }
    alignas(32) float buf[kMaxStreams][BLOCK];
    for_rounds(a, begin, end, a.streams, [&](const Round& r) {
        for (int q = 0; q < nq; ++q) {
            const bool pf = q == 0 && a.prefetch_i8;
            for (int t = 0; t < BLOCK; t += 8) {  // 8 rows of each block in turn
                for (int s = 0; s < r.live; ++s) {
                    if (t >= r.count[s]) continue;
                    const std::int64_t row = r.base[s] + t;
                    const int rows = std::min(8, r.count[s] - t);
                    if (sign_ok[q])
                        i8i_block_avx2<true>(q8 + q * d, nullptr, items + row * d, rows, d, a.query_scales[q],
                                             a.scales + row, buf[s] + t, pf);
                    else
                        i8i_block_avx2<false>(q8 + q * d, qw.data() + static_cast<std::size_t>(q) * d,
                                              items + row * d, rows, d, a.query_scales[q], a.scales + row,
                                              buf[s] + t, pf);
                }
            }
            for (int s = 0; s < r.live; ++s)
                select_block(buf[s], r.base[s], r.count[s], r.allow[s], a.filters_of(q), heaps[q]);
        }
    });
}

// One int8 query against one packed tile on AVX2 (see scan_packed). A tile group (4 dimensions of 16 rows, 64 bytes)
// is two vectors of 8 rows x 4 bytes; against the broadcast 4 query bytes, madd_sign leaves one int32 per row - no
// horizontal sums. The "widen" way (queries holding -128) takes 16 bytes = 4 rows at a time and one hadd per tile.
static inline void packed_tile(const std::uint8_t* tile, int groups, const PackedQuery& pq, const float* sc, int rows,
                               float* out) {
    const std::int32_t* q4 = pq.q4.data();
    __m256i lo, hi;  // lane r: row r, row 8 + r
    if (pq.sign_ok) {
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i lo0 = _mm256_setzero_si256(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
        int g = 0;
        for (; g + 2 <= groups; g += 2) {
            const std::uint8_t* p = tile + 64 * g;
            const __m256i qa = _mm256_set1_epi32(q4[g]), qb = _mm256_set1_epi32(q4[g + 1]);
            lo0 = _mm256_add_epi32(lo0, madd_sign(loadi(p), qa, ones));
            hi0 = _mm256_add_epi32(hi0, madd_sign(loadi(p + 32), qa, ones));
            lo1 = _mm256_add_epi32(lo1, madd_sign(loadi(p + 64), qb, ones));
            hi1 = _mm256_add_epi32(hi1, madd_sign(loadi(p + 96), qb, ones));
        }
        if (g < groups) {
            const std::uint8_t* p = tile + 64 * g;
            const __m256i qa = _mm256_set1_epi32(q4[g]);
            lo0 = _mm256_add_epi32(lo0, madd_sign(loadi(p), qa, ones));
            hi0 = _mm256_add_epi32(hi0, madd_sign(loadi(p + 32), qa, ones));
        }
        lo = _mm256_add_epi32(lo0, lo1);
        hi = _mm256_add_epi32(hi0, hi1);
    } else {
        const std::int64_t* qw4 = pq.qw4.data();
        // c[k]: rows 4k..4k+3, two int32 lanes per row (dimensions 0-1 and 2-3 of each group)
        __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
        for (int g = 0; g < groups; ++g) {
            const std::uint8_t* p = tile + 64 * g;
            const __m256i qw = _mm256_set1_epi64x(qw4[g]);
            c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(cvt16(p), qw));
            c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(cvt16(p + 16), qw));
            c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(cvt16(p + 32), qw));
            c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(cvt16(p + 48), qw));
        }
        // hadd gives rows [0 1 4 5 | 2 3 6 7]; the permute puts them in order
        lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c0, c1), 0xD8);
        hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(c2, c3), 0xD8);
    }
    if (rows == kTileRows) {  // (float(dot) * qs) * s_i, in that order, as the scalar build computes it
        const __m256 vqs = _mm256_set1_ps(pq.qs);
        _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), vqs), _mm256_loadu_ps(sc)));
        _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), vqs), _mm256_loadu_ps(sc + 8)));
    } else {  // the last, partial tile: no scales to read past n
        alignas(32) std::int32_t dots[kTileRows];
        _mm256_store_si256(reinterpret_cast<__m256i*>(dots), lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(dots + 8), hi);
        for (int r = 0; r < rows; ++r) out[r] = (static_cast<float>(dots[r]) * pq.qs) * sc[r];
    }
}
#endif

#if EDGEREC_AVX2_HELPERS
// A few float32 queries (nq < kBatchMin) against float32 or int8 items, 8 rows per step (this loop beat a 512-bit
// loop of one row and one horizontal sum at a time by 20-30 % at N = 1M): one query load serves 8 rows, 8
// independent FMA chains hide the FMA latency, and one tree reduces the 8 rows together. int8 items are widened by
// vpmovsxbd straight from memory (one load + one shuffle per 8 values, 16 with AVX-512) and vcvtdq2ps. The dots are
// dots8_f: 256-bit here, 512-bit in the AVX-512 builds.
static inline __m256 load8x(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8x(const std::int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// The 8 rows of a step: Strided (row r at x + r * stride: 8 consecutive rows) or Gathered (row r at p[r]: rows of
// several streams). The same arithmetic either way, row by row.
template <typename T>
struct Strided {
    const T* x;
    std::int64_t stride;
    const T* row(int r) const { return x + r * stride; }
};
template <typename T>
struct Gathered {
    const T* const* p;
    const T* row(int r) const { return p[r]; }
};

// <q, x> over [dv, d) for 8 rows (row r at xr.row(r)): one out-of-line function per item type, so the batched (widened)
// and the single scan run the very same instructions here (GCC contracts a * b + c into an FMA per function as it
// sees fit).
template <typename Rows>
__attribute__((noinline)) static void tail8(const float* q, Rows xr, int d, int dv, float* rest) {
    for (int r = 0; r < 8; ++r) {
        const auto* x = xr.row(r);
        float s = 0.0f;
        for (int j = dv; j < d; ++j) s += q[j] * static_cast<float>(x[j]);
        rest[r] = s;
    }
}

// Dots of 8 rows with query q into out[0..8): the main part [0, dv) from xr.row(r) (float32, or int8 widened on
// load), the tail [dv, d) from xt.row(r) (the rows as stored), then the scales (scales[r], or none). The FMA order
// every call uses.
template <typename Rows, typename StoredRows>
static inline void dots8_f_avx2(const float* q, Rows xr, StoredRows xt, int d, int dv, const float* scales,
                                float* out) {
    alignas(32) float rest[8];
    __m256 acc[8];
    const auto *x0 = xr.row(0), *x1 = xr.row(1), *x2 = xr.row(2), *x3 = xr.row(3), *x4 = xr.row(4),
               *x5 = xr.row(5), *x6 = xr.row(6), *x7 = xr.row(7);  // 8 base registers and one index
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (int j = 0; j < dv; j += 8) {
        const __m256 qv = _mm256_loadu_ps(q + j);
        acc[0] = _mm256_fmadd_ps(qv, load8x(x0 + j), acc[0]);
        acc[1] = _mm256_fmadd_ps(qv, load8x(x1 + j), acc[1]);
        acc[2] = _mm256_fmadd_ps(qv, load8x(x2 + j), acc[2]);
        acc[3] = _mm256_fmadd_ps(qv, load8x(x3 + j), acc[3]);
        acc[4] = _mm256_fmadd_ps(qv, load8x(x4 + j), acc[4]);
        acc[5] = _mm256_fmadd_ps(qv, load8x(x5 + j), acc[5]);
        acc[6] = _mm256_fmadd_ps(qv, load8x(x6 + j), acc[6]);
        acc[7] = _mm256_fmadd_ps(qv, load8x(x7 + j), acc[7]);
    }
    __m256 dots = hsum8(acc);
    if (dv < d) {
        tail8(q, xt, d, dv, rest);
        dots = _mm256_add_ps(dots, _mm256_load_ps(rest));
    }
    if (scales) dots = _mm256_mul_ps(dots, _mm256_loadu_ps(scales));
    _mm256_store_ps(out, dots);
}

#if defined(__AVX512F__) && EDGEREC_W == 16
// The AVX-512 builds' 8-row dots: 16 columns per FMA (half the FMAs and widening instructions of the 256-bit
// kernel). Lane l of row r's accumulator sums the columns j = l (mod 16) of [0, d16) in order, and hsum16x8 reduces
// the 16 lanes; the products of the columns [d16, d8) (8 when d is 8 mod 16) are summed by hsum8 and added, then a
// tail [d8, d) from tail8, then the scale. That is the order every call of this level uses, a lone query and a batch
// alike, so batched queries still get a lone query's bits.
static inline __m512 load16x(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16x(const std::int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// Lane r of the result = sum of the 16 lanes of v_r, for 8 rows: per row, lanes l and l + 8 are added, then l and
// l + 4, then l and l + 2, then l and l + 1 (one tree of 512-bit shuffles for the 8 rows: 16 shuffles, 8 adds).
__attribute__((always_inline)) static inline __m256 hsum16x8(__m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4,
                                                             __m512 v5, __m512 v6, __m512 v7) {
    // [row r: l + (l + 8), row r + 1: l + (l + 8)], 8 lanes each
    const __m512 p0 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xEE));
    const __m512 p1 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xEE));
    const __m512 p2 = _mm512_add_ps(_mm512_shuffle_f32x4(v4, v5, 0x44), _mm512_shuffle_f32x4(v4, v5, 0xEE));
    const __m512 p3 = _mm512_add_ps(_mm512_shuffle_f32x4(v6, v7, 0x44), _mm512_shuffle_f32x4(v6, v7, 0xEE));
    // 128-bit lane k of w0 = row k, of w1 = row 4 + k: (l) + (l + 4), 4 lanes
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(p0, p1, 0x88), _mm512_shuffle_f32x4(p0, p1, 0xDD));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(p2, p3, 0x88), _mm512_shuffle_f32x4(p2, p3, 0xDD));
    // lane k: [row k: e0 + e2, e1 + e3, row k + 4: e0 + e2, e1 + e3]
    const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(w0), _mm512_castps_pd(w1))),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(w0), _mm512_castps_pd(w1))));
    const __m512 t = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));   // row k at 4k, row k + 4 at 4k + 2
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, t));
}
template <typename Rows, typename StoredRows>
__attribute__((always_inline)) static inline void dots8_f_avx512(const float* q, Rows xr, StoredRows xt, int d,
                                                                 const float* scales, float* out) {
    const int d16 = d / 16 * 16, d8 = d / 8 * 8;
    const auto *x0 = xr.row(0), *x1 = xr.row(1), *x2 = xr.row(2), *x3 = xr.row(3), *x4 = xr.row(4),
               *x5 = xr.row(5), *x6 = xr.row(6), *x7 = xr.row(7);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int j = 0; j < d16; j += 16) {
        const __m512 qv = _mm512_loadu_ps(q + j);
        a0 = _mm512_fmadd_ps(qv, load16x(x0 + j), a0);
        a1 = _mm512_fmadd_ps(qv, load16x(x1 + j), a1);
        a2 = _mm512_fmadd_ps(qv, load16x(x2 + j), a2);
        a3 = _mm512_fmadd_ps(qv, load16x(x3 + j), a3);
        a4 = _mm512_fmadd_ps(qv, load16x(x4 + j), a4);
        a5 = _mm512_fmadd_ps(qv, load16x(x5 + j), a5);
        a6 = _mm512_fmadd_ps(qv, load16x(x6 + j), a6);
        a7 = _mm512_fmadd_ps(qv, load16x(x7 + j), a7);
    }
    __m256 dots = hsum16x8(a0, a1, a2, a3, a4, a5, a6, a7);
    if (d8 > d16) {   // 8 columns left: one 256-bit product per row, summed by the 8-row tree
        const __m256 qv = _mm256_loadu_ps(q + d16);
        __m256 more[8];
        for (int r = 0; r < 8; ++r) more[r] = _mm256_mul_ps(qv, load8x(xr.row(r) + d16));
        dots = _mm256_add_ps(dots, hsum8(more));
    }
    if (d8 < d) {
        alignas(32) float rest[8];
        tail8(q, xt, d, d8, rest);
        dots = _mm256_add_ps(dots, _mm256_load_ps(rest));
    }
    if (scales) dots = _mm256_mul_ps(dots, _mm256_loadu_ps(scales));
    _mm256_store_ps(out, dots);
}
#endif

// The 8-row dots of this build: 512-bit with AVX-512, else 256-bit.
template <typename Rows, typename StoredRows>
__attribute__((always_inline)) static inline void dots8_f(const float* q, Rows xr, StoredRows xt, int d, int dv,
                                                          const float* scales, float* out) {
#if defined(__AVX512F__) && EDGEREC_W == 16
    (void)dv;
    dots8_f_avx512(q, xr, xt, d, scales, out);
#else
    dots8_f_avx2(q, xr, xt, d, dv, scales, out);
#endif
}

// One float32 query or a few (nq < kBatchMin) against float32 or int8 items, 8 rows per step, the blocks read as
// side-by-side streams (for_rounds). float32 rows: the 8 rows of a step come from a.row_streams blocks at once
// (8 / row_streams consecutive rows of each): 8 consecutive rows read at a 256-byte stride the Zen 3 prefetchers
// follow poorly (12 GB/s on 1M float32 rows of d = 64, against 18 read row by row and 24 with one row from each of 8
// streams). int8 rows (a quarter of the bytes, more arithmetic per byte): 8 consecutive rows per step, the round's
// a.streams blocks in turn. Several queries against int8 items: each step is widened to float once (exact: int8 ->
// float) into wide, then every query runs the float kernel over it, so the products and their order are those of a
// single-query call (the result of a query does not depend on the others) and the widening is paid once per row.
template <typename Item>
static void scan_f_avx2(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap* heaps) {
    const int d = a.d;
    const int dv = d / 8 * 8;
    const float* queries = static_cast<const float*>(a.queries);
    const Item* items = static_cast<const Item*>(a.items);
    constexpr bool kWiden = std::is_same<Item, std::int8_t>::value;
    const bool widen = kWiden && a.nq > 1;
    int streams, rows_each;  // blocks per round; consecutive rows of one block in a step
    if (kWiden) {
        streams = std::max(1, std::min(kMaxStreams, a.streams));
        rows_each = 8;
    } else {
        streams = a.row_streams == 2 || a.row_streams == 4 || a.row_streams == 8 ? a.row_streams : 1;
        rows_each = 8 / streams;
    }
    const int per_step = 8 / rows_each;  // blocks one step reads
    const int groups = (streams + per_step - 1) / per_step;
    // 64-byte aligned: the widened rows are stored and read again with 512-bit moves (a line-split store does not
    // forward to the loads that follow; measured 1.3x on the 12k-item batch)
    struct alignas(64) Line { float v[16]; };
    const std::int64_t row_floats = (static_cast<std::int64_t>(d) + 15) / 16 * 16;
    std::vector<Line> wide(widen ? 8 * row_floats / 16 : 0);
    float* wr[8];  // the step's rows widened to float, one 64-byte-aligned row each
    for (int l = 0; l < 8; ++l) wr[l] = widen ? wide.data()->v + l * row_floats : nullptr;
    struct alignas(64) ScoreBlock { float v[BLOCK]; };   // select_block reads it with aligned loads
    std::vector<ScoreBlock> scores(static_cast<std::size_t>(a.nq) * kMaxStreams);  // [query][stream]
    const bool pf = kWiden ? a.prefetch_i8 : a.prefetch_f32;
    alignas(32) float out[8];
    int lane_b[8], lane_o[8];  // lane l of a step: row t + lane_o[l] of the step's first block + lane_b[l]
    for (int l = 0; l < 8; ++l) {
        lane_b[l] = l / rows_each;
        lane_o[l] = l % rows_each;
    }
    for_rounds(a, begin, end, streams, [&](const Round& r) {
        bool full = r.live == streams;
        for (int s = 0; s < r.live; ++s) full = full && r.count[s] == BLOCK;
        for (int t = 0; t < BLOCK; t += rows_each) {
            for (int g = 0; g < groups; ++g) {
                const int s0 = g * per_step;
                if (s0 >= r.live) break;
                if (full && per_step == 1) {  // 8 whole rows of one block: as one stream reads them
                    const Item* x0 = items + (r.base[s0] + t) * d;
                    if (pf) prefetch_lines(x0 + 16 * d, 8 * d * sizeof(Item));  // 2 steps ahead
                    if (widen) {
                        for (int l = 0; l < 8; ++l) {
                            float* w = wr[l];
                            const Item* x = x0 + l * d;
                            int e = 0;
#if defined(__AVX512F__) && EDGEREC_W == 16
                            for (; e + 16 <= d; e += 16) _mm512_storeu_ps(w + e, load16x(x + e));
#endif
                            for (; e + 8 <= d; e += 8) _mm256_storeu_ps(w + e, load8x(x + e));
                            for (; e < d; ++e) w[e] = static_cast<float>(x[e]);
                        }
                    }
                    const Strided<Item> x{x0, d};
                    const float* sc = a.scales ? a.scales + r.base[s0] + t : nullptr;
                    for (int qi = 0; qi < a.nq; ++qi) {  // straight into the block's scores, scaled in dots8_f
                        const float* q = queries + static_cast<std::int64_t>(qi) * d;
                        float* o = scores[static_cast<std::size_t>(qi) * kMaxStreams + s0].v + t;
                        if (widen) dots8_f(q, Strided<float>{wr[0], row_floats}, x, d, dv, sc, o);
                        else dots8_f(q, x, x, d, dv, sc, o);
                    }
                    continue;
                }
                // lane l: row t + lane_o[l] of block s0 + lane_b[l]; outside a full round, a lane past its block's
                // rows (or with no block) scores row 0 of block s0 again, and its score is dropped
                const Item* xr[8];
                int lane_s[8];
                bool any = false;
                for (int l = 0; l < 8; ++l) {
                    const int bs = s0 + lane_b[l], row = t + lane_o[l];
                    const bool real = full || (bs < r.live && row < r.count[bs]);
                    xr[l] = items + (real ? r.base[bs] + row : r.base[s0]) * d;
                    lane_s[l] = real ? bs : -1;
                    any = any || real;
                }
                if (!any) continue;
                if (pf)
                    for (int l = 0; l < 8; l += rows_each)  // 2 steps ahead in each block
                        if (lane_s[l] >= 0) prefetch_lines(xr[l] + 16 * d, rows_each * d * sizeof(Item));
                if (widen) {
                    for (int l = 0; l < 8; ++l) {
                        float* w = wr[l];
                        int e = 0;
#if defined(__AVX512F__) && EDGEREC_W == 16
                        for (; e + 16 <= d; e += 16) _mm512_storeu_ps(w + e, load16x(xr[l] + e));
#endif
                        for (; e + 8 <= d; e += 8) _mm256_storeu_ps(w + e, load8x(xr[l] + e));
                        for (; e < d; ++e) w[e] = static_cast<float>(xr[l][e]);
                    }
                }
                for (int qi = 0; qi < a.nq; ++qi) {
                    const float* q = queries + static_cast<std::int64_t>(qi) * d;
                    ScoreBlock* qs = scores.data() + static_cast<std::size_t>(qi) * kMaxStreams;
                    const Gathered<Item> x{xr};
                    if (widen) dots8_f(q, Gathered<float>{wr}, x, d, dv, nullptr, out);
                    else dots8_f(q, x, x, d, dv, nullptr, out);
                    for (int l = 0; l < 8; ++l) {  // the same one multiply by the scale as dots8_f's
                        const int bs = lane_s[l];
                        if (bs < 0) continue;
                        const int row = t + lane_o[l];
                        qs[bs].v[row] = a.scales ? out[l] * a.scales[r.base[bs] + row] : out[l];
                    }
                }
            }
        }
        for (int s = 0; s < r.live; ++s)
            for (int qi = 0; qi < a.nq; ++qi)
                select_block(scores[static_cast<std::size_t>(qi) * kMaxStreams + s].v, r.base[s], r.count[s],
                             r.allow[s], a.filters_of(qi), heaps[qi]);
    });
}
#endif

#if EDGEREC_I8I_NEON
// A few int8 queries (nq < kBatchMin) against row-major int8 items on AArch64, block by block: 4 rows per step, one
// int32x4 accumulator per row; two pairwise adds leave row r's dot in lane r.
static void scan_i8i_neon(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap* heaps) {
    const int d = a.d, nq = a.nq;
    const int dv = d / 16 * 16;  // the rest: dot_i8i_from
    const std::int8_t* q8 = static_cast<const std::int8_t*>(a.queries);
    const std::int8_t* items = static_cast<const std::int8_t*>(a.items);
    alignas(16) float buf[BLOCK];
    alignas(16) std::int32_t rest[4];
    for (std::int64_t base = begin; base < end; base += BLOCK) {
        const int count = static_cast<int>(std::min<std::int64_t>(BLOCK, end - base));
        const std::uint64_t allow = block_allow(a.filters, base, count);
        if (!allow) continue;
        const std::int8_t* x0 = items + base * d;
        const float* scales = a.scales + base;
        for (int qi = 0; qi < nq; ++qi) {
            const std::int8_t* q = q8 + static_cast<std::int64_t>(qi) * d;
            const float32x4_t vqs = vdupq_n_f32(a.query_scales[qi]);
            int t = 0;
            for (; t + 4 <= count; t += 4) {
                const std::int8_t* xr = x0 + static_cast<std::int64_t>(t) * d;
                int32x4_t acc[4];
                for (int r = 0; r < 4; ++r) {
                    const std::int8_t* x = xr + static_cast<std::int64_t>(r) * d;
                    int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
                    int j = 0;
                    for (; j + 32 <= dv; j += 32) {
                        s0 = dot16(s0, vld1q_s8(x + j), vld1q_s8(q + j));
                        s1 = dot16(s1, vld1q_s8(x + j + 16), vld1q_s8(q + j + 16));
                    }
                    if (j < dv) s0 = dot16(s0, vld1q_s8(x + j), vld1q_s8(q + j));
                    acc[r] = vaddq_s32(s0, s1);
                    if (dv < d) rest[r] = dot_i8i_from(q, x, dv, d);
                }
                int32x4_t dots = vpaddq_s32(vpaddq_s32(acc[0], acc[1]), vpaddq_s32(acc[2], acc[3]));
                if (dv < d) dots = vaddq_s32(dots, vld1q_s32(rest));
                // (float(dot) * qs) * s_i, in that order, as the scalar build computes it
                vst1q_f32(buf + t, vmulq_f32(vmulq_f32(vcvtq_f32_s32(dots), vqs), vld1q_f32(scales + t)));
            }
            for (; t < count; ++t)
                buf[t] = (static_cast<float>(dot_i8i(q, x0 + static_cast<std::int64_t>(t) * d, d)) *
                          a.query_scales[qi]) * scales[t];
            select_block(buf, base, count, allow, a.filters_of(qi), heaps[qi]);
        }
    }
}

// One int8 query against one packed tile on AArch64 (see scan_packed): a tile group (4 dimensions x 16 rows, 64
// bytes) is 4 vectors of 4 rows x 4 bytes. SDOT against the broadcast 4 query bytes leaves one int32 per row (no
// reduction); plain NEON keeps two lanes per row (dimensions 0-1 and 2-3) and adds them pairwise once per tile.
static inline void packed_tile(const std::uint8_t* tile_u8, int groups, const PackedQuery& pq, const float* sc,
                               int rows, float* out) {
    const std::int8_t* tile = reinterpret_cast<const std::int8_t*>(tile_u8);
    const std::int32_t* q4 = pq.q4.data();
    int32x4_t dots[4];  // rows 4k..4k+3 in dots[k]
#if defined(__ARM_FEATURE_DOTPROD)
    int32x4_t c0 = vdupq_n_s32(0), c1 = c0, c2 = c0, c3 = c0;
    for (int g = 0; g < groups; ++g) {
        const std::int8_t* p = tile + 64 * g;
        const int8x16_t qb = vreinterpretq_s8_s32(vdupq_n_s32(q4[g]));
        c0 = vdotq_s32(c0, vld1q_s8(p), qb);
        c1 = vdotq_s32(c1, vld1q_s8(p + 16), qb);
        c2 = vdotq_s32(c2, vld1q_s8(p + 32), qb);
        c3 = vdotq_s32(c3, vld1q_s8(p + 48), qb);
    }
    dots[0] = c0; dots[1] = c1; dots[2] = c2; dots[3] = c3;
#else
    int32x4_t lo[4], hi[4];  // lo[k]: rows 4k, 4k+1; hi[k]: rows 4k+2, 4k+3 (two lanes each)
    for (int k = 0; k < 4; ++k) lo[k] = hi[k] = vdupq_n_s32(0);
    for (int g = 0; g < groups; ++g) {
        const std::int8_t* p = tile + 64 * g;
        const int8x16_t qb = vreinterpretq_s8_s32(vdupq_n_s32(q4[g]));
        for (int k = 0; k < 4; ++k) {
            const int8x16_t x = vld1q_s8(p + 16 * k);
            lo[k] = vpadalq_s16(lo[k], vmull_s8(vget_low_s8(x), vget_low_s8(qb)));
            hi[k] = vpadalq_s16(hi[k], vmull_high_s8(x, qb));
        }
    }
    for (int k = 0; k < 4; ++k) dots[k] = vpaddq_s32(lo[k], hi[k]);
#endif
    if (rows == kTileRows) {  // (float(dot) * qs) * s_i, in that order, as the scalar build computes it
        const float32x4_t vqs = vdupq_n_f32(pq.qs);
        for (int k = 0; k < 4; ++k)
            vst1q_f32(out + 4 * k, vmulq_f32(vmulq_f32(vcvtq_f32_s32(dots[k]), vqs), vld1q_f32(sc + 4 * k)));
    } else {  // the last, partial tile: no scales to read past n
        alignas(16) std::int32_t dv[kTileRows];
        for (int k = 0; k < 4; ++k) vst1q_s32(dv + 4 * k, dots[k]);
        for (int r = 0; r < rows; ++r) out[r] = (static_cast<float>(dv[r]) * pq.qs) * sc[r];
    }
}
#endif

#if !EDGEREC_I8I_AVX2 && !EDGEREC_I8I_NEON
// One int8 query against one packed tile: VNNI (dpbusd of a whole tile group against the broadcast 4 query bytes,
// 16 rows at once; see dot_i8i for the bias) or plain C++.
static inline void packed_tile(const std::uint8_t* tile, int groups, const PackedQuery& pq, const float* sc, int rows,
                               float* out) {
    const std::int32_t* q4 = pq.q4.data();
#if EDGEREC_I8I_BIASED
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
    const __m512i dots = _mm512_sub_epi32(_mm512_add_epi32(acc0, acc1), _mm512_set1_epi32(128 * pq.qsum));
    const __mmask16 live = static_cast<__mmask16>(rows == 16 ? 0xFFFFu : ((1u << rows) - 1));
    const __m512 s = _mm512_maskz_loadu_ps(live, sc);
    _mm512_mask_storeu_ps(out, live, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(pq.qs)), s));
#else
    const std::int8_t* qp = reinterpret_cast<const std::int8_t*>(q4);
    std::int32_t dots[kTileRows] = {0};
    for (int g = 0; g < groups; ++g) {
        const std::int8_t* grp = reinterpret_cast<const std::int8_t*>(tile + 64 * g);
        for (int r = 0; r < kTileRows; ++r)
            for (int b = 0; b < 4; ++b)
                dots[r] += static_cast<std::int32_t>(grp[4 * r + b]) * static_cast<std::int32_t>(qp[4 * g + b]);
    }
    for (int r = 0; r < rows; ++r) out[r] = (static_cast<float>(dots[r]) * pq.qs) * sc[r];
#endif
}
#endif

// int8 queries against packed tiles (see topk_common.h for the layout); begin is a multiple of 64. Block by block,
// every query scores the block's tiles while they are in L1, so a batch reads each item once (no float batch kernel
// here: the integer tile kernels are faster per query than it). The first query's pass prefetches ahead.
#if EDGEREC_I8I_AVX2
// How far ahead the AVX2 packed scan prefetches: the whole tiles that fit in this many bytes, at least one. Forced
// AVX2 on the 2-core Xeon, int8 1M items, ms per query, one tile ahead -> 3 KB (bench_topk, builds in turn):
// d = 32 1.39-1.75 -> 1.31-1.34, d = 64 3.0-5.8 -> 2.6-2.9 (9 of 10 runs), d = 80 4.6-4.7 -> 3.6-3.7; d = 128 stays
// at one tile (two, 4 KB, made it 10 -> 15 ms); at 100k items the difference is within the noise.
constexpr std::int64_t kPrefetchAheadBytes = 3072;
#endif
static void scan_packed(const ScanArgs& a, std::int64_t begin, std::int64_t end, Heap* heaps) {
    const int d = a.d;
    const int groups = static_cast<int>(packed_groups(d));
    const std::int64_t tile_bytes = packed_tile_bytes(d);
    const std::uint8_t* packed = static_cast<const std::uint8_t*>(a.items);
    const std::int8_t* q8 = static_cast<const std::int8_t*>(a.queries);
    std::vector<PackedQuery> pqs(a.nq);
    for (int q = 0; q < a.nq; ++q) pqs[q] = PackedQuery(q8 + static_cast<std::int64_t>(q) * d, d, a.query_scales[q]);
    alignas(64) float buf[kMaxStreams][BLOCK];
#if EDGEREC_I8I_AVX2
    const std::int64_t ahead = std::max<std::int64_t>(1, kPrefetchAheadBytes / tile_bytes) * tile_bytes;
#endif
    for_rounds(a, begin, end, a.streams, [&](const Round& r) {
        for (int q = 0; q < a.nq; ++q) {
            for (int g0 = 0; g0 < BLOCK; g0 += kTileRows) {
                for (int s = 0; s < r.live; ++s) {
                    if (g0 >= r.count[s]) continue;
                    const std::uint8_t* tile = packed + ((r.base[s] + g0) / kTileRows) * tile_bytes;
                    if (q == 0 && a.prefetch_i8) {
#if EDGEREC_I8I_AVX2
                        prefetch_lines(tile + ahead, tile_bytes);  // a whole tile, every line, ~3 KB ahead
#elif EDGEREC_I8I_BIASED
                        _mm_prefetch(reinterpret_cast<const char*>(tile + 8 * tile_bytes), _MM_HINT_T0);
#endif
                    }
                    packed_tile(tile, groups, pqs[q], a.scales + r.base[s] + g0,
                                std::min(kTileRows, r.count[s] - g0), buf[s] + g0);
                }
            }
            for (int s = 0; s < r.live; ++s)
                select_block(buf[s], r.base[s], r.count[s], r.allow[s], a.filters_of(q), heaps[q]);
        }
    });
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
            select_block(buf, base, count, allow, a.filters_of(q), heaps[q]);
        }
    }
}

#if EDGEREC_W > 1
// Batch of queries (nq >= W / 2): queries transposed once per call into qt[d][nqp] (nqp = nq rounded up to W,
// zero-padded); each item value is broadcast against W queries at a time, so every item is read once for the whole
// batch, nothing is transposed per item and no horizontal sums are needed. 4 rows x 2 query vectors = 8
// independent accumulators per step hide the FMA latency. int8 items are widened to float once per block.
template <typename Item>
// Kept out of scan() (noinline): inlined there, next to the single-query kernels, it ran ~3 % slower (avx512_vnni).
__attribute__((noinline)) static void scan_batch(const ScanArgs& a, std::int64_t begin, std::int64_t end,
                                                 Heap* heaps, const float* qf, const float* post_scale_q) {
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
            select_block(buf, base, count, allow, a.filters_of(q), heaps[q]);
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
        if (a.nq >= kBatchMin && !a.per_query) { scan_batch<float>(a, begin, end, heaps, qs, nullptr); return; }
#endif
#if EDGEREC_AVX2_HELPERS
        scan_f_avx2<float>(a, begin, end, heaps);
        return;
#endif
        scan_rows<float>(a, begin, end, heaps,
                         [&](int q, const float* x, std::int64_t) { return dot_f(qs + q * d, x, d); });
        return;
    }
    case Mode::I8_F32Q: {
        const float* qs = static_cast<const float*>(a.queries);
#if EDGEREC_W > 1
        if (a.nq >= kBatchMin && !a.per_query) {
            scan_batch<std::int8_t>(a, begin, end, heaps, qs, nullptr);
            return;
        }
#endif
#if EDGEREC_AVX2_HELPERS
        scan_f_avx2<std::int8_t>(a, begin, end, heaps);
        return;
#endif
        scan_rows<std::int8_t>(a, begin, end, heaps, [&](int q, const std::int8_t* x, std::int64_t i) {
            return dot_f(qs + q * d, x, d) * a.scales[i];
        });
        return;
    }
    case Mode::I8P_I8Q:
        scan_packed(a, begin, end, heaps);
        return;
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
#if EDGEREC_I8I_AVX2
        scan_i8i_avx2(a, begin, end, heaps);
        return;
#endif
#if EDGEREC_I8I_NEON
        scan_i8i_neon(a, begin, end, heaps);
        return;
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
