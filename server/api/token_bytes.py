"""A token's exact bytes, from its tokenizer's vocabulary, and the text OpenAI writes for them.

`tokenizer.decode([id])` cannot say what a token is: every token that holds part of a multi-byte
character (a byte-level BPE piece of one, a sentencepiece byte-fallback `<0xE6>`) decodes to U+FFFD,
and a sentencepiece piece loses its leading space marker ("▁true" and "true" both decode to "true").
The vocabulary's piece spells the bytes exactly:

    byte-level BPE (GPT-2's)     each character of the piece stands for one byte (bytes_to_unicode)
    sentencepiece style          "<0xNN>" is the byte NN (byte fallback), the marker "▁" a space
    added and special tokens     their content, in UTF-8

and any other vocabulary falls back to decode([id]). A token's text is its bytes when they are UTF-8
on their own, else OpenAI's `bytes:\\xe6\\x97` (no bytes: `token_id:N`), so distinct tokens keep
distinct texts.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache

from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}
Speller = Callable[[str], bytes | None]  # a vocabulary piece -> its bytes, None when it spells none


def token_text(data: bytes) -> str:
    """The bytes as text when they are valid UTF-8, else `bytes:` and `\\xNN` per byte (OpenAI's way)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class TokenBytes:
    """One tokenizer's token bytes, each id looked up once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.added_tokens_decoder
        self.added = {i: t.content.encode() for i, t in added.items()}
        self.special = frozenset(i for i, t in added.items() if t.special)  # what skip_special_tokens drops
        decoders = _decoder_types(tokenizer)
        self.byte_fallback = "ByteFallback" in decoders or hasattr(tokenizer, "sp_model")
        self.spell = _speller(tokenizer, decoders)
        self._cache: dict[int, bytes] = {}

    def of(self, token_id: int) -> bytes:
        data = self._cache.get(token_id)
        if data is None:
            data = self._cache[token_id] = self._lookup(token_id)
        return data

    def text(self, token_id: int) -> str:
        """Its bytes' text; a token of no bytes (an id past the vocabulary: a padded row of the model's
        embeddings) is vLLM's `token_id:N`, so such tokens keep distinct texts too."""
        data = self.of(token_id)
        return token_text(data) if data else f"token_id:{token_id}"

    def _lookup(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        byte = BYTE_PIECE.fullmatch(piece) if self.byte_fallback and piece else None
        if byte:  # before the added tokens: a vocabulary may list its byte pieces as added ones
            return bytes([int(byte[1], 16)])
        if token_id in self.added:
            return self.added[token_id]
        data = self.spell(piece) if self.spell and piece else None
        return self.tokenizer.decode([token_id]).encode() if data is None else data


@lru_cache(maxsize=8)
def token_bytes(tokenizer) -> TokenBytes:
    """The TokenBytes of a tokenizer, built once (the server has one tokenizer)."""
    return TokenBytes(tokenizer)


def _decoder_types(tokenizer) -> dict[str, dict]:
    """The fast tokenizer's decoder, or the parts of a Sequence one, by type ({} for a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = backend.decoder if backend else None
    if decoder is None:
        return {}
    config = json.loads(decoder.__getstate__())
    parts = config["decoders"] if config["type"] == "Sequence" else [config]
    return {part["type"]: part for part in parts}


def _speller(tokenizer, decoders: dict[str, dict]) -> Speller | None:
    """How this vocabulary's pieces spell bytes: byte-level, sentencepiece style, or None (neither)."""
    if "ByteLevel" in decoders or hasattr(tokenizer, "byte_decoder"):
        return _byte_level
    replace = decoders.get("Replace", {})
    if replace.get("content") == " " and "String" in replace.get("pattern", {}):
        return _spaced(replace["pattern"]["String"])
    if "Metaspace" in decoders:
        return _spaced(decoders["Metaspace"].get("replacement", "▁"))
    return _spaced("▁") if hasattr(tokenizer, "sp_model") else None


def _byte_level(piece: str) -> bytes | None:
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in piece)
    except KeyError:  # not a byte-level piece
        return None


def _spaced(marker: str) -> Speller:
    """A sentencepiece piece's bytes: its UTF-8 with the space marker as a space."""
    return lambda piece: piece.replace(marker, " ").encode()
