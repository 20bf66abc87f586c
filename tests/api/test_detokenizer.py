"""A stream's incremental text equals decoding all of its ids: at every token a prefix of it (a
partial character held back), at the end all of it, for the fixtures' byte-level BPE tokenizers and
for a sentencepiece-style one (Metaspace, byte fallback) that cleans up spaces before punctuation."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from server.api.detokenizer import REPLACEMENT, TextStream

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "def f(x):\n    return x + 1  # add one\n\n\tprint(f'{x!r}')\n",
    "Ça coûte 5 € — naïve café, 日本語のテキスト, emoji 🙂👍🏽 and a flag 🇫🇷.",
    "I don't know , he said . It 's fine ! Isn't it ? They 're here ; we 've won",
    "   leading spaces, trailing spaces   \n\n\n",
]


def _sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer built here: BPE over Metaspace pieces with byte fallback, whose decode
    removes the spaces before punctuation and contractions (clean-up)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(TEXTS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=True)
    # transformers 5 skips the clean-up for BPE unless told: "It 's fine ." -> "It's fine."
    fast.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return fast


TOKENIZERS = {
    "default-model": lambda: AutoTokenizer.from_pretrained(ROOT / "default_model", local_files_only=True),
    "tiny-gpt2": lambda: AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/tiny-gpt2", local_files_only=True),
    "tiny-llama": lambda: AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/tiny-llama", local_files_only=True),
    "sentencepiece-style": _sentencepiece_style,
}


def _check_stream(tokenizer, ids: list[int]) -> None:
    stream = TextStream(tokenizer)
    for n, token in enumerate(ids, 1):
        text = stream.add(token)
        full = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(text), (n, text[-30:], full[-30:])
        assert not text.endswith(REPLACEMENT)
    assert stream.text == tokenizer.decode(ids, skip_special_tokens=True).rstrip(REPLACEMENT)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_streamed_text_equals_decoding_every_id(name):
    tokenizer = TOKENIZERS[name]()
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        _check_stream(tokenizer, ids + [tokenizer.eos_token_id] + ids[:5])  # a special token is skipped


@pytest.mark.parametrize("name", TOKENIZERS)
def test_streamed_text_of_random_ids_is_a_prefix_at_every_token(name):
    """Random ids split characters anywhere (byte tokens, merges that end mid-character)."""
    tokenizer = TOKENIZERS[name]()
    rng = random.Random(0)
    for _ in range(5):
        _check_stream(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(60)])


def test_the_sentencepiece_style_tokenizer_does_clean_up():
    """What makes it a clean-up case: its decode is not the pieces joined."""
    tokenizer = _sentencepiece_style()
    ids = tokenizer("It 's fine , he said .", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "It's fine, he said."
