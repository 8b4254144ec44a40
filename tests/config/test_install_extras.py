"""pyproject's extras install in one documented order: the CPU set (`all`, what CI installs) and the GPU set
(`gpu`) each bring exactly one FAISS build, flash-attn (a source build needing torch) is no extra, and the Python
and transformers floors match what the code uses (`from_pretrained(dtype=...)`, transformers 4.56) and what SGLang
pins (Python 3.11)."""
from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
EXTRAS = PROJECT["optional-dependencies"]


def closure(extra: str) -> set[str]:
    """Distribution names an extra installs, with `stepsearch[a,b]` references expanded."""
    names = set()
    for requirement in EXTRAS[extra]:
        inner = re.fullmatch(r"stepsearch\[(.+)\]", requirement)
        if inner:
            for name in inner.group(1).split(","):
                names |= closure(name.strip())
        else:
            names.add(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower())
    return names


def test_each_set_brings_exactly_one_faiss_build():
    assert "faiss-cpu" in closure("all") and "faiss-gpu" not in closure("all")
    assert "faiss-gpu" in closure("gpu") and "faiss-cpu" not in closure("gpu")
    for extra in EXTRAS:
        assert not {"faiss-cpu", "faiss-gpu"} <= closure(extra), extra


def test_flash_attn_is_no_extra_and_the_docs_give_the_order():
    for extra in EXTRAS:
        assert not any(name.startswith("flash-attn") for name in closure(extra)), extra
    guide = (ROOT / "docs" / "gpu.md").read_text(encoding="utf-8")
    steps = [guide.index(marker) for marker in ('pip install "sglang', 'pip install -e ".[gpu]"',
                                                "pip install --no-build-isolation")]
    assert steps == sorted(steps)
    assert ".[all,gpu]" not in guide and ".[all,gpu]" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_python_and_transformers_floors():
    assert PROJECT["requires-python"] == ">=3.11"
    floors = [re.fullmatch(r"transformers>=(\d+)\.(\d+)", r) for extra in EXTRAS.values() for r in extra
              if r.startswith("transformers")]
    assert floors and all(match and (int(match[1]), int(match[2])) >= (4, 56) for match in floors)
    sglang = [r for r in EXTRAS["sglang"] if r.startswith("sglang")]
    assert sglang == ["sglang>=0.5"]
