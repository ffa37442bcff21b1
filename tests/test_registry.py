"""The shipped registry passes the schema; broken entries fail with a message naming them."""

from __future__ import annotations

import copy
import json

import pytest

from unisegcli.errors import UnknownTaskError, UsageError
from unisegcli.weights.cards import REGISTRY_PATH, RegistryError, load_registry, parse_registry
from unisegcli.weights.resolver import get_model

RAW = json.loads(REGISTRY_PATH.read_text())


def test_shipped_registry_is_valid() -> None:
    models = load_registry(REGISTRY_PATH)
    uniseg = models["uniseg"]
    assert [t.index for t in uniseg.tasks] == list(range(11))
    assert uniseg.task("kidneys").name == "kidney"
    assert uniseg.task("BraTS").channels == ("t1", "t1ce", "t2", "flair")
    assert {f.role for f in uniseg.files} >= {"checkpoint", "plans"}
    # Output classes never exceed the network's 4 output channels.
    assert max(t.num_classes for t in uniseg.tasks) <= 4


def test_top_level_registry_is_the_packaged_one() -> None:
    from pathlib import Path

    top = Path(__file__).resolve().parents[1] / "weights_registry.json"
    assert top.resolve() == REGISTRY_PATH.resolve()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("schema_version"), "schema_version"),
        (lambda r: r["models"]["uniseg"].pop("files"), r"models\[uniseg\] has no 'files'"),
        (lambda r: r["models"]["uniseg"].update(task_set="nope"), "task_set 'nope'"),
        (lambda r: r["task_sets"]["uniseg11"][0].update(modality="XR"), "modality"),
        (lambda r: r["task_sets"]["uniseg11"][0].update(labels={"2": "a"}), "numbered 1..n"),
        (lambda r: r["task_sets"]["uniseg11"][0].update(spacing_mm=[1, 1]), "spacing_mm"),
        (lambda r: r["models"]["uniseg"]["files"][0].update(sha256="abc"), "sha256"),
        (lambda r: r["models"]["uniseg"]["files"][0].update(name="../x"), "plain file name"),
    ],
)
def test_schema_errors_name_the_entry(mutate, message: str) -> None:
    broken = copy.deepcopy(RAW)
    mutate(broken)
    with pytest.raises(RegistryError, match=message):
        parse_registry(broken)


def test_task_resolution() -> None:
    card = get_model("uniseg")
    assert [t.name for t in card.resolve_tasks("liver, Kidneys,liver")] == ["liver", "kidney"]
    with pytest.raises(UnknownTaskError, match="did you mean 'spleen'"):
        card.resolve_tasks("splen")
    with pytest.raises(UsageError, match="no task given"):
        card.resolve_tasks(" , ")


def test_registry_env_override(tmp_path, monkeypatch) -> None:
    custom = copy.deepcopy(RAW)
    custom["models"] = {"site-model": custom["models"]["uniseg"]}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(custom))
    monkeypatch.setenv("UNISEG_REGISTRY", str(path))
    assert list(load_registry()) == ["site-model"]


def test_registry_network_is_the_released_config() -> None:
    """The card's network entry builds exactly the released 11-task network."""
    from unisegcli.models.uniseg import UniSegConfig

    card = get_model("uniseg")
    assert UniSegConfig.from_dict(card.network) == UniSegConfig.default()
    assert UniSegConfig.default().num_tasks == len(card.tasks)
