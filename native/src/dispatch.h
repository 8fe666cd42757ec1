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
// Whether the x86 float32-row scan issues software prefetches (ScanArgs::prefetch_f32), chosen once:
// EDGEREC_PREFETCH=1 / 0 forces it; otherwise on for Intel CPUs (without it the Xeon's scans stayed 15-25 % short of
// its read bandwidth) and off for the others (AMD Zen 3, 1M float32 rows from DRAM: 8 % faster without, best of 15
// in 6 of 6 paired runs; its int8 scans are faster with, and keep them). *why gets the reason in words.
bool software_prefetch(std::string* why = nullptr);
// Row-major int8 [n, d] -> packed 16-row tiles (topk_common.h); out must hold ceil(n / 16) * packed_tile_bytes(d).
void pack_i8_rows(const std::int8_t* x, std::int64_t n, int d, std::uint8_t* out);

}  // namespace edgerec
