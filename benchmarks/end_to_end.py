"""Whole pipeline, file in -> mask files out: `uniseg` vs the same steps done the nnU-Net v2 way.

uniseg: ``read_case`` -> ``run_case`` (preprocess, sliding window, restore, write the masks;
statistics off, since nnU-Net writes none), i.e. what `uniseg IN -o OUT --tasks liver` does
once the network is loaded. nnU-Net v2: ``NibabelIOWithReorient.read_images`` ->
``DefaultPreprocessor.run_case_npy`` (crop, CTNormalization set to UniSeg's clip-and-scale,
resampling order 3 / separate-z order 0) -> ``nnUNetPredictor.predict_sliding_window_return_logits``
-> ``convert_predicted_logits_to_segmentation_with_correct_shape`` (logit resampling order 1,
argmax, uncrop) -> ``write_seg``. Same network object (one task, wrapped as ``net(x)``), same
patch, step 0.5, Gaussian, no mirroring, fp32 on the CPU (fp16 autocast on a GPU, where
nnU-Net keeps everything on the device and our engine takes 4 windows per batch).

The two pipelines differ in two documented ways, which is what the agreement measures:
UniSeg (nnU-Net v1) resamples before it normalises and blends softmax probabilities;
nnU-Net v2 normalises first and blends logits.

    .venv/bin/python benchmarks/end_to_end.py             # small network, example CT + synthetic CT (~5 min)
    .venv/bin/python benchmarks/end_to_end.py --full      # the full-size network (~15 min on 2 cores)
    .venv/bin/python benchmarks/end_to_end.py --small     # a toy UniSeg (16x64x64 patch), 48x48 of the example
                                                          # CT + a 128x128x40 CT
    .venv/bin/python benchmarks/end_to_end.py --weights model.safetensors --model uniseg-demo --task liver
    .venv/bin/python benchmarks/end_to_end.py --full --original-network   # nnU-Net runs the network
                                                  # computed as the original code does (modules, NCDHW)

Writes benchmarks/results/end_to_end[_full|_weights|_small][_cuda].json; the headline is the last line.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

import common

SYNTHETIC_SHAPE_ZYX = (100, 256, 256)
SMALL_SYNTHETIC_SHAPE_ZYX = (40, 128, 128)
SYNTHETIC_SPACING_ZYX = (2.5, 0.8, 0.8)


@contextlib.contextmanager
def stage_clock(stages: dict[str, float]) -> Iterator[None]:
    """Add the wall time of uniseg's pipeline stages to ``stages`` while active."""
    import unisegcli.models.uniseg.predictor as predictor
    import unisegcli.outputs.writer as writer

    patched = [
        (predictor, "preprocess", "preprocess"),
        (predictor, "sliding_window", "windows"),
        (predictor, "restore_label_map", "export"),
        (writer, "write_case_outputs", "write"),
    ]
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patched]

    def wrap(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed_fn(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[stage] += time.perf_counter() - start

        return timed_fn

    for (module, attr, stage), (_, _, fn) in zip(patched, saved):
        setattr(module, attr, wrap(fn, stage))
    try:
        yield
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size network (default: small)")
    common.add_small(parser, "a toy UniSeg (16x64x64 patch, 4..32 features), the middle 48x48 voxels of the "
                             "example CT and a 128x128x40 CT")
    parser.add_argument("--weights", type=Path, default=None,
                        help="model.safetensors (config.json beside it) instead of random weights")
    parser.add_argument("--model", default="uniseg", help="registry model whose task card is used")
    parser.add_argument("--task", default="liver", help="task (a CT task with one channel)")
    parser.add_argument("--inputs", nargs="*", type=Path, default=None,
                        help="NIfTI CTs (default: the example CT and a synthetic CT)")
    parser.add_argument("--original-network", action="store_true",
                        help="nnU-Net's side runs the network as the original code computes it "
                             "(InstanceNorm/LeakyReLU modules, contiguous layout; common.baseline_network)")
    parser.add_argument("--batch-size", type=int, default=None, help="our windows per forward (1 CPU, 4 GPU)")
    args = parser.parse_args()
    device = common.setup(args)
    machine = common.machine_record(device)
    gpu = common.on_gpu(device)

    from unisegcli.weights.resolver import get_model

    task = get_model(args.model).resolve_tasks(args.task)[0]
    if args.weights is not None:
        from unisegcli.models import load_uniseg

        net = load_uniseg(args.weights)
        network = f"weights {args.weights.name}"
    else:
        size = "full" if args.full else "toy" if args.small else "small"
        net = common.random_network(common.network_config(size))
        network = f"{size} (random weights)"
    # the layout `uniseg` uses on this device, set before either side runs (same object)
    net = common.optimised_layout(net.to(device).eval(), device)
    patch = net.config.patch_size
    labels = ["background"] + [task.labels[i] for i in sorted(task.labels)]
    clip = task.normalization[task.channels[0]].get("clip_hu")
    if task.normalization[task.channels[0]].get("scheme") != "ct_clip_scale" or len(task.channels) != 1:
        raise SystemExit(f"task {task.name} is not a one-channel ct_clip_scale task; pick a CT task")

    with tempfile.TemporaryDirectory(prefix="uniseg-bench-") as tmp:
        tmp_dir = Path(tmp)
        inputs = args.inputs
        if not inputs:
            shape = SMALL_SYNTHETIC_SHAPE_ZYX if args.small else SYNTHETIC_SHAPE_ZYX
            synthetic = common.write_nifti(tmp_dir / "synthetic_ct.nii.gz", common.synthetic_ct(shape),
                                           SYNTHETIC_SPACING_ZYX)
            inputs = [example_crop(tmp_dir) if args.small else common.EXAMPLE_CT, synthetic]
        results = [
            run_input(path, tmp_dir, net, task, labels, clip, patch, args, device)
            for path in inputs
        ]
    common.finish_record(machine)

    print(f"\n{common.machine_line(machine)}")
    print(f"network: {network}; task {task.name}; step 0.5, Gaussian, no mirroring")
    common.print_table(
        ["input", "shape (file)", "windows", "uniseg s", "nnU-Net s", "speedup", "equal %",
         "equal % (v2 order)"],
        [[r["input"], "x".join(map(str, r["file_shape"])), r["windows"], r["median_s"]["uniseg"],
          r["median_s"]["nnU-Net v2"], r["speedup_vs_nnunet"], f"{100 * r['argmax_agreement']:.3f}",
          f"{100 * r['argmax_agreement_v2_semantics']:.3f}"]
         for r in results],
        "end to end (medians)",
    )
    print("equal %: `uniseg` (UniSeg = nnU-Net v1: resample then normalise, blend softmax) vs nnU-Net "
          "v2's files;\n(v2 order): our library stages run in nnU-Net v2's order (normalise first, "
          "blend logits), untimed")
    stage_names = ["read", "preprocess", "windows", "export", "write"]
    rows = []
    for r in results:
        for side in ("uniseg", "nnU-Net v2"):
            rows.append([f"{r['input']} {side}", *(r["stages_median_s"][side][s] for s in stage_names)])
    common.print_table(["stage seconds"] + stage_names, rows, "per stage (medians)")
    target = 5.0 if gpu else 1.5
    worst = min(r["speedup_vs_nnunet"] for r in results)
    agree = min(r["argmax_agreement"] for r in results)
    met = worst >= target and agree >= 0.999
    print(f"end to end >= {target}x nnU-Net v2 with >= 99.9 % equal argmax: {common.verdict(met)} "
          f"(worst speedup {worst:.2f}x, worst agreement {100 * agree:.3f} %)")
    variant = "full" if args.full else "weights" if args.weights else "small" if args.small else None
    if args.original_network:
        variant = f"{variant}_original" if variant else "original"
    common.write_result(common.result_name("end_to_end", args, variant), {
        "machine": machine,
        "settings": {"network": network, "task": task.name, "step": 0.5, "gaussian": True,
                     "nnunet_network": "original computation" if args.original_network else "the same object",
                     "mirroring": False, "repeat": args.repeat, "uniseg_outputs": "masks, no statistics"},
        "inputs": results,
        "targets": {f"end_to_end_at_least_{target}x_and_99.9pct_argmax": {
            "worst_speedup": worst, "worst_agreement": agree, "met": met}},
    })
    common.headline("end_to_end", "; ".join(
        f"{r['input']}: uniseg {r['median_s']['uniseg']:.2f} s vs nnU-Net {r['median_s']['nnU-Net v2']:.2f} s = "
        f"{r['speedup_vs_nnunet']:.2f}x, equal voxels {100 * r['argmax_agreement']:.2f} % "
        f"({100 * r['argmax_agreement_v2_semantics']:.2f} % in v2 order)" for r in results))


def example_crop(folder: Path) -> Path:
    """The middle 48x48 voxels (x, y) of the example CT, every slice (its affine kept)."""
    import nibabel as nib

    image = nib.load(str(common.EXAMPLE_CT))
    x0, y0 = (image.shape[0] - 48) // 2, (image.shape[1] - 48) // 2
    path = folder / "example_ct_crop.nii.gz"
    nib.save(image.slicer[x0:x0 + 48, y0:y0 + 48, :], str(path))
    return path


def run_input(path: Path, tmp_dir: Path, net: Any, task: Any, labels: list[str], clip: Any,
              patch: tuple[int, int, int], args: Any, device: Any) -> dict[str, Any]:
    import nibabel as nib
    import torch
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from unisegcli.models.uniseg.predictor import _count_windows
    from unisegcli.io.cases import read_case
    from unisegcli.io.discovery import discover
    from unisegcli.outputs.writer import OutputOptions
    from unisegcli.preprocessing.crop import nonzero_bbox

    gpu = common.on_gpu(device)
    plans, _ = common.nnunet_plans(patch, task.spacing_mm, clip)
    dataset_json = common.nnunet_dataset_json(labels)
    theirs_net = common.baseline_network(net) if args.original_network else net
    module = common.single_task_module(theirs_net, task.index, len(labels))
    predictor, on_device = common.nnunet_predictor(module, plans, dataset_json, device)
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    label_manager = manager.get_label_manager(dataset_json)
    threads = torch.get_num_threads()
    engine = dict(device=device, batch_size=args.batch_size or (4 if gpu else 1), step=0.5,
                  precision="auto" if gpu else "fp32")
    options = OutputOptions(statistics=False)
    case = discover([path])[0]
    name = case.case_id
    stages: dict[str, dict[str, list[float]]] = {"uniseg": defaultdict(list), "nnU-Net v2": defaultdict(list)}

    def ours() -> Any:
        clock: dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        loaded = read_case(case)
        clock["read"] = time.perf_counter() - start
        with stage_clock(clock):
            result = common.run_case(loaded, [task], net, tmp_dir / "uniseg" / name, outputs=options, **engine)
        for stage, seconds in clock.items():
            stages["uniseg"][stage].append(seconds)
        return result

    def nnunet() -> Path:
        clock: dict[str, float] = {}
        rw = NibabelIOWithReorient()
        t0 = time.perf_counter()
        data, props = rw.read_images([str(path)])
        t1 = time.perf_counter()
        with common.quiet():
            data, _, props = DefaultPreprocessor(verbose=False).run_case_npy(
                data, None, props, manager, configuration, dataset_json)
        t2 = time.perf_counter()
        with common.quiet():
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).cpu()
        common.sync(device)
        t3 = time.perf_counter()
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, manager, configuration, label_manager, props, num_threads_torch=threads)
        t4 = time.perf_counter()
        out = tmp_dir / "nnunet" / f"{name}.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        rw.write_seg(seg, str(out), props)
        t5 = time.perf_counter()
        clock.update(read=t1 - t0, preprocess=t2 - t1, windows=t3 - t2, export=t4 - t3, write=t5 - t4)
        for stage, seconds in clock.items():
            stages["nnU-Net v2"][stage].append(seconds)
        return out

    scan_shape = nib.load(str(path)).shape
    loaded = read_case(case)
    bbox = nonzero_bbox(loaded.scan.data)
    from unisegcli.preprocessing.resample import compute_new_shape

    grid = compute_new_shape([hi - lo for lo, hi in bbox], loaded.scan.spacing_mm, task.spacing_mm)
    windows = _count_windows(grid, patch, 0.5)
    del loaded
    print(f"\n== {name}: file shape {scan_shape}, network grid {grid}, {windows} windows", flush=True)

    # warm-up, excluded: whole runs for the small network (and on a GPU); for the full size
    # on a CPU one forward of the network (a whole run takes minutes there)
    if net.config.patch_size != common.network_config("full").patch_size or gpu:
        ours()
        nnunet()
    else:
        with torch.inference_mode():
            net(torch.zeros(1, 1, *patch, device=device), task.index)
    for side in stages.values():
        side.clear()
    kept: dict[str, Any] = {}
    times = common.alternate({"uniseg": ours, "nnU-Net v2": nnunet}, args.repeat, device,
                             keep=lambda n, r: kept.__setitem__(n, r))
    med = {k: common.median(v) for k, v in times.items()}

    # agreement, in the file's voxel order: our per-structure masks vs nnU-Net's label file
    theirs = np.asarray(nib.load(str(kept["nnU-Net v2"])).dataobj)
    ours_labels = np.zeros(theirs.shape, dtype=np.uint8)
    for index in sorted(task.labels):
        mask_path = kept["uniseg"].masks.get(task.labels[index])
        if mask_path is not None:
            ours_labels[np.asarray(nib.load(str(mask_path)).dataobj) > 0] = index
    agreement = float((ours_labels == theirs).mean())
    v2_labels = v2_semantics_labels(case, task, net, patch, engine, device, len(labels))
    agreement_v2 = float((v2_labels == theirs).mean())
    return {
        "input": name,
        "file_shape": list(scan_shape),
        "network_grid_zyx": list(grid),
        "windows": windows,
        "nnunet_perform_everything_on_device": on_device,
        "seconds": times,
        "median_s": med,
        "speedup_vs_nnunet": med["nnU-Net v2"] / med["uniseg"],
        "stages_median_s": {side: {s: common.median(v) for s, v in per.items()} for side, per in stages.items()},
        "argmax_agreement": agreement,
        "argmax_agreement_v2_semantics": agreement_v2,
        "foreground_voxels": {"uniseg": int((ours_labels > 0).sum()), "nnU-Net v2": int((theirs > 0).sum())},
    }


def v2_semantics_labels(case: Any, task: Any, net: Any, patch: tuple[int, int, int], engine: dict[str, Any],
                        device: Any, channels: int) -> np.ndarray:
    """Our library's stages in nnU-Net v2's order (normalise, then resample; blend logits),
    untimed: label map in the file's voxel order. Agreement with nnU-Net here checks the
    implementation; agreement of the `uniseg` path also includes the v1/v2 differences."""
    from unisegcli.inference.engine import Head, sliding_window
    from unisegcli.io.cases import read_case
    from unisegcli.postprocessing.restore import restore_label_map
    from unisegcli.preprocessing import preprocess_volume

    loaded = read_case(case)
    scheme = task.normalization[task.channels[0]]
    x, trace = preprocess_volume(loaded.scan.data, loaded.scan.spacing_mm, task.spacing_mm, [scheme],
                                 device, normalize_first=True)
    (logits,) = sliding_window(x, net, patch, heads=[Head(task.index, channels)], step=0.5,
                               batch_size=engine["batch_size"], precision=engine["precision"], activation=None)
    return loaded.scan.reorientation.to_file(restore_label_map(logits, trace))


if __name__ == "__main__":
    main()
