"""HermesUNet against the original Hermes code: state-dict layout and numerical parity.

Reference data (tests/data, copied from the shared fixtures): ``hermes_full_keys.json`` (keys
and shapes of the released Hermes-R network) and ``hermes_tiny/`` (the original
``Hermes_UNet`` with random weights, base width 8, mixed 3/1 kernels: a ``train.py``-style
checkpoint, inputs and the original code's outputs; its README gives the tolerances).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unisegcli.errors import CheckpointError
from unisegcli.weights.checkpoint import StateDictMismatchError
from unisegcli.models.hermes import HermesConfig, HermesUNet, load_hermes
from unisegcli.models.hermes.inference import axis_starts, hermes_windows, predict_volume

DATA = Path(__file__).parent / "data"
TINY = DATA / "hermes_tiny"
MANIFEST = json.loads((TINY / "manifest.json").read_text())
CASES = {case["id"]: case for case in MANIFEST["cases"]}
FORWARD = [c for c in CASES if CASES[c]["kind"] == "forward"]
TOL = MANIFEST["tolerance_hint"]  # seg 1e-2, modality 1e-4, probabilities 2e-3, rtol 0


@pytest.fixture(scope="module")
def tiny_net(single_thread) -> HermesUNet:
    return load_hermes(TINY / "best.pth")


def case_input(case_id: str) -> torch.Tensor:
    return torch.from_numpy(np.load(TINY / CASES[case_id]["input"]["file"]))


def run(net: HermesUNet, case_id: str, tasks=None, modality=None) -> tuple[torch.Tensor, torch.Tensor]:
    case = CASES[case_id]
    tasks = torch.tensor(case["tgt_idx"] if tasks is None else tasks, dtype=torch.int64)
    modality = torch.tensor(case["mod_idx"] if modality is None else modality, dtype=torch.int64)
    with torch.no_grad():
        return net(case_input(case_id), tasks, modality)


# -- layout --------------------------------------------------------------------------------


def upstream_keys(config: HermesConfig) -> dict[str, tuple[int, ...]]:
    """Hermes_UNet's state-dict keys and shapes spelled out from upstream's naming rules.

    Written independently of HermesUNet (HERMES_SPEC.md: key layout, widths, fusion table), so
    a configuration other than the fixtures' is checked against upstream's layout.
    """
    b = config.base_channels
    c = [b, 2 * b, 4 * b, 8 * b, 10 * b]
    k = config.kernel_sizes
    keys: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, cin: int, cout: int, kern) -> None:
        keys[f"{prefix}.conv1.conv.weight"] = (cout, cin, *kern)
        keys[f"{prefix}.conv2.conv.weight"] = (cout, cout, *kern)
        if cin != cout:
            keys[f"{prefix}.shortcut.conv.weight"] = (cout, cin, *kern)

    def fusion(name: str, d: int, blocks: int) -> None:
        inner = (d // 32) * 32
        keys[f"{name}.task_prior"] = (config.num_tasks + 1, d)
        keys[f"{name}.modality_prior"] = (config.num_modalities, 10, d)
        for i in range(blocks):
            p = f"{name}.attn_layers.{i}"
            for side in ("prior", "feat"):
                a = f"{p}.{side}_aggregate_block"
                for n in ("norm1", "norm2"):
                    keys[f"{a}.{n}.weight"] = (d,)
                    keys[f"{a}.{n}.bias"] = (d,)
                keys[f"{a}.fn.to_q.weight"] = (inner, d)
                keys[f"{a}.fn.to_kv.weight"] = (2 * inner, d)
                keys[f"{a}.fn.to_out.weight"] = (d, inner)
                keys[f"{a}.fn.to_out.bias"] = (d,)
                f = f"{p}.{side}_ffn"
                keys[f"{f}.norm.weight"] = (d,)
                keys[f"{f}.norm.bias"] = (d,)
                keys[f"{f}.fn.fc1.weight"] = (4 * d, d)
                keys[f"{f}.fn.fc1.bias"] = (4 * d,)
                keys[f"{f}.fn.fc2.weight"] = (d, 4 * d)
                keys[f"{f}.fn.fc2.bias"] = (d,)
        # upstream orders the two sides' keys per block: prior_aggregate, prior_ffn, feat_...
    keys["inc.conv1.weight"] = (b, config.in_channels, *k[0])
    block("inc.conv2", b, b, k[0])
    fusions = {2: ("prior_init_fuse_2", 0), 3: ("prior_init_fuse_3", 1), 4: ("prior_init_fuse_4", 2)}
    for n in range(1, 5):
        for j in range(config.down_blocks[n - 1]):
            block(f"down{n}.conv.{j + 1}", c[n - 1] if j == 0 else c[n], c[n], k[n])
        if n in fusions:
            name, i = fusions[n]
            fusion(name, c[n], config.fusion_blocks[i])
    for n in range(1, 5):
        level = 4 - n
        for j in range(config.up_blocks[n - 1]):
            block(f"up{n}.conv.{j}", c[level + 1] + c[level] if j == 0 else c[level], c[level], k[level])
        if n == 1:
            fusion("prior_fuse_5", c[3], config.fusion_blocks[3])
        if n == 2:
            fusion("prior_fuse_6", c[2], config.fusion_blocks[4])
    width = c[2] + c[3] + c[4] + c[3] + c[2]
    for head in ("out", "mod_out"):
        keys[f"{head}.norm.weight"] = (width,)
        keys[f"{head}.norm.bias"] = (width,)
    keys["out.classifier_pred.0.fc1.weight"] = (width, width)
    keys["out.classifier_pred.0.fc1.bias"] = (width,)
    keys["out.classifier_pred.0.fc2.weight"] = (b, width)
    keys["out.classifier_pred.0.fc2.bias"] = (b,)
    keys["out.classifier_pred.1.fc1.weight"] = (b, b)
    keys["out.classifier_pred.1.fc1.bias"] = (b,)
    keys["out.classifier_pred.1.fc2.weight"] = (b, b)
    keys["out.classifier_pred.1.fc2.bias"] = (b,)
    keys["mod_out.classifier.fc1.weight"] = (width, width)
    keys["mod_out.classifier.fc1.bias"] = (width,)
    keys["mod_out.classifier.fc2.weight"] = (config.num_modalities, width)
    keys["mod_out.classifier.fc2.bias"] = (config.num_modalities,)
    return keys


def meta_state(config: HermesConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = HermesUNet(config)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_full_size_manifest_equal_in_order():
    full = json.loads((DATA / "hermes_full_keys.json").read_text())
    ours = meta_state(HermesConfig())
    assert list(ours.items()) == [(k, tuple(s)) for k, s in full["keys"]]
    assert len(ours) == full["num_keys"] == 405
    total = sum(int(np.prod(s)) for s in ours.values())
    assert total == full["total_params"] == 60_884_998
    with torch.device("meta"):
        assert list(HermesUNet(HermesConfig()).buffers()) == []  # spec: no buffers


def test_fixture_keys_and_parameter_count():
    tiny = json.loads((TINY / "keys.json").read_text())
    config = HermesConfig(base_channels=8, kernel_sizes=((3, 3, 3), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)))
    ours = meta_state(config)
    assert list(ours.items()) == [(k, tuple(s)) for k, s in tiny["keys"]]
    assert sum(int(np.prod(s)) for s in ours.values()) == tiny["total_params"] == 1_470_534


@pytest.mark.parametrize("config", [
    HermesConfig(),
    HermesConfig(base_channels=16, kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 1, 3), (1, 1, 1), (3, 3, 3)),
                 fusion_blocks=(1, 3, 2, 1, 2), num_tasks=10, num_modalities=4),
    HermesConfig(base_channels=64, down_blocks=(1, 3, 2, 2), up_blocks=(3, 1, 2, 1), in_channels=2),
])
def test_other_configs_follow_upstream_naming(config):
    assert meta_state(config) == upstream_keys(config)


def test_config_read_back_from_weights():
    config = HermesConfig(base_channels=16, kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 1, 3), (1, 1, 1), (3, 3, 3)),
                          down_blocks=(1, 3, 2, 2), up_blocks=(3, 1, 2, 1), fusion_blocks=(1, 3, 2, 1, 2),
                          num_tasks=10, num_modalities=4)
    with torch.device("meta"):
        state = HermesUNet(config).state_dict()
    assert HermesConfig.from_state_dict(state) == config
    assert HermesConfig.from_dict(config.to_dict()) == config


# -- parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", FORWARD)
def test_forward_parity_with_original_code(tiny_net, case_id):
    seg, modality = run(tiny_net, case_id)
    expected_seg = torch.from_numpy(np.load(TINY / CASES[case_id]["expected_seg_logits"]["file"]))
    expected_mod = torch.from_numpy(np.load(TINY / CASES[case_id]["expected_mod_logits"]["file"]))
    assert seg.shape == expected_seg.shape and seg.dtype == torch.float32
    torch.testing.assert_close(seg, expected_seg, atol=TOL["seg_logits_atol"], rtol=0)
    torch.testing.assert_close(modality, expected_mod, atol=TOL["mod_logits_atol"], rtol=0)
    # masks agree except where the logit is within the tolerance of 0 (README)
    differ = (seg >= 0) != (expected_seg >= 0)
    assert bool((expected_seg[differ].abs() < TOL["seg_logits_atol"]).all())


def test_sliding_window_parity_with_original_code(tiny_net):
    case = CASES["autopet_pet_sliding_window"]
    window = case["window_size_zyx"]
    x = case_input(case["id"])[0]
    _, slices = hermes_windows(tuple(x.shape[1:]), window)
    # the manifest lists upstream's windows per axis (z, y, x), duplicates included
    per_axis = [sorted({(sl[a].start, sl[a].stop) for sl in slices}) for a in range(3)]
    assert per_axis == [sorted({tuple(w) for w in axis}) for axis in case["windows_zyx"]]
    assert len(slices) == np.prod([len(axis) for axis in case["windows_zyx"]])
    expected = torch.from_numpy(np.load(TINY / case["expected_probs"]["file"]))[0]
    for batch_size in (1, 3):
        probs = predict_volume(x, tiny_net, case["tgt_idx"][0], case["mod_idx"][0][0], window=window,
                               batch_size=batch_size)
        torch.testing.assert_close(probs, expected, atol=TOL["probs_atol"], rtol=0)


def test_window_starts_follow_upstream_rule():
    assert axis_starts(128, 128) == [0, 0]  # spec: size 128 gives two identical windows
    assert axis_starts(300, 128) == [0, 64, 128, 172]
    assert axis_starts(192, 128) == [0, 64, 64]
    padded, slices = hermes_windows((100, 200, 128), (128, 128, 128))
    assert padded == (128, 200, 128)  # short axes padded at the end only
    assert len(slices) == 2 * 3 * 2


def upstream_windows(size_dhw, window_dhw):
    """The window loop of yhygao/universal-medical-image-segmentation (033e16ae)
    ``inference/inference3d.py`` ``inference_sliding_window`` with its ``split_idx``, transcribed:
    pad short axes at the end, then i over D // half_d, j over H // half_h, k over W // half_w."""
    def split_idx(half_win, size, i):
        start_idx = half_win * i
        end_idx = start_idx + half_win * 2
        if end_idx > size:
            start_idx = size - half_win * 2
            end_idx = size
        return start_idx, end_idx

    D, H, W = (max(s, w) for s, w in zip(size_dhw, window_dhw))  # F.pad(img, (0, diff_W, 0, diff_H, 0, diff_D))
    half_d, half_h, half_w = (w // 2 for w in window_dhw)
    boxes = []
    for i in range(D // half_d):
        for j in range(H // half_h):
            for k in range(W // half_w):
                boxes.append((split_idx(half_d, D, i), split_idx(half_h, H, j), split_idx(half_w, W, k)))
    return (D, H, W), boxes


@pytest.mark.parametrize("size", [(128, 128, 128), (100, 200, 128), (300, 257, 191), (64, 500, 129), (600, 130, 255)])
def test_windows_are_upstreams_in_upstreams_order(size):
    """Issue 24: "128³ windows at stride 64 at upstream's positions", checked window for window
    (duplicates included) against upstream's loop."""
    padded, expected = upstream_windows(size, (128, 128, 128))
    ours_padded, slices = hermes_windows(size, (128, 128, 128))
    assert ours_padded == padded
    assert [tuple((s.start, s.stop) for s in sl) for sl in slices] == expected


class _PositionNet(torch.nn.Module):
    """net(x, tgt_idx, mod_idx) -> (seg [B, T, *window], mod): a fixed convolution, so window
    positions matter at window borders."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x, tgt_idx, mod_idx):
        return self.conv(x) * 4.0, None


def test_whole_volume_equals_upstreams_plain_mean():
    net = _PositionNet().eval()
    size, window = (21, 40, 13), (16, 16, 16)
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, *size)).astype(np.float32))
    padded, boxes = upstream_windows(size, window)
    image = torch.nn.functional.pad(x[None], (0, padded[2] - size[2], 0, padded[1] - size[1], 0, padded[0] - size[0]))
    total = torch.zeros((1, 2, *padded))
    counter = torch.zeros((1, 1, *padded))
    with torch.no_grad():
        for (d0, d1), (h0, h1), (w0, w1) in boxes:
            total[:, :, d0:d1, h0:h1, w0:w1] += torch.sigmoid(net(image[:, :, d0:d1, h0:h1, w0:w1], None, None)[0])
            counter[:, :, d0:d1, h0:h1, w0:w1] += 1
    expected = (total / counter)[0, :, :size[0], :size[1], :size[2]]
    ours = predict_volume(x, net, [0, -1], 0, window=window)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_minus_one_is_the_last_row(tiny_net):
    seg_a, mod_a = run(tiny_net, "lits_ct")
    seg_b, mod_b = run(tiny_net, "lits_ct", tasks=[[0, 1, 72]])
    assert torch.equal(seg_a, seg_b) and torch.equal(mod_a, mod_b)
    seg_c, _ = run(tiny_net, "amos_mr_unknown_modality", modality=[[5]])
    seg_d, _ = run(tiny_net, "amos_mr_unknown_modality")
    assert torch.equal(seg_c, seg_d)
    seg_e, _ = run(tiny_net, "lits_ct", tasks=[[0, 1, 71]])  # row 71 is another (unused) row
    assert (seg_e[:, :2] - seg_a[:, :2]).abs().max() > 1e-3


def test_outputs_depend_on_the_token_list(tiny_net):
    full, _ = run(tiny_net, "lits_ct")  # tokens [0, 1, -1]
    alone, _ = run(tiny_net, "lits_ct", tasks=[[1, -1]])
    expected = torch.from_numpy(np.load(TINY / CASES["lits_ct_tumor_only_same_input"]["expected_seg_logits"]["file"]))
    torch.testing.assert_close(alone, expected, atol=TOL["seg_logits_atol"], rtol=0)
    assert (full[:, 1] - alone[:, 0]).abs().max() > 1.0


def test_batch_items_are_independent(tiny_net):
    x = case_input("lits_ct")
    pair = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        seg, mod = tiny_net(pair, torch.tensor([[0, 1, -1], [9, 4, -1]]), torch.tensor([[0], [-1]]))
        alone, mod_alone = tiny_net(x.flip(-1), torch.tensor([[9, 4, -1]]), torch.tensor([[-1]]))
    torch.testing.assert_close(seg[1:], alone, atol=TOL["seg_logits_atol"], rtol=0)
    torch.testing.assert_close(mod[1:], mod_alone, atol=TOL["mod_logits_atol"], rtol=0)


def test_bad_index_shapes_are_refused(tiny_net):
    x = case_input("lits_ct")
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        tiny_net(x, torch.tensor([[0, -1]]), torch.tensor([0]))


# -- checkpoint selection --------------------------------------------------------------------


def test_ema_weights_are_preferred_and_fallbacks_work(tmp_path, single_thread):
    from unisegcli.weights.checkpoint import load_torch_file

    ckpt = load_torch_file(TINY / "best.pth")
    ema, plain = ckpt["ema_model_state_dict"], ckpt["model_state_dict"]
    expected = torch.from_numpy(np.load(TINY / CASES["lits_ct"]["expected_seg_logits"]["file"]))

    def seg_of(obj, name) -> torch.Tensor:
        torch.save(obj, tmp_path / name)
        net = load_hermes(tmp_path / name)
        return run(net, "lits_ct")[0]

    # EMA None -> model_state_dict (different outputs), bare dict, DataParallel prefix
    plain_seg = seg_of({"epoch": 1, "model_state_dict": plain, "ema_model_state_dict": None}, "plain.pth")
    assert (plain_seg - expected).abs().max() > 1.0
    torch.testing.assert_close(seg_of({k: v.clone() for k, v in ema.items()}, "bare.pth"), expected,
                               atol=TOL["seg_logits_atol"], rtol=0)
    prefixed = {f"module.{k}": v.clone() for k, v in ema.items()}
    torch.testing.assert_close(seg_of({"model_state_dict": plain, "ema_model_state_dict": prefixed}, "ddp.pth"),
                               expected, atol=TOL["seg_logits_atol"], rtol=0)


def test_safetensors_round_trip(tmp_path, tiny_net):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    net = load_hermes(tmp_path / "model.safetensors")
    assert torch.equal(run(net, "lits_ct")[0], run(tiny_net, "lits_ct")[0])


def test_checkpoint_errors_are_one_line(tmp_path):
    from unisegcli.weights.checkpoint import load_torch_file

    ema = load_torch_file(TINY / "best.pth")["ema_model_state_dict"]
    broken = {k: v for k, v in ema.items() if k != "out.norm.bias"}
    torch.save({"ema_model_state_dict": broken}, tmp_path / "missing.pth")
    with pytest.raises(StateDictMismatchError, match="missing keys.*out.norm.bias"):
        load_hermes(tmp_path / "missing.pth")
    torch.save({"epoch": 3, "optimizer_state_dict": {}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="holds no Hermes weights") as info:
        load_hermes(tmp_path / "empty.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hermes(tmp_path / "absent.pth")
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html>Google Drive - virus scan warning</html>")
    with pytest.raises(CheckpointError):
        load_hermes(tmp_path / "page.pth")


def test_hostile_pickle_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"ema_model_state_dict": {"x": Payload()}}, tmp_path / "evil.pth", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError):
        load_hermes(tmp_path / "evil.pth")
    assert not marker.exists()


def test_repeated_windows_run_once_and_count_as_often_as_upstream_visits_them():
    from unisegcli.models.hermes.inference import count_windows, unique_windows

    _, slices = hermes_windows((128, 192, 100), (128, 128, 128))
    assert len(slices) == 2 * 3 * 2
    windows = unique_windows(slices)
    assert len(windows) == count_windows((128, 192, 100)) == 1 * 2 * 1
    assert sorted(n for _, n in windows) == [4, 8]  # y starts [0, 64, 64]: the second window twice


def test_gaussian_blending_is_an_option_not_the_default(tiny_net):
    case = CASES["autopet_pet_sliding_window"]
    x = case_input(case["id"])[0]
    args = (x, tiny_net, case["tgt_idx"][0], case["mod_idx"][0][0])
    plain = predict_volume(*args, window=case["window_size_zyx"])
    weighted = predict_volume(*args, window=case["window_size_zyx"], gaussian=True)
    expected = torch.from_numpy(np.load(TINY / case["expected_probs"]["file"]))[0]
    torch.testing.assert_close(plain, expected, atol=TOL["probs_atol"], rtol=0)
    assert (weighted - expected).abs().max() > 10 * TOL["probs_atol"]
    assert float(weighted.min()) >= 0.0 and float(weighted.max()) <= 1.0


def test_keeping_some_channels_does_not_change_them(tiny_net):
    case = CASES["autopet_pet_sliding_window"]
    x = case_input(case["id"])[0]
    tokens = [64, 65, 66, -1]
    full = predict_volume(x, tiny_net, tokens, 4, window=case["window_size_zyx"])
    kept = predict_volume(x, tiny_net, tokens, 4, window=case["window_size_zyx"], keep=[2, 0])
    assert kept.shape[0] == 2
    assert torch.equal(kept[0], full[2]) and torch.equal(kept[1], full[0])


@pytest.mark.slow
def test_full_size_network_runs_a_released_window():
    """The released configuration (random weights) on one 128^3 window with AMOS CT's tokens."""
    torch.manual_seed(0)
    net = HermesUNet(HermesConfig()).eval()
    assert sum(p.numel() for p in net.parameters()) == 60_884_998
    tokens = torch.tensor([list(range(4, 19)) + [-1]])
    with torch.no_grad():
        seg, modality = net(torch.randn(1, 1, 128, 128, 128), tokens, torch.tensor([[0]]))
    assert seg.shape == (1, 16, 128, 128, 128) and modality.shape == (1, 6)
    assert bool(torch.isfinite(seg).all()) and bool(torch.isfinite(modality).all())


def test_upstream_constructor_arguments_map_to_our_config():
    released = HermesConfig.from_upstream(1, 32, scale=[[2, 2, 2]] * 4, kernel_size=[[3, 3, 3]] * 5,
                                          num_block=[2, 2, 2, 2], tn=72, mn=6)
    assert released == HermesConfig()
    construction = MANIFEST["construction"]  # the fixture's own get_model arguments
    tiny = HermesConfig.from_upstream(construction["in_chan"], construction["base_chan"],
                                      construction["down_scale"], construction["kernel_size"],
                                      construction["num_block"], construction["tn"], construction["mn"])
    assert meta_state(tiny) == {k: tuple(s) for k, s in json.loads((TINY / "keys.json").read_text())["keys"]}
    # upstream: up4 always has 2 blocks, up1..up3 mirror num_block[2], [1], [0]; ints are isotropic
    other = HermesConfig.from_upstream(1, 16, scale=[2, 2, [1, 2, 2], 2], kernel_size=[3, [1, 3, 3], 3, 1, 3],
                                       num_block=[1, 2, 3, 4])
    assert other.up_blocks == (3, 2, 1, 2) and other.down_scales[2] == (1, 2, 2)
    assert other.kernel_sizes[1] == (1, 3, 3) and other.kernel_sizes[3] == (1, 1, 1)
    state = meta_state(other)
    assert state["up1.conv.2.conv1.conv.weight"] == (128, 128, 1, 1, 1)  # up1: kernel_size[3]
    assert "up4.conv.1.conv2.conv.weight" in state and "up4.conv.2.conv1.conv.weight" not in state
    assert meta_state(other) == upstream_keys(other)


def test_anisotropic_pooling_config_runs_and_keeps_the_input_size():
    config = HermesConfig.from_upstream(1, 8, scale=[[1, 2, 2], 2, 2, 2], kernel_size=[[1, 3, 3], 3, 3, 1, 1])
    torch.manual_seed(0)
    net = HermesUNet(config).eval()
    with torch.no_grad():
        seg, mod = net(torch.randn(1, 1, 10, 36, 40), torch.tensor([[3, 7, -1]]), torch.tensor([[2]]))
    assert seg.shape == (1, 3, 10, 36, 40) and mod.shape == (1, 6)


class WindowMeanNet:
    """Stand-in network whose logits depend on the whole window (so tiling shows): every token
    channel = voxel value + window mean + token index / 10. Counts forwards."""

    def __init__(self):
        self.forwards = 0

    def __call__(self, x, tasks, modality):
        self.forwards += x.shape[0]
        base = x + x.mean(dim=(2, 3, 4), keepdim=True)
        seg = base.expand(-1, tasks.shape[1], -1, -1, -1) + tasks[:, :, None, None, None].float() / 10
        return seg, torch.zeros(x.shape[0], 6)


def test_deep_volumes_are_cut_into_equal_chunks(monkeypatch):
    from unisegcli.models.hermes import inference

    x = torch.randn(1, 25, 12, 12, generator=torch.Generator().manual_seed(3))
    window = (4, 8, 8)
    net = WindowMeanNet()
    whole = predict_volume(x, net, [2, -1], 0, window=window)  # 25 < 600: one chunk
    assert net.forwards == inference.count_windows((25, 12, 12), window)
    monkeypatch.setattr(inference, "MAX_DEPTH", 10)
    assert inference._chunks(25) == [(0, 9), (9, 18), (18, 25)]  # n = ceil(25/10) = 3 of ceil(25/3) = 9
    chunked_net = WindowMeanNet()
    chunked = predict_volume(x, chunked_net, [2, -1], 0, window=window)
    assert chunked_net.forwards == inference.count_windows((25, 12, 12), window)
    monkeypatch.setattr(inference, "MAX_DEPTH", 600)
    parts = [predict_volume(x[:, lo:hi], WindowMeanNet(), [2, -1], 0, window=window) for lo, hi in [(0, 9), (9, 18), (18, 25)]]
    torch.testing.assert_close(chunked, torch.cat(parts, dim=1), atol=0, rtol=0)
    assert (chunked - whole).abs().max() > 1e-3
