#!/usr/bin/env bash
# Cross-compile the kernel for AArch64 (the neon and neon_dotprod levels) and run the C++ level-agreement test under
# qemu-user, once per CPU model: every level this CPU has is checked against the scalar build, and the run-time
# dispatch must pick the right level for it:
#   -cpu cortex-a72 (Raspberry Pi 4: ARMv8.0, no dot product)  -> neon, and EDGEREC_SIMD=neon_dotprod falls back
#   -cpu max        (every feature qemu has, FEAT_DotProd too)  -> neon_dotprod, and EDGEREC_SIMD=neon is honoured
# Needs Debian's g++-aarch64-linux-gnu and qemu-user-static (installed here when missing and running as root).
# Bounded: each qemu run is cut at 300 s (about 10 s each here).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static >/dev/null 2>&1) ||
      (apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static >/dev/null)
  else
    echo "install g++-aarch64-linux-gnu and qemu-user-static first" >&2
    exit 2
  fi
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
CXX=aarch64-linux-gnu-g++
# the same flags as CMakeLists.txt: scalar without auto-vectorization, neon on the baseline, dotprod in its own file
$CXX -std=gnu++17 -O3 -fno-math-errno -fno-tree-vectorize -c native/src/topk_scalar.cpp -o "$out/scalar.o"
$CXX -std=gnu++17 -O3 -fno-math-errno -c native/src/topk_neon.cpp -o "$out/neon.o"
$CXX -std=gnu++17 -O3 -fno-math-errno -march=armv8.2-a+dotprod -c native/src/topk_neon_dotprod.cpp -o "$out/neon_dotprod.o"
$CXX -std=gnu++17 -O2 -DEDGEREC_HAVE_DOTPROD -c native/src/dispatch.cpp -o "$out/dispatch.o"
$CXX -std=gnu++17 -O2 -DEDGEREC_HAVE_DOTPROD -static native/tests/test_kernel.cpp "$out"/*.o -o "$out/test_kernel" \
  -lpthread

status=0
run() {  # run CPU EXPECTED_LEVEL [ENV...]: the test under qemu -cpu CPU; the dispatch must pick EXPECTED_LEVEL
  local cpu=$1 want=$2
  shift 2
  echo "== qemu-aarch64 -cpu $cpu${*:+ ($*)}: expecting $want"
  local rc=0
  env "$@" EDGEREC_EXPECT_LEVEL="$want" timeout 300 qemu-aarch64-static -cpu "$cpu" "$out/test_kernel" \
    > "$out/log" 2>&1 || rc=$?
  grep -E "dispatch picks|checked|skip|checks,|MISMATCH|FAIL" "$out/log" | head -40 || true
  if [ "$rc" != 0 ]; then
    echo "   FAILED: exit status $rc (124: timed out; 132: illegal instruction, i.e. a level this CPU lacks ran)"
    status=1
  fi
}
run cortex-a72 neon
run max neon_dotprod
run cortex-a72 neon EDGEREC_SIMD=neon_dotprod   # not on this CPU: falls back, with a note
run max neon EDGEREC_SIMD=neon                  # a lower level on request
if [ "$status" != 0 ]; then
  echo "check_aarch64: FAILED" >&2
  exit 1
fi
echo "check_aarch64: all runs passed"
