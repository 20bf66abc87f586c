"""The store's atomic writes, crash recovery and safe unpacking, without a model."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from server.errors import AdapterExistsError, InvalidRequestError, PayloadTooLargeError
from server.store import Store, check_name, normalise, select
from server.upload import unpack
from tests.store.helpers import (
    BN_BIN,
    LORA,
    PROMPT,
    folder_files,
    targz_bytes,
    zip_bytes,
)


def _built(store: Store, name: str, marker: str) -> Path:
    """A complete adapter folder in a staging area, as an upload leaves it before the rename."""
    folder = store.staging() / "adapter"
    folder.mkdir()
    (folder / "weights").write_text(marker)
    store.write_manifest(folder, {"name": name, "marker": marker})
    return folder


def _marker(store: Store, name: str) -> str:
    return (store.root / name / "weights").read_text()


@pytest.mark.parametrize("name", ["a", "A-1", "lora_v2.1", "x" * 128, "0"])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".x", "-x", "_x", "a/b", "../a", "a b", "x" * 129, "é", "a\0", None, 5])
def test_bad_names(name):
    with pytest.raises(InvalidRequestError, match="name: expected"):
        check_name(name)


def test_commit_replace_remove(tmp_path):
    store = Store(tmp_path)
    store.commit(_built(store, "a", "v1"), "a", replace=False)
    with pytest.raises(AdapterExistsError):
        store.commit(_built(store, "a", "v2"), "a", replace=False)
    assert _marker(store, "a") == "v1"
    store.commit(_built(store, "a", "v3"), "a", replace=True)
    assert _marker(store, "a") == "v3"
    assert [m["name"] for m in store.manifests()] == ["a"]
    store.remove("a")
    store.recover()  # the staging folders of the refused and the committed writes
    assert list(tmp_path.iterdir()) == []


def test_recover_crash_points(tmp_path):
    """Each moment a crash can hit a write leaves the old state or the new one after `recover`."""
    store = Store(tmp_path)
    for name in ("before-rename", "aside-only", "both", "deleting"):
        store.commit(_built(store, name, "old"), name, replace=False)
    _built(store, "before-rename", "new")  # crash before the rename: temp folder only
    (tmp_path / "aside-only").rename(tmp_path / ".old-1234-aside-only")  # crash after "old aside"
    _built(store, "aside-only", "new")
    (tmp_path / "both").rename(tmp_path / ".old-5678-both")  # crash after "new in", before "remove old"
    store.commit(_built(store, "both", "new"), "both", replace=False)
    (tmp_path / "deleting").rename(tmp_path / ".del-9abc")  # crash during a delete
    (tmp_path / "both" / "manifest.json.tmp").write_text("{half")  # crash while rewriting a manifest

    store.recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aside-only", "before-rename", "both"]
    assert [_marker(store, n) for n in ("aside-only", "before-rename", "both")] == ["old", "old", "new"]
    assert not (tmp_path / "both" / "manifest.json.tmp").exists()


def test_manifests_list_broken_folders_as_corrupt(tmp_path):
    """A folder named like an adapter is never hidden: without a sound manifest it is listed as corrupt."""
    store = Store(tmp_path)
    store.commit(_built(store, "good", "v"), "good", replace=False)
    (tmp_path / "no-manifest").mkdir()
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "manifest.json").write_text(json.dumps({"name": "other"}))
    (tmp_path / "not a name").mkdir()
    got = {m["name"]: m for m in store.manifests()}
    assert list(got) == ["good", "no-manifest", "renamed"]
    assert [got[n]["status"] for n in ("no-manifest", "renamed")] == ["corrupt", "corrupt"]
    assert "no readable manifest.json" in got["no-manifest"]["reason"]
    assert "names adapter 'other'" in got["renamed"]["reason"]


@pytest.mark.parametrize("src", [LORA, PROMPT, BN_BIN], ids=["lora", "prompt", "bottleneck-bin"])
def test_normalise_keeps_config_and_safetensors(tmp_path, src):
    sel = select(src)
    files = normalise(sel, tmp_path / "out")
    assert set(files) == {sel.config.name, sel.stored_weights}
    assert sel.stored_weights.endswith(".safetensors")
    assert all(len(f["sha256"]) == 64 for f in files.values())
    assert sel.source_sha256() == select(src).source_sha256()


def _unpack(tmp_path: Path, data: bytes, limit: int = 10_000_000) -> Path:
    archive = tmp_path / "archive"
    archive.write_bytes(data)
    return unpack(archive, tmp_path / "out", limit)


@pytest.mark.parametrize("maker,top", [(zip_bytes, "adapter"), (zip_bytes, None), (targz_bytes, "x"), (targz_bytes, None)])
def test_unpack_flat_or_one_top_folder(tmp_path, maker, top):
    files = folder_files(LORA)
    out = _unpack(tmp_path, maker(files, top=top))
    assert folder_files(out) == files


def _zip_member(name: str, data: bytes = b"x", mode: int | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return buf.getvalue()


def _tar_member(name: str, type_=tarfile.REGTYPE, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    return targz_bytes({}, extra=[info])


HOSTILE = [
    (_zip_member("../evil"), InvalidRequestError, "'..'"),
    (_zip_member("/etc/evil"), InvalidRequestError, "absolute"),
    (_zip_member("a\\..\\evil"), InvalidRequestError, "'/'-separated"),
    (_zip_member("link", b"/etc/passwd", 0o120777), InvalidRequestError, "symbolic link"),
    (_tar_member("../evil"), InvalidRequestError, "'..'"),
    (_tar_member("/abs"), InvalidRequestError, "absolute"),
    (_tar_member("link", tarfile.SYMTYPE, "/etc/passwd"), InvalidRequestError, "link"),
    (_tar_member("hard", tarfile.LNKTYPE, "adapter_config.json"), InvalidRequestError, "link"),
    (_tar_member("dev", tarfile.CHRTYPE), InvalidRequestError, "regular file"),
    (zip_bytes({"a/b/c.json": b"{}"}, top=None), InvalidRequestError, "one top folder"),
    (b"not an archive at all", InvalidRequestError, "valid .zip or .tar.gz"),
    (zip_bytes({f"f{i}": b"" for i in range(65)}), PayloadTooLargeError, "at most 64"),
    (zip_bytes({"zeros": bytes(2_000_000)}), PayloadTooLargeError, "decompressed"),
    (targz_bytes({"zeros": bytes(2_000_000)}), PayloadTooLargeError, "decompressed"),
]


@pytest.mark.parametrize("data,error,needle", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_unpack_refuses(tmp_path, data, error, needle):
    with pytest.raises(error, match=needle):
        _unpack(tmp_path, data, limit=1_000_000)
    assert not (tmp_path.parent / "evil").exists()
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
