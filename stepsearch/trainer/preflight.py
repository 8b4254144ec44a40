"""Checks of a training config against the machine, run before any set-up.

Set-up (process group, synthetic world, index, tokenizer, warm start, engines) takes tens of seconds; a mistyped
path found only at its end wastes them. `check_before_training` looks at everything a config names outside itself —
the checkpoint to resume, data files, model / tokenizer / index directories, the DeepSpeed JSON, the output
directory, the retriever and SGLang servers — and raises one `ConfigError` that names the key, the value and what
is wrong. It only reads, except that it creates the run directory (set-up would create it next).

Imports only the standard library and stepsearch.config.
"""
from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from stepsearch.config import Config, ConfigError

COMPLETE_MARKER = "COMPLETE"  # the marker stepsearch.trainer.checkpoint writes last (not imported: it needs torch)
INDEX_META_FILE = "meta.json"  # what stepsearch.retrieval.index writes into every index directory
CONNECT_TIMEOUT_S = 5.0


def check_before_training(cfg: Config) -> None:
    """Raise `ConfigError` for the first value that cannot work on this machine (see the module docstring)."""
    _check_resume(cfg.trainer.resume)
    if cfg.data.train_path is not None:
        _existing_file("data.train_path", cfg.data.train_path)
        if cfg.trainer.warm_start_fresh_names:
            raise ConfigError("trainer.warm_start_fresh_names=true: renames the synthetic world's made-up names, "
                              "so it needs the synthetic world (data.train_path unset); real names stay as they are")
    for index, path in enumerate(cfg.data.test_paths):
        _existing_file(f"data.test_paths[{index}]", path)
    for key in ("actor_path", "critic_path"):
        path = getattr(cfg.model, key)
        if path is not None:
            _existing_dir(f"model.{key}", path, required_file="config.json", what="an HF model directory")
    if cfg.model.tokenizer_path is not None:
        _existing_dir("model.tokenizer_path", cfg.model.tokenizer_path)
    if cfg.retriever.url is not None:
        _reachable("retriever.url", cfg.retriever.url)
    elif cfg.retriever.index_dir is not None:
        _existing_dir("retriever.index_dir", cfg.retriever.index_dir, required_file=INDEX_META_FILE,
                      what="an index directory (build one with `stepsearch retriever build`)")
    if cfg.retriever.encoder_path is not None and cfg.retriever.method == "dense" and cfg.retriever.url is None:
        _existing_dir("retriever.encoder_path", cfg.retriever.encoder_path)
    if cfg.rollout.engine == "sglang" and cfg.rollout.sglang_url is not None:
        _reachable("rollout.sglang_url", cfg.rollout.sglang_url)
    if cfg.deepspeed.config_path is not None:
        _json_object_file("deepspeed.config_path", cfg.deepspeed.config_path)
    _writable_run_dir(cfg.trainer.run_dir)


def _check_resume(resume: str) -> None:
    if resume in ("auto", "never"):
        return
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"trainer.resume={resume!r}: not 'auto', 'never' or an existing checkpoint directory")
    if not (path / COMPLETE_MARKER).is_file():
        raise ConfigError(f"trainer.resume={resume!r}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")


def _existing_file(key: str, value: str) -> None:
    path = Path(value)
    if path.is_dir():
        raise ConfigError(f"{key}={value}: is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"{key}={value}: no such file")


def _existing_dir(key: str, value: str, required_file: str | None = None, what: str = "a directory") -> None:
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"{key}={value}: no such directory")
    if required_file is not None and not (path / required_file).is_file():
        raise ConfigError(f"{key}={value}: no {required_file}, so not {what}")


def _json_object_file(key: str, value: str) -> None:
    _existing_file(key, value)
    try:
        content = json.loads(Path(value).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{key}={value}: not a readable JSON file ({err})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{key}={value}: expected a JSON object of DeepSpeed settings")


def _writable_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise ConfigError(f"trainer.output_dir / run_name: cannot write {run_dir} ({err.strerror or err})") from None


def _reachable(key: str, url: str) -> None:
    """A TCP connection to the server's host and port (no request: any HTTP server that listens passes)."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise ConfigError(f"{key}={url}: {err}") from None
    if not parts.hostname:
        raise ConfigError(f"{key}={url}: no host name")
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"{key}={url}: cannot connect to {parts.hostname}:{port} ({err.strerror or err}); "
                          f"is the server running?") from None
