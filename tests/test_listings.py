"""`uniseg tasks`, `uniseg models`, `uniseg weights list`: readable at 80 columns, parseable as JSON/TSV."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from unisegcli.cli.app import app
from unisegcli.cli.listings import license_id
from unisegcli.errors import ExitCode
from unisegcli.weights.cards import REGISTRY_PATH, load_registry

MODELS = sorted(load_registry(REGISTRY_PATH))


def run(*args: str, columns: int = 80):
    return CliRunner(env={"COLUMNS": str(columns)}).invoke(app, list(args), prog_name="uniseg")


@pytest.fixture(autouse=True)
def shipped_registry(monkeypatch, tmp_path):
    monkeypatch.delenv("UNISEG_REGISTRY", raising=False)
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("model", MODELS)
def test_every_task_name_appears_whole_at_80_columns(model: str) -> None:
    card = load_registry(REGISTRY_PATH)[model]
    result = run("tasks", "--model", model)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    cells = {cell.strip() for line in lines for cell in line.split("│")}
    missing = [t.name for t in card.tasks if t.name not in cells]
    assert missing == [], f"cut or wrapped task names: {missing[:5]}"
    assert "…" not in result.stdout


def test_structures_wrap_between_names_never_inside() -> None:
    result = run("tasks", "--model", "uniseg")
    words = {w.strip(",") for line in result.stdout.splitlines() for cell in line.split("│") for w in cell.split()}
    for task in load_registry(REGISTRY_PATH)["uniseg"].tasks:
        assert set(task.structures) <= words, task.name
    assert "not shown at 80 columns" in result.stdout  # what had to go is said, not cut


def test_models_table_has_short_license_ids_and_fits() -> None:
    result = run("models")
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for model in MODELS:
        assert any(f"│ {model} " in line for line in result.stdout.splitlines()), model
    assert "custom-noncommercial" in result.stdout and "unspecified" in result.stdout
    assert "BSD-2-style" not in result.stdout  # the paragraph lives in `uniseg models NAME`
    full = run("models", "uniseg")
    assert full.exit_code == 0 and "BSD-2-style clauses" in full.stdout and "custom-noncommercial" in full.stdout


def test_json_and_tsv_hold_everything() -> None:
    registry = load_registry(REGISTRY_PATH)
    models = json.loads(run("models", "--json").stdout)
    assert [m["model"] for m in models][: len(registry)] == list(registry)
    assert all(m["license_id"] and m["license"] for m in models)
    tasks = json.loads(run("tasks", "--model", "uniseg", "--json").stdout)
    brain = next(t for t in tasks["tasks"] if t["task"] == "brain_tumor")
    assert brain["channels"] == ["t1", "t1ce", "t2", "flair"] and brain["spacing_mm"] == [1.0, 1.0, 1.0]
    tsv = run("tasks", "--model", "totalsegmentator", "--tsv", columns=40).stdout.splitlines()
    assert tsv[0].split("\t")[0] == "task" and len(tsv) == 1 + len(registry["totalsegmentator"].tasks)
    assert all(len(line.split("\t")) == len(tsv[0].split("\t")) for line in tsv)
    listed = json.loads(run("weights", "list", "--json").stdout)
    assert {r["model"] for r in listed} == set(registry) and all("license_id" in r for r in listed)
    rows = run("weights", "list", "--tsv").stdout.splitlines()
    assert rows[0] == "model\tversion\tsize_bytes\tinstalled\tverified\tlicense_id" and len(rows) == 1 + len(registry)
    one = json.loads(run("models", "hermes", "--json").stdout)
    assert one["license_id"] == "unspecified" and "lits_liver" in one["task_names"]


def test_json_and_tsv_together_are_refused() -> None:
    result = run("tasks", "--json", "--tsv")
    assert result.exit_code == ExitCode.USAGE and "--json and --tsv" in result.output


def test_license_id_falls_back_to_the_text() -> None:
    card = load_registry(REGISTRY_PATH)["uniseg"]
    def lid(text: str) -> str:
        return license_id(dataclasses.replace(card, license=text, license_id=None))
    assert lid("Apache-2.0 (weights from the project)") == "Apache-2.0"
    assert lid("CC-BY-NC-SA-4.0; cite the paper") == "CC-BY-NC-SA-4.0"
    assert lid("MIT") == "MIT"
    assert lid("license: not specified by the authors") == "unspecified"
    assert lid("Research license: non-commercial use only") == "custom-noncommercial"
    assert lid("Test license XYZ (research use)") == "custom"
    assert license_id(card) == "custom-noncommercial"  # the registry's own field wins
