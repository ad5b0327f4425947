"""ArgStore: every training setting of LoRA Easy Training Scripts, with its default.

Editing this file is a supported way to configure a run, as in the 2023 tool: change a default below
(``net_dim: int = setting(32, ...)`` -> ``setting(64, ...)``) and run ``python main.py``. A JSON file
loaded with ``--load_json_path`` overrides these defaults key by key, and command-line flags override
both. Paths may be written as plain strings; on Windows use raw strings (``r"C:\\models\\sd15.safetensors"``).

``None`` means "not set": the engine then uses its own behaviour for that setting.

Each setting is declared (type, help, range, choices, kohya name, ...) in ``sd_scripts/core/settings.py``; this
file is written from there by ``python -m frontend.settings_table``, which puts the declared defaults back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from frontend.fields import SettingsStore, setting
from sd_scripts.core.settings import GROUPS, OPTIMIZERS, SAMPLERS, SCHEDULERS

__all__ = ["ArgStore", "GROUPS", "OPTIMIZERS", "SCHEDULERS", "SAMPLERS"]


@dataclass
class ArgStore(SettingsStore):
    # ------------------------------------------------------------------ paths and files
    base_model: str | None = setting(
        None, "base checkpoint: a .safetensors/.ckpt file, a diffusers folder or a Hugging Face model id")
    img_folder: str | None = setting(
        None, "folder holding the <repeats>_<name> image folders (the parent, not the 10_name folder itself)")
    output_folder: str | None = setting(
        None, "folder the LoRA files are written to (created if missing)")
    save_json_folder: str | None = setting(
        None, "save this run's settings as config-<time>[-<save_json_name>].json in this folder")
    save_json_name: str | None = setting(
        None, "text appended to the saved JSON file's name")
    load_json_path: str | None = setting(
        None, "JSON file to load (ours, the 2023 tool's, or a kohya_ss GUI file); overrides these defaults")
    multi_run_folder: str | None = setting(
        None, "queue: train every *.json file in this folder, one after another")
    status_port: int | None = setting(
        None, "serve a status page of the queue or training at http://127.0.0.1:<port> (e.g. 7861; 0: any free "
        "port); none: off")
    status_listen: str = setting(
        "127.0.0.1", "address the status page listens on: 127.0.0.1 this computer only, 0.0.0.0 also your network "
        "(then every request needs the token printed at start)")
    queue_state_every: float = setting(
        15, "queue: save the running job's training state every N minutes (only the latest is kept), so a crash or "
        "power cut resumes it there when the same queue command runs again")
    reg_img_folder: str | None = setting(
        None, "folder of regularization <repeats>_<class> image folders")
    sample_prompts: str | None = setting(
        None, "text file of sample prompts, one per line (kohya options --n --w --h --d --l --s)")
    change_output_name: str | None = setting(
        None, "file name of the LoRA without extension (default: last)")
    json_load_skip_list: list[str] | None = setting(
        None, "settings a loaded JSON file must not change, e.g. base_model, img_folder, output_folder")
    training_comment: str | None = setting(
        None, "comment stored in the LoRA's metadata (ss_training_comment)")
    metadata_title: str | None = setting(
        None, "name of the LoRA that UIs and Civitai show (modelspec.title; default: the output name)")
    metadata_author: str | None = setting(
        None, "author stored in the LoRA (modelspec.author)")
    metadata_description: str | None = setting(
        None, "description stored in the LoRA (modelspec.description)")
    metadata_license: str | None = setting(
        None, "license stored in the LoRA (modelspec.license)")
    metadata_tags: str | None = setting(
        None, "comma-separated tags stored in the LoRA (modelspec.tags)")
    metadata_trigger_phrase: str | None = setting(
        None, "words that call up the LoRA, stored as modelspec.trigger_phrase")
    metadata_usage_hint: str | None = setting(
        None, "how to use the LoRA, e.g. weight 0.8 (modelspec.usage_hint)")
    metadata_thumbnail: str | None = setting(
        None, "preview image stored in the LoRA: an image file or a data:image/...;base64 URL (modelspec.thumbnail)")
    save_json_only: bool = setting(
        False, "save the JSON file and stop without training (to prepare a queue)")
    tag_occurrence_txt_file: bool = setting(
        True, "write <output name>.txt beside the LoRA listing every caption tag with its count")
    sort_tag_occurrence_alphabetically: bool = setting(
        False, "sort the tag list alphabetically instead of by count")

    # ------------------------------------------------------------------ optimizer
    optimizer_type: str = setting(
        "AdamW8bit", "optimizer (8-bit ones need a CUDA GPU: without one AdamW8bit falls back to AdamW)")
    optimizer_args: dict[str, Any] | None = setting(
        {"weight_decay": "0.1", "betas": "0.9,0.99"}, "optimizer arguments as key/value pairs (on the command line: "
        "key=value ...)")

    # ------------------------------------------------------------------ scheduler
    scheduler: str = setting(
        "cosine", "how the learning rate changes during training")
    cosine_restarts: int | None = setting(
        1, "number of restarts for cosine_with_restarts")
    scheduler_power: float | None = setting(
        1, "power of the polynomial schedule (above 1 decays faster)")
    lr_scheduler_type: str | None = setting(
        None, "custom scheduler class as package.module.Class")
    lr_scheduler_args: dict[str, Any] | None = setting(
        None, "arguments of the custom scheduler as key/value pairs")

    # ------------------------------------------------------------------ learning rates
    learning_rate: float = setting(
        0.0001, "base learning rate (near 1.0 for DAdaptation and Prodigy)")
    unet_lr: float | None = setting(
        None, "learning rate of the UNet part (default: learning_rate)")
    text_encoder_lr: float | None = setting(
        None, "learning rate of the text encoder part (default: learning_rate)")
    warmup_lr_ratio: float | None = setting(
        None, "share of all training steps spent warming the learning rate up, e.g. 0.05")
    unet_only: bool = setting(
        False, "train only the UNet part of the LoRA")

    # ------------------------------------------------------------------ core
    net_dim: int = setting(
        32, "network dim (rank): how much the LoRA can hold; bigger files, more room for noise")
    alpha: float = setting(
        16, "network alpha: the LoRA is scaled by alpha / net_dim")
    train_resolution: int = setting(
        512, "training resolution (width; also height unless height_resolution is set)")
    height_resolution: int | None = setting(
        None, "training height, for a non-square resolution")
    batch_size: int = setting(
        1, "images per training step")
    clip_skip: int = setting(
        2, "use the output of the N-th last text encoder layer (2 for anime models, 1 for realistic)")
    test_seed: int | None = setting(
        23, "random seed; the same seed and settings give the same LoRA (None picks one)")
    mixed_precision: str = setting(
        "fp16", "training precision (without a CUDA GPU fp16 falls back to no)")
    save_precision: str = setting(
        "fp16", "precision of the saved LoRA file")

    # ------------------------------------------------------------------ network
    lyco: bool = setting(
        False, "train a LyCORIS network (LoCon, LoHa, LoKr, IA3, ...) through lycoris.kohya; set algo in "
        "network_args")
    network_args: dict[str, Any] | None = setting(
        None, "network arguments, e.g. algo=lora conv_dim=8 conv_alpha=1 (LyCORIS) or conv_dim/conv_alpha (kohya "
        "LoCon), block weights, unit (DyLoRA)")

    # ------------------------------------------------------------------ steps
    num_epochs: int = setting(
        1, "training epochs (ignored when max_steps is set)")
    save_every_n_epochs: int | None = setting(
        None, "also save a LoRA every N epochs")
    save_n_epoch_ratio: int | None = setting(
        None, "save about N LoRAs spread over the run")
    save_last_n_epochs: int | None = setting(
        None, "keep only the last N per-epoch LoRAs")
    max_steps: int | None = setting(
        None, "training steps; overrides num_epochs")

    # ------------------------------------------------------------------ samples
    sample_sampler: str | None = setting(
        None, "sampler for the sample images (default ddim)")
    sample_every_n_steps: int | None = setting(
        None, "make sample images every N steps")
    sample_every_n_epochs: int | None = setting(
        None, "make sample images every N epochs")

    # ------------------------------------------------------------------ buckets
    buckets: bool = setting(
        True, "aspect-ratio buckets, so images need not be cropped square")
    min_bucket_resolution: int = setting(
        320, "smallest bucket side in pixels")
    max_bucket_resolution: int = setting(
        960, "largest bucket side in pixels")
    bucket_reso_steps: int | None = setting(
        None, "bucket sides are multiples of this (default 64)")
    bucket_no_upscale: bool = setting(
        False, "never upscale small images into a bigger bucket")

    # ------------------------------------------------------------------ tags
    shuffle_captions: bool = setting(
        False, "shuffle the comma-separated tags of each caption")
    keep_tokens: int | None = setting(
        None, "keep the first N tags in place when shuffling")
    token_warmup_step: float | None = setting(
        None, "steps until all tags are used (a value below 1 is a share of all steps)")
    token_warmup_min: int | None = setting(
        None, "tags used at the start of token warm-up")
    weighted_captions: bool = setting(
        False, "read (tag:1.2) weights in captions")
    caption_prefix: str | None = setting(
        None, "text put before every caption, e.g. a trigger word (it takes part in shuffling: use keep_tokens)")
    caption_suffix: str | None = setting(
        None, "text put after every caption (it takes part in shuffling)")
    caption_separator: str | None = setting(
        ",", "separator of the tags in a caption, for shuffling, keep_tokens and tag dropout")
    keep_tokens_separator: str | None = setting(
        None, "e.g. |||: the tags before it (and after a second one) stay in place when shuffling; keep_tokens "
        "applies to captions without it")
    secondary_separator: str | None = setting(
        None, "e.g. ;;;: joins tags that are shuffled and dropped as one (written as caption_separator)")
    enable_wildcard: bool = setting(
        False, "{a|b|c} in captions picks one at random each step; a caption file of several lines gives one random "
        "line")

    # ------------------------------------------------------------------ other
    xformers: bool = setting(
        True, "xformers attention (needs xformers and a CUDA GPU; otherwise PyTorch SDPA is used)")
    cache_latents: bool = setting(
        True, "encode every image once before training (faster; not with random_crop or color_aug)")
    cache_latents_to_disk: bool = setting(
        False, "keep the latent cache on disk between runs")
    random_crop: bool = setting(
        False, "random crops instead of centre crops (needs cache_latents false)")
    flip_aug: bool = setting(
        False, "random horizontal flips (avoid for asymmetric subjects)")
    alpha_mask: bool = setting(
        False, "train on transparent images: the alpha channel masks the loss, transparent parts do not count")
    v2: bool = setting(
        False, "the base model is SD 2.x (false: detected from the checkpoint)")
    v_parameterization: bool = setting(
        False, "the base model predicts v (SD 2.x 768-v; false: detected from the checkpoint)")
    gradient_checkpointing: bool = setting(
        False, "save memory at the cost of speed")
    gradient_acc_steps: int | None = setting(
        None, "batches accumulated per optimizer step (default 1)")
    noise_offset: float | None = setting(
        None, "noise offset, helps very dark or bright images (0.1 is common)")
    mem_eff_attn: bool = setting(
        False, "memory-efficient attention")
    torch_compile: bool = setting(
        False, "compile the UNet's repeated blocks with torch.compile: faster steps after a compile of a minute or "
        "two at the start (the inductor backend needs a C++ compiler)")
    dynamo_backend: str = setting(
        "inductor", "torch.compile backend for torch_compile")
    channels_last: bool = setting(
        False, "the UNet's convolutions in channels_last memory layout (faster with some GPUs and CPUs; same "
        "results up to float rounding)")
    cpu_conv_paths: bool = setting(
        True, "training on a CPU: each frozen float32 convolution of the UNet runs the kernel measured fastest for "
        "its shape (about 1.3x faster steps at batch 1; same results up to float rounding); false: PyTorch's own "
        "choice")
    min_snr_gamma: float | None = setting(
        None, "min-SNR loss weighting; 5 is common")
    masked_loss: bool = setting(
        False, "mask the loss (the masks here are alpha channels, so it needs alpha_mask)")

    # ------------------------------------------------------------------ Hugging Face
    huggingface_repo_id: str | None = setting(
        None, "after training, upload the LoRA to this Hugging Face repository (user/name)")
    huggingface_repo_type: str | None = setting(
        None, "repository type (default model)")
    huggingface_path_in_repo: str | None = setting(
        None, "folder inside the repository for the upload")
    huggingface_token: str | None = setting(
        None, "Hugging Face access token (default: the saved login)")
    huggingface_repo_visibility: str | None = setting(
        None, "visibility of a repository created for the upload (default private)")
    save_state_to_huggingface: bool = setting(
        False, "also upload the saved training state folders")
    resume_from_huggingface: bool = setting(
        False, "not supported: download the state folder and set resume to it")
    async_upload: bool = setting(
        False, "kept so 2023 files load; the upload runs when training has finished")

    # ------------------------------------------------------------------ rarely needed
    lora_model_for_resume: str | None = setting(
        None, "LoRA file whose weights training continues from")
    save_state: bool = setting(
        False, "also save the training state so a run can be resumed exactly")
    resume: str | None = setting(
        None, "training state folder to resume from")
    text_only: bool = setting(
        False, "train only the text encoder part of the LoRA")
    vae: str | None = setting(
        None, "VAE to use instead of the model's (.safetensors, .ckpt, .pt or a diffusers folder)")
    log_dir: str | None = setting(
        None, "folder for TensorBoard logs")
    log_prefix: str | None = setting(
        None, "prefix of the log run's name")
    tokenizer_cache_dir: str | None = setting(
        None, "folder holding a CLIP tokenizer, for training offline")
    dataset_config: str | None = setting(
        None, "dataset TOML in kohya's format, used instead of img_folder")
    in_json: str | None = setting(
        None, "kohya's fine-tuning metadata JSON {image name: {caption, tags}} (from its finetune scripts); the "
        "images are looked up in img_folder")
    dataset_repeats: int = setting(
        1, "repeats per epoch of the in_json images (and of dataset_config subsets without num_repeats)")
    lowram: bool = setting(
        False, "load the model straight into GPU memory (little system RAM)")
    no_meta: bool = setting(
        False, "write only minimal metadata into the LoRA")
    color_aug: bool = setting(
        False, "random colour shifts (needs cache_latents false)")
    use_8bit_adam: bool = setting(
        False, "old switch for 8-bit Adam")
    use_lion: bool = setting(
        False, "old switch for the Lion optimizer")
    caption_extention: str | None = setting(
        None, "kohya's old misspelling of caption_extension")
    caption_dropout_rate: float | None = setting(
        None, "chance of training an image with an empty caption")
    caption_dropout_every_n_epochs: int | None = setting(
        None, "drop every caption in every N-th epoch")
    caption_tag_dropout_rate: float | None = setting(
        None, "chance of dropping each tag (keep_tokens are never dropped)")
    prior_loss_weight: float = setting(
        1, "loss weight of regularization images")
    max_grad_norm: float = setting(
        1, "gradient clipping norm (0 turns it off)")
    save_as: str = setting(
        "safetensors", "file format of the LoRA")
    caption_extension: str = setting(
        ".txt", "extension of the caption files")
    max_clip_token_length: int = setting(
        150, "caption tokens read per image")
    save_last_n_epochs_state: int | None = setting(
        None, "keep only the last N per-epoch training states")
    num_workers: int = setting(
        1, "data loader worker processes (0 loads in the training process; none start when latents are cached)")
    persistent_workers: bool = setting(
        True, "keep data loader workers alive between epochs")
    face_crop_aug_range: str | None = setting(
        None, "face-centred crop range as 'min,max'; not supported by this engine")
    network_module: str = setting(
        "sd_scripts.networks.lora", "network module (lyco and DyLoRA's unit pick it for you)")
    locon_dim: int | None = setting(
        None, "old LoCon conv dim")
    locon_alpha: float | None = setting(
        None, "old LoCon conv alpha")
    locon: bool = setting(
        False, "old switch for LoCon training")

    # ------------------------------------------------------------------ added 2023-05
    dim_from_weights: bool = setting(
        False, "take net_dim and alpha from lora_model_for_resume")
    multires_noise_iterations: int | None = setting(
        None, "multi-resolution (pyramid) noise iterations, 6-10 is common")
    multires_noise_discount: float = setting(
        0.3, "multi-resolution noise discount")
    log_with: str | None = setting(
        None, "logger: tensorboard, wandb or all")
    log_tracker_name: str | None = setting(
        None, "project name for the logger")
    wandb_api_key: str | None = setting(
        None, "Weights & Biases API key (default: the saved login)")

    # ------------------------------------------------------------------ newer kohya settings
    network_dropout: float | None = setting(
        None, "dropout on the LoRA's rank activations, e.g. 0.1")
    save_every_n_steps: int | None = setting(
        None, "also save a LoRA every N steps")
    sample_at_first: bool = setting(
        False, "make sample images before training starts")
    vae_batch_size: int | None = setting(
        None, "images per VAE batch when caching latents (default 1)")

    # ------------------------------------------------------------------ FLUX.1 (kohya's flux_train_network names)
    clip_l: str | None = setting(
        None, "FLUX.1: CLIP-L text encoder file (clip_l.safetensors), when the model file has none")
    t5xxl: str | None = setting(
        None, "FLUX.1: T5-XXL text encoder file (t5xxl_fp16.safetensors or fp8), when the model file has none")
    ae: str | None = setting(
        None, "FLUX.1: autoencoder file (ae.safetensors), when the model file has none")
    flux_variant: str | None = setting(
        None, "FLUX.1: dev or schnell; none: read from the model (dev has a guidance embedding)")
    guidance_scale: float = setting(
        3.5, "FLUX.1 dev: guidance scale given to the model while training (kohya recommends 1.0)")
    timestep_sampling: str = setting(
        "sigma", "FLUX.1: how noise levels are drawn: sigma, uniform, sigmoid, shift (with discrete_flow_shift), "
        "flux_shift (by image size)")
    sigmoid_scale: float = setting(
        1.0, "FLUX.1: scale of the sigmoid/shift/flux_shift draws")
    discrete_flow_shift: float = setting(
        3.0, "FLUX.1: shift of the noise schedule (sigma and shift sampling; kohya recommends 3.1582 with shift)")
    model_prediction_type: str = setting(
        "sigma_scaled", "FLUX.1: raw (kohya's recommendation), additive or sigma_scaled")
    weighting_scheme: str = setting(
        "uniform", "FLUX.1: noise-level density (logit_normal, mode) or loss weight with sigma_scaled (sigma_sqrt, "
        "cosmap)")
    logit_mean: float = setting(
        0.0, "FLUX.1: mean of the logit_normal scheme")
    logit_std: float = setting(
        1.0, "FLUX.1: standard deviation of the logit_normal scheme")
    mode_scale: float = setting(
        1.29, "FLUX.1: scale of the mode scheme")
    t5xxl_max_token_length: int | None = setting(
        None, "FLUX.1: T5 tokens per caption; none: 512 for dev, 256 for schnell")
    apply_t5_attn_mask: bool = setting(
        False, "FLUX.1: hide T5 padding tokens from T5 and from the transformer's attention")

    # ------------------------------------------------------------------ SDXL
    sdxl: bool = setting(
        False, "the base model is SDXL (SDXL base, Pony, Illustrious, NoobAI ...); false: detected from the "
        "checkpoint. SDXL models get 1024 px and 512-2048 buckets unless those are set")
    no_half_vae: bool = setting(
        False, "keep the VAE in float32 under fp16/bf16 (the SDXL VAE overflows in fp16: NaN latents, black images)")
    cache_text_encoder_outputs: bool = setting(
        False, "encode every caption once and free the text encoders (saves SDXL memory); needs unet_only and "
        "captions that do not change (no shuffle_captions, caption dropout or token warm-up)")
    cache_text_encoder_outputs_to_disk: bool = setting(
        False, "keep the text-encoder output cache on disk between runs (implies cache_text_encoder_outputs)")
    disable_mmap_load_safetensors: bool = setting(
        False, "read a .safetensors base model in one go instead of memory-mapping it (faster from network drives "
        "and some Windows disks)")

    # ------------------------------------------------------------------ engine settings added 2026
    save_last_n_steps: int | None = setting(
        None, "with save_every_n_steps: keep only the LoRAs saved in the last N steps")
    save_last_n_steps_state: int | None = setting(
        None, "keep only the training states saved in the last N steps (default: save_last_n_steps)")
    save_state_on_train_end: bool = setting(
        False, "save the training state once at the end, even without save_state")
    skip_nonfinite_steps: bool = setting(
        False, "skip a step whose loss or gradients are NaN/inf (with a warning) instead of stopping the run")
    full_fp16: bool = setting(
        False, "keep the LoRA weights in fp16 too (needs mixed_precision fp16; saves memory, less stable)")
    full_bf16: bool = setting(
        False, "keep the LoRA weights in bf16 too (needs mixed_precision bf16)")
    fp8_base: bool = setting(
        False, "store the frozen UNet and text encoder weights in float8 on the GPU: about half their VRAM, for "
        "SDXL on small cards (needs mixed_precision fp16 or bf16; off without CUDA)")
    fp8_base_unet: bool = setting(
        False, "as fp8_base, for the UNet only")
    blocks_to_swap: int = setting(
        0, "FLUX.1: transformer blocks kept in CPU memory and copied to the GPU as they run, forward and backward "
        "(kohya's count: N//2 double + 2(N - N//2) single blocks, up to 35): much less VRAM, slower")
    cpu_offload_checkpointing: bool = setting(
        False, "FLUX.1 with gradient_checkpointing: the activations kept between blocks wait in CPU memory (about 1 "
        "GB less VRAM at 1024 px, about 15% slower)")
    wandb_run_name: str | None = setting(
        None, "Weights & Biases run name (default: log_prefix, output name and start time)")

    # ------------------------------------------------------------------ validation loss (kohya's names)
    validation_split: float = setting(
        0.0, "share of each training folder's images held out to measure a validation loss, e.g. 0.1 (0 = off); "
        "they are not trained on")
    validation_seed: int | None = setting(
        None, "seed choosing the held-out images and the validation noise (default: the training seed)")
    validate_every_n_steps: int | None = setting(
        None, "also measure the validation loss every N steps")
    validate_every_n_epochs: int | None = setting(
        None, "measure the validation loss every N epochs (default: every epoch)")
    max_validation_steps: int | None = setting(
        None, "at most N validation batches each time (default: all held-out images)")

    # ------------------------------------------------------------------ max norm, base weights, start step (kohya)
    scale_weight_norms: float | None = setting(
        None, "max-norm regularization: after each step, scale down every LoRA module whose weight change has a "
        "norm above this (1 is a good start; against overcooked LoRAs)")
    base_weights: list[str] | None = setting(
        None, "LoRA files merged into the base model before training (the new LoRA learns on top of them)")
    base_weights_multiplier: list[float] | None = setting(
        None, "strength of each base_weights file, one number per file (default 1.0 each)")
    initial_epoch: int | None = setting(
        None, "start counting at this epoch (1 = the first) without a saved state, e.g. to continue from "
        "lora_model_for_resume; steps, file names and the learning-rate schedule start there")
    initial_step: int | None = setting(
        None, "start counting at this step (0 = the first) without a saved state; overrides initial_epoch; not with "
        "resume")
    skip_until_initial_step: bool = setting(
        False, "with initial_step/initial_epoch: also skip the images the earlier run had already trained on in "
        "that epoch")

    # ------------------------------------------------------------------ noise and loss (kohya's names)
    noise_offset_random_strength: bool = setting(
        False, "draw the noise offset's strength at random between 0 and noise_offset, each step")
    adaptive_noise_scale: float | None = setting(
        None, "add mean(|latent|) times this to noise_offset, per image and channel (needs noise_offset)")
    ip_noise_gamma: float | None = setting(
        None, "input-perturbation noise, a regularization; about 0.1 is common")
    ip_noise_gamma_random_strength: bool = setting(
        False, "draw the input-perturbation strength at random between 0 and ip_noise_gamma")
    zero_terminal_snr: bool = setting(
        False, "rescale the noise schedule so the last timestep is pure noise, for training and sample images "
        "(v-prediction models such as NoobAI-XL v-pred: with v_parameterization)")
    min_timestep: int | None = setting(
        None, "lowest training timestep, 0-999 (default 0)")
    max_timestep: int | None = setting(
        None, "timesteps are drawn below this, 1-1000 (default 1000); equal to min_timestep: only that timestep")
    loss_type: str = setting(
        "l2", "loss function: l2 (squared error), l1, huber or smooth_l1")
    huber_schedule: str = setting(
        "snr", "how the Huber threshold changes with the timestep (huber and smooth_l1 only)")
    huber_c: float = setting(
        0.1, "Huber threshold, above 0 and at most 1 (huber and smooth_l1 only)")
    huber_scale: float = setting(
        1.0, "Huber threshold scale (huber and smooth_l1 only)")
    scale_v_pred_loss_like_noise_pred: bool = setting(
        False, "weight the v-prediction loss like the noise-prediction loss (needs v_parameterization)")
    v_pred_like_loss: float | None = setting(
        None, "add a v-prediction-like loss times this (not with v_parameterization)")
    debiased_estimation_loss: bool = setting(
        False, "debiased estimation loss weighting: 1/sqrt(SNR), with v_parameterization 1/(SNR+1)")
