"""The on-disk adapter store: one folder per adapter, written atomically, with a manifest.

    <store>/<name>/manifest.json         name, kind, formats, details, sizes, sha256 of every file
    <store>/<name>/adapter_config.json   the config as uploaded (hotswap_bottleneck.json for native bottlenecks)
    <store>/<name>/<weights>.safetensors adapter_model.safetensors (PEFT) or adapter.safetensors (bottleneck);
                                         a `.bin` upload is read with weights_only and rewritten as safetensors
    <store>/.tmp-<id>/                   an upload or import being written (removed at start-up)
    <store>/.old-<id>-<name>/            the previous version during a replace (see `recover`)
    <store>/.del-<id>/                   a deleted adapter being removed (removed at start-up)

Adapter names start with a letter or digit, so they never collide with the dot folders. Every
file is fsynced before the folder is renamed into place, and the store folder after each rename:
a crash at any moment leaves the old state or the new one, never half of either. Several servers
may share one store folder (a cluster, `--shared-store`): each reads a manifest again before using
its adapter (`Registry.sync`), and start-up recovery leaves young temp folders to their writers.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from server.adapters.bottleneck_format import HUB_CONFIG, NATIVE_CONFIG, PICKLE
from server.adapters.bottleneck_format import SAFETENSORS as BN_SAFETENSORS
from server.adapters.kinds import Kind, detect_kind
from server.adapters.weights import check_safetensors_header, read_pickle
from server.errors import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterNotFoundError,
    InvalidRequestError,
    PayloadTooLargeError,
    StoreCorruptError,
    clip,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TMP, OLD, DEL = ".tmp-", ".old-", ".del-"
PEFT_CONFIG, PEFT_SAFETENSORS, PEFT_PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
CHUNK = 1 << 20
MAX_FOLDER_FILES = 64  # files in an adapter folder read from disk (uploads: server/upload.py's MAX_FILES)
KINDS = ("lora", "prompt", "bottleneck")
CORRUPT = "corrupt"  # a manifest's `status` when the store holds a name it cannot serve (see `Store.manifest`)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            f"name: expected 1-128 characters [A-Za-z0-9._-] starting with a letter or digit, got {_short(name)}"
        )
    return name


# ---------------------------------------------------------------- what a folder holds


@dataclass(frozen=True)
class Selection:
    """The files of a raw adapter folder that the store keeps, and how it keeps them."""

    kind: Kind
    family: str  # peft | adapterhub | hotswap
    config: Path
    weights: Path  # the file read: safetensors, else the pickle
    stored_weights: str  # its name in the store (always .safetensors)
    ignored: tuple[str, ...]  # other files in the folder, not kept

    @property
    def source_format(self) -> str:
        return f"{self.family}/{'bin' if self.weights.suffix == '.bin' else 'safetensors'}"

    def source_sha256(self) -> str:
        """One digest over the kept files' names and contents (to tell whether a folder changed)."""
        digest = hashlib.sha256()
        for path in (self.config, self.weights):
            digest.update(path.name.encode() + b"\0" + sha256_file(path).encode() + b"\0")
        return digest.hexdigest()


def select(raw: Path) -> Selection:
    """Recognise the kind and pick the config and weights files; 422 when one is missing."""
    for candidate in (NATIVE_CONFIG, PEFT_CONFIG, PEFT_SAFETENSORS, PEFT_PICKLE, BN_SAFETENSORS, PICKLE):
        if (raw / candidate).is_symlink():
            raise InvalidRequestError(f"{candidate}: expected a regular file, got a symbolic link")
    kind = detect_kind(raw)  # reads the config: 422 when missing or not JSON
    names: tuple[str, ...]
    if kind == "bottleneck" and (raw / NATIVE_CONFIG).is_file():
        family, config, names = "hotswap", NATIVE_CONFIG, (BN_SAFETENSORS,)
    elif kind == "bottleneck":
        family, config, names = "adapterhub", HUB_CONFIG, (BN_SAFETENSORS, PICKLE)
    else:
        family, config, names = "peft", PEFT_CONFIG, (PEFT_SAFETENSORS, PEFT_PICKLE)
    weights = next((raw / n for n in names if (raw / n).is_file()), None)
    if weights is None:
        raise AdapterFormatError("weights", f"{' or '.join(names)} next to {config}", "no such file")
    kept = {config, weights.name}
    ignored = tuple(sorted(p.name for p in _listdir(raw, "adapter folder") if p.name not in kept))
    return Selection(kind, family, raw / config, weights, names[0], ignored)


def normalise(sel: Selection, out: Path) -> dict[str, dict]:
    """Write the kept files into `out` (config as is, weights as safetensors), fsynced; their sizes and sha256."""
    out.mkdir()
    copy_file(sel.config, out / sel.config.name)
    if sel.weights.suffix == ".safetensors":
        check_safetensors_header(sel.weights)
        copy_file(sel.weights, out / sel.stored_weights)
    else:
        _pickle_to_safetensors(sel.weights, out / sel.stored_weights)
    fsync_dir(out)
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(out.iterdir())}


def _pickle_to_safetensors(src: Path, dst: Path) -> None:
    """A weights-only pickle (nothing in it is executed) rewritten as safetensors."""
    tensors = read_pickle(src)
    bad = [k for k in tensors if not isinstance(k, str)]
    if bad:
        raise AdapterFormatError(src.name, "string tensor names", _short(bad[0]))
    plain: dict[str, Tensor] = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    try:
        save_file(plain, str(dst))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise AdapterFormatError(src.name, "tensors that safetensors can hold", str(exc)[:200]) from exc
    fsync_file(dst)


# ---------------------------------------------------------------- the store


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        return self.folder(name).is_dir()

    # -- start-up --

    def recover(self, stale_after_s: float = 0.0) -> None:
        """Finish or undo what a crash interrupted: temp folders go; a replace half done rolls back or completes.

        A shared store (several servers) passes `stale_after_s`: only leftovers older than that are
        touched, so another server's upload or replace in progress is left alone.
        """
        cutoff = time.time() - stale_after_s
        for path in sorted(self.root.iterdir()):
            if path.name.startswith((TMP, DEL, OLD)) and stale_after_s and _mtime(path) > cutoff:
                continue
            if path.name.startswith((TMP, DEL)):
                log.warning("store: removing leftover %s", path.name)
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(OLD):
                name = path.name[len(OLD):].partition("-")[2]
                target = self.root / name
                if NAME_RE.fullmatch(name) and not target.exists():
                    log.warning("store: replace of %s was interrupted; keeping the previous version", name)
                    os.rename(path, target)
                else:
                    shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and not stale_after_s:
                (path / (MANIFEST + ".tmp")).unlink(missing_ok=True)
        fsync_dir(self.root)

    def manifests(self) -> list[dict]:
        """Every stored adapter's manifest (corrupt ones as stubs, see `manifest`); other folders are skipped."""
        return [m for path in sorted(self.root.iterdir()) if (m := self.manifest(path.name)) is not None]

    def manifest(self, name: str) -> dict | None:
        """One adapter's manifest, or None when no adapter folder has that name.

        A manifest must list every file of its folder with its size and sha256, and those files must
        be there with those sizes; else the name gets a stub `{"name", "status": "corrupt", "reason",
        "kind", "created_at"}`: listed, deletable, replaceable, never served.
        """
        path = self.root / name
        if not NAME_RE.fullmatch(name) or not path.is_dir():
            return None
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            return _corrupt(path, f"no readable {MANIFEST} ({type(exc).__name__})", {})
        if not isinstance(manifest, dict):
            return _corrupt(path, f"{MANIFEST} is not a JSON object", {})
        problem = _manifest_problem(name, manifest) or files_problem(path, manifest["files"])
        return manifest if problem is None else _corrupt(path, problem, manifest)

    # -- writes --

    def staging(self) -> Path:
        """A fresh temporary folder inside the store (same filesystem, so the final rename is atomic)."""
        path = self.root / f"{TMP}{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def write_manifest(self, folder: Path, manifest: dict) -> None:
        """Write (or atomically rewrite) a folder's manifest.json."""
        tmp = folder / (MANIFEST + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
        fsync_dir(folder)

    def commit(self, built: Path, name: str, replace: bool) -> None:
        """Rename a complete, fsynced folder into place as `name` (replace: old aside, new in, old removed)."""
        target = self.folder(name)
        fsync_dir(built)
        if not target.exists():
            try:
                os.rename(built, target)
            except OSError as exc:  # another server of a shared store committed the name first
                raise AdapterExistsError(f"adapter {name!r} exists; use replace=true to replace it") from exc
            fsync_dir(self.root)
            return
        if not replace:
            raise AdapterExistsError(f"adapter {name!r} exists; use replace=true to replace it")
        aside = self.root / f"{OLD}{uuid.uuid4().hex}-{name}"
        os.rename(target, aside)
        fsync_dir(self.root)
        os.rename(built, target)
        fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Delete atomically: rename aside, then remove the files."""
        target = self.folder(name)
        if not target.is_dir():
            raise AdapterNotFoundError(name)
        aside = self.root / f"{DEL}{uuid.uuid4().hex}"
        os.rename(target, aside)
        fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def verify(self, name: str, manifest: dict) -> None:
        """Check the folder against the manifest: every file listed, none missing, each sha256 (before loading)."""
        folder = self.folder(name)
        problem = _manifest_problem(name, manifest)
        if problem is not None:
            raise StoreCorruptError(f"store adapter {name}: {problem}")
        for file, meta in manifest["files"].items():
            try:
                got = sha256_file(folder / file)
            except FileNotFoundError as exc:
                raise StoreCorruptError(f"store file {name}/{file}: expected it, got no such file") from exc
            if got != meta["sha256"]:
                raise StoreCorruptError(f"store file {name}/{file}: expected sha256 {meta['sha256']}, got {got}")
        problem = files_problem(folder, manifest["files"])  # the listed files are right: any others?
        if problem is not None:
            raise StoreCorruptError(f"store adapter {name}: {problem}")


# ---------------------------------------------------------------- manifest checks

# What Entry.record() and the registry read from a manifest, and their types.
_REQUIRED = {"kind": str, "files": dict, "size_bytes": int, "created_at": (int, float), "default_mode": str,
             "source_format": str}


def _manifest_problem(name: str, manifest: dict) -> str | None:
    """Why `manifest` cannot describe adapter `name`, or None."""
    if manifest.get("name") != name:
        return f"{MANIFEST} names adapter {clip(manifest.get('name'))}"
    for key, types in _REQUIRED.items():
        if not isinstance(manifest.get(key), types) or isinstance(manifest.get(key), bool):
            return f"{MANIFEST}: expected {key}, got {clip(manifest.get(key))}"
    if manifest["kind"] not in KINDS:
        return f"{MANIFEST}: expected kind {' | '.join(KINDS)}, got {clip(manifest['kind'])}"
    modes = ("merged", "unmerged") if manifest["kind"] == "lora" else ("none",)
    if manifest["default_mode"] not in modes:
        return f"{MANIFEST}: expected default_mode {' | '.join(modes)}, got {clip(manifest['default_mode'])}"
    files = manifest["files"]
    for file, meta in files.items():
        if not _plain(file) or not _file_meta(meta):
            return f"{MANIFEST}: expected each file as {{name: {{size, sha256}}}}, got {clip(file)}: {clip(meta)}"
    if not any(f.endswith(".json") for f in files) or not any(f.endswith(".safetensors") for f in files):
        return (f"{MANIFEST}: expected a config (.json) and weights (.safetensors) among the files, "
                f"got {clip(sorted(files))}")
    return None


def files_problem(folder: Path, files: dict) -> str | None:
    """Whether the folder holds exactly the listed files at their listed sizes (cheap: no hashing)."""
    try:
        present = {p.name: p for p in _listdir(folder, "store folder") if p.name not in (MANIFEST, MANIFEST + ".tmp")}
    except (OSError, PayloadTooLargeError) as exc:
        return f"its folder cannot be listed ({type(exc).__name__})"
    unlisted = sorted(set(present) - set(files))
    if unlisted:
        return f"{clip(unlisted[0])} is not in {MANIFEST}"
    for file, meta in files.items():
        if file not in present:
            return f"{file} is missing"
        size = _file_size(present[file])
        if size != meta["size"]:
            return f"{file} has {size} bytes, {MANIFEST} says {meta['size']}"
    return None


def _corrupt(folder: Path, reason: str, manifest: dict) -> dict:
    """The stub standing for a corrupt adapter: its kind if known, its creation time (else the folder's)."""
    log.warning("store: adapter %s is corrupt: %s", folder.name, reason)
    kind, created = manifest.get("kind"), manifest.get("created_at")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        created = _mtime(folder)
    return {"name": folder.name, "status": CORRUPT, "reason": reason, "kind": kind if kind in KINDS else None,
            "created_at": created}


def _plain(file: str) -> bool:
    """A file name inside the folder: a manifest never points elsewhere."""
    return bool(file) and file not in (".", "..", MANIFEST) and not any(c in file for c in "/\\\0")


def _file_meta(meta: object) -> bool:
    size = meta.get("size") if isinstance(meta, dict) else None
    digest = meta.get("sha256") if isinstance(meta, dict) else None
    return (isinstance(size, int) and not isinstance(size, bool) and size >= 0
            and isinstance(digest, str) and _SHA256.fullmatch(digest) is not None)


def new_manifest(name: str, sel: Selection, files: dict[str, dict], details: dict, **extra) -> dict:
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "kind": sel.kind,
        "source_format": sel.source_format,
        "source_sha256": sel.source_sha256(),
        "ignored_files": list(sel.ignored),
        "files": files,
        "size_bytes": sum(f["size"] for f in files.values()),
        "details": details,
        "created_at": time.time(),
        "pinned": False,
        **extra,
    }


# ---------------------------------------------------------------- file helpers


def _listdir(folder: Path, what: str) -> list[Path]:
    """A folder's entries, at most MAX_FOLDER_FILES of them (413 beyond: each costs memory and a manifest line)."""
    entries = list(itertools.islice(folder.iterdir(), MAX_FOLDER_FILES + 1))
    if len(entries) > MAX_FOLDER_FILES:
        raise PayloadTooLargeError(f"{what}: expected at most {MAX_FOLDER_FILES} files, got more")
    return entries


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def copy_file(src: Path, dst: Path) -> None:
    with src.open("rb") as fin, dst.open("xb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
