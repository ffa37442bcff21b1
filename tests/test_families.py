"""The model-family seam: dispatch, unknown families, family-prefixed model names, --folds."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from unisegcli.cli.app import app
from unisegcli.errors import UsageError
from unisegcli.models import families
from unisegcli.weights.resolver import get_model


def test_every_registered_family_satisfies_the_contract():
    for name in families.FAMILY_MODULES:
        family = families.family(name)
        assert isinstance(family, families.ModelFamily) and family.name == name
        assert family.engine_options <= set(families.ENGINE_OPTIONS)
        for option in family.options:
            assert option.help and option.flag.startswith("--") and isinstance(option.type, type)


def test_unknown_family_is_a_usage_error_naming_the_known_ones():
    with pytest.raises(UsageError, match="family 'nosuch'.*expected one of .*uniseg"):
        families.family("nosuch")


def test_plain_names_and_unknown_prefixes_are_not_family_specs():
    assert families.card_from_spec("uniseg") is None
    assert families.card_from_spec("c:/models/x") is None  # a Windows-looking path, not a family


def test_generic_task_table_lists_every_task():
    card = get_model("uniseg")
    columns, rows = families.task_table(card)
    assert columns[0] == "task" and [r[0] for r in rows] == [t.name for t in card.tasks]


def test_resolve_tasks_defaults_to_the_card():
    card = get_model("uniseg")
    assert families.resolve_tasks(card, "liver,kidney") == card.resolve_tasks("liver,kidney")
    assert families.needed_roles(card, card.tasks) is None


@pytest.mark.parametrize("value", ["a,b", "-1", ","])
def test_bad_folds_are_one_line_usage_errors(value, tmp_path):
    result = CliRunner().invoke(app, [str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "o"),
                                      "--tasks", "liver", "--folds", value])
    assert result.exit_code == 2
    assert "--folds" in result.output


@pytest.mark.parametrize("model", ["uniseg", "uniseg-demo", "hermes", "totalsegmentator"])
def test_listing_and_resolving_tasks_does_not_import_torch(model):
    """`uniseg tasks` and task resolution stay light for every family (own process)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from unisegcli.weights.resolver import get_model; "
            "from unisegcli.models.families import task_table, resolve_tasks; "
            f"card = get_model({model!r}); task_table(card); resolve_tasks(card, card.tasks[0].name); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
