#!/usr/bin/env bash
# Check the avx512 and avx512_vnni builds of the kernel against the scalar build on a CPU without AVX-512: those two
# files are compiled with the AVX-512 feature macros set but no AVX-512 code generation, against portable C versions
# of the intrinsics (SIMDe, native/tests/simde/immintrin.h), and test_kernel runs them beside the real avx2 and
# scalar builds (every shape, mode, filter and scan plan it checks, the encoder too). It tests the logic of the
# AVX-512 code paths (masks, tails, block order, the 8-row steps) where no AVX-512 CPU is at hand; on one, the real
# build goes through the same test in the suite. Needs Debian's libsimde-dev (installed here when missing and running
# as root). About 10 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -f /usr/include/simde/x86/avx512.h ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q libsimde-dev >/dev/null 2>&1) ||
      (apt-get update -q >/dev/null && apt-get install -y -q libsimde-dev >/dev/null)
  else
    echo "install libsimde-dev first" >&2
    exit 2
  fi
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
CXX=${CXX:-g++}
opt=(-std=gnu++17 -O2 -fno-math-errno -Wno-psabi)
avx512=(-Inative/tests/simde -D__AVX__ -D__AVX2__ -D__FMA__ -D__AVX512F__ -D__AVX512BW__ -D__AVX512VL__ -D__AVX512DQ__)
# the same levels and flags as CMakeLists.txt, but for the two AVX-512 files
$CXX "${opt[@]}" -fno-tree-vectorize -c native/src/topk_scalar.cpp -o "$out/scalar.o"
$CXX "${opt[@]}" -mavx2 -mfma -c native/src/topk_avx2.cpp -o "$out/avx2.o"
$CXX "${opt[@]}" "${avx512[@]}" -c native/src/topk_avx512.cpp -o "$out/avx512.o"
$CXX "${opt[@]}" "${avx512[@]}" -D__AVX512VNNI__ -c native/src/topk_avx512_vnni.cpp -o "$out/avx512_vnni.o"
$CXX "${opt[@]}" -DEDGEREC_HAVE_VNNI -c native/src/dispatch.cpp -o "$out/dispatch.o"
$CXX "${opt[@]}" -DEDGEREC_HAVE_VNNI '-DEDGEREC_EMULATED_LEVELS="avx512,avx512_vnni"' native/tests/test_kernel.cpp \
  "$out"/*.o -o "$out/test_kernel" -lpthread
rc=0
timeout 300 "$out/test_kernel" > "$out/log" 2>&1 || rc=$?
grep -E "portable|checked|checks,|MISMATCH|FAIL" "$out/log" | head -40 || true
for level in avx512 avx512_vnni; do
  grep -q "^level $level checked" "$out/log" || { echo "   $level did not run" >&2; rc=1; }
done
if [ "$rc" != 0 ]; then
  echo "check_avx512_emulated: FAILED (exit status $rc; 124: timed out)" >&2
  exit 1
fi
echo "check_avx512_emulated: all levels agree with the scalar build"
