"""`model.attn_implementation: auto` asks transformers for FlashAttention-2 only when FA2's own entry point exists
and transformers accepts the distribution; a bare `flash_attn` package (flash-attn-4, which SGLang installs) means
SDPA. The choice and its reason are logged."""
from __future__ import annotations

import importlib.machinery
import logging
import sys
import types

import pytest
import torch
import transformers.utils

from stepsearch.models.actor_critic import flash_attention_2_status, resolve_attn_implementation

CUDA = torch.device("cuda", 0)


def install_flash_attn(monkeypatch, *, fa2: bool) -> None:
    """A fake `flash_attn` package: FA4's layout (only `flash_attn.cute`) or FA2's (top-level entry points)."""
    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    package.__path__ = []
    package.cute = types.ModuleType("flash_attn.cute")
    if fa2:
        package.flash_attn_func = package.flash_attn_varlen_func = lambda *args, **kwargs: None
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", package.cute)


def test_flash_attn_4_alone_means_sdpa_and_says_why(monkeypatch, caplog):
    install_flash_attn(monkeypatch, fa2=False)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="stepsearch.models"):
        assert resolve_attn_implementation("auto", CUDA, torch.bfloat16) == "sdpa"
    assert "auto: sdpa (no FlashAttention-2 entry point" in caplog.text


def test_fa2_entry_point_accepted_by_transformers_means_flash_attention_2(monkeypatch, caplog):
    install_flash_attn(monkeypatch, fa2=True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="stepsearch.models"):
        assert resolve_attn_implementation("auto", CUDA, torch.bfloat16) == "flash_attention_2"
    assert "auto: flash_attention_2" in caplog.text


@pytest.mark.parametrize("device, dtype, accepted, expected_reason", [
    (CUDA, torch.bfloat16, False, "transformers does not accept"),
    (CUDA, torch.float32, True, "needs a 16-bit dtype"),
    (torch.device("cpu"), torch.bfloat16, True, "is not a GPU"),
])
def test_other_cases_fall_back_to_sdpa(monkeypatch, caplog, device, dtype, accepted, expected_reason):
    install_flash_attn(monkeypatch, fa2=True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: accepted)
    with caplog.at_level(logging.INFO, logger="stepsearch.models"):
        assert resolve_attn_implementation("auto", device, dtype) == "sdpa"
    assert expected_reason in caplog.text


def test_an_explicit_choice_is_kept_and_a_missing_flash_attn_is_reported(monkeypatch):
    assert resolve_attn_implementation("eager", CUDA, torch.bfloat16) == "eager"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    available, reason = flash_attention_2_status()
    assert not available and "no FlashAttention-2 entry point" in reason
    assert resolve_attn_implementation("auto", CUDA, torch.bfloat16) == "sdpa"
