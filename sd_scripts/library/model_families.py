"""Model families: each family's facts and its conditioning/prediction steps behind one small interface.

The training loop, metadata writer and sampler only call the interface (``latent_scale``, ``encode_prompts``,
``predict``, ``build_pipeline``, ``base_model_version`` ...), never branch on a family's name; loading and detection
read each family's facts (text encoder kind, LDM key prefix, tokenizer sources, built-in configs). Adding a family
(SDXL next) means one more subclass registered with ``register_family`` (SDXL also needs a loading path for its two
text encoders in ``model_loading``), and no change to the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "SD1Family",
    "SD2Family",
    "TokenizerSource",
    "get_family",
    "register_family",
]


@dataclass(frozen=True)
class TokenizerSource:
    """Where a family's tokenizer comes from: a hub repo (+ subfolder) and kohya's ``tokenizer_cache_dir`` name."""

    repo_id: str
    subfolder: str | None
    cache_name: str  # kohya layout: <tokenizer_cache_dir>/<repo id with "/" -> "_">


class ModelFamily:
    """Interface and shared SD1/SD2 behaviour; a family is a subclass instance registered in ``FAMILIES``."""

    name: str = ""
    latent_scale: float = 0.18215
    default_resolution: int = 512
    v_resolution: int = 512  # default resolution of the family's v-prediction models
    bucket_step: int = 64
    ss_v2: bool = False
    version_tag: str = ""  # "v1" -> ss_base_model_version "sd_v1" / "sd_v1_v"
    context_dim: int = 768
    te_hidden_act: str = "quick_gelu"
    text_encoder_kinds: tuple[str, ...] = ("clip",)  # per text encoder: "clip" | "openclip" (LDM layout)
    ldm_text_encoder_prefix: str = "cond_stage_model.transformer."
    tokenizer_sources: tuple[TokenizerSource, ...] = ()
    _te_lora_prefixes: tuple[str, ...] = ("lora_te",)

    # ------------------------------------------------------------------------------------------- facts

    @property
    def te_lora_prefixes(self) -> list[str]:
        """kohya LoRA name prefix of each text encoder (``lora_te``; SDXL: ``lora_te1``, ``lora_te2``)."""
        return list(self._te_lora_prefixes)

    def resolution_for(self, v_parameterization: bool) -> int:
        return self.v_resolution if v_parameterization else self.default_resolution

    def base_model_version(self, v_parameterization: bool) -> str:
        """kohya's ``ss_base_model_version``: sd_v1, sd_v1_v, sd_v2, sd_v2_v."""
        return f"sd_{self.version_tag}" + ("_v" if v_parameterization else "")

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        raise NotImplementedError

    def diffusers_unet_config(self, v_parameterization: bool = False) -> dict:
        """Full-size diffusers UNet config of the family's standard model."""
        raise NotImplementedError

    def diffusers_vae_config(self, v_parameterization: bool = False) -> dict:
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "act_fn": "silu",
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": self.resolution_for(v_parameterization),
            "scaling_factor": self.latent_scale,
        }

    def builtin_ldm_config(self, v_parameterization: bool = False) -> dict:
        """LDM config (as the original ``v*-inference.yaml``) used for a checkpoint without a sibling ``.yaml``."""
        from .ldm_convert import ldm_config_from_diffusers

        return ldm_config_from_diffusers(self.diffusers_unet_config(v_parameterization),
                                         self.diffusers_vae_config(v_parameterization),
                                         self.text_encoder_kinds[0], v_parameterization)

    # ---------------------------------------------------------------------------------------- detection

    def claims_ldm_checkpoint(self, shapes: Mapping[str, Any]) -> bool:
        """True if a single-file checkpoint with these keys (-> shapes) belongs to this family."""
        if any(k.startswith("conditioner.") for k in shapes):
            return False
        if any(k.startswith(self.ldm_text_encoder_prefix) for k in shapes):
            return True
        if any(k.startswith("cond_stage_model.") for k in shapes):
            return False
        shape = shapes.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        return shape is not None and int(shape[-1]) == self.context_dim

    def claims_diffusers(self, unet_config: Mapping, text_encoder_config: Mapping, model_index: Mapping) -> bool:
        """True if a diffusers folder with these configs belongs to this family."""
        if "text_encoder_2" in model_index or unet_config.get("addition_embed_type"):
            return False
        cross = unet_config.get("cross_attention_dim")
        if cross in (768, 1024, 1280, 2048):
            return cross == self.context_dim
        return text_encoder_config.get("hidden_act") == self.te_hidden_act

    # ------------------------------------------------------------------------------------ training steps

    def tokenize(self, model, captions, max_token_length: int | None = None, weighted: bool = False):
        """Captions -> ``TokenizedPrompts`` (ids ``[B, n, 77]``) with the model's tokenizer."""
        from .text_encoding import tokenize_prompts

        return tokenize_prompts(model.tokenizers[0], captions, max_token_length, weighted)

    def encode_prompts(self, model, captions, clip_skip: int | None = None, max_token_length: int | None = None,
                       weighted: bool = False) -> dict:
        """Captions -> ``{"encoder_hidden_states": [B, 77|152|227, D]}``; keeps gradients in grad mode."""
        from .text_encoding import encode_tokens

        tokens = self.tokenize(model, captions, max_token_length, weighted)
        return {"encoder_hidden_states": encode_tokens(model.text_encoders[0], tokens, clip_skip)}

    def predict(self, model, noisy_latents, timesteps, cond: dict, batch: Mapping | None = None):
        """The UNet's prediction (noise or v) for noisy latents at ``timesteps`` under ``cond``."""
        return model.unet(noisy_latents, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                          return_dict=False)[0]

    def build_pipeline(self, model, scheduler):
        """A diffusers ``StableDiffusionPipeline`` over the loaded parts (no safety checker), for sample images.

        Its prompt encoding is ours: A1111 weighting, prompts up to 225 tokens (chunks as in training) and the
        pipeline's ``clip_skip`` (diffusers counts skipped layers: 1 = penultimate = kohya's clip_skip 2), which also
        works with transformers' flattened ``CLIPTextModel`` and applies to the negative prompt too.
        """
        cls = _family_pipeline_class()
        pipe = cls(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.family = self
        return pipe

    def __repr__(self) -> str:
        return f"<ModelFamily {self.name}>"


class SD1Family(ModelFamily):
    name = "sd1"
    version_tag = "v1"
    context_dim = 768
    te_hidden_act = "quick_gelu"
    text_encoder_kinds = ("clip",)
    ldm_text_encoder_prefix = "cond_stage_model.transformer."
    tokenizer_sources = (TokenizerSource("openai/clip-vit-large-patch14", None, "openai_clip-vit-large-patch14"),)

    def modelspec_architecture(self, v_parameterization: bool) -> str:
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

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        return "stable-diffusion-v2-768-v/lora" if v_parameterization else "stable-diffusion-v2-512/lora"

    def diffusers_unet_config(self, v_parameterization: bool = False) -> dict:
        return {
            "sample_size": self.resolution_for(v_parameterization) // 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        }


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


# ------------------------------------------------------------------------------------------------ sample pipeline

_PIPELINE_CLASS = None


def _family_pipeline_class():
    """StableDiffusionPipeline whose prompt encoding uses ``text_encoding`` (built lazily: diffusers is slow to import)."""
    global _PIPELINE_CLASS
    if _PIPELINE_CLASS is not None:
        return _PIPELINE_CLASS
    import math

    import torch
    from diffusers import StableDiffusionPipeline

    from .text_encoding import count_prompt_tokens, encode_tokens, tokenize_prompts

    class FamilyStableDiffusionPipeline(StableDiffusionPipeline):
        family: ModelFamily | None = None

        def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                          negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None,
                          clip_skip=None):
            if prompt_embeds is None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                negatives: list[str] = []
                if do_classifier_free_guidance and negative_prompt_embeds is None:
                    if negative_prompt is None:
                        negatives = [""] * len(prompts)
                    elif isinstance(negative_prompt, str):
                        negatives = [negative_prompt] * len(prompts)
                    else:
                        negatives = list(negative_prompt)
                texts = prompts + negatives
                longest = max(count_prompt_tokens(self.tokenizer, t) for t in texts)
                chunks = min(3, max(1, math.ceil(longest / 75)))
                tokens = tokenize_prompts(self.tokenizer, texts, None if chunks == 1 else 75 * chunks, weighted=True)
                kohya_clip_skip = None if clip_skip is None else clip_skip + 1
                with torch.no_grad():
                    states = encode_tokens(self.text_encoder, tokens, kohya_clip_skip)
                prompt_embeds = states[: len(prompts)]
                if negatives:
                    negative_prompt_embeds = states[len(prompts):]
            return super().encode_prompt(None, device, num_images_per_prompt, do_classifier_free_guidance, None,
                                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                         lora_scale=lora_scale, clip_skip=None)

    _PIPELINE_CLASS = FamilyStableDiffusionPipeline
    return _PIPELINE_CLASS
