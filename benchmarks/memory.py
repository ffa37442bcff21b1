"""Peak resident memory (RSS) of the whole pipeline on a 512x512x400 CT, on the CPU.

Each measurement runs in a fresh process (so the peak is its own): read -> preprocess ->
sliding window -> restore -> write masks and statistics (`run_case`, what `uniseg` does once
the network is loaded). A sampler thread reads /proc/self/statm every 5 ms and attributes the
RSS to the pipeline stage running; ``ru_maxrss`` gives the exact overall peak. Input: a
synthetic CT-like int16 NIfTI, 512 x 512 x 400 voxels at 0.8 x 0.8 x 1.0 mm, which the CT
tasks resample to 133 x 273 x 273 voxels (16 windows at step 0.5).

Measurements (default, ~6 min on 2 cores):
  standin, 1 task    the pipeline with a stand-in UniSeg network of the full patch size
                     (64x192x192) but 2..16 features: every array of the pipeline has its
                     real size; only the network's own activations are small. Its logits are
                     replaced by an intensity rule so the masks have an organ's size
                     (``OrganSizedOutput``: the synthetic liver, ~4 % of the voxels)
  standin, 1 task, LPS file   the same scan stored LPS (x, y flipped, as dcm2niix writes
                     most CTs): reorienting to the internal order then copies the volume
  standin, 7 tasks   the same with UniSeg's 7 CT tasks in one pass
  standin, 7 tasks, random masks   the random network's own masks (~50 % of all voxels
                     foreground): the worst case for the statistics
  full, 1 window     the full-size network's forward on one window alone: its activations
Estimate: the larger of (stand-in pipeline peak) and (stand-in peak in the window stage +
the full network's extra memory for one window).
With --before: the stand-in 7-task pipeline and the full network's window again as they ran
before the memory work (``use_previous_restore``, ``common.baseline_network``), to measure
what it saved.
With --real (--real-7): the full-size network (random weights, organ-sized masks) through
the whole pipeline, 1 task (the 7 CT tasks) (16 windows, ~8 min on 2 cores at step 0.5; --step 1: 12 windows, the same
memory).

    .venv/bin/python benchmarks/memory.py [--before] [--real] [--real-7] [--step 0.5]
    .venv/bin/python benchmarks/memory.py --small   # a 256x256x160 CT: stand-in 1 and 7 tasks, one full window

Writes benchmarks/results/memory[_real|_small].json; the headline is the last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import common

SHAPE_ZYX = (400, 512, 512)
SMALL_SHAPE_ZYX = (160, 256, 256)
SPACING_ZYX = (1.0, 0.8, 0.8)
TARGET_GB = 4.0
CT_TASKS = ["liver", "kidney", "hepatic_vessel", "pancreas", "colon_tumor", "lung_tumor", "spleen"]


class RssSampler(threading.Thread):
    """Samples this process's RSS; keeps the maximum per stage label."""

    def __init__(self, interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.stage = "start"
        self.peaks: dict[str, int] = {}
        self.running = True

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(self.interval_s)

    def sample(self) -> None:
        value = self.rss()
        if value > self.peaks.get(self.stage, 0):
            self.peaks[self.stage] = value

    @contextlib.contextmanager
    def during(self, stage: str) -> Iterator[None]:
        outer = self.stage
        self.sample()
        self.stage = stage
        try:
            yield
        finally:
            self.sample()
            self.stage = outer


def staged(sampler: RssSampler, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with sampler.during(stage):
            return fn(*args, **kwargs)

    return wrapper


class OrganSizedOutput:
    """A network wrapper that runs the real encoder and decoder, then replaces the logits by a
    rule on the window's intensities: class 1 where the HU is 90..200 (the synthetic CT's
    contrast-enhanced liver, ~1.7 L), background elsewhere. Masks and their statistics then
    have an organ's size; a random-weight network labels ~50 % of all voxels instead."""

    def __init__(self, net: Any) -> None:
        self.net = net
        self.config = net.config

    def encode(self, x: Any) -> Any:
        return self.net.encode(x), x

    def decode(self, features: Any, task_index: int) -> Any:
        import torch

        encoded, x = features
        out = self.net.decode(encoded, task_index)
        hu = x[:, :1].float() * 650.0 - 325.0  # undo UniSeg's ct_clip_scale (-325..325 HU)
        logits = torch.zeros_like(out)
        logits[:, 1:2] = torch.minimum(hu - 90.0, 200.0 - hu) / 10.0
        return logits


def use_previous_restore() -> None:
    """The restore and write stages as they were before the memory work (same numbers, bit
    for bit), to measure what it saved:

    1. ``resample.zoom_axis`` gathered each of the 2 (linear) or 4 (cubic) taps as a whole
       output-sized temporary (now: in slabs of 16 Mi elements);
    2. ``resample._clip`` allocated its result (now: clamps the fresh input in place);
    3. ``restore._argmax_resampled`` allocated ``torch.where``'s result for the running
       maximum (now: ``torch.maximum(..., out=)``);
    4. ``run_case`` built every structure's bool mask up front (now: ``LabelMasks`` computes
       each one on access).
    """
    import numpy as np
    import torch

    from unisegcli.outputs import masks as masks_module
    from unisegcli.postprocessing import restore
    from unisegcli.preprocessing import resample

    def zoom_axis(x: Any, axis: int, size: int, order: int, taps: Any = None) -> Any:
        if taps is not None:  # a window of rows (the slab export, newer than this): as now
            return previous_zoom(x, axis, size, order, taps)
        n = x.shape[axis]
        moved = x.movedim(axis, 0)
        rest = moved.shape[1:]
        lines = moved.reshape(n, -1)
        if order == 3:
            lines = resample._spline_coefficients(lines)
        idx_np, w_np = resample._taps(n, size, order)
        idx = torch.as_tensor(idx_np, device=x.device)
        w = torch.as_tensor(w_np, dtype=x.dtype, device=x.device)
        out = lines.index_select(0, idx[:, 0])
        if order > 0:
            out.mul_(w[:, :1])
            for t in range(1, idx.shape[1]):
                out.addcmul_(lines.index_select(0, idx[:, t]), w[:, t : t + 1])
        return out.reshape(size, *rest).movedim(0, axis)

    def clip(out: Any, bounds: Any) -> Any:
        return out.clamp(min=bounds[0], max=bounds[1])

    def argmax_resampled(scores: Any, steps: Any, compute_dtype: Any) -> Any:
        best_value = best_label = None
        for k in range(scores.shape[0]):
            channel = scores[k : k + 1]
            for step in steps:
                channel = restore.undo_resample(channel, step, compute_dtype=compute_dtype)
            channel = channel[0]
            if best_value is None:
                best_value = channel.clone()
                best_label = torch.zeros(channel.shape, dtype=torch.uint8, device=channel.device)
            else:
                better = channel > best_value
                best_value = torch.where(better, channel, best_value)
                best_label.masked_fill_(better, k)
        return best_label

    def eager_masks(label_maps: Any, where: Any) -> dict[str, np.ndarray]:
        return {name: label_maps[task] == label for name, (task, label) in where.items()}

    previous_zoom = resample.zoom_axis
    resample.zoom_axis = zoom_axis
    resample._clip = clip
    restore._argmax_resampled = argmax_resampled
    restore._label_map = lambda scores, steps, compute_dtype: argmax_resampled(scores, steps, compute_dtype).cpu().numpy()
    masks_module.LabelMasks = eager_masks


def child(scenario: str, input_path: Path, step: float, threads: int | None, device_name: str) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    sampler = RssSampler()
    sampler.start()
    with sampler.during("imports"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        import unisegcli.models.uniseg.predictor as predictor
        import unisegcli.outputs.writer as writer
        from unisegcli.inference.engine import resolve_device
        from unisegcli.io.cases import read_case
        from unisegcli.io.discovery import discover
        from unisegcli.weights.resolver import get_model
        from unisegcli.outputs.writer import OutputOptions
    device = resolve_device(device_name)
    from unisegcli.inference.host_memory import return_large_frees_to_os

    return_large_frees_to_os()  # as the `uniseg` command does at start-up
    size, what, masks, variant = (scenario.split(":") + ["random", "as-is"])[:4]
    with sampler.during("network"):
        net = common.random_network(common.network_config(size)).to(device)
        if variant == "before":
            net = common.baseline_network(net)
            use_previous_restore()
        else:
            common.optimised_layout(net, device)
    if masks == "organ":
        net = OrganSizedOutput(net)
    started = time.perf_counter()
    if what == "window":
        with sampler.during("windows"), torch.inference_mode():
            net(torch.zeros(1, 1, *net.config.patch_size, device=device), 0)
    else:
        tasks = get_model("uniseg").resolve_tasks(CT_TASKS[: int(what)])
        predictor.preprocess = staged(sampler, predictor.preprocess, "preprocess")
        predictor.sliding_window = staged(sampler, predictor.sliding_window, "windows")
        predictor.restore_label_map = staged(sampler, predictor.restore_label_map, "restore")
        writer.write_case_outputs = staged(sampler, writer.write_case_outputs, "write")
        case = discover([input_path])[0]
        with sampler.during("read"):
            loaded = read_case(case)
        with tempfile.TemporaryDirectory(prefix="uniseg-mem-") as out:
            with sampler.during("pipeline (other)"):
                result = common.run_case(loaded, tasks, net, Path(out), device=device, step=step, batch_size=1,
                                         precision="fp32", outputs=OutputOptions())
        voxel_ml = SPACING_ZYX[0] * SPACING_ZYX[1] * SPACING_ZYX[2] / 1000.0
        volumes = list(result.volumes_ml.values())
        foreground = sum(volumes) / max(1, len(volumes)) / (loaded.scan.data[0].size * voxel_ml)
    seconds = time.perf_counter() - started
    sampler.running = False
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result = {"peak_rss_bytes": peak, "stage_peak_rss_bytes": sampler.peaks, "seconds": seconds}
    if what != "window":
        result["mean_foreground_fraction_per_structure"] = foreground
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    print("RESULT " + json.dumps(result), flush=True)


def measure(scenario: str, input_path: Path, args: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", scenario, "--input", str(input_path), "--step", str(args.step),
           "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"measuring {scenario} ...", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{scenario} failed:\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"  peak {result['peak_rss_bytes'] / 1e9:.2f} GB in {result['seconds']:.0f} s", flush=True)
    return result


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also the full-size network through the pipeline")
    parser.add_argument("--real-7", action="store_true",
                        help="also the full-size network with the 7 CT tasks (~11 min at --step 1)")
    parser.add_argument("--step", type=float, default=0.5, help="window step (memory does not depend on it)")
    parser.add_argument("--before", action="store_true",
                        help="also measure the restore stage and network as they were before the memory work")
    common.add_small(parser, f"a {SMALL_SHAPE_ZYX[2]}x{SMALL_SHAPE_ZYX[1]}x{SMALL_SHAPE_ZYX[0]} CT; stand-in 1 and "
                             "7 tasks and one full-size window only")
    parser.add_argument("--child", default=None, help=argparse_hidden())
    parser.add_argument("--input", type=Path, default=None, help=argparse_hidden())
    args = parser.parse_args()
    if args.child:
        child(args.child, args.input, args.step, args.threads, args.device)
        return
    device = common.setup(args)
    machine = common.machine_record(device)
    shape = SMALL_SHAPE_ZYX if args.small else SHAPE_ZYX
    with tempfile.TemporaryDirectory(prefix="uniseg-mem-in-") as tmp:
        print(f"writing a synthetic {shape[2]}x{shape[1]}x{shape[0]} CT ...", flush=True)
        volume = common.synthetic_ct(shape)
        path = common.write_nifti(Path(tmp) / "ct.nii.gz", volume, SPACING_ZYX)
        lps_path = common.write_nifti(Path(tmp) / "ct_lps.nii.gz", volume, SPACING_ZYX, lps=True)
        del volume
        runs = {"standin, 1 task": measure("standin:1:organ", path, args)}
        if not args.small:
            runs["standin, 1 task, LPS file"] = measure("standin:1:organ", lps_path, args)
        runs["standin, 7 tasks"] = measure("standin:7:organ", path, args)
        if not args.small:
            runs["standin, 7 tasks, random masks"] = measure("standin:7:random", path, args)
        runs["full, 1 window"] = measure("full:window", path, args)
        if args.before:
            runs["standin, 7 tasks, before"] = measure("standin:7:organ:before", path, args)
            runs["full, 1 window, before"] = measure("full:window:random:before", path, args)
        if args.real:
            runs["full, 1 task"] = measure("full:1:organ", path, args)
        if args.real_7:
            runs["full, 7 tasks"] = measure("full:7:organ", path, args)
    common.finish_record(machine)

    base = runs["standin, 1 task"]
    window_extra = runs["full, 1 window"]["peak_rss_bytes"] - runs["full, 1 window"]["stage_peak_rss_bytes"].get(
        "network", 0)
    estimate = max(base["peak_rss_bytes"], base["stage_peak_rss_bytes"].get("windows", 0) + window_extra)
    stages = ["imports", "network", "read", "preprocess", "windows", "restore", "write"]
    print(f"\n{common.machine_line(machine)}")
    common.print_table(
        ["run", "peak GB", *stages, "fg %/structure", "seconds"],
        [[name, r["peak_rss_bytes"] / 1e9,
          *[r["stage_peak_rss_bytes"].get(s, 0) / 1e9 for s in stages],
          f"{100 * r['mean_foreground_fraction_per_structure']:.1f}" if "mean_foreground_fraction_per_structure" in r
          else "-", r["seconds"]]
         for name, r in runs.items()],
        f"peak RSS in GB (overall and per stage), {shape[2]}x{shape[1]}x{shape[0]} CT at {SPACING_ZYX} mm "
        "(z, y, x), CPU",
    )
    print(f"full network's extra memory for one window: {window_extra / 1e9:.2f} GB")
    lps_extra = None
    if "standin, 1 task, LPS file" in runs:
        lps_extra = runs["standin, 1 task, LPS file"]["peak_rss_bytes"] - base["peak_rss_bytes"]
        print(f"an LPS-stored file adds {lps_extra / 1e9:.2f} GB (the reoriented copy beside nibabel's cached "
              "float32 array)")
    savings = {}
    if "standin, 7 tasks, before" in runs:
        old, new = runs["standin, 7 tasks, before"], runs["standin, 7 tasks"]
        old_window = runs["full, 1 window, before"]
        savings = {
            "standin_7_tasks_peak_saving_bytes": old["peak_rss_bytes"] - new["peak_rss_bytes"],
            "restore_stage_saving_bytes": old["stage_peak_rss_bytes"]["restore"] - new["stage_peak_rss_bytes"]["restore"],
            "write_stage_saving_bytes": old["stage_peak_rss_bytes"]["write"] - new["stage_peak_rss_bytes"]["write"],
            "network_window_saving_bytes": (old_window["peak_rss_bytes"]
                                            - old_window["stage_peak_rss_bytes"].get("network", 0)) - window_extra,
        }
        print("memory work, 7 tasks (stand-in): peak {:.2f} -> {:.2f} GB; restore stage -{:.2f} GB, write stage "
              "-{:.2f} GB; full network window -{:.2f} GB".format(
                  old["peak_rss_bytes"] / 1e9, new["peak_rss_bytes"] / 1e9,
                  savings["restore_stage_saving_bytes"] / 1e9, savings["write_stage_saving_bytes"] / 1e9,
                  savings["network_window_saving_bytes"] / 1e9))
    print(f"estimated peak with the full network, 1 task: {estimate / 1e9:.2f} GB")
    measured = runs.get("full, 1 task", {}).get("peak_rss_bytes")
    one_task = measured or estimate
    seven = runs["standin, 7 tasks"]["peak_rss_bytes"]
    seven_measured = runs.get("full, 7 tasks", {}).get("peak_rss_bytes")
    seven_full = seven_measured or max(
        seven, runs["standin, 7 tasks"]["stage_peak_rss_bytes"].get("windows", 0) + window_extra)
    met = one_task <= TARGET_GB * 1e9
    print(f"peak RSS, full network, 1 task ({'measured' if measured else 'estimated'}): {one_task / 1e9:.2f} GB "
          f"<= {TARGET_GB} GB: {common.verdict(met)}")
    random_masks = runs.get("standin, 7 tasks, random masks", {}).get("peak_rss_bytes")
    print(f"7 tasks ({'measured' if seven_measured else 'estimated'} with the full network): "
          f"{seven_full / 1e9:.2f} GB" + ("" if random_masks is None else "; with random-weight masks (~50 % "
                                          f"foreground, worst case for statistics): {random_masks / 1e9:.2f} GB"))
    variant = "real" if args.real or args.real_7 else "small" if args.small else None
    grid = [round(n * s / t) for n, s, t in zip(shape, SPACING_ZYX, (3.0, 1.5, 1.5))]  # the CT tasks' spacing
    common.write_result(common.result_name("memory", args, variant), {
        "machine": machine,
        "settings": {"shape_zyx": shape, "spacing_zyx_mm": SPACING_ZYX, "step": args.step,
                     "network_grid_zyx": grid, "outputs": "masks + statistics"},
        "runs": runs,
        "full_network_window_extra_bytes": window_extra,
        "estimated_full_1task_peak_bytes": estimate,
        "estimated_full_7task_peak_bytes": seven_full,
        "lps_file_extra_bytes": lps_extra,
        "savings_vs_before": savings,
        "targets": {"peak_rss_at_most_4gb": {"full_1task_bytes": one_task, "measured": bool(measured),
                                             "met": met if shape == SHAPE_ZYX else None}},
    })
    where = f"{shape[2]}x{shape[1]}x{shape[0]}"
    common.headline("memory", f"peak RSS at {where}, full network: 1 task {one_task / 1e9:.2f} GB "
                    f"({'measured' if measured else 'estimated'}), 7 tasks {seven_full / 1e9:.2f} GB "
                    f"({'measured' if seven_measured else 'estimated'}); target <= {TARGET_GB} GB at 512x512x400: "
                    + (common.verdict(met) if shape == SHAPE_ZYX else "not measured at this size"))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
