"""The local weights cache: where model files live, how they are checked, imported, removed.

Layout (root = ``$UNISEG_HOME`` if set, else the platform's user data folder for "uniseg")::

    <root>/models/<model>/<version>/<file name>        the files of the registry entry
    <root>/models/<model>/<version>/manifest.json      sha256, size, source URL, time per file
    <root>/models/<model>/<version>/<file name>.part   an unfinished download (resumable)
    <root>/locks/<model>-<version>.lock                 held while files enter or leave the cache

A file only ever appears under its final name by an atomic rename after its sha256 was checked,
so a file present under its final name is complete. That is why finding and verifying files
needs no lock and no write access: a read-only, cluster-wide cache works for inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Collection, Iterator

from unisegcli.errors import ChecksumError, OfflineError, WeightsError
from unisegcli.weights.cards import FileCard, ModelCard
from unisegcli.io.archive import checked_members
from unisegcli.io.hashing import sha256_file
from unisegcli.weights.safe_pickle import looks_like_html

MANIFEST_NAME = "manifest.json"
CHUNK_BYTES = 1 << 20
_IMPORT_SUFFIX = ".import"


def cache_root() -> Path:
    """The cache root: ``$UNISEG_HOME`` if set, else the user data folder for "uniseg"."""
    home = os.environ.get("UNISEG_HOME")
    if home:
        return Path(home).expanduser()
    import platformdirs  # only needed when no UNISEG_HOME is set

    return Path(platformdirs.user_data_dir("uniseg", appauthor=False))


PACKAGED_MODELS = Path(__file__).resolve().parent.parent / "data" / "models"


def model_dir(card: ModelCard) -> Path:
    """Folder of a model's files: ``<root>/models/<name>/<version>``.

    A model shipped inside the package (``"packaged": true`` in the registry, e.g. the demo
    model) lives in ``unisegcli/data/models/<name>/<version>`` instead: found and verified
    like a cached one, never downloaded, imported or removed.
    """
    root = PACKAGED_MODELS if card.packaged else cache_root() / "models"
    return root / card.name / card.version


def refuse_packaged(card: ModelCard, action: str) -> None:
    """Packaged models are part of the installation: they cannot be changed from the CLI."""
    if card.packaged:
        raise WeightsError(
            f"model '{card.name}' ships inside the uniseg package ({model_dir(card)}); there is "
            f"nothing to {action}. Reinstall uniseg if its files are damaged."
        )


def manifest_path(card: ModelCard) -> Path:
    return model_dir(card) / MANIFEST_NAME


def part_path(final: Path) -> Path:
    """Where an unfinished download of ``final`` is kept: ``<final>.part``."""
    return final.with_name(final.name + ".part")


def fix_hint(card: ModelCard) -> str:
    """The commands that put a model's files into the cache."""
    return (
        f"Run `uniseg weights download {card.name}`, or download the files elsewhere and run "
        f"`uniseg weights import {card.name} PATH` (PATH: a file, a folder or a .zip)."
    )


# --- manifest ---------------------------------------------------------------------------------


def read_manifest(card: ModelCard) -> dict[str, dict]:
    """The manifest's per-file records ``{file name: {sha256, size_bytes, source, time}}``.

    Read-only; a missing manifest is an empty one.
    """
    path = manifest_path(card)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(
            f"cannot read the cache manifest {path}: {exc}; expected a JSON file written by uniseg. "
            f"Run `uniseg weights remove {card.name} --yes` and download or import the model again."
        ) from exc
    files = data.get("files", {}) if isinstance(data, dict) else data
    problem = _manifest_problem(files)
    if problem:
        raise WeightsError(
            f"the cache manifest {path} is damaged: {problem}; expected the JSON object uniseg writes "
            f"({{\"files\": {{name: {{\"sha256\": ..., \"size_bytes\": ...}}}}}}). "
            f"Run `uniseg weights remove {card.name} --yes` and download or import the model again."
        )
    return files


def _manifest_problem(files: Any) -> str | None:
    """What is wrong with a manifest's "files" value, or None."""
    if not isinstance(files, dict):
        return f"its files are {type(files).__name__}, not an object"
    for name, entry in files.items():
        if not isinstance(entry, dict):
            return f"the entry of '{name}' is {type(entry).__name__}, not an object"
        size, sha = entry.get("size_bytes"), entry.get("sha256")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            return f"the size_bytes of '{name}' is {size!r}, not a byte count"
        if sha is not None and not isinstance(sha, str):
            return f"the sha256 of '{name}' is {type(sha).__name__}, not a hex string"
    return None


def commit_file(
    card: ModelCard, file: FileCard, staged: Path, *, sha256: str, size_bytes: int, source: str
) -> Path:
    """Record a checked file in the manifest, then move it under its final name atomically.

    staged must be in the model folder (same file system, so the rename is atomic) and its
    sha256 already checked against the registry. The manifest is written first so that a
    file present under its final name always has a recorded hash. Caller holds model_lock.
    """
    directory = model_dir(card)
    files = read_manifest(card)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files[file.name] = {"sha256": sha256, "size_bytes": size_bytes, "source": source, "time": when}
    doc = {"model": card.name, "version": card.version, "files": files}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
    os.replace(tmp, directory / MANIFEST_NAME)  # atomic: readers never see half a manifest
    final = directory / file.name
    os.replace(staged, final)
    return final


# --- lookup (read-only) ------------------------------------------------------------------------


def expected_size(file: FileCard, manifest: dict[str, dict]) -> int | None:
    """Size from the registry, else the one recorded when the file entered the cache."""
    if file.size_bytes is not None:
        return file.size_bytes
    return manifest.get(file.name, {}).get("size_bytes")


def expected_sha256(file: FileCard, manifest: dict[str, dict]) -> str | None:
    """sha256 from the registry (authoritative), else the one recorded in the manifest."""
    return file.sha256 or manifest.get(file.name, {}).get("sha256")


def _selected(card: ModelCard, roles: Collection[str] | None) -> list[FileCard]:
    return [f for f in card.files if roles is None or f.role in roles]


def missing_files(card: ModelCard, *, roles: Collection[str] | None = None) -> list[FileCard]:
    """Files of the model (those with one of ``roles``; all by default) that are not in the
    cache under their final name (no writes)."""
    directory = model_dir(card)
    return [f for f in _selected(card, roles) if not (directory / f.name).is_file()]


def missing_message(card: ModelCard, files: list[FileCard], *, offline: bool) -> str:
    """Name each missing file, where it was expected and how to get it."""
    directory = model_dir(card)
    names = ", ".join(f"'{f.name}' ({f.role})" for f in files)
    if card.packaged:
        return (
            f"model '{card.name}' {card.version}: missing {names}; expected inside the uniseg "
            f"package at {directory}. The installation is incomplete: reinstall uniseg."
        )
    why = "offline mode forbids downloading it" if offline else "it is not in the cache"
    msg = f"model '{card.name}' {card.version}: missing {names}; expected in {directory}, but {why}. "
    if offline:
        return msg + (
            f"Copy the files there with `uniseg weights import {card.name} PATH` "
            f"(PATH: a file, a folder or a .zip), or drop --offline / UNISEG_OFFLINE to download."
        )
    return msg + fix_hint(card)


def find_model_files(
    card: ModelCard, *, offline: bool = False, roles: Collection[str] | None = None
) -> dict[str, Path]:
    """Paths of a model's cached files by role (only ``roles`` when given); raise if any is
    missing or has the wrong size.

    Only stats files and reads the manifest: works on a read-only cache, takes no lock. The
    size is checked (cheap); the full sha256 check is `verify_model`. A missing file raises
    OfflineError when offline, else WeightsError.
    """
    missing = missing_files(card, roles=roles)
    if missing:
        error = OfflineError if offline else WeightsError
        raise error(missing_message(card, missing, offline=offline))
    directory = model_dir(card)
    manifest = read_manifest(card)
    found: dict[str, Path] = {}
    for f in _selected(card, roles):
        path = directory / f.name
        size = expected_size(f, manifest)
        actual = path.stat().st_size
        if size is not None and actual != size:
            raise ChecksumError(
                f"{path} is {actual} bytes, expected {size} (registry or cache manifest); the "
                f"file is truncated or was replaced. Run `uniseg weights remove {card.name} --yes` "
                f"and then `uniseg weights download {card.name}` (or import it again)."
            )
        found.setdefault(f.role, path)
    return found


@dataclass(frozen=True)
class FileCheck:
    """Result of checking one cached file.

    status: "ok" (sha256 matches), "mismatch", "missing", or "unknown" (neither the registry
    nor the manifest has a hash to compare with). reference: "registry" or "manifest".
    """

    name: str
    role: str
    path: Path
    status: str
    expected_sha256: str | None
    actual_sha256: str | None
    reference: str | None


def verify_model(card: ModelCard) -> list[FileCheck]:
    """Hash every cached file and compare with the registry (or the manifest when it has null).

    Read-only: never writes, never locks.
    """
    directory = model_dir(card)
    manifest = read_manifest(card)
    checks: list[FileCheck] = []
    for f in card.files:
        path = directory / f.name
        expected = expected_sha256(f, manifest)
        reference = "registry" if f.sha256 else ("manifest" if expected else None)
        if not path.is_file():
            checks.append(FileCheck(f.name, f.role, path, "missing", expected, None, reference))
            continue
        actual = sha256_file(path)
        if expected is None:
            status = "unknown"
        else:
            status = "ok" if actual == expected else "mismatch"
        checks.append(FileCheck(f.name, f.role, path, status, expected, actual, reference))
    return checks


# --- writing: lock, import, remove -------------------------------------------------------------


def lock_path(card: ModelCard) -> Path:
    # Outside the model folder so that `remove` can delete the folder while holding the lock.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{card.name}-{card.version}")
    return cache_root() / "locks" / f"{safe}.lock"


@contextmanager
def model_lock(card: ModelCard, *, on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the model's cache lock (waits for other processes); yield the model folder.

    Creates the folders it needs; a read-only cache raises WeightsError. ``on_wait(message)``
    is called once when another process holds the lock.
    """
    from filelock import FileLock, Timeout

    directory = model_dir(card)
    lock_file = lock_path(card)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file)
        try:
            lock.acquire(timeout=0.2)
        except Timeout:
            if on_wait is not None:
                on_wait(f"waiting for another process writing model '{card.name}' into "
                        f"{directory} (lock {lock_file})")
            lock.acquire()  # the holder's downloads have timeouts, so this ends
    except OSError as exc:
        raise WeightsError(
            f"cannot write to the weights cache {cache_root()}: {exc}. The cache is read-only "
            f"(a shared folder?) and model '{card.name}' needs files added or removed there. Ask "
            f"its owner to run `uniseg weights download {card.name}`, or set UNISEG_HOME to a "
            f"folder you can write."
        ) from exc
    try:
        yield directory
    finally:
        lock.release()


def _candidates(card: ModelCard, source: Path) -> dict[str, list]:
    """Map each of the model's file names to the matching paths/zip members in ``source``."""
    names = {f.name for f in card.files}
    found: dict[str, list] = {n: [] for n in names}
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.name in names and path.is_file():
                found[path.name].append(path)
    elif source.name in names:
        # Checked before the zip test: a torch checkpoint is itself a zip file.
        found[source.name].append(source)
    elif source.suffix.lower() == ".zip" or zipfile.is_zipfile(source):
        members = checked_members(source, fix=(
            f"Extract the files you trust by hand and import the folder: "
            f"`uniseg weights import {card.name} FOLDER`."))
        for m in members:
            base = re.split(r"[\\/]", m.filename)[-1]
            if base in names and not m.is_dir():
                found[base].append(m)
    else:
        raise WeightsError(
            f"cannot import {source}: expected a folder, a .zip, or a file named one of "
            f"{', '.join(sorted(names))} (rename the file if a browser changed its name)."
        )
    return found


def _stage(card: ModelCard, file: FileCard, reader: IO[bytes], origin: str) -> tuple[Path, str, int]:
    """Copy a stream into a temporary file in the model folder; check it; return (tmp, sha, size)."""
    fd, tmp_name = tempfile.mkstemp(dir=model_dir(card), prefix=f".{file.name}.", suffix=_IMPORT_SUFFIX)
    tmp, digest, size, head = Path(tmp_name), hashlib.sha256(), 0, b""
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: reader.read(CHUNK_BYTES), b""):
                head = head or chunk[:64]
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        sha = digest.hexdigest()
        if looks_like_html(head):
            raise WeightsError(f"{origin} is an HTML/text page, not the binary '{file.name}' (a "
                               f"browser saved a download warning page?). Nothing was imported.")
        if file.sha256 and sha != file.sha256:
            raise ChecksumError(f"{origin}: sha256 is {sha}, expected {file.sha256} (registry, "
                                f"'{file.name}'); corrupt or another version. Nothing was imported.")
        if file.size_bytes is not None and size != file.size_bytes:
            raise ChecksumError(f"{origin} is {size} bytes, expected {file.size_bytes} (registry, "
                                f"'{file.name}'). Nothing was imported.")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, sha, size


def _test_load(file: FileCard, staged: Path, origin: str) -> None:
    """Load a staged weights/plans file with the loaders a run uses (safe_pickle, weights-only
    torch.load, safetensors); a file a run would refuse is refused here, under its own name."""
    from unisegcli.errors import CheckpointError

    if not file.name.lower().endswith((".model", ".pth", ".pt", ".ckpt", ".pkl", ".safetensors")):
        return
    from unisegcli.weights.checkpoint import check_loadable

    with tempfile.TemporaryDirectory(dir=staged.parent, prefix=".check.") as folder:
        named = Path(folder) / file.name  # messages then name the file, not the staging name
        try:
            os.link(staged, named)
        except OSError:
            named = staged
        try:
            check_loadable(named)
        except CheckpointError as exc:
            raise type(exc)(f"{origin}: {str(exc).rstrip('.')}. Nothing was imported.") from None


def import_model(card: ModelCard, source: Path) -> dict[str, Path]:
    """Copy a model's files from a file, a folder or a .zip into the cache; return them by role.

    Unsafe archives (absolute paths, '..', symbolic links) are refused before anything is
    written. Every file is hashed and checked against the registry while staged; files enter
    the cache only when all of them passed. Files of the model not in ``source`` are left as
    they are (see `missing_files`).
    """
    refuse_packaged(card, "import")
    source = Path(source).expanduser()
    if not source.exists():
        raise WeightsError(f"cannot import {source}: no such file or folder.")
    found = _candidates(card, source)
    dupes = {n: c for n, c in found.items() if len(c) > 1}
    if dupes:
        listing = "; ".join(f"{n}: {', '.join(str(getattr(c, 'filename', c)) for c in cs)}"
                            for n, cs in dupes.items())
        raise WeightsError(f"cannot import {source}: several copies of {listing}; keep one copy.")
    if not any(found.values()):
        raise WeightsError(f"nothing to import from {source}: expected files named "
                           f"{', '.join(f.name for f in card.files)} (model '{card.name}').")
    staged: list[tuple[FileCard, Path, str, int, str]] = []
    with model_lock(card):
        try:
            for f in card.files:
                for item in found.get(f.name, []):
                    if isinstance(item, zipfile.ZipInfo):
                        origin = f"{source.resolve().as_uri()}!{item.filename}"
                        with zipfile.ZipFile(source) as archive, archive.open(item) as reader:
                            tmp, sha, size = _stage(card, f, reader, origin)
                    else:
                        origin = item.resolve().as_uri()
                        with open(item, "rb") as reader:
                            tmp, sha, size = _stage(card, f, reader, origin)
                    staged.append((f, tmp, sha, size, origin))
            for f, tmp, _, _, origin in staged:
                _test_load(f, tmp, origin)  # a run would refuse it: refuse it now, before the cache
            for f, tmp, sha, size, origin in staged:
                commit_file(card, f, tmp, sha256=sha, size_bytes=size, source=origin)
        except (OSError, zipfile.BadZipFile) as exc:
            raise WeightsError(
                f"importing {source} into {model_dir(card)} failed: {exc}. Check that the source "
                f"is readable and the disk has space, then retry."
            ) from exc
        finally:
            for _, tmp, *_ in staged:
                tmp.unlink(missing_ok=True)  # no-op for files already committed (renamed)
    directory = model_dir(card)
    return {f.role: directory / f.name for f, *_ in staged}


def remove_model(card: ModelCard) -> list[Path]:
    """Delete a model's cached files, partial downloads and manifest; return what was removed.

    Other files a user put into the folder are left; the folder goes when it is empty.
    """
    refuse_packaged(card, "remove")
    directory = model_dir(card)
    if not directory.exists():
        return []
    removed: list[Path] = []
    with model_lock(card):
        names = {f.name for f in card.files}
        for path in sorted(directory.iterdir()):
            ours = (
                path.name in names
                or path.name == MANIFEST_NAME
                or (path.name.endswith(".part") and path.name[: -len(".part")] in names)
                or path.name.endswith((_IMPORT_SUFFIX, ".tmp"))
            )
            if ours and path.is_file():
                path.unlink()
                removed.append(path)
            elif path.is_dir() and path.name.lstrip(".").startswith(tuple(f"{n}.unpacked" for n in names)):
                shutil.rmtree(path)  # a zip extracted by its family (nnU-Net parts)
                removed.append(path)
        for folder in (directory, directory.parent):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: something else lives there
    return removed


def free_bytes(path: Path) -> int:
    """Free space of the file system holding ``path`` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
