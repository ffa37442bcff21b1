"""The sliding-window engine, tiling, Gaussian weights and the case predictor.

Networks here are small stand-ins (fixed convolutions, a tiny encode/decode module), never
the UniSeg network itself: the engine's contract is only [B, C, *patch] -> [B, K, *patch].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from unisegcli.errors import ChannelError, DeviceError, UsageError
from unisegcli.inference.engine import Head, mirror_combinations, resolve_device, sliding_window
from unisegcli.inference.gaussian import gaussian_importance, gaussian_map_numpy, summed_weight_numpy
from unisegcli.models.uniseg.predictor import predict_case
from unisegcli.inference.tiling import compute_steps, padding_for_patch, window_slices
from unisegcli.weights.cards import TaskCard

PATCH = (6, 8, 10)


pytestmark = pytest.mark.usefixtures("single_thread")


def conv_net(kernel: int, seed: int = 0, c_in: int = 2, c_out: int = 3) -> nn.Module:
    """A fixed convolution (zero padding) followed by tanh: a known function of the input."""
    torch.manual_seed(seed)
    conv = nn.Conv3d(c_in, c_out, kernel, padding=kernel // 2)
    return nn.Sequential(conv, nn.Tanh()).eval()


class TwoStage(nn.Module):
    """UniSeg-shaped stand-in: a task-independent encoder, a decoder conditioned on the task."""

    def __init__(self, num_tasks: int = 3, c_in: int = 1, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.enc = nn.Conv3d(c_in, 5, 3, padding=1)
        self.dec = nn.Conv3d(5, k, 1)
        self.prompt = nn.Parameter(torch.randn(num_tasks, k))
        self.encode_calls = 0
        self.decode_calls = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        return torch.relu(self.enc(x))

    def decode(self, features: torch.Tensor, task_index: int) -> torch.Tensor:
        self.decode_calls += 1
        return self.dec(features) * (1 + task_index) + self.prompt[task_index].view(1, -1, 1, 1, 1)

    def forward(self, x: torch.Tensor, task_index: int) -> torch.Tensor:
        return self.decode(self.encode(x), task_index)


def volume(shape, channels: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(channels, *shape)).astype(np.float32))


# ---------------------------------------------------------------- tiling and weights


def test_steps_follow_nnunet() -> None:
    assert compute_steps((110,), (64,), 0.5) == [[0, 23, 46]]  # nnU-Net's own docstring example
    # nnunetv2_tiny fixture: synth_lps [18, 34, 41] (8.5 rounds to 8) and padded realct [12, 48, 56]
    assert compute_steps((18, 34, 41), (12, 32, 24), 0.5) == [[0, 6], [0, 2], [0, 8, 17]]
    assert compute_steps((12, 48, 56), (12, 32, 24), 0.5) == [[0], [0, 16], [0, 11, 21, 32]]
    assert compute_steps((20,), (8,), 1.0) == [[0, 6, 12]]
    with pytest.raises(ValueError):
        compute_steps((5,), (8,), 0.5)


def test_padding_and_window_order() -> None:
    assert padding_for_patch((11, 48, 3), (12, 32, 8)) == [(0, 1), (0, 0), (2, 3)]
    slices = window_slices((12, 20, 10), (6, 10, 10), 0.5)
    starts = [tuple(s.start for s in sl) for sl in slices]
    assert starts == [
        (0, 0, 0),
        (0, 5, 0),
        (0, 10, 0),
        (3, 0, 0),
        (3, 5, 0),
        (3, 10, 0),
        (6, 0, 0),
        (6, 5, 0),
        (6, 10, 0),
    ]


def test_gaussian_importance_map() -> None:
    g = gaussian_importance((12, 32, 24))
    assert g.shape == (12, 32, 24) and g.dtype == torch.float32
    assert float(g.max()) == pytest.approx(10.0) and float(g[6, 16, 12]) == pytest.approx(10.0)
    assert gaussian_importance((12, 32, 24)) is g  # computed once per patch size
    torch.testing.assert_close(g[6 - 3, 16, 12], g[6 + 3, 16, 12])  # symmetric about patch // 2
    # corners underflow in float16; nnU-Net gives them the smallest non-zero weight
    raw = torch.from_numpy(gaussian_map_numpy((12, 32, 24)).copy()).half()
    assert bool((raw == 0).any())
    half = gaussian_importance((12, 32, 24), dtype=torch.float16)
    assert bool((half > 0).all()) and float(half.min()) == float(raw[raw > 0].min())
    # sigma = patch / 8: 16 voxels -> sigma 2, so two voxels from the centre weigh exp(-1/2)
    profile = gaussian_importance((16, 1, 1))[:, 0, 0] / 10.0
    assert float(profile[8 + 2]) == pytest.approx(math.exp(-0.5), rel=1e-6)


def test_mirror_combinations_order() -> None:
    assert mirror_combinations((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


# ---------------------------------------------------------------- known functions


@pytest.mark.parametrize(
    "shape",
    [(13, 17, 23), (6, 8, 10), (3, 5, 4), (9, 5, 31)],
    ids=["odd", "exactly_patch", "smaller_than_patch", "mixed"],
)
def test_pointwise_network_is_reproduced_exactly(shape) -> None:
    net = conv_net(1)
    vol = volume(shape)
    (out,) = sliding_window(vol, net, PATCH, step=0.5, batch_size=3)
    with torch.inference_mode():
        expected = net(vol[None])[0]
    assert out.shape == (3, *shape)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)




def _window_interior_mask(shape, patch, step, halo: int) -> np.ndarray:
    """Voxels that no window sees within ``halo`` voxels of one of its inner faces."""
    pads = padding_for_patch(shape, patch)
    padded = [n + lo + hi for n, (lo, hi) in zip(shape, pads)]
    bad = np.zeros(padded, dtype=bool)
    for sl in window_slices(padded, patch, step):
        shell = np.zeros(padded, dtype=bool)
        shell[sl] = True
        inner = [
            slice(s.start + (halo if s.start > 0 else 0), s.stop - (halo if s.stop < n else 0))
            for s, n in zip(sl, padded)
        ]
        shell[tuple(inner)] = False
        bad |= shell
    return ~bad[tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, shape))]


@pytest.mark.parametrize("shape", [(15, 19, 27), (4, 21, 7)], ids=["odd", "smaller_than_patch"])
def test_convolution_is_reproduced_away_from_window_borders(shape) -> None:
    net = conv_net(3)
    vol = volume(shape)
    (out,) = sliding_window(vol, net, PATCH, step=0.5, batch_size=2)
    with torch.inference_mode():
        expected = net(vol[None])[0]  # zero padding at the volume border = our zero padding
    mask = torch.from_numpy(_window_interior_mask(shape, PATCH, 0.5, halo=1))
    assert mask.float().mean() > 0.2
    torch.testing.assert_close(out[:, mask], expected[:, mask], rtol=1e-5, atol=1e-6)
    assert float((out - expected).abs().max()) > 1e-3  # window borders do differ: the mask matters


def test_batch_size_does_not_change_logits() -> None:
    net = conv_net(3)
    vol = volume((14, 19, 23))
    (one,) = sliding_window(vol, net, PATCH, batch_size=1)
    (four,) = sliding_window(vol, net, PATCH, batch_size=4)
    torch.testing.assert_close(one, four, rtol=1e-6, atol=1e-6)


def test_tta_averages_all_eight_flips() -> None:
    net = conv_net(3, c_in=1, c_out=2)
    vol = volume(PATCH, channels=1)  # one window: the blend is the window itself
    (out,) = sliding_window(vol, net, PATCH, tta=True)
    with torch.inference_mode():
        x = vol[None]
        flips = [[a + 2 for a in axes] for axes in mirror_combinations((0, 1, 2))]
        expected = sum(torch.flip(net(torch.flip(x, d)), d) for d in flips)[0] / 8
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (plain,) = sliding_window(vol, net, PATCH, tta=False)
    assert float((plain - out).abs().max()) > 1e-3


def test_shared_encoder_equals_running_each_task_alone() -> None:
    net = TwoStage()
    vol = volume((9, 13, 17), channels=1)
    n_windows = len(window_slices((9, 13, 17), PATCH, 0.5))
    heads = [Head(2, 3), Head(0, 2)]
    together = sliding_window(vol, net, PATCH, heads=heads, batch_size=2, tta=True)
    batches = math.ceil(n_windows / 2)
    assert net.encode_calls == batches * 8 and net.decode_calls == batches * 8 * 2
    for head, out in zip(heads, together):
        (alone,) = sliding_window(vol, net, PATCH, heads=[head], batch_size=2, tta=True)
        assert out.shape == (head.channels, 9, 13, 17)
        torch.testing.assert_close(out, alone, rtol=0, atol=0)
    (via_forward,) = sliding_window(
        vol, lambda x, t: net(x, t), PATCH, heads=[Head(2, 3)], batch_size=2, tta=True
    )
    torch.testing.assert_close(together[0], via_forward, rtol=0, atol=0)


def test_softmax_over_all_channels_then_first_n_k() -> None:
    """As UniSeg: softmax over all 4 outputs, then the task keeps its first n_k channels."""
    net = TwoStage()
    vol = volume(PATCH, channels=1)  # one window: the Gaussian weights cancel out
    (probs,) = sliding_window(vol, net, PATCH, heads=[Head(1, 2)], activation="softmax")
    with torch.no_grad():
        expected = torch.softmax(net(vol[None], 1), dim=1)[0, :2]
    assert probs.shape[0] == 2
    torch.testing.assert_close(probs, expected)
    assert float(probs.sum(0).max()) < 1.0  # the other two channels keep some mass


def test_sigmoid_without_gaussian_is_the_plain_mean_of_window_probabilities() -> None:
    """Multi-label blending (Hermes): sigmoid per window, every window weighted equally."""
    net = conv_net(3, c_in=1, c_out=2)
    vol = volume((6, 8, 15), channels=1)  # two windows along x, overlapping on x 5..9
    (probs,) = sliding_window(vol, net, PATCH, step=0.5, activation="sigmoid", gaussian=False)
    with torch.no_grad():
        left = torch.sigmoid(net(vol[None, :, :, :, :10]))[0]
        right = torch.sigmoid(net(vol[None, :, :, :, 5:]))[0]
    expected = torch.zeros(2, 6, 8, 15)
    count = torch.zeros(6, 8, 15)
    expected[..., :10] += left
    expected[..., 5:] += right
    count[..., :10] += 1
    count[..., 5:] += 1
    torch.testing.assert_close(probs, expected / count)
    (weighted,) = sliding_window(vol, net, PATCH, step=0.5, activation="sigmoid")
    assert not torch.allclose(weighted, probs)  # the Gaussian does change the overlap


def test_progress_reports_windows_per_batch() -> None:
    calls: list[tuple[int, int]] = []
    sliding_window(
        volume((12, 20, 10)),
        conv_net(1),
        (6, 10, 10),
        batch_size=4,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(4, 9), (8, 9), (9, 9)]


def test_fp16_accumulation_and_cpu_precision() -> None:
    net, vol = conv_net(3), volume((11, 13, 15))
    (ref,) = sliding_window(vol, net, PATCH, precision="fp32")
    (auto,) = sliding_window(vol, net, PATCH, precision="fp16")  # CPU: float32 regardless
    torch.testing.assert_close(auto, ref, rtol=0, atol=0)
    (half,) = sliding_window(vol, net, PATCH, accumulation="fp16")
    assert half.dtype == torch.float32
    # float16 sums are coarse only where the summed weights underflow (the volume's rim)
    solid = torch.from_numpy(summed_weight_numpy((11, 13, 15), PATCH) >= 1e-3)
    assert 0.5 < float(solid.float().mean()) < 1.0
    d = (half - ref).abs()[:, solid]
    assert bool((d <= 0.004 + 0.002 * ref.abs()[:, solid]).all())
    with pytest.raises(UsageError, match="precision"):
        sliding_window(vol, net, PATCH, precision="fp8")


def test_network_output_of_the_wrong_size_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"expected \[1, K, 6, 8, 10\]"):
        sliding_window(volume((6, 8, 10)), lambda x: x[:, :, :-1], PATCH)


def test_cuda_without_gpu_raises_device_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown device"):  # a bad option value: exit 2
        resolve_device("tpu0")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.gpu
def test_cuda_autocast_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    net, vol = TwoStage(), volume((13, 17, 19), channels=1)
    heads = [Head(0, 3), Head(1, 2)]
    cpu = sliding_window(vol, net, PATCH, heads=heads, tta=True)
    net.cuda()
    for precision, tol in (("fp32", 1e-4), ("fp16", 2e-2), ("bf16", 1e-1)):
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            continue
        gpu = sliding_window(vol.cuda(), net, PATCH, heads=heads, tta=True, precision=precision, batch_size=3)
        for a, b in zip(cpu, gpu):
            torch.testing.assert_close(b.cpu(), a, rtol=0, atol=tol)


def test_batch_size_policy_is_one_on_cpu_and_the_request_wins() -> None:
    from unisegcli.errors import UsageError
    from unisegcli.inference.engine import batch_size_for

    assert batch_size_for(TwoStage(), PATCH, 1, [Head(0, 3)], torch.device("cpu")) == 1
    assert batch_size_for(TwoStage(), PATCH, 1, [Head(0, 3)], torch.device("cpu"), requested=3) == 3
    with pytest.raises(UsageError, match="at least 1"):
        batch_size_for(TwoStage(), PATCH, 1, [Head(0, 3)], torch.device("cpu"), requested=0)


def test_accumulators_on_another_device_give_the_same_blend(monkeypatch) -> None:
    """accumulator_device moves every weighted batch to the accumulators' device; here the
    "other" device is the CPU seen as a distinct torch.device object ("cpu" vs "cpu:0")."""
    vol = torch.randn(1, 20, 36, 40)
    net, heads = TwoStage(), [Head(0, 3), Head(2, 2)]
    same = sliding_window(vol, net, PATCH, heads=heads, batch_size=2)
    moved = sliding_window(vol, net, PATCH, heads=heads, batch_size=2, accumulator_device="cpu:0")
    for a, b in zip(same, moved):
        assert b.device.type == "cpu"
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
def test_auto_batch_size_on_cuda_fits_free_memory() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from unisegcli.inference.engine import MAX_AUTO_BATCH, batch_size_for

    net = TwoStage().cuda()
    batch = batch_size_for(net, PATCH, 1, [Head(0, 3)], torch.device("cuda"), precision="fp16")
    assert 1 <= batch <= MAX_AUTO_BATCH
    # accumulators on the host (the out-of-memory fallback) blend the same numbers
    vol = torch.randn(1, 20, 36, 40, device="cuda")
    on_gpu = sliding_window(vol, net, PATCH, heads=[Head(0, 3)], batch_size=2, precision="fp32")
    on_host = sliding_window(vol, net, PATCH, heads=[Head(0, 3)], batch_size=2, precision="fp32",
                             accumulator_device="cpu")
    assert on_host[0].device.type == "cpu"
    torch.testing.assert_close(on_host[0], on_gpu[0].cpu(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- predict_case


def task(name, index, n_classes, spacing, channels=("ct",)) -> TaskCard:
    return TaskCard(
        name=name,
        index=index,
        modality="CT",
        channels=channels,
        labels={i: f"{name}_{i}" for i in range(1, n_classes)},
        spacing_mm=spacing,
        normalization={ch: {"scheme": "ct_clip_scale", "clip_hu": [-325, 325]} for ch in channels},
    )


class Thresholder(nn.Module):
    """Encoder = intensity; task t predicts class 1 where the [0, 1]-scaled CT > 0.5, class 2
    (if it has one) where it is > 0.9. A convolution-free net makes the expected map exact."""

    patch_size = PATCH

    def __init__(self) -> None:
        super().__init__()
        self.encode_calls = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        return x[:, :1]

    def decode(self, f: torch.Tensor, task_index: int) -> torch.Tensor:
        return torch.cat([torch.zeros_like(f), (f - 0.5) * 40, (f - 0.9) * 400, torch.full_like(f, -50.0)], 1)


def test_predict_case_groups_tasks_and_restores_the_input_grid() -> None:
    img = np.zeros((1, 14, 26, 22), dtype=np.float32)
    img[0, 1:13, 2:25, 3:20] = -100.0
    img[0, 4:10, 8:18, 6:14] = 200.0  # scaled 0.81: class 1
    img[0, 5:8, 10:14, 8:11] = 400.0  # scaled 1.0: class 2 for three-class tasks
    tasks = [
        task("liver", 0, 3, (2.0, 1.0, 1.0)),
        task("spleen", 6, 2, (2.0, 1.0, 1.0)),
        task("spine", 7, 2, (4.0, 2.0, 2.0)),
    ]
    net = Thresholder()
    seen: list[tuple[int, int]] = []
    maps = predict_case(
        img,
        (2.0, 1.0, 1.0),
        tasks,
        net,
        device="cpu",
        batch_size=2,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert list(maps) == ["liver", "spleen", "spine"]
    organ = img[0] > 100
    core = img[0] > 300
    for name in ("liver", "spleen", "spine"):
        assert maps[name].shape == img.shape[1:] and maps[name].dtype == np.uint8
    np.testing.assert_array_equal(maps["liver"], np.where(core, 2, np.where(organ, 1, 0)))
    np.testing.assert_array_equal(maps["spleen"], organ.astype(np.uint8))
    got = maps["spine"] == 1  # at 2x coarser spacing, back on the input grid
    assert 2 * (got & organ).sum() / (got.sum() + organ.sum()) > 0.75
    np.testing.assert_allclose(np.argwhere(got).mean(0), np.argwhere(organ).mean(0), atol=0.75)
    assert not maps["spine"][0].any() and not maps["spine"][:, :, 0].any()  # outside the crop box
    # the two tasks at 2 mm shared one pass: windows counted once for them, once for spine
    windows_fine = len(window_slices((12, 23, 17), PATCH, 0.5))
    windows_coarse = len(window_slices((6, 12, 10), PATCH, 0.5))
    assert seen[-1] == (windows_fine + windows_coarse,) * 2
    assert net.encode_calls == math.ceil(windows_fine / 2) + math.ceil(windows_coarse / 2)


def test_predict_case_channel_mismatch_and_device() -> None:
    two = task("lesion", 10, 2, (8.0, 4.0, 4.0), channels=("ct", "pet"))
    with pytest.raises(ChannelError, match="ct, pet"):
        predict_case(np.ones((1, 8, 8, 8), np.float32), (1, 1, 1), [two], Thresholder(), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda"):
            predict_case(
                np.ones((1, 8, 8, 8), np.float32),
                (1, 1, 1),
                [task("a", 0, 2, (1, 1, 1))],
                Thresholder(),
                device="cuda",
            )
