"""The kohya LoRA/LoCon network: targets, key names, tensors, forward, dropout, loading."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from sd_scripts.core.errors import ConfigError
from sd_scripts.files import lora_keys
from sd_scripts.networks.lora import (
    LoRAModule,
    create_network,
    create_network_from_weights,
    dims_from_state_dict,
    lora_delta_weight,
    parse_network_args,
    split_network_args,
)

KEY_RE = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
TE_Q0 = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def sd1():
    from sd_scripts.testing.tiny_models import build_tiny_components

    parts = build_tiny_components("sd1", seed=0)
    parts["unet"].eval()
    parts["text_encoder"].eval()
    return parts


@pytest.fixture(scope="module")
def sd2():
    from sd_scripts.testing.tiny_models import build_tiny_components

    parts = build_tiny_components("sd2", seed=0)
    parts["unet"].eval()
    return parts


@pytest.fixture(scope="module")
def full_size_meta():
    """SD1.5 / SD2 UNets and CLIP-L / OpenCLIP-H text encoders at full size on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet1 = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12))
        unet2 = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                     use_linear_projection=True)
        clip_h = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                              num_attention_heads=16, hidden_act="gelu"))
    return {"unet1": unet1, "clip_l": clip_l, "unet2": unet2, "clip_h": clip_h}


def _randomize_ups(network, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * std)


def _unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500]), hidden


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


# --------------------------------------------------------------------------- targets and names

def test_module_counts_match_kohya_on_full_size_sd1_and_sd2(full_size_meta):
    m = full_size_meta
    net = create_network(m["unet1"], [m["clip_l"]])
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (192, 72)
    locon = create_network(m["unet1"], [m["clip_l"]], conv_dim=4, conv_alpha=1)
    assert (len(locon.unet_loras), len(locon.text_encoder_loras)) == (278, 72)
    assert len(locon.kohya_state_dict()) == 3 * (278 + 72)
    net2 = create_network(m["unet2"], [m["clip_h"]])
    assert (len(net2.unet_loras), len(net2.text_encoder_loras)) == (192, 138)


def test_full_size_names_are_kohya_names(full_size_meta):
    m = full_size_meta
    names = {lora.lora_name for lora in create_network(m["unet1"], [m["clip_l"]], conv_dim=4).loras}
    for expected in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_1_resnets_0_conv1",
        "lora_unet_down_blocks_1_resnets_0_time_emb_proj",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        TE_Q0,
        "lora_te_text_model_encoder_layers_11_mlp_fc2",
    ):
        assert expected in names
    # transformers 5.6+ has no .text_model submodule: the flattened spelling must never be written
    assert not any(n.startswith("lora_te_encoder_") for n in names)
    per_layer = sorted(n[len("lora_te_text_model_encoder_layers_0_"):] for n in names
                       if n.startswith("lora_te_text_model_encoder_layers_0_"))
    assert per_layer == ["mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_out_proj", "self_attn_q_proj",
                         "self_attn_v_proj"]


def test_tiny_sd1_keys_and_shapes(sd1):
    net = create_network(sd1["unet"], [sd1["text_encoder"]], network_dim=4, network_alpha=2)
    assert (len(net.unet_loras), len(net.text_encoder_loras)) == (48, 18)
    sd = net.kohya_state_dict()
    assert all(KEY_RE.match(k) for k in sd), [k for k in sd if not KEY_RE.match(k)]
    parsed = lora_keys.group_by_module(sd)
    assert parsed.is_plain_lora() and len(parsed.modules) == 66
    assert TE_Q0 + ".lora_down.weight" in sd
    # SD1 proj_in is a 1x1 conv: 4-D LoRA tensors
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    channels = sd1["unet"].down_blocks[0].attentions[0].proj_in.in_channels
    assert sd[name + ".lora_down.weight"].shape == (4, channels, 1, 1)
    assert sd[name + ".lora_up.weight"].shape == (channels, 4, 1, 1)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd[q + ".lora_down.weight"].shape == (4, 64)  # cross-attention dim of the tiny CLIP
    alpha = sd[name + ".alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == 2.0
    assert not any(k.endswith(".lora_up.weight") and v.abs().sum() != 0 for k, v in sd.items())


def test_tiny_sd2_proj_in_is_linear(sd2):
    net = create_network(sd2["unet"], [sd2["text_encoder"]], network_dim=3)
    sd = net.kohya_state_dict()
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert sd[name + ".lora_down.weight"].dim() == 2 and sd[name + ".lora_down.weight"].shape[0] == 3
    assert sd[name + ".lora_up.weight"].dim() == 2


def test_locon_targets_resnets_with_conv_dim(sd1):
    net = create_network(sd1["unet"], None, train_text_encoder=False, network_dim=4, network_alpha=1,
                         conv_dim=2, conv_alpha=0.5)
    by_name = net.lora_by_name()
    conv1 = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv1.lora_down.weight.shape[0] == 2 and conv1.lora_down.weight.shape[2:] == (3, 3)
    assert conv1.lora_up.weight.shape[2:] == (1, 1)
    assert conv1.scale == pytest.approx(0.25)
    emb = by_name["lora_unet_down_blocks_0_resnets_0_time_emb_proj"]
    assert emb.lora_dim == 4 and emb.lora_down.weight.dim() == 2  # Linear: network_dim
    shortcut = by_name["lora_unet_down_blocks_1_resnets_0_conv_shortcut"]
    assert shortcut.lora_dim == 4 and shortcut.lora_down.weight.shape[2:] == (1, 1)  # 1x1: network_dim
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in by_name
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in by_name
    assert not any(n.startswith("lora_te") for n in by_name)
    # stride of the downsampler is kept, so the adapted conv still has the right output size
    down = by_name["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert down.lora_down.stride == down.org_module.stride
    assert len(net.unet_loras) == 79


def test_train_flags_select_parts(sd1):
    unet_only = create_network(sd1["unet"], [sd1["text_encoder"]], train_text_encoder=False)
    te_only = create_network(sd1["unet"], [sd1["text_encoder"]], train_unet=False)
    assert not unet_only.text_encoder_loras and len(unet_only.unet_loras) == 48
    assert not te_only.unet_loras and len(te_only.text_encoder_loras) == 18


def test_alpha_none_or_zero_means_dim(sd1):
    for alpha in (None, 0):
        net = create_network(sd1["unet"], None, train_text_encoder=False, network_dim=8, network_alpha=alpha)
        lora = net.unet_loras[0]
        expected = 1.0 if alpha is None else 8.0  # None -> kohya default 1.0; 0 -> alpha = dim
        assert lora.alpha.item() == expected


def test_bad_settings_raise_config_errors(sd1):
    with pytest.raises(ConfigError, match="network_dim"):
        create_network(sd1["unet"], None, network_dim=0)
    with pytest.raises(ConfigError, match="network_dropout"):
        create_network(sd1["unet"], None, dropout=1.5)
    with pytest.raises(ConfigError, match="network_args.*rank_dropout"):
        create_network(sd1["unet"], None, rank_dropout=-0.1)


# --------------------------------------------------------------------------- forward

def test_forward_equals_base_at_init_and_remove_restores(sd1):
    unet, te = sd1["unet"], sd1["text_encoder"]
    inputs = _unet_inputs(unet)
    ids = torch.tensor([[49406, 1, 2, 3, 49407]]) % te.config.vocab_size
    base_unet = _unet_out(unet, inputs)
    with torch.no_grad():
        base_te = te(ids).last_hidden_state
    net = create_network(unet, [te], conv_dim=2)
    net.apply_to()
    net.apply_to()  # idempotent
    assert net.applied
    assert torch.equal(_unet_out(unet, inputs), base_unet)
    with torch.no_grad():
        assert torch.equal(te(ids).last_hidden_state, base_te)
    _randomize_ups(net)
    changed = _unet_out(unet, inputs)
    assert (changed - base_unet).abs().max() > 1e-3
    net.remove()
    assert not net.applied
    for lora in net.loras:
        assert "forward" not in lora.org_module.__dict__
    assert torch.equal(_unet_out(unet, inputs), base_unet)


def test_forward_formula_linear_and_conv():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    lora = LoRAModule("lora_unet_x", lin, lora_dim=3, alpha=1.5)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(2, 7, 6)
    expected = nn.functional.linear(x, lin.weight, lin.bias) + x @ lora.lora_down.weight.T @ lora.lora_up.weight.T * 0.5
    assert torch.allclose(lin(x), expected, atol=1e-6)
    lora.multiplier = 0.25
    expected = nn.functional.linear(x, lin.weight, lin.bias) + x @ lora.lora_down.weight.T @ lora.lora_up.weight.T * 0.125
    assert torch.allclose(lin(x), expected, atol=1e-6)

    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    lc = LoRAModule("lora_unet_c", conv, lora_dim=2, alpha=4)
    nn.init.normal_(lc.lora_up.weight)
    lc.apply_to()
    x = torch.randn(2, 4, 9, 9)
    merged = conv.weight + lora_delta_weight(lc.lora_down.weight, lc.lora_up.weight, 2.0)
    assert torch.allclose(conv(x), nn.functional.conv2d(x, merged, conv.bias, stride=2, padding=1), atol=1e-5)


def test_delta_weight_matches_kohya_conv_formula():
    torch.manual_seed(0)
    down, up = torch.randn(3, 5, 3, 3), torch.randn(7, 3, 1, 1)
    kohya = nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    assert torch.allclose(lora_delta_weight(down, up, 1.0), kohya, atol=1e-5)
    d2, u2 = torch.randn(3, 5), torch.randn(7, 3)
    assert torch.allclose(lora_delta_weight(d2, u2, 0.5), u2 @ d2 * 0.5)


def test_merge_to_equals_applied_forward():
    from sd_scripts.testing.tiny_models import build_tiny_components

    unet = build_tiny_components("sd1", seed=0)["unet"].eval()
    inputs = _unet_inputs(unet)
    net = create_network(unet, None, train_text_encoder=False, conv_dim=2, network_alpha=2)
    _randomize_ups(net)
    net.apply_to()
    applied = _unet_out(unet, inputs)
    with pytest.raises(RuntimeError):
        net.merge_to()
    net.remove()
    net.merge_to()
    assert torch.allclose(_unet_out(unet, inputs), applied, atol=1e-4)


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    lora = LoRAModule("lora_unet_x", lin, lora_dim=4, alpha=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.3)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    x = torch.randn(4, 3, 8)
    full = nn.functional.linear(x, lin.weight, lin.bias) + x @ lora.lora_down.weight.T @ lora.lora_up.weight.T
    lora.eval()
    assert torch.allclose(lin(x), full, atol=1e-6)
    assert torch.equal(lin(x), lin(x))
    lora.train()
    outs = []
    for seed in range(6):
        torch.manual_seed(seed)
        outs.append(lin(x))
    assert any(not torch.allclose(o, full, atol=1e-6) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(3)
    again = lin(x)
    assert torch.equal(again, outs[3])  # randomness comes from torch's generator only

    # module_dropout alone: every training output is either the base output or the full one
    lora2 = LoRAModule("lora_unet_y", nn.Linear(8, 8), lora_dim=4, alpha=4, module_dropout=0.5)
    nn.init.normal_(lora2.lora_up.weight)
    lora2.apply_to()
    base = nn.functional.linear(x, lora2.org_module.weight, lora2.org_module.bias)
    seen = set()
    lora2.train()
    for seed in range(12):
        torch.manual_seed(seed)
        y = lora2.org_module(x)
        seen.add("base" if torch.allclose(y, base) else "lora")
    assert seen == {"base", "lora"}


def test_rank_dropout_mask_shapes_for_conv():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    lora = LoRAModule("lora_unet_c", conv, lora_dim=2, alpha=2, rank_dropout=0.5)
    nn.init.normal_(lora.lora_up.weight)
    lora.apply_to()
    lora.train()
    assert conv(torch.randn(2, 3, 5, 5)).shape == (2, 4, 5, 5)
    emb = nn.Linear(3, 4)
    lora_e = LoRAModule("lora_unet_e", emb, lora_dim=2, rank_dropout=0.5)
    lora_e.apply_to()
    lora_e.train()
    assert emb(torch.randn(2, 3)).shape == (2, 4)


def test_remove_restores_an_existing_instance_forward():
    lin = nn.Linear(2, 2)

    def custom(x):
        return x * 0

    lin.forward = custom
    lora = LoRAModule("lora_unet_x", lin, lora_dim=1)
    lora.apply_to()
    assert lin.forward == lora.forward
    lora.remove()
    assert lin.forward is custom


def test_set_multiplier(sd1):
    net = create_network(sd1["unet"], [sd1["text_encoder"]])
    net.set_multiplier(0.3)
    assert all(lora.multiplier == 0.3 for lora in net.loras)


# --------------------------------------------------------------------------- optimizer groups

def test_prepare_optimizer_params(sd1):
    net = create_network(sd1["unet"], [sd1["text_encoder"]])
    groups, names = net.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert names == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]
    assert len(groups[0]["params"]) == 2 * 18 and len(groups[1]["params"]) == 2 * 48
    groups, names = net.prepare_optimizer_params(None, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups, names = net.prepare_optimizer_params(0, 2e-4, 1e-3)
    assert names == ["unet"] and groups[0]["lr"] == 2e-4
    assert not any(p.requires_grad for lora in net.text_encoder_loras for p in lora.parameters())
    assert all(p.requires_grad for lora in net.unet_loras for p in lora.parameters())
    torch.optim.AdamW(groups)  # the groups are accepted by an optimizer


# --------------------------------------------------------------------------- state dict loading

def test_continue_from_weights_round_trip(sd1, tmp_path):
    from sd_scripts.files.lora_file import load_lora_file, save_lora_file

    unet, te = sd1["unet"], sd1["text_encoder"]
    a = create_network(unet, [te], network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    _randomize_ups(a)
    path = tmp_path / "a.safetensors"
    save_lora_file(path, a.kohya_state_dict(), {"ss_network_dim": "4"}, None)
    sd, _ = load_lora_file(path)

    torch.manual_seed(123)
    b = create_network(unet, [te], network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    result = b.load_kohya_state_dict(sd, strict=True)
    assert not result.missing and not result.unexpected
    sa, sb = a.kohya_state_dict(), b.kohya_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    inputs = _unet_inputs(unet)
    a.apply_to()
    out_a = _unet_out(unet, inputs)
    a.remove()
    b.apply_to()
    out_b = _unet_out(unet, inputs)
    b.remove()
    assert torch.equal(out_a, out_b)

    # a file written with the flattened text-encoder names (tools on transformers 5.6+) loads too
    flat = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in sd.items()}
    assert any(k.startswith("lora_te_encoder_layers_0_") for k in flat)
    c = create_network(unet, [te], network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    assert not c.load_kohya_state_dict(flat, strict=True).unexpected
    assert torch.equal(c.kohya_state_dict()[TE_Q0 + ".lora_up.weight"], sa[TE_Q0 + ".lora_up.weight"])


def test_load_takes_alpha_from_the_file(sd1):
    a = create_network(sd1["unet"], None, train_text_encoder=False, network_dim=4, network_alpha=2)
    sd = a.kohya_state_dict()
    name = a.unet_loras[0].lora_name
    sd[name + ".alpha"] = torch.tensor(8.0)
    b = create_network(sd1["unet"], None, train_text_encoder=False, network_dim=4, network_alpha=1)
    b.load_kohya_state_dict(sd)
    assert b.lora_by_name()[name].scale == 2.0
    del sd[name + ".alpha"]  # missing alpha means alpha = rank
    b.load_kohya_state_dict(sd)
    assert b.lora_by_name()[name].scale == 1.0


def test_load_errors_name_network_weights(sd1):
    a = create_network(sd1["unet"], [sd1["text_encoder"]], network_dim=4)
    sd = a.kohya_state_dict()
    b8 = create_network(sd1["unet"], [sd1["text_encoder"]], network_dim=8)
    with pytest.raises(ConfigError, match="network_weights.*dim_from_weights"):
        b8.load_kohya_state_dict(sd)
    unet_only = create_network(sd1["unet"], None, train_text_encoder=False, network_dim=4)
    result = unet_only.load_kohya_state_dict(sd)
    assert len(result.unexpected) == 18 and not result.missing
    with pytest.raises(ConfigError, match="network_weights"):
        unet_only.load_kohya_state_dict(sd, strict=True)
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(1)}
    with pytest.raises(ConfigError, match="network_weights.*hada_w1_a"):
        a.load_kohya_state_dict(loha)


def test_dim_from_weights(sd1):
    unet, te = sd1["unet"], sd1["text_encoder"]
    a = create_network(unet, [te], network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    _randomize_ups(a)
    sd = a.kohya_state_dict()
    # make it uneven: one module of rank 6, one module dropped, one alpha missing
    name6 = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    in_dim = sd[name6 + ".lora_down.weight"].shape[1]
    out_dim = sd[name6 + ".lora_up.weight"].shape[0]
    sd[name6 + ".lora_down.weight"] = torch.randn(6, in_dim)
    sd[name6 + ".lora_up.weight"] = torch.randn(out_dim, 6)
    sd[name6 + ".alpha"] = torch.tensor(3.0)
    dropped = "lora_unet_down_blocks_0_resnets_0_conv1"
    for suffix in lora_keys.LORA_SUFFIXES:
        del sd[dropped + suffix]
    no_alpha = TE_Q0
    del sd[no_alpha + ".alpha"]

    dims = dims_from_state_dict(sd)
    assert dims[name6] == (6, 3.0)
    assert dims["lora_unet_down_blocks_0_resnets_0_conv2"] == (2, 1.0)
    assert dims[no_alpha] == (4, 4.0)
    assert dropped not in dims

    b = create_network_from_weights(unet, [te], sd)
    sb = b.kohya_state_dict()
    assert set(sb) == set(sd) | {no_alpha + ".alpha"}
    for k, v in sd.items():
        assert torch.equal(sb[k], v.float()), k
    assert sb[no_alpha + ".alpha"].item() == 4.0
    assert b.lora_by_name()[name6].scale == 0.5

    # the same through create_network(weights_sd=...), as the trainer calls it
    c = create_network(unet, [te], network_dim=32, weights_sd=sd)
    assert set(c.kohya_state_dict()) == set(sb)

    # a module the model does not have
    alien = dict(sd)
    alien["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 3)
    alien["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(3, 2)
    with pytest.raises(ConfigError, match="network_weights"):
        create_network_from_weights(unet, [te], alien)
    with pytest.raises(ConfigError, match="network_weights"):
        dims_from_state_dict({"model.diffusion_model.x.weight": torch.zeros(1)})
    # text-encoder modules of a file are ignored when the text encoder is not trained
    d = create_network_from_weights(unet, [te], sd, train_text_encoder=False)
    assert not d.text_encoder_loras and len(d.unet_loras) == len([n for n in dims if n.startswith("lora_unet")])


# --------------------------------------------------------------------------- network_args

def test_parse_network_args():
    known, unknown = parse_network_args(["conv_dim=4", "conv_alpha = 0.5", "rank_dropout=0.1", "module_dropout=0",
                                         "dropout=None", "algo=locon", "block_dims=1,2,3"])
    assert known == {"conv_dim": 4, "conv_alpha": 0.5, "rank_dropout": 0.1, "module_dropout": 0.0, "dropout": None}
    assert isinstance(known["conv_dim"], int)
    assert unknown == {"algo": "locon", "block_dims": "1,2,3"}
    assert split_network_args(["conv_dim=4", "algo=locon"]) == {"conv_dim": "4", "algo": "locon"}
    assert parse_network_args(None) == ({}, {})
    assert parse_network_args({"conv_dim": 8})[0] == {"conv_dim": 8}
    with pytest.raises(ConfigError, match="network_args.*conv_dim"):
        parse_network_args(["conv_dim=four"])
    with pytest.raises(ConfigError, match="network_args.*conv_dim"):
        parse_network_args(["conv_dim=2.5"])
    with pytest.raises(ConfigError, match="network_args.*dropout"):
        parse_network_args(["rank_dropout=abc"])
    with pytest.raises(ConfigError, match="network_args"):
        parse_network_args(["conv_dim"])
    err = pytest.raises(ConfigError, parse_network_args, ["conv_alpha=x"]).value
    assert "\n" not in str(err) and err.setting == "network_args"


# --------------------------------------------------------------------------- lora_keys

def test_lora_keys_names_and_spellings():
    assert lora_keys.lora_name("lora_unet", "mid_block.attentions.0.proj_in") == "lora_unet_mid_block_attentions_0_proj_in"
    assert lora_keys.lora_name("lora_te", "encoder.layers.0.self_attn.q_proj") == TE_Q0
    assert lora_keys.lora_name("lora_te", "text_model.encoder.layers.0.self_attn.q_proj") == TE_Q0
    assert lora_keys.lora_name("lora_te2", "encoder.layers.31.mlp.fc2") == "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    assert lora_keys.canonical_lora_name("lora_te_encoder_layers_0_self_attn_q_proj") == TE_Q0
    assert lora_keys.canonical_lora_name(TE_Q0) == TE_Q0
    assert lora_keys.canonical_lora_name("lora_unet_encoder_x") == "lora_unet_encoder_x"
    assert lora_keys.lora_name_spellings(TE_Q0) == (TE_Q0, "lora_te_encoder_layers_0_self_attn_q_proj")
    assert lora_keys.prefix_of("lora_te1_text_model_x") == "lora_te1"
    assert lora_keys.prefix_of("lora_te_text_model_x") == "lora_te"
    assert lora_keys.prefix_of("lycoris_x") is None
    assert lora_keys.split_key(TE_Q0 + ".lora_down.weight") == (TE_Q0, "lora_down.weight")
    parsed = lora_keys.group_by_module({
        "lora_te_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 3),
        "lora_te_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3, 2),
        "text_model.x": torch.zeros(1),
    })
    assert list(parsed.modules) == ["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert parsed.other_keys == ["text_model.x"]
    assert parsed.rank("lora_te_text_model_encoder_layers_0_mlp_fc1") == 2
    assert parsed.alpha("lora_te_text_model_encoder_layers_0_mlp_fc1") == 2.0
    assert not parsed.is_plain_lora()


def test_resolve_names_maps_file_names_to_live_modules(sd1):
    names = [TE_Q0, "lora_te_encoder_layers_1_mlp_fc2", "lora_unet_mid_block_attentions_0_proj_out", "lora_unet_nope"]
    found, missing = lora_keys.resolve_names(names, {"lora_unet": sd1["unet"], "lora_te": sd1["text_encoder"]})
    assert missing == ["lora_unet_nope"]
    assert found["lora_te_text_model_encoder_layers_1_mlp_fc2"][1].endswith("layers.1.mlp.fc2")
    assert found["lora_unet_mid_block_attentions_0_proj_out"] == ("lora_unet", "mid_block.attentions.0.proj_out")


# --------------------------------------------------------------------------- DyLoRA (networks.dylora)

def _dylora(layer, dim=4, unit=2, alpha=2.0):
    from sd_scripts.networks.dylora import DyLoRAModule

    module = DyLoRAModule("lora_unet_x", layer, lora_dim=dim, alpha=alpha, unit=unit)
    with torch.no_grad():
        for b in module.lora_B:
            b.normal_()
    module.apply_to()
    return module


def test_dylora_trains_one_random_slice_at_full_rank_scale():
    import random

    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    module = _dylora(layer)
    x = torch.randn(3, 6)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        down, up = module.down_weight(), module.up_weight()
    ranks = set()
    for seed in range(8):
        random.seed(seed)
        module.train()
        for p in module.parameters():
            p.grad = None
        y = layer(x)
        b = module.last_rank
        ranks.add(b)
        assert b % 2 == 0
        # all ranks in the forward, scaled alpha/dim * sqrt(dim / (b + unit)) (kohya)
        expected = base + (x @ down.T @ up.T) * 0.5 * math.sqrt(4 / (b + 2))
        assert torch.allclose(y, expected, atol=1e-6)
        y.sum().backward()
        with_grad = [i for i, p in enumerate(module.lora_A) if p.grad is not None]
        assert with_grad == [b, b + 1]
        assert [i for i, p in enumerate(module.lora_B) if p.grad is not None] == [b, b + 1]
    assert ranks == {0, 2}
    # outside training (sampling): full rank, alpha/dim, = the saved file merged
    module.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), base + x @ module.delta_weight().T, atol=1e-6)


def test_dylora_optimizer_leaves_other_ranks_alone():
    import random

    layer = nn.Linear(6, 5)
    module = _dylora(layer)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.1)
    before = [p.detach().clone() for p in module.parameters()]
    random.seed(1)
    layer(torch.randn(2, 6)).pow(2).sum().backward()
    opt.step()
    b = module.last_rank
    params = list(module.parameters())
    changed = {i for i, (p, q) in enumerate(zip(params, before)) if not torch.equal(p, q)}
    expected = {b, b + 1, 4 + b, 4 + b + 1}  # lora_A[b..b+1], lora_B[b..b+1]
    assert changed == expected


def test_dylora_conv_state_dict_and_load():
    torch.manual_seed(0)
    conv3 = nn.Conv2d(3, 5, 3, padding=1)
    m3 = _dylora(conv3)
    conv1 = nn.Conv2d(3, 5, 1)
    m1 = _dylora(conv1)
    sd3, sd1 = m3.kohya_tensors(), m1.kohya_tensors()
    assert sd3["lora_unet_x.lora_down.weight"].shape == (4, 3, 3, 3)
    assert sd3["lora_unet_x.lora_up.weight"].shape == (5, 4, 1, 1)
    assert sd1["lora_unet_x.lora_down.weight"].shape == (4, 3, 1, 1)
    m3.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        merged = torch.nn.functional.conv2d(x, conv3.weight + m3.delta_weight(), conv3.bias, padding=1)
        assert torch.allclose(conv3(x), merged, atol=1e-5)
    other = _dylora(nn.Conv2d(3, 5, 3, padding=1))
    other.load_kohya_tensors(sd3["lora_unet_x.lora_down.weight"], sd3["lora_unet_x.lora_up.weight"], 3.0, "network_weights")
    assert torch.equal(other.down_weight(), m3.down_weight()) and torch.equal(other.up_weight(), m3.up_weight())
    assert other.scale == 3.0 / 4
    with pytest.raises(ConfigError, match="network_weights.*shape"):
        _dylora(nn.Conv2d(3, 5, 3), dim=2).load_kohya_tensors(sd3["lora_unet_x.lora_down.weight"],
                                                              sd3["lora_unet_x.lora_up.weight"], 1.0, "network_weights")


@pytest.mark.parametrize("args, needle", [
    (["unit=3"], "unit=3 must divide network_dim 4"),
    (["unit=0"], "unit"),
    (["unit=x"], "unit=x"),
    (["unit=2", "conv_dim=8"], "conv_dim=8 must equal network_dim 4"),
])
def test_dylora_bad_settings(tmp_path, args, needle):
    from sd_scripts.networks.factory import check_network_settings
    from tests.helpers import tiny_config

    config = tiny_config(tmp_path, tmp_path, tmp_path / "out", network_module="networks.dylora", network_args=args)
    with pytest.raises(ConfigError, match=needle) as err:
        check_network_settings(config)
    assert err.value.setting == "network_args"


def test_dylora_trains_end_to_end(tiny_sd1_diffusers, tmp_path):
    import json

    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sd_scripts.training.loop import train
    from tests.helpers import make_dataset, tiny_config

    data = make_dataset(tmp_path / "data", count=2)
    args = ["unit=2", "conv_dim=4", "conv_alpha=1"]
    result = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "out", network_module="networks.dylora",
                               network_args=args, max_train_steps=3, train_batch_size=1, learning_rate=1e-2))
    sd = load_file(result.output_path)
    downs = {k: v for k, v in sd.items() if k.endswith("lora_down.weight")}
    assert downs and all(v.shape[0] == 4 for v in downs.values())  # saved at full rank
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert float(sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    with safe_open(result.output_path, "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.dylora"
    assert json.loads(md["ss_network_args"]) == {"unit": "2", "conv_dim": "4", "conv_alpha": "1"}
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_diffusers), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(result.output_path)  # a plain kohya LoRA file
    # continue from the file (network_weights): the network starts from its weights
    again = train(tiny_config(tiny_sd1_diffusers, data, tmp_path / "again", network_module="networks.dylora",
                              network_args=args, network_weights=result.output_path, max_train_steps=1,
                              train_batch_size=1, learning_rate=1e-12))
    sd2 = load_file(again.output_path)
    assert set(sd2) == set(sd) and all(torch.allclose(sd[k], sd2[k], atol=1e-6) for k in sd)
