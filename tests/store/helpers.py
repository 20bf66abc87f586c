"""Building uploads for the adapter API tests: file parts, archives, raw multipart bodies."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import httpx

from tests.conftest import FIXTURES

LORA = FIXTURES / "peft/tiny-llama/lora-qv-r8"
LORA_ALL = FIXTURES / "peft/tiny-llama/lora-all-r16"
PROMPT = FIXTURES / "peft/tiny-llama/prompt-16"
BN_BIN = FIXTURES / "adapterhub/tiny-llama/seq_bn-rf16"
BN_DOUBLE = FIXTURES / "adapterhub/tiny-llama/double_seq_bn-rf8"
BN_ST = FIXTURES / "adapterhub/tiny-llama/seq_bn-rf4-st"
BOUNDARY = "hotswap-test-boundary"


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def file_parts(files: dict[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (name, data)) for name, data in files.items()]


def zip_bytes(files: dict[str, bytes], top: str | None = "adapter") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{top}/{name}" if top else name, data)
    return buf.getvalue()


def targz_bytes(files: dict[str, bytes], top: str | None = None, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return buf.getvalue()


def upload(client: httpx.Client, name: str | None, *, files: dict[str, bytes] | None = None,
           archive: bytes | None = None, archive_name: str = "adapter.zip", replace: bool = False,
           default_mode: str | None = None, headers: dict | None = None) -> httpx.Response:
    data = {} if name is None else {"name": name}
    if default_mode:
        data["default_mode"] = default_mode
    parts = file_parts(files) if files else []
    if archive is not None:
        parts.append(("archive", (archive_name, archive)))
    if not parts:  # still multipart/form-data, fields only
        parts, data = [(k, (None, v)) for k, v in data.items()], {}
    params = {"replace": "true"} if replace else {}
    return client.post("/adapters", data=data, files=parts, params=params, headers=headers or {})


def multipart_head(name: str, filename: str) -> bytes:
    """The start of a multipart body: the name field, then the headers of one `files` part."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def multipart_tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


def lora_config(**changes) -> bytes:
    cfg = json.loads((LORA / "adapter_config.json").read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


def listing(store: Path) -> list[str]:
    """Every path under the store, relative (to compare before and after)."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*"))


def outputs(srv, adapter: str | None, prompts: list[list[int]], n: int = 12, **body) -> list[list[int]]:
    return [srv.generate(adapter, prompt_token_ids=p, max_new_tokens=n, ignore_eos=True, **body)["token_ids"]
            for p in prompts]
