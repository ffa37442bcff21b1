"""Hermes (CVPR 2024, "Training Like a Medical Resident"): network, config, loader, family.

    from unisegcli.models.hermes import load_hermes
    net = load_hermes("best.pth")                      # EMA weights, eval, fp32, CPU
    seg, modality = net(x, task_indices, modality_index)
    # x [B, 1, z, y, x]; task_indices int64 [B, T] (-1 = null token); modality_index int64 [B, 1]

Heavy modules (torch) load on first attribute access, so importing the family stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HermesConfig", "HermesUNet", "load_hermes"]


def __getattr__(name: str) -> Any:
    if name == "load_hermes":
        from unisegcli.models.hermes.loader import load_hermes

        return load_hermes
    if name == "HermesUNet":
        from unisegcli.models.hermes.network import HermesUNet

        return HermesUNet
    if name == "HermesConfig":
        from unisegcli.models.hermes.config import HermesConfig

        return HermesConfig
    raise AttributeError(f"module 'unisegcli.models.hermes' has no attribute {name!r}")
