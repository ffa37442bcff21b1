"""Many-class nnU-Net export: `uniseg --model nnunet:...` vs nnU-Net v2's own predictor.

A results folder shaped like TotalSegmentator's 3 mm ``total`` model (task 297,
``Dataset297_TotalSegmentator_total_3mm_1559subj/nnUNetTrainer_4000epochs_NoMirroring__
nnUNetPlans__3d_fullres``), random weights, on a synthetic 512 x 512 x N CT at
0.8 x 0.8 x 1.5 mm (``common.synthetic_ct``), end to end, each side in its own process:

* uniseg: the real command (``uniseg IN -o OUT --model nnunet:FOLDER --tasks <all 117>
  --multilabel --no-statistics --device cpu``) run in the child through the CLI entry point,
  with the stages timed by wrapping their functions (read, preprocess, windows, export,
  write: one mask per structure plus segmentation.nii.gz);
* nnU-Net v2 (2.8.1): ``nnUNetPredictor.initialize_from_trained_model_folder`` and the steps of
  its ``predict_single_npy_array``, timed one by one: the plans' reader, ``run_case_npy``,
  ``predict_logits_from_preprocessed_data``, ``convert_predicted_logits_to_segmentation_with_
  correct_shape`` (torch threads = the child's, not nnU-Net's default 8 on 2 cores), ``write_seg``.

Same settings on both sides: fold 0, no mirroring (the checkpoint allows none, as the
NoMirroring trainer saves it), step 0.5, Gaussian weighting, fp32, CPU. Each child runs under
an address-space cap (``RLIMIT_AS``, --cap-gib) so that a blow-up fails in its process instead
of taking the shared machine down; its peak RSS is its own ``ru_maxrss``. Agreement: voxels
where nnU-Net's label map equals ours (default float32 mode, and ``--nnunet-exact``).

Where the model's numbers come from:

* architecture, patch, spacing, normalisation: the released task-297 plans as exported by a
  public project that loads them (aluminumio/shoulder_segmenter, script/golden/
  nnunet_architecture.yaml, written from the plans by script/export_totalsegmentator.py):
  PlainConvUNet, 5 stages, features 32-64-128-256-320, 3x3x3 kernels, strides 1-2-2-2-2,
  2 convs per stage (encoder and decoder), InstanceNorm (affine) + LeakyReLU, patch
  (112, 112, 128), spacing 3 x 3 x 3 mm, CTNormalization (clip -1004..1588, mean -50.39,
  std 503.39), 118 outputs (117 structures + background);
* trainer nnUNetTrainer_4000epochs_NoMirroring, fold 0, step 0.5: TotalSegmentator's
  python_api.py (wasserth/TotalSegmentator, ``task == "total"`` and ``fast``);
* guesses: the reader (``SimpleITKIO``, nnU-Net's default), transpose (identity, the spacing
  is isotropic), the resampling kwargs (nnU-Net's defaults: data order 3, probabilities order 1,
  separate-z order 0) and the structure names (``structure_001`` ...); weights are random.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/many_classes.py            # N = 48 and 300
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/many_classes.py --small    # toy sizes, < 3 min

Writes benchmarks/results/many_classes[_small].json; the headline is the last line printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import common

SPACING_ZYX = (1.5, 0.8, 0.8)
CLASSES = 118  # outputs: background + 117 structures
FULL = {"patch": [112, 112, 128], "features": [32, 64, 128, 256, 320], "plane": 512, "depths": [48, 300]}
SMALL = {"patch": [32, 48, 48], "features": [4, 8, 16, 32, 32], "plane": 160, "depths": [16, 48]}
CLIP = {"percentile_00_5": -1004.0, "percentile_99_5": 1588.0, "mean": -50.38697721419439,
        "std": 503.39235619144, "min": -1024.0, "max": 3071.0, "median": 20.0}
MARK = "MANY_CLASSES_RESULT "
STAGES = ("read", "preprocess", "windows", "export", "write")


# ---------------------------------------------------------------- the model and the scan


def make_folder(root: Path, sizes: dict[str, Any]) -> Path:
    """A TotalSegmentator-3mm-shaped nnU-Net v2 results folder with random weights."""
    import torch

    from unisegcli.models.nnunet.network import build_network

    plans, config = common.nnunet_plans(sizes["patch"], (3.0, 3.0, 3.0))
    features = sizes["features"]
    config["architecture"]["arch_kwargs"].update({
        "n_stages": len(features), "features_per_stage": features,
        "kernel_sizes": [[3, 3, 3]] * len(features),
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (len(features) - 1),
        "n_conv_per_stage": [2] * len(features), "n_conv_per_stage_decoder": [2] * (len(features) - 1),
    })
    plans["configurations"] = {"3d_fullres": config}
    plans["foreground_intensity_properties_per_channel"] = {"0": CLIP}
    plans["image_reader_writer"] = "SimpleITKIO"
    plans["dataset_name"] = "Dataset297_TotalSegmentator_total_3mm_1559subj"
    labels = ["background"] + [f"structure_{i:03d}" for i in range(1, CLASSES)]
    dataset = common.nnunet_dataset_json(labels)
    del dataset["overwrite_image_reader_writer"]
    folder = root / plans["dataset_name"] / "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    torch.manual_seed(297)
    net = build_network(config["architecture"], 1, CLASSES)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer_4000epochs_NoMirroring",
                "inference_allowed_mirroring_axes": None,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset}},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def make_scan(root: Path, plane: int, depth: int) -> Path:
    volume = common.synthetic_ct((depth, plane, plane), seed=depth)
    return common.write_nifti(root / f"ct_{depth}_0000.nii.gz", volume, SPACING_ZYX)


# ---------------------------------------------------------------- the two children


class StageClock:
    """Wall seconds per stage, by wrapping module functions (missing ones are skipped)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, module: Any, attr: str, stage: str) -> None:
        fn = getattr(module, attr, None)
        if fn is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

        setattr(module, attr, timed)

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def child_uniseg(args: argparse.Namespace, clock: StageClock) -> None:
    import unisegcli.batch as batch
    import unisegcli.models.nnunet.family as family
    import unisegcli.models.nnunet.pipeline as pipeline
    import unisegcli.outputs.writer as writer
    from unisegcli.cli.app import app
    from unisegcli.models.nnunet.family import card_from_spec

    for module, attr, stage in ((batch, "read_case", "read"), (pipeline, "preprocess_case", "preprocess"),
                                (family, "_blend", "windows"), (pipeline, "export_segmentation", "export"),
                                (writer, "write_case_outputs", "write")):
        clock.wrap(module, attr, stage)
    spec = f"nnunet:{args.folder}"
    tasks = ",".join(t.name for t in card_from_spec(spec).tasks)
    argv = [str(args.input), "-o", str(args.output), "--model", spec, "--tasks", tasks, "--multilabel",
            "--no-statistics", "--device", "cpu", "--quiet"] + (["--nnunet-exact"] if args.exact else [])
    code = app(argv, prog_name="uniseg", standalone_mode=False)
    if code:
        raise RuntimeError(f"uniseg exited with {code}")


def child_nnunet(args: argparse.Namespace, clock: StageClock) -> None:
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with common.quiet():
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, allow_tqdm=False)
        initialize(predictor, args.folder)
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    reader = pm.image_reader_writer_class()
    image, props = clock.run("read", lambda: reader.read_images([str(args.input)]))
    preprocessor = cm.preprocessor_class(verbose=False)
    data, _, props = clock.run("preprocess", lambda: preprocessor.run_case_npy(
        image, None, props, pm, cm, predictor.dataset_json))
    with common.quiet():
        logits = clock.run("windows", lambda: predictor.predict_logits_from_preprocessed_data(
            torch.from_numpy(data)).cpu())
    del data
    seg = clock.run("export", lambda: convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, pm, cm, predictor.label_manager, props, num_threads_torch=torch.get_num_threads()))
    del logits
    args.output.mkdir(parents=True, exist_ok=True)
    clock.run("write", lambda: reader.write_seg(seg, str(args.output / "segmentation.nii.gz"), props))


def initialize(predictor: Any, folder: Path) -> None:
    """``initialize_from_trained_model_folder`` for fold 0, with the network built by nnU-Net's
    ``get_network_from_plans`` as ``nnUNetTrainer.build_network_architecture`` does: nnU-Net's
    search for the trainer class by name imports every trainer module, and some import
    torchvision, which does not load with this torch."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    dataset = json.loads((folder / "dataset.json").read_text())
    pm = PlansManager(str(folder / "plans.json"))
    cm = pm.get_configuration("3d_fullres")
    arch = cm.network_arch_init_kwargs
    network = get_network_from_plans(cm.network_arch_class_name, arch, cm.network_arch_init_kwargs_req_import,
                                     1, pm.get_label_manager(dataset).num_segmentation_heads, allow_init=True,
                                     deep_supervision=False)
    predictor.manual_initialization(network, pm, cm, [checkpoint["network_weights"]], dataset,
                                    checkpoint["trainer_name"], checkpoint["inference_allowed_mirroring_axes"])


def child(args: argparse.Namespace) -> None:
    """One side in this process under the memory cap; prints one MARK line of JSON."""
    cap = int(args.cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    start = time.perf_counter()
    clock = StageClock()
    status = "ok"
    try:
        (child_uniseg if args.child == "uniseg" else child_nnunet)(args, clock)
    except MemoryError as exc:
        status = f"MemoryError {exc}".strip()
    except RuntimeError as exc:  # torch: "DefaultCPUAllocator: can't allocate memory ..."
        status = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(MARK + json.dumps({"status": status, "seconds": time.perf_counter() - start,
                             "stages": clock.seconds, "peak_rss_gib": peak_gib}), flush=True)


def run_side(side: str, folder: Path, scan: Path, out: Path, cap_gib: float, exact: bool = False) -> dict:
    """Run one side in a fresh process; returns its MARK record plus the process's wall time."""
    command = [sys.executable, __file__, "--child", side, "--folder", str(folder), "--input", str(scan),
               "--output", str(out), "--cap-gib", str(cap_gib)] + (["--exact"] if exact else [])
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(common.ROOT)})
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if not lines:  # killed (e.g. by the kernel's OOM killer) before it could report
        record = {"status": f"died with exit code {done.returncode}: {done.stderr.strip()[-300:]}", "stages": {},
                  "peak_rss_gib": None}
    else:
        record = json.loads(lines[-1][len(MARK):])
    record["wall_s"] = wall
    label = f"{side}{' exact' if exact else ''}"
    print(f"  {label}: {record['status']}, {wall:.1f} s, peak RSS {record['peak_rss_gib'] or 0:.2f} GiB", flush=True)
    return record


# ---------------------------------------------------------------- agreement and report


def label_maps(ours: Path, theirs: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ours, nnU-Net's) label maps in nnU-Net's label values, same voxel order."""
    import nibabel as nib

    names = json.loads((ours / "labels.json").read_text())["labels"]
    value_of = {f"structure_{i:03d}": i for i in range(1, CLASSES)}
    ours_case = next(p for p in ours.rglob("segmentation.nii.gz"))
    raw = np.asarray(nib.load(str(ours_case)).dataobj)
    lut = np.zeros(max(int(k) for k in names) + 1, dtype=np.uint8)
    for key, entry in names.items():
        lut[int(key)] = value_of[entry["name"]]
    return lut[raw], np.asarray(nib.load(str(theirs / "segmentation.nii.gz")).dataobj)


def agreement(ours: Path, theirs: Path) -> float:
    a, b = label_maps(ours, theirs)
    if a.shape != b.shape:
        raise SystemExit(f"label maps differ in shape: {a.shape} vs {b.shape}")
    return float((a == b).mean() * 100.0)


def one_size(root: Path, folder: Path, sizes: dict[str, Any], depth: int, cap_gib: float, exact: bool) -> dict:
    scan = make_scan(root, sizes["plane"], depth)
    print(f"\nscan {sizes['plane']} x {sizes['plane']} x {depth} voxels", flush=True)
    result: dict[str, Any] = {"shape_zyx": [depth, sizes["plane"], sizes["plane"]]}
    result["uniseg"] = run_side("uniseg", folder, scan, root / f"ours_{depth}", cap_gib)
    result["nnunet"] = run_side("nnunet", folder, scan, root / f"theirs_{depth}", cap_gib)
    both_ok = result["uniseg"]["status"] == "ok" and result["nnunet"]["status"] == "ok"
    if both_ok:
        result["equal_voxels_pct"] = agreement(root / f"ours_{depth}", root / f"theirs_{depth}")
        if exact:
            result["uniseg_exact"] = run_side("uniseg", folder, scan, root / f"exact_{depth}", cap_gib, exact=True)
            result["exact_equal_voxels_pct"] = agreement(root / f"exact_{depth}", root / f"theirs_{depth}")
        result["speedup"] = result["nnunet"]["wall_s"] / result["uniseg"]["wall_s"]
    return result


def report(sizes: list[dict]) -> None:
    rows = []
    for size in sizes:
        for side in ("uniseg", "uniseg_exact", "nnunet"):
            if side in size:
                r = size[side]
                rows.append(["x".join(map(str, size["shape_zyx"][::-1])), side, r["status"][:40], r["wall_s"],
                             *(r["stages"].get(s, float("nan")) for s in STAGES), r["peak_rss_gib"] or float("nan")])
    common.print_table(["scan (x y z)", "run", "status", "wall s", *STAGES, "peak GiB"], rows)
    for size in sizes:
        if "equal_voxels_pct" in size:
            exact = size.get("exact_equal_voxels_pct")
            print(f"{'x'.join(map(str, size['shape_zyx'][::-1]))}: equal voxels {size['equal_voxels_pct']:.3f} % "
                  f"(--nnunet-exact {exact:.4f} %)" if exact is not None else "")


def headline(sizes: list[dict]) -> str:
    fit = next((s for s in sizes if "speedup" in s), None)
    big = sizes[-1]
    parts = []
    if fit is not None:
        u, n = fit["uniseg"], fit["nnunet"]
        parts.append(f"N={fit['shape_zyx'][0]}: uniseg {u['wall_s']:.1f} s vs nnU-Net {n['wall_s']:.1f} s = "
                     f"{fit['speedup']:.2f}x, equal voxels {fit['equal_voxels_pct']:.2f} %"
                     + (f" (exact {fit['exact_equal_voxels_pct']:.3f} %)" if "exact_equal_voxels_pct" in fit else "")
                     + f", peak RSS {u['peak_rss_gib']:.1f} vs {n['peak_rss_gib']:.1f} GB")
    u, n = big["uniseg"], big["nnunet"]
    theirs = (f"{n['wall_s']:.1f} s, {n['peak_rss_gib']:.1f} GB" if n["status"] == "ok"
              else f"failed after {n['wall_s']:.1f} s at {n['peak_rss_gib'] or 0:.1f} GB ({n['status'][:60]})")
    parts.append(f"N={big['shape_zyx'][0]}: uniseg {u['wall_s']:.1f} s, {u['peak_rss_gib'] or 0:.1f} GB; "
                 f"nnU-Net {theirs}")
    return "many_classes: " + "; ".join(parts)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="toy sizes (same comparison, < 3 min)")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="slices N of the scans (default 48 300; --small 16 48)")
    parser.add_argument("--cap-gib", type=float, default=12.0, help="address-space cap of each child (GiB)")
    parser.add_argument("--child", choices=["uniseg", "nnunet"], help=argparse.SUPPRESS)
    for name in ("--folder", "--input", "--output"):
        parser.add_argument(name, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.device != "cpu":
        raise SystemExit("many_classes measures the CPU export; got --device "
                         f"{args.device}, expected cpu (GPU timings: benchmarks/gpu.py).")
    sizes = SMALL if args.small else FULL
    depths = args.depths or sizes["depths"]
    import torch

    record = common.machine_record("cpu")
    print(common.machine_line(record), flush=True)
    with tempfile.TemporaryDirectory(prefix="many_classes_") as tmp:
        root = Path(tmp)
        folder = make_folder(root, sizes)
        results = [one_size(root, folder, sizes, d, args.cap_gib, exact=i == 0) for i, d in enumerate(depths)]
    common.finish_record(record)
    report(results)
    common.write_result(common.result_name("many_classes", args, "small" if args.small else None),
                        {"machine": record, "model": {**sizes, "classes": CLASSES}, "cap_gib": args.cap_gib,
                         "torch_threads": torch.get_num_threads(), "sizes": results, "headline": headline(results)})
    print(headline(results))


if __name__ == "__main__":
    main()
