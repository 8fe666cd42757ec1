// The MessagePack subset of the daemon's recommend fast path (bindings.cpp RecommendFrames): a bounds-checked
// reader for one request frame and a writer for its reply, byte for byte what msgpack-python's Packer
// (use_bin_type=True) writes for the same values. Spec: https://github.com/msgpack/msgpack/blob/master/spec.md
// Anything this reader does not take (another type where a value is expected, a truncated frame) makes it say
// no, and the frame goes the general path, which gives every error its message.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace edgerec {
namespace frames {

// A cursor over [p, end); every read checks the bytes are there and the type is the expected one.
struct Reader {
    const std::uint8_t* p;
    const std::uint8_t* end;

    bool need(std::size_t n) const { return static_cast<std::size_t>(end - p) >= n; }
    std::uint64_t be(int n) {  // n big-endian bytes (need(n) checked by the caller)
        std::uint64_t v = 0;
        for (int i = 0; i < n; ++i) v = (v << 8) | p[i];
        p += n;
        return v;
    }
    // Any integer encoding (positive / negative fixint, uint8..64, int8..64) -> v. False: not an integer (or a
    // uint64 above INT64_MAX).
    bool integer(std::int64_t& v) {
        if (!need(1)) return false;
        const std::uint8_t t = *p;
        if (t <= 0x7f) { v = t; ++p; return true; }
        if (t >= 0xe0) { v = static_cast<std::int8_t>(t); ++p; return true; }
        static const int kUnsigned[4] = {1, 2, 4, 8};
        if (t >= 0xcc && t <= 0xcf) {
            const int n = kUnsigned[t - 0xcc];
            if (!need(1 + n)) return false;
            ++p;
            const std::uint64_t u = be(n);
            if (u > static_cast<std::uint64_t>(INT64_MAX)) return false;
            v = static_cast<std::int64_t>(u);
            return true;
        }
        if (t >= 0xd0 && t <= 0xd3) {
            const int n = kUnsigned[t - 0xd0];
            if (!need(1 + n)) return false;
            ++p;
            const std::uint64_t u = be(n);
            switch (n) {
                case 1: v = static_cast<std::int8_t>(u); break;
                case 2: v = static_cast<std::int16_t>(u); break;
                case 4: v = static_cast<std::int32_t>(u); break;
                default: v = static_cast<std::int64_t>(u);
            }
            return true;
        }
        return false;
    }
    // A str (fixstr, str8/16/32) -> its bytes (a view into the frame; not checked as UTF-8 here).
    bool str(std::string_view& s) {
        if (!need(1)) return false;
        const std::uint8_t t = *p;
        std::uint64_t n;
        if ((t & 0xe0) == 0xa0) { n = t & 0x1f; ++p; }
        else if (t == 0xd9 && need(2)) { ++p; n = be(1); }
        else if (t == 0xda && need(3)) { ++p; n = be(2); }
        else if (t == 0xdb && need(5)) { ++p; n = be(4); }
        else return false;
        if (!need(n)) return false;
        s = std::string_view(reinterpret_cast<const char*>(p), n);
        p += n;
        return true;
    }
    bool array(std::uint32_t& n) { return header(0x90, 0xdc, n); }
    bool map(std::uint32_t& n) { return header(0x80, 0xde, n); }
    // A container header: fix (the fixarray / fixmap tag, 4-bit size) or c16 / c16 + 1 (16- / 32-bit size) -> n.
    bool header(std::uint8_t fix, std::uint8_t c16, std::uint32_t& n) {
        if (!need(1)) return false;
        const std::uint8_t t = *p;
        if ((t & 0xf0) == fix) { n = t & 0x0f; ++p; return true; }
        if (t == c16 && need(3)) { ++p; n = static_cast<std::uint32_t>(be(2)); return true; }
        if (t == c16 + 1 && need(5)) { ++p; n = static_cast<std::uint32_t>(be(4)); return true; }
        return false;
    }
    bool boolean(bool& b) {
        if (!need(1) || (*p != 0xc2 && *p != 0xc3)) return false;
        b = *p++ == 0xc3;
        return true;
    }
};

// Appends MessagePack to a std::string with the encodings msgpack-python's Packer picks: the shortest integer
// form of a non-negative int, fixstr / str8 / str16 / str32 by length, fixarray / array16 / array32 and fixmap /
// map16 / map32 by size, float64 for a Python float.
struct Writer {
    std::string out;

    void byte(std::uint8_t b) { out.push_back(static_cast<char>(b)); }
    void be(std::uint64_t v, int n) {
        for (int i = n - 1; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    }
    void uint(std::uint64_t v) {
        if (v < 0x80) byte(static_cast<std::uint8_t>(v));
        else if (v <= 0xff) { byte(0xcc); be(v, 1); }
        else if (v <= 0xffff) { byte(0xcd); be(v, 2); }
        else if (v <= 0xffffffffULL) { byte(0xce); be(v, 4); }
        else { byte(0xcf); be(v, 8); }
    }
    void nil() { byte(0xc0); }
    void str(std::string_view s) {
        const std::size_t n = s.size();
        if (n < 32) byte(static_cast<std::uint8_t>(0xa0 | n));
        else if (n <= 0xff) { byte(0xd9); be(n, 1); }
        else if (n <= 0xffff) { byte(0xda); be(n, 2); }
        else { byte(0xdb); be(n, 4); }
        out.append(s.data(), n);
    }
    void array(std::size_t n) { header(0x90, 0xdc, n); }
    void map(std::size_t n) { header(0x80, 0xde, n); }
    void header(std::uint8_t fix, std::uint8_t c16, std::size_t n) {   // as Reader::header
        if (n < 16) byte(static_cast<std::uint8_t>(fix | n));
        else if (n <= 0xffff) { byte(c16); be(n, 2); }
        else { byte(static_cast<std::uint8_t>(c16 + 1)); be(n, 4); }
    }
    void float64(double x) {
        std::uint64_t bits;
        std::memcpy(&bits, &x, sizeof bits);
        byte(0xcb);
        be(bits, 8);
    }
};

}  // namespace frames
}  // namespace edgerec
