"""`deepspeed stepsearch/train.py` runs train.py as a file: it must import the installed package, whose
`stepsearch.kernels` the build maps from the top-level kernels/ (a non-editable install here, from a wheel)."""
from __future__ import annotations

import importlib.util
import os
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
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, timeout=900)
    wheel = next(wheels.glob("stepsearch-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    result = subprocess.run([sys.executable, str(probe), str(REPO_ROOT / "stepsearch" / "train.py")],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    package, kernels = result.stdout.strip().splitlines()[-2:]
    assert Path(package) == site / "stepsearch" / "__init__.py"
    assert Path(kernels) == site / "stepsearch" / "kernels" / "__init__.py"
