#!/usr/bin/env python
"""Evaluate ``uniseg-demo`` on views of its training scan that training never saw.

The demo model is trained on one scan (tests/data/example_ct.nii.gz). This script makes
held-back views of that scan — other fields of view, crops, rescalings, a rotation, intensity
changes — together with the reference segmentation carried into each view's grid, segments
every view with each checkpoint given (official loader + ``predict_case``, the CLI's path)
and prints Dice per structure per view:

    .venv/bin/python scripts/evaluate_demo.py                                   # shipped model
    git show 42a6ccc:unisegcli/data/models/uniseg-demo/1.0/model.safetensors > out/demo-1.0.safetensors
    .venv/bin/python scripts/evaluate_demo.py --checkpoint old=out/demo-1.0.safetensors \\
        --checkpoint new=unisegcli/data/models/uniseg-demo/1.1/model.safetensors --json out/eval.json

No other scan of this patient exists in the project, so "larger field of view" is simulated by
surrounding the scan with air (-1024 HU); every view is a deterministic function of the scan
(the noise view uses ``--seed``), so the numbers are reproducible. Views at other spacings are
scored in their own grid (the reference resampled nearest-neighbour), the others voxel for
voxel. These views test robustness to acquisition, not generalisation to other patients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_demo.py

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

AIR_HU = -1024.0
TRAINING_VIEW = "training scan"  # the one view training has seen
Spacing = tuple[float, float, float]
# (image HU [Z, Y, X], labels [Z, Y, X], spacing (z, y, x) mm) -> the same, transformed
View = Callable[[np.ndarray, np.ndarray, Spacing], tuple[np.ndarray, np.ndarray, Spacing]]


def pad_view(z: int, y: int, x: int) -> View:
    """A larger field of view: the scan surrounded by air, (z, y, x) voxels on each side."""
    def view(image: np.ndarray, labels: np.ndarray, spacing: Spacing):
        width = ((z, z), (y, y), (x, x))
        return np.pad(image, width, constant_values=AIR_HU), np.pad(labels, width), spacing
    return view


def shift_view(y: int, x: int) -> View:
    """The field of view moved: y/x voxels cut on the low side, as many of air added on the high side."""
    def view(image: np.ndarray, labels: np.ndarray, spacing: Spacing):
        width = ((0, 0), (0, y), (0, x))
        return (np.pad(image[:, y:, x:], width, constant_values=AIR_HU),
                np.pad(labels[:, y:, x:], width), spacing)
    return view


def crop_view(box: tuple[slice, slice, slice]) -> View:
    """A smaller field of view: the (z, y, x) box only (organs may be cut at its border)."""
    def view(image: np.ndarray, labels: np.ndarray, spacing: Spacing):
        return image[box], labels[box], spacing
    return view


def resample_view(factor: float) -> View:
    """The same anatomy on a grid of ``factor`` x the spacing (cubic image, nearest labels)."""
    def view(image: np.ndarray, labels: np.ndarray, spacing: Spacing):
        from scipy import ndimage

        zoom = 1.0 / factor
        resampled = ndimage.zoom(image, zoom, order=3, mode="nearest", grid_mode=True)
        resampled_labels = ndimage.zoom(labels, zoom, order=0, mode="nearest", grid_mode=True)
        return resampled, resampled_labels, tuple(s * factor for s in spacing)  # type: ignore[return-value]
    return view


def size_view(factor: float) -> View:
    """Anatomy ``factor`` x its size: same voxels, spacing scaled (a smaller or larger patient)."""
    def view(image: np.ndarray, labels: np.ndarray, spacing: Spacing):
        return image, labels, tuple(s * factor for s in spacing)  # type: ignore[return-value]
    return view


def rotate_view(degrees: float) -> View:
    """Rotated in-plane (about z) by ``degrees``, air filling the corners (linear / nearest)."""
    def view(image: np.ndarray, labels: np.ndarray, spacing: Spacing):
        from scipy import ndimage

        rotated = ndimage.rotate(image, degrees, axes=(1, 2), reshape=False, order=1, cval=AIR_HU)
        return rotated, ndimage.rotate(labels, degrees, axes=(1, 2), reshape=False, order=0, cval=0), spacing
    return view


def intensity_view(offset_hu: float = 0.0, noise_hu: float = 0.0, seed: int = 0) -> View:
    """HU offset (calibration) and/or Gaussian noise of ``noise_hu`` standard deviation."""
    def view(image: np.ndarray, labels: np.ndarray, spacing: Spacing):
        out = image + np.float32(offset_hu)
        if noise_hu:
            out = out + np.random.default_rng(seed).normal(0.0, noise_hu, image.shape).astype(np.float32)
        return out.astype(np.float32), labels, spacing
    return view


def views(seed: int) -> dict[str, View]:
    """The evaluation views by name; "training scan" is the only one training has seen."""
    return {
        TRAINING_VIEW: size_view(1.0),
        "larger FOV (+24 vox air in-plane, +6 slices)": pad_view(6, 24, 24),
        "FOV shifted 17 x 23 vox": shift_view(17, 23),
        "crop: central 70x80 in-plane": crop_view((slice(None), slice(15, 85), slice(20, 100))),
        "crop: slices 6-23": crop_view((slice(6, 24), slice(None), slice(None))),
        "resampled 0.8x spacing (2.4 mm)": resample_view(0.8),
        "resampled 1.25x spacing (3.75 mm)": resample_view(1.25),
        "anatomy 0.8x (spacing 2.4 mm, same voxels)": size_view(0.8),
        "anatomy 1.25x (spacing 3.75 mm, same voxels)": size_view(1.25),
        "rotated 10 deg in-plane": rotate_view(10.0),
        "+50 HU": intensity_view(offset_hu=50.0),
        "-50 HU": intensity_view(offset_hu=-50.0),
        "noise 30 HU": intensity_view(noise_hu=30.0, seed=seed),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="a model.safetensors to evaluate, repeatable (default: the shipped demo model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise view (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores to this JSON file")
    return parser.parse_args(argv)


def checkpoints(specs: Sequence[str]) -> dict[str, Path]:
    if not specs:
        from unisegcli.weights.cache import find_model_files
        from unisegcli.weights.resolver import get_model

        return {"shipped": find_model_files(get_model("uniseg-demo"))["checkpoint"]}
    pairs = [spec.split("=", 1) for spec in specs]
    if any(len(p) != 2 or not p[0] for p in pairs):
        raise SystemExit(f"--checkpoint expects NAME=PATH, got {specs}")
    return {name: Path(path) for name, path in pairs}


def evaluate(checkpoint: Path, seed: int) -> dict[str, dict[str, float]]:
    """{view: {structure: Dice}} for one checkpoint, each view scored in its own grid."""
    from train_demo import CT_PATH, REFERENCE_LABELS, SEG_PATH, demo_tasks, dice

    from unisegcli.io.nifti import read_scan
    from unisegcli.models.uniseg import load_uniseg
    from unisegcli.models.uniseg.predictor import predict_case

    scan, seg = read_scan(CT_PATH), read_scan(SEG_PATH)
    tasks, net = demo_tasks(), load_uniseg(checkpoint)
    labels = np.rint(seg.data[0]).astype(np.int16)
    scores: dict[str, dict[str, float]] = {}
    for name, view in views(seed).items():
        image, truth, spacing = view(scan.data[0], labels, scan.spacing_mm)
        predicted = predict_case(image[None], spacing, tasks, net, device="cpu", batch_size=2)
        scores[name] = {task: dice(predicted[task] == 1, np.isin(truth, ids))
                        for task, ids in REFERENCE_LABELS.items()}
    return scores


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows = views, columns = structure x checkpoint."""
    models = list(results)
    first = results[models[0]]
    structures = list(next(iter(first.values())))
    header = f"{'view':46s}" + "".join(f"{s + ' ' + m:>16s}" for s in structures for m in models)
    rows = [header]
    for view in first:
        rows.append(f"{view:46s}" + "".join(f"{results[m][view][s]:16.3f}" for s in structures for m in models))
    held_back = [v for v in first if v != TRAINING_VIEW]
    for label, reduce in (("mean over held-back views", np.mean), ("worst held-back view", np.min)):
        rows.append(f"{label:46s}" + "".join(
            f"{reduce([results[m][v][s] for v in held_back]):16.3f}" for s in structures for m in models))
    return "\n".join(rows)


def summary(scores: dict[str, dict[str, float]]) -> str:
    """"liver 0.951 (0.902), ...": per structure, mean (worst) Dice over the held-back views,
    the form the registry card's note quotes."""
    held_back = [v for v in scores if v != TRAINING_VIEW]
    structures = list(scores[TRAINING_VIEW])
    return ", ".join(
        f"{s} {np.mean([scores[v][s] for v in held_back]):.3f} ({min(scores[v][s] for v in held_back):.3f})"
        for s in structures
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = {name: evaluate(path, args.seed) for name, path in checkpoints(args.checkpoint).items()}
    print(table(results))
    for name, scores in results.items():
        print(f"{name}: mean (worst) Dice over {len(scores) - 1} held-back views: {summary(scores)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
