// C++ check of every compiled SIMD level against the scalar build, with no Python involved (used to run the NEON
// builds under qemu-user on an x86-64 machine). Integer-valued data keeps every sum exact, so results must be
// bit-identical. Each case runs twice: int8 values over the whole range [-128, 127], then only the extremes
// {-128, -127, 127} (the largest pair sums of the AVX2 16-bit multiplies, and the -128 queries that take its
// "widen" path). Exit status 0 = all levels agree (and, with EDGEREC_EXPECT_LEVEL=NAME, the run-time dispatch
// picked NAME on this CPU).
//   cmake -S . -B build -DEDGEREC_BUILD_TESTS=ON && cmake --build build && build/test_kernel
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../src/dispatch.h"

using namespace edgerec;

static std::vector<Heap> run(const Impl& impl, ScanArgs a, int k) {
    std::vector<Heap> heaps(a.nq, Heap(k));
    impl.scan(a, 0, a.n, heaps.data());
    return heaps;
}

// Random encoder weights (encoder.h) kept alive in one store; N(0, 0.3) matrices, LayerNorm gains around 1.
struct EncoderStore {
    std::vector<std::vector<float>> floats;
    std::vector<std::int8_t> table;
    std::vector<float> table_scale;
    EncoderWeights w;
    const float* add(std::mt19937& rng, std::size_t n, float mean, float sd) {
        std::normal_distribution<float> g(mean, sd);
        floats.emplace_back(n);
        for (auto& v : floats.back()) v = g(rng);
        return floats.back().data();
    }
    EncoderStore(std::mt19937& rng, int d, int heads, int max_len, int blocks, bool causal, bool sasrec, bool mask) {
        floats.reserve(8 + 16 * blocks);
        const std::int64_t rows = 50;
        std::uniform_int_distribution<int> byte(-127, 127);
        table.resize(rows * d);
        for (auto& v : table) v = static_cast<std::int8_t>(byte(rng));
        for (int j = 0; j < d; ++j) table[j] = 0;   // token 0 pads
        table_scale.assign(rows, 0.01f);
        w.d = d; w.heads = heads; w.max_len = max_len; w.causal = causal; w.sasrec_style = sasrec;
        w.mask_token = mask ? rows - 1 : -1; w.rows = rows;
        w.table = table.data(); w.table_scale = table_scale.data();
        const std::size_t dd = static_cast<std::size_t>(d) * d;
        w.pos = add(rng, static_cast<std::size_t>(max_len) * d, 0, 0.3f);
        for (int b = 0; b < blocks; ++b) {
            EncoderBlock k{};
            k.ln1_w = add(rng, d, 1, 0.2f); k.ln1_b = add(rng, d, 0, 0.2f);
            k.wq = add(rng, dd, 0, 0.3f); k.bq = add(rng, d, 0, 0.1f);
            k.wk = add(rng, dd, 0, 0.3f); k.bk = add(rng, d, 0, 0.1f);
            k.wv = add(rng, dd, 0, 0.3f); k.bv = add(rng, d, 0, 0.1f);
            k.wo = add(rng, dd, 0, 0.3f); k.bo = add(rng, d, 0, 0.1f);
            k.ln2_w = add(rng, d, 1, 0.2f); k.ln2_b = add(rng, d, 0, 0.2f);
            k.f1 = add(rng, dd, 0, 0.3f); k.f1b = add(rng, d, 0, 0.1f);
            k.f2 = add(rng, dd, 0, 0.3f); k.f2b = add(rng, d, 0, 0.1f);
            w.blocks.push_back(k);
        }
        w.lno_w = add(rng, d, 1, 0.2f); w.lno_b = add(rng, d, 0, 0.2f);
    }
};

// The session encoder at `impl` against the scalar build (float sums in other orders: within 1e-4 of the largest
// value), and each session of a batch bit for bit the same alone. Returns the failures; counts the checks.
static int check_encoder(const Impl& impl, const Impl& ref, std::mt19937& rng, int* checks) {
    int failures = 0;
    struct Shape { int d, heads, max_len, blocks; bool causal, sasrec, mask; };
    for (const Shape& sh : {Shape{32, 1, 12, 1, true, false, false}, Shape{32, 2, 12, 2, true, false, false},
                            Shape{24, 3, 9, 3, true, true, false}, Shape{64, 1, 50, 1, true, false, false},
                            Shape{16, 2, 7, 2, false, false, true}, Shape{20, 4, 5, 1, false, true, true}}) {
        EncoderStore st(rng, sh.d, sh.heads, sh.max_len, sh.blocks, sh.causal, sh.sasrec, sh.mask);
        std::uniform_int_distribution<int> tok(1, 48), len(0, 2 * sh.max_len);
        std::vector<std::int64_t> tokens, offsets = {0};
        for (int b = 0; b < 12; ++b) {
            const int n = b == 0 ? 0 : b == 1 ? 1 : len(rng);
            for (int i = 0; i < n; ++i) tokens.push_back(b == 2 && i == n / 2 ? 0 : tok(rng));   // b 2: a pad inside
            offsets.push_back(static_cast<std::int64_t>(tokens.size()));
        }
        const std::int64_t B = static_cast<std::int64_t>(offsets.size()) - 1;
        std::vector<float> got(B * sh.d), want(B * sh.d), lone(sh.d);
        impl.encode(st.w, tokens.data(), offsets.data(), B, got.data());
        ref.encode(st.w, tokens.data(), offsets.data(), B, want.data());
        float top = 1.0f, diff = 0.0f;
        for (std::size_t i = 0; i < got.size(); ++i) {
            top = std::max(top, std::abs(want[i]));
            diff = std::max(diff, std::abs(got[i] - want[i]));
        }
        ++*checks;
        if (!(diff <= 1e-4f * top)) {
            ++failures;
            std::printf("MISMATCH encoder level=%s d=%d heads=%d blocks=%d: %g\n", impl.name, sh.d, sh.heads,
                        sh.blocks, diff);
        }
        for (std::int64_t b = 0; b < B; ++b) {
            const std::int64_t one[2] = {0, offsets[b + 1] - offsets[b]};
            impl.encode(st.w, tokens.data() + offsets[b], one, 1, lone.data());
            ++*checks;
            if (!std::equal(lone.begin(), lone.end(), got.begin() + b * sh.d)) {
                ++failures;
                std::printf("MISMATCH encoder batch level=%s d=%d session=%lld\n", impl.name, sh.d,
                            static_cast<long long>(b));
            }
        }
    }
    return failures;
}

// Scan plans to check besides the default one (ScanArgs: one stream, software prefetch on).
struct Plan {
    int streams, row_streams;
    bool prefetch;
};
static const Plan kPlans[] = {{1, 1, false}, {4, 8, false}, {3, 2, true}, {8, 4, false}};

static bool same(const std::vector<Heap>& x, const std::vector<Heap>& y) {
    for (size_t q = 0; q < x.size(); ++q) {
        if (x[q].size != y[q].size) return false;
        std::vector<std::pair<float, long long>> a, b;
        for (int i = 0; i < x[q].size; ++i) a.emplace_back(x[q].score[i], x[q].index[i]);
        for (int i = 0; i < y[q].size; ++i) b.emplace_back(y[q].score[i], y[q].index[i]);
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        if (a != b) return false;
    }
    return true;
}

// Levels whose objects were compiled against portable C versions of the intrinsics (SIMDe: check_avx512_emulated.sh
// builds the avx512 levels that way on a CPU without AVX-512), so they run here although the CPU lacks the level.
static bool emulated(const std::string& level) {
#ifdef EDGEREC_EMULATED_LEVELS
    const std::string list = std::string(",") + EDGEREC_EMULATED_LEVELS + ",";
    return list.find("," + level + ",") != std::string::npos;
#else
    (void)level;
    return false;
#endif
}

int main() {
    const Impl* ref = find_impl("scalar");
    std::string note;
    const std::string picked = active(&note).name;
    std::printf("run-time dispatch picks %s%s%s\n", picked.c_str(), note.empty() ? "" : ": ", note.c_str());
    int failures = 0, checks = 0;
    if (const char* want = std::getenv("EDGEREC_EXPECT_LEVEL")) {
        if (picked != want) {
            std::printf("FAIL: expected the dispatch to pick %s on this CPU\n", want);
            ++failures;
        }
    }
    std::mt19937 rng(42);
    std::uniform_int_distribution<int> small(-8, 8), byte(-128, 127), scale(1, 63), pick(0, 2);
    const std::int8_t extremes[3] = {-128, -127, 127};
    for (const std::string& level : compiled_levels()) {
        const Impl* impl = find_impl(level);
        if (!impl->supported() && !emulated(level)) {
            std::printf("skip %s (not supported here)\n", level.c_str());
            continue;
        }
        if (emulated(level)) std::printf("%s: built on portable intrinsics (check_avx512_emulated.sh)\n", level.c_str());
        for (long long n : {1LL, 15LL, 17LL, 64LL, 65LL, 1000LL}) {
            for (int d : {1, 3, 17, 64, 100, 257}) {
                for (int nq : {1, 2, 5, 9, 33}) {
                  for (int extreme = 0; extreme < 2; ++extreme) {
                    std::vector<float> xf(n * d), qf(nq * d), scales(n), qscales(nq);
                    std::vector<std::int8_t> x8(n * d), q8(nq * d);
                    for (auto& v : xf) v = static_cast<float>(small(rng));
                    for (auto& v : qf) v = static_cast<float>(small(rng));
                    for (auto& v : x8) v = extreme ? extremes[pick(rng)] : static_cast<std::int8_t>(byte(rng));
                    for (auto& v : q8) v = extreme ? extremes[pick(rng)] : static_cast<std::int8_t>(byte(rng));
                    if (!extreme && nq > 1) q8[d / 2] = -128;  // query 0 takes a -128 path, the others may not
                    if (!extreme) for (int j = 0; j < d; ++j) q8[(nq - 1) * d + j] = static_cast<std::int8_t>(
                        std::max(-127, static_cast<int>(q8[(nq - 1) * d + j])));  // the last query holds none
                    for (auto& v : scales) v = scale(rng) / 64.0f;
                    for (auto& v : qscales) v = scale(rng) / 64.0f;
                    std::vector<std::uint8_t> packed(((n + kTileRows - 1) / kTileRows) * packed_tile_bytes(d));
                    pack_i8_rows(x8.data(), n, d, packed.data());
                    std::vector<std::uint8_t> allow((n + 7) / 8);  // blocks 1, 4, 7 ... none allowed
                    for (std::size_t b = 0; b < allow.size(); ++b)
                        allow[b] = (b / 8) % 3 == 1 ? 0 : static_cast<std::uint8_t>(0xB7 ^ b);
                    std::vector<std::int64_t> excl = {0, n / 2, n - 1};
                    std::sort(excl.begin(), excl.end());
                    excl.erase(std::unique(excl.begin(), excl.end()), excl.end());
                    for (int mode = 0; mode < 4; ++mode) {
                        ScanArgs a;
                        a.mode = static_cast<Mode>(mode);
                        a.n = n; a.d = d; a.nq = nq;
                        a.items = mode == 0 ? static_cast<const void*>(xf.data())
                                 : mode == 3 ? static_cast<const void*>(packed.data()) : x8.data();
                        a.scales = mode == 0 ? nullptr : scales.data();
                        a.queries = mode >= 2 ? static_cast<const void*>(q8.data()) : qf.data();
                        a.query_scales = mode >= 2 ? qscales.data() : nullptr;
                        a.filters.exclude = excl.data();
                        a.filters.n_exclude = static_cast<std::int64_t>(excl.size());
                        const int k = static_cast<int>(std::min<long long>(10, n));
                        ++checks;
                        if (!same(run(*impl, a, k), run(*ref, a, k))) {
                            ++failures;
                            std::printf("MISMATCH level=%s mode=%d n=%lld d=%d nq=%d extreme=%d\n", level.c_str(), mode,
                                        n, d, nq, extreme);
                        }
                        // The scan plans of other CPUs (dispatch.h scan_plan: streams side by side, software
                        // prefetch on / off), without and with an allow bitset that zeroes whole blocks (rounds with
                        // fewer blocks than streams): the scalar reference's bits.
                        for (const Plan& p : kPlans) {
                            if (extreme || !(n == 17 || n == 65 || n == 1000)) break;  // (the qemu runs' time)
                            for (int filt = 0; filt < 2; ++filt) {
                                ScanArgs v = a, r = a;
                                v.streams = p.streams;
                                v.row_streams = p.row_streams;
                                v.prefetch_f32 = v.prefetch_i8 = p.prefetch;
                                if (filt) {
                                    v.filters.allow = r.filters.allow = allow.data();
                                    v.filters.allow_bytes = static_cast<std::int64_t>(allow.size());
                                    r.filters.allow_bytes = v.filters.allow_bytes;
                                }
                                ++checks;
                                if (!same(run(*impl, v, k), run(*ref, r, k))) {
                                    ++failures;
                                    std::printf("MISMATCH plan streams=%d row_streams=%d prefetch=%d allow=%d level=%s "
                                                "mode=%d n=%lld d=%d nq=%d\n", p.streams, p.row_streams, p.prefetch,
                                                filt, level.c_str(), mode, n, d, nq);
                                }
                            }
                        }
                    }
                  }
                }
            }
        }
        // per_query: a batch of real-valued float queries (sums not exact, so any change in the order of
        // additions shows) must give each query exactly what a scan of it alone gives, at this level.
        std::uniform_real_distribution<float> real(-1.0f, 1.0f);
        for (long long n : {17LL, 1000LL, 2100LL}) {
            for (int d : {3, 64, 100}) {
                for (int nq : {2, 5, 9, 33}) {
                    std::vector<float> xf(n * d), qf(nq * d), scales(n);
                    std::vector<std::int8_t> x8(n * d);
                    for (auto& v : xf) v = real(rng);
                    for (auto& v : qf) v = real(rng);
                    for (auto& v : x8) v = static_cast<std::int8_t>(byte(rng));
                    for (auto& v : scales) v = real(rng) * 0.01f + 0.02f;
                    for (int mode = 0; mode < 2; ++mode) {
                        ScanArgs a;
                        a.mode = static_cast<Mode>(mode);
                        a.n = n; a.d = d; a.nq = nq; a.per_query = true;
                        a.items = mode == 0 ? static_cast<const void*>(xf.data()) : x8.data();
                        a.scales = mode == 0 ? nullptr : scales.data();
                        a.queries = qf.data();
                        const int k = static_cast<int>(std::min<long long>(10, n));
                        std::vector<Heap> batch = run(*impl, a, k);
                        for (int q = 0; q < nq; ++q) {
                            ScanArgs one = a;
                            one.nq = 1; one.per_query = false;
                            one.queries = qf.data() + static_cast<std::size_t>(q) * d;
                            ++checks;
                            std::vector<Heap> b1(1, batch[q]);
                            if (!same(b1, run(*impl, one, k))) {
                                ++failures;
                                std::printf("MISMATCH per_query level=%s mode=%d n=%lld d=%d nq=%d q=%d\n",
                                            level.c_str(), mode, n, d, nq, q);
                            }
                            for (const Plan& p : kPlans) {  // and with the other plans: still those bits
                                if (nq > 9) break;
                                ScanArgs v = one;
                                v.streams = p.streams;
                                v.row_streams = p.row_streams;
                                v.prefetch_f32 = v.prefetch_i8 = p.prefetch;
                                ++checks;
                                if (!same(b1, run(*impl, v, k))) {
                                    ++failures;
                                    std::printf("MISMATCH per_query plan streams=%d row_streams=%d level=%s mode=%d "
                                                "n=%lld d=%d nq=%d q=%d\n", p.streams, p.row_streams,
                                                level.c_str(), mode, n, d, nq, q);
                                }
                            }
                        }
                    }
                }
            }
        }
        failures += check_encoder(*impl, *ref, rng, &checks);
        std::printf("level %s checked\n", level.c_str());
    }
    std::printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
