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
// Row-major int8 [n, d] -> packed 16-row tiles (topk_common.h); out must hold ceil(n / 16) * packed_tile_bytes(d).
void pack_i8_rows(const std::int8_t* x, std::int64_t n, int d, std::uint8_t* out);

}  // namespace edgerec
