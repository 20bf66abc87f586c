"""OpenAI's logprobs objects: the legacy completions one and the chat one.

Both list only the generated tokens that made the answer's text: a stop string cut from the text
takes the tokens that lie wholly inside it out of the scores too. The legacy `top_logprobs` always
hold the chosen token (vLLM's convention, so `logprobs: 0` gives the chosen token's score).

A token is written from its exact bytes (token_bytes.py), not decode([id]): that gives every part of
a multi-byte character the same U+FFFD, so tokens collided in `top_logprobs`, `bytes` did not join
into characters and each U+FFFD counted as a character of `text_offset`. An offset is a character
offset into the returned text; a token that begins inside a character (its bytes split over
tokens) is at that character's start.
"""
from __future__ import annotations

import codecs
from bisect import bisect_left

from server.api.detokenizer import TextStream
from server.api.generation import Outcome
from server.api.token_bytes import TokenBytes, token_bytes
from server.engine.logprobs import TokenLogprob


def kept_tokens(tokenizer, token_ids: list[int], text: str) -> int:
    """How many of the generated tokens contribute to `text` (all, unless a stop string cut it)."""
    if tokenizer.decode(token_ids, skip_special_tokens=True) == text:
        return len(token_ids)
    # the fewest tokens whose text reaches the cut text's length (a prefix's text only grows with it):
    # a binary search, log n decodes, not n (4,096 tokens of logprobs cut by a stop took seconds)
    return bisect_left(range(len(token_ids)), len(text),
                       key=lambda k: len(tokenizer.decode(token_ids[:k], skip_special_tokens=True)))


def legacy_logprobs(tokenizer, prompt_ids: list[int], out: Outcome, echoed: str | None) -> dict:
    """The echoed prompt's tokens (first one unscored) then the generated ones, as OpenAI lays them out.
    `echoed`: the prompt text the answer's text starts with (None: no echo); the generated tokens'
    offsets count from its end, the prompt tokens' are exact where it is the decode of their ids (a
    tokenizer that normalises text, e.g. NFC, may not give the prompt back as sent)."""
    vocab = token_bytes(tokenizer)
    generated = out.token_ids[: kept_tokens(tokenizer, out.token_ids, out.text)]
    ids: list[int] = []
    scores: list[TokenLogprob | None] = []
    offsets: list[int] = []
    start = 0
    if echoed is not None:
        ids += prompt_ids
        scores += [None, *(out.prompt_logprobs or [])]
        offsets = _text_offsets(tokenizer, prompt_ids, skip_special=False)
        start = len(echoed)
    ids += generated
    scores += out.logprobs[: len(generated)]
    offsets += [start + o for o in _text_offsets(tokenizer, generated, skip_special=True)]
    return {
        "tokens": [vocab.text(i) for i in ids],
        "token_logprobs": [None if s is None else s.logprob for s in scores],
        "top_logprobs": [None if s is None else _top(vocab, s, i) for i, s in zip(ids, scores)],
        "text_offset": offsets,
    }


def _top(vocab: TokenBytes, score: TokenLogprob, chosen: int) -> dict[str, float]:
    """The top tokens by text, then the chosen one with its own logprob (set last: two ids can share a
    text, as a sentencepiece byte piece "<0x41>" and the piece "A" do)."""
    top = {vocab.text(i): lp for i, lp in score.top}
    top[vocab.text(chosen)] = score.logprob
    return top


def chat_logprobs(tokenizer, out: Outcome, strip: bool = False) -> dict:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...], "refusal": None}`.
    strip: the reply is the text with its leading whitespace stripped, so the leading tokens that add
    only whitespace are left out (one that adds whitespace and then more stays)."""
    vocab = token_bytes(tokenizer)
    ids = out.token_ids[: kept_tokens(tokenizer, out.token_ids, out.text)]
    first = _whitespace_tokens(vocab, ids, out.text) if strip else 0
    content = []
    for token_id, score in zip(ids[first:], out.logprobs[first:]):
        entry = _chat_entry(vocab, token_id, score.logprob)
        entry["top_logprobs"] = [_chat_entry(vocab, i, lp) for i, lp in score.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def _chat_entry(vocab: TokenBytes, token_id: int, logprob: float) -> dict:
    return {"token": vocab.text(token_id), "logprob": logprob, "bytes": list(vocab.of(token_id))}


def _whitespace_tokens(vocab: TokenBytes, ids: list[int], text: str) -> int:
    """How many of the first tokens add only whitespace to `text`: all of them when it is whitespace
    (the rest were cut with a stop string), else those before the first one whose bytes are more
    (part of a character counts as more)."""
    if not text.strip():
        return len(ids)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for k, token_id in enumerate(ids):
        if decoder.decode(_written(vocab, token_id, True)).strip() or decoder.getstate()[0]:
            return k
    return len(ids)


def _text_offsets(tokenizer, ids: list[int], skip_special: bool) -> list[int]:
    """Each token's character offset in decode(ids): a token that begins a character is at the length
    of the text decoded before it; one that carries on a character whose first bytes the tokens before
    it hold is at that character's start."""
    vocab = token_bytes(tokenizer)
    lengths = _decoded_lengths(tokenizer, ids, skip_special)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # the tokens' bytes, to see characters split
    offsets: list[int] = []
    held_at = 0  # where the character begun by the bytes the decoder holds starts
    for k, token_id in enumerate(ids):
        data = _written(vocab, token_id, skip_special)
        offsets.append(held_at if _carries_on(decoder, data) else lengths[k])
        held_at = offsets[-1] + len(decoder.decode(data))
    return offsets


def _written(vocab: TokenBytes, token_id: int, skip_special: bool) -> bytes:
    """The bytes a token adds to the decoded text: none for a special token that the decode skips."""
    return b"" if skip_special and token_id in vocab.special else vocab.of(token_id)


def _carries_on(decoder: codecs.IncrementalDecoder, data: bytes) -> bool:
    """Whether `data` carries on the character whose first bytes `decoder` holds. A held start that
    it cannot carry on is let go (the text has a U+FFFD for it, counted in the decoded length)."""
    held = decoder.getstate()[0]
    if not held:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(held + data[:1])
    except UnicodeDecodeError:
        decoder.decode(b"", final=True)
        return False
    return True


def _decoded_lengths(tokenizer, ids: list[int], skip_special: bool) -> list[int]:
    """len(decode(ids[:k])) for k = 0..len(ids), each from TextStream's short window (decoding every
    prefix whole would be O(n²)). Exact for byte-level BPE; sentencepiece's byte fallback writes a run
    of byte tokens that is not UTF-8 as one U+FFFD per token, and a window that starts inside such a
    run can count them otherwise, so the lengths after it can be off."""
    stream = TextStream(tokenizer, skip_special)
    lengths = [0]
    for token_id in ids:
        stream.add(token_id)
        lengths.append(stream.decoded_length)
    return lengths
