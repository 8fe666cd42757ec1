// The native session encoder: one source, compiled once per instruction set beside the top-k kernel (each
// topk_<level>.cpp includes this file after topk_kernel-inl.h, with that level's flags; the loops are plain C++
// that the compiler vectorizes for the level, the scalar build with vectorization off).
//
// What it computes is trainer/model.py ServingEncoder (SASRec: Kang & McAuley, ICDM 2018, arXiv:1808.09781;
// BERT4Rec: Sun et al., CIKM 2019, arXiv:1904.06690) for one session at a time: token embeddings (int8 rows times
// their scale) plus positional embeddings counted from the right, the blocks before the last over every position
// (causal or bidirectional self-attention with padded keys hidden, softmax as exp(s - max) normalised after the
// weighted sum, output projection, feed-forward network, prenorm or SASRec-reference layout), and the last block
// for the last position only, then the final LayerNorm. The last block's attention is rewritten without per-key
// projections: with keys k_j = x_j Wk + bk and values v_j = x_j Wv + bv,
//     q . k_j = x_j . (Wk q) + bk . q        and        sum_j a_j v_j = (sum_j a_j x_j) Wv + bv   (sum_j a_j = 1),
// so a window of W tokens costs 2 W d multiply-adds there instead of W d (2 d + 1) (the same values up to float
// rounding). Each session is computed alone: a batch gives every session its lone call's bits, whatever the
// others, and leading padding changes nothing.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "encoder.h"

#ifndef EDGEREC_NS
#error "define EDGEREC_NS before including encoder-inl.h"
#endif

namespace edgerec {
namespace EDGEREC_NS {
namespace enc {

// Sums in 8 interleaved partial sums (a fixed order: the compiler keeps it, and vectorizes the 8 lanes).
inline float sum_n(const float* x, int n) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) a[j] += x[i + j];
    float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    for (; i < n; ++i) s += x[i];
    return s;
}

inline float dot_n(const float* __restrict x, const float* __restrict y, int n) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) a[j] += x[i + j] * y[i + j];
    float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
}

// y = LayerNorm(x) * g + b over d values (biased variance, as torch.nn.LayerNorm); x and y do not overlap.
inline void layer_norm(const float* __restrict x, const float* __restrict g, const float* __restrict b, float eps,
                       int d, float* __restrict y) {
    const float mean = sum_n(x, d) / static_cast<float>(d);
    for (int i = 0; i < d; ++i) y[i] = x[i] - mean;
    const float inv = 1.0f / std::sqrt(dot_n(y, y, d) / static_cast<float>(d) + eps);
    for (int i = 0; i < d; ++i) y[i] = y[i] * inv * g[i] + b[i];
}

// y[0:n_out] = b + x[0:n_in] W, W float32 [n_in, ld] row-major read at columns [0, n_out) (ld >= n_out).
inline void matvec(const float* __restrict x, const float* __restrict W, const float* __restrict b, int n_in,
                   int n_out, int ld, float* __restrict y) {
    for (int o = 0; o < n_out; ++o) y[o] = b[o];
    for (int i = 0; i < n_in; ++i) {
        const float xi = x[i];
        const float* __restrict row = W + static_cast<std::ptrdiff_t>(i) * ld;
        for (int o = 0; o < n_out; ++o) y[o] += xi * row[o];
    }
}

// out = FFN(f) = act(f W1 + b1) W2 + b2; tmp holds d floats.
inline void ffn(const EncoderWeights& w, const EncoderBlock& blk, const float* f, float* __restrict tmp,
                float* __restrict out) {
    const int d = w.d;
    matvec(f, blk.f1, blk.f1b, d, d, d, tmp);
    if (w.sasrec_style) {
        for (int i = 0; i < d; ++i) tmp[i] = tmp[i] > 0.0f ? tmp[i] : 0.0f;
    } else {  // exact GELU, as torch.nn.GELU()
        for (int i = 0; i < d; ++i) tmp[i] = 0.5f * tmp[i] * (1.0f + std::erf(tmp[i] * 0.70710678118654752f));
    }
    matvec(tmp, blk.f2, blk.f2b, d, d, d, out);
}

struct Scratch {
    float *h, *q, *k, *v, *y, *t;   // [L, d] each
    float* s;                       // [L]: attention scores
    float *qk, *xbar, *att, *u, *f, *g, *r;  // [d] each (and room to spare)
};

inline Scratch carve(const EncoderWeights& w, float* base) {
    const std::ptrdiff_t L = w.max_len, d = w.d;
    Scratch s;
    s.h = base; s.q = s.h + L * d; s.k = s.q + L * d; s.v = s.k + L * d; s.y = s.v + L * d; s.t = s.y + L * d;
    s.s = s.t + L * d;
    s.qk = s.s + L; s.xbar = s.qk + d; s.att = s.xbar + d; s.u = s.att + d; s.f = s.u + d; s.g = s.f + d;
    s.r = s.g + d;
    return s;
}

// One position after its attention: the output projection of ``att`` [d], the residual and the feed-forward network
// -> out [d] (may be x itself). SASRec style: f = LN2(h + y), out = f + FFN(f); prenorm: r = x + y,
// out = r + FFN(LN2(r)).
inline void block_tail(const EncoderWeights& w, const EncoderBlock& blk, const float* h, const float* x,
                       const float* att, Scratch& s, float* out) {
    const int d = w.d;
    matvec(att, blk.wo, blk.bo, d, d, d, s.u);
    const float* res = w.sasrec_style ? h : x;
    for (int i = 0; i < d; ++i) s.r[i] = res[i] + s.u[i];
    layer_norm(s.r, blk.ln2_w, blk.ln2_b, w.eps, d, s.f);
    ffn(w, blk, s.f, s.g, s.u);
    const float* base = w.sasrec_style ? s.f : s.r;
    for (int i = 0; i < d; ++i) out[i] = base[i] + s.u[i];
}

// A block before the last, over all W positions of x [W, d] (updated in place).
inline void full_block(const EncoderWeights& w, const EncoderBlock& blk, float* x, const unsigned char* real, int W,
                       Scratch& s) {
    const int d = w.d, H = w.heads, dh = d / H;
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    for (int i = 0; i < W; ++i) layer_norm(x + i * d, blk.ln1_w, blk.ln1_b, w.eps, d, s.h + i * d);
    const float* src = w.sasrec_style ? x : s.h;
    for (int i = 0; i < W; ++i) {
        matvec(s.h + i * d, blk.wq, blk.bq, d, d, d, s.q + i * d);
        matvec(src + i * d, blk.wk, blk.bk, d, d, d, s.k + i * d);
        matvec(src + i * d, blk.wv, blk.bv, d, d, d, s.v + i * d);
    }
    for (int i = 0; i < W; ++i) {
        float* yi = s.y + i * d;
        for (int hd = 0; hd < H; ++hd) {
            const int c0 = hd * dh;
            float m = -INFINITY;
            for (int j = 0; j < W; ++j) {
                const bool ok = (real[j] && (!w.causal || j <= i)) || j == i;
                s.s[j] = ok ? dot_n(s.q + i * d + c0, s.k + j * d + c0, dh) * scale : -INFINITY;
                m = s.s[j] > m ? s.s[j] : m;
            }
            float total = 0.0f;
            for (int c = 0; c < dh; ++c) yi[c0 + c] = 0.0f;
            for (int j = 0; j < W; ++j) {
                if (s.s[j] == -INFINITY) continue;
                const float e = std::exp(s.s[j] - m);
                total += e;
                const float* vj = s.v + j * d + c0;
                for (int c = 0; c < dh; ++c) yi[c0 + c] += e * vj[c];
            }
            for (int c = 0; c < dh; ++c) yi[c0 + c] /= total;
        }
    }
    for (int i = 0; i < W; ++i) {
        float* xi = x + i * d;
        if (!real[i]) {
            for (int c = 0; c < d; ++c) xi[c] = 0.0f;
            continue;
        }
        block_tail(w, blk, s.h + i * d, xi, s.y + i * d, s, xi);
    }
}

// The last block for the last position of x [W, d] (the last token is real): the block's output there -> out [d].
inline void last_block(const EncoderWeights& w, const EncoderBlock& blk, const float* x, const unsigned char* real,
                       int W, Scratch& s, float* __restrict out) {
    const int d = w.d, H = w.heads, dh = d / H;
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    const float* x_last = x + (W - 1) * d;
    float* h_last = s.h + (W - 1) * d;
    if (w.sasrec_style) {
        layer_norm(x_last, blk.ln1_w, blk.ln1_b, w.eps, d, h_last);
    } else {
        for (int j = 0; j < W; ++j) layer_norm(x + j * d, blk.ln1_w, blk.ln1_b, w.eps, d, s.h + j * d);
    }
    const float* src = w.sasrec_style ? x : s.h;   // what keys and values are projected from
    float* q = s.q;
    matvec(h_last, blk.wq, blk.bq, d, d, d, q);
    for (int hd = 0; hd < H; ++hd) {
        const int c0 = hd * dh;
        for (int i = 0; i < d; ++i) s.qk[i] = dot_n(blk.wk + i * d + c0, q + c0, dh);  // Wk[:, head] q[head]
        const float c = dot_n(blk.bk + c0, q + c0, dh);
        float m = -INFINITY;
        for (int j = 0; j < W; ++j) {
            s.s[j] = real[j] ? (dot_n(src + j * d, s.qk, d) + c) * scale : -INFINITY;
            m = s.s[j] > m ? s.s[j] : m;
        }
        float total = 0.0f;
        for (int i = 0; i < d; ++i) s.xbar[i] = 0.0f;
        for (int j = 0; j < W; ++j) {
            if (!real[j]) continue;
            const float e = std::exp(s.s[j] - m);
            total += e;
            const float* sj = src + j * d;
            for (int i = 0; i < d; ++i) s.xbar[i] += e * sj[i];
        }
        const float inv = 1.0f / total;
        for (int i = 0; i < d; ++i) s.xbar[i] *= inv;
        matvec(s.xbar, blk.wv + c0, blk.bv + c0, d, dh, d, s.att + c0);   // the head's value columns
    }
    block_tail(w, blk, h_last, x_last, s.att, s, out);
}

}  // namespace enc

// Sessions b = 0 .. B-1, session b the tokens [offsets[b], offsets[b + 1]) (oldest first; 0 pads; every token
// below w.rows, checked by the caller) -> out float32 [B, d]. BERT4Rec: [MASK] is appended; then the last max_len
// tokens are the window. An empty window, or one whose last token pads, gives the final LayerNorm of zeros (as the
// exported model does for a row of padding).
void encode(const EncoderWeights& w, const std::int64_t* tokens, const std::int64_t* offsets, std::int64_t B,
            float* out) {
    const int d = w.d, L = w.max_len;
    // per-thread buffers, grown to the largest model met and reused (no allocation or zeroing per call: a lone
    // session costs a few µs, a zeroed 90 KB scratch about one of them)
    static thread_local std::vector<float> scratch, xbuf;
    static thread_local std::vector<std::int64_t> win;
    static thread_local std::vector<unsigned char> real;
    const std::size_t Ls = static_cast<std::size_t>(L);
    if (scratch.size() < encoder_scratch_floats(w)) scratch.resize(encoder_scratch_floats(w));
    if (xbuf.size() < Ls * d) xbuf.resize(Ls * d);
    if (win.size() < Ls) win.resize(Ls);
    if (real.size() < Ls) real.resize(Ls);
    enc::Scratch s = enc::carve(w, scratch.data());
    for (std::int64_t b = 0; b < B; ++b) {
        const std::int64_t* t = tokens + offsets[b];
        std::int64_t n = offsets[b + 1] - offsets[b];
        // the window: the session (+ [MASK]), its last L tokens
        int W = 0;
        const std::int64_t total = n + (w.mask_token >= 0 ? 1 : 0);
        const std::int64_t skip = total > L ? total - L : 0;
        for (std::int64_t i = skip; i < n; ++i) win[W++] = t[i];
        if (w.mask_token >= 0) win[W++] = w.mask_token;
        float* o = out + b * d;
        float* x = xbuf.data();
        if (W == 0 || win[W - 1] == 0) {
            for (int i = 0; i < d; ++i) s.r[i] = 0.0f;
            enc::layer_norm(s.r, w.lno_w, w.lno_b, w.eps, d, o);
            continue;
        }
        for (int j = 0; j < W; ++j) {
            const std::int64_t tok = win[j];
            real[j] = tok > 0;
            float* xj = x + j * d;
            const float* p = w.pos + static_cast<std::ptrdiff_t>(L - W + j) * d;
            if (!real[j]) {
                for (int i = 0; i < d; ++i) xj[i] = 0.0f;
                continue;
            }
            const std::int8_t* row = w.table + tok * d;
            const float sc = w.table_scale[tok];
            for (int i = 0; i < d; ++i) xj[i] = static_cast<float>(row[i]) * sc + p[i];
        }
        const std::size_t nb = w.blocks.size();
        for (std::size_t k = 0; k + 1 < nb; ++k) enc::full_block(w, w.blocks[k], x, real.data(), W, s);
        enc::last_block(w, w.blocks[nb - 1], x, real.data(), W, s, s.t);
        enc::layer_norm(s.t, w.lno_w, w.lno_b, w.eps, d, o);
    }
}

}  // namespace EDGEREC_NS
}  // namespace edgerec
