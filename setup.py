"""Build and install edgerec: the torch-free daemon (edge_runtime), the trainer (trainer, extra [trainer]).

The native top-k kernel in native/ is built through CMakeLists.txt once it lands; until then the daemon scores with
NumPy through edge_runtime.scoring.
"""
from setuptools import setup

setup(
    name="edgerec",
    version="0.1.0",
    description="Real-time personalized recommendations from a quantized Transformer on edge machines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["edge_runtime", "trainer"],
    package_data={"trainer": ["datasets/amazon_beauty_s3rec/*"]},
    install_requires=[
        "numpy>=1.24",
        "onnxruntime>=1.17",
        "msgpack>=1.0",
        "zeroconf>=0.100",
        "threadpoolctl>=3.1",
    ],
    extras_require={
        # torch is pinned exactly: the CPU build of 2.13.0 is what edge build machines here carry.
        "trainer": ["torch==2.13.0", "onnx>=1.16", "onnxscript>=0.3", "optimum>=1.20", "optimum-onnx>=0.1",
                    "pandas>=2.0", "tqdm>=4.60"],
        "test": ["pytest>=8", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["edgerec = edge_runtime.cli:main"]},
)
