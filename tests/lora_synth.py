"""Small synthetic LoRA / LyCORIS state dicts for the LoRA tool tests (no model needed)."""

from __future__ import annotations

import torch

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
LIN2 = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV3 = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV3B = "lora_unet_up_blocks_1_resnets_0_conv2"
SHORTCUT = "lora_unet_up_blocks_1_resnets_0_conv_shortcut"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora(name, out, inn, r, kernel=None, alpha=None, tucker=False, g=None, scale=0.1):
    g = g or gen()
    sd = {}
    if kernel is None:
        sd[f"{name}.lora_down.weight"] = torch.randn(r, inn, generator=g) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(out, r, generator=g) * scale
    elif tucker:
        sd[f"{name}.lora_down.weight"] = torch.randn(r, inn, 1, 1, generator=g) * scale
        sd[f"{name}.lora_mid.weight"] = torch.randn(r, r, kernel, kernel, generator=g) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(out, r, 1, 1, generator=g) * scale
    else:
        sd[f"{name}.lora_down.weight"] = torch.randn(r, inn, kernel, kernel, generator=g) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(out, r, 1, 1, generator=g) * scale
    sd[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else r))
    return sd


def loha(name, out, inn, r, kernel=None, alpha=None, tucker=False, g=None, scale=0.3):
    g = g or gen()
    n = inn * (kernel or 1) ** 2
    sd = {}
    if tucker:
        for i in (1, 2):
            sd[f"{name}.hada_w{i}_a"] = torch.randn(r, out, generator=g) * scale
            sd[f"{name}.hada_w{i}_b"] = torch.randn(r, inn, generator=g) * scale
            sd[f"{name}.hada_t{i}"] = torch.randn(r, r, kernel, kernel, generator=g) * scale
    else:
        for i in (1, 2):
            sd[f"{name}.hada_w{i}_a"] = torch.randn(out, r, generator=g) * scale
            sd[f"{name}.hada_w{i}_b"] = torch.randn(r, n, generator=g) * scale
    sd[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else r))
    return sd


def lokr(name, out_l, out_k, in_m, in_n, r, kernel=None, alpha=None, w1_decomposed=False, w2_decomposed=True,
         tucker=False, g=None, scale=0.3):
    g = g or gen()
    sd = {}
    if w1_decomposed:
        sd[f"{name}.lokr_w1_a"] = torch.randn(out_l, r, generator=g) * scale
        sd[f"{name}.lokr_w1_b"] = torch.randn(r, in_m, generator=g) * scale
    else:
        sd[f"{name}.lokr_w1"] = torch.randn(out_l, in_m, generator=g) * scale
    if not w2_decomposed:
        shape = (out_k, in_n) + ((kernel, kernel) if kernel else ())
        sd[f"{name}.lokr_w2"] = torch.randn(*shape, generator=g) * scale
    elif tucker:
        sd[f"{name}.lokr_t2"] = torch.randn(r, r, kernel, kernel, generator=g) * scale
        sd[f"{name}.lokr_w2_a"] = torch.randn(r, out_k, generator=g) * scale
        sd[f"{name}.lokr_w2_b"] = torch.randn(r, in_n, generator=g) * scale
    else:
        sd[f"{name}.lokr_w2_a"] = torch.randn(out_k, r, generator=g) * scale
        sd[f"{name}.lokr_w2_b"] = torch.randn(r, in_n * (kernel or 1) ** 2, generator=g) * scale
    sd[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else r))
    return sd


def mixed_lora(seed=0, r=8, conv_r=4, alpha=4.0, conv_alpha=2.0, tucker=False):
    """A LoCon with linear, 1x1 conv, 3x3 conv (optionally Tucker) and text-encoder modules."""
    g = gen(seed)
    sd = {}
    sd.update(lora(LIN, 64, 48, r, alpha=alpha, g=g))
    sd.update(lora(LIN2, 32, 96, r, alpha=alpha, g=g))
    sd.update(lora(PROJ, 32, 32, r, kernel=1, alpha=alpha, g=g))
    sd.update(lora(CONV3, 32, 16, conv_r, kernel=3, alpha=conv_alpha, tucker=tucker, g=g))
    sd.update(lora(TE, 64, 64, r, alpha=alpha, g=g))
    return sd


def low_rank_matrix(out, n, rank, g=None, decay=0.7):
    """A random matrix with a known, decaying spectrum."""
    g = g or gen()
    u, _ = torch.linalg.qr(torch.randn(out, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))
    s = torch.tensor([decay ** i for i in range(rank)], dtype=torch.float64)
    return ((u * s) @ v.T).float(), s.float()


def ldm_checkpoint(family: str = "sd1", seed: int = 0, dtype=None):
    """A tiny single-file (LDM layout) checkpoint state dict, and the diffusers parts it came from."""
    from sd_scripts.models import ldm_convert
    from sd_scripts.testing.tiny_models import build_tiny_components

    parts = build_tiny_components(family, seed=seed)
    kind = "clip" if family == "sd1" else "openclip"
    state = ldm_convert.models_to_ldm(parts["unet"], parts["vae"], parts["text_encoder"], kind)
    state = {k: v.clone() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state, parts


def lora_for_checkpoint(state, rank=4, conv_rank=2, seed=0, every=1, alpha=None, scale=0.05, text_encoder=True,
                        conv=True):
    """A random kohya LoRA/LoCon for the layers of an LDM checkpoint (every ``every``-th target)."""
    from sd_scripts.networks.ldm_lora_map import build_lora_map, lora_target_names

    g = gen(seed)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    lmap = build_lora_map(shapes)
    sd = {}
    for i, name in enumerate(lora_target_names(lmap, conv=conv, text_encoder=text_encoder, shapes=shapes)):
        if i % every:
            continue
        t = lmap[name]
        shape = shapes[t.weight_key]
        if t.rows is not None:
            shape = (t.rows[1] - t.rows[0],) + shape[1:]
        kxk = len(shape) == 4 and shape[2] > 1
        r = conv_rank if kxk else rank
        out = shape[0]
        if len(shape) == 4:
            sd[f"{name}.lora_down.weight"] = torch.randn(r, *shape[1:], generator=g) * scale
            sd[f"{name}.lora_up.weight"] = torch.randn(out, r, 1, 1, generator=g) * scale
        else:
            sd[f"{name}.lora_down.weight"] = torch.randn(r, shape[1], generator=g) * scale
            sd[f"{name}.lora_up.weight"] = torch.randn(out, r, generator=g) * scale
        sd[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else r))
    return sd


def pipeline_checkpoint(folder):
    """A tiny diffusers pipeline and its weights as an LDM checkpoint state dict (copies)."""
    from diffusers import StableDiffusionPipeline

    from sd_scripts.models import ldm_convert

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    state = ldm_convert.models_to_ldm(pipe.unet, pipe.vae, pipe.text_encoder, "clip")
    return pipe, {k: v.clone().contiguous() for k, v in state.items()}


def assert_diffusers_fuses_to(pipe, lora_path, expected_state, rtol=1e-4, atol=2e-6):
    """Load a kohya LoRA file with diffusers' ``load_lora_weights``, fuse it, and compare every UNet and
    text-encoder weight with ``expected_state`` (an LDM checkpoint state dict); returns how many matched."""
    import torch

    from sd_scripts.models import ldm_convert

    km = ldm_convert.unet_ldm_key_map(pipe.unet)
    tk = ldm_convert.text_encoder_ldm_key_map(pipe.text_encoder, "clip")
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora(lora_scale=1.0)
    checked = 0
    for model, keymap in ((pipe.unet, km), (pipe.text_encoder, tk)):
        for name, value in model.state_dict().items():
            plain = name.replace(".base_layer", "")
            if "lora_" in plain or plain not in keymap:
                continue
            torch.testing.assert_close(value, expected_state[keymap[plain]].reshape(value.shape), rtol=rtol, atol=atol)
            checked += 1
    assert checked > 200
    return checked
