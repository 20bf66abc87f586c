"""Module-name patterns from adapter configs, matched with Python `re` semantics in bounded time.

PEFT matches `target_modules`, `exclude_modules`, `layers_pattern` and the `rank_pattern` /
`alpha_pattern` keys with `re`, which cannot be interrupted: one pattern with catastrophic
backtracking stalls the process. Here they are matched by the `regex` engine instead (its version 0
is `re`'s syntax and semantics), with the GIL released and a time budget per config:

    check_pattern("target_modules", p)          # at upload: re accepts it, short, no fuzzy braces
    matcher = Matcher()                         # one per parsed config
    matcher.match("target_modules", p, name, full=True)   # 422 once the budget is spent

Where `regex` reads a pattern differently from `re`, the pattern is refused: `re`'s FutureWarnings
(nested sets, set operations) and braces that are not repetition counts (`regex` would read
`{e<=1}` as fuzzy matching; module names hold no braces anyway).
"""
from __future__ import annotations

import re
import time
import warnings

import regex

from server.errors import AdapterFormatError

MATCH_BUDGET_S = 5.0  # matching one config's patterns against all the base model's module names, in all
MATCH_TIMEOUT_S = 0.25  # one pattern against one module name (a sane one takes microseconds)
MAX_PATTERN_CHARS = 4096
MAX_REPEAT_PRODUCT = 1000  # product of every {m,n} count: `regex` expands counted repeats when compiling

_BRACE = re.compile(r"\{(?P<body>[^{}]*)\}|\{")
_COUNT = re.compile(r"(?P<low>\d*)(?:,(?P<high>\d*))?")


def check_pattern(key: str, pattern: str) -> str:
    """`pattern` if `re` compiles it and `regex` reads it the same way at bounded cost, else 422 naming `key`."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterFormatError(key, f"a regular expression of at most {MAX_PATTERN_CHARS} characters",
                                 f"{len(pattern)} characters")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        try:
            re.compile(pattern)
        except (re.error, FutureWarning) as e:
            raise AdapterFormatError(key, f"a valid regular expression ({e})", pattern) from e
    _check_braces(key, pattern)
    return pattern


def _check_braces(key: str, pattern: str) -> None:
    product = 1
    for brace in _BRACE.finditer(pattern):
        count = _COUNT.fullmatch(brace["body"] or "-")
        if count is None or not (count["low"] or count["high"]):
            raise AdapterFormatError(key, "braces only as repetition counts like {2} or {1,3} (module names "
                                     "hold no braces)", pattern)
        product *= max(int(count["low"] or 0), int(count["high"] or 0), 1)
        if product > MAX_REPEAT_PRODUCT:
            raise AdapterFormatError(key, f"repetition counts whose product is at most {MAX_REPEAT_PRODUCT}",
                                     pattern)


class Matcher:
    """Matches one config's patterns against module names; past MATCH_BUDGET_S in all, 422."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._compiled: dict[str, regex.Pattern] = {}

    def match(self, key: str, pattern: str, name: str, full: bool = False) -> regex.Match | None:
        """`re.fullmatch(pattern, name)` if `full`, else `re.match(pattern, name)`, in bounded time."""
        compiled = self._compiled.get(pattern)
        if compiled is None:
            compiled = self._compiled[pattern] = regex.compile(pattern, regex.VERSION0)
        left = MATCH_BUDGET_S - self.spent
        started = time.perf_counter()
        try:
            if left <= 0:
                raise TimeoutError
            run = compiled.fullmatch if full else compiled.match
            return run(name, timeout=min(left, MATCH_TIMEOUT_S), concurrent=True)
        except TimeoutError as exc:
            raise AdapterFormatError(key, f"a pattern that matches module names in bounded time (at most "
                                     f"{MATCH_TIMEOUT_S} s a name, {MATCH_BUDGET_S} s in all; catastrophic "
                                     "backtracking?)", pattern) from exc
        finally:
            self.spent += time.perf_counter() - started


def listed(name: str, names: frozenset[str]) -> bool:
    """PEFT's list rule, `name in names or any(name.endswith("." + n) for n in names)`, in O(len(name))."""
    return name in names or any(name[i + 1:] in names for i, c in enumerate(name) if c == ".")
