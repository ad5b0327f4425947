"""Our LoRA files under AUTOMATIC1111's key rules (tests/a1111_rules.py): every key of a full-size SD1, SD2 and SDXL
LoCon lands on a layer of the LDM model with the right shape, and so do the keys of files written to disk for the tiny
SDXL checkpoint with every LyCORIS algorithm A1111 knows (LoHa, LoKr, IA3, full)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd_scripts.models.ldm_convert import text_encoder_ldm_key_map, unet_ldm_key_map
from sd_scripts.files.lora_file import save_lora_file
from sd_scripts.models.families import get_family
from sd_scripts.networks.lora import create_network
from tests.a1111_rules import check_loads_completely, convert_diffusers_name_to_compvis, layer_mapping


def _text_encoder(hidden: int, layers: int, heads: int, act: str, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, hidden_act=act, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


_FULL_SIZE_TEXT_ENCODERS = {
    "sd1": [dict(hidden=768, layers=12, heads=12, act="quick_gelu")],
    "sd2": [dict(hidden=1024, layers=23, heads=16, act="gelu")],
    "sdxl": [dict(hidden=768, layers=12, heads=12, act="quick_gelu"),
             dict(hidden=1280, layers=32, heads=20, act="gelu", projection=True)],
}


def _checkpoint_shapes(unet, text_encoders, family) -> dict[str, tuple]:
    """The single-file checkpoint keys (and shapes) of these diffusers/transformers models, as our converter names them."""
    shapes: dict[str, tuple] = {}
    weights = unet.state_dict()
    shapes.update({ldm: tuple(weights[name].shape) for name, ldm in unet_ldm_key_map(unet).items()})
    for te, spec in zip(text_encoders, family.text_encoder_specs):
        weights = te.state_dict()
        for name, ldm in text_encoder_ldm_key_map(te, spec.kind, spec.ldm_prefix).items():
            shapes.setdefault(ldm, tuple(weights[name].shape))  # q/k/v share one packed in_proj key
    return shapes


# Written by hand from the SD1 LDM model (not from our converter), as a cross-check of the derived layer names.
def _hand_sd1_layer_names():
    """Linear/Conv module names of the SD1 LDM UNet and CLIP as A1111 indexes them (. -> _)."""
    names = {"input_blocks_0_0", "out_2", "time_embed_0", "time_embed_2"}
    attn = ["proj_in", "proj_out"] + [f"transformer_blocks_0_{a}_{p}" for a in ("attn1", "attn2")
                                      for p in ("to_q", "to_k", "to_v", "to_out_0")]
    attn += ["transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2"]
    res = ["in_layers_2", "emb_layers_1", "out_layers_3"]

    def block(prefix, with_skip, with_attn):
        out = {f"{prefix}_0_{r}" for r in res}
        if with_skip:
            out.add(f"{prefix}_0_skip_connection")
        if with_attn:
            out |= {f"{prefix}_1_{a}" for a in attn}
        return out

    for level in range(4):  # channel mult 1, 2, 4, 4; attention on levels 0-2
        for j in range(2):
            names |= block(f"input_blocks_{1 + 3 * level + j}", level in (1, 2) and j == 0, level < 3)
        if level < 3:
            names.add(f"input_blocks_{3 + 3 * level}_0_op")
    names |= {f"middle_block_0_{r}" for r in res} | {f"middle_block_2_{r}" for r in res}
    names |= {f"middle_block_1_{a}" for a in attn}
    for level in range(4):  # output level 0 has no attention
        for j in range(3):
            names |= block(f"output_blocks_{3 * level + j}", True, level > 0)
        if level < 3:
            names.add(f"output_blocks_{3 * level + 2}_{2 if level > 0 else 1}_conv")
    unet = {"diffusion_model_" + n for n in names}
    te = {f"transformer_text_model_encoder_layers_{b}_{p}" for b in range(12)
          for p in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
    return unet | te


# A few layers of each full-size model, from real checkpoints' keys: the shared names must be among the placed ones.
_KNOWN_LAYERS = {
    "sd1": {"diffusion_model_output_blocks_2_1_conv", "diffusion_model_input_blocks_4_0_skip_connection",
            "transformer_text_model_encoder_layers_11_mlp_fc2"},
    "sd2": {"diffusion_model_input_blocks_1_1_proj_in", "model_transformer_resblocks_22_attn_q_proj",
            "model_transformer_resblocks_0_attn_out_proj", "model_transformer_resblocks_5_mlp_c_fc"},
    "sdxl": {"diffusion_model_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
             "diffusion_model_input_blocks_7_1_transformer_blocks_9_ff_net_2",
             "diffusion_model_middle_block_1_transformer_blocks_9_attn2_to_k",
             "diffusion_model_output_blocks_0_1_transformer_blocks_9_attn2_to_v",
             "diffusion_model_output_blocks_2_2_conv", "diffusion_model_output_blocks_5_2_conv",
             "diffusion_model_input_blocks_6_0_op", "diffusion_model_output_blocks_8_0_skip_connection",
             "0_transformer_text_model_encoder_layers_11_mlp_fc2", "1_model_transformer_resblocks_31_attn_v_proj",
             "1_model_transformer_resblocks_31_mlp_c_proj"},
}


@pytest.mark.parametrize("family_name, modules", [("sd1", 278 + 72), ("sd2", 278 + 23 * 6), ("sdxl", 722 + 66 + 264)])
def test_a1111_places_every_key_of_a_full_size_locon(family_name, modules):
    from diffusers import UNet2DConditionModel

    family = get_family(family_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(family.diffusers_unet_config())
        tes = [_text_encoder(**spec) for spec in _FULL_SIZE_TEXT_ENCODERS[family_name]]
    net = create_network(unet, tes, conv_dim=4, te_prefixes=tuple(family.te_lora_prefixes),
                         unet_path_map=family.lora_unet_path_map(unet))
    sd = net.kohya_state_dict()
    layers = layer_mapping(_checkpoint_shapes(unet, tes, family))
    matched = check_loads_completely(sd, layers)
    assert len(matched) == len(net.loras) == modules  # one A1111 layer per module, none shared
    assert _KNOWN_LAYERS[family_name] <= set(matched)
    if family_name == "sd1":
        assert set(matched) <= _hand_sd1_layer_names()


def test_the_simulated_rules_are_a1111s():
    """Spot checks of the conversion against names A1111's own code produces."""
    assert convert_diffusers_name_to_compvis("lora_unet_down_blocks_1_resnets_0_conv_shortcut", False) == \
        "diffusion_model_input_blocks_4_0_skip_connection"
    assert convert_diffusers_name_to_compvis("lora_unet_up_blocks_0_upsamplers_0_conv", False) == \
        "diffusion_model_output_blocks_2_1_conv"
    assert convert_diffusers_name_to_compvis("lora_te_text_model_encoder_layers_3_mlp_fc1", True) == \
        "model_transformer_resblocks_3_mlp_c_fc"
    assert convert_diffusers_name_to_compvis("lora_te2_text_model_encoder_layers_31_self_attn_q_proj", False) == \
        "1_model_transformer_resblocks_31_attn_q_proj"
    # SGM-named SDXL UNet keys are left alone here and found by load_network's "lora_unet" -> "diffusion_model"
    assert convert_diffusers_name_to_compvis("lora_unet_input_blocks_4_1_proj_in", False) == \
        "lora_unet_input_blocks_4_1_proj_in"
    layers = {"diffusion_model_input_blocks_4_1_proj_in": (640, 640)}
    from tests.a1111_rules import load_network

    _, failed = load_network({"lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(1.0),
                              "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(1.0)}, layers)
    assert list(failed) == []  # both spellings reach input_blocks_4_1
    _, failed = load_network({"lora_unet_input_blocks_5_1_proj_in.alpha": torch.tensor(1.0)}, layers)
    assert list(failed) == ["lora_unet_input_blocks_5_1_proj_in.alpha"]


# --------------------------------------------------------------------------- files on disk, tiny SDXL

@pytest.fixture(scope="module")
def tiny_sdxl(tiny_sdxl_single_file, tiny_sdxl_diffusers):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with safe_open(str(tiny_sdxl_single_file), "pt") as f:
        layers = layer_mapping({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_diffusers, subfolder="unet")
    te1 = CLIPTextModel.from_pretrained(tiny_sdxl_diffusers, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_diffusers, subfolder="text_encoder_2")
    return layers, unet, [te1, te2]


def _saved(tmp_path, state_dict):
    path = tmp_path / "net.safetensors"
    save_lora_file(path, state_dict, {"ss_base_model_version": "sdxl_base_v1-0"}, save_dtype="fp16")
    return load_file(str(path))


def test_a1111_places_every_key_of_a_saved_sdxl_locon(tiny_sdxl, tmp_path):
    layers, unet, tes = tiny_sdxl
    xl = get_family("sdxl")
    net = create_network(unet, tes, conv_dim=2, te_prefixes=tuple(xl.te_lora_prefixes),
                         unet_path_map=xl.lora_unet_path_map(unet))
    matched = check_loads_completely(_saved(tmp_path, net.kohya_state_dict()), layers)
    assert any(k.startswith("1_model_transformer_resblocks_") and k.endswith("_attn_v_proj") for k in matched)
    assert any(k.startswith("0_transformer_text_model_encoder_layers_") for k in matched)
    assert any(k.startswith("diffusion_model_output_blocks_") and k.endswith("_conv") for k in matched)


@pytest.mark.parametrize("args", [["algo=loha"], ["algo=lokr"], ["algo=ia3", "preset=ia3"], ["algo=full"],
                                  ["algo=locon", "conv_dim=2", "conv_alpha=1"]])
def test_a1111_places_every_key_of_a_saved_sdxl_lycoris_file(tiny_sdxl, tmp_path, args):
    from sd_scripts.networks import lycoris_adapter as la
    from sd_scripts.networks.network_args import split_network_args

    layers, unet, tes = tiny_sdxl
    xl = get_family("sdxl")
    parsed = la.parse_lycoris_args(split_network_args(args), network_dim=4, network_alpha=2.0)
    net, _ = la.create_lycoris_network(unet, tes, parsed, network_dim=4, network_alpha=2.0,
                                       te_prefixes=tuple(xl.te_lora_prefixes), unet_path_map=xl.lora_unet_path_map(unet))
    net.apply_to()
    sd = _saved(tmp_path, net.kohya_state_dict())
    matched = check_loads_completely(sd, layers)
    assert len(matched) == len({k.split(".")[0] for k in sd})
    assert any(k.startswith("1_model_transformer_resblocks_") for k in matched) or args[-1] == "preset=ia3"


@pytest.mark.parametrize("conv, unet_modules", [(False, 192), (True, 278)])
def test_extraction_targets_kohyas_module_set_on_a_full_size_sd1(conv, unet_modules):
    """Without conv settings, kohya's LoRA set: the transformer blocks only (192 UNet modules on SD1.5, as kohya's
    extract_lora_from_models.py gives), not the resnets' time_emb_proj and 1x1 conv_shortcut."""
    from diffusers import UNet2DConditionModel

    from sd_scripts.networks.ldm_lora_map import build_lora_map, lora_target_names

    family = get_family("sd1")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(family.diffusers_unet_config())
        tes = [_text_encoder(**spec) for spec in _FULL_SIZE_TEXT_ENCODERS["sd1"]]
    shapes = _checkpoint_shapes(unet, tes, family)
    names = lora_target_names(build_lora_map(shapes), conv=conv, shapes=shapes)
    assert sum(n.startswith("lora_unet_") for n in names) == unet_modules
    assert sum(n.startswith("lora_te_") for n in names) == 72
    assert any("time_emb_proj" in n for n in names) == conv
