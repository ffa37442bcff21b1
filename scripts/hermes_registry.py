"""Write the Hermes task set and model entry into ``unisegcli/weights_registry.json``.

The table below is HERMES_SPEC.md's task index map (upstream
``training/dataset/dim3/dataset_config.py`` ``dataset_lab_map`` / ``dataset_modality_map``,
yhygao/universal-medical-image-segmentation @ 033e16ae). Run once after editing it:

    python scripts/hermes_registry.py

The entries are (re)placed at the end of ``task_sets`` and ``models``; everything else in the
file is left byte for byte (the file is json.dumps(indent=2, ensure_ascii=False) text).
"""

from __future__ import annotations

import json
from pathlib import Path

REGISTRY = Path(__file__).resolve().parents[1] / "unisegcli" / "weights_registry.json"
TASK_SET = "hermes71"

AMOS = ["spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
        "inferior_vena_cava", "pancreas", "right_adrenal_gland", "left_adrenal_gland", "duodenum", "bladder",
        "prostate_uterus"]
BCV = ["spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
       "inferior_vena_cava", "portal_and_splenic_vein", "pancreas", "right_adrenal_gland", "left_adrenal_gland"]
HEAD = ["brain_stem", "left_eye", "right_eye", "left_lens", "right_lens", "left_optic_nerve", "right_optic_nerve",
        "optic_chiasm", "left_temporal_lobe", "right_temporal_lobe", "pituitary", "left_parotid", "right_parotid",
        "left_inner_ear", "right_inner_ear", "left_middle_ear", "right_middle_ear", "left_tmj", "right_tmj",
        "spinal_cord", "left_mandible", "right_mandible"]

CT = ("CT", "ct", {"scheme": "hermes_ct", "clip_hu": [-991.0, 500.0]})
MR = ("MR", "mr", {"scheme": "hermes_percentile", "percentiles": [2.0, 98.0]})
PET = ("PET", "pet", {"scheme": "hermes_percentile", "percentiles": [2.0, 98.0]})
XY_THEN_Z = "xy_bspline_z_nearest"  # x, y to 1.5 mm (B-spline), then z to 1.5 mm (nearest)

# dataset, first index, structures, (modality, channel, normalisation), modality id, resampling
DATASETS = [
    ("lits", 0, ["liver", "liver_tumor"], CT, 0, XY_THEN_Z),
    ("kits", 2, ["kidney", "kidney_tumor"], CT, 0, XY_THEN_Z),
    ("amos_ct", 4, AMOS, CT, 0, XY_THEN_Z),
    ("amos_mr", 4, AMOS[:13], MR, -1, XY_THEN_Z),
    ("bcv", 19, BCV, CT, 0, XY_THEN_Z),
    ("structseg_oar", 32, ["left_lung", "right_lung", "heart", "esophagus", "trachea", "spinal_cord"], CT, 0,
     XY_THEN_Z),
    ("chaos", 38, ["liver", "right_kidney", "left_kidney", "spleen"], MR, 2, XY_THEN_Z),
    ("structseg_head_oar", 42, HEAD, CT, 0, XY_THEN_Z),
    ("mnm", 64, ["left_ventricle", "left_ventricular_myocardium", "right_ventricle"], MR, 4, XY_THEN_Z),
    ("brain_structure", 67, ["gray_matter", "white_matter", "csf"], MR, 2, "bspline_3d"),
    ("autopet", 70, ["fdg_avid_lesion"], PET, 1, "xy_bspline_keep_z"),
]
# Which dataset answers a bare structure name: CT multi-organ first (AMOS is the largest set).
DEFAULT_ORDER = ["amos_ct", "bcv", "lits", "kits", "structseg_oar", "structseg_head_oar", "autopet", "mnm",
                 "brain_structure", "amos_mr", "chaos"]
ALIASES = {"inferior_vena_cava": ["ivc", "postcava"], "left_ventricular_myocardium": ["myocardium"],
           "fdg_avid_lesion": ["lesion", "tumor_lesion"], "csf": ["cerebrospinal_fluid"],
           "gray_matter": ["grey_matter"], "prostate_uterus": ["prostate", "uterus"]}
DATASET_NOTES = {
    "lits": "LiTS: liver excludes the tumour (one-hot training labels)",
    "kits": "KiTS: kidney excludes the tumour (one-hot training labels)",
    "chaos": "CHAOS T1 in/out-phase (modality id 2; --modality t2 uses id 3, T2-SPIR)",
    "amos_mr": "AMOS MR (unknown MR sequence, modality row 5)",
}
MODEL = {
    "family": "hermes",
    "version": "1.0",
    "description": "Hermes-R (CVPR 2024, context-prior learning): one ResUNet with task and modality priors; "
                   "71 structures from 11 CT/MR/PET datasets (amos, bcv, lits, kits, structseg, chaos, M&Ms, "
                   "brain structure, autoPET), 1.5 mm, 128³ windows.",
    "license": "license: not specified by the authors (all rights reserved by default): the repository has no "
               "LICENSE file and grants no reuse or redistribution terms; uniseg never bundles or mirrors these "
               "weights, and the training datasets carry their own terms.",
    "citation": "Gao Y, Li Z, Liu D, Zhou M, Zhang S, Metaxas DN. Training Like a Medical Resident: Context-Prior "
                "Learning Toward Universal Medical Image Segmentation. CVPR 2024 (arXiv 2306.02416).",
    "note": "outputs validated against the original Hermes network code (parity tests), not against the published "
            "Dice table; a structure may exist in several datasets: `uniseg tasks --model hermes`",
    "task_set": TASK_SET,
    "network": {"window_zyx": [128, 128, 128], "spacing_mm": 1.5,
                "config": {"in_channels": 1, "base_channels": 32, "num_tasks": 72, "num_modalities": 6}},
    "files": [{
        "name": "hermes_r.pth",
        "role": "checkpoint",
        "urls": ["https://drive.google.com/uc?export=download&id=1s3Rc5zpgNz9FA2eqKBExaXQ_nsbAPMT8"],
        "sha256": None,
        "size_bytes": None,
    }],
    "source": "yhygao/universal-medical-image-segmentation @ 033e16ae, README 'Model Weights' (Hermes-R, Google "
              "Drive; mirror https://pan.baidu.com/s/1FDMRzE_8kvPUaPQXg6fkVQ code yjyh)",
}


def task_entries() -> list[dict]:
    defaults: dict[str, str] = {}
    for dataset in DEFAULT_ORDER:
        for name, _, structures, *_ in DATASETS:
            if name == dataset:
                for s in structures:
                    defaults.setdefault(s, dataset)
    entries = []
    for dataset, first, structures, (modality, channel, norm), modality_id, resampling in DATASETS:
        for offset, structure in enumerate(structures):
            name = f"{dataset}_{structure}"
            default = defaults[structure] == dataset
            extra = {"dataset": dataset, "structure": structure, "modality_id": modality_id,
                     "default": default, "resampling": resampling,
                     # the token list of every forward: the dataset's indices, then the null token
                     "dataset_indices": [first + i for i in range(len(structures))]}
            if dataset == "chaos":
                extra["modality_ids"] = {"t1": 2, "t2": 3}
            if dataset in DATASET_NOTES:
                extra["dataset_note"] = DATASET_NOTES[dataset]
            entries.append({
                "name": name,
                "index": first + offset,
                "aliases": ([structure] + ALIASES.get(structure, [])) if default else [],
                "modality": modality,
                "channels": [channel],
                "labels": {"1": structure if default else name},
                "spacing_mm": [1.5, 1.5, 1.5],
                "normalization": {channel: norm},
                "source": "yhygao/universal-medical-image-segmentation @ 033e16ae dataset_config.py",
                "extra": extra,
            })
    return entries


def main() -> None:
    text = REGISTRY.read_text(encoding="utf-8")
    data = json.loads(text)
    data["task_sets"].pop(TASK_SET, None)
    data["models"].pop("hermes", None)
    data["task_sets"][TASK_SET] = task_entries()
    data["models"]["hermes"] = MODEL
    REGISTRY.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{REGISTRY}: {len(data['task_sets'][TASK_SET])} Hermes task cards")


if __name__ == "__main__":
    main()
