"""TotalSegmentator's ``total`` task as a multi-part nnU-Net model.

The registry entry (five nnU-Net v2 parts, 117 classes as data) is checked as data; the run
is checked with a mock of it: a test registry whose two parts are zips of the tiny fixture
folder, served from a loopback server. Asking for classes of one part must download, load
and run only that part.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pytest_httpserver import HTTPServer
from typer.testing import CliRunner

from unisegcli.api import segment
from unisegcli.weights.cards import load_registry
from unisegcli.weights.resolver import get_model
from unisegcli.weights.download import UnverifiedFileWarning
from unisegcli.models.families import needed_roles, resolve_tasks

FIXTURE = Path(__file__).parent / "data" / "nnunetv2_tiny"
RESULTS = FIXTURE / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(120)]


def test_registry_entry_holds_the_five_parts_and_117_classes() -> None:
    card = load_registry()["totalsegmentator"]
    assert card.family == "nnunet" and card.license == "Apache-2.0"
    assert "TotalSegmentator project" in (card.note or "") and "Wasserthal" in card.citation
    assert [f.role for f in card.files] == [f"part:{p}" for p in (291, 292, 293, 294, 295)]
    for f in card.files:
        assert f.urls == (f"https://github.com/wasserth/TotalSegmentator/releases/download/"
                          f"v2.0.0-weights/{f.name}",)
        assert f.name.startswith(f"Dataset{f.role[5:]}_TotalSegmentator_part") and f.sha256 is None
    assert len(card.tasks) == 117 and len({t.name for t in card.tasks}) == 117
    per_part: dict[str, list[int]] = {}
    for t in card.tasks:
        assert t.labels == {1: t.name} and t.channels == ("ct",) and t.spacing_mm == (1.5, 1.5, 1.5)
        per_part.setdefault(t.extra["part"], []).append(t.extra["label"])
    assert {p: len(v) for p, v in per_part.items()} == {"291": 24, "292": 26, "293": 18, "294": 23, "295": 26}
    assert all(sorted(v) == list(range(1, len(v) + 1)) for v in per_part.values())
    tasks = resolve_tasks(card, "liver,spleen,kidney_left")
    assert needed_roles(card, tasks) == {"part:291"}
    assert needed_roles(card, resolve_tasks(card, "liver,heart,rib_left_1")) == {"part:291", "part:293", "part:295"}


def test_models_command_shows_the_weights_come_from_totalsegmentator() -> None:
    from unisegcli.cli.app import app

    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["models"])
    assert result.exit_code == 0
    line = next(l for l in result.output.splitlines() if "totalsegmentator" in l)
    assert "TotalSegmentator project" in line and "Apache-2.0" in line


def part_zip(path: Path, dataset_id: int) -> bytes:
    """The fixture results folder zipped as TotalSegmentator zips its parts."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(RESULTS.rglob("*")):
            if file.is_file():
                archive.write(file, f"Dataset{dataset_id}_Mock/{RESULTS.name}/{file.relative_to(RESULTS).as_posix()}")
    return path.read_bytes()


@pytest.fixture
def mock_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, httpserver: HTTPServer) -> dict[str, bytes]:
    """A 'totalseg-mock' model: part 291 holds liver (1) and spleen (2), part 293 kidney (3)."""
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    for var in ("UNISEG_OFFLINE", "UNISEG_MIRROR", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    real = load_registry()["totalsegmentator"]
    zips = {p: part_zip(tmp_path / f"part{p}.zip", p) for p in (291, 293)}
    task = {"modality": "CT", "channels": ["ct"], "spacing_mm": [3.0, 1.5, 1.5],
            "normalization": {"ct": {"scheme": "nnunet_plans"}}}
    tasks = [dict(task, name=n, index=i, labels={"1": n}, extra={"part": p, "label": v})
             for i, (n, p, v) in enumerate([("liver", "291", 1), ("spleen", "291", 2), ("kidney", "293", 3)])]
    files = []
    for p, data in zips.items():
        name = f"Dataset{p}_Mock.zip"
        httpserver.expect_request(f"/{name}").respond_with_data(data, content_type="application/zip")
        files.append({"name": name, "role": f"part:{p}", "urls": [httpserver.url_for(f"/{name}")],
                      "sha256": None, "size_bytes": None})
    registry = {"schema_version": 1, "task_sets": {"mock": tasks}, "models": {"totalseg-mock": {
        "family": "nnunet", "version": "0.1", "description": real.description, "license": real.license,
        "citation": real.citation, "note": real.note, "task_set": "mock",
        "network": {"results_folders": {"291": RESULTS.name, "293": RESULTS.name}}, "files": files}}}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(registry))
    monkeypatch.setenv("UNISEG_REGISTRY", str(path))
    return {f"Dataset{p}_Mock.zip": data for p, data in zips.items()}


def requested(server: HTTPServer) -> list[str]:
    return [request.path.lstrip("/") for request, _ in server.log]


def test_classes_of_one_part_download_and_run_only_that_part(
        mock_registry, httpserver: HTTPServer, tmp_path: Path) -> None:
    from unisegcli.weights import cache

    with pytest.warns(UnverifiedFileWarning, match="Dataset291_Mock.zip"):  # the registry has no sha256
        result = segment([FIXTURE / "inputs" / "realct_0000.nii.gz"], "spleen,liver", output=tmp_path / "a",
                         model="totalseg-mock", nnunet_exact=True)
    assert requested(httpserver) == ["Dataset291_Mock.zip"]
    card = get_model("totalseg-mock")
    assert [f.name for f in cache.missing_files(card)] == ["Dataset293_Mock.zip"]
    expected = np.asarray(nib.load(str(FIXTURE / "expected_nomirror" / "realct.nii.gz")).dataobj)
    masks = result.cases[0].masks
    assert set(masks) == {"liver", "spleen"}
    for name, value in (("liver", 1), ("spleen", 2)):
        np.testing.assert_array_equal(np.asarray(nib.load(str(masks[name])).dataobj) > 0, expected == value)

    from unisegcli.session import Segmenter

    loaded = Segmenter(card.name, "spleen", offline=True).load()
    assert set(loaded.parts) == {"291"}  # the network of the other part is never built

    # the other part only when one of its classes is asked for; the first is reused from the cache
    with pytest.warns(UnverifiedFileWarning, match="Dataset293_Mock.zip"):
        result = segment([FIXTURE / "inputs" / "realct_0000.nii.gz"], "kidney,liver", output=tmp_path / "b",
                         model="totalseg-mock", nnunet_exact=True)
    assert requested(httpserver) == ["Dataset291_Mock.zip", "Dataset293_Mock.zip"]
    kidney = np.asarray(nib.load(str(result.cases[0].masks["kidney"])).dataobj)
    np.testing.assert_array_equal(kidney > 0, expected == 3)


def test_cli_download_fetches_every_part(mock_registry, httpserver: HTTPServer) -> None:
    from unisegcli.cli.app import app

    result = CliRunner().invoke(app, ["weights", "download", "totalseg-mock", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(requested(httpserver)) == ["Dataset291_Mock.zip", "Dataset293_Mock.zip"]


def test_remove_deletes_the_unpacked_parts(mock_registry, tmp_path: Path) -> None:
    from unisegcli.weights import cache

    with pytest.warns(UnverifiedFileWarning):
        segment([FIXTURE / "inputs" / "realct_0000.nii.gz"], "liver", output=tmp_path / "a",
                model="totalseg-mock", nnunet_exact=True)
    card = get_model("totalseg-mock")
    unpacked = cache.model_dir(card) / "Dataset291_Mock.zip.unpacked"
    assert (unpacked / "Dataset291_Mock" / RESULTS.name / "plans.json").is_file()
    removed = cache.remove_model(card)
    assert unpacked in removed and not cache.model_dir(card).exists()
