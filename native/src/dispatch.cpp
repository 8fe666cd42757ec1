// Runtime SIMD dispatch: the best level this CPU *and OS* support, chosen once; EDGEREC_SIMD overrides it
// (the deprecated EDGE_RUNTIME_SIMD too).
// Compiled with baseline flags only, so it runs on any host of the target architecture.
#include "dispatch.h"

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // the ARMv8.2 dot-product instructions (asm/hwcap.h)
#endif
#endif

namespace edgerec {

#define EDGEREC_DECLARE(ns)                                                                   \
    namespace ns {                                                                            \
    void scan(const ScanArgs&, std::int64_t, std::int64_t, Heap*);                            \
    double stream_sum(const float*, std::int64_t);                                            \
    void encode(const EncoderWeights&, const std::int64_t*, const std::int64_t*, std::int64_t, float*); \
    }
EDGEREC_DECLARE(scalar)
#if defined(__x86_64__) || defined(_M_X64)
EDGEREC_DECLARE(avx2)
EDGEREC_DECLARE(avx512)
#ifdef EDGEREC_HAVE_VNNI
EDGEREC_DECLARE(avx512_vnni)
#endif
#endif
#if defined(__aarch64__)
EDGEREC_DECLARE(neon)
#ifdef EDGEREC_HAVE_DOTPROD
EDGEREC_DECLARE(neon_dotprod)
#endif
#endif

namespace {

#if defined(__x86_64__) || defined(_M_X64)
unsigned long long xgetbv0() {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (static_cast<unsigned long long>(edx) << 32) | eax;
}
bool os_saves(unsigned long long mask) {
    unsigned int eax, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
    if (!(ecx & (1u << 27))) return false;  // OSXSAVE: the OS manages extended state
    return (xgetbv0() & mask) == mask;
}
bool has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && os_saves(0x6);
}
bool has_avx512() {
    __builtin_cpu_init();
    return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && os_saves(0xE6);
}
#ifdef EDGEREC_HAVE_VNNI
bool has_avx512_vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
#endif
#endif
#if defined(__aarch64__) && defined(EDGEREC_HAVE_DOTPROD)
// SDOT / UDOT (ARMv8.2 FEAT_DotProd: Cortex-A55 / A76 and later, Neoverse, Apple M1; not the Raspberry Pi 4's
// Cortex-A72), as the kernel reports it to user space.
bool has_dotprod() {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    return true;  // every Apple AArch64 CPU has it
#else
    return false;
#endif
}
#endif
bool always() { return true; }

// Priority order: best first; scalar is always last and always available.
const Impl kImpls[] = {
#if defined(__x86_64__) || defined(_M_X64)
#ifdef EDGEREC_HAVE_VNNI
    {"avx512_vnni", avx512_vnni::scan, avx512_vnni::stream_sum, has_avx512_vnni, avx512_vnni::encode},
#endif
    {"avx512", avx512::scan, avx512::stream_sum, has_avx512, avx512::encode},
    {"avx2", avx2::scan, avx2::stream_sum, has_avx2, avx2::encode},
#endif
#if defined(__aarch64__)
#ifdef EDGEREC_HAVE_DOTPROD
    {"neon_dotprod", neon_dotprod::scan, neon_dotprod::stream_sum, has_dotprod, neon_dotprod::encode},
#endif
    {"neon", neon::scan, neon::stream_sum, always, neon::encode},  // NEON is mandatory on AArch64
#endif
    {"scalar", scalar::scan, scalar::stream_sum, always, scalar::encode},
};

// An environment variable's value as it goes into a note: printable ASCII kept, any other byte as \xNN, at most 64
// bytes shown, so a note is always valid UTF-8 (pybind11 turns it into a Python str) and one line.
std::string shown(const char* v) {
    static const char hex[] = "0123456789abcdef";
    std::string out;
    std::size_t i = 0;
    for (; v[i] && i < 64; ++i) {
        const auto c = static_cast<unsigned char>(v[i]);
        if (c >= 0x20 && c < 0x7f) {
            out += static_cast<char>(c);
        } else {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    if (v[i]) out += "...";
    return out;
}

const Impl* choose(std::string* note) {
    const char* var = "EDGEREC_SIMD";
    const char* forced = std::getenv(var);
    if (!forced || !*forced) {
        var = "EDGE_RUNTIME_SIMD";  // deprecated spelling (the Python side logs that once)
        forced = std::getenv(var);
    }
    if (forced && *forced) {
        for (const Impl& impl : kImpls)
            if (std::strcmp(impl.name, forced) == 0) {
                if (impl.supported()) return &impl;
                *note = std::string(var) + "=" + shown(forced) + " is not supported by this CPU/OS";
            }
        if (note->empty()) *note = std::string(var) + "=" + shown(forced) + " is not a level of this build";
    }
    for (const Impl& impl : kImpls)
        if (impl.supported()) return &impl;
    return &kImpls[sizeof(kImpls) / sizeof(kImpls[0]) - 1];
}

}  // namespace

const Impl& active(std::string* note) {
    static std::string first_note;
    static const Impl* impl = choose(&first_note);
    if (note) *note = first_note;
    return *impl;
}

std::vector<std::string> available_levels() {
    std::vector<std::string> out;
    for (const Impl& impl : kImpls)
        if (impl.supported()) out.emplace_back(impl.name);
    return out;
}

namespace {
// The environment variable as an integer in [lo, hi]; -1 when unset or empty, and -1 with a sentence added to
// *note when set to anything else (not an integer, or out of range), so a mistyped setting is reported, not lost.
int env_int(const char* name, int lo, int hi, std::string* note) {
    const char* v = std::getenv(name);
    if (!v || !*v) return -1;
    char* stop = nullptr;
    const long x = std::strtol(v, &stop, 10);
    if (*stop == '\0' && x >= lo && x <= hi) return static_cast<int>(x);
    if (!note->empty()) *note += "; ";
    *note += std::string(name) + "='" + shown(v) + "' ignored (expected an integer " + std::to_string(lo) + ".." +
             std::to_string(hi) + ")";
    return -1;
}
}  // namespace

const ScanPlan& scan_plan() {
    static const ScanPlan plan = [] {
        ScanPlan p;
#if defined(__x86_64__) || defined(_M_X64)
        __builtin_cpu_init();
        const bool intel = __builtin_cpu_is("intel"), avx512 = __builtin_cpu_supports("avx512f");
        if (intel) {
            p.prefetch_f32 = p.prefetch_i8 = true;
            p.why = "an Intel CPU: software prefetch, one stream";
        } else if (avx512) {
            p.prefetch_i8 = true;
            p.why = "a non-Intel CPU with AVX-512: software prefetch of int8 items only, one stream";
        } else {
            p.streams = 4;
            p.row_streams = 8;
            p.why = "a non-Intel CPU without AVX-512: hardware prefetch only, 4 streams (8 for float-query rows)";
        }
#else
        p.streams = 1;
        p.why = "not an x86 CPU: no software prefetch, one stream";
#endif
        const int pf = env_int("EDGEREC_PREFETCH", 0, 1, &p.note);
        const int st = env_int("EDGEREC_SCAN_STREAMS", 1, kMaxStreams, &p.note);
        if (pf >= 0) { p.prefetch_f32 = p.prefetch_i8 = pf == 1; p.why += "; EDGEREC_PREFETCH=" + std::to_string(pf); }
        if (st >= 0) {
            p.streams = st;
            p.row_streams = st >= 8 ? 8 : st >= 4 ? 4 : st >= 2 ? 2 : 1;  // the row scans take 1, 2, 4 or 8
            p.why += "; EDGEREC_SCAN_STREAMS=" + std::to_string(st);
            if (p.row_streams != st) p.why += " (" + std::to_string(p.row_streams) + " for float-query rows)";
        }
        return p;
    }();
    return plan;
}

void ScanPlan::apply(ScanArgs& a) const {
    a.prefetch_f32 = prefetch_f32;
    a.prefetch_i8 = prefetch_i8;
    a.streams = streams;
    a.row_streams = row_streams;
}

const Impl* find_impl(const std::string& name) {
    for (const Impl& impl : kImpls)
        if (name == impl.name) return &impl;
    return nullptr;
}

void pack_i8_rows(const std::int8_t* x, std::int64_t n, int d, std::uint8_t* out) {
    const std::int64_t tiles = (n + kTileRows - 1) / kTileRows;
    const std::int64_t tb = packed_tile_bytes(d);
    std::memset(out, 0, static_cast<std::size_t>(tiles * tb));
    for (std::int64_t i = 0; i < n; ++i) {
        std::uint8_t* tile = out + (i / kTileRows) * tb;
        const int r = static_cast<int>(i % kTileRows);
        for (int j = 0; j < d; ++j) tile[64 * (j / 4) + 4 * r + (j % 4)] = static_cast<std::uint8_t>(x[i * d + j]);
    }
}

std::vector<std::string> compiled_levels() {
    std::vector<std::string> out;
    for (const Impl& impl : kImpls) out.emplace_back(impl.name);
    return out;
}

}  // namespace edgerec
