"""SDXL LoRA files: kohya's SGM UNet names and lora_te1/lora_te2, the diffusers SDXL pipeline reproduces a hand
merge, ComfyUI's key rules map every key (tiny and full-size), and the name conversions."""

from __future__ import annotations

import re

import pytest
import torch

from sd_scripts.models.families import get_family
from sd_scripts.networks.lora import create_network
from tests.comfy_rules import comfy_key_map_sdxl, hf_text_encoder_shapes
from tests.helpers import saved_random_lora

XL = get_family("sdxl")


def _pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _network(unet, te1, te2, **kw):
    return create_network(unet, [te1, te2], te_prefixes=tuple(XL.te_lora_prefixes),
                          unet_path_map=XL.lora_unet_path_map(unet), **kw)


def _image(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


# Written independently of sd_scripts (ldm_convert / sdxl_names): SGM block names of a UNet with two resnets per
# level -> diffusers module paths, kohya-style ("." -> "_").
_RESNET = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
           "skip_connection": "conv_shortcut"}


def sgm_to_diffusers(name: str) -> str:
    if m := re.fullmatch(r"input_blocks_(\d+)_(\d)_(.+)", name):
        i, kind, rest = int(m[1]), int(m[2]), m[3]
        block, j = (i - 1) // 3, (i - 1) % 3
        if j == 2:
            assert rest == "op"
            return f"down_blocks_{block}_downsamplers_0_conv"
        return (f"down_blocks_{block}_resnets_{j}_{_RESNET.get(rest, rest)}" if kind == 0
                else f"down_blocks_{block}_attentions_{j}_{rest}")
    if m := re.fullmatch(r"middle_block_(\d)_(.+)", name):
        kind, rest = int(m[1]), m[2]
        return (f"mid_block_attentions_0_{rest}" if kind == 1
                else f"mid_block_resnets_{kind // 2}_{_RESNET.get(rest, rest)}")
    if m := re.fullmatch(r"output_blocks_(\d+)_(\d)_(.+)", name):
        i, kind, rest = int(m[1]), int(m[2]), m[3]
        block, j = i // 3, i % 3
        if kind == 0:
            return f"up_blocks_{block}_resnets_{j}_{_RESNET.get(rest, rest)}"
        if kind == 1:
            return f"up_blocks_{block}_attentions_{j}_{rest}"
        assert rest == "conv"
        return f"up_blocks_{block}_upsamplers_0_conv"
    raise KeyError(name)


def _hand_merge(pipe, sd) -> int:
    index = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    for prefix, te in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for n, m in te.named_modules():
            path = n if n.startswith("text_model.") else "text_model." + n
            index[prefix + path.replace(".", "_")] = m
    names = {k.split(".")[0] for k in sd}
    with torch.no_grad():
        for name in names:
            target = name
            if name.startswith("lora_unet_"):
                target = "lora_unet_" + sgm_to_diffusers(name[len("lora_unet_"):])
            down = sd[name + ".lora_down.weight"].float()
            up = sd[name + ".lora_up.weight"].float()
            scale = sd[name + ".alpha"].float().item() / down.shape[0]
            if down.dim() == 2:
                delta = up @ down
            elif down.shape[2:] == (1, 1):
                delta = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
            else:
                delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            weight = index[target].weight
            weight += delta.reshape(weight.shape) * scale
    return len(names)


def test_names_are_kohya_sdxl(tiny_sdxl_diffusers):
    pipe = _pipe(tiny_sdxl_diffusers)
    net = _network(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, conv_dim=2)
    names = set(net.lora_by_name())
    for expected in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                     "lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_0_proj",
                     "lora_unet_input_blocks_4_1_proj_in", "lora_unet_middle_block_1_proj_out",
                     "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_out_0",
                     "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_4_0_skip_connection",
                     "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
                     "lora_unet_middle_block_2_emb_layers_1", "lora_unet_output_blocks_8_0_out_layers_3",
                     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                     "lora_te2_text_model_encoder_layers_2_mlp_fc2"):
        assert expected in names, expected
    assert not any(re.search(r"down_blocks|up_blocks|mid_block|attentions|resnets", n) for n in names)
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_", "lora_te2_text_model_")) for n in names)
    # every name goes back to the live module by the independent rule
    modules = dict(pipe.unet.named_modules())
    for lora in net.unet_loras:
        path = sgm_to_diffusers(lora.lora_name[len("lora_unet_"):])
        match = [m for n, m in modules.items() if n.replace(".", "_") == path]
        assert match and match[0] is lora.org_module, lora.lora_name
    assert len([n for n in names if n.startswith("lora_te2_")]) == 3 * 6
    groups, group_names = net.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-4)
    assert group_names == ["textencoder1", "textencoder2", "unet"] and [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]


@pytest.mark.parametrize("conv_dim, precision", [(None, "fp16"), (2, None)])
def test_diffusers_sdxl_pipeline_reproduces_hand_merge(tiny_sdxl_diffusers, tmp_path, conv_dim, precision):
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    pipe = _pipe(tiny_sdxl_diffusers)
    base = _image(pipe)
    net = _network(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, network_dim=4, network_alpha=2.0,
                   conv_dim=conv_dim, conv_alpha=1.5)
    path = tmp_path / "xl.safetensors"
    sd, _ = saved_random_lora(net, path, {"ss_base_model_version": XL.base_model_version(False)}, precision)
    assert any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in sd.values()) == (conv_dim is not None)

    reference = _pipe(tiny_sdxl_diffusers)
    merged = _hand_merge(reference, sd)
    expected = _image(reference)

    pipe.load_lora_weights(str(path))
    got = _image(pipe)
    injected = sum(isinstance(m, LoraLayer) for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
                   for m in part.modules())
    assert injected == merged == len(net.loras)
    assert abs(expected - base).max() > 0.05, "the LoRA must visibly change the image"
    assert abs(got - expected).max() < 1e-4


# --------------------------------------------------------------------------- ComfyUI's key rules

def _check_comfy(sd, key_map):
    consumed = {name + s for name in key_map for s in (".lora_up.weight", ".lora_down.weight", ".alpha")
                if name + s in sd}
    assert sorted(set(sd) - consumed) == []
    for name in {k.split(".")[0] for k in sd}:
        down, up = sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"]
        assert tuple(key_map[name]) == (up.shape[0], *down.shape[1:]), name


def test_comfyui_maps_every_key_of_a_tiny_sdxl_locon(tiny_sdxl_single_file, tiny_sdxl_diffusers):
    from safetensors import safe_open

    with safe_open(str(tiny_sdxl_single_file), "pt") as f:
        ldm_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    pipe = _pipe(tiny_sdxl_diffusers)
    sd = _network(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, conv_dim=2).kohya_state_dict()
    _check_comfy(sd, comfy_key_map_sdxl(ldm_shapes, hf_text_encoder_shapes(pipe.text_encoder),
                                        hf_text_encoder_shapes(pipe.text_encoder_2)))


def test_full_size_sdxl_module_counts_and_comfyui_map():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_scripts.models.ldm_convert import unet_ldm_key_map

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(XL.diffusers_unet_config())
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                         num_attention_heads=20, hidden_act="gelu", projection_dim=1280))
    plain = _network(unet, te1, te2)
    assert len(plain.unet_loras) == 722 and len(plain.text_encoder_loras) == 72 + 192  # kohya's counts
    net = _network(unet, te1, te2, conv_dim=4)
    assert len(net.unet_loras) == 722 + 66
    weights = unet.state_dict()
    shapes = {v: tuple(weights[k].shape) for k, v in unet_ldm_key_map(unet).items()}
    _check_comfy(net.kohya_state_dict(),
                 comfy_key_map_sdxl(shapes, hf_text_encoder_shapes(te1), hf_text_encoder_shapes(te2)))
    names = {lora.lora_name for lora in net.loras}
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_v" in names
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names


def test_diffusers_named_files_convert_to_sgm(tiny_sdxl_diffusers):
    from sd_scripts.models.sdxl_names import lora_names_to_sgm, sgm_module_path, sgm_to_diffusers_paths

    pipe = _pipe(tiny_sdxl_diffusers)
    sgm = _network(pipe.unet, pipe.text_encoder, pipe.text_encoder_2, conv_dim=2).kohya_state_dict()
    diffusers_named = create_network(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2], conv_dim=2,
                                     te_prefixes=("lora_te1", "lora_te2")).kohya_state_dict()
    assert any(k.startswith("lora_unet_down_blocks_") for k in diffusers_named)
    converted = lora_names_to_sgm(diffusers_named, pipe.unet)
    assert set(converted) == set(sgm)
    assert lora_names_to_sgm(sgm, pipe.unet).keys() == sgm.keys()
    assert sgm_module_path("mid_block.resnets.1.conv_shortcut", pipe.unet) == "middle_block.2.skip_connection"
    back = sgm_to_diffusers_paths(pipe.unet)
    assert back["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert back["input_blocks.0.0"] == "conv_in" and back["label_emb.0.0"] == "add_embedding.linear_1"
