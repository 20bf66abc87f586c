"""Uploads that would cost far more than their size are refused before the work: what a client sees.

A few KB of pickle claiming gigabytes of tensors, safetensors headers that lie or are huge, configs
that are huge, deep or hold huge values, and regexes with catastrophic backtracking: each gets a
413 or 422 naming the problem, quickly, with nothing big materialized and nothing stored.
"""
from __future__ import annotations

import collections
import io
import json
import pickle
import resource
import struct
import time
import zipfile

import pytest
import torch

from server.adapters.patterns import MATCH_TIMEOUT_S
from server.adapters.weights import MAX_CONFIG_BYTES, MAX_HEADER_BYTES, MAX_TENSORS
from tests.store.helpers import LORA, folder_files, listing, lora_config, upload

LORA_FILES = folder_files(LORA)
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
GB2 = 500_000_000  # float32 elements: 2 GB once materialized


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _expanded_view() -> bytes:
    """4 bytes of storage, viewed as 2 GB (stride 0): torch.save writes ~1.6 KB."""
    return _saved({KEY: torch.zeros(1).expand(GB2)})


def _rezipped(data: bytes, compression: int = zipfile.ZIP_STORED, replace: dict | None = None) -> bytes:
    """The same torch zip with its records rewritten: compressed, or some replaced by name suffix."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for info in src.infolist():
            new = next((v for k, v in (replace or {}).items() if info.filename.endswith(k)), None)
            z.writestr(info.filename, src.read(info) if new is None else new)
    return out.getvalue()


def _huge_storage() -> bytes:
    """A pickle naming a 2 GB storage whose record holds 4 bytes."""
    marker = object()

    class Rebuild:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (marker, 0, (GB2,), (1,), False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", GB2) if obj is marker else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({KEY: Rebuild()})
    return _rezipped(_saved({KEY: torch.zeros(1)}), replace={"data.pkl": buf.getvalue()})


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _refused(srv, files: dict[str, bytes], status: int, type_: str, *needles: str,
             within_s: float | None = 5.0) -> str:
    """Upload, expect the refusal, fast (unless `within_s` is None), with nothing left in the store;
    the error message."""
    store = srv.app.state.settings.store
    before = listing(store)
    started = time.monotonic()
    with srv.client() as c:
        r = upload(c, "costly", files=files)
    elapsed = time.monotonic() - started
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == type_
    for needle in needles:
        assert needle in error["message"]
    assert within_s is None or elapsed < within_s, f"refused after {elapsed:.1f}s"
    assert listing(store) == before
    return error["message"]


# ---------------------------------------------------------------- pickles


@pytest.mark.parametrize("make,status,type_,needle", [
    (_expanded_view, 413, "payload_too_large", "materialized"),
    (_huge_storage, 422, "invalid_adapter", "adapter_model.bin"),
    (lambda: _rezipped(_saved({KEY: torch.zeros(8, 256)}), zipfile.ZIP_DEFLATED), 422, "invalid_adapter",
     "compressed record"),
], ids=["expanded-view", "huge-storage", "compressed-records"])
def test_tiny_pickle_claiming_gigabytes_is_refused_before_any_copy(llama_server, make, status, type_, needle):
    data = make()
    assert len(data) < 4096
    rss = _peak_rss_mb()
    _refused(llama_server, {"adapter_config.json": LORA_FILES["adapter_config.json"], "adapter_model.bin": data},
             status, type_, needle)
    assert _peak_rss_mb() - rss < 500  # 2 GB were never materialized


def test_pickle_with_too_many_tensors(llama_server):
    """Counted once unpickled (views of one storage need no records): that costs what reading 3.5 MB
    of pickle costs (~1.5 s here), bounded by the upload's size, so it is not timed."""
    data = _saved({f"t{i}": torch.zeros(0) for i in range(MAX_TENSORS + 1)})
    _refused(llama_server, {"adapter_config.json": LORA_FILES["adapter_config.json"], "adapter_model.bin": data},
             413, "payload_too_large", f"at most {MAX_TENSORS} tensors", within_s=None)


# ---------------------------------------------------------------- safetensors


def test_safetensors_entry_whose_shape_is_larger_than_its_bytes(llama_server):
    data = _safetensors({KEY: {"dtype": "F32", "shape": [GB2], "data_offsets": [0, 4]}}, b"\0" * 4)
    message = _refused(llama_server, {**LORA_FILES, "adapter_model.safetensors": data}, 422, "invalid_adapter",
                       KEY, f"{4 * GB2} bytes", "a range of 4")
    assert len(message) < 1000


@pytest.mark.parametrize("header,data,needle", [
    ({KEY: {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "starting at byte 0"),
    ({KEY: {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "a dtype among"),
    ({KEY: {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
    ({KEY: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "truncated"),
], ids=["gap", "dtype", "negative-shape", "trailing-bytes"])
def test_safetensors_header_must_tile_the_data(llama_server, header, data, needle):
    _refused(llama_server, {**LORA_FILES, "adapter_model.safetensors": _safetensors(header, data)}, 422,
             "invalid_adapter", needle)


def test_safetensors_header_size_and_entries_are_bounded(llama_server):
    big = _safetensors({"__metadata__": {"pad": "x" * (MAX_HEADER_BYTES + 1)}})
    _refused(llama_server, {**LORA_FILES, "adapter_model.safetensors": big}, 413, "payload_too_large",
             f"at most {MAX_HEADER_BYTES} bytes")
    many = _safetensors({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                         for i in range(MAX_TENSORS + 1)})
    _refused(llama_server, {**LORA_FILES, "adapter_model.safetensors": many}, 413, "payload_too_large",
             f"at most {MAX_TENSORS} tensors")


# ---------------------------------------------------------------- configs


def _config(**changes) -> dict[str, bytes]:
    return {**LORA_FILES, "adapter_config.json": lora_config(**changes)}


def test_config_size_depth_and_numbers_are_bounded(llama_server):
    _refused(llama_server, _config(pad="x" * MAX_CONFIG_BYTES), 413, "payload_too_large",
             f"at most {MAX_CONFIG_BYTES} bytes")
    deep = b'{"peft_type": "LORA", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _refused(llama_server, {**LORA_FILES, "adapter_config.json": deep}, 422, "invalid_adapter", "nested")
    huge_int = b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}"
    _refused(llama_server, {**LORA_FILES, "adapter_config.json": huge_int}, 422, "invalid_adapter", "valid JSON")


def test_error_bodies_echo_at_most_a_few_hundred_characters(llama_server):
    message = _refused(llama_server, _config(modules_to_save=["x" * 200_000]), 422, "invalid_adapter",
                       "modules_to_save", "characters in all")
    assert len(message) < 1000


# ---------------------------------------------------------------- regexes

BOMB = r"(.*?){30}\d"  # backtracks for hours on a module name, in `re` and in `regex` alike


@pytest.mark.parametrize("field,changes", [
    ("target_modules", {"target_modules": BOMB}),
    ("exclude_modules", {"exclude_modules": BOMB}),
    ("rank_pattern", {"rank_pattern": {BOMB: 4}}),
    ("alpha_pattern", {"alpha_pattern": {BOMB: 4}}),
    ("layers_pattern", {"layers_to_transform": [0], "layers_pattern": BOMB}),
])
def test_catastrophic_regex_is_refused_in_bounded_time(llama_server, field, changes):
    message = _refused(llama_server, _config(**changes), 422, "invalid_adapter", field, "bounded time",
                       within_s=10 * MATCH_TIMEOUT_S + 2)
    assert message.startswith(field)


def test_regex_catastrophic_for_re_only_is_answered_at_once(llama_server):
    """`re` backtracks for minutes on names that do not match; the `regex` engine answers at once, as `re`
    would: the first name matched is a decoder layer, not a linear module."""
    _refused(llama_server, _config(target_modules=r"(\w+\.?\w*)+\d"), 422, "invalid_adapter",
             "target_modules", "'model.layers.0 (LlamaDecoderLayer)'", within_s=3)


@pytest.mark.parametrize("pattern,needle", [
    (r".*q_proj{e<=1}", "braces only as repetition counts"),
    (r"((a{100}){100}){100}", "product is at most"),
    (r"[[:alpha:]]+", "valid regular expression"),  # a nested set to `regex`: re's FutureWarning refused
    ("x" * 5000, "at most 4096 characters"),
])
def test_patterns_regex_would_read_unlike_re_or_compile_slowly_are_refused(llama_server, pattern, needle):
    _refused(llama_server, _config(target_modules=pattern), 422, "invalid_adapter", "target_modules", needle)
