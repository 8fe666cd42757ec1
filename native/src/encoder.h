// The session encoder's weights as the native encoder reads them (encoder-inl.h): a SASRec / BERT4Rec in the
// serving form of trainer/model.py ServingEncoder, one user vector per session. The pointers belong to the caller
// (bindings.cpp keeps the NumPy arrays alive); every matrix is float32 [in, out], row-major.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace edgerec {

struct EncoderBlock {
    const float *ln1_w, *ln1_b;            // [d]: LayerNorm before the attention
    const float *wq, *bq, *wk, *bk, *wv, *bv;  // [d, d], [d]: query, key and value projections (unscaled)
    const float *wo, *bo;                  // [d, d], [d]: attention output projection
    const float *ln2_w, *ln2_b;            // [d]: LayerNorm before the feed-forward network
    const float *f1, *f1b, *f2, *f2b;      // [d, d], [d]: feed-forward network (GELU, or ReLU in the sasrec style)
};

struct EncoderWeights {
    int d = 0;
    int heads = 1;
    int max_len = 0;                 // L: the window; positions count from the right (the last token is L - 1)
    bool causal = true;              // SASRec; false: BERT4Rec (bidirectional)
    bool sasrec_style = false;       // the SASRec reference block (queries LN(x), keys / values x, ReLU); else prenorm
    std::int64_t mask_token = -1;    // BERT4Rec: [MASK] appended after the context; -1: none
    std::int64_t rows = 0;           // rows of the token table (token 0 pads)
    float eps = 1e-8f;               // LayerNorm epsilon
    const std::int8_t* table = nullptr;  // [rows, d]: token t's embedding is table[t] * table_scale[t] (scaled)
    const float* table_scale = nullptr;  // [rows]
    const float* pos = nullptr;          // [max_len, d]
    std::vector<EncoderBlock> blocks;    // at least one; the last one runs for the last position only
    const float *lno_w = nullptr, *lno_b = nullptr;  // [d]: the final LayerNorm
};

// Floats of scratch one encode() call needs.
inline std::size_t encoder_scratch_floats(const EncoderWeights& w) {
    const std::size_t L = static_cast<std::size_t>(w.max_len), d = static_cast<std::size_t>(w.d);
    return 6 * L * d + L + 12 * d;
}

}  // namespace edgerec
