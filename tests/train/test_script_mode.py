"""`deepspeed stepsearch/train.py` runs train.py as a file. With a non-editable install (a wheel installed with
--target here) and a checkout that has no build of its own, it imports the installed package, whose
`stepsearch.kernels` the build mapped from the top-level kernels/; from a checkout built in place it imports that
checkout, with its kernels/ as `stepsearch.kernels`."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import importlib.util, os, runpy, sys
train = sys.argv[1]
sys.path[0] = os.path.dirname(train)  # what `python stepsearch/train.py` puts first
sys.argv = [train, "--help"]
try:
    runpy.run_path(train, run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
import stepsearch
print(stepsearch.__file__)
print(importlib.util.find_spec("stepsearch.kernels").origin)
"""


@pytest.mark.slow
def test_train_py_as_a_file_finds_the_kernels_of_a_non_editable_install(tmp_path):
    if importlib.util.find_spec("pybind11") is None:
        pytest.skip("building the wheel offline needs pybind11 installed (--no-build-isolation)")
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO_ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
        ],
        check=True,
        timeout=900,
    )
    wheel = next(wheels.glob("stepsearch-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")

    def run(train: Path) -> tuple[Path, Path]:
        result = subprocess.run(
            [sys.executable, str(probe), str(train)],
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(site)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        package, kernels = result.stdout.strip().splitlines()[-2:]
        return Path(package), Path(kernels)

    bare = tmp_path / "checkout" / "stepsearch"  # a checkout without a build: only the file itself
    bare.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "stepsearch" / "train.py", bare / "train.py")
    installed = site / "stepsearch"
    assert run(bare / "train.py") == (installed / "__init__.py", installed / "kernels" / "__init__.py")
    if any((REPO_ROOT / "stepsearch").glob("_segmenter*")):  # this checkout is built in place (pip install -e)
        assert run(REPO_ROOT / "stepsearch" / "train.py") == (
            REPO_ROOT / "stepsearch" / "__init__.py",
            REPO_ROOT / "kernels" / "__init__.py",
        )
