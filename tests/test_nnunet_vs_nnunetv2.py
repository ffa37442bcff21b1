"""Our nnU-Net family against nnunetv2 itself, on variants of the tiny results folder.

The fixture covers one reader (NibabelIOWithReorient), no transpose and softmax labels. Here
the same random-weight folder is rewritten with another reader (SimpleITKIO: file voxel
order), a non-identity ``transpose_forward``, region training (sigmoid, regions_class_order)
and a no-mirroring checkpoint, and nnunetv2 2.8.1's ``nnUNetPredictor`` (in this process)
gives the reference segmentation. ``--nnunet-exact`` must reproduce it voxel for voxel; the
default float32 mode is checked on a hard case (ResEnc, mirror axes (0, 1), transposed plans,
oblique LAI input) for where and why it differs.

Marked ``nnunet``: skipped when nnunetv2 (the ``nnunet`` extra) is not importable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unisegcli.api import segment

FIXTURE = Path(__file__).parent / "data" / "nnunetv2_tiny"
RESULTS = FIXTURE / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
REGIONS = {"background": 0, "body": [1, 2, 3, 4], "organs": [2, 3, 4], "core": [3, 4], "tip": [4]}

pytestmark = [pytest.mark.nnunet, pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(300)]


def nnunet_predictor(folder: Path, mirror: bool):
    try:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    except ImportError as exc:  # absent, or present but broken (e.g. its torchvision)
        pytest.skip(f"nnunetv2 is not importable: {exc}")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
    return predictor


def variant(tmp_path: Path, *, reader: str = "NibabelIOWithReorient", transpose=(0, 1, 2),
            regions: bool = False, no_mirroring: bool = False) -> Path:
    folder = tmp_path / "Dataset999_Tiny" / RESULTS.name
    shutil.copytree(RESULTS, folder)
    plans = json.loads((folder / "plans.json").read_text())
    plans["image_reader_writer"] = reader
    plans["transpose_forward"] = list(transpose)
    plans["transpose_backward"] = [int(a) for a in np.argsort(transpose)]
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["overwrite_image_reader_writer"] = reader
    if regions:
        dataset["labels"] = REGIONS
        dataset["regions_class_order"] = [1, 2, 3, 4]
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    if no_mirroring:  # as nnUNetTrainerNoMirroring saves it (TotalSegmentator's trainer)
        path = folder / "fold_0" / "checkpoint_final.pth"
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint["inference_allowed_mirroring_axes"] = None
        torch.save(checkpoint, path)
    return folder


def reference(folder: Path, scan: Path, mirror: bool) -> np.ndarray:
    """nnunetv2's segmentation of ``scan``, as the voxels of a NIfTI file in the scan's geometry."""
    predictor = nnunet_predictor(folder, mirror)
    reader = predictor.plans_manager.image_reader_writer_class()
    image, properties = reader.read_images([str(scan)])
    seg = predictor.predict_single_npy_array(image, properties)
    out = folder.parent.parent / "reference.nii.gz"
    reader.write_seg(seg, str(out), properties)  # the reader's own writer: back to file geometry
    return np.asarray(nib.load(str(out)).dataobj)


@pytest.mark.parametrize("case", ["synth_lps", "realct"])
@pytest.mark.parametrize(("options", "mirror"), [
    ({"reader": "SimpleITKIO"}, False),
    ({"reader": "SimpleITKIO", "transpose": (2, 0, 1)}, True),
    ({"transpose": (1, 2, 0), "regions": True}, False),
    ({"reader": "NibabelIO", "no_mirroring": True}, True),
    ({"reader": "SimpleITKIOWithReorient"}, False),
], ids=["simpleitk", "simpleitk-transposed-mirror", "transposed-regions", "nibabel-nomirroring", "simpleitk-reorient"])
def test_exact_mode_matches_nnunetv2_predictor(case: str, options: dict, mirror: bool, tmp_path: Path) -> None:
    folder = variant(tmp_path, **options)
    scan = FIXTURE / "inputs" / f"{case}_0000.nii.gz"
    expected = reference(folder, scan, mirror)
    result = segment([scan], "body,organs,core,tip" if options.get("regions") else "liver,spleen,kidney",
                     output=tmp_path / "out", model=f"nnunet:{folder}", nnunet_exact=True, tta=mirror)
    masks = {n: np.asarray(nib.load(str(p)).dataobj) > 0 for n, p in result.cases[0].masks.items()}
    if options.get("regions"):
        for name, labels in REGIONS.items():
            if name != "background":
                np.testing.assert_array_equal(masks[name], np.isin(expected, labels), err_msg=name)
        assert masks["tip"].any() and not masks["body"].all()  # not a trivial answer
    else:
        for value, name in ((1, "liver"), (2, "spleen"), (3, "kidney")):
            np.testing.assert_array_equal(masks[name], expected == value, err_msg=name)


def resenc_variant(tmp_path: Path, mirror_axes: tuple[int, ...] | None = None, **options) -> Path:
    """The fixture folder with a ResidualEncoderUNet (nnU-Net's ResEnc plans) of random weights
    (``options``: as ``variant``; ``mirror_axes``: the checkpoint's allowed mirroring axes)."""
    from unisegcli.models.nnunet.network import build_network

    folder = variant(tmp_path, **options)
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    kwargs["n_blocks_per_stage"] = [1, 2, 2, 2]
    del kwargs["n_conv_per_stage"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    arch["arch_kwargs"] = kwargs
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    torch.manual_seed(0)
    net = build_network(arch, 1, 4)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = net.state_dict()
    if mirror_axes is not None:
        checkpoint["inference_allowed_mirroring_axes"] = tuple(mirror_axes)
    torch.save(checkpoint, path)
    return folder


@pytest.mark.parametrize("case", ["synth_lps", "realct"])
def test_residual_encoder_unet_matches_nnunetv2(case: str, tmp_path: Path) -> None:
    folder = resenc_variant(tmp_path)
    scan = FIXTURE / "inputs" / f"{case}_0000.nii.gz"
    expected = reference(folder, scan, mirror=False)
    result = segment([scan], "liver,spleen,kidney", output=tmp_path / "out", model=f"nnunet:{folder}",
                     nnunet_exact=True)
    labels = set(np.unique(expected).tolist())
    assert len(labels) >= 2  # random weights still give several classes
    for value, name in ((1, "liver"), (2, "spleen"), (3, "kidney")):
        mask = np.asarray(nib.load(str(result.cases[0].masks[name])).dataobj) > 0
        np.testing.assert_array_equal(mask, expected == value, err_msg=name)


def two_d_variant(tmp_path: Path) -> Path:
    """The fixture's 2d configuration as a results folder with random weights."""
    from unisegcli.models.nnunet.network import build_network

    folder = variant(tmp_path)
    target = folder.with_name("nnUNetTrainer__nnUNetPlans__2d")
    folder.rename(target)
    plans = json.loads((target / "plans.json").read_text())
    torch.manual_seed(1)
    net = build_network(plans["configurations"]["2d"]["architecture"], 1, 4)
    path = target / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = net.state_dict()
    checkpoint["init_args"]["configuration"] = "2d"
    checkpoint["inference_allowed_mirroring_axes"] = (0, 1)
    torch.save(checkpoint, path)
    return target


@pytest.mark.parametrize("mirror", [False, True], ids=["nomirror", "mirror"])
def test_2d_configuration_matches_nnunetv2(mirror: bool, tmp_path: Path) -> None:
    folder = two_d_variant(tmp_path)
    scan = FIXTURE / "inputs" / "synth_lps_0000.nii.gz"
    expected = reference(folder, scan, mirror=mirror)
    result = segment([scan], "liver,spleen,kidney", output=tmp_path / "out", model=f"nnunet:{folder}",
                     nnunet_exact=True, tta=mirror)
    assert len(set(np.unique(expected).tolist())) >= 2
    for value, name in ((1, "liver"), (2, "spleen"), (3, "kidney")):
        mask = np.asarray(nib.load(str(result.cases[0].masks[name])).dataobj) > 0
        np.testing.assert_array_equal(mask, expected == value, err_msg=name)


@pytest.mark.parametrize("scheme,use_mask", [("ZScoreNormalization", True), ("ZScoreNormalization", False),
                                             ("RescaleTo01Normalization", False), ("CTNormalization", False)])
def test_normalisation_schemes_match_nnunetv2(scheme: str, use_mask: bool) -> None:
    try:
        from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask
        from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes
    except ImportError as exc:
        pytest.skip(f"nnunetv2 is not importable: {exc}")
    from unisegcli.models.nnunet.pipeline import _fill_holes_mask, normalize_channel_nnunet

    rng = np.random.default_rng(4)
    image = np.zeros((1, 12, 14, 16), dtype=np.float32)
    image[0, 2:10, 3:12, 2:14] = rng.normal(300, 80, size=(8, 9, 12))
    image[0, 5, 6, 7] = 0  # a hole inside the body: filled, so it counts for the statistics
    properties = {"mean": 90.0, "std": 200.0, "percentile_00_5": 50.0, "percentile_99_5": 400.0}
    theirs_cls = getattr(schemes, scheme)(use_mask_for_norm=use_mask, intensityproperties=properties)
    mask = create_nonzero_mask(image)
    seg = np.where(mask, 0, -1)[None].astype(np.int8)
    theirs = theirs_cls.run(image[0].copy(), seg[0])
    ours_mask = torch.from_numpy(_fill_holes_mask(image))
    np.testing.assert_array_equal(ours_mask.numpy(), mask)
    ours, _ = normalize_channel_nnunet(torch.from_numpy(image[0]), scheme, use_mask, ours_mask, properties)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)


# -- the default (float32) mode on a hard case: where and why it differs from nnU-Net ---------


def oblique_lai(source: Path, out: Path) -> Path:
    """The scan's voxels stored L, A, I (first and last axes flipped) under an oblique affine
    (12 degrees about z, 7 about x), its own zooms."""
    img = nib.load(str(source))
    data = np.asarray(img.dataobj)[::-1, :, ::-1].copy()
    zooms = img.header.get_zooms()[:3]
    a, b = np.deg2rad(12.0), np.deg2rad(7.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-zooms[0], zooms[1], -zooms[2]])
    affine[:3, 3] = (30.0, -20.0, 80.0)
    out_img = nib.Nifti1Image(data, affine)
    out_img.set_qform(affine, code=1)
    out_img.set_sform(affine, code=2)
    nib.save(out_img, str(out))
    assert nib.aff2axcodes(affine) == ("L", "A", "I")
    return out


def segment_labels(scan: Path, folder: Path, out: Path, exact: bool) -> np.ndarray:
    """Our label map (1 liver, 2 spleen, 3 kidney) in the scan file's voxel order, mirrored."""
    result = segment([scan], "liver,spleen,kidney", output=out, model=f"nnunet:{folder}", nnunet_exact=exact,
                     tta=True)
    labels = None
    for value, name in ((1, "liver"), (2, "spleen"), (3, "kidney")):
        mask = np.asarray(nib.load(str(result.cases[0].masks[name])).dataobj) > 0
        labels = np.zeros(mask.shape, np.uint8) if labels is None else labels
        labels[mask] = value
    return labels


def default_mode_internals(scan: Path, folder: Path, accumulation: str) -> dict[str, np.ndarray]:
    """The default mode's steps by hand (float32 preprocessing, one fold, mirrored), with the
    given accumulation, in the scan file's voxel order: labels, the logit margin between the
    two best classes after export resampling, and the rim (a summed Gaussian weight < 1e-3 in
    the network grid touches the voxel's interpolation)."""
    from unisegcli.inference.engine import sliding_window
    from unisegcli.inference.gaussian import summed_weight_numpy
    from unisegcli.io.cases import read_case, task_channels
    from unisegcli.io.discovery import discover
    from unisegcli.models.nnunet import family
    from unisegcli.models.nnunet.pipeline import (
        export_segmentation, from_network_layout, preprocess_case, resample_logits,
    )
    from unisegcli.preprocessing.crop import insert_into_bbox
    from unisegcli.weights.resolver import get_model

    card = get_model(f"nnunet:{folder}")
    part = family.load(card, {}, settings=family.FAMILY.settings(), tasks=card.tasks).parts[""]
    loaded = read_case(discover([scan])[0])
    prepared = preprocess_case(task_channels(loaded, card.tasks[0]), loaded.scan.spacing_mm, loaded.scan,
                               part.folder)
    patch = [int(p) for p in part.folder.configuration["patch_size"]]
    logits = sliding_window(prepared.tensor, part.folds[0].network, patch, tta=True, mirror_axes=part.mirror_axes,
                            accumulation=accumulation)[0]
    logits = logits.half() if accumulation == "fp16" else logits

    def to_file(network_grid: np.ndarray, outside: float) -> np.ndarray:
        crop = prepared.trace.crop
        full = insert_into_bbox(np.full(crop.shape_before, outside, np.float32), network_grid, crop.bbox)
        return np.asarray(loaded.scan.reorientation.to_file(from_network_layout(full, loaded.scan, prepared.layout)))

    ranked = np.sort(resample_logits(logits, prepared.trace, part.folder).float().numpy(), axis=0)
    rim = torch.from_numpy((summed_weight_numpy(tuple(logits.shape[1:]), patch) < 1e-3).astype(np.float32))
    rim = resample_logits(rim[None], prepared.trace, part.folder)[0].numpy()
    labels = export_segmentation(logits, prepared, part.folder, loaded.scan)
    return {"labels": np.asarray(loaded.scan.reorientation.to_file(labels)),
            "margin": to_file(ranked[-1] - ranked[-2], np.inf), "rim": to_file(rim, 0.0) > 0}


@pytest.mark.parametrize(("case", "reader", "transpose"), [
    ("realct", "NibabelIOWithReorient", (1, 2, 0)), ("synth_lps", "SimpleITKIO", (2, 0, 1)),
], ids=["realct-nibabel-120", "synth-simpleitk-201"])
def test_default_mode_differs_only_where_nnunets_float16_accumulation_is_coarse(
        case: str, reader: str, transpose: tuple[int, int, int], tmp_path: Path) -> None:
    """ResEnc, mirror axes (0, 1), transposed plans, an oblique LAI input (issue 24 item 4).

    --nnunet-exact: nnunetv2's file voxel for voxel. Default (float32 accumulation): 99.84 to
    99.95 % on such cases; the same steps with float16 accumulation give nnunetv2's file
    exactly, so the accumulation is the only cause, and every differing voxel is on the rim
    (nnU-Net's float16 sums of tiny Gaussian weights are quantised there and its logits tie)
    or a near-tie inside (logit margin < 1e-3, below nnU-Net's float16 logit resolution).
    """
    folder = resenc_variant(tmp_path, mirror_axes=(0, 1), reader=reader, transpose=transpose)
    scan = oblique_lai(FIXTURE / "inputs" / f"{case}_0000.nii.gz", tmp_path / "scan_0000.nii.gz")
    expected = reference(folder, scan, mirror=True)
    assert len(set(np.unique(expected).tolist())) >= 2
    np.testing.assert_array_equal(segment_labels(scan, folder, tmp_path / "exact", exact=True), expected)
    default = segment_labels(scan, folder, tmp_path / "default", exact=False)
    differ = default != expected
    assert 0.998 <= 1 - differ.mean() < 1  # measured 99.84 % (realct) and 99.87 % (synth) here
    np.testing.assert_array_equal(default_mode_internals(scan, folder, "fp16")["labels"], expected)
    ours = default_mode_internals(scan, folder, "fp32")
    np.testing.assert_array_equal(ours["labels"], default)
    explained = ours["rim"] | (ours["margin"] < 1e-3)
    assert bool(explained[differ].all())
    assert ours["rim"][differ].mean() > 0.5  # most of them on the rim
