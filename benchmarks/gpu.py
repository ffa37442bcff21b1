"""One prepared GPU run, under 8 minutes on one CUDA GPU: our engine against nnU-Net v2's
predictor, batch sizes, accumulators on the GPU or in host memory, and UniSeg's 7 CT tasks in
one pass over a 512x512x300 CT, file in -> masks out.

Parts, in this order (random-weight full-size UniSeg network, one object for all parts):

1. engine: our sliding window (fp16 autocast, --batch-size windows per forward, float32
   accumulators) vs nnU-Net v2's ``nnUNetPredictor.predict_sliding_window_return_logits``
   (which autocasts to fp16 by itself on CUDA; perform_everything_on_device=True), the same
   network object (liver head, 3 channels), the same normalised 128x256x256 volume, step 0.5,
   Gaussian, no mirroring; argmax agreement overall and where the summed window weight is
   >= 1e-3 (nnU-Net accumulates in float16, coarse at the rim).
2. batch sizes 1, 2, 4, 8: our engine on the same volume; outputs compared with batch 1.
3. accumulators on the GPU vs in host memory (``accumulator_device="cpu"``, pinned staging).
4. 7 CT tasks in one pass: a synthetic 512x512x300 CT at 0.8x0.8x1.5 mm (x, y, z) written
   as NIfTI, then read -> preprocess -> windows -> restore -> write masks through
   ``Segmenter`` (fp16, batch size by the product's policy), with per-stage seconds.

Parts 1-3 time a warm-up round (excluded) and then up to --repeat rotating rounds (medians).
Every timing has ``torch.cuda.synchronize`` before and after; every measurement reports its
peak GPU memory (``torch.cuda.max_memory_allocated``, reset before it) and the share of its
wall time spent inside the network's forward (``encode``/``decode`` bracketed by CUDA events
and summed on the GPU's clock; on the CPU by the wall clock). A budget guard (--budget-s,
default 450 s counted from the start of the process) estimates each part and each round from
what was measured before it and skips what would overrun, recording the skip in the JSON.

    .venv/bin/python benchmarks/gpu.py --device cuda             # one GPU; the budget keeps it under 8 min
    .venv/bin/python benchmarks/gpu.py --device cuda --small     # toy sizes
    .venv/bin/python benchmarks/gpu.py --device cpu --small      # the same code on the CPU, seconds (tests)

Writes benchmarks/results/gpu[_small][_cuda].json; the headline is the last line.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts the imports too

from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

import common  # noqa: E402
import gpu_parts  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    network: str  # common.network_config size
    volume_zyx: tuple[int, int, int]  # parts 1-3: the normalised synthetic volume
    ct_zyx: tuple[int, int, int]  # part 4: the CT file, (z, y, x) voxels
    batch_sizes: tuple[int, ...]
    outside_network_s: float  # part 4's time outside the network, for the budget's estimate


FULL = Sizes("full", (128, 256, 256), (300, 512, 512), (1, 2, 4, 8), 120.0)
SMALL = Sizes("toy", (24, 96, 96), (48, 96, 96), (1, 2, 4, 8), 20.0)
CT_SPACING_ZYX = (1.5, 0.8, 0.8)
CT_TASKS = ["liver", "kidney", "hepatic_vessel", "pancreas", "colon_tumor", "lung_tumor", "spleen"]
TASK_INDEX, TASK_CHANNELS = 0, 3  # liver: background, liver, liver tumour
CLIP_HU = (-325.0, 325.0)  # UniSeg's CT normalisation (ct_clip_scale)
ENCODER_SHARE = 0.26  # of one task's FLOPs (full size; multitask_scaling.py)


class Budget:
    """Wall seconds left of --budget-s since the process started; skips are recorded."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = float(limit_s)
        self.skipped: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - STARTED

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def allows(self, what: str, estimate_s: float) -> bool:
        """True when ``estimate_s`` fits in what is left; otherwise record ``what`` as skipped."""
        if estimate_s <= self.left():
            return True
        self.skipped.append({"what": what, "estimate_s": round(estimate_s, 2), "left_s": round(self.left(), 2),
                             "reason": "would overrun the budget"})
        return False


@dataclass
class Bench:
    """What every part shares: device, network, volume, settings, budget, the network's speed."""

    device: Any
    net: Any
    patch: tuple[int, int, int]
    volume: Any  # float32 [1, Z, Y, X] on the device, normalised
    windows: int  # windows of ``volume`` at step 0.5
    sizes: Sizes
    repeat: int
    batch: int
    budget: Budget
    window_s: float  # one window, one task, batch 1: the estimates' unit
    parts: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def ours(self, batch: int, accumulator_device: str | None = None) -> Callable[[], Any]:
        from unisegcli.inference.engine import Head, sliding_window

        def run() -> Any:
            (logits,) = sliding_window(self.volume, self.net, self.patch, heads=[Head(TASK_INDEX, TASK_CHANNELS)],
                                       step=0.5, batch_size=batch, precision="fp16", accumulation="fp32",
                                       accumulator_device=accumulator_device)
            return logits

        return run


def part_engine(bench: Bench) -> dict[str, Any]:
    """Part 1: our engine vs nnU-Net v2's predictor, same network object and volume."""
    plans, _ = common.nnunet_plans(bench.patch, (3.0, 1.5, 1.5), CLIP_HU)
    dataset_json = common.nnunet_dataset_json(["background", "liver", "liver_tumor"])
    module = common.single_task_module(bench.net, TASK_INDEX, TASK_CHANNELS)
    predictor, on_device = common.nnunet_predictor(module, plans, dataset_json, bench.device)

    def nnunet() -> Any:
        with common.quiet():
            return predictor.predict_sliding_window_return_logits(bench.volume)

    ours = f"uniseg engine, batch {bench.batch}"
    runs = {ours: bench.ours(bench.batch), "nnU-Net v2 predictor": nnunet}
    stats, outputs = gpu_parts.rotate(runs, bench, bench.windows, "engine vs nnU-Net")
    result = {"windows": bench.windows, "nnunet_perform_everything_on_device": on_device,
              "precision": "fp16 autocast" if bench.gpu else "fp32 (autocast is CUDA only)",
              "runs": stats}
    medians = [run["median_s"] for run in stats.values()]
    if len(outputs) == 2:
        result.update(gpu_parts.agreement(outputs[ours], outputs["nnU-Net v2 predictor"], bench.patch))
    if len(medians) == 2 and None not in medians:
        result["speedup_vs_nnunet"] = medians[1] / medians[0]
        bench.window_s = medians[0] / bench.windows  # a better unit for the later estimates
    return result


def part_batch_sizes(bench: Bench) -> dict[str, Any]:
    """Part 2: our engine at each batch size; outputs against batch 1."""
    runs = {f"batch {b}": bench.ours(b) for b in bench.sizes.batch_sizes}
    stats, outputs = gpu_parts.rotate(runs, bench, bench.windows, "batch sizes")
    ref = outputs.get(f"batch {bench.sizes.batch_sizes[0]}")
    for name, out in outputs.items():
        if ref is not None:
            stats[name]["max_abs_diff_vs_first"] = float((out - ref).abs().max())
            stats[name]["argmax_equal_vs_first"] = float((out.argmax(0) == ref.argmax(0)).float().mean())
    return {"windows": bench.windows, "runs": stats}


def part_accumulators(bench: Bench) -> dict[str, Any]:
    """Part 3: the blended outputs and weight sums on the network's device vs in host memory."""
    runs = {f"accumulators on the network's device ({bench.device.type})": bench.ours(bench.batch),
            "accumulators in host memory": bench.ours(bench.batch, accumulator_device="cpu")}
    stats, outputs = gpu_parts.rotate(runs, bench, bench.windows, "accumulators")
    result: dict[str, Any] = {"batch_size": bench.batch, "runs": stats,
                              "same_device": not bench.gpu}
    if len(outputs) == 2:
        first, second = outputs.values()
        result["max_abs_diff"] = float((first - second).abs().max())
    return result


def part_seven_tasks(bench: Bench) -> dict[str, Any]:
    """Part 4: UniSeg's 7 CT tasks in one pass over a CT file, read to masks written."""
    import tempfile
    from collections import defaultdict
    from pathlib import Path

    import torch
    from end_to_end import stage_clock

    from unisegcli.io.cases import read_case
    from unisegcli.io.discovery import discover
    from unisegcli.outputs.writer import OutputOptions
    from unisegcli.weights.resolver import get_model

    tasks = list(get_model("uniseg").resolve_tasks(CT_TASKS))
    grid = [round(n * s / t) for n, s, t in zip(bench.sizes.ct_zyx, CT_SPACING_ZYX, tasks[0].spacing_mm)]
    windows = bench.windows * float(np.prod(grid)) / float(np.prod(bench.sizes.volume_zyx))  # about
    estimate = windows * bench.window_s * (ENCODER_SHARE + (1 - ENCODER_SHARE) * len(tasks))
    estimate += bench.sizes.outside_network_s
    result: dict[str, Any] = {"tasks": [t.name for t in tasks], "ct_xyz": list(reversed(bench.sizes.ct_zyx)),
                              "ct_spacing_xyz_mm": list(reversed(CT_SPACING_ZYX)), "network_grid_zyx": grid,
                              "seconds": None}
    if not bench.budget.allows("7 CT tasks: the whole run", estimate):
        return result
    stages: dict[str, float] = defaultdict(float)
    with tempfile.TemporaryDirectory(prefix="uniseg-bench-gpu-") as tmp:
        started = time.perf_counter()
        path = common.write_nifti(Path(tmp) / "ct.nii.gz", common.synthetic_ct(bench.sizes.ct_zyx), CT_SPACING_ZYX)
        result["input_written_s"] = time.perf_counter() - started  # not part of the run

        def run() -> Any:
            started = time.perf_counter()
            loaded = read_case(discover([path])[0])
            stages["read"] += time.perf_counter() - started
            return common.run_case(loaded, tasks, bench.net, Path(tmp) / "out", device=bench.device,
                                   batch_size=None, step=0.5, precision="fp16", outputs=OutputOptions())

        with gpu_parts.ForwardClock(bench.net, bench.device) as clock, stage_clock(stages):
            stats, outputs = gpu_parts.measure(run, bench.device, clock)
        result["masks_written"] = sum(1 for p in outputs.masks.values() if p is not None and Path(p).is_file())
    result.update(stats)
    result["stages_s"] = dict(stages)
    result["stages_note"] = ("wall clock around each stage's Python call, read to write; on a GPU, work still "
                             "queued when a stage returns is counted in the next one")
    if bench.gpu:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    common.add_small(parser, "a 16x64x64-patch UniSeg with 4..32 features, a 24x96x96 volume, a 96x96x48 CT")
    parser.add_argument("--batch-size", type=int, default=4, help="our windows per forward in parts 1 and 3")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="wall seconds for the whole script (default 450: under 8 minutes with the "
                             "start-up and the results)")
    args = parser.parse_args()
    device = common.setup(args)
    machine = common.machine_record(device)
    sizes = SMALL if args.small else FULL
    budget = Budget(args.budget_s)
    bench = gpu_parts.prepare(Bench, sizes, device, args.repeat, args.batch_size, budget)
    if bench is not None:
        bench.parts["engine"] = part_engine(bench)
        bench.parts["batch_sizes"] = part_batch_sizes(bench)
        bench.parts["accumulators"] = part_accumulators(bench)
        bench.parts["seven_tasks"] = part_seven_tasks(bench)
    common.finish_record(machine)
    parts = bench.parts if bench is not None else {}
    gpu_parts.print_tables(machine, parts, budget)
    common.write_result(common.result_name("gpu", args, "small" if args.small else None), {
        "machine": machine,
        "settings": {"network": sizes.network, "volume_zyx": sizes.volume_zyx, "ct_zyx": sizes.ct_zyx,
                     "ct_spacing_zyx_mm": CT_SPACING_ZYX, "step": 0.5, "gaussian": True, "mirroring": False,
                     "batch_size": args.batch_size, "repeat": args.repeat, "budget_s": args.budget_s},
        "parts": parts,
        "skipped": budget.skipped,
        "elapsed_s": budget.elapsed(),
    })
    common.headline("gpu", gpu_parts.headline_text(machine, parts, budget))


if __name__ == "__main__":
    main()
