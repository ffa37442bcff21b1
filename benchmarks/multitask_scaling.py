"""K CT tasks in one sliding-window pass: time(K) / time(1), next to the floor e + (1 - e) K.

UniSeg's encoder (and prompt fusion) does not depend on the task, so our engine encodes each
window once and decodes it K times. If the encoder costs a share e of one task's FLOPs, K tasks
cannot cost less than e + (1 - e) K times one task: for the full-size network e = 0.26, the
issue's floor 0.26 + 0.74 K. Target: time(K) <= 1.05 x floor x time(1). The tasks are UniSeg's
7 CT tasks at 3 x 1.5 x 1.5 mm (liver, kidney, hepatic vessel, pancreas, colon, lung, spleen),
each head keeping its own channels, softmax blending as the pipeline does. The K values are
timed in rotating order; medians of --repeat.

For the record (how the original repository has to be used: one run per task), it also times
`predict_case` with all 7 tasks in one call vs seven single-task calls on the same scan
(network loaded once for both, so the seven calls are not even charged process start-up and
model loading).

    .venv/bin/python benchmarks/multitask_scaling.py           # small network (~4 min)
    .venv/bin/python benchmarks/multitask_scaling.py --full    # full-size network, one window (~40 min on 2 cores)
    .venv/bin/python benchmarks/multitask_scaling.py --full --ks 1 7 --no-record   # K = 1 and 7 only
    .venv/bin/python benchmarks/multitask_scaling.py --small   # small network, one 32x96x96 window, K = 1, 2, 4, 7

Writes benchmarks/results/multitask_scaling[_full|_small][_cuda].json; the headline is the last line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import common

CT_TASKS = ["liver", "kidney", "hepatic_vessel", "pancreas", "colon_tumor", "lung_tumor", "spleen"]
NOMINAL_ENCODER_SHARE = 0.26  # the full-size split


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size network on one 64x192x192 window")
    common.add_small(parser, "the small network on one 32x96x96 window (instead of three), K = 1, 2, 4, 7, "
                             "the 7-task record run once")
    parser.add_argument("--ks", type=int, nargs="+", default=None,
                        help="the K values to time (default 1..7, with --small 1 2 4 7; K=1 is always included)")
    parser.add_argument("--no-record", action="store_true", help="skip the 7-in-one vs 7-separate record")
    args = parser.parse_args()
    device = common.setup(args)
    machine = common.machine_record(device)
    gpu = common.on_gpu(device)

    import torch

    from unisegcli.inference.engine import Head, sliding_window
    from unisegcli.weights.resolver import get_model

    wanted = args.ks or ([1, 2, 4, 7] if args.small else list(range(1, 8)))
    ks = sorted({1, *(k for k in wanted if 1 <= k <= len(CT_TASKS))})
    tasks = list(get_model("uniseg").resolve_tasks(CT_TASKS))
    size = "full" if args.full else "small"
    config = common.network_config(size)
    net = common.random_network(config).to(device)
    patch = config.patch_size
    # one window for the full size and --small; three for the small network
    shape = patch if args.full or args.small else (patch[0], patch[1], 2 * patch[2])
    hu = common.synthetic_ct(shape)
    volume = torch.from_numpy(((np.clip(hu, -325, 325) + 325) / 650).astype(np.float32))[None].to(device)
    batch = 4 if gpu else 1
    precision = "fp16" if gpu else "fp32"

    flops = common.count_flops(net, torch.zeros(1, 1, *patch, device=device), [tasks[0].index])
    share = flops["encoder"] / (flops["encoder"] + flops["decoder"])
    print(f"{size} network, volume {tuple(shape)}: encoder {100 * share:.1f} % of one task's FLOPs", flush=True)

    def run_k(k: int) -> Any:
        heads = [Head(t.index, t.num_classes) for t in tasks[:k]]
        return sliding_window(volume, net, patch, heads=heads, step=0.5, batch_size=batch,
                              precision=precision, activation="softmax")

    run_k(1)  # warm-up (excluded)
    times = common.alternate({f"K={k}": (lambda k=k: run_k(k)) for k in ks}, args.repeat, device)
    t1 = common.median(times["K=1"])
    rows, per_k = [], []
    for k in ks:
        t = common.median(times[f"K={k}"])
        floor = share + (1 - share) * k
        nominal = NOMINAL_ENCODER_SHARE + (1 - NOMINAL_ENCODER_SHARE) * k
        ratio = t / t1
        per_k.append({"k": k, "median_s": t, "seconds": times[f"K={k}"], "ratio_to_one_task": ratio,
                      "floor_this_network": floor, "floor_nominal": nominal,
                      "ratio_over_floor": ratio / floor, "met": ratio <= 1.05 * floor})
        rows.append([k, t, ratio, floor, nominal, ratio / floor, common.verdict(ratio <= 1.05 * floor)])

    record = None
    if not args.no_record:
        # --small: the record once (it costs more than all K timings together)
        record = seven_tasks_record(net, tasks, shape, device, 1 if args.small else args.repeat, batch)
    common.finish_record(machine)

    print(f"\n{common.machine_line(machine)}")
    common.print_table(
        ["K", "median s", "t(K)/t(1)", f"floor {share:.2f}+{1 - share:.2f}K", "0.26+0.74K", "ratio/floor",
         "<= 1.05 floor"],
        rows, f"K tasks in one pass, {size} network (medians of {args.repeat})",
    )
    worst = max((p["ratio_over_floor"] for p in per_k if p["k"] > 1), default=1.0)
    print(f"worst t(K)/t(1) over its floor: {worst:.3f} (target <= 1.05): {common.verdict(worst <= 1.05)}")
    if record:
        print(f"\n7 CT tasks: one predict_case call {record['one_call_s']:.1f} s vs seven single-task calls "
              f"{record['seven_calls_s']:.1f} s: {record['speedup']:.2f}x faster in one call")
    variant = "full" if args.full else "small" if args.small else None
    common.write_result(common.result_name("multitask_scaling", args, variant), {
        "machine": machine,
        "settings": {"network": size, "volume_zyx": list(shape), "tasks": [t.name for t in tasks],
                     "encoder_share": share, "gflop_encoder": flops["encoder"] / 1e9,
                     "gflop_decoder_per_task": flops["decoder"] / 1e9, "repeat": args.repeat,
                     "batch_size": batch, "precision": precision},
        "per_k": per_k,
        "seven_tasks_one_call_vs_seven_calls": record,
        "targets": {"k_tasks_at_most_1.05x_floor": {"worst_ratio_over_floor": worst, "met": worst <= 1.05}},
    })
    seven = per_k[-1]
    text = (f"K={seven['k']} tasks {seven['ratio_to_one_task']:.2f}x one task = {seven['ratio_over_floor']:.2f}x "
            f"its floor; worst K {worst:.2f}x (target <= 1.05: {common.verdict(worst <= 1.05)})")
    if record:
        text += f"; 7 tasks in one call {record['speedup']:.2f}x faster than 7 calls"
    common.headline("multitask_scaling", text)


def seven_tasks_record(net: Any, tasks: list, shape: tuple, device: Any, repeat: int, batch: int) -> dict:
    """predict_case: 7 tasks in one call vs 7 calls of one task, on a synthetic CT at the tasks'
    spacing (no resampling), the same network in memory for both."""
    from unisegcli.models.uniseg.predictor import predict_case

    image = common.synthetic_ct(shape).astype(np.float32)[None]
    spacing = tasks[0].spacing_mm

    def one_call() -> Any:
        return predict_case(image, spacing, tasks, net, device=device, batch_size=batch)

    def seven_calls() -> Any:
        return {t.name: predict_case(image, spacing, [t], net, device=device, batch_size=batch)[t.name]
                for t in tasks}

    print("\n7 tasks in one call vs 7 single-task calls", flush=True)
    times = common.alternate({"one call": one_call, "seven calls": seven_calls}, repeat, device)
    one, seven = common.median(times["one call"]), common.median(times["seven calls"])
    return {"one_call_s": one, "seven_calls_s": seven, "speedup": seven / one, "seconds": times,
            "volume_zyx": list(shape), "note": "network loaded once for both; the original repository "
            "also pays process start-up and model loading per task"}


if __name__ == "__main__":
    main()
