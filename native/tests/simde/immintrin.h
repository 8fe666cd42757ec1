// Test only: <immintrin.h> for check_avx512_emulated.sh, which compiles the avx512 and avx512_vnni builds of the
// kernel on a CPU without AVX-512 so that test_kernel can check their logic (block order, masks, tails, scan plans)
// against the scalar build. SIMDe (https://github.com/simd-everywhere/simde, Debian's libsimde-dev) supplies the
// intrinsics as portable C; the few that its 0.7.4 lacks are below, each as the Intel Intrinsics Guide defines it.
// This checks what the code computes, not the instructions' encodings or speed: a real AVX-512 CPU runs the real
// build through the same test.
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#define SIMDE_NO_NATIVE
#include <simde/x86/avx512.h>

#include <cstdint>
#include <cstring>

typedef simde__mmask8 __mmask8;
typedef simde__mmask16 __mmask16;
typedef simde__mmask64 __mmask64;

namespace edgerec_emulated {
template <class V, class T, int N>
inline void lanes(V v, T (&out)[N]) {
    static_assert(sizeof(V) == sizeof(out), "lane count");
    std::memcpy(out, &v, sizeof(V));
}
template <class V, class T, int N>
inline V vector(const T (&in)[N]) {
    static_assert(sizeof(V) == sizeof(in), "lane count");
    V v;
    std::memcpy(&v, in, sizeof(V));
    return v;
}
inline bool bit(std::uint64_t m, int i) { return (m >> i) & 1; }
}  // namespace edgerec_emulated

inline simde__m512i _mm512_cvtepi8_epi32(simde__m128i a) {
    std::int8_t x[16];
    std::int32_t r[16];
    edgerec_emulated::lanes(a, x);
    for (int i = 0; i < 16; ++i) r[i] = x[i];
    return edgerec_emulated::vector<simde__m512i>(r);
}
inline simde__m512 _mm512_cvtepi32_ps(simde__m512i a) {
    std::int32_t x[16];
    float r[16];
    edgerec_emulated::lanes(a, x);
    for (int i = 0; i < 16; ++i) r[i] = static_cast<float>(x[i]);
    return edgerec_emulated::vector<simde__m512>(r);
}
inline void _mm512_mask_storeu_ps(void* p, simde__mmask16 m, simde__m512 a) {
    float x[16];
    edgerec_emulated::lanes(a, x);
    for (int i = 0; i < 16; ++i)
        if (edgerec_emulated::bit(m, i)) static_cast<float*>(p)[i] = x[i];
}
inline simde__m512i _mm512_maskz_loadu_epi8(simde__mmask64 m, const void* p) {
    std::int8_t r[64];
    for (int i = 0; i < 64; ++i) r[i] = edgerec_emulated::bit(m, i) ? static_cast<const std::int8_t*>(p)[i] : 0;
    return edgerec_emulated::vector<simde__m512i>(r);
}
inline simde__m512 _mm512_maskz_loadu_ps(simde__mmask16 m, const void* p) {
    float r[16];
    for (int i = 0; i < 16; ++i) r[i] = edgerec_emulated::bit(m, i) ? static_cast<const float*>(p)[i] : 0.0f;
    return edgerec_emulated::vector<simde__m512>(r);
}
inline simde__m512 _mm512_permute_ps(simde__m512 a, int imm) {  // within each 128-bit lane, 2 bits per element
    float x[16], r[16];
    edgerec_emulated::lanes(a, x);
    for (int i = 0; i < 16; ++i) r[i] = x[(i & ~3) + ((imm >> (2 * (i & 3))) & 3)];
    return edgerec_emulated::vector<simde__m512>(r);
}
inline simde__m512 _mm512_shuffle_f32x4(simde__m512 a, simde__m512 b, int imm) {  // 128-bit lanes 0-1 of a, 2-3 of b
    float x[16], y[16], r[16];
    edgerec_emulated::lanes(a, x);
    edgerec_emulated::lanes(b, y);
    for (int l = 0; l < 4; ++l) {
        const float* src = l < 2 ? x : y;
        const int s = (imm >> (2 * l)) & 3;
        for (int j = 0; j < 4; ++j) r[4 * l + j] = src[4 * s + j];
    }
    return edgerec_emulated::vector<simde__m512>(r);
}
inline int _mm512_reduce_add_epi32(simde__m512i a) {
    std::int32_t x[16], s = 0;
    edgerec_emulated::lanes(a, x);
    for (int i = 0; i < 16; ++i) s += x[i];
    return s;
}
inline float _mm512_reduce_add_ps(simde__m512 a) {  // halves, then quarters, ... (GCC's order)
    float x[16];
    edgerec_emulated::lanes(a, x);
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) x[i] += x[i + w];
    return x[0];
}
inline simde__mmask16 _mm512_mask_cmp_ps_mask(simde__mmask16 k, simde__m512 a, simde__m512 b, int predicate) {
    float x[16], y[16];
    edgerec_emulated::lanes(a, x);
    edgerec_emulated::lanes(b, y);
    simde__mmask16 r = 0;
    for (int i = 0; i < 16; ++i) {
        bool c;
        switch (predicate) {  // the ordered, non-signalling predicates the kernel uses
            case SIMDE_CMP_GE_OQ: c = x[i] >= y[i]; break;
            case SIMDE_CMP_GT_OQ: c = x[i] > y[i]; break;
            case SIMDE_CMP_LE_OQ: c = x[i] <= y[i]; break;
            case SIMDE_CMP_LT_OQ: c = x[i] < y[i]; break;
            default: __builtin_trap();  // a predicate this file does not define yet
        }
        if (c && edgerec_emulated::bit(k, i)) r = static_cast<simde__mmask16>(r | (1u << i));
    }
    return r;
}
