"""``load_uniseg``: a ready UniSeg network from released or converted files.

Accepted inputs (what yeerwen/UniSeg releases and ``inference/predict.py`` loads):
- nnU-Net v1 ``model_final_checkpoint.model`` + ``plans.pkl``; without plans, the trainer's
  ``model_final_checkpoint.model.pkl`` beside the checkpoint supplies them ("plans" entry);
- ``model.safetensors`` + ``config.json`` beside it (``convert_checkpoint`` writes both);
  plans_path then is optional and may also name a ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unisegcli.errors import CheckpointError
from unisegcli.weights.checkpoint import (
    CONFIG_NAME,
    check_state_dict,
    load_state_dict,
    read_plans,
)
from unisegcli.models.uniseg.config import UniSegConfig
from unisegcli.models.uniseg.network import UniSegNet


def read_config_json(path: Path) -> UniSegConfig:
    """A ``UniSegConfig`` from a ``config.json`` (keys = the config's field names)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"network config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name} is not a readable JSON network config: {exc}") from None
    try:
        return UniSegConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.name} does not describe a UniSeg network: {exc}") from None


def resolve_config(checkpoint: str | Path, plans_path: str | Path | None = None) -> UniSegConfig:
    """The network config for a checkpoint, from plans_path or the files beside it.

    plans_path: ``plans.pkl``, a trainer ``.model.pkl`` or a ``config.json``. When None:
    ``config.json`` beside a ``.safetensors``, else ``<checkpoint>.pkl`` beside a v1 checkpoint.
    """
    checkpoint = Path(checkpoint)
    if plans_path is not None:
        plans_path = Path(plans_path)
        if plans_path.suffix == ".json":
            return read_config_json(plans_path)
        return UniSegConfig.from_plans(read_plans(plans_path))
    if checkpoint.suffix == ".safetensors":
        beside = checkpoint.with_name(CONFIG_NAME)
        if not beside.is_file():
            raise CheckpointError(
                f"no {CONFIG_NAME} beside {checkpoint.name}; pass the plans.pkl, or convert the "
                "checkpoint again (it writes both files)"
            )
        return read_config_json(beside)
    trainer_pkl = checkpoint.with_name(checkpoint.name + ".pkl")
    if trainer_pkl.is_file():
        return UniSegConfig.from_plans(read_plans(trainer_pkl))
    raise CheckpointError(
        f"no plans for {checkpoint.name}: pass plans.pkl, or put {trainer_pkl.name} beside the "
        "checkpoint (both are downloaded with the model)"
    )


def build_uniseg(config: UniSegConfig, state: dict[str, torch.Tensor], source: str) -> UniSegNet:
    """A UniSegNet holding ``state`` (checked first): eval mode, float32, CPU.

    The network is built on the meta device and the loaded tensors are assigned, so no
    memory or time goes into a random initialisation that would be overwritten.
    """
    with torch.device("meta"):
        net = UniSegNet(config)
    check_state_dict(state, net.state_dict(), source)
    weights = {k: v.to(device="cpu", dtype=torch.float32) for k, v in state.items()}
    net.load_state_dict(weights, strict=True, assign=True)
    return net.eval()


def load_uniseg(checkpoint_path: str | Path, plans_path: str | Path | None = None) -> UniSegNet:
    """Load UniSeg: a v1 ``.model`` (+ plans) or a ``.safetensors`` (+ ``config.json``).

    Returns the network in eval mode, float32, on the CPU (move it with ``.to(device)``).
    ``net(x, task_index)``: x float32 [B, C, *patch] -> [B, num_classes, *patch] logits.
    Raises ``CheckpointError`` (``UnsafePickleError``, ``StateDictMismatchError``) with a
    one-line message for missing, corrupt, unsafe or mismatching files.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise CheckpointError(
            f"checkpoint {checkpoint_path} does not exist; download the model or check the path"
        )
    config = resolve_config(checkpoint_path, plans_path)
    state = load_state_dict(checkpoint_path)
    return build_uniseg(config, state, checkpoint_path.name)
