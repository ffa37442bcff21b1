"""UniSegNet against the upstream reference: state-dict layout and numerical parity.

Reference data (tests/data, copied from the shared fixtures): ``uniseg_full_keys.json`` (the
released 11-task model's keys and shapes) and ``uniseg_tiny/`` (the original UniSeg code with
random weights: checkpoint, plans and logits for 5 cases; ``manifest.json`` there says how
they were made).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unisegcli.errors import ChannelError, ImageShapeError, UnknownTaskError
from unisegcli.models.uniseg import (
    InputChannelsError,
    PatchSizeError,
    UniSegConfig,
    UniSegNet,
    load_uniseg,
)

DATA = Path(__file__).parent / "data"
TINY = DATA / "uniseg_tiny"
MANIFEST = json.loads((TINY / "manifest.json").read_text())
CASES = {case["id"]: case for case in MANIFEST["cases"]}


@pytest.fixture(scope="module")
def tiny_net() -> UniSegNet:
    return load_uniseg(TINY / "model_final_checkpoint.model", TINY / "plans.pkl")


def case_input(case_id: str) -> torch.Tensor:
    return torch.from_numpy(np.load(TINY / CASES[case_id]["input"]["file"]))


def expected_keys(config: UniSegConfig) -> dict[str, tuple[int, ...]]:
    """Upstream UniSeg_model's state-dict keys and shapes, spelled out from its naming scheme.

    Written independently of UniSegNet (Prompt_generic_UNet.py + generic_UNet.py rules) so a
    config other than the fixtures' is checked against upstream's layout, not against itself.
    """
    keys: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, c_in: int, c_out: int, k: tuple[int, ...]) -> None:
        keys[f"{prefix}.conv.weight"] = (c_out, c_in, *k)
        keys[f"{prefix}.conv.bias"] = (c_out,)
        keys[f"{prefix}.instnorm.weight"] = (c_out,)
        keys[f"{prefix}.instnorm.bias"] = (c_out,)

    n, t = config.num_pool, config.num_tasks
    convs, pools = config.conv_kernel_sizes, config.pool_op_kernel_sizes
    feats = [config.base_num_features]
    for _ in range(n):
        feats.append(min(feats[-1] * 2, config.max_num_features))
    c = feats[-1]
    keys["intermedia_prompt"] = (1, t, *(s // d for s, d in zip(config.patch_size, (16, 32, 32))))
    fin, mid = c + t, (c + t) // 4
    for i, (a, b) in enumerate([(fin, mid), (mid, mid), (mid, t)]):
        block(f"fusion_layer.blocks.{i}", a, b, convs[n])
    for u in range(n):
        skip = feats[n - 1 - u]
        block(f"conv_blocks_localization.{u}.0.blocks.0", 2 * skip, skip, convs[-(u + 1)])
        for j in range(1, config.conv_per_stage - 1):
            block(f"conv_blocks_localization.{u}.0.blocks.{j}", skip, skip, convs[-(u + 1)])
        block(f"conv_blocks_localization.{u}.1.blocks.0", skip, skip, convs[-(u + 1)])
    for ch in config.input_channel_options:
        keys[f"conv_blocks_context.0.blocks.0.conv_{ch}.weight"] = (feats[0], ch, *convs[0])
        keys[f"conv_blocks_context.0.blocks.0.conv_{ch}.bias"] = (feats[0],)
    keys["conv_blocks_context.0.blocks.0.instnorm.weight"] = (feats[0],)
    keys["conv_blocks_context.0.blocks.0.instnorm.bias"] = (feats[0],)
    for j in range(1, config.conv_per_stage):
        block(f"conv_blocks_context.0.blocks.{j}", feats[0], feats[0], convs[0])
    for d in range(1, n):
        for j in range(config.conv_per_stage):
            c_in = feats[d - 1] if j == 0 else feats[d]
            block(f"conv_blocks_context.{d}.blocks.{j}", c_in, feats[d], convs[d])
    for j in range(max(config.conv_per_stage - 1, 1)):
        block(f"conv_blocks_context.{n}.0.blocks.{j}", feats[n - 1] if j == 0 else c, c, convs[n])
    block(f"conv_blocks_context.{n}.1.blocks.0", c, c, convs[n])
    down = c + 1
    for u in range(n):
        keys[f"tu.{u}.weight"] = (down, feats[n - 1 - u], *pools[-(u + 1)])
        down = feats[n - 1 - u]
    for u in range(n):
        keys[f"seg_outputs.{u}.weight"] = (config.num_classes, feats[n - 1 - u], 1, 1, 1)
    return keys


def shapes_of(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


# -- state-dict layout ---------------------------------------------------------------------


def test_full_size_model_matches_upstream_key_manifest() -> None:
    manifest = json.loads((DATA / "uniseg_full_keys.json").read_text())
    with torch.device("meta"):
        net = UniSegNet(UniSegConfig.default())
    ours = shapes_of(net)
    assert ours == {k: tuple(s) for k, s in manifest["keys"]}
    assert list(ours) == [k for k, _ in manifest["keys"]]  # same order as torch.save wrote
    assert len(ours) == manifest["num_keys"] == 115
    assert sum(math.prod(s) for s in ours.values()) == manifest["total_params"] == 32_114_381
    assert ours == expected_keys(UniSegConfig.default())


def test_tiny_model_matches_fixture_keys(tiny_net: UniSegNet) -> None:
    keys = json.loads((TINY / "keys.json").read_text())
    assert shapes_of(tiny_net) == {k: tuple(s) for k, s in keys["keys"]}
    assert sum(p.numel() for p in tiny_net.parameters()) == keys["total_params"]
    assert tiny_net.config.stage_features == (4, 8, 16, 16, 16, 16)
    assert tiny_net.config.fusion_channels == (27, 6, 6, 11)


def test_other_config_follows_upstream_naming_and_runs() -> None:
    config = UniSegConfig(
        patch_size=(32, 64, 96),
        base_num_features=3,
        max_num_features=20,
        pool_op_kernel_sizes=[[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        conv_kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        num_tasks=5,
        num_classes=3,
        input_channel_options=(1, 3),
        conv_per_stage=3,
    )
    torch.manual_seed(0)
    net = UniSegNet(config).eval()
    assert shapes_of(net) == expected_keys(config)
    assert net.intermedia_prompt.shape == (1, 5, 2, 2, 3)
    x = torch.randn(1, 3, 32, 64, 96)
    with torch.no_grad():
        out = net(x, 4)
        assert out.shape == (1, 3, 32, 64, 96)
        assert torch.equal(net.decode(net.encode(x), 4), out)
        assert not torch.allclose(net(x, 0), out)  # the prompt matters


def test_config_rejects_a_patch_that_does_not_fit_the_fixed_prompt() -> None:
    with pytest.raises(ValueError, match="prompt"):
        UniSegConfig(
            patch_size=(32, 64, 64),
            base_num_features=4,
            pool_op_kernel_sizes=[[2, 2, 2]] * 5,  # z pooled 5 times: bottleneck 1, prompt 2
            conv_kernel_sizes=[[3, 3, 3]] * 6,
        )
    with pytest.raises(ValueError, match="conv kernel"):
        UniSegConfig(patch_size=(16, 32, 32), base_num_features=4,
                     pool_op_kernel_sizes=[[1, 2, 2]], conv_kernel_sizes=[[3, 3, 3]])


def test_config_round_trips_and_reads_plans() -> None:
    default = UniSegConfig.default()
    assert set(default.to_dict()) == {
        "patch_size", "base_num_features", "max_num_features", "pool_op_kernel_sizes",
        "conv_kernel_sizes", "num_tasks", "num_classes", "input_channel_options", "conv_per_stage",
    }
    assert UniSegConfig.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    assert default.prompt_shape == default.bottleneck_shape == (4, 6, 6)
    assert default.fusion_channels == (331, 82, 82, 11)
    with pytest.raises(ValueError, match="unknown keys"):
        UniSegConfig.from_dict({**default.to_dict(), "patch": [1, 2, 3]})
    # real plans lack max_num_features: the upstream cap of 320 applies
    plans = {
        "base_num_features": 32, "num_classes": 3, "conv_per_stage": 2,
        "plans_per_stage": {0: {
            "patch_size": np.array([64, 192, 192]),
            "pool_op_kernel_sizes": [[1, 2, 2]] + [[2, 2, 2]] * 4,
            "conv_kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 5,
        }},
    }
    assert UniSegConfig.from_plans(plans) == default


# -- numerical parity with the original code ---------------------------------------------


@pytest.mark.parametrize("case_id", list(CASES))
def test_logits_match_original_code(tiny_net: UniSegNet, case_id: str) -> None:
    case = CASES[case_id]
    expected = torch.from_numpy(np.load(TINY / case["expected_logits"]["file"]))
    with torch.no_grad():
        logits = tiny_net(case_input(case_id), torch.tensor([case["task_id"]]))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["modules", "channels_last"])
def test_other_execution_paths_match_original_code(mode: str) -> None:
    """The in-place norm (inference) is checked above; here the module path (autograd on)
    and the channels_last_3d layout the CPU uses for full-size networks."""
    net = load_uniseg(TINY / "model_final_checkpoint.model", TINY / "plans.pkl")
    if mode == "channels_last":
        net.use_channels_last()
        assert net.conv_blocks_context[1].blocks[0].conv.weight.is_contiguous(
            memory_format=torch.channels_last_3d)
    for case in CASES.values():
        expected = torch.from_numpy(np.load(TINY / case["expected_logits"]["file"]))
        with torch.enable_grad() if mode == "modules" else torch.inference_mode():
            logits = net(case_input(case["id"]), case["task_id"])
        torch.testing.assert_close(logits.detach(), expected, atol=2e-5, rtol=1e-4)


def test_channels_last_only_for_full_size_networks_on_the_cpu(tiny_net: UniSegNet) -> None:
    from unisegcli.models.uniseg.family import prefer_channels_last

    prefer_channels_last(tiny_net, torch.device("cpu"))
    assert not tiny_net.channels_last  # 4 base features: the default layout is faster
    wide = UniSegNet(UniSegConfig.from_dict({**tiny_net.config.to_dict(), "base_num_features": 32}))
    prefer_channels_last(wide, torch.device("cpu"))
    assert wide.channels_last
    prefer_channels_last(wide, torch.device("meta"))  # any other device: default layout
    assert not wide.channels_last


@pytest.mark.parametrize("case_id", list(CASES))
def test_segmentation_matches_except_near_ties(tiny_net: UniSegNet, case_id: str) -> None:
    case = CASES[case_id]
    n = case["n_classes_used"]
    expected_seg = torch.from_numpy(np.load(TINY / case["expected_seg"]["file"])).long()
    expected_logits = torch.from_numpy(np.load(TINY / case["expected_logits"]["file"]))[0, :n]
    with torch.no_grad():
        probs = torch.softmax(tiny_net(case_input(case_id), case["task_id"]), dim=1)[0, :n]
    seg = probs.argmax(0)
    top2 = expected_logits.topk(2, dim=0).values
    near_tie = (top2[0] - top2[1]) < 1e-5
    differ = seg != expected_seg
    assert not (differ & ~near_tie).any()
    assert differ.sum() <= near_tie.sum()


# -- encode / decode -----------------------------------------------------------------------


def test_encode_decode_equals_forward_bit_for_bit(tiny_net: UniSegNet) -> None:
    x = case_input("t9_c4")
    with torch.no_grad():
        assert torch.equal(tiny_net.decode(tiny_net.encode(x), 9), tiny_net(x, 9))


def test_decode_several_tasks_on_one_encoding(tiny_net: UniSegNet) -> None:
    x = case_input("t0_c1")
    with torch.no_grad():
        features = tiny_net.encode(x)
        before = [t.clone() for t in (*features.skips, features.bottleneck, features.task_prompts)]
        liver = tiny_net.decode(features, 0)
        colon = tiny_net.decode(features, torch.tensor([4]))
        after = (*features.skips, features.bottleneck, features.task_prompts)
        assert all(torch.equal(a, b) for a, b in zip(before, after))  # features not mutated
        assert torch.equal(liver, tiny_net(x, 0))
        assert torch.equal(colon, tiny_net(x, 4))
    for logits, case_id in ((liver, "t0_c1"), (colon, "t4_c1_same_input_as_t0")):
        expected = torch.from_numpy(np.load(TINY / CASES[case_id]["expected_logits"]["file"]))
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


def test_task_index_forms_and_batches(tiny_net: UniSegNet) -> None:
    x = case_input("t6_c1")
    with torch.no_grad():
        ref = tiny_net(x, 6)
        assert torch.equal(tiny_net(x, np.array([6])), ref)
        assert torch.equal(tiny_net(x, np.int64(6)), ref)
        assert torch.equal(tiny_net(x, torch.tensor(6)), ref)
        # upstream uses task_id[0] for the whole batch; samples are independent (instance norm)
        batch = tiny_net(torch.cat([x, case_input("t0_c1")]), torch.tensor([6, 0]))
    torch.testing.assert_close(batch[:1], ref, atol=2e-5, rtol=1e-4)
    for bad in (11, -1, 2.5, True, "liver"):
        with pytest.raises(UnknownTaskError):
            tiny_net(x, bad)


# -- input errors --------------------------------------------------------------------------


def test_wrong_channel_count_is_a_clear_error(tiny_net: UniSegNet) -> None:
    with pytest.raises(InputChannelsError, match=r"input has 3 channels; UniSeg accepts 1, 2, 4") as info:
        tiny_net(torch.zeros(1, 3, 16, 32, 64), 0)
    assert isinstance(info.value, ImageShapeError) and isinstance(info.value, ChannelError)
    assert "\n" not in str(info.value)


def test_window_must_have_the_patch_size(tiny_net: UniSegNet) -> None:
    with pytest.raises(PatchSizeError, match="16x32x64") as info:
        tiny_net.encode(torch.zeros(1, 1, 16, 32, 32))
    assert isinstance(info.value, ValueError) and isinstance(info.value, ImageShapeError)
    with pytest.raises(ImageShapeError, match="5-D"):
        tiny_net(torch.zeros(1, 16, 32, 64), 0)
