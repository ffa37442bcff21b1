"""The whole pipeline through the CLI: geometry restored exactly, tasks in one pass, devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import assert_same_geometry, make_affine, phantom_ct, save_nifti
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode

runner = CliRunner()


def lps_aniso_affine() -> np.ndarray:
    """File axes (i, j, k) = (-x, -y, +z) at 1.5, 1.5, 3 mm: internal spacing = the task's."""
    aff = np.diag([-1.5, -1.5, 3.0, 1.0])
    aff[:3, 3] = (80.0, 60.0, -30.0)
    return aff


def test_object_lands_on_the_same_voxels(tmp_path: Path, threshold_net) -> None:
    """A box in a non-canonical, anisotropic input comes back on exactly its voxels."""
    data = phantom_ct()
    src = save_nifti(tmp_path / "ct.nii.gz", data, lps_aniso_affine(), qcode=1, scode=1)
    out = tmp_path / "out"
    result = runner.invoke(app, [str(src), "-o", str(out), "--tasks", "liver", "--quiet"])
    assert result.exit_code == 0, result.output
    mask = nib.load(str(out / "liver.nii.gz"))
    ref = nib.load(str(src))
    assert_same_geometry(mask, ref)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (data > 0).astype(np.uint8))
    assert not np.asarray(nib.load(str(out / "liver_tumor.nii.gz")).dataobj).any()


@pytest.mark.parametrize("kind", ["oblique", "aniso"])
def test_resampled_geometry_round_trip(tmp_path: Path, threshold_net, kind: str) -> None:
    """Other spacings: masks have the input's exact grid and sit on the box.

    The box goes through resampling to 3 x 1.5 x 1.5 mm and back, so its faces may move by
    up to about one voxel (as in nnU-Net's export); a misplaced or flipped mask would move its
    centre, which must stay within half a voxel.
    """
    data = phantom_ct(shape=(30, 28, 14), box=(slice(8, 20), slice(6, 18), slice(4, 10)))
    src = save_nifti(tmp_path / "ct.nii.gz", data, make_affine(kind))
    out = tmp_path / "out"
    result = runner.invoke(app, [str(src), "-o", str(out), "--tasks", "spleen", "--quiet"])
    assert result.exit_code == 0, result.output
    mask_img = nib.load(str(out / "spleen.nii.gz"))
    ref = nib.load(str(src))
    assert_same_geometry(mask_img, ref)
    mask, truth = np.asarray(mask_img.dataobj) > 0, data > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.8
    np.testing.assert_allclose(np.argwhere(mask).mean(0), np.argwhere(truth).mean(0), atol=0.5)


def test_several_tasks_share_one_encoder_pass(tmp_path: Path, threshold_net) -> None:
    src = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(), lps_aniso_affine())
    out = tmp_path / "out"
    result = runner.invoke(app, [str(src), "-o", str(out), "--tasks", "liver,kidney,spleen", "--quiet"])
    assert result.exit_code == 0, result.output
    assert threshold_net.decode_calls == 3 * threshold_net.encode_calls
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == sorted(f"{n}.nii.gz" for n in ("liver", "liver_tumor", "kidney", "kidney_tumor", "spleen"))


def test_multichannel_task_with_channel_files(tmp_path: Path, threshold_net) -> None:
    """--channel NAME=PATH in any order: channels are matched to the card by name."""
    data = phantom_ct()
    ct = save_nifti(tmp_path / "ct.nii.gz", data, lps_aniso_affine())
    pet = save_nifti(tmp_path / "pet.nii.gz", np.abs(data) / 100, lps_aniso_affine())
    out = tmp_path / "out"
    result = runner.invoke(app, ["--channel", f"pet={pet}", "--channel", f"ct={ct}", "-o", str(out),
                                 "--tasks", "autopet,liver", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "lesion.nii.gz").exists() and (out / "liver.nii.gz").exists()
    # the liver task took the CT channel (named), whatever the order on the command line
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "liver.nii.gz")).dataobj), (data > 0))


def test_missing_channel_is_named(tmp_path: Path, threshold_net) -> None:
    ct = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(), lps_aniso_affine())
    result = runner.invoke(app, ["--channel", f"ct={ct}", "-o", str(tmp_path / "o"), "--tasks", "autopet"])
    assert result.exit_code == ExitCode.INPUT
    assert "needs ct, pet (missing pet)" in result.output


def test_wrong_channel_count_for_4d_input(tmp_path: Path, threshold_net) -> None:
    four = np.stack([phantom_ct()] * 3, axis=-1)
    src = save_nifti(tmp_path / "mr.nii.gz", four, lps_aniso_affine())
    result = runner.invoke(app, [str(src), "-o", str(tmp_path / "o"), "--tasks", "brats"])
    assert result.exit_code == ExitCode.INPUT
    assert "has 3 channel(s); task 'brain_tumor' expects 4: t1, t1ce, t2, flair" in result.output


def test_cuda_without_gpu_is_a_clear_error(tmp_path: Path, threshold_net) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path needs one without")
    src = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(), lps_aniso_affine())
    result = runner.invoke(app, [str(src), "-o", str(tmp_path / "o"), "--tasks", "liver", "--device", "cuda"])
    assert result.exit_code == ExitCode.RUNTIME
    assert "cuda" in result.output.lower() and len(result.output.strip().splitlines()) == 1


def test_real_network_end_to_end_subprocess(tmp_path: Path, tiny_model: str) -> None:
    """The real UniSeg code path (tiny random-weight checkpoint from the cache) as a subprocess."""
    src = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(shape=(24, 20, 6)), lps_aniso_affine())
    out = tmp_path / "out"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("uniseg")), str(src), "-o", str(out), "--model", tiny_model,
         "--tasks", "liver,spleen", "--json", "--offline"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["run_started", "case_started", "case_done", "run_finished"]
    assert set(events[2]["outputs"]) == {"liver", "liver_tumor", "spleen"}
    for path in events[2]["outputs"].values():
        img = nib.load(path)
        assert img.shape == (24, 20, 6)
        np.testing.assert_array_equal(img.affine, nib.load(str(src)).affine)


def test_first_use_downloads_after_showing_the_license(tmp_path: Path, httpserver, monkeypatch) -> None:
    """The main command fetches a missing model from its URLs (loopback here), once."""
    import copy
    import hashlib

    from unisegcli.weights.cards import REGISTRY_PATH

    tiny = Path(__file__).parent / "data" / "uniseg_tiny"
    files = []
    for name, role in (("model_final_checkpoint.model", "checkpoint"), ("plans.pkl", "plans")):
        blob = (tiny / name).read_bytes()
        httpserver.expect_request(f"/{name}").respond_with_data(blob, content_type="application/octet-stream")
        files.append({"name": name, "role": role, "urls": [httpserver.url_for(f"/{name}")],
                      "sha256": hashlib.sha256(blob).hexdigest(), "size_bytes": len(blob)})
    shipped = json.loads(REGISTRY_PATH.read_text())
    model = copy.deepcopy(shipped["models"]["uniseg"])
    model.update(version="t", network=None, files=files, license="Test License 1.0")
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"schema_version": 1, "task_sets": shipped["task_sets"], "models": {"web": model}}))
    monkeypatch.setenv("UNISEG_REGISTRY", str(registry))
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "home"))
    src = save_nifti(tmp_path / "ct.nii.gz", phantom_ct(shape=(24, 20, 6)), lps_aniso_affine())
    args = [str(src), "-o", str(tmp_path / "out"), "--model", "web", "--tasks", "spleen"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "license: Test License 1.0" in result.stderr
    assert (tmp_path / "home" / "models" / "web" / "t" / "plans.pkl").exists()
    served = len(httpserver.log)
    again = runner.invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0 and "license" not in again.stderr
    assert len(httpserver.log) == served  # cached: no second download
