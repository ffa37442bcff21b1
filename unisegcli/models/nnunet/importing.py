"""``uniseg weights import nnunet PATH --name NAME``: copy a results folder into the cache.

PATH is a results folder, a folder holding exactly one (``DatasetXXX_Name/``), or a .zip of
either. Zips are checked member by member first (absolute paths, '..', links: the whole
archive is refused, nothing written). Only what inference needs is copied: dataset.json,
plans.json and ``fold_*/checkpoint_final.pth`` (or ``checkpoint_best.pth``), into
``<cache root>/nnunet/<NAME>/<results folder name>/``, which appears by one atomic rename.
Every copied fold is loaded once (``weights_only=True``) and checked against the network the
plans describe, so a broken import fails now and not at the first run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from unisegcli.errors import WeightsError
from unisegcli.weights import imported
from unisegcli.models.nnunet.folder import extract_zip, read_results_folder


def import_folder(source: str | Path, name: str) -> Path:
    """Import a results folder or zip as model ``name``; returns the cached results folder."""
    from unisegcli.weights.cache import cache_root
    from unisegcli.models.nnunet.family import SPEC_PREFIX
    from unisegcli.models.nnunet.network import load_fold

    imported.check_name(name)
    source = Path(source).expanduser()
    if not source.exists():
        raise WeightsError(f"cannot import {source}: no such file or folder; expected an nnU-Net v2 "
                           "results folder or a .zip of one.")
    root = cache_root() / "nnunet"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".import-{name}."))
    try:
        tree = extract_zip(source, work / "unzipped") if source.is_file() else source
        folder = read_results_folder(tree)
        staged = work / "model" / folder.path.name
        staged.mkdir(parents=True)
        for file_name in ("dataset.json", "plans.json"):
            shutil.copy2(folder.path / file_name, staged / file_name)
        for checkpoint in folder.folds.values():
            (staged / checkpoint.parent.name).mkdir()
            shutil.copy2(checkpoint, staged / checkpoint.parent.name / checkpoint.name)
        copied = read_results_folder(staged)
        for fold in copied.folds:
            load_fold(copied, fold)  # fails now on unsafe, corrupt or mismatched weights
        final = root / name
        old = None
        if final.exists():
            old = work / "previous"
            os.replace(final, old)
        os.replace(work / "model", final)
    except OSError as exc:
        raise WeightsError(f"importing {source} into {root} failed: {exc}. Check that the source is "
                           "readable and the disk has space, then retry.") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cached = final / folder.path.name
    imported.register(name, SPEC_PREFIX + str(cached), str(source.resolve()))
    return cached
