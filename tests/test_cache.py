"""Weights cache: layout, lookup, verification, safe import (files, folders, zips), removal,
and read-only caches (lookup must not write)."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import stat
import tempfile
import zipfile
from pathlib import Path

import pytest

from unisegcli.errors import ArchiveError, ChecksumError, OfflineError, WeightsError
from unisegcli.weights import cache
from unisegcli.weights.cards import parse_registry
from unisegcli.weights.download import ensure_model

TASK = {
    "name": "liver", "index": 0, "modality": "CT", "channels": ["ct"], "labels": {"1": "liver"},
    "spacing_mm": [3.0, 1.5, 1.5], "normalization": {"ct": {"scheme": "zscore"}},
}
CKPT = b"PK\x03\x04 fake torch checkpoint " * 500
PLANS = pickle.dumps({"plans_per_stage": {}}, protocol=4)  # import test-loads it


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_card(*, ckpt_sha: str | None = "auto", size_bytes: int | None = None):
    files = [
        {"name": "model.bin", "role": "checkpoint", "urls": ["http://127.0.0.1:9/model.bin"],
         "sha256": sha(CKPT) if ckpt_sha == "auto" else ckpt_sha, "size_bytes": size_bytes},
        {"name": "plans.pkl", "role": "plans", "urls": ["http://127.0.0.1:9/plans.pkl"],
         "sha256": sha(PLANS), "size_bytes": None},
    ]
    data = {"schema_version": 1, "task_sets": {"t": [TASK]}, "models": {"fake": {
        "family": "uniseg", "version": "0.1", "description": "d", "license": "L",
        "task_set": "t", "files": files}}}
    return parse_registry(data)["fake"]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("UNISEG_OFFLINE", raising=False)
    monkeypatch.delenv("UNISEG_MIRROR", raising=False)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A folder with the model's files nested one level down, as an unpacked download."""
    folder = tmp_path / "download" / "UniSeg"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(CKPT)
    (folder / "plans.pkl").write_bytes(PLANS)
    (folder / "README.txt").write_text("not a model file")
    return tmp_path / "download"


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def test_cache_root_from_env_or_platform_dir(tmp_path: Path, monkeypatch) -> None:
    assert cache.cache_root() == tmp_path / "home"
    assert cache.model_dir(make_card()) == tmp_path / "home" / "models" / "fake" / "0.1"
    monkeypatch.delenv("UNISEG_HOME")
    assert "uniseg" in str(cache.cache_root())


def test_missing_files_name_file_place_and_commands() -> None:
    card = make_card()
    with pytest.raises(WeightsError) as info:
        cache.find_model_files(card)
    message = str(info.value)
    assert not isinstance(info.value, OfflineError)
    assert "'model.bin' (checkpoint)" in message and str(cache.model_dir(card)) in message
    assert "uniseg weights download fake" in message and "uniseg weights import fake PATH" in message
    with pytest.raises(OfflineError, match="uniseg weights import fake PATH"):
        cache.find_model_files(card, offline=True)


def test_import_folder_then_find_verify_and_remove(source: Path) -> None:
    card = make_card()
    files = cache.import_model(card, source)
    directory = cache.model_dir(card)
    assert files == {"checkpoint": directory / "model.bin", "plans": directory / "plans.pkl"}
    assert cache.find_model_files(card) == files
    assert [c.status for c in cache.verify_model(card)] == ["ok", "ok"]
    assert cache.read_manifest(card)["model.bin"]["source"].startswith("file://")
    assert {p.name for p in directory.iterdir()} == {"model.bin", "plans.pkl", "manifest.json"}

    removed = cache.remove_model(card)
    assert {p.name for p in removed} == {"model.bin", "plans.pkl", "manifest.json"}
    assert not directory.exists()
    assert cache.remove_model(card) == []


def test_import_single_file_and_good_zip(tmp_path: Path, source: Path) -> None:
    card = make_card()
    imported = cache.import_model(card, source / "UniSeg" / "plans.pkl")
    assert imported == {"plans": cache.model_dir(card) / "plans.pkl"}
    assert [f.name for f in cache.missing_files(card)] == ["model.bin"]
    archive = tmp_path / "weights.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("UniSeg/model.bin", CKPT)
        zf.writestr("UniSeg/plans.pkl", PLANS)
    files = cache.import_model(card, archive)
    assert files["checkpoint"].read_bytes() == CKPT
    assert cache.read_manifest(card)["model.bin"]["source"].endswith("weights.zip!UniSeg/model.bin")


def test_import_checkpoint_that_is_itself_a_zip_is_taken_as_a_file(tmp_path: Path) -> None:
    # torch.save writes zip files: a file named like the checkpoint must not be unpacked.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", b"weights")
    data = buffer.getvalue()
    card = make_card(ckpt_sha=sha(data))
    (tmp_path / "model.bin").write_bytes(data)
    assert cache.import_model(card, tmp_path / "model.bin")["checkpoint"].read_bytes() == data


def _zip_with(tmp_path: Path, member: zipfile.ZipInfo | str, payload: bytes = b"evil") -> Path:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("UniSeg/model.bin", CKPT)
        zf.writestr("UniSeg/plans.pkl", PLANS)
        zf.writestr(member, payload)
    return archive


def _symlink_member() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("UniSeg/link")
    info.create_system = 3  # Unix, so external_attr carries the file type
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("member, why", [
    ("../evil", "'..'"),
    ("UniSeg/../../evil", "'..'"),
    ("/tmp/evil", "absolute path"),
    ("C:\\evil", "absolute path"),
    (_symlink_member(), "symbolic link"),
], ids=["dotdot", "nested-dotdot", "absolute", "drive-letter", "symlink"])
def test_unsafe_zip_is_refused_and_nothing_written(tmp_path: Path, member, why: str) -> None:
    card = make_card()
    archive = _zip_with(tmp_path, member, b"/etc/passwd")
    before = all_files(tmp_path)
    with pytest.raises(ArchiveError, match=why) as info:
        cache.import_model(card, archive)
    assert "Nothing was written" in str(info.value)
    assert all_files(tmp_path) == before  # no evil file, no model file, no manifest
    assert not (tmp_path / "evil").exists()


def test_import_with_wrong_hash_commits_nothing(source: Path) -> None:
    (source / "UniSeg" / "model.bin").write_bytes(CKPT + b"tampered")
    card = make_card()
    with pytest.raises(ChecksumError, match="expected " + sha(CKPT)):
        cache.import_model(card, source)
    directory = cache.model_dir(card)
    # plans.pkl was fine but is not committed alone; no staging file is left behind
    assert {p.name for p in directory.iterdir()} == set()


def test_import_html_page_saved_as_weights_is_refused(tmp_path: Path) -> None:
    card = make_card(ckpt_sha=None)
    (tmp_path / "model.bin").write_text("<!DOCTYPE html><html>Virus scan warning</html>")
    with pytest.raises(WeightsError, match="HTML"):
        cache.import_model(card, tmp_path / "model.bin")
    assert cache.missing_files(card) == list(card.files)


def test_import_errors_say_what_was_expected(tmp_path: Path) -> None:
    card = make_card()
    (tmp_path / "other.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match="model.bin, plans.pkl"):
        cache.import_model(card, tmp_path / "other.bin")
    with pytest.raises(WeightsError, match="no such file"):
        cache.import_model(card, tmp_path / "absent")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "plans.pkl").write_bytes(PLANS), (tmp_path / "b" / "plans.pkl").write_bytes(PLANS)
    with pytest.raises(WeightsError, match="several copies"):
        cache.import_model(card, tmp_path)


def test_wrong_size_is_reported_by_lookup(source: Path) -> None:
    card = make_card(size_bytes=len(CKPT))
    files = cache.import_model(card, source)
    files["checkpoint"].write_bytes(CKPT[:100])
    with pytest.raises(ChecksumError, match=f"100 bytes, expected {len(CKPT)}"):
        cache.find_model_files(card)


def test_verify_detects_mismatch_against_registry(source: Path) -> None:
    card = make_card()
    files = cache.import_model(card, source)
    files["plans"].write_bytes(b"\x80\x04 other plans")
    checks = {c.name: c for c in cache.verify_model(card)}
    assert checks["model.bin"].status == "ok" and checks["plans.pkl"].status == "mismatch"
    assert checks["plans.pkl"].reference == "registry"


@pytest.fixture
def no_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every file-system write fail, as on a cache the user may only read."""
    attempts: list[str] = []

    def deny(what: str):
        def fail(*args, **kwargs):
            attempts.append(what)
            raise PermissionError(13, f"read-only cache ({what})")
        return fail

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            return deny("open")(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            return deny("os.open")(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("mkdir", "makedirs", "replace", "rename", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, deny(f"os.{name}"))
    monkeypatch.setattr(tempfile, "mkstemp", deny("mkstemp"))
    return attempts


def test_read_only_cache_works_for_inference(source: Path, request) -> None:
    card = make_card()
    files = cache.import_model(card, source)
    attempts: list[str] = request.getfixturevalue("no_writes")
    assert cache.find_model_files(card) == files
    assert ensure_model(card) == files  # all present: no lock, no socket, no write
    assert [c.status for c in cache.verify_model(card)] == ["ok", "ok"]
    assert cache.read_manifest(card)["model.bin"]["sha256"] == sha(CKPT)
    assert attempts == []
    # Changing the cache is what needs write access, and the error says so.
    with pytest.raises(WeightsError, match="read-only"):
        cache.remove_model(card)


def test_read_only_cache_missing_file_says_cache_is_read_only(source: Path, request) -> None:
    card = make_card()
    cache.import_model(card, source / "UniSeg" / "model.bin")  # plans.pkl stays missing
    request.getfixturevalue("no_writes")
    with pytest.raises(WeightsError, match="read-only") as info:
        ensure_model(card)
    assert "UNISEG_HOME" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_cache_with_chmod(source: Path) -> None:
    card = make_card()
    files = cache.import_model(card, source)
    root = cache.cache_root()
    folders = [p for p in root.rglob("*") if p.is_dir()] + [root]
    for folder in folders:
        folder.chmod(0o555)
    try:
        assert cache.find_model_files(card) == files
        assert ensure_model(card) == files
        assert [c.status for c in cache.verify_model(card)] == ["ok", "ok"]
    finally:
        for folder in folders:
            folder.chmod(0o755)
