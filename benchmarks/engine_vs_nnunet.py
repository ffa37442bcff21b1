"""Our sliding-window engine vs nnU-Net v2's predictor on the same UniSeg network and volume.

Both sides run the same random-weight UniSeg network for one task (liver: 3 output channels)
on the same normalised volume, in one process: step 0.5, Gaussian weighting, mirroring off,
fp32 on the CPU (fp16 autocast on a GPU, where nnU-Net autocasts by itself and our engine
gets --precision fp16 and a batch of 4 windows). nnU-Net calls the network as
``net(x)``: the wrapper runs ``net(x, task)[:, :3]``, the same encode + decode our engine runs.
Timed runs alternate (ours, nnU-Net, ours with the network as it was before its
optimisations (`common.baseline_network`), lone conv3d);
the warm-up is excluded; medians of --repeat runs are reported. FLOPs come from
``torch.utils.flop_counter``; the network's GFLOP/s is set next to a lone large conv3d's
(32 -> 32 channels, 3x3x3, one 64x192x192 window) measured in the same rotation.

    .venv/bin/python benchmarks/engine_vs_nnunet.py            # small network + one full-size window (~5 min)
    .venv/bin/python benchmarks/engine_vs_nnunet.py --small    # small network, 3 windows (~1 min)
    .venv/bin/python benchmarks/engine_vs_nnunet.py --full     # full size: 160x256x256 and the example CT (~1 h on 2 cores)
    .venv/bin/python benchmarks/engine_vs_nnunet.py --device cuda --full

Writes benchmarks/results/engine_vs_nnunet[_small|_full][_cuda].json; the headline is the last line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import common

TASK_INDEX, TASK_CHANNELS = 0, 3  # liver: background, liver, liver tumour
CLIP_HU = (-325.0, 325.0)  # UniSeg's CT normalisation (ct_clip_scale)
BEFORE = "uniseg, net before optimisation"


@dataclass(frozen=True)
class Case:
    name: str
    network: str  # common.network_config size
    volume: str  # "synthetic" or "example_ct"
    shape_zyx: tuple[int, int, int] | None = None  # synthetic only


SMALL = Case("small net, synthetic 64x160x160", "small", "synthetic", (64, 160, 160))
TOY = Case("small net, synthetic 32x96x192 (3 windows)", "small", "synthetic", (32, 96, 192))
ONE_WINDOW = Case("full net, synthetic 64x192x192 (1 window)", "full", "synthetic", (64, 192, 192))
FULL_SYNTH = Case("full net, synthetic 160x256x256", "full", "synthetic", (160, 256, 256))
FULL_EXAMPLE = Case("full net, example CT at 3x1.5x1.5 mm", "full", "example_ct")
CASES = {"small": SMALL, "toy": TOY, "one-window": ONE_WINDOW, "synthetic160": FULL_SYNTH, "example": FULL_EXAMPLE}


def load_volume(case: Case, device: Any) -> Any:
    """The normalised [1, Z, Y, X] float32 volume for ``case``, on ``device``."""
    import torch

    if case.volume == "synthetic":
        hu = torch.from_numpy(common.synthetic_ct(case.shape_zyx).astype(np.float32))[None]
        lo, hi = CLIP_HU
        return ((hu.clamp(lo, hi) - lo) / (hi - lo)).to(device)
    from unisegcli.io.nifti import read_scan
    from unisegcli.weights.resolver import get_model
    from unisegcli.preprocessing import preprocess

    scan = read_scan(common.EXAMPLE_CT)
    liver = get_model("uniseg").resolve_tasks("liver")[0]
    volume, _ = preprocess(scan.data, scan.spacing_mm, liver, device)
    return volume




def run_case(case: Case, args: Any, device: Any, conv_run: Any, conv_flops: float) -> dict[str, Any]:
    import torch

    from unisegcli.inference.engine import Head, sliding_window
    from unisegcli.inference.gaussian import summed_weight_numpy
    from unisegcli.inference.tiling import padding_for_patch, window_slices

    gpu = common.on_gpu(device)
    config = common.network_config(case.network)
    patch = config.patch_size
    net = common.optimised_layout(common.random_network(config).to(device), device)
    volume = load_volume(case, device)
    size = tuple(volume.shape[1:])
    padded = [n + lo + hi for n, (lo, hi) in zip(size, padding_for_patch(size, patch))]
    n_windows = len(window_slices(padded, patch, args.step))
    print(f"\n== {case.name}: volume {size}, patch {patch}, {n_windows} windows", flush=True)

    window = torch.zeros(1, 1, *patch, device=device)
    flops = common.count_flops(net, window, [TASK_INDEX])  # also the network's warm-up
    flops_per_window = flops["encoder"] + flops["decoder"]
    total_gflop = flops_per_window * n_windows / 1e9

    plans, _ = common.nnunet_plans(patch, (3.0, 1.5, 1.5), CLIP_HU)
    dataset_json = common.nnunet_dataset_json(["background", "liver", "liver_tumor"])
    module = common.single_task_module(net, TASK_INDEX, TASK_CHANNELS)
    predictor, on_device = common.nnunet_predictor(module, plans, dataset_json, device, args.step)
    batch = args.batch_size or (4 if gpu else 1)
    precision = "fp16" if gpu else "fp32"
    heads = [Head(TASK_INDEX, TASK_CHANNELS)]

    def ours(model: Any = net) -> Any:
        (logits,) = sliding_window(volume, model, patch, heads=heads, step=args.step, batch_size=batch,
                                   tta=False, precision=precision, accumulation="fp32")
        return logits

    def nnunet() -> Any:
        with common.quiet():
            return predictor.predict_sliding_window_return_logits(volume)

    runs = {"uniseg engine": ours, "nnU-Net v2 predictor": nnunet}
    if not args.no_baseline:
        before = common.baseline_network(net)
        runs[BEFORE] = lambda: ours(before)
    runs["lone conv3d"] = conv_run

    # warm-up, excluded: a whole run of each contestant for the small network; one window's
    # forward per network variant for the full size (one run there takes minutes on a CPU)
    with torch.inference_mode():
        if case.network == "small" or gpu:
            for run in runs.values():
                run()
        else:
            net(window, TASK_INDEX)
            if BEFORE in runs:
                before(window, TASK_INDEX)

    outputs: dict[str, Any] = {}

    def keep(name: str, result: Any) -> None:
        if name != "lone conv3d":
            outputs[name] = result.float().cpu()

    times = common.alternate(runs, args.repeat, device, keep)
    med = {name: common.median(t) for name, t in times.items()}
    ref = outputs["uniseg engine"]
    theirs = outputs["nnU-Net v2 predictor"]
    result: dict[str, Any] = {
        "case": case.name,
        "network": case.network,
        "volume_zyx": list(size),
        "patch_zyx": list(patch),
        "windows": n_windows,
        "step": args.step,
        "batch_size_uniseg": batch,
        "precision": "fp16 autocast" if gpu else "fp32",
        "nnunet_perform_everything_on_device": on_device,
        "gflop_per_window": flops_per_window / 1e9,
        "encoder_share": flops["encoder"] / flops_per_window,
        "gflop_total": total_gflop,
        "seconds": {k: times[k] for k in times},
        "median_s": med,
        "speedup_vs_nnunet": med["nnU-Net v2 predictor"] / med["uniseg engine"],
        "gflops_per_s": {k: total_gflop / med[k] for k in med if k != "lone conv3d"},
        "lone_conv_gflops_per_s": conv_flops / 1e9 / med["lone conv3d"],
        "max_abs_logit_diff_vs_nnunet": float((ref - theirs).abs().max()),
        "argmax_agreement_vs_nnunet": float((ref.argmax(0) == theirs.argmax(0)).float().mean()),
    }
    solid = torch.from_numpy(summed_weight_numpy(size, patch, args.step) >= 1e-3)
    diff = (ref - theirs).abs()
    agree = ref.argmax(0) == theirs.argmax(0)
    result["solid_fraction"] = float(solid.float().mean())
    result["max_abs_logit_diff_vs_nnunet_where_w_ge_1e-3"] = float(diff[:, solid].max())
    result["argmax_agreement_vs_nnunet_where_w_ge_1e-3"] = float(agree[solid].float().mean())
    if case.network == "small" and not gpu:
        # parity check, untimed: our engine in nnU-Net's float16-accumulation mode
        (half,) = sliding_window(volume, net, patch, heads=heads, step=args.step, batch_size=1,
                                 precision=precision, accumulation="fp16")
        result["max_abs_diff_fp16_mode_vs_nnunet"] = float((half.float().cpu() - theirs).abs().max())
    result["network_share_of_lone_conv"] = result["gflops_per_s"]["uniseg engine"] / result["lone_conv_gflops_per_s"]
    if BEFORE in outputs:
        old = outputs[BEFORE]
        result["network_optimisation_speedup"] = med[BEFORE] / med["uniseg engine"]
        result["before_share_of_lone_conv"] = result["gflops_per_s"][BEFORE] / result["lone_conv_gflops_per_s"]
        result["before_max_abs_logit_diff"] = float((old - ref).abs().max())
        result["before_argmax_agreement"] = float((old.argmax(0) == ref.argmax(0)).float().mean())
    return result


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    common.add_small(size, "only the small network, on a 32x96x192 volume (3 windows)")
    size.add_argument("--full", action="store_true", help="full-size network on 160x256x256 and the example CT")
    parser.add_argument("--step", type=float, default=0.5, help="window step as a fraction of the patch")
    parser.add_argument("--batch-size", type=int, default=None, help="our windows per forward (1 CPU, 4 GPU)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the contestant with the network as it was before its optimisations")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=None,
                        help="run these cases instead (overrides --small/--full)")
    args = parser.parse_args()
    device = common.setup(args)
    machine = common.machine_record(device)
    cases = [TOY] if args.small else [FULL_SYNTH, FULL_EXAMPLE] if args.full else [SMALL, ONE_WINDOW]
    if args.cases:
        cases = [CASES[name] for name in args.cases]
    conv_run, conv_flops = common.lone_conv(device)
    conv_run()  # warm-up
    results = [run_case(case, args, device, conv_run, conv_flops) for case in cases]
    common.finish_record(machine)

    print(f"\n{common.machine_line(machine)}")
    rows = []
    for r in results:
        med, gf = r["median_s"], r["gflops_per_s"]
        rows.append([
            r["case"], r["windows"], med["uniseg engine"], med["nnU-Net v2 predictor"], r["speedup_vs_nnunet"],
            f"{r['max_abs_logit_diff_vs_nnunet']:.3f} / {r['max_abs_logit_diff_vs_nnunet_where_w_ge_1e-3']:.4f}",
            f"{100 * r['argmax_agreement_vs_nnunet']:.3f} / {100 * r['argmax_agreement_vs_nnunet_where_w_ge_1e-3']:.3f}",
            gf["uniseg engine"], gf["nnU-Net v2 predictor"], r["lone_conv_gflops_per_s"],
            f"{100 * r['network_share_of_lone_conv']:.0f}%",
        ])
    common.print_table(
        ["case", "win", "ours s", "nnU-Net s", "speedup", "max|dlogit| all/solid", "argmax % all/solid",
         "ours GF/s",
         "nnU GF/s", "conv GF/s", "ours/conv"],
        rows, "engine vs nnU-Net v2 (medians)",
    )
    print("solid = voxels whose summed Gaussian weight is >= 1e-3; nnU-Net's float16 accumulation "
          "is coarse outside them (the rim)")
    for r in results:
        if "max_abs_diff_fp16_mode_vs_nnunet" in r:
            print(f"parity: our engine with accumulation='fp16' vs nnU-Net, max |d| = "
                  f"{r['max_abs_diff_fp16_mode_vs_nnunet']:.3g} ({r['case']})")
    compared = [r for r in results if "network_optimisation_speedup" in r]
    if compared:
        common.print_table(
            ["case", "before s", "now s", "speedup", "before GF/s", "before of conv", "max|dlogit|", "argmax %"],
            [[r["case"], r["median_s"][BEFORE], r["median_s"]["uniseg engine"], r["network_optimisation_speedup"],
              r["gflops_per_s"][BEFORE], f"{100 * r['before_share_of_lone_conv']:.0f}%",
              r["before_max_abs_logit_diff"], f"{100 * r['before_argmax_agreement']:.4f}"] for r in compared],
            "network optimisations (in-place instance norm; channels_last_3d for full size on the CPU): "
            "before vs now",
        )
    full = [r for r in results if r["network"] == "full"]
    targets = {}
    if full:
        share = min(r["network_share_of_lone_conv"] for r in full)
        targets["network_gflops_at_least_75pct_of_lone_conv"] = {"value": share, "met": share >= 0.75}
        print(f"network throughput {100 * share:.0f}% of a lone conv3d (target >= 75%): "
              f"{common.verdict(share >= 0.75)}")
    variant = "-".join(args.cases) if args.cases else "small" if args.small else "full" if args.full else None
    common.write_result(common.result_name("engine_vs_nnunet", args, variant), {
        "machine": machine,
        "settings": {"step": args.step, "gaussian": True, "mirroring": False, "repeat": args.repeat,
                     "task": "liver (3 channels)", "lone_conv": common.LONE_CONV},
        "cases": results,
        "targets": targets,
    })
    common.headline("engine_vs_nnunet", "; ".join(
        f"{r['case']}: ours {r['median_s']['uniseg engine']:.2f} s vs nnU-Net {r['median_s']['nnU-Net v2 predictor']:.2f} s"
        f" = {r['speedup_vs_nnunet']:.2f}x, argmax equal {100 * r['argmax_agreement_vs_nnunet']:.2f} % "
        f"({100 * r['argmax_agreement_vs_nnunet_where_w_ge_1e-3']:.2f} % where w >= 1e-3)" for r in results))


if __name__ == "__main__":
    main()
