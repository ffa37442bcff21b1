"""``load_hermes``: a ready Hermes network from the released checkpoint (or a converted one).

Checkpoint layout (yhygao/universal-medical-image-segmentation ``train.py``, the only writer): a
``torch.save`` dict with ``epoch``, ``model_state_dict``, ``ema_model_state_dict`` and
``optimizer_state_dict``. Upstream validates and tests with the EMA network, so we load
``ema_model_state_dict`` when it is present and not None, else ``model_state_dict``, else a
bare state dict whose top level holds the weights. ``module.`` / ``_orig_mod.`` prefixes
(DataParallel, torch.compile) are stripped. Files are read with ``torch.load(...,
weights_only=True)`` only (``checkpoint.load_torch_file``); ``.safetensors`` files are read
with safetensors, with a ``config.json`` beside them or the config derived from the shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from unisegcli.errors import CheckpointError
from unisegcli.weights.checkpoint import CONFIG_NAME, check_state_dict, load_state_dict, load_torch_file
from unisegcli.models.hermes.config import HermesConfig
from unisegcli.models.hermes.network import HermesUNet

STATE_KEYS = ("ema_model_state_dict", "model_state_dict")  # preference order
PREFIXES = ("module.", "_orig_mod.")


def select_state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """(weights, which entry they came from) of a loaded Hermes checkpoint."""
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            value = obj.get(key)
            if isinstance(value, Mapping) and value:
                return _clean(value, source), key
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _clean(obj, source), "state dict"
    kind = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise CheckpointError(
        f"{source} holds no Hermes weights ({kind}); expected a train.py checkpoint with "
        "'ema_model_state_dict' or 'model_state_dict', or a plain state dict. Download it again."
    )


def _clean(state: Mapping[Any, Any], source: str) -> dict[str, torch.Tensor]:
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source} is not a state dict: entries {bad[:5]} are not named tensors")
    out = dict(state)
    for prefix in PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def build_hermes(state: Mapping[str, torch.Tensor], source: str, config: HermesConfig | None = None) -> HermesUNet:
    """A HermesUNet holding ``state`` (keys and shapes checked first): eval, float32, CPU."""
    if config is None:
        try:
            config = HermesConfig.from_state_dict(state)
        except ValueError as exc:
            raise CheckpointError(f"{source} is not a Hermes checkpoint: {exc}") from None
    with torch.device("meta"):
        net = HermesUNet(config)
    check_state_dict(state, net.state_dict(), source)
    # clone: checkpoints may share storage between entries (tied tensors)
    weights = {k: v.detach().to(device="cpu", dtype=torch.float32).clone() for k, v in state.items()}
    net.load_state_dict(weights, strict=True, assign=True)
    return net.eval()


def load_hermes(checkpoint: str | Path, config: HermesConfig | str | Path | None = None) -> HermesUNet:
    """Load Hermes from a ``.pth`` training checkpoint, a state-dict file or a ``.safetensors``.

    config: a ``HermesConfig``, a ``config.json`` path, or None (``config.json`` beside a
    ``.safetensors`` if present, else derived from the weights' shapes). Returns the network in
    eval mode, float32, on the CPU: ``seg_logits, modality_logits = net(x, task_indices,
    modality_index)`` (see ``network.HermesUNet``). Raises ``CheckpointError`` (one line) for
    missing, corrupt, unsafe or mismatching files.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; download the model or check the path")
    if isinstance(config, (str, Path)):
        config = read_config_json(Path(config))
    if path.suffix == ".safetensors":
        state, entry = load_state_dict(path), "safetensors"
        beside = path.with_name(CONFIG_NAME)
        if config is None and beside.is_file():
            config = read_config_json(beside)
    else:
        state, entry = select_state_dict(load_torch_file(path), path.name)
    net = build_hermes(state, f"{path.name} ({entry})", config)
    net.weights_entry = entry  # type: ignore[assignment]  # which dict was loaded, for reports
    return net


def read_config_json(path: Path) -> HermesConfig:
    """A HermesConfig from a JSON file of its fields."""
    try:
        return HermesConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise CheckpointError(f"network config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.name} does not describe a Hermes network: {exc}") from None
