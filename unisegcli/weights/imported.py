"""Models imported into the cache by the user (``uniseg weights import nnunet PATH --name NAME``).

``<cache root>/imported_models.json`` maps a name to a family spec::

    {"models": {"myliver": {"spec": "nnunet:/home/me/.local/share/uniseg/nnunet/myliver/...",
                            "source": "/downloads/liver.zip", "time": "2026-11-25T23:40:00Z"}}}

``resolver.get_model(NAME)`` falls back to this file when NAME is not in the registry; the card
is the family's ``card_from_spec(spec)`` renamed to NAME.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unisegcli.errors import UsageError, WeightsError

if TYPE_CHECKING:
    from unisegcli.weights.cards import ModelCard

IMPORTED_NAME = "imported_models.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def imported_path() -> Path:
    from unisegcli.weights.cache import cache_root

    return cache_root() / IMPORTED_NAME


def read_imported() -> dict[str, dict[str, Any]]:
    """{name: entry} of the imported models (empty when nothing was imported)."""
    path = imported_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {path}: {exc}; expected the JSON file `uniseg weights import` "
                           "writes. Delete it and import the models again.") from exc
    models = data.get("models") if isinstance(data, dict) else None
    return dict(models) if isinstance(models, dict) else {}


def check_name(name: str) -> None:
    """A new imported model's name: a plain identifier that no registry model uses."""
    from unisegcli.weights.cards import load_registry

    if not NAME_PATTERN.match(name or ""):
        raise UsageError(f"--name {name!r} is not a usable model name; expected letters, digits, '.', '_' "
                         "or '-' (at most 64, starting with a letter or digit), e.g. --name liver-v2.")
    if name in load_registry():
        raise UsageError(f"--name {name!r} is a registry model; expected a new name. Pick another one, "
                         f"e.g. --name {name}-local.")


def register(name: str, spec: str, source: str) -> None:
    """Add or replace ``name`` in the imported-models file (written atomically)."""
    models = read_imported()
    models[name] = {"spec": spec, "source": source,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = imported_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".imported.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"models": models}, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def imported_card(name: str) -> "ModelCard | None":
    """The card of an imported model, or None when ``name`` was never imported."""
    from unisegcli.models.families import card_from_spec

    entry = read_imported().get(name)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("spec"), str):
        raise WeightsError(f"imported model '{name}' in {imported_path()} is {type(entry).__name__} without a "
                           f"'spec' string; expected {{\"spec\": \"<family>:<path>\", ...}}. Import it again "
                           f"(`uniseg weights import nnunet PATH --name {name}`).")
    card = card_from_spec(entry["spec"])
    if card is None:
        raise WeightsError(f"imported model '{name}' has spec {entry['spec']!r}, which this version cannot "
                           f"use; expected '<family>:<path>'. Import it again.")
    return replace(card, name=name, source=str(entry.get("source") or card.source))
