#!/usr/bin/env python
"""Train ``uniseg-demo``: a small UniSeg network shipped inside the package for ``make demo``.

Demo only: it is trained on ONE scan (TotalSegmentator's Apache-2.0 example CT,
tests/data/example_ct.nii.gz, with its reference segmentation example_ct_seg.nii.gz, which is
itself a TotalSegmentator output) and is not for research or clinical use. It exists so that
the whole pipeline (orientation, crop, resampling, normalisation, sliding window, restore) can
be seen working offline on real code: the network class is the real ``UniSegNet``, with the
same prompt mechanism and task indices as the released model and its own small plans.

    .venv/bin/python scripts/train_demo.py --out out/uniseg-demo            # try it
    .venv/bin/python scripts/train_demo.py --out unisegcli/data/models/uniseg-demo/1.1 \\
        --update-registry                                                  # ship it
    .venv/bin/python scripts/evaluate_demo.py                              # held-back views

Training sees what inference sees: the scan goes through ``preprocess`` (the function
``predict_case`` calls) with the demo task cards from the registry, and patches of the plans'
patch size are drawn from that volume with foreground oversampling. Because there is one
scan, patches are augmented at random (``scripts/demo_augmentation.py``, nnU-Net v2 ranges):
scaling 0.7-1.4 (other patient sizes and spacings), in-plane rotation up to 15 degrees,
patches reaching past the scan's border into zero padding (other fields of view; the sliding
window pads with the same zeros), and noise, blur, brightness, contrast, low resolution and
gamma. Without it the 1.0 model lost most of the kidney and spleen on a larger field of view
of the same scan; ``scripts/evaluate_demo.py`` measures such held-back views. Each step
encodes a batch once and decodes it for all four task prompts; the loss per task is
cross-entropy + soft Dice over the task's first n_k = 2 output channels (nnU-Net's
DC_and_CE). At the end the written files are loaded with ``load_uniseg`` (the loader of the
official checkpoint) and the scan is segmented with ``predict_case``; Dice and volumes are
reported in the scan's own grid.

Reproducible: fixed seeds, ``torch.use_deterministic_algorithms(True)``, one thread by default
and flush-to-zero for denormals. The same machine, thread count and torch build give the same
tensors and metadata (two runs here: identical losses, tensors and metadata, yet different
file bytes, so compare tensors, not sha256); other CPUs (vector width) may differ in the
last bits, hence the Dice tolerance of the retraining test. ``--minutes`` stops early by wall
clock and is therefore not reproducible.
About 25 CPU minutes on one core (1,800 steps; 47 minutes of wall time on a busy shared
machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

# OpenMP threads busy-wait by default: when another process holds one of the two cores,
# every convolution waits for the descheduled thread and a step takes 10x longer. Passive
# waiting gives the same numbers. Set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # run from a checkout without installing; scripts/ helpers
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from unisegcli.models.uniseg.predictor import predict_case  # noqa: E402
from unisegcli.inference.tiling import padding_for_patch  # noqa: E402
from unisegcli.io.atomic import staged_files  # noqa: E402
from unisegcli.io.nifti import Scan, check_output_dir, read_scan  # noqa: E402
from unisegcli.weights.cards import REGISTRY_PATH, TaskCard  # noqa: E402
from unisegcli.weights.resolver import get_model  # noqa: E402
from unisegcli.weights.checkpoint import CONFIG_NAME, SAFETENSORS_NAME  # noqa: E402
from unisegcli.models.uniseg import UniSegConfig, UniSegNet, load_uniseg  # noqa: E402
from unisegcli.preprocessing import Trace, preprocess  # noqa: E402
from unisegcli.preprocessing.crop import crop_to_bbox  # noqa: E402
from unisegcli.preprocessing.resample import resample_to_shape  # noqa: E402
from demo_augmentation import NO_AUGMENTATION, AugmentationRanges, AugmentingPatchSampler  # noqa: E402

MODEL_NAME = "uniseg-demo"
LEARNING_RATE = 3e-3
SOURCE = "trained by scripts/train_demo.py"
NOTE = "demo only \u2014 trained on one scan, not for research or clinical use"
CT_PATH = ROOT / "tests" / "data" / "example_ct.nii.gz"
SEG_PATH = ROOT / "tests" / "data" / "example_ct_seg.nii.gz"

# TotalSegmentator ``class_map["total"]`` ids in example_ct_seg.nii.gz for each demo task
# (totalsegmentator/map_to_binary.py): 1 spleen, 2 kidney_right, 3 kidney_left, 5 liver,
# 7 pancreas. Both kidneys form UniSeg's one "kidney" organ class.
REFERENCE_LABELS: dict[str, tuple[int, ...]] = {
    "liver": (5,),
    "kidney": (2, 3),
    "pancreas": (7,),
    "spleen": (1,),
}
# How often each task's structure is the centre of a foreground patch: the small pancreas
# (644 voxels against the liver's 38634) is drawn most.
FOREGROUND_WEIGHTS = {"liver": 0.15, "kidney": 0.25, "pancreas": 0.4, "spleen": 0.2}

# The demo plans: the released topology (5 poolings, 1x3x3 first conv, 2 convs per stage,
# 11 task prompts, 4 outputs), narrower and with a smaller patch. (16, 64, 64) keeps the
# prompt mechanism intact: prompt = patch // (16, 32, 32) = (1, 2, 2) = the bottleneck.
DEMO_CONFIG = UniSegConfig(
    patch_size=(16, 64, 64),
    base_num_features=8,
    max_num_features=48,
    pool_op_kernel_sizes=((1, 2, 2),) + ((2, 2, 2),) * 4,
    conv_kernel_sizes=((1, 3, 3),) + ((3, 3, 3),) * 5,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / MODEL_NAME,
                        help="folder for model.safetensors + config.json (default: out/uniseg-demo)")
    parser.add_argument("--epochs", type=int, default=72, help="epochs of --steps-per-epoch steps (default 72)")
    parser.add_argument("--steps-per-epoch", type=int, default=25, help="optimiser steps per epoch (default 25)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="also stop after this many minutes of training (not reproducible)")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2)")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE,
                        help=f"Adam learning rate, poly-decayed (default {LEARNING_RATE:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights init and patch sampling (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train without augmentation (to compare; not the shipped recipe)")
    parser.add_argument("--update-registry", action="store_true",
                        help="write the files' sha256/size and the network config into weights_registry.json")
    return parser.parse_args(argv)


def set_determinism(seed: int, threads: int) -> None:
    """Same seed + threads + machine -> same weights."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # A fixed float mode on every run; denormal arithmetic is also much slower on CPUs.
    torch.set_flush_denormal(True)


# -- data ---------------------------------------------------------------------------------


def demo_tasks() -> tuple[TaskCard, ...]:
    """The demo model's task cards, in REFERENCE_LABELS order (read from the registry)."""
    card = get_model(MODEL_NAME)
    return tuple(card.task(name) for name in REFERENCE_LABELS)


def reference_masks(seg: Scan) -> dict[str, np.ndarray]:
    """{task: bool [Z, Y, X]} from the reference label map, in internal orientation."""
    labels = seg.data[0]
    return {task: np.isin(labels, ids) for task, ids in REFERENCE_LABELS.items()}


def to_network_grid(mask_zyx: np.ndarray, trace: Trace) -> torch.Tensor:
    """A [Z, Y, X] mask in the scan's grid -> uint8 [z, y, x] in the network grid.

    Applies the trace's crop, then its resampling (linear on the binary mask, threshold 0.5,
    as nnU-Net resamples segmentations one label at a time).
    """
    mask = torch.from_numpy(mask_zyx[None].astype(np.float32))
    if trace.crop is not None:
        mask = crop_to_bbox(mask, trace.crop.bbox)
    step = trace.resample
    if step is not None:
        mask = resample_to_shape(
            mask, step.shape_after, step.spacing_before_mm, step.spacing_after_mm, order=1, order_z=0
        )
    return (mask[0] > 0.5).to(torch.uint8)


def load_case(tasks: Sequence[TaskCard]) -> tuple[Scan, dict[str, np.ndarray], torch.Tensor, torch.Tensor]:
    """Read the example CT and its reference; return (scan, reference masks, image, targets).

    image: float32 [1, z, y, x] = ``preprocess`` output (the network's input grid), zero-padded
    to at least the patch size exactly as the sliding window pads. targets: uint8 [T, z, y, x]
    (one binary map per task, REFERENCE_LABELS order), padded the same way.
    """
    scan, seg = read_scan(CT_PATH), read_scan(SEG_PATH)
    if seg.data.shape[1:] != scan.data.shape[1:] or not np.allclose(seg.image.affine, scan.image.affine):
        raise SystemExit(f"{SEG_PATH.name} does not share the geometry of {CT_PATH.name}")
    if len({(t.channels, t.spacing_mm, json.dumps(t.normalization, sort_keys=True)) for t in tasks}) != 1:
        raise SystemExit("the demo tasks must share channels, spacing and normalisation (one input grid)")
    image, trace = preprocess(scan.data, scan.spacing_mm, tasks[0], "cpu")
    masks = reference_masks(seg)
    targets = torch.stack([to_network_grid(masks[t.name], trace) for t in tasks])
    pads = padding_for_patch(image.shape[1:], DEMO_CONFIG.patch_size)
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]  # F.pad lists the last axis first
    return scan, masks, F.pad(image, flat, value=0.0), F.pad(targets, flat, value=0)


# -- training ----------------------------------------------------------------------------


def init_weights(module: torch.nn.Module) -> None:
    """nnU-Net v1 ``InitWeights_He(1e-2)``, as the UniSeg trainer initialises its network."""
    if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
        torch.nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def task_loss(logits: torch.Tensor, target: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """Cross-entropy + soft Dice (batch Dice, foreground only) on the first n_classes channels.

    logits: [B, K, *patch] network output; target: long [B, *patch] in 0..n_classes-1.
    """
    logits = logits[:, :n_classes]
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, n_classes).movedim(-1, 1)[:, 1:].float()
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    dice = (2 * intersection + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
    return ce + (1 - dice.mean())


def train(args: argparse.Namespace, tasks: Sequence[TaskCard], image: torch.Tensor,
          targets: torch.Tensor) -> UniSegNet:
    net = UniSegNet(DEMO_CONFIG)
    net.apply(init_weights)
    # channels-last 3-D layout: oneDNN's convolutions run ~15 % faster on CPU with it
    net = net.to(memory_format=torch.channels_last_3d).train()
    # No weight decay: with Adam, L2 drives every weight whose gradient is small to zero at
    # about lr per step, and the task prompts (small gradients early on) collapse to one.
    optimiser = torch.optim.Adam(net.parameters(), lr=args.lr)
    total = args.epochs * args.steps_per_epoch
    # poly schedule, as nnU-Net: lr * (1 - step / total) ** 0.9
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: (1 - s / total) ** 0.9)
    ranges = AugmentationRanges() if args.augment else NO_AUGMENTATION
    sampler = AugmentingPatchSampler(image, targets, DEMO_CONFIG.patch_size, np.random.default_rng(args.seed),
                                     [FOREGROUND_WEIGHTS[t.name] for t in tasks], ranges=ranges)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        losses = []
        for _ in range(args.steps_per_epoch):
            x, y = sampler.sample(args.batch_size)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            features = net.encode(x)  # one encoder pass, one decoder pass per task prompt
            loss = sum(task_loss(net.decode(features, t.index), y[:, k], t.num_classes)
                       for k, t in enumerate(tasks)) / len(tasks)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        minutes = (time.perf_counter() - started) / 60
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {np.mean(losses):.4f}  "
              f"lr {schedule.get_last_lr()[0]:.2e}  {minutes:5.1f} min", flush=True)
        if args.minutes is not None and minutes >= args.minutes:
            print(f"stopping after {minutes:.1f} min (--minutes): the result is not reproducible")
            break
    return net.eval()


# -- output -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_model(net: UniSegNet, out_dir: Path, metadata: dict[str, str]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` as ``convert_checkpoint`` does.

    Both files appear together or not at all. No time stamps.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    check_output_dir(out_dir)
    with staged_files(out_dir) as stage:
        save_file(tensors, str(stage(SAFETENSORS_NAME)), metadata=metadata)
        stage(CONFIG_NAME).write_text(json.dumps(net.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out_dir / SAFETENSORS_NAME


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    denominator = int(prediction.sum()) + int(reference.sum())
    return 1.0 if denominator == 0 else 2.0 * int(np.logical_and(prediction, reference).sum()) / denominator


def evaluate(checkpoint: Path, tasks: Sequence[TaskCard], scan: Scan,
             reference: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Segment the scan from the written files (official loader + predictor) and score it.

    Returns {task: {"dice", "volume_ml", "reference_ml"}} in the scan's own grid.
    """
    net = load_uniseg(checkpoint)
    labels = predict_case(scan.data, scan.spacing_mm, list(tasks), net, device="cpu", batch_size=2)
    voxel_ml = abs(float(np.linalg.det(scan.image.affine[:3, :3]))) / 1000.0
    scores = {}
    for task in tasks:
        predicted, truth = labels[task.name] == 1, reference[task.name]
        scores[task.name] = {
            "dice": dice(predicted, truth),
            "volume_ml": float(predicted.sum()) * voxel_ml,
            "reference_ml": float(truth.sum()) * voxel_ml,
        }
    return scores


def update_registry(out_dir: Path) -> None:
    """Record the files' sha256/size and the network config in the shipped registry."""
    data = json.loads(REGISTRY_PATH.read_text(encoding="utf-8"))
    entry = data["models"][MODEL_NAME]
    entry["network"] = DEMO_CONFIG.to_dict()
    for file in entry["files"]:
        path = out_dir / file["name"]
        file["sha256"], file["size_bytes"] = sha256_file(path), path.stat().st_size
    REGISTRY_PATH.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"updated {REGISTRY_PATH} (model '{MODEL_NAME}')")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    set_determinism(args.seed, args.threads)
    tasks = demo_tasks()
    scan, reference, image, targets = load_case(tasks)
    print(f"training {MODEL_NAME}: network grid {tuple(image.shape[1:])} (padded), patch "
          f"{DEMO_CONFIG.patch_size}, features {DEMO_CONFIG.stage_features}, tasks "
          + ", ".join(f"{t.name}={t.index}" for t in tasks), flush=True)
    started = time.perf_counter()
    net = train(args, tasks, image, targets)
    train_minutes = (time.perf_counter() - started) / 60
    metadata: dict[str, Any] = {
        "format": "pt",
        "family": "uniseg",
        "model": MODEL_NAME,
        "source": SOURCE,
        "note": NOTE,
        "training_data": f"{CT_PATH.name} + {SEG_PATH.name} (TotalSegmentator test files, Apache-2.0)",
        "seed": args.seed,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    checkpoint = save_model(net, args.out, {k: str(v) for k, v in metadata.items()})
    scores = evaluate(checkpoint, tasks, scan, reference)
    print(f"trained in {train_minutes:.1f} min; wrote {checkpoint} "
          f"({checkpoint.stat().st_size} bytes, sha256 {sha256_file(checkpoint)})")
    for name, s in scores.items():
        change = 100 * (s["volume_ml"] - s["reference_ml"]) / s["reference_ml"]
        print(f"  {name:9s} Dice {s['dice']:.4f}   volume {s['volume_ml']:8.1f} ml   "
              f"reference {s['reference_ml']:8.1f} ml   ({change:+.1f} %)")
    if args.update_registry:
        update_registry(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
