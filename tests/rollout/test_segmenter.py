"""Step segmenter: C++ and the Python reference agree on texts tokenized by real tokenizers (byte-level BPE, WordPiece,
Metaspace with byte fallback) with tags split in every way; hand cases pin each rule of the module docstring (text
rule and span rule); the answer and format match a regex oracle of the rule on the text."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepsearch.rollout.render import INFORMATION_PREFIX, INFORMATION_SUFFIX
from stepsearch.rollout.segmenter import (
    TAG_NAMES,
    BatchSegmentation,
    TagSpan,
    TagTable,
    segment,
    segment_batch,
    segment_reference,
)

IMPLS = ["cpp", "python"]
WORDS = ["river", "town", "founded", "who", "Brennick", "Mara", "Vell", "lake", "the", "of", "born", "1802", "café",
         "naïve", "東京", "search", "answer", "think", "information"]
PUNCTUATION = [".", ",", "?", "(", ")", "'", "-"]
FRAGMENTS = list(TAG_NAMES) + ["<", ">", "/", "</", "<sea", "rch>", "<informat", "ion>", "<ans", "wer>", " ", "\n",
                               "  ", "\t", "\u3000", "🙂"] + WORDS + PUNCTUATION
HYPOTHESIS = settings(max_examples=150, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_INFORMATION_BLOCK = re.compile(r"<information>.*?(?:</information>|\Z)", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.DOTALL)


def oracle_answer_and_format(text: str) -> tuple[str | None, bool]:
    """The answer rule on text (test oracle): information blocks are data (replaced by a non-blank mark), the
    answer is the last innermost block, the format is valid when it is non-empty and only whitespace follows."""
    outside = _INFORMATION_BLOCK.sub("#", text)
    blocks = list(_ANSWER_BLOCK.finditer(outside))
    if not blocks:
        return None, False
    answer = blocks[-1].group(1).strip()
    return answer, answer != "" and outside[blocks[-1].end():].strip() == ""


def _corpus() -> list[str]:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(600):
        words = [str(rng.choice(WORDS)) for _ in range(rng.integers(3, 12))]
        lines.append(f"<think>{' '.join(words[:3])}</think>\n<search>{' '.join(words[3:])}</search>"
                     f"{INFORMATION_PREFIX}Doc 1(Title: {words[0]}) {' '.join(words)}.{INFORMATION_SUFFIX}"
                     f"<answer>{words[-1]}</answer>")
    return lines


@pytest.fixture(scope="session")
def byte_level_bpe():
    """GPT-2-style byte-level BPE without tag tokens: tags are split across tokens and fused with text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


@pytest.fixture(scope="session")
def wordpiece():
    """WordPiece splitting on whitespace only, so tags become `##` pieces inside words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)
    alphabet = sorted(set("".join(FRAGMENTS)) - set(" \n\t\u3000"))
    trainer = trainers.WordPieceTrainer(vocab_size=700, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                        initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


@pytest.fixture(scope="session")
def metaspace_byte_fallback():
    """Llama-2-style: Metaspace pieces, `<0xNN>` byte fallback, decoder Replace/ByteFallback/Fuse/Strip."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    pieces = ["<unk>", "<s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    characters = sorted(set("".join(FRAGMENTS)) - set(" \n\t\u3000🙂"))
    pieces += characters + ["▁"] + ["▁" + character for character in characters]
    tokenizer = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[],
                                     unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<s>"])
    return tokenizer


@pytest.fixture(scope="session", params=["byte_level_bpe", "wordpiece", "metaspace_byte_fallback"])
def tokenizer_and_table(request):
    tokenizer = request.getfixturevalue(request.param)
    return tokenizer, TagTable.from_tokenizer(tokenizer)


texts = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)


def _split_encode(tokenizer, text: str, cuts: list[int]) -> list[int]:
    """Ids of `text` encoded in pieces cut at `cuts`: a valid but non-canonical tokenization, like sampled ids."""
    bounds = [0] + sorted({min(cut, len(text)) for cut in cuts}) + [len(text)]
    ids: list[int] = []
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            ids += tokenizer.encode(text[start:end], add_special_tokens=False).ids
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Property tests: the two implementations agree; the byte stream is the text.


@HYPOTHESIS
@given(text=texts, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_cpp_and_python_agree_on_tokenized_texts(tokenizer_and_table, text, cuts):
    tokenizer, table = tokenizer_and_table
    ids = _split_encode(tokenizer, text, cuts)
    assert segment(ids, table, impl="cpp") == segment(ids, table, impl="python")


@HYPOTHESIS
@given(data=st.data())
def test_cpp_and_python_agree_on_arbitrary_id_sequences(tokenizer_and_table, data):
    _, table = tokenizer_and_table
    ids = data.draw(st.lists(st.integers(0, len(table) - 1), max_size=60))
    assert segment(ids, table, impl="cpp") == segment(ids, table, impl="python")


@HYPOTHESIS
@given(text=texts, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_byte_level_stream_is_the_text_and_results_match_text_rules(byte_level_bpe, text, cuts):
    import re
    table = TagTable.from_tokenizer(byte_level_bpe)
    ids = _split_encode(byte_level_bpe, text, cuts)
    assert table.stream(ids) == text.encode()
    result = segment(ids, table)
    expected = [(m.group(), m.start(), m.end())
                for m in re.finditer("</?(?:think|search|information|answer)>", text.encode().decode("latin-1"))]
    assert [(tag.name, tag.start_byte, tag.end_byte) for tag in result.tags] == expected
    assert (result.answer, result.valid_format) == oracle_answer_and_format(text)
    for tag in result.tags:  # the tokens named hold the tag's first and last byte
        starts = np.cumsum([0] + [len(table.token_bytes[i]) for i in ids])
        assert starts[tag.start_token] <= tag.start_byte < starts[tag.start_token + 1]
        assert starts[tag.end_token] <= tag.end_byte - 1 < starts[tag.end_token + 1]


@HYPOTHESIS
@given(text=texts)
def test_wordpiece_stream_joins_words_with_single_spaces(wordpiece, text):
    table = TagTable.from_tokenizer(wordpiece)
    encoding = wordpiece.encode(text, add_special_tokens=False)
    if 0 in encoding.ids:  # [UNK]: the word's characters are not in the vocabulary
        return
    assert table.stream(encoding.ids) == " ".join(text.split()).encode()
    assert table.stream(encoding.ids).decode() == wordpiece.decode(encoding.ids)


@HYPOTHESIS
@given(text=texts)
def test_metaspace_stream_matches_the_decoder(metaspace_byte_fallback, text):
    table = TagTable.from_tokenizer(metaspace_byte_fallback)
    ids = metaspace_byte_fallback.encode(text, add_special_tokens=False).ids
    assert table.stream(ids).decode("utf-8", errors="replace") == metaspace_byte_fallback.decode(ids)


@HYPOTHESIS
@given(sequences=st.lists(st.tuples(texts, st.lists(st.integers(0, 400), max_size=4)), max_size=6))
def test_batch_flat_and_list_inputs_match_single_sequences(byte_level_bpe, sequences):
    table = TagTable.from_tokenizer(byte_level_bpe)
    batch = [_split_encode(byte_level_bpe, text, cuts) for text, cuts in sequences]
    singles = [segment(ids, table, impl="python") for ids in batch]
    offsets = np.cumsum([0] + [len(ids) for ids in batch]).astype(np.int64)
    flat = np.array([i for ids in batch for i in ids], dtype=np.int32)
    for impl in IMPLS:
        assert list(segment_batch(batch, table, impl=impl)) == singles
        assert list(segment_batch((flat, offsets), table, impl=impl)) == singles


# ---------------------------------------------------------------------------------------------------------------
# Hand cases: each rule on a table whose tokens are given pieces (ids 0..n-1 in order).


def _pieces(*pieces: str | bytes) -> tuple[list[int], TagTable]:
    data = [piece.encode() if isinstance(piece, str) else piece for piece in pieces]
    return list(range(len(data))), TagTable(data)


@pytest.mark.parametrize("impl", IMPLS)
def test_agent_rollout_shape(impl):
    ids, table = _pieces("<think>plan</think>\n<sea", "rch> Alder River", " </search>", INFORMATION_PREFIX[:5],
                         INFORMATION_PREFIX[5:] + "Doc 1(Title: x) <search>quoted</search>", INFORMATION_SUFFIX,
                         "<search>", "Brennick</search>", INFORMATION_PREFIX + "notice" + INFORMATION_SUFFIX,
                         "<answer> Mara Vell </answer>", "\n")
    result = segment(ids, table, impl=impl)
    assert result.step_ends == [2, 7]
    assert result.queries == ["Alder River", "Brennick"]
    assert result.step_queries == ["Alder River", "Brennick"]
    assert result.loss_mask.tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1]
    assert result.answer == "Mara Vell" and result.valid_format
    assert [tag.name for tag in result.tags][:4] == ["<think>", "</think>", "<search>", "</search>"]
    assert result.tags[2] == TagSpan("<search>", 0, 1, 20, 28)


@pytest.mark.parametrize("impl", IMPLS)
def test_span_rule_on_an_agent_rollout(impl):
    # The agent loop's tokens: generated pieces, and inserted blocks as separate "\n" / tag / "\n" tokens.
    ids, table = _pieces("<think>t</think><search> q1 ", "</search>", "\n", "<information>Doc 1 <answer>gold",
                         "</answer></information>", "\n", "<information>mine</information>", "<search>q2</search>",
                         INFORMATION_PREFIX + "notice" + INFORMATION_SUFFIX, "<answer> x </answer>")
    result = segment(ids, table, impl=impl, inserted=[(2, 6), (8, 9)])
    assert result.loss_mask.tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 0, 1]  # the newlines around a block included
    assert result.step_ends == [1, 7] and result.step_queries == ["q1", "q2"]
    assert result.answer == "x" and result.valid_format  # the answer block inside a retrieved document is data
    # Without the spans (text rule) the model's own "<information>" text would be masked as retrieved.
    assert segment(ids, table, impl=impl).loss_mask.tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_span_rule_step_needs_the_search_close_right_before_the_span(impl):
    ids, table = _pieces("<search>a</search>", " x", "<information>d</information>", "<search>b</search>",
                         "<information>e</information>", "<answer>y</answer>", "<information>late</information>")
    result = segment(ids, table, impl=impl, inserted=[(2, 3), (4, 5), (6, 7)])
    assert result.step_ends == [3] and result.step_queries == ["b"]
    assert result.queries == ["a", "b"]
    assert result.answer == "y" and not result.valid_format  # an inserted block after the answer


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spans", [[(0, 0)], [(2, 1)], [(0, 2), (1, 3)], [(0, 9)], [(-1, 1)]])
def test_malformed_spans_are_rejected(impl, spans):
    ids, table = _pieces("a", "b", "c")
    with pytest.raises(ValueError, match="inserted span"):
        segment(ids, table, impl=impl, inserted=spans)
    with pytest.raises(ValueError, match="one span list per sequence"):
        segment_batch([ids, ids], table, impl=impl, inserted=[spans])


@HYPOTHESIS
@given(data=st.data())
def test_cpp_and_python_agree_with_inserted_spans(tokenizer_and_table, data):
    _, table = tokenizer_and_table
    ids = data.draw(st.lists(st.integers(0, len(table) - 1), max_size=60))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(ids)), max_size=8))))
    spans = [(start, end) for start, end in zip(cuts[::2], cuts[1::2]) if start < end]
    assert segment(ids, table, impl="cpp", inserted=spans) == segment(ids, table, impl="python", inserted=spans)


@pytest.mark.parametrize("impl", IMPLS)
def test_text_rule_masks_the_newline_tokens_around_a_block(impl):
    ids, table = _pieces("<search>q</search>", "\n", "<information>d</information>", "\n", "x\n",
                         "<information>e</information>", "\n\n")
    result = segment(ids, table, impl=impl)
    assert result.loss_mask.tolist() == [1, 0, 0, 0, 1, 0, 0]
    assert result.step_ends == [0]


@pytest.mark.parametrize("impl", IMPLS)
def test_step_needs_information_next_with_only_whitespace_between(impl):
    ids, table = _pieces("<search>a</search> x <information>d</information>", "<search>b</search>",
                         "<think>", "</think><information>e</information>", "<search>c</search>  \r\n\t",
                         "<information>f</information>")
    result = segment(ids, table, impl=impl)
    assert result.queries == ["a", "b", "c"]
    assert result.step_ends == [4]
    assert result.step_query_index == [2]


@pytest.mark.parametrize("impl", IMPLS)
def test_unclosed_and_nested_tags(impl):
    ids, table = _pieces("<search>a<search>b</search>", "<information>", "<search>c</search>", "<information>",
                         "</information>", "</search>", "<information>", "never closed")
    result = segment(ids, table, impl=impl)
    assert result.queries == ["b"]
    assert result.step_ends == [0, 5]  # the unpaired `</search>` before an information block is a (notice) step
    assert result.step_query_index == [0, -1]
    assert result.loss_mask.tolist() == [1, 0, 0, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text, answer, valid", [
    ("<answer>a</answer>", "a", True),
    ("<answer> a <answer> b </answer> \n\u3000", "b", True),
    ("<answer>a</answer> then more", "a", False),
    ("<answer>a</answer></answer>", "a", False),
    ("<answer>a</answer><answer>b", "a", False),
    ("<answer>unclosed", None, False),
    ("", None, False),
    ("<answer>\xff\xfe</answer>\x85", "\ufffd\ufffd", False),
    ("<answer> \n </answer>", "", False),  # an empty answer is an invalid format
    ("<answer>a</answer><information><answer>gold</answer></information>", "a", False),  # retrieved: data
    ("<information><answer>gold</answer></information>", None, False),
])
def test_answer_and_format_follow_the_rewards_rule(impl, text, answer, valid):
    data = text.encode("latin-1") if "\xff" in text else text.encode()
    ids, table = _pieces(*[data[i:i + 3] for i in range(0, len(data), 3)])
    result = segment(ids, table, impl=impl)
    assert result.answer == answer
    assert result.valid_format is valid
    assert oracle_answer_and_format(data.decode("utf-8", errors="replace")) == (answer, valid)


@pytest.mark.parametrize("impl", IMPLS)
def test_garbage_invalid_utf8_and_empty(impl):
    ids, table = _pieces(bytes(range(256)), b"<search>\xc3(\xe2\x82</search>", b"<", b"\xf0\x9f")
    result = segment(ids, table, impl=impl)
    assert result.queries == ["\ufffd(\ufffd"]
    assert result.num_bytes == 256 + 21 + 1 + 2
    empty = segment([], table, impl=impl)
    assert empty.tags == [] and empty.loss_mask.shape == (0,) and empty.answer is None and not empty.valid_format


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_space_dropped_only_for_the_first_token(impl):
    table = TagTable([b" <answer>", b"x", b" </answer>"], [True, False, True])
    result = segment([0, 1, 2], table, impl=impl)
    assert result.tags[0].start_byte == 0 and result.num_bytes == 19
    result = segment([1, 0, 1, 2], table, impl=impl)
    assert result.tags[0].start_byte == 2 and result.answer == "x"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad, index", [([0, 1, 7], 2), ([-1], 0), (np.array([0, 2**40], dtype=np.int64), 1)])
def test_out_of_range_ids_name_the_index(impl, bad, index):
    _, table = _pieces("a", "b", "c")
    with pytest.raises(ValueError, match=rf"at index {index} of sequence 0 .*table of 3 ids"):
        segment(bad, table, impl=impl)
    with pytest.raises(ValueError, match=rf"at index {index} of sequence 1 \(flat index {index + 2}\)"):
        segment_batch([[0, 1], bad], table, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_offsets_and_inputs(impl):
    _, table = _pieces("a", "b")
    flat = np.zeros(4, dtype=np.int32)
    for offsets in ([1, 4], [0, 3, 2, 4], [0, 3]):
        with pytest.raises(ValueError, match="offsets"):
            segment_batch((flat, np.array(offsets, dtype=np.int64)), table, impl=impl)
    with pytest.raises(ValueError, match="1-D"):
        segment([[0, 1]], table, impl=impl)
    with pytest.raises(TypeError, match="integer"):
        segment([0.5], table, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        segment([0], table, impl="rust")


def test_batch_padding_helpers():
    ids, table = _pieces("<search>q</search>", "<information>", "d", "</information>", "x")
    batch = segment_batch([ids, [4], ids[:2], []], table)
    assert isinstance(batch, BatchSegmentation) and len(batch) == 4
    assert batch.padded_loss_mask().tolist() == [[1, 0, 0, 0, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5]
    assert batch.padded_step_ends(num_steps=2).tolist() == [[0, -1], [-1, -1], [0, -1], [-1, -1]]
    assert batch[-1] == batch[3] and batch[1:3] == [batch[1], batch[2]]
    with pytest.raises(ValueError, match="longest"):
        batch.padded_loss_mask(length=2)
    with pytest.raises(IndexError):
        batch[4]


def test_missing_extension_says_how_to_build(monkeypatch):
    _, table = _pieces("a")
    monkeypatch.setitem(sys.modules, "stepsearch._segmenter", None)
    with pytest.raises(ImportError, match=r"pip install -e \."):
        segment([0], table, impl="cpp")
    assert segment([0], table, impl="python").num_bytes == 1


# ---------------------------------------------------------------------------------------------------------------
# TagTable.from_tokenizer


def test_from_tokenizer_transformers_tags_as_added_tokens(tmp_path):
    from stepsearch.models.tokenizer import EOS_TOKEN, TAGS, train_tokenizer
    tokenizer = train_tokenizer(_corpus()[:100], vocab_size=400)
    table = TagTable.from_tokenizer(tokenizer)
    text = "<think>plan</think>\n<search>river town</search>\n<information>doc</information>\n<answer>Vell</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert table.stream(ids) == text.encode()
    assert all(len(tokenizer.encode(tag, add_special_tokens=False)) == 1 for tag in TAGS)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert not segment(ids + [eos], table).valid_format
    skipping = TagTable.from_tokenizer(tokenizer, skip_special_tokens=True, vocab_size=len(tokenizer) + 64)
    assert len(skipping) == len(tokenizer) + 64
    result = segment(ids + [eos], skipping)
    assert result.valid_format and result.answer == "Vell"
    assert result.step_ends == [ids.index(tokenizer.convert_tokens_to_ids("</search>"))]
    with pytest.raises(ValueError, match="vocab_size"):
        TagTable.from_tokenizer(tokenizer, vocab_size=10)
    with pytest.raises(TypeError, match="backend_tokenizer"):
        TagTable.from_tokenizer(object())


def test_byte_fallback_tokens_are_bytes(metaspace_byte_fallback):
    table = TagTable.from_tokenizer(metaspace_byte_fallback)
    vocabulary = metaspace_byte_fallback.get_vocab()
    assert table.token_bytes[vocabulary["<0xF0>"]] == b"\xf0"
    assert table.token_bytes[vocabulary["▁a"]] == b" a" and table.strip_leading_space[vocabulary["▁a"]]
    assert table.token_bytes[vocabulary["<s>"]] == b"<s>"
    ids = metaspace_byte_fallback.encode("<answer>🙂</answer>", add_special_tokens=False).ids
    assert segment(ids, table).answer == "🙂"


def test_tag_table_validation():
    with pytest.raises(ValueError, match="flags"):
        TagTable([b"a"], [False, True])
    with pytest.raises(ValueError, match="leading space"):
        TagTable([b"a"], [True])
    assert segment_reference([0], TagTable([b" a"], [True])).num_bytes == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_accepts_tensors_and_any_integer_arrays(impl):
    import torch
    ids, table = _pieces("<answer>", "x", "</answer>")
    expected = segment(ids, table, impl="python")
    assert segment(torch.tensor(ids), table, impl=impl) == expected
    assert segment(np.array(ids, dtype=np.uint8), table, impl=impl) == expected
    batch = segment_batch([torch.tensor(ids), np.array(ids, dtype=np.int64), ids, []], table, impl=impl)
    assert batch[:3] == [expected] * 3 and batch[3].num_bytes == 0


def test_cpp_batch_releases_the_gil():
    import threading
    import time

    from stepsearch import _segmenter
    ids, table = _pieces("<search>q</search>", "\n<information>", "doc text ", "</information>", "word ")
    sequence = np.array(ids + [4] * 2043, dtype=np.int32)
    flat = np.tile(sequence, 16_000)  # 33M tokens: tens of milliseconds of C++
    offsets = np.arange(0, flat.size + 1, sequence.size, dtype=np.int64)
    native = table.native()
    ticks: list[float] = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    start = time.perf_counter()
    _segmenter.segment_batch(native, flat, offsets)
    end = time.perf_counter()
    stop.set()
    thread.join()
    # Holding the GIL, the call would leave no Python bytecode of the ticker running between its first and last
    # quarter; released, the ticker keeps ticking throughout.
    middle = [tick for tick in ticks if start + (end - start) / 4 < tick < end - (end - start) / 4]
    assert middle, f"no ticks during the {end - start:.3f} s call"
