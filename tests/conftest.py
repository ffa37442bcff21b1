"""Shared fixtures: small synthetic NIfTI volumes in various geometries, and the CLI runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


def make_affine(kind: str) -> np.ndarray:
    """Voxel-to-world matrices for the geometries users feed us."""
    if kind == "ras":
        return np.diag([1.0, 1.0, 1.0, 1.0])
    if kind == "lps":  # DICOM-like: x and y flipped
        return np.diag([-1.0, -1.0, 1.0, 1.0])
    if kind == "aniso":  # 3 mm slices, 0.8 mm in-plane, stored slice-first
        aff = np.zeros((4, 4))
        aff[0, 2], aff[1, 1], aff[2, 0], aff[3, 3] = 0.8, -0.8, 3.0, 1.0
        aff[:3, 3] = (-40.0, 25.0, 7.5)
        return aff
    if kind == "oblique":  # 20° about z and 10° about x, anisotropic zooms
        a, b = np.deg2rad(20.0), np.deg2rad(10.0)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        aff = np.eye(4)
        aff[:3, :3] = rz @ rx @ np.diag([0.9, 1.1, 2.5])
        aff[:3, 3] = (12.0, -30.0, 55.0)
        return aff
    raise ValueError(kind)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 2) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


def assert_same_geometry(written, source) -> None:
    """A written image has the source's exact geometry: shape, affine, qform/sform (and their
    codes) and zooms, and uint8 voxels (every mask uniseg writes)."""
    assert written.shape[:3] == source.shape[:3]
    np.testing.assert_array_equal(written.affine, source.affine)
    np.testing.assert_array_equal(written.header.get_qform(), source.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), source.header.get_sform())
    assert int(written.header["qform_code"]) == int(source.header["qform_code"])
    assert int(written.header["sform_code"]) == int(source.header["sform_code"])
    assert written.header.get_zooms()[:3] == source.header.get_zooms()[:3]
    assert written.get_data_dtype() == np.uint8


@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread for a module of tiny convolutions.

    On a busy 2-core runner, OpenMP barriers between 2 threads made such tests 50x slower;
    one thread gives the same numbers (nnunetv2_tiny fixture README: bit-exact).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def labelled_volume() -> np.ndarray:
    """A [x, y, z] = 11×9×7 uint8 volume with a distinct value at almost every voxel."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 6, size=(11, 9, 7), dtype=np.uint8)


@pytest.fixture
def ct_path(tmp_path: Path) -> Path:
    """A small CT-like float volume with an oblique, anisotropic geometry."""
    rng = np.random.default_rng(1)
    data = rng.normal(0, 100, size=(20, 18, 8)).astype(np.float32)
    return save_nifti(tmp_path / "scan.nii.gz", data, make_affine("oblique"))


class ThresholdNet:
    """A stand-in network with a known answer: class 1 wherever the normalised CT is > 0.5.

    It has UniSeg's inference interface (patch_size, encode/decode, forward(x, task)) and
    counts calls, so pipeline tests can check geometry and "no model work" exactly.
    """

    patch_size = (16, 32, 32)

    def __init__(self) -> None:
        self.encode_calls = 0
        self.decode_calls = 0

    def to(self, device):  # noqa: D102 - torch.nn.Module-like no-ops
        return self

    def eval(self):
        return self

    def encode(self, x):
        self.encode_calls += 1
        return x

    def decode(self, features, task_index):
        import torch

        self.decode_calls += 1
        score = (features[:, :1] - 0.5) * 20.0
        return torch.cat([-score, score, -score - 10.0, -score - 10.0], dim=1)

    def __call__(self, x, task_index):
        return self.decode(self.encode(x), task_index)


@pytest.fixture
def threshold_net(monkeypatch) -> ThresholdNet:
    """Make every run use a ThresholdNet instead of loading weights."""
    import unisegcli.session

    net = ThresholdNet()
    monkeypatch.setattr(unisegcli.session, "load_network", lambda segmenter: net)
    return net


def phantom_ct(shape=(40, 36, 12), box=(slice(10, 25), slice(8, 20), slice(3, 8))) -> np.ndarray:
    """[i, j, k] CT-like volume: -500 HU background, a 300 HU box ("organ") where ``box`` says."""
    data = np.full(shape, -500.0, dtype=np.float32)
    data[box] = 300.0
    return data


def use_registry(monkeypatch, tmp_path, task_sets: dict, models: dict) -> None:
    """Run against a registry of these task sets and models (``UNISEG_REGISTRY``) and an empty
    cache under tmp_path (``UNISEG_HOME``)."""
    import json

    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"schema_version": 1, "task_sets": task_sets, "models": models}))
    monkeypatch.setenv("UNISEG_REGISTRY", str(path))
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))




@pytest.fixture
def tiny_model(tmp_path, monkeypatch) -> str:
    """A registry model 'tiny' made of the tiny UniSeg parity fixture (random weights), cached."""
    import copy
    import hashlib
    import json

    from unisegcli.weights import cache
    from unisegcli.weights.cards import REGISTRY_PATH
    from unisegcli.weights.resolver import get_model

    shipped = json.loads(REGISTRY_PATH.read_text())
    folder = DATA / "uniseg_tiny"

    def file(name: str, role: str) -> dict:
        blob = (folder / name).read_bytes()
        return {"name": name, "role": role, "urls": [], "sha256": hashlib.sha256(blob).hexdigest(),
                "size_bytes": len(blob)}

    model = copy.deepcopy(shipped["models"]["uniseg"])
    model.update(version="test", network=None,
                 files=[file("model_final_checkpoint.model", "checkpoint"), file("plans.pkl", "plans")])
    use_registry(monkeypatch, tmp_path, {"uniseg11": shipped["task_sets"]["uniseg11"]}, {"tiny": model})
    cache.import_model(get_model("tiny"), folder)
    return "tiny"
