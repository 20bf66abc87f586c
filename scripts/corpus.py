"""Corpus: the running Python's standard library sources, split deterministically, tokenized.

Sub-corpora (all offline, shipped with every CPython; PSF licence):
- `code`: every stdlib `.py` file outside the test suites and `pydoc_data` (pre-training);
- `tests`: the stdlib test suite, `test/test_*.py` (the soft prompt's target);
- `prose`: `pydoc_data/topics.py`, the language reference as English text (the bottleneck adapter's);
- `docstrings`: each documented function of `code` reduced to its `def` line and docstring (the LoRA's).
Each file (or topic) is held out when the first byte of the sha256 of its name is below 16 (1/16).
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EOS_ID = 0
TEST_PARTS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class Split:
    train: list[str]
    held_out: list[str]


def is_held_out(name: str) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] < 16


def split(named_texts: list[tuple[str, str]]) -> Split:
    train = [text for name, text in named_texts if not is_held_out(name)]
    held_out = [text for name, text in named_texts if is_held_out(name)]
    return Split(train, held_out)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _sources(include) -> list[tuple[str, str]]:
    out = []
    for path in sorted(STDLIB.rglob("*.py")):
        rel = path.relative_to(STDLIB)
        if "site-packages" in rel.parts or not include(rel):
            continue
        text = _read(path)
        if text:
            out.append((rel.as_posix(), text))
    return out


def _is_code(rel: Path) -> bool:
    return not TEST_PARTS & set(rel.parts) and rel.parts[0] != "pydoc_data"


def _is_test(rel: Path) -> bool:
    return "test" in rel.parts and rel.name.startswith("test_")


def code() -> Split:
    return split(_sources(_is_code))


def tests() -> Split:
    return split(_sources(_is_test))


def prose() -> Split:
    namespace: dict = {}
    exec(compile((STDLIB / "pydoc_data" / "topics.py").read_text(), "topics.py", "exec"), namespace)  # noqa: S102 (stdlib file)
    return split(sorted(namespace["topics"].items()))


def _docstring_stubs(source: str) -> list[str]:
    """'def f(args):' plus its docstring, for each documented function or method."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    stubs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
            doc = node.body[0]
            header = lines[node.lineno - 1 : node.body[0].lineno - 1]
            body = lines[doc.lineno - 1 : doc.end_lineno]
            indent = min(len(line) - len(line.lstrip()) for line in header[:1])
            stubs.append("\n".join(line[indent:] for line in header + body) + "\n")
    return stubs


def docstrings() -> Split:
    stubs = []
    for name, text in _sources(_is_code):
        stubs += [(f"{name}:{i}", stub) for i, stub in enumerate(_docstring_stubs(text))]
    return split(stubs)


SUBCORPORA = {"code": code, "tests": tests, "prose": prose, "docstrings": docstrings}


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts joined by EOS into one stream: [n_tokens] int64."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids += encoding.ids + [EOS_ID]
    return torch.tensor(ids, dtype=torch.int64)


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows: [n_windows, length]; the tail shorter than `length` is dropped."""
    n = stream.numel() // length
    return stream[: n * length].view(n, length)
