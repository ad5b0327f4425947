"""kohya block weights for networks.lora: block slots, lr-weight presets, per-block ranks/alphas, the
optimizer groups they give, training with them, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from sd_scripts.core.errors import ConfigError
from sd_scripts.networks.block_weights import (
    SD_LAYOUT, SDXL_LAYOUT, layout_for_family, lr_weight_preset, resolve_block_settings,
)
from sd_scripts.networks.factory import check_network_settings, plan_network
from tests.helpers import make_dataset, tiny_config

ONES_25 = ",".join(["1"] * 25)


def _sd1():
    from sd_scripts.testing.tiny_models import build_tiny_components

    parts = build_tiny_components("sd1", seed=0)
    return parts["unet"], parts["text_encoder"]


# --------------------------------------------------------------------------- slots

@pytest.mark.parametrize("name, slot", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 1),
    ("lora_unet_down_blocks_0_resnets_1_conv1", 2),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),
    ("lora_unet_down_blocks_1_attentions_1_proj_in", 5),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", 9),
    ("lora_unet_down_blocks_3_resnets_1_conv2", 11),
    ("lora_unet_mid_block_attentions_0_proj_out", 12),
    ("lora_unet_mid_block_resnets_1_time_emb_proj", 12),
    ("lora_unet_up_blocks_0_resnets_0_conv1", 13),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", 15),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2", 18),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", 24),
    ("lora_unet_conv_in", None),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", None),
])
def test_sd_block_slots(name, slot):
    assert SD_LAYOUT.block_index(name) == slot


@pytest.mark.parametrize("name, slot", [
    ("lora_unet_time_embed_0", 0),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 5),
    ("lora_unet_input_blocks_8_0_in_layers_2", 9),
    ("lora_unet_middle_block_1_proj_in", 11),
    ("lora_unet_output_blocks_8_1_proj_out", 21),
    ("lora_unet_out_2", 22),
    ("lora_unet_down_blocks_1_attentions_0_proj_in", 5),  # diffusers spelling of input_blocks_4_1
    ("lora_unet_down_blocks_0_downsamplers_0_conv", 4),
    ("lora_unet_mid_block_resnets_1_conv1", 12),
    ("lora_unet_up_blocks_2_resnets_2_conv2", 21),
    ("lora_unet_conv_in", 1),
])
def test_sdxl_block_slots(name, slot):
    assert SDXL_LAYOUT.block_index(name) == slot


def test_sdxl_slots_agree_with_the_sgm_names():
    """Full-size SDXL UNet (meta device): every layer's slot from its diffusers name equals the slot of
    the SGM name the family writes in files."""
    from diffusers import UNet2DConditionModel

    from sd_scripts.models.families import get_family
    from sd_scripts.models.sdxl_names import sgm_path_mapper
    from sd_scripts.files import lora_keys

    with torch.device("meta"):
        unet = UNet2DConditionModel(**get_family("sdxl").diffusers_unet_config())
    to_sgm = sgm_path_mapper(unet)
    slots = set()
    for path, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        mine = SDXL_LAYOUT.block_index(lora_keys.lora_name("lora_unet", path))
        theirs = SDXL_LAYOUT.block_index(lora_keys.lora_name("lora_unet", to_sgm(path)))
        assert mine == theirs, path
        slots.add(mine)
    assert slots == set(range(23))


def test_layout_for_family():
    assert layout_for_family("sd1") is SD_LAYOUT and layout_for_family("sd2") is SD_LAYOUT
    assert layout_for_family("sdxl") is SDXL_LAYOUT and layout_for_family(None) is SD_LAYOUT

    class Family:
        name = "sdxl"

    assert layout_for_family(Family()) is SDXL_LAYOUT


# --------------------------------------------------------------------------- lr weights

def test_lr_weight_presets():
    n = 12
    sine = lr_weight_preset("down_lr_weight", "sine", n)
    assert sine[0] == 0 and sine[-1] == pytest.approx(1) and sine == sorted(sine)
    assert sine[4] == pytest.approx(math.sin(math.pi / 2 * 4 / 11))
    assert lr_weight_preset("k", "cosine", n) == list(reversed(sine))
    assert lr_weight_preset("k", "linear", n) == pytest.approx([i / 11 for i in range(n)])
    assert lr_weight_preset("k", "reverse_linear", n) == pytest.approx([(11 - i) / 11 for i in range(n)])
    assert lr_weight_preset("k", "zeros", n) == [0.0] * n
    assert lr_weight_preset("k", "sine+0.5", n) == pytest.approx([v + 0.5 for v in sine])
    assert lr_weight_preset("k", "ZEROS+.25", 9) == [0.25] * 9


def test_resolve_lr_weights_threshold_and_removed_blocks():
    args = {"down_lr_weight": "linear", "mid_lr_weight": "0.5",
            "up_lr_weight": "0,0,0.05,1,1,1,1,1,1,1,1,1", "block_lr_zero_threshold": "0.1",
            "conv_block_dims": ",".join(["2"] * 25)}
    s = resolve_block_settings(args, SD_LAYOUT, network_dim=8, network_alpha=4, conv_dim=None)
    assert len(s.lr_weight) == 25
    down = [i / 11 for i in range(12)]
    assert s.lr_weight[:12] == pytest.approx([w if w > 0.1 else 0 for w in down])
    assert s.lr_weight[12] == 0.5
    assert s.lr_weight[13:16] == [0, 0, 0]  # 0.05 <= threshold
    # blocks that do not learn get no modules
    assert s.block_dims[13] == 0 and s.conv_block_dims[13] == 0 and s.block_dims[0] == 0 and s.block_dims[16] == 8
    assert s.block_alphas == [4.0] * 25 and s.conv_block_alphas == [1.0] * 25
    assert resolve_block_settings({"conv_dim": "4"}, SD_LAYOUT, 8, 4) is None
    sdxl = resolve_block_settings({"down_lr_weight": "sine", "mid_lr_weight": "1,0.5,1"}, SDXL_LAYOUT, 4, 1)
    assert len(sdxl.lr_weight) == 23 and sdxl.lr_weight[0] == 1.0 and sdxl.lr_weight[-1] == 1.0
    assert sdxl.lr_weight[11] == 0.5


@pytest.mark.parametrize("args, needle", [
    ({"block_dims": ",".join(["4"] * 24)}, "block_dims=4,4"),
    ({"block_alphas": ",".join(["1"] * 26)}, "block_alphas"),
    ({"conv_block_dims": "a" + ",4" * 24}, "conv_block_dims"),
    ({"block_dims": "4,-1" + ",4" * 23}, "block_dims"),
    ({"block_alphas": "-1" + ",1" * 24}, "negative"),
    ({"down_lr_weight": "1,1,1,1,1"}, "down_lr_weight=1,1,1,1,1 has 5 values but SD1/SD2 needs 12"),
    ({"up_lr_weight": "sinus"}, "up_lr_weight=sinus"),
    ({"down_lr_weight": "sine+"}, "down_lr_weight=sine+"),
    ({"down_lr_weight": "sine+x"}, "down_lr_weight"),
    ({"mid_lr_weight": "1,1"}, "mid_lr_weight=1,1 has 2 values"),
    ({"mid_lr_weight": "zeros"}, "mid_lr_weight"),
    ({"up_lr_weight": "1"}, "up_lr_weight=1 has 1 value"),
    ({"block_lr_zero_threshold": "x", "mid_lr_weight": "1"}, "block_lr_zero_threshold"),
    ({"conv_block_alphas": ONES_25}, "conv_block_alphas"),
])
def test_bad_block_settings_name_the_key(tmp_path, args, needle):
    config = tiny_config(tmp_path, tmp_path, tmp_path / "out", network_args=[f"{k}={v}" for k, v in args.items()])
    with pytest.raises(ConfigError) as err:
        check_network_settings(config)
    text = str(err.value)
    assert err.value.setting == "network_args" and text.startswith("network_args: ") and needle in text, text
    assert "\n" not in text


def test_list_lengths_follow_the_family(tmp_path):
    config = tiny_config(tmp_path, tmp_path, tmp_path / "out", network_args=["block_dims=" + ",".join(["4"] * 23)])
    assert check_network_settings(config, "sdxl") == []
    with pytest.raises(ConfigError, match="SD1/SD2 needs 25"):
        check_network_settings(config, "sd1")
    with pytest.raises(ConfigError, match="SDXL needs 23"):
        check_network_settings(tiny_config(tmp_path, tmp_path, tmp_path / "out", network_args=[f"block_dims={ONES_25}"]),
                               "sdxl")
    warnings = check_network_settings(tiny_config(tmp_path, tmp_path, tmp_path / "out", network_args=["unit=4"]))
    assert any("networks.dylora" in w for w in warnings)


# --------------------------------------------------------------------------- the network

def _block_network(args, unet=None, te=None, dim=4, alpha=2.0, conv_dim=None):
    from sd_scripts.networks.lora import create_network

    if unet is None:
        unet, te = _sd1()
    blocks = resolve_block_settings(args, SD_LAYOUT, dim, alpha, conv_dim)
    net = create_network(unet, te, network_dim=dim, network_alpha=alpha, conv_dim=conv_dim, blocks=blocks)
    net.apply_to()
    return net, blocks


def test_block_dims_give_per_block_ranks_and_alphas():
    dims = [(i % 3) + 1 for i in range(25)]
    dims[4] = 0  # down_blocks.1 resnet: left out (its 3x3 convs too)
    alphas = [float(i) for i in range(25)]
    conv = [2 * ((i % 2) + 1) for i in range(25)]
    conv[4] = 0
    net, blocks = _block_network({"block_dims": ",".join(map(str, dims)), "block_alphas": ",".join(map(str, alphas)),
                                  "conv_block_dims": ",".join(map(str, conv))})
    seen_slots = set()
    for lora in net.unet_loras:
        slot = SD_LAYOUT.block_index(lora.lora_name)
        seen_slots.add(slot)
        is_3x3 = lora.lora_down.weight.dim() == 4 and lora.lora_down.weight.shape[-1] == 3
        expected_dim = conv[slot] if is_3x3 else dims[slot]
        assert lora.lora_dim == expected_dim, lora.lora_name
        expected_alpha = 1.0 if is_3x3 else (alphas[slot] or dims[slot])  # conv alphas default 1; alpha 0 = rank
        assert float(lora.alpha) == expected_alpha, lora.lora_name
    assert 4 not in seen_slots and {1, 3, 12, 13, 15, 16, 17} <= seen_slots
    assert any(l.lora_name.endswith("resnets_0_conv1") for l in net.unet_loras)  # conv_block_dims turns LoCon on
    # the text encoder keeps network_dim
    assert all(lora.lora_dim == 4 and float(lora.alpha) == 2.0 for lora in net.text_encoder_loras)


def test_lr_weights_make_per_block_groups():
    down = [0, 0.5, 0, 0.25, 0, 0, 0, 0, 0, 0, 0, 0]
    net, blocks = _block_network({"down_lr_weight": ",".join(map(str, down)), "mid_lr_weight": "2",
                                  "up_lr_weight": "cosine"}, conv_dim=2)
    groups, names = net.prepare_optimizer_params(1e-5, 1e-3, 1e-4)
    assert names[0] == "textencoder" and groups[0]["lr"] == 1e-5
    by_name = dict(zip(names, groups))
    up = lr_weight_preset("up_lr_weight", "cosine", 12)
    expected = {1: 0.5, 3: 0.25, 12: 2.0, 13: up[0], 14: up[1], 15: up[2], 16: up[3], 17: up[4]}
    assert set(names[1:]) == {f"unet_block{i}" for i in expected}
    param_slot = {id(p): SD_LAYOUT.block_index(l.lora_name) for l in net.unet_loras for p in l.parameters()}
    for slot, weight in expected.items():
        group = by_name[f"unet_block{slot}"]
        assert group["lr"] == pytest.approx(1e-3 * weight)
        assert {param_slot[id(p)] for p in group["params"]} == {slot}
    # slot 4 (down_blocks.1 resnet 0) has weight 0: no modules at all
    assert not any(SD_LAYOUT.block_index(l.lora_name) == 4 for l in net.unet_loras)
    n_unet_params = sum(1 for l in net.unet_loras for _ in l.parameters())
    assert sum(len(g["params"]) for n, g in by_name.items() if n.startswith("unet")) == n_unet_params


def test_blocks_train_and_save(tiny_sd1_diffusers, tmp_path):
    """Through the training loop: the file has the per-block ranks, left-out blocks are absent, and
    diffusers loads it."""
    from diffusers import StableDiffusionPipeline

    from sd_scripts.training.loop import train

    data = make_dataset(tmp_path / "data", count=2)
    dims = ["4"] * 25
    dims[16] = "2"  # up_blocks.1 attentions.0
    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", max_train_steps=2, train_batch_size=1,
                               network_args=["block_dims=" + ",".join(dims), "down_lr_weight=zeros+1",
                                             "up_lr_weight=1,1,1,1,0,1,1,1,1,1,1,1", "mid_lr_weight=0.5"]))
    sd = load_file(result.output_path)
    q = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{q}.lora_down.weight"].shape[0] == 2
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    assert not any(k.startswith("lora_unet_up_blocks_1_attentions_1_") for k in sd)  # slot 17: weight 0
    assert any(k.startswith("lora_te_") for k in sd)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_diffusers), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(result.output_path)


def test_plan_keeps_verbatim_args_for_metadata(tmp_path):
    args = ["down_lr_weight=sine+0.5", f"block_dims={ONES_25}"]
    plan = plan_network(tiny_config(tmp_path, tmp_path, tmp_path / "out", network_args=args))
    assert plan.raw_args == {"down_lr_weight": "sine+0.5", "block_dims": ONES_25}
    assert plan.blocks is not None and plan.blocks.block_dims == [1] * 25
