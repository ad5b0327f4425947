"""The model-family interface: what a family knows (its facts) and does (its steps), with SD1/SD2's behaviour as the
default. ``families.py`` holds the registry and the SD families; other families (FLUX.1) live in their own modules.

A family owns: its denoiser call (``predict``), its training objective (``objective``: "ddpm" for noise/v prediction,
"flow_matching" for rectified flow; the training layer implements each), its latent transform (``scale_latents`` /
``unscale_latents``: scale and shift), its text encoders (``encode_prompts``), its sampler (``sample_image``), its
loading (``has_own_loader`` + ``load``; SD families use the shared LDM/diffusers loader), its setting checks
(``setting_problems``) and the metadata it adds (``metadata``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["LoraTargets", "ModelFamily", "TextEncoderSpec", "TokenizerSource"]


@dataclass
class LoraTargets:
    """Where a family's LoRA/LoCon modules go, from its ``network_args`` (built by ``ModelFamily.lora_targets``).

    ``unet_classes`` / ``unet_conv_classes``: the denoiser's module classes whose Linear (and, with conv_dim,
    Conv2d) layers are adapted; ``text_encoders``: how many of the model's text encoders may get modules (in order);
    ``te_classes``: the classes adapted in each of them; ``dim_for(name)``: a module's rank from the family's
    per-module-type dims (None: network_dim; 0: left out); ``split_for(name)``: output sizes of a fused projection
    trained as separate LoRAs (kohya's split_qkv), or None; ``args``: the family's own network_args it read;
    ``unet_extra_paths``: denoiser module paths outside ``unet_classes`` whose Linear layers may get modules too, after
    the blocks and in this order (FLUX.1's input layers for kohya's ``in_dims``; ``dim_for`` gives their ranks)."""

    unet_classes: tuple = ("Transformer2DModel",)
    unet_conv_classes: tuple = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
    text_encoders: int | None = None  # None: all of them
    te_classes: tuple = (("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"),)
    dim_for: Any = None
    split_for: Any = None
    args: tuple = ()
    unet_extra_paths: tuple = ()


@dataclass(frozen=True)
class TokenizerSource:
    """Where a family's tokenizer comes from: a hub repo (+ subfolder) and kohya's ``tokenizer_cache_dir`` name."""

    repo_id: str
    subfolder: str | None
    cache_name: str  # kohya layout: <tokenizer_cache_dir>/<repo id with "/" -> "_">
    pad_token: str | None = None  # forced pad token (SDXL's second tokenizer pads with "!", id 0, as in kohya)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family: its LDM layout and how transformers builds it."""

    kind: str  # "clip" (HF names under <prefix>text_model.) | "openclip" (resblocks, packed q/k/v)
    ldm_prefix: str
    hidden_act: str
    subfolder: str = "text_encoder"  # diffusers folder
    with_projection: bool = False  # CLIPTextModelWithProjection (pooled output through text_projection)
    drop_last_layer: bool = False  # SD2: the checkpoint's last OpenCLIP block is not used


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
    min_bucket_reso: int = 256  # defaults a front end offers for this family
    max_bucket_reso: int = 1024
    latent_channels: int = 4
    latent_shift: float = 0.0  # FLUX's VAE latents are shifted before scaling
    objective: str = "ddpm"  # the training target: "ddpm" (noise or v) | "flow_matching" (training/objectives.py)
    has_own_loader: bool = False  # True: detection and loading go through ``describe`` / ``load`` (FLUX)
    uses_v_parameterization: bool = True  # SD families may predict v; flow matching has no such setting

    # ------------------------------------------------------------------------------------------- facts

    @property
    def te_lora_prefixes(self) -> list[str]:
        """kohya LoRA name prefix of each text encoder (``lora_te``; SDXL: ``lora_te1``, ``lora_te2``)."""
        return list(self._te_lora_prefixes)

    @property
    def text_encoder_specs(self) -> tuple[TextEncoderSpec, ...]:
        """The family's text encoders, in order (one for SD1/SD2)."""
        kind = self.text_encoder_kinds[0]
        return (TextEncoderSpec(kind, self.ldm_text_encoder_prefix, self.te_hidden_act,
                                drop_last_layer=kind == "openclip"),)

    def resolution_for(self, v_parameterization: bool) -> int:
        return self.v_resolution if v_parameterization else self.default_resolution

    def default_settings(self, v_parameterization: bool = False) -> dict:
        """Training defaults sized for the family (a front end's defaults when the model is known)."""
        resolution = self.resolution_for(v_parameterization)
        return {"resolution": str(resolution), "min_bucket_reso": self.min_bucket_reso,
                "max_bucket_reso": max(self.max_bucket_reso, resolution), "bucket_reso_steps": 64}

    def lora_unet_path_map(self, unet):
        """``module path -> path the LoRA file names it by`` for the UNet, or None when the names are the model's own."""
        return None

    def unet_config_from_ldm(self, ldm_config: dict, checkpoint: dict) -> dict:
        """The diffusers UNet config of a single-file checkpoint described by ``ldm_config``."""
        from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

        unet_config = create_unet_diffusers_config_from_ldm(ldm_config, checkpoint)
        image_size = ldm_config["model"]["params"].get("image_size")
        if image_size:
            unet_config["sample_size"] = int(image_size)
        return unet_config

    def v_from_ldm_config(self, ldm_config: dict) -> bool:
        return ldm_config["model"]["params"].get("parameterization") == "v"

    def base_model_version(self, v_parameterization: bool) -> str:
        """kohya's ``ss_base_model_version``: sd_v1, sd_v1_v, sd_v2, sd_v2_v."""
        return f"sd_{self.version_tag}" + ("_v" if v_parameterization else "")

    modelspec_implementation: str | None = None  # None: build_modelspec's (diffusers / sgm)
    uses_clip_skip: bool = True  # modelspec.encoder_layer is written

    def modelspec_architecture(self, v_parameterization: bool, model=None) -> str:
        raise NotImplementedError

    def modelspec_prediction_type(self, v_parameterization: bool) -> str | None:
        """``modelspec.prediction_type``: v or epsilon; None leaves it out (flow matching, as kohya)."""
        return "v" if v_parameterization else "epsilon"

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
        from sd_scripts.models.ldm_convert import ldm_config_from_diffusers

        return ldm_config_from_diffusers(self.diffusers_unet_config(v_parameterization),
                                         self.diffusers_vae_config(v_parameterization),
                                         self.text_encoder_kinds[0], v_parameterization)

    # ----------------------------------------------------------------------------------- training placement

    def place_denoiser(self, model, config, device, dtype):
        """Put the frozen denoiser on ``device`` for training, its weights in ``dtype`` (float8 on CUDA with
        kohya's ``fp8_base``); returns what must stay alive while it trains (None here)."""
        model.unet.to(device, dtype=dtype)
        return None

    def enable_gradient_checkpointing(self, model, config) -> None:
        model.unet.enable_gradient_checkpointing()

    # ----------------------------------------------------------------------------------- latent transform

    def scale_latents(self, latents):
        """VAE latents -> the denoiser's latent space (SD: ``latents * scale``; FLUX: ``(latents - shift) * scale``)."""
        if self.latent_shift:
            return (latents - self.latent_shift) * self.latent_scale
        return latents * self.latent_scale

    def unscale_latents(self, latents):
        """The inverse of ``scale_latents``, for decoding."""
        return latents / self.latent_scale + self.latent_shift

    # ---------------------------------------------------------------------- settings, metadata, loading hooks

    def setting_problems(self, config, info: Mapping | None = None) -> tuple[list, list[str]]:
        """``(errors, warnings)`` of settings this family cannot use (ConfigErrors naming the setting); ``info`` is
        what detection read from the model files, when known."""
        return [], []

    def metadata(self, config, model=None) -> dict:
        """kohya ``ss_*`` keys this family adds to a LoRA file's metadata."""
        return {}

    def training_options(self, config) -> dict:
        """Settings the family's own calls read during training (kept in ``LoadedModel.options``)."""
        return {}

    lora_network_args: tuple[str, ...] = ()  # network_args only this family reads (FLUX: train_blocks, ...)
    unused_settings: Mapping[str, Any] = {}  # kohya settings this family does not use -> the neutral value a front
    # end gives them instead of its SD default (FLUX: clip_skip 1, max_token_length 75)

    def lora_targets(self, network_args: Mapping[str, str], model=None, from_weights: bool = False) -> LoraTargets:
        """Where LoRA modules go (SD: kohya's networks/lora.py targets); ``model`` sizes split projections;
        ``from_weights``: a file's modules and ranks decide (``dim_from_weights``), so every place a file may hold."""
        return LoraTargets(te_classes=(LoraTargets.te_classes[0],) * len(self.text_encoder_kinds))

    def lora_arg_problems(self, network_args: Mapping[str, str], info: Mapping | None = None) -> list[str]:
        """Check this family's own LoRA ``network_args`` before the model loads (``info``: what detection read);
        raises ConfigError naming network_args, returns warnings."""
        return []

    def claims_single_file(self, shapes: Mapping[str, Any]) -> bool:
        """True if a single file with these keys (-> shapes) is this family's model (SD: an LDM checkpoint)."""
        return any(k.startswith("model.diffusion_model.") for k in shapes) and self.claims_ldm_checkpoint(shapes)

    def describe(self, config, info: dict, shapes: Mapping[str, Any] | None) -> dict:
        """Detection facts for a family with its own loader (``has_own_loader``): updates to ``info``."""
        raise NotImplementedError

    def load(self, config, info: dict, dtype, vae_dtype, device=None):
        """A ``LoadedModel`` for a family with its own loader."""
        raise NotImplementedError

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
        from sd_scripts.models.text_encoding import tokenize_prompts

        return tokenize_prompts(model.tokenizers[0], captions, max_token_length, weighted)

    def encode_prompts(self, model, captions, clip_skip: int | None = None, max_token_length: int | None = None,
                       weighted: bool = False) -> dict:
        """Captions -> ``{"encoder_hidden_states": [B, 77|152|227, D]}``; keeps gradients in grad mode."""
        from sd_scripts.models.text_encoding import encode_tokens

        tokens = self.tokenize(model, captions, max_token_length, weighted)
        return {"encoder_hidden_states": encode_tokens(model.text_encoders[0], tokens, clip_skip)}

    def predict(self, model, noisy_latents, timesteps, cond: dict, batch: Mapping | None = None):
        """The UNet's prediction (noise or v) for noisy latents at ``timesteps`` under ``cond``."""
        states = cond["encoder_hidden_states"].to(noisy_latents.device)
        return model.unet(noisy_latents, timesteps, encoder_hidden_states=states, return_dict=False)[0]

    def sample_image(self, model, request, make_scheduler, generator, on_step_end, clip_skip: int | None = None):
        """One sample image (PIL) for ``request`` (a ``SamplePrompt``) with the current weights.

        ``make_scheduler()`` builds the kohya sampler the prompt asks for (SD families sample through a diffusers
        pipeline with it); ``on_step_end(pipe, step, timestep, kwargs)`` is called after every denoising step; ``clip_skip`` is
        diffusers' count (1 = penultimate layer)."""
        pipe = self.build_pipeline(model, make_scheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt=request.prompt, negative_prompt=request.negative_prompt or None, width=request.width,
                    height=request.height, num_inference_steps=request.sample_steps, guidance_scale=request.scale,
                    generator=generator, clip_skip=clip_skip,
                    callback_on_step_end=on_step_end).images[0]

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



_PIPELINE_CLASS = None


def _family_pipeline_class():
    """StableDiffusionPipeline whose prompt encoding uses ``text_encoding`` (built lazily: diffusers is slow to import)."""
    global _PIPELINE_CLASS
    if _PIPELINE_CLASS is not None:
        return _PIPELINE_CLASS
    import math

    import torch
    from diffusers import StableDiffusionPipeline

    from sd_scripts.models.text_encoding import count_prompt_tokens, encode_tokens, tokenize_prompts

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


