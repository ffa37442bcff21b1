"""The resolver: turn a --model name into its card.

Order: ``<family>:<argument>`` names (e.g. ``nnunet:<results folder>``) are built by that
family; then the registry (``weights_registry.json`` or ``$UNISEG_REGISTRY``); then the models
imported by the user (``uniseg weights import nnunet PATH --name NAME``).
"""

from __future__ import annotations

from pathlib import Path

from unisegcli.errors import UnknownModelError, suggest
from unisegcli.weights.cards import ModelCard, load_registry


def get_model(name: str, path: Path | None = None) -> ModelCard:
    """The card of model ``name``; an unknown name raises with a did-you-mean suggestion.

    ``<family>:<argument>`` names (e.g. ``nnunet:<results folder>``) are built by that family.
    """
    from unisegcli.models.families import card_from_spec
    from unisegcli.weights.imported import imported_card  # `uniseg weights import nnunet ... --name`

    built = card_from_spec(name)
    if built is not None:
        return built
    models = load_registry(path)
    if name not in models:
        imported = imported_card(name)
        if imported is not None:
            return imported
        raise UnknownModelError(
            f"unknown model '{name}'{suggest(name, models)} Known models: "
            f"{', '.join(sorted(models))}. Run `uniseg models` to list them."
        )
    return models[name]
