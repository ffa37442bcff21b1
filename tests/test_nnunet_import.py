"""`uniseg weights import nnunet PATH --name NAME`: zipped and plain results folders, unsafe zips."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from unisegcli.api import segment
from unisegcli.errors import ArchiveError, UsageError
from unisegcli.weights import imported
from unisegcli.weights.resolver import get_model
from unisegcli.models.nnunet.importing import import_folder

FIXTURE = Path(__file__).parent / "data" / "nnunetv2_tiny"
RESULTS = FIXTURE / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("UNISEG_REGISTRY", raising=False)
    return tmp_path / "home"


def zip_results(path: Path, extra: dict[str, bytes] | None = None, link: str | None = None) -> Path:
    """The fixture's Dataset999_Tiny/ folder as a zip (plus extra members)."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(RESULTS.rglob("*")):
            if file.is_file():
                archive.write(file, f"Dataset999_Tiny/{RESULTS.name}/{file.relative_to(RESULTS).as_posix()}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return path


def test_cli_imports_a_zip_and_the_name_runs_like_the_folder(tmp_path: Path, _home: Path) -> None:
    from unisegcli.cli.app import app

    archive = zip_results(tmp_path / "tiny.zip")
    result = CliRunner().invoke(app, ["weights", "import", "nnunet", str(archive), "--name", "tiny"])
    assert result.exit_code == 0, result.output
    cached = _home / "nnunet" / "tiny" / RESULTS.name
    assert sorted(p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()) == [
        "dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
    assert imported.read_imported()["tiny"]["spec"] == f"nnunet:{cached}"

    listed = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["models"])
    assert listed.exit_code == 0
    assert any("tiny" in line and "imported from" in line and "nnunet" in line
               for line in listed.output.splitlines())
    card = get_model("tiny")
    assert card.name == "tiny" and card.family == "nnunet" and [t.name for t in card.tasks] == [
        "liver", "spleen", "kidney"]
    out = segment([FIXTURE / "inputs" / "realct_0000.nii.gz"], "spleen", output=tmp_path / "out",
                  model="tiny", nnunet_exact=True)
    expected = np.asarray(nib.load(str(FIXTURE / "expected_nomirror" / "realct.nii.gz")).dataobj)
    mask = np.asarray(nib.load(str(out.cases[0].masks["spleen"])).dataobj)
    np.testing.assert_array_equal(mask > 0, expected == 2)


@pytest.mark.parametrize("member,why", [("../evil.txt", "'..'"), ("/abs/evil.txt", "absolute path")])
def test_zip_with_a_traversal_member_is_refused_and_nothing_is_written(
        member: str, why: str, tmp_path: Path, _home: Path) -> None:
    archive = zip_results(tmp_path / "bad.zip", extra={member: b"x"})
    with pytest.raises(ArchiveError, match=why):
        import_folder(archive, "bad")
    assert not (_home / "nnunet" / "bad").exists() and not (tmp_path / "evil.txt").exists()
    assert "bad" not in imported.read_imported()
    assert list((_home / "nnunet").iterdir()) == []  # the work folder was cleaned up


def test_zip_with_a_symlink_is_refused(tmp_path: Path) -> None:
    archive = zip_results(tmp_path / "link.zip", link="Dataset999_Tiny/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        import_folder(archive, "linked")


def test_folder_import_and_names(tmp_path: Path, _home: Path) -> None:
    cached = import_folder(RESULTS.parent, "tiny-folder")  # the Dataset folder holding one results folder
    assert (cached / "fold_0" / "checkpoint_final.pth").read_bytes() == (
        RESULTS / "fold_0" / "checkpoint_final.pth").read_bytes()
    def tasks(name: str) -> list:
        return [(t.name, dict(t.extra), t.spacing_mm) for t in get_model(name).tasks]

    assert tasks("tiny-folder") == tasks(f"nnunet:{RESULTS}")
    with pytest.raises(UsageError, match="registry model"):
        import_folder(RESULTS, "uniseg")
    with pytest.raises(UsageError, match="not a usable model name"):
        import_folder(RESULTS, "../x")


def test_name_option_needs_model_nnunet(tmp_path: Path) -> None:
    from unisegcli.cli.app import app

    result = CliRunner().invoke(app, ["weights", "import", "uniseg", str(tmp_path), "--name", "x"])
    assert result.exit_code == 2 and "--name goes with MODEL 'nnunet'" in result.output
