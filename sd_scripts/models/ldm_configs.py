"""Model configs for single-file checkpoints: the LDM yaml (``v1-inference.yaml`` style) of a diffusers UNet/VAE pair,
and SDXL's SGM config (``network_config`` + ``conditioner_config``) written and read back
(:func:`sgm_config_from_diffusers`, :func:`unet_config_from_sgm`; diffusers' reader hard-codes the full-size
time-embedding width, so tiny models need ours). The key conversion itself is :mod:`.ldm_convert`.
"""

from __future__ import annotations

__all__ = ["config_value", "ldm_config_from_diffusers", "sgm_config_from_diffusers", "sgm_v_prediction",
           "unet_config_from_sgm"]


def config_value(config, key, default=None):
    """``key`` of a diffusers config, given as a dict or as a config object."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)  # a diffusers config object, whose keys vary by model


# ---------------------------------------------------------------------------------------------- LDM yaml config


def _vae_ddconfig(vae_config, resolution: int) -> dict:
    """The VAE's ``ddconfig`` (its block layout) in an LDM or SGM config."""
    vboc = list(config_value(vae_config, "block_out_channels"))
    return {
        "double_z": True,
        "z_channels": int(config_value(vae_config, "latent_channels")),
        "resolution": resolution,
        "in_channels": int(config_value(vae_config, "in_channels")),
        "out_ch": int(config_value(vae_config, "out_channels")),
        "ch": vboc[0],
        "ch_mult": [c // vboc[0] for c in vboc],
        "num_res_blocks": int(config_value(vae_config, "layers_per_block")),
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def ldm_config_from_diffusers(unet_config, vae_config, text_encoder_kind: str = "clip",
                              v_prediction: bool = False) -> dict:
    """An LDM-style model config (as in ``v1-inference.yaml``) describing a diffusers UNet/VAE pair.

    diffusers' ``create_unet_diffusers_config_from_ldm`` / ``create_vae_diffusers_config_from_ldm`` turn it back into
    the same block layout. Write it as ``<checkpoint stem>.yaml`` next to a single-file checkpoint.
    """
    boc = list(config_value(unet_config, "block_out_channels"))
    model_channels = boc[0]
    down_types = list(config_value(unet_config, "down_block_types"))
    heads = config_value(unet_config, "attention_head_dim")
    linear = bool(config_value(unet_config, "use_linear_projection", False))
    unet_params = {
        "image_size": int(config_value(unet_config, "sample_size")),
        "in_channels": int(config_value(unet_config, "in_channels")),
        "out_channels": int(config_value(unet_config, "out_channels")),
        "model_channels": model_channels,
        "attention_resolutions": [2 ** i for i, t in enumerate(down_types) if "CrossAttn" in t],
        "num_res_blocks": config_value(unet_config, "layers_per_block"),
        "channel_mult": [c // model_channels for c in boc],
        "use_spatial_transformer": True,
        "use_linear_in_transformer": linear,
        "transformer_depth": config_value(unet_config, "transformer_layers_per_block", 1),
        "context_dim": int(config_value(unet_config, "cross_attention_dim")),
        "use_checkpoint": True,
        "legacy": False,
    }
    if linear:
        first = heads[0] if isinstance(heads, (list, tuple)) else heads
        unet_params["num_head_channels"] = model_channels // int(first)
    else:
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ValueError("per-block head counts need use_linear_projection (SD2-style num_head_channels)")
            heads = heads[0]
        unet_params["num_heads"] = int(heads)
    ddconfig = _vae_ddconfig(vae_config, int(config_value(vae_config, "sample_size")))
    if text_encoder_kind == "openclip":
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate"}}
    else:
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    params = {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": int(config_value(unet_config, "sample_size")),
        "channels": int(config_value(unet_config, "in_channels")),
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": float(config_value(vae_config, "scaling_factor", 0.18215)),
        "use_ema": False,
    }
    if v_prediction:
        params["parameterization"] = "v"
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params}
    params["first_stage_config"] = {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": int(config_value(vae_config, "latent_channels")), "monitor": "val/rec_loss",
                   "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}},
    }
    params["cond_stage_config"] = cond
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


# ----------------------------------------------------------------------------------------- SGM (SDXL) config

_SIZE_CONDITIONS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def sgm_config_from_diffusers(unet_config, vae_config, v_prediction: bool = False) -> dict:
    """An SGM-style model config (as in ``sd_xl_base.yaml``) describing a diffusers SDXL UNet/VAE pair.

    The UNet goes in ``network_config`` (``transformer_depth`` 0 for levels without attention, as SAI writes it),
    the two text encoders and the three size/crop embedders (``outdim`` = ``addition_time_embed_dim``) in
    ``conditioner_config``. v-prediction models get SGM's ``VScaling`` denoiser. :func:`unet_config_from_sgm`
    reads it back.
    """
    boc = list(config_value(unet_config, "block_out_channels"))
    model_channels = boc[0]
    down_types = list(config_value(unet_config, "down_block_types"))
    heads = config_value(unet_config, "attention_head_dim")
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(boc)
    depth = config_value(unet_config, "transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * len(boc)
    attention = ["CrossAttn" in t for t in down_types]
    first = next(i for i, a in enumerate(attention) if a)
    time_dim = int(config_value(unet_config, "addition_time_embed_dim"))
    unet_params = {
        "adm_in_channels": int(config_value(unet_config, "projection_class_embeddings_input_dim")),
        "num_classes": "sequential",
        "use_checkpoint": True,
        "in_channels": int(config_value(unet_config, "in_channels")),
        "out_channels": int(config_value(unet_config, "out_channels")),
        "model_channels": model_channels,
        "attention_resolutions": [2 ** i for i, a in enumerate(attention) if a],
        "num_res_blocks": config_value(unet_config, "layers_per_block"),
        "channel_mult": [c // model_channels for c in boc],
        "num_head_channels": boc[first] // int(heads[first]),
        "use_spatial_transformer": True,
        "use_linear_in_transformer": bool(config_value(unet_config, "use_linear_projection", True)),
        "transformer_depth": [int(d) if a else 0 for d, a in zip(depth, attention)],
        "context_dim": int(config_value(unet_config, "cross_attention_dim")),
        "spatial_transformer_attn_type": "softmax-xformers",
        "legacy": False,
    }
    ddconfig = {"attn_type": "vanilla-xformers", **_vae_ddconfig(vae_config, 256)}
    scaling = "VScaling" if v_prediction else "EpsScaling"
    weighting = "VWeighting" if v_prediction else "EpsWeighting"
    emb_models = [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": 11}},
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
    ] + [{"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
          "params": {"outdim": time_dim}} for key in _SIZE_CONDITIONS]
    params = {
        "scale_factor": float(config_value(vae_config, "scaling_factor", 0.13025)),
        "disable_first_stage_autocast": True,
        "denoiser_config": {
            "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
            "params": {
                "num_idx": 1000,
                "weighting_config": {"target": f"sgm.modules.diffusionmodules.denoiser_weighting.{weighting}"},
                "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
                "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
            },
        },
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": emb_models}},
        "first_stage_config": {
            "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
            "params": {"embed_dim": int(config_value(vae_config, "latent_channels")), "monitor": "val/rec_loss",
                       "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}},
        },
    }
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}


def sgm_v_prediction(ldm_config: dict) -> bool | None:
    """True/False when an SGM config names its denoiser scaling (``VScaling`` = v-prediction), else None."""
    params = ldm_config.get("model", {}).get("params", {})
    scaling = (((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {}).get("target")
    if not scaling:
        return None
    return str(scaling).rsplit(".", 1)[-1] == "VScaling"


def unet_config_from_sgm(ldm_config: dict, sample_size: int = 128) -> dict:
    """A diffusers ``UNet2DConditionModel`` config from an SGM (SDXL) model config.

    ``addition_time_embed_dim`` comes from the size/crop embedders' ``outdim`` (256 for SDXL when the config does not
    list them); the head count of each level is its width / ``num_head_channels``.
    """
    params = ldm_config["model"]["params"]
    unet = dict((params.get("network_config") or params.get("unet_config") or {}).get("params") or {})
    if not unet:
        raise KeyError("network_config")
    mc = int(unet["model_channels"])
    mult = [int(m) for m in unet["channel_mult"]]
    boc = [mc * m for m in mult]
    attention_res = {int(r) for r in unet["attention_resolutions"]}
    attention = [2 ** i in attention_res for i in range(len(boc))]
    depth = unet.get("transformer_depth", 1)
    depth = [int(d) for d in depth] if isinstance(depth, (list, tuple)) else [int(depth)] * len(boc)
    if "num_head_channels" in unet and int(unet["num_head_channels"]) > 0:
        heads = [c // int(unet["num_head_channels"]) for c in boc]
    else:
        heads = [int(unet["num_heads"])] * len(boc)
    time_dim = 256
    conditioner = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    for emb in conditioner:
        if emb.get("input_key") in _SIZE_CONDITIONS and (emb.get("params") or {}).get("outdim"):
            time_dim = int(emb["params"]["outdim"])
            break
    context = unet["context_dim"]
    context = int(context if isinstance(context, int) else context[0])
    return {
        "sample_size": int(sample_size),
        "in_channels": int(unet["in_channels"]),
        "out_channels": int(unet["out_channels"]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": boc,
        "layers_per_block": int(unet["num_res_blocks"]),
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": bool(unet.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": [max(1, d) for d in depth],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": int(unet["adm_in_channels"]),
    }
