"""`uniseg weights ...` through typer's CliRunner, on a test registry and a loopback server."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import typer
from pytest_httpserver import HTTPServer
from typer.testing import CliRunner

from unisegcli.errors import ChecksumError, OfflineError, UnknownModelError
from unisegcli.cli.weights import weights_app
from unisegcli.weights import cache, cards, resolver

pytestmark = pytest.mark.timeout(60)

TASK = {
    "name": "liver", "index": 0, "modality": "CT", "channels": ["ct"], "labels": {"1": "liver"},
    "spacing_mm": [3.0, 1.5, 1.5], "normalization": {"ct": {"scheme": "zscore"}},
}
CKPT = bytes(range(256)) * 100
PLANS = pickle.dumps({"plans_per_stage": {}}, protocol=4)  # import test-loads it


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(server: HTTPServer, path: str, data: bytes) -> None:
    server.expect_request(path).respond_with_data(data, content_type="application/octet-stream")


@pytest.fixture
def app() -> typer.Typer:
    """A stand-in for the main app: mounts the sub-app the way the lead's app.py does."""
    root = typer.Typer()

    @root.callback()
    def main() -> None:
        """uniseg (test root)."""

    root.add_typer(weights_app, name="weights")
    return root


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(autouse=True)
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, httpserver: HTTPServer) -> Path:
    """A registry with model 'fake' (plans without sha256) served by httpserver."""
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    for var in ("UNISEG_OFFLINE", "UNISEG_MIRROR", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    files = [
        {"name": "model.bin", "role": "checkpoint", "urls": [httpserver.url_for("/model.bin")],
         "sha256": sha(CKPT), "size_bytes": len(CKPT)},
        {"name": "plans.pkl", "role": "plans", "urls": [httpserver.url_for("/plans.pkl")],
         "sha256": None, "size_bytes": None},
    ]
    doc = {"schema_version": 1, "task_sets": {"t": [TASK]}, "models": {"fake": {
        "family": "uniseg", "version": "0.1", "description": "d",
        "license": "Test license XYZ (research use)", "task_set": "t", "files": files}}}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("UNISEG_REGISTRY", str(path))
    serve(httpserver, "/model.bin", CKPT)
    serve(httpserver, "/plans.pkl", PLANS)
    return path


def card() -> cards.ModelCard:
    return resolver.get_model("fake")


def test_every_command_argument_and_option_has_help(app: typer.Typer) -> None:
    group = typer.main.get_command(app).commands["weights"]  # type: ignore[attr-defined]
    assert set(group.commands) == {"list", "download", "verify", "import", "path", "remove", "convert", "prepare"}
    for name, command in group.commands.items():
        assert command.help, name
        for param in command.params:
            assert getattr(param, "help", None), f"{name} {param.name} has no help text"


def test_list_shows_models_and_install_state(app, runner: CliRunner) -> None:
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "fake" in line)
    assert "0.1" in row and "no" in row and "custom" in row  # short license id; full text in --json
    listed = json.loads(runner.invoke(app, ["weights", "list", "--json"]).stdout)
    fake = next(r for r in listed if r["model"] == "fake")
    assert fake["license"].startswith("Test license XYZ") and fake["license_id"] == "custom"
    assert fake["installed"] == "no" and fake["version"] == "0.1"
    runner.invoke(app, ["weights", "download", "fake", "--quiet"])
    listing = runner.invoke(app, ["weights", "list"]).stdout
    row = next(line for line in listing.splitlines() if "fake" in line)
    assert "yes" in row and "hash recorded" in row


def test_download_shows_license_then_downloads(app, runner: CliRunner, httpserver: HTTPServer) -> None:
    result = runner.invoke(app, ["weights", "download", "fake"])
    assert result.exit_code == 0, result.output
    license_at = result.stderr.index("license: Test license XYZ (research use)")
    # plans.pkl has no sha256 in the registry: one warning, printed after the license line
    assert result.stderr.count("warning:") == 1 and result.stderr.index("warning:") > license_at
    assert "plans.pkl" in result.stderr and "uniseg weights verify fake" in result.stderr
    assert (cache.model_dir(card()) / "model.bin").read_bytes() == CKPT
    assert len(httpserver.log) == 2
    quiet = runner.invoke(app, ["weights", "download", "fake", "--quiet"])
    assert quiet.exit_code == 0 and len(httpserver.log) == 2  # cached: nothing fetched again
    assert "license" in quiet.stderr and "ready in" not in quiet.stderr


def test_download_unknown_model_raises_domain_error(app, runner: CliRunner) -> None:
    result = runner.invoke(app, ["weights", "download", "fak"])
    assert isinstance(result.exception, UnknownModelError)
    assert "did you mean 'fake'" in str(result.exception)


def test_download_offline_raises_offline_error(app, runner: CliRunner, httpserver: HTTPServer) -> None:
    result = runner.invoke(app, ["weights", "download", "fake", "--offline"])
    assert isinstance(result.exception, OfflineError)
    assert "uniseg weights import fake PATH" in str(result.exception)
    assert httpserver.log == []


def test_verify_reports_ok_then_detects_corruption(app, runner: CliRunner) -> None:
    runner.invoke(app, ["weights", "download", "fake", "--quiet"])
    result = runner.invoke(app, ["weights", "verify", "fake"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count(" ok ") == 2 and "manifest" in result.stdout
    plans = cache.model_dir(card()) / "plans.pkl"
    plans.write_bytes(b"\x80\x04 fake plant")
    result = runner.invoke(app, ["weights", "verify"])  # no NAME: every installed model
    assert isinstance(result.exception, ChecksumError)
    assert str(plans) in str(result.exception) and "mismatch" in result.stdout


def test_import_path_and_remove(app, runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "from-browser"
    folder.mkdir()
    (folder / "model.bin").write_bytes(CKPT)
    result = runner.invoke(app, ["weights", "import", "fake", str(folder / "model.bin")])
    assert result.exit_code == 0, result.output
    assert "imported checkpoint" in result.stderr and "still missing" in result.stderr
    (folder / "plans.pkl").write_bytes(PLANS)
    assert runner.invoke(app, ["weights", "import", "fake", str(folder), "-q"]).exit_code == 0

    where = runner.invoke(app, ["weights", "path", "fake"])
    assert where.stdout.strip() == str(cache.model_dir(card()))
    names = sorted(p.name for p in Path(where.stdout.strip()).iterdir())
    assert names == ["manifest.json", "model.bin", "plans.pkl"]

    declined = runner.invoke(app, ["weights", "remove", "fake"], input="n\n")
    assert declined.exit_code != 0 and (cache.model_dir(card()) / "model.bin").exists()
    removed = runner.invoke(app, ["weights", "remove", "fake", "--yes"])
    assert removed.exit_code == 0 and "removed 3 file(s)" in removed.stderr
    assert not cache.model_dir(card()).exists()
