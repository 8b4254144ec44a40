"""The CMake build of the C++ segmenter: unit tests under ctest, the same tests under AddressSanitizer and
UndefinedBehaviorSanitizer, and (slow) the pybind11 module built by CMake agreeing with the installed one."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
needs_toolchain = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                     reason="needs cmake and a C++ compiler")


def _run(command: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (f"{' '.join(command)} failed:\n"
                                       f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}")
    return completed


def _build_and_ctest(build_dir: Path, *options: str) -> str:
    _run(["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}", *options])
    _run(["cmake", "--build", str(build_dir), "-j", "2"])
    return _run(["ctest", "--test-dir", str(build_dir), "--output-on-failure"]).stdout


@needs_toolchain
def test_cmake_build_and_ctest(tmp_path):
    output = _build_and_ctest(tmp_path / "build", "-DSTEPSEARCH_PYTHON_MODULE=OFF")
    assert "100% tests passed" in output


@needs_toolchain
def test_asan_ubsan_build_passes_the_unit_tests(tmp_path):
    output = _build_and_ctest(tmp_path / "build-asan", "-DSTEPSEARCH_ASAN=ON")
    assert "100% tests passed" in output
    symbols = _run(["nm", str(tmp_path / "build-asan" / "test_segmenter")]).stdout
    assert "__asan_report" in symbols and "__ubsan" in symbols


_COMPARE = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("_segmenter", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
pieces = [b"<sea", b"rch>q</search>", b"\\n<information>d", b"</information>", b"<answer>a</answer>"]
ids, offsets = np.array([0, 1, 2, 3, 4, 4], dtype=np.int32), np.array([0, 5, 6], dtype=np.int64)
out = module.segment_batch(module.TokenTable(pieces, [False] * 5), ids, offsets)
print(repr({key: value.tolist() if hasattr(value, "tolist") else value for key, value in sorted(out.items())}))
"""


@pytest.mark.slow
@needs_toolchain
def test_cmake_module_matches_the_installed_extension(tmp_path):
    # Two builds of one pybind11 module cannot share a process (the type is registered once): one process each.
    build_dir = tmp_path / "build"
    _build_and_ctest(build_dir)
    built = next(build_dir.glob("_segmenter*.so"))
    import stepsearch._segmenter as installed
    cmake_output = _run([sys.executable, "-c", _COMPARE, str(built)]).stdout
    installed_output = _run([sys.executable, "-c", _COMPARE, installed.__file__]).stdout
    assert cmake_output == installed_output
    assert "'step_ends': [1]" in cmake_output and "'answers': ['a', 'a']" in cmake_output
