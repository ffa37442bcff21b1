"""Reading model weights and nnU-Net v1 plans without running code from the files.

Weights come as an nnU-Net v1 ``.model`` (``torch.save`` of a dict whose ``"state_dict"``
holds the weights; see ``network_trainer.save_checkpoint`` in yeerwen/UniSeg), a plain state
dict, or ``.safetensors``. ``torch.load`` always runs with ``weights_only=True``; numpy
scalars/arrays that nnU-Net v1 stores next to the weights (plot data, best-epoch values) are
allowed by name, only those the file actually uses, and there is no unrestricted fallback.
Plans (``plans.pkl``, ``<checkpoint>.pkl``) go through ``safe_pickle``.

``models.uniseg.convert`` writes ``model.safetensors`` + ``config.json`` for fast, pickle-free
loading later. Every failure is a ``CheckpointError`` (``UnsafePickleError`` for refused
globals) whose one-line message names the file and says what to do.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from unisegcli.errors import CheckpointError, UnsafePickleError
from unisegcli.weights import safe_pickle

SAFETENSORS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_ZIP_MAGIC = b"PK\x03\x04"
_SHOW = 5  # keys listed in a mismatch message


class StateDictMismatchError(CheckpointError):
    """The weights' keys or shapes differ from the network built from the config/plans."""


# -- raw files -------------------------------------------------------------------------------


def _head(path: Path, n: int = 512) -> bytes:
    """First bytes of a file; raises for missing, unreadable, empty and HTML files."""
    try:
        with path.open("rb") as f:
            head = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; download it or check the path") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointError(f"{path.name} is empty (0 bytes); delete it and download it again")
    if safe_pickle.looks_like_html(head):
        raise CheckpointError(safe_pickle.html_message(path.name))
    return head


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(
        f"{path.name} is truncated or corrupt ({detail[:160]}); delete it and download it again"
    )


def _refusal(message: str) -> str:
    """What torch's weights-only unpickler refused, as a short phrase."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        name = match.group(1)
        # torch prints builtins without their module ("exec"); name them in full
        return f"global '{name if '.' in name else 'builtins.' + name}'"
    match = re.search(r"WeightsUnpickler error: (.+)", message)
    return (match.group(1) if match else message.strip().splitlines()[0])[:160]


def load_torch_file(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load`` a file on the CPU with ``weights_only=True`` and the numpy allow-list.

    Zip checkpoints (torch >= 1.6) are scanned first: a global that is neither allowed by
    torch nor one of numpy's array/scalar rebuilders raises ``UnsafePickleError`` before
    anything is unpickled. Legacy (pre-zip) files are loaded with the whole numpy allow-list.
    ``mmap=True`` maps a zip checkpoint's tensors instead of reading them all (large files
    whose optimizer state is not needed).
    """
    path = Path(path)
    head = _head(path)
    if head.startswith(_ZIP_MAGIC):
        try:
            used = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except pickle.UnpicklingError as exc:
            raise UnsafePickleError(
                f"{path.name}: refused: its pickle uses opcodes torch.save never writes ({exc}), "
                "so it is corrupt or crafted; nothing in it was executed. Download it again."
            ) from None
        except (RuntimeError, EOFError, ValueError, OSError) as exc:
            raise _corrupt(path, exc) from None
        refused = [name for name in used if not safe_pickle.is_numpy_global(name)]
        if refused:
            raise UnsafePickleError(
                f"{path.name}: refused to load global '{refused[0]}' (weights files may only hold "
                "tensors, containers, numbers and numpy arrays); nothing in it was executed. "
                "Download it again from the registry URL."
            )
        allow = safe_pickle.torch_numpy_globals(used)
    elif head[:1] == b"\x80":
        allow = safe_pickle.torch_numpy_globals()
    else:
        raise CheckpointError(
            f"{path.name} is not a PyTorch checkpoint (starts with {head[:8]!r}); "
            "expected a .model/.pth file or .safetensors; download it again"
        )
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and head.startswith(_ZIP_MAGIC))
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(
            f"{path.name}: refused to load {_refusal(str(exc))}; nothing in it was executed. "
            "Download it again from the registry URL."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        raise _corrupt(path, exc) from None


TORCH_SUFFIXES = (".model", ".pth", ".pt", ".ckpt")
LOADABLE_SUFFIXES = (*TORCH_SUFFIXES, ".pkl", ".safetensors")


def check_loadable(path: str | Path) -> None:
    """Load a weights or plans file the way a run will, with the same safe loaders (nothing in
    it is executed); raise CheckpointError / UnsafePickleError when a run would refuse it.

    Chosen by suffix: .pkl through ``safe_pickle``, .safetensors through safetensors, torch
    files (.model, .pth, .pt, .ckpt) through ``load_torch_file`` (memory-mapped where it can).
    Other files (JSON, zips) are not checked here.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        safe_pickle.load(path)
    elif suffix == ".safetensors":
        _load_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        load_torch_file(path, mmap=True)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _head(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _corrupt(path, exc) from None


def extract_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """The weights in a loaded checkpoint: nnU-Net v1 ``"state_dict"`` or a plain state dict.

    Documented key map: a ``module.`` prefix on every key (a DataParallel/DDP wrapper when
    the trainer saved) is removed; nothing else is renamed.
    """
    if isinstance(obj, Mapping):
        for key in ("state_dict", "network_weights"):  # nnU-Net v1, nnU-Net v2
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{source} holds no weights (a {type(obj).__name__}); expected a state dict or an "
            "nnU-Net v1 checkpoint with a 'state_dict' entry"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{source} is not a state dict: entries {bad[:_SHOW]} are not named tensors"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from a ``.safetensors``, an nnU-Net v1 ``.model`` or a plain state-dict file.

    Returns name -> CPU tensor, as stored (dtype unchanged).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return extract_state_dict(load_torch_file(path), path.name)


def check_state_dict(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str
) -> None:
    """Raise ``StateDictMismatchError`` unless keys and shapes equal ``expected``'s.

    expected: the network's ``state_dict()`` (a meta-device network is enough).
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [
            f"{len(keys)} {what} keys ({', '.join(keys[:_SHOW])}{', ...' if len(keys) > _SHOW else ''})"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise StateDictMismatchError(
            f"{source} does not fit the network: {'; '.join(parts)}. It is not a checkpoint of "
            "this model, or the plans/config describe another network"
        )
    shapes = [
        f"{k} {list(state[k].shape)} in file vs {list(v.shape)} in network"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise StateDictMismatchError(
            f"{source} does not fit the network: {len(shapes)} tensors differ in shape "
            f"({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''}). The plans/config "
            "(patch size, features, classes) do not belong to this checkpoint"
        )


# -- plans ---------------------------------------------------------------------------------


def read_plans(path: str | Path) -> dict[str, Any]:
    """nnU-Net v1 plans from ``plans.pkl`` or a trainer's ``<checkpoint>.pkl``.

    The trainer file (``OrderedDict(init, name, class, plans)``) is unwrapped to its
    ``"plans"`` entry. Unpickled with the allow-list of ``safe_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"plans file {path} does not exist; download it or check the path")
    data = safe_pickle.load(path)
    if isinstance(data, Mapping) and "plans_per_stage" not in data and isinstance(data.get("plans"), Mapping):
        data = data["plans"]
    if not isinstance(data, Mapping) or "plans_per_stage" not in data:
        raise CheckpointError(
            f"{path.name} is not an nnU-Net v1 plans file (no 'plans_per_stage'); pass plans.pkl "
            "or the checkpoint's .model.pkl"
        )
    return dict(data)
