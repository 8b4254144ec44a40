"""Running a kernel test file as a child process: under the Triton interpreter, or compiling for sm_90.

The child keeps TRITON_INTERPRET (and triton itself) out of the pytest process. Each kernel test file calls these
from its fixtures and handles `python <test file> IN OUT` / `--compile-for-hopper` in its `__main__` block.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(test_file: str, args: list[str], env: dict[str, str], timeout: int, what: str) -> str:
    completed = subprocess.run([sys.executable, test_file, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=timeout)
    assert completed.returncode == 0, f"{what} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def run_interpreter_cases(test_file: str, cases: list, work_dir: Path, timeout: int) -> dict:
    """Save `cases`, run `test_file` on them with TRITON_INTERPRET=1, and return the child's saved results."""
    if importlib.util.find_spec("triton") is None:  # find, not import: triton stays out of this process
        pytest.skip("triton is not installed")
    inputs_path, outputs_path = work_dir / "cases.pt", work_dir / "results.pt"
    torch.save(cases, inputs_path)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    _run(test_file, [str(inputs_path), str(outputs_path)], env, timeout, "interpreter run")
    return torch.load(outputs_path, weights_only=True)


def compile_for_hopper(test_file: str, timeout: int) -> list[str]:
    """Run `test_file --compile-for-hopper` (no GPU needed: triton's bundled ptxas) and return its output lines."""
    spec = importlib.util.find_spec("triton")
    if spec is None:
        pytest.skip("triton is not installed")
    if not (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    return _run(test_file, ["--compile-for-hopper"], env, timeout, "sm_90 compile").splitlines()
