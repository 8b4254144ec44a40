"""Build script: the `stepsearch` package, `kernels/` installed as `stepsearch.kernels`, and the C++ segmenter.

The C++ extension (`stepsearch._segmenter`) is plain C++17 with pybind11: no libtorch, no CUDA, so it builds in
seconds on any machine with a C++ compiler.
"""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

segmenter_sources = sorted(glob.glob("csrc/*.cpp"))

ext_modules = [
    Pybind11Extension(
        "stepsearch._segmenter",
        segmenter_sources,
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
] if segmenter_sources else []

packages = find_packages(include=["stepsearch", "stepsearch.*"]) + ["stepsearch.kernels"]

setup(
    packages=packages,
    package_dir={"stepsearch.kernels": "kernels"},
    package_data={"stepsearch": ["data/prompts/*.txt"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
