"""The kohya command line (``python -m sd_scripts.train_network``) has kohya's defaults, so a kohya command line
runs unchanged: every default of kohya's ``train_network.py`` (its ``setup_parser()``: ``library/train_util.py``,
``train_network.py``) compared with ours. ``main.py`` keeps the 2023 tool's defaults (``ArgsList.py``).

The table was read from kohya-ss/sd-scripts 48d368fa (2026-02-16) by running its ``setup_parser()`` and listing
every action's ``dest`` and ``default``; ``bench/vs_kohya.py`` runs the two side by side.
"""

from __future__ import annotations

import math

import pytest

# kohya's argparse defaults of the arguments our command line accepts too
KOHYA_DEFAULTS = {
    'adaptive_noise_scale': None,
    'alpha_mask': False,
    'base_weights': None,
    'base_weights_multiplier': None,
    'bucket_no_upscale': False,
    'bucket_reso_steps': 64,
    'cache_latents': False,
    'cache_latents_to_disk': False,
    'caption_dropout_every_n_epochs': 0,
    'caption_dropout_rate': 0.0,
    'caption_extension': '.caption',
    'caption_extention': None,
    'caption_prefix': None,
    'caption_separator': ',',
    'caption_suffix': None,
    'caption_tag_dropout_rate': 0.0,
    'clip_skip': None,
    'color_aug': False,
    'dataset_config': None,
    'dataset_repeats': 1,
    'debiased_estimation_loss': False,
    'dim_from_weights': False,
    'dynamo_backend': 'inductor',
    'enable_bucket': False,
    'enable_wildcard': False,
    'flip_aug': False,
    'fp8_base': False,
    'fp8_base_unet': False,
    'full_bf16': False,
    'full_fp16': False,
    'gradient_accumulation_steps': 1,
    'gradient_checkpointing': False,
    'huber_c': 0.1,
    'huber_scale': 1.0,
    'huber_schedule': 'snr',
    'in_json': None,
    'initial_epoch': None,
    'initial_step': None,
    'ip_noise_gamma': None,
    'ip_noise_gamma_random_strength': False,
    'keep_tokens': 0,
    'keep_tokens_separator': '',
    'learning_rate': 2e-06,
    'log_prefix': None,
    'log_tracker_name': None,
    'log_with': None,
    'logging_dir': None,
    'loss_type': 'l2',
    'lowram': False,
    'lr_scheduler': 'constant',
    'lr_scheduler_args': None,
    'lr_scheduler_num_cycles': 1,
    'lr_scheduler_power': 1,
    'lr_scheduler_type': '',
    'lr_warmup_steps': 0,
    'masked_loss': False,
    'max_bucket_reso': 1024,
    'max_data_loader_n_workers': 8,
    'max_grad_norm': 1.0,
    'max_timestep': None,
    'max_token_length': None,
    'max_train_epochs': None,
    'max_train_steps': 1600,
    'max_validation_steps': None,
    'mem_eff_attn': False,
    'metadata_author': None,
    'metadata_description': None,
    'metadata_license': None,
    'metadata_tags': None,
    'metadata_thumbnail': None,
    'metadata_title': None,
    'metadata_trigger_phrase': None,
    'metadata_usage_hint': None,
    'min_bucket_reso': 256,
    'min_snr_gamma': None,
    'min_timestep': None,
    'mixed_precision': 'no',
    'multires_noise_discount': 0.3,
    'multires_noise_iterations': None,
    'network_alpha': 1,
    'network_args': None,
    'network_dim': None,
    'network_dropout': None,
    'network_module': None,
    'network_train_text_encoder_only': False,
    'network_train_unet_only': False,
    'network_weights': None,
    'no_half_vae': False,
    'no_metadata': False,
    'noise_offset': None,
    'noise_offset_random_strength': False,
    'optimizer_args': None,
    'optimizer_type': '',
    'output_dir': None,
    'output_name': None,
    'persistent_data_loader_workers': False,
    'pretrained_model_name_or_path': None,
    'prior_loss_weight': 1.0,
    'random_crop': False,
    'reg_data_dir': None,
    'resolution': None,
    'resume': None,
    'sample_at_first': False,
    'sample_every_n_epochs': None,
    'sample_every_n_steps': None,
    'sample_prompts': None,
    'sample_sampler': 'ddim',
    'save_every_n_epochs': None,
    'save_every_n_steps': None,
    'save_last_n_epochs': None,
    'save_last_n_epochs_state': None,
    'save_last_n_steps': None,
    'save_last_n_steps_state': None,
    'save_model_as': 'safetensors',
    'save_n_epoch_ratio': None,
    'save_precision': None,
    'save_state': False,
    'save_state_on_train_end': False,
    'scale_v_pred_loss_like_noise_pred': False,
    'scale_weight_norms': None,
    'sdpa': False,
    'secondary_separator': None,
    'seed': None,
    'shuffle_caption': False,
    'skip_until_initial_step': False,
    'text_encoder_lr': None,
    'token_warmup_min': 1,
    'token_warmup_step': 0,
    'tokenizer_cache_dir': None,
    'torch_compile': False,
    'train_batch_size': 1,
    'train_data_dir': None,
    'training_comment': None,
    'unet_lr': None,
    'use_8bit_adam': False,
    'use_lion_optimizer': False,
    'v2': False,
    'v_parameterization': False,
    'v_pred_like_loss': None,
    'vae': None,
    'vae_batch_size': 1,
    'validate_every_n_epochs': None,
    'validate_every_n_steps': None,
    'validation_seed': None,
    'validation_split': 0.0,
    'wandb_run_name': None,
    'weighted_captions': False,
    'xformers': False,
    'zero_terminal_snr': False,
    'cpu_offload_checkpointing': False,
}

# where ours differs on purpose: what a kohya command line gets instead, and why it still runs the same
DELIBERATE = {
    "network_module": "networks.lora (kohya has no default and stops without one; every kohya command line names it)",
    "optimizer_type": "AdamW: kohya's empty default means AdamW (unless use_8bit_adam / use_lion_optimizer)",
    "resolution": "512: kohya has no default and its dataset stops without one",
    "sdpa": "on: the same attention as kohya's default, computed by PyTorch's fused kernel (faster, less memory)",
    "v2": "detected from the checkpoint (kohya: off unless given; a kohya command line for SD2 passes --v2)",
    "v_parameterization": "detected from the checkpoint's .yaml or config (kohya: off unless given)",
}

# kohya arguments our command line does not take (a kohya command line using one stops with argparse's error)
NOT_TAKEN = ['async_upload', 'cache_info', 'conditioning_data_dir', 'console_log_file', 'console_log_level', 'console_log_simple', 'dataset_class', 'ddp_gradient_as_bucket_view', 'ddp_static_graph', 'ddp_timeout', 'debug_dataset', 'deepspeed', 'face_crop_aug_range', 'fp16_master_weights_and_gradients', 'fused_backward_pass', 'highvram', 'huggingface_path_in_repo', 'huggingface_repo_id', 'huggingface_repo_type', 'huggingface_repo_visibility', 'huggingface_token', 'log_config', 'log_tracker_config', 'lr_decay_steps', 'lr_scheduler_min_lr_ratio', 'lr_scheduler_timescale', 'metadata_is_negative_embedding', 'metadata_merged_from', 'metadata_preprocessor', 'offload_optimizer_device', 'offload_optimizer_nvme_path', 'offload_param_device', 'offload_param_nvme_path', 'output_config', 'resize_interpolation', 'resume_from_huggingface', 'save_state_to_huggingface', 'skip_cache_check', 'wandb_api_key', 'zero3_init_flag', 'zero3_save_16bit_model', 'zero_stage']


def _ours() -> dict:
    from sd_scripts.core.config import config_fields
    from sd_scripts.train_network import config_from_args

    config = config_from_args([])
    return {f.name: getattr(config, f.name) for f in config_fields()}


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12)
    unset = (None, "", [], ())  # kohya's "" / None and our None / [] all mean "not given"
    if a in unset and b in unset:
        return True
    return a == b


def test_every_kohya_default_is_ours_or_a_listed_difference():
    ours = _ours()
    different = {name: (kohya, ours[name]) for name, kohya in KOHYA_DEFAULTS.items() if not _same(kohya, ours[name])}
    unexplained = {name: pair for name, pair in different.items() if name not in DELIBERATE}
    assert not unexplained, f"kohya's default (first) differs from ours: {unexplained}"
    assert set(DELIBERATE) <= set(different), "a listed difference is gone: take it off DELIBERATE"


def test_every_kohya_argument_is_compared_or_listed_as_not_taken():
    from sd_scripts.core.config import config_fields

    ours = {f.name for f in config_fields()}
    assert set(KOHYA_DEFAULTS) <= ours
    assert not set(NOT_TAKEN) & ours, "now taken: move it from NOT_TAKEN to KOHYA_DEFAULTS"


@pytest.mark.parametrize("name, kohya", [("enable_bucket", False), ("caption_extension", ".caption"),
                                         ("learning_rate", 2e-6), ("max_data_loader_n_workers", 8)])
def test_the_cli_has_kohya_s_default_where_the_library_and_main_py_do_not(name, kohya):
    from ArgsList import ArgStore
    from sd_scripts.core.config import TrainConfig
    from sd_scripts.core.settings import declared_in_engine

    assert _ours()[name] == kohya
    assert getattr(TrainConfig(), name) != kohya  # library callers keep the engine's default
    front = declared_in_engine(name)
    assert getattr(ArgStore(), front.name) == front.default != kohya  # main.py: the 2023 tool's


def test_kohya_s_own_flags_at_128_px_pass_preflight_with_kohya_s_caption_files(tmp_path):
    """Without --enable_bucket a kohya command line at 128 px has no bucket range to break, and .caption files
    are the captions (kohya's default)."""
    from PIL import Image

    from sd_scripts.testing.tiny_models import save_tiny_single_file, tiny_tokenizer_cache_dir
    from sd_scripts.train_network import config_from_args
    from sd_scripts.training.preflight import preflight

    model = save_tiny_single_file(tmp_path / "tiny.safetensors")
    folder = tmp_path / "data" / "1_sks"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (128, 128), (40 * i, 80, 120)).save(folder / f"img{i}.png")
        (folder / f"img{i}.caption").write_text("a photo of sks", encoding="utf-8")
    config = config_from_args(["--pretrained_model_name_or_path", str(model), "--train_data_dir",
                               str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--resolution", "128",
                               "--network_module", "networks.lora", "--tokenizer_cache_dir",
                               str(tiny_tokenizer_cache_dir(model))])
    plan = preflight(config)
    assert plan.dataset.num_train_images == 2
    assert all(record.caption == "a photo of sks" for record in plan.dataset.images)
