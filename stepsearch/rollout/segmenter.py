"""Tokenizer-aware step segmenter: agent tags, step ends, loss masks, queries and answers from token ids.

Peers find where a `</search>` ended by decoding, running a regex and re-tokenizing prefixes, which breaks when a
prefix tokenizes differently from the sampled tokens. Here the tags are found in the *byte stream of the sampled
token ids*: every token id maps to the bytes it contributes (a `TagTable`, built once per tokenizer), and a tag is
found even when it is split across tokens or fused with text inside one token. Two implementations give identical
results: the C++ extension `stepsearch._segmenter` (`impl="cpp"`, GIL released over a batch), which every caller
uses, and the readable Python reference below (`impl="python"`), which is the specification and the test oracle.

Byte stream of a sequence: the concatenation of its tokens' bytes (`TagTable.stream`). How token bytes are
reconstructed, per tokenizer family (`TagTable.from_tokenizer`):
- byte-level BPE (GPT-2, Qwen, Llama 3): each character of the token string maps back through GPT-2's
  byte-to-unicode table, so the stream is exactly the bytes the model emitted (possibly invalid UTF-8).
- WordPiece (BERT): a token starting with the continuation prefix (`##`) contributes the rest of its string; any
  other token contributes a space and its string, except at position 0 of a sequence, where the space is dropped.
  This is `decoders.WordPiece` without clean-up (no space removal before punctuation), except that a sequence
  starting with a `##` piece loses its `##` too. Word boundaries become single spaces; if the pre-tokenizer
  splits punctuation, a tag is only seen when it is an added token.
- SentencePiece / Metaspace (T5, Llama 2, Mistral): `▁` becomes a space; the first token of a sequence drops one
  leading space when the decoder strips it (Metaspace with a prepend scheme, or a `Strip` decoder).
- byte-fallback tokens `<0xNN>` (when the model or decoder uses byte fallback) are the single byte NN.
- added tokens and special tokens contribute their literal content (with `skip_special_tokens=True`, special
  tokens contribute nothing); ids the tokenizer does not define contribute nothing.

Semantics of one sequence (`Segmentation`), on that stream:
- tags: every occurrence of the eight tags `<think> </think> <search> </search> <information> </information>
  <answer> </answer>`, in order, with the tokens holding the tag's first and last byte (inclusive) and its bytes
  [start_byte, end_byte). Tags cannot overlap (each holds a single `<`).
- information blocks, span rule (`inserted` given; what the trainer and evaluation use): the agent loop passes the
  token ranges [start, end) it inserted ("\\n<information>…</information>\\n", notices included); those are the
  information blocks. loss_mask is 0 exactly on them (the newlines around each block included) and 1 on every
  generated token, even one that writes an information tag itself. Tags whose first token lies in a block are data
  (a retrieved document that quotes a tag changes nothing).
- information blocks, text rule (`inserted` is None, for token ids of unknown origin): an `<information>` opens a
  block that the next `</information>` closes; a block never closed runs to the end of the sequence. Inside a
  block only `</information>` is a tag. loss_mask is 0 on every token overlapping a block, tags included, and on a
  token made only of ASCII whitespace right before or right after it (the newlines the agent loop inserts around
  a block); 1 elsewhere.
- search blocks (outside information blocks): a `</search>` pairs with the last `<search>` before it when no
  `</search>` and no information block lies between them; `queries` holds the content of every such pair.
- steps: span rule: an inserted block that starts right after the token completing a `</search>`; text rule: a
  `</search>` whose next tag is `<information>` with only ASCII whitespace between them. `step_ends` holds the
  token completing that `</search>` and `step_query_index` its query (-1 when unpaired) — the agent loop's
  steps, notices included.
- answer and format, from the answer tags outside information blocks (so never from a retrieved document): a block
  is an `<answer>` whose next answer tag is an `</answer>`; `answer` is the last block's content (None without a
  block); `valid_format` is True when that content is not empty after stripping and only whitespace (Python's
  `str.isspace`) follows the block in the stream. An empty `<answer></answer>` is therefore an invalid format: it
  cannot dodge a format penalty. A table built with `skip_special_tokens=True` (as the agent loop's is) lets an
  end-of-sequence token follow the answer.
- strings are decoded as UTF-8 with replacement and stripped (`str.strip`). Empty sequences, garbage bytes,
  invalid UTF-8, unclosed and nested tags all give results by these rules; nothing raises except token ids
  outside the table or malformed spans (ValueError naming the sequence and index).

The trainer, the rewards and evaluation read only the C++ results (through `stepsearch.rollout.agent_loop`); the
Python reference is the specification and the tests' oracle.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

TAG_NAMES = ("<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>",
             "</answer>")
_TAG_KIND = {name: kind for kind, name in enumerate(TAG_NAMES)}
_TAG_PATTERN = re.compile(rb"</?(?:think|search|information|answer)>")
_ASCII_WHITESPACE = b" \t\n\r\v\f"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
IMPLEMENTATIONS = ("cpp", "python")


class TagSpan(NamedTuple):
    """One tag occurrence: `name` (e.g. "</search>"), tokens holding its first and last byte, bytes [start, end)."""

    name: str
    start_token: int
    end_token: int
    start_byte: int
    end_byte: int


@dataclass(eq=False)
class Segmentation:
    """Segmentation of one sequence of T tokens (rules in the module docstring)."""

    tags: list[TagSpan]
    step_ends: list[int]  # (S,) token completing each step's `</search>`
    step_query_index: list[int]  # (S,) index into `queries` of each step's query, -1 for an unpaired `</search>`
    queries: list[str]
    answer: str | None
    valid_format: bool
    loss_mask: np.ndarray  # (T,) uint8
    num_bytes: int

    @property
    def step_queries(self) -> list[str]:
        """(S,) each step's query ("" for an unpaired `</search>`)."""
        return [self.queries[index] if index >= 0 else "" for index in self.step_query_index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segmentation):
            return NotImplemented
        return (self.tags == other.tags and self.step_ends == other.step_ends
                and self.step_query_index == other.step_query_index and self.queries == other.queries
                and self.answer == other.answer and self.valid_format == other.valid_format
                and self.num_bytes == other.num_bytes and np.array_equal(self.loss_mask, other.loss_mask))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {byte: chr(character) for byte, character in zip(printable, characters)}


_BYTE_DECODER = {character: byte for byte, character in _bytes_to_unicode().items()}


def _flatten(component: dict | None, key: str) -> list[dict]:
    if component is None:
        return []
    if component.get("type") == "Sequence":
        return [part for child in component.get(key, []) for part in _flatten(child, key)]
    return [component]


@dataclass
class _DecodingRules:
    """How one vocabulary token string becomes bytes (module docstring, "Byte stream")."""

    byte_level: bool = False
    continuation_prefix: str | None = None
    space_replacement: str | None = None
    word_suffix: str | None = None
    strip_first_space: bool = False
    byte_fallback: bool = False

    @classmethod
    def from_spec(cls, spec: dict) -> "_DecodingRules":
        decoders = _flatten(spec.get("decoder"), "decoders")
        pre_tokenizers = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
        model = spec.get("model") or {}
        types = {decoder.get("type") for decoder in decoders}
        rules = cls(byte_fallback=bool(model.get("byte_fallback")) or "ByteFallback" in types)
        if "ByteLevel" in types or (not decoders and any(p.get("type") == "ByteLevel" for p in pre_tokenizers)):
            rules.byte_level = True
            return rules
        for decoder in decoders:
            kind = decoder.get("type")
            if kind == "WordPiece":
                rules.continuation_prefix = decoder.get("prefix", "##")
            elif kind == "Metaspace":
                rules.space_replacement = decoder.get("replacement", "▁")
                scheme = decoder.get("prepend_scheme", "always" if decoder.get("add_prefix_space", True) else "never")
                rules.strip_first_space = scheme != "never"
            elif kind == "Replace" and decoder.get("content") == " " and "String" in (decoder.get("pattern") or {}):
                rules.space_replacement = decoder["pattern"]["String"]
            elif kind == "Strip" and decoder.get("content") == " " and decoder.get("start", 0) > 0:
                rules.strip_first_space = True
            elif kind == "BPEDecoder":
                rules.word_suffix = decoder.get("suffix", "</w>")
        if rules.continuation_prefix is None and not decoders and model.get("type") == "WordPiece":
            rules.continuation_prefix = model.get("continuing_subword_prefix") or "##"
        return rules

    def token_bytes(self, token: str) -> tuple[bytes, bool]:
        """(bytes, drop the leading space at position 0) of a vocabulary token string."""
        fallback = _BYTE_FALLBACK.fullmatch(token) if self.byte_fallback else None
        if fallback is not None:
            data = bytes([int(fallback.group(1), 16)])
            return data, self.strip_first_space and data == b" "
        if self.byte_level:
            if all(character in _BYTE_DECODER for character in token):
                return bytes(_BYTE_DECODER[character] for character in token), False
            return token.encode("utf-8"), False  # not a byte-level string: kept as text, like the HF decoder
        if self.continuation_prefix is not None:
            if token.startswith(self.continuation_prefix):
                return token[len(self.continuation_prefix):].encode("utf-8"), False
            return b" " + token.encode("utf-8"), True
        text = token
        if self.space_replacement:
            text = text.replace(self.space_replacement, " ")
        if self.word_suffix:
            text = text.replace(self.word_suffix, " ")
        data = text.encode("utf-8")
        return data, self.strip_first_space and data.startswith(b" ")


class TagTable:
    """Token id -> bytes, with per-token "drop the leading space at position 0 of a sequence" flags.

    Build it once per tokenizer with `from_tokenizer`, or directly from `token_bytes` (index = token id).
    """

    def __init__(self, token_bytes: Sequence[bytes], strip_leading_space: Sequence[bool] | None = None) -> None:
        self.token_bytes: tuple[bytes, ...] = tuple(bytes(piece) for piece in token_bytes)
        flags = [False] * len(self.token_bytes) if strip_leading_space is None else list(strip_leading_space)
        if len(flags) != len(self.token_bytes):
            raise ValueError(f"TagTable: {len(self.token_bytes)} tokens but {len(flags)} strip_leading_space flags")
        for token_id, (piece, strip) in enumerate(zip(self.token_bytes, flags)):
            if strip and not piece.startswith(b" "):
                raise ValueError(f"TagTable: token {token_id} ({piece!r}) is flagged to drop a leading space but "
                                 "does not start with one")
        self.strip_leading_space: tuple[bool, ...] = tuple(bool(flag) for flag in flags)
        self._native: Any = None

    def __len__(self) -> int:
        return len(self.token_bytes)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, skip_special_tokens: bool = False,
                       vocab_size: int | None = None) -> "TagTable":
        """Table of a `tokenizers.Tokenizer` or a transformers tokenizer backed by one (all fast tokenizers).

        `skip_special_tokens`: special tokens contribute no bytes (e.g. so an end-of-sequence token does not
        break the answer format). `vocab_size`: pad the table with empty tokens up to the model's embedding
        size, which is often larger than the tokenizer's vocabulary.
        """
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not (hasattr(backend, "to_str") and hasattr(backend, "get_vocab")
                and hasattr(backend, "get_added_tokens_decoder")):
            raise TypeError(f"TagTable.from_tokenizer needs a `tokenizers.Tokenizer` or a transformers tokenizer with "
                            f"a `backend_tokenizer`; got {type(tokenizer).__name__}. Build TagTable(token_bytes) "
                            "from the token id -> bytes mapping instead.")
        rules = _DecodingRules.from_spec(json.loads(backend.to_str()))
        vocabulary: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        size = max(vocabulary.values(), default=-1) + 1
        if vocab_size is not None:
            if vocab_size < size:
                raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's largest id + 1 ({size})")
            size = vocab_size
        token_bytes = [b""] * size
        strips = [False] * size
        for token, token_id in vocabulary.items():
            if token_id in added:
                special = added[token_id].special
                token_bytes[token_id] = b"" if (special and skip_special_tokens) else added[token_id].content.encode()
            else:
                token_bytes[token_id], strips[token_id] = rules.token_bytes(token)
        return cls(token_bytes, strips)

    def stream(self, token_ids: Sequence[int]) -> bytes:
        """The byte stream of one sequence (ids must be in range)."""
        return b"".join(self._piece(token_id, index) for index, token_id in enumerate(token_ids))

    def _piece(self, token_id: int, index: int) -> bytes:
        piece = self.token_bytes[token_id]
        return piece[1:] if index == 0 and self.strip_leading_space[token_id] else piece

    def native(self) -> Any:
        """The C++ `TokenTable` (built on first use)."""
        if self._native is None:
            self._native = _extension().TokenTable(list(self.token_bytes), list(self.strip_leading_space))
        return self._native


def _extension():
    try:
        extension = importlib.import_module("stepsearch._segmenter")
    except ImportError as error:
        raise ImportError("The C++ segmenter `stepsearch._segmenter` is not built: run `pip install -e .` in the "
                          "repository root (needs a C++17 compiler and pybind11), or pass impl='python'.") from error
    return extension


def _out_of_range(token_id: int, index: int, sequence: int, flat_index: int, size: int) -> ValueError:
    return ValueError(f"token id {token_id} at index {index} of sequence {sequence} (flat index {flat_index}) is "
                      f"outside the token table of {size} ids")


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


# ---------------------------------------------------------------------------------------------------------------
# Python reference (the specification; the C++ implementation must agree with it on every input).


def _whitespace_only(piece: bytes) -> bool:
    return bool(piece) and not piece.strip(_ASCII_WHITESPACE)


def segment_reference(token_ids: Sequence[int], table: TagTable, *, inserted: Sequence[tuple[int, int]] | None = None,
                      sequence_index: int = 0, flat_offset: int = 0) -> Segmentation:
    """Segment one sequence in plain Python (`sequence_index`/`flat_offset` only name positions in errors).

    `inserted`: the token ranges [start, end) the environment inserted (sorted, disjoint), or None for the text
    rule (module docstring).
    """
    token_starts: list[int] = []
    pieces: list[bytes] = []
    position = 0
    for index, token_id in enumerate(token_ids):
        token_id = int(token_id)
        if not 0 <= token_id < len(table):
            raise _out_of_range(token_id, index, sequence_index, flat_offset + index, len(table))
        piece = table._piece(token_id, index)
        token_starts.append(position)
        pieces.append(piece)
        position += len(piece)
    stream = b"".join(pieces)
    num_tokens = len(token_starts)

    def token_at(byte: int) -> int:
        # The last token starting at or before `byte` holds it: empty tokens at the same offset come earlier.
        return bisect_right(token_starts, byte) - 1

    tags = [TagSpan(match.group().decode("ascii"), token_at(match.start()), token_at(match.end() - 1),
                    match.start(), match.end()) for match in _TAG_PATTERN.finditer(stream)]

    loss_mask = np.ones(num_tokens, dtype=np.uint8)
    queries: list[str] = []
    step_ends: list[int] = []
    step_query_index: list[int] = []
    answer_tags: list[TagSpan] = []
    open_search: TagSpan | None = None

    def close_search(tag: TagSpan) -> int:
        nonlocal open_search
        if open_search is None:
            return -1
        queries.append(_text(stream[open_search.end_byte: tag.start_byte]))
        open_search = None
        return len(queries) - 1

    if inserted is not None:
        spans = list(inserted)
        for start, end in spans:
            loss_mask[start:end] = 0
        next_span = 0
        last_close: tuple[int, int] | None = None  # (end token, query index) of the latest generated `</search>`

        def enter_spans_up_to(token: int) -> None:
            nonlocal next_span, open_search, last_close
            while next_span < len(spans) and spans[next_span][0] <= token:
                span_start = spans[next_span][0]
                if last_close is not None and last_close[0] == span_start - 1:
                    step_ends.append(last_close[0])
                    step_query_index.append(last_close[1])
                last_close, open_search = None, None
                next_span += 1

        for tag in tags:
            enter_spans_up_to(tag.start_token)
            if next_span > 0 and tag.start_token < spans[next_span - 1][1]:
                continue  # inside an inserted block: retrieved text is data
            if tag.name == "<search>":
                open_search = tag
            elif tag.name == "</search>":
                last_close = (tag.end_token, close_search(tag))
            elif tag.name in ("<answer>", "</answer>"):
                answer_tags.append(tag)
        enter_spans_up_to(num_tokens)
    else:
        def mask_block(first: int, last: int) -> None:
            # The agent loop inserts "\n" on both sides of a block: a whitespace-only token next to it is part of it.
            if first > 0 and _whitespace_only(pieces[first - 1]):
                first -= 1
            if last + 1 < num_tokens and _whitespace_only(pieces[last + 1]):
                last += 1
            loss_mask[first: last + 1] = 0

        information_start: TagSpan | None = None
        for index, tag in enumerate(tags):
            if information_start is not None:
                if tag.name == "</information>":
                    mask_block(information_start.start_token, tag.end_token)
                    information_start = None
                continue
            if tag.name == "<information>":
                information_start = tag
                open_search = None
            elif tag.name == "<search>":
                open_search = tag
            elif tag.name == "</search>":
                query_index = close_search(tag)
                following = tags[index + 1] if index + 1 < len(tags) else None
                if (following is not None and following.name == "<information>"
                        and not stream[tag.end_byte: following.start_byte].strip(_ASCII_WHITESPACE)):
                    step_ends.append(tag.end_token)
                    step_query_index.append(query_index)
            elif tag.name in ("<answer>", "</answer>"):
                answer_tags.append(tag)
        if information_start is not None:
            mask_block(information_start.start_token, num_tokens - 1)

    blocks = [(opening, closing) for opening, closing in zip(answer_tags, answer_tags[1:])
              if opening.name == "<answer>" and closing.name == "</answer>"]
    answer = None
    valid_format = False
    if blocks:
        opening, closing = blocks[-1]
        answer = _text(stream[opening.end_byte: closing.start_byte])
        valid_format = answer != "" and stream[closing.end_byte:].decode("utf-8", errors="replace").strip() == ""
    return Segmentation(tags=tags, step_ends=step_ends, step_query_index=step_query_index, queries=queries,
                        answer=answer, valid_format=valid_format, loss_mask=loss_mask, num_bytes=len(stream))


# ---------------------------------------------------------------------------------------------------------------
# Batches


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many acyclic objects: its generation scans, triggered by
    the allocations, otherwise cost several times the building itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(eq=False)
class BatchSegmentation(Sequence[Segmentation]):
    """Segmentations of B ragged sequences (N tokens in all), stored flat; indexing gives a `Segmentation`.

    `offsets` (B+1,): sequence b is tokens offsets[b]:offsets[b+1]. Per-sequence ranges of the flat tag, step
    and query arrays are given by `tag_offsets`, `step_offsets`, `query_offsets` (each (B+1,)).
    """

    offsets: np.ndarray  # (B+1,) int64
    loss_mask: np.ndarray  # (N,) uint8
    valid_format: np.ndarray  # (B,) bool
    num_bytes: np.ndarray  # (B,) int64
    tag_kind: np.ndarray  # (total tags,) uint8, index into TAG_NAMES
    tag_start_token: np.ndarray  # (total tags,) int64, within the sequence
    tag_end_token: np.ndarray
    tag_start_byte: np.ndarray
    tag_end_byte: np.ndarray
    tag_offsets: np.ndarray  # (B+1,) int64
    step_ends: np.ndarray  # (total steps,) int64, within the sequence
    step_query: np.ndarray  # (total steps,) int64, index into the sequence's queries, -1 when unpaired
    step_offsets: np.ndarray  # (B+1,) int64
    queries: list[str]  # all sequences' queries, flat
    query_offsets: np.ndarray  # (B+1,) int64
    answers: list[str | None]  # (B,)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for a batch of {len(self)}")
        b = index % len(self)
        # Python lists are built once per batch, so materialising every sequence costs list slices only.
        tags, step_ends, step_query = self._lists
        tag_offsets, step_offsets, query_offsets = self._offset_lists
        queries = self.queries[query_offsets[b]: query_offsets[b + 1]]
        return Segmentation(tags=tags[tag_offsets[b]: tag_offsets[b + 1]],
                            step_ends=step_ends[step_offsets[b]: step_offsets[b + 1]],
                            step_query_index=step_query[step_offsets[b]: step_offsets[b + 1]],
                            queries=queries, answer=self.answers[b], valid_format=bool(self.valid_format[b]),
                            loss_mask=self.loss_mask[self.offsets[b]: self.offsets[b + 1]],
                            num_bytes=int(self.num_bytes[b]))

    @functools.cached_property
    def _lists(self) -> tuple[list[TagSpan], list[int], list[int]]:
        with _gc_paused():
            names = [TAG_NAMES[kind] for kind in self.tag_kind.tolist()]
            tags = list(map(TagSpan._make, zip(names, self.tag_start_token.tolist(), self.tag_end_token.tolist(),
                                               self.tag_start_byte.tolist(), self.tag_end_byte.tolist())))
            return tags, self.step_ends.tolist(), self.step_query.tolist()

    @functools.cached_property
    def _offset_lists(self) -> tuple[list[int], list[int], list[int]]:
        return self.tag_offsets.tolist(), self.step_offsets.tolist(), self.query_offsets.tolist()

    def __iter__(self) -> Iterator[Segmentation]:
        return iter(self.to_list())

    def to_list(self) -> list[Segmentation]:
        """Every sequence's `Segmentation`."""
        with _gc_paused():
            return [self[b] for b in range(len(self))]

    def padded_loss_mask(self, length: int | None = None) -> np.ndarray:
        """(B, T) uint8 loss mask, right-padded with 0 to T = `length` (default: the longest sequence)."""
        lengths = np.diff(self.offsets)
        width = int(lengths.max(initial=0)) if length is None else length
        if lengths.size and lengths.max() > width:
            raise ValueError(f"length={width} is shorter than the longest sequence ({int(lengths.max())} tokens)")
        out = np.zeros((len(self), width), dtype=np.uint8)
        rows = np.repeat(np.arange(len(self)), lengths)
        columns = np.arange(len(self.loss_mask)) - np.repeat(self.offsets[:-1], lengths)
        out[rows, columns] = self.loss_mask
        return out

    def padded_step_ends(self, num_steps: int | None = None) -> np.ndarray:
        """(B, S) int64 step ends, -1 padded to S = `num_steps` (default: the most steps of any sequence)."""
        counts = np.diff(self.step_offsets)
        width = int(counts.max(initial=0)) if num_steps is None else num_steps
        if counts.size and counts.max() > width:
            raise ValueError(f"num_steps={width} is fewer than the most steps of a sequence ({int(counts.max())})")
        out = np.full((len(self), width), -1, dtype=np.int64)
        rows = np.repeat(np.arange(len(self)), counts)
        columns = np.arange(len(self.step_ends)) - np.repeat(self.step_offsets[:-1], counts)
        out[rows, columns] = self.step_ends
        return out

    @classmethod
    def from_segmentations(cls, segmentations: Sequence[Segmentation]) -> "BatchSegmentation":
        """Flat batch from per-sequence results (used by the Python implementation)."""
        def offsets_of(counts: list[int]) -> np.ndarray:
            return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

        tags = [tag for segmentation in segmentations for tag in segmentation.tags]
        return cls(
            offsets=offsets_of([len(s.loss_mask) for s in segmentations]),
            loss_mask=np.concatenate([s.loss_mask for s in segmentations]).astype(np.uint8)
            if segmentations else np.zeros(0, dtype=np.uint8),
            valid_format=np.array([s.valid_format for s in segmentations], dtype=bool),
            num_bytes=np.array([s.num_bytes for s in segmentations], dtype=np.int64),
            tag_kind=np.array([_TAG_KIND[tag.name] for tag in tags], dtype=np.uint8),
            tag_start_token=np.array([tag.start_token for tag in tags], dtype=np.int64),
            tag_end_token=np.array([tag.end_token for tag in tags], dtype=np.int64),
            tag_start_byte=np.array([tag.start_byte for tag in tags], dtype=np.int64),
            tag_end_byte=np.array([tag.end_byte for tag in tags], dtype=np.int64),
            tag_offsets=offsets_of([len(s.tags) for s in segmentations]),
            step_ends=np.array([end for s in segmentations for end in s.step_ends], dtype=np.int64),
            step_query=np.array([q for s in segmentations for q in s.step_query_index], dtype=np.int64),
            step_offsets=offsets_of([len(s.step_ends) for s in segmentations]),
            queries=[query for s in segmentations for query in s.queries],
            query_offsets=offsets_of([len(s.queries) for s in segmentations]),
            answers=[s.answer for s in segmentations],
        )


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def _check_impl(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _as_ids(sequence: Any, name: str) -> np.ndarray:
    ids = np.asarray(sequence)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    return ids


def _flat_batch(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(batch, tuple):
        if len(batch) != 2:
            raise ValueError(f"a tuple batch must be (flat_ids, offsets), got {len(batch)} items")
        flat = _as_ids(batch[0], "flat_ids")
        offsets = _as_ids(batch[1], "offsets").astype(np.int64, copy=False)
        if offsets.size == 0:
            raise ValueError("offsets must hold at least one entry (offsets[0] == 0)")
        return flat, np.ascontiguousarray(offsets)
    sequences = [_as_ids(sequence, f"sequence {index}") for index, sequence in enumerate(batch)]
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in sequences], out=offsets[1:])
    flat = np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.int64)
    return flat, offsets


def _checked_int32(flat: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """`flat` as contiguous int32; ids of a wider dtype are range-checked first so the cast cannot wrap."""
    if flat.dtype != np.int32:
        bad = np.flatnonzero((flat < 0) | (flat >= size))
        if bad.size:
            flat_index = int(bad[0])
            sequence = int(np.searchsorted(offsets, flat_index, side="right")) - 1
            raise _out_of_range(int(flat[flat_index]), flat_index - int(offsets[sequence]), sequence, flat_index, size)
        flat = flat.astype(np.int32)
    return np.ascontiguousarray(flat)


def _flat_spans(inserted: Sequence[Sequence[tuple[int, int]]], offsets: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inserted spans of every sequence as flat (starts, ends, span_offsets) int64 arrays, checked."""
    num_sequences = len(offsets) - 1
    if len(inserted) != num_sequences:
        raise ValueError(f"inserted must hold one span list per sequence: {len(inserted)} lists for "
                         f"{num_sequences} sequences")
    starts: list[int] = []
    ends: list[int] = []
    span_offsets = np.zeros(num_sequences + 1, dtype=np.int64)
    for b, spans in enumerate(inserted):
        length = int(offsets[b + 1] - offsets[b])
        previous_end = 0
        for k, (start, end) in enumerate(spans):
            start, end = int(start), int(end)
            if not previous_end <= start < end <= length:
                raise ValueError(f"inserted span {k} of sequence {b} is [{start}, {end}): spans must be non-empty, "
                                 f"sorted, disjoint and inside the sequence's {length} tokens")
            starts.append(start)
            ends.append(end)
            previous_end = end
        span_offsets[b + 1] = len(starts)
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64), span_offsets


def segment_batch(batch: Any, table: TagTable, impl: str = "cpp",
                  inserted: Sequence[Sequence[tuple[int, int]]] | None = None) -> BatchSegmentation:
    """Segment many sequences: `batch` is a list of 1-D id sequences (lists, numpy arrays, CPU tensors) or a
    tuple `(flat_ids, offsets)` of numpy arrays, sequence b being flat_ids[offsets[b]:offsets[b+1]] (int32 ids and
    int64 offsets are used without a copy).

    `inserted[b]`: the token ranges [start, end) the environment inserted into sequence b (sorted, disjoint); with
    it the span rule applies, without it (None) the text rule (module docstring). `impl="cpp"` runs the C++
    extension with the GIL released; `impl="python"` the reference. Raises ValueError for an id outside the table
    or a malformed span, naming the sequence and index.
    """
    _check_impl(impl)
    flat, offsets = _flat_batch(batch)
    if impl == "python":
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(flat):
            raise ValueError(f"offsets must start at 0, be non-decreasing and end at the number of ids ({len(flat)})")
        if inserted is not None:
            _flat_spans(inserted, offsets)  # the same checks as the C++ path
        return BatchSegmentation.from_segmentations([
            segment_reference(flat[offsets[b]: offsets[b + 1]].tolist(), table,
                              inserted=None if inserted is None else inserted[b], sequence_index=b,
                              flat_offset=int(offsets[b]))
            for b in range(len(offsets) - 1)])
    native = table.native()
    ids = _checked_int32(flat, offsets, len(table))
    if inserted is None:
        result = _extension().segment_batch(native, ids, offsets)
    else:
        result = _extension().segment_batch(native, ids, offsets, *_flat_spans(inserted, offsets))
    return BatchSegmentation(offsets=offsets, **result)


def segment(token_ids: Any, table: TagTable, impl: str = "cpp",
            inserted: Sequence[tuple[int, int]] | None = None) -> Segmentation:
    """Segment one sequence of token ids (list, numpy array or CPU tensor) with the chosen implementation;
    `inserted` as one entry of `segment_batch`'s."""
    _check_impl(impl)
    if impl == "python":
        ids = _as_ids(token_ids, "token_ids")
        if inserted is not None:
            _flat_spans([inserted], np.array([0, len(ids)], dtype=np.int64))
        return segment_reference(ids.tolist(), table, inserted=inserted)
    return segment_batch([token_ids], table, impl="cpp", inserted=None if inserted is None else [inserted])[0]
