#pragma once

#include <string>
#include <vector>

#include "encoder.h"
#include "topk_common.h"

namespace edgerec {

struct Impl {
    const char* name;
    void (*scan)(const ScanArgs&, std::int64_t, std::int64_t, Heap*);
    double (*stream_sum)(const float*, std::int64_t);
    bool (*supported)();
    // the session encoder (encoder-inl.h): sessions [offsets[b], offsets[b + 1]) of tokens -> out float32 [B, d]
    void (*encode)(const EncoderWeights&, const std::int64_t*, const std::int64_t*, std::int64_t, float*);
};

// The level in use (resolved on first call); *note gets why an EDGEREC_SIMD request was not honoured, if so.
const Impl& active(std::string* note = nullptr);
std::vector<std::string> available_levels();
std::vector<std::string> compiled_levels();
// A compiled level by name whether or not this CPU supports it (nullptr if not compiled); for tests.
const Impl* find_impl(const std::string& name);
// How the scans read memory (ScanArgs::prefetch_f32, prefetch_i8, streams, row_streams), chosen once per process
// from the CPU; results do not depend on it (native/tests/test_kernel.cpp checks other plans against the scalar build):
//  * Intel: software prefetch, one stream: the behaviour measured on the Xeon (without prefetch its scans stayed
//    15-25 % short of its read bandwidth); streams were not measured there.
//  * non-Intel x86 with AVX-512 (AMD Zen 4): software prefetch of int8 items, none of float32 rows, one stream: the
//    plan in use before streams existed (streams not measured there).
//  * non-Intel x86 without AVX-512 (AMD Zen 1-3): hardware prefetch only; the int8-query scans (rows, packed tiles)
//    read 4 blocks side by side, the float-query row scans take each step's 8 rows from 8 blocks (one row of each). On
//    the 2-core EPYC (Zen 3), 1 thread, d = 64, k = 10, ms per query, the previous plan (one stream, prefetch of int8
//    items) -> this one, each paired against FAISS in one process (VM noise ~1.3x): packed int8 1M 4.2-5.1 -> 3.0-4.1,
//    100k 0.41-0.60 -> 0.35-0.46; float32 1M 16.4-21.9 -> 11.2-14.6; int8 rows, float query, 1M 4.4-5.9 -> 4.3-4.9. A
//    plain sum over 256 MB reads 18-20 GB/s as one stream and 21-22 as four interleaved 1 KB at a time; 4 KB at a time
//    loses it (16-17), and prefetch instructions cost it (14-16).
//  * AArch64: no software prefetch, one stream (not measured on hardware: qemu only).
// EDGEREC_PREFETCH=0 / 1 forces both prefetch switches, EDGEREC_SCAN_STREAMS=1..8 the streams of both kinds of scan
// (row streams: 1, 2, 4 or 8, the largest of those not above the setting); any other value of either is ignored
// and said in `note` (the daemon logs it at start, bench_topk prints it).
struct ScanPlan {
    bool prefetch_f32 = false;
    bool prefetch_i8 = false;
    int streams = 1;
    int row_streams = 1;
    std::string why;   // the choice in words
    std::string note;  // settings that were ignored, and why ('' if none)
    void apply(ScanArgs& a) const;
};
const ScanPlan& scan_plan();
// Row-major int8 [n, d] -> packed 16-row tiles (topk_common.h); out must hold ceil(n / 16) * packed_tile_bytes(d).
void pack_i8_rows(const std::int8_t* x, std::int64_t n, int d, std::uint8_t* out);

}  // namespace edgerec
