"""The catalogue of bad inputs: malformed settings, datasets and files, one :class:`Case` each.

Every case runs through ``main.py`` (in-process through ``frontend.app.run_main``, or as a real
subprocess where ``subprocess=True``), through the engine's kohya command line
(``sd_scripts/train_network.py``) or through a side tool in ``scripts/``, and must end with exit
code 2, one line per problem on stderr naming the setting, no traceback and nothing written.

Placeholders in arguments, JSON values and files: ``{ws}`` the case's own folder, ``{data}`` its
copy of a good dataset (``{ws}/data``, one ``5_sks shape`` folder of captioned PNGs), ``{out}``
the output folder (``{ws}/out``, must not exist afterwards), ``{model}`` a tiny SD1 single-file
checkpoint, ``{tok}`` its tokenizer folder, ``{lora}`` a small LoRA file, ``{assets}`` the folder
of shared files (see ``test_bad_inputs_catalogue.py``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SUBSET = "5_sks shape"

# The flags every main.py case starts from: a run that passes preflight (checked by a test).
MAIN_BASE = [
    "--base_model", "{model}", "--img_folder", "{data}", "--output_folder", "{out}",
    "--tokenizer_cache_dir", "{tok}", "--train_resolution", "64", "--min_bucket_resolution", "64",
    "--max_bucket_resolution", "128", "--net_dim", "4", "--alpha", "2", "--max_steps", "2", "--num_workers", "0",
    # the same on every machine: no fallback for a missing GPU, xformers or bitsandbytes
    "--optimizer_type", "AdamW", "--mixed_precision", "no", "--xformers", "false",
    "--save_json_path", "{ws}/saved_json",  # a JSON would be written there if the run went on
]
ENGINE_BASE = [
    "--pretrained_model_name_or_path", "{model}", "--train_data_dir", "{data}", "--output_dir", "{out}",
    "--tokenizer_cache_dir", "{tok}", "--resolution", "64", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
    "--network_dim", "4", "--max_train_steps", "2", "--optimizer_type", "AdamW",
]


@dataclass
class Case:
    id: str
    expect: tuple[str, ...]  # the first names the setting; all must be in one error line
    args: list[str] = field(default_factory=list)  # appended to the runner's base flags
    runner: str = "main"  # "main", "engine" or "tool:<script name>"
    drop: tuple[str, ...] = ()  # base flags (with their value) to leave out
    json: object = None  # written to {ws}/job.json (str as is) and loaded with --load_json_path
    dataset: Callable[[Path], None] | None = None  # changes the good dataset {data}
    files: dict[str, object] = field(default_factory=dict)  # extra files in {ws}: bytes, str or callable(path)
    subprocess: bool = False
    errors: int = 1  # exact number of error lines
    disk_free: int | None = None  # shutil.disk_usage(...).free as seen by preflight
    cpu_only: bool = False  # the case is an error only without CUDA
    also: tuple[tuple[str, ...], ...] = ()  # further error lines expected (for several problems at once)


# --------------------------------------------------------------------------------------- builders


def _png(color=(200, 30, 30), size=(64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _clear(data: Path) -> None:
    import shutil

    shutil.rmtree(data)
    data.mkdir()


def empty_dataset(data: Path) -> None:
    _clear(data)


def badly_named_folders(data: Path) -> None:
    _clear(data)
    for name in ("mychar", "x_5", "five_cat"):
        (data / name).mkdir()
        (data / name / "a.png").write_bytes(_png())


def zero_repeats(data: Path) -> None:
    (data / SUBSET).rename(data / "0_sks shape")


def images_in_root(data: Path) -> None:
    _clear(data)
    (data / "a.png").write_bytes(_png())
    (data / "a.txt").write_text("sks", encoding="utf-8")


def only_undecodable(data: Path) -> None:
    sub = data / SUBSET
    good = _png()
    for p in sub.glob("*.png"):
        p.unlink()
    (sub / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (sub / "truncated.png").write_bytes(good[: len(good) // 2])
    (sub / "empty.jpg").write_bytes(b"")
    (sub / "text.webp").write_text("hello", encoding="utf-8")


def only_hidden_junk(data: Path) -> None:
    sub = data / SUBSET
    for p in sub.glob("*.png"):
        p.rename(sub / f"._{p.name}")  # macOS resource forks look like images by name
    (sub / "Thumbs.db").write_bytes(b"\x00" * 64)
    (sub / ".DS_Store").write_bytes(b"\x00" * 64)


def non_utf8_caption(data: Path) -> None:
    (data / SUBSET / "img01.txt").write_bytes("caf\xe9, cr\xe8me br\xfbl\xe9e".encode("latin-1"))


def captions_without_images(data: Path) -> None:
    for p in (data / SUBSET).glob("*.png"):
        p.unlink()


# --------------------------------------------------------------------------------------- the cases

_PROMPTS_BAD_OPTION = "a photo of sks shape --w 64 --x 5\n"
_PROMPTS_BAD_VALUE = "a photo of sks shape --w wide\n"
_TOML_MALFORMED = "[general]\nshuffle_caption = true\n[[datasets]\nresolution = 64\n"
_TOML_UNKNOWN_KEY = ("[general]\nshuffle_captions = true\n[[datasets]]\nresolution = 64\n"
                     "[[datasets.subsets]]\nimage_dir = '{data}/5_sks shape'\nnum_repeats = 2\n")
_TOML_BAD_VALIDATION_SPLIT = ("[general]\nvalidation_split = 1.5\n[[datasets]]\nresolution = 64\n"
                              "[[datasets.subsets]]\nimage_dir = '{data}/5_sks shape'\n")
_TOML_CONDITIONING_DIR = ("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{data}/5_sks shape'\n"
                          "conditioning_data_dir = '{data}/5_sks shape'\n")
_TOML_ALPHA_MASK_IN_GENERAL = ("[general]\nalpha_mask = true\n[[datasets]]\nresolution = 64\n"
                               "[[datasets.subsets]]\nimage_dir = '{data}/5_sks shape'\n")
_TOML_MIXED_SUBSETS = ("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{data}/5_sks shape'\n"
                       "[[datasets.subsets]]\nmetadata_file = '{ws}/meta.json'\n")
_TOML_METADATA_FILE_MISSING = ("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{ws}/nope.json'\n"
                               "image_dir = '{data}/5_sks shape'\n")
_META_MALFORMED = '{{"img00": {{"caption": "a red circle",}}}}'  # str files go through str.format
_META_IMAGES_MISSING = '{{"img00": {{"caption": "found"}}, "lost": {{"caption": "not found"}}}}'
_TOML_MASKED_LOSS_NO_ALPHA = ("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{data}/5_sks shape'\n"
                              "alpha_mask = false\n")


def _evil_payload(path: Path):
    import os

    class Evil:  # unpickling it would create {path}.pwned
        def __reduce__(self):
            return (os.system, (f"touch '{path}.pwned'",))

    import torch

    return {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": Evil()}


def _evil_ckpt(path: Path) -> None:
    """A .ckpt (torch.save's zip format) whose unpickling runs code."""
    import torch

    torch.save(_evil_payload(path), str(path))


def _evil_legacy_ckpt(path: Path) -> None:
    """The same in torch's legacy (pre-1.6) format, as old checkpoints are."""
    import torch

    torch.save(_evil_payload(path), str(path), _use_new_zipfile_serialization=False)


def _plain_pickle(path: Path) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": [0.0]}}, f, protocol=4)


def _random_safetensors(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.randn(8, 8), "decoder.bias": torch.randn(8)}, str(path))


def _sdxl_lora(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))


CASES: list[Case] = [
    # ---------------------------------------------------------------- base model
    Case("model_missing", ("base_model", "not found"), ["--base_model", "{ws}/nope.safetensors"]),
    Case("model_not_safetensors", ("pretrained_model_name_or_path", "not a readable .safetensors"),
         ["--base_model", "{ws}/broken.safetensors"], files={"broken.safetensors": b"\x10\x00garbage"}),
    Case("model_unknown_family", ("pretrained_model_name_or_path", "not a Stable Diffusion checkpoint"),
         ["--base_model", "{ws}/random.safetensors"], files={"random.safetensors": _random_safetensors},
         subprocess=True),
    Case("model_ckpt_runs_code", ("pretrained_model_name_or_path", "refused"),
         ["--base_model", "{ws}/evil.ckpt"], files={"evil.ckpt": _evil_ckpt}, subprocess=True),
    Case("model_legacy_ckpt_runs_code", ("pretrained_model_name_or_path", "refused", "system"),
         ["--base_model", "{ws}/evil.ckpt"], files={"evil.ckpt": _evil_legacy_ckpt}),
    Case("model_ckpt_plain_pickle", ("pretrained_model_name_or_path", "not a readable checkpoint"),
         ["--base_model", "{ws}/old.ckpt"], files={"old.ckpt": _plain_pickle}),
    Case("model_folder_not_diffusers", ("pretrained_model_name_or_path", "not a diffusers model"),
         ["--base_model", "{ws}/folder"], files={"folder/readme.txt": "not a model"}),
    Case("model_is_a_lora", ("pretrained_model_name_or_path", "LoRA"), ["--base_model", "{lora}"]),
    Case("model_not_set", ("base_model", "required"), drop=("--base_model",)),
    Case("tokenizer_missing_offline", ("tokenizer_cache_dir", "tokenizer"), drop=("--tokenizer_cache_dir",)),
    # ---------------------------------------------------------------- dataset
    Case("dataset_missing", ("img_folder", "not found"), ["--img_folder", "{ws}/nodata"]),
    Case("dataset_is_a_file", ("img_folder", "is a file"), ["--img_folder", "{ws}/data.txt"],
         files={"data.txt": "images"}),
    Case("dataset_empty", ("train_data_dir", "is empty"), dataset=empty_dataset),
    Case("dataset_folders_not_n_name", ("train_data_dir", "<repeats>_<name>", "mychar"), dataset=badly_named_folders),
    Case("dataset_zero_repeats", ("train_data_dir", "<repeats>_<name>", "0_sks shape"), dataset=zero_repeats),
    Case("dataset_images_in_root", ("train_data_dir", "directly inside"), dataset=images_in_root),
    Case("dataset_only_undecodable_images", ("train_data_dir", "none of the images can be used"),
         dataset=only_undecodable, subprocess=True),
    Case("dataset_only_hidden_junk", ("train_data_dir", "no training images"), dataset=only_hidden_junk),
    Case("dataset_captions_without_images", ("train_data_dir", "no training images"), dataset=captions_without_images),
    Case("dataset_non_utf8_caption", ("train_data_dir", "img01.txt", "UTF-8"), dataset=non_utf8_caption,
         subprocess=True),
    Case("reg_folder_missing", ("reg_img_folder", "not found"), ["--reg_img_folder", "{ws}/noreg"]),
    Case("dataset_config_missing", ("dataset_config", "not found"), ["--dataset_config", "{ws}/nope.toml"]),
    Case("dataset_config_malformed_toml", ("dataset_config", "not valid TOML"), ["--dataset_config", "{ws}/d.toml"],
         files={"d.toml": _TOML_MALFORMED}),
    Case("dataset_config_unknown_key", ("dataset_config", "shuffle_captions"), ["--dataset_config", "{ws}/d.toml"],
         files={"d.toml": _TOML_UNKNOWN_KEY}),
    # ---------------------------------------------------------------- resolution, buckets, augmentation
    Case("resolution_not_multiple_of_bucket_step", ("resolution", "bucket_reso_steps", "JSON files: train_resolution"),
         ["--train_resolution", "100"]),
    Case("min_bucket_above_max", ("min_bucket_resolution", "max_bucket_resolution"),
         ["--min_bucket_resolution", "256"]),
    Case("bucket_step_not_multiple_of_8", ("bucket_reso_steps", "multiple of 8"), ["--bucket_reso_steps", "12"]),
    Case("cache_latents_with_color_aug", ("color_aug", "cache_latents"), ["--cache_latents", "--color_aug"]),
    Case("cache_latents_with_random_crop", ("random_crop", "cache_latents"), ["--cache_latents", "--random_crop"]),
    # ---------------------------------------------------------------- JSON files
    Case("json_malformed", ("job.json", "line 3, column 3"), json='{\n  "net_dim": 8\n  "alpha": 4\n}',
         subprocess=True),
    Case("json_wrong_type", ("net_dim", "expected an integer"), json={"net_dim": "big"}),
    Case("json_not_an_object", ("job.json",), json="[1, 2, 3]"),
    Case("json_bad_choice", ("max_clip_token_length", "75, 150, 225"), json={"max_clip_token_length": 100}),
    Case("json_bad_save_precision", ("save_precision", "float, fp16, bf16"), json={"save_precision": "fp8"}),
    Case("json_skip_list_unknown_setting", ("json_load_skip_list", "nett_dim"),
         json={"json_load_skip_list": ["nett_dim"], "net_dim": 8}),
    Case("json_unknown_sampler", ("sample_sampler", "ddim"), json={"sample_sampler": "magic"}),
    # ---------------------------------------------------------------- optimizer and schedule
    Case("optimizer_unknown", ("optimizer_type", "AdamW"), ["--optimizer_type", "Adamm"]),
    Case("optimizer_class_not_found", ("optimizer_type", "no_such_pkg"), ["--optimizer_type", "no_such_pkg.optim.Fast"]),
    Case("optimizer_args_not_literal", ("optimizer_args", "weight_decay"), ["--optimizer_args", "weight_decay=abc"]),
    Case("optimizer_args_unknown_name", ("optimizer_args", "momentum_x"),
         ["--optimizer_type", "AdamW", "--optimizer_args", "momentum_x=0.5"]),
    Case("constant_scheduler_with_warmup", ("warmup_lr_ratio", "constant"),
         ["--scheduler", "constant", "--warmup_lr_ratio", "0.1"]),
    Case("learning_rate_negative", ("learning_rate", "0 or more"), ["--learning_rate", "-0.0001"]),
    Case("unet_lr_negative", ("unet_lr", "0 or more"), ["--unet_lr", "-1"]),
    # ---------------------------------------------------------------- network and lengths
    Case("dim_zero", ("net_dim", "1 or more"), ["--net_dim", "0"]),
    Case("dim_negative", ("net_dim", "1 or more"), ["--net_dim", "-8"]),
    Case("alpha_zero", ("alpha", "above 0"), ["--alpha", "0"]),
    Case("batch_size_zero", ("batch_size", "1 or more"), ["--batch_size", "0"]),
    Case("epochs_zero", ("num_epochs", "1 or more"), ["--num_epochs", "0"], drop=("--max_steps",)),
    Case("unet_only_and_text_only", ("unet_only", "text_only"), ["--unet_only", "--text_only"]),
    Case("max_token_length_100", ("max_clip_token_length", "75, 150, 225"), ["--max_clip_token_length", "100"]),
    Case("clip_skip_zero", ("clip_skip", "1 or more"), ["--clip_skip", "0"]),
    Case("clip_skip_too_big", ("clip_skip", "between 1 and 12"), ["--clip_skip", "13"]),
    Case("save_precision_bad", ("save_precision", "float, fp16, bf16"), ["--save_precision", "double"]),
    Case("network_dropout_above_1", ("network_dropout", "between 0 and 1"), ["--network_dropout", "1.5"]),
    Case("dim_from_weights_without_weights", ("dim_from_weights", "network_weights"), ["--dim_from_weights"]),
    Case("network_weights_missing", ("lora_model_for_resume", "not found"),
         ["--lora_model_for_resume", "{ws}/old.safetensors"]),
    Case("network_weights_not_a_lora", ("network_weights", "LoRA"), ["--lora_model_for_resume", "{model}"]),
    Case("vae_not_a_vae", ("vae", "no VAE weights"), ["--vae", "{lora}"]),
    Case("vae_folder_not_diffusers", ("vae", "not a diffusers VAE folder"), ["--vae", "{assets}"]),
    Case("network_module_unknown", ("network_module", "no_such_networks"), ["--network_module", "no_such_networks.x"]),
    Case("network_args_bad_conv_dim", ("conv_dim", "abc"), ["--network_args", "conv_dim=abc"]),
    Case("vae_missing", ("vae", "not found"), ["--vae", "{ws}/vae.safetensors"]),
    Case("resume_missing", ("resume", "not found"), ["--resume", "{ws}/state"]),
    # ---------------------------------------------------------------- fine-tuning metadata (in_json, metadata_file)
    Case("in_json_missing", ("in_json", "not found"), ["--in_json", "{ws}/nope.json"]),
    Case("in_json_malformed", ("in_json", "not valid JSON", "line 1, column 38", "meta.json"),
         ["--in_json", "{ws}/meta.json", "--img_folder", "{data}/5_sks shape"], files={"meta.json": _META_MALFORMED}),
    Case("in_json_no_entries", ("in_json", "no usable image entries"),
         ["--in_json", "{ws}/meta.json", "--img_folder", "{data}/5_sks shape"], files={"meta.json": "{{}}"}),
    Case("in_json_images_missing", ("in_json", "no image found for 1 of 2 entries", "'lost'"),
         ["--in_json", "{ws}/meta.json", "--img_folder", "{data}/5_sks shape"],
         files={"meta.json": _META_IMAGES_MISSING}),
    Case("engine_in_json_malformed", ("in_json", "not valid JSON"), ["--in_json", "{ws}/meta.json"], runner="engine",
         files={"meta.json": _META_MALFORMED}),
    Case("engine_dataset_repeats_zero", ("dataset_repeats", "at least 1"), ["--in_json", "{ws}/meta.json",
                                                                          "--dataset_repeats", "0"],
         runner="engine", files={"meta.json": '{{"5_sks shape/img00": {{}}}}'}),
    Case("dataset_config_mixed_subsets", ("dataset_config", "mixes DreamBooth subsets", "separate [[datasets]]"),
         ["--dataset_config", "{ws}/d.toml"], files={"d.toml": _TOML_MIXED_SUBSETS, "meta.json": "{{}}"}),
    Case("dataset_config_metadata_file_missing", ("dataset_config metadata_file", "nope.json", "does not exist"),
         ["--dataset_config", "{ws}/d.toml"], files={"d.toml": _TOML_METADATA_FILE_MISSING}),
    # ---------------------------------------------------------------- validation loss
    Case("validation_split_negative", ("validation_split", "from 0", "-0.1"), ["--validation_split", "-0.1"]),
    Case("validation_split_one", ("validation_split", "below 1"), ["--validation_split", "1"]),
    Case("validate_every_n_steps_zero", ("validate_every_n_steps", "1 or more"), ["--validate_every_n_steps", "0"]),
    Case("max_validation_steps_negative", ("max_validation_steps", "1 or more"), ["--max_validation_steps", "-2"]),
    Case("json_validation_split_above_1", ("validation_split", "below 1"), json={"validation_split": 1.5}),
    Case("dataset_config_validation_split_above_1", ("validation_split", "dataset_config [general]", "below 1"),
         ["--dataset_config", "{ws}/d.toml"], files={"d.toml": _TOML_BAD_VALIDATION_SPLIT}),
    Case("engine_validation_split_one", ("validation_split", "below 1"), ["--validation_split", "1.0"],
         runner="engine"),
    # ---------------------------------------------------------------- alpha masks
    Case("masked_loss_without_alpha_mask", ("masked_loss", "alpha_mask"), ["--masked_loss"]),
    Case("json_masked_loss_without_alpha_mask", ("masked_loss", "alpha_mask"), json={"masked_loss": True}),
    Case("engine_masked_loss_without_alpha_mask", ("masked_loss", "alpha_mask"), ["--masked_loss"], runner="engine"),
    Case("engine_fp8_base_without_mixed_precision", ("fp8_base", "mixed_precision fp16 or bf16"), ["--fp8_base"],
         runner="engine"),
    Case("dataset_config_masked_loss_without_alpha_mask", ("masked_loss", "alpha_mask"),
         ["--masked_loss", "--dataset_config", "{ws}/d.toml"], files={"d.toml": _TOML_MASKED_LOSS_NO_ALPHA}),
    Case("dataset_config_conditioning_data_dir", ("dataset_config", "conditioning_data_dir", "alpha_mask"),
         ["--dataset_config", "{ws}/d.toml"], files={"d.toml": _TOML_CONDITIONING_DIR}),
    Case("dataset_config_alpha_mask_in_general", ("dataset_config", "alpha_mask", "datasets.subsets"),
         ["--dataset_config", "{ws}/d.toml"], files={"d.toml": _TOML_ALPHA_MASK_IN_GENERAL}),
    # ---------------------------------------------------------------- noise and loss
    Case("adaptive_noise_scale_without_noise_offset", ("adaptive_noise_scale", "needs noise_offset"),
         ["--adaptive_noise_scale", "0.01"]),
    Case("min_timestep_above_max_timestep", ("min_timestep", "above max_timestep"),
         ["--min_timestep", "600", "--max_timestep", "400"]),
    Case("max_timestep_above_1000", ("max_timestep", "from 0 to 1000"), ["--max_timestep", "1001"]),
    Case("loss_type_unknown", ("loss_type", "huber"), ["--loss_type", "mse"]),
    Case("json_huber_schedule_unknown", ("huber_schedule", "exponential"), json={"huber_schedule": "linear"}),
    Case("huber_c_zero", ("huber_c", "above 0"), ["--loss_type", "huber", "--huber_c", "0"]),
    Case("scale_v_pred_loss_on_epsilon_model", ("scale_v_pred_loss_like_noise_pred", "v-prediction"),
         ["--scale_v_pred_loss_like_noise_pred"]),
    Case("v_pred_like_loss_with_v_parameterization", ("v_pred_like_loss", "v_parameterization"),
         ["--v_parameterization", "--v_pred_like_loss", "0.1"]),
    Case("zero_terminal_snr_epsilon_min_snr", ("min_snr_gamma", "zero_terminal_snr", "max_timestep"),
         ["--zero_terminal_snr", "--min_snr_gamma", "5"]),
    Case("engine_loss_type_unknown", ("loss_type", "l1, l2, huber, smooth_l1"), ["--loss_type", "mse"],
         runner="engine"),
    Case("engine_adaptive_noise_scale_without_noise_offset", ("adaptive_noise_scale", "noise_offset"),
         ["--adaptive_noise_scale", "0.01"], runner="engine"),
    # ---------------------------------------------------------------- samples
    Case("sample_sampler_unknown", ("sample_sampler", "ddim"), ["--sample_sampler", "magic"]),
    Case("sample_prompt_bad_option", ("sample_prompts", "line 1", "--x"), ["--sample_prompts", "{ws}/p.txt"],
         files={"p.txt": _PROMPTS_BAD_OPTION}),
    Case("sample_prompt_bad_value", ("sample_prompts", "--w", "wide"), ["--sample_prompts", "{ws}/p.txt"],
         files={"p.txt": _PROMPTS_BAD_VALUE}),
    Case("sample_prompt_file_missing", ("sample_prompts", "not found"), ["--sample_prompts", "{ws}/prompts.txt"]),
    Case("sampling_without_prompt_file", ("sample_prompts", "no prompt file"), ["--sample_every_n_steps", "1"]),
    # ---------------------------------------------------------------- base_weights, scale_weight_norms, initial_step
    Case("base_weights_missing", ("base_weights", "not found"), ["--base_weights", "{ws}/nope.safetensors"]),
    Case("base_weights_not_readable", ("base_weights", "could not be read as a LoRA file"),
         ["--base_weights", "{ws}/text.safetensors"], files={"text.safetensors": b"this is not a safetensors file"}),
    Case("base_weights_not_a_lora", ("base_weights", "not a LoRA"), ["--base_weights", "{model}"]),
    Case("base_weights_for_another_family", ("base_weights", "for sdxl", "sd1"),
         ["--base_weights", "{ws}/xl.safetensors"], files={"xl.safetensors": _sdxl_lora}),
    Case("base_weights_multiplier_count", ("base_weights_multiplier", "one multiplier per file"),
         ["--base_weights", "{lora}", "--base_weights_multiplier", "0.5", "1"]),
    Case("base_weights_multiplier_not_a_number", ("base_weights_multiplier", "not a number"),
         ["--base_weights", "{lora}", "--base_weights_multiplier", "strong"]),
    Case("engine_base_weights_missing", ("base_weights", "not found"), ["--base_weights", "{ws}/nope.safetensors"],
         runner="engine"),
    Case("scale_weight_norms_negative", ("scale_weight_norms", "above 0"), ["--scale_weight_norms", "-1"]),
    Case("scale_weight_norms_with_lycoris_ia3", ("scale_weight_norms", "algo=ia3"),
         ["--lyco", "--network_args", "algo=ia3", "preset=ia3", "--scale_weight_norms", "1"]),
    Case("initial_step_past_the_end", ("initial_step", "max_train_steps"), ["--initial_step", "2"]),
    Case("engine_initial_epoch_zero", ("initial_epoch", "1 or more"), ["--initial_epoch", "0"], runner="engine"),
    Case("initial_step_with_resume", ("initial_step", "resume"), ["--initial_step", "1", "--resume", "{ws}/state"],
         files={"state": Path.mkdir}, errors=2, also=(("resume",),)),
    # ---------------------------------------------------------------- output
    Case("output_dir_is_a_file", ("output_folder", "is a file"), ["--output_folder", "{ws}/out.txt"],
         files={"out.txt": "a file"}),
    Case("output_name_bad_characters", ("change_output_name", "not allowed"), ["--change_output_name", "my:lora?"]),
    Case("output_name_reserved_on_windows", ("output_name", "reserved"), ["--change_output_name", "con"]),
    Case("output_dir_inside_dataset", ("output_dir", "inside the dataset"),
         ["--output_folder", "{data}/" + SUBSET + "/lora"]),
    Case("disk_full_for_the_lora", ("output_dir", "not enough free disk space"), disk_free=10_000),
    Case("disk_full_for_the_latent_cache", ("output_dir", "not enough free disk space", "a latent cache of about"),
         ["--cache_latents_to_disk", "--train_resolution", "1024", "--max_bucket_resolution", "1024"],
         disk_free=600_000),
    # ---------------------------------------------------------------- LoRA metadata and caption options
    Case("metadata_thumbnail_missing", ("metadata_thumbnail", "not found"), ["--metadata_thumbnail", "{ws}/thumb.png"]),
    Case("metadata_thumbnail_not_an_image", ("metadata_thumbnail", "not an image"),
         ["--metadata_thumbnail", "{ws}/thumb.png"], files={"thumb.png": "this is text, not a PNG"}),
    Case("metadata_thumbnail_bad_data_url", ("metadata_thumbnail", "data URL"),
         ["--metadata_thumbnail", "data:text/plain,hello"]),
    Case("json_metadata_thumbnail_is_a_folder", ("metadata_thumbnail", "is a folder"),
         json={"metadata_thumbnail": "{data}"}),
    Case("engine_metadata_thumbnail_missing", ("metadata_thumbnail", "not found"),
         ["--metadata_thumbnail", "{ws}/thumb.png"], runner="engine"),
    Case("keep_tokens_separator_is_caption_separator", ("keep_tokens_separator", "caption_separator"),
         ["--keep_tokens_separator", ","]),
    # ---------------------------------------------------------------- CUDA-only options (documented fallbacks in main.py)
    Case("engine_fp16_without_cuda", ("mixed_precision", "CUDA"), ["--mixed_precision", "fp16"], runner="engine",
         cpu_only=True),
    Case("engine_xformers_without_cuda", ("xformers", "CUDA"), ["--xformers"], runner="engine", cpu_only=True),
    Case("engine_clip_skip_zero", ("clip_skip", "between 1 and 12"), ["--clip_skip", "0"], runner="engine"),
    # ---------------------------------------------------------------- everything reported together
    Case("several_front_end_problems", ("net_dim", "1 or more"), ["--net_dim", "0", "--batch_size", "0",
                                                                  "--vae", "{ws}/vae.pt"],
         errors=3, also=(("batch_size",), ("vae", "not found"))),
    Case("several_engine_problems", ("clip_skip", "between 1 and 12"),
         ["--clip_skip", "13", "--train_resolution", "100", "--optimizer_args", "weight_decay=abc"],
         errors=3, also=(("resolution",), ("optimizer_args",))),
    # ---------------------------------------------------------------- side tools
    Case("resize_rank_zero", ("new_rank",), ["--model", "{lora}", "--save_to", "{ws}/out.safetensors", "--new_rank", "0"],
         runner="tool:lora_resize", subprocess=True),
    Case("resize_output_exists", ("--overwrite",), ["--model", "{lora}", "--save_to", "{ws}/exists.safetensors",
                                                    "--new_rank", "2"],
         runner="tool:lora_resize", files={"exists.safetensors": b"keep me"}),
    Case("resize_not_a_lora", ("not a kohya LoRA",), ["--model", "{model}", "--save_to", "{ws}/out.safetensors",
                                                      "--new_rank", "2"], runner="tool:lora_resize"),
    Case("merge_ratio_count_mismatch", ("ratios",), ["--models", "{lora}", "{lora}", "--ratios", "1", "--save_to",
                                                     "{ws}/out.safetensors", "--concat"],
         runner="tool:lora_merge", subprocess=True),
    Case("merge_not_a_lora", ("models", "LoRA file"), ["--models", "{lora}", "{ws}/text.safetensors", "--save_to",
                                                     "{ws}/out.safetensors", "--concat"],
         runner="tool:lora_merge", files={"text.safetensors": b"this is not a safetensors file"}),
    Case("extract_rank_zero", ("linear_",), ["--base", "{model}", "--tuned", "{model}", "--save_to",
                                             "{ws}/out.safetensors", "--linear_dim", "0"], runner="tool:locon_extract"),
    Case("lyco_merge_not_a_network", ("not a kohya",), ["--base", "{model}", "--lycoris", "{model}", "--save_to",
                                                        "{ws}/out.safetensors"], runner="tool:locon_loha_merge"),
    Case("image_resize_bad_size", ("sizes",), ["--src", "{data}", "--dst", "{ws}/small", "--sizes", "0"],
         runner="tool:image_resize"),
    Case("image_resize_missing_source", ("src",), ["--src", "{ws}/nope", "--dst", "{ws}/small", "--sizes", "64"],
         runner="tool:image_resize"),
]


def json_text(case: Case, values: dict[str, str]) -> str | None:
    if case.json is None:
        return None
    text = case.json if isinstance(case.json, str) else json.dumps(case.json)
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text
