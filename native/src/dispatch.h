#pragma once

#include <string>
#include <vector>

#include "topk_common.h"

namespace edgerec {

struct Impl {
    const char* name;
    void (*scan)(const ScanArgs&, std::int64_t, std::int64_t, Heap*);
    double (*stream_sum)(const float*, std::int64_t);
    bool (*supported)();
};

// The level in use (resolved on first call); *note gets why an EDGE_RUNTIME_SIMD request was not honoured, if so.
const Impl& active(std::string* note = nullptr);
std::vector<std::string> available_levels();
std::vector<std::string> compiled_levels();

}  // namespace edgerec
