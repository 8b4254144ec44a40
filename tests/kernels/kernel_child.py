"""Running a kernel test file as a child process: under the Triton interpreter, or compiling for sm_90.

The child keeps TRITON_INTERPRET (and triton itself) out of the pytest process. Each kernel test file calls these
from its fixtures and handles `python <test file> IN OUT` / `--compile-for-hopper` in its `__main__` block; in the
compile child, `compile_sm90` compiles one kernel variant and prints its register and stack use, which the parent
checks with `assert_no_spills`.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def non_finite(count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` values cycling through NaN, +inf and -inf: what a model may compute at pads and retrieved tokens."""
    return torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(count // 3 + 1)[:count].to(dtype)


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


def run_interpreter_check(test_file: str, flag: str, timeout: int) -> list[str]:
    """Run `test_file flag` with TRITON_INTERPRET=1 and return its output lines (a check the child makes itself)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    return _run(test_file, [flag], env, timeout, f"interpreter check {flag}").splitlines()


def compile_for_hopper(test_file: str, timeout: int) -> list[str]:
    """Run `test_file --compile-for-hopper` (no GPU needed: triton's bundled ptxas) and return its output lines."""
    spec = importlib.util.find_spec("triton")
    if spec is None:
        pytest.skip("triton is not installed")
    tools = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "ptxas").exists() and (tools / "cuobjdump").exists()):
        pytest.skip("this triton build ships no ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    return _run(test_file, ["--compile-for-hopper"], env, timeout, "sm_90 compile").splitlines()


def compile_sm90(kernel, constants: dict, *, label: str, options: dict, pointer_types: dict | None = None,
                 float_args: frozenset = frozenset(), aligned_ints: frozenset = frozenset()) -> None:
    """Compile `kernel` for sm_90 and print `label regs=R stack=S shared=B` read from `cuobjdump -res-usage`.

    Pointers (allocator-aligned) and the ints in `aligned_ints` carry Triton's divisible-by-16 attribute, as a real
    launch at the benchmark shapes specialises them (`tt.divisibility`); without it loads are neither vectorised
    nor pipelined and the compile would not be the one the GPU runs. A non-zero stack means register spills.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer_types = pointer_types or {}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in float_args else "i32"
        if name.endswith("_ptr") or name in aligned_ints:
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    assert registers and stack, usage
    print(f"{label} regs={registers.group(1)} stack={stack.group(1)} shared={compiled.metadata.shared}", flush=True)


def assert_no_spills(lines: list[str], expected_count: int) -> None:
    """Every compiled variant reported, each with an empty stack frame (no register spills)."""
    assert len(lines) == expected_count, lines
    spilling = [line for line in lines if not re.search(r" stack=0 ", line)]
    assert not spilling, "register spills on sm_90:\n" + "\n".join(spilling)
