"""Store integrity: a manifest lists every file with its checksum, or the adapter is `corrupt`:
listed (with a reason), deletable, replaceable, never served; what a client sees in each case."""
from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import zipfile

import pytest

from server.adapters import registry as registry_module
from server.adapters.registry import Registry
from server.adapters.weights import declared_zip_entries
from server.errors import AdapterNotFoundError, PayloadTooLargeError
from server.metrics import Metrics
from server.model import load_base_model
from server.store import MAX_FOLDER_FILES, Store, select
from server.upload import unpack
from tests.conftest import LLAMA, live_server, references
from tests.store.helpers import LORA, PROMPT, folder_files, outputs, upload

PEFT = references("peft", "tiny-llama")
LORA_OUT = PEFT["adapters"]["lora-qv-r8"]["outputs"]


def _edit_manifest(folder, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _weights_doubled(folder) -> None:
    """Weights that load and run, but are not the ones uploaded (served only if nothing checks)."""
    import safetensors.torch
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file({k: 2 * v for k, v in tensors.items()}, path)


TAMPER = {
    "empty-files": lambda f: (_edit_manifest(f, lambda m: m.update(files={})), _weights_doubled(f)),
    "no-files": lambda f: (_edit_manifest(f, lambda m: m.pop("files")), _weights_doubled(f)),
    "not-json": lambda f: (f / "manifest.json").write_text("{half"),
    "no-created-at": lambda f: _edit_manifest(f, lambda m: m.pop("created_at")),
    "unknown-kind": lambda f: _edit_manifest(f, lambda m: m.update(kind="adalora")),
    "unknown-mode": lambda f: _edit_manifest(f, lambda m: m.update(default_mode="sideways")),
    "outside-file": lambda f: _edit_manifest(f, lambda m: m["files"].update(
        {"../good/adapter_config.json": m["files"]["adapter_config.json"]})),
    "extra-file": lambda f: (f / "notes.txt").write_text("not listed"),
    "gone": lambda f: (f / "adapter_model.safetensors").unlink(),
}
REASONS = {
    "empty-files": "a config (.json) and weights (.safetensors)", "no-files": "expected files",
    "not-json": "no readable manifest.json", "no-created-at": "expected created_at",
    "unknown-kind": "expected kind", "unknown-mode": "expected default_mode merged | unmerged", "outside-file": "{name: {size, sha256}}",
    "extra-file": "'notes.txt' is not in manifest.json", "gone": "adapter_model.safetensors is missing",
}


@pytest.fixture(scope="module")
def base():
    return load_base_model(LLAMA, "cpu", "float32")


@pytest.fixture
def tampered(base, tmp_path):
    """A store with one sound LoRA and one copy of it per way a manifest or its folder can be broken."""
    store = Store(tmp_path / "store")
    reg = Registry(base, Metrics(), store)
    reg.open()
    for name in ("good", *TAMPER):
        reg.import_folder(name, LORA, source="test")
    for name, tamper in TAMPER.items():
        tamper(store.root / name)
    return tmp_path


def test_broken_manifests_are_listed_corrupt_deletable_replaceable_never_served(tampered):
    with live_server(tampered, model=LLAMA) as srv, srv.client() as c:
        r = c.get("/adapters")
        assert r.status_code == 200
        records = {a["name"]: a for a in r.json()["adapters"]}
        assert sorted(records) == sorted(["good", *TAMPER])
        assert records["good"]["status"] == "ok" and "reason" not in records["good"]
        for name, needle in REASONS.items():
            assert records[name]["status"] == "corrupt", name
            assert needle in records[name]["reason"], (name, records[name]["reason"])
            assert str(tampered) not in records[name]["reason"]
        assert records["empty-files"]["kind"] == "lora" and records["not-json"]["kind"] is None
        assert isinstance(records["not-json"]["created_at"], float)  # the folder's time when the manifest lost it
        models = c.get("/v1/models")
        assert models.status_code == 200 and "gone" in {m["id"] for m in models.json()["data"]}

        for name in TAMPER:
            r = c.post("/generate", params={"adapter": name}, json={"prompt": "x", "max_new_tokens": 2})
            assert r.status_code == 500, (name, r.text)
            error = r.json()["error"]
            assert error["type"] == "store_corrupt" and name in error["message"] and "replace=true" in error["message"]
            assert str(tampered) not in error["message"]
        assert c.get("/adapters/gone").json()["status"] == "corrupt"
        assert outputs(srv, "good", PEFT["prompts"]) == LORA_OUT

        assert c.delete("/adapters/not-json").status_code == 200
        assert c.get("/adapters/not-json").status_code == 404
        assert not (srv.app.state.settings.store / "not-json").exists()
        assert upload(c, "empty-files", files=folder_files(LORA)).status_code == 409
        r = upload(c, "empty-files", files=folder_files(LORA), replace=True)
        assert r.status_code == 201 and r.json()["status"] == "ok"
        assert outputs(srv, "empty-files", PEFT["prompts"]) == LORA_OUT


def test_files_changed_while_running_are_reported_and_never_served(tmp_path, monkeypatch):
    with live_server(tmp_path, model=LLAMA) as srv, srv.client() as c:
        store = srv.app.state.settings.store
        for name, src in (("deleted", LORA), ("changed", PROMPT)):
            assert upload(c, name, files=folder_files(src)).status_code == 201

        (store / "deleted" / "adapter_model.safetensors").unlink()
        record = c.get("/adapters/deleted").json()
        assert record["status"] == "corrupt" and record["reason"] == "adapter_model.safetensors is missing"
        r = c.post("/generate", params={"adapter": "deleted"}, json={"prompt": "x", "max_new_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "store_corrupt"
        assert str(store) not in r.text and "adapter_model.safetensors" in r.text

        weights = store / "changed" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-4:] = b"\0\0\0\0"  # same size: only the checksum tells
        weights.write_bytes(bytes(data))
        assert c.get("/adapters/changed").json()["status"] == "ok"  # listing does not hash
        r = c.post("/generate", params={"adapter": "changed"}, json={"prompt": "x", "max_new_tokens": 2})
        assert r.status_code == 500 and "sha256" in r.json()["error"]["message"]
        record = c.get("/adapters/changed").json()
        assert record["status"] == "corrupt" and "sha256" in record["reason"]  # the failed load is remembered
        assert upload(c, "changed", files=folder_files(PROMPT), replace=True).json()["status"] == "ok"
        assert outputs(srv, "changed", PEFT["prompts"]) == PEFT["adapters"]["prompt-16"]["outputs"]

        def boom(folder, base):
            raise ValueError(f"cannot parse {folder / 'adapter_config.json'}")

        monkeypatch.setattr(registry_module, "read_adapter", boom)
        r = upload(c, "paths", files=folder_files(LORA))
        assert r.status_code == 422 and "cannot parse adapter_config.json" in r.json()["error"]["message"]
        assert str(store) not in r.text


def test_delete_racing_a_first_use_load_answers_404(base, tmp_path):
    """The load fails because the delete took the files away: the request sees the delete (404), not a 500."""
    store = Store(tmp_path / "store")
    reg = Registry(base, Metrics(), store)
    reg.open()
    reg.import_folder("doomed", PROMPT, source="test")
    renamed = threading.Event()
    remove, verify = store.remove, store.verify

    def slow_remove(name):  # the files are gone; the registry still lists the name for a moment
        remove(name)
        renamed.set()
        time.sleep(0.5)

    def late_verify(name, manifest):  # the load reads the folder only once the delete renamed it
        assert renamed.wait(10)
        verify(name, manifest)

    store.remove, store.verify = slow_remove, late_verify

    async def scenario():
        load = asyncio.create_task(reg.acquire("doomed"))
        await asyncio.sleep(0.05)
        await asyncio.gather(asyncio.to_thread(reg.unregister, "doomed"), asyncio.wait([load]))
        return load.exception()

    error = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert isinstance(error, AdapterNotFoundError) and error.status == 404


def test_zip_member_count_is_read_before_the_directory(tmp_path):
    """An end record declaring 65535 members is refused (413) before the central directory is parsed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(70):
            zf.writestr(f"f{i}", b"")
    archive = tmp_path / "many.zip"
    archive.write_bytes(buf.getvalue())
    assert declared_zip_entries(archive) == 70
    lying = tmp_path / "lying.zip"  # no directory at all: zipfile alone would call it broken (400)
    lying.write_bytes(b"PK\x05\x06" + b"\0" * 6 + b"\xff\xff" + b"\0" * 10)
    with pytest.raises(PayloadTooLargeError, match="at most 64 members"):
        unpack(lying, tmp_path / "out", 1_000_000)


def test_local_folder_with_too_many_files_is_refused(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name, data in folder_files(LORA).items():
        (folder / name).write_bytes(data)
    for i in range(MAX_FOLDER_FILES):
        (folder / f"checkpoint-{i}.txt").write_text("")
    with pytest.raises(PayloadTooLargeError, match=f"at most {MAX_FOLDER_FILES} files"):
        select(folder)
