#!/usr/bin/env bash
# Cross-compile the kernel for AArch64 (the NEON level) and run the C++ level-agreement test under qemu-user:
# the NEON path is built and checked against the scalar build on an x86-64 machine.
# Needs Debian's g++-aarch64-linux-gnu and qemu-user-static (installed here when missing and running as root).
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
$CXX -std=c++17 -O3 -fno-tree-vectorize -c native/src/topk_scalar.cpp -o "$out/scalar.o"
$CXX -std=c++17 -O3 -c native/src/topk_neon.cpp -o "$out/neon.o"
$CXX -std=c++17 -O2 -c native/src/dispatch.cpp -o "$out/dispatch.o"
$CXX -std=c++17 -O2 -static native/tests/test_kernel.cpp "$out"/*.o -o "$out/test_kernel" -lpthread
qemu-aarch64-static "$out/test_kernel"
