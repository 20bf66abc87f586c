"""Whether a row's newest token completed one of its stop strings, judged on the text the client gets.

The engine decodes only a tail of the row's ids at each token. The tail must hold any text a stop
string can span: every token that is not special decodes to at least one UTF-8 byte, so a stop of
b bytes lies within the last b such tokens, plus a few for a first token that begins mid-character
or loses a sentencepiece leading space. Special tokens are skipped in the text the API answers
(api/generation.py), so they are skipped here too and a stop may span them.
"""
from __future__ import annotations

SLACK_TOKENS = 4  # a partial first character (up to 3 bytes) or a dropped leading space


class StopFinder:
    """Looks for stop strings at the end of a row's output, for one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.added_tokens_decoder.items()
        self.special = frozenset(tokenizer.all_special_ids) | {i for i, tok in added if tok.special}

    def found(self, ids: list[int], stops: tuple[str, ...]) -> bool:
        """Whether the text of the last tokens of `ids` (special tokens skipped), as many as any of
        `stops` can span, contains one of them: whatever the newest token may have completed."""
        need = max(len(s.encode("utf-8")) for s in stops) + SLACK_TOKENS
        start, kept = len(ids), 0
        while start > 0 and kept < need:
            start -= 1
            kept += ids[start] not in self.special
        tail = self.tokenizer.decode(ids[start:], skip_special_tokens=True)
        return any(s in tail for s in stops)
