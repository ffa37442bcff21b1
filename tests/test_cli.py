"""The `uniseg` command line: routing, help texts, and bad input -> one line + exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import save_nifti
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), prog_name="uniseg")


def all_commands():
    """Every (path, click command) in the app, sub-groups included."""
    import typer.main

    root = typer.main.get_command(app)
    stack = [((), root)]
    while stack:
        path, cmd = stack.pop()
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            stack.append(((*path, name), sub))


def test_every_command_and_option_has_help() -> None:
    missing = []
    for path, cmd in all_commands():
        if path and not (cmd.help or "").strip():
            missing.append(" ".join(path))
        for param in cmd.params:
            if param.name in ("help",):
                continue
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"{' '.join(path)} {param.name}")
    assert missing == []


def test_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("segment", "tasks", "models", "version"):
        assert name in result.output


def test_tasks_table_shows_cards() -> None:
    result = invoke("tasks")
    assert result.exit_code == 0, result.output
    assert "liver" in result.output and "flair" in result.output


def test_unknown_model() -> None:
    result = invoke("tasks", "--model", "unisge")
    assert result.exit_code == ExitCode.USAGE
    assert "did you mean 'uniseg'" in result.output


def test_main_form_routes_to_segment(ct_path: Path, tmp_path: Path) -> None:
    """`uniseg SCAN -o OUT --tasks X` and `uniseg segment ...` reach the same command."""
    for prefix in ([], ["segment"]):
        result = invoke(*prefix, str(ct_path), "-o", str(tmp_path / "o"), "--tasks", "livr")
        assert result.exit_code == ExitCode.USAGE
        assert "unknown task 'livr'; did you mean 'liver'?" in result.output


def _not_nifti(tmp: Path) -> Path:
    p = tmp / "notes.nii.gz"
    p.write_text("not an image")
    return p


def _truncated(tmp: Path) -> Path:
    full = save_nifti(tmp / "full.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 20)).astype(np.float32), np.eye(4))
    data = full.read_bytes()
    p = tmp / "trunc.nii.gz"
    p.write_bytes(data[: len(data) // 2])
    full.unlink()
    return p


def _image(shape, value=0.0):
    def make(tmp: Path) -> Path:
        data = np.full(shape, value, dtype=np.float32)
        if value == 0.0 and data.ndim == 3:
            data[0, 0, 0] = np.nan
        return save_nifti(tmp / "img.nii.gz", data, np.eye(4))

    return make


def _empty_dir(tmp: Path) -> Path:
    d = tmp / "empty"
    d.mkdir()
    (d / "readme.txt").write_text("no scans here")
    return d


BAD_INPUTS = [
    ("missing path", lambda tmp: tmp / "missing.nii.gz", ExitCode.INPUT, "does not exist"),
    ("folder without scans", _empty_dir, ExitCode.INPUT, "holds no .nii/.nii.gz scans"),
    ("not NIfTI", _not_nifti, ExitCode.INPUT, "not a NIfTI"),
    ("truncated gz", _truncated, ExitCode.INPUT, "truncated or corrupt"),
    ("2D image", _image((16, 16), 1.0), ExitCode.INPUT, "2D image"),
    ("5D image", _image((4, 4, 4, 2, 2), 1.0), ExitCode.INPUT, "5D image"),
    ("NaN voxels", _image((8, 8, 8)), ExitCode.INPUT, "NaN/Inf voxels"),
]


@pytest.mark.parametrize(("name", "make", "code", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_one_line_exit_code_no_output(tmp_path: Path, name, make, code, message) -> None:
    src = make(tmp_path)
    out = tmp_path / "out"
    result = invoke(str(src), "-o", str(out), "--tasks", "liver")
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() or list(out.iterdir()) == []


def test_output_folder_is_a_file(ct_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    result = invoke(str(ct_path), "-o", str(blocker), "--tasks", "liver")
    assert result.exit_code == ExitCode.OUTPUT
    assert "is a file" in result.output
    assert blocker.read_text() == "x"


def test_output_folder_not_writable(ct_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    # A folder below a file can never be created, even as root (chmod would not stop root).
    result = invoke(str(ct_path), "-o", str(blocker / "sub"), "--tasks", "liver")
    assert result.exit_code == ExitCode.OUTPUT
    assert "not writable" in result.output


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = invoke(str(_not_nifti(tmp_path)), "-o", str(tmp_path / "o"), "--tasks", "liver", "--debug")
    assert result.exit_code == ExitCode.INPUT
    assert "Traceback" in result.output


def test_installed_script_runs_as_subprocess(tmp_path: Path) -> None:
    """The console script and `python -m unisegcli` both work and map errors to exit codes."""
    script = Path(sys.executable).with_name("uniseg")
    assert script.exists(), "the package is not installed (pip install -e .)"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "segment" in done.stdout
    bad = tmp_path / "bad.nii"
    bad.write_text("x")
    done = subprocess.run(
        [sys.executable, "-m", "unisegcli", str(bad), "-o", str(tmp_path / "o"), "--tasks", "liver"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == ExitCode.INPUT
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""
