"""Safe loading of UniSeg checkpoints and nnU-Net v1 plans, and safetensors conversion.

Covers the files users really get (nnU-Net v1 ``.model`` with numpy values beside the
weights, ``plans.pkl``, ``.model.pkl``), the broken ones (HTML pages, truncated downloads,
wrong keys or shapes) and hostile ones (pickles whose ``__reduce__`` runs code): those must
fail with one clear line and must not run anything.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from unisegcli.errors import CheckpointError, UnsafePickleError
from unisegcli.weights import safe_pickle
from unisegcli.models.uniseg.convert import convert_checkpoint
from unisegcli.weights.checkpoint import (
    StateDictMismatchError,
    load_state_dict,
    load_torch_file,
    read_plans,
)
from unisegcli.models.uniseg import UniSegConfig, load_uniseg

TINY = Path(__file__).parent / "data" / "uniseg_tiny"
CKPT = TINY / "model_final_checkpoint.model"
PLANS = TINY / "plans.pkl"
HTML = (
    b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>"
    b"<body><form id=\"download-form\" action=\"https://drive.usercontent.google.com/download\">"
    b"<input type=\"hidden\" name=\"confirm\" value=\"t\"></form></body></html>"
)


@pytest.fixture(scope="module")
def window() -> torch.Tensor:
    return torch.from_numpy(np.load(TINY / "input_t9_c4.npy"))


@pytest.fixture(scope="module")
def reference_logits(window: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_uniseg(CKPT, PLANS)(window, 9)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return load_state_dict(CKPT)


class ExecOnLoad:
    """A pickle payload that creates ``marker`` when unpickled without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class SystemOnLoad(ExecOnLoad):
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# -- the files as released ----------------------------------------------------------------


def test_load_v1_checkpoint_with_plans_beside_it(window, reference_logits, tmp_path) -> None:
    # no plans argument: the trainer's <checkpoint>.pkl supplies them
    net = load_uniseg(CKPT)
    assert not net.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in net.parameters())
    with torch.no_grad():
        assert torch.equal(net(window, 9), reference_logits)
    lonely = tmp_path / CKPT.name
    shutil.copy(CKPT, lonely)
    with pytest.raises(CheckpointError, match="no plans") as info:
        load_uniseg(lonely)
    one_line(info)


def test_plans_from_plans_pkl_and_trainer_pkl_agree() -> None:
    plans = read_plans(PLANS)
    from_trainer = read_plans(TINY / "model_final_checkpoint.model.pkl")
    assert UniSegConfig.from_plans(plans) == UniSegConfig.from_plans(from_trainer)
    assert isinstance(plans["plans_per_stage"][0]["patch_size"], np.ndarray)
    assert UniSegConfig.from_plans(plans).patch_size == (16, 32, 64)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_pickle_reads_numpy_and_containers(protocol: int) -> None:
    data = OrderedDict(
        a=np.arange(6, dtype=np.int64).reshape(2, 3),
        b=[np.float64(1.5), np.float32(2.0), np.int32(3), np.bool_(True)],
        c={1, 2},
        d=(np.dtype(">f4"), complex(1, 2), b"raw", np.array(["ct", "pet"])),
    )
    back = safe_pickle.loads(pickle.dumps(data, protocol=protocol))
    assert list(back) == list(data) and isinstance(back, OrderedDict)
    assert np.array_equal(back["a"], data["a"]) and back["a"].dtype == np.int64
    assert back["b"] == data["b"] and back["c"] == data["c"]
    assert back["d"][:3] == data["d"][:3] and np.array_equal(back["d"][3], data["d"][3])


def test_v1_checkpoint_with_numpy_values_loads(tiny_state, tmp_path) -> None:
    """nnU-Net v1 stores numpy floats in plot_stuff/best_stuff; numpy 1.x names them
    ``numpy.core.multiarray.*``: rewrite a numpy 2 save to those names, as a real file has."""
    buf = io.BytesIO()
    torch.save(
        {
            "epoch": 1000,
            "state_dict": tiny_state,
            "optimizer_state_dict": None,
            "plot_stuff": ([np.float64(0.5)], [np.float32(0.4)], [], [np.float64(0.8)]),
            "best_stuff": (np.int64(900), np.float64(0.1), np.array([0.7, 0.8])),
            "amp_grad_scaler": {"scale": 1024.0, "_growth_tracker": 3},
        },
        buf,
    )
    path = tmp_path / "np1.model"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.", b"numpy.core.")
            zout.writestr(info.filename, data)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    loaded = load_torch_file(path)
    assert loaded["best_stuff"][0] == 900 and np.array_equal(loaded["best_stuff"][2], [0.7, 0.8])
    state = load_state_dict(path)
    assert state.keys() == tiny_state.keys()
    assert all(torch.equal(state[k], tiny_state[k]) for k in state)


def test_torch_load_is_always_weights_only(monkeypatch) -> None:
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_state_dict(CKPT)
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


def test_plain_and_module_prefixed_state_dicts_load(tiny_state, window, reference_logits, tmp_path) -> None:
    plain = tmp_path / "plain.pth"
    torch.save(tiny_state, plain)
    wrapped = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_state.items()}}, wrapped)
    for path in (plain, wrapped):
        with torch.no_grad():
            assert torch.equal(load_uniseg(path, PLANS)(window, 9), reference_logits)


# -- conversion to safetensors --------------------------------------------------------------


def test_convert_round_trip_gives_identical_logits(window, reference_logits, tmp_path) -> None:
    from safetensors import safe_open

    out = tmp_path / "converted"
    weights = convert_checkpoint(CKPT, PLANS, out)
    assert weights == out / "model.safetensors"
    config = json.loads((out / "config.json").read_text())
    assert UniSegConfig.from_dict(config) == UniSegConfig.from_plans(read_plans(PLANS))
    with safe_open(str(weights), framework="pt") as f:
        assert f.metadata()["source_name"] == CKPT.name
        assert len(f.metadata()["source_sha256"]) == 64
    with torch.no_grad():
        assert torch.equal(load_uniseg(weights)(window, 9), reference_logits)
        assert torch.equal(load_uniseg(weights, out / "config.json")(window, 9), reference_logits)
        assert torch.equal(load_uniseg(weights, PLANS)(window, 9), reference_logits)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json") as info:
        load_uniseg(weights)
    one_line(info)


def test_weights_convert_command(window, reference_logits, tmp_path) -> None:
    """`uniseg weights convert` writes a safetensors model that gives the same logits."""
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["weights", "convert", str(CKPT), str(out), "--plans", str(PLANS)])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        assert torch.equal(load_uniseg(out / "model.safetensors")(window, 9), reference_logits)


def test_convert_refuses_mismatching_weights_and_writes_nothing(tiny_state, tmp_path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in tiny_state.items() if k != "tu.0.weight"}, bad)
    with pytest.raises(StateDictMismatchError, match="tu.0.weight"):
        convert_checkpoint(bad, PLANS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- broken files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model_final_checkpoint.model", "model.safetensors", "plans.pkl"])
def test_html_page_saved_as_a_file_is_recognised(tmp_path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\n  " + HTML)
    with pytest.raises(CheckpointError, match="HTML page.*Google Drive.*download it again") as info:
        if name == "plans.pkl":
            read_plans(path)
        else:
            load_state_dict(path)
    one_line(info)


def test_truncated_files_are_reported(tmp_path, tiny_state) -> None:
    data = CKPT.read_bytes()
    cut = tmp_path / "cut.model"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_uniseg(cut, PLANS)
    one_line(info)

    convert_checkpoint(CKPT, PLANS, tmp_path / "st")
    st = (tmp_path / "st" / "model.safetensors").read_bytes()
    (tmp_path / "st" / "model.safetensors").write_bytes(st[: len(st) - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_uniseg(tmp_path / "st" / "model.safetensors")
    one_line(info)

    plans = PLANS.read_bytes()
    (tmp_path / "cut.pkl").write_bytes(plans[: len(plans) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        read_plans(tmp_path / "cut.pkl")
    one_line(info)

    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict(tmp_path / "empty.model")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_state_dict(tmp_path / "junk.model")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_uniseg(tmp_path / "missing.model", PLANS)


def test_missing_and_unexpected_keys_are_listed(tiny_state, tmp_path) -> None:
    state = dict(tiny_state)
    del state["intermedia_prompt"], state["seg_outputs.4.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "keys.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(StateDictMismatchError) as info:
        load_uniseg(path, PLANS)
    message = one_line(info)
    assert "2 missing keys (intermedia_prompt, seg_outputs.4.weight)" in message
    assert "1 unexpected keys (decoder.extra.weight)" in message


def test_shape_mismatch_names_the_tensor(tmp_path) -> None:
    # the tiny weights with plans of the full-size network: every width differs
    plans = read_plans(PLANS)
    plans.pop("max_num_features")
    plans["base_num_features"] = 32
    other = tmp_path / "plans.pkl"
    other.write_bytes(pickle.dumps(plans))
    with pytest.raises(StateDictMismatchError, match=r"intermedia_prompt|differ in shape") as info:
        load_uniseg(CKPT, other)
    assert "in file vs" in one_line(info)


# -- hostile pickles -------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [ExecOnLoad, SystemOnLoad])
def test_plans_pickle_that_runs_code_is_refused(tmp_path, payload) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps({"plans_per_stage": {0: {}}, "x": payload(marker)})
    # control: the payload is live when unpickled without restrictions
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()

    evil = tmp_path / "plans.pkl"
    evil.write_bytes(data)
    for load in (read_plans, lambda p: load_uniseg(CKPT, p)):
        refused = r"refused to load global '(builtins\.exec|posix\.system)'"
        with pytest.raises(UnsafePickleError, match=refused) as info:
            load(evil)
        one_line(info)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_checkpoint_pickle_that_runs_code_is_refused(tmp_path, tiny_state, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.model"
    torch.save(
        {"state_dict": tiny_state, "plot_stuff": ExecOnLoad(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UnsafePickleError, match="builtins.exec") as info:
        load_uniseg(path, PLANS)
    one_line(info)
    with pytest.raises(UnsafePickleError):
        convert_checkpoint(path, PLANS, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
