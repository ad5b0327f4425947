"""ArgStore: every 2023 setting and default, its description, deprecated settings, and the map to TrainConfig."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from ArgsList import GROUPS, ArgStore
from frontend.resolve import resolve_settings, validate_store
from frontend.settings_map import FRONT_END_ONLY, NAME_MAP, apply_fallbacks, to_train_config, unsupported_settings
from sd_scripts.core.config import TrainConfig
from sd_scripts.core.errors import ConfigError, UserErrors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The 2023 tool's ArgStore (April 2023, plus the six settings added in May), with its defaults.
DEFAULTS_2023 = {
    "base_model": None, "img_folder": None, "output_folder": None, "save_json_folder": None,
    "save_json_name": None, "load_json_path": None, "multi_run_folder": None, "reg_img_folder": None,
    "sample_prompts": None, "change_output_name": None, "json_load_skip_list": None, "training_comment": None,
    "save_json_only": False, "tag_occurrence_txt_file": True, "sort_tag_occurrence_alphabetically": False,
    "optimizer_type": "AdamW8bit", "optimizer_args": {"weight_decay": "0.1", "betas": "0.9,0.99"},
    "scheduler": "cosine", "cosine_restarts": 1, "scheduler_power": 1, "lr_scheduler_type": None,
    "lr_scheduler_args": None, "learning_rate": 1e-4, "unet_lr": None, "text_encoder_lr": None,
    "warmup_lr_ratio": None, "unet_only": False, "net_dim": 32, "alpha": 16, "train_resolution": 512,
    "height_resolution": None, "batch_size": 1, "clip_skip": 2, "test_seed": 23, "mixed_precision": "fp16",
    "save_precision": "fp16", "lyco": False, "network_args": None, "num_epochs": 1, "save_every_n_epochs": None,
    "save_n_epoch_ratio": None, "save_last_n_epochs": None, "max_steps": None, "sample_sampler": None,
    "sample_every_n_steps": None, "sample_every_n_epochs": None, "buckets": True, "min_bucket_resolution": 320,
    "max_bucket_resolution": 960, "bucket_reso_steps": None, "bucket_no_upscale": False,
    "shuffle_captions": False, "keep_tokens": None, "token_warmup_step": None, "token_warmup_min": None,
    "weighted_captions": False, "xformers": True, "cache_latents": True, "cache_latents_to_disk": False,
    "random_crop": False, "flip_aug": False, "v2": False, "v_parameterization": False,
    "gradient_checkpointing": False, "gradient_acc_steps": None, "noise_offset": None, "mem_eff_attn": False,
    "min_snr_gamma": None, "huggingface_repo_id": None, "huggingface_repo_type": None,
    "huggingface_path_in_repo": None, "huggingface_token": None, "huggingface_repo_visibility": None,
    "save_state_to_huggingface": False, "resume_from_huggingface": False, "async_upload": False,
    "lora_model_for_resume": None, "save_state": False, "resume": None, "text_only": False, "vae": None,
    "log_dir": None, "log_prefix": None, "tokenizer_cache_dir": None, "dataset_config": None, "lowram": False,
    "no_meta": False, "color_aug": False, "use_8bit_adam": False, "use_lion": False, "caption_dropout_rate": None,
    "caption_dropout_every_n_epochs": None, "caption_tag_dropout_rate": None, "prior_loss_weight": 1,
    "max_grad_norm": 1, "save_as": "safetensors", "caption_extension": ".txt", "max_clip_token_length": 150,
    "save_last_n_epochs_state": None, "num_workers": 1, "persistent_workers": True, "face_crop_aug_range": None,
    "network_module": "sd_scripts.networks.lora", "locon_dim": None, "locon_alpha": None, "locon": False,
    "dim_from_weights": False, "multires_noise_iterations": None, "multires_noise_discount": 0.3,
    "log_with": None, "log_tracker_name": None, "wandb_api_key": None,
}


def test_every_2023_setting_is_there_with_its_default():
    store = ArgStore()
    assert len(DEFAULTS_2023) == 112
    for name, default in DEFAULTS_2023.items():
        assert hasattr(store, name), name
        assert getattr(store, name) == default, name
    # 2023 order is kept: a saved file starts like the 2023 tool's files did.
    assert ArgStore.setting_names()[:5] == ["base_model", "img_folder", "output_folder", "save_json_folder",
                                            "save_json_name"]


def test_every_setting_is_described():
    infos = ArgStore.settings()
    assert len({i.name for i in infos}) == len(infos)
    for info in infos:
        assert info.help and "\n" not in info.help, info.name
        assert info.group in GROUPS, info.name
        assert info.kind in ("bool", "int", "float", "str", "dict", "list"), info.name
        if info.choices and info.default is not None:
            assert info.default in info.choices, info.name
        if info.required and info.default is None:
            assert info.name in ("base_model", "img_folder", "output_folder"), info.name


def test_defaults_are_fresh_copies():
    first, second = ArgStore(), ArgStore()
    first.optimizer_args["weight_decay"] = "0.5"
    assert second.optimizer_args["weight_decay"] == "0.1"


def test_editing_argslist_defaults_still_configures(tmp_path):
    source = open(os.path.join(ROOT, "ArgsList.py"), encoding="utf-8").read()
    edited = source.replace('net_dim: int = setting(\n        32,', 'net_dim: int = setting(\n        64,')
    edited = edited.replace('base_model: str | None = setting(\n        None,',
                            'base_model: str | None = setting(\n        r"C:\\models\\my model.safetensors",')
    assert edited.count("64,") > source.count("64,")
    (tmp_path / "ArgsList.py").write_text(edited, encoding="utf-8")
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "from frontend.resolve import resolve_settings\n"
            "s = resolve_settings({'alpha': 8}).store\n"
            "print(s.net_dim, s.alpha, s.base_model)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), ROOT], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    net_dim, alpha, base = out.stdout.split(" ", 2)
    assert (net_dim, alpha) == ("64", "8.0")
    assert base.strip().endswith("my model.safetensors")


# ------------------------------------------------------------------------------------------ deprecated
def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_deprecated_optimizer_switches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = _write(tmp_path / "old.json", {"use_8bit_adam": True, "optimizer_type": "AdamW"})
    resolved = resolve_settings({"load_json_path": job})
    assert resolved.store.optimizer_type == "AdamW8bit"
    assert resolved.store.use_8bit_adam is False
    assert any("use_8bit_adam is deprecated" in n for n in resolved.notes)

    job = _write(tmp_path / "lion.json", {"use_lion": True})
    assert resolve_settings({"load_json_path": job}).store.optimizer_type == "Lion"
    # a modern setting at a higher level wins over an old one lower down
    assert resolve_settings({"load_json_path": job, "optimizer_type": "AdamW"}).store.optimizer_type == "AdamW"

    job = _write(tmp_path / "both.json", {"use_lion": True, "use_8bit_adam": True})
    with pytest.raises(ConfigError, match="use_8bit_adam and use_lion"):
        resolve_settings({"load_json_path": job})


def test_deprecated_locon_settings_become_conv_network_args(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = _write(tmp_path / "locon.json", {"locon": True, "locon_dim": 8, "locon_alpha": 1, "net_dim": 16})
    store = resolve_settings({"load_json_path": job}).store
    assert store.network_args == {"conv_dim": "8", "conv_alpha": "1"}
    assert (store.locon, store.locon_dim, store.locon_alpha, store.lyco) == (False, None, None, False)
    mapped = to_train_config(store, has_cuda=True, has_xformers=True)
    assert mapped.config.network_module == "networks.lora"
    assert mapped.config.network_args == ["conv_dim=8", "conv_alpha=1"]

    # locon without its own dim takes net_dim; given network_args are kept
    job = _write(tmp_path / "locon2.json", {"locon": True, "net_dim": 16, "network_args": {"conv_dim": "4"}})
    assert resolve_settings({"load_json_path": job}).store.network_args == {"conv_dim": "4"}
    job = _write(tmp_path / "locon3.json", {"locon": True, "net_dim": 16})
    assert resolve_settings({"load_json_path": job}).store.network_args == {"conv_dim": "16"}


def test_lyco_and_network_args_map_to_lycoris():
    store = ArgStore(lyco=True, network_args={"algo": "loha", "conv_dim": "4", "conv_alpha": 1, "use_conv_cp": True})
    config = to_train_config(store, has_cuda=True, has_xformers=True).config
    assert config.network_module == "lycoris.kohya"
    assert config.network_args == ["algo=loha", "conv_dim=4", "conv_alpha=1", "use_conv_cp=True"]
    dylora = to_train_config(ArgStore(network_args={"unit": "4"}), has_cuda=True, has_xformers=True).config
    assert dylora.network_module == "networks.dylora"


# ------------------------------------------------------------------------------------------ name map
def test_every_setting_reaches_the_engine_or_the_front_end():
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    not_in_engine = []
    for info in ArgStore.settings():
        if info.name in FRONT_END_ONLY or info.deprecated:
            continue
        if NAME_MAP.get(info.name, info.name) not in config_fields:
            not_in_engine.append(info.name)
    # settings the engine does not have are refused when set (see the next test)
    assert set(not_in_engine) <= {"face_crop_aug_range", "log_tracker_name"}


def test_settings_the_engine_lacks_are_refused_when_set():
    assert unsupported_settings(ArgStore()) == []
    store = ArgStore(face_crop_aug_range="2.0,4.0")
    names = [name for name, _ in unsupported_settings(store)]
    assert names == (["face_crop_aug_range"] if "face_crop_aug_range" not in
                     {f.name for f in dataclasses.fields(TrainConfig)} else [])


def test_name_map_and_compound_settings():
    store = ArgStore(
        base_model="/m/model.safetensors", img_folder="/d", output_folder="/o", change_output_name="mine",
        net_dim=16, alpha=8.0, train_resolution=768, height_resolution=512, batch_size=3, test_seed=7,
        scheduler="cosine_with_restarts", cosine_restarts=4, warmup_lr_ratio=0.1, buckets=False,
        min_bucket_resolution=256, max_bucket_resolution=1024, shuffle_captions=True, num_workers=2,
        persistent_workers=True, gradient_acc_steps=2, max_clip_token_length=225, save_as="ckpt",
        lora_model_for_resume="/w.safetensors", unet_only=True, no_meta=True, log_dir="/logs",
        caption_extension="caption", num_epochs=5, reg_img_folder="/r",
    )
    config = to_train_config(store, has_cuda=True, has_xformers=True).config
    expected = {
        "pretrained_model_name_or_path": "/m/model.safetensors", "train_data_dir": "/d", "output_dir": "/o",
        "output_name": "mine", "network_dim": 16, "network_alpha": 8.0, "resolution": "768,512",
        "train_batch_size": 3, "seed": 7, "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 4,
        "lr_warmup_steps": 0.1, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
        "shuffle_caption": True, "max_data_loader_n_workers": 2, "persistent_data_loader_workers": True,
        "gradient_accumulation_steps": 2, "max_token_length": 225, "save_model_as": "ckpt",
        "network_weights": "/w.safetensors", "network_train_unet_only": True, "no_metadata": True,
        "logging_dir": "/logs", "caption_extension": ".caption", "max_train_epochs": 5, "reg_data_dir": "/r",
        "optimizer_type": "AdamW8bit", "optimizer_args": ["weight_decay=0.1", "betas=0.9,0.99"],
        "mixed_precision": "fp16", "save_precision": "fp16", "clip_skip": 2, "xformers": True,
        "v2": None, "v_parameterization": None, "network_module": "networks.lora", "network_args": [],
    }
    for key, value in expected.items():
        assert getattr(config, key) == value, key
    # the square default is one number; max_steps overrides epochs
    config = to_train_config(ArgStore(max_steps=300, num_epochs=9), has_cuda=True, has_xformers=True).config
    assert (config.resolution, config.max_train_steps, config.max_train_epochs) == ("512", 300, None)
    assert config.output_name == "last"
    assert to_train_config(ArgStore(v2=True, v_parameterization=True), has_cuda=True,
                           has_xformers=True).config.v_parameterization is True


def test_zero_and_false_values_reach_the_engine():
    store = ArgStore(keep_tokens=0, noise_offset=0.0, max_grad_norm=0.0, prior_loss_weight=0.0, clip_skip=1,
                     caption_dropout_rate=0.0, min_snr_gamma=None, num_workers=0, learning_rate=0.0,
                     warmup_lr_ratio=0.0, cache_latents=False, xformers=False, buckets=False, token_warmup_step=0.0)
    config = to_train_config(store, has_cuda=True, has_xformers=True).config
    assert config.keep_tokens == 0
    assert config.noise_offset == 0.0
    assert config.max_grad_norm == 0.0
    assert config.prior_loss_weight == 0.0
    assert config.max_data_loader_n_workers == 0
    assert config.persistent_data_loader_workers is False  # torch refuses persistent workers with 0 workers
    assert config.learning_rate == 0.0
    assert config.lr_warmup_steps == 0
    assert config.cache_latents is False and config.enable_bucket is False and config.xformers is False


def test_optimizer_args_per_optimizer():
    config = to_train_config(ArgStore(optimizer_type="AdaFactor"), has_cuda=True, has_xformers=True).config
    assert config.optimizer_args == ["weight_decay=0.1"]  # AdaFactor has no betas
    config = to_train_config(ArgStore(optimizer_type="DAdaptation", optimizer_args=None), has_cuda=True,
                             has_xformers=True).config
    assert config.optimizer_args == ["decouple=True"]
    config = to_train_config(ArgStore(optimizer_args={"decouple": False}, optimizer_type="DAdaptation"),
                             has_cuda=True, has_xformers=True).config
    assert config.optimizer_args == ["decouple=False"]
    config = to_train_config(ArgStore(lr_scheduler_args={"T_max": 100}), has_cuda=True, has_xformers=True).config
    assert config.lr_scheduler_args == ["T_max=100"]


def test_defaults_that_cannot_run_here_fall_back_in_one_line():
    store, note = apply_fallbacks(ArgStore(), has_cuda=False, has_xformers=False)
    assert (store.mixed_precision, store.optimizer_type, store.xformers) == ("no", "AdamW", False)
    assert note.count("\n") == 0
    assert "no CUDA GPU" in note and "fp16 -> no" in note and "AdamW8bit -> AdamW" in note
    mapped = to_train_config(ArgStore(), has_cuda=False, has_xformers=False)
    assert mapped.notes == [note]
    assert (mapped.config.mixed_precision, mapped.config.optimizer_type) == ("no", "AdamW")
    store, note = apply_fallbacks(ArgStore(mixed_precision="bf16", fp8_base=True), has_cuda=False, has_xformers=False)
    assert store.fp8_base is False and store.mixed_precision == "bf16" and "fp8_base -> off" in note
    # on a CUDA machine with xformers nothing changes
    assert apply_fallbacks(ArgStore(), has_cuda=True, has_xformers=True) == (ArgStore(), None)
    store, note = apply_fallbacks(ArgStore(), has_cuda=True, has_xformers=False)
    assert store.mixed_precision == "fp16" and store.xformers is False and "xformers is not installed" in note
    # bf16 and other optimizers are left alone
    store, _ = apply_fallbacks(ArgStore(mixed_precision="bf16", optimizer_type="Lion8bit"), False, False)
    assert (store.mixed_precision, store.optimizer_type) == ("bf16", "Lion")


def test_validation_lists_every_problem(tmp_path):
    store = ArgStore(base_model=str(tmp_path / "missing.safetensors"), img_folder=None,
                     output_folder=str(tmp_path / "out"), net_dim=0, unet_only=True, text_only=True,
                     random_crop=True, warmup_lr_ratio=1.5, sample_every_n_steps=100,
                     change_output_name="a/b", resume_from_huggingface=True)
    with pytest.raises(UserErrors) as info:
        validate_store(store)
    settings = [e.setting for e in info.value.errors]
    assert settings == ["base_model", "img_folder", "net_dim", "warmup_lr_ratio", "unet_only", "random_crop",
                        "sample_prompts", "change_output_name", "resume_from_huggingface"]
    assert all("\n" not in str(e) for e in info.value.errors)


def test_hub_ids_and_dataset_config(tmp_path):
    (tmp_path / "data.toml").write_text("[general]\n", encoding="utf-8")
    store = ArgStore(base_model="runwayml/stable-diffusion-v1-5", img_folder=None,
                     dataset_config=str(tmp_path / "data.toml"), output_folder=str(tmp_path / "out"))
    validate_store(store)


# ------------------------------------------------------------------------------------------ SDXL
def fake_model(path, family: str, single_file: bool = False):
    """A model whose family is told from its configs or header alone (no weights, no torch)."""
    import struct

    path = str(path)
    if single_file:
        keys = ["model.diffusion_model.input_blocks.0.0.weight"]
        keys += (["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                  "conditioner.embedders.1.model.ln_final.weight"] if family == "sdxl"
                 else ["cond_stage_model.transformer.text_model.final_layer_norm.weight"])
        header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)}
        raw = json.dumps(header).encode("utf-8")
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(keys))
        return path
    os.makedirs(os.path.join(path, "unet"), exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline"}
    unet = {"cross_attention_dim": 768}
    if family == "sdxl":
        index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}
        unet = {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}
    with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as handle:
        json.dump(index, handle)
    with open(os.path.join(path, "unet", "config.json"), "w", encoding="utf-8") as handle:
        json.dump(unet, handle)
    return path


SD_SIZES = (512, 320, 960)
XL_SIZES = (1024, 512, 2048)


def _sizes(store):
    return store.train_resolution, store.min_bucket_resolution, store.max_bucket_resolution


def test_sdxl_settings_reach_the_engine():
    config = to_train_config(ArgStore(), has_cuda=True, has_xformers=True).config
    assert config.sdxl is None  # false in ArgsList.py: the engine detects the family
    assert (config.no_half_vae, config.cache_text_encoder_outputs, config.cache_text_encoder_outputs_to_disk) == \
        (False, False, False)
    store = ArgStore(sdxl=True, no_half_vae=True, cache_text_encoder_outputs=True,
                     cache_text_encoder_outputs_to_disk=True, unet_only=True)
    config = to_train_config(store, has_cuda=True, has_xformers=True).config
    assert (config.sdxl, config.no_half_vae, config.cache_text_encoder_outputs,
            config.cache_text_encoder_outputs_to_disk, config.network_train_unet_only) == (True, True, True, True, True)
    infos = {info.name: info for info in ArgStore.settings()}
    assert infos["sdxl"].group == "Base model" and infos["sdxl"].kind == "bool" and infos["sdxl"].default is False
    assert "unet_only" in infos["cache_text_encoder_outputs"].help and "shuffle" in infos["cache_text_encoder_outputs"].help


@pytest.mark.parametrize("single_file", [False, True])
def test_an_sdxl_model_gets_sdxl_sized_defaults_in_one_note(tmp_path, single_file):
    name = "xl.safetensors" if single_file else "xl"
    model = fake_model(tmp_path / name, "sdxl", single_file)
    resolved = resolve_settings({"base_model": model})
    assert _sizes(resolved.store) == XL_SIZES and resolved.store.sdxl is False  # sdxl stays "detect"
    (note,) = [n for n in resolved.notes if "SDXL" in n]
    assert f"detected from {name}" in note and "train_resolution 512 -> 1024" in note
    assert "min_bucket_resolution 320 -> 512" in note and "max_bucket_resolution 960 -> 2048" in note
    assert "\n" not in note
    config = to_train_config(resolved.store, has_cuda=True, has_xformers=True).config
    assert (config.resolution, config.min_bucket_reso, config.max_bucket_reso) == ("1024", 512, 2048)


def test_sd_models_and_models_not_read_cheaply_keep_the_sd_sizes(tmp_path):
    for model in (fake_model(tmp_path / "sd1", "sd1"), fake_model(tmp_path / "sd1.safetensors", "sd1", True)):
        resolved = resolve_settings({"base_model": model})
        assert _sizes(resolved.store) == SD_SIZES and resolved.notes == []
    ckpt = tmp_path / "xl.ckpt"  # a pickle must be loaded with torch: the engine tells its family later
    ckpt.write_bytes(b"not read here")
    for model in (str(ckpt), "stabilityai/stable-diffusion-xl-base-1.0", str(tmp_path / "missing.safetensors")):
        assert _sizes(resolve_settings({"base_model": model}).store) == SD_SIZES
    # the sdxl setting is enough, whatever the file
    resolved = resolve_settings({"base_model": str(ckpt), "sdxl": True})
    assert _sizes(resolved.store) == XL_SIZES and "(sdxl is set)" in resolved.notes[-1]


def test_sdxl_sizes_never_replace_what_the_user_set(tmp_path, monkeypatch):
    model = fake_model(tmp_path / "xl", "sdxl")
    store = resolve_settings({"base_model": model, "train_resolution": 512}).store  # given on the command line
    assert _sizes(store) == (512, 512, 2048)
    store = resolve_settings({"base_model": model, "max_bucket_resolution": 960}).store
    assert _sizes(store) == (512, 512, 960)  # 1024 would not fit in the user's bucket range
    store = resolve_settings({"base_model": model, "height_resolution": 768}).store
    assert _sizes(store) == (512, 512, 2048)  # a non-square resolution is the user's own
    store = resolve_settings({"base_model": model}, ArgStore(train_resolution=768)).store  # an ArgsList.py edit
    assert _sizes(store) == (768, 512, 2048)
    # a JSON file sets every size it holds (ours hold them all), even at the SD values
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"base_model": model, "train_resolution": 512, "net_dim": 8}), encoding="utf-8")
    resolved = resolve_settings({"load_json_path": str(job)})
    assert _sizes(resolved.store) == (512, 512, 2048) and resolved.store.net_dim == 8
    assert "train_resolution" not in resolved.notes[-1]


def test_sdxl_sizing_reads_no_weights_and_imports_no_torch(tmp_path):
    model = fake_model(tmp_path / "xl.safetensors", "sdxl", single_file=True)
    code = ("import sys\nfrom frontend.resolve import resolve_settings\n"
            f"store = resolve_settings({{'base_model': {model!r}}}).store\n"
            "assert store.train_resolution == 1024, store\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ newer engine settings
# ArgStore setting -> (TrainConfig field, a set value, its 0/False/unset value)
NEW_ENGINE_SETTINGS = {
    "skip_nonfinite_steps": ("skip_nonfinite_steps", True, False),
    "torch_compile": ("torch_compile", True, False),
    "channels_last": ("channels_last", True, False),
    "cpu_conv_paths": ("cpu_conv_paths", False, True),
    "save_last_n_steps": ("save_last_n_steps", 5, 0),
    "save_last_n_steps_state": ("save_last_n_steps_state", 3, 0),
    "save_state_on_train_end": ("save_state_on_train_end", True, False),
    "full_fp16": ("full_fp16", True, False),
    "full_bf16": ("full_bf16", True, False),
    "wandb_run_name": ("wandb_run_name", "my run", None),  # empty text means "not set"
    "validation_split": ("validation_split", 0.2, 0.0),
    "validation_seed": ("validation_seed", 7, 0),
    "validate_every_n_steps": ("validate_every_n_steps", 50, 0),
    "validate_every_n_epochs": ("validate_every_n_epochs", 2, 0),
    "max_validation_steps": ("max_validation_steps", 10, 0),
    "disable_mmap_load_safetensors": ("disable_mmap_load_safetensors", True, False),
    "fp8_base": ("fp8_base", True, False),
    "fp8_base_unet": ("fp8_base_unet", True, False),
    "scale_weight_norms": ("scale_weight_norms", 1.0, 0.0),
    "initial_epoch": ("initial_epoch", 3, 1),
    "initial_step": ("initial_step", 10, 0),
    "skip_until_initial_step": ("skip_until_initial_step", True, False),
    "caption_prefix": ("caption_prefix", "masterpiece", None),
    "caption_suffix": ("caption_suffix", "best quality", None),
    "caption_separator": ("caption_separator", ";", ","),
    "keep_tokens_separator": ("keep_tokens_separator", "|||", None),
    "secondary_separator": ("secondary_separator", ";;;", None),
    "enable_wildcard": ("enable_wildcard", True, False),
    "metadata_title": ("metadata_title", "My LoRA", None),
    "metadata_author": ("metadata_author", "someone", None),
    "metadata_description": ("metadata_description", "a test LoRA", None),
    "metadata_license": ("metadata_license", "CC-BY-4.0", None),
    "metadata_tags": ("metadata_tags", "style, test", None),
    "metadata_trigger_phrase": ("metadata_trigger_phrase", "sks shape", None),
    "metadata_usage_hint": ("metadata_usage_hint", "weight 0.8", None),
    "metadata_thumbnail": ("metadata_thumbnail", "thumb.png", None),  # checked by preflight, not here
    "in_json": ("in_json", "/data/meta_cap.json", None),  # paths are made absolute; not checked here
    "dataset_repeats": ("dataset_repeats", 3, 1),
}


def _cli_words(name, value):
    if value is None:
        return [f"--{name}", ""]  # free text: an empty value unsets it ("none" is literal text)
    if isinstance(value, bool):
        return [f"--{name}", "true" if value else "false"]
    return [f"--{name}", str(value)]


def test_every_user_facing_engine_setting_is_offered():
    mapped = {NAME_MAP.get(name, name) for name in ArgStore.setting_names()}
    missing = {f.name for f in dataclasses.fields(TrainConfig)} - mapped
    # engine-internal: the family is detected (sdxl/v2 force it), SDPA is the xformers fallback,
    # the deprecated optimizer switches are migrated to optimizer_type
    assert missing <= {"model_family", "sdpa", "use_8bit_adam", "use_lion_optimizer"}
    infos = {info.name: info for info in ArgStore.settings()}
    for name, (field_name, _, _) in NEW_ENGINE_SETTINGS.items():
        info = infos[name]
        assert info.help and info.group in GROUPS and not info.deprecated, name
        default = next(f for f in dataclasses.fields(TrainConfig) if f.name == field_name).default
        assert info.default == default, name


@pytest.mark.parametrize("name", sorted(NEW_ENGINE_SETTINGS))
def test_new_engine_settings_reach_trainconfig_from_the_command_line(name):
    from frontend.cli import parse_command_line

    field_name, value, zero = NEW_ENGINE_SETTINGS[name]
    mixed = {"full_fp16": "fp16", "full_bf16": "bf16", "fp8_base": "bf16", "fp8_base_unet": "bf16"}.get(name)
    for given in (value, zero):
        argv = _cli_words(name, given) + (["--mixed_precision", mixed] if mixed else [])
        cli_values, _ = parse_command_line(argv)
        store = resolve_settings(cli_values).store
        assert getattr(store, name) == given, (name, given)
        config = to_train_config(store, has_cuda=True, has_xformers=True).config
        assert getattr(config, field_name) == given, (name, given)
        assert type(getattr(config, field_name)) is type(given), (name, given)


@pytest.mark.parametrize("name", sorted(NEW_ENGINE_SETTINGS))
def test_new_engine_settings_reach_trainconfig_from_json(tmp_path, name):
    field_name, value, zero = NEW_ENGINE_SETTINGS[name]
    for given in (value, zero):
        path = tmp_path / f"{name}-{given!r}.json".replace(" ", "_").replace("'", "").replace("/", "_")
        path.write_text(json.dumps({name: given}), encoding="utf-8")
        store = resolve_settings({"load_json_path": str(path)}).store
        assert getattr(store, name) == given, (name, given)
        config = to_train_config(store, has_cuda=True, has_xformers=True).config
        assert getattr(config, field_name) == given, (name, given)
    # a JSON value is overridden by the command line, 0/False included
    path = tmp_path / f"{name}-set.json"
    path.write_text(json.dumps({name: value}), encoding="utf-8")
    store = resolve_settings({"load_json_path": str(path), name: zero}).store
    assert getattr(to_train_config(store, has_cuda=True, has_xformers=True).config, field_name) == zero


def test_full_fp16_falls_back_with_fp16_when_there_is_no_cuda():
    store = ArgStore(mixed_precision="fp16", full_fp16=True)
    mapped = to_train_config(store, has_cuda=False, has_xformers=False)
    assert (mapped.config.mixed_precision, mapped.config.full_fp16) == ("no", False)
    assert "full_fp16 -> off" in mapped.notes[0]
    assert to_train_config(store, has_cuda=True, has_xformers=True).config.full_fp16 is True
