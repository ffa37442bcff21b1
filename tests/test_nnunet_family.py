"""The nnU-Net v2 family end to end on the ``nnunetv2_tiny`` results folder.

``--model nnunet:<folder>`` must reproduce what nnU-Net v2.8.1's predictor made of the two
fixture inputs (data/nnunetv2_tiny/README.md): the preprocessed arrays, the logits (exact
with ``--nnunet-exact``, the README's tolerance otherwise), the segmentation files
(100 % / >= 99.9 % of voxels) and the probabilities. Geometry, orientation and fold handling
are checked against nibabel / our own engine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_affine, save_nifti

from unisegcli.api import segment
from unisegcli.errors import CheckpointError, UnsafePickleError, UsageError
from unisegcli.inference.gaussian import summed_weight_numpy
from unisegcli.io.cases import read_case
from unisegcli.io.discovery import discover
from unisegcli.weights.resolver import get_model
from unisegcli.models.families import needed_roles, resolve_tasks
from unisegcli.models.nnunet import family
from unisegcli.models.nnunet.folder import read_results_folder, resolve_configuration
from unisegcli.models.nnunet.network import build_network, load_fold, locate, parameter_count
from unisegcli.models.nnunet.pipeline import (
    Layout, export_probabilities, export_segmentation, from_network_layout, to_network_layout,
)

FIXTURE = Path(__file__).parent / "data" / "nnunetv2_tiny"
RESULTS = FIXTURE / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
CASES = ["synth_lps", "realct"]
RECORDS = {"nomirror": False, "mirror": True}
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("single_thread")
# Exact mode against the stored fixture: 100 % on the CPU that made it, 99.998 % (2 voxels of
# 96,768) on an AVX-512 CPU, whose convolution kernels round differently (see below).
MACHINE_AGREEMENT = 0.9999


def reference_labels(path: Path) -> np.ndarray:
    """A segmentation file in our internal (RAS-reoriented, z, y, x) grid."""
    img = nib.load(str(path))
    ras = img.as_reoriented(nib.orientations.io_orientation(img.affine))
    return np.asarray(ras.dataobj).transpose(2, 1, 0)




@pytest.fixture(scope="module")
def card():
    return get_model(f"nnunet:{RESULTS}")


@pytest.fixture(scope="module")
def model(card):
    return family.load(card, {}, settings=family.FAMILY.settings(), tasks=card.tasks)


def loaded_case(case: str):
    return read_case(discover([FIXTURE / "inputs" / f"{case}_0000.nii.gz"])[0])


# ---------------------------------------------------------------- folder, card, network


def test_card_has_one_task_per_structure(card) -> None:
    assert card.family == "nnunet" and card.version == RESULTS.name
    assert [t.name for t in card.tasks] == ["liver", "spleen", "kidney"]
    assert [t.extra["label"] for t in card.tasks] == [1, 2, 3]
    assert all(t.labels == {1: t.name} and t.channels == ("ct",) and t.modality == "CT" for t in card.tasks)
    assert [t.name for t in resolve_tasks(card, "kidney,liver")] == ["kidney", "liver"]
    # the folder above the results folder works too (one results folder inside)
    assert get_model(f"nnunet:{RESULTS.parent}").tasks == card.tasks


def test_network_from_plans_loads_the_checkpoint_strictly(model) -> None:
    (fold,) = model.parts[""].folds
    assert type(fold.network).__name__ == "PlainConvUNet" and not fold.network.training
    assert parameter_count(fold.network) == 86_892  # fixture README
    assert fold.mirror_axes == (0, 1, 2)
    stored = torch.load(FIXTURE / "network_weights.pt", weights_only=True)
    state = fold.network.state_dict()
    for key, value in stored.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_plans_may_only_name_allow_listed_classes() -> None:
    assert locate("torch.nn.modules.conv.Conv3d") is torch.nn.Conv3d
    for bad in ("os.system", "builtins.eval", "subprocess.Popen", "torch.nn..x", "torch.load",
                "torch.nn.functional.torch.load", "torch.nn.functional.relu"):
        with pytest.raises(CheckpointError, match="refused|expected a class"):
            locate(bad)
    arch = json.loads((RESULTS / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    evil = dict(arch, arch_kwargs=dict(arch["arch_kwargs"], nonlin="os.system"))
    with pytest.raises(CheckpointError, match="os.system"):
        build_network(evil, 1, 4)


def test_configuration_inheritance_and_bad_folders(tmp_path: Path) -> None:
    plans = {"configurations": {"base": {"spacing": [1, 1, 1], "patch_size": [8, 8, 8]},
                                "child": {"inherits_from": "base", "patch_size": [4, 4, 4]}}}
    assert resolve_configuration(plans, "child") == {"spacing": [1, 1, 1], "patch_size": [4, 4, 4]}
    with pytest.raises(CheckpointError, match="no usable configuration 'nope'"):
        resolve_configuration(plans, "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_results_folder(tmp_path / "missing")
    copy = tmp_path / "Dataset1_X" / RESULTS.name
    copy.mkdir(parents=True)
    shutil.copy(RESULTS / "plans.json", copy)
    shutil.copy(RESULTS / "dataset.json", copy)
    with pytest.raises(CheckpointError, match="no fold_"):
        read_results_folder(copy)


def test_checkpoint_with_code_is_refused_before_unpickling(tmp_path: Path) -> None:
    folder = tmp_path / RESULTS.name
    shutil.copytree(RESULTS, folder)
    torch.save({"network_weights": {}, "hook": Path("x")}, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(UnsafePickleError, match="refused"):
        load_fold(read_results_folder(folder), "0")


# ---------------------------------------------------------------- parity with nnU-Net v2


@pytest.mark.parametrize("record", list(RECORDS))
@pytest.mark.parametrize("case", CASES)
def test_exact_mode_reproduces_nnunet(case: str, record: str, model) -> None:
    loaded = loaded_case(case)
    part = model.parts[""]
    settings = family.FAMILY.settings({"nnunet_exact": True}, tta=RECORDS[record])
    logits, prepared = family.run_part(part, loaded.scan.data, loaded, settings=settings, device=CPU)

    expected_pre = np.load(FIXTURE / "preprocessed" / f"{case}.npy")
    np.testing.assert_allclose(prepared.tensor.numpy(), expected_pre, rtol=0, atol=1e-6)
    ref = np.load(FIXTURE / "logits" / f"{case}_{record}.npy")
    assert logits.dtype == torch.float16 and tuple(logits.shape) == ref.shape
    d = np.abs(logits.float().numpy() - ref.astype(np.float32))
    solid = summed_weight_numpy(ref.shape[1:], part.folder.configuration["patch_size"]) >= 1e-3
    assert (d[:, solid] <= 0.004 + 0.002 * np.abs(ref[:, solid].astype(np.float32))).all()
    # measured: bit-exact on the CPU that made the fixture; on an AVX-512 CPU oneDNN sums the
    # convolutions in another order and 0.4-0.8 % of the float16 logits differ by one step.
    # Bit-exactness on one machine is tested against nnunetv2 itself (test_nnunet_vs_nnunetv2).
    assert (d == 0).mean() >= 0.99

    seg = export_segmentation(logits, prepared, part.folder, loaded.scan)
    expected = reference_labels(FIXTURE / f"expected_{record}" / f"{case}.nii.gz")
    assert seg.shape == expected.shape
    assert (seg == expected).mean() >= MACHINE_AGREEMENT


@pytest.mark.parametrize("record", list(RECORDS))
@pytest.mark.parametrize("case", CASES)
def test_float32_mode_is_within_the_fixture_tolerance(case: str, record: str, model) -> None:
    loaded = loaded_case(case)
    part = model.parts[""]
    settings = family.FAMILY.settings(tta=RECORDS[record], batch_size=2)
    logits, prepared = family.run_part(part, loaded.scan.data, loaded, settings=settings, device=CPU)

    np.testing.assert_allclose(prepared.tensor.numpy(), np.load(FIXTURE / "preprocessed" / f"{case}.npy"),
                               rtol=0, atol=1e-5)
    ref = np.load(FIXTURE / "logits" / f"{case}_{record}.npy").astype(np.float32)
    assert logits.dtype == torch.float32
    solid = summed_weight_numpy(ref.shape[1:], part.folder.configuration["patch_size"]) >= 1e-3
    assert np.abs(logits.numpy() - ref)[:, solid].max() <= 0.05  # measured <= 0.040
    seg = export_segmentation(logits, prepared, part.folder, loaded.scan)
    expected = reference_labels(FIXTURE / f"expected_{record}" / f"{case}.nii.gz")
    assert (seg == expected).mean() >= 0.999  # measured 99.93-99.97 %


def test_probabilities_match_nnunet_npz(model) -> None:
    loaded = loaded_case("realct")
    part = model.parts[""]
    logits, prepared = family.run_part(part, loaded.scan.data, loaded,
                                       settings=family.FAMILY.settings({"nnunet_exact": True}), device=CPU)
    probs = export_probabilities(logits, prepared, part.folder, loaded.scan)
    expected = np.load(FIXTURE / "expected_nomirror" / "realct.npz")["probabilities"]
    assert probs.shape == expected.shape and probs.dtype == np.float32
    d = np.abs(probs - expected)
    # measured on the fixture's CPU: 99.8 % within 1e-6, max 9.3e-4 = one float16 step of a
    # resampled logit on a float16 rounding tie (scipy's and our float64 sums differ by ~1e-15
    # there). On an AVX-512 CPU the logits themselves differ by one float16 step in ~0.8 % of
    # values (see above): 97.6 % within 1e-6, argmax equal on all but a handful of voxels.
    assert (d <= 1e-6).mean() >= 0.97 and d.max() <= 2e-2
    assert (probs.argmax(0) == expected.argmax(0)).mean() >= MACHINE_AGREEMENT


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "float32"])
def test_segment_writes_nnunets_segmentation_per_structure(exact: bool, tmp_path: Path) -> None:
    result = segment([FIXTURE / "inputs" / "synth_lps_0000.nii.gz"], "kidney,liver,spleen",
                     output=tmp_path / "out", model=f"nnunet:{RESULTS}", nnunet_exact=exact)
    expected_img = nib.load(str(FIXTURE / "expected_nomirror" / "synth_lps.nii.gz"))
    expected = np.asarray(expected_img.dataobj)
    assert set(result.cases[0].masks) == {"liver", "spleen", "kidney"}
    for value, name in ((1, "liver"), (2, "spleen"), (3, "kidney")):
        mask_img = nib.load(str(result.cases[0].masks[name]))
        np.testing.assert_allclose(mask_img.affine, expected_img.affine, atol=1e-5)  # input geometry
        agree = (np.asarray(mask_img.dataobj) > 0) == (expected == value)
        assert agree.mean() >= (MACHINE_AGREEMENT if exact else 0.999)


# ---------------------------------------------------------------- layouts and folds


def test_file_order_reader_layout_is_the_files_voxel_order(tmp_path: Path) -> None:
    """SimpleITKIO/NibabelIO read the file's voxels reversed (k, j, i), zooms reversed."""
    data = np.random.default_rng(0).normal(size=(9, 7, 5)).astype(np.float32)
    path = save_nifti(tmp_path / "oblique.nii.gz", data, make_affine("oblique"))
    loaded = read_case(discover([path])[0])
    layout = Layout(reorient=True, transpose=(0, 1, 2))
    array, spacing = to_network_layout(loaded.scan.data, loaded.scan.spacing_mm, loaded.scan, layout)
    img = nib.load(str(path))
    np.testing.assert_array_equal(array[0], img.get_fdata().astype(np.float32).transpose(2, 1, 0))
    np.testing.assert_allclose(spacing, [float(z) for z in img.header.get_zooms()[::-1]])
    labels = (array[0] > 0).astype(np.uint8)
    back = from_network_layout(labels, loaded.scan, layout)
    np.testing.assert_array_equal(back, (loaded.scan.data[0] > 0).astype(np.uint8))
    probs = np.stack([labels, 1 - labels]).astype(np.float32)
    np.testing.assert_array_equal(from_network_layout(probs, loaded.scan, layout)[0], back)


def test_transpose_forward_round_trips() -> None:
    image = np.random.default_rng(1).normal(size=(2, 4, 5, 6)).astype(np.float32)
    layout = Layout(reorient=False, transpose=(2, 0, 1))
    array, spacing = to_network_layout(image, (3.0, 2.0, 1.0), None, layout)
    assert array.shape == (2, 6, 4, 5) and spacing == (1.0, 3.0, 2.0)
    np.testing.assert_array_equal(from_network_layout(array, None, layout), image)
    np.testing.assert_array_equal(from_network_layout(array[0], None, layout), image[0])


def two_fold_folder(tmp_path: Path) -> Path:
    """The fixture with a second fold whose weights differ (fold_1 = fold_0 scaled)."""
    folder = tmp_path / "Dataset999_Tiny" / RESULTS.name
    shutil.copytree(RESULTS, folder)
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = {k: v * 0.5 if k.endswith("seg_layers.2.weight") else v
                                     for k, v in checkpoint["network_weights"].items()}
    (folder / "fold_1").mkdir()
    torch.save(checkpoint, folder / "fold_1" / "checkpoint_final.pth")
    return folder


@pytest.mark.parametrize("exact", [False, True], ids=["float32", "exact"])
def test_folds_are_averaged(exact: bool, tmp_path: Path) -> None:
    folder = two_fold_folder(tmp_path)
    card = get_model(f"nnunet:{folder}")
    loaded = loaded_case("realct")

    def logits(folds):
        settings = family.FAMILY.settings({"folds": folds, "nnunet_exact": exact})
        net = family.load(card, {}, settings=settings, tasks=card.tasks)
        return family.run_part(net.parts[""], loaded.scan.data, loaded, settings=settings, device=CPU)[0].float()

    zero, one, both = logits((0,)), logits((1,)), logits(None)
    assert not torch.equal(zero, one)
    if exact:  # nnU-Net: float16 sum of the folds' float16 logits, divided in float16
        torch.testing.assert_close(both, ((zero.half() + one.half()) / 2).float(), rtol=0, atol=0)
    else:
        torch.testing.assert_close(both, (zero + one) / 2, rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="--folds 7"):
        family.load(card, {}, settings=family.FAMILY.settings({"folds": (7,)}), tasks=card.tasks)


def test_needed_roles_of_a_single_folder_model_is_everything(card) -> None:
    assert needed_roles(card, card.tasks[:1]) == set()  # no files: the folder is used in place


def test_cli_runs_a_results_folder_and_lists_its_tasks(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from unisegcli.cli.app import app

    runner = CliRunner(env={"COLUMNS": "250"})
    listed = runner.invoke(app, ["tasks", "--model", f"nnunet:{RESULTS}"])
    assert listed.exit_code == 0 and all(n in listed.output for n in ("liver", "spleen", "kidney"))
    result = runner.invoke(app, [str(FIXTURE / "inputs" / "realct_0000.nii.gz"), "-o", str(tmp_path / "out"),
                                 "--model", f"nnunet:{RESULTS}", "--tasks", "kidney", "--nnunet-exact",
                                 "--folds", "0"])
    assert result.exit_code == 0, result.output
    mask = np.asarray(nib.load(str(tmp_path / "out" / "kidney.nii.gz")).dataobj)
    expected = np.asarray(nib.load(str(FIXTURE / "expected_nomirror" / "realct.nii.gz")).dataobj)
    np.testing.assert_array_equal(mask > 0, expected == 3)
    bad = runner.invoke(app, [str(FIXTURE / "inputs" / "realct_0000.nii.gz"), "-o", str(tmp_path / "o2"),
                              "--model", f"nnunet:{tmp_path / 'nothing'}", "--tasks", "kidney"])
    assert bad.exit_code == 4 and "does not exist" in bad.output


def test_old_plans_format_builds_the_same_network(tmp_path: Path, model) -> None:
    """Plans from nnU-Net < 2.4 (TotalSegmentator's v2.0.0 weights) describe the network by
    UNet_class_name and friends; the rebuilt network loads the same weights, same answer."""
    folder = tmp_path / "Dataset999_Tiny" / RESULTS.name
    shutil.copytree(RESULTS, folder)
    plans = json.loads((folder / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    kwargs = config.pop("architecture")["arch_kwargs"]
    config.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=32,
                  n_conv_per_stage_encoder=kwargs["n_conv_per_stage"],
                  n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"],
                  num_pool_per_axis=[2, 3, 3], pool_op_kernel_sizes=kwargs["strides"],
                  conv_kernel_sizes=kwargs["kernel_sizes"])
    (folder / "plans.json").write_text(json.dumps(plans))
    legacy = read_results_folder(folder)
    assert legacy.configuration["architecture"]["arch_kwargs"] == kwargs
    fold = load_fold(legacy, "0")
    x = torch.randn(1, 1, 12, 32, 24)
    with torch.inference_mode():
        torch.testing.assert_close(fold.network(x), model.parts[""].folds[0].network(x), rtol=0, atol=0)
    config["UNet_class_name"] = "MyOwnUNet"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="MyOwnUNet"):
        read_results_folder(folder)


def test_ignore_label_is_no_output_and_names_stay_unique(tmp_path: Path) -> None:
    folder = tmp_path / "Dataset999_Tiny" / RESULTS.name
    shutil.copytree(RESULTS, folder)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "Left Kidney": 1, "left-kidney": 2, "kidney": 3, "ignore": 4}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    card = get_model(f"nnunet:{folder}")
    assert [t.name for t in card.tasks] == ["left_kidney", "left_kidney_2", "kidney"]
    net = family.load(card, {}, settings=family.FAMILY.settings(), tasks=card.tasks)  # 4 outputs: loads strictly
    assert net.parts[""].folder.num_outputs == 4
