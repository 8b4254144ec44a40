"""An offline-trained byte-level BPE tokenizer for the tiny embedded model (no hub download).

The eight agent tags are added tokens that are *not* special: each tag is always one token id (so the segmenter
and the stop-string check see it whole) and it survives `decode(..., skip_special_tokens=True)` as text.
Padding, end- and beginning-of-sequence are special tokens. The tokenizer is saved with `save_pretrained`, and
`stepsearch.models.actor_critic.load_tokenizer(out_dir)` reloads the identical tokenizer, also from a checkpoint
directory whose Qwen2 `config.json` would make `AutoTokenizer` substitute Qwen2's pre-tokenizer.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TAGS = ("<think>", "</think>", "<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>")
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None,
                    word_piece_pattern: str | None = None) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE of `vocab_size` ids (incl. 256 byte symbols, tags and specials) on `texts`.

    `word_piece_pattern` (a regex over one byte-level word, where a leading space reads "Ġ") cuts words into
    pieces before merges are learned, so no token crosses a piece boundary: for the synthetic world,
    `synth.NAME_PIECE_PATTERN` spells every made-up name syllable by syllable, the same way whether or not the
    name was in `texts`. Deterministic for the same texts. When `out_dir` is given the tokenizer is saved there
    (`save_pretrained`).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS) + len(TAGS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE with tags needs >= {minimum}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if word_piece_pattern is not None:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [bpe.pre_tokenizer, pre_tokenizers.Split(Regex(word_piece_pattern), behavior="isolated")])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAGS),  # the tags are added on top and must fit in vocab_size
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.add_tokens([AddedToken(tag, special=False, normalized=False, single_word=False) for tag in TAGS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=BOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
