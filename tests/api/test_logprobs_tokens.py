"""The tokens of the logprobs objects are the vocabulary's exact bytes, not decode([id]): tokens that
are parts of one multi-byte character (byte-level BPE pieces, sentencepiece byte fallback) keep
distinct texts and their own logprobs, the chat `bytes` of consecutive tokens join into the text,
and `text_offset` indexes the returned text. Built without a server: the real tokenizer of the test
model, and a sentencepiece-style one (Metaspace pieces, byte fallback) built here."""
from __future__ import annotations

import string
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from server.api.generation import Outcome
from server.api.logprobs import chat_logprobs, legacy_logprobs
from server.engine.logprobs import TokenLogprob
from tests.conftest import LLAMA

TEXTS = ["é è ê ë", "😀😀😀😀😀😀", "Ça coûte 5 € — naïve café, 日本語のテキスト, emoji 🙂👍🏽 and 🇫🇷."]


@pytest.fixture(scope="module")
def llama():
    return AutoTokenizer.from_pretrained(LLAMA, local_files_only=True)


def _sentencepiece_style(decoder) -> PreTrainedTokenizerFast:
    """A Llama-like vocabulary written out: the 256 byte pieces, letters, "é" and "日" as pieces, and
    merges that make both "▁true" and "true"; other characters fall back to bytes."""
    pieces = ["▁", *string.ascii_letters, *".,!?'", "é", "日", "tr", "tru", "true", "▁true"]
    vocab = {p: i for i, p in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces])}
    merges = [("t", "r"), ("tr", "u"), ("tru", "e"), ("▁", "true")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


SENTENCEPIECE = {
    "metaspace": lambda: _sentencepiece_style(decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])),
    "llama-2": lambda: _sentencepiece_style(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])),
}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _scores(ids: list[int], top: Sequence[int]) -> list[TokenLogprob]:
    """Each id its own logprob: -1 - k/100 for the k-th of `top` (the top ids of every token), else -5 - id/10⁴."""
    own = {i: -1 - k / 100 for k, i in enumerate(top)}
    return [TokenLogprob(own.get(i, -5 - i / 10_000), tuple(own.items())) for i in ids]


def _generated(tokenizer, text: str, top: Sequence[int] = ()) -> Outcome:
    ids = _ids(tokenizer, text)
    return Outcome(token_ids=ids, text=tokenizer.decode(ids, skip_special_tokens=True), logprobs=_scores(ids, top))


def _check_offsets(text: str, tokens: list[str], offsets: list[int], token_bytes: list[bytes]) -> None:
    """Offsets index `text`: a whole-character token starts there, a part of a character is in the
    character there."""
    assert len(offsets) == len(tokens) and offsets == sorted(offsets) and offsets[-1] < len(text)
    for token, offset, data in zip(tokens, offsets, token_bytes):
        if token.startswith("bytes:"):
            assert data in text[offset].encode(), (token, offset, text[offset])
        else:
            assert text[offset:].startswith(token), (token, offset, text[offset:offset + 10])


def test_parts_of_characters_keep_distinct_keys_and_their_own_logprobs(llama):
    """The prompt "é è ê ë" is 11 tokens, each letter two one-byte ones: as top 5 they were one key, U+FFFD."""
    prompt = _ids(llama, "é è ê ë")
    parts = sorted({i for i in prompt if llama.decode([i]) == "\ufffd"})
    assert len(parts) == 5
    out = _generated(llama, " ü", top=parts)
    out.prompt_logprobs = _scores(prompt[1:], parts)
    lp = legacy_logprobs(llama, prompt, out, "é è ê ë")
    assert len(set(lp["tokens"])) == len(set(prompt + out.token_ids))
    assert "bytes:\\xc3" in lp["tokens"]  # OpenAI's text for bytes that are no character on their own
    ids, scores = (prompt + out.token_ids)[1:], out.prompt_logprobs + out.logprobs
    for token, token_id, score, top in zip(lp["tokens"][1:], ids, scores, lp["top_logprobs"][1:]):
        assert len(top) == len(parts) + (token_id not in parts)  # 5 asked, and the chosen one beside them
        assert top[token] == score.logprob
        assert sorted(top.values()) == sorted({score.logprob, *(lp for _, lp in score.top)})


def test_chat_tokens_bytes_join_into_the_text(llama):
    for text in TEXTS:
        out = _generated(llama, text, top=_ids(llama, "日本")[:3])
        content = chat_logprobs(llama, out)["content"]
        assert b"".join(bytes(e["bytes"]) for e in content) == text.encode()
        for entry in content:
            assert entry["token"].startswith("bytes:") or entry["token"] == bytes(entry["bytes"]).decode()
            assert len({t["token"] for t in entry["top_logprobs"]}) == 3


@pytest.mark.parametrize("echo", [True, False])
def test_text_offsets_index_the_returned_text(llama, echo):
    """The emoji prompt's text is 6 characters (24 tokens); its offsets ran to 23, and the generated
    tokens' past the text's end."""
    prompt_text = "😀😀😀😀😀😀"
    prompt = _ids(llama, prompt_text)
    out = _generated(llama, " é😀 ok 日本")
    out.prompt_logprobs = _scores(prompt[1:], [])
    lp = legacy_logprobs(llama, prompt, out, prompt_text if echo else None)
    text = (prompt_text if echo else "") + out.text
    ids = (prompt if echo else []) + out.token_ids
    _check_offsets(text, lp["tokens"], lp["text_offset"], _bytes(llama, ids))
    if echo:
        assert lp["text_offset"][:8] == [0, 0, 0, 0, 1, 1, 1, 1]  # an emoji's 4 bytes, at its character


def test_generated_offsets_count_from_the_echoed_prompt_as_sent():
    """A tokenizer that normalises (NFC, as Qwen2's does) gives "cafe\u0301" back as "café", a character
    shorter: the answer echoes the prompt as sent, so the generated tokens' offsets count from its end."""
    tokenizer = AutoTokenizer.from_pretrained(LLAMA, local_files_only=True)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    prompt_text = "cafe\u0301 au lait"
    prompt = _ids(tokenizer, prompt_text)
    assert len(tokenizer.decode(prompt)) == len(prompt_text) - 1
    out = _generated(tokenizer, " ok then")
    out.prompt_logprobs = _scores(prompt[1:], [])
    lp = legacy_logprobs(tokenizer, prompt, out, prompt_text)
    text, n = prompt_text + out.text, len(out.token_ids)
    _check_offsets(text, lp["tokens"][-n:], lp["text_offset"][-n:], _bytes(tokenizer, out.token_ids))
    assert lp["text_offset"][-n] == len(prompt_text)


def _bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The tokens' bytes as the chat object gives them."""
    out = Outcome(token_ids=ids, text=tokenizer.decode(ids), logprobs=_scores(ids, []))
    return [bytes(e["bytes"]) for e in chat_logprobs(tokenizer, out)["content"]]


def test_chat_without_a_template_leaves_out_the_whitespace_the_reply_strips(llama):
    """'\n    \"\"\"' is the tokens '\n', '   ', ' \"\"\"': the reply is '\"\"\"', its logprobs the last token."""
    out = _generated(llama, '\n    """')
    assert [e["token"] for e in chat_logprobs(llama, out)["content"]] == ["\n", "   ", ' """']
    assert [e["token"] for e in chat_logprobs(llama, out, strip=True)["content"]] == [' """']
    assert chat_logprobs(llama, _generated(llama, " \n "), strip=True)["content"] == []
    partial = chat_logprobs(llama, _generated(llama, "\n😀"), strip=True)["content"]  # a character's first byte stays
    assert b"".join(bytes(e["bytes"]) for e in partial) == "😀".encode()


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_sentencepiece_pieces_and_byte_fallback(name):
    tokenizer = SENTENCEPIECE[name]()
    marked, bare = tokenizer.convert_tokens_to_ids(["▁true", "true"])
    byte = tokenizer.convert_tokens_to_ids("<0xE6>")
    out = _generated(tokenizer, "Ça 日本 😀 true", top=[marked, bare, byte])
    lp = legacy_logprobs(tokenizer, _ids(tokenizer, "x"), out, None)
    assert list(lp["top_logprobs"][0])[:3] == [" true", "true", "bytes:\\xe6"]
    content = chat_logprobs(tokenizer, out)["content"]
    assert [e["token"] for e in content[0]["top_logprobs"]] == [" true", "true", "bytes:\\xe6"]
    assert [e["bytes"] for e in content[0]["top_logprobs"]] == [list(b" true"), list(b"true"), [0xE6]]
    # the first piece's space marker, which the decode drops from the text's start
    assert b"".join(bytes(e["bytes"]) for e in content) == b" " + out.text.encode()
    tokens, offsets = lp["tokens"], lp["text_offset"]
    assert offsets[0] == 0 and tokens[0] == " "
    _check_offsets(out.text, tokens[1:], offsets[1:], _bytes(tokenizer, out.token_ids)[1:])


def test_ids_past_the_vocabulary_keep_distinct_texts(llama):
    """A model's embeddings may have rows past its tokenizer's vocabulary (padded): such ids in a top
    list decode to nothing, so they are named by id instead of all sharing the empty text."""
    past = [len(llama) + 3, len(llama) + 7]
    out = _generated(llama, " ok", top=past)
    top = legacy_logprobs(llama, [], out, None)["top_logprobs"][0]
    assert {f"token_id:{i}" for i in past} <= set(top) and len(top) == 3
