"""Reading adapter files safely: JSON configs, safetensors (header checked first), weights-only pickles.

Every cost is bounded before the work that pays it: a config's bytes, a header's bytes and entries,
a file's number of tensors, and the bytes its tensors take once materialized (a pickle may hold a
view that repeats 4 bytes as 2 GB: refused from the views' shapes, before anything is copied).
"""
from __future__ import annotations

import io
import json
import math
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from server.errors import AdapterFormatError, PayloadTooLargeError

MAX_CONFIG_BYTES = 256 * 1024  # a JSON config (PEFT's are ~1 KB; a rank_pattern per module of 80 layers: ~60 KB)
MAX_HEADER_BYTES = 8 * 1024 * 1024  # a safetensors header (~150 bytes a tensor)
MAX_TENSORS = 16384  # tensors in one weights file (LoRA with DoRA on 10 modules of 128 layers: ~4k)
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ZIP_END_SEARCH = 22 + 0xFFFF  # a zip's end record: 22 bytes, then a comment of up to 64 KiB


def read_json(path: Path) -> object:
    """A JSON file of at most MAX_CONFIG_BYTES (413 above), parsed; 422 when it is not JSON."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise PayloadTooLargeError(f"{path.name}: expected a JSON config of at most {MAX_CONFIG_BYTES} bytes, "
                                   f"got {size}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError; integers over Python's 4300 digits
        raise AdapterFormatError(path.name, "valid JSON", str(exc)) from exc
    except RecursionError as exc:
        raise AdapterFormatError(path.name, "valid JSON nested less than ~1000 levels deep", "deeper") from exc


def read_config(folder: Path, name: str = "adapter_config.json") -> dict:
    path = folder / name
    if not path.is_file():
        raise AdapterFormatError(name, "a JSON config file in the adapter folder", "no such file")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise AdapterFormatError(name, "a JSON object", type(cfg).__name__)
    return cfg


def read_weights(folder: Path, *stems: str) -> dict[str, Tensor]:
    """Load `<stem>.safetensors`, else `<stem>.bin` (weights only), for the first stem present."""
    for stem in stems:
        st, binary = folder / f"{stem}.safetensors", folder / f"{stem}.bin"
        if st.is_file():
            return read_safetensors(st)
        if binary.is_file():
            return read_pickle(binary)
    names = ", ".join(f"{s}.safetensors or {s}.bin" for s in stems)
    raise AdapterFormatError("weights", names, "no such file")


def read_safetensors(path: Path) -> dict[str, Tensor]:
    check_safetensors_header(path)
    try:
        return load_file(path, device="cpu")
    except SafetensorError as exc:
        raise AdapterFormatError(path.name, "a valid safetensors file", str(exc)) from exc


# ---------------------------------------------------------------- safetensors


def check_safetensors_header(path: Path) -> None:
    """Refuse a truncated, corrupt or oversized file from its header alone, before reading any data."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFormatError(path.name, "a safetensors file (8-byte header length)", f"{size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise AdapterFormatError(path.name, f"a header that fits the file's {size - 8} bytes after its length",
                                     f"a header of {n} bytes (the file is truncated?)")
        if n > MAX_HEADER_BYTES:
            raise PayloadTooLargeError(f"{path.name}: expected a safetensors header of at most {MAX_HEADER_BYTES} "
                                       f"bytes, got {n}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise AdapterFormatError(path.name, "a JSON safetensors header", str(exc)) from exc
    if not isinstance(header, dict):
        raise AdapterFormatError(path.name, "a JSON object header", type(header).__name__)
    _check_entries(path.name, {k: v for k, v in header.items() if k != "__metadata__"}, size - 8 - n)


def _check_entries(file: str, entries: dict, data_bytes: int) -> None:
    """Each tensor's dtype x shape fills its byte range exactly; the ranges tile the data, nothing over or left."""
    _check_count(file, len(entries))
    ranges = sorted((_entry_range(file, key, entry), key) for key, entry in entries.items())
    at = 0
    for (start, end), key in ranges:
        if start != at:
            raise AdapterFormatError(key, f"data starting at byte {at} (in {file}: ranges back to back)", start)
        at = end
    if at != data_bytes:
        raise AdapterFormatError(file, f"{at} bytes of tensor data", f"{data_bytes} (truncated?)")


def _entry_range(file: str, key: str, entry: object) -> tuple[int, int]:
    if not isinstance(entry, dict):
        raise AdapterFormatError(key, f"a tensor entry {{dtype, shape, data_offsets}} (in {file})", entry)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        raise AdapterFormatError(key, f"a dtype among {', '.join(SAFETENSORS_DTYPE_BYTES)} (in {file})", dtype)
    if not _naturals(shape):
        raise AdapterFormatError(key, f"a shape of non-negative integers (in {file})", shape)
    if not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise AdapterFormatError(key, f"data_offsets [start, end] with start <= end (in {file})", offsets)
    nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise AdapterFormatError(key, f"{nbytes} bytes for {dtype} {shape} (in {file})",
                                 f"a range of {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def _naturals(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_count(file: str, n: int) -> None:
    if n > MAX_TENSORS:
        raise PayloadTooLargeError(f"{file}: expected at most {MAX_TENSORS} tensors, got {n}")


# ---------------------------------------------------------------- pickles


# What torch.load(weights_only=True) raises on damaged or refused files (LookupError: KeyError and
# IndexError from garbage pickles; ValueError includes UnicodeDecodeError).
_PICKLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, LookupError, ValueError, TypeError)


def read_pickle(path: Path) -> dict[str, Tensor]:
    """A PyTorch pickle of names to plain tensors: anything else is refused (naming the key), nothing is executed.

    Only torch.save's zip format with uncompressed records is read, memory-mapped: the storages are
    then at most the file's bytes, and the tensors' materialized bytes are checked against that too.
    """
    size = path.stat().st_size
    _check_torch_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _PICKLE_ERRORS as exc:
        raise AdapterFormatError(path.name, "a weights-only PyTorch file of plain tensors", str(exc)[:300]) from exc
    if not isinstance(obj, dict):
        raise AdapterFormatError(path.name, "a mapping of names to tensors", type(obj).__name__)
    _check_count(path.name, len(obj))
    for key, value in obj.items():
        if not isinstance(key, str):
            raise AdapterFormatError(path.name, "string keys", key)
        if not isinstance(value, Tensor):
            raise AdapterFormatError(key, f"a tensor (in {path.name})", type(value).__name__)
    materialized = sum(t.numel() * t.element_size() for t in obj.values())
    if materialized > size:
        raise PayloadTooLargeError(f"{path.name}: expected tensors of at most {size} bytes once materialized "
                                   f"(the file's own size), got {materialized} (expanded or overlapping views)")
    return obj


def _check_torch_zip(path: Path) -> None:
    """torch.save's zip format (torch >= 1.6), every record stored uncompressed, at most MAX_TENSORS of them."""
    expected = "a PyTorch file in torch.save's zip format (torch >= 1.6)"
    if declared_zip_entries(path) > MAX_TENSORS + 16:  # a few records beside the storages
        raise PayloadTooLargeError(f"{path.name}: expected at most {MAX_TENSORS} tensors, got more zip records")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise AdapterFormatError(path.name, expected, "another format (legacy torch.save, or not PyTorch)") from exc
    packed = next((i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise AdapterFormatError(path.name, f"{expected}, records stored uncompressed as torch.save writes them",
                                 f"compressed record {packed}")


def declared_zip_entries(path: Path) -> int:
    """The member count a zip's end record declares, read before its directory is parsed (0 if none found)."""
    with path.open("rb") as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(max(0, size - _ZIP_END_SEARCH))
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return 0  # not a zip: zipfile says so
    return struct.unpack_from("<H", tail, at + 10)[0]  # 0xFFFF: zip64, at least that many


def require_finite(key: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise AdapterFormatError(key, "finite values", "NaN or Inf")
