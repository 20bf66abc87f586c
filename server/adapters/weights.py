"""Reading adapter files safely: JSON configs, safetensors (header checked first), weights-only pickles."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from server.errors import AdapterFormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_config(folder: Path, name: str = "adapter_config.json") -> dict:
    path = folder / name
    if not path.is_file():
        raise AdapterFormatError(name, "a JSON config file in the adapter folder", "no such file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(name, "valid JSON", str(exc)) from exc
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


def check_safetensors_header(path: Path) -> None:
    """Refuse a truncated or corrupt file from its header alone, before reading any data."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFormatError(path.name, "a safetensors file (8-byte header length)", f"{size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise AdapterFormatError(path.name, f"a header of at most {size - 8} bytes", f"{n} bytes (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterFormatError(path.name, "a JSON safetensors header", str(exc)) from exc
    if not isinstance(header, dict):
        raise AdapterFormatError(path.name, "a JSON object header", type(header).__name__)
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and max(ends) != size - 8 - n:
        raise AdapterFormatError(path.name, f"{max(ends)} bytes of tensor data", f"{size - 8 - n} (truncated?)")


# What torch.load(weights_only=True) raises on damaged or refused files (LookupError: KeyError and
# IndexError from garbage pickles; ValueError includes UnicodeDecodeError).
_PICKLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, LookupError, ValueError, TypeError)


def read_pickle(path: Path) -> dict[str, Tensor]:
    """A PyTorch pickle of names to plain tensors: anything else is refused (naming the key), nothing is executed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except _PICKLE_ERRORS as exc:
        raise AdapterFormatError(path.name, "a weights-only PyTorch file of plain tensors", str(exc)[:300]) from exc
    if not isinstance(obj, dict):
        raise AdapterFormatError(path.name, "a mapping of names to tensors", type(obj).__name__)
    for key, value in obj.items():
        if not isinstance(key, str):
            raise AdapterFormatError(path.name, "string keys", key)
        if not isinstance(value, Tensor):
            raise AdapterFormatError(key, f"a tensor (in {path.name})", type(value).__name__)
    return obj


def require_finite(key: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise AdapterFormatError(key, "finite values", "NaN or Inf")
