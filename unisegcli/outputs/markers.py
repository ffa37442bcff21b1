"""Resume markers and the failure log of a batch run.

A case is done when ``<case folder>/.uniseg-done.json`` exists and matches the run: same
model name/version, same tasks and output options, same input size and mtime. The marker is
written last and atomically, after every output of the case, so a run killed mid-case leaves
no case that looks finished. Failures go to ``OUT/failures.jsonl`` (one JSON object per line,
appended under a file lock so parallel shards can share one output folder).
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from unisegcli.io.atomic import write_text_atomic

MARKER_NAME = ".uniseg-done.json"
FAILURES_NAME = "failures.jsonl"


def input_fingerprint(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Size and mtime of each input file (for a folder: of the files in it), to spot changes."""
    out = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stats = [f.stat() for f in files]
        out.append({
            "path": str(path.resolve()),
            "size_bytes": sum(s.st_size for s in stats),
            "mtime": max((s.st_mtime for s in stats), default=0.0),
        })
    return out


def marker_record(model: str, version: str, tasks: Sequence[str], options: Mapping[str, Any],
                  paths: Sequence[Path]) -> dict[str, Any]:
    """What a done marker says; two runs match when these records are equal (time aside)."""
    return {
        "model": model,
        "version": version,
        "tasks": list(tasks),
        "options": dict(options),
        "inputs": input_fingerprint(paths),
    }


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def is_done(folder: Path, record: Mapping[str, Any]) -> bool:
    """True when ``folder`` holds a marker for exactly this model, tasks, options and input."""
    found = _read_marker(folder)
    if found is None:
        return False
    found.pop("finished", None)
    found.pop("files", None)  # what was written, not what was asked for
    return found == json.loads(json.dumps(record))


def written_files(folder: Path) -> frozenset[str]:
    """Names of the files an earlier run wrote into ``folder`` (from its done marker): input
    discovery skips them, so a batch written into its input folder never reads its own masks."""
    return _written_files(Path(folder).resolve(), _marker_mtime(folder))


def _marker_mtime(folder: Path) -> float:
    try:
        return (folder / MARKER_NAME).stat().st_mtime
    except OSError:
        return 0.0


@lru_cache(maxsize=1024)
def _written_files(folder: Path, mtime: float) -> frozenset[str]:
    found = _read_marker(folder) if mtime else None
    files = found.get("files") if found else None
    return frozenset(str(f) for f in files) if isinstance(files, list) else frozenset()


def write_marker(folder: Path, record: Mapping[str, Any], files: Sequence[Path] = ()) -> Path:
    """Mark a case done (call after all its outputs exist); ``files`` are its output files."""
    data = {**record, "files": sorted(Path(f).name for f in files),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return write_text_atomic(folder / MARKER_NAME, json.dumps(data, indent=2) + "\n")


def clear_marker(folder: Path) -> None:
    """Forget that a case was done (before redoing it with --overwrite)."""
    (folder / MARKER_NAME).unlink(missing_ok=True)


def log_failure(out_root: Path, entry: Mapping[str, Any]) -> Path:
    """Append one failure to ``OUT/failures.jsonl`` (a single locked write: no torn lines)."""
    from filelock import FileLock

    path = out_root / FAILURES_NAME
    line = json.dumps({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    with FileLock(str(out_root / f".{FAILURES_NAME}.lock")):
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line)
    return path
