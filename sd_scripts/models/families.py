"""Model families: each family's facts and its conditioning/prediction steps behind one small interface.

The training loop, metadata writer and sampler only call the interface (``latent_scale``, ``encode_prompts``,
``predict``, ``build_pipeline``, ``base_model_version`` ...), never branch on a family's name; loading and detection
read each family's facts (text encoders, LDM key prefixes, tokenizer sources, built-in configs). Adding a family
means one more subclass registered with ``register_family``, and no change to the training loop.

SDXL (``SDXLFamily``): two text encoders (CLIP-L and OpenCLIP bigG with its projection); the conditioning is
``{"encoder_hidden_states": [B, L, 768+1280], "text_embeds": [B, 1280]}`` (both penultimate layers without the final
norm, the pooled output of the second), and ``predict`` adds the per-sample size/crop conditioning from the batch
(``original_sizes_hw``, ``crop_top_lefts``, ``target_sizes_hw``). LoRA files name the UNet by its original SGM
layout (``lora_unet_input_blocks_4_1_...``): ``lora_unet_path_map`` gives ``networks.lora`` that mapping.

``check_family_settings(config, family, dataset)`` holds the setting checks that depend on the family (SDXL
text-encoder output caching, SDXL warnings); preflight calls it.
"""

from __future__ import annotations

from typing import Any, Mapping

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError
from sd_scripts.core.problems import Problems
from sd_scripts.core.setting import is_number
from sd_scripts.core.settings import engine_settings
from sd_scripts.models.family_base import ModelFamily, TextEncoderSpec, TokenizerSource
from sd_scripts.models.flux.family import FluxFamily

__all__ = [
    "FAMILIES",
    "FluxFamily",
    "ModelFamily",
    "SD1Family",
    "SD2Family",
    "SDXLFamily",
    "TextEncoderSpec",
    "TokenizerSource",
    "check_family_settings",
    "get_family",
    "register_family",
    "requested_family",
]


class SD1Family(ModelFamily):
    name = "sd1"
    version_tag = "v1"
    context_dim = 768
    te_hidden_act = "quick_gelu"
    text_encoder_kinds = ("clip",)
    ldm_text_encoder_prefix = "cond_stage_model.transformer."
    tokenizer_sources = (TokenizerSource("openai/clip-vit-large-patch14", None, "openai_clip-vit-large-patch14"),)

    def modelspec_architecture(self, v_parameterization: bool, model=None) -> str:
        return "stable-diffusion-v1/lora"

    def diffusers_unet_config(self, v_parameterization: bool = False) -> dict:
        return {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "use_linear_projection": False,
        }


class SD2Family(ModelFamily):
    name = "sd2"
    version_tag = "v2"
    ss_v2 = True
    v_resolution = 768
    context_dim = 1024
    te_hidden_act = "gelu"
    text_encoder_kinds = ("openclip",)
    ldm_text_encoder_prefix = "cond_stage_model.model."
    tokenizer_sources = (TokenizerSource("stabilityai/stable-diffusion-2", "tokenizer", "stabilityai_stable-diffusion-2"),)

    def modelspec_architecture(self, v_parameterization: bool, model=None) -> str:
        return "stable-diffusion-v2-768-v/lora" if v_parameterization else "stable-diffusion-v2-512/lora"

    def diffusers_unet_config(self, v_parameterization: bool = False) -> dict:
        """SD1's UNet with 1024-wide cross-attention, 64-wide heads and linear projections."""
        return {**SD1Family.diffusers_unet_config(self), "sample_size": self.resolution_for(v_parameterization) // 8,
                "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}


class SDXLFamily(ModelFamily):
    """Stable Diffusion XL base (and its derivatives: Pony, Illustrious, NoobAI ...)."""

    name = "sdxl"
    latent_scale = 0.13025
    default_resolution = 1024
    v_resolution = 1024
    bucket_step = 32  # the UNet downsamples latents 4x: sides that are multiples of 32 px
    min_bucket_reso = 512
    max_bucket_reso = 2048
    context_dim = 2048
    te_hidden_act = "quick_gelu"
    text_encoder_kinds = ("clip", "openclip")
    ldm_text_encoder_prefix = "conditioner.embedders.0.transformer."
    tokenizer_sources = (
        TokenizerSource("openai/clip-vit-large-patch14", None, "openai_clip-vit-large-patch14"),
        TokenizerSource("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None, "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
                        pad_token="!"),
    )
    _te_lora_prefixes = ("lora_te1", "lora_te2")
    hidden_layer = -2  # both text encoders: penultimate layer, no final norm (kohya: TE1 hidden_states[11])

    @property
    def text_encoder_specs(self) -> tuple[TextEncoderSpec, ...]:
        return (
            TextEncoderSpec("clip", "conditioner.embedders.0.transformer.", "quick_gelu", "text_encoder"),
            TextEncoderSpec("openclip", "conditioner.embedders.1.model.", "gelu", "text_encoder_2", with_projection=True),
        )

    def base_model_version(self, v_parameterization: bool) -> str:
        """kohya writes ``sdxl_base_v1-0`` for every SDXL LoRA (v-prediction shows in ``modelspec.prediction_type``)."""
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, v_parameterization: bool, model=None) -> str:
        return "stable-diffusion-xl-v1-base/lora"

    def diffusers_unet_config(self, v_parameterization: bool = False) -> dict:
        return {
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "use_linear_projection": True,
            "transformer_layers_per_block": [1, 2, 10],
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        }

    def diffusers_vae_config(self, v_parameterization: bool = False) -> dict:
        config = super().diffusers_vae_config(v_parameterization)
        config["force_upcast"] = True
        return config

    def builtin_ldm_config(self, v_parameterization: bool = False) -> dict:
        from sd_scripts.models.ldm_convert import sgm_config_from_diffusers

        return sgm_config_from_diffusers(self.diffusers_unet_config(v_parameterization),
                                         self.diffusers_vae_config(v_parameterization), v_parameterization)

    def unet_config_from_ldm(self, ldm_config: dict, checkpoint: dict) -> dict:
        from sd_scripts.models.ldm_convert import unet_config_from_sgm

        return unet_config_from_sgm(ldm_config, sample_size=self.default_resolution // 8)

    def v_from_ldm_config(self, ldm_config: dict) -> bool:
        from sd_scripts.models.ldm_convert import sgm_v_prediction

        return bool(sgm_v_prediction(ldm_config)) or super().v_from_ldm_config(ldm_config)

    def lora_unet_path_map(self, unet):
        from sd_scripts.models.sdxl_names import sgm_path_mapper

        return sgm_path_mapper(unet)

    # ---------------------------------------------------------------------------------------- detection

    def claims_ldm_checkpoint(self, shapes: Mapping[str, Any]) -> bool:
        return any(k.startswith("conditioner.embedders.1.model.") for k in shapes)

    def claims_diffusers(self, unet_config: Mapping, text_encoder_config: Mapping, model_index: Mapping) -> bool:
        if model_index.get("requires_aesthetics_score"):
            return False  # the SDXL refiner: one text encoder, aesthetic-score conditioning
        return unet_config.get("addition_embed_type") == "text_time" or "text_encoder_2" in model_index

    # ------------------------------------------------------------------------------------ training steps

    def encode_prompts(self, model, captions, clip_skip: int | None = None, max_token_length: int | None = None,
                       weighted: bool = False) -> dict:
        """Captions -> ``{"encoder_hidden_states": [B, L, D1+D2], "text_embeds": [B, P]}`` (kohya's SDXL encoding).

        ``clip_skip`` is not used: SDXL is trained on the penultimate layers of both encoders.
        """
        from sd_scripts.models.text_encoding import encode_tokens_with_pool, tokenize_prompts

        te1, te2 = model.text_encoders[0], model.text_encoders[1]
        tok1, tok2 = model.tokenizers[0], model.tokenizers[1]
        states1, _ = encode_tokens_with_pool(te1, tokenize_prompts(tok1, captions, max_token_length, weighted),
                                             self.hidden_layer)
        states2, pooled = encode_tokens_with_pool(te2, tokenize_prompts(tok2, captions, max_token_length, weighted),
                                                  self.hidden_layer, eos_token_id=tok2.eos_token_id)
        import torch

        states = torch.cat([states1, states2.to(states1.device, states1.dtype)], dim=-1)
        return {"encoder_hidden_states": states, "text_embeds": pooled.to(states1.device)}

    @staticmethod
    def time_ids(batch: Mapping | None, noisy_latents, vae_scale: int = 8):
        """``[B, 6]``: original (h, w), crop (top, left), target (h, w) per sample, from the dataset's batch.

        Without them (no batch) every sample is an uncropped image of the latents' size.
        """
        import torch

        count, height, width = noisy_latents.shape[0], noisy_latents.shape[-2] * vae_scale, noisy_latents.shape[-1] * vae_scale
        rows = []
        for i in range(count):
            original = tuple(batch["original_sizes_hw"][i]) if batch and batch.get("original_sizes_hw") else (height, width)
            crop = tuple(batch["crop_top_lefts"][i]) if batch and batch.get("crop_top_lefts") else (0, 0)
            target = tuple(batch["target_sizes_hw"][i]) if batch and batch.get("target_sizes_hw") else (height, width)
            rows.append([*original, *crop, *target])
        return torch.tensor(rows, dtype=torch.float32, device=noisy_latents.device)

    def predict(self, model, noisy_latents, timesteps, cond: dict, batch: Mapping | None = None):
        device = noisy_latents.device
        added = {"text_embeds": cond["text_embeds"].to(device), "time_ids": self.time_ids(batch, noisy_latents)}
        return model.unet(noisy_latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(device),
                          added_cond_kwargs=added, return_dict=False)[0]

    def build_pipeline(self, model, scheduler):
        """A diffusers ``StableDiffusionXLPipeline`` over the loaded parts, with our prompt encoding (weights,
        225 tokens); no watermarker."""
        cls = _sdxl_pipeline_class()
        pipe = cls(vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
                   tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=scheduler,
                   force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.family = self
        return pipe


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family to the registry; a second family under the same name is a bug and raises."""
    if not family.name:
        raise ValueError("a model family needs a name")
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    """The registered family called ``name``; an unknown name is a ConfigError listing the valid ones."""
    key = str(name).strip().lower() if name is not None else ""
    if key not in FAMILIES:
        raise ConfigError(f"model_family: unknown family {name!r}; choose one of {', '.join(FAMILIES)}", "model_family")
    return FAMILIES[key]


register_family(SD1Family())
register_family(SD2Family())
register_family(SDXLFamily())
register_family(FluxFamily())


# ------------------------------------------------------------------------------------------- family settings


def requested_family(config: TrainConfig) -> ModelFamily | None:
    """The family the settings force (``model_family``, ``sdxl: true``, ``v2: true``), or None; conflicts raise."""
    wanted = get_family(config.model_family) if config.model_family else None
    for setting, name, forced in (("sdxl", "sdxl", config.sdxl), ("v2", "sd2", config.v2)):
        if forced:
            family = get_family(name)
            if wanted is not None and wanted is not family:
                raise ConfigError(f"{setting}: true conflicts with {wanted.name} (set by model_family, sdxl or v2); "
                                  "unset one of them", setting)
            wanted = family
    return wanted


def _is_on(value: Any) -> bool:
    """A switch that is true, or a number above 0 (a rate or a step count)."""
    return value > 0 if is_number(value) else bool(value)


def check_family_settings(config: TrainConfig, family: ModelFamily | None = None, dataset=None,
                          info: dict | None = None, problems: Problems | None = None) -> tuple[list, list[str]]:
    """Setting checks that depend on the model family, recorded in ``problems``; returns its ``(errors, warnings)``.

    ``family`` is the detected family (None: the one the settings force, if any); ``dataset`` a scanned
    ``DatasetPlan`` whose subsets are checked too; ``info`` what detection read from the model files. Errors are ``ConfigError`` with one line naming the setting.
    """
    problems = Problems() if problems is None else problems
    if family is None:
        with problems.collecting():
            family = requested_family(config)
    _check_text_encoder_cache(config, dataset, problems)
    if family is not None:
        problems.extend(*family.setting_problems(config, info))
    te_lr = config.text_encoder_lr
    if family is not None and isinstance(te_lr, (list, tuple)) and len(te_lr) > len(family.te_lora_prefixes):
        count = len(family.te_lora_prefixes)
        problems.error("text_encoder_lr", f"{len(te_lr)} values, but {family.name.upper()} has {count} text "
                       f"encoder{'s' if count > 1 else ''}; give at most {count}")
    if family is not None and family.name == "sdxl":
        _check_sdxl_settings(config, family, problems)
    return problems.errors, problems.warnings


def _check_text_encoder_cache(config: TrainConfig, dataset, problems: Problems) -> None:
    """Cached text-encoder outputs need a frozen text encoder and captions that never change."""
    setting = "cache_text_encoder_outputs"
    if not (config.cache_text_encoder_outputs or config.cache_text_encoder_outputs_to_disk):
        return
    if not config.network_train_unet_only:
        problems.error(setting, "needs network_train_unet_only (a trained text encoder changes its outputs); turn on "
                       "network_train_unet_only or turn caching off")
    # the settings declared to change captions from step to step (sd_scripts/core/settings.py); read by their names
    conflicts = [(s.kohya_name, _is_on(getattr(config, s.kohya_name)))
                 for s in engine_settings() if s.changes_captions]
    for name, on in conflicts:
        if on:
            problems.error(setting, f"cannot be used with {name} (captions change during training); turn off {name} "
                           f"or {setting}")
    if dataset is not None and not any(on for _, on in conflicts):
        for subset in dataset.subsets or []:
            if subset.captions.changes_captions:
                problems.error(setting, f"subset {subset.name} changes its captions during training (shuffle, "
                               f"dropout, token warm-up or wildcards); turn those off for it or turn {setting} off")
                break


def _check_sdxl_settings(config: TrainConfig, family: ModelFamily, problems: Problems) -> None:
    if config.clip_skip not in (None, 1, 2):
        problems.warn(f"clip_skip: SDXL always uses the penultimate layers of its text encoders; clip_skip "
                      f"{config.clip_skip} is not used")
    steps = config.bucket_reso_steps
    if steps and steps % family.bucket_step:
        problems.warn(f"bucket_reso_steps: {steps} is not a multiple of {family.bucket_step}; SDXL works best "
                      f"with bucket sides that are multiples of {family.bucket_step}")
    if config.mixed_precision == "fp16" and not config.no_half_vae:
        problems.warn("no_half_vae: the SDXL VAE overflows in fp16 (NaN latents) unless it is an fp16-fix VAE; "
                      "turn on no_half_vae or use bf16")


# ------------------------------------------------------------------------------------------------ sample pipeline


def _split_prompts(prompt, negative_prompt, do_cfg: bool) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives: list[str] = []
    if do_cfg:
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
    return prompts, negatives


def _sample_token_length(tokenizer, texts) -> int | None:
    """max_token_length for sample prompts: as many 75-token chunks as the longest prompt needs (up to 3)."""
    import math

    from sd_scripts.models.text_encoding import count_prompt_tokens

    longest = max(count_prompt_tokens(tokenizer, t) for t in texts)
    chunks = min(3, max(1, math.ceil(longest / 75)))
    return None if chunks == 1 else 75 * chunks


_SDXL_PIPELINE_CLASS = None


def _sdxl_pipeline_class():
    """StableDiffusionXLPipeline whose prompt encoding is the family's (kohya's): weighted, up to 225 tokens, negative
    prompts encoded as text (an empty one too, as kohya's sampler does)."""
    global _SDXL_PIPELINE_CLASS
    if _SDXL_PIPELINE_CLASS is not None:
        return _SDXL_PIPELINE_CLASS
    import torch
    from diffusers import StableDiffusionXLPipeline

    class FamilyStableDiffusionXLPipeline(StableDiffusionXLPipeline):
        family: ModelFamily | None = None

        def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1,
                          do_classifier_free_guidance=True, negative_prompt=None, negative_prompt_2=None,
                          prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                          negative_pooled_prompt_embeds=None, lora_scale=None, clip_skip=None):
            if prompt_embeds is None:
                prompts, negatives = _split_prompts(prompt, negative_prompt, do_classifier_free_guidance)
                texts = prompts + negatives
                max_len = max(_sample_token_length(self.tokenizer, texts), _sample_token_length(self.tokenizer_2, texts),
                              key=lambda n: n or 0)
                parts = _PipelineParts([self.text_encoder, self.text_encoder_2], [self.tokenizer, self.tokenizer_2])
                with torch.no_grad():
                    cond = self.family.encode_prompts(parts, texts, None, max_len, weighted=True)
                states, pooled = cond["encoder_hidden_states"], cond["text_embeds"]
                prompt_embeds, pooled_prompt_embeds = states[: len(prompts)], pooled[: len(prompts)]
                if negatives:
                    negative_prompt_embeds = states[len(prompts):]
                    negative_pooled_prompt_embeds = pooled[len(prompts):]
            return super().encode_prompt(
                None, None, device, num_images_per_prompt, do_classifier_free_guidance, None, None,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale, clip_skip=None)

    _SDXL_PIPELINE_CLASS = FamilyStableDiffusionXLPipeline
    return _SDXL_PIPELINE_CLASS


class _PipelineParts:
    """The text side of a pipeline in ``LoadedModel`` shape, for ``encode_prompts``."""

    def __init__(self, text_encoders, tokenizers):
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
