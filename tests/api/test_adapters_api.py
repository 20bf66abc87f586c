"""The adapter API: uploads of every kind and form serve the reference outputs; hostile or broken
uploads get a 4xx naming the problem, run nothing and leave the store and the registry unchanged;
admin auth; pinning; vLLM's load/unload."""
from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from server.api.adapters import _allowed_folder
from server.errors import ForbiddenError
from tests.conftest import FIXTURES, LLAMA, live_server, references
from tests.store.helpers import (
    BN_BIN,
    BN_DOUBLE,
    BN_ST,
    BOUNDARY,
    LORA,
    LORA_ALL,
    PROMPT,
    folder_files,
    lora_config,
    multipart_head,
    multipart_tail,
    outputs,
    targz_bytes,
    upload,
    zip_bytes,
)
from tests.store.test_store import _tar_member, _zip_member

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 1_500_000
PEFT_REFS = references("peft", "tiny-llama")
HUB_REFS = references("adapterhub", "tiny-llama")


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    (root / "loras").mkdir()
    (root / "loras" / "qv").symlink_to(LORA)  # a link inside the allowed folder, to a folder outside it: refused
    target = root / "loras" / "copy"
    target.mkdir()
    for name, data in folder_files(LORA).items():
        (target / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory, allowed):
    with live_server(tmp_path_factory.mktemp("adapters_api"), model=LLAMA, admin_token=TOKEN,
                     max_upload_bytes=LIMIT, allowed_local_dir=allowed) as server:
        yield server


@pytest.fixture
def admin(srv):
    with srv.client(headers=AUTH) as c:
        yield c


def _store(srv) -> Path:
    return srv.app.state.settings.store


def _snapshot(srv, client) -> tuple:
    return client.get("/adapters").json(), sorted(str(p.relative_to(_store(srv))) for p in _store(srv).rglob("*"))


# ---------------------------------------------------------------- each kind, each form, served exactly


KINDS = [
    ("lora-qv-r8", LORA, "files", PEFT_REFS),
    ("lora-all-r16", LORA_ALL, "zip", PEFT_REFS),
    ("prompt-16", PROMPT, "files", PEFT_REFS),
    ("prompt-16", PROMPT, "tar.gz", PEFT_REFS),
    ("seq_bn-rf16", BN_BIN, "files", HUB_REFS),
    ("seq_bn-rf16", BN_BIN, "zip", HUB_REFS),
    ("double_seq_bn-rf8", BN_DOUBLE, "tar.gz", HUB_REFS),
    ("seq_bn-rf4-st", BN_ST, "files", HUB_REFS),
]


@pytest.mark.parametrize("ref_name,folder,form,refs", KINDS, ids=[f"{k[0]}-{k[2]}" for k in KINDS])
def test_upload_then_generate_matches_reference(srv, admin, ref_name, folder, form, refs):
    name = f"{ref_name}.{form}"
    files = folder_files(folder)
    if form == "files":
        r = upload(admin, name, files=files)
    elif form == "zip":
        r = upload(admin, name, archive=zip_bytes(files, top=ref_name))
    else:
        r = upload(admin, name, archive=targz_bytes(files), archive_name="a.tar.gz")
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["name"] == name and record["resident"] is False and record["size_bytes"] > 0
    assert record["kind"] == ("lora" if "lora" in ref_name else "prompt" if "prompt" in ref_name else "bottleneck")
    assert all(f.endswith((".json", ".safetensors")) for f in record["files"])  # .bin came in, safetensors stored
    expected = refs["adapters"][ref_name]["outputs"]
    assert outputs(srv, name, refs["prompts"]) == expected
    if record["kind"] == "lora":
        assert outputs(srv, name, refs["prompts"], mode="merged") == expected
    assert admin.get(f"/adapters/{name}").json()["resident"] is True


def test_bin_upload_is_converted(admin):
    r = upload(admin, "converted", files=folder_files(BN_BIN))
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["source_format"] == "adapterhub/bin"
    assert set(rec["files"]) == {"adapter_config.json", "adapter.safetensors"}
    assert rec["details"]["reduction_factor"] == 16


def test_upload_does_not_block_generation(srv, admin):
    """The event loop keeps answering while an upload streams in slowly."""
    body = [multipart_head("slow", "adapter_config.json"), (LORA / "adapter_config.json").read_bytes(), multipart_tail()]
    with srv.client(headers={**AUTH, "content-type": f"multipart/form-data; boundary={BOUNDARY}"}) as c:
        gate = threading.Event()

        def gated():
            yield body[0]
            gate.wait(30)
            yield from body[1:]

        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", c.post("/adapters", content=gated())))
        t.start()
        try:
            assert srv.generate(prompt_token_ids=[5, 6], max_new_tokens=3)["usage"]["completion_tokens"] == 3
        finally:
            gate.set()
            t.join(30)
    assert result["r"].status_code == 422  # config only, no weights
    assert "weights" in result["r"].json()["error"]["message"]


def test_replace_requires_flag_and_default_mode(srv, admin):
    assert upload(admin, "swap", files=folder_files(PROMPT)).status_code == 201
    r = upload(admin, "swap", files=folder_files(LORA), default_mode="merged")
    assert r.status_code == 409 and r.json()["error"]["type"] == "adapter_exists"
    r = upload(admin, "swap", files=folder_files(LORA), default_mode="merged", replace=True)
    assert r.status_code == 201 and r.json()["kind"] == "lora" and r.json()["default_mode"] == "merged"
    out = srv.generate("swap", prompt_token_ids=PEFT_REFS["prompts"][0], max_new_tokens=12)
    assert out["mode"] == "merged" and out["token_ids"] == PEFT_REFS["adapters"]["lora-qv-r8"]["outputs"][0]


def test_an_adapter_may_not_take_the_base_models_name(srv, admin):
    """`model: <base name>` means the base model on the OpenAI API: an adapter of that name could
    never be reached there, so it is refused, by upload and by vLLM's load alike."""
    base = srv.app.state.generation.base.name
    before = _snapshot(srv, admin)
    r = upload(admin, base, files=folder_files(LORA))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"
    assert "base model" in r.json()["error"]["message"]
    assert admin.post("/v1/load_lora_adapter", json={"lora_name": base, "lora_path": "loras/copy"}).status_code == 400
    assert _snapshot(srv, admin) == before


def test_list_get_delete(srv, admin):
    assert upload(admin, "short-lived", files=folder_files(PROMPT)).status_code == 201
    names = [a["name"] for a in admin.get("/adapters").json()["adapters"]]
    assert "short-lived" in names
    rec = admin.get("/adapters/short-lived").json()
    assert {"name", "kind", "default_mode", "resident", "size_bytes", "created_at", "pinned", "in_use"} <= set(rec)
    assert admin.delete("/adapters/short-lived").json() == {"deleted": "short-lived"}
    r = admin.get("/adapters/short-lived")
    assert r.status_code == 404 and r.json()["error"]["type"] == "adapter_not_found"
    with srv.client() as c:
        assert c.post("/generate", params={"adapter": "short-lived"}, json={"prompt": "x"}).status_code == 404
    assert admin.delete("/adapters/short-lived").status_code == 404
    assert not (_store(srv) / "short-lived").exists()


def test_pin_and_unpin(srv, admin):
    assert upload(admin, "pinme", files=folder_files(PROMPT)).status_code == 201
    rec = admin.post("/adapters/pinme/pin").json()
    assert rec["pinned"] is True and rec["resident"] is True and rec["memory_bytes"] == 16 * 256 * 4
    assert json.loads((_store(srv) / "pinme" / "manifest.json").read_text())["pinned"] is True
    rec = admin.delete("/adapters/pinme/pin").json()
    assert rec["pinned"] is False
    assert admin.post("/adapters/nope/pin").status_code == 404



def test_replacing_a_pinned_adapter_deleted_meanwhile_answers_201(srv, admin, monkeypatch):
    """The replace registers, then loads the new version to keep it pinned; a delete landing between
    the two wins, and the upload, which committed, still answers 201 (it answered 404)."""
    assert upload(admin, "pinrace", files=folder_files(PROMPT)).status_code == 201
    assert admin.post("/adapters/pinrace/pin").status_code == 200
    registry, real = srv.app.state.registry, srv.app.state.registry.pin

    async def pin_after_a_delete(name: str, pinned: bool = True):
        await asyncio.to_thread(registry.unregister, name)
        return await real(name, pinned)

    monkeypatch.setattr(registry, "pin", pin_after_a_delete)
    r = upload(admin, "pinrace", files=folder_files(PROMPT), replace=True)
    assert r.status_code == 201 and r.json()["name"] == "pinrace", r.text
    assert admin.get("/adapters/pinrace").status_code == 404  # the delete came after it

# ---------------------------------------------------------------- admin auth


CHANGING = [
    ("POST", "/adapters"), ("DELETE", "/adapters/x"), ("POST", "/adapters/x/pin"), ("DELETE", "/adapters/x/pin"),
    ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
]


@pytest.mark.parametrize("method,path", CHANGING)
def test_admin_token_required(srv, method, path):
    with srv.client() as c:
        missing = c.request(method, path)
        wrong = c.request(method, path, headers={"Authorization": "Bearer nope"})
    # /v1 routes answer in OpenAI's error shape: our type is its `code`
    key = "code" if path.startswith("/v1/") else "type"
    assert missing.status_code == 401 and missing.json()["error"][key] == "unauthorized"
    assert wrong.status_code == 403 and wrong.json()["error"][key] == "forbidden"


def test_reads_need_no_token(srv):
    with srv.client() as c:
        assert c.get("/adapters").status_code == 200


# ---------------------------------------------------------------- vLLM load/unload


def test_vllm_load_and_unload(srv, admin):
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "from-disk", "lora_path": "loras/copy"})
    assert r.status_code == 200, r.text
    assert r.json()["source"].startswith("local:")
    assert outputs(srv, "from-disk", PEFT_REFS["prompts"], mode="merged") == PEFT_REFS["adapters"]["lora-qv-r8"]["outputs"]
    assert admin.post("/v1/load_lora_adapter", json={"lora_name": "from-disk", "lora_path": "loras/copy"}).status_code == 409
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "from-disk", "lora_path": "loras/copy", "load_inplace": True})
    assert r.status_code == 200
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "from-disk"}).json() == {"deleted": "from-disk"}
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "from-disk"}).status_code == 404


@pytest.mark.parametrize("path,status,needle", [
    ("../", 403, "inside --allowed-local-dir"),
    (str(LORA), 403, "inside --allowed-local-dir"),
    ("loras/qv", 403, "inside --allowed-local-dir"),  # a symbolic link out of the allowed folder
    ("loras/missing", 400, "no such path"),
    ("loras/copy/adapter_config.json", 400, "a file"),
])
def test_vllm_load_refuses_paths(srv, admin, path, status, needle):
    before = _snapshot(srv, admin)
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": path})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert str(srv.app.state.settings.allowed_local_dir.resolve()) not in r.text  # no server paths shown
    assert _snapshot(srv, admin) == before


def test_vllm_load_off_without_allowed_dir():
    with pytest.raises(ForbiddenError, match="--allowed-local-dir"):
        _allowed_folder(None, "/tmp")


# ---------------------------------------------------------------- hostile and broken uploads


class Planted:
    """Unpickling this with arbitrary globals would create MARKER."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_file(marker: Path, legacy: bool) -> bytes:
    obj = Planted()
    obj.marker = str(marker)
    if legacy:
        return pickle.dumps({"base_model.model.x": obj})
    buf = io.BytesIO()
    torch.save({"base_model.model.x": obj}, buf)
    return buf.getvalue()


def _lora_tensors(**edit) -> bytes:
    tensors = safetensors.torch.load_file(LORA / "adapter_model.safetensors")
    for key, value in edit.items():
        name = next(k for k in tensors if key in k)
        tensors[name] = tensors[name].clone().fill_(value)
    return safetensors.torch.save(tensors)


LORA_FILES = folder_files(LORA)
WEIGHTS = LORA_FILES["adapter_model.safetensors"]


def _zip_headers(edit) -> bytes:
    """The LoRA's files zipped (deflated), `edit(data, offset)` applied at each local and central header."""
    data = bytearray(zip_bytes(LORA_FILES, top=None))
    for signature, to_flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = 0
        while (at := data.find(signature, at)) >= 0:
            edit(data, at + to_flags)  # flags, then the compression method 2 bytes on
            at += 4
    return bytes(data)


def _zip_method(method: int) -> bytes:
    return _zip_headers(lambda data, flags: struct.pack_into("<H", data, flags + 2, method))


def _zip_bad_name() -> bytes:
    """A member name flagged UTF-8 that is not."""
    data = bytearray(_zip_headers(lambda data, flags: struct.pack_into("<H", data, flags, 0x800)))
    central = data.find(b"PK\x01\x02")
    data[central + 46] = 0xFF  # the name's first byte
    return bytes(data)


def _hostile(marker: Path):
    """(id, upload kwargs, status, error type, needle in the message)."""
    gpt2_lora = folder_files(FIXTURES / "peft/tiny-gpt2/lora-cattn-r8")
    prompt_cfg = json.loads((PROMPT / "adapter_config.json").read_text())
    return [
        *[(f"name-{i}", {"name": n, "files": LORA_FILES}, 400, "invalid_request", "name: expected")
          for i, n in enumerate(["", "../x", ".x", "a/b", "x" * 129, "a b", "-a"])],
        ("no-name", {"name": None, "files": LORA_FILES}, 400, "invalid_request", "name: expected"),
        ("zip-dotdot", {"archive": _zip_member("../adapter_config.json", b"{}")}, 400, "invalid_request", "'..'"),
        ("zip-absolute", {"archive": _zip_member("/tmp/adapter_config.json", b"{}")}, 400, "invalid_request", "absolute"),
        ("zip-symlink", {"archive": _zip_member("adapter_config.json", b"/etc/passwd", 0o120777)}, 400,
         "invalid_request", "symbolic link"),
        ("tar-symlink", {"archive": _tar_member("adapter_config.json", tarfile.SYMTYPE, "/etc/passwd")}, 400,
         "invalid_request", "link"),
        ("tar-hardlink", {"archive": _tar_member("adapter_config.json", tarfile.LNKTYPE, "/etc/passwd")}, 400,
         "invalid_request", "link"),
        ("tar-dotdot", {"archive": _tar_member("a/../../x")}, 400, "invalid_request", "'..'"),
        ("too-many-files", {"archive": zip_bytes({f"f{i}": b"" for i in range(65)})}, 413, "payload_too_large",
         "at most 64"),
        ("zip-bomb", {"archive": zip_bytes({**LORA_FILES, "zeros": bytes(3 * LIMIT)})}, 413, "payload_too_large",
         "decompressed"),
        ("targz-bomb", {"archive": targz_bytes({"zeros": bytes(3 * LIMIT)})}, 413, "payload_too_large", "decompressed"),
        ("not-an-archive", {"archive": b"plain text"}, 400, "invalid_request", ".zip or .tar.gz"),
        *[(f"zip-method-{m}", {"archive": _zip_method(m)}, 400, "invalid_request", "stored or deflated")
          for m in (9, 12, 14, 99)],  # deflate64, bzip2, lzma, AES: zipfile reads some, not all
        ("zip-bad-utf8-name", {"archive": _zip_bad_name()}, 400, "invalid_request", "broken"),
        ("too-large", {"files": {**LORA_FILES, "big.bin": os.urandom(LIMIT)}}, 413, "payload_too_large",
         "--max-upload-bytes"),
        ("both-forms", {"files": LORA_FILES, "archive": zip_bytes(LORA_FILES)}, 400, "invalid_request", "both"),
        ("neither-form", {}, 400, "invalid_request", "neither"),
        ("path-filename", {"files": {"../adapter_config.json": b"{}"}}, 400, "invalid_request", "plain file name"),
        ("no-config", {"files": {"adapter_model.safetensors": WEIGHTS}}, 422, "invalid_adapter", "adapter_config.json"),
        ("config-not-json", {"files": {**LORA_FILES, "adapter_config.json": b"{not json"}}, 422, "invalid_adapter",
         "JSON"),
        ("no-weights", {"files": {"adapter_config.json": LORA_FILES["adapter_config.json"]}}, 422, "invalid_adapter",
         "weights"),
        ("truncated-safetensors", {"files": {**LORA_FILES, "adapter_model.safetensors": WEIGHTS[: len(WEIGHTS) // 2]}},
         422, "invalid_adapter", "truncated"),
        ("corrupt-safetensors", {"files": {**LORA_FILES, "adapter_model.safetensors": b"\xff" * 64}}, 422,
         "invalid_adapter", "safetensors"),
        ("planted-pickle", {"files": {"adapter_config.json": LORA_FILES["adapter_config.json"],
                                      "adapter_model.bin": _pickle_file(marker, legacy=False)}}, 422,
         "invalid_adapter", "adapter_model.bin"),
        ("planted-legacy-pickle", {"files": {"adapter_config.json": LORA_FILES["adapter_config.json"],
                                             "adapter_model.bin": _pickle_file(marker, legacy=True)}}, 422,
         "invalid_adapter", "adapter_model.bin"),
        ("planted-pickle-bottleneck", {"files": {**folder_files(BN_BIN), "pytorch_adapter.bin": _pickle_file(marker, False)}},
         422, "invalid_adapter", "pytorch_adapter.bin"),
        ("other-base-shapes", {"files": gpt2_lora}, 422, "invalid_adapter", "expected"),
        ("unknown-module", {"files": {**LORA_FILES, "adapter_config.json": lora_config(target_modules=["nope_proj"])}},
         422, "invalid_adapter", "target_modules"),
        ("prompt-token-dim", {"files": {**folder_files(PROMPT), "adapter_config.json":
                                        json.dumps({**prompt_cfg, "token_dim": 128}).encode()}}, 422,
         "invalid_adapter", "token_dim"),
        ("nan", {"files": {**LORA_FILES, "adapter_model.safetensors": _lora_tensors(lora_A=float("nan"))}}, 422,
         "invalid_adapter", "finite"),
        ("inf", {"files": {**LORA_FILES, "adapter_model.safetensors": _lora_tensors(lora_B=float("inf"))}}, 422,
         "invalid_adapter", "finite"),
        ("unsupported-option", {"files": {**LORA_FILES, "adapter_config.json": lora_config(modules_to_save=["lm_head"])}},
         422, "invalid_adapter", "modules_to_save"),
        ("bad-default-mode", {"files": LORA_FILES, "default_mode": "sideways"}, 400, "invalid_request", "default_mode"),
        ("merged-prompt", {"files": folder_files(PROMPT), "default_mode": "merged"}, 400, "invalid_request",
         "LoRA adapters only"),
        ("duplicate", {"name": "existing", "files": LORA_FILES}, 409, "adapter_exists", "replace=true"),
    ]


MARKER_DIR = Path(os.environ.get("TMPDIR", "/tmp"))
MARKER = MARKER_DIR / f"hotswap-planted-{os.getpid()}"
HOSTILE = _hostile(MARKER)


@pytest.fixture(scope="module")
def existing(srv):
    with srv.client(headers=AUTH) as c:
        assert upload(c, "existing", files=LORA_FILES).status_code == 201


@pytest.mark.parametrize("case", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_upload(srv, admin, existing, case):
    _, kwargs, status, type_, needle = case
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "victim")
    before = _snapshot(srv, admin)
    r = upload(admin, name, **{"archive_name": "a", **kwargs})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"type", "message"} and err["type"] == type_
    assert needle in err["message"], err["message"]
    assert not MARKER.exists(), "a planted pickle ran"
    assert _snapshot(srv, admin) == before
    assert srv.generate(prompt_token_ids=[5, 6], max_new_tokens=2)["usage"]["completion_tokens"] == 2


def test_oversized_streamed_body_refused_while_reading(srv, admin):
    """A chunked body with no Content-Length is cut off at the limit, not buffered."""
    before = _snapshot(srv, admin)
    sent = []

    def endless():
        yield multipart_head("stream", "adapter_model.safetensors")
        while len(sent) < 4 * LIMIT // 65536:  # stops on its own if the server never refuses
            sent.append(1)
            yield bytes(65536)
        yield multipart_tail()

    headers = {**AUTH, "content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    try:
        r = admin.post("/adapters", content=endless(), headers=headers)
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still sending
    assert _snapshot(srv, admin) == before
    assert srv.generate(prompt_token_ids=[5], max_new_tokens=2)["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("kwargs,needle", [
    ({"content": b'{"name": "x"}', "headers": {"content-type": "application/json"}}, "multipart/form-data"),
    ({"content": b"--b\r\n", "headers": {"content-type": "multipart/form-data"}}, "boundary parameter"),
    ({"data": {"name": "x", "colour": "blue"}, "files": [("files", ("a", b""))]}, "colour"),
])
def test_malformed_forms(srv, admin, kwargs, needle):
    before = _snapshot(srv, admin)
    r = admin.post("/adapters", **kwargs)
    assert r.status_code == 400 and needle in r.json()["error"]["message"]
    assert _snapshot(srv, admin) == before
