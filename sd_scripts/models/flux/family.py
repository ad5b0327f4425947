"""FLUX.1 (dev and schnell) as a model family: its facts and steps behind the ``ModelFamily`` interface.

* denoiser: ``FluxTransformer`` (``LoadedModel.unet``) on 2x2-packed latent tokens; ``predict`` packs the noisy
  latents, calls it with sigma (= timestep / 1000), the T5 states, the pooled CLIP-L vector and, for dev, the guidance
  scale, and unpacks the velocity back to ``[B, 16, H, W]``;
* objective: flow matching (``training/objectives.py`` implements kohya's timestep sampling and prediction types);
* latents: 16 channels, ``(x - 0.1159) * 0.3611``;
* text: CLIP-L pooled output (77 tokens) + T5-XXL last hidden states (``t5xxl_max_token_length``: 512 dev, 256
  schnell) with their attention mask (used by the transformer with ``apply_t5_attn_mask``);
* sampler: flow-matching Euler on the shifted schedule (``sampler.py``).
"""

from __future__ import annotations

from typing import Any, Mapping

from sd_scripts.core.config import TrainConfig
from sd_scripts.core.problems import Problems
from sd_scripts.core.settings import declared_in_engine
from sd_scripts.models.family_base import LoraTargets, ModelFamily, TextEncoderSpec, TokenizerSource
from sd_scripts.models.flux.lora_args import (FLUX_LORA_ARGS, IN_LAYERS, flux_lora_arg_warnings,
                                              parse_flux_lora_args)

__all__ = ["FLUX_DEFAULTS", "FluxFamily", "T5_MAX_TOKENS", "flux_variant_of"]

T5_MAX_TOKENS = {"dev": 512, "schnell": 256}  # kohya's t5xxl_max_token_length defaults
# kohya's FLUX.1 training settings and their defaults (flux_train_utils.add_flux_train_arguments, train_util)
# the FLUX.1 settings' defaults and choices, as declared (sd_scripts/core/settings.py)
FLUX_DEFAULTS = {name: declared_in_engine(name).engine_default for name in (
    "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type", "weighting_scheme",
    "logit_mean", "logit_std", "mode_scale", "guidance_scale", "t5xxl_max_token_length", "apply_t5_attn_mask")}
TIMESTEP_SAMPLINGS = declared_in_engine("timestep_sampling").choices
PREDICTION_TYPES = declared_in_engine("model_prediction_type").choices
WEIGHTING_SCHEMES = declared_in_engine("weighting_scheme").choices

# kohya lora_flux.py's target classes for train_blocks (the network_args themselves: models/flux/lora_args.py)
TRAIN_BLOCKS = {"all": ("DoubleStreamBlock", "SingleStreamBlock"), "single": ("SingleStreamBlock",),
                "double": ("DoubleStreamBlock",)}
CLIP_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
T5_TARGETS = ("T5Attention", "T5DenseGatedActDense")

# SD-only settings: (setting, is it on?, the fix)
_SD_ONLY = (
    ("v_parameterization", lambda v: bool(v), "FLUX.1 is trained with flow matching; turn v_parameterization off"),
    ("v2", lambda v: bool(v), "v2 is for Stable Diffusion 2; turn it off"),
    ("sdxl", lambda v: bool(v), "sdxl is for Stable Diffusion XL; turn it off"),
    ("clip_skip", lambda v: v not in (None, 0, 1), "FLUX.1 uses CLIP-L's pooled output; unset clip_skip"),
    ("max_token_length", lambda v: v not in (None, 0, 75, 77),
     "FLUX.1's prompt length is t5xxl_max_token_length; unset max_token_length"),
    ("weighted_captions", lambda v: bool(v), "FLUX.1 has no prompt weighting; turn weighted_captions off"),
    ("zero_terminal_snr", lambda v: bool(v), "it is a DDPM schedule option; turn zero_terminal_snr off"),
    ("min_snr_gamma", lambda v: v not in (None, 0), "it weights DDPM timesteps; unset min_snr_gamma "
                                                     "(use weighting_scheme for FLUX.1)"),
    ("scale_v_pred_loss_like_noise_pred", lambda v: bool(v), "it is for v-prediction; turn it off"),
    ("v_pred_like_loss", lambda v: v not in (None, 0), "it is for noise prediction; unset v_pred_like_loss"),
    ("debiased_estimation_loss", lambda v: bool(v), "it weights DDPM timesteps; turn debiased_estimation_loss off"),
    ("min_timestep", lambda v: v not in (None, 0), "FLUX.1 samples sigmas with timestep_sampling; unset min_timestep"),
    ("max_timestep", lambda v: v not in (None, 1000), "FLUX.1 samples sigmas with timestep_sampling; unset "
                                                      "max_timestep"),
)


def flux_variant_of(config: TrainConfig, info: Mapping | None = None) -> str:
    """``dev`` or ``schnell``: the ``flux_variant`` setting, else what the weights say (``info``), else dev."""
    wanted = str(config.flux_variant or "").strip().lower()
    if wanted:
        return wanted
    return str((info or {}).get("flux_variant") or "dev")


class FluxFamily(ModelFamily):
    name = "flux"
    latent_scale = 0.3611
    latent_shift = 0.1159
    latent_channels = 16
    default_resolution = 1024
    v_resolution = 1024
    bucket_step = 16  # latents are packed in 2x2 patches of the 8x VAE: sides that are multiples of 16 px
    min_bucket_reso = 256
    max_bucket_reso = 2048
    context_dim = 4096
    objective = "flow_matching"
    has_own_loader = True
    uses_v_parameterization = False
    text_encoder_kinds = ("clip", "t5")
    tokenizer_sources = (
        TokenizerSource("openai/clip-vit-large-patch14", None, "openai_clip-vit-large-patch14"),
        TokenizerSource("google/t5-v1_1-xxl", None, "google_t5-v1_1-xxl"),
    )
    _te_lora_prefixes = ("lora_te1", "lora_te3")  # kohya lora_flux.py: CLIP-L, T5-XXL

    @property
    def text_encoder_specs(self) -> tuple[TextEncoderSpec, ...]:
        return (TextEncoderSpec("clip", "text_encoders.clip_l.transformer.", "quick_gelu", "text_encoder"),
                TextEncoderSpec("t5", "text_encoders.t5xxl.transformer.", "gelu_new", "text_encoder_2"))

    # ------------------------------------------------------------------------------------------- facts

    def default_settings(self, v_parameterization: bool = False) -> dict:
        return {"resolution": "1024", "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64}

    def base_model_version(self, v_parameterization: bool) -> str:
        return "flux1"  # kohya flux_utils.MODEL_VERSION_FLUX_V1

    modelspec_implementation = "https://github.com/black-forest-labs/flux"  # kohya sai_model_spec.IMPL_FLUX
    uses_clip_skip = False

    def modelspec_architecture(self, v_parameterization: bool, model=None) -> str:
        """``flux-1-dev/lora`` or ``flux-1-schnell/lora`` (the loaded model's variant; dev without a model)."""
        variant = _variant(model) if model is not None else "dev"
        return f"flux-1-{variant}/lora" if variant in ("dev", "schnell") else "flux-1/lora"

    def modelspec_prediction_type(self, v_parameterization: bool) -> str | None:
        return None

    def place_denoiser(self, model, config: TrainConfig, device, dtype):
        """The transformer keeps the dtypes it was loaded in (``fp8_base``: its block linears already float8, the rest
        in the training precision, ``models/flux/memory.py``); with ``blocks_to_swap`` the swapped blocks stay in CPU
        memory and visit the GPU as they run. Returns the block swap (None without)."""
        import torch

        from sd_scripts.models.flux.memory import prepare_flux_transformer

        swap = int(config.blocks_to_swap or 0) if torch.device(device).type == "cuda" else 0
        return prepare_flux_transformer(model.unet, device, blocks_to_swap=swap)

    def enable_gradient_checkpointing(self, model, config: TrainConfig) -> None:
        model.unet.enable_gradient_checkpointing(cpu_offload=bool(config.cpu_offload_checkpointing))

    def training_options(self, config: TrainConfig) -> dict:
        return {"guidance_scale": float(config.guidance_scale or FLUX_DEFAULTS["guidance_scale"]),
                "apply_t5_attn_mask": bool(config.apply_t5_attn_mask),
                "t5xxl_max_token_length": config.t5xxl_max_token_length}

    def metadata(self, config: TrainConfig, model=None) -> dict:
        """kohya's FLUX.1 ``ss_*`` keys (flux_train_network.update_metadata)."""
        def value(name):
            got = getattr(config, name)  # a setting named in FLUX_DEFAULTS
            return FLUX_DEFAULTS[name] if got is None else got

        return {"ss_model_type": "flux", "ss_apply_t5_attn_mask": bool(value("apply_t5_attn_mask")),
                "ss_weighting_scheme": value("weighting_scheme"), "ss_logit_mean": value("logit_mean"),
                "ss_logit_std": value("logit_std"), "ss_mode_scale": value("mode_scale"),
                "ss_guidance_scale": value("guidance_scale"), "ss_timestep_sampling": value("timestep_sampling"),
                "ss_sigmoid_scale": value("sigmoid_scale"), "ss_model_prediction_type": value("model_prediction_type"),
                "ss_discrete_flow_shift": value("discrete_flow_shift")}

    unused_settings = {"clip_skip": 1, "max_token_length": 75}  # the front end's SD defaults (2, 150) do not apply
    lora_network_args = FLUX_LORA_ARGS

    def lora_targets(self, network_args: Mapping[str, str], model=None, from_weights: bool = False) -> LoraTargets:
        """kohya lora_flux.py (``models/flux/lora_args.py``): Linear layers of the double/single blocks
        (``train_blocks``, narrowed by ``train_double_block_indices`` / ``train_single_block_indices``), the input
        layers with ``in_dims``, CLIP-L, and T5-XXL with ``train_t5xxl``; ``*_dim`` ranks per module type (0 leaves a
        type out); ``split_qkv`` trains q, k, v (and the single blocks' MLP input) as separate LoRAs saved fused.
        ``from_weights`` (``dim_from_weights``): as kohya's create_network_from_weights, the file's modules decide, so
        every block is a candidate whatever ``train_blocks`` says."""
        params = getattr(getattr(model, "unet", None), "params", None)
        args = parse_flux_lora_args(network_args, getattr(params, "depth", None),
                                    getattr(params, "depth_single_blocks", None))
        hidden = mlp = None
        if args.split_qkv and params is not None:
            hidden, mlp = params.hidden_size, params.mlp_hidden_dim

        def split_for(name: str):
            if hidden is None:
                return None
            if "double_blocks" in name and name.endswith("_qkv"):
                return [hidden] * 3
            if "single_blocks" in name and name.endswith("_linear1"):
                return [hidden] * 3 + [mlp]
            return None

        blocks = "all" if from_weights else args.train_blocks
        return LoraTargets(unet_classes=TRAIN_BLOCKS[blocks], unet_conv_classes=(),
                           text_encoders=2 if args.train_t5xxl else 1, te_classes=(CLIP_TARGETS, T5_TARGETS),
                           dim_for=args.dim_for, split_for=split_for if args.split_qkv else None,
                           args=self.lora_network_args, unet_extra_paths=IN_LAYERS)

    def lora_arg_problems(self, network_args: Mapping[str, str], info: Mapping | None = None) -> list[str]:
        """The FLUX.1 network_args checked before the model loads (block indices against the block counts
        detection read, when known); raises ConfigError, returns warnings."""
        info = info or {}
        args = parse_flux_lora_args(network_args, info.get("double_blocks") or None, info.get("single_blocks") or None)
        return flux_lora_arg_warnings(args, network_args, bool(info.get("guidance_embed", True)))

    # ------------------------------------------------------------------------------------ settings checks

    def setting_problems(self, config: TrainConfig, info: Mapping | None = None) -> tuple[list, list[str]]:
        """SD-only settings, bad FLUX.1 values, T5 length, resolution multiple of 16, dev/schnell and guidance."""
        problems = Problems()
        for setting, is_on, fix in _SD_ONLY:
            if is_on(getattr(config, setting)):  # a setting named in the table
                problems.error(setting, f"not used by FLUX.1; {fix}")
        if config.loss_type in ("huber", "smooth_l1") and config.huber_schedule == "snr":
            problems.error("huber_schedule", "snr needs a DDPM schedule; use exponential or constant with FLUX.1")
        for setting, choices in (("timestep_sampling", TIMESTEP_SAMPLINGS), ("model_prediction_type", PREDICTION_TYPES),
                                 ("weighting_scheme", WEIGHTING_SCHEMES)):
            got = getattr(config, setting)  # a setting named in the table
            if got is not None and got not in choices:
                problems.error(setting, f"{got!r} is not one of {', '.join(choices)}")
        for setting, low in (("sigmoid_scale", 0.0), ("discrete_flow_shift", 0.0), ("logit_std", 0.0)):
            got = getattr(config, setting)  # a setting named in the table
            if got is not None and not float(got) > low:
                problems.error(setting, f"must be above {low:g}, not {got}")
        variant = flux_variant_of(config, info)
        if variant not in ("dev", "schnell"):
            problems.error("flux_variant", f"{variant!r} is not dev or schnell; leave it empty to read it from the "
                           "model")
            variant = "dev"
        self._check_t5_length(config, variant, problems)
        self._check_guidance(config, info, variant, problems)
        for side in _resolution_sides(config):
            if side % 16:
                problems.error("resolution", f"{side} is not a multiple of 16 (FLUX.1 packs 2x2 latent patches); use "
                               f"{max(16, side // 16 * 16)}")
                break
        _missing_parts(config, info, problems)
        steps = config.bucket_reso_steps
        if steps and int(steps) % 16:
            problems.error("bucket_reso_steps", f"{steps} is not a multiple of 16 (FLUX.1 packs 2x2 latent patches); "
                           "use 64")
        return problems.errors, problems.warnings

    @staticmethod
    def _check_t5_length(config: TrainConfig, variant: str, problems: Problems) -> None:
        limit = T5_MAX_TOKENS[variant]
        length = config.t5xxl_max_token_length
        if length is not None and not 1 <= int(length) <= 512:
            problems.error("t5xxl_max_token_length", f"{length} is outside 1-512 (T5-XXL's maximum is 512); use {limit}")
        elif length is not None and int(length) > limit:
            problems.warn(f"t5xxl_max_token_length: FLUX.1 {variant} was trained with {limit} tokens; {length} "
                          "may give worse results")

    @staticmethod
    def _check_guidance(config: TrainConfig, info: Mapping | None, variant: str, problems: Problems) -> None:
        """guidance_scale and flux_variant dev need a model with a guidance embedding."""
        guidance = config.guidance_scale
        if info and not info.get("guidance_embed", True) and guidance not in (None, FLUX_DEFAULTS["guidance_scale"]):
            problems.error("guidance_scale", f"this FLUX.1 model is schnell-like (no guidance embedding), so "
                           f"guidance_scale {guidance} has no effect; unset guidance_scale or use a dev model")
        if info and variant == "dev" and not info.get("guidance_embed", True) and info.get("variant_source") == "setting":
            problems.error("flux_variant", "dev was set but the model has no guidance embedding (a schnell model); "
                           "set flux_variant to schnell or leave it empty")

    # ---------------------------------------------------------------------------------------- detection

    def claims_single_file(self, shapes: Mapping[str, Any]) -> bool:
        from sd_scripts.models.flux.detection import is_flux_state

        return is_flux_state(shapes)

    def claims_ldm_checkpoint(self, shapes: Mapping[str, Any]) -> bool:
        return self.claims_single_file(shapes)

    def claims_diffusers(self, unet_config: Mapping, text_encoder_config: Mapping, model_index: Mapping) -> bool:
        return str(model_index.get("_class_name", "")).startswith("Flux")

    def describe(self, config, info: dict, shapes: Mapping[str, Any] | None) -> dict:
        from sd_scripts.models.flux.detection import describe_flux

        return describe_flux(config, info, shapes)

    def load(self, config, info: dict, dtype, vae_dtype, device=None):
        from sd_scripts.models.flux.loading import load_flux
        from sd_scripts.models.tokenizers import load_tokenizer

        model_folder = info["path"] if info["kind"] == "diffusers" else None
        clip_tokenizer = load_tokenizer(self, config, model_folder, 0)
        return load_flux(self, config, info, dtype, vae_dtype, device, clip_tokenizer)

    # ------------------------------------------------------------------------------------ training steps

    def encode_prompts(self, model, captions, clip_skip: int | None = None, max_token_length: int | None = None,
                       weighted: bool = False) -> dict:
        """Captions -> ``{"y": [B, 768] pooled CLIP-L, "txt": [B, T, 4096] T5 states, "txt_mask": [B, T]}``
        (kohya's FluxTextEncodingStrategy); the T5 attention mask is applied in T5 with ``apply_t5_attn_mask``."""
        import torch

        clip, t5 = model.text_encoders[0], model.text_encoders[1]
        clip_tokenizer, t5_tokenizer = model.tokenizers[0], model.tokenizers[1]
        options = getattr(model, "options", None) or {}
        length = int(options.get("t5xxl_max_token_length") or T5_MAX_TOKENS.get(_variant(model), 512))
        captions = [captions] if isinstance(captions, str) else list(captions)
        l_ids = clip_tokenizer(captions, max_length=77, padding="max_length", truncation=True,
                               return_tensors="pt").input_ids
        t5_tokens = t5_tokenizer(captions, max_length=length, padding="max_length", truncation=True,
                                 return_tensors="pt")
        mask = t5_tokens.attention_mask
        pooled = clip(l_ids.to(clip.device)).pooler_output
        t5_mask = mask.to(t5.device) if options.get("apply_t5_attn_mask") else None
        states = t5(t5_tokens.input_ids.to(t5.device), attention_mask=t5_mask).last_hidden_state
        return {"y": pooled, "txt": states, "txt_mask": mask.to(states.device, torch.float32)}

    def predict(self, model, noisy_latents, timesteps, cond: dict, batch: Mapping | None = None):
        """Velocity ``[B, 16, H, W]`` for noisy latents at ``timesteps`` (sigma x 1000, kohya's convention)."""
        import torch

        from sd_scripts.models.flux.packing import image_ids, pack_latents, text_ids, unpack_latents

        transformer = model.unet
        options = getattr(model, "options", None) or {}
        count, _, height, width = noisy_latents.shape
        device = noisy_latents.device
        txt = cond["txt"].to(device)
        guidance = None
        if transformer.is_dev:
            guidance = torch.full((count,), float(options.get("guidance_scale", FLUX_DEFAULTS["guidance_scale"])),
                                  device=device)
        mask = cond["txt_mask"].to(device) if options.get("apply_t5_attn_mask") else None
        out = transformer(pack_latents(noisy_latents), image_ids(count, height, width, device=device), txt,
                          text_ids(count, txt.shape[1], device=device), timesteps.float() / 1000,
                          cond["y"].to(device), guidance, mask)
        return unpack_latents(out, height, width)

    def sample_image(self, model, request, make_scheduler, generator, on_step_end, clip_skip: int | None = None):
        """kohya's FLUX sample: ``--g`` guidance (3.5), ``--l`` true CFG only when given (else 1), ``--s`` steps
        (20 when not given), sides floored to multiples of 16."""
        from sd_scripts.models.flux.sampler import sample_flux

        given = getattr(request, "given", set())
        guidance = request.guidance_scale if getattr(request, "guidance_scale", None) is not None else \
            FLUX_DEFAULTS["guidance_scale"]
        steps = request.sample_steps if "sample_steps" in given else 20
        cfg = request.scale if "scale" in given else 1.0

        def on_step(step, t):
            on_step_end(None, step, t, {})

        return sample_flux(model, self, request.prompt, request.negative_prompt, request.width, request.height, steps,
                           guidance, cfg, generator, on_step)

    def build_pipeline(self, model, scheduler):
        raise NotImplementedError("FLUX.1 samples with sample_image")


def _variant(model) -> str:
    """A loaded model's variant: what detection settled (``flux_variant`` or the weights), else its weights."""
    info = getattr(model, "info", None) or {}
    if info.get("flux_variant"):
        return str(info["flux_variant"])
    return "dev" if getattr(model.unet, "is_dev", True) else "schnell"


_PART_FILES = {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors", "ae": "ae.safetensors"}


def _missing_parts(config: TrainConfig, info: Mapping | None, problems: Problems) -> None:
    """CLIP-L, T5-XXL and the ae: a part setting naming a missing file, or a transformer-only model without it."""
    import os

    for setting, file in _PART_FILES.items():
        value = getattr(config, setting)  # a setting named in _PART_FILES
        if value:
            if not os.path.isfile(os.path.expanduser(str(value))):
                problems.error(setting, f"{value} does not exist; give the path of {file}")
        elif info is not None and not info.get(f"has_{setting}", True):
            problems.error(setting, f"{info.get('path')} holds only the FLUX.1 transformer; set {setting} to {file}")


def _resolution_sides(config: TrainConfig) -> list[int]:
    raw = config.resolution
    if raw in (None, ""):
        return []
    try:
        if isinstance(raw, (int, float)):
            return [int(raw)]
        if isinstance(raw, (list, tuple)):
            return [int(x) for x in raw]
        return [int(float(x)) for x in str(raw).replace("x", ",").split(",") if x.strip()]
    except (TypeError, ValueError):
        return []
