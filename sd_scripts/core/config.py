"""TrainConfig: every engine setting, under kohya-ss/sd-scripts' argument names.

This is the engine's single description of a training run. ``sd_scripts/train_network.py``
builds its command line from these fields; ``main.py`` maps the friendly ArgStore onto it.
Fields carry their help text in ``metadata["help"]``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "config_fields", "is_whole_number", "is_finite_number"]


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with help text (and optional ``choices``) in its metadata."""
    meta = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model ---
    pretrained_model_name_or_path: str | None = _f(None, "base model: .safetensors/.ckpt file or diffusers folder")
    v2: bool | None = _f(None, "base model is SD2.x (detected from the checkpoint when not given)")
    v_parameterization: bool | None = _f(None, "v-prediction model (SD2 768-v); detected from a .yaml or diffusers config when not given")
    model_family: str | None = _f(None, "force a model family (sd1, sd2, sdxl, flux); detected when not given")
    sdxl: bool | None = _f(None, "base model is SDXL (detected from the checkpoint when not given)")
    vae: str | None = _f(None, "VAE to use instead of the model's: .safetensors/.ckpt/.pt file or diffusers folder")
    tokenizer_cache_dir: str | None = _f(None, "folder holding a CLIP tokenizer, for offline use")
    no_half_vae: bool = _f(False, "keep the VAE in float32 under mixed precision (the SDXL VAE overflows in fp16)")
    # --- FLUX.1 (kohya's flux_train_network.py names and defaults) ---
    clip_l: str | None = _f(None, "FLUX.1: CLIP-L file (clip_l.safetensors) when the model file lacks it")
    t5xxl: str | None = _f(None, "FLUX.1: T5-XXL file (t5xxl_fp16.safetensors, fp8 too) when the model file lacks it")
    ae: str | None = _f(None, "FLUX.1: autoencoder file (ae.safetensors) when the model file lacks it")
    flux_variant: str | None = _f(None, "FLUX.1: dev or schnell; read from the weights (guidance embedding) when not "
                                        "given", choices=[None, "dev", "schnell"])
    t5xxl_max_token_length: int | None = _f(None, "FLUX.1: T5-XXL tokens per caption (default 512 dev, 256 schnell)")
    apply_t5_attn_mask: bool = _f(False, "FLUX.1: mask T5 padding in T5 and in the transformer's attention")
    guidance_scale: float = _f(3.5, "FLUX.1 dev: the guidance scale the transformer is given while training")
    timestep_sampling: str = _f("sigma", "FLUX.1: how sigmas are drawn (sigma: the shifted schedule's, uniform, "
                                         "sigmoid of a normal, shift: sigmoid then discrete_flow_shift, flux_shift: "
                                         "shifted by image size)",
                                choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
    sigmoid_scale: float = _f(1.0, "FLUX.1: scale of the normal draw for sigmoid/shift/flux_shift sampling")
    discrete_flow_shift: float = _f(3.0, "FLUX.1: shift of the flow-matching schedule (sigma and shift sampling)")
    model_prediction_type: str = _f("sigma_scaled", "FLUX.1: raw (the velocity), additive (+ noisy input), "
                                                     "sigma_scaled (x0 estimate, weighted by weighting_scheme)",
                                    choices=["raw", "additive", "sigma_scaled"])
    weighting_scheme: str = _f("uniform", "FLUX.1: sigma sampling density (logit_normal, mode) or loss weight "
                                          "(sigma_sqrt, cosmap with sigma_scaled); uniform and none: neither",
                               choices=["uniform", "none", "sigma_sqrt", "logit_normal", "mode", "cosmap"])
    logit_mean: float = _f(0.0, "FLUX.1: mean of the logit_normal weighting scheme")
    logit_std: float = _f(1.0, "FLUX.1: standard deviation of the logit_normal weighting scheme")
    mode_scale: float = _f(1.29, "FLUX.1: scale of the mode weighting scheme")
    disable_mmap_load_safetensors: bool = _f(False, "read a .safetensors model in one go instead of memory-mapping it "
                                                    "(faster from network drives and some Windows disks)")

    # --- dataset ---
    train_data_dir: str | None = _f(None, "folder holding <repeats>_<class tokens> subfolders of images")
    reg_data_dir: str | None = _f(None, "folder of regularization <repeats>_<class> subfolders")
    dataset_config: str | None = _f(None, "dataset TOML in kohya's schema (instead of train_data_dir)")
    in_json: str | None = _f(None, "kohya's fine-tuning metadata JSON {image key: {caption, tags}}; the images are "
                                   "found in train_data_dir")
    dataset_repeats: int = _f(1, "repeats per epoch of the in_json dataset (and of dataset_config subsets without "
                                 "num_repeats)")
    caption_extension: str = _f(".txt", "extension of caption files")
    caption_extention: str | None = _f(None, "deprecated: kohya's old misspelling of caption_extension; when given "
                                             "it replaces caption_extension")
    resolution: str = _f("512", "training resolution: W or W,H")
    enable_bucket: bool = _f(True, "aspect-ratio buckets")
    min_bucket_reso: int = _f(256, "smallest bucket side")
    max_bucket_reso: int = _f(1024, "largest bucket side")
    bucket_reso_steps: int = _f(64, "bucket sides are multiples of this")
    bucket_no_upscale: bool = _f(False, "never upscale images into buckets")
    shuffle_caption: bool = _f(False, "shuffle comma-separated tags")
    keep_tokens: int = _f(0, "keep the first N tags in place when shuffling")
    caption_separator: str = _f(",", "separator of the tags in a caption (for shuffling, keep_tokens and tag dropout)")
    keep_tokens_separator: str | None = _f(None, "e.g. |||: the tags before it (and after a second one) stay fixed "
                                                 "when shuffling; keep_tokens applies when a caption has none")
    secondary_separator: str | None = _f(None, "e.g. ;;;: joins tags that are shuffled and dropped as one; replaced "
                                               "by caption_separator afterwards")
    enable_wildcard: bool = _f(False, "{a|b|c} in captions picks one at random each step; a multi-line caption "
                                      "file gives one random line")
    caption_prefix: str | None = _f(None, "text put before every caption (takes part in shuffling)")
    caption_suffix: str | None = _f(None, "text put after every caption (takes part in shuffling)")
    caption_dropout_rate: float = _f(0.0, "probability of training a sample with an empty caption")
    caption_dropout_every_n_epochs: int = _f(0, "drop all captions every N epochs")
    caption_tag_dropout_rate: float = _f(0.0, "probability of dropping each tag")
    token_warmup_min: int = _f(1, "tags used at the start of token warm-up")
    token_warmup_step: float = _f(0, "steps (or fraction of max steps if < 1) until all tags are used")
    weighted_captions: bool = _f(False, "(tag:1.2) weighting in captions")
    flip_aug: bool = _f(False, "random horizontal flips")
    color_aug: bool = _f(False, "random hue/gamma changes (not with cache_latents)")
    random_crop: bool = _f(False, "random crop instead of centre crop (not with cache_latents)")
    alpha_mask: bool = _f(False, "use each image's alpha channel as a loss mask (transparent parts do not count); "
                          "applies to every subset")
    cache_latents: bool = _f(False, "encode images once before training")
    cache_latents_to_disk: bool = _f(False, "keep the latent cache in .npz files next to the images' cache folder")
    vae_batch_size: int = _f(1, "images per VAE batch when caching latents")
    cache_text_encoder_outputs: bool = _f(False, "encode every caption once before training and free the text encoders "
                                          "(needs network_train_unet_only and fixed captions)")
    cache_text_encoder_outputs_to_disk: bool = _f(False, "keep the text-encoder output cache in .npz files "
                                                  "(implies cache_text_encoder_outputs)")
    prior_loss_weight: float = _f(1.0, "loss weight of regularization images")
    train_batch_size: int = _f(1, "images per batch")
    max_data_loader_n_workers: int = _f(0, "data loader worker processes")
    persistent_data_loader_workers: bool = _f(False, "keep data loader workers between epochs")

    # --- output ---
    output_dir: str | None = _f(None, "folder for the LoRA files")
    output_name: str | None = _f(None, "file name of the LoRA, without extension")
    save_model_as: str = _f("safetensors", "file format", choices=["safetensors", "ckpt", "pt"])
    save_precision: str | None = _f(None, "dtype of saved tensors", choices=["float", "fp16", "bf16"])
    save_every_n_epochs: int | None = _f(None, "save a LoRA every N epochs")
    save_every_n_steps: int | None = _f(None, "save a LoRA every N steps")
    save_n_epoch_ratio: int | None = _f(None, "save about N LoRAs over the run")
    save_last_n_epochs: int | None = _f(None, "keep only the last N per-epoch LoRAs")
    save_last_n_steps: int | None = _f(None, "keep only the LoRAs of the last N steps")
    save_state: bool = _f(False, "also save the training state for resume")
    save_last_n_epochs_state: int | None = _f(None, "keep only the last N per-epoch states (default: save_last_n_epochs)")
    save_last_n_steps_state: int | None = _f(None, "keep only the states of the last N steps (default: save_last_n_steps)")
    save_state_on_train_end: bool = _f(False, "save the training state at the end even without save_state")
    resume: str | None = _f(None, "training state folder to resume from")
    no_metadata: bool = _f(False, "write only the minimum metadata")
    training_comment: str | None = _f(None, "comment stored in the LoRA's metadata")
    metadata_title: str | None = _f(None, "modelspec.title of the LoRA, the name UIs show (default: output_name)")
    metadata_author: str | None = _f(None, "modelspec.author of the LoRA")
    metadata_description: str | None = _f(None, "modelspec.description of the LoRA")
    metadata_license: str | None = _f(None, "modelspec.license of the LoRA")
    metadata_tags: str | None = _f(None, "modelspec.tags of the LoRA, comma-separated")
    metadata_trigger_phrase: str | None = _f(None, "modelspec.trigger_phrase: the words that call up the LoRA")
    metadata_usage_hint: str | None = _f(None, "modelspec.usage_hint: how to use the LoRA (weight, prompts)")
    metadata_thumbnail: str | None = _f(None, "modelspec.thumbnail: an image file (stored as a data: URL) or a "
                                              "data:image/...;base64 URL")

    # --- training ---
    max_train_steps: int = _f(1600, "training steps")
    max_train_epochs: int | None = _f(None, "training epochs (overrides max_train_steps)")
    initial_epoch: int | None = _f(None, "start the epoch counter at this epoch (1 = the first) without a saved "
                                   "state; the step counter and the learning-rate schedule start where that epoch "
                                   "begins (kohya's schedule starts at 0)")
    initial_step: int | None = _f(None, "start the step counter and the learning-rate schedule at this step (0 = "
                                  "the first) without a saved state; overrides initial_epoch; not with resume")
    skip_until_initial_step: bool = _f(False, "with initial_step/initial_epoch: also skip the batches before that "
                                       "step, so training continues on the data the earlier run would have seen")
    seed: int | None = _f(None, "random seed; the same seed gives the same LoRA")
    gradient_checkpointing: bool = _f(False, "trade speed for memory")
    gradient_accumulation_steps: int = _f(1, "batches per optimizer step")
    mixed_precision: str = _f("no", "mixed precision", choices=["no", "fp16", "bf16"])
    full_fp16: bool = _f(False, "LoRA weights in fp16 too")
    full_bf16: bool = _f(False, "LoRA weights in bf16 too")
    fp8_base: bool = _f(False, "store the frozen UNet and text encoder weights in float8 on CUDA (computed in the mixed "
                               "precision; about half their VRAM); needs mixed_precision fp16 or bf16")
    fp8_base_unet: bool = _f(False, "as fp8_base, for the UNet only (the text encoders stay in the mixed precision)")
    clip_skip: int | None = _f(None, "use the output of the N-th last text encoder layer")
    max_token_length: int | None = _f(None, "caption tokens", choices=[None, 75, 150, 225])
    xformers: bool = _f(False, "xformers attention (needs the xformers package)")
    sdpa: bool = _f(True, "PyTorch scaled-dot-product attention")
    mem_eff_attn: bool = _f(False, "memory-efficient attention (uses SDPA here)")
    torch_compile: bool = _f(False, "compile the denoiser's repeated blocks with torch.compile (regional: each block kind "
                                    "compiles once; the first steps take longer)")
    dynamo_backend: str = _f("inductor", "torch.compile backend for torch_compile",
                             choices=["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser",
                                      "cudagraphs", "ofi", "fx2trt", "onnxrt", "tensort", "ipex", "tvm"])
    channels_last: bool = _f(False, "the UNet's convolutions in channels_last memory layout (faster with some "
                                    "oneDNN/cuDNN kernels; same results)")
    noise_offset: float | None = _f(None, "noise offset (0.05-0.1 helps very dark/bright images)")
    multires_noise_iterations: int | None = _f(None, "multi-resolution (pyramid) noise iterations")
    multires_noise_discount: float = _f(0.3, "multi-resolution noise discount")
    min_snr_gamma: float | None = _f(None, "min-SNR loss weighting gamma (5 is typical)")
    noise_offset_random_strength: bool = _f(False, "random offset strength in [0, noise_offset]")
    adaptive_noise_scale: float | None = _f(None, "adds mean(|latent|) x this to noise_offset per sample and "
                                            "channel (needs noise_offset)")
    ip_noise_gamma: float | None = _f(None, "input-perturbation noise (regularization); about 0.1 is usual "
                                      "(arxiv.org/abs/2301.11706)")
    ip_noise_gamma_random_strength: bool = _f(False, "random input-perturbation strength in [0, ip_noise_gamma]")
    zero_terminal_snr: bool = _f(False, "rescale the noise schedule's betas so the last timestep has zero SNR "
                                 "(for v-prediction models such as NoobAI-XL v-pred; sample images too)")
    min_timestep: int | None = _f(None, "lowest training timestep, 0-999 (default 0)")
    max_timestep: int | None = _f(None, "timesteps are drawn below this, 1-1000 (default 1000); equal to "
                                  "min_timestep: that one timestep")
    loss_type: str = _f("l2", "loss function", choices=["l1", "l2", "huber", "smooth_l1"])
    huber_schedule: str = _f("snr", "Huber threshold schedule over timesteps (huber and smooth_l1 only)",
                             choices=["constant", "exponential", "snr"])
    huber_c: float = _f(0.1, "Huber threshold (huber and smooth_l1 only)")
    huber_scale: float = _f(1.0, "Huber threshold scale (huber and smooth_l1 only)")
    scale_v_pred_loss_like_noise_pred: bool = _f(False, "weight the v-prediction loss like the noise-prediction "
                                                 "loss (needs v_parameterization)")
    v_pred_like_loss: float | None = _f(None, "add a v-prediction-like loss times this (not with v_parameterization)")
    debiased_estimation_loss: bool = _f(False, "debiased estimation loss weighting (1/sqrt(SNR); v: 1/(SNR+1))")
    masked_loss: bool = _f(False, "mask the loss; here the masks are alpha channels, so it needs alpha_mask")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    skip_nonfinite_steps: bool = _f(False, "skip a step whose loss or gradients are NaN/inf (with a warning) instead of stopping")
    lowram: bool = _f(False, "move each part of the model to the GPU as soon as it is loaded (less system RAM)")
    logging_dir: str | None = _f(None, "TensorBoard log folder")
    log_prefix: str | None = _f(None, "prefix of the log run name")
    log_with: str | None = _f(None, "tensorboard, wandb or all")
    log_tracker_name: str | None = _f(None, "project name for the logger (default network_train)")
    wandb_run_name: str | None = _f(None, "W&B run name (default: log_prefix, output_name and the start time)")

    # --- optimizer and scheduler ---
    optimizer_type: str = _f("AdamW", "optimizer name or package.module.Class")
    optimizer_args: list = _f([], "optimizer arguments as key=value")
    learning_rate: float = _f(1e-4, "learning rate")
    unet_lr: float | None = _f(None, "UNet learning rate (default: learning_rate)")
    text_encoder_lr: float | list[float] | None = _f(
        None, "text encoder learning rate (default: learning_rate); SDXL: two values, one per text encoder")
    lr_scheduler: str = _f("constant", "learning-rate schedule")
    lr_warmup_steps: float | str = _f(0, "warm-up steps, a ratio < 1, or N%")
    lr_scheduler_num_cycles: int = _f(1, "restarts of cosine_with_restarts")
    lr_scheduler_power: float = _f(1.0, "power of the polynomial schedule")
    lr_scheduler_type: str | None = _f(None, "custom scheduler class")
    lr_scheduler_args: list = _f([], "custom scheduler arguments as key=value")
    use_8bit_adam: bool = _f(False, "deprecated: optimizer_type AdamW8bit")
    use_lion_optimizer: bool = _f(False, "deprecated: optimizer_type Lion")

    # --- network ---
    network_module: str = _f("networks.lora", "network module (networks.lora or lycoris.kohya)")
    network_dim: int | None = _f(None, "LoRA rank (default 4)")
    network_alpha: float = _f(1.0, "LoRA alpha (scale = alpha / rank)")
    network_dropout: float | None = _f(None, "dropout on the LoRA's rank activations")
    network_args: list = _f([], "network arguments as key=value (conv_dim=8 conv_alpha=1 ...)")
    network_weights: str | None = _f(None, "LoRA file to continue from")
    dim_from_weights: bool = _f(False, "take rank and alpha from network_weights")
    network_train_unet_only: bool = _f(False, "train only the UNet part")
    network_train_text_encoder_only: bool = _f(False, "train only the text encoder part")
    scale_weight_norms: float | None = _f(None, "max-norm regularization: after each step, scale down every LoRA "
                                          "module whose weight change (up @ down x alpha/dim) has a norm above this "
                                          "(1 is a good start); logs max_norm/*")
    base_weights: list[str] | None = _f(None, "LoRA/LyCORIS files merged into the base model (UNet and text "
                                        "encoders) before the network is built; several files allowed")
    base_weights_multiplier: list[float] | None = _f(None, "strength of each base_weights file (default 1.0 each); "
                                                     "one value per file")

    # --- validation ---
    validation_split: float = _f(0.0, "fraction of each training folder's images held out for a validation loss (0 = off)")
    validation_seed: int | None = _f(None, "seed choosing the held-out images and the validation noise (default: seed)")
    validate_every_n_steps: int | None = _f(None, "also compute the validation loss every N steps")
    validate_every_n_epochs: int | None = _f(None, "compute the validation loss every N epochs (default: every epoch)")
    max_validation_steps: int | None = _f(None, "at most N validation batches per validation (default: all)")

    # --- sampling ---
    sample_prompts: str | None = _f(None, "file of sample prompts (kohya syntax)")
    sample_sampler: str = _f("ddim", "sampler for sample images")
    sample_every_n_steps: int | None = _f(None, "sample every N steps")
    sample_every_n_epochs: int | None = _f(None, "sample every N epochs")
    sample_at_first: bool = _f(False, "sample before training starts")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def is_whole_number(value: Any) -> bool:
    """True for an int setting value (a bool is not one), for the value checks."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for a finite int or float setting value (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
