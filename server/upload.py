"""Receiving an adapter upload: a multipart body streamed to disk under a byte limit; archives unpacked safely.

    form = await receive(request, staging, limit)      # fields + files written under staging/
    folder = form.folder or unpack(form.archive, ...)  # archives: worker thread

Nothing is buffered whole in memory: each chunk is parsed and written in a worker thread as it
arrives, and the body is refused (413) as soon as it passes `limit`. Archive members are checked
before a byte is written: no absolute paths, no `..`, no links or devices, at most MAX_FILES
members, at most `limit` bytes once decompressed (counted while decompressing, not trusted from
headers); the files sit at the archive's root or inside one top folder.
"""
from __future__ import annotations

import asyncio
import gzip
import io
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from server.adapters.weights import declared_zip_entries
from server.errors import InvalidRequestError, PayloadTooLargeError, clip

MAX_FILES = 64  # files in one upload, as parts or archive members
MAX_FIELD_BYTES = 1024
FIELDS = ("name", "default_mode")
CHUNK = 1 << 20


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None  # where the `files` parts were written, if any
    archive: Path | None = None  # the `archive` part, if any
    n_files: int = 0


def check_filename(name: str, what: str) -> str:
    """A plain file name: no folders, no `.`/`..`, no control characters."""
    if not name or name in (".", "..") or len(name) > 255 or any(c in name for c in "/\\\0") or not name.isprintable():
        raise InvalidRequestError(f"{what}: expected a plain file name, got {clip(name)}")
    return name


# ---------------------------------------------------------------- multipart


async def receive(request: Request, staging: Path, limit: int) -> Form:
    """Stream a multipart/form-data body into `staging` (files/ and archive); 413 past `limit` bytes."""
    mime, params = parse_options_header(request.headers.get("content-type"))
    if mime != b"multipart/form-data":
        raise InvalidRequestError(f"body: expected multipart/form-data, got {mime.decode('latin-1') or 'no content type'}")
    if not params.get(b"boundary"):
        raise InvalidRequestError("content-type: expected multipart/form-data with its boundary parameter, got none")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"upload: expected at most {limit} bytes (--max-upload-bytes), got {declared}")
    sink = _Sink(staging, params[b"boundary"])
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise PayloadTooLargeError(f"upload: expected at most {limit} bytes (--max-upload-bytes), got more")
            if chunk:
                await asyncio.to_thread(sink.write, chunk)
        sink.finish()
    except ClientDisconnect as exc:
        raise InvalidRequestError(f"body: expected {declared or 'the whole body'} bytes, the client left after {received}") from exc
    finally:
        sink.close()
    return sink.form


class _Sink:
    """python-multipart callbacks: small fields into memory, file parts onto disk."""

    def __init__(self, staging: Path, boundary: bytes) -> None:
        self.staging = staging
        self.form = Form()
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = bytearray(), bytearray()
        self._out: io.BufferedWriter | None = None
        self._text: bytearray | None = None
        self._text_name = ""
        self._ended = False
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._open, "on_part_data": self._data, "on_part_end": self._end,
            "on_end": self._finished,
        })

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidRequestError(f"body: expected a well-formed multipart body, got {exc}") from exc

    def finish(self) -> None:
        self.write(b"")
        if not self._ended:
            raise InvalidRequestError("body: expected a complete multipart body, got one cut short")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    # -- callbacks --

    def _begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def _open(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition"))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if name in FIELDS and filename is None:
            if name in self.form.fields:
                raise InvalidRequestError(f"{name}: expected one form field, got several")
            self._text, self._text_name = bytearray(), name
            self.form.fields[name] = ""
        elif name == "files":
            self._open_file(filename)
        elif name == "archive":
            if self.form.archive is not None:
                raise InvalidRequestError("archive: expected one archive part, got several")
            self.form.archive = self.staging / "archive"
            self._out = self.form.archive.open("xb")
        else:
            raise InvalidRequestError(f"form: expected the fields name, default_mode, files or archive, got {clip(name)}")
        if self.form.archive is not None and self.form.folder is not None:
            raise InvalidRequestError("form: expected either files parts or one archive part, got both")

    def _open_file(self, filename: bytes | None) -> None:
        if filename is None:
            raise InvalidRequestError("files: expected a file part with a filename, got a plain field")
        try:
            text = filename.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"files: expected a UTF-8 file name, got {clip(filename)}") from exc
        check_filename(text, "files")
        self.form.n_files += 1
        if self.form.n_files > MAX_FILES:
            raise PayloadTooLargeError(f"files: expected at most {MAX_FILES} files, got more")
        if self.form.folder is None:
            self.form.folder = self.staging / "files"
            self.form.folder.mkdir()
        try:
            self._out = (self.form.folder / text).open("xb")
        except FileExistsError as exc:
            raise InvalidRequestError(f"files: expected each file once, got {clip(text)} twice") from exc

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise InvalidRequestError(f"form field: expected at most {MAX_FIELD_BYTES} bytes, got more")

    def _end(self) -> None:
        if self._text is not None:
            self.form.fields[self._text_name] = self._text.decode("utf-8", "replace").strip()
            self._text = None
        self.close()

    def _finished(self) -> None:
        self._ended = True


# ---------------------------------------------------------------- archives


def unpack(archive: Path, dest: Path, limit: int) -> Path:
    """Extract a .zip or .tar(.gz) into `dest` (flat); returns `dest`. Blocking: run in a worker thread."""
    with archive.open("rb") as f:
        magic = f.read(4)
    dest.mkdir()
    members: list[tuple[str, Path]] = []
    budget = _Budget(limit)
    try:
        if magic.startswith(b"PK"):
            _unzip(archive, dest, budget, members)
        else:
            _untar(archive, magic, dest, budget, members)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"archive: expected a valid .zip or .tar.gz, got a broken one ({exc})") from exc
    _flatten(dest, members)
    return dest


@dataclass
class _Budget:
    limit: int
    used: int = 0
    count: int = 0

    def member(self) -> None:
        self.count += 1
        if self.count > MAX_FILES:
            raise PayloadTooLargeError(f"archive: expected at most {MAX_FILES} members, got more")

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise PayloadTooLargeError(f"archive: expected at most {self.limit} bytes once decompressed "
                                       "(--max-upload-bytes), got more")


def _member_path(name: str) -> PurePosixPath:
    """A safe relative path from an archive member name, or 400."""
    if "\\" in name or "\0" in name:
        raise InvalidRequestError(f"archive member {clip(name)}: expected a '/'-separated relative path")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise InvalidRequestError(f"archive member {clip(name)}: expected a relative path, got an absolute one")
    if ".." in path.parts:
        raise InvalidRequestError(f"archive member {clip(name)}: expected a path inside the archive, got '..'")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        raise InvalidRequestError(f"archive member {clip(name)}: expected a file name")
    return PurePosixPath(*parts)


ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what zip tools write by default; others are refused


def _unzip(archive: Path, dest: Path, budget: _Budget, members: list) -> None:
    if declared_zip_entries(archive) > MAX_FILES:  # each parsed entry costs memory: refuse before parsing
        raise PayloadTooLargeError(f"archive: expected at most {MAX_FILES} members, got more")
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            budget.member()
        if sum(info.file_size for info in infos) > budget.limit:  # declared sizes: refuse early
            budget.take(sum(info.file_size for info in infos))
        for info in infos:
            path = _member_path(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidRequestError(f"archive member {clip(info.filename)}: expected a file, got a symbolic link")
            if info.is_dir():
                continue
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                raise InvalidRequestError(f"archive member {clip(info.filename)}: expected a regular file")
            if info.flag_bits & 0x1:
                raise InvalidRequestError(f"archive member {clip(info.filename)}: expected no encryption")
            if info.compress_type not in ZIP_METHODS:
                raise InvalidRequestError(f"archive member {clip(info.filename)}: expected it stored or deflated, "
                                          f"got compression method {info.compress_type}")
            with zf.open(info) as src:
                members.append((str(path), _copy(src, dest, len(members), budget)))


def _untar(archive: Path, magic: bytes, dest: Path, budget: _Budget, members: list) -> None:
    raw = archive.open("rb")
    stream = gzip.GzipFile(fileobj=raw) if magic.startswith(b"\x1f\x8b") else raw
    # streaming mode: members are read in order from a byte-counted stream, never seeked
    counted = _Counted(stream, budget.limit + (1 << 20))
    try:
        with tarfile.open(fileobj=counted, mode="r|") as tf:
            for member in tf:
                budget.member()
                path = _member_path(member.name)
                if member.issym() or member.islnk():
                    raise InvalidRequestError(f"archive member {clip(member.name)}: expected a file, got a link")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise InvalidRequestError(f"archive member {clip(member.name)}: expected a regular file or folder")
                src = tf.extractfile(member)
                members.append((str(path), _copy(src, dest, len(members), budget)))
    finally:
        raw.close()


class _Counted(io.RawIOBase):
    """A read-only stream that refuses (413) to yield more than `limit` decompressed bytes."""

    def __init__(self, inner, limit: int) -> None:
        self.inner, self.limit, self.read_bytes = inner, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise PayloadTooLargeError(f"archive: expected at most {self.limit} bytes once decompressed, got more")
        buffer[: len(data)] = data
        return len(data)


def _copy(src, dest: Path, index: int, budget: _Budget) -> Path:
    out = dest / f".member-{index}"
    with out.open("xb") as f:
        while block := src.read(CHUNK):
            budget.take(len(block))
            f.write(block)
    return out


def _flatten(dest: Path, members: list[tuple[str, Path]]) -> None:
    """Give the extracted files their names: at the root, or inside one top folder (dropped)."""
    members = [(n, p) for n, p in members if not n.startswith("__MACOSX/")]
    paths = [PurePosixPath(n) for n, _ in members]
    if not paths:
        raise InvalidRequestError("archive: expected the adapter's files, got an empty archive")
    tops = {p.parts[0] for p in paths}
    if all(len(p.parts) == 1 for p in paths):
        names = [p.name for p in paths]
    elif len(tops) == 1 and all(len(p.parts) == 2 for p in paths):
        names = [p.parts[1] for p in paths]
    else:
        raise InvalidRequestError("archive: expected the files at its root or inside one top folder, got "
                                  f"{clip(sorted(str(p) for p in paths)[:5])}")
    if len(set(names)) != len(names):
        raise InvalidRequestError("archive: expected each file once, got duplicates")
    for name, (_, tmp) in zip(names, members):
        check_filename(name, "archive member")
        tmp.rename(dest / name)
    for leftover in dest.glob(".member-*"):
        leftover.unlink()
